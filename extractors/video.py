"""Video decoding: decord reads the compressed file directly and hands out resized RGB frames in chunks.

Nothing here writes frames to disk or calls the ffmpeg CLI. Frames come out as bounded chunks
(at most `chunk_frames` at a time), so an hour-long video never sits in memory whole.

Frame sampling rule (`target_fps`): output frame k has the nominal time t_k = k / target_fps and
shows the native frame nearest to it, i_k = floor(k * native_fps / target_fps + 1/2) (a tie, exactly
half-way between two frames, goes to the later one), for every k whose i_k is a frame of the video. With target_fps=None every native frame is returned (i_k = k). The
returned `times_s` are the nominal times t_k (for native sampling, k / native_fps), so features
sit on a regular time grid; they differ from the shown frame's time by at most half a native frame.
We assume a constant frame rate, as decord's own frame indexing does.

Resizing: the short side is scaled to `size` (long side rounded to the nearest pixel, aspect ratio
kept) with antialiased bilinear interpolation in torch (the same filter as PIL's BILINEAR resize),
then the centre size x size square is cropped. decord can resize while decoding (VideoReader
width/height), but for some output sizes it fails with "DECORDArrayCopyFromTo: The size must
exactly match" (dmlc/decord#336), so we decode at native size and resize ourselves, in batches
small enough (`_DECODE_BUDGET_BYTES`) that full-HD frames never pile up in memory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import decord
import numpy as np
from decord._ffi.base import DECORDError  # not a RuntimeError subclass: it has to be caught by name

# Native-size RGB frames decoded (and then resized) at once: 32 MiB is 5 full-HD frames or 145 at 320x240.
_DECODE_BUDGET_BYTES = 32 * 2**20

# Everything decord (or the OS underneath it) raises for an unreadable or broken file.
_DECODE_FAILURES = (DECORDError, RuntimeError, OSError, ValueError, IndexError)


class VideoDecodeError(Exception):
    """A video that cannot be opened or decoded; `.path` names the file and `.reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across pickling, e.g. when Ray ships the error back
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # number of frames decord indexes
    fps: float  # average frame rate
    duration: float  # seconds, frames / fps
    width: int
    height: int


@dataclass(frozen=True)
class FrameChunk:
    frames: np.ndarray  # uint8 (n, size, size, 3), RGB
    times_s: np.ndarray  # float64 (n,), nominal sample times in seconds (see module docstring)


def _open(path: str | os.PathLike):
    """A decord VideoReader on `path`, with every failure turned into a VideoDecodeError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")
    try:
        # One decoding thread: extraction runs one worker per CPU core already.
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except _DECODE_FAILURES as error:
        raise VideoDecodeError(path, f"cannot open: {_first_line(error)}") from error
    if len(reader) == 0:
        raise VideoDecodeError(path, "no video frames")
    fps = reader.get_avg_fps()
    if not (fps > 0 and math.isfinite(fps)):
        raise VideoDecodeError(path, f"invalid frame rate {fps!r}")
    return reader


def _first_line(error: BaseException) -> str:
    # decord appends a long C++ stack trace to its messages; the first line says what went wrong.
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate, duration and native size of a video.

    Decodes the first frame and the last one (a seek to the last key frame and the frames after
    it): a file cut short whose header is intact (an interrupted copy of an mp4 written with its
    index first, say) still claims every frame and would fail only when extracted.
    """
    reader = _open(path)
    frames, fps = len(reader), float(reader.get_avg_fps())
    height, width = _first_frame(reader, path).shape[:2]
    if frames > 1:
        try:
            reader[frames - 1].asnumpy()
        except _DECODE_FAILURES as error:
            raise VideoDecodeError(path, f"cannot decode its last frame ({frames - 1}; truncated or corrupt "
                                         f"file?): {_first_line(error)}") from error
    return VideoInfo(frames=frames, fps=fps, duration=frames / fps, width=int(width), height=int(height))


def _first_frame(reader, path) -> np.ndarray:
    # decord reports the frame size only through a decoded frame.
    try:
        return reader[0].asnumpy()
    except _DECODE_FAILURES as error:
        raise VideoDecodeError(path, f"cannot decode the first frame: {_first_line(error)}") from error


def sample_indices(num_frames: int, native_fps: float, target_fps: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(native frame indices, nominal times in seconds) of the frames sampled at target_fps.

    The rule is in the module docstring: i_k = floor(k * native_fps / target_fps + 1/2), t_k = k / target_fps.
    """
    if target_fps is None:
        indices = np.arange(num_frames, dtype=np.int64)
        return indices, indices / float(native_fps)
    # k runs while i_k <= num_frames - 1, i.e. k * native / target + 1/2 < num_frames; one extra k,
    # dropped by the mask, guards the floating-point edge. Multiplying before dividing keeps ties
    # (e.g. 25 -> 50 fps, k * 25 / 50 = x.5) exact for integer rates, so they round up as documented.
    count = math.ceil((num_frames - 0.5) * target_fps / native_fps) + 1
    k = np.arange(max(count, 0), dtype=np.int64)
    indices = np.floor(k * native_fps / target_fps + 0.5).astype(np.int64)
    keep = indices < num_frames
    k, indices = k[keep], indices[keep]
    return indices, k / float(target_fps)


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `size` and the aspect ratio kept."""
    if width <= height:
        return size, max(size, int(math.floor(height * size / width + 0.5)))
    return max(size, int(math.floor(width * size / height + 0.5))), size


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) frames with the short side scaled to `size`, antialiased bilinear (like PIL BILINEAR)."""
    import torch  # imported on first use: probe() (the pipeline's manifest stage) does not need it
    import torch.nn.functional as F

    height, width = frames.shape[1:3]
    new_width, new_height = resized_shape(width, height, size)
    if (new_height, new_width) == (height, width):
        return frames
    # (n, 3, H, W) as a view: channels_last uint8, the layout torch's fast (SIMD) antialiased
    # bilinear kernel works on directly, >10x faster than converting to float first.
    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    images = F.interpolate(images, size=(new_height, new_width), mode="bilinear", antialias=True,
                           align_corners=False)
    return images.permute(0, 2, 3, 1).numpy()


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size square of (n, H, W, C) frames (the extra pixel, if odd, goes to the end)."""
    height, width = frames.shape[1:3]
    top, left = (height - size) // 2, (width - size) // 2
    return frames[:, top:top + size, left:left + size]


def iter_frame_chunks(
    path: str | os.PathLike,
    target_fps: float | None = None,
    size: int = 224,
    chunk_frames: int = 128,
) -> Iterator[FrameChunk]:
    """Yield the video's frames, sampled at target_fps, as RGB uint8 (n, size, size, 3) chunks of n <= chunk_frames."""
    if target_fps is not None and not (target_fps > 0 and math.isfinite(target_fps)):
        raise ValueError(f"target_fps must be positive or None, got {target_fps!r}")
    for name, value in (("size", size), ("chunk_frames", chunk_frames)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    path = os.fspath(path)
    reader = _open(path)
    indices, times = sample_indices(len(reader), float(reader.get_avg_fps()), target_fps)
    native_frame_bytes = int(np.prod(_first_frame(reader, path).shape))
    batches = _decode_sampled(reader, path, indices, max(1, _DECODE_BUDGET_BYTES // native_frame_bytes),
                              chunk_frames)
    for start in range(0, len(indices), chunk_frames):
        count = min(chunk_frames, len(indices) - start)
        parts = []
        while count > 0:
            batch = next(batches)
            parts.append(center_crop(resize_short_side(batch, size), size))
            count -= len(batch)
        yield FrameChunk(frames=np.ascontiguousarray(np.concatenate(parts)),
                         times_s=times[start:start + chunk_frames].astype(np.float64))


def _decode_sampled(reader, path: str, indices: np.ndarray, batch_frames: int,
                    chunk_frames: int) -> Iterator[np.ndarray]:
    """Native-size uint8 (n, H, W, 3) frames at the sorted `indices`, in batches of at most
    batch_frames that never straddle a multiple of chunk_frames (so each output chunk is whole batches).

    The video is decoded once, straight through from frame 0, never seeking: `next()` for a sampled
    frame, `skip_frames` for the frames between samples, which must be decoded (later frames depend
    on them) but are not converted to RGB. That takes about 0.6x the CPU time of `get_batch` on
    the same frames: get_batch keeps a second, prefetching thread busy whatever num_threads says,
    and so takes a core away from the other extraction worker.
    """
    try:
        reader.seek(0)  # frame 0 is a key frame, so this is exact
    except _DECODE_FAILURES as error:
        raise VideoDecodeError(path, f"cannot rewind to the first frame: {_first_line(error)}") from error
    position = 0  # the next frame next() returns
    batch = None
    for k, index in enumerate(indices.tolist()):
        if batch is None:
            size = min(batch_frames, chunk_frames - k % chunk_frames, len(indices) - k)
            filled = 0
        if index < position:  # sampling above the native rate repeats the frame just decoded
            frame = previous
        else:
            try:
                if index > position:
                    reader.skip_frames(index - position)
                frame = previous = reader.next().asnumpy()
            except StopIteration:
                raise VideoDecodeError(path, f"the stream ended before frame {index} of {len(reader)}") from None
            except _DECODE_FAILURES as error:
                raise VideoDecodeError(path, f"decoding frame {index} failed: {_first_line(error)}") from error
            position = index + 1
        if batch is None:
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise VideoDecodeError(path, f"decoder returned a frame of shape {frame.shape} at frame {index}")
            batch = np.empty((size, *frame.shape), dtype=np.uint8)
        elif frame.shape != batch.shape[1:]:
            raise VideoDecodeError(path, f"frame {index} has shape {frame.shape}, earlier frames {batch.shape[1:]}")
        batch[filled] = frame
        filled += 1
        if filled == size:
            yield batch
            batch = None
