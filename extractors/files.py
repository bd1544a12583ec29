"""Files written whole or not at all, and file digests: the one implementation of each, used by the
extractors (shards, failure records, checkpoint provenance, the source files of features) and the
pipelines (`pipelines.io`, model files, predictions), which import it from here (extractors never
import the pipelines).

A file written through `atomic_path` appears under its final name only complete: it is written
under a temporary name in the same directory (`.<name>.<random hex>.tmp`, so os.replace is an
atomic rename, and the leading dot keeps it out of "*.parquet"-style listings), then renamed; on
any exception the temporary file is removed and an existing file at the final name is left as it
was. `extractors.shards.remove_stale_temporaries` deletes what a killed writer leaves behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path` (its directory is created); when the block ends
    without an exception, rename what was written there to `path` (atomic on POSIX).

    fsync: flush the file to disk before the rename, so that after a machine crash `path` is
    either the old file or the complete new one (not an empty or partial file under the new name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        if fsync:
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"bytes", "mtime_ns", "sha256"} of a file. The sha256 is taken from `known` (an earlier
    identity of the file) when size and modification time are both unchanged, so an unchanged file
    is not read again; otherwise the file is hashed. OSError if the file cannot be read."""
    stat = os.stat(path)
    if (known and known.get("sha256") and known.get("bytes") == stat.st_size
            and known.get("mtime_ns") == stat.st_mtime_ns):
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": known["sha256"]}
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def same_content(identity: Mapping[str, Any] | None, other: Mapping[str, Any] | None) -> bool:
    """Whether two file_identity records describe the same bytes (the modification time aside)."""
    return (isinstance(identity, Mapping) and isinstance(other, Mapping) and bool(identity.get("sha256"))
            and identity.get("sha256") == other.get("sha256") and identity.get("bytes") == other.get("bytes"))
