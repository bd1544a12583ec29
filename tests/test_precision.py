"""Mixed precision: train.precision (autocast, a grad scaler for fp16) and extractor.precision.

References: the same computation in fp32 (and the scan's float64 loop, ms_temba.ops.selective_scan_ref);
the tolerances are the ones the configuration states (extractors.config.PRECISION_TOLERANCE, and
BF16_LOSS_TOLERANCE below, docs/pipeline.md).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml

from extractors.config import PRECISION_TOLERANCE, ExtractorConfig
from ms_temba.errors import ConfigFieldError

# A training loss under bf16 autocast is within this relative distance of the fp32 loss (bf16 keeps
# 8 bits of mantissa: ~0.4% per rounding; the BCE itself is computed in fp32 by autocast).
BF16_LOSS_TOLERANCE = 0.02


def relative_distance(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


# ----------------------------------------------------------------------------------------------
# Extractors


def extract(backbone: str, precision: str) -> np.ndarray:
    """Features of 32 random frames at 8 fps by a random-init backbone (the same weights for every precision)."""
    frames = np.random.default_rng(0).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning
        if backbone == "i3d":
            from extractors.i3d import I3DExtractor

            extractor = I3DExtractor(ExtractorConfig(backbone="i3d", fps=8.0, image_size=64, chunk_frames=32,
                                                     device="cpu", precision=precision))
        else:
            from extractors.clip import ClipExtractor

            tiny = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8, num_classes=24)
            extractor = ClipExtractor(ExtractorConfig(backbone="clip", model_name="vit_base_patch16_clip_224.openai",
                                                      fps=8.0, image_size=32, device="cpu", precision=precision),
                                      model_kwargs=tiny)
    assert extractor.metadata()["precision"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    return extractor.extract_frames(frames, np.arange(32) / 8.0).features


@pytest.mark.parametrize("backbone, precision", [("i3d", "bf16"), ("clip", "bf16"), ("clip", "fp16")])
def test_half_precision_features_are_within_the_stated_tolerance_of_fp32(backbone, precision):
    # (fp16 I3D is left out: fp16 3D convolutions on CPU take 40 s here; on GPU it is the default.)
    features, reference = extract(backbone, precision), extract(backbone, "fp32")
    assert features.dtype == np.float32 and features.shape == reference.shape
    distance = relative_distance(features, reference)
    assert 0 < distance <= PRECISION_TOLERANCE[precision], distance


def test_extractor_precision_auto_is_fp32_on_cpu_and_fp16_on_cuda():
    from extractors.base import compute_dtype

    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda")) == torch.float16
    assert compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigFieldError, match="extractor.precision.*'half'"):
        ExtractorConfig(precision="half")


# ----------------------------------------------------------------------------------------------
# The scan stays fp32 under autocast


def scan_inputs():
    generator = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 8, 4, 40

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    return dict(u=randn(batch, dim, length), delta=randn(batch, dim, length, scale=0.5),
                A=-torch.rand(dim, state, generator=generator) - 0.5, B=randn(batch, state, length),
                C=randn(batch, state, length), D=randn(dim), z=randn(batch, dim, length), delta_bias=randn(dim))


def check_scan_under_autocast():
    from ms_temba import ops

    inputs = scan_inputs()
    reference = ops.selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.selective_scan(**inputs, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_the_scan_runs_in_fp32_under_bf16_autocast():
    """fp32 inputs under autocast (what the model's fp32 A, D and dt bias meet): the recurrence and
    its output are fp32, as in mamba_ssm, not rounded to bf16."""
    check_scan_under_autocast()


def test_the_eager_scan_runs_in_fp32_under_bf16_autocast(monkeypatch):
    from ms_temba import ops

    monkeypatch.setattr(ops, "CPU_SCAN_EXTENSION", False)
    check_scan_under_autocast()


# ----------------------------------------------------------------------------------------------
# Training


def tiny_batch(seed=0):
    from pipelines.data import collate

    rng = np.random.default_rng(seed)
    items = [(rng.standard_normal((n, 16)).astype(np.float32), (rng.random((n, 4)) > 0.7).astype(np.float32))
             for n in (48, 30, 41)]
    return collate(items)


def test_a_bf16_training_step_on_cpu_is_within_the_stated_tolerance_of_fp32():
    import ms_temba
    from ms_temba.losses import model_loss

    batch = tiny_batch()
    torch.manual_seed(0)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=16, num_classes=4)
    losses = {}
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model_loss(model(batch.features, batch.mask), batch.labels, batch.mask, beta=0.3, alpha=1.0)["loss"]
        loss.backward()
        losses[precision] = loss.item()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).numpy()
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16
    assert abs(losses["bf16"] - losses["fp32"]) <= BF16_LOSS_TOLERANCE * abs(losses["fp32"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert np.isfinite(grads["bf16"]).all() and relative_distance(grads["bf16"], grads["fp32"]) < 0.1


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small .npy dataset through the manifest and extract stages (as tests/test_pipeline_train.py)."""
    from pipelines.config import compose_params
    from pipelines.stages import extract as extract_stage
    from pipelines.stages import manifest as manifest_stage
    from test_pipeline_train import HOP_S, NUM_CLASSES, make_npy_dataset

    root = tmp_path_factory.mktemp("precision_data")
    make_npy_dataset(root, num_videos=8)
    params = compose_params([
        "experiment=tiny", "dataset.synthetic=null", f"dataset.num_classes={NUM_CLASSES}", "dataset.class_names=null",
        "dataset.feature_source=npy", f"dataset.video_dir={root / 'npy'}", f"dataset.annotations={root / 'annotations.json'}",
        f"dataset.npy_hop_s={HOP_S}", "train.epochs=2", "train.warmup_epochs=0", "train.batch_size=3",
        "train.num_clips=16", "train.val_fraction=0.25"])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    manifest_stage.main(["--params", str(root / "params.yaml"), "--out", str(root / "manifest.parquet"),
                         "--report", str(root / "report.json")])
    extract_stage.main(["--params", str(root / "params.yaml"), "--manifest", str(root / "manifest.parquet"),
                        "--out", str(root / "shards")])
    return root


def train_with(prepared, run, **train):
    from pipelines.config import parse_params
    from pipelines.training import train as train_model

    values = yaml.safe_load((prepared / "params.yaml").read_text())
    values["train"].update(train)
    return train_model(parse_params(values), prepared / "manifest.parquet", prepared / "shards",
                       run / "checkpoints", run / "model.pt", run / "log.csv")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs_on_cpu_and_stays_near_fp32(prepared, tmp_path, precision):
    """Two epochs of the train stage: fp16 goes through the GradScaler (its state is checkpointed
    for resuming), bf16 needs none; the weights stay fp32 and the losses near the fp32 run's.

    Without the consistency term (alpha 0): the GradScaler skips its first steps by design (their
    2^16 scale overflows fp16), and with two steps an epoch the first epoch's loss then stays near
    its starting value; at alpha 3 the fp32 run's loss falls by over a third in its first step."""
    reference = train_with(prepared, tmp_path / "fp32", precision="fp32", alpha=0.0)
    bundle = train_with(prepared, tmp_path / precision, precision=precision, alpha=0.0)
    assert bundle.train_params["precision"] == precision
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in bundle.state_dict.values())
    checkpoint = torch.load(tmp_path / precision / "checkpoints" / "last.pt", weights_only=False)
    reference_checkpoint = torch.load(tmp_path / "fp32" / "checkpoints" / "last.pt", weights_only=False)
    if precision == "fp16":
        assert checkpoint["scaler"]["scale"] > 0 and checkpoint["scaler"]["_growth_tracker"] >= 0
    else:
        assert checkpoint["scaler"] == {}  # disabled: fp32 and bf16 train without a scaler
    first, first_reference = checkpoint["history"][0]["train_loss"], reference_checkpoint["history"][0]["train_loss"]
    assert first != first_reference
    assert abs(first - first_reference) <= BF16_LOSS_TOLERANCE * first_reference
    assert reference.train_params["precision"] == "fp32"


def test_bad_train_settings_are_clear_errors(prepared):
    from pipelines.config import ConfigError, parse_params

    values = yaml.safe_load((prepared / "params.yaml").read_text())
    for key, value, problem in (("precision", "fp8", "train.precision: must be one of 'fp32', 'bf16', 'fp16'"),
                                ("num_workers", -1, "train.num_workers: must be >= 0"),
                                ("distributed", "yes", "train.distributed: must be a boolean")):
        bad = {**values, "train": {**values["train"], key: value}}
        with pytest.raises(ConfigError, match=problem):
            parse_params(bad)
