"""MS-TCN: Multi-Stage Temporal Convolutional Network (Farha & Gall, CVPR 2019), a baseline.

Written from the paper for multi-label detection. A stage is

    Conv1d(1x1) in_dim -> channels
    num_layers dilated residual layers, layer i: x + Dropout(Conv1x1(ReLU(Conv3(x, dilation 2^i))))
    Conv1d(1x1) channels -> classes

so one stage of 10 layers sees 2^11 - 1 = 2047 frames. Stage 1 reads the features; stage s > 1
refines the probabilities of stage s - 1 (sigmoid here, as the labels are multi-label, where the
paper's single-label segmentation uses a softmax). Every stage is supervised
(`ms_temba.losses.mstcn_loss`: BCE per stage plus the paper's truncated smoothing loss).

Padding: padded frames are zeroed before every convolution, so they act like the convolutions' own
zero padding and a real frame's outputs do not depend on them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn

from ms_temba.errors import ConfigFieldError
from ms_temba.model import check_features
from ms_temba.registry import register_model

__all__ = ["MSTCNConfig", "MSTCN", "MSTCNOutput"]


@dataclasses.dataclass
class MSTCNConfig:
    in_dim: int = 1024
    num_classes: int = 157
    num_stages: int = 4
    num_layers: int = 10  # dilated residual layers per stage, dilations 1, 2, 4, ...
    channels: int = 64
    dropout: float = 0.5  # in every residual layer, as in the paper's code

    def __post_init__(self):
        for key in ("in_dim", "num_classes", "num_stages", "num_layers", "channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ConfigFieldError("MSTCNConfig", key, f"must be a positive int, got {value!r}")
            setattr(self, key, int(value))
        if not (isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0):
            raise ConfigFieldError("MSTCNConfig", "dropout", f"must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)


class MSTCNOutput(NamedTuple):
    """logits: the last stage's (batch, time, classes); stage_logits: every stage's, first to
    last; mask: (batch, time) bool."""

    logits: torch.Tensor
    stage_logits: list[torch.Tensor]
    mask: torch.Tensor


class DilatedResidualLayer(nn.Module):
    def __init__(self, channels: int, dilation: int, dropout: float):
        super().__init__()
        self.conv_dilated = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv_1x1 = nn.Conv1d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (batch, channels, time), zero at padded frames; mask (batch, 1, time)."""
        out = self.dropout(self.conv_1x1(torch.relu(self.conv_dilated(x))))
        return (x + out) * mask


class Stage(nn.Module):
    def __init__(self, in_dim: int, config: MSTCNConfig):
        super().__init__()
        self.conv_in = nn.Conv1d(in_dim, config.channels, 1)
        self.layers = nn.ModuleList(
            [DilatedResidualLayer(config.channels, 2 ** i, config.dropout) for i in range(config.num_layers)])
        self.conv_out = nn.Conv1d(config.channels, config.num_classes, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (batch, in_dim, time), mask (batch, 1, time) float -> logits (batch, classes, time)."""
        x = self.conv_in(x) * mask
        for layer in self.layers:
            x = layer(x, mask)
        return self.conv_out(x)


class MSTCN(nn.Module):
    def __init__(self, config: MSTCNConfig | None = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else MSTCNConfig()
        self.config = config
        self.stages = nn.ModuleList(
            [Stage(config.in_dim if s == 0 else config.num_classes, config) for s in range(config.num_stages)])

    def class_heads(self) -> list[nn.Conv1d]:
        """Every stage's output conv: each stage predicts the class logits."""
        return [stage.conv_out for stage in self.stages]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MSTCNOutput:
        mask = check_features(features, mask, self.config.in_dim)
        frame_mask = mask[:, None, :].to(features.dtype)
        x = features.transpose(1, 2) * frame_mask
        stage_logits = []
        for s, stage in enumerate(self.stages):
            logits = stage(x if s == 0 else torch.sigmoid(logits) * frame_mask, frame_mask)
            stage_logits.append(logits)
        stage_logits = [logits.transpose(1, 2) for logits in stage_logits]
        return MSTCNOutput(stage_logits[-1], stage_logits, mask)


@register_model(MSTCN)
def mstcn() -> MSTCNConfig:
    """MS-TCN as in the paper: 4 stages of 10 dilated layers, 64 channels."""
    return MSTCNConfig()


@register_model(MSTCN)
def mstcn_single() -> MSTCNConfig:
    """A single-stage TCN (the paper's SS-TCN): one stage of 10 dilated layers."""
    return MSTCNConfig(num_stages=1)
