"""Interop with the MS-TCT / MS-Temba research code: export predictions, import release checkpoints.

`ms-temba export-mstct SOURCE --out OUT [--format pickle|npy|both]` writes per-frame probabilities
in the layout the MS-TCT-style evaluation scripts read (and the official MS-Temba training script
writes as `{epoch}.pkl`):

    OUT/predictions.pkl   pickle of {video_id: np.ndarray float32 (classes, T)}  (classes first)
    OUT/{video_id}.npy    the same array, one file per video

SOURCE is either the evaluate stage's `reports/predictions.parquet` (columns video_id, index,
probabilities) or a directory of `ms-temba predict` outputs (`{video}.probs.parquet`).

`ms-temba convert-release SRC DST` turns an official release `best_model.pth` into this project's
model file (pipelines.bundle), so that `ms-temba predict` can use it.
"""
from __future__ import annotations

import argparse
import math
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
    from pipelines.predict import PROBS_SUFFIX, read_probabilities

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


# ----------------------------------------------------------------------------------------------
# Importing an official release checkpoint
# ----------------------------------------------------------------------------------------------

# torch.save's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """ExportError saying what `path` is not, unless it looks like a torch.save file (a zip archive
    with a data.pkl, or the legacy format). Reads only the file's first bytes / zip directory."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ExportError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted download or copy?)")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(name.endswith("/data.pkl") for name in names):
            raise ExportError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl among "
                              f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        return
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return
    if head[:1] == b"\x80":
        raise ExportError(f"{path} is a plain Python pickle, not a torch.save checkpoint; it was not loaded "
                          f"(unpickling an untrusted file can run code from it)")
    text = head.decode("utf-8", "replace")
    looks = "text" if text.isprintable() or text.strip().isprintable() else "binary data"
    raise ExportError(f"{path} is not a PyTorch checkpoint ({size} bytes of {looks}, starting {head[:24]!r})")


def convert_release(source: str | os.PathLike, destination: str | os.PathLike, class_names: list[str] | None = None,
                    extractor_metadata: dict | None = None, trust_pickle: bool = False):
    """Write the release checkpoint `source` as a pipelines.bundle model file at `destination`.

    The release does not record its features' extractor; `extractor_metadata` (shard metadata:
    backbone, fps, ...) may say it, otherwise the model file records only the feature dim and
    `ms-temba predict` asks for --extractor-config (or runs on existing shards with --features).
    """
    from ms_temba.convert import RELEASE_MODEL_NAME, ReleaseCheckpointError, load_release_checkpoint
    from pipelines.bundle import ModelBundle, save_bundle
    import dataclasses

    check_checkpoint_file(source)
    try:
        model = load_release_checkpoint(source, trust_pickle=trust_pickle)
    except ReleaseCheckpointError as error:
        message = str(error)
        if "weights_only" in message and "Unsupported global" not in message:
            # torch's text advises weights_only=False, i.e. running code from an untrusted file: not that.
            reason = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
            reason = reason[0].strip() if reason and "weights_only" not in reason[0] else "unreadable pickle data"
            raise ExportError(f"{source} is not a PyTorch checkpoint that can be read safely ({reason}); it was not "
                              f"loaded any other way, as unpickling an untrusted file can run code from it") from None
        raise
    num_classes = model.config.num_classes
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names given for a checkpoint with {num_classes} classes")
    features = {**(extractor_metadata or {}), "dim": model.config.in_dim}
    bundle = ModelBundle(
        model_name=RELEASE_MODEL_NAME, model_config=dataclasses.asdict(model.config),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, class_names=list(class_names),
        features=features, dataset=f"converted from {os.fspath(source)}", train_params={}, selected_epoch=0,
        val_map=math.nan, train_videos=[], val_videos=[])
    save_bundle(destination, bundle)
    return bundle


def convert_release_main(argv: list[str] | None = None) -> int:
    """`ms-temba convert-release SRC DST [--class-names FILE] [--trust-pickle]`."""
    from ms_temba.convert import ReleaseCheckpointError

    parser = argparse.ArgumentParser(prog="ms-temba convert-release",
                                     description="Convert an official MS-Temba release checkpoint (best_model.pth) "
                                                 "into this project's model file, for `ms-temba predict`.")
    parser.add_argument("source", help="the release checkpoint (.pth)")
    parser.add_argument("destination", help="the model file to write (e.g. models/release.pt)")
    parser.add_argument("--class-names", help="text file, one class name per line (line i = class i)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a checkpoint that pickles a whole module object (runs code from the file)")
    args = parser.parse_args(argv)
    try:
        names = None
        if args.class_names:
            names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
        bundle = convert_release(args.source, args.destination, names, trust_pickle=args.trust_pickle)
    except (ReleaseCheckpointError, ExportError, FileNotFoundError) as error:
        print(f"ms-temba convert-release: error: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.source} -> {args.destination} ({bundle.model_config})")
    return 0
