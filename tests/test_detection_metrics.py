"""Segment-level detection mAP (ms_temba.metrics.DetectionMAP and friends) against independent
references: ActivityNet's matching loop transcribed literally, the interpolated PR area computed
from its definition with exact fractions, hand-made cases with known AP, and scikit-learn where
the protocols coincide. Also ms_temba.segments.sweep_segments / nms."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from ms_temba.metrics import (
    DEFAULT_TIOU_THRESHOLDS,
    DetectionMAP,
    detection_average_precision,
    interpolated_average_precision,
    temporal_iou,
)
from ms_temba.segments import Segment, nms, probabilities_to_segments, sweep_segments


# --------------------------------------------------------------------------------------------
# References written from the definitions


def reference_iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def brute_force_true_positives(detections, ground_truth, threshold):
    """ActivityNet's compute_average_precision_detection loop, literally: detections ranked by score
    (stable), each walks the ground truth of its video by decreasing tIoU; below the threshold it is a
    false positive, a locked instance is skipped, the first free one is taken."""
    order = sorted(range(len(detections)), key=lambda i: -detections[i][3])
    locked = [False] * len(ground_truth)
    flags = []
    for i in order:
        video, start, end, _ = detections[i]
        mine = [j for j, g in enumerate(ground_truth) if g[0] == video]
        ious = {j: reference_iou((start, end), ground_truth[j][1:]) for j in mine}
        matched = False
        for j in sorted(mine, key=lambda j: (-ious[j], j)):
            if ious[j] < threshold:
                break
            if locked[j]:
                continue
            locked[j] = matched = True
            break
        flags.append(matched)
    return flags


def exact_interpolated_area(flags, num_ground_truth):
    """Area under p_interp(r) = max{precision_n : recall_n >= r} over r in [0, 1], exactly."""
    points, tp = [], 0
    for n, flag in enumerate(flags, start=1):
        tp += flag
        points.append((Fraction(tp, num_ground_truth), Fraction(tp, n)))
    area, previous = Fraction(0), Fraction(0)
    for level in sorted({r for r, _ in points if r > 0}):
        best = max(p for r, p in points if r >= level)
        area += (level - previous) * best
        previous = level
    return area


def reference_ap(detections, ground_truth, threshold):
    if not ground_truth:
        return float("nan")
    return float(exact_interpolated_area(brute_force_true_positives(detections, ground_truth, threshold),
                                         len(ground_truth)))


def random_case(rng, num_videos=4, instances=6, detections=15):
    ground_truth, dets = [], []
    for v in range(num_videos):
        for _ in range(int(rng.integers(0, instances))):
            start = float(rng.uniform(0, 100))
            ground_truth.append((v, start, start + float(rng.uniform(1, 20))))
        for _ in range(int(rng.integers(0, detections))):
            if ground_truth and rng.random() < 0.6:  # near an instance (of any video: some miss)
                _, s, e = ground_truth[int(rng.integers(len(ground_truth)))]
                s, e = s + rng.normal(0, 2), e + rng.normal(0, 2)
                start, end = min(s, e), max(s, e)
            else:
                start = float(rng.uniform(0, 100))
                end = start + float(rng.uniform(0.5, 20))
            score = float(np.round(rng.random(), 1))  # ties happen
            dets.append((v, float(start), float(end), score))
    return dets, ground_truth


# --------------------------------------------------------------------------------------------
# Against the references


@pytest.mark.parametrize("seed", range(40))
def test_detection_ap_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    detections, ground_truth = random_case(rng)
    ours = detection_average_precision(detections, ground_truth, DEFAULT_TIOU_THRESHOLDS)
    expected = [reference_ap(detections, ground_truth, t) for t in DEFAULT_TIOU_THRESHOLDS]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


def test_interpolated_ap_is_activitynet_formula():
    # ActivityNet's interpolated_prec_rec, transcribed with its Python loop.
    def activitynet(prec, rec):
        mprec = np.hstack([[0], prec, [0]])
        mrec = np.hstack([[0], rec, [1]])
        for i in range(len(mprec) - 1)[::-1]:
            mprec[i] = max(mprec[i], mprec[i + 1])
        idx = np.where(mrec[1::] != mrec[0:-1])[0] + 1
        return np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx])

    rng = np.random.default_rng(0)
    for _ in range(50):
        flags = rng.random(int(rng.integers(1, 30))) < 0.4
        positives = int(flags.sum()) + int(rng.integers(0, 4))
        if positives == 0:
            continue
        tp = np.cumsum(flags)
        prec, rec = tp / np.arange(1, len(flags) + 1), tp / positives
        assert interpolated_average_precision(prec, rec) == pytest.approx(activitynet(prec, rec), abs=1e-12)


def test_temporal_iou():
    np.testing.assert_allclose(temporal_iou(0, 10, [0, 5, 10, 20, 2], [10, 15, 20, 30, 12]),
                               [1.0, 5 / 15, 0.0, 0.0, 8 / 12])
    assert temporal_iou(3, 3, [3], [3])[0] == 0.0


# --------------------------------------------------------------------------------------------
# Hand-made cases


def ap_at(detections, ground_truth, thresholds=DEFAULT_TIOU_THRESHOLDS):
    return detection_average_precision(detections, ground_truth, thresholds)


def test_perfect_detections_have_ap_one():
    ground_truth = [("a", 0, 10), ("a", 20, 25), ("b", 3, 4)]
    detections = [(v, s, e, 0.9 - 0.1 * i) for i, (v, s, e) in enumerate(ground_truth)]
    np.testing.assert_array_equal(ap_at(detections, ground_truth), 1.0)


def test_shifted_detection_counts_up_to_its_iou():
    # [2, 12] against [0, 10]: tIoU 8 / 12 = 0.667.
    ap = ap_at([("a", 2, 12, 0.9)], [("a", 0, 10)])
    np.testing.assert_array_equal(ap, [1, 1, 1, 1, 1, 1, 0, 0, 0])


def test_duplicated_detection_is_a_false_positive():
    # Two copies of a perfect detection: TP then FP; precision 1 at recall 1: AP 1.
    np.testing.assert_array_equal(ap_at([("a", 0, 10, 0.9), ("a", 0, 10, 0.8)], [("a", 0, 10)]), 1.0)
    # The duplicate ranked first: the first one matches, so the better-placed copy is the FP. With a
    # false positive ranked first: precision 1/2 at recall 1.
    ap = ap_at([("a", 50, 60, 0.95), ("a", 0, 10, 0.9), ("a", 0, 10, 0.8)], [("a", 0, 10)])
    np.testing.assert_allclose(ap, 0.5)


def test_missed_instances_cap_recall():
    ground_truth = [("a", 0, 10), ("a", 20, 30), ("b", 0, 5), ("b", 10, 15)]
    ap = ap_at([("a", 0, 10, 0.9), ("b", 10, 15, 0.5)], ground_truth)
    np.testing.assert_allclose(ap, 0.5)  # recall 1/2 at precision 1
    np.testing.assert_array_equal(ap_at([], ground_truth), 0.0)
    assert np.isnan(ap_at([("a", 0, 1, 0.5)], [])).all()


def test_detection_in_a_video_without_instances_is_false_positive():
    ap = ap_at([("other", 0, 10, 0.99), ("a", 0, 10, 0.5)], [("a", 0, 10)], [0.5])
    np.testing.assert_allclose(ap, [0.5])


def test_one_detection_cannot_match_two_instances_and_vice_versa():
    # One long detection over two instances: it matches one (tIoU 10/25 each at 0.3), misses the other.
    ap = ap_at([("a", 0, 25, 0.9)], [("a", 0, 10), ("a", 15, 25)], [0.3])
    np.testing.assert_allclose(ap, [0.5])


# --------------------------------------------------------------------------------------------
# scikit-learn, where the protocols coincide


def unit_cells_case(rng, cells=40):
    """Every time cell [t, t+1] holds one detection with a distinct random score; the instances are
    some of the cells. tIoU is then 1 (same cell) or 0, so detection matching is per-cell
    classification and the PR curve is sklearn's."""
    positives = rng.random(cells) < 0.35
    positives[int(rng.integers(cells))] = True
    scores = rng.permutation(cells) / cells + 0.01
    detections = [("v", float(t), float(t + 1), float(scores[t])) for t in range(cells)]
    ground_truth = [("v", float(t), float(t + 1)) for t in np.flatnonzero(positives)]
    return detections, ground_truth, positives, scores


@pytest.mark.parametrize("seed", range(20))
def test_unit_cells_agree_with_sklearn_pr_curve(seed):
    detections, ground_truth, positives, scores = unit_cells_case(np.random.default_rng(seed))
    ours = ap_at(detections, ground_truth, [0.5, 0.9])
    precision, recall, _ = precision_recall_curve(positives, scores)
    # sklearn returns the curve from low to high recall's opposite end; the interpolated area of it:
    order = np.argsort(recall, kind="stable")
    area = interpolated_average_precision(precision[order][recall[order] > 0], recall[order][recall[order] > 0])
    np.testing.assert_allclose(ours, area, atol=1e-12)
    # Interpolation can only raise the non-interpolated AP of sklearn.
    assert ours[0] >= average_precision_score(positives, scores) - 1e-12


def test_unit_cells_equal_sklearn_ap_when_precision_never_rises():
    # With the precision at every true positive never below the precision at a later one,
    # interpolation changes nothing and the AP is sklearn's average_precision_score.
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(400):
        detections, ground_truth, positives, scores = unit_cells_case(rng, cells=12)
        flags = positives[np.argsort(-scores)]
        precision = np.cumsum(flags) / np.arange(1, len(flags) + 1)
        at_hits = precision[flags]
        if not np.all(np.diff(at_hits) <= 0) or precision[flags].size == 0:
            continue
        if np.any([precision[i:].max() > precision[i] for i in np.flatnonzero(flags)]):
            continue
        checked += 1
        assert ap_at(detections, ground_truth, [0.5])[0] == pytest.approx(
            average_precision_score(positives, scores), abs=1e-12)
    assert checked >= 5


# --------------------------------------------------------------------------------------------
# DetectionMAP


def test_detection_map_averages_classes_with_ground_truth():
    metric = DetectionMAP(num_classes=3, tiou_thresholds=[0.5, 0.7])
    metric.update([Segment(0, 0.0, 10.0, 0.9), (1, 2.0, 12.0, 0.8), (2, 0.0, 1.0, 0.5)],
                  [(0, 0.0, 10.0), (1, 0.0, 10.0)], video_id="a")
    metric.update([], [(0, 20.0, 30.0)], video_id="b")
    result = metric.compute()
    # class 0: 1 of 2 found at precision 1 -> 0.5; class 1: tIoU 0.667 -> 1 at 0.5, 0 at 0.7; class 2: no GT.
    np.testing.assert_allclose(result["ap"][:, :2], [[0.5, 1.0], [0.5, 0.0]])
    assert np.isnan(result["ap"][:, 2]).all()
    assert result["map_at"] == {0.5: 0.75, 0.7: 0.25}
    assert result["map"] == pytest.approx(0.5)
    assert result["num_videos"] == 2 and result["num_instances"] == 3 and result["num_detections"] == 3


def test_detection_map_videos_do_not_mix():
    metric = DetectionMAP(num_classes=1, tiou_thresholds=[0.5])
    metric.update([(0, 0.0, 10.0, 0.9)], [], video_id="a")
    metric.update([], [(0, 0.0, 10.0)], video_id="b")
    assert metric.compute()["map"] == 0.0


def test_detection_map_rejects_bad_input():
    metric = DetectionMAP(num_classes=2)
    with pytest.raises(ValueError, match="class"):
        metric.update([(2, 0.0, 1.0, 0.5)], [])
    with pytest.raises(ValueError, match="end >= start"):
        metric.update([], [(0, 2.0, 1.0)])
    with pytest.raises(ValueError, match="tiou_thresholds"):
        DetectionMAP(num_classes=2, tiou_thresholds=[0.0])


# --------------------------------------------------------------------------------------------
# Score-sweeping segments


TIMES = np.arange(10.0)


def test_sweep_finds_short_confident_and_long_faint_segments():
    p = np.array([0.1, 0.3, 0.35, 0.9, 0.95, 0.4, 0.3, 0.1, 0.0, 0.0])[:, None]
    single = probabilities_to_segments(p, TIMES, TIMES + 1, 0.5, 0.5)
    assert [(s.start_s, s.end_s) for s in single] == [(3.0, 5.0)]
    swept = sweep_segments(p, TIMES, TIMES + 1, thresholds=[0.2, 0.5], nms_tiou=0.5)
    # at 0.2: frames 1..6 = [1, 7] (tIoU with [3, 5] is 2/6 < 0.5: both kept)
    assert sorted((s.start_s, s.end_s) for s in swept) == [(1.0, 7.0), (3.0, 5.0)]
    # a stricter NMS keeps only the higher-scoring one
    strict = sweep_segments(p, TIMES, TIMES + 1, thresholds=[0.2, 0.5], nms_tiou=0.3)
    assert [(s.start_s, s.end_s) for s in strict] == [(3.0, 5.0)]


def test_sweep_scores_by_contrast_so_fragments_rank_below_the_whole_action():
    # One action over frames 2..7, with a confident core at 4..5 that a high threshold finds alone.
    p = np.array([0.0, 0.0, 0.6, 0.6, 0.95, 0.95, 0.6, 0.6, 0.0, 0.0])[:, None]
    swept = {(s.start_s, s.end_s): s.score for s in sweep_segments(p, TIMES, TIMES + 1, [0.5, 0.9], nms_tiou=1.0)}
    # whole: mean 0.7167, context ceil(0.25 * 6) = 2 frames each side, all 0 -> 0.7167
    # core: mean 0.95, context 1 frame each side (0.6) -> 0.35
    assert swept == {(2.0, 8.0): pytest.approx(4.3 / 6), (4.0, 6.0): pytest.approx(0.35)}
    by_mean = {(s.start_s, s.end_s): s.score
               for s in sweep_segments(p, TIMES, TIMES + 1, [0.5, 0.9], nms_tiou=1.0, context_ratio=None)}
    assert by_mean[(4.0, 6.0)] > by_mean[(2.0, 8.0)]  # the mean ranks the fragment first
    # With the contrast score the whole action comes first: AP 1 at tIoU 0.9 for its instance.
    ranked = sorted(swept.items(), key=lambda item: -item[1])
    ap = detection_average_precision([("v", s, e, score) for (s, e), score in ranked], [("v", 2.0, 8.0)], [0.9])
    assert ap[0] == 1.0
    with pytest.raises(ValueError, match="context_ratio"):
        sweep_segments(p, TIMES, TIMES + 1, context_ratio=-1.0)


def test_sweep_drops_exact_duplicates_and_keeps_classes_apart():
    p = np.zeros((10, 2))
    p[2:5, 0] = p[2:5, 1] = 0.9  # the same run at every threshold below 0.9, in both classes
    swept = sweep_segments(p, TIMES, TIMES + 1, thresholds=[0.1, 0.5, 0.8], nms_tiou=1.0)
    assert sorted((s.class_id, s.start_s, s.end_s) for s in swept) == [(0, 2.0, 5.0), (1, 2.0, 5.0)]


def test_nms_against_brute_force():
    rng = np.random.default_rng(3)
    segments = []
    for _ in range(60):
        start = float(rng.integers(0, 30))
        segments.append(Segment(int(rng.integers(0, 2)), start, start + float(rng.integers(1, 10)),
                                float(np.round(rng.random(), 2))))
    kept = nms(segments, 0.4)
    # Every dropped segment overlaps (> 0.4) a kept one of its class with a score at least as high;
    # no two kept ones of a class overlap that much.
    for s in segments:
        if s in kept:
            continue
        assert any(k.class_id == s.class_id and k.score >= s.score
                   and (reference_iou((k.start_s, k.end_s), (s.start_s, s.end_s)) > 0.4
                        or (k.start_s, k.end_s) == (s.start_s, s.end_s)) for k in kept)
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            if a.class_id == b.class_id:
                assert reference_iou((a.start_s, a.end_s), (b.start_s, b.end_s)) <= 0.4


def test_sweep_rejects_bad_settings():
    p = np.zeros((3, 1))
    with pytest.raises(ValueError, match="thresholds"):
        sweep_segments(p, TIMES[:3], TIMES[:3] + 1, thresholds=[])
    with pytest.raises(ValueError, match="nms_tiou"):
        sweep_segments(p, TIMES[:3], TIMES[:3] + 1, nms_tiou=1.5)
