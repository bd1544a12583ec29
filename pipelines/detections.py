"""Action segments in the ActivityNet formats, both ways: export ours, score anyone's (the
commands are pipelines.tools.activitynet's):

    ms-temba export PREDICT_DIR --out DIR [--rule hysteresis|sweep] [segment options]
    ms-temba score --pred results.json --gt ground_truth.json [--subset testing] [--tiou 0.5 ...]

Results (what detectors write; OpenTAD, ActionFormer and the ActivityNet / THUMOS evaluation
scripts read it):

    {"version": ..., "results": {video_id: [{"label": str, "score": float, "segment": [start_s, end_s]}, ...]},
     "external_data": {}}

Ground truth (ActivityNet's database format, also OpenTAD's):

    {"version": ..., "taxonomy": [], "database": {video_id: {"subset": str, "duration": float,
     "annotations": [{"label": str, "segment": [start_s, end_s]}, ...]}}}

`export` turns a directory of `ms-temba predict` outputs (`{video}.probs.parquet`) into
`results.json` and `results.csv` (video_id, label, class_id, start_s, end_s, score), with the
segment rule of predict (default, the same segments as `{video}.segments.json`) or the
score-sweeping rule of the evaluate stage (`--rule sweep`). The evaluate stage writes the same
two files for the test videos, plus their ground truth as `ground_truth.json`, in
`reports/detections/`.

`score` computes the detection mAP (ms_temba.metrics.DetectionMAP: ActivityNet protocol,
interpolated AP) of any results file against any ground-truth file in these formats (a results
file without scores also serves as ground truth). Classes are the ground truth's labels; a
predicted label that no ground-truth instance has is counted and ignored (it has no AP to count
in); a predicted video that the ground truth lacks counts as false positives, as in ActivityNet.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ms_temba.metrics import DEFAULT_TIOU_THRESHOLDS, DetectionMAP
from ms_temba.segments import Segment, probabilities_to_segments, sweep_segments
from pipelines.io import write_json, write_text

VERSION = "ms-temba detections 1"
RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"
GROUND_TRUTH_FILE = "ground_truth.json"
CSV_FIELDS = ["video_id", "label", "class_id", "start_s", "end_s", "score"]
RULES = ("hysteresis", "sweep")


class DetectionFormatError(ValueError):
    """A results or ground-truth file that is not in the expected format; the message says where."""


# ----------------------------------------------------------------------------------------------
# Segments from probabilities
# ----------------------------------------------------------------------------------------------

def extract_segments(probs, start_s, end_s, rule: str = "hysteresis", threshold_on: float = 0.5,
                     threshold_off: float = 0.35, sweep_thresholds: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5,
                                                                                     0.6, 0.7, 0.8, 0.9),
                     nms_tiou: float = 0.5, min_duration_s: float = 0.5, merge_gap_s: float = 0.5,
                     context_ratio: float | None = 0.25) -> list[Segment]:
    """Segments of one video by `rule`: "hysteresis" (ms_temba.segments.probabilities_to_segments
    with threshold_on/off) or "sweep" (ms_temba.segments.sweep_segments)."""
    if rule == "hysteresis":
        return probabilities_to_segments(probs, start_s, end_s, threshold_on, threshold_off, min_duration_s,
                                         merge_gap_s)
    if rule == "sweep":
        return sweep_segments(probs, start_s, end_s, tuple(sweep_thresholds), nms_tiou, min_duration_s, merge_gap_s,
                              context_ratio)
    raise ValueError(f"segment rule must be one of {', '.join(RULES)}, got {rule!r}")


def segments_of_eval_params(eval_params, probs, start_s, end_s) -> list[Segment]:
    """extract_segments with the settings of params.yaml's `eval` section."""
    return extract_segments(probs, start_s, end_s, eval_params.segment_rule, eval_params.threshold_on,
                            eval_params.threshold_off, eval_params.sweep_thresholds, eval_params.nms_tiou,
                            eval_params.min_duration_s, eval_params.merge_gap_s, eval_params.context_ratio)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def results_document(segments_of: Mapping[str, list[Segment]], class_names: list[str]) -> dict[str, Any]:
    """The ActivityNet results JSON of {video_id: segments}; each video's entries by decreasing score."""
    results = {}
    for video_id, segments in segments_of.items():
        ranked = sorted(segments, key=lambda s: (-s.score, s.start_s, s.class_id))
        results[video_id] = [{"label": class_names[s.class_id], "score": round(float(s.score), 6),
                              "segment": [round(float(s.start_s), 4), round(float(s.end_s), 4)]} for s in ranked]
    return {"version": VERSION, "results": results, "external_data": {}}


def ground_truth_document(actions_of: Mapping[str, Iterable], class_names: list[str], subset: str = "testing",
                          durations: Mapping[str, float] | None = None) -> dict[str, Any]:
    """ActivityNet database JSON of {video_id: [(class_id, start_s, end_s), ...]}."""
    database = {}
    for video_id, actions in actions_of.items():
        entry: dict[str, Any] = {"subset": subset}
        if durations and durations.get(video_id) is not None:
            entry["duration"] = round(float(durations[video_id]), 4)
        entry["annotations"] = [{"label": class_names[int(c)], "segment": [round(float(s), 4), round(float(e), 4)]}
                                for c, s, e in actions]
        database[video_id] = entry
    return {"version": VERSION, "taxonomy": [], "database": database}


def write_results(out_dir: str | os.PathLike, segments_of: Mapping[str, list[Segment]],
                  class_names: list[str]) -> list[Path]:
    """OUT/results.json (ActivityNet results) and OUT/results.csv; returns the two paths."""
    out_dir = Path(out_dir)
    document = results_document(segments_of, class_names)
    write_json(out_dir / RESULTS_FILE, document)
    index_of = {name: i for i, name in enumerate(class_names)}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for video_id, entries in document["results"].items():
        for entry in entries:
            writer.writerow([video_id, entry["label"], index_of[entry["label"]], *entry["segment"], entry["score"]])
    write_text(out_dir / RESULTS_CSV, buffer.getvalue())
    return [out_dir / RESULTS_FILE, out_dir / RESULTS_CSV]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def _load_json(path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DetectionFormatError(f"{path} is not JSON: {error}") from error


def _segment(entry: Any, where: str) -> tuple[float, float]:
    segment = entry.get("segment") if isinstance(entry, Mapping) else None
    if (not isinstance(segment, (list, tuple)) or len(segment) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in segment)):
        raise DetectionFormatError(f"{where}: 'segment' must be [start, end] in seconds, got {segment!r}")
    start, end = float(segment[0]), float(segment[1])
    if end < start:
        raise DetectionFormatError(f"{where}: segment ends before it starts: {segment}")
    return start, end


def _label(entry: Mapping, where: str) -> str:
    label = entry.get("label")
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label:
        raise DetectionFormatError(f"{where}: 'label' must be a class name, got {label!r}")
    return label


def read_results(path) -> dict[str, list[tuple[str, float, float, float]]]:
    """{video_id: [(label, start_s, end_s, score), ...]} of an ActivityNet results file
    ({"results": {...}}; a bare {video_id: [...]} mapping is accepted too)."""
    document = _load_json(path)
    results = document.get("results", document) if isinstance(document, Mapping) else None
    if not isinstance(results, Mapping):
        raise DetectionFormatError(f"{path}: expected {{\"results\": {{video_id: [...]}}}}")
    out = {}
    for video_id, entries in results.items():
        if not isinstance(entries, list):
            raise DetectionFormatError(f"{path}: results of video {video_id!r} must be a list, got {type(entries).__name__}")
        rows = []
        for k, entry in enumerate(entries):
            where = f"{path}: results[{video_id!r}][{k}]"
            start, end = _segment(entry, where)
            score = entry.get("score")
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise DetectionFormatError(f"{where}: 'score' must be a finite number, got {score!r}")
            rows.append((_label(entry, where), start, end, float(score)))
        out[str(video_id)] = rows
    return out


def read_ground_truth(path, subset: str | None = None) -> dict[str, list[tuple[str, float, float]]]:
    """{video_id: [(label, start_s, end_s), ...]} of an ActivityNet ground-truth file
    ({"database": {video_id: {"subset", "annotations": [...]}}}, only the videos of `subset` if
    given), or of a results file (scores ignored). Videos without annotations are kept (empty):
    detections in them are false positives."""
    document = _load_json(path)
    if not isinstance(document, Mapping):
        raise DetectionFormatError(f"{path}: expected a JSON object with 'database' (or 'results')")
    if "database" not in document:
        if subset is not None:
            raise DetectionFormatError(f"{path}: a results file has no subsets; drop --subset")
        return {video: [(label, start, end) for label, start, end, _ in rows]
                for video, rows in read_results(path).items()}
    database = document["database"]
    if not isinstance(database, Mapping):
        raise DetectionFormatError(f"{path}: 'database' must map video ids to entries")
    out = {}
    for video_id, entry in database.items():
        if not isinstance(entry, Mapping):
            raise DetectionFormatError(f"{path}: database[{video_id!r}] must be an object")
        if subset is not None and entry.get("subset") != subset:
            continue
        annotations = entry.get("annotations", [])
        if not isinstance(annotations, list):
            raise DetectionFormatError(f"{path}: database[{video_id!r}]['annotations'] must be a list")
        rows = []
        for k, annotation in enumerate(annotations):
            where = f"{path}: database[{video_id!r}]['annotations'][{k}]"
            start, end = _segment(annotation, where)
            rows.append((_label(annotation, where), start, end))
        out[str(video_id)] = rows
    if subset is not None and not out:
        raise DetectionFormatError(f"{path}: no video has subset {subset!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def score_detections(predictions: Mapping[str, list], ground_truth: Mapping[str, list],
                     tiou_thresholds=DEFAULT_TIOU_THRESHOLDS) -> dict[str, Any]:
    """Detection mAP of {video: [(label, start, end, score)]} against {video: [(label, start, end)]}.

    Returns DetectionMAP.compute()'s dict plus "labels" (the classes, in order of first appearance
    in the ground truth), "ignored_labels" {label: detections} and "unknown_videos" (predicted
    videos the ground truth lacks; their detections are false positives)."""
    labels = list(dict.fromkeys(label for rows in ground_truth.values() for label, _, _ in rows))
    if not labels:
        raise DetectionFormatError("the ground truth has no annotated segment")
    index_of = {label: i for i, label in enumerate(labels)}
    metric = DetectionMAP(len(labels), tiou_thresholds)
    ignored: dict[str, int] = {}
    for video_id in dict.fromkeys([*ground_truth, *predictions]):
        detections = []
        for label, start, end, score in predictions.get(video_id, ()):
            if label in index_of:
                detections.append((index_of[label], start, end, score))
            else:
                ignored[label] = ignored.get(label, 0) + 1
        metric.update(detections, [(index_of[label], s, e) for label, s, e in ground_truth.get(video_id, ())],
                      video_id=video_id)
    result = metric.compute()
    result.update(labels=labels, ignored_labels=ignored,
                  unknown_videos=sorted(set(predictions) - set(ground_truth)))
    return result


def score_report(result: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready summary of score_detections (percent, like metrics.json)."""
    def percent(value):
        return None if value is None or math.isnan(value) else round(100.0 * float(value), 4)

    return {"detection_map": percent(result["map"]),
            "detection_map_at": {f"{t:g}": percent(v) for t, v in result["map_at"].items()},
            "per_class": {label: percent(ap) for label, ap in zip(result["labels"], result["class_ap"])},
            "num_videos": result["num_videos"], "num_detections": result["num_detections"],
            "num_instances": result["num_instances"], "ignored_labels": result["ignored_labels"],
            "unknown_videos": len(result["unknown_videos"])}


def export_segments(source: str | os.PathLike, out_dir: str | os.PathLike, **rule) -> tuple[int, list[Path]]:
    """results.json + results.csv of a directory of `ms-temba predict` outputs; (videos, files)."""
    from pipelines.predictions import PROBS_SUFFIX, read_probabilities

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a directory of `ms-temba predict` outputs")
    files = sorted(source.glob(f"*{PROBS_SUFFIX}"))
    if not files:
        raise DetectionFormatError(f"{source} holds no *{PROBS_SUFFIX} files of `ms-temba predict`")
    segments_of, class_names = {}, None
    for path in files:
        probs, start_s, end_s, names = read_probabilities(path)
        if class_names is not None and names != class_names:
            raise DetectionFormatError(f"{path} has other class names than the other videos")
        class_names = names
        segments_of[path.name[: -len(PROBS_SUFFIX)]] = extract_segments(probs, start_s, end_s, **rule)
    return len(segments_of), write_results(out_dir, segments_of, class_names)
