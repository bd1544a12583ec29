"""Parquet feature shards: many videos per file, one row group per video, extractor metadata in the footer.

Layout of one shard (`write_shard`):

    video_id: string | index: int32 | start_s: float64 | end_s: float64 | feature: fixed_size_list<float32, dim>

one row per snippet, rows of one video contiguous and in time order, and exactly one row group per
video, so `FeatureStore.get` reads one video's row group and nothing else. Two JSON documents sit
in the file's key-value metadata:

    ms_temba.extractor  the extractor metadata (backbone, dim, fps, checkpoint sha256, ...); part of
                        the Arrow schema metadata too, so pq.read_schema / read_table show it
    ms_temba.video_ids  the video ids in row-group order (the index: video_id -> row group); added
                        to the footer when the file is closed, since the ids are known only then

A shard appears under its final name only once it is complete (written under a temporary name in
the same directory, flushed to disk, then renamed: `extractors.files.atomic_path`), so the set of
shards present is the record of finished work. Videos that failed are listed in `failures.jsonl`
next to the shards, one `failure_record` per line (`write_failures`, also for `ms-temba predict`).

Features are valid only for the file they were computed from: `sources.json` next to the shards
records each video's source file ({video_id: extractors.files.file_identity}), and a writer that
resumes into the directory first drops the stored videos whose file changed (`changed_sources`),
so a video replaced under the same name is computed again instead of being skipped as done.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extractors.files import atomic_path, file_identity, same_content

EXTRACTOR_METADATA_KEY = "ms_temba.extractor"
VIDEO_IDS_KEY = "ms_temba.video_ids"
FAILURES_FILE = "failures.jsonl"
SOURCES_FILE = "sources.json"
SHARD_SUFFIX = ".parquet"
# Keys that may differ between shards of one directory (everything else must agree).
_PROVENANCE_KEYS = frozenset({"package_version"})


@dataclass(frozen=True)
class VideoFeatures:
    """The features of one video: row t is the snippet covering [start_s[t], end_s[t]) seconds."""

    features: np.ndarray  # float32 (T, dim)
    start_s: np.ndarray  # float64 (T,)
    end_s: np.ndarray  # float64 (T,)

    def __post_init__(self) -> None:
        # Accept anything array-like (lists, torch CPU tensors) but store exactly these dtypes.
        features = np.asarray(self.features, dtype=np.float32)
        start_s = np.asarray(self.start_s, dtype=np.float64)
        end_s = np.asarray(self.end_s, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"VideoFeatures.features must be (T, dim), got shape {features.shape}")
        if start_s.shape != (len(features),) or end_s.shape != (len(features),):
            raise ValueError(f"VideoFeatures.start_s and end_s must be ({len(features)},) like features' "
                             f"first axis, got {start_s.shape} and {end_s.shape}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "start_s", start_s)
        object.__setattr__(self, "end_s", end_s)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return len(self.features)


def package_version() -> str:
    try:
        return importlib_metadata.version("ms-temba")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def shard_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("video_id", pa.string()),
        ("index", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("feature", pa.list_(pa.float32(), dim)),
    ])


def _video_table(video_id: str, video: VideoFeatures, schema: pa.Schema) -> pa.Table:
    count, dim = video.features.shape
    features = pa.FixedSizeListArray.from_arrays(pa.array(video.features.reshape(-1), pa.float32()), dim)
    return pa.Table.from_arrays([
        pa.array([video_id] * count, pa.string()),
        pa.array(np.arange(count, dtype=np.int32)),
        pa.array(video.start_s),
        pa.array(video.end_s),
        features,
    ], schema=schema)


def write_shard(path: str | os.PathLike, items: Iterable[tuple[str, VideoFeatures]],
                metadata: Mapping[str, Any]) -> int:
    """Write (video_id, VideoFeatures) pairs to one shard, one row group per video; returns the video count.

    `metadata` (JSON-serialisable, with at least "backbone" and "dim") goes into the footer, stamped
    with the package version. The file appears at `path` only when complete: an exception anywhere,
    including inside `items`, leaves neither `path` nor a temporary file behind.
    """
    path = Path(path)
    metadata = {**metadata, "package_version": metadata.get("package_version", package_version())}
    for key in ("backbone", "dim"):
        if key not in metadata:
            raise ValueError(f"shard metadata must contain {key!r}, got keys {sorted(metadata)}")
    dim = metadata["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"shard metadata 'dim' must be a positive integer, got {dim!r}")
    try:
        extractor_json = json.dumps(metadata, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"shard metadata must be JSON-serialisable: {error}") from error

    schema = shard_schema(dim).with_metadata({EXTRACTOR_METADATA_KEY: extractor_json})
    video_ids: list[str] = []
    # The temporary file's leading dot and suffix keep it out of FeatureStore's "*.parquet" listing;
    # fsync: on disk before it gets the final name, even if the machine dies.
    with atomic_path(path, fsync=True) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        for video_id, video in items:
            if not isinstance(video_id, str) or not video_id:
                raise ValueError(f"video ids must be non-empty strings, got {video_id!r}")
            if video_id in video_ids:
                raise ValueError(f"video {video_id!r} appears twice in shard {path}")
            if not isinstance(video, VideoFeatures):
                raise TypeError(f"video {video_id!r}: expected VideoFeatures, got {type(video).__name__}")
            if len(video) == 0:
                raise ValueError(f"video {video_id!r} has no features (T == 0); a row group needs rows")
            if video.dim != dim:
                raise ValueError(f"video {video_id!r} has feature dim {video.dim}, shard metadata says {dim}")
            table = _video_table(video_id, video, schema)
            writer.write_table(table, row_group_size=len(table))  # exactly one row group per video
            video_ids.append(video_id)
        writer.add_key_value_metadata({VIDEO_IDS_KEY: json.dumps(video_ids)})
    return len(video_ids)


def _read_footer(path: Path) -> tuple[dict[str, Any], list[str], pq.FileMetaData]:
    """(extractor metadata, video ids in row-group order, parquet footer) of one shard."""
    try:
        footer = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path} is not a readable Parquet shard: {error}") from error
    key_values = footer.metadata or {}
    if EXTRACTOR_METADATA_KEY.encode() not in key_values or VIDEO_IDS_KEY.encode() not in key_values:
        raise ValueError(f"{path} is not a feature shard (no {EXTRACTOR_METADATA_KEY!r} / {VIDEO_IDS_KEY!r} metadata)")
    extractor = json.loads(key_values[EXTRACTOR_METADATA_KEY.encode()])
    video_ids = json.loads(key_values[VIDEO_IDS_KEY.encode()])
    if len(video_ids) != footer.num_row_groups:
        raise ValueError(f"{path}: {len(video_ids)} video ids but {footer.num_row_groups} row groups")
    return extractor, video_ids, footer


def _comparable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key not in _PROVENANCE_KEYS}


def metadata_mismatch(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    """Keys (other than provenance like the package version) whose values differ, e.g. ["dim"]."""
    first, second = _comparable(first), _comparable(second)
    return sorted(key for key in first.keys() | second.keys() if first.get(key) != second.get(key))


def read_failures(shards_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(shards_dir) / FAILURES_FILE
    if not path.exists():
        return []
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`.<name>.<random>.tmp`) a killed writer left in `directory`.

    Call it only from the one process that writes the directory (a stage run, an import), before
    it writes anything: another writer's files in progress look the same. Returns what it removed.
    """
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def failure_record(video_id: str, path: str | os.PathLike, error: BaseException | str,
                   message: str = "") -> dict[str, str]:
    """One line of failures.jsonl: {"video_id", "path", "error_type", "message"}, for the exception
    `error` (its type's name and its text), or for an error type's name `error` and its `message`."""
    if isinstance(error, BaseException):
        error, message = type(error).__name__, str(error)
    return {"video_id": video_id, "path": os.fspath(path), "error_type": error, "message": message}


def write_failures(directory: str | os.PathLike, failures: Iterable[Mapping[str, Any]]) -> None:
    """Replace `directory`/failures.jsonl atomically with `failures` (failure_record dicts), one JSON
    object per line; no failures remove the file (an old record would mislead)."""
    path = Path(directory) / FAILURES_FILE
    lines = "".join(json.dumps(dict(failure), sort_keys=True) + "\n" for failure in failures)
    if not lines:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as temporary:
        temporary.write_text(lines)


def read_sources(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The source-file record of a shard directory ({video_id: file_identity}); {} if there is none
    (or it cannot be read: every stored video then counts as of unknown origin)."""
    path = Path(directory) / SOURCES_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_sources(directory: str | os.PathLike, record: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace `directory`/sources.json atomically with `record` (left alone when it says the same)."""
    if read_sources(directory) == record:
        return
    with atomic_path(Path(directory) / SOURCES_FILE) as temporary:
        temporary.write_text(json.dumps(record, sort_keys=True, indent=1) + "\n")


def changed_sources(directory: str | os.PathLike, paths: Mapping[str, str | os.PathLike],
                    stored: Iterable[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(the stored videos of `paths` ({video_id: source file}) whose features are stale, the source
    record to write once they are out of the store).

    A stored video is stale when its file's content (size, sha256) differs from the record in
    `directory`, or when the record has no entry for it (features of unknown origin). A file is
    hashed only when its size or modification time differ from the record, so an unchanged file is
    not read and a file rewritten with the same bytes (a regenerated dataset, `touch`) is not stale.
    A file that cannot be read is left as it is (its features and its record stay; extracting it
    fails and is recorded as a failure). Entries of videos not in `paths` are kept.

    The caller removes the stale videos from the store, then writes the record (`write_sources`):
    in that order, a run killed in between still finds them stale, or already gone, when resumed.
    """
    recorded = read_sources(directory)
    record = dict(recorded)
    stored = set(stored)
    stale = []
    for video_id, path in sorted(paths.items()):
        known = recorded.get(video_id)
        try:
            identity = file_identity(path, known if isinstance(known, dict) else None)
        except OSError:
            continue
        record[video_id] = identity
        if video_id in stored and not same_content(known, identity):
            stale.append(video_id)
    return stale, record


class FeatureStore:
    """Read access to a directory of shards: `get(video_id)` reads just that video's row group."""

    def __init__(self, shards_dir: str | os.PathLike):
        self.shards_dir = Path(shards_dir)
        if not self.shards_dir.is_dir():
            raise FileNotFoundError(f"feature directory {self.shards_dir} does not exist")
        self._location: dict[str, tuple[Path, int]] = {}  # video_id -> (shard, row group)
        self.metadata: dict[str, Any] = {}
        first_shard = None
        for shard in sorted(self.shards_dir.glob(f"*{SHARD_SUFFIX}")):
            extractor, video_ids, _ = _read_footer(shard)
            if first_shard is None:
                first_shard, self.metadata = shard, extractor
            elif differing := metadata_mismatch(self.metadata, extractor):
                raise ValueError(
                    f"shards in {self.shards_dir} come from different extractors: {first_shard.name} and "
                    f"{shard.name} differ in {differing} "
                    f"({ {k: self.metadata.get(k) for k in differing} } vs { {k: extractor.get(k) for k in differing} })")
            for row_group, video_id in enumerate(video_ids):
                if video_id in self._location:
                    raise ValueError(f"video {video_id!r} is stored twice: in {self._location[video_id][0].name} "
                                     f"and {shard.name}")
                self._location[video_id] = (shard, row_group)

    @property
    def video_ids(self) -> list[str]:
        return sorted(self._location)

    @property
    def dim(self) -> int | None:
        return self.metadata.get("dim")

    @property
    def failures(self) -> list[dict[str, Any]]:
        return read_failures(self.shards_dir)

    def shard_of(self, video_id: str) -> Path:
        return self._locate(video_id)[0]

    def _locate(self, video_id: str) -> tuple[Path, int]:
        try:
            return self._location[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in the feature shards of {self.shards_dir}") from None

    def get(self, video_id: str) -> VideoFeatures:
        shard, row_group = self._locate(video_id)
        table = pq.ParquetFile(shard).read_row_group(row_group)
        return _to_video_features(table, video_id, shard)

    def __iter__(self) -> Iterator[tuple[str, VideoFeatures]]:
        """(video_id, VideoFeatures) in sorted id order, one row group in memory at a time."""
        for video_id in self.video_ids:
            yield video_id, self.get(video_id)

    def __len__(self) -> int:
        return len(self._location)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._location


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, VideoFeatures]]:
    """(video_id, VideoFeatures) of one shard file in row-group order, one row group at a time."""
    path = Path(path)
    _, video_ids, _ = _read_footer(path)
    parquet = pq.ParquetFile(path)
    for row_group, video_id in enumerate(video_ids):
        yield video_id, _to_video_features(parquet.read_row_group(row_group), video_id, path)


def _to_video_features(table: pa.Table, video_id: str, shard: Path) -> VideoFeatures:
    stored_ids = table.column("video_id").unique().to_pylist()
    index = table.column("index").to_numpy()
    if stored_ids != [video_id] or not np.array_equal(index, np.arange(len(table))):
        raise ValueError(f"{shard}: the row group indexed for {video_id!r} holds {stored_ids} (corrupt shard index)")
    feature = table.column("feature").combine_chunks()
    dim = feature.type.list_size
    # flatten() honours the array's offset (unlike .values); zero-copy for float32 without nulls.
    features = feature.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)
    return VideoFeatures(features=features,
                         start_s=table.column("start_s").to_numpy(),
                         end_s=table.column("end_s").to_numpy())
