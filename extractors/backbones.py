"""The backbones by name: `build_extractor(cfg)` builds the feature extractor cfg.backbone names.

    extractor = build_extractor(ExtractorConfig(backbone="i3d", weights="rgb_imagenet.pt"))
    video = extractor.extract("video.mp4")        # VideoFeatures(features (T, dim), start_s, end_s)

The names are the keys of `extractors.config.BACKBONES` ("i3d": "extractors.i3d:I3DExtractor",
"clip": ...), which ExtractorConfig also validates against. A backbone's module is imported only
when that backbone is built, so using I3D never imports timm (slow to import) and adding a backbone
is one entry in that table and one FeatureExtractor subclass (`extractors.base`).
"""
from __future__ import annotations

import importlib

from extractors.base import FeatureExtractor
from extractors.config import BACKBONES, ExtractorConfig


def build_extractor(cfg: ExtractorConfig) -> FeatureExtractor:
    """The feature extractor cfg describes (backbone, weights, sampling, device)."""
    module, _, name = BACKBONES[cfg.backbone].partition(":")  # a known name: ExtractorConfig checks it
    return getattr(importlib.import_module(module), name)(cfg)
