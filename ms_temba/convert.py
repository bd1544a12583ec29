"""Import checkpoints of the official MS-Temba release (github.com/thearkaprava/MS-Temba).

The release's training script (vim/MSTemba_main.py) saves the best model with
`torch.save(model.state_dict(), "best_model.pth")`: a plain state dict, whose keys carry a
`module.` prefix when the model was wrapped in nn.DataParallel. Other tools wrap the same state
dict as {"model": sd} (timm / DeiT style, which the release's `mstemba(pretrained=True)` reads) or
{"state_dict": sd}; a few save the whole module object. `read_release_state_dict` accepts all of
these and returns the bare state dict (the unwrapping is `ms_temba.checkpoint.unwrap_state_dict`).

Our `ms_temba_release` architecture (registry.py) uses the release's module names, so the
conversion is a check rather than a renaming, with one exception: each of the release's
VisionMamba stacks (every DTS branch and the fuser's interaction block) carries a 1000-way
ImageNet classification `head` it never calls (MSTemba.forward uses `block_heads` and its own
`head`). Those weights (`blocks.1.head.*`, `blocks.3.{i}.head.*`, `blocks.5.{i}.head.*`,
`interaction_block.head.*`) are dropped. The configuration (feature dim, classes, widths, state
size, expansion, conv width, layers per branch) is read off the tensor shapes.

What our forward computes with the converted weights vs the release's forward:
* The release takes features channel-first, (batch, in_dim, time), and permutes them; ours takes
  (batch, time, in_dim). The logits are (batch, time, classes) in both.
* For a single unpadded video whose length is a multiple of 3 the outputs are the same function
  (tests/test_convert.py checks this against a functional re-implementation of the release's
  forward written directly on the release's state-dict keys).
* When the length is not a multiple of 3 the release zero-pads block 3's input and runs those
  padded frames through its Mamba branches unmasked, so the backward scans start from a state
  driven by the padding (the conv bias makes it non-zero); ours treats them as masked padding, so
  a video's predictions do not depend on how it was padded. Real-frame outputs differ slightly.
* The release's batches are zero-padded and never masked inside the network; ours masks.
* Training-time only: the release applies DropPath(0.1) to the last Mamba layer of every stack
  (VisionMamba's default drop_path_rate, as MSTemba does not pass its own through).

The command-line entry `ms-temba convert-release` (pipelines/export.py) writes the converted model
as a pipelines.bundle model file for `ms-temba predict`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ms_temba.checkpoint import CheckpointError, key_listing as _listing, unwrap_state_dict
from ms_temba.model import MSTemba, MSTembaConfig
from ms_temba.registry import create_model

__all__ = [
    "RELEASE_MODEL_NAME",
    "ReleaseCheckpointError",
    "read_release_state_dict",
    "convert_release_state_dict",
    "load_release_checkpoint",
]

RELEASE_MODEL_NAME = "ms_temba_release"

# The unused 1000-way heads of the release's VisionMamba stacks: block 1's single branch
# (`blocks.1.head`), the branches of later blocks (`blocks.3.0.head`, ...) and the fuser's stack.
_UNUSED_HEAD = re.compile(r"^(blocks\.\d+(\.\d+)?|interaction_block)\.head\.(weight|bias)$")


class ReleaseCheckpointError(CheckpointError):
    """A checkpoint that is not a loadable MS-Temba release checkpoint; the message says why."""


def read_release_state_dict(source: str | os.PathLike | Mapping | nn.Module,
                            trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The bare state dict of a release checkpoint: a path to a `.pth` file, or what torch.load
    returned (a state dict, a {"state_dict" | "model" | "model_state_dict": sd} wrapper or a
    module), with any DataParallel `module.` prefix removed.

    Files are read with torch.load(weights_only=True), which cannot run code. A file that holds a
    pickled module object needs `trust_pickle=True` (and the release's code importable), since
    unpickling it can execute arbitrary code.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _load_file(Path(source), trust_pickle)
    try:
        return unwrap_state_dict(source, "the release checkpoint")
    except CheckpointError as error:
        raise ReleaseCheckpointError(str(error)) from None


def convert_release_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[MSTembaConfig, "OrderedDict[str, torch.Tensor]"]:
    """The config and the `ms_temba_release` state dict of a release state dict.

    Drops the unused 1000-way VisionMamba heads and checks that what remains is exactly our
    architecture's keys with the same shapes. Raises ReleaseCheckpointError naming the first
    missing or unexpected keys, or a key whose shape does not fit the inferred configuration.
    """
    state_dict = read_release_state_dict(state_dict)
    kept = {key: value for key, value in state_dict.items() if not _UNUSED_HEAD.match(key)}
    config = infer_release_config(kept)
    expected = create_model(RELEASE_MODEL_NAME, **_overrides(config)).state_dict()

    missing = [key for key in expected if key not in kept]
    unexpected = [key for key in kept if key not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing key(s) {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected key(s) {_listing(unexpected)}")
        raise ReleaseCheckpointError(
            f"the state dict does not match the release architecture {config}: {'; '.join(problems)}"
        )
    for key, reference in expected.items():
        if kept[key].shape != reference.shape:
            raise ReleaseCheckpointError(
                f"{key} has shape {tuple(kept[key].shape)}, but the release architecture inferred from "
                f"the other tensors ({config}) needs {tuple(reference.shape)}"
            )
    return config, OrderedDict((key, kept[key]) for key in expected)


def infer_release_config(state_dict: Mapping[str, torch.Tensor]) -> MSTembaConfig:
    """The MSTembaConfig (tlm=False) that a release state dict (heads dropped) was built with."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ReleaseCheckpointError(
                f"missing key {key!r}, needed to infer the architecture; is this an MS-Temba "
                f"release checkpoint? (keys: {_listing(list(state_dict))})"
            )
        return tuple(state_dict[key].shape)

    num_blocks = sum(1 for key in state_dict if re.fullmatch(r"block_heads\.\d+\.weight", key))
    if num_blocks == 0:
        shape("block_heads.0.weight")  # raises, naming the key
    widths = tuple(shape(f"block_heads.{k}.weight")[1] for k in range(num_blocks))
    in_proj = shape("blocks.1.layers.0.mixer.in_proj.weight")  # (2 * expand * width, width)
    if in_proj[0] % (2 * widths[0]):
        raise ReleaseCheckpointError(
            f"blocks.1.layers.0.mixer.in_proj.weight has shape {in_proj}: its rows must be "
            f"2 * expand * width with width {widths[0]}"
        )
    layer_indices = {int(match.group(1)) for key in state_dict
                     if (match := re.match(r"blocks\.1\.layers\.(\d+)\.", key))}
    try:
        return MSTembaConfig(
            in_dim=shape("proj.weight")[1],
            num_classes=shape("head.weight")[0],
            widths=widths,
            d_state=shape("blocks.1.layers.0.mixer.A_log")[1],
            expand=in_proj[0] // (2 * widths[0]),
            d_conv=shape("blocks.1.layers.0.mixer.conv1d.weight")[-1],
            layers_per_branch=max(layer_indices) + 1,
            tlm=False,
        )
    except ValueError as error:  # MSTembaConfig's own checks (positive ints, ...)
        raise ReleaseCheckpointError(f"the tensor shapes give an invalid configuration: {error}") from error


def load_release_checkpoint(source: str | os.PathLike | Mapping | nn.Module,
                            trust_pickle: bool = False) -> MSTemba:
    """An `ms_temba_release` model (eval mode, on the CPU) with the weights of a release checkpoint."""
    config, state_dict = convert_release_state_dict(read_release_state_dict(source, trust_pickle))
    model = create_model(RELEASE_MODEL_NAME, **_overrides(config))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _load_file(path: Path, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"release checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... depending on the file
        # weights_only refuses any class outside its allow-list with "Unsupported global: ...".
        if not trust_pickle and "Unsupported global" in str(error):
            raise ReleaseCheckpointError(
                f"{path} holds pickled Python objects, not just tensors (probably a whole saved model). "
                f"Loading it can execute code from the file; if you trust it, pass trust_pickle=True "
                f"(--trust-pickle), with the release's code importable. Underlying error: {error}"
            ) from error
        raise ReleaseCheckpointError(f"cannot read {path} as a PyTorch checkpoint: {error}") from error


def _overrides(config: MSTembaConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)

