"""Labels from action intervals, and the annotation checks on the real Charades / MultiTHUMOS / TSU files.

References are written independently of the code under test: plain loops over frames and actions,
and defect counts recomputed from the raw JSON with the documented rules.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipelines.annotations import IssueLog, clean_video, seconds_per_unit
from pipelines.labels import build_labels, feature_centres

SHARED_ANNOTATIONS = Path(__file__).resolve().parents[2] / "shared" / "annotations"
# name -> (classes, time unit); TSU's times and durations are frames of its videos.
REAL_FILES = {"charades": (157, "seconds"), "multithumos": (65, "seconds"), "tsu": (51, "frames")}
TSU_FPS = 25.0  # for the feature grid of this test only; the pipeline uses each video's probed fps


def loop_labels(centres, actions, num_classes):
    """Reference: frame t is positive for c iff some action (c, start, end) has start <= centre <= end."""
    labels = np.zeros((len(centres), num_classes), dtype=np.float32)
    for t, centre in enumerate(centres):
        for label, start, end in actions:
            if start <= centre <= end:
                labels[t, label] = 1.0
    return labels


def test_centre_rule_on_a_hand_checked_example():
    # Features of 0.5 s: centres 0.25, 0.75, 1.25, 1.75, 2.25. The action [1.0, 2.0] of class 1
    # covers the centres 1.25 and 1.75; the action [0.75, 0.75] of class 0 touches exactly one centre.
    start_s = np.arange(5) * 0.5
    labels = build_labels(feature_centres(start_s, start_s + 0.5), [1, 0], [1.0, 0.75], [2.0, 0.75], num_classes=3)
    expected = np.zeros((5, 3), dtype=np.float32)
    expected[2:4, 1] = 1
    expected[1, 0] = 1
    np.testing.assert_array_equal(labels, expected)


def test_matches_the_loop_reference_on_random_overlapping_actions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        num_classes = int(rng.integers(1, 12))
        duration = float(rng.uniform(5, 100))
        count = int(rng.integers(0, 15))
        starts = rng.uniform(-2, duration, count)
        actions = [(int(rng.integers(num_classes)), s, s + rng.uniform(0, 20)) for s in starts]
        hop = float(rng.uniform(0.1, 2.0))
        start_s = np.arange(int(duration / hop)) * hop
        centres = feature_centres(start_s, start_s + hop)
        classes, begin, end = (np.array([a[i] for a in actions]) for i in range(3))
        labels = build_labels(centres, classes, begin, end, num_classes)
        np.testing.assert_array_equal(labels, loop_labels(centres, actions, num_classes))


def test_rejects_a_class_outside_the_label_space():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        build_labels(np.array([0.5]), [4], [0.0], [1.0], num_classes=4)
    with pytest.raises(ValueError, match="one entry per action"):
        build_labels(np.array([0.5]), [0, 1], [0.0], [1.0], num_classes=4)


def test_frames_are_converted_with_the_given_rate():
    assert seconds_per_unit("seconds", None, 30.0) == 1.0
    assert seconds_per_unit("frames", 25.0, 30.0) == pytest.approx(1 / 25)  # configured rate wins
    assert seconds_per_unit("frames", None, 30.0) == pytest.approx(1 / 30)  # else the video's
    assert seconds_per_unit("frames", None, None) is None


def test_malformed_entries_are_logged_not_raised():
    issues = IssueLog()
    entry = {"subset": "training", "duration": 10.0,
             "actions": [[0, 1, 2], [7, 1, 2], [1, 5, 4], [1, -1, 3], [2, 8, 12], ["x", 1, 2], [1, 2]]}
    clean = clean_video("v", entry, num_classes=3, issues=issues)
    assert clean.classes.tolist() == [0, 1, 2]
    assert clean.starts.tolist() == [1.0, 0.0, 8.0]  # start < 0 clipped
    assert clean.ends.tolist() == [2.0, 3.0, 10.0]  # end > duration clipped
    assert dict(issues.counts) == {"class_out_of_range": 1, "end_before_start": 1, "start_before_zero": 1,
                                   "end_after_duration": 1, "malformed_action": 2}
    assert clean_video("w", {"subset": "training", "duration": -3, "actions": []}, 3, issues) is None
    assert clean_video("x", [1, 2], 3, issues) is None
    assert issues.counts["malformed_entry"] == 2


def independent_counts(raw: dict, num_classes: int) -> dict:
    """The documented rules, re-derived from the raw JSON: the first failing check of an action wins
    (class, then end < start, then wholly outside [0, duration], which drop it); clipping checks apply
    to the actions kept."""
    counts = dict.fromkeys(["no_actions", "class_out_of_range", "end_before_start", "outside_video",
                            "start_before_zero", "end_after_duration"], 0)
    for entry in raw.values():
        if not entry["actions"]:
            counts["no_actions"] += 1
        for label, start, end in entry["actions"]:
            if not (label == int(label) and 0 <= label < num_classes):
                counts["class_out_of_range"] += 1
            elif end < start:
                counts["end_before_start"] += 1
            elif end <= 0 or start >= entry["duration"]:
                counts["outside_video"] += 1
            else:
                counts["start_before_zero"] += start < 0
                counts["end_after_duration"] += end > entry["duration"]
    return {reason: count for reason, count in counts.items() if count}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_annotation_files(name):
    path = SHARED_ANNOTATIONS / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    num_classes, time_unit = REAL_FILES[name]
    raw = json.loads(path.read_text())
    to_seconds = seconds_per_unit(time_unit, TSU_FPS if time_unit == "frames" else None, None)

    issues = IssueLog()
    positives = 0
    rng = np.random.default_rng(0)
    checked_against_loop = 0
    for video_id, entry in raw.items():
        clean = clean_video(video_id, entry, num_classes, issues)
        assert clean is not None, f"{name}/{video_id} was treated as malformed"
        clean = clean.in_seconds(to_seconds)
        # A feature grid like an extractor's: 8 features per second of video.
        hop = 1 / 8
        start_s = np.arange(math.ceil(clean.duration / hop)) * hop
        centres = feature_centres(start_s, start_s + hop)
        labels = build_labels(centres, clean.classes, clean.starts, clean.ends, num_classes)
        assert labels.shape == (len(start_s), num_classes)
        positives += int(labels.sum())
        if rng.random() < 0.02:  # a sample of videos against the loop reference (it is slow)
            actions = list(zip(clean.classes, clean.starts, clean.ends))
            np.testing.assert_array_equal(labels, loop_labels(centres, actions, num_classes))
            checked_against_loop += 1

    assert dict(issues.counts) == independent_counts(raw, num_classes)
    assert positives > 0 and checked_against_loop > 0
    for reason, examples in issues.examples.items():
        assert 1 <= len(examples) <= 5 and all(e["video_id"] in raw for e in examples), reason
