"""One direction of a Mamba block on the CPU path, with a hand-written backward that keeps little.

`ms_temba.ops.mamba_direction` is, written out,

    u = silu(causal_conv1d(x, conv_weight, conv_bias))          (zeroed at padded frames)
    dt, B, C = split(u^T x_proj_weight^T)
    out = selective_scan(u, (dt dt_proj_weight^T)^T, A, B^T, C^T, D, z, delta_bias, ...)

as one autograd Function (`MambaInnerFunction`), the CPU counterpart of mamba_ssm's `MambaInnerFn`
with `checkpoint_lvl=1`:

  * it keeps x (a view of the in_proj output, kept anyway) and x_proj's thin output for the
    backward, not u and delta, each as large as x: the backward recomputes them (a 4-tap conv and a
    rank-dt_rank product), which is cheaper than keeping them for every direction of every layer;
  * its backward frees each sequence-long tensor as soon as it has served and accumulates in place
    (x_proj's gradient into the scan's grad_u; silu's into the conv's pre-activation), so that at
    most five of them are alive at once. Autograd through the same ops kept ten: the backward of
    the model's widest mixer was its peak memory;
  * on the CPU its internal sequence-long temporaries (u and delta in the forward; u, delta, the
    scan's grad_u and grad_delta (in delta's buffer), the conv's pre-activation and its sigmoid
    (in u's and delta's, once those are dead) in the backward) go
    into buffers of `ms_temba.ops.workspace` that every call reuses, and the gradients it returns
    are tensors of their own, not views, which autograd accumulates in place (BiMamba's x and z
    get one from each direction). Fresh sequence-long tensors above glibc's mmap threshold (at
    T=10000 the fuser's are 44 MiB) are page-faulted in on every call: 16 of them per forward +
    backward of the fuser's mixer, and 2 more for those accumulations, had made the whole model's
    time grow faster than the length.

The scan itself is `scan.scan_forward` / `scan.scan_backward`, shared with `SelectiveScanFunction`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ms_temba.ops import workspace
from ms_temba.ops.conv import CausalConv, _DepthwiseConv1d
from ms_temba.ops.scan import scan_backward, scan_forward


class MambaInnerFunction(torch.autograd.Function):
    """forward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, mask,
    options) -> (out, C); see the module docstring and `ms_temba.ops.mamba_direction`. options:
    (dt_rank, delta_softplus, reverse, chunk_length, extension)."""

    @staticmethod
    def forward(ctx, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
                mask, options):
        dt_rank, delta_softplus, reverse, chunk_length, extension = options
        device = x.device.type
        # The products run under the caller's autocast, as they would outside this Function, and
        # the backward recomputes delta under the same; the scan itself runs in fp32.
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        conv = CausalConv(x.shape[-1], conv_weight.shape[1], reverse)
        # u and delta serve only inside this call: on the CPU, buffers reused across calls
        # (ms_temba.ops.workspace; fresh ones at T=10000 cost page faults on every call).
        u = MambaInnerFunction.conv_output(conv, x, conv_weight, conv_bias, mask, slot="u")
        x_dbl, delta, B, C = selective_projections(u, x_proj_weight, dt_proj_weight, dt_rank,
                                                   delta_slot="delta")
        with torch.autocast(device, enabled=False):
            out, _, kept, ctx.scan = scan_forward(u, delta, A, B, C, D, z, delta_bias,
                                                  delta_softplus, reverse, chunk_length, extension)
        ctx.save_for_backward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, x_dbl,
                              *kept)
        ctx.conv, ctx.mask, ctx.dt_rank = conv, mask, dt_rank
        ctx.set_materialize_grads(False)  # C often gets no gradient: no zeros for it
        return out, C

    @staticmethod
    def conv_output(conv: CausalConv, x, weight, bias, mask, slot=None):
        """u = silu(conv(x)), zero at padded frames: the conv bias makes it nonzero there, and the
        SSM state must stay exactly zero through the (leading, for the backward scan) padding.
        In workspace slot `slot` if given."""
        u = F.silu(conv.pre_activation(x, weight, bias, slot), inplace=True)
        return u if mask is None else u.masked_fill_(~mask.unsqueeze(1), 0.0)

    @staticmethod
    def backward(ctx, grad_out, grad_C_out):
        # First, before any workspace slot is taken: with checkpointing, reading the saved
        # tensors runs the block's forward again, whose Functions take the same slots.
        x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, x_dbl, *kept = ctx.saved_tensors
        conv, mask, dt_rank = ctx.conv, ctx.mask, ctx.dt_rank
        device, autocast_dtype, autocast_enabled = ctx.autocast
        dt_low_rank = x_dbl[..., :dt_rank]
        with torch.autocast(device, autocast_dtype, autocast_enabled):  # exactly the forward's
            u = MambaInnerFunction.conv_output(conv, x, conv_weight, conv_bias, mask, slot="u")
            delta = step_projection(dt_low_rank, dt_proj_weight, slot="delta")
        if grad_out is None:  # only C has a gradient: the scan still sends one into B
            grad_out = torch.zeros(u.shape, dtype=u.dtype, device=u.device)
        with torch.autocast(device, enabled=False):
            grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias = (
                scan_backward(ctx.scan, u, delta, z, kept, grad_out,
                              # grad_delta overwrites delta, which is not needed after the scan
                              # (see scan_backward): one sequence-long buffer fewer.
                              workspace_slots=("grad_u", "delta")))
        del delta
        # The products' gradients in the dtype they ran in (autocast's, or the inputs').
        dtype = x_dbl.dtype
        grad_delta = grad_delta.transpose(1, 2).to(dtype)  # (batch, length, dim)
        grad_dt_proj_weight = _weight_gradient(grad_delta, dt_low_rank)
        grad_dt_low_rank = grad_delta @ dt_proj_weight.to(dtype)
        del grad_delta
        if grad_C_out is not None:
            grad_C = grad_C + grad_C_out
        grad_x_dbl = torch.cat([grad_dt_low_rank, grad_B.transpose(1, 2).to(dtype),
                                grad_C.transpose(1, 2).to(dtype)], dim=-1)
        u_t = u.transpose(1, 2)
        grad_x_proj_weight = _weight_gradient(grad_x_dbl, u_t.to(dtype))
        del u, u_t
        # x_proj's share of d loss / d u, added into the scan's share in place.
        grad_u.transpose(1, 2).baddbmm_(grad_x_dbl.to(grad_u.dtype),
                                        x_proj_weight.to(grad_u.dtype).expand(grad_u.shape[0], -1, -1))
        if mask is not None:
            grad_u.masked_fill_(~mask.unsqueeze(1), 0.0)
        # Through silu and the conv: the pre-activation recomputed (cheaper than keeping it past
        # the scan's backward), its gradient in its own buffer. u and delta are dead by now:
        # their slots take the pre-activation and its sigmoid.
        pre_activation = conv.pre_activation(x, conv_weight, conv_bias, slot="u")
        grad_pre = _DepthwiseConv1d.silu_backward_(pre_activation, grad_u, sigmoid_slot="delta")
        del grad_u
        grad_x, grad_conv_weight, grad_conv_bias = conv.gradients(x, conv_weight, grad_pre)
        return (grad_x, grad_z, grad_conv_weight.to(conv_weight.dtype),
                grad_conv_bias if conv_bias is None else grad_conv_bias.to(conv_bias.dtype),
                grad_x_proj_weight.to(x_proj_weight.dtype),
                grad_dt_proj_weight.to(dt_proj_weight.dtype), grad_A, grad_D, grad_delta_bias,
                None, None)


def selective_projections(u, x_proj_weight, dt_proj_weight, dt_rank: int, delta_slot=None):
    """The input-dependent ("selective") parts of Mamba from the conv output u (batch, dim, length):
    x_proj's output x_dbl (batch, length, dt_rank + 2 state), the step delta (batch, dim, length;
    dt_proj without its bias, which the scan adds; see `step_projection` for `delta_slot`) and
    B, C (batch, state, length, contiguous)."""
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)
    delta = step_projection(x_dbl[..., :dt_rank], dt_proj_weight, delta_slot)
    B, C = (part.transpose(1, 2).contiguous() for part in x_dbl[..., dt_rank:].chunk(2, dim=-1))
    return x_dbl, delta, B, C


def step_projection(dt_low_rank, dt_proj_weight, slot=None):
    """delta = dt_proj(dt_low_rank) without its bias, (batch, dim, length) as a transposed view of
    (batch, length, dim). With `slot`, on the CPU outside autocast, into that workspace slot (the
    same product as F.linear's, which runs this mm; autocast has no out= form, so it allocates)."""
    device = dt_low_rank.device.type
    if (slot is None or device != "cpu" or torch.is_autocast_enabled(device)
            or dt_low_rank.dtype != dt_proj_weight.dtype):
        return F.linear(dt_low_rank, dt_proj_weight).transpose(1, 2)
    batch, length, _ = dt_low_rank.shape
    delta = workspace.take(slot, (batch, length, dt_proj_weight.shape[0]), dt_low_rank.dtype,
                           dt_low_rank.device)
    torch.mm(dt_low_rank.flatten(0, 1), dt_proj_weight.t(), out=delta.view(batch * length, -1))
    return delta.transpose(1, 2)


def _weight_gradient(grad_output, input):
    """d loss / d weight of F.linear(input, weight), both (batch, length, features): summed over
    the batch and the time steps."""
    return torch.einsum("blo,bli->oi", grad_output, input)
