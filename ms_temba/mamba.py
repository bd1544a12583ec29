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

__all__ = ["RMSNorm", "BiMamba", "bimamba_branches", "per_branch_linear",
           "rms_norm_branches"]


class RMSNorm(nn.RMSNorm):
    """Root-mean-square layer norm with a learned scale and no bias, eps 1e-5 as in mamba_ssm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)


def rms_norm_branches(norms, x: torch.Tensor) -> torch.Tensor:
    """k RMSNorms applied branch-wise: x (..., k, dim), branch i normalised by norms[i]."""
    if len(norms) == 1:
        return norms[0](x)
    weight = torch.stack([norm.weight for norm in norms])  # (k, dim)
    return F.rms_norm(x, weight.shape[-1:], eps=norms[0].eps) * weight


# Groups (mixer, direction pairs) per selective-scan call; None = all in one call.
SCAN_GROUPS_PER_CALL: int | None = None


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

    def directions(self):
        """(conv1d, x_proj, dt_proj, A_log, D) of the forward, then the backward direction."""
        return [
            (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b),
        ]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_simple's initialisation, for both directions. in_proj, out_proj, x_proj and the
        convs keep PyTorch's default initialisation, as in mamba_simple."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        for conv1d, x_proj, dt_proj, A_log, D in self.directions():
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
        out, c = bimamba_branches(
            [self], hidden_states.unsqueeze(2), None if mask is None else mask.unsqueeze(2)
        )
        return (out.squeeze(2), c.squeeze(2)) if return_c else out.squeeze(2)


def bimamba_branches(mixers, hidden_states: torch.Tensor, mask: torch.Tensor | None = None):
    """Run k BiMamba mixers of the same shape, mixer i on its own sequence, with ONE scan call.

    The CPU scan is a loop over time whose cost is dominated by per-step overhead, so scanning the
    2k (mixer, direction) pairs one after the other costs about 2k times what one scan over all of
    their channels side by side costs. The channels of every pair are therefore stacked along the
    channel axis: pair g = 2 * i + s (mixer i, s = 0 forward, 1 backward) owns channels
    g * d_inner .. (g + 1) * d_inner - 1 and its own B and C (the scan's `groups`). The backward
    pairs' inputs are time-flipped, so scan step t is frame t for a forward pair and frame
    length - 1 - t for a backward pair.

    Args:
        mixers: k BiMamba modules with equal d_model, d_state, d_conv and expand.
        hidden_states: (batch, length, k, d_model); mixer i reads hidden_states[:, :, i].
        mask: optional (batch, length, k) bool, True = real frame, padding only at the end.

    Returns:
        out (batch, length, k, d_model), zero at padded frames, and
        C (batch, length, k, 2 * d_state): [C_forward, C_backward] in time order, zero at padding.
    """
    first = mixers[0]
    batch, length, k, _ = hidden_states.shape
    d_inner, d_state, dt_rank = first.d_inner, first.d_state, first.dt_rank
    groups = 2 * k
    channels = groups * d_inner
    # Per-pair parameters in pair order [mixer 0 forward, mixer 0 backward, mixer 1 forward, ...].
    conv1ds, x_projs, dt_projs, A_logs, Ds = zip(*(pair for m in mixers for pair in m.directions()))

    if mask is not None:
        # Zeroing the padded frames of the input zeroes x and z there (in_proj has no bias);
        # masked_fill rather than a multiply so that inf/NaN in padded frames cannot leak.
        hidden_states = hidden_states.masked_fill(~mask.unsqueeze(-1), 0.0)
        # Each pair's mask in its own scan order (flipped for the backward pairs).
        mask = torch.stack([mask, mask.flip(1)], dim=-1).view(batch, length, groups)

    def both_directions(weights):
        """in_proj rows `weights` of every mixer -> (batch, length, channels) in pair order, the
        backward pairs' copy flipped in time."""
        half = per_branch_linear(hidden_states, weights)  # (batch, length, k, d_inner)
        return torch.stack([half, half.flip(1)], dim=3).view(batch, length, channels)

    # in_proj's first d_inner rows make x (the SSM input), the other d_inner z (the gate).
    x = both_directions([m.in_proj.weight[:d_inner] for m in mixers])
    z = both_directions([m.in_proj.weight[d_inner:] for m in mixers])

    # Causal depthwise conv of every pair at once: it is per channel. The conv kernels want the
    # channels-first layout of mamba_simple.
    u = ops.causal_conv1d(
        x.transpose(1, 2).contiguous(),
        torch.cat([conv.weight.squeeze(1) for conv in conv1ds]),
        torch.cat([conv.bias for conv in conv1ds]),
        activation="silu",
    )  # (batch, channels, length)
    u = u.transpose(1, 2).view(batch, length, groups, d_inner)
    if mask is not None:
        # The conv bias makes u nonzero at padded frames; zero it so the SSM state stays
        # exactly zero through the (leading, for the backward pairs) padding.
        u = u.masked_fill(~mask.unsqueeze(-1), 0.0)
    # Input-dependent step size (low rank), B and C: the "selective" part of Mamba.
    dt_low_rank, B, C = per_branch_linear(u, [p.weight for p in x_projs]).split(
        [dt_rank, d_state, d_state], dim=-1
    )  # (batch, length, groups, .)
    delta = per_branch_linear(dt_low_rank, [p.weight for p in dt_projs])  # bias added in the scan
    y = _grouped_scan(
        u.reshape(batch, length, channels).transpose(1, 2),
        delta.reshape(batch, length, channels).transpose(1, 2),
        -torch.exp(_at_least_fp32(torch.cat(A_logs))),
        B.permute(0, 2, 3, 1),  # (batch, groups, d_state, length)
        C.permute(0, 2, 3, 1),
        _at_least_fp32(torch.cat(Ds)),
        z.transpose(1, 2),
        _at_least_fp32(torch.cat([p.bias for p in dt_projs])),
    )  # (batch, length, channels)
    # Flip the backward pairs back into time order and average the two directions.
    y = y.view(batch, length, k, 2, d_inner)
    y = (y[:, :, :, 0] + y[:, :, :, 1].flip(1)) / 2
    out = per_branch_linear(y, [m.out_proj.weight for m in mixers])
    C = C.view(batch, length, k, 2, d_state)
    return out, torch.cat([C[:, :, :, 0], C[:, :, :, 1].flip(1)], dim=-1)


def _grouped_scan(u, delta, A, B, C, D, z, delta_bias) -> torch.Tensor:
    """ops.selective_scan (with softplus) of grouped inputs in calls of at most
    SCAN_GROUPS_PER_CALL groups; channels never interact, so any split gives the same result.

    Returns y (batch, length, dim).
    """
    groups = B.shape[1]
    per_call = groups if SCAN_GROUPS_PER_CALL is None else SCAN_GROUPS_PER_CALL
    per_group = u.shape[1] // groups
    ys = []
    for first in range(0, groups, per_call):
        g = slice(first, min(first + per_call, groups))
        c = slice(g.start * per_group, g.stop * per_group)
        ys.append(ops.selective_scan(
            u[:, c], delta[:, c], A[c], B[:, g], C[:, g], D[c], z=z[:, c],
            delta_bias=delta_bias[c], delta_softplus=True,
        ).transpose(1, 2))
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def per_branch_linear(x: torch.Tensor, weights) -> torch.Tensor:
    """Bias-free linear maps applied branch-wise: (..., k, in) -> (..., k, out), where branch i
    uses weights[i] (out, in)."""
    if len(weights) == 1:
        return F.linear(x, weights[0])
    return torch.einsum("...ki,koi->...ko", x, torch.stack(weights))
