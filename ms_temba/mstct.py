"""MS-TCT: Multi-Scale Temporal ConvTransformer (Dai et al., CVPR 2022), a baseline for MS-Temba.

Written from the paper and the official code (dairui01/MS-TCT, `MSTCT/`); module names are the
official ones, so official checkpoints load with `strict=True` (the key listing is in
`../shared/reference/mstct_keys_i3d_157.tsv`). Data flow, for features (batch, time, in_dim):

    Temporal Encoder, 4 stages s = 1..4:
        Temporal_Merging_Block_s   Conv1d kernel 3 (stride 1 for s = 1, else 2) + LayerNorm
        block_s: num_block GLR blocks, each
            x = x + Global_Relational_Block(LayerNorm(x))     multi-head self-attention
            x = x + Local_Relational_Block(LayerNorm(x))      Linear, depthwise Conv1d(3), GELU, Linear
        norm_s                      LayerNorm -> f_s at time / 2^(s-1)
    Temporal Scale Mixer: linear_f_s(f_s) to the embedding width, linearly upsampled to full time;
        the coarsest scale is added (through a 1x1 conv) to each finer one, concatenated:
        concat    = [F4, F3 + W1 F4, F2 + W2 F4, F1 + W3 F4]
        concat_hm = [F4, F3, F2, F1]
    Classification Module: logits = linear_pred(dropout(linear_fuse(concat)))
                           heatmap = Conv1d(3) -> ReLU -> Conv1d(1) on concat_hm

`forward` returns `MSTCTOutput(logits, heatmap_logits, mask)`, both (batch, time, classes); the
official module returns the heatmap as (batch, classes, time). It is trained with BCE on the logits
plus a focal loss of the heatmap against Gaussians at the action centres
(`ms_temba.losses.mstct_loss`).

Differences from the official code, none of which changes a padding-free forward:
- features come in as (batch, time, in_dim), like every model of this library (the official module
  takes (batch, in_dim, time));
- padding: the official code attends to and convolves over a batch's padding. Here padded frames
  are zeroed before every convolution, masked out of the attention keys, and each sequence is
  upsampled from its own length, so a real frame's outputs do not depend on the padding;
- attention runs through `F.scaled_dot_product_attention` (same arithmetic, less memory);
  `attention="explicit"` computes it as the official code does, with the (time x time) matrix
  in memory: the official implementation's cost, for benchmarks (benchmarks/bench_model.py);
- `Temporal_Mixer.linear4` exists (it is in the checkpoints) but, as in the official forward, is
  never used.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ms_temba.errors import ConfigFieldError
from ms_temba.model import check_features
from ms_temba.registry import register_model

__all__ = ["MSTCTConfig", "MSTCT", "MSTCTOutput"]


ATTENTION_MODES = ("sdpa", "explicit")


@dataclasses.dataclass
class MSTCTConfig:
    """The official `MSTCT(inter_channels, num_block, head, mlp_ratio, in_feat_dim,
    final_embedding_dim, num_classes)`; the defaults are the Charades model."""

    in_dim: int = 1024  # in_feat_dim
    num_classes: int = 157
    widths: tuple[int, ...] = (256, 384, 576, 864)  # inter_channels, one per stage
    num_block: int = 3  # GLR blocks per stage
    num_heads: int = 8
    mlp_ratio: int = 8
    embedding_dim: int = 512  # final_embedding_dim
    dropout: float = 0.5  # on the input features and before linear_pred (nn.Dropout() officially)
    # "sdpa": F.scaled_dot_product_attention, memory-efficient; "explicit": softmax(q k^T / sqrt(d)) v
    # with the whole (time x time) matrix, as the official code computes it. Equal outputs.
    attention: str = "sdpa"

    def __post_init__(self):
        for key in ("in_dim", "num_classes", "num_block", "num_heads", "mlp_ratio", "embedding_dim"):
            setattr(self, key, _positive_int(key, getattr(self, key)))
        if isinstance(self.widths, (str, bytes)) or not hasattr(self.widths, "__iter__"):
            raise ConfigFieldError("MSTCTConfig", "widths", f"must be 4 ints, got {self.widths!r}")
        self.widths = tuple(_positive_int("widths", w) for w in self.widths)
        if len(self.widths) != 4:
            raise ConfigFieldError("MSTCTConfig", "widths", f"must have 4 stages, got {self.widths!r}")
        for width in self.widths:
            if width % self.num_heads:
                problem = f"{width} is not divisible by num_heads={self.num_heads}"
                raise ConfigFieldError("MSTCTConfig", "widths", problem, message=f"MSTCTConfig.widths: {problem}")
        if not (isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0):
            raise ConfigFieldError("MSTCTConfig", "dropout", f"must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.attention not in ATTENTION_MODES:
            raise ConfigFieldError("MSTCTConfig", "attention", f"must be one of {ATTENTION_MODES}, got {self.attention!r}")


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigFieldError("MSTCTConfig", key, f"must be a positive int, got {value!r}")
    return int(value)


class MSTCTOutput(NamedTuple):
    """logits, heatmap_logits: (batch, time, num_classes); mask: (batch, time) bool."""

    logits: torch.Tensor
    heatmap_logits: torch.Tensor
    mask: torch.Tensor


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (batch, time, channels) with the padded frames set to 0."""
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


class Local_Relational_Block(nn.Module):
    """Linear -> depthwise temporal Conv1d(3) -> GELU -> Linear (the GLR block's feed-forward)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.TC = nn.Conv1d(hidden, hidden, 3, 1, 1, bias=True, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _zero_padding(self.linear1(x), mask)
        x = self.TC(x.transpose(1, 2)).transpose(1, 2)
        return self.linear2(self.act(x))


class Global_Relational_Block(nn.Module):
    """Multi-head self-attention over the whole sequence (queries and keys/values projections)."""

    def __init__(self, width: int, num_heads: int, explicit: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.explicit = explicit
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(batch, length, heads, width // heads).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
        # (batch, 1, 1, keys): padded frames are never attended to.
        keys = mask[:, None, None, :]
        if self.explicit:
            scores = (q @ k.transpose(-2, -1)) * (width // heads) ** -0.5
            out = scores.masked_fill(~keys, float("-inf")).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class GLRBlock(nn.Module):
    """Global-Local Relational block: pre-norm attention, then pre-norm local feed-forward."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, explicit_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.Global_Relational_Block = Global_Relational_Block(width, num_heads, explicit_attention)
        self.norm2 = nn.LayerNorm(width)
        self.Local_Relational_Block = Local_Relational_Block(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.Global_Relational_Block(self.norm1(x), mask)
        return x + self.Local_Relational_Block(self.norm2(x), mask)


class Temporal_Merging_Block(nn.Module):
    """Conv1d(kernel 3, stride 1 or 2) + LayerNorm: the stage's change of width and time scale."""

    def __init__(self, in_dim: int, width: int, stride: int):
        super().__init__()
        self.proj = nn.Conv1d(in_dim, width, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (batch, time, in_dim) -> (batch, ceil(time / stride), width)."""
        x = self.proj(_zero_padding(x, mask).transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class TemporalEncoder(nn.Module):
    def __init__(self, config: MSTCTConfig):
        super().__init__()
        previous = config.in_dim
        for s, width in enumerate(config.widths, start=1):
            self.add_module(f"Temporal_Merging_Block{s}",
                            Temporal_Merging_Block(previous, width, stride=1 if s == 1 else 2))
            self.add_module(f"block{s}", nn.ModuleList(
                [GLRBlock(width, config.num_heads, config.mlp_ratio, config.attention == "explicit")
                 for _ in range(config.num_block)]))
            self.add_module(f"norm{s}", nn.LayerNorm(width))
            previous = width

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The 4 stage outputs (batch, time_s, width_s) and their masks; time_s = ceil(time / 2^(s-1))."""
        features, masks = [], []
        for s in range(1, 5):
            x = getattr(self, f"Temporal_Merging_Block{s}")(x, mask)
            if s > 1:  # output frame j of the stride-2 conv is centred on input frame 2j
                mask = mask[:, ::2]
            for block in getattr(self, f"block{s}"):
                x = block(x, mask)
            x = getattr(self, f"norm{s}")(x)
            features.append(x)
            masks.append(mask)
        return features, masks


class linear_layer(nn.Module):
    """The official mixer's per-scale Linear (a module of its own, hence the `.proj` in its keys)."""

    def __init__(self, in_dim: int, embedding_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _upsample(x: torch.Tensor, stage_lengths: torch.Tensor, lengths: torch.Tensor, length: int) -> torch.Tensor:
    """x (batch, channels, time_s) linearly interpolated (align_corners=False) to (batch, channels,
    length), each sequence from its own real length to its own real length (zeros after it)."""
    if bool((lengths == length).all()):  # no padding: one call, as the official code
        return F.interpolate(x, size=length, mode="linear", align_corners=False)
    out = x.new_zeros(x.shape[0], x.shape[1], length)
    for b, (n_s, n) in enumerate(zip(stage_lengths.tolist(), lengths.tolist())):
        out[b, :, :n] = F.interpolate(x[b:b + 1, :, :n_s], size=n, mode="linear", align_corners=False)[0]
    return out


class Temporal_Mixer(nn.Module):
    def __init__(self, widths: tuple[int, ...], embedding_dim: int):
        super().__init__()
        for s in (4, 3, 2, 1):  # the official order of definition (and of the state dict)
            self.add_module(f"linear_f{s}", linear_layer(widths[s - 1], embedding_dim))
        for i in range(1, 5):
            self.add_module(f"linear{i}", nn.Conv1d(embedding_dim, embedding_dim, kernel_size=1))

    def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor]):
        """-> concat, concat_hm: (batch, 4 * embedding_dim, time)."""
        lengths = masks[0].sum(dim=1)
        length = features[0].shape[1]
        scales = []
        for s in range(1, 5):  # F_s: (batch, embedding_dim, time)
            f = getattr(self, f"linear_f{s}")(features[s - 1]).transpose(1, 2)
            if s > 1:
                f = _upsample(f, masks[s - 1].sum(dim=1), lengths, length)
            scales.append(f)
        f1, f2, f3, f4 = scales
        concat = torch.cat([f4, f3 + self.linear1(f4), f2 + self.linear2(f4), f1 + self.linear3(f4)], dim=1)
        concat_hm = torch.cat([f4, f3, f2, f1], dim=1)
        return concat, concat_hm


class Classification_Module(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.linear_fuse = nn.Conv1d(4 * embedding_dim, embedding_dim, kernel_size=1)
        self.linear_pred = nn.Conv1d(embedding_dim, num_classes, kernel_size=1)
        self.hm = nn.Sequential(
            nn.Conv1d(4 * embedding_dim, embedding_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(embedding_dim, num_classes, kernel_size=1),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, concat: torch.Tensor, concat_hm: torch.Tensor, mask: torch.Tensor):
        """-> logits, heatmap logits, both (batch, time, classes)."""
        heatmap = self.hm(concat_hm.masked_fill(~mask[:, None, :], 0.0))
        logits = self.linear_pred(self.dropout(self.linear_fuse(concat)))
        return logits.transpose(1, 2), heatmap.transpose(1, 2)


class MSTCT(nn.Module):
    """The MS-TCT network; see the module docstring. Build it with `ms_temba.create_model("ms_tct")`."""

    def __init__(self, config: MSTCTConfig | None = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else MSTCTConfig()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.TemporalEncoder = TemporalEncoder(config)
        self.Temporal_Mixer = Temporal_Mixer(config.widths, config.embedding_dim)
        self.Classfication_Module = Classification_Module(config.embedding_dim, config.num_classes, config.dropout)
        self.TemporalEncoder.apply(_official_init)

    def class_heads(self) -> list[nn.Conv1d]:
        """The classifier's last conv (the heatmap branch is a separate, focal-loss target)."""
        return [self.Classfication_Module.linear_pred]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MSTCTOutput:
        """features (batch, time, in_dim); mask (batch, time) bool, True = real, padding at the end."""
        mask = check_features(features, mask, self.config.in_dim)
        x = self.dropout(features)
        stage_features, stage_masks = self.TemporalEncoder(x, mask)
        concat, concat_hm = self.Temporal_Mixer(stage_features, stage_masks)
        logits, heatmap = self.Classfication_Module(concat, concat_hm, mask)
        return MSTCTOutput(logits, heatmap, mask)


@torch.no_grad()
def _official_init(module: nn.Module) -> None:
    """The official Temporal Encoder's `_init_weights` (the mixer and the classifier keep
    PyTorch's defaults, as officially)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv1d):
        fan_out = module.kernel_size[0] * module.out_channels // module.groups
        module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(module.bias)


@register_model(MSTCT)
def ms_tct() -> MSTCTConfig:
    """The official MS-TCT: MSTCT([256, 384, 576, 864], 3, 8, 8, 1024, 512, 157)."""
    return MSTCTConfig()


@register_model(MSTCT)
def ms_tct_small() -> MSTCTConfig:
    """MS-TCT at a quarter of the widths and half the MLP ratio, for CPU runs."""
    return MSTCTConfig(widths=(64, 96, 144, 216), mlp_ratio=4, embedding_dim=128)
