"""The two sequence kernels of a Mamba block: the selective scan and the causal depthwise conv.

Both public functions have exactly the semantics of their CUDA counterparts
(`mamba_ssm.ops.selective_scan_interface.selective_scan_fn` and `causal_conv1d.causal_conv1d_fn`).
On CUDA tensors, when those packages import, the CUDA kernels run; everywhere else our own CPU
implementations do.

The selective scan is the recurrence, for every batch b, channel d and state n,

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]        h[-1] = 0
    y[t] = sum_n C[t] * h[t]
    out  = (y + D * u) * silu(z)

with delta = softplus(delta + delta_bias) when asked. The state h has length x dim x state
entries, 16x the size of the input, which is what makes a CPU implementation slow or memory hungry.

The package:

  * here, the public API: `selective_scan`, `causal_conv1d`, `depthwise_conv1d`, their input checks,
    the choice between the CUDA kernels and the CPU paths, and the settings (`CPU_SCAN_EXTENSION`,
    `SCAN_CHUNK_LENGTH`, `EXTENSION_CHUNK_LENGTH`, `USE_CUDA_KERNELS`), read when a scan runs, so they can be changed at run time;
  * `scan`: the CPU scan, a custom autograd Function over a chunked recurrence that never allocates
    the length x dim x state states, with the recurrence in C++ or, failing that, in torch ops;
  * `cpu_extension`: the build of that C++ recurrence (`ms_temba/csrc/selective_scan_cpu.cpp`);
  * `conv`: the depthwise conv with a fast CPU backward (the TLM's conv, causal_conv1d's CPU path);
  * `reference`: `selective_scan_ref` and `causal_conv1d_ref`, the definitions as plain float64
    loops, against which the tests check every path and the benchmarks time the per-step loop;
  * `workspace`: the CPU buffers that `mamba_direction` reuses across calls for its sequence-long
    temporaries, so that long sequences do not page-fault fresh memory on every call
    (`release_workspace()` frees them).
"""

from __future__ import annotations

import os
import warnings

import torch

from ms_temba.ops.conv import depthwise_conv1d
from ms_temba.ops.cpu_extension import build_cpu_scan_extension
from ms_temba.ops.mamba_inner import MambaInnerFunction, selective_projections
from ms_temba.ops.reference import ACTIVATIONS, causal_conv1d_ref, selective_scan_ref
from ms_temba.ops.scan import SelectiveScanFunction, num_groups
from ms_temba.ops.workspace import release_workspace

__all__ = [
    "CPU_SCAN_EXTENSION",
    "HAS_CUDA_KERNELS",
    "USE_CUDA_KERNELS",
    "SCAN_CHUNK_LENGTH",
    "EXTENSION_CHUNK_LENGTH",
    "causal_conv1d",
    "causal_conv1d_ref",
    "depthwise_conv1d",
    "mamba_direction",
    "release_workspace",
    "selective_scan",
    "selective_scan_ref",
]

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
# Whether CUDA tensors go to those kernels when they are there (MS_TEMBA_CUDA_KERNELS=0, or setting
# this to False, runs the torch-op paths on the GPU instead: how the GPU tests and benchmarks
# compare the two).
USE_CUDA_KERNELS: bool = os.environ.get("MS_TEMBA_CUDA_KERNELS", "1").lower() not in ("0", "false", "no", "off")

# Time steps per chunk of the CPU scan: one saved state per chunk in the forward, and the states
# of one chunk recomputed at a time in the backward. For the eager path a chunk's working set
# (three buffers of chunk x batch x dim x state floats) should stay in the CPU caches, while longer
# chunks mean fewer ops; of 16, 32, 64 and 128, 32 was the fastest forward + backward at batch 1,
# dim 1152, state 16 on the 2-core development machine (1 MiB L2 per core).
SCAN_CHUNK_LENGTH = 32
# The same for the C++ recurrence, whose per-thread chunk buffers (16 channels) stay in the caches
# at any of those lengths: 32, 64 and 128 timed the same (forward + backward, dim 1152, length
# 2500, 1 thread: 0.14-0.17 s each), and at 64 the saved states, one per chunk of each scan, take
# half the memory of 32's (about 17 MiB of the default model's activations at length 2500).
EXTENSION_CHUNK_LENGTH = 64

# The C++ recurrence (csrc/selective_scan_cpu.cpp), built on first use. `CPU_SCAN_EXTENSION`
# (environment variable MS_TEMBA_CPU_SCAN_EXTENSION=0) turns it off; it is also off after a
# failed build (no C++ compiler, no ninja), with one warning, and the eager path runs instead.
CPU_SCAN_EXTENSION: bool = (os.environ.get("MS_TEMBA_CPU_SCAN_EXTENSION", "1").strip().lower()
                            not in ("0", "false", "no", "off"))
_extension = None


def _cpu_scan_extension():
    """The loaded C++ extension module, or None when it is off or cannot be built."""
    global _extension, CPU_SCAN_EXTENSION
    if not CPU_SCAN_EXTENSION:
        return None
    if _extension is None:
        try:
            _extension = build_cpu_scan_extension()
        except Exception as error:  # noqa: BLE001 - whatever the toolchain raises, fall back
            CPU_SCAN_EXTENSION = False
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(f"ms_temba: the C++ selective scan could not be built ({first_line[:300]}); "
                          f"using the slower pure-PyTorch scan", RuntimeWarning, stacklevel=3)
            return None
    return _extension


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
    reverse: bool = False,
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
        reverse: scan from the last time step to the first, i.e. the scan of the time-reversed
            sequence with its output reversed back: `selective_scan(u.flip(-1), ...).flip(-1)`
            with every (..., length) input flipped. The backward direction of a bidirectional
            Mamba uses it to read the same tensors as the forward direction instead of flipped
            copies of them (on the CPU path the flip is folded into the copies to time-major
            layout that the scan makes anyway); the last state is then h[0].
        chunk_length: time steps per chunk of the CPU path (default `EXTENSION_CHUNK_LENGTH`
            with the C++ recurrence, `SCAN_CHUNK_LENGTH` without).

    Returns:
        out (batch, dim, length) in u's dtype, or (out, last_state) with return_last_state.
        On the CPU path `out` is a transposed view of time-major storage (as if it were
        `y.transpose(1, 2)` of a (batch, length, dim) tensor); `.contiguous()` it if needed.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and USE_CUDA_KERNELS and _cuda_selective_scan is not None:
        return _kernel_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, reverse)
    extension = _cpu_scan_extension() if u.device.type == "cpu" else None
    chunk_length = _chunk_length(chunk_length, extension)
    out, last_state = SelectiveScanFunction.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), chunk_length, extension
    )
    return (out, last_state) if return_last_state else out


def mamba_direction(
    x: torch.Tensor,
    z: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    delta_softplus: bool = True,
    reverse: bool = False,
    chunk_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of a Mamba block from the x half of its in_proj output to the gated scan
    output: the causal conv with silu (u, zeroed where `mask` is False), x_proj's step size (low
    rank), B and C, dt_proj, and the selective scan, reversed in time if `reverse`.

    Args:
        x, z: (batch, dim, length), the halves of the in_proj output.
        conv_weight: (dim, width); conv_bias: (dim,) or None.
        x_proj_weight: (dt_rank + 2 state, dim); dt_proj_weight: (dim, dt_rank).
        A, D, delta_bias, delta_softplus, chunk_length: as for `selective_scan`.
        mask: optional (batch, length) bool, True = real frame.

    Returns:
        out (batch, dim, length) and C (batch, state, length).

    On the CPU path this is one autograd Function (`mamba_inner.MambaInnerFunction`, mamba_ssm's
    `MambaInnerFn` with `checkpoint_lvl=1`) that keeps x rather than u and delta for the backward
    and recomputes them there; elsewhere it is the ops written out.
    """
    dt_rank, state = dt_proj_weight.shape[1], A.shape[1]
    if x_proj_weight.shape[0] != dt_rank + 2 * state:
        raise ValueError(f"mamba_direction: x_proj_weight must have dt_rank + 2 state = "
                         f"{dt_rank + 2 * state} rows, got {x_proj_weight.shape[0]}")
    if x.is_cuda and USE_CUDA_KERNELS and _cuda_selective_scan is not None:
        u = causal_conv1d(x, conv_weight, conv_bias, activation="silu", reverse=reverse)
        if mask is not None:
            u = u.masked_fill(~mask.unsqueeze(1), 0.0)
        _, delta, B, C = selective_projections(u, x_proj_weight, dt_proj_weight, dt_rank)
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              reverse=reverse), C
    extension = _cpu_scan_extension() if x.device.type == "cpu" else None
    chunk_length = _chunk_length(chunk_length, extension)
    options = (dt_rank, bool(delta_softplus), bool(reverse), chunk_length, extension)
    return MambaInnerFunction.apply(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                    A, D, delta_bias, mask, options)


def _chunk_length(chunk_length: int | None, extension) -> int:
    """The CPU scan's chunk length: the caller's, else the default of the path that runs."""
    if chunk_length is None:
        return EXTENSION_CHUNK_LENGTH if extension is not None else SCAN_CHUNK_LENGTH
    if int(chunk_length) < 1:
        raise ValueError(f"selective_scan: chunk_length must be >= 1, got {chunk_length}")
    return int(chunk_length)


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
    groups = num_groups(B)
    if num_groups(C) != groups:
        fail(f"B has {groups} groups but C has {num_groups(C)}; they must match")
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


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution
# ---------------------------------------------------------------------------------------------


def _kernel_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                           reverse):
    """mamba_ssm's kernel, reversed by flipping time. Keywords throughout: the packages' signatures
    gain parameters between releases."""
    flip = (lambda t: None if t is None else t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    result = _cuda_selective_scan(flip(u), flip(delta), A, flip(B), flip(C), D=D, z=flip(z),
                                  delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  return_last_state=return_last_state)
    if return_last_state:
        return flip(result[0]), result[1]
    return flip(result)


def _kernel_causal_conv1d(x, weight, bias, activation, reverse):
    """causal_conv1d's kernel, reversed by flipping time. `activation` must be a keyword: since
    causal-conv1d 1.1 the fourth positional parameter is `seq_idx` (found on the H200 machine)."""
    if reverse:
        return _cuda_causal_conv1d(x.flip(-1), weight, bias=bias, activation=activation).flip(-1)
    return _cuda_causal_conv1d(x, weight, bias=bias, activation=activation)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    reverse: bool = False,
) -> torch.Tensor:
    """Causal depthwise 1D convolution; the semantics of causal_conv1d's `causal_conv1d_fn`.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]), with x = 0
    before the start of the sequence, so output t reads only inputs t - width + 1 .. t.

    Args:
        x: (batch, dim, length).
        weight: (dim, width).
        bias: optional (dim,).
        activation: None, "silu" or its alias "swish".
        reverse: the causal conv of the time-reversed sequence, reversed back
            (`causal_conv1d(x.flip(-1), ...).flip(-1)`): output t reads inputs t .. t + width - 1.
            On CPU that is the same taps in the other order, with no flipped copies.
    """
    if activation not in ACTIVATIONS:
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
    if x.is_cuda and USE_CUDA_KERNELS and _cuda_causal_conv1d is not None:
        return _kernel_causal_conv1d(x, weight, bias, activation, reverse)
    padding = (weight.shape[1] - 1, 0)
    if reverse:  # out[t] = sum_k weight[k] x[t + width - 1 - k]: the reversed kernel, padded after
        weight, padding = weight.flip(-1), padding[::-1]
    return depthwise_conv1d(x, weight, bias, padding=padding, silu=activation is not None)
