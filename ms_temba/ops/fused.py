"""BiMamba's forward pass through mamba_ssm's fused kernel chain, `mamba_inner_fn`.

`BiMamba.forward` runs each direction as separate ops: causal conv, x_proj, dt_proj, selective scan,
each kernel writing its output to memory for the next to read, and autograd keeping all of them. On
CUDA, mamba_ssm's `mamba_inner_fn` does one direction of a Mamba block (conv, x_proj, dt_proj, scan,
gate and out_proj) as a single autograd Function: it keeps only its input and the scan's chunk
states, recomputes the conv and delta in the backward (`checkpoint_lvl=1`), and calls the conv and
scan kernels directly, without the checks and copies of the public wrappers.

Vision Mamba's fork has `mamba_inner_fn_no_out_proj`, which would let the two directions share one
out_proj; official mamba_ssm has only `mamba_inner_fn`, with out_proj inside. Since out_proj is
linear (and BiMamba's has no bias),

    out_proj((y_f + y_b) / 2) = (out_proj(y_f) + out_proj(y_b)) / 2,

so two `mamba_inner_fn` calls, one per direction, averaged, are BiMamba's output exactly, for the
price of a second (d_inner -> d_model) matrix product.

What BiMamba.forward adds to a plain Mamba, done around the fused chain:

  * The backward direction. Vim scans `xz.flip(-1)` and flips the output back. With padding at the
    end, that flip would put the padding first, where the conv bias and the state would carry it
    into real frames; BiMamba.forward zeroes u at padded frames between the conv and the scan to
    stop that, which is inside what mamba_inner_fn fuses. Here each sample's real frames are
    reversed in place instead (frames L-1 .. 0, then the padding, untouched): the padding stays at
    the end in both directions, where a causal conv and scan never read it. With xz zeroed at
    padded frames, as BiMamba.forward does, every real frame's output is exactly BiMamba's, and the
    output at padded frames is zero (the gate silu(z) is 0 there).
  * The C sequences (`return_c`, for MS-Temba's branch-consistency loss), which mamba_inner_fn
    computes but does not return: recomputed here as the C slice of x_proj on the conv output, one
    causal_conv1d and one (d_inner -> d_state) product per direction, masked as BiMamba's.

`applies` says when this path can be taken: CUDA tensors, with mamba_ssm and causal_conv1d
importable. `ENABLED` (environment variable MS_TEMBA_FUSED_BIMAMBA=0) turns it off, read at call
time, so tests and benchmarks can compare the two paths.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ms_temba import ops

try:
    # The fused chain calls causal_conv1d's kernel itself; without causal_conv1d it asserts, so
    # both must import. A CUDA extension built against another torch can raise more than ImportError.
    import causal_conv1d  # noqa: F401
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
except (ImportError, OSError, RuntimeError):
    mamba_inner_fn = None

__all__ = ["ENABLED", "applies", "bimamba_forward"]

ENABLED: bool = (os.environ.get("MS_TEMBA_FUSED_BIMAMBA", "1").strip().lower()
                 not in ("0", "false", "no", "off"))


def applies(hidden_states: torch.Tensor) -> bool:
    """Whether `bimamba_forward` with mamba_ssm's kernels can replace BiMamba.forward here."""
    return ENABLED and ops.USE_CUDA_KERNELS and mamba_inner_fn is not None and hidden_states.is_cuda


def bimamba_forward(module, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                    return_c: bool = False, inner_fn=None):
    """BiMamba.forward (same arguments, same results) through `mamba_inner_fn`.

    Args:
        module: an `ms_temba.mamba.BiMamba`; its parameters are used as they are, so gradients
            reach them as through BiMamba.forward.
        hidden_states: (batch, length, d_model).
        mask: optional (batch, length) bool, True = real frame, padding only at the end.
        return_c: also return C (batch, length, 2 * d_state), as BiMamba.forward does.
        inner_fn: the per-direction function, with mamba_ssm `mamba_inner_fn`'s signature and
            semantics; default mamba_inner_fn itself. Tests pass a reference implementation to check
            this function on CPU.
    """
    inner_fn = mamba_inner_fn if inner_fn is None else inner_fn
    if inner_fn is None:
        raise RuntimeError("bimamba_forward: mamba_ssm's mamba_inner_fn is not available "
                           "(mamba_ssm and causal_conv1d must import)")
    xz = module.in_proj(hidden_states)
    if mask is not None:
        xz = xz.masked_fill(~mask.unsqueeze(-1), 0.0)  # masked_fill: NaN in padding cannot leak
    xz = xz.transpose(1, 2)  # (batch, 2 * d_inner, length), the layout mamba_inner_fn reads
    reverse = _reverse_real_frames(mask, xz.shape[-1])
    out_f = _direction(inner_fn, xz, module, module.conv1d, module.x_proj, module.dt_proj,
                       module.A_log, module.D)
    out_b = _direction(inner_fn, reverse(xz, -1), module, module.conv1d_b, module.x_proj_b,
                       module.dt_proj_b, module.A_b_log, module.D_b)
    out = (out_f + reverse(out_b, 1)) / 2
    if not return_c:
        return out
    x = xz[:, : module.d_inner]
    c_f = _c_sequence(module, x, mask, module.conv1d, module.x_proj, reverse=False)
    c_b = _c_sequence(module, x, mask, module.conv1d_b, module.x_proj_b, reverse=True)
    return out, torch.cat([c_f, c_b], dim=-1)


def _reverse_real_frames(mask: torch.Tensor | None, length: int):
    """The function that reverses each sample's real frames along a time dimension and leaves its
    trailing padding where it is; it is its own inverse. Without a mask, a plain flip."""
    if mask is None:
        return lambda t, dim: t.flip(dim)
    real = mask.sum(dim=1, keepdim=True)  # (batch, 1): stays on the device, no host sync
    steps = torch.arange(length, device=mask.device)
    index = torch.where(steps < real, real - 1 - steps, steps)  # (batch, length)

    def reverse(t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [t.shape[0]] + [1] * (t.dim() - 1)
        shape[dim] = length
        return t.gather(dim, index.view(shape).expand_as(t))

    return reverse


def _direction(inner_fn, xz, module, conv1d, x_proj, dt_proj, A_log, D) -> torch.Tensor:
    """One direction, out_proj included: (batch, length, d_model) in xz's time order. A, D and the
    dt bias in fp32, as mamba_simple passes them."""
    return inner_fn(
        xz, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight,
        module.out_proj.weight, module.out_proj.bias,
        -torch.exp(A_log.float()), None, None, D.float(),
        delta_bias=dt_proj.bias.float(), delta_softplus=True,
    )


def _c_sequence(module, x, mask, conv1d, x_proj, reverse) -> torch.Tensor:
    """C (batch, length, d_state) of one direction, in time order, zero at padded frames: what
    BiMamba._scan returns, from the C rows of x_proj only."""
    u = ops.causal_conv1d(x, conv1d.weight.squeeze(1), conv1d.bias, activation="silu", reverse=reverse)
    if mask is not None:
        u = u.masked_fill(~mask.unsqueeze(1), 0.0)
    return F.linear(u.transpose(1, 2), x_proj.weight[-module.d_state:])
