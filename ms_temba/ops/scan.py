"""The CPU selective scan: a custom autograd Function over a chunked sequential recurrence.

`ms_temba.ops.selective_scan` runs it wherever the CUDA kernel does not (see that package for the
recurrence itself). The Function (`SelectiveScanFunction`)

  * walks the sequence in chunks of `chunk_length` steps (by default `ms_temba.ops.SCAN_CHUNK_LENGTH`,
    or `EXTENSION_CHUNK_LENGTH` with the C++ recurrence) with the state carried across chunks, so
    nothing of size length x dim x state is ever allocated: the forward keeps only the state at
    each chunk start, and the backward recomputes a chunk's states from it (like gradient
    checkpointing) before running the reverse-time recurrence of the gradient through the chunk;
  * runs that recurrence in a small C++ extension (`csrc/selective_scan_cpu.cpp`, built by
    `ms_temba.ops.cpu_extension` on first use and cached): blocks of 16 adjacent channels keep
    their states in registers for the whole sequence, and exp, the update and the readout of each
    step are one vectorised loop. That is 4-5x faster than the same chunked algorithm in torch
    ops, whose time goes to the per-step op overhead and to re-reading chunk buffers once per op.
    The extension also does the elementwise work around the recurrence (softplus, delta u, the
    D skip, the gate and their gradients) in the same loop, reading u, delta and z in the layout
    they come in: in torch ops each of those is a sequence-long temporary, a dozen per call, and
    at T=10000 each is a fresh mmap of glibc's whose page faults made the model's time grow
    faster than the length;
  * falls back to exactly that algorithm in torch ops (`_forward_eager`, `_backward_eager`) when it is given no extension (`ms_temba.ops.CPU_SCAN_EXTENSION` off,
    or the build failed). It stores a chunk time-major as (time, batch, groups, state,
    channels_per_group), so each time step is one fused `addcmul` over contiguous memory and every
    other op runs along the contiguous channel axis, which measured 2-4x faster than putting the
    state axis last.

Both paths are tested against `ms_temba.ops.selective_scan_ref`, the float64 step-by-step
reference, every gradient included.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ms_temba.ops import workspace


def num_groups(B_or_C: torch.Tensor) -> int:
    """The number of groups of B or C: (batch, state, length) is one, (batch, groups, state, length) `groups`."""
    return 1 if B_or_C.dim() == 3 else B_or_C.shape[1]


def _without_autocast(method):
    """Run a Function's forward/backward with autocast off on the tensors' device: the recurrence
    must stay in fp32 under mixed precision, as mamba_ssm's kernels keep it (CPU autocast would run
    the eager path's einsum C . h in bf16, an error of ~4e-2 against the float64 reference)."""
    @functools.wraps(method)
    def wrapper(ctx, *args):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type, enabled=False):
            return method(ctx, *args)
    return wrapper


class SelectiveScanFunction(torch.autograd.Function):
    """Chunked sequential scan with an explicit reverse-time backward (see the module docstring).

    Notation inside: T = chunk length, G = groups, N = state size, H = channels per group.
    B and C are (length, batch, G, N) in the scan's time order; states are (batch, G, N, H); A is
    (G, N, H). With the C++ extension (`extension`, from `ms_temba.ops.cpu_extension`) the whole
    scan, the elementwise work around the recurrence included (softplus, delta u, the D skip, the
    gate), is one loop that reads u, delta and z where they are and allocates nothing
    sequence-long but its outputs. Without it (None) `_forward_eager` / `_backward_eager` do the
    same in torch ops, on time-major (length, batch, G, H) copies. The work is in `scan_forward`
    and `scan_backward`, which `ms_temba.ops.mamba_inner` shares.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_length, extension):
        out, last_state, kept, ctx.scan = scan_forward(u, delta, A, B, C, D, z, delta_bias,
                                                      delta_softplus, reverse, chunk_length, extension)
        # The backward recomputes the step, delta u and y rather than keeping them: each of these
        # sequence-long tensors is a tenth of the model's activation memory.
        ctx.save_for_backward(u, delta, z, *kept)
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out, _grad_last_state):
        u, delta, z, *kept = ctx.saved_tensors
        return (*scan_backward(ctx.scan, u, delta, z, kept, grad_out), None, None, None, None)


class _ScanInfo:
    """What `scan_backward` needs of a `scan_forward` call besides tensors (those go through
    `save_for_backward`, so that checkpointing's saved-tensor hooks see them)."""

    def __init__(self, shape, chunk_length, delta_softplus, extension, dtypes, optional_dtypes,
                 B_shape, C_shape):
        self.shape, self.chunk_length, self.delta_softplus = shape, chunk_length, delta_softplus
        self.extension = extension
        self.dtypes, self.optional_dtypes = dtypes, optional_dtypes  # of (u, delta, A, B, C), (D, z, delta_bias)
        self.B_shape, self.C_shape = B_shape, C_shape


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_length,
                 extension):
    """The scan (`ms_temba.ops.selective_scan`'s arguments): (out in u's dtype, last state, the
    tensors the backward keeps besides u, delta and z, a `_ScanInfo`)."""
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    groups, state_size = num_groups(B), A.shape[1]
    shape = _ScanShape(batch, dim, length, groups, state_size, reverse)
    B_t, C_t = shape.per_state(B, dtype), shape.per_state(C, dtype)
    A_t = shape.state_by_channel(A, dtype)
    D, delta_bias = _flat(D, dtype), _flat(delta_bias, dtype)
    if extension is not None:
        out, states = extension.forward(u.to(dtype), delta.to(dtype), _cast(z, dtype), delta_bias,
                                        D, A_t, B_t, C_t, delta_softplus, reverse, chunk_length)
    else:
        out, states = _forward_eager(shape, u, delta, z, delta_bias, D, A_t, B_t, C_t,
                                     delta_softplus, chunk_length)
    # states: the state entering each chunk (all the backward needs to recompute a chunk),
    # then the last state.
    last_state = states[-1].transpose(-1, -2).reshape(batch, dim, state_size).to(u.dtype)
    info = _ScanInfo(shape, chunk_length, delta_softplus, extension,
                     [x.dtype for x in (u, delta, A, B, C)],
                     [None if x is None else x.dtype for x in (D, z, delta_bias)], B.shape, C.shape)
    return out.to(u.dtype), last_state, (delta_bias, D, A_t, B_t, C_t, states[:-1]), info


def scan_backward(info: _ScanInfo, u, delta, z, kept, grad_out, workspace_slots=None):
    """The gradients of a `scan_forward` call, given its u, delta, z and kept tensors: those of
    (u, delta, A, B, C, D, z, delta_bias), None for a D, z or delta_bias it was not given.
    workspace_slots: optional names of two `ms_temba.ops.workspace` slots that the C++ recurrence
    writes grad_u and grad_delta into, for a caller that uses them only until it returns (the
    eager path allocates its own). grad_delta's may be the slot that holds delta: the C++ reads
    every (channel, time step) of delta before it writes the same one of grad_delta."""
    delta_bias, D, A_t, B_t, C_t, initial_states = kept
    shape, dtype = info.shape, A_t.dtype
    if info.extension is not None:
        grad_u_out = grad_delta_out = None
        if workspace_slots is not None:
            grad_u_out, grad_delta_out = (workspace.take_time_major(slot, u.shape, dtype, u.device)
                                          for slot in workspace_slots)
        grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_delta_bias = (
            info.extension.backward(u.to(dtype), delta.to(dtype), _cast(z, dtype), delta_bias, D,
                                    A_t, B_t, C_t, info.delta_softplus, shape.reverse,
                                    grad_out.to(dtype), initial_states, info.chunk_length,
                                    grad_u_out, grad_delta_out))
    else:
        grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, grad_delta_bias = (
            _backward_eager(shape, u, delta, z, delta_bias, D, A_t, B_t, C_t,
                            info.delta_softplus, grad_out, initial_states, info.chunk_length))
    u_dtype, delta_dtype, A_dtype, B_dtype, C_dtype = info.dtypes
    D_dtype, z_dtype, delta_bias_dtype = info.optional_dtypes
    return (
        grad_u.to(u_dtype),
        grad_delta.to(delta_dtype),
        shape.unstate_by_channel(grad_A).to(A_dtype),
        shape.unper_state(grad_B, info.B_shape).to(B_dtype),
        shape.unper_state(grad_C, info.C_shape).to(C_dtype),
        None if D_dtype is None else grad_D.to(D_dtype),
        None if z_dtype is None else grad_z.to(z_dtype),
        None if delta_bias_dtype is None else grad_delta_bias.to(delta_bias_dtype),
    )


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


def _flat(x, dtype):
    """D or delta_bias, (dim,), contiguous in the compute dtype; None stays None."""
    return None if x is None else x.to(dtype).contiguous()


def _forward_eager(shape, u, delta, z, delta_bias, D, A_t, B_t, C_t, delta_softplus, chunk_length):
    """The extension's forward in torch ops: (out (batch, dim, length), states)."""
    dtype = A_t.dtype
    u_t, z_t = shape.per_channel(u, dtype), shape.per_channel(z, dtype)
    _, step = _step_size(shape, delta, delta_bias, delta_softplus, dtype)
    y, states = _scan_forward_eager(shape, step, step * u_t, A_t, B_t, C_t, chunk_length)
    pre_gate = y if D is None else y.addcmul_(u_t, shape.channels(D, dtype))  # y + D u
    out = pre_gate if z_t is None else pre_gate * F.silu(z_t)
    return shape.channels_first(out), states


def _backward_eager(shape, u, delta, z, delta_bias, D, A_t, B_t, C_t, delta_softplus, grad_out,
                    initial_states, chunk_length):
    """The extension's backward in torch ops: (grad_u, grad_delta, grad_z, grad_A, grad_B,
    grad_C, grad_D, grad_delta_bias), per-channel gradients as (batch, dim, length)."""
    dtype = A_t.dtype
    u_t, z_t = shape.per_channel(u, dtype), shape.per_channel(z, dtype)
    D_t = shape.channels(D, dtype)
    pre_softplus, step = _step_size(shape, delta, delta_bias, delta_softplus, dtype)

    # out = (y + D u) silu(z): everything but y is elementwise, done on whole sequences.
    grad_pre_gate = shape.per_channel(grad_out, dtype)
    if z_t is not None:
        sigmoid_z = torch.sigmoid(z_t)
        grad_y = grad_pre_gate * z_t * sigmoid_z
    else:
        grad_y = grad_pre_gate.contiguous()
    grad_D = (grad_y * u_t).sum(dim=(0, 1)).reshape(-1)

    # The scan in reverse time, which also recomputes y. grad_step is d loss / d delta, first
    # only through exp(delta A); grad_step_u is d loss / d (delta u).
    step_u = step * u_t
    y, grad_step, grad_step_u, grad_A, grad_B, grad_C = _scan_backward_eager(
        shape, step, step_u, A_t, B_t, C_t, grad_y, initial_states, chunk_length)
    grad_z = None
    if z_t is not None:
        pre_gate = y if D_t is None else y.addcmul_(u_t, D_t)  # y + D u
        # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
        grad_z = shape.channels_first(grad_pre_gate * pre_gate * sigmoid_z * (1 + z_t * (1 - sigmoid_z)))

    # The product delta u, the skip connection D u, and the softplus, on whole sequences.
    grad_u = grad_step_u * step
    if D_t is not None:
        grad_u.addcmul_(grad_y, D_t)
    grad_step.addcmul_(grad_step_u, u_t)
    if delta_softplus:  # softplus' = sigmoid
        grad_step *= torch.sigmoid(pre_softplus)
    grad_delta_bias = grad_step.sum(dim=(0, 1)).reshape(-1)
    return (shape.channels_first(grad_u), shape.channels_first(grad_step), grad_z, grad_A, grad_B,
            grad_C, grad_D, grad_delta_bias)


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
