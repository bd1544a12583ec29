"""ms_temba.metrics against sklearn, hand-worked numbers and slow direct implementations."""

from __future__ import annotations

import math
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from ms_temba.metrics import (
    ActionConditionalMetrics,
    FrameMAP,
    SampledFrameMAP,
    average_precision,
    chance_map,
    charades_sample_indices,
)


def random_videos(num_videos=6, num_classes=5, seed=0, max_length=60, tied_scores=False):
    """Videos of random lengths with end padding: (scores, labels, mask) per video. Labels come in
    runs (actions last several frames); class num_classes-1 never occurs."""
    rng = np.random.default_rng(seed)
    videos = []
    for _ in range(num_videos):
        padded_length = int(rng.integers(5, max_length))
        length = int(rng.integers(1, padded_length + 1))
        labels = np.zeros((padded_length, num_classes), dtype=np.float32)
        for c in range(num_classes - 1):
            for _ in range(int(rng.integers(0, 3))):
                start = int(rng.integers(0, padded_length))
                labels[start : start + int(rng.integers(1, 15)), c] = 1
        scores = rng.random((padded_length, num_classes)).astype(np.float32)
        if tied_scores:
            scores = np.round(scores * 4) / 4  # many exact ties
        scores = np.clip(scores + 0.3 * labels, 0, 1).astype(np.float32)
        mask = np.arange(padded_length) < length
        videos.append((scores, labels, mask))
    return videos


def real_frames(videos):
    """Every real frame of every video, picked one by one: (scores, labels) stacked."""
    scores, labels = [], []
    for video_scores, video_labels, mask in videos:
        for t in range(len(mask)):
            if mask[t]:
                scores.append(video_scores[t])
                labels.append(video_labels[t])
    return np.array(scores), np.array(labels)


def sklearn_map(scores, labels):
    """Per-class sklearn AP, NaN for classes without positives, and their mean."""
    ap = np.array([average_precision_score(labels[:, c], scores[:, c]) if labels[:, c].any()
                   else np.nan for c in range(labels.shape[1])])
    return ap, np.nanmean(ap)


# ----------------------------------------------------------------------------------- AP


def test_average_precision_hand_computed():
    # Ranking: 0.9 pos, 0.8 neg, 0.7 pos, 0.6 neg. Precision at the positives: 1/1 and 2/3.
    # AP = (1 + 2/3) / 2 = 5/6.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # Ties: 0.9 pos | 0.5 pos, 0.5 neg (one threshold) | 0.1 neg.
    # Threshold 0.9: P = 1, R = 1/2. Threshold 0.5: P = 2/3, R = 1.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 (a tie is not ordered in the positive's favour).
    assert average_precision([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(5 / 6)
    # All tied: AP = positive rate = 2/5.
    assert average_precision([0.3] * 5, [1, 0, 0, 1, 0]) == pytest.approx(2 / 5)
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    labels = rng.random(n) < 0.3
    labels[rng.integers(0, n)] = True
    scores = np.round(rng.random(n) * rng.integers(2, 50)) / 50  # from heavy to light ties
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    assert average_precision(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)


# ----------------------------------------------------------------------------------- FrameMAP


@pytest.mark.parametrize("tied_scores", [False, True])
def test_frame_map_matches_sklearn_over_real_frames(tied_scores):
    videos = random_videos(num_videos=8, seed=3, tied_scores=tied_scores)
    metric = FrameMAP(num_classes=5)
    for i, (scores, labels, mask) in enumerate(videos):
        if i % 2:  # torch tensors and numpy arrays are both accepted
            scores, labels, mask = map(torch.from_numpy, (scores, labels, mask))
        metric.update(scores, labels, mask)
    result = metric.compute()

    ap, mean_ap = sklearn_map(*real_frames(videos))
    assert np.isnan(ap[4]) and np.isnan(result["ap"][4])  # class 4 never occurs: excluded
    np.testing.assert_allclose(result["ap"], ap, rtol=0, atol=1e-12)
    assert result["map"] == pytest.approx(mean_ap, abs=1e-12)
    assert result["num_frames"] == sum(int(m.sum()) for _, _, m in videos)
    assert result["num_videos"] == len(videos)


def test_frame_map_accepts_low_precision_tensors_from_autocast():
    scores, labels, mask = random_videos(num_videos=1, seed=4)[0]
    low = torch.from_numpy(scores).to(torch.bfloat16)
    metric = FrameMAP(num_classes=5)
    metric.update(low, torch.from_numpy(labels), torch.from_numpy(mask))
    expected, _ = sklearn_map(low.float().numpy()[mask], labels[mask])
    np.testing.assert_allclose(metric.compute()["ap"], expected, atol=1e-12)


def test_frame_map_hand_computed():
    # Video 1 (3 frames) and video 2 (2 real frames + 1 padded frame that must be ignored).
    # Class 0 over the 5 real frames: scores .9 .2 .6 | .8 .1, labels 1 0 0 | 1 0.
    #   Ranking .9(+) .8(+) .6 .2 .1 -> AP = (1/1 + 2/2) / 2 = 1.
    # Class 1: scores .3 .7 .5 | .4 .6, labels 0 1 0 | 1 0.
    #   Ranking .7(+) .6 .5 .4(+) .3 -> AP = (1/1 + 2/4) / 2 = 3/4.
    # Class 2: no positive -> NaN, excluded. mAP = (1 + 3/4) / 2 = 7/8.
    metric = FrameMAP(num_classes=3)
    metric.update([[0.9, 0.3, 0.5], [0.2, 0.7, 0.5], [0.6, 0.5, 0.5]],
                  [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    metric.update([[0.8, 0.4, 0.5], [0.1, 0.6, 0.5], [0.99, 0.99, 0.5]],
                  [[1, 1, 0], [0, 0, 0], [0, 0, 0]], mask=[True, True, False])
    result = metric.compute()
    np.testing.assert_allclose(result["ap"][:2], [1.0, 0.75])
    assert np.isnan(result["ap"][2])
    assert result["map"] == pytest.approx(7 / 8)
    assert (result["num_frames"], result["num_videos"]) == (5, 2)


def test_frame_map_streaming_equals_one_update_and_stores_frames_compactly():
    rng = np.random.default_rng(0)
    num_classes, num_videos, length = 8, 2500, 12
    scores = rng.random((num_videos * length, num_classes)).astype(np.float32)
    labels = rng.random((num_videos * length, num_classes)) < 0.2

    tracemalloc.start()
    streamed = FrameMAP(num_classes)
    for v in range(num_videos):
        rows = slice(v * length, (v + 1) * length)
        streamed.update(scores[rows], labels[rows])
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 30000 frames x 8 classes x (4 bytes score + 1 byte label) = 1.2 MB of payload. Buffers that
    # double may hold up to 2x that; a Python object per frame would need far more (a tuple of
    # two small arrays is ~300 bytes, 9 MB here).
    payload = scores.nbytes + labels.nbytes
    assert held < 2.5 * payload + 200_000, (held, payload)

    at_once = FrameMAP(num_classes)
    at_once.update(scores, labels)
    np.testing.assert_array_equal(streamed.compute()["ap"], at_once.compute()["ap"])
    assert streamed.compute()["num_videos"] == num_videos


def test_chance_map_is_the_map_of_a_constant_score():
    _, labels = real_frames(random_videos(num_videos=5, seed=7))
    constant = np.full(labels.shape, 0.5)
    ap, mean_ap = sklearn_map(constant, labels)
    with_positives = labels.any(axis=0)
    # sklearn: a constant score gives AP = the class's positive rate.
    np.testing.assert_allclose(ap[with_positives], labels[:, with_positives].mean(axis=0))
    assert chance_map(labels) == pytest.approx(mean_ap)

    metric = FrameMAP(labels.shape[1])
    metric.update(constant, labels)
    assert metric.compute()["map"] == pytest.approx(chance_map(labels))

    mask = np.arange(len(labels)) % 3 > 0
    assert chance_map(labels, mask) == pytest.approx(sklearn_map(constant[mask], labels[mask])[1])


# ----------------------------------------------------------------------------------- sampled-25


def official_charades_frames(num_frames, samples=25):
    """Charades_v1_localize.m: time points j/25 * duration, j = 0..24, each mapped to the feature
    step whose interval [i, i+1) * duration / num_frames contains it (exact rationals)."""
    duration = Fraction(317, 10)  # any duration: the mapping does not depend on it
    step = duration / num_frames
    chosen = []
    for j in range(samples):
        time_point = Fraction(j, samples) * duration
        chosen.append(next(i for i in range(num_frames) if i * step <= time_point < (i + 1) * step))
    return sorted(set(chosen))


@pytest.mark.parametrize("num_frames", [1, 7, 24, 25, 26, 49, 50, 51, 99, 100, 373])
def test_charades_sample_indices_are_the_official_time_points(num_frames):
    indices = charades_sample_indices(num_frames)
    assert indices.tolist() == official_charades_frames(num_frames)
    assert len(indices) == min(num_frames, 25)


def test_sampled_frame_map_evaluates_only_the_sampled_frames():
    videos = random_videos(num_videos=7, seed=11, max_length=120)
    metric = SampledFrameMAP(num_classes=5)
    chosen_scores, chosen_labels = [], []
    for scores, labels, mask in videos:
        metric.update(scores, labels, mask)
        real = int(mask.sum())
        picks = official_charades_frames(real) if real > 25 else range(real)
        chosen_scores += [scores[t] for t in picks]
        chosen_labels += [labels[t] for t in picks]
    ap, mean_ap = sklearn_map(np.array(chosen_scores), np.array(chosen_labels))
    result = metric.compute()
    np.testing.assert_allclose(result["ap"], ap, atol=1e-12)
    assert result["map"] == pytest.approx(mean_ap)
    assert result["num_frames"] == len(chosen_scores)


# ----------------------------------------------------------------------------------- conditional


def slow_action_conditional(videos, offset, threshold):
    """Direct implementation of the MLAD definition with loops; AP from sklearn."""
    rows = []  # (scores, labels, condition) per real frame
    for scores, labels, mask in videos:
        scores, labels = scores[mask.astype(bool)], labels[mask.astype(bool)].astype(bool)
        for s in range(len(labels)):
            condition = []
            for j in range(labels.shape[1]):
                if offset == 0:
                    condition.append(bool(labels[s, j]))
                else:
                    earlier = any(labels[u, j] for u in range(max(0, s - offset + 1), s))
                    condition.append(earlier and not labels[s, j])
            rows.append((scores[s], labels[s], condition))
    num_classes = len(rows[0][1])
    precisions, recalls, aps = [], [], []
    for j in range(num_classes):
        subset = [(sc, lb) for sc, lb, cond in rows if cond[j]]
        for i in range(num_classes):
            positives = sum(lb[i] for _, lb in subset)
            if i == j or positives == 0:
                continue
            predicted = sum(sc[i] >= threshold for sc, _ in subset)
            hits = sum(sc[i] >= threshold and lb[i] for sc, lb in subset)
            precisions.append(hits / predicted if predicted else 0.0)
            recalls.append(hits / positives)
            aps.append(average_precision_score([lb[i] for _, lb in subset],
                                               [sc[i] for sc, _ in subset]))
    if not aps:
        return None
    p, r = np.mean(precisions), np.mean(recalls)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "map": np.mean(aps), "num_pairs": len(aps)}


def test_action_conditional_matches_the_slow_definition():
    videos = random_videos(num_videos=5, num_classes=4, seed=5, max_length=40, tied_scores=True)
    offsets = (0, 1, 3, 8)
    metric = ActionConditionalMetrics(num_classes=4, offsets=offsets, threshold=0.5)
    for scores, labels, mask in videos:
        metric.update(torch.from_numpy(scores), labels, mask)
    result = metric.compute()
    assert set(result) == {f"t{t}" for t in offsets}
    for t in offsets:
        expected = slow_action_conditional(videos, t, 0.5)
        if expected is None:
            assert result[f"t{t}"]["num_pairs"] == 0
            continue
        for key, value in expected.items():
            assert result[f"t{t}"][key] == pytest.approx(value, abs=1e-12), (t, key)
    assert result["t1"]["num_pairs"] == 0  # t = 1: the window is the current frame alone
    assert result["t0"]["num_pairs"] > 0 and result["t8"]["num_pairs"] > 0


def test_action_conditional_hand_computed():
    # One video, 2 classes, 4 frames.
    #   labels c0: 1 1 0 0     scores c0: .9 .4 .6 .1
    #   labels c1: 0 1 1 0     scores c1: .2 .7 .3 .8
    # t = 0. (c1 | c0) on frames {0, 1}: c1 labels 0 1, predictions 0 1 -> P = 1, R = 1,
    #        AP (scores .2, .7) = 1.  (c0 | c1) on frames {1, 2}: c0 labels 1 0, predictions
    #        0 1 -> P = 0, R = 0, AP: .6(-) ranks above .4(+) -> 1/2.
    #        Means: P = R = 1/2, F1 = 1/2, mAP = 3/4, 2 pairs.
    # t = 2 (window s-1..s, class inactive at s): c0 conditions frame 2, c1 conditions frame 3.
    #        (c1 | c0) on {2}: c1 positive, score .3 < .5 -> P = 0 (nothing predicted), R = 0,
    #        AP = 1 (one positive). (c0 | c1) on {3}: c0 has no positive -> not a pair.
    #        Means: P = R = F1 = 0, mAP = 1, 1 pair.
    metric = ActionConditionalMetrics(num_classes=2, offsets=(0, 2), threshold=0.5)
    metric.update([[0.9, 0.2], [0.4, 0.7], [0.6, 0.3], [0.1, 0.8]],
                  [[1, 0], [1, 1], [0, 1], [0, 0]])
    result = metric.compute()
    assert result["t0"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "map": 0.75, "num_pairs": 2})
    assert result["t2"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "map": 1.0, "num_pairs": 1})


def test_action_conditional_perfect_predictor_scores_one():
    videos = random_videos(num_videos=6, num_classes=5, seed=2, max_length=50)
    metric = ActionConditionalMetrics(num_classes=5)
    for _, labels, mask in videos:
        metric.update(labels.copy(), labels, mask)  # scores = labels: perfect
    for key, values in metric.compute().items():
        if values["num_pairs"]:
            assert values["precision"] == values["recall"] == values["f1"] == 1.0, key
            assert values["map"] == 1.0, key


def test_action_conditional_windows_stay_inside_a_video():
    # Video A ends with c0 active; video B starts with c1 active and c0 inactive. Only a window
    # reaching from B back into A would make c0 condition B's frames.
    metric = ActionConditionalMetrics(num_classes=2, offsets=(3,))
    metric.update([[0.9, 0.1], [0.9, 0.1]], [[1, 0], [1, 0]])
    metric.update([[0.1, 0.9], [0.1, 0.9]], [[0, 1], [0, 1]])
    result = metric.compute()["t3"]
    assert result["num_pairs"] == 0 and math.isnan(result["map"])


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("metric_class", [FrameMAP, SampledFrameMAP, ActionConditionalMetrics])
@pytest.mark.parametrize(
    "scores, labels, mask, message",
    [
        (np.zeros((4, 2)), np.zeros((4, 3)), None, r"classes = 3"),
        (np.zeros((4, 3)), np.zeros((5, 3)), None, "labels have shape"),
        (np.zeros(4), np.zeros(4), None, r"\(time, classes\)"),
        (np.full((4, 3), np.nan), np.zeros((4, 3)), None, "NaN"),
        (np.zeros((4, 3)), np.full((4, 3), 0.5), None, "labels must be 0 or 1"),
        (np.zeros((4, 3)), np.zeros((4, 3)), np.ones(3, bool), "mask has shape"),
        (np.zeros((4, 3)), np.zeros((4, 3)), np.full(4, 2), "mask must be 0 or 1"),
    ],
)
def test_bad_video_raises_a_value_error_naming_the_problem(metric_class, scores, labels, mask,
                                                           message):
    with pytest.raises(ValueError, match=message):
        metric_class(3).update(scores, labels, mask)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="num_classes"):
        FrameMAP(0)
    with pytest.raises(ValueError, match="samples"):
        SampledFrameMAP(3, samples=0)
    with pytest.raises(ValueError, match="non-negative"):
        ActionConditionalMetrics(3, offsets=(0, -20))
    with pytest.raises(ValueError, match="distinct"):
        ActionConditionalMetrics(3, offsets=(20, 20))
    with pytest.raises(ValueError, match="threshold"):
        ActionConditionalMetrics(3, threshold=float("nan"))
    with pytest.raises(ValueError, match="1-D"):
        average_precision([[0.1]], [[1]])
