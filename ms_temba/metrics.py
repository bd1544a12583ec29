"""Evaluation metrics of dense (per-frame, multi-label) action detection, streaming over videos.

Every metric takes one video at a time, `update(scores, labels, mask=None)` with scores (time,
classes) probabilities, labels (time, classes) in {0, 1} and an optional mask (time,) bool
(True = real frame; padded frames are dropped), as numpy arrays or torch tensors, and reports with
`compute() -> dict`. The frames are kept in contiguous numpy buffers that double their capacity
when full (scores float32, labels bool), never in per-frame Python objects, so evaluating tens of
thousands of videos costs only the arrays themselves.

FrameMAP                  per-frame mAP: every real frame of every video is one sample; AP per
                          class (sklearn's `average_precision_score`), averaged over the classes
                          that have at least one positive frame. The metric of MS-TCT / MS-Temba.
SampledFrameMAP           the Charades "sampled-25" variant: 25 frames per video (see
                          `charades_sample_indices`), then per-frame mAP.
ActionConditionalMetrics  action-conditional precision / recall / F1 / mAP at temporal offsets t
                          (Tirupattur et al., MLAD, CVPR 2021), which MS-TCT reports.
DetectionMAP              segment-level detection mAP at temporal IoU thresholds (0.1 .. 0.9 by
                          default), the ActivityNet / THUMOS protocol that segment detectors
                          (ActionFormer, PointTAD, OpenTAD) report; see `detection_average_precision`.

Scores are stored as float32: scores that differ only beyond float32 resolution count as ties.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = [
    "average_precision",
    "chance_map",
    "charades_sample_indices",
    "condition_frames",
    "FrameMAP",
    "SampledFrameMAP",
    "ActionConditionalMetrics",
    "DEFAULT_TIOU_THRESHOLDS",
    "DetectionMAP",
    "detection_average_precision",
    "interpolated_average_precision",
    "match_detections",
    "temporal_iou",
]

# Rows per chunk when counting co-occurrences with float32 matrix products: every partial count
# is then an integer below 2**24, which float32 represents exactly.
_COUNT_CHUNK_ROWS = 1 << 16


# --------------------------------------------------------------------------------------------
# Average precision


def average_precision(scores, labels) -> float:
    """Non-interpolated average precision of one class, as sklearn's `average_precision_score`.

    AP = sum over the distinct score thresholds, from high to low, of (R_n - R_{n-1}) * P_n, with
    P_n and R_n the precision and recall when every frame scoring >= threshold n is predicted
    positive. Frames with equal scores therefore enter together (sklearn's tie handling).

    Args:
        scores: (n,) real numbers, higher = more confident.
        labels: (n,) in {0, 1}.

    Returns:
        The AP in [0, 1], or NaN if there is no positive label (AP is undefined; sklearn warns
        and returns 0 there).
    """
    scores = _to_numpy(scores, "scores")
    labels = _to_numpy(labels, "labels")
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-D of the same length, got shapes {scores.shape} and "
            f"{labels.shape}"
        )
    _check_finite(scores, "scores")
    labels = _check_binary(labels, "labels")
    return _binary_average_precision(scores.astype(np.float64), labels)


def _average_precision_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every column: scores (n, C) real, labels (n, C) bool -> (C,) float64, NaN where a
    column has no positive."""
    return np.array([_binary_average_precision(np.ascontiguousarray(scores[:, c]),
                                               np.ascontiguousarray(labels[:, c]))
                     for c in range(scores.shape[1])], dtype=np.float64)


def _binary_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one class (see `average_precision`): scores (n,) real, labels (n,) bool."""
    positives = np.count_nonzero(labels)
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")  # high to low
    sorted_scores, sorted_labels = scores[order], labels[order]
    # One threshold per distinct score, at the last frame of its run of equal scores.
    run_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    true_positives = np.cumsum(sorted_labels)[run_ends]
    precision = true_positives / (run_ends + 1)
    recall_gain = np.diff(true_positives, prepend=0) / positives  # R_n - R_{n-1}
    return float(np.sum(recall_gain * precision))


def chance_map(labels, mask=None) -> float:
    """The mAP of a constant score: the mean, over the classes with positives, of each class's
    positive rate (with every frame tied, AP = precision at the single threshold = positives / n).

    Args:
        labels: (frames, classes) in {0, 1}, e.g. every real frame of a data set stacked.
        mask: optional (frames,) bool, True = frame counts.
    """
    labels = _check_binary(_to_numpy(labels, "labels"), "labels")
    if labels.ndim != 2:
        raise ValueError(f"labels must be (frames, classes), got shape {labels.shape}")
    if mask is not None:
        labels = labels[_check_mask(mask, len(labels))]
    if len(labels) == 0:
        raise ValueError("chance_map needs at least one frame")
    positive_rate = labels.mean(axis=0)
    has_positives = positive_rate > 0
    return float(positive_rate[has_positives].mean()) if has_positives.any() else float("nan")


def charades_sample_indices(num_frames: int, samples: int = 25) -> np.ndarray:
    """The frames a video contributes to the Charades "sampled-25" mAP.

    Charades_v1_localize.m (the official localisation evaluation) scores every test video at the
    `samples` time points j * duration / samples, j = 0..samples-1. With the video's `num_frames`
    feature steps spread evenly over its duration (step i at time i * duration / num_frames), time
    point j falls in step floor(j * num_frames / samples); that is the index returned here.
    A video with at most `samples` steps contributes each of its steps once (its time points cover
    every step, some twice; we do not double-count). MS-TCT's `sampled_25` approximates the same
    thing with indices 1, 1 + s, 1 + 2s, ... (s = int(num_frames / 25)) and drops short videos.
    """
    num_frames = int(num_frames)
    if num_frames <= samples:
        return np.arange(num_frames)
    return (np.arange(samples) * num_frames) // samples


# --------------------------------------------------------------------------------------------
# Streaming storage


class _GrowingArray:
    """Rows appended to one contiguous numpy array whose capacity doubles when full, so that n
    appends cost O(n) copies in total and no Python object per row."""

    def __init__(self, row_shape: tuple[int, ...], dtype, capacity: int = 1024):
        self._data = np.empty((capacity, *row_shape), dtype=dtype)
        self._size = 0

    def append(self, rows: np.ndarray) -> None:
        needed = self._size + len(rows)
        if needed > len(self._data):
            grown = np.empty((max(needed, 2 * len(self._data)), *self._data.shape[1:]),
                             dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = rows
        self._size = needed

    @property
    def array(self) -> np.ndarray:
        """A view of the rows appended so far."""
        return self._data[: self._size]

    def __len__(self) -> int:
        return self._size


class _FrameStore:
    """The real frames of every video seen so far: scores (frames, classes) float32, labels
    (frames, classes) bool, and each video's number of frames (videos follow each other)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.scores = _GrowingArray((num_classes,), np.float32)
        self.labels = _GrowingArray((num_classes,), np.bool_)
        self.video_lengths = _GrowingArray((), np.int64, capacity=256)

    def add_frames(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.scores.append(scores)
        self.labels.append(labels)
        self.video_lengths.append(np.array([len(scores)]))

    @property
    def num_frames(self) -> int:
        return len(self.scores)

    @property
    def num_videos(self) -> int:
        return len(self.video_lengths)

    def videos(self):
        """Yield (scores, labels) views of each video's frames, in the order they were added."""
        stops = np.cumsum(self.video_lengths.array)
        starts = stops - self.video_lengths.array
        scores, labels = self.scores.array, self.labels.array
        for start, stop in zip(starts, stops):
            yield scores[start:stop], labels[start:stop]


# --------------------------------------------------------------------------------------------
# Per-frame mAP


class FrameMAP:
    """Per-frame mAP over all real frames of all videos (the metric MS-TCT and MS-Temba report).

        metric = FrameMAP(num_classes=157)
        for scores, labels in videos:          # (time, classes) each
            metric.update(scores, labels)
        metric.compute()["map"]

    compute() -> {"map": mean AP over the classes with at least one positive frame (NaN if no
    class has one), "ap": (classes,) AP per class, NaN where a class has no positive frame,
    "num_frames": frames evaluated, "num_videos": videos seen}.
    """

    def __init__(self, num_classes: int):
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.reset()

    def reset(self) -> None:
        self._frames = _FrameStore(self.num_classes)

    def update(self, scores, labels, mask=None) -> None:
        """Add one video: scores, labels (time, classes); mask (time,) bool, True = real frame."""
        scores, labels = _video_frames(scores, labels, mask, self.num_classes)
        keep = self._frames_to_evaluate(len(scores))
        self._frames.add_frames(scores[keep], labels[keep])

    def _frames_to_evaluate(self, num_frames: int):
        """Which of a video's real frames are samples of the metric: all of them."""
        return slice(None)

    def compute(self) -> dict:
        ap = _average_precision_columns(self._frames.scores.array, self._frames.labels.array)
        has_positives = ~np.isnan(ap)
        mean_ap = float(ap[has_positives].mean()) if has_positives.any() else float("nan")
        return {"map": mean_ap, "ap": ap, "num_frames": self._frames.num_frames,
                "num_videos": self._frames.num_videos}


class SampledFrameMAP(FrameMAP):
    """Charades "sampled-25" per-frame mAP: each video contributes the frames of
    `charades_sample_indices(num_real_frames, samples)` (25 evenly spaced frames at the official
    Charades_v1_localize time points, or all frames of a video with at most 25), then per-frame
    mAP as in `FrameMAP`."""

    def __init__(self, num_classes: int, samples: int = 25):
        self.samples = _positive_int(samples, "samples")
        super().__init__(num_classes)

    def _frames_to_evaluate(self, num_frames: int):
        return charades_sample_indices(num_frames, self.samples)


# --------------------------------------------------------------------------------------------
# Action-conditional metrics (MLAD)


class ActionConditionalMetrics:
    """Action-conditional precision, recall, F1 and mAP (Tirupattur, Duarte, Rawat, Shah:
    "Modeling Multi-Label Action Dependencies for Temporal Action Localization", CVPR 2021),
    as computed by the authors' `conditional_metric` (MLAD src/cooccur_metric.py, copied into
    MS-TCT's utils.py as "the official implementation of the action-conditional metrics").

    They measure how well a model detects action c_i at frame s *given* that action c_j happens
    (t = 0) or has just happened (t > 0). For an offset t and a class c_j, the condition frames are

        t = 0:  the frames s where c_j is active;
        t > 0:  the frames s where c_j is not active at s but is active at some frame of the
                window s-t+1 .. s of the same video (so within the previous t-1 frames).

    For every ordered pair (c_i, c_j), i != j, whose condition frames contain at least one
    positive of c_i, on those frames:

        precision(c_i | c_j, t) = TP / predicted positives (0 when nothing is predicted)
        recall(c_i | c_j, t)    = TP / positives of c_i
        AP(c_i | c_j, t)        = average precision of c_i's scores

    with predictions scores >= threshold. The reported precision, recall and mAP are the means
    over those pairs; F1 = 2 P R / (P + R) of the mean precision P and mean recall R (as the
    authors compute it, not the mean of per-pair F1s; they add 1e-9 to the denominator). Negative
    offsets are rejected: the reference code's t < 0 branch does not compute its documented
    "next |t| frames" condition, and MS-TCT / MS-Temba report t = 0, 20, 40 only.

    compute() -> {f"t{t}": {"precision", "recall", "f1", "map" (floats in [0, 1], NaN if no pair
    qualifies), "num_pairs": number of (c_i, c_j) pairs averaged}} for each offset t.
    """

    def __init__(self, num_classes: int, offsets=(0, 20, 40), threshold: float = 0.5):
        self.num_classes = _positive_int(num_classes, "num_classes")
        offsets = tuple(offsets)
        for t in offsets:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
                raise ValueError(f"offsets must be non-negative ints, got {t!r} in {offsets}")
        if len(set(offsets)) != len(offsets) or not offsets:
            raise ValueError(f"offsets must be distinct and non-empty, got {offsets}")
        self.offsets = tuple(int(t) for t in offsets)
        if not isinstance(threshold, numbers.Real) or not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self._frames = _FrameStore(self.num_classes)

    def update(self, scores, labels, mask=None) -> None:
        """Add one video: scores, labels (time, classes); mask (time,) bool, True = real frame.
        The windows of t > 0 run over the real frames of this video only."""
        self._frames.add_frames(*_video_frames(scores, labels, mask, self.num_classes))

    def compute(self) -> dict:
        scores, labels = self._frames.scores.array, self._frames.labels.array
        predicted = scores >= self.threshold
        correct = predicted & labels
        off_diagonal = ~np.eye(self.num_classes, dtype=bool)
        results = {}
        for t in self.offsets:
            condition = np.concatenate(
                [condition_frames(video_labels, t) for _, video_labels in self._frames.videos()]
                or [np.zeros((0, self.num_classes), dtype=bool)]
            )
            # [i, j] = number of condition frames of c_j where c_i is positive / predicted / both.
            positives = _cooccurrence_counts(labels, condition)
            predictions = _cooccurrence_counts(predicted, condition)
            true_positives = _cooccurrence_counts(correct, condition)
            pairs = off_diagonal & (positives > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                precision = np.where(predictions > 0, true_positives / predictions, 0.0)
                recall = true_positives / positives
            ap = np.full((self.num_classes, self.num_classes), np.nan)
            for j in np.flatnonzero(pairs.any(axis=0)):
                # AP of the classes paired with c_j, over c_j's condition frames.
                subset = np.ix_(condition[:, j], pairs[:, j])
                ap[pairs[:, j], j] = _average_precision_columns(scores[subset], labels[subset])
            results[f"t{t}"] = _summarise_pairs(precision, recall, ap, pairs)
        return results


def condition_frames(labels: np.ndarray, offset: int) -> np.ndarray:
    """The condition frames of one video for `ActionConditionalMetrics` at offset t.

    labels: (time, classes) bool. Returns (time, classes) bool, [s, j] True where frame s
    conditions on c_j: c_j active at s (t = 0); c_j inactive at s but active somewhere in frames
    max(0, s-t+1) .. s (t > 0).
    """
    if offset == 0:
        return labels.copy()
    # prefix[s] = number of active frames before s, per class; window sums are differences.
    prefix = np.zeros((len(labels) + 1, labels.shape[1]), dtype=np.int64)
    np.cumsum(labels, axis=0, out=prefix[1:])
    window_start = np.maximum(np.arange(len(labels)) - offset + 1, 0)
    active_in_window = (prefix[1:] - prefix[window_start]) > 0
    return active_in_window & ~labels


def _cooccurrence_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[i, j] = number of rows where a[:, i] and b[:, j] are both True; a, b (rows, C) bool."""
    counts = np.zeros((a.shape[1], b.shape[1]), dtype=np.int64)
    for start in range(0, len(a), _COUNT_CHUNK_ROWS):
        stop = start + _COUNT_CHUNK_ROWS
        chunk = a[start:stop].T.astype(np.float32) @ b[start:stop].astype(np.float32)
        counts += np.rint(chunk).astype(np.int64)
    return counts


def _summarise_pairs(precision, recall, ap, pairs) -> dict:
    num_pairs = int(pairs.sum())
    if num_pairs == 0:
        nan = float("nan")
        return {"precision": nan, "recall": nan, "f1": nan, "map": nan, "num_pairs": 0}
    mean_precision = float(precision[pairs].mean())
    mean_recall = float(recall[pairs].mean())
    total = mean_precision + mean_recall
    f1 = 2 * mean_precision * mean_recall / total if total > 0 else 0.0
    return {"precision": mean_precision, "recall": mean_recall, "f1": f1,
            "map": float(ap[pairs].mean()), "num_pairs": num_pairs}


# --------------------------------------------------------------------------------------------
# Segment-level detection mAP (ActivityNet / THUMOS protocol)

DEFAULT_TIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def temporal_iou(start, end, starts, ends) -> np.ndarray:
    """tIoU of the segment [start, end] with each of the segments [starts[i], ends[i]]:
    intersection / union of the time intervals (ActivityNet's `segment_iou`). A zero union
    (two empty segments at the same time) has tIoU 0."""
    starts, ends = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    intersection = np.clip(np.minimum(end, ends) - np.maximum(start, starts), 0.0, None)
    union = (end - start) + (ends - starts) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def interpolated_average_precision(precision, recall) -> float:
    """Area under the interpolated precision-recall curve, exactly as ActivityNet's
    `interpolated_prec_rec` (Evaluation/utils.py, also used by THUMOS14 evaluations in OpenTAD):
    the curve is padded with (recall 0, precision 0) and (recall 1, precision 0), precision is made
    monotone from the right (p(r) = max precision at any recall >= r), and AP is the sum of
    (r_i - r_{i-1}) * p_i over the points where recall changes. Not the 11-point VOC variant."""
    precision = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    recall = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changes = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[changes] - recall[changes - 1]) * precision[changes]))


def match_detections(starts, ends, ground_starts, ground_ends, tiou_thresholds) -> np.ndarray:
    """Greedy one-to-one matching of the detections of one class in one video, given in rank order
    (highest score first), to that class's ground-truth instances in the same video.

    At each threshold, detection i (in order) takes the not-yet-matched instance of highest tIoU
    among those with tIoU >= threshold (the first of equal ones) and is a true positive; if there is
    none it is a false positive. This is ActivityNet's `compute_average_precision_detection`
    restricted to one video (matching never crosses videos, so matching video by video in global
    rank order gives the same result).

    Returns (thresholds, detections) bool, True = true positive.
    """
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    true_positive = np.zeros((len(thresholds), len(starts)), dtype=bool)
    if len(starts) == 0 or len(ground_starts) == 0:
        return true_positive
    iou = np.stack([temporal_iou(s, e, ground_starts, ground_ends) for s, e in zip(starts, ends)])
    for k, threshold in enumerate(thresholds):
        free = np.ones(len(ground_starts), dtype=bool)
        for i in range(len(starts)):
            candidates = np.where(free & (iou[i] >= threshold), iou[i], -1.0)
            best = int(np.argmax(candidates))
            if candidates[best] >= 0:
                free[best] = False
                true_positive[k, i] = True
    return true_positive


def detection_average_precision(detections, ground_truth, tiou_thresholds=DEFAULT_TIOU_THRESHOLDS) -> np.ndarray:
    """Detection AP of one class at each tIoU threshold (ActivityNet / THUMOS protocol).

    Args:
        detections: (video, start, end, score) rows of one class, any order; `video` is any
            hashable id (matching is within a video).
        ground_truth: (video, start, end) rows of the same class.
        tiou_thresholds: the tIoU thresholds.

    The detections of all videos are ranked by score, highest first (ties keep the input order: a
    stable sort, where ActivityNet's pandas sort is not stable), each is matched greedily as in
    `match_detections`, and AP at a threshold is `interpolated_average_precision` of the
    precision TP_n / n and recall TP_n / (ground-truth instances) after the n first detections.
    A detection in a video without an instance of the class is a false positive.

    Returns (thresholds,) float64: AP in [0, 1]; NaN when the class has no ground-truth instance.
    """
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    ground_truth = list(ground_truth)
    if not ground_truth:
        return np.full(len(thresholds), np.nan)
    detections = list(detections)
    if not detections:
        return np.zeros(len(thresholds))
    scores = np.array([float(d[3]) for d in detections])
    order = np.argsort(-scores, kind="stable")
    ground_of: dict = {}
    for video, start, end in ground_truth:
        ground_of.setdefault(video, []).append((float(start), float(end)))
    ranked_of: dict = {}
    for rank, index in enumerate(order):
        ranked_of.setdefault(detections[index][0], []).append(rank)
    true_positive = np.zeros((len(thresholds), len(detections)), dtype=bool)
    for video, ranks in ranked_of.items():
        instances = ground_of.get(video)
        if not instances:
            continue
        rows = [detections[order[r]] for r in ranks]
        true_positive[:, ranks] = match_detections(
            [float(r[1]) for r in rows], [float(r[2]) for r in rows],
            [s for s, _ in instances], [e for _, e in instances], thresholds)
    cumulative = np.cumsum(true_positive, axis=1)
    precision = cumulative / np.arange(1, len(detections) + 1)
    recall = cumulative / len(ground_truth)
    return np.array([interpolated_average_precision(precision[k], recall[k]) for k in range(len(thresholds))])


class DetectionMAP:
    """Segment-level detection mAP at tIoU thresholds over many videos (ActivityNet / THUMOS
    protocol; see `detection_average_precision` for the ranking, matching and interpolation).

        metric = DetectionMAP(num_classes=157)
        for detections, ground_truth in videos:
            metric.update(detections, ground_truth)  # one video each
        result = metric.compute()
        result["map"], result["map_at"]

    update(detections, ground_truth, video_id=None): detections are (class_id, start_s, end_s,
    score) rows or objects with those attributes (ms_temba.segments.Segment); ground_truth are
    (class_id, start_s, end_s) rows. Videos are told apart by `video_id` (default: the update's
    number).

    compute() -> {"map": mean over the thresholds of map_at, "map_at": {threshold: mean AP over the
    classes with ground truth}, "ap": (thresholds, classes) AP, NaN where a class has no
    ground-truth instance, "class_ap": (classes,) AP averaged over the thresholds,
    "tiou_thresholds": the thresholds, "num_detections", "num_instances", "num_videos"}.
    """

    def __init__(self, num_classes: int, tiou_thresholds=DEFAULT_TIOU_THRESHOLDS):
        self.num_classes = _positive_int(num_classes, "num_classes")
        thresholds = tuple(float(t) for t in tiou_thresholds)
        if not thresholds or any(not (0 < t <= 1) for t in thresholds):
            raise ValueError(f"tiou_thresholds must be a non-empty list of numbers in (0, 1], got {thresholds}")
        self.tiou_thresholds = thresholds
        self.reset()

    def reset(self) -> None:
        self._detections = [[] for _ in range(self.num_classes)]
        self._ground_truth = [[] for _ in range(self.num_classes)]
        self._videos = 0

    def update(self, detections, ground_truth, video_id=None) -> None:
        video = self._videos if video_id is None else video_id
        for detection in detections:
            if hasattr(detection, "class_id"):
                detection = (detection.class_id, detection.start_s, detection.end_s, detection.score)
            class_id, start, end, score = detection
            self._check_row(class_id, start, end, "detection")
            if not np.isfinite(score):
                raise ValueError(f"detection score must be finite, got {score!r}")
            self._detections[int(class_id)].append((video, float(start), float(end), float(score)))
        for class_id, start, end in ground_truth:
            self._check_row(class_id, start, end, "ground-truth instance")
            self._ground_truth[int(class_id)].append((video, float(start), float(end)))
        self._videos += 1

    def _check_row(self, class_id, start, end, what: str) -> None:
        if not (isinstance(class_id, numbers.Integral) and 0 <= class_id < self.num_classes):
            raise ValueError(f"{what} class must be an int in [0, {self.num_classes}), got {class_id!r}")
        if not (np.isfinite(start) and np.isfinite(end) and end >= start):
            raise ValueError(f"{what} must have finite times with end >= start, got [{start}, {end}]")

    def compute(self) -> dict:
        ap = np.stack([detection_average_precision(self._detections[c], self._ground_truth[c], self.tiou_thresholds)
                       for c in range(self.num_classes)], axis=1)
        has_ground_truth = ~np.isnan(ap[0])
        map_at = {t: (float(ap[k, has_ground_truth].mean()) if has_ground_truth.any() else float("nan"))
                  for k, t in enumerate(self.tiou_thresholds)}
        return {"map": float(np.mean(list(map_at.values()))), "map_at": map_at, "ap": ap,
                "class_ap": ap.mean(axis=0), "tiou_thresholds": self.tiou_thresholds,
                "num_detections": sum(map(len, self._detections)),
                "num_instances": sum(map(len, self._ground_truth)), "num_videos": self._videos}


# --------------------------------------------------------------------------------------------
# Input checks


def _to_numpy(x, name: str) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16 (autocast outputs); float32 holds every bfloat16 value exactly.
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array or a tensor, got {type(x).__name__}") from error


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")


def _check_binary(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype == np.bool_:
        return x
    if not np.issubdtype(x.dtype, np.number) or not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be 0 or 1 (or bool)")
    return x.astype(bool)


def _check_mask(mask, length: int) -> np.ndarray:
    mask = _to_numpy(mask, "mask")
    if mask.shape != (length,):
        raise ValueError(f"mask has shape {mask.shape} but the video has {length} frames: "
                         f"expected ({length},)")
    return _check_binary(mask, "mask")


def _video_frames(scores, labels, mask, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one video's inputs; returns its real frames: scores float32, labels bool."""
    scores = _to_numpy(scores, "scores")
    labels = _to_numpy(labels, "labels")
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(
            f"scores must be (time, classes) with classes = {num_classes}, got shape {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise ValueError(f"labels have shape {labels.shape} but scores have {scores.shape}")
    labels = _check_binary(labels, "labels")
    if mask is not None:
        mask = _check_mask(mask, len(scores))
        scores, labels = scores[mask], labels[mask]
    _check_finite(scores, "scores")
    return scores.astype(np.float32), labels


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
