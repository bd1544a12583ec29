"""Reference implementations of the two kernels: their definitions written as plain loops, one time
step at a time, in float64 by default. Slow and easy to check by eye; the tests compare the fast
paths (`selective_scan`, `causal_conv1d`: CUDA kernels, the C++ recurrence, the eager fallback)
against them, forward and, through autograd, every gradient, and benchmarks/bench_scan.py times
the per-step loop. As mamba_ssm keeps `selective_scan_ref` beside `selective_scan_fn`, these live
beside the fast paths, and nothing here shares code with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    reverse: bool = False,
    dtype: torch.dtype | None = torch.float64,
    unbind: bool = True,
):
    """The selective scan of `ms_temba.ops.selective_scan` (same arguments, shapes and result),
    straight from its definition: for every batch b, channel d (in group g) and state n,

        h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[g, t] * u[t]      h[-1] = 0
        y[t] = sum_n C[g, t] * h[t]
        out  = (y + D * u) * silu(z)

    with delta = softplus(delta + delta_bias) when asked; with `reverse`, the scan of the
    time-flipped inputs, flipped back (last_state is then h[0]).

    Unlike selective_scan it computes *and returns* in `dtype` (float64 by default, so the result
    is the exact value that a float32 implementation approximates; None: u's dtype), and it keeps
    every step in autograd's graph, so its gradients are autograd's. `unbind=True` walks the steps
    over `unbind` views, which autograd differentiates as one node (a backward linear in the
    length); `unbind=False` indexes step t as mamba_ssm's `selective_scan_ref` does, whose
    backward builds a full-size gradient per step (quadratic in the length: the textbook loop).
    """
    if reverse:
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        out, last_state = selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias,
                                             delta_softplus, True, dtype=dtype, unbind=unbind)
        return (out.flip(-1), last_state) if return_last_state else out.flip(-1)
    dtype = u.dtype if dtype is None else dtype
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    if B.dim() == 3:  # (batch, state, length): one group
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups, state = B.shape[1], A.shape[1]
    # Channels as (group, channel in group); B and C time before state: (batch, groups, length, state).
    u_g, delta_g = (t.reshape(batch, groups, dim // groups, length) for t in (u, delta))
    A_g = A.reshape(groups, dim // groups, 1, state)
    B, C = B.transpose(-1, -2), C.transpose(-1, -2)
    # Every step's decay exp(delta A) and input delta B u: (batch, groups, channels, length, state).
    decay = torch.exp(delta_g[..., None] * A_g)
    drive = (delta_g * u_g)[..., None] * B[:, :, None]
    if unbind:
        steps = zip(decay.unbind(3), drive.unbind(3), C.unbind(2))
    else:
        steps = ((decay[:, :, :, t], drive[:, :, :, t], C[:, :, t]) for t in range(length))
    h = u.new_zeros(batch, groups, dim // groups, state)
    ys = []
    for decay_t, drive_t, C_t in steps:
        h = decay_t * h + drive_t
        ys.append((h * C_t[:, :, None]).sum(-1))
    out = torch.stack(ys, dim=-1).reshape(batch, dim, length)
    if D is not None:
        out = out + D.to(dtype)[:, None] * u
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return (out, h.reshape(batch, dim, state)) if return_last_state else out


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    reverse: bool = False,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """The causal depthwise conv of `ms_temba.ops.causal_conv1d` (same arguments and shapes), one
    output step and one tap at a time:

        out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k])

    with x = 0 before the start; with `reverse`, the conv of the time-flipped input, flipped back.
    Computed and returned in `dtype` (float64 by default; None: x's dtype), differentiable.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d_ref: activation must be None or 'silu', got {activation!r}")
    if reverse:
        return causal_conv1d_ref(x.flip(-1), weight, bias, activation, dtype=dtype).flip(-1)
    dtype = x.dtype if dtype is None else dtype
    x, weight = x.to(dtype), weight.to(dtype)
    batch, dim, length = x.shape
    width = weight.shape[1]
    steps = []
    for t in range(length):
        out_t = x.new_zeros(batch, dim)
        for k in range(width):
            source = t - (width - 1) + k
            if source >= 0:
                out_t = out_t + weight[:, k] * x[:, :, source]
        steps.append(out_t)
    out = torch.stack(steps, dim=-1)
    if bias is not None:
        out = out + bias.to(dtype)[:, None]
    return out if activation is None else F.silu(out)
