"""A timm-style model registry: named architectures, built by `create_model(name, **overrides)`.

An entry is a function registered with `@register_model`; its name is the model's name, and it
returns an `MSTemba` built from its own default `MSTembaConfig` with the caller's overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ms_temba.model import MSTemba, MSTembaConfig

__all__ = ["register_model", "create_model", "list_models"]

_MODEL_ENTRYPOINTS: dict[str, Callable[..., MSTemba]] = {}
_CONFIG_KEYS = tuple(field.name for field in dataclasses.fields(MSTembaConfig))


def register_model(entrypoint: Callable[..., MSTemba]) -> Callable[..., MSTemba]:
    """Decorator: register `entrypoint(**overrides) -> MSTemba` under its function name."""
    name = entrypoint.__name__
    if name in _MODEL_ENTRYPOINTS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODEL_ENTRYPOINTS[name] = entrypoint
    return entrypoint


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODEL_ENTRYPOINTS)


def create_model(name: str = "ms_temba", **overrides) -> MSTemba:
    """Build the registered model `name`, with `overrides` replacing MSTembaConfig fields
    (e.g. in_dim=768 for CLIP features, num_classes=65 for MultiTHUMOS)."""
    if name not in _MODEL_ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODEL_ENTRYPOINTS[name](**overrides)


def _build(defaults: MSTembaConfig, overrides: dict) -> MSTemba:
    unknown = sorted(set(overrides) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"unknown MSTembaConfig key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(_CONFIG_KEYS)}"
        )
    return MSTemba(dataclasses.replace(defaults, **overrides))


@register_model
def ms_temba(**overrides) -> MSTemba:
    """MS-Temba as in the paper (I3D features, 157 Charades classes), with the TLMs."""
    return _build(MSTembaConfig(), overrides)


@register_model
def ms_temba_release(**overrides) -> MSTemba:
    """Exactly the official release's architecture (no TLMs); loads its checkpoints 1:1."""
    return _build(MSTembaConfig(tlm=False), overrides)


@register_model
def ms_temba_tiny(**overrides) -> MSTemba:
    """A small MS-Temba for tests and smoke runs on CPU."""
    tiny = MSTembaConfig(in_dim=64, num_classes=8, widths=(32, 48, 64), d_state=8)
    return _build(tiny, overrides)
