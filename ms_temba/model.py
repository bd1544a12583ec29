"""MS-Temba: Multi-Scale Temporal Mamba for dense action detection (arXiv 2501.06138).

The network reads per-frame features (batch, time, in_dim) of a long video and predicts, for every
frame, a logit per action class (several actions can happen at once). Data flow:

    features --proj--> x
    for block k = 1..K (K = len(widths)):
        x = projection_k(x)                  Linear + LayerNorm + GELU to width_k
        x = TLM_k(x)                         depthwise temporal conv, dilation k (optional)
        x = DTS_k(x)                         Dilated Temporal SSM: the k interleaved sub-sequences
                                             (frames t = i mod k) each run through their own
                                             bidirectional-Mamba stack, then are interleaved back
        block_logits_k = block_heads_k(x)    auxiliary per-block prediction
    Temba Fuser: sum_k LayerNorm(scale_proj_k(block output k)) -> one bidirectional Mamba layer
                 (interaction_block) -> head -> logits

Block k thus sees time at a stride of k frames: block 1 models fine-grained local dynamics, later
blocks longer ranges at the same cost, and the fuser combines the scales.

The modules follow that structure (block k is `blocks[k - 1]`, counted from 0 as in a list):

    proj                                     Linear(in_dim, width_1)
    blocks[k - 1]: MSTembaBlock              .projection, .tlm (None without TLMs),
                                             .dts.branches[i] (a BiMambaStack, i = 0..k-1)
    block_heads[k - 1]                       Linear(width_k, num_classes)
    fuser: TembaFuser                        .scale_projs[k - 1], .norm, .interaction_block
    head                                     Linear(width_K, num_classes)

The official release names the same tensors differently (its `blocks` interleaves projections and
DTS modules, `scale_proj1..K` are separate attributes); `ms_temba.convert` maps its checkpoints, and
the previous bundle format's state dicts, to these names.

Padding: sequences in a batch are padded at the end (mask False). Padded frames are zeroed before
every operation that mixes frames (the TLM conv, both SSM scans; see mamba.py) and the DTS treats
the frames it appends to reach a multiple of k as padding too, so a real frame's outputs do not
depend on the padding or on the batch it is in.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ms_temba import ops
from ms_temba.errors import ConfigFieldError
from ms_temba.mamba import BiMamba, RMSNorm
from ms_temba.registry import register_model

__all__ = [
    "MSTembaConfig",
    "MSTemba",
    "MSTembaOutput",
    "BiMambaLayer",
    "BiMambaStack",
    "DilatedTemporalSSM",
    "LinearProjection",
    "MSTembaBlock",
    "TembaFuser",
    "TemporalLocalModule",
    "dilated_temporal_ssm",
    "init_class_prior",
    "model_summary",
]


@dataclasses.dataclass
class MSTembaConfig:
    """Hyper-parameters of MS-Temba. The defaults are the paper's (I3D features, Charades)."""

    in_dim: int = 1024  # channels of the input features (I3D: 1024, CLIP ViT-L/14: 768)
    num_classes: int = 157
    widths: tuple[int, ...] = (256, 384, 576)  # width of block k; K = len(widths) blocks
    d_state: int = 16  # SSM state size per channel
    expand: int = 2  # d_inner = expand * width inside each Mamba mixer
    d_conv: int = 4  # kernel of the Mamba mixers' causal conv
    layers_per_branch: int = 1  # Mamba layers in each DTS branch
    tlm: bool = True  # Temporal Local Module before each DTS (the release has none)
    tlm_kernel: int = 3
    dropout: float = 0.0  # on each Mamba layer's residual branch
    # Activation checkpointing in training: each Temba block and the Temba Fuser keep only their
    # inputs for the backward and recompute their insides there. Same outputs and gradients, a
    # second forward's compute for a fraction of the memory (benchmarks/README.md).
    checkpoint_blocks: bool = False

    def __post_init__(self):
        positive_ints = ["in_dim", "num_classes", "d_state", "expand", "d_conv",
                         "layers_per_branch", "tlm_kernel"]
        for key in positive_ints:
            setattr(self, key, _positive_int(key, getattr(self, key)))
        if isinstance(self.widths, (str, bytes)) or not hasattr(self.widths, "__iter__"):
            raise ConfigFieldError("MSTembaConfig", "widths", f"must be a sequence of ints, got {self.widths!r}")
        # Tuples so that the config compares, hashes and round-trips through dataclasses.asdict.
        self.widths = tuple(_positive_int("widths", w) for w in self.widths)
        if not self.widths:
            raise ConfigFieldError("MSTembaConfig", "widths", "is empty: MS-Temba needs at least one block")
        for key in ("tlm", "checkpoint_blocks"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigFieldError("MSTembaConfig", key, f"must be a bool, got {getattr(self, key)!r}")
        if not (isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0):
            raise ConfigFieldError("MSTembaConfig", "dropout", f"must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    @property
    def num_blocks(self) -> int:
        return len(self.widths)


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigFieldError("MSTembaConfig", key, f"must be a positive int, got {value!r}")
    return int(value)


class MSTembaOutput(NamedTuple):
    """What `MSTemba.forward` returns.

    logits: (batch, time, num_classes), the fused prediction.
    block_logits: K tensors (batch, time, num_classes), the per-block auxiliary predictions.
    branch_c: K tensors (batch, k, ceil(time / k), 2 * d_state): for block k, the C sequences of the
        last Mamba layer of each of its k branches (forward and backward direction concatenated, in
        time order), zero at padded frames. Sub-sequence i of block k holds frames i, i+k, i+2k...
    mask: (batch, time) bool, True = real frame.
    """

    logits: torch.Tensor
    block_logits: list[torch.Tensor]
    branch_c: list[torch.Tensor]
    mask: torch.Tensor


class LinearProjection(nn.Module):
    """Linear + LayerNorm + GELU: maps the residual stream to the next block's width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.linear(x)))


class TemporalLocalModule(nn.Module):
    """Residual depthwise temporal convolution with dilation k: x + conv(x).

    With dilation k the kernel reads frames t - k, t, t + k (for kernel 3), the same frames that
    share a DTS branch in block k, so it adds local context within each sub-sequence before the
    SSM. Padded frames are zeroed first so they act like the conv's own zero padding.
    """

    def __init__(self, width: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(
            width, width, kernel_size, dilation=dilation, padding="same", groups=width
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not mask.all():
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        conv = self.conv
        half_span = conv.dilation[0] * (conv.kernel_size[0] - 1)
        padding = (half_span // 2, half_span - half_span // 2)  # what padding="same" pads
        out = ops.depthwise_conv1d(x.transpose(1, 2), conv.weight.squeeze(1), conv.bias,
                                   conv.dilation[0], padding)
        return x + out.transpose(1, 2)


class BiMambaLayer(nn.Module):
    """Pre-norm residual layer: x + dropout(BiMamba(RMSNorm(x)))."""

    def __init__(self, width: int, d_state: int, d_conv: int, expand: int, dropout: float):
        super().__init__()
        self.norm = RMSNorm(width)
        self.mixer = BiMamba(width, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None):
        mixed, c = self.mixer(self.norm(x), mask, return_c=True)
        return x + self.dropout(mixed), c


class BiMambaStack(nn.Module):
    """`depth` BiMamba layers and a final RMSNorm of the residual stream (the release's
    VisionMamba with bimamba v2). One DTS branch, and the fuser's interaction block.

    forward(x, mask) -> (out (batch, length, width),
                         C of the last layer (batch, length, 2 * d_state)).
    """

    def __init__(self, width: int, depth: int, d_state: int, d_conv: int, expand: int,
                 dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [BiMambaLayer(width, d_state, d_conv, expand, dropout) for _ in range(depth)]
        )
        self.norm_f = RMSNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None):
        for layer in self.layers:
            x, c = layer(x, mask)
        return self.norm_f(x), c


def dilated_temporal_ssm(
    x: torch.Tensor, mask: torch.Tensor, branches
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated Temporal SSM: run sub-sequence i (frames t = i mod k) through `branches[i]`.

    Args:
        x: (batch, time, width); mask: (batch, time) bool; branches: k BiMambaStack modules.

    Returns:
        out (batch, time, width) with each frame's output from its own branch, and
        C (batch, k, ceil(time / k), 2 * d_state) of the branches' last layers.
    """
    k = len(branches)
    batch, length, width = x.shape
    # Pad to a multiple of k so that the k sub-sequences have equal length; the appended frames
    # are padding for the branches (mask False), which are exact about padding.
    sub_length = math.ceil(length / k)
    pad = sub_length * k - length
    x = F.pad(x, (0, 0, 0, pad))
    mask = F.pad(mask, (0, pad), value=False)
    # Frame t = j * k + i lands in row j, column i: column i is sub-sequence i.
    x = x.reshape(batch, sub_length, k, width)
    mask = mask.reshape(batch, sub_length, k)
    outs, cs = zip(*(branch(x[:, :, i], mask[:, :, i]) for i, branch in enumerate(branches)))
    out = torch.stack(outs, dim=2).reshape(batch, sub_length * k, width)[:, :length]
    return out, torch.stack(cs, dim=1)


class DilatedTemporalSSM(nn.Module):
    """The DTS of block k: `branches[i]` (a BiMambaStack) models the sub-sequence of frames
    t = i mod k; see `dilated_temporal_ssm`. forward(x, mask) -> (out, C)."""

    def __init__(self, branches: list[BiMambaStack]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dilated_temporal_ssm(x, mask, self.branches)


class MSTembaBlock(nn.Module):
    """Block k of MS-Temba: projection to width_k, TLM with dilation k (or None), DTS with k branches.

    forward(x, mask) -> (out (batch, time, width_k), C (batch, k, ceil(time / k), 2 * d_state)).
    """

    def __init__(self, projection: LinearProjection, tlm: TemporalLocalModule | None,
                 dts: DilatedTemporalSSM):
        super().__init__()
        self.projection = projection
        self.tlm = tlm
        self.dts = dts

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.projection(x)
        if self.tlm is not None:
            x = self.tlm(x, mask)
        return self.dts(x, mask)


class TembaFuser(nn.Module):
    """The Temba Fuser: brings every block's output to the last width (`scale_projs[k - 1]`),
    normalises each with the shared LayerNorm (so no scale dominates the sum), sums them, and lets
    one bidirectional Mamba layer (`interaction_block`) mix the scales over time.

    forward(block_outputs, mask) -> (batch, time, widths[-1]).
    """

    def __init__(self, scale_projs: list[nn.Linear], norm: nn.LayerNorm,
                 interaction_block: BiMambaStack):
        super().__init__()
        self.scale_projs = nn.ModuleList(scale_projs)
        self.norm = norm
        self.interaction_block = interaction_block

    def forward(self, block_outputs: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        fused = sum(self.norm(proj(out)) for proj, out in zip(self.scale_projs, block_outputs))
        fused, _ = self.interaction_block(fused, mask)
        return fused


class MSTemba(nn.Module):
    """The MS-Temba network; see the module docstring. Build it with `ms_temba.create_model`."""

    def __init__(self, config: MSTembaConfig | None = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else MSTembaConfig()
        self.config = config
        widths = config.widths

        def bimamba_stack(width: int, depth: int) -> BiMambaStack:
            return BiMambaStack(width, depth, config.d_state, config.d_conv, config.expand,
                                config.dropout)

        # Every module draws its initial weights from the random generator when it is built, so
        # the construction order is part of what a seed means. It is kept from the previous layout
        # (bundle format 1), so a seed gives the same weights as before: all projections and DTS
        # modules, then the TLMs, the block heads and the fuser; then they are assembled.
        self.proj = nn.Linear(config.in_dim, widths[0])
        projections, dts_modules = [], []
        previous_width = widths[0]
        for k, width in enumerate(widths, start=1):
            projections.append(LinearProjection(previous_width, width))
            dts_modules.append(DilatedTemporalSSM(
                [bimamba_stack(width, config.layers_per_branch) for _ in range(k)]))
            previous_width = width
        tlms = [TemporalLocalModule(width, config.tlm_kernel, dilation=k) if config.tlm else None
                for k, width in enumerate(widths, start=1)]
        self.blocks = nn.ModuleList([MSTembaBlock(*parts)
                                     for parts in zip(projections, tlms, dts_modules)])
        self.block_heads = nn.ModuleList([nn.Linear(width, config.num_classes) for width in widths])
        scale_projs = [nn.Linear(width, widths[-1]) for width in widths]
        norm = nn.LayerNorm(widths[-1])
        self.fuser = TembaFuser(scale_projs, norm, bimamba_stack(widths[-1], 1))
        self.head = nn.Linear(widths[-1], config.num_classes)

        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The release's initialisation for the network's own Linear layers (truncated normal,
        std 0.02, zero bias). The Mamba mixers keep mamba_simple's initialisation: the release
        also re-initialises their dt_proj, which sets every initial step size to softplus(0)."""
        inside_mixers = {id(m) for mixer in self.modules() if isinstance(mixer, BiMamba)
                         for m in mixer.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in inside_mixers:
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def class_heads(self) -> list[nn.Linear]:
        """The layers whose outputs are class logits: the fused head and every block head."""
        return [self.head, *self.block_heads]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MSTembaOutput:
        """
        Args:
            features: (batch, time, in_dim) float.
            mask: optional (batch, time) bool, True = real frame, padding only at the end.
                None = all frames real. What padded frames contain is ignored.
        """
        mask = self._check_input(features, mask)
        if not mask.all():  # zero what padded frames contain (no copy when there are none)
            features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = self.proj(features)

        block_outputs, branch_c = [], []
        for block in self.blocks:
            x, c = self._run(block, x, mask)
            block_outputs.append(x)
            branch_c.append(c)
        block_logits = [head(out) for head, out in zip(self.block_heads, block_outputs)]
        fused = self._run(self.fuser, block_outputs, mask)
        return MSTembaOutput(self.head(fused), block_logits, branch_c, mask)

    def _run(self, module: nn.Module, *args):
        """module(*args), through activation checkpointing when the config asks for it and
        autograd is recording (in inference there is nothing to save)."""
        if self.config.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _check_input(self, features, mask) -> torch.Tensor:
        """Validate the inputs; returns the mask (all True when None)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 3:
            raise ValueError(
                f"features must be (batch, time, in_dim), got shape {tuple(features.shape)}"
            )
        batch, length, channels = features.shape
        if channels != self.config.in_dim:
            raise ValueError(
                f"features have {channels} channels per frame but the model expects "
                f"in_dim={self.config.in_dim}"
            )
        if length == 0:
            raise ValueError("features have zero frames (time == 0)")
        if batch == 0:
            raise ValueError("features have an empty batch (batch == 0)")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        mask = check_padding_mask(mask, batch, length, features.device, needed_by="features")
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("mask has a real frame after a padded one: padding must be at the end")
        if not torch.isfinite(features).all(dim=-1).logical_or(~mask).all():
            raise ValueError("features contain NaN or inf at real (unpadded) frames")
        return mask


def check_padding_mask(mask, batch: int, length: int, device, needed_by: str) -> torch.Tensor:
    """The (batch, time) bool mask of real frames; all True when None. ValueError if malformed."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"mask must be a bool tensor, got {got}")
    if mask.shape != (batch, length):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {needed_by} need (batch, time) = "
                         f"{(batch, length)}")
    return mask


def check_features(features: torch.Tensor, mask, in_dim: int) -> torch.Tensor:
    """The baselines' input check: features (batch, time, in_dim), and the padding mask (all True
    when None). ValueError naming the problem."""
    if features.dim() != 3 or features.shape[-1] != in_dim:
        raise ValueError(f"features must be (batch, time, in_dim={in_dim}), got shape {tuple(features.shape)}")
    return check_padding_mask(mask, features.shape[0], features.shape[1], features.device, needed_by="features")


def prior_logit(prior: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The logit whose sigmoid is `prior` (each class's base rate), clipped to [eps, 1 - eps] so
    that a class never seen in training gets a finite bias."""
    prior = torch.as_tensor(prior, dtype=torch.float32).clamp(eps, 1 - eps)
    return torch.log(prior) - torch.log1p(-prior)


@torch.no_grad()
def init_class_prior(heads, prior: torch.Tensor) -> None:
    """Set the bias of every class head (Linear or Conv1d with num_classes outputs) to the log-odds
    of the classes' base rates, so that the untrained model predicts the base rate (the prior
    initialisation of Lin et al., "Focal Loss for Dense Object Detection", Sec. 4.1).

    Why: with zero biases every logit starts at sigmoid(0) = 0.5 while a dense-detection class is
    active at a few percent of the frames, so the first hundreds of steps spend the loss's gradient
    on pushing every logit down, through the whole network; on our accuracy benchmark this left
    MS-Temba at chance for ~10 epochs (docs/accuracy.md)."""
    logits = prior_logit(prior)
    for head in heads:
        if head.bias is None or head.bias.shape != logits.shape:
            raise ValueError(f"a class head's bias has shape {tuple(getattr(head.bias, 'shape', ()))}, "
                             f"the prior {tuple(logits.shape)}")
        head.bias.copy_(logits.to(head.bias))


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def model_summary(model: MSTemba) -> str:
    """A table of parameter counts per part (`proj`, `blocks.0.projection`, `blocks.0.tlm`,
    `blocks.0.dts`, ..., `fuser.interaction_block`, `head`), the total, and the total without the
    TLMs (the size of the release's architecture)."""
    if not isinstance(model, MSTemba):
        raise TypeError(f"model_summary expects an MSTemba, got {type(model).__name__}")

    def rows_of(name: str, module: nn.Module) -> list[tuple[str, int]]:
        # One row per leaf part: lists, blocks and the fuser are opened (blocks.0.projection, ...).
        if isinstance(module, (nn.ModuleList, MSTembaBlock, TembaFuser)):
            return [row for child_name, child in module.named_children()
                    for row in rows_of(f"{name}.{child_name}", child)]
        return [(name, _count(module))]

    rows = [row for name, child in model.named_children() for row in rows_of(name, child)]
    total = _count(model)
    tlm = sum(_count(block.tlm) for block in model.blocks)
    rows += [("total", total), ("total without TLM", total - tlm)]
    name_width = max(len(name) for name, _ in rows)
    lines = [f"MSTemba({model.config})"]
    lines += [f"{name:<{name_width}}  {count:>12,}" for name, count in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Registered variants (ms_temba.create_model)
# ----------------------------------------------------------------------------------------------

@register_model(MSTemba)
def ms_temba() -> MSTembaConfig:
    """MS-Temba as in the paper (I3D features, 157 Charades classes), with the TLMs."""
    return MSTembaConfig()


@register_model(MSTemba)
def ms_temba_release() -> MSTembaConfig:
    """Exactly the official release's architecture (no TLMs); its checkpoints load through
    `ms_temba.convert` (the same tensors under our module names)."""
    return MSTembaConfig(tlm=False)


@register_model(MSTemba)
def ms_temba_tiny() -> MSTembaConfig:
    """A small MS-Temba for tests and smoke runs on CPU."""
    return MSTembaConfig(in_dim=64, num_classes=8, widths=(32, 48, 64), d_state=8)


@register_model(MSTemba)
def ms_temba_small() -> MSTembaConfig:
    """The CPU default of the pipeline: the paper's three blocks at about half its widths, its
    d_state 16, and Mamba mixers of expand 1 instead of 2 (1.8 M parameters on 1024-d features and
    157 classes). On the accuracy benchmark (docs/accuracy.md) expand 1 scored as high as 2 at
    about 0.7x the training time, which paid for the larger state."""
    return MSTembaConfig(in_dim=64, num_classes=8, widths=(128, 192, 256), d_state=16, expand=1)
