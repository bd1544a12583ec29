"""The stages' output files, written whole or not at all (`extractors.files.atomic_path`: a killed
stage never leaves a half-written output), and the stages' logging."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from extractors.files import atomic_path


def write_json(path: str | os.PathLike, value: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def setup_logging(stage: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{stage}] %(message)s", datefmt="%H:%M:%S")
    return logging.getLogger(f"pipelines.{stage}")
