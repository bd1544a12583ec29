"""`ms-temba predict`, `export-mstct` and `convert-release` (pipelines/tools/predict.py, export.py, convert_release.py).

Fast tests drive the commands on feature shards written here; the slow end-to-end test renders
synthetic videos, extracts I3D features, trains the tiny model, and checks that predict finds the
actions of an unseen video.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import ms_temba
from extractors.shards import VideoFeatures, write_shard
from pipelines.bundle import ModelBundle, load_bundle, save_bundle
from pipelines.tools.convert_release import convert_release, convert_release_main
from pipelines.tools.export import export_main, export_mstct, read_predictions
from pipelines.tools.predict import PredictError, Predictor, main as predict_main, read_probabilities

IN_DIM, CLASSES = 16, 4
CLASS_NAMES = ["walk", "run", "jump", "sit"]
# The shard metadata of a (random) I3D, as the extract stage records it, with a small dim.
FEATURE_METADATA = {"backbone": "i3d", "model_name": "inception_i3d", "checkpoint": "random",
                    "checkpoint_sha256": "random", "pretrained": False, "dim": IN_DIM, "fps": None,
                    "image_size": 64, "mode": "fully_conv", "snippet_len": None, "stride": None,
                    "clip_window": None, "hop_frames": 8, "feature_hop_s": None, "precision": "float32"}


def make_bundle(path: Path, features=FEATURE_METADATA, seed=0, in_dim=IN_DIM, class_names=CLASS_NAMES,
                feature_mean=None, feature_std=None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=in_dim, num_classes=len(class_names)).eval()
    save_bundle(path, ModelBundle(
        model_name="ms_temba_tiny", model_config=dataclasses.asdict(model.config), state_dict=model.state_dict(),
        class_names=list(class_names), features=dict(features), dataset="test", train_params={}, selected_epoch=1,
        val_map=math.nan, train_videos=[], val_videos=[], feature_mean=feature_mean, feature_std=feature_std))
    return model


def make_shards(directory: Path, lengths=(9, 14), dim=IN_DIM, metadata=FEATURE_METADATA) -> dict[str, VideoFeatures]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    videos = {}
    for i, length in enumerate(lengths):
        start = np.arange(length) * 1.0
        videos[f"video_{i}"] = VideoFeatures(rng.normal(size=(length, dim)).astype(np.float32), start, start + 1.0)
    write_shard(directory / "shard-00000.parquet", sorted(videos.items()), {**metadata, "dim": dim})
    return videos


def test_predict_on_feature_shards_writes_probabilities_and_segments(tmp_path):
    model = make_bundle(tmp_path / "model.pt")
    videos = make_shards(tmp_path / "shards")
    out = tmp_path / "out"
    code = predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(out), "--threshold-on", "0.5", "--threshold-off", "0.4",
                         "--min-duration", "0", "--merge-gap", "0", "--plot"])
    assert code == 0
    for video_id, video in videos.items():
        probs, start, end, names = read_probabilities(out / f"{video_id}.probs.parquet")
        with torch.no_grad():  # the whole video in one pass through the model
            expected = torch.sigmoid(model(torch.from_numpy(video.features)[None]).logits[0]).numpy()
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(start, video.start_s)
        np.testing.assert_array_equal(end, video.end_s)
        assert names == CLASS_NAMES
        assert pq.read_table(out / f"{video_id}.probs.parquet").column_names == ["index", "start_s", "end_s", *CLASS_NAMES]

        records = json.loads((out / f"{video_id}.segments.json").read_text())
        csv_lines = (out / f"{video_id}.segments.csv").read_text().splitlines()
        assert csv_lines[0] == "class_id,class_name,start_s,end_s,score"
        assert len(csv_lines) == len(records) + 1
        # Every segment obeys the rule: its first frame is >= on, all its frames >= off (no merge).
        for record in records:
            c = record["class_id"]
            assert record["class_name"] == CLASS_NAMES[c]
            frames = (video.start_s >= record["start_s"]) & (video.end_s <= record["end_s"])
            assert expected[frames, c][0] >= 0.5 and (expected[frames, c] >= 0.4).all()
            assert record["score"] == pytest.approx(expected[frames, c].mean(), abs=1e-5)
        image = __import__("matplotlib.image", fromlist=["imread"]).imread(out / f"{video_id}.timeline.png")
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert not (out / "failures.jsonl").exists()


def test_predict_applies_the_training_standardisation(tmp_path):
    # A model trained with train.normalize_features reads (x - mean) / std, as evaluate feeds it.
    mean, std = torch.linspace(-20, 30, IN_DIM), torch.linspace(0.5, 40, IN_DIM)
    model = make_bundle(tmp_path / "model.pt", feature_mean=mean, feature_std=std)
    videos = make_shards(tmp_path / "shards")
    assert predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(tmp_path / "out")]) == 0
    bundle = load_bundle(tmp_path / "model.pt")
    for video_id, video in videos.items():
        probs = read_probabilities(tmp_path / "out" / f"{video_id}.probs.parquet")[0]
        with torch.no_grad():
            expected = torch.sigmoid(model(bundle.normalize(torch.from_numpy(video.features))[None]).logits[0])
        np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    make_bundle(tmp_path / "bad.pt", feature_mean=mean[:-1], feature_std=std[:-1])
    with pytest.raises(PredictError, match="standardisation does not have 16 dimensions"):
        Predictor.from_checkpoint(tmp_path / "bad.pt")


def test_shards_of_another_feature_dim_are_refused(tmp_path, capsys):
    make_bundle(tmp_path / "model.pt")
    make_shards(tmp_path / "shards", dim=IN_DIM + 8)
    code = predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(tmp_path / "out")])
    assert code == 2
    assert "24-d features" in capsys.readouterr().err
    predictor = Predictor.from_checkpoint(tmp_path / "model.pt")
    with pytest.raises(PredictError, match="features are 24-d but the model expects 16-d"):
        predictor.probabilities(VideoFeatures(np.zeros((5, 24), np.float32), np.arange(5.0), np.arange(5.0) + 1))


def test_shards_of_another_extractor_are_refused(tmp_path):
    make_bundle(tmp_path / "model.pt")
    make_shards(tmp_path / "shards", metadata={**FEATURE_METADATA, "image_size": 224, "fps": 24.0})
    predictor = Predictor.from_checkpoint(tmp_path / "model.pt")
    from extractors.shards import FeatureStore
    from pipelines.tools.predict import predict_store

    with pytest.raises(PredictError, match=r"fps: trained None, now 24\.0.*image_size: trained 64, now 224"):
        predict_store(FeatureStore(tmp_path / "shards"), predictor, tmp_path / "out")


def test_inconsistent_or_foreign_checkpoints_are_clear_errors(tmp_path):
    make_bundle(tmp_path / "model.pt", features={**FEATURE_METADATA, "dim": 1024})
    with pytest.raises(PredictError, match="reads 16-d features but its feature metadata says .* 1024-d"):
        Predictor.from_checkpoint(tmp_path / "model.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(PredictError, match="not an ms-temba model file"):
        Predictor.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor.from_checkpoint(tmp_path / "missing.pt")


def test_pretrained_features_need_the_weights_file():
    from pipelines.tools.predict import extractor_config_for

    # extractor.fps null: the extract stage records the training videos' rate, and new videos are resampled to it
    metadata = {**FEATURE_METADATA, "checkpoint": "rgb_imagenet.pt", "checkpoint_sha256": "ab" * 32,
                "pretrained": True, "source_fps": 8.0}
    with pytest.raises(PredictError, match="pass that file with --extractor-weights"):
        extractor_config_for(metadata)
    cfg = extractor_config_for(metadata, weights="/weights/rgb_imagenet.pt", device="cpu")
    assert (cfg.backbone, cfg.fps, cfg.image_size, cfg.mode, cfg.weights) == ("i3d", 8.0, 64, "fully_conv",
                                                                               "/weights/rgb_imagenet.pt")


def test_a_vim_trained_model_rebuilds_its_extractor(tmp_path):
    """A model trained on features of a Vim from `ms-temba train-vim` (a small architecture recorded in
    its file; the mean token, window 4) gets the extractor that made them back from the checkpoint:
    same metadata, same features."""
    from extractors.config import ExtractorConfig
    from extractors.run import ExtractionWorker
    from extractors.vim import CONFIG_KEY, VARIANT_KEY
    from pipelines.tools.predict import build_checked_extractor, extractor_config_for

    torch.manual_seed(0)
    vim = ms_temba.create_model("vim_tiny_stride8", img_size=32, num_classes=3, depth=2, embed_dim=32, d_state=4)
    torch.save({"model": vim.state_dict(), VARIANT_KEY: "vim_tiny_stride8",
                CONFIG_KEY: dataclasses.asdict(vim.config)}, tmp_path / "vim.pt")
    trained_cfg = ExtractorConfig(backbone="vim", variant="vim_tiny_stride8", token="mean", window=4, fps=4.0,
                                  image_size=32, device="cpu", weights=str(tmp_path / "vim.pt"))
    trained = ExtractionWorker(trained_cfg).extractor  # built as the extract stage builds it
    metadata = trained.metadata()
    make_bundle(tmp_path / "model.pt", features=metadata, in_dim=32)
    predictor = Predictor.from_checkpoint(tmp_path / "model.pt")

    with pytest.raises(PredictError, match="pass that file with --extractor-weights"):
        extractor_config_for(predictor.feature_metadata)
    cfg = extractor_config_for(predictor.feature_metadata, weights=str(tmp_path / "vim.pt"), device="cpu")
    assert (cfg.backbone, cfg.variant, cfg.token, cfg.window, cfg.fps, cfg.image_size, cfg.weights_from_hub) == (
        "vim", "vim_tiny_stride8", "mean", 4, 4.0, 32, False)
    rebuilt = build_checked_extractor(predictor, cfg)  # raises PredictError if the features would differ
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    times = np.arange(9) / 4.0
    np.testing.assert_array_equal(rebuilt.extract_frames(frames, times).features,
                                  trained.extract_frames(frames, times).features)

    # Official weights from the hub: downloaded again, or a local copy of the file instead.
    hub = {**metadata, "variant": "vim_small_stride8", "pretrained": True, "checkpoint_sha256": "ab" * 32,
           "checkpoint": "hf-hub:hustvl/Vim-small-midclstok/vim_s_midclstok_ft_81p6acc.pth"}
    cfg = extractor_config_for(hub, device="cpu")
    assert (cfg.variant, cfg.weights_from_hub, cfg.weights) == ("vim_small_stride8", True, None)
    cfg = extractor_config_for(hub, weights="/w/vim_s_midclstok_ft_81p6acc.pth", device="cpu")
    assert (cfg.weights_from_hub, cfg.weights) == (False, "/w/vim_s_midclstok_ft_81p6acc.pth")


def test_usage_errors(tmp_path, capsys):
    make_bundle(tmp_path / "model.pt")
    assert predict_main(["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "exactly one of them" in capsys.readouterr().err
    assert predict_main([str(tmp_path / "nothing.mp4"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(tmp_path / "out")]) == 2
    assert "no such video file" in capsys.readouterr().err
    make_shards(tmp_path / "shards")
    assert predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(tmp_path / "out"), "--threshold-on", "0.3", "--threshold-off", "0.6"]) == 2
    assert "threshold_off" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# export-mstct
# --------------------------------------------------------------------------------------------

def test_export_evaluate_predictions_to_mstct_layout(tmp_path):
    rng = np.random.default_rng(1)
    probs = {"a": rng.random((7, 3)).astype(np.float32), "b": rng.random((4, 3)).astype(np.float32)}
    # The evaluate stage's file, rows deliberately out of order.
    rows = [(v, t, p[t]) for v, p in probs.items() for t in range(len(p))][::-1]
    table = pa.table({"video_id": [r[0] for r in rows], "index": pa.array([r[1] for r in rows], pa.int32()),
                      "probabilities": pa.array([list(r[2]) for r in rows], pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "predictions.parquet")
    assert export_main([str(tmp_path / "predictions.parquet"), "--out", str(tmp_path / "export")]) == 0
    with open(tmp_path / "export" / "predictions.pkl", "rb") as handle:
        exported = pickle.load(handle)
    assert set(exported) == {"a", "b"}
    for video_id, p in probs.items():
        assert exported[video_id].shape == (3, len(p))  # (classes, T) as MS-TCT's scripts index it
        np.testing.assert_array_equal(exported[video_id], p.T)
        np.testing.assert_array_equal(np.load(tmp_path / "export" / f"{video_id}.npy"), p.T)


def test_export_rejects_gaps_in_the_frame_index(tmp_path):
    table = pa.table({"video_id": ["a", "a"], "index": pa.array([0, 2], pa.int32()),
                      "probabilities": pa.array([[0.1], [0.2]], pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "predictions.parquet")
    from pipelines.tools.export import ExportError

    with pytest.raises(ExportError, match=r"video 'a' do not have indices 0\.\.1"):
        read_predictions(tmp_path / "predictions.parquet")


def test_export_predict_outputs(tmp_path):
    make_bundle(tmp_path / "model.pt")
    make_shards(tmp_path / "shards")
    assert predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(tmp_path / "out")]) == 0
    exported = export_mstct(read_predictions(tmp_path / "out"), tmp_path / "export", fmt="pickle")
    with open(exported[0], "rb") as handle:
        arrays = pickle.load(handle)
    for video_id in ("video_0", "video_1"):
        probs = read_probabilities(tmp_path / "out" / f"{video_id}.probs.parquet")[0]
        np.testing.assert_array_equal(arrays[video_id], probs.T)
    assert not (tmp_path / "export" / "video_0.npy").exists()


# --------------------------------------------------------------------------------------------
# convert-release -> predict
# --------------------------------------------------------------------------------------------

def test_converted_release_checkpoint_predicts(tmp_path):
    torch.manual_seed(3)
    release = ms_temba.create_model("ms_temba_release", in_dim=IN_DIM, num_classes=4, widths=(8, 12, 16), d_state=4)
    state = {f"module.{k}": v for k, v in release.state_dict().items()}  # as saved under DataParallel
    state["module.blocks.1.head.weight"], state["module.blocks.1.head.bias"] = torch.zeros(1000, 8), torch.zeros(1000)
    torch.save(state, tmp_path / "best_model.pth")
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    assert convert_release_main([str(tmp_path / "best_model.pth"), str(tmp_path / "release.pt"),
                                 "--class-names", str(tmp_path / "classes.txt")]) == 0
    bundle = load_bundle(tmp_path / "release.pt")
    assert bundle.model_name == "ms_temba_release" and bundle.class_names == CLASS_NAMES
    assert bundle.features == {"dim": IN_DIM}

    videos = make_shards(tmp_path / "shards", lengths=(12,))
    assert predict_main(["--features", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "release.pt"),
                         "--out", str(tmp_path / "out")]) == 0
    probs = read_probabilities(tmp_path / "out" / "video_0.probs.parquet")[0]
    with torch.no_grad():
        expected = torch.sigmoid(release.eval()(torch.from_numpy(videos["video_0"].features)[None]).logits[0])
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    # A converted checkpoint does not know its extractor: decoding videos needs --extractor-config.
    (tmp_path / "v.mp4").write_bytes(b"")
    assert predict_main([str(tmp_path / "v.mp4"), "--checkpoint", str(tmp_path / "release.pt"),
                         "--out", str(tmp_path / "out2")]) == 2


def test_convert_release_rejects_wrong_class_names(tmp_path):
    torch.manual_seed(3)
    release = ms_temba.create_model("ms_temba_release", in_dim=IN_DIM, num_classes=4, widths=(8, 12, 16), d_state=4)
    torch.save(release.state_dict(), tmp_path / "best_model.pth")
    from pipelines.tools.export import ExportError

    with pytest.raises(ExportError, match="3 class names given for a checkpoint with 4 classes"):
        convert_release(tmp_path / "best_model.pth", tmp_path / "release.pt", class_names=["a", "b", "c"])


# --------------------------------------------------------------------------------------------
# End to end: synthetic videos -> I3D features -> tiny model -> predict on an unseen video
# --------------------------------------------------------------------------------------------

def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    intersection = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return intersection / union if union > 0 else 0.0


def pipeline_model(root: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Synthetic videos -> manifest -> I3D feature shards -> `pipelines.stages.train`, in `root`, with the
    pipeline's composed configuration plus `overrides`. Returns (annotations, models/model.pt).

    The manifest and train stages run through their own entry points, so the checkpoint is what
    `dvc repro` makes of this configuration. The extract stage's work is done in-process with the
    same worker (ExtractionWorker: the same seeded random I3D) and the same shard metadata as its
    Ray actors, which saves starting Ray on a small CPU machine."""
    from extractors.run import ExtractionWorker, _shard_metadata, shard_name
    from extractors.synthetic import make_dataset
    from pipelines import manifest
    from pipelines.stages import manifest as manifest_stage
    from pipelines.stages import train as train_stage
    from pipelines.config import compose_params, load_params

    data = root / "data"
    params = compose_params(["experiment=tiny", f"dataset.video_dir={data / 'videos'}",
                             f"dataset.annotations={data / 'annotations.json'}",
                             f"dataset.class_names={data / 'classes.txt'}", *overrides])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_params(root / "params.yaml")
    annotations = make_dataset(data, **params["dataset"]["synthetic"])
    manifest_stage.main(["--params", str(root / "params.yaml"), "--out", str(root / "manifest.parquet"),
                         "--report", str(root / "manifest_report.json")])
    rows = manifest.usable_videos(manifest.read_manifest(root / "manifest.parquet"))
    assert len(rows) == len(annotations)
    worker = ExtractionWorker(cfg.extractor)
    features = {row["video_id"]: worker.extract(row["path"]) for row in rows}
    (root / "shards").mkdir()
    from pipelines.stages.extract import source_metadata  # as the extract stage records it (the videos' frame rate)

    write_shard(root / "shards" / shard_name(0), sorted(features.items()),
                {**_shard_metadata(cfg.extractor, worker.shard_metadata()), **source_metadata(cfg, rows)})
    train_stage.main(["--params", str(root / "params.yaml"), "--manifest", str(root / "manifest.parquet"),
                      "--shards", str(root / "shards"), "--checkpoints", str(root / "checkpoints"),
                      "--out", str(root / "model.pt"), "--log", str(root / "train_log.csv")])
    return annotations, root / "model.pt"


@pytest.mark.slow
def test_end_to_end_predict_finds_the_actions_of_an_unseen_video(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared CPU, more threads than cores make every step far slower
    try:
        run_end_to_end(tmp_path)
    finally:
        torch.set_num_threads(threads)


def run_end_to_end(tmp_path: Path) -> None:
    num_classes = 6
    # 14 training videos (11 trained on, 3 for epoch selection) of ~40 s at 64 px (the random I3D
    # needs the size to see the patterns), 2 unseen ones. The recipe is the tiny experiment's with
    # standardised features, a higher lr, ~120 steps, and a small consistency weight: alpha=100
    # dominates the loss of so short a run. One thread in training (train.num_threads).
    annotations, checkpoint = pipeline_model(tmp_path, [
        "dataset.synthetic.num_videos=16", f"dataset.synthetic.num_classes={num_classes}",
        "dataset.synthetic.size=64", "dataset.synthetic.min_duration=36.0", "dataset.synthetic.max_duration=44.0",
        "dataset.synthetic.test_fraction=0.125", "extractor.chunk_frames=640", "extractor.device=cpu",
        "train.epochs=40", "train.warmup_epochs=2", "train.lr=2e-3", "train.alpha=1.0",
        "train.normalize_features=true", "train.num_threads=1", "train.device=cpu"])
    bundle = load_bundle(checkpoint)
    assert bundle.feature_mean is not None  # predict must apply the training standardisation
    train_ids = sorted(v for v, a in annotations.items() if a["subset"] == "training")
    assert sorted(bundle.train_videos + bundle.val_videos) == train_ids
    videos = {v: tmp_path / "data" / "videos" / f"{v}.mp4" for v in annotations}
    test_id = next(v for v, a in annotations.items() if a["subset"] == "testing")

    # The unseen video plus an unreadable one in the same folder.
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / f"{test_id}.mp4").write_bytes(videos[test_id].read_bytes())
    (folder / "broken.mp4").write_bytes(b"\x00" * 1000)
    out = tmp_path / "predictions"
    assert predict_main([str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--plot",
                         "--device", "cpu"]) == 0
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["video_id"] for f in failures] == ["broken"]
    assert not (out / "broken.segments.json").exists()

    image = __import__("matplotlib.image", fromlist=["imread"]).imread(out / f"{test_id}.timeline.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 50

    # A checkpoint whose model reads 16-d features but claims this I3D: the rebuilt extractor makes
    # 1024-d features, a clear error before any video is decoded.
    make_bundle(tmp_path / "other.pt", features={**bundle.features, "dim": IN_DIM})
    assert predict_main([str(folder), "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / f"{test_id}.segments.json").exists()

    # Last, the quality bar: segments overlap the true actions of the classes seen often in training
    # (>= 10 segments in the training subset: the objects and the rain overlay; the long background
    # activities occur only a handful of times). "Most": more than half of those true segments
    # (at least 2 s long) are matched by a predicted segment of their class at tIoU >= 0.5.
    segments = json.loads((out / f"{test_id}.segments.json").read_text())
    counts = np.bincount([c for v in train_ids for c, _, _ in annotations[v]["actions"]], minlength=num_classes)
    frequent = set(np.flatnonzero(counts >= 10).tolist())
    assert len(frequent) >= 2
    truth = [(c, s, e) for c, s, e in annotations[test_id]["actions"] if c in frequent and e - s >= 2.0]
    matched = [max([temporal_iou((s, e), (g["start_s"], g["end_s"])) for g in segments if g["class_id"] == c],
                   default=0.0) >= 0.5 for c, s, e in truth]
    print(f"{sum(matched)}/{len(truth)} true segments of classes {sorted(frequent)} matched at tIoU >= 0.5")
    assert len(truth) >= 2 and sum(matched) > len(truth) / 2
