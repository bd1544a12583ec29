"""ActivityNet-format exports and imports (pipelines/detections.py: `ms-temba export`, `ms-temba
score`) and the evaluate stage's detection metrics (pipelines.evaluation.detection_metrics)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from extractors.shards import VideoFeatures
from ms_temba.segments import Segment, probabilities_to_segments
from pipelines.tools import cli
from pipelines.config import EvalParams
from pipelines.detections import (
    DetectionFormatError,
    ground_truth_document,
    read_ground_truth,
    read_results,
    results_document,
    score_detections,
    write_results,
)
from pipelines.evaluation import detection_metrics, ground_truth_actions, write_detection_reports
from pipelines.predictions import write_probabilities

NAMES = ["walk", "run", "jump"]


def write(path, document):
    path.write_text(json.dumps(document))
    return path


def test_results_round_trip_and_csv(tmp_path):
    segments = {"v1": [Segment(0, 1.0, 4.5, 0.25), Segment(2, 0.0, 2.0, 0.75)], "v2": []}
    written = write_results(tmp_path, segments, NAMES)
    document = json.loads(written[0].read_text())
    assert set(document) == {"version", "results", "external_data"}
    assert document["results"]["v1"] == [{"label": "jump", "score": 0.75, "segment": [0.0, 2.0]},
                                         {"label": "walk", "score": 0.25, "segment": [1.0, 4.5]}]
    assert read_results(written[0]) == {"v1": [("jump", 0.0, 2.0, 0.75), ("walk", 1.0, 4.5, 0.25)], "v2": []}
    lines = written[1].read_text().splitlines()
    assert lines == ["video_id,label,class_id,start_s,end_s,score", "v1,jump,2,0.0,2.0,0.75", "v1,walk,0,1.0,4.5,0.25"]


def test_ground_truth_database_format_with_subsets(tmp_path):
    document = ground_truth_document({"a": [(0, 0.0, 3.0), (1, 2.0, 5.0)], "b": []}, NAMES, "testing", {"a": 10.0})
    document["database"]["c"] = {"subset": "training", "annotations": [{"label": "jump", "segment": [1, 2]}]}
    path = write(tmp_path / "gt.json", document)
    assert document["database"]["a"]["duration"] == 10.0
    assert read_ground_truth(path) == {"a": [("walk", 0.0, 3.0), ("run", 2.0, 5.0)], "b": [], "c": [("jump", 1.0, 2.0)]}
    assert set(read_ground_truth(path, subset="testing")) == {"a", "b"}
    with pytest.raises(DetectionFormatError, match="no video has subset 'validation'"):
        read_ground_truth(path, subset="validation")
    # A results file serves as ground truth (scores ignored).
    results = write(tmp_path / "r.json", results_document({"a": [Segment(2, 1.0, 2.0, 0.3)]}, NAMES))
    assert read_ground_truth(results) == {"a": [("jump", 1.0, 2.0)]}


@pytest.mark.parametrize("document, message", [
    ({"results": {"a": [{"label": "x", "score": 1, "segment": [3, 1]}]}}, "ends before it starts"),
    ({"results": {"a": [{"label": "x", "score": "high", "segment": [0, 1]}]}}, "'score' must be a finite number"),
    ({"results": {"a": [{"label": "x", "score": 1, "segment": [0]}]}}, r"'segment' must be \[start, end\]"),
    ({"results": {"a": [{"score": 1, "segment": [0, 1]}]}}, "'label' must be a class name"),
    ({"results": {"a": {}}}, "must be a list"),
])
def test_malformed_results_name_the_entry(tmp_path, document, message):
    with pytest.raises(DetectionFormatError, match=message):
        read_results(write(tmp_path / "r.json", document))


def test_score_perfect_unknown_labels_and_videos():
    ground_truth = {"a": [("walk", 0.0, 3.0), ("run", 2.0, 5.0)], "b": [("walk", 1.0, 2.0)]}
    perfect = {v: [(label, s, e, 0.9) for label, s, e in rows] for v, rows in ground_truth.items()}
    result = score_detections(perfect, ground_truth)
    assert result["map"] == 1.0 and result["labels"] == ["walk", "run"]
    # An unknown label is ignored; a video the ground truth lacks gives false positives ranked first.
    noisy = {**perfect, "a": perfect["a"] + [("swim", 0.0, 1.0, 0.99)], "zzz": [("walk", 0.0, 3.0, 0.95)]}
    result = score_detections(noisy, ground_truth, [0.5])
    assert result["ignored_labels"] == {"swim": 1} and result["unknown_videos"] == ["zzz"]
    # walk: FP then 2 TPs -> precision 2/3 at recall 1; run: 1.
    assert result["map"] == pytest.approx((2 / 3 + 1) / 2)


def test_score_command(tmp_path, capsys):
    gt = write(tmp_path / "gt.json", ground_truth_document({"a": [(0, 0.0, 10.0)], "b": [(1, 0.0, 4.0)]}, NAMES))
    pred = write(tmp_path / "pred.json", results_document(
        {"a": [Segment(0, 2.0, 12.0, 0.9)], "b": [Segment(1, 0.0, 4.0, 0.5)]}, NAMES))
    assert cli.main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    # walk: tIoU 8/12 = 0.667: found up to 0.6 (6 of 9 thresholds); run: all 9.
    assert report["detection_map_at"]["0.6"] == 100.0 and report["detection_map_at"]["0.7"] == 50.0
    assert report["detection_map"] == pytest.approx(100 * (6 / 9 + 1) / 2, abs=1e-3)
    assert report["per_class"] == {"walk": pytest.approx(100 * 6 / 9, abs=1e-3), "run": 100.0}
    assert "detection mAP" in out
    assert cli.main(["score", "--pred", str(tmp_path / "missing.json"), "--gt", str(gt)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_export_command_from_predict_outputs(tmp_path, capsys):
    predict_dir = tmp_path / "predictions"
    predict_dir.mkdir()
    times = np.arange(12.0)
    probs = np.zeros((12, 3), dtype=np.float32)
    probs[2:6, 0] = 0.9
    probs[7:11, 2] = [0.3, 0.6, 0.6, 0.3]
    write_probabilities(predict_dir / "clip.probs.parquet", VideoFeatures(np.zeros((12, 1), np.float32), times,
                                                                         times + 1), probs, NAMES)
    assert cli.main(["export", str(predict_dir), "--out", str(tmp_path / "export")]) == 0
    exported = read_results(tmp_path / "export" / "results.json")
    expected = probabilities_to_segments(probs, times, times + 1, 0.5, 0.35, 0.5, 0.5)  # predict's defaults
    expected = sorted(expected, key=lambda s: -s.score)
    assert len(expected) == 2
    assert exported == {"clip": [(NAMES[s.class_id], s.start_s, s.end_s, pytest.approx(s.score, abs=1e-6))
                                 for s in expected]}
    assert cli.main(["export", str(predict_dir), "--out", str(tmp_path / "sweep"), "--rule", "sweep",
                     "--sweep-thresholds", "0.2", "0.5", "--nms-tiou", "1"]) == 0
    swept = read_results(tmp_path / "sweep" / "results.json")["clip"]
    # contrast scores: [7, 11] mean 0.45, 0 around it; [8, 10] mean 0.6, 0.3 around it
    assert ("jump", 7.0, 11.0, pytest.approx(0.45)) in swept and ("jump", 8.0, 10.0, pytest.approx(0.3)) in swept
    assert cli.main(["export", str(predict_dir), "--out", str(tmp_path / "mean"), "--rule", "sweep",
                     "--sweep-thresholds", "0.2", "0.5", "--nms-tiou", "1", "--context-ratio", "-1"]) == 0
    assert ("jump", 8.0, 10.0, pytest.approx(0.6)) in read_results(tmp_path / "mean" / "results.json")["clip"]
    assert (tmp_path / "sweep" / "results.csv").is_file()
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "holds no" in capsys.readouterr().err


def test_evaluate_detection_metrics_and_reports_round_trip(tmp_path, capsys):
    # Probabilities that are 1 exactly on the ground-truth frames: every instance found (mAP 1) with
    # the hysteresis rule; a missed instance in the second video halves its class's recall.
    times = np.arange(20.0)
    rows = [{"video_id": "v0", "action_class": [0, 1], "action_start_s": [2.0, 5.0], "action_end_s": [8.0, 9.0]},
            {"video_id": "v1", "action_class": [0, 2], "action_start_s": [0.0, 10.0], "action_end_s": [4.0, 15.0]}]
    videos = []
    for row in rows:
        probs = np.zeros((20, 3))
        for c, s, e in ground_truth_actions(row):
            probs[int(s):int(e), c] = 1.0
        if row["video_id"] == "v1":
            probs[:, 2] = 0.0  # the jump is missed
        videos.append((row["video_id"], probs, times, times + 1, ground_truth_actions(row)))
    params = EvalParams(segment_rule="hysteresis", min_duration_s=0.0, merge_gap_s=0.0)
    detection = detection_metrics(params, videos, num_classes=3)
    result = detection["result"]
    np.testing.assert_allclose(result["class_ap"], [1.0, 1.0, 0.0])
    assert result["map"] == pytest.approx(2 / 3)
    assert detection["per_video"]["v0"] == 1.0 and detection["per_video"]["v1"] == pytest.approx(0.5)
    swept = detection_metrics(EvalParams(), videos, num_classes=3)  # the default sweep finds the same here
    assert swept["result"]["map"] == pytest.approx(2 / 3)

    write_detection_reports(detection, NAMES, "testing", tmp_path / "detection_ap.csv", tmp_path / "detections")
    lines = (tmp_path / "detection_ap.csv").read_text().splitlines()
    assert lines[0] == "tiou,map" and len(lines) == 10 and lines[1] == "0.1,66.6667"
    assert cli.main(["score", "--pred", str(tmp_path / "detections" / "results.json"),
                     "--gt", str(tmp_path / "detections" / "ground_truth.json"), "--subset", "testing",
                     "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["detection_map"] == pytest.approx(100 * result["map"], abs=1e-3)


def test_eval_params_reject_bad_detection_settings():
    from pipelines.config import ConfigError

    for values, key in [({"segment_rule": "magic"}, "eval.segment_rule"), ({"detection_tiou": [0.0]}, "eval.detection_tiou"),
                        ({"threshold_on": 0.3, "threshold_off": 0.4}, "eval.threshold_off"),
                        ({"nms_tiou": 2.0}, "eval.nms_tiou"), ({"sweep_thresholds": []}, "eval.sweep_thresholds")]:
        with pytest.raises(ConfigError) as error:
            EvalParams(**values).check()
        assert error.value.key == key


@pytest.mark.parametrize("command, prog", [("export", "ms-temba export"), ("score", "ms-temba score")])
def test_commands_have_their_own_help(command, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: {prog}" in capsys.readouterr().out
