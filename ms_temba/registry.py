"""A timm-style model registry: named architectures, built by `create_model(name, **overrides)`.

Each model file registers its variants beside the model, one function per variant that returns
the variant's default config:

    @register_model(MSTemba)
    def ms_temba_tiny() -> MSTembaConfig:
        return MSTembaConfig(in_dim=64, num_classes=8, widths=(32, 48, 64), d_state=8)

`create_model("ms_temba_tiny", num_classes=65)` replaces fields of that config and builds the
model; `model_config(name, **overrides)` validates the same without building any weights (the
pipeline checks its parameters with it). A model's `config` attribute is the dataclass it was built
from, so `create_model(name, **dataclasses.asdict(model.config))` rebuilds it.
`register_model(VisionMamba, aliases=[...])` gives a variant other names that both accept (an
upstream project's long names, as for Vim).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, NamedTuple

import torch.nn as nn

from ms_temba.errors import ConfigFieldError

__all__ = ["register_model", "create_model", "model_config", "model_class", "list_models"]


class _Entry(NamedTuple):
    model_class: type[nn.Module]
    default_config: Callable[[], object]


_REGISTRY: dict[str, _Entry] = {}


# Other names of registered models (an upstream project's long names): alias -> name.
_ALIASES: dict[str, str] = {}


def register_model(model_class: type[nn.Module], aliases: Iterable[str] = ()):
    """Decorator factory: register `default_config() -> config` under the function's name, as a
    variant of `model_class` (built as `model_class(config)`); `aliases` are other names that
    create_model and model_config accept for it (list_models lists only the name)."""
    def register(default_config: Callable[[], object]):
        name = default_config.__name__
        for new_name in (name, *aliases):
            if new_name in _REGISTRY or new_name in _ALIASES:
                raise ValueError(f"a model named {new_name!r} is already registered")
        _REGISTRY[name] = _Entry(model_class, default_config)
        _ALIASES.update((alias, name) for alias in aliases)
        return default_config
    return register


def list_models() -> list[str]:
    """Names of the registered models, sorted (without their aliases)."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_class(name: str) -> type[nn.Module]:
    return _entry(name).model_class


def model_config(name: str, **overrides):
    """The config of model `name` with `overrides` replacing its fields; ConfigFieldError (a
    ValueError, `.field` names the field) for an unknown field or a bad value (the config's own check)."""
    defaults = _entry(name).default_config()
    keys = [field.name for field in dataclasses.fields(defaults)]
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        owner = type(defaults).__name__
        raise ConfigFieldError(owner, unknown[0], f"is not a field of {owner}; valid keys: {', '.join(keys)}",
                               message=f"unknown {owner} key(s) {', '.join(map(repr, unknown))}; "
                                       f"valid keys: {', '.join(keys)}")
    return dataclasses.replace(defaults, **overrides)


def create_model(name: str = "ms_temba", **overrides) -> nn.Module:
    """Build the registered model `name`, with `overrides` replacing fields of its config
    (e.g. in_dim=768 for CLIP features, num_classes=65 for MultiTHUMOS)."""
    return model_class(name)(model_config(name, **overrides))
