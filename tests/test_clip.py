"""CLIP: window averaging against a per-frame loop, preprocessing against PIL, weights and metadata.

A tiny network of the CLIP ViT architecture (2 blocks, width 32, 32x32 images) keeps the tests fast;
the code paths are those of vit_large_patch14_clip_224.openai.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from extractors.base import CheckpointError
from extractors.clip import ClipExtractor, create_clip, embedding_dim
from extractors.config import ExtractorConfig

MODEL_NAME = "vit_base_patch16_clip_224.openai"
TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8, num_classes=24)
FPS = 24.0
# Tests build random-weight networks on purpose; the warning itself is checked in one test (pytest.warns).
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED:UserWarning")


def make_extractor(model_kwargs=TINY, **overrides) -> ClipExtractor:
    torch.manual_seed(0)
    cfg = ExtractorConfig(**{"backbone": "clip", "model_name": MODEL_NAME, "fps": FPS, "device": "cpu",
                             "image_size": 32, **overrides})
    return ClipExtractor(cfg, model_kwargs=model_kwargs)


def random_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_window_averages_equal_a_per_frame_loop():
    extractor = make_extractor(clip_window=4, batch_size=3)
    frames = random_frames(11, 32, 32)  # already the network's size: only scaling and normalisation apply
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    with torch.inference_mode():
        per_frame = []
        for frame in frames:
            image = ((frame / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
            per_frame.append(extractor.model(torch.from_numpy(image))[0].double().numpy())
    per_frame = np.array(per_frame)
    expected = np.array([per_frame[0:4].mean(0), per_frame[4:8].mean(0), per_frame[8:11].mean(0)])

    # Decoded in chunks of 5 frames: windows and batches of 3 straddle chunk boundaries.
    with torch.inference_mode():
        features, spans = map(np.concatenate, zip(*extractor.iter_features(iter(np.array_split(frames, [5, 10])))))
    assert spans.tolist() == [[0, 4], [4, 8], [8, 11]]
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    result = extractor.extract_frames(frames, 3.0 + np.arange(11) / FPS)
    assert result.features.dtype == np.float32 and result.features.shape == (3, 24)
    np.testing.assert_allclose(result.features, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(result.start_s, 3.0 + np.array([0, 4, 8]) / FPS)
    np.testing.assert_allclose(result.end_s, 3.0 + np.array([4, 8, 11]) / FPS)
    assert extractor.num_features(11) == 3 == math.ceil(11 / 4)


def test_preprocessing_is_clips_bicubic_resize_and_centre_crop():
    # CLIP prepares images with PIL: bicubic resize of the short side, centre crop, then normalise.
    extractor = make_extractor()
    frames = random_frames(3, 48, 40, seed=1)
    with torch.inference_mode():
        ours = extractor.preprocess(frames).numpy()
    assert ours.shape == (3, 3, 32, 32)
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    for frame, image in zip(frames, ours):
        resized = np.asarray(Image.fromarray(frame).resize((32, 38), Image.BICUBIC))  # (38, 32, 3): 40 -> 32
        expected = resized[3:35]  # centre 32 rows of 38
        pixels = (image.transpose(1, 2, 0) * std + mean) * 255.0
        assert np.abs(pixels - expected).max() <= 1.5  # PIL and torch round differently by up to one level


def test_output_is_the_projected_clip_embedding():
    # For timm's OpenAI CLIP towers the head is the image-text projection: ViT-B/16 is 768 wide, its
    # CLIP embedding 512-d. Keeping the head (not num_classes=0) is what gives the 512-d embedding.
    model, _ = create_clip(MODEL_NAME, depth=1)
    assert model.num_features == 768
    assert embedding_dim(model) == 512 == model.pretrained_cfg["num_classes"]
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight.shape == (512, 768)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 512)


def test_normalisation_is_openai_clips():
    extractor = make_extractor()
    assert extractor.mean == pytest.approx(OPENAI_CLIP_MEAN) and extractor.std == pytest.approx(OPENAI_CLIP_STD)


def test_weights_file_loads_and_records_sha256(tmp_path):
    torch.manual_seed(5)
    original, _ = create_clip(MODEL_NAME, **TINY)
    path = tmp_path / "clip_tiny.pt"
    torch.save(original.state_dict(), path)

    extractor = make_extractor(weights=str(path))
    for key, value in original.state_dict().items():
        assert torch.equal(extractor.model.state_dict()[key], value), key
    metadata = extractor.metadata()
    assert metadata["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metadata["pretrained"] is True and metadata["checkpoint"] == "clip_tiny.pt"


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(6)
    original, _ = create_clip(MODEL_NAME, **TINY)
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in original.state_dict().items()}, str(path))
    extractor = make_extractor(weights=str(path))
    assert torch.equal(extractor.model.head.weight, original.head.weight)


def test_checkpoint_with_missing_keys_names_them(tmp_path):
    state, _ = create_clip(MODEL_NAME, **TINY)
    state = state.state_dict()
    del state["head.weight"], state["blocks.1.attn.qkv.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.qkv\.weight, head\.weight"):
        make_extractor(weights=str(path))


def test_random_weights_warn_and_are_recorded():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        extractor = ClipExtractor(ExtractorConfig(backbone="clip", model_name=MODEL_NAME, image_size=32,
                                                  device="cpu"), model_kwargs=TINY)
    metadata = extractor.metadata()
    json.dumps(metadata)  # goes into a Parquet footer as JSON
    assert metadata["pretrained"] is False and metadata["checkpoint_sha256"] == "random"
    assert metadata["backbone"] == "clip" and metadata["dim"] == 24 and metadata["clip_window"] == 16
    assert metadata["feature_hop_s"] == pytest.approx(16 / 24)


def test_bad_model_choices_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="fine-tuned"):
        create_clip("vit_base_patch16_clip_224.openai_ft_in1k", depth=1)
    with pytest.raises(ValueError, match="no_such_model"):
        create_clip("no_such_model")
    with pytest.raises(ValueError, match="not both"):
        create_clip(MODEL_NAME, weights=tmp_path / "x.pt", pretrained_from_hub=True)


def test_clip_and_vim_share_the_window_averaging_of_frames_py():
    """extractors.frames.FrameEmbeddingExtractor: any embed(frames) -> (n, D), averaged over windows
    whose frames straddle chunk and batch boundaries, equals numpy's mean of each window."""
    from extractors.base import CheckpointInfo
    from extractors.frames import FrameEmbeddingExtractor
    from extractors.vim import VimExtractor

    assert issubclass(ClipExtractor, FrameEmbeddingExtractor) and issubclass(VimExtractor, FrameEmbeddingExtractor)

    class PixelMeans(FrameEmbeddingExtractor):  # embedding: each frame's mean of R, G, B
        backbone, model_name, dim = "clip", "pixel-means", 3

        @property
        def window(self) -> int:
            return self.cfg.clip_window

        def embed(self, frames):
            return torch.from_numpy(frames.astype(np.float32).mean(axis=(1, 2)))

    cfg = ExtractorConfig(backbone="clip", device="cpu", image_size=8, fps=FPS, clip_window=5, batch_size=3)
    extractor = PixelMeans(cfg, torch.nn.Identity(), CheckpointInfo("none", "none", False))
    frames = random_frames(17, 8, 8, seed=3)
    per_frame = frames.astype(np.float64).mean(axis=(1, 2))
    expected = np.array([per_frame[i:i + 5].mean(0) for i in range(0, 17, 5)])
    features, spans = map(np.concatenate, zip(*extractor.iter_features(iter(np.array_split(frames, [2, 9, 10])))))
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    assert spans.tolist() == [[0, 5], [5, 10], [10, 15], [15, 17]]
    assert extractor.num_features(17) == 4 and extractor.hop_frames() == 5
