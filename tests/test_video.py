"""extractors.video against PyAV's decoding of the same files and PIL's resize."""
from __future__ import annotations

import fractions
import math
import pickle

import av
import numpy as np
import pytest
from PIL import Image

from extractors.video import VideoDecodeError, iter_frame_chunks, probe

# name -> (frames, fps, width, height); odd aspect ratios on purpose (landscape, portrait, NTSC rate).
VIDEOS = {
    "landscape": (50, 25.0, 96, 64),
    "portrait": (40, 30.0, 64, 80),
    "ntsc": (36, 30000 / 1001, 80, 60),
}


def write_video(path, frames: int, fps: float, width: int, height: int) -> None:
    """h264 mp4 whose frames all differ: a colour ramp that shifts and a white square that moves."""
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for k in range(frames):
            image = np.empty((height, width, 3), np.uint8)
            image[..., 0] = (x * 255 // width + 7 * k) % 256
            image[..., 1] = y * 255 // height
            image[..., 2] = (11 * k) % 256
            left = (5 * k) % (width - 16)
            image[height // 3:height // 3 + 16, left:left + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pyav_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def reference_resize_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize of the short side to `size`, then the centre square (computed independently)."""
    height, width = frame.shape[:2]
    scale = size / min(height, width)
    new_width, new_height = round(width * scale), round(height * scale)
    resized = np.asarray(Image.fromarray(frame).resize((new_width, new_height), Image.BILINEAR))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top:top + size, left:left + size]


def decode_all(path, **kwargs):
    chunks = list(iter_frame_chunks(path, **kwargs))
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.times_s for c in chunks]), chunks


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for name, spec in VIDEOS.items():
        paths[name] = root / f"{name}.mp4"
        write_video(paths[name], *spec)
    return paths


@pytest.mark.parametrize("name", VIDEOS)
def test_probe_reports_what_was_written(videos, name):
    frames, fps, width, height = VIDEOS[name]
    info = probe(videos[name])
    assert (info.frames, info.width, info.height) == (frames, width, height)
    assert info.fps == pytest.approx(fps, rel=1e-6)
    assert info.duration == pytest.approx(frames / fps, rel=1e-6)


@pytest.mark.parametrize("name", VIDEOS)
def test_native_frames_equal_pyav(videos, name):
    # size = short side: no resize, only the centre crop, so decord must match PyAV pixel for pixel
    # (both are FFmpeg's h264 decoder; the YUV->RGB conversion may round differently by 1).
    frames, fps, width, height = VIDEOS[name]
    size = min(width, height)
    decoded, times, _ = decode_all(videos[name], size=size)
    reference = pyav_frames(videos[name])
    top, left = (height - size) // 2, (width - size) // 2
    reference = reference[:, top:top + size, left:left + size]
    assert decoded.dtype == np.uint8 and decoded.shape == (frames, size, size, 3)
    difference = np.abs(decoded.astype(int) - reference)
    assert difference.max() <= 2 and difference.mean() < 0.05
    np.testing.assert_allclose(times, np.arange(frames) / fps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name,size", [("landscape", 32), ("portrait", 48), ("ntsc", 112)])
def test_resized_frames_match_pil(videos, name, size):
    decoded, _, _ = decode_all(videos[name], size=size)
    reference = np.stack([reference_resize_crop(frame, size) for frame in pyav_frames(videos[name])])
    assert decoded.shape == reference.shape == (VIDEOS[name][0], size, size, 3)
    difference = np.abs(decoded.astype(int) - reference)
    # Two implementations of the same antialiased bilinear filter: off by a rounding step at most,
    # and essentially never.
    assert difference.max() <= 3 and difference.mean() < 0.5


def test_chunks_are_bounded_and_concatenate_to_the_whole(videos):
    whole, whole_times, chunks = decode_all(videos["landscape"], size=32, chunk_frames=1000)
    pieces, piece_times, small_chunks = decode_all(videos["landscape"], size=32, chunk_frames=7)
    assert len(chunks) == 1 and [len(c.frames) for c in small_chunks] == [7] * 7 + [1]
    np.testing.assert_array_equal(pieces, whole)
    np.testing.assert_array_equal(piece_times, whole_times)


def test_decoding_in_small_batches_gives_the_same_frames(videos, monkeypatch):
    # Full-HD videos are decoded a few native frames at a time (extractors.video._DECODE_BUDGET_BYTES);
    # shrink the budget to 3 frames of this small video so that path runs here too.
    whole, _, _ = decode_all(videos["portrait"], size=40, chunk_frames=16)
    monkeypatch.setattr("extractors.video._DECODE_BUDGET_BYTES", 3 * 64 * 80 * 3)
    batched, _, _ = decode_all(videos["portrait"], size=40, chunk_frames=16)
    np.testing.assert_array_equal(batched, whole)


def expected_resampling(frames: int, fps: float, target_fps: float) -> tuple[list[int], list[float]]:
    """The documented rule as a loop in exact rational arithmetic: frame k shows native frame
    floor(k / target * fps + 1/2), ties (exactly half-way between two frames) going to the later one."""
    fps, target_fps = fractions.Fraction(fps), fractions.Fraction(target_fps)
    indices, times = [], []
    for k in range(10 * frames):
        index = math.floor(k / target_fps * fps + fractions.Fraction(1, 2))
        if index >= frames:
            break
        indices.append(index)
        times.append(float(k / target_fps))
    return indices, times


@pytest.mark.parametrize("name,target_fps", [("landscape", 10.0), ("landscape", 24.0), ("portrait", 25.0),
                                             ("ntsc", 24.0), ("landscape", 50.0)])
def test_target_fps_picks_the_nearest_native_frame(videos, name, target_fps):
    frames, fps, width, height = VIDEOS[name]
    size = min(width, height)
    decoded, times, _ = decode_all(videos[name], target_fps=target_fps, size=size)
    expected_indices, expected_times = expected_resampling(frames, fps, target_fps)
    np.testing.assert_allclose(times, expected_times, rtol=0, atol=1e-9)
    # Identify each returned frame as the native PyAV frame it is closest to (all frames differ).
    reference = pyav_frames(videos[name])
    top, left = (height - size) // 2, (width - size) // 2
    reference = reference[:, top:top + size, left:left + size].astype(np.float32)
    distance = np.abs(decoded[:, None].astype(np.float32) - reference[None]).mean(axis=(2, 3, 4))
    assert distance.argmin(axis=1).tolist() == expected_indices
    assert distance.min(axis=1).max() < 0.05


def corrupt_copies(source, directory):
    data = source.read_bytes()
    third = len(data) // 3
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files = {
        "zero_bytes": b"",
        "garbage": garbage,
        "truncated": data[: len(data) // 2],
        # Container index intact, compressed frames in the middle overwritten: opens, fails to decode.
        "corrupt_mid_file": data[:third] + (garbage * 100)[:third] + data[2 * third:],
    }
    paths = {}
    for kind, content in files.items():
        paths[kind] = directory / f"{kind}.mp4"
        paths[kind].write_bytes(content)
    paths["missing"] = directory / "does_not_exist.mp4"
    return paths


@pytest.mark.parametrize("kind", ["zero_bytes", "garbage", "truncated", "corrupt_mid_file", "missing"])
def test_bad_files_raise_video_decode_error_naming_the_file(videos, tmp_path, kind):
    path = corrupt_copies(videos["landscape"], tmp_path)[kind]
    with pytest.raises(VideoDecodeError) as raised:
        for _ in iter_frame_chunks(path, size=32):
            pass
    assert raised.value.path == str(path) and str(path) in str(raised.value) and raised.value.reason
    if kind != "corrupt_mid_file":  # the header of a mid-file corruption is fine; probe reads only that
        with pytest.raises(VideoDecodeError):
            probe(path)


def test_decode_error_survives_pickling():
    # Ray ships worker exceptions back to the driver by pickling them.
    error = pickle.loads(pickle.dumps(VideoDecodeError("/data/a.mp4", "file is empty (0 bytes)")))
    assert (error.path, error.reason) == ("/data/a.mp4", "file is empty (0 bytes)")


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"chunk_frames": -1}, {"target_fps": 0.0}, {"size": 2.5}])
def test_bad_arguments_raise_value_error(videos, kwargs):
    with pytest.raises(ValueError):
        next(iter_frame_chunks(videos["landscape"], **kwargs))
