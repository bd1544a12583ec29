"""Vision Mamba (Vim, arXiv 2401.09417): an image classifier built from the bidirectional Mamba
layers MS-Temba uses, as in hustvl/Vim's `vim/models_mamba.py` (the "bimamba v2", middle class
token variants that the released checkpoints are).

    images (batch, 3, H, W)
      --patch_embed-->  (batch, N, D)         Conv2d, kernel patch_size, stride `patch_stride`; N patches
                                              in row-major order over the grid
      insert cls_token at index N // 2        the class token sits in the middle of the sequence, so
                                              both scan directions reach it after half the patches
      + pos_embed, dropout                    absolute position embedding, (1, N + 1, D)
      for each layer:                         pre-norm residual, the residual stream kept in fp32:
          x = x + drop_path(BiMamba(RMSNorm(x)))
      norm_f(x)                               `forward_tokens`: (batch, N + 1, D)
      [:, N // 2]                             `forward_features`: the class token, (batch, D)
      --head-->  logits                       `forward`: (batch, num_classes)

The official Block is written "add, then norm, then mixer" (the add of layer i is the residual of
layer i - 1's mixer output, so that the add and the norm fuse into one kernel); unrolled, it is the
pre-norm residual above, and its drop-path rates line up with it: the mixer output of layer i is
dropped with probability linspace(0, drop_path_rate, depth)[i].

The state dict has exactly the official module's keys and shapes (cls_token, pos_embed,
patch_embed.proj, head, layers.i.mixer.* with BiMamba's mamba_ssm names, layers.i.norm, norm_f),
so the released checkpoints load with strict=True (read them with
`ms_temba.checkpoint.read_state_dict`, which unwraps their {"model": ..., "model_ema": ...}). A
checkpoint of another grid (the stride-16 weights into a stride-8 model) loads after
`resize_pos_embed`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ms_temba.errors import ConfigFieldError
from ms_temba.mamba import BiMamba, RMSNorm
from ms_temba.registry import register_model

__all__ = ["VimConfig", "VisionMamba", "PatchEmbed", "VimBlock", "resize_pos_embed", "patch_grid"]


@dataclasses.dataclass
class VimConfig:
    """Hyper-parameters of Vision Mamba. The defaults are Vim-tiny at 224 x 224 (ImageNet)."""

    img_size: int | tuple[int, int] = 224  # the (height, width) every input image must have
    patch_size: int = 16
    # < patch_size: overlapping patches, the finer "stride 8" variants. None: patch_size (the patches
    # tile the image), kept None so that overriding patch_size alone moves the stride with it.
    stride: int | None = None
    channels: int = 3
    num_classes: int = 1000  # 0: no head, `forward` returns the features
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    drop_rate: float = 0.0  # dropout after the position embedding
    drop_path_rate: float = 0.1  # stochastic depth of the last layer (linear from 0 at the first)
    residual_in_fp32: bool = True  # keep the residual stream in (at least) fp32 under half precision

    def __post_init__(self):
        pair = (self.img_size, self.img_size) if isinstance(self.img_size, numbers.Integral) else self.img_size
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__iter__") or len(tuple(pair)) != 2:
            raise ConfigFieldError("VimConfig", "img_size", f"must be an int or a (height, width) pair, "
                                                            f"got {self.img_size!r}")
        # A tuple, so that the config compares and round-trips through dataclasses.asdict.
        self.img_size = tuple(_positive_int("img_size", side) for side in pair)
        for key in ("patch_size", "channels", "embed_dim", "depth", "d_state", "d_conv", "expand"):
            setattr(self, key, _positive_int(key, getattr(self, key)))
        if self.stride is not None:
            self.stride = _positive_int("stride", self.stride)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral) \
                or self.num_classes < 0:
            raise ConfigFieldError("VimConfig", "num_classes", f"must be an int >= 0, got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if self.patch_size > min(self.img_size):
            raise ConfigFieldError("VimConfig", "patch_size",
                                   f"({self.patch_size}) is larger than the image {self.img_size}")
        for key in ("drop_rate", "drop_path_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
                raise ConfigFieldError("VimConfig", key, f"must be in [0, 1), got {value!r}")
            setattr(self, key, float(value))
        if not isinstance(self.residual_in_fp32, bool):
            raise ConfigFieldError("VimConfig", "residual_in_fp32", f"must be a bool, got {self.residual_in_fp32!r}")

    @property
    def patch_stride(self) -> int:
        """Pixels between the starts of neighbouring patches."""
        return self.patch_size if self.stride is None else self.stride

    @property
    def grid_size(self) -> tuple[int, int]:
        return patch_grid(self.img_size, self.patch_size, self.patch_stride)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigFieldError("VimConfig", key, f"must be a positive int, got {value!r}")
    return int(value)


def patch_grid(img_size: tuple[int, int], patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of patches a patch_size kernel at `stride` fits in an image (no padding)."""
    return tuple((side - patch_size) // stride + 1 for side in img_size)


class PatchEmbed(nn.Module):
    """Images (batch, channels, H, W) -> patch tokens (batch, rows * cols, embed_dim), row-major:
    one Conv2d whose kernel is the patch and whose stride may be smaller than it (overlapping
    patches). timm's PatchEmbed has no separate stride, hence this one; same `proj` name."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, stride: int, channels: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.grid_size = patch_grid(img_size, patch_size, stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class VimBlock(nn.Module):
    """One pre-norm residual layer: residual + drop_path(BiMamba(RMSNorm(residual))).

    The residual arrives in (at least) fp32 when the model keeps it so; the norm reads it in its
    own weight's dtype (the model's), so under half precision only the residual stream stays fp32.
    """

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int, drop_path: float):
        super().__init__()
        # mixer before norm: the official module's registration order, hence its state-dict order.
        self.mixer = BiMamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.norm = RMSNorm(dim)
        if drop_path > 0:
            # Imported here: timm takes seconds to import, and only a Vim in training needs it.
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return residual + self.drop_path(hidden)


class VisionMamba(nn.Module):
    """Vision Mamba; see the module docstring. Build it with `ms_temba.create_model("vim_tiny")`."""

    def __init__(self, config: VimConfig | None = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else VimConfig()
        self.config = config
        dim = config.embed_dim

        # The official registration order (parameters, then patch_embed, head, layers, norm_f), so
        # that state_dict() lists the keys in the order of the released checkpoints.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
        # Vim leaves them out of weight decay (`no_weight_decay`, which timm's optimizer factory reads).
        self.cls_token._no_weight_decay = True
        self.pos_embed._no_weight_decay = True
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.patch_stride, config.channels, dim)
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        # Python floats, not torch.linspace: a model built on the meta device has no values to read.
        drop_path_rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.layers = nn.ModuleList([
            VimBlock(dim, config.d_state, config.d_conv, config.expand, rate) for rate in drop_path_rates
        ])
        self.norm_f = RMSNorm(dim)
        # Where the class token goes: the middle of the patch sequence.
        self.cls_position = config.num_patches // 2
        self._init_weights()

    def no_weight_decay(self) -> set[str]:
        """timm's convention (create_optimizer_v2 reads it): names of parameters spared weight decay,
        Vim's list: this module's own parameters marked `_no_weight_decay` (pos_embed, cls_token).
        The mixers' A_log and D carry mamba_simple's mark too, but Vim's training decays them (its
        list names only the model's own tokens), so nested modules' marks are not followed here."""
        return {name for name, parameter in self.named_parameters(recurse=False)
                if getattr(parameter, "_no_weight_decay", False)}

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Vim's initialisation. The mixers keep mamba_simple's (BiMamba's own), except that each
        out_proj, the last op of a residual branch, is scaled by 1/sqrt(depth) (GPT-2's rescaling of
        prenorm residual branches) so that the residual stream's variance does not grow with depth."""
        from timm.layers import lecun_normal_  # here: timm takes seconds to import (see VimBlock)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            layer.mixer.out_proj.weight /= math.sqrt(self.config.depth)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden state of every token: (batch, N + 1, embed_dim), the class
        token at index `cls_position` and the patch tokens around it in row-major order."""
        self._check_images(images)
        x = self.patch_embed(images)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        m = self.cls_position
        x = torch.cat([x[:, :m], cls_token, x[:, m:]], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        residual = x.to(_at_least_fp32(x.dtype)) if self.config.residual_in_fp32 else x
        for layer in self.layers:
            residual = layer(residual)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden state of the class token: (batch, embed_dim)."""
        return self.forward_tokens(images)[:, self.cls_position]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, num_classes); the features (batch, embed_dim) when num_classes is 0."""
        return self.head(self.forward_features(images))

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.config.channels, *self.config.img_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VisionMamba expects images of shape (batch, {', '.join(map(str, expected))}) "
                             f"(img_size is fixed at construction), got {shape}")


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    # fp32 as in Vim; a float64 model (the reference tests) keeps float64 rather than losing precision.
    return torch.promote_types(dtype, torch.float32)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int],
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A Vim position embedding (1, N + 1, D) for another patch grid: (1, rows * cols + 1, D).

    The patch embeddings are resampled bicubically over the grid (as DeiT / Vim fine-tune at another
    resolution); the class token's embedding, which in Vim sits at index N // 2 (the middle class
    token), is kept and put at the new middle. `old_grid` defaults to the square grid of N patches.
    Use it to load a stride-16 checkpoint into a stride-8 model:

        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], model.patch_embed.grid_size)
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"resize_pos_embed: pos_embed must be (1, patches + 1, dim), got {tuple(pos_embed.shape)}")
    num_patches = pos_embed.shape[1] - 1
    if old_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"resize_pos_embed: {num_patches} patches are not a square grid; pass old_grid")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"resize_pos_embed: old_grid {old_grid} does not hold the {num_patches} patches of pos_embed")
    if old_grid == new_grid:
        return pos_embed
    m = num_patches // 2
    cls_embed = pos_embed[:, m:m + 1]
    patches = torch.cat([pos_embed[:, :m], pos_embed[:, m + 1:]], dim=1)
    patches = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    # Bicubic in fp32 at least: half-precision interpolation is not available everywhere.
    patches = F.interpolate(patches.to(_at_least_fp32(patches.dtype)), size=new_grid, mode="bicubic",
                            align_corners=False).to(pos_embed.dtype)
    patches = patches.flatten(2).transpose(1, 2)
    new_m = patches.shape[1] // 2
    return torch.cat([patches[:, :new_m], cls_embed, patches[:, new_m:]], dim=1)


# ----------------------------------------------------------------------------------------------
# Registered variants (ms_temba.create_model); the official names are aliases
# ----------------------------------------------------------------------------------------------

_OFFICIAL = "patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


@register_model(VisionMamba, aliases=[f"vim_tiny_{_OFFICIAL}"])
def vim_tiny() -> VimConfig:
    """Vim-tiny: 192 wide, 24 layers, 16 x 16 patches (7 M parameters)."""
    return VimConfig(embed_dim=192)


@register_model(VisionMamba, aliases=[f"vim_small_{_OFFICIAL}"])
def vim_small() -> VimConfig:
    """Vim-small: 384 wide, 24 layers."""
    return VimConfig(embed_dim=384)


# Vim spells this one differently ("middle_cls_token").
@register_model(VisionMamba, aliases=[
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2"])
def vim_base() -> VimConfig:
    """Vim-base: 768 wide, 24 layers."""
    return VimConfig(embed_dim=768)


@register_model(VisionMamba, aliases=[f"vim_tiny_{_OFFICIAL.replace('patch16', 'patch16_stride8')}"])
def vim_tiny_stride8() -> VimConfig:
    """Vim-tiny over overlapping patches: 16 x 16 at stride 8, 27 x 27 = 729 patches at 224."""
    return VimConfig(embed_dim=192, stride=8)


@register_model(VisionMamba, aliases=[f"vim_small_{_OFFICIAL.replace('patch16', 'patch16_stride8')}"])
def vim_small_stride8() -> VimConfig:
    """Vim-small over 16 x 16 patches at stride 8."""
    return VimConfig(embed_dim=384, stride=8)


@register_model(VisionMamba)
def vim_base_stride8() -> VimConfig:
    """Vim-base over 16 x 16 patches at stride 8 (no official model of this name)."""
    return VimConfig(embed_dim=768, stride=8)
