"""Import per-video `.npy` features (the MS-TCT / MS-Temba release format) into feature shards.

Each `<video_id>.npy` holds one video's features, (T, D) or (T, 1, 1, D). Feature t is taken to
cover [t * hop_s, t * hop_s + window_s) seconds (window_s defaults to hop_s), which is all the
label builder needs. The shards are written with extractors.shards.write_shard, so the train and
evaluate stages read imported and extracted features alike.

    ms-temba import-npy --src DIR --out data/charades/shards --hop-s 0.333 [--fps 24]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from extractors.shards import VideoFeatures, write_failures, write_shard

SHARD_PATTERN = "npy-{:05d}.parquet"


def load_npy_features(path: str | Path) -> np.ndarray:
    """(T, D) float32 from a .npy of shape (T, D) or (T, 1, 1, D); ValueError naming the file otherwise."""
    array = np.load(path, allow_pickle=False)
    if array.ndim == 4 and array.shape[1:3] == (1, 1):
        array = array[:, 0, 0, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path}: expected features of shape (T, D) or (T, 1, 1, D) with T, D > 0, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: features contain NaN or inf")
    return array.astype(np.float32, copy=False)


def import_npy(src_dir: str | Path, out_dir: str | Path, hop_s: float, fps: float | None = None,
               window_s: float | None = None, video_ids: Iterable[str] | None = None,
               videos_per_shard: int = 16, show_progress: bool = True) -> tuple[int, list[dict]]:
    """Write the .npy features of `video_ids` (default: every .npy in src_dir) as shards in out_dir.

    Returns (videos imported, failures); unreadable files are listed in out_dir/failures.jsonl.
    """
    if not hop_s > 0:
        raise ValueError(f"hop_s must be > 0, got {hop_s}")
    window_s = hop_s if window_s is None else window_s
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"feature folder {src_dir} does not exist")
    if video_ids is None:
        video_ids = [path.stem for path in sorted(src_dir.glob("*.npy"))]
    video_ids = sorted(video_ids)
    out_dir.mkdir(parents=True, exist_ok=True)

    failures: list[dict] = []
    imported, dim, shard_index = 0, None, 0
    progress = tqdm(total=len(video_ids), desc="import-npy", unit="video", disable=not show_progress)
    # One shard's worth of videos in memory at a time (a whole Charades would not fit).
    for start in range(0, len(video_ids), videos_per_shard):
        group: list[tuple[str, VideoFeatures]] = []
        for video_id in video_ids[start:start + videos_per_shard]:
            path = src_dir / f"{video_id}.npy"
            try:
                features = load_npy_features(path)
                if dim is not None and features.shape[1] != dim:
                    raise ValueError(f"{path}: feature dim {features.shape[1]} differs from the other files' {dim}")
            except (OSError, ValueError) as error:
                failures.append({"video_id": video_id, "path": os.fspath(path), "error_type": type(error).__name__,
                                 "message": str(error)})
                continue
            finally:
                progress.update()
            dim = features.shape[1]
            start_s = np.arange(len(features), dtype=np.float64) * hop_s
            group.append((video_id, VideoFeatures(features, start_s, start_s + window_s)))
        if group:
            metadata = {"backbone": "npy", "dim": dim, "source_dir": os.fspath(src_dir.resolve()),
                        "hop_s": hop_s, "window_s": window_s, "fps": fps}
            write_shard(out_dir / SHARD_PATTERN.format(shard_index), group, metadata)
            shard_index += 1
            imported += len(group)
    progress.close()
    write_failures(out_dir, failures)
    return imported, failures
