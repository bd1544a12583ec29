"""The CPU selective scan: a custom autograd Function over a chunked sequential recurrence.

`ms_temba.ops.selective_scan` runs it wherever the CUDA kernel does not (see that package for the
recurrence itself). The Function (`SelectiveScanFunction`)

  * walks the sequence in chunks of `chunk_length` steps (`ms_temba.ops.SCAN_CHUNK_LENGTH` by
    default) with the state carried across chunks, so nothing of size length x dim x state is ever
    allocated: the forward keeps only the state at each chunk start, and the backward recomputes a
    chunk's states from it (like gradient checkpointing) before running the reverse-time
    recurrence of the gradient through the chunk;
  * runs that recurrence in a small C++ extension (`csrc/selective_scan_cpu.cpp`, built by
    `ms_temba.ops.cpu_extension` on first use and cached): blocks of 16 adjacent channels keep
    their states in registers for the whole sequence, and exp, the update and the readout of each
    step are one vectorised loop. That is 4-5x faster than the same chunked algorithm in torch
    ops, whose time goes to the per-step op overhead and to re-reading chunk buffers once per op;
  * falls back to exactly that algorithm in torch ops (`_scan_forward_eager`,
    `_scan_backward_eager`) when it is given no extension (`ms_temba.ops.CPU_SCAN_EXTENSION` off,
    or the build failed). It stores a chunk time-major as (time, batch, groups, state,
    channels_per_group), so each time step is one fused `addcmul` over contiguous memory and every
    other op runs along the contiguous channel axis, which measured 2-4x faster than putting the
    state axis last.

Both paths are tested against `ms_temba.ops.selective_scan_ref`, the float64 step-by-step
reference, every gradient included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_groups(B_or_C: torch.Tensor) -> int:
    """The number of groups of B or C: (batch, state, length) is one, (batch, groups, state, length) `groups`."""
    return 1 if B_or_C.dim() == 3 else B_or_C.shape[1]


class SelectiveScanFunction(torch.autograd.Function):
    """Chunked sequential scan with an explicit reverse-time backward (see the module docstring).

    Notation inside: T = chunk length, G = groups, N = state size, H = channels per group.
    Per-channel values (u, step, y, ...) are time-major (length, batch, G, H); B and C are
    (length, batch, G, N); states are (batch, G, N, H); A is (G, N, H). The recurrence itself runs
    in the C++ extension passed in as `extension` (`ms_temba.ops.cpu_extension`) or, when that is
    None, in `_scan_forward_eager` / `_scan_backward_eager`; both take and return the same tensors.
    Everything elementwise over whole sequences (softplus, delta u, the D skip, the gate) is done
    here.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_length, extension):
        dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        groups, state_size = num_groups(B), A.shape[1]
        shape = _ScanShape(batch, dim, length, groups, state_size, reverse)
        u_t, z_t = shape.per_channel(u, dtype), shape.per_channel(z, dtype)
        _, step = _step_size(shape, delta, delta_bias, delta_softplus, dtype)
        step_u = step * u_t
        B_t, C_t = shape.per_state(B, dtype), shape.per_state(C, dtype)
        A_t = shape.state_by_channel(A, dtype)
        D_t = shape.channels(D, dtype)

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
