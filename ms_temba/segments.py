"""From per-frame class probabilities to action segments (class, start, end, score).

MS-Temba predicts, for every feature frame t of a video, an independent probability per class
(several actions can happen at once). A user of the tool wants segments instead: "class 3 from
12.4 s to 17.9 s". `probabilities_to_segments` turns each class's probability curve into segments
with this rule, applied to every class separately:

1. Hysteresis. A segment starts at a frame with p >= threshold_on and continues through the
   following frames while p >= threshold_off; it ends before the first frame with
   p < threshold_off. With threshold_off < threshold_on a curve hovering around one threshold does
   not chop an action into many pieces. Frames between the two thresholds that come *before* the
   first p >= threshold_on frame are not part of the segment (an action is only declared once it
   is confident). The segment covers frames i..j and spans [times_start[i], times_end[j]].
2. Merging. If a segment starts less than `merge_gap_s` seconds after the previous segment of the
   same class ends (gap = start - previous end < merge_gap_s), the two become one segment covering
   both and the frames between them. merge_gap_s = 0 merges only segments that overlap in time,
   which can happen with overlapping snippets (I3D snippet mode with stride < snippet length).
3. Dropping. Segments shorter than `min_duration_s` (end - start < min_duration_s) are dropped.
   Merging comes first, so fragments of one action are judged by their merged length.

The score of a segment is the mean probability of its class over all frames it covers (after
merging, including the frames of the gap).

`sweep_segments` is the variant for detection mAP: one threshold cannot give both the short
confident segments and the long faint ones, which limits recall. It applies the rule above at
several thresholds (threshold_on = threshold_off = each threshold in turn), pools the segments of
all thresholds, and removes near-duplicates by greedy non-maximum suppression per class: segments
are visited by decreasing score and one is dropped when its tIoU with an already kept segment of
its class exceeds `nms_tiou`. Pooled over thresholds, the mean probability is a poor ranking
score: the fragment of an action found at a high threshold scores higher than the whole action,
and is a false positive at high tIoU. The sweep therefore scores a segment by its contrast with
its surroundings (`context_ratio`, the "inner minus outer" actionness score of temporal action
proposal methods): mean probability over its frames minus the mean over the
ceil(context_ratio * frames) frames (at least 1) on each side of it, clipped to [0, 1]. A
fragment of a longer action has high probability around it and scores low. On the synthetic test
videos (30 videos, the default pipeline's model): detection mAP (tIoU 0.1..0.9) 50.4 % with the
hysteresis rule, 40 % with the sweep scored by the mean, 53.2 % with the contrast score (NMS 0.5).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["Segment", "probabilities_to_segments", "sweep_segments", "nms"]


@dataclass(frozen=True)
class Segment:
    """One detected action: class `class_id` from `start_s` to `end_s` seconds, mean probability `score`."""

    class_id: int
    start_s: float
    end_s: float
    score: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def probabilities_to_segments(
    probs,
    times_start,
    times_end,
    threshold_on: float = 0.5,
    threshold_off: float = 0.35,
    min_duration_s: float = 0.0,
    merge_gap_s: float = 0.0,
) -> list[Segment]:
    """Segments of every class from per-frame probabilities, by the rule in the module docstring.

    Args:
        probs: (T, C) probabilities in [0, 1] (numpy array, torch CPU tensor or nested lists).
        times_start, times_end: (T,) seconds; frame t covers [times_start[t], times_end[t]].
            times_start must be non-decreasing and times_end >= times_start.
        threshold_on: a segment starts at a frame with p >= threshold_on.
        threshold_off: it continues while p >= threshold_off (must be <= threshold_on).
        min_duration_s: segments shorter than this are dropped (after merging).
        merge_gap_s: same-class segments less than this far apart are merged.

    Returns:
        The segments sorted by start time, then class id.

    Raises:
        ValueError naming the problem: wrong shapes, NaN/inf or values outside [0, 1], times that
        go backwards, thresholds outside [0, 1] or threshold_off > threshold_on, negative durations.
    """
    probs, times_start, times_end = _check_arrays(probs, times_start, times_end)
    threshold_on = _check_number("threshold_on", threshold_on, low=0.0, high=1.0)
    threshold_off = _check_number("threshold_off", threshold_off, low=0.0, high=1.0)
    if threshold_off > threshold_on:
        raise ValueError(
            f"threshold_off ({threshold_off}) must be <= threshold_on ({threshold_on}): a segment "
            f"has to stay on at least as long as it takes to switch on"
        )
    min_duration_s = _check_number("min_duration_s", min_duration_s, low=0.0)
    merge_gap_s = _check_number("merge_gap_s", merge_gap_s, low=0.0)

    segments = []
    for class_id in range(probs.shape[1]):
        p = probs[:, class_id]
        frame_ranges = _hysteresis_runs(p, threshold_on, threshold_off)
        frame_ranges = _merge_close(frame_ranges, times_start, times_end, merge_gap_s)
        for first, last in frame_ranges:
            start_s, end_s = float(times_start[first]), float(times_end[last])
            if end_s - start_s < min_duration_s:
                continue
            score = float(p[first : last + 1].mean())
            segments.append(Segment(class_id, start_s, end_s, score))
    segments.sort(key=lambda s: (s.start_s, s.class_id, s.end_s))
    return segments


def sweep_segments(
    probs,
    times_start,
    times_end,
    thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    nms_tiou: float = 0.5,
    min_duration_s: float = 0.0,
    merge_gap_s: float = 0.0,
    context_ratio: float | None = 0.25,
) -> list[Segment]:
    """Segments at several thresholds, merged by per-class NMS (see the module docstring).

    Args:
        probs, times_start, times_end, min_duration_s, merge_gap_s: as in `probabilities_to_segments`.
        thresholds: non-empty list of thresholds in [0, 1]; at each one a segment is a run of
            frames with p >= threshold (merged and filtered as in `probabilities_to_segments`).
        nms_tiou: in [0, 1]; a segment whose tIoU with a higher-scoring kept segment of its class
            is > nms_tiou is dropped. 1 keeps every distinct segment (exact duplicates, found at
            several thresholds, are always dropped).
        context_ratio: the score is the segment's mean probability minus the mean over
            ceil(context_ratio * its frames) frames (at least 1) on each side, clipped to [0, 1];
            None scores by the mean probability alone, as `probabilities_to_segments` does.

    Returns:
        The kept segments sorted by start time, then class id.
    """
    thresholds = [_check_number("thresholds[]", t, low=0.0, high=1.0) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    nms_tiou = _check_number("nms_tiou", nms_tiou, low=0.0, high=1.0)
    if context_ratio is not None:
        context_ratio = _check_number("context_ratio", context_ratio, low=0.0)
    min_duration_s = _check_number("min_duration_s", min_duration_s, low=0.0)
    merge_gap_s = _check_number("merge_gap_s", merge_gap_s, low=0.0)
    probs, times_start, times_end = _check_arrays(probs, times_start, times_end)
    pooled: list[Segment] = []
    for class_id in range(probs.shape[1]):
        p = probs[:, class_id]
        for threshold in sorted(set(thresholds)):
            ranges = _merge_close(_hysteresis_runs(p, threshold, threshold), times_start, times_end, merge_gap_s)
            for first, last in ranges:
                start_s, end_s = float(times_start[first]), float(times_end[last])
                if end_s - start_s < min_duration_s:
                    continue
                score = float(p[first : last + 1].mean())
                if context_ratio is not None:
                    width = max(1, int(np.ceil(context_ratio * (last - first + 1))))
                    outside = np.concatenate([p[max(0, first - width) : first], p[last + 1 : last + 1 + width]])
                    score = min(max(score - (float(outside.mean()) if outside.size else 0.0), 0.0), 1.0)
                pooled.append(Segment(class_id, start_s, end_s, score))
    kept = nms(pooled, nms_tiou)
    kept.sort(key=lambda s: (s.start_s, s.class_id, s.end_s))
    return kept


def nms(segments: list[Segment], tiou: float) -> list[Segment]:
    """Greedy non-maximum suppression per class: by decreasing score (ties: longer first, then
    earlier), keep a segment unless it repeats a kept one of its class exactly or overlaps one with
    tIoU > `tiou`. Returns the kept segments in that visiting order."""
    order = sorted(segments, key=lambda s: (-s.score, -(s.end_s - s.start_s), s.start_s, s.class_id))
    kept_of: dict[int, list[Segment]] = {}
    kept = []
    for segment in order:
        others = kept_of.setdefault(segment.class_id, [])
        if any(_segment_iou(segment, other) > tiou or (segment.start_s, segment.end_s) == (other.start_s, other.end_s)
               for other in others):
            continue
        others.append(segment)
        kept.append(segment)
    return kept


def _segment_iou(a: Segment, b: Segment) -> float:
    intersection = max(0.0, min(a.end_s, b.end_s) - max(a.start_s, b.start_s))
    union = (a.end_s - a.start_s) + (b.end_s - b.start_s) - intersection
    return intersection / union if union > 0 else 0.0


def _hysteresis_runs(p: np.ndarray, on: float, off: float) -> list[tuple[int, int]]:
    """Inclusive frame ranges (first, last) of the hysteresis segments of one probability curve.

    Every maximal run of frames with p >= off holds at most one segment: the segment starts at the
    run's first frame with p >= on (if any) and ends with the run, because within the run p never
    drops below off, and the frame after the run has p < off.
    """
    above_off = np.concatenate([[False], p >= off, [False]])
    edges = np.flatnonzero(np.diff(above_off.astype(np.int8)))
    run_starts, run_ends = edges[0::2], edges[1::2] - 1  # inclusive run ends
    ranges = []
    for run_start, run_end in zip(run_starts, run_ends):
        on_frames = np.flatnonzero(p[run_start : run_end + 1] >= on)
        if on_frames.size:
            ranges.append((int(run_start + on_frames[0]), int(run_end)))
    return ranges


def _merge_close(ranges, times_start, times_end, merge_gap_s: float) -> list[tuple[int, int]]:
    """Merge consecutive frame ranges whose gap in seconds is < merge_gap_s."""
    merged: list[tuple[int, int]] = []
    for first, last in ranges:
        if merged and times_start[first] - times_end[merged[-1][1]] < merge_gap_s:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _check_arrays(probs, times_start, times_end):
    probs = np.asarray(probs, dtype=np.float64)
    times_start = np.asarray(times_start, dtype=np.float64)
    times_end = np.asarray(times_end, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (T, C) = (frames, classes), got shape {probs.shape}")
    frames = probs.shape[0]
    if times_start.shape != (frames,) or times_end.shape != (frames,):
        raise ValueError(
            f"times_start and times_end must have shape ({frames},) like probs' first axis, got "
            f"{times_start.shape} and {times_end.shape}"
        )
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or inf")
    if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
        raise ValueError(
            f"probs must be probabilities in [0, 1] (apply a sigmoid to logits first), got values "
            f"in [{probs.min():.4g}, {probs.max():.4g}]"
        )
    if not (np.isfinite(times_start).all() and np.isfinite(times_end).all()):
        raise ValueError("times_start / times_end contain NaN or inf")
    if (times_end < times_start).any():
        t = int(np.flatnonzero(times_end < times_start)[0])
        raise ValueError(f"frame {t} ends before it starts: [{times_start[t]}, {times_end[t]}]")
    if (np.diff(times_start) < 0).any():
        t = int(np.flatnonzero(np.diff(times_start) < 0)[0]) + 1
        raise ValueError(
            f"times_start must be non-decreasing, but frame {t} starts at {times_start[t]} s, "
            f"before frame {t - 1} ({times_start[t - 1]} s)"
        )
    return probs, times_start, times_end


def _check_number(name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return float(value)
