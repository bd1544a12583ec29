"""The per-video prediction files of `ms-temba predict` (pipelines.tools.predict): their names and
columns, written and read here for every module that uses them (export, the viewer, detections).

    {video}.probs.parquet    index, start_s, end_s, one float32 column per class (probabilities);
                             the schema metadata holds the class names (CLASS_NAMES_KEY) and what
                             produced the file (RUN_KEY: predict's record, so a rerun can skip it)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.io import write_parquet

if TYPE_CHECKING:
    from extractors.shards import VideoFeatures

PROBS_SUFFIX = ".probs.parquet"
CLASS_NAMES_KEY = "ms_temba.class_names"  # JSON list in the probs file's schema metadata
RUN_KEY = "ms_temba.predict_run"  # JSON of what produced the file (pipelines.tools.predict.run_record)


def probability_columns(class_names: list[str]) -> list[str]:
    """Column names of the class probabilities: the class names when they are unique and do not
    clash with the time columns, else class_0, class_1, ..."""
    reserved = {"index", "start_s", "end_s"}
    if len(set(class_names)) == len(class_names) and not reserved & set(class_names):
        return list(class_names)
    return [f"class_{i}" for i in range(len(class_names))]


def write_probabilities(path: Path, video: VideoFeatures, probs: np.ndarray, class_names: list[str],
                        record: dict[str, Any] | None = None) -> None:
    columns = {"index": pa.array(np.arange(len(video), dtype=np.int32)),
               "start_s": pa.array(video.start_s), "end_s": pa.array(video.end_s)}
    for i, name in enumerate(probability_columns(class_names)):
        columns[name] = pa.array(probs[:, i].astype(np.float32))
    metadata = {CLASS_NAMES_KEY: json.dumps(class_names)}
    if record is not None:
        metadata[RUN_KEY] = json.dumps(record, sort_keys=True)
    table = pa.table(columns).replace_schema_metadata(metadata)
    write_parquet(path, table)


def read_probabilities(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(probs (T, C), start_s (T,), end_s (T,), class names) of a {video}.probs.parquet file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    if CLASS_NAMES_KEY.encode() not in metadata:
        raise ValueError(f"{path} is not a prediction file of `ms-temba predict` (no {CLASS_NAMES_KEY!r} metadata)")
    class_names = json.loads(metadata[CLASS_NAMES_KEY.encode()])
    columns = probability_columns(class_names)
    probs = np.stack([table.column(c).to_numpy() for c in columns], axis=1) if columns else np.empty((len(table), 0))
    return probs, table.column("start_s").to_numpy(), table.column("end_s").to_numpy(), class_names
