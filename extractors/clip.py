"""CLIP image-tower features: per-frame embeddings from a timm CLIP ViT, averaged over windows of frames.

The model is any timm CLIP image tower, by default `vit_large_patch14_clip_224.openai` (768-d). For
these models timm's classifier head *is* CLIP's image projection (`pretrained_cfg["num_classes"]`
is the joint image-text embedding size, and the OpenAI `proj` matrix is loaded into `head`), so
the model's output, class token -> final norm -> head, is the projected CLIP image embedding. We
therefore keep the head (creating the model with num_classes=0 would drop the projection and give
the 1024-d ViT width instead). Fine-tuned variants ("..._ft_in1k") have a classifier there and are
refused. Note that the OpenAI weights were trained with QuickGELU; timm's exact replica of them is
the "..._clip_quickgelu_224.openai" architecture, the plain one uses GELU.

Preprocessing follows CLIP's own: bicubic resize of the short side to the model's input size, centre
crop, scale to [0, 1], normalise with the model's mean/std (timm's OPENAI_CLIP_MEAN/STD for OpenAI
weights). Frames arrive as square crops already (`extractors.video`), so usually only the resize acts.

Features: the embeddings of frames [j * w, (j + 1) * w) are averaged into feature j, w =
cfg.clip_window; the last window may be shorter, n frames give ceil(n / w) features
(`extractors.frames`). Frames go through the network cfg.batch_size at a time. Embeddings are not L2-normalised (averaging first
keeps the magnitude information; normalise downstream if wanted).

Weights: `weights=` a local timm-format state dict (.safetensors or torch file, e.g. model.safetensors
from huggingface.co/timm/<model name>), loaded strictly; or `pretrained_from_hub=True` to let timm
download `model_name` (needs internet); with neither, random weights and a loud warning.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn
from torchvision.transforms.v2 import functional as TF

from extractors.base import CheckpointInfo, load_state_dict_strict, read_state_dict
from extractors.config import ExtractorConfig
from extractors.files import file_sha256
from extractors.frames import FrameEmbeddingExtractor


def create_clip(model_name: str, weights: str | os.PathLike | None = None, pretrained_from_hub: bool = False,
                **model_kwargs: Any) -> tuple[nn.Module, CheckpointInfo]:
    """The timm CLIP image tower `model_name` in eval mode, and where its weights came from.

    model_kwargs go to timm.create_model (e.g. depth=2 for a small test network).
    """
    if "_ft_" in model_name:
        raise ValueError(f"{model_name!r} is a CLIP tower fine-tuned for classification: its head gives class "
                         f"logits, not CLIP embeddings; use the un-fine-tuned tag (e.g. '.openai')")
    if weights is not None and pretrained_from_hub:
        raise ValueError("give either weights (a local checkpoint) or pretrained_from_hub, not both")
    try:
        model = timm.create_model(model_name, pretrained=pretrained_from_hub, **model_kwargs)
    except RuntimeError as error:  # timm's error for an unknown name is a RuntimeError
        raise ValueError(f"cannot create timm model {model_name!r}: {error}") from error
    if weights is not None:
        load_state_dict_strict(model, read_state_dict(weights), os.fspath(weights))
        checkpoint = CheckpointInfo(source=Path(weights).name, sha256=file_sha256(weights), pretrained=True)
    elif pretrained_from_hub:
        checkpoint = CheckpointInfo(source=f"timm-hub:{model_name}", sha256=f"timm-hub:{model_name}", pretrained=True)
    else:
        checkpoint = CheckpointInfo.random(f"CLIP {model_name}")
    return model.eval(), checkpoint


def embedding_dim(model: nn.Module) -> int:
    """Size of the model's output: the projection (head) if it has one, else the pooled width."""
    return model.num_classes if model.num_classes > 0 else model.num_features


def input_size(model: nn.Module, data_config: dict[str, Any]) -> int:
    """Side of the square images the model takes. The patch embedding knows it even when img_size was
    overridden at creation (timm's data config only repeats the pretrained default then)."""
    patch_embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if patch_embed_size is not None:
        height, width = patch_embed_size
        if height != width:
            raise ValueError(f"CLIP model takes non-square {height}x{width} images; only square ones are supported")
        return int(height)
    return int(data_config["input_size"][-1])


class ClipExtractor(FrameEmbeddingExtractor):
    """Per-frame CLIP embeddings averaged over windows of cfg.clip_window frames."""

    backbone = "clip"

    def __init__(self, cfg: ExtractorConfig, model_kwargs: dict[str, Any] | None = None):
        model, checkpoint = create_clip(cfg.model_name, cfg.weights, cfg.pretrained_from_hub,
                                        **(model_kwargs or {}))
        self.model_name = cfg.model_name
        self.dim = embedding_dim(model)
        data_config = resolve_model_data_config(model)
        self.input_size = input_size(model, data_config)
        self.mean, self.std = list(data_config["mean"]), list(data_config["std"])
        super().__init__(cfg, model, checkpoint)

    @property
    def window(self) -> int:
        return self.cfg.clip_window

    def sampling_metadata(self) -> dict:
        return {"clip_window": self.cfg.clip_window}

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (n, H, W, 3) frames -> normalised (n, 3, S, S) network input, as CLIP prepares images."""
        images = self._to_device(frames).permute(0, 3, 1, 2)  # uint8 (n, 3, H, W)
        images = TF.resize(images, [self.input_size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        images = TF.center_crop(images, [self.input_size, self.input_size])
        images = images.to(self.dtype) / 255.0
        return TF.normalize(images, self.mean, self.std)

    def embed(self, frames: np.ndarray) -> torch.Tensor:
        """Projected CLIP embeddings (n, dim) of uint8 (n, H, W, 3) frames, in float32."""
        return self.model(self.preprocess(frames)).float()
