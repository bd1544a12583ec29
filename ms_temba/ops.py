"""The two sequence kernels of a Mamba block: the selective scan and the causal depthwise conv.

Both functions have exactly the semantics of their CUDA counterparts
(`mamba_ssm.ops.selective_scan_interface.selective_scan_fn` and
`causal_conv1d.causal_conv1d_fn`). On CUDA tensors, when those packages import, the CUDA
kernels run; everywhere else a pure-PyTorch implementation runs.

The selective scan is the recurrence, for every batch b, channel d and state n,

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]        h[-1] = 0
    y[t] = sum_n C[t] * h[t]
    out  = (y + D * u) * silu(z)

with delta = softplus(delta + delta_bias) when asked. The state h has length x dim x state
entries, 16x the size of the input, which is what makes a CPU implementation slow or memory hungry.
The CPU path here (`_SelectiveScanFunction`) is a custom autograd Function that

  * works in a time-major layout (length, batch, groups, channels_per_group, state), so each time
    step is one fused `addcmul` over contiguous memory;
  * walks the sequence in chunks of `SCAN_CHUNK_LENGTH` steps with the state carried across chunks,
    so nothing of size length x dim x state is ever allocated: the forward keeps only the state at
    each chunk start, and the backward recomputes a chunk's states from it (like gradient
    checkpointing) before running the reverse-time recurrence of the gradient through the chunk;
  * reduces over the state dimension with matmuls, which the CPU BLAS does well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The CUDA kernels. Importing them can fail with more than ImportError (a CUDA extension built
# against another torch raises OSError or RuntimeError), and none of them can run on CPU anyway.
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except (ImportError, OSError, RuntimeError):
    _cuda_selective_scan = None
try:
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d
except (ImportError, OSError, RuntimeError):
    _cuda_causal_conv1d = None

HAS_CUDA_KERNELS: bool = _cuda_selective_scan is not None and _cuda_causal_conv1d is not None

# Time steps per chunk of the CPU scan. A chunk's working set (a few tensors of
# chunk x batch x dim x state floats) should stay in the CPU caches; the benchmark
# (benchmarks/bench_scan.py) measured this value as the fastest for the MS-Temba shapes.
SCAN_CHUNK_LENGTH = 64


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------


def selective_scan(
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
    chunk_length: int | None = None,
):
    """The Mamba selective scan; the semantics and shapes of mamba_ssm's `selective_scan_fn`.

    Args:
        u, delta: (batch, dim, length) input and step size.
        A: (dim, state) real state matrix (diagonal per channel; usually negative).
        B, C: (batch, state, length), or (batch, groups, state, length) where channel d uses
            group d // (dim // groups). B and C must have the same number of groups.
        D: optional (dim,) skip connection.
        z: optional (batch, dim, length) gate; the output is multiplied by silu(z).
        delta_bias: optional (dim,) added to delta before the softplus.
        delta_softplus: apply softplus to delta (+ delta_bias).
        return_last_state: also return the final state h[length-1], (batch, dim, state). As in
            mamba_ssm, no gradient flows back through the returned state.
        chunk_length: time steps per chunk of the CPU path (default `SCAN_CHUNK_LENGTH`).

    Returns:
        out (batch, dim, length) in u's dtype, or (out, last_state) with return_last_state.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and _cuda_selective_scan is not None:
        return _cuda_selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    chunk_length = SCAN_CHUNK_LENGTH if chunk_length is None else int(chunk_length)
    if chunk_length < 1:
        raise ValueError(f"selective_scan: chunk_length must be >= 1, got {chunk_length}")
    out, last_state = _SelectiveScanFunction.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk_length
    )
    return (out, last_state) if return_last_state else out


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the first input whose shape, dtype or device is wrong."""

    def fail(message: str):
        raise ValueError(f"selective_scan: {message}")

    for name, tensor in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(tensor, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if u.dim() != 3:
        fail(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        fail("the sequence length is 0")
    if delta.shape != u.shape:
        fail(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        fail("complex A is not supported (mamba_ssm's real-A variant only)")
    if A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be (dim={dim}, state), got shape {tuple(A.shape)}")
    state = A.shape[1]
    for name, tensor in (("B", B), ("C", C)):
        if tensor.dim() == 3:
            expected = (batch, state, length)
        elif tensor.dim() == 4:
            expected = (batch, tensor.shape[1], state, length)
        else:
            fail(
                f"{name} must be (batch, state, length) or (batch, groups, state, length), "
                f"got shape {tuple(tensor.shape)}"
            )
        if tuple(tensor.shape) != expected:
            fail(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    groups = _num_groups(B)
    if _num_groups(C) != groups:
        fail(f"B has {groups} groups but C has {_num_groups(C)}; they must match")
    if groups == 0 or dim % groups != 0:
        fail(f"dim={dim} is not divisible by the number of groups {groups}")
    if z is not None and z.shape != u.shape:
        fail(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None and tuple(tensor.shape) != (dim,):
            fail(f"{name} must be (dim={dim},), got shape {tuple(tensor.shape)}")
    for name, tensor in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C),
                         ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != u.device:
            fail(f"{name} is on {tensor.device} but u is on {u.device}")


def _num_groups(B_or_C: torch.Tensor) -> int:
    return 1 if B_or_C.dim() == 3 else B_or_C.shape[1]


class _SelectiveScanFunction(torch.autograd.Function):
    """Chunked sequential scan with an explicit reverse-time backward (see the module docstring).

    Notation inside: T = chunk length, G = groups, H = channels per group, N = state size.
    Every per-time tensor is stored time-major: (length, batch, G, H) for per-channel values,
    (length, batch, G, 1, N) for B and C, and (T, batch, G, H, N) for a chunk of states.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_length):
        compute_dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        groups = _num_groups(B)
        u_t, delta_t, A_g, B_t, C_t = _to_time_major(u, delta, A, B, C, groups, compute_dtype)
        step = _step_size(delta_t, delta_bias, delta_softplus, groups)
        step_u = step * u_t

        y = torch.empty_like(u_t)
        chunk_starts = range(0, length, chunk_length)
        # The state entering each chunk: all the backward needs to recompute the chunk.
        initial_states = u_t.new_empty(len(chunk_starts), batch, groups, dim // groups, A.shape[1])
        state = u_t.new_zeros(initial_states.shape[1:])
        for index, start in enumerate(chunk_starts):
            stop = min(start + chunk_length, length)
            initial_states[index] = state
            states, _ = _chunk_states(state, step[start:stop], step_u[start:stop], A_g,
                                      B_t[start:stop])
            # y[t] = sum_n C[t, n] h[t, n], as a batch of (H, N) @ (N, 1) products.
            y[start:stop] = (states[1:] @ C_t[start:stop].transpose(-1, -2)).squeeze(-1)
            state = states[-1]

        out = _skip_and_gate(y, u_t, D, z, groups)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, initial_states)
        ctx.delta_softplus = delta_softplus
        ctx.chunk_length = chunk_length
        last_state = state.reshape(batch, dim, -1).to(u.dtype)
        ctx.mark_non_differentiable(last_state)
        return out.reshape(length, batch, dim).permute(1, 2, 0).to(u.dtype), last_state

    @staticmethod
    def backward(ctx, grad_out, _grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, y, initial_states = ctx.saved_tensors
        compute_dtype = y.dtype
        batch, dim, length = u.shape
        groups = _num_groups(B)
        chunk_length = ctx.chunk_length
        u_t, delta_t, A_g, B_t, C_t = _to_time_major(u, delta, A, B, C, groups, compute_dtype)
        step = _step_size(delta_t, delta_bias, ctx.delta_softplus, groups)
        step_u = step * u_t
        grad_out_t = grad_out.permute(2, 0, 1).to(compute_dtype).reshape(y.shape)

        # Undo the gate and the skip connection: out = (y + D u) silu(z).
        grad_z = None
        if z is not None:
            z_t = z.permute(2, 0, 1).to(compute_dtype).reshape(y.shape)
            sig_z = torch.sigmoid(z_t)
            pre_gate = y if D is None else y + D.to(compute_dtype).view(groups, -1) * u_t
            # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
            grad_z = grad_out_t * pre_gate * sig_z * (1 + z_t * (1 - sig_z))
            grad_y = grad_out_t * z_t * sig_z
        else:
            grad_y = grad_out_t
        grad_D = None
        grad_u = torch.zeros_like(u_t)
        if D is not None:
            grad_D = (grad_y * u_t).sum(dim=0).sum(dim=0).reshape(dim)
            grad_u += grad_y * D.to(compute_dtype).view(groups, -1)

        grad_step_u = torch.empty_like(u_t)  # d loss / d (delta u)
        grad_step = torch.empty_like(u_t)  # d loss / d delta, through the decay exp(delta A)
        grad_A = torch.zeros_like(A_g)
        grad_B = torch.empty_like(B_t)
        grad_C = torch.empty_like(C_t)
        # d loss / d h[t] of the first step of the chunk after this one, times that step's decay:
        # the gradient the later chunk sends back into this chunk's last state.
        carried = torch.zeros_like(initial_states[0])
        chunk_starts = list(range(0, length, chunk_length))
        for index in reversed(range(len(chunk_starts))):
            start = chunk_starts[index]
            stop = min(start + chunk_length, length)
            states, decay = _chunk_states(initial_states[index], step[start:stop],
                                          step_u[start:stop], A_g, B_t[start:stop])
            chunk_grad_y = grad_y[start:stop].unsqueeze(-1)  # (T, batch, G, H, 1)

            # grad_h[t] = C[t] grad_y[t] + decay[t+1] grad_h[t+1], in reverse time.
            grad_h = chunk_grad_y * C_t[start:stop]
            grad_h[-1] += carried
            for t in range(stop - start - 2, -1, -1):
                grad_h[t].addcmul_(decay[t + 1], grad_h[t + 1])
            carried = decay[0] * grad_h[0]

            # h[t] = decay[t] h[t-1] + (delta u)[t] B[t]
            grad_C[start:stop] = chunk_grad_y.transpose(-1, -2) @ states[1:]
            grad_step_u[start:stop] = (grad_h @ B_t[start:stop].transpose(-1, -2)).squeeze(-1)
            grad_B[start:stop] = step_u[start:stop].unsqueeze(-2) @ grad_h
            # decay = exp(delta A): d loss / d (delta A) = grad_h * decay * h[t-1]
            grad_decay_arg = grad_h.mul_(decay).mul_(states[:-1])
            grad_step[start:stop] = (grad_decay_arg * A_g).sum(dim=-1)
            grad_A += (grad_decay_arg * step[start:stop].unsqueeze(-1)).sum(dim=(0, 1))

        grad_u += grad_step_u * step
        grad_step += grad_step_u * u_t
        grad_delta_bias = None
        if ctx.delta_softplus:
            pre_softplus = delta.permute(2, 0, 1).to(compute_dtype).reshape(y.shape)
            if delta_bias is not None:
                pre_softplus = pre_softplus + delta_bias.to(compute_dtype).view(groups, -1)
            grad_step = grad_step * torch.sigmoid(pre_softplus)
        if delta_bias is not None:
            grad_delta_bias = grad_step.sum(dim=0).sum(dim=0).reshape(dim)

        def channels_first(grad_t):  # (length, batch, G, H) -> (batch, dim, length)
            return grad_t.reshape(length, batch, dim).permute(1, 2, 0)

        def state_first(grad_t, like):  # (length, batch, G, 1, N) -> like B or C
            return grad_t.squeeze(-2).permute(1, 2, 3, 0).reshape(like.shape)

        return (
            channels_first(grad_u).to(u.dtype),
            channels_first(grad_step).to(delta.dtype),
            grad_A.reshape(dim, -1).to(A.dtype),
            state_first(grad_B, B).to(B.dtype),
            state_first(grad_C, C).to(C.dtype),
            None if grad_D is None else grad_D.to(D.dtype),
            None if grad_z is None else channels_first(grad_z).to(z.dtype),
            None if grad_delta_bias is None else grad_delta_bias.to(delta_bias.dtype),
            None,
            None,
        )


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _to_time_major(u, delta, A, B, C, groups, dtype):
    """Permute the inputs to the contiguous time-major layout the scan works in."""
    batch, dim, length = u.shape

    def per_channel(x):  # (batch, dim, length) -> (length, batch, G, H)
        return x.permute(2, 0, 1).to(dtype).contiguous().view(length, batch, groups, -1)

    def per_state(x):  # (batch, [G,] N, length) -> (length, batch, G, 1, N)
        x = x.view(batch, groups, -1, length)
        return x.permute(3, 0, 1, 2).to(dtype).contiguous().unsqueeze(-2)

    A_g = A.to(dtype).contiguous().view(groups, dim // groups, -1)
    return per_channel(u), per_channel(delta), A_g, per_state(B), per_state(C)


def _step_size(delta_t, delta_bias, delta_softplus, groups):
    """The effective step softplus(delta + delta_bias), time-major."""
    if delta_bias is not None:
        delta_t = delta_t + delta_bias.to(delta_t.dtype).view(groups, -1)
    return F.softplus(delta_t) if delta_softplus else delta_t


def _chunk_states(initial_state, step, step_u, A_g, B_chunk):
    """Run the recurrence over one chunk of T steps.

    Returns states (T + 1, batch, G, H, N), whose row 0 is `initial_state` and row t + 1 is h[t],
    and the per-step decay exp(delta A) (T, batch, G, H, N).
    """
    decay = torch.exp(step.unsqueeze(-1) * A_g)
    states = torch.empty((step.shape[0] + 1, *initial_state.shape), dtype=decay.dtype,
                         device=decay.device)
    states[0] = initial_state
    # The input term (delta u)[t] B[t] goes straight into the state buffer; the loop then adds
    # decay[t] * h[t-1] in place, one fused op per step.
    torch.mul(step_u.unsqueeze(-1), B_chunk, out=states[1:])
    for t in range(step.shape[0]):
        states[t + 1].addcmul_(decay[t], states[t])
    return states, decay


def _skip_and_gate(y, u_t, D, z, groups):
    """out = (y + D u) * silu(z), time-major."""
    out = y
    if D is not None:
        out = out + D.to(y.dtype).view(groups, -1) * u_t
    if z is not None:
        z_t = z.permute(2, 0, 1).to(y.dtype).reshape(u_t.shape)
        out = out * F.silu(z_t)
    return out


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution
# ---------------------------------------------------------------------------------------------


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise 1D convolution; the semantics of causal_conv1d's `causal_conv1d_fn`.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]), with x = 0
    before the start of the sequence, so output t reads only inputs t - width + 1 .. t.

    Args:
        x: (batch, dim, length).
        weight: (dim, width).
        bias: optional (dim,).
        activation: None, "silu" or its alias "swish".
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, length), got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    dim = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"causal_conv1d: weight must be (dim={dim}, width), got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"causal_conv1d: bias must be (dim={dim},), got shape "
                         f"{tuple(bias.shape)}")
    if x.is_cuda and _cuda_causal_conv1d is not None:
        return _cuda_causal_conv1d(x, weight, bias, activation)
    width = weight.shape[1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=dim)
    return F.silu(out) if activation is not None else out
