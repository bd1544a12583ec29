"""The stages' output files, written whole or not at all (`extractors.files.atomic_path`: a killed
stage never leaves a half-written output, only a temporary file that its rerun removes with
`remove_stale_temporaries_of`), and the stages' logging."""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from extractors.files import atomic_path


def write_json(path: str | os.PathLike, value: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_csv(path: str | os.PathLike, rows: list[dict], columns: Sequence[str]) -> None:
    """`rows` as CSV with `columns` (other keys of a row are left out), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def remove_stale_temporaries_of(*paths: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`.<name>.<random hex>.tmp`, see atomic_path) that a writer killed
    inside an atomic write left next to each of `paths`; returns what it removed. Call it from the
    one process that writes these files, before it writes them."""
    removed = []
    for path in map(Path, paths):
        for temporary in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if temporary.is_file():
                temporary.unlink(missing_ok=True)
                removed.append(temporary)
    return removed


def setup_logging(stage: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{stage}] %(message)s", datefmt="%H:%M:%S")
    return logging.getLogger(f"pipelines.{stage}")
