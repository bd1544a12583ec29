"""A synthetic dense action-detection dataset: the data of the project's default pipeline.

`make_dataset` renders short, small videos whose ground truth comes straight from the timeline that
drew them, in the Charades/TSU annotation format:

    out_dir/videos/{video_id}.mp4   h264, yuv420p, size x size, `fps` frames per second
    out_dir/annotations.json        {video_id: {"subset": "training" | "testing", "duration": seconds,
                                                 "actions": [[class, start_s, end_s], ...]}}
    out_dir/classes.txt             one class name per line, line i = class i

The dataset has to be learnable from the features of a *randomly initialised* I3D (no pretrained
weights are available offline) after spatial average pooling. Such features keep colour and coarse
motion energy and lose fine shape, so every class is a big, saturated pattern with its own colour
and its own kind of motion (scrolling, flicker, translation, rotation, pulsing, blinking). Like
Charades/TSU, the timeline is dense and multi-label: a few independent tracks (background activity,
overlay, two object tracks, short events) run at the same time, so typically 2-4 actions overlap,
with long activities (10-30 s), medium actions (3-10 s) and short events (1-2.5 s).

Six classes are defined by context rather than by what is on screen, so that temporal modelling
pays off (a per-frame classifier cannot tell the members of a pair apart, nor a span's middle from
nothing):

* `purple_disk_rising_after_white_cue` / `..._after_black_cue`: the same rising purple disk; its
  label is the colour of the blinking border cue that came just before it (0.5-2 s gap).
* `teal_square_spinning_first` / `..._again`: the same spinning teal square; its first appearance
  in a video is "first", every later one is "again" (long-range memory).
* `lime_to_sky_span` / `brown_to_lavender_span`: an 8-16 s span of which only the first and the
  last 2 s show anything (full-frame stripes in the opening, then the closing colour, under the
  objects); its middle can only be inferred from both sides, up to 6 s away from either mark
  (the issue's "evidence only near an action's start and end").

Every video is drawn from its own random stream (seed, video index), so video i does not depend on
how many videos are made; the train/test split does. Same arguments -> identical annotations and
byte-identical mp4 files (see `write_mp4` for the x264 settings this takes).

Extracting features: use the videos' own frame rate (fps 8: one I3D fully_conv feature per second)
and a `chunk_frames` longer than the longest video (e.g. 640), so that each video is one forward
pass; with the default 128 the overlapping context frames make I3D about 2.4x slower.

CLI: `python -m extractors.synthetic --out DIR [--num-videos N --num-classes C --seed S ...]`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

from extractors.files import atomic_path

# ----------------------------------------------------------------------------------------------
# The classes: one drawing function per visual pattern
# ----------------------------------------------------------------------------------------------

# Saturated colours (RGB in [0, 1]) that stay far apart after yuv420p compression.
COLOURS = {
    "red": (0.95, 0.05, 0.05),
    "dark_red": (0.35, 0.0, 0.0),
    "green": (0.1, 0.85, 0.1),
    "dark_green": (0.0, 0.3, 0.0),
    "blue": (0.1, 0.25, 1.0),
    "navy": (0.0, 0.0, 0.3),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "yellow": (1.0, 0.95, 0.0),
    "magenta": (1.0, 0.0, 0.85),
    "cyan": (0.0, 0.95, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "pink": (1.0, 0.6, 0.75),
    "purple": (0.5, 0.05, 0.8),
    "teal": (0.0, 0.62, 0.55),
    # the marks of the span classes
    "lime": (0.6, 1.0, 0.2),
    "sky": (0.45, 0.68, 1.0),
    "brown": (0.6, 0.3, 0.0),
    "lavender": (0.8, 0.6, 1.0),
}


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates of a size x size frame, in [0, 1]; x grows rightwards, y downwards."""

    x: np.ndarray  # (size, size) float32
    y: np.ndarray

    @classmethod
    def square(cls, size: int) -> "Grid":
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        y, x = np.meshgrid(axis, axis, indexing="ij")
        return cls(x=x, y=y)

    @property
    def size(self) -> int:
        return self.x.shape[0]


def _paint(image: np.ndarray, mask: np.ndarray, colour: str) -> None:
    image[mask] = COLOURS[colour]


def _two_tone(image: np.ndarray, first: np.ndarray, colour_a: str, colour_b: str) -> None:
    """Fill the whole frame: colour_a where `first` is True, colour_b elsewhere."""
    image[:] = np.where(first[..., None], COLOURS[colour_a], COLOURS[colour_b])


def _disk(grid: Grid, cx: float, cy: float, radius: float) -> np.ndarray:
    return (grid.x - cx) ** 2 + (grid.y - cy) ** 2 < radius**2


def _rotated_rect(grid: Grid, cx: float, cy: float, half_length: float, half_width: float,
                  angle: float) -> np.ndarray:
    along = (grid.x - cx) * math.cos(angle) + (grid.y - cy) * math.sin(angle)
    across = -(grid.x - cx) * math.sin(angle) + (grid.y - cy) * math.cos(angle)
    return (np.abs(along) < half_length) & (np.abs(across) < half_width)


def _border(grid: Grid, thickness: float) -> np.ndarray:
    return (np.minimum(grid.x, 1 - grid.x) < thickness) | (np.minimum(grid.y, 1 - grid.y) < thickness)


@dataclass(frozen=True)
class Placement:
    """Per-occurrence randomness of a pattern, so two occurrences of a class do not look identical."""

    cx: float  # a free coordinate in [0.3, 0.7] (the position across the motion)
    cy: float
    phase: float  # in [0, 2 pi)
    seed: int  # for patterns made of many random elements (rain)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Placement":
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        return cls(cx=float(cx), cy=float(cy), phase=float(rng.uniform(0, 2 * math.pi)),
                   seed=int(rng.integers(2**31)))


# A drawing function paints one frame of one occurrence in place:
# draw(image (size, size, 3) float32, grid, t seconds since the action began, duration seconds, placement).
DrawFn = Callable[[np.ndarray, Grid, float, float, Placement], None]


def _draw_red_stripes_scrolling(image, grid, t, duration, p):
    _two_tone(image, ((grid.x * 6 - 1.5 * t + p.phase) % 1) < 0.5, "red", "dark_red")


def _draw_green_checker_flickering(image, grid, t, duration, p):
    invert = int(t * 3 + p.phase) % 2  # the checkerboard inverts 3 times a second
    cells = (np.floor(grid.x * 4) + np.floor(grid.y * 4) + invert) % 2 == 0
    _two_tone(image, cells, "green", "dark_green")


def _draw_blue_waves_drifting(image, grid, t, duration, p):
    _two_tone(image, np.sin(2 * math.pi * (grid.y * 2.5 - 0.6 * t) + p.phase) > 0, "blue", "navy")


def _draw_white_rain_falling(image, grid, t, duration, p):
    rng = np.random.default_rng(p.seed)
    n_drops = 90
    x0 = rng.uniform(0, 1, n_drops)
    y0 = rng.uniform(0, 1, n_drops)
    speed = rng.uniform(0.5, 0.9, n_drops)  # frame heights per second
    size = grid.size
    half_w, length = max(1, round(0.012 * size)), max(2, round(0.08 * size))
    for x, y in zip(x0, (y0 + speed * t) % 1.0):
        col, top = int(x * size), int(y * size)
        image[top:top + length, max(0, col - half_w):col + half_w] = COLOURS["white"]


def _draw_yellow_disk_moving_right(image, grid, t, duration, p):
    cx = 0.2 + 0.6 * t / duration
    _paint(image, _disk(grid, cx, p.cy, 0.2), "yellow")


def _draw_magenta_square_moving_down(image, grid, t, duration, p):
    cy = 0.2 + 0.6 * t / duration
    _paint(image, _rotated_rect(grid, p.cx, cy, 0.18, 0.18, 0.0), "magenta")


def _draw_cyan_bar_rotating(image, grid, t, duration, p):
    angle = p.phase + 2.0 * t  # about a third of a turn per second
    _paint(image, _rotated_rect(grid, p.cx, p.cy, 0.42, 0.08, angle), "cyan")


def _draw_orange_disk_pulsing(image, grid, t, duration, p):
    radius = 0.2 + 0.07 * math.sin(2 * math.pi * 1.0 * t + p.phase)
    _paint(image, _disk(grid, p.cx, p.cy, radius), "orange")


def _blinking_border(colour: str) -> DrawFn:
    def draw(image, grid, t, duration, p):
        # A wide frame (64% of the picture) so that a 1-2 s event still moves a feature averaged
        # over space and over 8-16 frames; on for 0.25 s, off for 0.25 s.
        if int(t * 4) % 2 == 0:
            _paint(image, _border(grid, 0.2), colour)
    return draw


def _draw_pink_disk_growing(image, grid, t, duration, p):
    _paint(image, _disk(grid, p.cx, p.cy, 0.2 + 0.3 * t / duration), "pink")


def _draw_purple_disk_rising(image, grid, t, duration, p):
    cy = 0.8 - 0.6 * t / duration
    _paint(image, _disk(grid, p.cx, cy, 0.2), "purple")


def _draw_teal_square_spinning(image, grid, t, duration, p):
    _paint(image, _rotated_rect(grid, p.cx, p.cy, 0.2, 0.2, p.phase + 2.5 * t), "teal")


SPAN_MARK_S = 2.0  # how long the opening and the closing mark of a span are on screen


def _span(opening: str, closing: str) -> DrawFn:
    def draw(image, grid, t, duration, p):
        # The whole picture in diagonal stripes of the opening colour (and its dark shade) for the
        # span's first 2 s, of the closing colour for its last 2 s, nothing in between. A mark
        # replaces the background activity (objects and events stay in front of it): smaller ones
        # (letterbox bars) were lost in the features of a random I3D (a per-frame linear probe
        # found them at 11-52% AP).
        if t < SPAN_MARK_S or t >= duration - SPAN_MARK_S:
            colour = COLOURS[opening if t < SPAN_MARK_S else closing]
            stripes = ((grid.x + grid.y) * 4 + p.phase) % 1 < 0.5
            image[:] = np.where(stripes[..., None], colour, 0.35 * np.asarray(colour, dtype=np.float32))
    return draw


# Layers are painted bottom to top: the background activity fills the frame, a span's mark
# replaces it, objects and events are drawn over them, and the rain overlay falls in front of
# everything.
BACKGROUND, MARK, OBJECT, EVENT, OVERLAY = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ActionClass:
    name: str
    layer: int
    draw: DrawFn

    @property
    def context_only(self) -> bool:
        """What is on screen does not decide the label: it looks like another class (the disks, the
        teal squares) or like nothing (a span's middle). benchmarks/bench_accuracy.py reports these
        classes apart."""
        return self.name.endswith(("_cue", "_first", "_again", "_span"))


# Order matters: `num_classes=C` keeps the first C, so every context class comes after its cues.
CLASSES: tuple[ActionClass, ...] = (
    # long activities, 10-30 s
    ActionClass("red_stripes_scrolling", BACKGROUND, _draw_red_stripes_scrolling),
    ActionClass("green_checker_flickering", BACKGROUND, _draw_green_checker_flickering),
    ActionClass("blue_waves_drifting", BACKGROUND, _draw_blue_waves_drifting),
    ActionClass("white_rain_falling", OVERLAY, _draw_white_rain_falling),
    # medium actions, 3-10 s
    ActionClass("yellow_disk_moving_right", OBJECT, _draw_yellow_disk_moving_right),
    ActionClass("magenta_square_moving_down", OBJECT, _draw_magenta_square_moving_down),
    ActionClass("cyan_bar_rotating", OBJECT, _draw_cyan_bar_rotating),
    ActionClass("orange_disk_pulsing", OBJECT, _draw_orange_disk_pulsing),
    # short events, 1-2.5 s; the two borders are also the cues of the purple disk
    ActionClass("white_border_blinking", EVENT, _blinking_border("white")),
    ActionClass("black_border_blinking", EVENT, _blinking_border("black")),
    ActionClass("pink_disk_growing", EVENT, _draw_pink_disk_growing),
    # context-dependent: same picture, label decided by what came before
    ActionClass("purple_disk_rising_after_white_cue", OBJECT, _draw_purple_disk_rising),
    ActionClass("purple_disk_rising_after_black_cue", OBJECT, _draw_purple_disk_rising),
    ActionClass("teal_square_spinning_first", OBJECT, _draw_teal_square_spinning),
    ActionClass("teal_square_spinning_again", OBJECT, _draw_teal_square_spinning),
    # context-only: nothing on screen but a mark at the start and another at the end
    ActionClass("lime_to_sky_span", MARK, _span("lime", "sky")),
    ActionClass("brown_to_lavender_span", MARK, _span("brown", "lavender")),
)
CLASS_INDEX = {c.name: i for i, c in enumerate(CLASSES)}

# ----------------------------------------------------------------------------------------------
# The timeline: independent tracks of non-overlapping actions
# ----------------------------------------------------------------------------------------------

LONG_S, MEDIUM_S, SHORT_S = (10.0, 30.0), (3.0, 10.0), (1.0, 2.5)
CUE_TO_DISK_GAP_S = (0.5, 2.0)
CONTEXT_DISK_S = (3.0, 6.0)  # short enough that the cue stays within ~8 s of every disk frame
SPAN_S, SPAN_GAP_S = (8.0, 16.0), (2.0, 6.0)


@dataclass(frozen=True)
class Action:
    label: int
    start: int  # first frame
    end: int  # one past the last frame
    placement: Placement


class _Track:
    """Actions on one track never overlap; `cursor` is the first free frame."""

    def __init__(self, rng: np.random.Generator, fps: int, num_frames: int):
        self.rng, self.fps, self.num_frames = rng, fps, num_frames
        self.cursor = 0
        self.actions: list[Action] = []

    def frames(self, seconds: tuple[float, float]) -> int:
        return max(1, round(self.rng.uniform(*seconds) * self.fps))

    def wait(self, seconds: tuple[float, float]) -> None:
        self.cursor += self.frames(seconds)

    def fits(self, length: int) -> bool:
        return self.cursor + length <= self.num_frames

    def add(self, label: int, length: int) -> None:
        self.actions.append(Action(label, self.cursor, self.cursor + length, Placement.sample(self.rng)))
        self.cursor += length


def _fill(track: _Track, choices: list[int], seconds: tuple[float, float], gap_s: tuple[float, float],
          avoid: list[Action] = ()) -> None:
    """Alternate gaps and actions of random `choices` until the video ends. The last action is cut
    at the end, but never below the shortest length of `seconds`.

    `choices` may repeat a label: it is then drawn proportionally more often.

    A label of an `avoid` action overlapping the new one is not chosen: two tracks never show the
    same class at the same time (one annotation per class and moment, as in Charades/TSU).
    """
    track.wait((0.0, gap_s[1]))
    while track.num_frames - track.cursor >= round(seconds[0] * track.fps):
        length = min(track.frames(seconds), track.num_frames - track.cursor)
        busy = {a.label for a in avoid if a.start < track.cursor + length and track.cursor < a.end}
        free = [c for c in choices if c not in busy]
        if free:
            track.add(int(track.rng.choice(free)), length)
        else:
            track.cursor += length
        track.wait(gap_s)


def make_timeline(rng: np.random.Generator, num_frames: int, fps: int, num_classes: int) -> list[Action]:
    """The ground truth of one video: every action, sorted by start frame."""
    def enabled(name: str) -> bool:
        return CLASS_INDEX[name] < num_classes

    def labels(names: list[str]) -> list[int]:
        return [CLASS_INDEX[n] for n in names if enabled(n)]

    tracks: list[_Track] = []

    # Background activity (long, mutually exclusive: each one repaints the whole frame).
    background = labels(["red_stripes_scrolling", "green_checker_flickering", "blue_waves_drifting"])
    if background:
        track = _Track(rng, fps, num_frames)
        _fill(track, background, LONG_S, (3.0, 12.0))
        tracks.append(track)

    # Rain overlay (long, independent of the background).
    if enabled("white_rain_falling"):
        track = _Track(rng, fps, num_frames)
        _fill(track, [CLASS_INDEX["white_rain_falling"]], (8.0, 20.0), (15.0, 45.0))
        tracks.append(track)

    # Two object tracks (medium). The teal square lives only on the first one, so that its
    # occurrences never overlap and "first" vs "again" is well defined; it is listed twice (drawn
    # twice as often as each other object) so that most videos show it again after the first time.
    objects = labels(["yellow_disk_moving_right", "magenta_square_moving_down", "cyan_bar_rotating",
                      "orange_disk_pulsing"])
    if objects:
        first, second = _Track(rng, fps, num_frames), _Track(rng, fps, num_frames)
        _fill(first, objects + labels(["teal_square_spinning_first"] * 2), MEDIUM_S, (1.0, 6.0))
        _fill(second, objects, MEDIUM_S, (1.0, 6.0), avoid=first.actions)
        tracks += [first, second]

    # Short events; half of them are a cue followed by the purple disk, which lives on this track
    # too so that no other event can come between a cue and its disk.
    singles = labels(["white_border_blinking", "black_border_blinking", "pink_disk_growing"])
    episodes = [(CLASS_INDEX[cue], CLASS_INDEX[disk]) for cue, disk in [
        ("white_border_blinking", "purple_disk_rising_after_white_cue"),
        ("black_border_blinking", "purple_disk_rising_after_black_cue")] if enabled(disk)]
    if singles:
        track = _Track(rng, fps, num_frames)
        track.wait((0.0, 6.0))
        while True:
            if episodes and rng.random() < 0.5:
                cue, disk = episodes[rng.integers(len(episodes))]
                cue_len, gap, disk_len = (track.frames(SHORT_S), track.frames(CUE_TO_DISK_GAP_S),
                                          track.frames(CONTEXT_DISK_S))
                if not track.fits(cue_len + gap + disk_len):
                    break  # an episode is never cut: a disk without its cue would be unlabelable
                track.add(cue, cue_len)
                track.cursor += gap
                track.add(disk, disk_len)
            else:
                length = track.frames(SHORT_S)
                if not track.fits(length):
                    break
                track.add(int(rng.choice(singles)), length)
            track.wait((2.0, 6.0))
        tracks.append(track)

    # Spans (long, one at a time): the middle shows nothing, so that only a model that sees both
    # marks, up to 16 s apart, can label it. A span is never cut by the end of the video.
    spans = labels(["lime_to_sky_span", "brown_to_lavender_span"])
    if spans:
        track = _Track(rng, fps, num_frames)
        track.wait((0.0, SPAN_GAP_S[1]))
        while track.fits(length := track.frames(SPAN_S)):
            track.add(int(rng.choice(spans)), length)
            track.wait(SPAN_GAP_S)
        tracks.append(track)

    timeline = sorted((a for t in tracks for a in t.actions), key=lambda a: (a.start, a.label))

    # Only the first teal square of the video is "first"; every later one is "again" (or is left
    # out when that class is disabled).
    first_teal, timeline = CLASS_INDEX["teal_square_spinning_first"], list(timeline)
    teal_indices = [i for i, a in enumerate(timeline) if a.label == first_teal]
    for i in teal_indices[1:]:
        timeline[i] = replace(timeline[i], label=CLASS_INDEX["teal_square_spinning_again"])
    if not enabled("teal_square_spinning_again"):
        timeline = [a for a in timeline if a.label != CLASS_INDEX["teal_square_spinning_again"]]
    return timeline


# ----------------------------------------------------------------------------------------------
# Rendering and encoding
# ----------------------------------------------------------------------------------------------

def render_frames(actions: list[Action], num_frames: int, fps: int, size: int,
                  rng: np.random.Generator):
    """Yield the uint8 (size, size, 3) RGB frames of one video."""
    grid = Grid.square(size)
    # A slightly different neutral grey backdrop per video (brightness, tint, a vertical gradient),
    # so that "no background activity" is not one exact colour.
    grey = 0.5 + rng.uniform(-0.08, 0.08) + rng.uniform(-0.04, 0.04, size=3)
    backdrop = (grey + rng.uniform(-0.06, 0.06) * (grid.y[..., None] - 0.5)).astype(np.float32)
    by_layer = sorted(actions, key=lambda a: (CLASSES[a.label].layer, a.start))
    for frame in range(num_frames):
        image = backdrop.copy()
        for action in by_layer:
            if action.start <= frame < action.end:
                CLASSES[action.label].draw(image, grid, (frame - action.start) / fps,
                                           (action.end - action.start) / fps, action.placement)
        yield (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def write_mp4(path: Path, frames, fps: int, size: int) -> None:
    """h264/yuv420p mp4, written to a temporary name and renamed, so a crash leaves no partial file."""
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        # crf 18: visually lossless, the colours the classes are made of survive compression.
        # mbtree=0: with x264's macroblock-tree rate control, encoding the same frames again in
        # one process gave a different file in about half of the runs (even single-threaded, so
        # it presumably reads uninitialised memory); without it the files are byte-identical.
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush the delayed frames


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

VIDEO_ID = "synthetic_{:04d}"
_VIDEO_FILE = re.compile(r"synthetic_\d{4,}\.mp4")


def make_dataset(out_dir: str | os.PathLike, num_videos: int = 40, num_classes: int = len(CLASSES),
                 seed: int = 0, fps: int = 8, size: int = 112, min_duration: float = 30.0,
                 max_duration: float = 75.0, test_fraction: float = 0.25) -> dict:
    """Render the dataset into out_dir and return its annotations (the annotations.json dict).

    Durations are drawn uniformly in [min_duration, max_duration] seconds and rounded to whole
    frames; `num_classes` keeps the first classes of `CLASSES`. Videos of this naming scheme left
    over from an earlier, larger run in out_dir/videos are removed.
    """
    _check_arguments(num_videos, num_classes, seed, fps, size, min_duration, max_duration, test_fraction)
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)

    video_ids = [VIDEO_ID.format(i) for i in range(num_videos)]
    test_ids = set(_test_split(video_ids, seed, test_fraction))
    annotations = {}
    for index, video_id in enumerate(video_ids):
        rng = np.random.default_rng([seed, index])  # one stream per video: independent of num_videos
        num_frames = round(rng.uniform(min_duration, max_duration) * fps)
        actions = make_timeline(rng, num_frames, fps, num_classes)
        write_mp4(video_dir / f"{video_id}.mp4", render_frames(actions, num_frames, fps, size, rng), fps, size)
        annotations[video_id] = {
            "subset": "testing" if video_id in test_ids else "training",
            "duration": num_frames / fps,
            "actions": [[a.label, a.start / fps, a.end / fps] for a in actions],
        }

    stale = {p for p in video_dir.iterdir() if _VIDEO_FILE.fullmatch(p.name)} - {
        video_dir / f"{v}.mp4" for v in video_ids}
    for path in stale:
        path.unlink()
    # One video per line: readable, and diffs of a regenerated dataset stay small.
    _write_text(out_dir / "annotations.json",
                "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in annotations.items()) + "\n}\n")
    _write_text(out_dir / "classes.txt", "".join(c.name + "\n" for c in CLASSES[:num_classes]))
    return annotations


def _test_split(video_ids: list[str], seed: int, test_fraction: float) -> list[str]:
    """round(N * test_fraction) random videos, but at least one of each subset when N >= 2."""
    n = len(video_ids)
    n_test = round(n * test_fraction)
    if n >= 2 and test_fraction > 0:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng([seed, 2**32 - 1]).permutation(n)  # not any video's stream
    return [video_ids[i] for i in order[:n_test]]


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _check_arguments(num_videos, num_classes, seed, fps, size, min_duration, max_duration, test_fraction):
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(num_videos) or num_videos < 1:
        raise ValueError(f"num_videos must be a positive integer, got {num_videos!r}")
    if not is_int(num_classes) or not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be an integer in [1, {len(CLASSES)}], got {num_classes!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_int(fps) or fps < 1:
        raise ValueError(f"fps must be a positive integer (frame times stay exact), got {fps!r}")
    if not is_int(size) or size < 16 or size % 2:
        raise ValueError(f"size must be an even integer >= 16 (yuv420p halves the chroma), got {size!r}")
    if not (0 < min_duration <= max_duration and math.isfinite(max_duration)):
        raise ValueError(f"durations must satisfy 0 < min_duration <= max_duration < inf, "
                         f"got min_duration={min_duration!r}, max_duration={max_duration!r}")
    if min_duration * fps < 1:
        raise ValueError(f"min_duration={min_duration!r} s is shorter than one frame at fps={fps}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m extractors.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-videos", type=int, default=40)
    parser.add_argument("--num-classes", type=int, default=len(CLASSES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--min-duration", type=float, default=30.0)
    parser.add_argument("--max-duration", type=float, default=75.0)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        annotations = make_dataset(args.out, num_videos=args.num_videos, num_classes=args.num_classes,
                                   seed=args.seed, fps=args.fps, size=args.size, min_duration=args.min_duration,
                                   max_duration=args.max_duration, test_fraction=args.test_fraction)
    except ValueError as error:
        parser.error(str(error))
    seconds = sum(v["duration"] for v in annotations.values())
    actions = sum(len(v["actions"]) for v in annotations.values())
    print(f"wrote {len(annotations)} videos ({seconds / 60:.1f} min, {actions} actions, "
          f"{args.num_classes} classes) to {args.out} in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
