"""Interop with the MS-TCT / MS-Temba research code: export predictions in its layout.

`ms-temba export-mstct SOURCE --out OUT [--format pickle|npy|both]` writes per-frame probabilities
in the layout the MS-TCT-style evaluation scripts read (and the official MS-Temba training script
writes as `{epoch}.pkl`):

    OUT/predictions.pkl   pickle of {video_id: np.ndarray float32 (classes, T)}  (classes first)
    OUT/{video_id}.npy    the same array, one file per video

SOURCE is either the evaluate stage's `reports/predictions.parquet` (columns video_id, index,
probabilities) or a directory of `ms-temba predict` outputs (`{video}.probs.parquet`).

The other direction, an official release checkpoint into a model file, is `ms-temba
convert-release` (pipelines.tools.convert_release).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from extractors.files import atomic_path

PICKLE_FILE = "predictions.pkl"
FORMATS = ("pickle", "npy", "both")


class ExportError(ValueError):
    """Predictions that cannot be exported; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# Reading predictions
# ----------------------------------------------------------------------------------------------

def read_predictions(source: str | os.PathLike) -> dict[str, np.ndarray]:
    """{video_id: probabilities (T, classes) float32} from an evaluate predictions.parquet file or a
    directory of `ms-temba predict` outputs."""
    source = Path(source)
    if source.is_dir():
        return _read_predict_outputs(source)
    if source.is_file():
        return _read_evaluate_predictions(source)
    raise FileNotFoundError(f"{source}: no such predictions file or directory")


def _read_evaluate_predictions(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
        raise ExportError(f"{path} is not a Parquet file: {error}") from error
    missing = {"video_id", "index", "probabilities"} - set(table.column_names)
    if missing:
        raise ExportError(f"{path} lacks column(s) {sorted(missing)}: expected the evaluate stage's "
                          f"predictions (video_id, index, probabilities)")
    video_ids = table.column("video_id").to_numpy(zero_copy_only=False)
    index = table.column("index").to_numpy()
    rows = table.column("probabilities").to_pylist()
    predictions = {}
    for video_id in dict.fromkeys(video_ids):  # first-appearance order
        where = np.flatnonzero(video_ids == video_id)
        order = where[np.argsort(index[where], kind="stable")]
        if not np.array_equal(index[order], np.arange(len(order))):
            raise ExportError(f"{path}: the rows of video {video_id!r} do not have indices 0..{len(order) - 1}")
        lengths = {len(rows[i]) for i in order}
        if len(lengths) != 1:
            raise ExportError(f"{path}: video {video_id!r} has rows with different numbers of classes {sorted(lengths)}")
        predictions[video_id] = np.asarray([rows[i] for i in order], dtype=np.float32)
    return predictions


def _read_predict_outputs(directory: Path) -> dict[str, np.ndarray]:
    from pipelines.predictions import PROBS_SUFFIX, read_probabilities

    files = sorted(directory.glob(f"*{PROBS_SUFFIX}"))
    if not files:
        raise ExportError(f"{directory} holds no *{PROBS_SUFFIX} files of `ms-temba predict`")
    return {path.name[: -len(PROBS_SUFFIX)]: read_probabilities(path)[0].astype(np.float32) for path in files}


# ----------------------------------------------------------------------------------------------
# Writing the MS-TCT layout
# ----------------------------------------------------------------------------------------------

def export_mstct(predictions: dict[str, np.ndarray], out_dir: str | os.PathLike, fmt: str = "both") -> list[Path]:
    """Write {video_id: (T, classes)} probabilities as MS-TCT's (classes, T) arrays; returns the files."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    classes = {p.shape[1] for p in predictions.values()}
    if len(classes) > 1:
        raise ExportError(f"videos have different numbers of classes: {sorted(classes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # MS-TCT's scripts index [class, frame]: the transpose of our (frame, class) layout.
    class_first = {video_id: np.ascontiguousarray(p.T, dtype=np.float32) for video_id, p in predictions.items()}
    written = []
    if fmt in ("pickle", "both"):
        with atomic_path(out_dir / PICKLE_FILE) as temporary:
            with open(temporary, "wb") as handle:
                pickle.dump(class_first, handle, protocol=pickle.HIGHEST_PROTOCOL)
        written.append(out_dir / PICKLE_FILE)
    if fmt in ("npy", "both"):
        for video_id, array in class_first.items():
            with atomic_path(out_dir / f"{video_id}.npy") as temporary:
                with open(temporary, "wb") as handle:
                    np.save(handle, array)
            written.append(out_dir / f"{video_id}.npy")
    return written


def export_main(argv: list[str] | None = None) -> int:
    """`ms-temba export-mstct SOURCE --out OUT [--format ...]`."""
    parser = argparse.ArgumentParser(prog="ms-temba export-mstct",
                                     description="Export per-frame probabilities in MS-TCT's (classes, T) layout.")
    parser.add_argument("source", help="reports/predictions.parquet, or a directory of `ms-temba predict` outputs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="both", choices=FORMATS)
    args = parser.parse_args(argv)
    try:
        predictions = read_predictions(args.source)
        written = export_mstct(predictions, args.out, args.format)
    except (ExportError, FileNotFoundError) as error:
        print(f"ms-temba export-mstct: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {len(predictions)} video(s) to {args.out} ({len(written)} file(s))")
    return 0
