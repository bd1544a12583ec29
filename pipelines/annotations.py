"""Reading and cross-checking dense action annotations (Charades / TSU / MultiTHUMOS format).

The annotation file is JSON: {video_id: {"subset": str, "duration": number, "actions":
[[class, start, end], ...]}}, times in seconds or, for TSU, in frames of the video.

Real annotation files have defects; none of them stops the pipeline. Each one is counted under a
reason in an `IssueLog` (which the manifest stage writes to reports/manifest_report.json), and the
entry is repaired or left out:

    reason               level   what happens
    malformed_entry      video   not {subset, duration > 0, actions: list}: video left out
    unknown_subset       video   subset is neither the train nor the test subset: video left out
    no_actions           video   empty action list: kept (every frame is a negative)
    malformed_action     action  not [class, start, end] numbers: action dropped
    class_out_of_range   action  class not an integer in [0, num_classes): action dropped
    end_before_start     action  end < start: action dropped
    outside_video        action  entirely outside [0, duration] (ends at or before 0, or starts at or
                                 after the duration): action dropped
    start_before_zero    action  start < 0: clipped to 0
    end_after_duration   action  end > the annotated duration: clipped to the duration

The manifest stage adds the reasons that need the videos: missing_video, corrupt_video,
unannotated_video (left out), unknown_frame_rate (frames but no rate known: left out) and
duration_mismatch (probed and annotated durations differ by more than max(1 s, 5 %): kept).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

MAX_EXAMPLES_PER_REASON = 5


class AnnotationFileError(ValueError):
    """The annotation file as a whole is unusable (missing, not JSON, not a mapping of videos)."""

    user_error = True  # one line and exit 2 from the command line (pipelines/process.py)


@dataclass
class IssueLog:
    """Counts of defects per reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, reason: str, video_id: str, detail: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append({"video_id": video_id, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())),
                "examples": {reason: self.examples[reason] for reason in sorted(self.examples)}}


@dataclass(frozen=True)
class VideoAnnotation:
    """The clean annotation of one video; times in the file's unit until `in_seconds`."""

    video_id: str
    subset: str
    duration: float
    classes: np.ndarray  # int64 (actions,)
    starts: np.ndarray  # float64 (actions,)
    ends: np.ndarray  # float64 (actions,)

    def in_seconds(self, seconds_per_unit: float) -> "VideoAnnotation":
        return dataclasses.replace(self, duration=self.duration * seconds_per_unit,
                                   starts=self.starts * seconds_per_unit, ends=self.ends * seconds_per_unit)


def read_annotations(path: str | Path) -> dict[str, Any]:
    """The raw annotation mapping; raises AnnotationFileError if the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationFileError(f"annotation file {path} does not exist (dataset.annotations)")
    try:
        with open(path) as stream:
            raw = json.load(stream)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(f"annotation file {path} (dataset.annotations) is not valid JSON: {error.msg} at "
                                  f"line {error.lineno}, column {error.colno}") from None
    if not isinstance(raw, dict):
        raise AnnotationFileError(f"annotation file {path} must map video ids to entries, got {type(raw).__name__}")
    return raw


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clean_video(video_id: str, entry: Any, num_classes: int, issues: IssueLog) -> VideoAnnotation | None:
    """Check one video's entry, log its defects, and return it repaired (None if malformed).

    Times stay in the file's unit; convert with `.in_seconds(seconds_per_unit(...))`.
    """
    if not (isinstance(entry, Mapping) and isinstance(entry.get("subset"), str)
            and _is_number(entry.get("duration")) and entry["duration"] > 0
            and isinstance(entry.get("actions"), list)):
        issues.add("malformed_entry", video_id, f"expected {{subset, duration > 0, actions: [...]}}, got {str(entry)[:120]}")
        return None
    duration = float(entry["duration"])
    if not entry["actions"]:
        issues.add("no_actions", video_id, "no actions: every frame is a negative")

    classes, starts, ends = [], [], []
    for action in entry["actions"]:
        if not (isinstance(action, (list, tuple)) and len(action) == 3 and all(_is_number(v) for v in action)):
            issues.add("malformed_action", video_id, f"expected [class, start, end], got {action!r}")
            continue
        label, start, end = action
        if not (float(label).is_integer() and 0 <= label < num_classes):
            issues.add("class_out_of_range", video_id, f"class {label} not in [0, {num_classes}): {action!r}")
            continue
        if end < start:
            issues.add("end_before_start", video_id, f"end {end} < start {start}")
            continue
        # Checked before clipping: clipping an action that lies wholly outside the video would
        # turn it into an inverted or empty interval at one end.
        if end <= 0 or start >= duration:
            issues.add("outside_video", video_id, f"[{start}, {end}] lies outside the video [0, {duration}]")
            continue
        if start < 0:
            issues.add("start_before_zero", video_id, f"start {start} < 0, clipped to 0")
            start = 0.0
        if end > duration:
            issues.add("end_after_duration", video_id, f"end {end} > duration {duration}, clipped")
            end = duration
        classes.append(int(label))
        starts.append(float(start))
        ends.append(float(end))

    return VideoAnnotation(video_id=video_id, subset=entry["subset"], duration=duration,
                           classes=np.asarray(classes, dtype=np.int64), starts=np.asarray(starts, dtype=np.float64),
                           ends=np.asarray(ends, dtype=np.float64))


def seconds_per_unit(time_unit: str, annotation_fps: float | None, video_fps: float | None) -> float | None:
    """Seconds per annotation time unit: 1 for seconds; 1 / fps for frames (the configured
    annotation_fps, else the video's own frame rate; None if neither is known)."""
    if time_unit == "seconds":
        return 1.0
    if time_unit != "frames":
        raise ValueError(f"time_unit must be 'seconds' or 'frames', got {time_unit!r}")
    fps = annotation_fps if annotation_fps is not None else video_fps
    return None if fps is None else 1.0 / fps
