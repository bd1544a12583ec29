"""Import checkpoints of the official MS-Temba release (github.com/thearkaprava/MS-Temba).

The release's training script (vim/MSTemba_main.py) saves the best model with
`torch.save(model.state_dict(), "best_model.pth")`: a plain state dict, whose keys carry a
`module.` prefix when the model was wrapped in nn.DataParallel. Other tools wrap the same state
dict as {"model": sd} (timm / DeiT style, which the release's `mstemba(pretrained=True)` reads) or
{"state_dict": sd}; a few save the whole module object. `read_release_state_dict` accepts all of
these and returns the bare state dict (the unwrapping is `ms_temba.checkpoint.unwrap_state_dict`).

`MSTemba` (ms_temba/model.py) keeps its own module layout, and the release's names are mapped here,
as timm models convert foreign checkpoints in a `checkpoint_filter_fn`. The key mapping (release ->
ours; the TLMs, which the release does not have, were `tlms.{k-1}` in bundle format 1):

    release                              ours
    proj.*                               proj.*
    blocks.{2k-2}.*  (projection k)      blocks.{k-1}.projection.*
    blocks.1.*       (block 1's DTS)     blocks.0.dts.branches.0.*
    blocks.{2k-1}.{i}.* (k > 1)          blocks.{k-1}.dts.branches.{i}.*
    tlms.{k-1}.*                         blocks.{k-1}.tlm.*
    block_heads.{k-1}.*                  block_heads.{k-1}.*
    scale_proj{k}.*                      fuser.scale_projs.{k-1}.*
    norm.*, interaction_block.*          fuser.norm.*, fuser.interaction_block.*
    head.*                               head.*

`release_to_model_key` / `model_to_release_key` (and the `..._state_dict` forms) apply it. The same
mapping reads model files of bundle format 1 (pipelines/bundle.py), whose MSTemba state dicts used
the release's names: `upgrade_format1_state_dict`.

Apart from the names the conversion is a check, with one exception: each of the release's
VisionMamba stacks (every DTS branch and the fuser's interaction block) carries a 1000-way
ImageNet classification `head` it never calls (MSTemba.forward uses `block_heads` and its own
`head`). Those weights (`blocks.1.head.*`, `blocks.3.{i}.head.*`, `blocks.5.{i}.head.*`,
`interaction_block.head.*`) are dropped. The configuration (feature dim, classes, widths, state
size, expansion, conv width, layers per branch) is read off the tensor shapes. A state dict already
in our names (e.g. a whole `ms_temba_release` module saved with torch.save) is accepted too.

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

The command-line entry `ms-temba convert-release` (pipelines/tools/) writes the converted model
as a pipelines.bundle model file for `ms-temba predict`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn as nn

from ms_temba.checkpoint import CheckpointError, key_listing as _listing, load_checkpoint_file, unwrap_state_dict
from ms_temba.model import MSTemba, MSTembaConfig
from ms_temba.registry import create_model, model_class

__all__ = [
    "RELEASE_MODEL_NAME",
    "ReleaseCheckpointError",
    "read_release_state_dict",
    "convert_release_state_dict",
    "load_release_checkpoint",
    "release_to_model_key",
    "model_to_release_key",
    "release_to_model_state_dict",
    "model_to_release_state_dict",
    "upgrade_format1_state_dict",
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
    try:
        if isinstance(source, (str, os.PathLike)):
            source = load_checkpoint_file(source, trust_pickle, what="release checkpoint",
                                          trust_hint=" (--trust-pickle), with the release's code importable")
        return unwrap_state_dict(source, "the release checkpoint")
    except CheckpointError as error:
        raise ReleaseCheckpointError(str(error)) from error.__cause__


def convert_release_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[MSTembaConfig, "OrderedDict[str, torch.Tensor]"]:
    """The config and the `ms_temba_release` state dict (our names) of a release state dict.

    Drops the unused 1000-way VisionMamba heads and checks that what remains is exactly the
    release architecture's keys with the same shapes, then renames them (`release_to_model_key`);
    the tensors are passed through. Raises ReleaseCheckpointError naming, in the release's names,
    the first missing or unexpected keys, or a key whose shape does not fit the inferred
    configuration. Keys already in our names are accepted (checked under their release names).
    """
    state_dict = read_release_state_dict(state_dict)
    try:  # our names, if any (e.g. a whole `ms_temba_release` module saved with torch.save), to the release's
        state_dict = model_to_release_state_dict(state_dict)
    except CheckpointError as error:
        raise ReleaseCheckpointError(str(error)) from None
    kept = {key: value for key, value in state_dict.items() if not _UNUSED_HEAD.match(key)}
    config = infer_release_config(kept)
    expected = model_to_release_state_dict(create_model(RELEASE_MODEL_NAME, **_overrides(config)).state_dict())

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
    return config, OrderedDict((release_to_model_key(key), kept[key]) for key in expected)


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
# The key mapping between the release's names and ours (table in the module docstring)
# ----------------------------------------------------------------------------------------------

_RELEASE_PROJECTION = re.compile(r"blocks\.(\d*[02468])\.((?:linear|norm)\..+)")
_RELEASE_FIRST_DTS = re.compile(r"blocks\.1\.((?:layers|norm_f|head)\..+)")
_RELEASE_DTS = re.compile(r"blocks\.(\d*[13579])\.(\d+)\.((?:layers|norm_f|head)\..+)")
_RELEASE_TLM = re.compile(r"tlms\.(\d+)\.(.+)")
_RELEASE_SCALE_PROJ = re.compile(r"scale_proj(\d+)\.(.+)")
_RELEASE_FUSER = re.compile(r"(?:norm|interaction_block)\..+")

_OUR_PROJECTION = re.compile(r"blocks\.(\d+)\.projection\.(.+)")
_OUR_DTS = re.compile(r"blocks\.(\d+)\.dts\.branches\.(\d+)\.(.+)")
_OUR_TLM = re.compile(r"blocks\.(\d+)\.tlm\.(.+)")
_OUR_SCALE_PROJ = re.compile(r"fuser\.scale_projs\.(\d+)\.(.+)")
_OUR_FUSER = re.compile(r"fuser\.((?:norm|interaction_block)\..+)")


def release_to_model_key(key: str) -> str:
    """Our name for the release's (or bundle format 1's) state-dict key `key`; a key that is not
    one of the release's renamed modules (`proj.*`, `block_heads.*`, `head.*`, one already in our
    names, an unknown one) is returned unchanged."""
    if match := _RELEASE_PROJECTION.fullmatch(key):
        return f"blocks.{int(match[1]) // 2}.projection.{match[2]}"
    if match := _RELEASE_FIRST_DTS.fullmatch(key):  # block 1's single branch is stored bare
        return f"blocks.0.dts.branches.0.{match[1]}"
    if (match := _RELEASE_DTS.fullmatch(key)) and match[1] != "1":
        return f"blocks.{int(match[1]) // 2}.dts.branches.{match[2]}.{match[3]}"
    if match := _RELEASE_TLM.fullmatch(key):
        return f"blocks.{match[1]}.tlm.{match[2]}"
    if (match := _RELEASE_SCALE_PROJ.fullmatch(key)) and int(match[1]) >= 1:
        return f"fuser.scale_projs.{int(match[1]) - 1}.{match[2]}"
    if _RELEASE_FUSER.fullmatch(key):
        return f"fuser.{key}"
    return key


def model_to_release_key(key: str) -> str:
    """The release's name (bundle format 1's, for a TLM: `tlms.{k-1}.*`) of our state-dict key
    `key`; the inverse of `release_to_model_key`. Other keys are returned unchanged."""
    if match := _OUR_PROJECTION.fullmatch(key):
        return f"blocks.{2 * int(match[1])}.{match[2]}"
    if match := _OUR_DTS.fullmatch(key):
        block, branch, rest = int(match[1]), match[2], match[3]
        if block == 0 and branch == "0":  # block 1's single branch is stored bare
            return f"blocks.1.{rest}"
        if block > 0:
            return f"blocks.{2 * block + 1}.{branch}.{rest}"
        return key  # block 1 has one branch: not a key of the architecture
    if match := _OUR_TLM.fullmatch(key):
        return f"tlms.{match[1]}.{match[2]}"
    if match := _OUR_SCALE_PROJ.fullmatch(key):
        return f"scale_proj{int(match[1]) + 1}.{match[2]}"
    if match := _OUR_FUSER.fullmatch(key):
        return match[1]
    return key


def release_to_model_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """`state_dict` with every key renamed by `release_to_model_key` (same tensors, same order)."""
    return _renamed(state_dict, release_to_model_key)


def model_to_release_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """`state_dict` with every key renamed by `model_to_release_key` (same tensors, same order): what
    the release (and bundle format 1) would store. The release has no TLMs: an `ms_temba_release`
    state dict gives exactly the release's keys and shapes, less its unused VisionMamba heads."""
    return _renamed(state_dict, model_to_release_key)


def upgrade_format1_state_dict(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a model file of bundle format 1 in today's names. Format 1 stored MSTemba
    weights under the release's names (TLMs as `tlms.{k-1}`); other models' are unchanged."""
    if issubclass(model_class(model_name), MSTemba):
        return release_to_model_state_dict(state_dict)
    return dict(state_dict)


def _renamed(state_dict: Mapping[str, torch.Tensor], rename) -> "OrderedDict[str, torch.Tensor]":
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    sources: dict[str, str] = {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in renamed:
            raise CheckpointError(f"the state dict has both {sources[new]!r} and {key!r}, which are the "
                                         f"same tensor {new!r} under two layouts")
        renamed[new], sources[new] = value, key
    return renamed


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _overrides(config: MSTembaConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)

