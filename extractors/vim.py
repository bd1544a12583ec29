"""Vision Mamba (Vim) image features: per-frame embeddings from `ms_temba.vim`, averaged over windows of frames.

    extractor = build_extractor(ExtractorConfig(backbone="vim", weights="vim_t_midclstok_76p1acc.pth"))

A frame's feature is one of Vim's final hidden states after its final norm, `embed_dim` wide (192
tiny, 384 small, 768 base): `token: cls`, the middle class token (what Vim's classifier head reads,
`VisionMamba.forward_features`), or `token: mean`, the mean of the patch tokens. The head is dropped.

The network is built for `image_size` x `image_size` images, the size the frames are decoded at
(`extractors.video`: short side resized, centre crop), so frames go in as they come, scaled to
[0, 1] and normalised with the ImageNet mean/std Vim was trained with. A checkpoint of another grid
(224 px weights at 448 px, say) loads with its position embedding resampled
(`ms_temba.vim.resize_pos_embed`), as Vim fine-tunes at another resolution.

Features: the embeddings of frames [j * w, (j + 1) * w) are averaged into feature j, w = cfg.window;
the last window may be shorter, n frames give ceil(n / w) features (`extractors.frames`, as for CLIP).

Weights: `weights=` a local checkpoint: an official release file (huggingface.co/hustvl/Vim-*-midclstok,
{"model": ...}), or the model.pt of `ms-temba train-vim`, which records the model it was trained
as (cfg.variant must be that one) with its architecture (a Vim of another width or depth is rebuilt
as trained); or `vim.weights_from_hub: true` to download the variant's official checkpoint
(`HUB_CHECKPOINTS`, needs internet); with neither, random weights and a loud warning. The shard
metadata records the weights' sha256, the variant, the token and the patch size and stride.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.v2 import functional as TF

import ms_temba
from extractors.base import CheckpointInfo, load_state_dict_strict
from extractors.config import ExtractorConfig
from extractors.files import file_sha256
from extractors.frames import FrameEmbeddingExtractor
from ms_temba.checkpoint import load_checkpoint_file, unwrap_state_dict
from ms_temba.registry import model_class
from ms_temba.vim import VimConfig, VisionMamba, resize_pos_embed

# The official checkpoints (github.com/hustvl/Vim, "Model Weights"): variant -> (Hugging Face repo,
# file). The stride-8 ones are Vim's "+" models, fine-tuned at the finer granularity.
HUB_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "vim_tiny": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_stride8": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_small_stride8": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base": ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
}
# Where `ms-temba train-vim` records the model's name and architecture in its checkpoints
# (pipelines.tools.train_vim), beside the weights under "model".
VARIANT_KEY, CONFIG_KEY = "vim_variant", "vim_config"


def hub_checkpoint(variant: str) -> Path:
    """The official checkpoint of `variant`, downloaded from the Hugging Face hub (or its local cache)."""
    if variant not in HUB_CHECKPOINTS:
        raise ValueError(f"no official checkpoint of {variant!r} on the hub; variants with one: "
                         f"{', '.join(HUB_CHECKPOINTS)} (or give a local file as weights)")
    from huggingface_hub import hf_hub_download

    repo, filename = HUB_CHECKPOINTS[variant]
    return Path(hf_hub_download(repo, filename))


def create_vim(variant: str, image_size: int, weights: str | os.PathLike | None = None,
               weights_from_hub: bool = False, **model_kwargs: Any) -> tuple[VisionMamba, CheckpointInfo]:
    """The Vim `variant` without its head, for image_size x image_size images, in eval mode, and
    where its weights came from. model_kwargs replace fields of its config (depth=2 for a small
    test network); a train-vim checkpoint's recorded architecture replaces them the same way."""
    if weights is not None and weights_from_hub:
        raise ValueError("give either weights (a local checkpoint) or weights_from_hub, not both")
    if weights_from_hub:
        weights = hub_checkpoint(variant)
    saved = load_checkpoint_file(weights, what="Vim checkpoint") if weights is not None else {}
    recorded = dict(saved.get(CONFIG_KEY) or {}) if isinstance(saved, dict) else {}
    if recorded and saved.get(VARIANT_KEY) != variant:
        raise ValueError(f"{weights} is a {saved.get(VARIANT_KEY)} trained by ms-temba train-vim, not a {variant}: "
                         f"set the variant to {saved.get(VARIANT_KEY)!r}")
    if not issubclass(model_class(variant), VisionMamba):
        raise ValueError(f"{variant!r} is not a Vim model (it builds a {model_class(variant).__name__}); "
                         f"choose one of the vim_* models")
    architecture = {**model_kwargs, **recorded, "img_size": image_size, "num_classes": 0}
    model = ms_temba.create_model(variant, **architecture)
    if weights is None:
        return model.eval(), CheckpointInfo.random(f"Vim {variant}")

    state = unwrap_state_dict(saved, f"Vim checkpoint {weights}")
    state = {key: value for key, value in state.items() if not key.startswith("head.")}  # features, not logits
    if "pos_embed" in state:  # trained on another grid: resample, as Vim fine-tunes at another resolution
        old_grid = VimConfig(**recorded).grid_size if recorded else None  # None: the official square grids
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.config.grid_size, old_grid)
    load_state_dict_strict(model, state, os.fspath(weights))
    source = f"hf-hub:{'/'.join(HUB_CHECKPOINTS[variant])}" if weights_from_hub else Path(weights).name
    return model.eval(), CheckpointInfo(source=source, sha256=file_sha256(weights), pretrained=True)


class VimExtractor(FrameEmbeddingExtractor):
    """Per-frame Vim embeddings (class token or mean patch token) averaged over windows of cfg.window frames."""

    backbone = "vim"

    def __init__(self, cfg: ExtractorConfig, model_kwargs: dict[str, Any] | None = None):
        model, checkpoint = create_vim(cfg.variant, cfg.image_size, cfg.weights, cfg.weights_from_hub,
                                       **(model_kwargs or {}))
        self.model_name = cfg.variant
        self.dim = model.config.embed_dim
        self.architecture = model.config
        super().__init__(cfg, model, checkpoint)

    @property
    def window(self) -> int:
        return self.cfg.window

    def sampling_metadata(self) -> dict:
        return {"variant": self.cfg.variant, "token": self.cfg.token, "window": self.cfg.window,
                "patch_size": self.architecture.patch_size, "patch_stride": self.architecture.patch_stride,
                "depth": self.architecture.depth}

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (n, S, S, 3) frames -> normalised (n, 3, S, S) network input."""
        images = self._to_device(frames).permute(0, 3, 1, 2).to(self.dtype) / 255.0
        return TF.normalize(images, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))

    def embed(self, frames: np.ndarray) -> torch.Tensor:
        """Features (n, dim) of uint8 (n, S, S, 3) frames, in float32."""
        tokens = self.model.forward_tokens(self.preprocess(frames))  # (n, N + 1, dim), normalised
        middle = self.model.cls_position
        if self.cfg.token == "cls":
            return tokens[:, middle].float()
        return torch.cat([tokens[:, :middle], tokens[:, middle + 1:]], dim=1).float().mean(dim=1)
