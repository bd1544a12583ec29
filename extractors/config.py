"""The extractor configuration: one dataclass shared by the backbones, the Ray fan-out and the pipeline.

In Python, `ExtractorConfig` is flat: `cfg.fps`, `cfg.mode`, `ExtractorConfig(backbone="i3d",
mode="snippets")`; `from_dict` / `to_dict` use those field names. In params.yaml and conf/extractor/
(the "params form", `from_params` / `to_params`), the fields only one backbone reads
(`BACKBONE_FIELDS`) nest under that backbone's name, and only the chosen backbone's section is there:

    extractor:
      backbone: i3d
      weights: null          # the fields every backbone reads, at the top
      fps: 24.0
      ...
      i3d:                   # the fields of backbone i3d only
        mode: fully_conv
        snippet_len: 16
        stride: 16

A field in the wrong place (`extractor.mode`, `extractor.i3d.fps`, an `extractor.clip` section while
the backbone is i3d) or an unknown one raises ConfigFieldError naming where it belongs.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from extractors.device import DEVICE_CHOICES
from ms_temba.errors import ConfigFieldError

# The backbones by name: "module:class" of each FeatureExtractor subclass, imported only when built
# (extractors.backbones.build_extractor), so that one backbone never imports another's dependencies.
BACKBONES: dict[str, str] = {
    "i3d": "extractors.i3d:I3DExtractor",
    "clip": "extractors.clip:ClipExtractor",
    "vim": "extractors.vim:VimExtractor",
}

# The fields that one backbone alone reads; in the params form they sit under extractor.<backbone>.
# Every other field is read by every backbone and sits at the top.
BACKBONE_FIELDS: dict[str, tuple[str, ...]] = {
    "i3d": ("mode", "snippet_len", "stride"),
    "clip": ("model_name", "pretrained_from_hub", "clip_window"),
    "vim": ("variant", "token", "window", "weights_from_hub"),
}

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# Largest relative L2 distance between half-precision and fp32 features (tests/test_precision.py
# checks it on random-init I3D and CLIP): what `precision` may cost in accuracy.
PRECISION_TOLERANCE = {"fp16": 0.01, "bf16": 0.02}


@dataclass(frozen=True)
class ExtractorConfig:
    backbone: str = "i3d"  # a key of BACKBONES: "i3d" | "clip" | "vim"
    weights: str | None = None  # local checkpoint path; None = hub weights (clip, vim; online) or random init
    model_name: str = "vit_large_patch14_clip_224.openai"  # timm name, CLIP only
    pretrained_from_hub: bool = False  # CLIP: let timm download `model_name` weights (needs internet)
    fps: float | None = 24.0  # frames are sampled at this rate; None = the video's native rate
    image_size: int = 224  # short side resized to this, then center crop image_size x image_size
    mode: str = "fully_conv"  # I3D: "fully_conv" (one feature per 8 frames) | "snippets"
    snippet_len: int = 16  # I3D snippets mode: frames per snippet
    stride: int = 16  # I3D snippets mode: frames between snippet starts
    clip_window: int = 16  # CLIP: per-frame embeddings averaged over windows of this many frames
    variant: str = "vim_tiny"  # Vim: a Vim model of ms_temba.create_model (vim_small, vim_tiny_stride8, ...)
    token: str = "cls"  # Vim: a frame's feature is its "cls" token or the "mean" of its patch tokens
    window: int = 16  # Vim: per-frame features averaged over windows of this many frames
    weights_from_hub: bool = False  # Vim: download the variant's official checkpoint (needs internet)
    batch_size: int = 8  # snippets (I3D) or frames (CLIP, Vim) per forward pass
    chunk_frames: int = 128  # frames decoded and held in memory at once
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # The backbone's weights and activations: "auto" = fp16 on CUDA, fp32 on CPU. Half precision
    # stays within PRECISION_TOLERANCE of fp32 (docs/pipeline.md); CPUs gain nothing from it.
    precision: str = "auto"  # "auto" | "fp32" | "fp16" | "bf16"
    num_actors: int | None = None  # None: one per GPU, else one per CPU core
    videos_per_shard: int = 16

    def __post_init__(self) -> None:
        def reject(field: str, problem: str):
            raise ConfigFieldError("extractor", field_path(field), problem)

        if self.backbone not in BACKBONES:
            reject("backbone", f"must be one of {', '.join(map(repr, BACKBONES))}, got {self.backbone!r}")
        if self.mode not in ("fully_conv", "snippets"):
            reject("mode", f"must be 'fully_conv' or 'snippets', got {self.mode!r}")
        if self.token not in ("cls", "mean"):
            reject("token", f"must be 'cls' or 'mean', got {self.token!r}")
        if self.precision not in PRECISIONS:
            reject("precision", f"must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}")
        if self.device not in DEVICE_CHOICES:
            reject("device", f"must be one of {', '.join(map(repr, DEVICE_CHOICES))}, got {self.device!r}")
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool)
                                     or not self.fps > 0):
            reject("fps", f"must be positive or null, got {self.fps!r}")
        for name in ("image_size", "snippet_len", "stride", "clip_window", "window", "batch_size", "chunk_frames",
                     "videos_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                reject(name, f"must be a positive integer, got {value!r}")
        if self.num_actors is not None and (not isinstance(self.num_actors, int) or self.num_actors <= 0):
            reject("num_actors", f"must be a positive integer or null, got {self.num_actors!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ExtractorConfig":
        """From a flat mapping of the fields (as `to_dict` writes it)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigFieldError("extractor", unknown[0], f"is not a field of ExtractorConfig (known: {sorted(known)})",
                                   message=f"unknown extractor config keys: {unknown} (known: {sorted(known)})")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """The fields, flat (every backbone's, whichever is chosen)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> "ExtractorConfig":
        """From the params form (the `extractor:` section of params.yaml; see the module docstring)."""
        return cls(**flatten_params(values))

    def to_params(self) -> dict[str, Any]:
        """The params form: the shared fields, then the chosen backbone's own under its name."""
        fields = self.to_dict()
        own = BACKBONE_FIELDS[self.backbone]
        shared = {name: value for name, value in fields.items() if name not in _ALL_BACKBONE_FIELDS}
        return {**shared, self.backbone: {name: fields[name] for name in own}}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> "ExtractorConfig":
        """From a YAML file in the params form (the section alone, e.g. conf/extractor/i3d.yaml, or a
        params.yaml, whose `extractor:` section is used), then `key=value` overrides with dotted keys
        (`fps=null`, `i3d.mode=snippets`, `extractor.batch_size=2`; values parsed as YAML).
        Interpolations are resolved as Hydra would, facts about a dataset taking their defaults."""
        import yaml
        from omegaconf import OmegaConf

        values: dict[str, Any] = {}
        if path is not None:
            with open(path) as stream:
                loaded = yaml.safe_load(stream) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of extractor settings")
            try:
                values = OmegaConf.to_container(OmegaConf.create(loaded), resolve=True)
            except Exception as error:  # an interpolation that does not resolve
                raise ValueError(f"{path}: {str(error).splitlines()[0]}") from None
            values = dict(values.get("extractor", values))
        for override in overrides:
            key, separator, value = override.partition("=")
            if not separator or not key:
                raise ValueError(f"override {override!r} is not key=value")
            *parents, name = key.removeprefix("extractor.").split(".")
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
                if not isinstance(node, dict):
                    raise ValueError(f"override {override!r}: {parent} is not a section")
            node[name] = yaml.safe_load(value)
        return cls.from_params(values)


_SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(ExtractorConfig)
                       if not any(f.name in own for own in BACKBONE_FIELDS.values()))
_ALL_BACKBONE_FIELDS = {name: backbone for backbone, own in BACKBONE_FIELDS.items() for name in own}


def field_path(name: str) -> str:
    """Where field `name` sits in the params form, below `extractor.`: "fps", "i3d.mode"."""
    backbone = _ALL_BACKBONE_FIELDS.get(name)
    return f"{backbone}.{name}" if backbone else name


def flatten_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The flat fields of the params form `values`, after checking that each one is where it
    belongs; ConfigFieldError (`.field` dotted below `extractor.`) for one that is not."""
    if not isinstance(values, Mapping):
        raise ConfigFieldError("extractor", "", f"must be a mapping, got {values!r}", message=f"extractor must be a mapping, got {values!r}")
    backbone = values.get("backbone", ExtractorConfig.backbone)
    if backbone not in BACKBONES:
        raise ConfigFieldError("extractor", "backbone", f"must be one of {', '.join(map(repr, BACKBONES))}, got {backbone!r}")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in BACKBONES:
            if key != backbone:
                raise ConfigFieldError("extractor", key, f"holds settings of the {key} backbone, but extractor.backbone "
                                                         f"is {backbone!r}: remove it (choose a backbone with "
                                                         f"`extractor={key}`, which brings its settings)")
            if not isinstance(value, Mapping):
                raise ConfigFieldError("extractor", key, f"must be a mapping of the {key} settings "
                                                         f"({', '.join(BACKBONE_FIELDS[key])}), got {value!r}")
            for name, item in value.items():
                if name not in BACKBONE_FIELDS[key]:
                    raise ConfigFieldError("extractor", f"{key}.{name}", _misplaced(name, f"{key}.", BACKBONE_FIELDS[key]))
                flat[name] = item
        elif key in _SHARED_FIELDS:
            flat[key] = value
        else:
            raise ConfigFieldError("extractor", key, _misplaced(key, "", _SHARED_FIELDS + (backbone,)))
    return flat


def _misplaced(name: str, prefix: str, known: Sequence[str]) -> str:
    """The problem with key extractor.<prefix><name>, which is not among `known` there."""
    if name in _SHARED_FIELDS:
        return f"is read by every backbone: write it as extractor.{name}"
    if name in _ALL_BACKBONE_FIELDS:
        return f"is a setting of the {_ALL_BACKBONE_FIELDS[name]} backbone: write it as extractor.{field_path(name)}"
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'extractor.{prefix}{c}' for c in close)}?" if close else ""
    return f"unknown key{hint} (known: {', '.join(sorted(known))})"
