"""The bare state dict inside a checkpoint, however a training script saved it.

Training scripts save a model's weights in several ways: a plain state dict
(`torch.save(model.state_dict(), path)`), a state dict wrapped in a dict beside other entries
({"model": sd, "epoch": 3} as timm / DeiT do, {"state_dict": sd, "optimizer": ...},
{"model_state_dict": sd}; DeiT-style scripts such as Vim's also save the EMA weights as
"model_ema" and their argparse arguments as "args"), or the whole module object; and a model
wrapped in nn.DataParallel / DistributedDataParallel prefixes every key with `module.`.
`unwrap_state_dict` accepts all of these and returns the bare {name: tensor} mapping.
`load_checkpoint_file` reads a checkpoint file (torch-saved, with `weights_only` unless the caller
trusts the file, or .safetensors), and `read_state_dict` does both. They are the one
implementation of reading and unwrapping: the feature extractors' checkpoints
(`extractors.base.read_state_dict`) and the official release's
(`ms_temba.convert.read_release_state_dict`) both go through them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint_file", "read_state_dict", "unwrap_state_dict", "key_listing",
           "WRAPPER_KEYS", "SAFE_GLOBALS", "DATA_PARALLEL_PREFIX"]

# Containers other tools wrap a state dict in, in the order they are tried ("model" before
# "model_ema": a checkpoint with both is read as the trained weights, as DeiT / Vim evaluate it).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_ema")
# Classes besides tensors and containers that weights_only may rebuild: the training arguments that
# DeiT-style checkpoints (Vim's releases) carry beside the weights; a Namespace holds plain values.
SAFE_GLOBALS = (argparse.Namespace,)
DATA_PARALLEL_PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold what it should; the message says why."""


def load_checkpoint_file(path: str | os.PathLike, trust_pickle: bool = False, what: str = "checkpoint",
                         trust_hint: str = "") -> Any:
    """What the checkpoint file `path` holds, on the CPU: a .safetensors file's tensors, else what
    torch.load returns.

    torch.load runs with weights_only=True, which cannot run code from the file, unless
    `trust_pickle` (unpickling a whole saved module can execute arbitrary code). `what` names the
    file in errors ("release checkpoint"); `trust_hint` is appended to the advice given for a file
    that pickles objects (e.g. " (--trust-pickle)"). Raises FileNotFoundError when there is no such
    file and CheckpointError when it cannot be read; the message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch and safetensors raise many types for a corrupt file
        # weights_only refuses any class outside its allow-list with "Unsupported global: ...".
        if not trust_pickle and "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path} holds pickled Python objects, not just tensors (probably a whole saved model). "
                f"Loading it can execute code from the file; if you trust it, pass trust_pickle=True"
                f"{trust_hint}. Underlying error: {error}"
            ) from error
        raise CheckpointError(f"cannot read {what} {path}: {error}") from error


def read_state_dict(path: str | os.PathLike, trust_pickle: bool = False, what: str = "checkpoint",
                    trust_hint: str = "") -> dict[str, torch.Tensor]:
    """The bare state dict in the checkpoint file `path`: `load_checkpoint_file`, then
    `unwrap_state_dict`. Same arguments and errors."""
    saved = load_checkpoint_file(path, trust_pickle, what, trust_hint)
    return unwrap_state_dict(saved, f"{what} {path}")


def unwrap_state_dict(saved: Any, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The bare state dict in `saved` (what torch.load returned, or a module): containers under
    WRAPPER_KEYS unwrapped (nested ones too), a module replaced by its state_dict(), and the
    DataParallel `module.` prefix removed when every key has it. `source` names the checkpoint in
    errors. Raises CheckpointError when what remains is not a mapping of names to tensors, or when
    only some keys carry the prefix (not the state dict of one model)."""
    if isinstance(saved, nn.Module):
        saved = saved.state_dict()
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source} is not a state dict (a mapping of parameter names to tensors): "
                              f"it holds a {type(saved).__name__}")
    for key in WRAPPER_KEYS:
        if key in saved and isinstance(saved[key], (Mapping, nn.Module)):
            return unwrap_state_dict(saved[key], source)
    not_tensors = [key for key, value in saved.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source} is not a state dict: entries {key_listing(not_tensors)} are not tensors, and none of "
            f"{', '.join(map(repr, WRAPPER_KEYS))} holds one (top-level keys: {key_listing(list(saved))})")
    return _strip_data_parallel_prefix(dict(saved), source)


def _strip_data_parallel_prefix(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """nn.DataParallel / DistributedDataParallel prefix every key with `module.`; remove it."""
    prefixed = [key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict]
    if state_dict and all(prefixed):
        return {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state_dict.items()}
    if any(prefixed):
        mixed = [key for key, has in zip(state_dict, prefixed) if has]
        raise CheckpointError(
            f"{source}: only some keys have the DataParallel prefix {DATA_PARALLEL_PREFIX!r} (e.g. "
            f"{key_listing(mixed)}): not a state dict of one model")
    return state_dict


def key_listing(keys: list[str], limit: int = 8) -> str:
    """The first `limit` keys, quoted, and how many more there are (for error messages)."""
    shown = ", ".join(map(repr, keys[:limit]))
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
