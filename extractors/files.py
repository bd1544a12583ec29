"""Files written whole or not at all, and file digests: the one implementation of each, used by the
extractors (shards, failure records, checkpoint provenance) and the pipelines (`pipelines.io`, model
files, predictions), which import it from here (extractors never import the pipelines).

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
from typing import Iterator


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
