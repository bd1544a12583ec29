"""Tests of the synthetic dataset: files, annotations, what the frames show, determinism, learnability.

The frames are checked independently of the generator: they are decoded with decord and each pixel is
classified to the nearest colour of a palette written here from the colour words of the class names,
so "yellow_disk_moving_right" must show yellow pixels while it is annotated, and their centroid must
move right.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest

from extractors.synthetic import CLASSES, make_dataset

FPS, SIZE = 8, 112
# Seed 1: these four videos hold every class, a repeated teal square included.
TINY = dict(num_videos=4, seed=1, fps=FPS, size=SIZE, min_duration=40.0, max_duration=50.0)

# Nominal sRGB of the colour words in the class names, the neutral grey of an empty scene, and the
# dark shades of the two-tone backgrounds (CSS names), which must not count as "black".
PALETTE = {
    "red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "white": (255, 255, 255),
    "black": (0, 0, 0), "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
    "orange": (255, 140, 0), "pink": (255, 170, 200), "purple": (128, 0, 200), "teal": (0, 128, 128),
    "grey": (128, 128, 128), "maroon": (128, 0, 0), "navy": (0, 0, 128), "darkgreen": (0, 100, 0),
    "lime": (150, 255, 50), "sky": (115, 175, 255), "brown": (150, 75, 0), "lavender": (205, 155, 255),
}
PALETTE_NAMES = list(PALETTE)
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    annotations = make_dataset(out, **TINY)
    return out, annotations


@pytest.fixture(scope="module")
def decoded(tiny):
    """video_id -> (colours (n, H, W): PALETTE_NAMES index of every pixel, frame times in seconds),
    decoded with decord."""
    out, annotations = tiny
    videos = {}
    for video_id in annotations:
        reader = decord.VideoReader(str(out / "videos" / f"{video_id}.mp4"))
        videos[video_id] = (nearest_colour(reader.get_batch(list(range(len(reader)))).asnumpy()),
                            np.arange(len(reader)) / FPS)
    return videos


def nearest_colour(frames: np.ndarray) -> np.ndarray:
    """(n, H, W) uint8 index into PALETTE_NAMES of the nearest palette colour of every pixel."""
    pixels = frames.reshape(-1, 3).astype(np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, and |p|^2 does not change which c is nearest
    distances = (PALETTE_RGB**2).sum(1) - 2 * pixels @ PALETTE_RGB.T
    return distances.argmin(1).astype(np.uint8).reshape(frames.shape[:-1])


def picture(name: str) -> str:
    """What a class shows: its name without the context that decides between look-alike classes."""
    return re.sub(r"_(after_[a-z]+_cue|first|again)$", "", name)


def active(actions, label: int, times: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(times), dtype=bool)
    for c, start, end in actions:
        if c == label:
            mask |= (times >= start) & (times < end)
    return mask


# ---------------------------------------------------------------------------------------------- files


def test_files_exist_and_decode_to_declared_geometry(tiny):
    out, annotations = tiny
    assert set(json.loads((out / "annotations.json").read_text())) == set(annotations)
    assert json.loads((out / "annotations.json").read_text()) == annotations
    assert (out / "classes.txt").read_text().splitlines() == [c.name for c in CLASSES]
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"{v}.mp4" for v in annotations)
    for video_id, entry in annotations.items():
        reader = decord.VideoReader(str(out / "videos" / f"{video_id}.mp4"))
        assert reader.get_avg_fps() == pytest.approx(FPS)
        assert len(reader) == round(entry["duration"] * FPS)
        assert reader[0].shape == (SIZE, SIZE, 3)
        assert TINY["min_duration"] - 1 / FPS <= entry["duration"] <= TINY["max_duration"] + 1 / FPS


def test_annotations_are_valid_and_dense(tiny):
    _, annotations = tiny
    assert {v["subset"] for v in annotations.values()} == {"training", "testing"}
    concurrent = []
    for entry in annotations.values():
        assert entry["actions"], "every video has actions"
        for label, start, end in entry["actions"]:
            assert isinstance(label, int) and 0 <= label < len(CLASSES)
            assert 0 <= start < end <= entry["duration"]
        times = np.arange(0, entry["duration"], 1 / FPS)
        concurrent.append(sum(active(entry["actions"], c, times) for c in range(len(CLASSES))))
    concurrent = np.concatenate(concurrent)
    assert 1.5 <= concurrent.mean() <= 4.5  # Charades/TSU-like density of overlapping actions
    assert (concurrent >= 3).mean() > 0.2
    lengths = [end - start for e in annotations.values() for _, start, end in e["actions"]]
    assert min(lengths) <= 2.5 and max(lengths) >= 10  # short events and long activities


def test_no_class_overlaps_itself(tiny):
    _, annotations = tiny
    for entry in annotations.values():
        for label in range(len(CLASSES)):
            spans = sorted((s, e) for c, s, e in entry["actions"] if c == label)
            assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:]))


# ---------------------------------------------------------------------------------------------- content


def test_each_class_shows_its_colour_while_annotated(tiny, decoded):
    """The colour word of a class is on screen (in the border ring for *_border_*) when, and mostly
    only when, the class is annotated."""
    _, annotations = tiny
    border = np.zeros((SIZE, SIZE), dtype=bool)
    ring = SIZE // 10
    border[:ring], border[-ring:], border[:, :ring], border[:, -ring:] = True, True, True, True
    checked = []
    for label, cls in enumerate(CLASSES):
        if cls.name.endswith("_span"):
            checked.append(cls.name)  # shows its colours only at its ends: the next test
            continue
        colour = PALETTE_NAMES.index(cls.name.split("_")[0])
        region = border if "_border_" in cls.name else np.ones((SIZE, SIZE), dtype=bool)
        # The context pairs share their picture: "outside" is where neither member is annotated.
        twins = [i for i, c in enumerate(CLASSES) if picture(c.name) == picture(cls.name)]
        inside, outside = [], []
        for video_id, (colours, times) in decoded.items():
            fraction = (colours[:, region] == colour).mean(-1)
            actions = annotations[video_id]["actions"]
            inside.append(fraction[active(actions, label, times)])
            outside.append(fraction[~np.any([active(actions, twin, times) for twin in twins], axis=0)])
        inside, outside = np.concatenate(inside), np.concatenate(outside)
        if len(inside) < 8:
            continue  # the class does not occur in this small dataset
        checked.append(cls.name)
        assert inside.mean() > 0.04, f"{cls.name}: too little {cls.name.split('_')[0]} on screen"
        assert inside.mean() > 3 * outside.mean(), f"{cls.name}: {inside.mean():.3f} vs {outside.mean():.3f}"
    assert len(checked) == len(CLASSES), f"only {checked} occur; make the test dataset larger"


def test_a_span_shows_its_opening_colour_then_nothing_then_its_closing_colour(tiny, decoded):
    """`<opening>_to_<closing>_span`: the opening colour fills much of the picture in the first 2 s,
    the closing colour in the last 2 s, and in between the two colours are no more on screen than
    where no span is annotated (other patterns' pixels near them, e.g. an orange disk's for brown)."""
    _, annotations = tiny
    spans = [label for label, cls in enumerate(CLASSES) if cls.name.endswith("_span")]
    checked = 0
    for label in spans:
        words = CLASSES[label].name.removesuffix("_span").split("_to_")
        opening, closing = (PALETTE_NAMES.index(word) for word in words)
        middles, outside = [], []
        for video_id, (colours, times) in decoded.items():
            share = (colours[..., None] == [opening, closing]).mean((1, 2))  # (frames, 2)
            actions = annotations[video_id]["actions"]
            outside.append(share[~np.any([active(actions, span, times) for span in spans], axis=0)])
            for c, start, end in actions:
                if c != label:
                    continue
                head, tail = share[(times >= start) & (times < start + 2)], share[(times >= end - 2) & (times < end)]
                # on average: objects and a blinking border event (64% of the picture) may cover it
                assert head[:, 0].mean() > 0.2 and tail[:, 1].mean() > 0.2, CLASSES[label].name
                assert head[:, 1].max() < 0.02 and tail[:, 0].max() < 0.02, CLASSES[label].name
                middles.append(share[(times >= start + 2.5) & (times < end - 2.5)])
                assert 8 - 1 / FPS <= end - start <= 16 + 1 / FPS  # the documented 8-16 s
                checked += 1
        middle, outside = np.concatenate(middles).mean(0), np.concatenate(outside).mean(0)
        assert np.all(middle < 0.02), (CLASSES[label].name, middle, outside)
    assert checked >= 2


@pytest.mark.parametrize("word, axis, sign", [("moving_right", "x", 1), ("moving_down", "y", 1),
                                              ("rising", "y", -1)])
def test_moving_shapes_move_in_the_named_direction(tiny, decoded, word, axis, sign):
    _, annotations = tiny
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    checked = 0
    for label, cls in enumerate(CLASSES):
        if word not in cls.name:
            continue
        colour = PALETTE_NAMES.index(cls.name.split("_")[0])
        for video_id, (colours, times) in decoded.items():
            for c, start, end in annotations[video_id]["actions"]:
                if c != label:
                    continue
                shape = colours[(times >= start) & (times < end)] == colour
                visible = shape.sum((1, 2)) > 50
                coordinate = ((xx if axis == "x" else yy) * shape).sum((1, 2))[visible] / shape.sum((1, 2))[visible]
                assert visible.mean() > 0.5
                assert sign * np.corrcoef(np.arange(len(coordinate)), coordinate)[0, 1] > 0.8, cls.name
                checked += 1
    assert checked >= 1


def test_pink_disk_grows(tiny, decoded):
    _, annotations = tiny
    label = [c.name for c in CLASSES].index("pink_disk_growing")
    pink = PALETTE_NAMES.index("pink")
    for video_id, (colours, times) in decoded.items():
        for c, start, end in annotations[video_id]["actions"]:
            if c == label:
                area = (colours[(times >= start) & (times < end)] == pink).sum((1, 2))
                assert np.corrcoef(np.arange(len(area)), area)[0, 1] > 0.8


def test_context_classes_follow_their_rule(tiny):
    """A purple disk is labelled by the border cue that ended 0.5-2 s before it; the first teal square
    of a video is "first", every later one "again"."""
    _, annotations = tiny
    names = [c.name for c in CLASSES]
    cues = {names.index("white_border_blinking"): "white", names.index("black_border_blinking"): "black"}
    disks = {names.index("purple_disk_rising_after_white_cue"): "white",
             names.index("purple_disk_rising_after_black_cue"): "black"}
    first, again = names.index("teal_square_spinning_first"), names.index("teal_square_spinning_again")
    seen = {"disk": 0, "again": 0}
    for entry in annotations.values():
        for label, start, end in entry["actions"]:
            if label in disks:
                before = [(e, cues[c]) for c, s, e in entry["actions"] if c in cues and e <= start]
                cue_end, cue_colour = max(before)
                assert cue_colour == disks[label]
                assert 0.5 - 1e-9 <= start - cue_end <= 2.0 + 1 / FPS
                seen["disk"] += 1
        teal = sorted((s, c) for c, s, e in entry["actions"] if c in (first, again))
        if teal:
            assert [c for _, c in teal] == [first] + [again] * (len(teal) - 1)
        seen["again"] += len(teal) > 1
    assert seen["disk"] >= 2 and seen["again"] >= 1


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_data(tiny, tmp_path):
    out, annotations = tiny
    assert make_dataset(tmp_path / "again", **TINY) == annotations
    for video_id in annotations:
        name = f"videos/{video_id}.mp4"
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    other = make_dataset(tmp_path / "other", **{**TINY, "seed": 4, "num_videos": 1})
    assert other["synthetic_0000"]["actions"] != annotations["synthetic_0000"]["actions"]


def test_a_video_does_not_depend_on_how_many_are_made(tiny, tmp_path):
    _, annotations = tiny
    fewer = make_dataset(tmp_path, **{**TINY, "num_videos": 2})
    for video_id, entry in fewer.items():
        assert entry["actions"] == annotations[video_id]["actions"]
        assert entry["duration"] == annotations[video_id]["duration"]


def test_fewer_classes_use_only_the_first_classes(tmp_path):
    annotations = make_dataset(tmp_path, num_videos=2, num_classes=12, min_duration=40, max_duration=40)
    assert len((tmp_path / "classes.txt").read_text().splitlines()) == 12
    labels = {c for e in annotations.values() for c, _, _ in e["actions"]}
    assert labels <= set(range(12)) and 11 in labels  # the white-cue disk survives without its pair


# ---------------------------------------------------------------------------------------------- split, files, errors


@pytest.mark.parametrize("num_videos, test_fraction, expected_test", [(20, 0.25, 5), (2, 0.25, 1), (1, 0.25, 0),
                                                                      (5, 0.0, 0)])
def test_split_sizes(tmp_path, num_videos, test_fraction, expected_test):
    annotations = make_dataset(tmp_path, num_videos=num_videos, test_fraction=test_fraction,
                               min_duration=1.0, max_duration=1.0)
    assert sum(v["subset"] == "testing" for v in annotations.values()) == expected_test
    assert sum(v["subset"] == "training" for v in annotations.values()) == num_videos - expected_test


def test_rerun_with_fewer_videos_removes_only_its_stale_videos(tmp_path):
    make_dataset(tmp_path, num_videos=3, min_duration=1.0, max_duration=1.0)
    (tmp_path / "videos" / "mine.mp4").write_bytes(b"not ours")
    make_dataset(tmp_path, num_videos=2, min_duration=1.0, max_duration=1.0)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [
        "mine.mp4", "synthetic_0000.mp4", "synthetic_0001.mp4"]


@pytest.mark.parametrize("override, problem", [
    ({"num_videos": 0}, "num_videos"), ({"num_classes": len(CLASSES) + 1}, "num_classes"),
    ({"num_classes": 0}, "num_classes"), ({"fps": 7.5}, "fps"), ({"size": 111}, "size"),
    ({"min_duration": 10.0, "max_duration": 5.0}, "duration"), ({"min_duration": 0.0}, "duration"),
    ({"test_fraction": 1.0}, "test_fraction"), ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise_value_error_naming_them(tmp_path, override, problem):
    with pytest.raises(ValueError, match=problem):
        make_dataset(tmp_path, **{"num_videos": 1, "min_duration": 1.0, "max_duration": 1.0, **override})
    assert not (tmp_path / "annotations.json").exists()


def test_cli(tmp_path):
    command = [sys.executable, "-m", "extractors.synthetic", "--out", str(tmp_path), "--num-videos", "2",
               "--min-duration", "2", "--max-duration", "3", "--size", "64"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 videos" in done.stdout
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert len(annotations) == 2
    assert decord.VideoReader(str(tmp_path / "videos" / "synthetic_0000.mp4"))[0].shape == (64, 64, 3)
    bad = subprocess.run(command + ["--fps", "0"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         timeout=120)
    assert bad.returncode == 2 and "fps must be a positive integer" in bad.stderr


# ---------------------------------------------------------------------------------------------- learnability


@pytest.mark.slow
def test_learnable_from_random_3d_conv_features_and_context_helps(tmp_path):
    """A fixed random 3D conv net (a cheap stand-in for the random-init I3D of the default pipeline),
    spatially averaged, one feature per 8 frames, then per-class logistic regression: the test mAP is
    a multiple of chance, and the past few windows tell the context-dependent purple disks apart."""
    torch = pytest.importorskip("torch")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.preprocessing import StandardScaler

    annotations = make_dataset(tmp_path, num_videos=24, seed=0, min_duration=30.0, max_duration=45.0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 32, (3, 7, 7), (1, 2, 2), (1, 3, 3)), torch.nn.ReLU(),
        torch.nn.Conv3d(32, 64, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv3d(64, 128, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv3d(128, 256, 3, 2, 1), torch.nn.ReLU()).eval()

    features, labels = {}, {}
    for video_id, entry in annotations.items():
        reader = decord.VideoReader(str(tmp_path / "videos" / f"{video_id}.mp4"), width=56, height=56)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.float32) / 127.5 - 1
        windows = len(frames) // 8
        with torch.no_grad():
            x = torch.from_numpy(frames[:windows * 8]).permute(3, 0, 1, 2)[None]
            features[video_id] = net(x).mean((3, 4))[0].T.numpy()[:windows]
        centre = (np.arange(windows) * 8 + 4) / FPS
        labels[video_id] = np.stack([active(entry["actions"], c, centre) for c in range(len(CLASSES))], 1)

    def with_past(x: np.ndarray) -> np.ndarray:
        """Append the mean of the previous 8 windows (zeros before the start)."""
        padded = np.concatenate([np.zeros((8, x.shape[1]), x.dtype), x])
        return np.concatenate([x, np.stack([padded[t:t + 8].mean(0) for t in range(len(x))])], 1)

    def test_ap(transform) -> np.ndarray:
        split = {s: [v for v in annotations if annotations[v]["subset"] == s] for s in ("training", "testing")}
        x = {s: np.concatenate([transform(features[v]) for v in ids]) for s, ids in split.items()}
        y = {s: np.concatenate([labels[v] for v in ids]) for s, ids in split.items()}
        scaler = StandardScaler().fit(x["training"])
        ap = np.full(len(CLASSES), np.nan)
        for c in range(len(CLASSES)):
            if y["training"][:, c].any() and y["testing"][:, c].any():
                model = LogisticRegression(C=0.05, max_iter=2000).fit(scaler.transform(x["training"]),
                                                                      y["training"][:, c])
                scores = model.predict_proba(scaler.transform(x["testing"]))[:, 1]
                ap[c] = average_precision_score(y["testing"][:, c], scores)
        return ap, y["testing"]

    ap, y_test = test_ap(lambda x: x)
    present = y_test.any(0)
    chance = y_test.mean(0)[present].mean()
    assert np.nanmean(ap) >= 3 * chance, (np.nanmean(ap), chance)

    ap_context, _ = test_ap(with_past)
    purple = [i for i, c in enumerate(CLASSES) if c.name.startswith("purple_disk")]
    assert np.nanmean(ap_context[purple]) > np.nanmean(ap[purple]) + 0.1, (ap[purple], ap_context[purple])
