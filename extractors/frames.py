"""Per-frame backbones: an image network embeds every frame, and windows of frames are averaged.

CLIP (`extractors.clip`) and Vim (`extractors.vim`) differ only in `embed`, how a batch of frames
becomes embeddings; this class owns the rest. The embeddings of frames [j * w, (j + 1) * w) are
averaged into feature j, w = `window`; the last window may be shorter, so n frames give
ceil(n / w) features. Frames go through the network cfg.batch_size at a time, and only the frames of
the next batch and the embeddings of the unfinished window are held.
"""
from __future__ import annotations

import abc
import math
from typing import Iterator

import numpy as np
import torch

from extractors.base import FeatureBatch, FeatureExtractor, FrameBuffer


class FrameEmbeddingExtractor(FeatureExtractor):
    """A FeatureExtractor whose features are means of per-frame embeddings over `window` frames.
    Subclasses implement `embed` and the `window` property (the config field that holds it)."""

    @property
    @abc.abstractmethod
    def window(self) -> int:
        """Frames averaged into one feature."""

    @abc.abstractmethod
    def embed(self, frames: np.ndarray) -> torch.Tensor:
        """Embeddings (n, dim) of uint8 (n, H, W, 3) frames, in float32."""

    def hop_frames(self) -> int:
        return self.window

    def num_features(self, num_frames: int) -> int:
        return math.ceil(max(num_frames, 0) / self.window)

    def frame_embeddings(self, frame_chunks: Iterator[np.ndarray]) -> Iterator[torch.Tensor]:
        """Embeddings (k, dim) of the stream's frames in order, cfg.batch_size frames per forward pass."""
        batch_size = self.cfg.batch_size
        pending = FrameBuffer()  # decoded frames not yet through the network
        for frames in frame_chunks:
            pending.append(frames)
            while len(pending) >= batch_size:
                yield self.embed(pending.take(pending.start, pending.start + batch_size))
                pending.discard_before(pending.start + batch_size)
        if len(pending):  # the stream has ended: the last, smaller batch
            yield self.embed(pending.take(pending.start, pending.end))

    def iter_features(self, frame_chunks: Iterator[np.ndarray]) -> Iterator[FeatureBatch]:
        window = self.window
        held = torch.empty(0, self.dim, dtype=torch.float64)  # embeddings of frames [first, first + len(held))
        first = 0
        for embeddings in self.frame_embeddings(frame_chunks):
            held = torch.cat([held, embeddings.cpu().double()])  # averaged in float64: windows can be long
            complete = len(held) // window * window
            if complete:
                yield self._window_means(held[:complete], first)
                held, first = held[complete:], first + complete
        if len(held):  # the last, shorter window
            yield self._window_means(held, first)

    def _window_means(self, embeddings: torch.Tensor, first: int) -> FeatureBatch:
        """Means of consecutive windows of the embeddings of frames first, first + 1, ...; the last may be short."""
        window = self.window
        windows = torch.split(embeddings, window)
        features = torch.stack([frames.mean(dim=0) for frames in windows]).float().numpy()
        starts = first + window * np.arange(len(windows), dtype=np.int64)
        stops = np.minimum(starts + window, first + len(embeddings))
        return features, np.stack([starts, stops], axis=1)
