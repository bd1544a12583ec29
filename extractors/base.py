"""What every feature extractor shares: the streaming loop, checkpoint files, the frame buffer.

    extractor = build_extractor(ExtractorConfig(backbone="i3d", weights="rgb_imagenet.pt"))  # backbones.py
    video = extractor.extract("video.mp4")        # VideoFeatures(features (T, dim), start_s, end_s)
    shard_metadata = extractor.metadata()          # what produced the features, for the shard footer

`FeatureExtractor` owns the loop: it decodes a *stream* of frame chunks
(`extractors.video.iter_frame_chunks`), hands them to its backbone's `iter_features`, and turns
each feature's frame span [first, last) into seconds through the frames' sample times. A backbone
keeps only the frames its current forward pass needs plus the overlap with the next one
(`FrameBuffer`), so an hour-long video never sits in memory whole. The backbones differ only in
how they turn the stream into features: I3D snippets or fully-convolutional windows
(`extractors.i3d`), CLIP per-frame embeddings averaged over windows (`extractors.clip`);
per-frame backbones share `extractors.frames`; `extractors.backbones` builds the one a config names.

Also here: checkpoint files (read, strict load with a readable error; their sha256 is recorded for
provenance). The device comes from `extractors.device`, the project's one resolver.
"""
from __future__ import annotations

import abc
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from extractors.config import ExtractorConfig
from extractors.device import resolve_device
from extractors.shards import VideoFeatures
from extractors.video import FrameChunk, center_crop, iter_frame_chunks, resize_short_side
# read_state_dict(path): the tensors of a checkpoint file (a torch-saved state dict, bare or wrapped as
# training scripts save it, or .safetensors), never running pickled code from it: a checkpoint is data.
from ms_temba.checkpoint import CheckpointError, read_state_dict

RANDOM_CHECKPOINT = "random"


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a backbone's weights came from, as recorded in the shard metadata."""

    source: str  # file name, "timm-hub:<model name>", or "random"
    sha256: str  # hex digest of the checkpoint file, "timm-hub:<model name>", or "random"
    pretrained: bool

    @classmethod
    def random(cls, what: str) -> "CheckpointInfo":
        # Features of an untrained network are noise; say so loudly rather than let them reach a shard quietly.
        warnings.warn(f"{what}: no weights given, using a RANDOMLY INITIALISED network; its features are "
                      f"meaningless for training (metadata records pretrained=False)", stacklevel=3)
        return cls(source=RANDOM_CHECKPOINT, sha256=RANDOM_CHECKPOINT, pretrained=False)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """model.load_state_dict(state) that fails with every missing, unexpected and mis-shaped key named."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{key} (checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
                        for key in set(expected) & set(state) if state[key].shape != expected[key].shape)
    problems = [f"{len(keys)} {what}: {_listing(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if keys]
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Streaming


class FrameBuffer:
    """The frames of a stream with global indices [start, end): new frames are appended at `end`,
    frames before a given index are dropped, and the buffer never holds more than that window."""

    def __init__(self) -> None:
        self.start = 0  # global index of self._frames[0]
        self._frames: np.ndarray | None = None
        self._keep_from = 0  # frames below this index are dropped, even ones not received yet

    @property
    def end(self) -> int:
        return self.start + (0 if self._frames is None else len(self._frames))

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, frames: np.ndarray) -> None:
        self._frames = frames if self._frames is None else np.concatenate([self._frames, frames])
        self.discard_before(self._keep_from)

    def discard_before(self, index: int) -> None:
        self._keep_from = max(self._keep_from, index)
        drop = min(max(self._keep_from - self.start, 0), len(self))
        if drop:
            self._frames = self._frames[drop:]
            self.start += drop

    def take(self, first: int, stop: int) -> np.ndarray:
        """Frames [first, stop); indices past the last received frame repeat it (callers ask for
        those only once the stream has ended, to pad the video's tail)."""
        if not self.start <= first < self.end:
            raise IndexError(f"frame {first} is not buffered (buffer holds [{self.start}, {self.end}))")
        indices = np.minimum(np.arange(first, stop), self.end - 1) - self.start
        return self._frames[indices]


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ceil_to_multiple(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of a backbone's weights and activations for extractor.precision on `device`.
    "auto": fp16 on CUDA (half the memory and time, within PRECISION_TOLERANCE of fp32), fp32 on
    CPU (which gains nothing from half precision and loses accuracy)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "float16", "bfloat16": how the shard metadata and the extract stage's stamp name a dtype."""
    return str(dtype).removeprefix("torch.")


# Features as they leave a backbone: (features (k, dim) float32, spans (k, 2) int64), where span row
# (first, stop) holds the global indices of the frames [first, stop) that feature stands for.
FeatureBatch = tuple[np.ndarray, np.ndarray]


class FeatureExtractor(abc.ABC):
    """A frozen backbone with its sampling rule. Subclasses set `backbone`, `model_name` and `dim`,
    and implement `iter_features`, `num_features` and `hop_frames`."""

    backbone: str
    model_name: str
    dim: int

    def __init__(self, cfg: ExtractorConfig, model: nn.Module, checkpoint: CheckpointInfo):
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.device = resolve_device(cfg.device, "extractor.device")
        self.dtype = compute_dtype(cfg.precision, self.device)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)

    @abc.abstractmethod
    def iter_features(self, frame_chunks: Iterator[np.ndarray]) -> Iterator[FeatureBatch]:
        """Consume uint8 (n, H, W, 3) frame chunks lazily; yield features with their frame spans, in order."""

    @abc.abstractmethod
    def num_features(self, num_frames: int) -> int:
        """How many features a video of num_frames (sampled) frames gives."""

    @abc.abstractmethod
    def hop_frames(self) -> int:
        """Frames between the starts of consecutive features."""

    def sampling_metadata(self) -> dict[str, Any]:
        """The config entries that shape this backbone's features (others are recorded as None)."""
        return {}

    def metadata(self) -> dict[str, Any]:
        cfg = self.cfg
        entries = {"mode": None, "snippet_len": None, "stride": None, "clip_window": None}
        entries.update(self.sampling_metadata())
        return {
            "backbone": self.backbone,
            "model_name": self.model_name,
            "checkpoint": self.checkpoint.source,
            "checkpoint_sha256": self.checkpoint.sha256,
            "pretrained": self.checkpoint.pretrained,
            "dim": self.dim,
            "fps": cfg.fps,
            "image_size": cfg.image_size,
            **entries,
            "hop_frames": self.hop_frames(),
            "feature_hop_s": None if cfg.fps is None else self.hop_frames() / cfg.fps,
            "precision": dtype_name(self.dtype),
        }

    def extract(self, path: str | os.PathLike) -> VideoFeatures:
        """Features of the video file at `path`, decoded chunk by chunk at cfg.fps and cfg.image_size."""
        cfg = self.cfg
        return self._extract_stream(iter_frame_chunks(path, cfg.fps, cfg.image_size, cfg.chunk_frames))

    def extract_frames(self, frames: np.ndarray, times_s: np.ndarray) -> VideoFeatures:
        """Features of in-memory RGB uint8 frames (n, H, W, 3) sampled at `times_s` (n,) seconds.
        Frames of another size are resized and centre-cropped to cfg.image_size as decoding would."""
        frames = np.asarray(frames)
        times_s = np.asarray(times_s, dtype=np.float64)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be RGB uint8 of shape (n, H, W, 3), got {frames.dtype} {frames.shape}")
        if len(frames) == 0:
            raise ValueError("frames is empty: need at least one frame")
        if times_s.shape != (len(frames),):
            raise ValueError(f"times_s must have shape ({len(frames)},) like frames, got {times_s.shape}")
        if not np.all(np.isfinite(times_s)) or np.any(np.diff(times_s) <= 0):
            raise ValueError("times_s must be finite and strictly increasing")
        size = self.cfg.image_size
        if frames.shape[1:3] != (size, size):
            frames = center_crop(resize_short_side(frames, size), size)
        return self._extract_stream([FrameChunk(frames=frames, times_s=times_s)])

    def _extract_stream(self, chunks: Iterable[FrameChunk]) -> VideoFeatures:
        times: list[np.ndarray] = []  # 8 bytes per frame: cheap to keep for the whole video

        def frames() -> Iterator[np.ndarray]:
            for chunk in chunks:
                times.append(np.asarray(chunk.times_s, dtype=np.float64))
                yield chunk.frames

        features, spans = [np.empty((0, self.dim), np.float32)], [np.empty((0, 2), np.int64)]
        with torch.inference_mode():
            for batch_features, batch_spans in self.iter_features(frames()):
                features.append(batch_features)
                spans.append(batch_spans)
        spans = np.concatenate(spans)
        start_s, end_s = self._span_seconds(spans, np.concatenate(times) if times else np.empty(0))
        return VideoFeatures(features=np.concatenate(features), start_s=start_s, end_s=end_s)

    def _span_seconds(self, spans: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame spans [first, stop) to seconds: from the first frame's time to the end of the last frame."""
        if len(spans) == 0:
            return np.empty(0), np.empty(0)
        if self.cfg.fps is not None:
            frame_period = 1.0 / self.cfg.fps
        elif len(times) >= 2:  # native sampling: the frames' own spacing
            frame_period = float(np.median(np.diff(times)))
        else:  # a single frame at an unknown rate has no measurable duration
            frame_period = 0.0
        return times[spans[:, 0]], times[spans[:, 1] - 1] + frame_period

    def _to_device(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
