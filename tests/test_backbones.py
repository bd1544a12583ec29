"""build_extractor and the shared streaming machinery: frame buffer, files vs in-memory frames,
feature times in seconds, metadata, input validation, device choice."""
from __future__ import annotations

import hashlib
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from extractors.backbones import build_extractor
from extractors.base import FrameBuffer
from extractors.clip import ClipExtractor
from extractors.config import ExtractorConfig
from extractors.i3d import I3DExtractor, InceptionI3d
from extractors.shards import VideoFeatures
from extractors.video import center_crop, iter_frame_chunks, resize_short_side

# Tests build random-weight networks on purpose; the warning itself is tested in test_i3d / test_clip.
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED:UserWarning")


def i3d_config(**overrides) -> ExtractorConfig:
    return ExtractorConfig(**{"backbone": "i3d", "fps": 24.0, "image_size": 8, "device": "cpu", **overrides})


def build(cfg: ExtractorConfig):
    torch.manual_seed(0)  # same weights for every extractor built in a test
    return build_extractor(cfg)


def random_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def write_video(path, frames: np.ndarray, fps: int) -> None:
    """An MPEG-4 file of the frames, written with PyAV (independent of the decoding under test)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_frame_buffer_keeps_exactly_the_frames_asked_for():
    frames = np.arange(100)[:, None, None, None].repeat(2, axis=1).astype(np.uint8)  # frame i holds value i
    buffer = FrameBuffer()
    buffer.append(frames[:10])
    assert (buffer.start, buffer.end, len(buffer)) == (0, 10, 10)
    assert buffer.take(3, 7)[:, 0, 0, 0].tolist() == [3, 4, 5, 6]
    buffer.discard_before(6)
    assert (buffer.start, buffer.end) == (6, 10)
    buffer.discard_before(25)  # beyond what has arrived: later frames below 25 are dropped on arrival
    assert len(buffer) == 0 and buffer.end == 10
    buffer.append(frames[10:20])
    assert len(buffer) == 0 and buffer.end == 20
    buffer.append(frames[20:30])
    assert (buffer.start, buffer.end) == (25, 30)
    assert buffer.take(27, 33)[:, 0, 0, 0].tolist() == [27, 28, 29, 29, 29, 29]  # past the end: last frame
    with pytest.raises(IndexError, match="not buffered"):
        buffer.take(20, 26)


def test_build_extractor_picks_the_backbone():
    assert isinstance(build(i3d_config()), I3DExtractor)
    clip = build(ExtractorConfig(backbone="clip", model_name="vit_base_patch32_clip_224.openai", device="cpu"))
    assert isinstance(clip, ClipExtractor) and clip.dim == 512  # ViT-B/32's CLIP embedding


@pytest.mark.parametrize("mode, expected_rows", [("fully_conv", 5), ("snippets", 3)])
def test_in_memory_frames(mode, expected_rows):
    extractor = build(i3d_config(mode=mode, snippet_len=16, stride=16))
    frames = random_frames(40, 8, 8)
    times = 100.0 + np.arange(40) / 24.0
    video = extractor.extract_frames(frames, times)
    assert isinstance(video, VideoFeatures)
    assert video.features.dtype == np.float32 and video.features.shape == (expected_rows, 1024)
    assert extractor.num_features(40) == expected_rows
    assert np.all(np.isfinite(video.features)) and video.features.std() > 0
    hop = 8 if mode == "fully_conv" else 16
    starts = np.arange(expected_rows) * hop
    np.testing.assert_allclose(video.start_s, 100.0 + starts / 24.0)
    np.testing.assert_allclose(video.end_s, 100.0 + np.minimum(starts + hop, 40) / 24.0)


def test_frames_of_another_size_are_resized_like_decoded_ones():
    extractor = build(i3d_config(mode="snippets", snippet_len=8, stride=8, image_size=16))
    frames = random_frames(8, 24, 32)
    times = np.arange(8) / 24.0
    resized = center_crop(resize_short_side(frames, 16), 16)
    np.testing.assert_array_equal(extractor.extract_frames(frames, times).features,
                                  extractor.extract_frames(resized, times).features)


def test_native_frame_rate_gives_frame_period_from_the_times():
    extractor = build(i3d_config(fps=None, mode="snippets", snippet_len=4, stride=4))
    video = extractor.extract_frames(random_frames(6, 8, 8), np.arange(6) / 30.0)
    np.testing.assert_allclose(video.start_s, [0, 4 / 30])
    np.testing.assert_allclose(video.end_s, [4 / 30, 6 / 30])


def test_video_file_streams_like_in_memory_frames(tmp_path):
    # 44 frames at 24 fps, sampled at 12 fps: 22 frames, decoded 5 at a time, windows of 8 new frames.
    path = tmp_path / "clip.mp4"
    write_video(path, random_frames(44, 48, 64, seed=2), fps=24)
    cfg = i3d_config(fps=12.0, mode="fully_conv", chunk_frames=8)
    extractor = build(cfg)
    from_file = extractor.extract(path)

    chunks = list(iter_frame_chunks(path, target_fps=12.0, size=8, chunk_frames=1000))
    frames, times = chunks[0].frames, chunks[0].times_s
    assert len(frames) == 22
    in_memory = extractor.extract_frames(frames, times)
    assert len(from_file) == 3  # ceil(22 / 8)
    np.testing.assert_allclose(from_file.features, in_memory.features, rtol=1e-4,
                               atol=1e-5 * np.abs(in_memory.features).max())
    np.testing.assert_allclose(from_file.start_s, [0, 8 / 12, 16 / 12])
    np.testing.assert_allclose(from_file.end_s, [8 / 12, 16 / 12, 22 / 12])


def test_metadata(tmp_path):
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(InceptionI3d().state_dict(), path)
    cfg = i3d_config(weights=str(path), mode="snippets", snippet_len=16, stride=8)
    metadata = build(cfg).metadata()
    assert json.loads(json.dumps(metadata)) == metadata
    assert metadata == build(cfg).metadata()  # every Ray actor writes the same footer
    assert metadata["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metadata["checkpoint"] == "rgb_imagenet.pt" and metadata["pretrained"] is True
    assert metadata["backbone"] == "i3d" and metadata["dim"] == 1024
    assert (metadata["mode"], metadata["snippet_len"], metadata["stride"], metadata["clip_window"]) == (
        "snippets", 16, 8, None)
    assert metadata["feature_hop_s"] == pytest.approx(8 / 24) and metadata["precision"] == "float32"
    assert metadata["fps"] == 24.0 and metadata["image_size"] == 8

    fully_conv = build(i3d_config()).metadata()
    assert fully_conv["mode"] == "fully_conv" and fully_conv["snippet_len"] is None
    assert fully_conv["pretrained"] is False and fully_conv["checkpoint_sha256"] == "random"
    assert fully_conv["feature_hop_s"] == pytest.approx(8 / 24)


def test_i3d_from_the_hub_is_refused():
    with pytest.raises(ValueError, match="rgb_imagenet.pt"):
        build(i3d_config(pretrained_from_hub=True))


def test_bad_frames_are_clear_errors():
    extractor = build(i3d_config())
    times = np.arange(4) / 24.0
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract_frames(random_frames(4, 8, 8).astype(np.float32), times)
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        extractor.extract_frames(random_frames(4, 8, 8)[..., :2], times)
    with pytest.raises(ValueError, match="empty"):
        extractor.extract_frames(random_frames(0, 8, 8), times[:0])
    with pytest.raises(ValueError, match=r"times_s must have shape \(4,\)"):
        extractor.extract_frames(random_frames(4, 8, 8), times[:3])
    with pytest.raises(ValueError, match="strictly increasing"):
        extractor.extract_frames(random_frames(4, 8, 8), times[::-1])


def resolve_device(name: str) -> torch.device:
    """The device an extractor with extractor.device = name runs on."""
    return build(i3d_config(device=name)).device


def test_device_choice():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="extractor.device is 'cuda' but this machine cannot run CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
