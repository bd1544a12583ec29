"""The extractor configuration: one dataclass shared by the backbones, the Ray fan-out and the pipeline."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from extractors.device import DEVICE_CHOICES
from ms_temba.errors import ConfigFieldError

# The backbones by name: "module:class" of each FeatureExtractor subclass, imported only when built
# (extractors.backbones.build_extractor), so that one backbone never imports another's dependencies.
BACKBONES: dict[str, str] = {
    "i3d": "extractors.i3d:I3DExtractor",
    "clip": "extractors.clip:ClipExtractor",
}


@dataclass(frozen=True)
class ExtractorConfig:
    backbone: str = "i3d"  # a key of BACKBONES: "i3d" | "clip"
    weights: str | None = None  # local checkpoint path; None = timm hub name (clip, online) or random init
    model_name: str = "vit_large_patch14_clip_224.openai"  # timm name, CLIP only
    pretrained_from_hub: bool = False  # CLIP: let timm download `model_name` weights (needs internet)
    fps: float | None = 24.0  # frames are sampled at this rate; None = the video's native rate
    image_size: int = 224  # short side resized to this, then center crop image_size x image_size
    mode: str = "fully_conv"  # I3D: "fully_conv" (one feature per 8 frames) | "snippets"
    snippet_len: int = 16  # I3D snippets mode: frames per snippet
    stride: int = 16  # I3D snippets mode: frames between snippet starts
    clip_window: int = 16  # CLIP: per-frame embeddings averaged over windows of this many frames
    batch_size: int = 8  # snippets (I3D) or frames (CLIP) per forward pass
    chunk_frames: int = 128  # frames decoded and held in memory at once
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    num_actors: int | None = None  # None: one per GPU, else one per CPU core
    videos_per_shard: int = 16

    def __post_init__(self) -> None:
        def reject(field: str, problem: str):
            raise ConfigFieldError("extractor", field, problem)

        if self.backbone not in BACKBONES:
            reject("backbone", f"must be one of {', '.join(map(repr, BACKBONES))}, got {self.backbone!r}")
        if self.mode not in ("fully_conv", "snippets"):
            reject("mode", f"must be 'fully_conv' or 'snippets', got {self.mode!r}")
        if self.device not in DEVICE_CHOICES:
            reject("device", f"must be one of {', '.join(map(repr, DEVICE_CHOICES))}, got {self.device!r}")
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool)
                                     or not self.fps > 0):
            reject("fps", f"must be positive or null, got {self.fps!r}")
        for name in ("image_size", "snippet_len", "stride", "clip_window", "batch_size", "chunk_frames",
                     "videos_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                reject(name, f"must be a positive integer, got {value!r}")
        if self.num_actors is not None and (not isinstance(self.num_actors, int) or self.num_actors <= 0):
            reject("num_actors", f"must be a positive integer or null, got {self.num_actors!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ExtractorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigFieldError("extractor", unknown[0], f"is not a field of ExtractorConfig (known: {sorted(known)})",
                                   message=f"unknown extractor config keys: {unknown} (known: {sorted(known)})")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
