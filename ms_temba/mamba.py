"""The bidirectional Mamba mixer MS-Temba is built from.

`BiMamba` is Vision Mamba's "bimamba v2" mixer (the one the official MS-Temba release uses): one
input projection and one output projection shared by two selective-SSM scans, a forward scan over
the sequence and a backward scan over the time-reversed sequence, each with its own short causal
convolution and its own SSM parameters. The backward direction is what lets a frame see the
future; averaging the two directions keeps the output scale of a unidirectional Mamba.

Parameter names follow mamba_ssm's `Mamba` (with the `_b` suffix of Vim for the backward
direction) so that release checkpoints load without renaming.

Padding. Batches of videos of different lengths are padded at the end, and a padded frame must
never change what a real frame computes. The forward scan is causal, so trailing padding is
harmless there. The backward scan, however, reads the padding *first*; three things would leak it
into real frames: the features of padded frames, the causal conv's bias (the conv output at a
padded frame is silu(bias) even for zero input), and the SSM state those produce. Zeroing the
in_proj output at padded frames (before the conv) and the post-conv activation u at padded frames
(before the scan) keeps the backward state exactly zero until the first real frame: with u = 0 the
recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t stays at h = 0, and B_t, C_t (linear in u,
no bias) are zero too. A real frame then sees exactly what it would see at the start of the
unpadded sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ms_temba import ops
from ms_temba.ops import fused

__all__ = ["RMSNorm", "BiMamba"]


class RMSNorm(nn.RMSNorm):
    """Root-mean-square layer norm with a learned scale and no bias, eps 1e-5 as in mamba_ssm.

    On CPU through `_RMSNormFunction`, which keeps less for the backward than torch's composite
    rms_norm (that keeps the normalised input too: a sequence-long tensor per norm, two norms per
    Mamba layer)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # torch's fused kernel
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight over the last axis, keeping x and the per-frame 1 / rms for the backward
    and recomputing the normalised x there. Computed in at least fp32, returned in x's dtype, as
    torch's rms_norm.

    Both directions run over blocks of `ROWS` frames: every frame is independent, so only the
    output (and x's gradient) is sequence-long, and the intermediate products (x rstd, its
    gradient, ...: five sequence-long temporaries in the backward written whole) are small,
    reused from the heap and hot in the cache. Written whole, at T=10000 the fuser's (10000, 576)
    fp32 temporaries (23 MiB) came from memory glibc had just returned to the system, page-faulted
    again on every call: the norms' multiplications took ~10x their T=2500 time."""

    ROWS = 1024

    @staticmethod
    def forward(ctx, x, weight, eps):
        dtype = torch.promote_types(x.dtype, torch.float32)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], 1, dtype=dtype, device=x.device)
        for block in _row_blocks(rows.shape[0], _RMSNormFunction.ROWS):
            x_block = rows[block].to(dtype)
            torch.rsqrt(x_block.square().mean(-1, keepdim=True).add_(eps), out=rstd[block])
            out[block] = (x_block * rstd[block] * weight).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, x.shape[-1])
        grad_x = torch.empty_like(rows)
        grad_weight = torch.zeros(weight.shape, dtype=rstd.dtype, device=weight.device)
        for block in _row_blocks(rows.shape[0], _RMSNormFunction.ROWS):
            normalised = rows[block] * rstd[block]
            grad = grad_rows[block].to(normalised.dtype)
            grad_weight += (grad * normalised).sum(0)
            # d/dx of n w with n = x rstd: rstd (g - n mean(g n)), g = grad_out w, in g's buffer.
            grad_normalised = grad * weight
            mean = (grad_normalised * normalised).mean(-1, keepdim=True)
            grad_x[block] = grad_normalised.addcmul_(normalised, mean, value=-1).mul_(rstd[block])
        return grad_x.view(x.shape), grad_weight.to(weight.dtype), None


def _row_blocks(rows: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The SSM parameters A, D and the dt bias are kept in (at least) fp32, as mamba_ssm does,
    because exp(delta * A) over long sequences is sensitive to their precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: (batch, length, d_model) -> (batch, length, d_model).

    Args:
        d_model: width of the residual stream.
        d_state: SSM state size N per channel.
        d_conv: kernel width of the causal depthwise convolution.
        expand: d_inner = expand * d_model channels inside the mixer.
        dt_min, dt_max: the initial step sizes softplus(dt bias) are log-uniform in this range.
        dt_init_floor: lower clamp of the initial step sizes.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor

        # Shared by both directions: x (the SSM input) and z (the gate) come out of one projection.
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # Forward direction.
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._make_direction()
        # Backward direction (runs on the flipped sequence).
        (self.conv1d_b, self.x_proj_b, self.dt_proj_b,
         self.A_b_log, self.D_b) = self._make_direction()
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_parameters()

    def _make_direction(self):
        """The per-direction modules and parameters, in mamba_ssm's shapes."""
        conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner, bias=True
        )
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        D = nn.Parameter(torch.empty(self.d_inner))
        # The trainer leaves these out of weight decay (mamba_ssm's convention).
        A_log._no_weight_decay = True
        D._no_weight_decay = True
        return conv1d, x_proj, dt_proj, A_log, D

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_simple's initialisation, for both directions. in_proj, out_proj, x_proj and the
        convs keep PyTorch's default initialisation, as in mamba_simple."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        directions = [
            (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b),
        ]
        for conv1d, x_proj, dt_proj, A_log, D in directions:
            conv1d.reset_parameters()
            x_proj.reset_parameters()
            # dt_proj maps a rank-dt_rank code to d_inner step sizes; this scale preserves the
            # variance of its output at initialisation.
            bound = self.dt_rank**-0.5
            nn.init.uniform_(dt_proj.weight, -bound, bound)
            # The bias is set so that the initial step sizes softplus(bias) are log-uniform in
            # [dt_min, dt_max]; inverse softplus: bias = dt + log(1 - exp(-dt)).
            log_dt = torch.empty(self.d_inner).uniform_(math.log(self.dt_min),
                                                        math.log(self.dt_max))
            dt = log_dt.exp().clamp(min=self.dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            dt_proj.bias._no_reinit = True  # model-level inits must leave this bias alone
            # S4D-real: A = -(1, 2, ..., N) for every channel, stored as log(-A).
            A_log.copy_(torch.arange(1, self.d_state + 1, dtype=A_log.dtype).log().expand_as(A_log))
            D.fill_(1.0)

    def forward(
        self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, return_c: bool = False
    ):
        """
        Args:
            hidden_states: (batch, length, d_model).
            mask: optional (batch, length) bool, True = real frame, padding only at the end.
            return_c: also return the input-dependent C sequences of both directions.

        Returns:
            out (batch, length, d_model), zero at padded frames; with return_c also
            C (batch, length, 2 * d_state): [C_forward, C_backward] per frame, both in time order,
            zero at padded frames.
        """
        if fused.applies(hidden_states):  # CUDA with mamba_ssm: the same results, one fused chain per direction
            return fused.bimamba_forward(self, hidden_states, mask, return_c)
        if mask is not None and mask.all():
            mask = None  # nothing to zero: skip the masked copies of sequence-long tensors
        # in_proj as its two halves, x and z, each its own product: autograd then adds their
        # gradients into the input's, instead of concatenating a (batch, 2 * d_inner, length)
        # gradient for in_proj's output (at T=10000 in the Fuser, an 88 MiB allocation that
        # glibc serves with fresh pages every step).
        x, z = (F.linear(hidden_states, weight) for weight in self.in_proj.weight.chunk(2, dim=0))
        if mask is not None:
            # masked_fill rather than a multiply so that inf/NaN in padded frames cannot leak.
            x, z = (half.masked_fill(~mask.unsqueeze(-1), 0.0) for half in (x, z))
        # (batch, d_inner, length). The CPU ops read any strides, so on CPU they stay transposed
        # views; the CUDA conv and scan kernels expect mamba_simple's contiguous layout.
        x, z = x.transpose(1, 2), z.transpose(1, 2)
        if x.is_cuda:
            x, z = x.contiguous(), z.contiguous()

        y_f, c_f = self._scan(
            x, z, mask, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, reverse=False
        )
        y_b, c_b = self._scan(
            x, z, mask, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b,
            reverse=True,
        )
        # out_proj of the average of the two directions, the halving folded into the (small)
        # weight: halving is exact in floating point, so the result is the same, and the backward
        # has no sequence-long gradient of the halving to allocate.
        out = F.linear(y_f.add_(y_b).transpose(1, 2), self.out_proj.weight * 0.5, self.out_proj.bias)
        if not return_c:
            return out
        return out, torch.cat([c_f, c_b], dim=-1)

    def _scan(self, x, z, mask, conv1d, x_proj, dt_proj, A_log, D, reverse):
        """One direction: causal conv + selective scan over the sequence, from its last frame to
        its first if `reverse`. The reversed direction is what Vim computes on `xz.flip(-1)`,
        flipped back; the ops reverse inside instead, so no flipped copy of `xz` is kept for the
        backward, and the results come back in time order.

        x, z: the halves of the in_proj output, (batch, d_inner, length).
        Returns y (batch, d_inner, length) gated by silu(z), and C (batch, length, d_state).
        """
        # The conv (u, zeroed at padded frames, where the conv bias makes it nonzero, so that the
        # SSM state stays exactly zero through the leading padding of the backward scan), the
        # input-dependent step size (low rank), B and C (the "selective" part of Mamba) and the
        # scan, as one op: on CPU it recomputes u and delta in the backward instead of keeping them.
        y, C = ops.mamba_direction(
            x,
            z,
            conv1d.weight.squeeze(1),
            conv1d.bias,
            x_proj.weight,
            dt_proj.weight,
            -torch.exp(_at_least_fp32(A_log)),
            _at_least_fp32(D),
            delta_bias=_at_least_fp32(dt_proj.bias),  # added in the scan
            mask=mask,
            delta_softplus=True,
            reverse=reverse,
        )
        return y, C.transpose(1, 2)
