"""A per-frame MLP: the baseline with no temporal context at all.

Each feature is classified on its own (Linear -> GELU -> Dropout, `depth` times, then a Linear to
the classes), so whatever a temporal model scores above it comes from looking at other frames.
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

__all__ = ["FrameMLPConfig", "FrameMLP", "FrameOutput"]


@dataclasses.dataclass
class FrameMLPConfig:
    in_dim: int = 1024
    num_classes: int = 157
    hidden: int = 256
    depth: int = 2  # hidden layers
    dropout: float = 0.1

    def __post_init__(self):
        for key in ("in_dim", "num_classes", "hidden", "depth"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ConfigFieldError("FrameMLPConfig", key, f"must be a positive int, got {value!r}")
            setattr(self, key, int(value))
        if not (isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0):
            raise ConfigFieldError("FrameMLPConfig", "dropout", f"must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)


class FrameOutput(NamedTuple):
    logits: torch.Tensor  # (batch, time, classes)
    mask: torch.Tensor  # (batch, time) bool


class FrameMLP(nn.Module):
    def __init__(self, config: FrameMLPConfig | None = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else FrameMLPConfig()
        self.config = config
        layers, width = [], config.in_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.layers = nn.Sequential(*layers)

    def class_heads(self) -> list[nn.Linear]:
        return [self.layers[-1]]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> FrameOutput:
        mask = check_features(features, mask, self.config.in_dim)
        return FrameOutput(self.layers(features), mask)


@register_model(FrameMLP)
def mlp() -> FrameMLPConfig:
    """Two hidden layers of 256, per frame."""
    return FrameMLPConfig()
