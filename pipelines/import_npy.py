"""Import per-video `.npy` features (the MS-TCT / MS-Temba release format) into feature shards.

Each `<video_id>.npy` holds one video's features, (T, D) or (T, 1, 1, D), of a real numeric
dtype. Feature t is taken to cover [t * hop_s, t * hop_s + window_s) seconds (window_s defaults
to hop_s), which is all the label builder needs. The shards are written with
extractors.shards.write_shard, so the train and evaluate stages read imported and extracted
features alike.

    ms-temba import-npy --src DIR --out data/charades/shards --hop-s 0.333 [--fps 24]

Reliability (docs/reliability.md):

* A file that cannot be imported (unreadable, empty, not an array, a string or complex dtype, a
  wrong shape, NaN/inf, values beyond float32's range, another dim than the others) is listed in
  `failures.jsonl` (written as each failure happens) and the other files are imported.
* Resuming. Sorted ids are cut into groups of `videos_per_shard`, group g -> `npy-{g:05d}.parquet`
  (written atomically). A rerun with the same settings keeps every shard that holds exactly its
  group and whose .npy files are the ones it was imported from, and imports only the other
  groups; temporary files of a killed run are removed. `sources.json` records each .npy file's
  size, modification time and sha256 (extractors.shards.changed_sources): a group with a file
  replaced under the same name (other content), or with no record, is imported again; a file
  rewritten with the same bytes is not (only files whose size or time changed are hashed again).
  `import_npy.json` says `"complete": false` until the run has finished.
* Re-importing with other settings (`--hop-s`, `--window-s`, `--fps`, another source folder) into
  a folder of imported shards replaces the whole store: the new one is built next to it (in
  `.<name>.import.tmp`, itself resumable) and swapped in when complete, so a store is never half
  old, half new. A folder holding shards of another extractor (e.g. extracted I3D features) is
  refused.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from extractors.shards import SHARD_SUFFIX, VideoFeatures, _read_footer, changed_sources, failure_record, \
    remove_stale_temporaries, write_failures, write_shard, write_sources
from pipelines.io import write_json

SHARD_PATTERN = "npy-{:05d}.parquet"
STAMP_FILE = "import_npy.json"
# Shard metadata that describes what the features are (the rest, dim and package version, follows).
_SETTINGS_KEYS = ("backbone", "source_dir", "hop_s", "window_s", "fps")


class NpyImportError(ValueError):
    """The import as a whole cannot go ahead (the message says why and what to do)."""

    user_error = True  # one line and exit 2 from the command line (pipelines/process.py)


def load_npy_features(path: str | os.PathLike) -> np.ndarray:
    """(T, D) float32 from a .npy of shape (T, D) or (T, 1, 1, D); ValueError naming the file otherwise."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as error:  # EOFError (empty file), ValueError (pickled / not .npy), OSError, ...
        reason = str(error) or type(error).__name__
        raise ValueError(f"{path}: not a readable .npy array ({type(error).__name__}: {reason})") from error
    if not isinstance(array, np.ndarray):  # an .npz archive loads as a mapping of arrays
        raise ValueError(f"{path}: expected one array, got {type(array).__name__} (an .npz archive?)")
    if array.dtype.kind == "c":
        raise ValueError(f"{path}: complex features ({array.dtype}); casting to float32 would drop the imaginary part")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{path}: features must be real numbers, got dtype {array.dtype}")
    if array.ndim == 4 and array.shape[1:3] == (1, 1):
        array = array[:, 0, 0, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path}: expected features of shape (T, D) or (T, 1, 1, D) with T, D > 0, got {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        features = array.astype(np.float32, copy=False)
    # Checked after the cast: a finite float64 beyond float32's range becomes inf in the shard.
    if not np.isfinite(features).all():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"{path}: features contain NaN or inf")
        largest = float(np.abs(array.astype(np.float64)).max())
        raise ValueError(f"{path}: values beyond float32's range (largest magnitude {largest:.3g}, "
                         f"float32 max {np.finfo(np.float32).max:.3g})")
    return features


def _settings(src_dir: Path, hop_s: float, window_s: float, fps: float | None) -> dict[str, Any]:
    return {"backbone": "npy", "source_dir": os.fspath(src_dir.resolve()), "hop_s": hop_s, "window_s": window_s,
            "fps": fps}


def _existing_shards(directory: Path) -> dict[str, tuple[dict | None, list[str]]]:
    """{shard file name: (its extractor metadata or None if unreadable, its video ids)}."""
    shards = {}
    if directory.is_dir():
        for path in sorted(directory.glob(f"*{SHARD_SUFFIX}")):
            try:
                metadata, video_ids, _ = _read_footer(path)
            except ValueError:
                metadata, video_ids = None, []
            shards[path.name] = (metadata, video_ids)
    return shards


def _exchange(first: Path, second: Path) -> None:
    """Swap two directories: atomically with Linux's renameat2(RENAME_EXCHANGE), else by two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
            return
    except (OSError, AttributeError):  # not glibc, or a glibc without renameat2
        pass
    aside = second.with_name(f".{second.name}.old.tmp")
    os.rename(second, aside)
    os.rename(first, second)
    os.rename(aside, first)


def import_npy(src_dir: str | Path, out_dir: str | Path, hop_s: float, fps: float | None = None,
               window_s: float | None = None, video_ids: Iterable[str] | None = None,
               videos_per_shard: int = 16, show_progress: bool = True) -> tuple[int, list[dict]]:
    """Write the .npy features of `video_ids` (default: every .npy in src_dir) as shards in out_dir.

    Returns (videos in the shards, failures); files that could not be imported are listed in
    out_dir/failures.jsonl. Resumes a killed import, replaces an import of other settings (see
    the module docstring).
    """
    if not hop_s > 0:
        raise NpyImportError(f"hop_s must be > 0, got {hop_s}")
    if not (isinstance(videos_per_shard, int) and videos_per_shard > 0):
        raise NpyImportError(f"videos_per_shard must be a positive integer, got {videos_per_shard!r}")
    window_s = hop_s if window_s is None else window_s
    if not window_s > 0:
        raise NpyImportError(f"window_s must be > 0, got {window_s}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"feature folder {src_dir} does not exist")
    if video_ids is None:
        video_ids = [path.stem for path in sorted(src_dir.glob("*.npy"))]
    video_ids = sorted(video_ids)
    settings = _settings(src_dir, hop_s, window_s, fps)

    # Where to write: out_dir itself (empty, or shards of these settings: resume), or a staging
    # folder next to it that replaces it at the end (shards of other import settings).
    staging = out_dir.with_name(f".{out_dir.name}.import.tmp")
    shutil.rmtree(out_dir.with_name(f".{out_dir.name}.old.tmp"), ignore_errors=True)
    existing = _existing_shards(out_dir)
    foreign = sorted({m.get("backbone") for m, _ in existing.values() if m is not None} - {"npy"})
    if foreign:
        raise NpyImportError(f"{out_dir} holds features of another extractor ({', '.join(map(str, foreign))}), "
                             f"not imported .npy features: choose another --out, or delete {out_dir} first")
    same = all({k: m.get(k) for k in _SETTINGS_KEYS} == settings for m, _ in existing.values() if m is not None)
    target = out_dir if same else staging
    if target is out_dir:
        shutil.rmtree(staging, ignore_errors=True)  # a replacement that was abandoned
    else:
        existing = _existing_shards(staging)
        if not all({k: m.get(k) for k in _SETTINGS_KEYS} == settings for m, _ in existing.values() if m is not None):
            shutil.rmtree(staging)
            existing = {}
    target.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)

    groups = [video_ids[start:start + videos_per_shard] for start in range(0, len(video_ids), videos_per_shard)]
    planned = {SHARD_PATTERN.format(g): group for g, group in enumerate(groups)}
    # Shards that do not hold exactly their group (other grouping, other video set, unreadable) or
    # hold a video whose .npy file changed go first, so the store never holds a video twice or a
    # stale one. Then the files are recorded (a kill in between finds the same shards to redo).
    stale, sources = changed_sources(target, {video_id: src_dir / f"{video_id}.npy" for video_id in video_ids},
                                     [video_id for _, stored_ids in existing.values() for video_id in stored_ids])
    done = set()
    for name, (_, stored_ids) in existing.items():
        if planned.get(name) == stored_ids and not set(stored_ids) & set(stale):
            done.add(name)
        else:
            (target / name).unlink()
    write_sources(target, sources)
    dims = {existing[name][0].get("dim") for name in done}
    dim = dims.pop() if len(dims) == 1 else None
    stamp = target / STAMP_FILE
    write_json(stamp, {"complete": False, "settings": settings})

    failures: list[dict] = []
    write_failures(target, failures)
    imported = sum(len(planned[name]) for name in done)
    progress = tqdm(total=len(video_ids), initial=imported, desc="import-npy", unit="video",
                    disable=not show_progress)
    # One shard's worth of videos in memory at a time (a whole Charades would not fit).
    for name, group_ids in planned.items():
        if name in done:
            continue
        group: list[tuple[str, VideoFeatures]] = []
        for video_id in group_ids:
            path = src_dir / f"{video_id}.npy"
            try:
                features = load_npy_features(path)
                if dim is not None and features.shape[1] != dim:
                    raise ValueError(f"{path}: feature dim {features.shape[1]} differs from the other files' {dim}")
            except (OSError, ValueError) as error:
                failures.append(failure_record(video_id, path, error))
                write_failures(target, failures)  # on record as it happens, should the run be killed
                continue
            finally:
                progress.update()
            dim = features.shape[1]
            start_s = np.arange(len(features), dtype=np.float64) * hop_s
            group.append((video_id, VideoFeatures(features, start_s, start_s + window_s)))
        if group:
            write_shard(target / name, group, {**settings, "dim": dim})
            imported += len(group)
    progress.close()
    write_failures(target, failures)
    write_json(stamp, {"complete": True, "settings": settings})
    if target is not out_dir:  # swap the finished store in, then drop the old one
        if out_dir.exists():
            _exchange(staging, out_dir)
            shutil.rmtree(staging)
        else:
            os.rename(staging, out_dir)
    return imported, failures
