"""MS-Temba: Multi-Scale Temporal Mamba for dense temporal action detection in long videos.

    import ms_temba
    model = ms_temba.create_model("ms_temba", in_dim=768)   # CLIP features
    out = model(features, mask)                             # ms_temba.MSTembaOutput

The losses and metrics live in the submodules `ms_temba.losses` and `ms_temba.metrics` (import
them explicitly, or reach them as attributes, which imports them on first use); the scan and conv
kernels in `ms_temba.ops`.
"""

import importlib

from ms_temba.registry import create_model, list_models, model_config, register_model
from ms_temba.model import MSTemba, MSTembaConfig, MSTembaOutput, init_class_prior, model_summary
# The baselines register themselves on import (ms_temba/mstct.py, mstcn.py, mlp.py).
from ms_temba.mstct import MSTCT, MSTCTConfig, MSTCTOutput
from ms_temba.mstcn import MSTCN, MSTCNConfig, MSTCNOutput
from ms_temba.mlp import FrameMLP, FrameMLPConfig, FrameOutput
# Vision Mamba, the image backbone (ms_temba/vim.py); registers vim_tiny, vim_small, vim_base, ...
from ms_temba.vim import VimConfig, VisionMamba

__all__ = [
    "FrameMLP",
    "FrameMLPConfig",
    "FrameOutput",
    "MSTCN",
    "MSTCNConfig",
    "MSTCNOutput",
    "MSTCT",
    "MSTCTConfig",
    "MSTCTOutput",
    "MSTemba",
    "MSTembaConfig",
    "MSTembaOutput",
    "VimConfig",
    "VisionMamba",
    "create_model",
    "init_class_prior",
    "list_models",
    "model_config",
    "model_summary",
    "register_model",
]


_LAZY_SUBMODULES = ("losses", "metrics", "ops")


def __getattr__(name):
    # `ms_temba.losses` etc. without importing them (and their dependencies) with the package.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"ms_temba.{name}")
    raise AttributeError(f"module 'ms_temba' has no attribute {name!r}")
