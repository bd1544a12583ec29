"""The dataset's manifest (data/<dataset>/manifest.parquet): probe every video, cross-check the
annotations, tabulate; and read it back. Written by the manifest stage (pipelines.stages.manifest),
read by extract, train and evaluate.

The manifest has one row per video id seen in the annotations or in the video folder; `status` is
"ok" for the videos the later stages use, else the reason it was left out (see
pipelines.annotations for the reasons). Usable videos carry their clean actions in seconds, so
train and evaluate read annotations from here and never re-parse the JSON. Bad entries are counted
in the report, never fatal; only an unusable annotation file or video folder stops the stage.

With dataset.feature_source = npy there are no videos: dataset.video_dir holds `<video_id>.npy`
feature files, and nothing is probed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.annotations import IssueLog, clean_video, read_annotations, seconds_per_unit
from pipelines.config import DatasetParams

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
NPY_SUFFIXES = (".npy",)
# A probed duration this far from the annotated one is reported (the video is still used).
DURATION_TOLERANCE_S = 1.0
DURATION_TOLERANCE_FRACTION = 0.05

OK = "ok"
MANIFEST_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("status", pa.string()),  # "ok" or the reason the video is left out
    ("subset", pa.string()),
    ("path", pa.string()),
    ("frames", pa.int64()),  # probed (null for npy features and unreadable videos)
    ("fps", pa.float64()),
    ("duration_s", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("annotated_duration_s", pa.float64()),
    ("action_class", pa.list_(pa.int64())),
    ("action_start_s", pa.list_(pa.float64())),
    ("action_end_s", pa.list_(pa.float64())),
])


def list_files(directory: str | Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{file stem: path} of the files in `directory` (not recursive) with one of `suffixes`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"folder {directory} does not exist (dataset.video_dir)")
    return {path.stem: path for path in sorted(directory.iterdir())
            if path.is_file() and path.suffix.lower() in suffixes}


class ManifestError(ValueError):
    """The dataset has no usable video of a subset the later stages need."""

    user_error = True  # one line and exit 2 from the command line (pipelines/process.py)


def require_usable(report: dict, dataset: DatasetParams, report_path: str | Path | None = None) -> None:
    """Raise ManifestError unless the training and the test subset each have a usable video."""
    videos = report["videos"]
    missing = [subset for subset in (dataset.train_subset, dataset.test_subset) if not videos.get(f"usable_{subset}")]
    if missing:
        counts = ", ".join(f"{reason} {count}" for reason, count in report["counts"].items()) or "no entries at all"
        where = f"; see {report_path}" if report_path else ""
        raise ManifestError(
            f"no usable {' or '.join(repr(s) for s in missing)} video in {dataset.annotations} and "
            f"{dataset.video_dir} ({videos['usable']} of {videos['rows']} usable; {counts}){where}. "
            f"Check dataset.annotations, dataset.video_dir and dataset.train_subset / test_subset")


@dataclass
class Manifest:
    table: pa.Table
    issues: IssueLog

    def report(self) -> dict:
        status = self.table.column("status").to_pylist()
        subset = self.table.column("subset").to_pylist()
        usable = [s for s, st in zip(subset, status) if st == OK]
        return {
            "videos": {"rows": len(status), "usable": len(usable),
                       **{f"usable_{name}": usable.count(name) for name in sorted(set(usable))}},
            **self.issues.to_dict(),
        }


def build_manifest(dataset: DatasetParams, show_progress: bool = True) -> Manifest:
    """Probe, cross-check and tabulate every video of `dataset` (see the module docstring)."""
    from extractors.video import VideoDecodeError, probe

    annotations = read_annotations(dataset.annotations)
    use_videos = dataset.feature_source == "videos"
    files_dir = dataset.video_dir
    files = list_files(files_dir, VIDEO_SUFFIXES if use_videos else NPY_SUFFIXES)
    subsets = (dataset.train_subset, dataset.test_subset)
    issues = IssueLog()
    rows = []
    for video_id in tqdm(sorted(annotations.keys() | files.keys()), desc="manifest", unit="video",
                         disable=not show_progress):
        row = {name: None for name in MANIFEST_SCHEMA.names}
        row.update(video_id=video_id, action_class=[], action_start_s=[], action_end_s=[])
        path = files.get(video_id)
        row["path"] = str(path) if path else None
        entry = annotations.get(video_id)
        if entry is None:
            issues.add("unannotated_video", video_id, f"{path} has no annotation")
            rows.append({**row, "status": "unannotated_video"})
            continue

        info, decode_error = None, None
        if path is not None and use_videos:
            try:
                info = probe(path)
            except VideoDecodeError as error:
                decode_error = error.reason
        if info is not None:
            row.update(frames=info.frames, fps=info.fps, duration_s=info.duration, width=info.width,
                       height=info.height)
        clean = clean_video(video_id, entry, dataset.num_classes, issues)
        row["subset"] = clean.subset if clean else None
        to_seconds = seconds_per_unit(dataset.time_unit, dataset.annotation_fps, info.fps if info else None)

        if clean is None:
            status = "malformed_entry"
        elif clean.subset not in subsets:
            status = "unknown_subset"
            issues.add(status, video_id, f"subset {clean.subset!r} is neither of {subsets}")
        elif path is None:
            status = "missing_video"
            issues.add(status, video_id, f"no file {video_id}.* in {files_dir}")
        elif decode_error is not None:
            status = "corrupt_video"
            issues.add(status, video_id, f"{path}: {decode_error}")
        elif to_seconds is None:
            status = "unknown_frame_rate"
            issues.add(status, video_id, "annotations are in frames but dataset.annotation_fps is null "
                                         "and the video was not probed")
        else:
            status = OK
            clean = clean.in_seconds(to_seconds)
            row.update(annotated_duration_s=clean.duration, action_class=clean.classes.tolist(),
                       action_start_s=clean.starts.tolist(), action_end_s=clean.ends.tolist())
            if info is not None and abs(info.duration - clean.duration) > max(
                    DURATION_TOLERANCE_S, DURATION_TOLERANCE_FRACTION * clean.duration):
                issues.add("duration_mismatch", video_id,
                           f"video lasts {info.duration:.2f} s, annotation says {clean.duration:.2f} s")
        rows.append({**row, "status": status})
    return Manifest(table=pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), issues=issues)


def read_manifest(path: str | Path) -> pa.Table:
    return pq.read_table(path, schema=MANIFEST_SCHEMA)


def usable_videos(manifest: pa.Table, subset: str | None = None) -> list[dict]:
    """The rows with status "ok" (optionally of one subset), sorted by video id."""
    rows = [r for r in manifest.to_pylist() if r["status"] == OK and (subset is None or r["subset"] == subset)]
    return sorted(rows, key=lambda r: r["video_id"])
