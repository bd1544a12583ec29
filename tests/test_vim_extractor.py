"""The Vim extractor: class-token and mean-patch-token features against step-by-step references,
checkpoints (official layout, train-vim's, another grid), the configuration, and extraction of
synthetic videos through `-S extractor=vim` and the real Ray fan-out (resumable, provenance in the
shard metadata).

Tiny networks (2 layers, width 32, 8 px patches on 32 px images) keep the unit tests fast; the Ray
test uses the default vim_tiny, randomly initialised, on 32 px frames.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import ms_temba
from extractors.base import CheckpointError
from extractors.config import ExtractorConfig
from extractors.vim import CONFIG_KEY, VARIANT_KEY, VimExtractor, create_vim
from ms_temba.errors import ConfigFieldError

TINY = dict(depth=2, embed_dim=32, patch_size=8, stride=8, d_state=4)
FPS = 8.0
# Tests build random-weight networks on purpose; the warning itself is checked in one test (pytest.warns).
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED:UserWarning")


def make_extractor(model_kwargs=TINY, **overrides) -> VimExtractor:
    torch.manual_seed(0)
    cfg = ExtractorConfig(**{"backbone": "vim", "fps": FPS, "device": "cpu", "image_size": 32, **overrides})
    return VimExtractor(cfg, model_kwargs=model_kwargs)


def random_frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def normalised(frame: np.ndarray) -> torch.Tensor:
    """One uint8 (S, S, 3) frame as the network input (1, 3, S, S), normalised in numpy float64."""
    image = (frame / 255.0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    return torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32))


def hidden_tokens(model, image: torch.Tensor) -> torch.Tensor:
    """Every token's final hidden state (1, N + 1, D), the class token at N // 2, before the final
    norm, computed step by step from the Vim architecture (patches, middle class token, position
    embedding, pre-norm residual layers)."""
    patches = model.patch_embed.proj(image).flatten(2).transpose(1, 2)
    middle = patches.shape[1] // 2
    x = torch.cat([patches[:, :middle], model.cls_token, patches[:, middle:]], dim=1) + model.pos_embed
    for layer in model.layers:
        x = x + layer.mixer(layer.norm(x))
    return x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def reference_embedding(extractor: VimExtractor, frame: np.ndarray) -> np.ndarray:
    model = extractor.model
    tokens = hidden_tokens(model, normalised(frame))[0]
    middle = (len(tokens) - 1) // 2
    normed = rms_norm(tokens, model.norm_f.weight, model.norm_f.eps)
    if extractor.cfg.token == "cls":
        return normed[middle].numpy()
    return torch.cat([normed[:middle], normed[middle + 1:]]).mean(0).numpy()


@pytest.mark.parametrize("token", ["cls", "mean"])
def test_window_averages_equal_a_per_frame_reference(token):
    extractor = make_extractor(token=token, window=4, batch_size=3)
    frames = random_frames(11)
    with torch.inference_mode():
        per_frame = np.array([reference_embedding(extractor, frame) for frame in frames])
    expected = np.array([per_frame[0:4].mean(0), per_frame[4:8].mean(0), per_frame[8:11].mean(0)])

    # Decoded in chunks of 5 frames: windows and batches of 3 straddle chunk boundaries.
    with torch.inference_mode():
        features, spans = map(np.concatenate, zip(*extractor.iter_features(iter(np.array_split(frames, [5, 10])))))
    assert spans.tolist() == [[0, 4], [4, 8], [8, 11]]
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    result = extractor.extract_frames(frames, 2.0 + np.arange(11) / FPS)
    assert result.features.dtype == np.float32 and result.features.shape == (3, 32)
    np.testing.assert_allclose(result.features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(result.start_s, 2.0 + np.array([0, 4, 8]) / FPS)
    np.testing.assert_allclose(result.end_s, 2.0 + np.array([4, 8, 11]) / FPS)
    assert extractor.num_features(11) == 3


def test_the_two_tokens_differ():
    frames = random_frames(4, seed=2)
    cls = make_extractor(token="cls", window=1).extract_frames(frames, np.arange(4) / FPS).features
    mean = make_extractor(token="mean", window=1).extract_frames(frames, np.arange(4) / FPS).features
    assert not np.allclose(cls, mean)


def test_official_checkpoint_loads_without_its_head_and_records_sha256(tmp_path):
    torch.manual_seed(5)
    trained = ms_temba.create_model("vim_tiny", img_size=32, num_classes=10, **TINY)
    path = tmp_path / "vim_t_tiny.pth"
    torch.save({"model": trained.state_dict(), "epoch": 299}, path)  # Vim's (DeiT's) checkpoint layout

    extractor = make_extractor(weights=str(path))
    loaded = extractor.model.state_dict()
    assert not any(key.startswith("head.") for key in loaded)
    for key, value in trained.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(loaded[key], value), key
    metadata = extractor.metadata()
    json.dumps(metadata)  # goes into a Parquet footer as JSON
    assert metadata["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert metadata["checkpoint"] == "vim_t_tiny.pth" and metadata["pretrained"] is True
    assert (metadata["backbone"], metadata["variant"], metadata["token"], metadata["window"]) == ("vim", "vim_tiny",
                                                                                                  "cls", 16)
    assert (metadata["patch_size"], metadata["patch_stride"], metadata["depth"], metadata["dim"]) == (8, 8, 2, 32)
    assert metadata["feature_hop_s"] == pytest.approx(16 / FPS)


def test_train_vim_checkpoint_rebuilds_its_architecture(tmp_path):
    # What `ms-temba train-vim` writes: the weights with the model's name and architecture, so that
    # extractor=vim rebuilds the trained network without being told its size.
    torch.manual_seed(6)
    trained = ms_temba.create_model("vim_tiny_stride8", img_size=32, num_classes=3, **{**TINY, "stride": 4})
    import dataclasses

    path = tmp_path / "model.pt"
    torch.save({"model": trained.state_dict(), VARIANT_KEY: "vim_tiny_stride8",
                CONFIG_KEY: dataclasses.asdict(trained.config)}, path)
    model, checkpoint = create_vim("vim_tiny_stride8", 32, weights=path)  # no model_kwargs: all from the file
    assert (model.config.depth, model.config.embed_dim, model.config.stride) == (2, 32, 4)
    assert torch.equal(model.layers[1].mixer.in_proj.weight, trained.layers[1].mixer.in_proj.weight)
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="is a vim_tiny_stride8 .* set the variant"):
        create_vim("vim_tiny", 32, weights=path)


def test_checkpoint_of_another_grid_gets_its_position_embedding_resampled(tmp_path):
    torch.manual_seed(7)
    trained = ms_temba.create_model("vim_tiny", img_size=32, num_classes=0, **TINY)  # 4 x 4 patches
    path = tmp_path / "vim_32px.pth"
    torch.save({"model": trained.state_dict()}, path)
    model, _ = create_vim("vim_tiny", 48, weights=path, **TINY)  # 6 x 6 patches
    pos_embed = trained.pos_embed.detach()
    # Independently: the 16 patch embeddings (the class token's, at index 8, taken out) as a 4 x 4
    # image, bicubically resized to 6 x 6; the class token's embedding at the new middle, 18.
    grid = torch.cat([pos_embed[0, :8], pos_embed[0, 9:]]).T.reshape(1, 32, 4, 4)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(32, 36).T
    resized = model.pos_embed.detach()[0]
    assert resized.shape == (37, 32)
    torch.testing.assert_close(resized[18], pos_embed[0, 8])
    torch.testing.assert_close(torch.cat([resized[:18], resized[19:]]), expected)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    state = ms_temba.create_model("vim_tiny", img_size=32, num_classes=0, **TINY).state_dict()
    del state["layers.1.mixer.in_proj.weight"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.mixer\.in_proj\.weight"):
        make_extractor(weights=str(path))


def test_random_weights_warn_and_are_recorded():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        extractor = VimExtractor(ExtractorConfig(backbone="vim", image_size=32, device="cpu"), model_kwargs=TINY)
    metadata = extractor.metadata()
    assert metadata["pretrained"] is False and metadata["checkpoint_sha256"] == "random"


def test_bad_choices_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        create_vim("vim_tiny", 32, weights=tmp_path / "x.pth", weights_from_hub=True)
    with pytest.raises(ValueError, match="no official checkpoint of 'vim_base_stride8'"):
        create_vim("vim_base_stride8", 32, weights_from_hub=True)
    with pytest.raises(ValueError, match="not a Vim model"):
        create_vim("ms_temba_tiny", 32)
    with pytest.raises(ValueError, match="unknown model 'vim_huge'"):
        create_vim("vim_huge", 32)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        create_vim("vim_tiny", 32, weights=tmp_path / "absent.pth")


def test_config_params_form():
    cfg = ExtractorConfig.from_yaml("conf/extractor/vim.yaml", ["vim.token=mean", "vim.window=4"])
    assert (cfg.backbone, cfg.variant, cfg.token, cfg.window, cfg.weights_from_hub) == ("vim", "vim_tiny", "mean", 4,
                                                                                        False)
    assert cfg.to_params()["vim"] == {"variant": "vim_tiny", "token": "mean", "window": 4, "weights_from_hub": False}
    with pytest.raises(ConfigFieldError, match=r"extractor\.vim\.token must be 'cls' or 'mean'"):
        ExtractorConfig(backbone="vim", token="max")
    with pytest.raises(ConfigFieldError, match=r"extractor\.vim\.window must be a positive integer"):
        ExtractorConfig(backbone="vim", window=0)
    with pytest.raises(ConfigFieldError, match=r"write it as extractor\.vim\.token"):
        ExtractorConfig.from_params({"backbone": "vim", "token": "cls"})
    with pytest.raises(ConfigFieldError, match="holds settings of the vim backbone"):
        ExtractorConfig.from_params({"backbone": "clip", "vim": {"token": "cls"}})


# ----------------------------------------------------------------------------------------------
# Through `-S extractor=vim` and the Ray fan-out, on synthetic videos
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_extractor_vim_through_the_ray_fan_out(tmp_path):
    import ray

    from extractors.backbones import build_extractor
    from extractors.run import RANDOM_INIT_SEED, extract_videos
    from extractors.shards import FeatureStore
    from extractors.synthetic import make_dataset
    from pipelines.config import compose_params, parse_params

    make_dataset(tmp_path / "dataset", num_videos=2, num_classes=4, seed=1, fps=8, size=32, min_duration=3.0,
                 max_duration=4.0)
    videos = {path.stem: str(path) for path in sorted((tmp_path / "dataset" / "videos").glob("*.mp4"))}
    assert len(videos) == 2
    # As `dvc exp run -S extractor=vim -S ...` composes it: the synthetic dataset's 8 fps, 32 px frames.
    params = parse_params(compose_params(["extractor=vim", "extractor.image_size=32", "extractor.vim.window=4",
                                          "extractor.vim.token=mean", "extractor.batch_size=8",
                                          "extractor.device=cpu", "extractor.num_actors=2",
                                          "extractor.videos_per_shard=1"]))
    cfg = params.extractor
    assert (cfg.backbone, cfg.fps, cfg.variant, cfg.token, cfg.window) == ("vim", 8.0, "vim_tiny", "mean", 4)

    # The reference: each video extracted in this process, from the seed every Ray actor draws its random init from.
    torch.manual_seed(RANDOM_INIT_SEED)
    extractor = build_extractor(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a num_cpus=1 actor, so the float sums run in the same order
    try:
        reference = {video_id: extractor.extract(path) for video_id, path in videos.items()}
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "shards"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        summary = extract_videos(videos, cfg, out, progress=False)
        assert (summary.ok, summary.skipped, summary.failed) == (2, 0, 0)
        store = FeatureStore(out)
        assert store.video_ids == sorted(videos)
        for video_id, expected in reference.items():
            stored = store.get(video_id)
            assert len(stored.features) == extractor.num_features(round(expected.end_s[-1] * FPS))
            np.testing.assert_array_equal(stored.features, expected.features)
            np.testing.assert_array_equal(stored.start_s, expected.start_s)
        metadata = store.metadata
        assert (metadata["backbone"], metadata["model_name"], metadata["variant"], metadata["token"]) == (
            "vim", "vim_tiny", "vim_tiny", "mean")
        assert (metadata["patch_size"], metadata["patch_stride"], metadata["dim"], metadata["window"]) == (
            16, 16, 192, 4)
        assert metadata["checkpoint_sha256"] == "random" and metadata["feature_hop_s"] == pytest.approx(0.5)

        # Resumable: a rerun finds both videos done; a lost shard is rebuilt with the same numbers.
        assert extract_videos(videos, cfg, out, progress=False).skipped == 2
        lost = sorted(out.glob("shard-*.parquet"))[0]
        lost.unlink()
        summary = extract_videos(videos, cfg, out, progress=False)
        assert (summary.ok, summary.skipped) == (1, 1)
        for video_id, expected in reference.items():
            np.testing.assert_array_equal(FeatureStore(out).get(video_id).features, expected.features)
    finally:
        ray.shutdown()
