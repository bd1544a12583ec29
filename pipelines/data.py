"""Training and evaluation data: feature sequences with their per-feature labels, crops, batches.

A `Sequence` is one video: its features from the shards and labels built at the features' centre
times from the manifest's clean actions (pipelines.labels). Batches pad sequences at the end and
carry a mask (True = real feature), as MS-Temba expects.

An epoch's batches depend only on (seed, epoch): `training_batches` makes them in the calling
process, `TrainingBatches` is the same stream as a DataLoader dataset, read ahead by worker
processes. Under distributed training every rank draws the same global batches and keeps its own
part of each (`rank::world_size`); `Batch.share` says how much of the global batch's real frames
that part holds, which is how the loss is weighted to equal the loss of the global batch.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from pipelines.inference import standardize
from pipelines.labels import build_labels, feature_centres

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sequence:
    video_id: str
    features: np.ndarray  # float32 (T, D)
    labels: np.ndarray  # float32 (T, classes) in {0, 1}


@dataclass(frozen=True)
class Batch:
    features: torch.Tensor  # (B, T, D)
    labels: torch.Tensor  # (B, T, classes)
    mask: torch.Tensor  # (B, T) bool
    share: float = 1.0  # this batch's part of the real frames of its global batch (1 in one process)

    def pin_memory(self) -> "Batch":  # the DataLoader's pin_memory=True calls this
        return Batch(self.features.pin_memory(), self.labels.pin_memory(), self.mask.pin_memory(), self.share)


def load_sequences(rows: list[dict], store, num_classes: int) -> list[Sequence]:
    """The sequences of the manifest `rows` that have features in `store` (others are logged and skipped)."""
    sequences, missing = [], []
    for row in rows:
        if row["video_id"] not in store:
            missing.append(row["video_id"])
            continue
        video = store.get(row["video_id"])
        labels = build_labels(feature_centres(video.start_s, video.end_s), np.asarray(row["action_class"]),
                              np.asarray(row["action_start_s"]), np.asarray(row["action_end_s"]), num_classes)
        sequences.append(Sequence(row["video_id"], video.features, labels))
    if missing:
        log.warning("%d videos of the manifest have no features (extraction failed?), skipped: %s%s",
                    len(missing), ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
    return sequences


def feature_statistics(sequences: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float32, std floored at 1e-6) over every feature of `sequences`."""
    features = np.concatenate([s.features for s in sequences]).astype(np.float64)
    return features.mean(axis=0).astype(np.float32), np.maximum(features.std(axis=0), 1e-6).astype(np.float32)


def standardized(sequences: list[Sequence], mean: np.ndarray, std: np.ndarray) -> list[Sequence]:
    """The sequences with standardised features (pipelines.inference.standardize)."""
    return [Sequence(s.video_id, standardize(s.features, mean, std), s.labels) for s in sequences]


def split_train_val(video_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out round(N * val_fraction) videos (at least 1, at most N - 1) for model selection.

    Deterministic and independent of the order of `video_ids`: videos are ranked by a hash of
    (seed, video id), so adding a video to the data set moves no other video between the parts.
    """
    if len(video_ids) < 2:
        raise ValueError(f"need at least 2 training videos to hold out a validation part, got {len(video_ids)}")
    ranked = sorted(video_ids, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    num_val = min(max(1, round(len(video_ids) * val_fraction)), len(video_ids) - 1)
    return sorted(ranked[num_val:]), sorted(ranked[:num_val])


def collate(items: list[tuple[np.ndarray, np.ndarray]], share: float = 1.0) -> Batch:
    """Pad (features, labels) pairs at the end to the longest one."""
    length = max(len(features) for features, _ in items)
    dim, num_classes = items[0][0].shape[1], items[0][1].shape[1]
    features = torch.zeros(len(items), length, dim)
    labels = torch.zeros(len(items), length, num_classes)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, (f, y) in enumerate(items):
        features[i, :len(f)] = torch.tensor(f)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(f)] = True
    return Batch(features, labels, mask, share)


def epoch_crops(sequences: list[Sequence], batch_size: int, crop_length: int, seed: int,
                epoch: int) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """One epoch's global batches as lists of (features, labels) crops (views, nothing copied):
    sequences shuffled, each cropped to a random window of at most crop_length.

    The order and the crops depend only on (seed, epoch), so a resumed run sees exactly the batches
    an uninterrupted run would have seen, and every rank of a distributed run the same ones.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(sequences))
    for start in range(0, len(order), batch_size):
        items = []
        for index in order[start:start + batch_size]:
            sequence = sequences[index]
            offset = int(rng.integers(0, max(1, len(sequence.features) - crop_length + 1)))
            items.append((sequence.features[offset:offset + crop_length], sequence.labels[offset:offset + crop_length]))
        yield items


def rank_batch(items: list[tuple[np.ndarray, np.ndarray]], rank: int = 0, world_size: int = 1) -> Batch:
    """Rank `rank`'s part of a global batch: items rank, rank + world_size, ..., with its share of
    the real frames. A rank left without an item (a last batch smaller than world_size) gets one
    zero frame with share 0: it must still run forward and backward for the gradient all-reduce,
    and contributes nothing to it."""
    mine = items[rank::world_size]
    if not mine:
        features, labels = items[0]
        return collate([(np.zeros_like(features[:1]), np.zeros_like(labels[:1]))], share=0.0)
    return collate(mine, share=sum(len(f) for f, _ in mine) / sum(len(f) for f, _ in items))


def training_batches(sequences: list[Sequence], batch_size: int, crop_length: int, seed: int, epoch: int,
                     rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """One epoch's batches (epoch_crops), collated in this process; with world_size > 1, rank's part of each."""
    for items in epoch_crops(sequences, batch_size, crop_length, seed, epoch):
        yield rank_batch(items, rank, world_size)


class TrainingBatches(torch.utils.data.IterableDataset):
    """The batches of `epochs` in order, exactly those of training_batches, for a DataLoader that
    reads ahead (batch_size=None). With n workers, worker w collates global steps w, w + n, ...
    (each one walks the whole cheap crop stream, so the random draws stay those of one process) and
    the DataLoader takes the workers' batches in turn, which restores the order."""

    def __init__(self, sequences: list[Sequence], batch_size: int, crop_length: int, seed: int, epochs: Iterable[int],
                 rank: int = 0, world_size: int = 1):
        self.sequences, self.batch_size, self.crop_length, self.seed = sequences, batch_size, crop_length, seed
        self.epochs, self.rank, self.world_size = list(epochs), rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        index, count = (0, 1) if worker is None else (worker.id, worker.num_workers)
        step = 0
        for epoch in self.epochs:
            for items in epoch_crops(self.sequences, self.batch_size, self.crop_length, self.seed, epoch):
                if step % count == index:
                    yield rank_batch(items, self.rank, self.world_size)
                step += 1


def num_batches(num_sequences: int, batch_size: int) -> int:
    return -(-num_sequences // batch_size)
