"""ms_temba.segments.probabilities_to_segments against hand-worked sequences and two brute-force
references: a frame-by-frame state machine (the rule as a person would apply it by hand) and an
enumeration of all frame intervals checked against the definition of a hysteresis segment."""

import itertools

import numpy as np
import pytest

from ms_temba.segments import Segment, probabilities_to_segments

# One frame per second: frame t covers [t, t + 1).
SECONDS = np.arange(7.0)


def one_class(values):
    return np.asarray(values, dtype=np.float64)[:, None]


def as_tuples(segments, digits=9):
    return [(s.class_id, round(s.start_s, digits), round(s.end_s, digits), round(s.score, digits))
            for s in segments]


# --------------------------------------------------------------------------------------------
# Hand-worked sequences
# --------------------------------------------------------------------------------------------

#                  0    1    2    3     4    5    6
HAND_CURVE = [0.1, 0.4, 0.6, 0.45, 0.3, 0.6, 0.2]
# on=0.5, off=0.35: frame 1 (0.4) is above off but nothing has started; frame 2 starts a segment,
# frame 3 (0.45 >= 0.35) continues it, frame 4 (0.3) ends it -> frames 2..3 = [2 s, 4 s],
# score (0.6 + 0.45) / 2. Frame 5 starts another, frame 6 ends it -> frame 5 = [5 s, 6 s], 0.6.


def test_hand_worked_hysteresis():
    segments = probabilities_to_segments(one_class(HAND_CURVE), SECONDS, SECONDS + 1)
    assert as_tuples(segments) == [(0, 2.0, 4.0, 0.525), (0, 5.0, 6.0, 0.6)]
    assert segments[0].duration_s == 2.0


def test_hand_worked_merge_includes_gap_frames_in_score():
    # Gap between [2, 4] and [5, 6] is 1 s < 1.5 s: merged into frames 2..5 = [2 s, 6 s] with
    # score mean(0.6, 0.45, 0.3, 0.6) = 0.4875 (the gap frame 4 counts).
    segments = probabilities_to_segments(one_class(HAND_CURVE), SECONDS, SECONDS + 1, merge_gap_s=1.5)
    assert as_tuples(segments) == [(0, 2.0, 6.0, 0.4875)]
    # A gap of exactly merge_gap_s is not "shorter than" it: no merge.
    segments = probabilities_to_segments(one_class(HAND_CURVE), SECONDS, SECONDS + 1, merge_gap_s=1.0)
    assert len(segments) == 2


def test_hand_worked_min_duration_after_merge():
    # Without merging, the 1 s segment is dropped and the 2 s one kept...
    segments = probabilities_to_segments(one_class(HAND_CURVE), SECONDS, SECONDS + 1, min_duration_s=1.5)
    assert as_tuples(segments) == [(0, 2.0, 4.0, 0.525)]
    # ...with merging the merged 4 s segment survives a 3 s minimum that both parts would fail.
    segments = probabilities_to_segments(one_class(HAND_CURVE), SECONDS, SECONDS + 1,
                                         min_duration_s=3.0, merge_gap_s=1.5)
    assert as_tuples(segments) == [(0, 2.0, 6.0, 0.4875)]


def test_thresholds_are_inclusive_and_segments_touch_both_ends():
    # p == on starts, p == off continues; a segment may start at frame 0 and end at the last frame.
    p = [0.5, 0.35, 0.2, 0.5, 0.35, 0.35, 0.9]
    segments = probabilities_to_segments(one_class(p), SECONDS, SECONDS + 1)
    assert as_tuples(segments) == [(0, 0.0, 2.0, 0.425), (0, 3.0, 7.0, round((0.5 + 0.35 + 0.35 + 0.9) / 4, 9))]


def test_equal_thresholds_is_plain_thresholding():
    p = [0.6, 0.4, 0.6, 0.6, 0.1, 0.7, 0.7]
    segments = probabilities_to_segments(one_class(p), SECONDS, SECONDS + 1, threshold_on=0.5, threshold_off=0.5)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.0, 1.0), (2.0, 4.0), (5.0, 7.0)]


def test_classes_are_independent_and_sorted_by_start():
    probs = np.zeros((7, 3))
    probs[4:6, 0] = 0.9  # class 0: [4, 6]
    probs[1:3, 2] = 0.8  # class 2: [1, 3]
    probs[4:5, 1] = 0.7  # class 1: [4, 5], starts with class 0
    segments = probabilities_to_segments(probs, SECONDS, SECONDS + 1)
    assert as_tuples(segments) == [(2, 1.0, 3.0, 0.8), (0, 4.0, 6.0, 0.9), (1, 4.0, 5.0, 0.7)]
    assert all(isinstance(s, Segment) for s in segments)


def test_overlapping_snippets_merge_at_zero_gap():
    # Snippets of 1.5 s every 0.5 s (overlapping). Frames 0..2 span [0, 2.5], frames 4..5 span
    # [2.0, 4.0]: the one-frame dip leaves them overlapping in time (gap = 2.0 - 2.5 < 0), so even
    # merge_gap_s = 0 merges them into frames 0..5 with score (5 * 0.9 + 0.1) / 6.
    starts = np.arange(7) * 0.5
    p = [0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.0]
    segments = probabilities_to_segments(one_class(p), starts, starts + 1.5)
    assert as_tuples(segments) == [(0, 0.0, 4.0, round(4.6 / 6, 9))]
    # With 1 s snippets they only touch (gap = 2.0 - 2.0 = 0, not < 0): two segments.
    segments = probabilities_to_segments(one_class(p), starts, starts + 1.0)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.0, 2.0), (2.0, 3.5)]


def test_no_segments_when_never_on():
    assert probabilities_to_segments(np.full((7, 2), 0.49), SECONDS, SECONDS + 1) == []


def test_non_uniform_times_use_the_given_seconds():
    starts = np.array([0.0, 0.25, 1.0, 4.0, 4.5, 9.0, 9.5])
    ends = np.array([0.25, 1.0, 4.0, 4.5, 9.0, 9.5, 12.0])
    p = [0.0, 0.8, 0.8, 0.0, 0.0, 0.8, 0.8]
    segments = probabilities_to_segments(one_class(p), starts, ends, min_duration_s=2.9)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.25, 4.0), (9.0, 12.0)]


# --------------------------------------------------------------------------------------------
# Brute-force references on random curves
# --------------------------------------------------------------------------------------------

def state_machine_reference(probs, starts, ends, on, off, min_duration, merge_gap):
    """The rule applied frame by frame, as by hand: one pass with an 'active' flag per class."""
    result = []
    for c in range(probs.shape[1]):
        raw, active, first = [], False, None
        for t, p in enumerate(probs[:, c]):
            if not active and p >= on:
                active, first = True, t
            elif active and p < off:
                raw.append([first, t - 1])
                active = False
        if active:
            raw.append([first, len(probs) - 1])
        merged = []
        for first, last in raw:
            if merged and starts[first] - ends[merged[-1][1]] < merge_gap:
                merged[-1][1] = last
            else:
                merged.append([first, last])
        for first, last in merged:
            if ends[last] - starts[first] >= min_duration:
                result.append((c, starts[first], ends[last], probs[first:last + 1, c].mean()))
    return sorted(result, key=lambda s: (s[1], s[0], s[2]))


def definitional_reference(p, on, off):
    """All intervals [i, j] that satisfy the definition of a hysteresis segment, by enumeration."""
    frames = len(p)
    found = []
    for i, j in itertools.combinations_with_replacement(range(frames), 2):
        stays_on = all(p[k] >= off for k in range(i, j + 1))
        ends_here = j == frames - 1 or p[j + 1] < off
        run_start = i
        while run_start > 0 and p[run_start - 1] >= off:
            run_start -= 1
        first_on_of_run = p[i] >= on and all(p[k] < on for k in range(run_start, i))
        if stays_on and ends_here and first_on_of_run:
            found.append((i, j))
    return found


def smooth_random_curves(rng, frames, classes):
    """Probability curves that wander around the thresholds (random walk through a sigmoid)."""
    walk = np.cumsum(rng.normal(0.0, 0.8, size=(frames, classes)), axis=0)
    return 1.0 / (1.0 + np.exp(-(walk - walk.mean(axis=0))))


@pytest.mark.parametrize("seed", range(6))
def test_matches_state_machine_reference(seed):
    rng = np.random.default_rng(seed)
    frames, classes = 80, 4
    probs = smooth_random_curves(rng, frames, classes)
    durations = rng.uniform(0.2, 1.5, size=frames)
    ends = np.cumsum(durations)
    starts = ends - durations
    for on, off, min_duration, merge_gap in [(0.5, 0.35, 0.0, 0.0), (0.6, 0.3, 1.0, 0.0),
                                             (0.5, 0.5, 0.0, 2.0), (0.7, 0.2, 2.5, 1.5)]:
        got = probabilities_to_segments(probs, starts, ends, on, off, min_duration, merge_gap)
        expected = state_machine_reference(probs, starts, ends, on, off, min_duration, merge_gap)
        assert len(got) == len(expected)
        for segment, (c, start, end, score) in zip(got, expected):
            assert (segment.class_id, segment.start_s, segment.end_s) == (c, start, end)
            assert segment.score == pytest.approx(score, abs=1e-12)
        assert len(got) > 0  # the curves do cross the thresholds


@pytest.mark.parametrize("seed", range(4))
def test_matches_definition_by_enumeration(seed):
    rng = np.random.default_rng(100 + seed)
    p = smooth_random_curves(rng, 40, 1)[:, 0]
    got = probabilities_to_segments(p[:, None], np.arange(40.0), np.arange(40.0) + 1)
    assert [(int(s.start_s), int(s.end_s) - 1) for s in got] == definitional_reference(p, 0.5, 0.35)


def test_accepts_torch_tensors_and_lists():
    torch = pytest.importorskip("torch")
    probs = torch.tensor(HAND_CURVE, dtype=torch.float32)[:, None]
    got = probabilities_to_segments(probs, torch.arange(7.0), torch.arange(7.0) + 1)
    assert [(s.start_s, s.end_s) for s in got] == [(2.0, 4.0), (5.0, 6.0)]
    got = probabilities_to_segments([[v] for v in HAND_CURVE], list(SECONDS), list(SECONDS + 1))
    assert [(s.start_s, s.end_s) for s in got] == [(2.0, 4.0), (5.0, 6.0)]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("probs, starts, ends, kwargs, message", [
    (np.zeros(7), SECONDS, SECONDS + 1, {}, "probs must be \\(T, C\\)"),
    (np.zeros((7, 2)), SECONDS[:6], SECONDS[:6] + 1, {}, "times_start and times_end must have shape \\(7,\\)"),
    (np.full((7, 1), 1.5), SECONDS, SECONDS + 1, {}, "apply a sigmoid"),
    (np.full((7, 1), np.nan), SECONDS, SECONDS + 1, {}, "NaN"),
    (np.zeros((7, 1)), SECONDS, SECONDS - 1, {}, "frame 0 ends before it starts"),
    (np.zeros((7, 1)), SECONDS[::-1], SECONDS[::-1] + 1, {}, "times_start must be non-decreasing"),
    (np.zeros((7, 1)), SECONDS, SECONDS + 1, {"threshold_on": 0.3, "threshold_off": 0.4}, "threshold_off"),
    (np.zeros((7, 1)), SECONDS, SECONDS + 1, {"threshold_on": 1.2}, "threshold_on must be in"),
    (np.zeros((7, 1)), SECONDS, SECONDS + 1, {"min_duration_s": -1}, "min_duration_s must be >= 0"),
    (np.zeros((7, 1)), SECONDS, SECONDS + 1, {"merge_gap_s": float("nan")}, "merge_gap_s must be a finite"),
    (np.zeros((7, 1)), SECONDS, SECONDS + 1, {"threshold_on": "0.5"}, "threshold_on must be a finite"),
])
def test_bad_input_raises_value_error_naming_the_problem(probs, starts, ends, kwargs, message):
    with pytest.raises(ValueError, match=message):
        probabilities_to_segments(probs, starts, ends, **kwargs)


def test_zero_frames_gives_no_segments():
    assert probabilities_to_segments(np.zeros((0, 3)), np.zeros(0), np.zeros(0)) == []
