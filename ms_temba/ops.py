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

  * walks the sequence in chunks of `SCAN_CHUNK_LENGTH` steps with the state carried across chunks,
    so nothing of size length x dim x state is ever allocated: the forward keeps only the state at
    each chunk start, and the backward recomputes a chunk's states from it (like gradient
    checkpointing) before running the reverse-time recurrence of the gradient through the chunk;
  * runs that recurrence in a small C++ extension (`csrc/selective_scan_cpu.cpp`, built with
    torch.utils.cpp_extension on first use and cached): blocks of 16 adjacent channels keep their
    states in registers for the whole sequence, and exp, the update and the readout of each step
    are one vectorised loop. That is 4-5x faster than the same chunked algorithm in torch ops,
    whose time goes to the per-step op overhead and to re-reading chunk buffers once per op;
  * falls back to exactly that algorithm in torch ops (`_scan_forward_eager`,
    `_scan_backward_eager`) when the extension is off (`CPU_SCAN_EXTENSION`, environment
    variable MS_TEMBA_CPU_SCAN_EXTENSION=0) or cannot be built (no C++ compiler). It stores a
    chunk time-major as (time, batch, groups, state, channels_per_group), so each time step is
    one fused `addcmul` over contiguous memory and every other op runs along the contiguous
    channel axis, which measured 2-4x faster than putting the state axis last.

Both paths are tested against a float64 step-by-step reference, every gradient included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path

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

# Time steps per chunk of the CPU scan: one saved state per chunk in the forward, and the states
# of one chunk recomputed at a time in the backward. For the eager path a chunk's working set
# (three buffers of chunk x batch x dim x state floats) should stay in the CPU caches, while longer
# chunks mean fewer ops; of 16, 32, 64 and 128, 32 was the fastest forward + backward at batch 1,
# dim 1152, state 16 on the 2-core development machine (1 MiB L2 per core).
SCAN_CHUNK_LENGTH = 32


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
        chunk_length: time steps per chunk of the CPU path (default `SCAN_CHUNK_LENGTH`).

    Returns:
        out (batch, dim, length) in u's dtype, or (out, last_state) with return_last_state.
        On the CPU path `out` is a transposed view of time-major storage (as if it were
        `y.transpose(1, 2)` of a (batch, length, dim) tensor); `.contiguous()` it if needed.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.is_cuda and _cuda_selective_scan is not None:
        if not reverse:
            return _cuda_selective_scan(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
            )
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        result = _cuda_selective_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z),
                                      delta_bias, delta_softplus, return_last_state)
        if return_last_state:
            return result[0].flip(-1), result[1]
        return result.flip(-1)
    chunk_length = SCAN_CHUNK_LENGTH if chunk_length is None else int(chunk_length)
    if chunk_length < 1:
        raise ValueError(f"selective_scan: chunk_length must be >= 1, got {chunk_length}")
    out, last_state = _SelectiveScanFunction.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), chunk_length
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

    Notation inside: T = chunk length, G = groups, N = state size, H = channels per group.
    Per-channel values (u, step, y, ...) are time-major (length, batch, G, H); B and C are
    (length, batch, G, N); states are (batch, G, N, H); A is (G, N, H). The recurrence itself runs
    in the C++ extension (`_cpu_scan_extension`) or, without it, in `_scan_forward_eager` /
    `_scan_backward_eager`; both take and return the same tensors. Everything elementwise over
    whole sequences (softplus, delta u, the D skip, the gate) is done here.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_length):
        dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        groups, state_size = _num_groups(B), A.shape[1]
        shape = _ScanShape(batch, dim, length, groups, state_size, reverse)
        u_t, z_t = shape.per_channel(u, dtype), shape.per_channel(z, dtype)
        _, step = _step_size(shape, delta, delta_bias, delta_softplus, dtype)
        step_u = step * u_t
        B_t, C_t = shape.per_state(B, dtype), shape.per_state(C, dtype)
        A_t = shape.state_by_channel(A, dtype)
        D_t = shape.channels(D, dtype)

        extension = _cpu_scan_extension() if u.device.type == "cpu" else None
        if extension is not None:
            y, states = extension.forward(step, step_u, A_t, B_t, C_t, chunk_length)
        else:
            y, states = _scan_forward_eager(shape, step, step_u, A_t, B_t, C_t, chunk_length)
        # states: the state entering each chunk (all the backward needs to recompute a chunk),
        # then the last state.
        initial_states = states[:-1]
        last_state = states[-1].transpose(-1, -2).reshape(batch, dim, state_size).to(u.dtype)

        pre_gate = y if D_t is None else y.addcmul_(u_t, D_t)  # y + D u
        out = pre_gate if z_t is None else pre_gate * F.silu(z_t)
        # The backward recomputes u_t, z_t, the step and y (for the gate's gradient) rather than
        # keeping them: u is alive anyway in a Mamba block (its x_proj keeps it), and each of these
        # sequence-long tensors is a tenth of the model's activation memory.
        # z, not its time-major copy z_t: in a Mamba block z is a view of the in_proj output,
        # which stays alive anyway (the conv keeps x, the other half of the same storage).
        ctx.save_for_backward(u, delta, delta_bias, z, A_t, B_t, C_t, D_t, initial_states)
        ctx.shape, ctx.chunk_length, ctx.delta_softplus = shape, chunk_length, delta_softplus
        ctx.extension = extension
        ctx.input_dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, z)]
        ctx.B_shape, ctx.C_shape = B.shape, C.shape
        ctx.mark_non_differentiable(last_state)
        return shape.channels_first(out).to(u.dtype), last_state

    @staticmethod
    def backward(ctx, grad_out, _grad_last_state):
        u, delta, delta_bias, z, A_t, B_t, C_t, D_t, initial_states = ctx.saved_tensors
        shape: _ScanShape = ctx.shape
        dtype = A_t.dtype
        u_t, z_t = shape.per_channel(u, dtype), shape.per_channel(z, dtype)
        pre_softplus, step = _step_size(shape, delta, delta_bias, ctx.delta_softplus, dtype)

        # out = (y + D u) silu(z): everything but y is elementwise, done on whole sequences.
        grad_pre_gate = shape.per_channel(grad_out, dtype)
        if z_t is not None:
            sigmoid_z = torch.sigmoid(z_t)
            grad_y = grad_pre_gate * z_t * sigmoid_z
        else:
            grad_y = grad_pre_gate.contiguous()
        grad_D = None
        if D_t is not None:
            grad_D = (grad_y * u_t).sum(dim=(0, 1))

        # The scan in reverse time, which also recomputes y. grad_step is d loss / d delta, first
        # only through exp(delta A); grad_step_u is d loss / d (delta u).
        step_u = step * u_t
        if ctx.extension is not None:
            y, grad_step, grad_step_u, grad_A, grad_B, grad_C = ctx.extension.backward(
                step, step_u, A_t, B_t, C_t, grad_y, initial_states, ctx.chunk_length)
        else:
            y, grad_step, grad_step_u, grad_A, grad_B, grad_C = _scan_backward_eager(
                shape, step, step_u, A_t, B_t, C_t, grad_y, initial_states, ctx.chunk_length)
        grad_z = None
        if z_t is not None:
            pre_gate = y if D_t is None else y.addcmul_(u_t, D_t)  # y + D u
            # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
            grad_z = grad_pre_gate * pre_gate * sigmoid_z * (1 + z_t * (1 - sigmoid_z))

        # The product delta u, the skip connection D u, and the softplus, on whole sequences.
        grad_u = grad_step_u * step
        if D_t is not None:
            grad_u.addcmul_(grad_y, D_t)
        grad_step.addcmul_(grad_step_u, u_t)
        if ctx.delta_softplus:  # softplus' = sigmoid
            grad_step *= torch.sigmoid(pre_softplus)
        grad_delta_bias = None
        if delta_bias is not None:
            grad_delta_bias = shape.unchannels(grad_step.sum(dim=(0, 1))).to(delta_bias.dtype)

        u_dtype, delta_dtype, A_dtype, B_dtype, C_dtype, D_dtype, z_dtype = ctx.input_dtypes
        return (
            shape.channels_first(grad_u).to(u_dtype),
            shape.channels_first(grad_step).to(delta_dtype),
            shape.unstate_by_channel(grad_A).to(A_dtype),
            shape.unper_state(grad_B, ctx.B_shape).to(B_dtype),
            shape.unper_state(grad_C, ctx.C_shape).to(C_dtype),
            None if grad_D is None else shape.unchannels(grad_D).to(D_dtype),
            None if grad_z is None else shape.channels_first(grad_z).to(z_dtype),
            grad_delta_bias,
            None,
            None,
            None,
        )


class _ScanShape:
    """Conversions between the public (batch, dim, length) layouts and the scan's time-major ones.

    dim is split into G groups of H channels (B and C are shared within a group). With `reverse`
    the time-major side runs from the last time step to the first, so the scan itself only ever
    goes forward in its own time.
    """

    def __init__(self, batch, dim, length, groups, state_size, reverse=False):
        self.batch, self.dim, self.length = batch, dim, length
        self.groups, self.state_size = groups, state_size
        self.per_group = dim // groups
        self.state = (batch, groups, state_size, self.per_group)  # one time step of h
        self.reverse = reverse

    def _time_major(self, x):
        """A (length, ...) permuted view -> contiguous, in the scan's time order."""
        if not self.reverse:
            return x.contiguous()
        # One copy, contiguous: flip() would keep the permuted strides and need a second one.
        backwards = torch.arange(self.length - 1, -1, -1, device=x.device)
        return x.index_select(0, backwards)

    def _public_time(self, x_t):
        return x_t.flip(0) if self.reverse else x_t

    def per_channel(self, x, dtype):
        """(batch, dim, length) -> contiguous (length, batch, G, H); None stays None."""
        if x is None:
            return None
        x = self._time_major(x.permute(2, 0, 1).to(dtype))  # free when x is a transposed (b, l, d)
        return x.view(self.length, self.batch, self.groups, self.per_group)

    def channels_first(self, x_t):
        """(length, batch, G, H) -> (batch, dim, length), a transposed view (a copy if reverse)."""
        return self._public_time(x_t).reshape(self.length, self.batch, self.dim).permute(1, 2, 0)

    def per_state(self, x, dtype):
        """B or C: (batch, [G,] N, length) -> contiguous (length, batch, G, N)."""
        x = x.reshape(self.batch, self.groups, self.state_size, self.length)
        return self._time_major(x.permute(3, 0, 1, 2).to(dtype))

    def unper_state(self, x_t, public_shape):
        """(length, batch, G, N) -> B's or C's public shape, (batch, [G,] N, length)."""
        return self._public_time(x_t).permute(1, 2, 3, 0).reshape(public_shape)

    def channels(self, x, dtype):
        """(dim,) -> (G, H), broadcastable against per-channel values; None stays None."""
        return None if x is None else x.to(dtype).reshape(self.groups, self.per_group)

    def unchannels(self, x):
        return x.reshape(self.dim)

    def state_by_channel(self, A, dtype):
        """A: (dim, N) -> contiguous (G, N, H)."""
        A = A.to(dtype).reshape(self.groups, self.per_group, self.state_size)
        return A.transpose(1, 2).contiguous()

    def unstate_by_channel(self, A_t):
        return A_t.transpose(1, 2).reshape(self.dim, self.state_size)


def _scan_forward_eager(shape: _ScanShape, step, step_u, A_t, B_t, C_t, chunk_length):
    """The recurrence in torch ops, chunk by chunk: (y, states entering each chunk + last state),
    as the C++ extension's forward."""
    chunks = _chunk_bounds(shape.length, chunk_length)
    workspace = _ChunkWorkspace(shape, min(chunk_length, shape.length), step.dtype, step.device)
    states = step.new_zeros(len(chunks) + 1, *shape.state)
    y = torch.empty_like(step)
    for index, (start, stop) in enumerate(chunks):
        chunk_states, _ = workspace.scan(states[index], step[start:stop], step_u[start:stop], A_t,
                                         B_t[start:stop])
        states[index + 1] = chunk_states[-1]
        # y[t] = sum_n C[t, n] h[t, n]
        y[start:stop] = torch.einsum("tbgnh,tbgn->tbgh", chunk_states[1:], C_t[start:stop])
    return y, states


def _scan_backward_eager(shape: _ScanShape, step, step_u, A_t, B_t, C_t, grad_y, initial_states,
                         chunk_length):
    """(y, grad_step through exp(delta A) only, grad_step_u, grad_A, grad_B, grad_C), as the C++
    extension's backward: recompute each chunk's states (and y) from the state entering it, then
    run the reverse-time recurrence of the gradient through the chunk."""
    y, grad_step, grad_step_u = (torch.empty_like(step) for _ in range(3))
    grad_A = torch.zeros_like(A_t)
    grad_B, grad_C = torch.empty_like(B_t), torch.empty_like(C_t)
    chunks = _chunk_bounds(shape.length, chunk_length)
    workspace = _ChunkWorkspace(shape, chunks[0][1], step.dtype, step.device)
    # decay[t+1] * d loss / d h[t+1] for the first step t+1 of the chunk after this one: the
    # gradient the later chunk sends back into this chunk's last state.
    carried = step.new_zeros(shape.state)
    for index in reversed(range(len(chunks))):
        chunk = slice(*chunks[index])
        states, decay = workspace.scan(initial_states[index], step[chunk], step_u[chunk], A_t,
                                       B_t[chunk])
        # y[t] = sum_n C[t, n] h[t, n]: d loss / d h[t] = C[t] grad_y[t] + what the future
        # sends back through h[t+1] = decay[t+1] h[t] + ..., accumulated in reverse time.
        grad_h = workspace.grad_states(C_t[chunk], grad_y[chunk])
        grad_h[-1] += carried
        for t in range(chunk.stop - chunk.start - 2, -1, -1):
            grad_h[t].addcmul_(decay[t + 1], grad_h[t + 1])
        torch.mul(decay[0], grad_h[0], out=carried)
        y[chunk] = torch.einsum("tbgnh,tbgn->tbgh", states[1:], C_t[chunk])
        grad_C[chunk] = torch.einsum("tbgnh,tbgh->tbgn", states[1:], grad_y[chunk])

        # h[t] = decay[t] h[t-1] + (delta u)[t] B[t]
        grad_step_u[chunk] = torch.einsum("tbgnh,tbgn->tbgh", grad_h, B_t[chunk])
        grad_B[chunk] = torch.einsum("tbgnh,tbgh->tbgn", grad_h, step_u[chunk])
        # decay[t] = exp(delta[t] A): d loss / d (delta[t] A) = grad_h[t] decay[t] h[t-1]
        grad_log_decay = grad_h.mul_(decay).mul_(states[:-1])
        # ... times d (delta A) / d delta = A, summed over the state. decay is no longer
        # needed, so its buffer takes the product.
        grad_step[chunk] = torch.mul(grad_log_decay, A_t, out=decay).sum(dim=-2)
        grad_A += grad_log_decay.mul_(step[chunk].unsqueeze(-2)).sum(dim=(0, 1))
    return y, grad_step, grad_step_u, grad_A, grad_B, grad_C


class _ChunkWorkspace:
    """The chunk-sized buffers of one eager forward or backward call, reused by every chunk.

    Fresh multi-MB tensors per chunk were measured to cost more in page faults than the
    arithmetic on them; a buffer of a few chunk steps also stays in the CPU caches.
    """

    def __init__(self, shape: _ScanShape, chunk_length: int, dtype, device):
        def buffer(steps):
            return torch.empty(steps, *shape.state, dtype=dtype, device=device)

        self.decay = buffer(chunk_length)
        self.states = buffer(chunk_length + 1)
        self.scratch = buffer(chunk_length)

    def scan(self, initial_state, step, step_u, A_t, B_chunk):
        """Run the recurrence over one chunk of T steps.

        Returns states (T + 1, batch, G, N, H), whose row 0 is `initial_state` and row t + 1 is
        h[t], and the per-step decay exp(delta A) (T, batch, G, N, H); both views of buffers.
        """
        size = step.shape[0]
        # exp(x) computed as exp2(x log2 e): torch's exp2 kernel is ~3x faster than its exp on
        # CPU, and this exponential is the most expensive op of the whole scan.
        decay = torch.mul(step.unsqueeze(-2), A_t * _LOG2_E, out=self.decay[:size]).exp2_()
        states = self.states[: size + 1]
        states[0] = initial_state
        # The input term (delta u)[t] B[t] goes straight into the state buffer; the loop then adds
        # decay[t] * h[t-1] in place, one fused op per step.
        torch.mul(step_u.unsqueeze(-2), B_chunk.unsqueeze(-1), out=states[1:])
        for t in range(size):
            states[t + 1].addcmul_(decay[t], states[t])
        return states, decay

    def grad_states(self, C_chunk, grad_y):
        """The direct part of d loss / d h[t], C[t] grad_y[t], in the scratch buffer."""
        return torch.mul(grad_y.unsqueeze(-2), C_chunk.unsqueeze(-1),
                         out=self.scratch[: grad_y.shape[0]])


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
            _extension = _build_cpu_scan_extension()
        except Exception as error:  # noqa: BLE001 - whatever the toolchain raises, fall back
            CPU_SCAN_EXTENSION = False
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            warnings.warn(f"ms_temba: the C++ selective scan could not be built ({first_line[:300]}); "
                          f"using the slower pure-PyTorch scan", RuntimeWarning, stacklevel=3)
            return None
    return _extension


def _build_cpu_scan_extension():
    # cpp_extension logs "No CUDA runtime is found" on import on CPU-only machines: not our concern.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; the pip package has one
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    source = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
    build_directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    build_directory = build_directory / f"ms_temba_scan_{_build_signature()}"
    build_directory.mkdir(parents=True, exist_ok=True)
    return load(name="ms_temba_selective_scan_cpu", sources=[str(source)],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                build_directory=str(build_directory), verbose=False)


def _build_signature() -> str:
    """A short hash of what the build depends on besides the source, which ninja compares with its
    last build: the CPU's model and feature flags (-march=native compiles for them) and the torch
    installation (its include path, as this process sees it, is on the command line). Two venvs,
    or two spellings of one venv's path, then get one build each instead of rebuilding in turn."""
    described = f"{platform.machine()} {torch.__version__} {os.path.dirname(torch.__file__)}"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            described += "".join(line for line in cpuinfo
                                 if line.startswith(("model name", "flags", "Features")))
    except OSError:
        described += platform.processor()
    return hashlib.sha1(described.encode()).hexdigest()[:12]


_LOG2_E = 1.4426950408889634  # log2(e)


def _chunk_bounds(length: int, chunk_length: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering 0..length in chunks of chunk_length (the last may be short)."""
    return [(start, min(start + chunk_length, length)) for start in range(0, length, chunk_length)]


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _step_size(shape: _ScanShape, delta, delta_bias, delta_softplus, dtype):
    """(delta + delta_bias, the effective step softplus(delta + delta_bias)), time-major."""
    delta_t = shape.per_channel(delta, dtype)
    if delta_bias is not None:
        delta_t = delta_t + shape.channels(delta_bias, dtype)
    return delta_t, (F.softplus(delta_t) if delta_softplus else delta_t)


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution
# ---------------------------------------------------------------------------------------------


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
        if reverse:
            return _cuda_causal_conv1d(x.flip(-1), weight, bias, activation).flip(-1)
        return _cuda_causal_conv1d(x, weight, bias, activation)
    padding = (weight.shape[1] - 1, 0)
    if reverse:  # out[t] = sum_k weight[k] x[t + width - 1 - k]: the reversed kernel, padded after
        weight, padding = weight.flip(-1), padding[::-1]
    return depthwise_conv1d(x, weight, bias, padding=padding, silu=activation is not None)


def depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dilation: int = 1,
    padding: tuple[int, int] = (0, 0),
    silu: bool = False,
) -> torch.Tensor:
    """Depthwise 1D convolution, `F.conv1d(F.pad(x, padding), weight[:, None], bias,
    dilation=dilation, groups=dim)`, optionally followed by silu, with a backward ~8x faster on CPU.

    PyTorch's CPU backward of a depthwise conv1d takes ~10x its forward (75 ms vs 7 ms at dim 1152,
    length 2500); in MS-Temba that was a fifth of a training step. Here the kernel's few taps are
    shifted multiply-adds over the whole sequence, forward and backward (`_DepthwiseConv1d`).

    Args:
        x: (batch, dim, length).
        weight: (dim, width).
        bias: optional (dim,).
        dilation: spacing of the taps.
        padding: zeros added (before, after) the sequence.
        silu: apply silu to the output. The backward then recomputes the pre-activation (a few
            multiply-adds) instead of keeping it.
    """
    dilation, (pad_before, pad_after) = int(dilation), (int(padding[0]), int(padding[1]))
    if dilation < 1 or pad_before < 0 or pad_after < 0:
        raise ValueError(f"depthwise_conv1d: need dilation >= 1 and padding >= 0, got {dilation}, "
                         f"{padding}")
    out_length = x.shape[-1] + pad_before + pad_after - dilation * (weight.shape[1] - 1)
    if out_length < 1:
        raise ValueError(f"depthwise_conv1d: a sequence of length {x.shape[-1]} is shorter than the "
                         f"kernel's span {dilation * (weight.shape[1] - 1) + 1}")
    if x.is_cuda:  # cuDNN's depthwise kernels are fast both ways
        out = F.conv1d(F.pad(x, (pad_before, pad_after)), weight.unsqueeze(1), bias,
                       dilation=dilation, groups=x.shape[1])
        return F.silu(out) if silu else out
    return _DepthwiseConv1d.apply(x, weight, bias, dilation, pad_before, pad_after, bool(silu))


class _DepthwiseConv1d(torch.autograd.Function):
    """out[:, d, t] = bias[d] + sum_k weight[d, k] x_padded[:, d, t + k dilation], one
    `addcmul_` per tap over whole sequences; the backward is the same sums transposed."""

    @staticmethod
    def taps(x_padded, weight, bias, dilation):
        batch, dim, padded_length = x_padded.shape
        out_length = padded_length - dilation * (weight.shape[1] - 1)
        out = x_padded.new_empty(batch, dim, out_length)
        # A fresh buffer, not bias.expand(...).contiguous(): that can return the bias itself (an
        # expanded (1, dim, 1) counts as contiguous), and addcmul_ would then write into it.
        out.copy_(bias[:, None]) if bias is not None else out.zero_()
        for tap in range(weight.shape[1]):
            out.addcmul_(x_padded[..., tap * dilation:tap * dilation + out_length], weight[:, tap, None])
        return out

    @staticmethod
    def forward(ctx, x, weight, bias, dilation, pad_before, pad_after, silu):
        x_padded = F.pad(x, (pad_before, pad_after))
        out = _DepthwiseConv1d.taps(x_padded, weight, bias, dilation)
        # x, not the padded copy: in a Mamba block x is a view of the in_proj output, which
        # stays alive anyway (the scan keeps z, the other half of it). The backward pads again.
        ctx.save_for_backward(x, weight, bias)
        ctx.dilation, ctx.padding, ctx.silu = dilation, (pad_before, pad_after), silu
        return F.silu(out) if silu else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        x_padded = F.pad(x, ctx.padding)
        dilation, out_length = ctx.dilation, grad_out.shape[-1]
        if ctx.silu:  # d silu(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a)))
            pre_activation = _DepthwiseConv1d.taps(x_padded, weight, bias, dilation)
            sigmoid = torch.sigmoid(pre_activation)
            grad_out = grad_out * sigmoid * pre_activation.mul_(1 - sigmoid).add_(1)
        grad_x_padded = torch.zeros_like(x_padded)
        grad_weight = torch.empty_like(weight)
        for tap in range(weight.shape[1]):
            window = slice(tap * dilation, tap * dilation + out_length)
            grad_x_padded[..., window].addcmul_(grad_out, weight[:, tap, None])
            grad_weight[:, tap] = torch.einsum("bdt,bdt->d", grad_out, x_padded[..., window])
        grad_x = grad_x_padded[..., ctx.padding[0]:ctx.padding[0] + x.shape[-1]]
        grad_bias = grad_out.sum(dim=(0, 2)) if bias is not None else None
        return grad_x, grad_weight, grad_bias, None, None, None, None
