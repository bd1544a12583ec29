"""The train stage: deterministic data handling, the schedule, and kill-and-resume reproducibility.

The training data are .npy features imported through the manifest and extract stages (no video
decoding), with a class signal the model can learn.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from pipelines.stages import extract as extract_stage
from pipelines.stages import manifest as manifest_stage
from pipelines.bundle import load_bundle
from pipelines.config import PROJECT_ROOT, compose_params
from pipelines.data import Sequence, split_train_val, training_batches
from pipelines.training import gradient_norms, warmup_cosine

NUM_CLASSES, DIM, HOP_S, EPOCHS = 4, 16, 0.5, 4


def test_gradient_norms_per_part_match_a_float64_sum_of_squares():
    import ms_temba

    torch.manual_seed(0)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=8, num_classes=3)
    output = model(torch.randn(2, 12, 8))
    (output.logits.square().sum() + sum(c.sum() for c in output.branch_c)).backward()
    model.head.bias.grad = None  # a parameter without a gradient is left out
    expected: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            names = name.split(".")
            part = ".".join(names[:2]) if names[1].isdigit() else names[0]
            expected[part] = expected.get(part, 0.0) + parameter.grad.double().square().sum().item()
    norms = gradient_norms(model)
    assert set(norms) == set(expected) and {"blocks.0", "fuser", "head"} <= set(norms)
    for part, squares in expected.items():
        assert norms[part] == pytest.approx(math.sqrt(squares), rel=1e-5)
    model.zero_grad(set_to_none=True)
    assert gradient_norms(model) == {}


def test_validation_split_is_deterministic_disjoint_and_stable():
    ids = [f"video{i:03d}" for i in range(40)]
    train, val = split_train_val(ids, 0.25, seed=3)
    assert len(val) == 10 and sorted(train + val) == ids
    assert split_train_val(list(reversed(ids)), 0.25, seed=3) == (train, val)
    assert split_train_val(ids, 0.25, seed=4)[1] != val
    # A new video changes nothing for the others (ranks come from a hash of each id).
    _, val_more = split_train_val(ids + ["video999"], 0.25, seed=3)
    assert len(set(val) - set(val_more)) <= 1
    with pytest.raises(ValueError, match="at least 2"):
        split_train_val(["only"], 0.5, seed=0)


def test_training_batches_pad_mask_and_replay():
    rng = np.random.default_rng(0)
    sequences = [Sequence(f"v{i}", rng.standard_normal((n, 3)).astype(np.float32),
                          (rng.random((n, 2)) > 0.5).astype(np.float32)) for i, n in enumerate([5, 12, 30, 2, 9])]
    batches = list(training_batches(sequences, batch_size=2, crop_length=8, seed=1, epoch=3))
    again = list(training_batches(sequences, batch_size=2, crop_length=8, seed=1, epoch=3))
    other_epoch = list(training_batches(sequences, batch_size=2, crop_length=8, seed=1, epoch=4))
    assert [b.features.shape[0] for b in batches] == [2, 2, 1]
    for first, second in zip(batches, again):
        assert torch.equal(first.features, second.features) and torch.equal(first.mask, second.mask)
    assert any(not torch.equal(a.features, b.features) or a.features.shape != b.features.shape
               for a, b in zip(batches, other_epoch))
    seen = 0
    for batch in batches:
        for row in range(batch.features.shape[0]):
            length = int(batch.mask[row].sum())
            assert batch.mask[row, :length].all() and not batch.mask[row, length:].any()  # padding at the end
            assert (batch.features[row, length:] == 0).all()
            crop = batch.features[row, :length].numpy()
            # the crop is a contiguous window of one sequence, of length min(8, T)
            source = next(s for s in sequences if any(np.array_equal(crop, s.features[o:o + length])
                                                      for o in range(len(s.features) - length + 1)))
            assert length == min(8, len(source.features))
            seen += 1
    assert seen == len(sequences)


def test_warmup_then_cosine():
    factor = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for step in range(4, 12):
        assert factor(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 4) / 8)))
    assert factor(12) == pytest.approx(0.0)


def make_npy_dataset(root, num_videos=10, seed=0):
    """Features = the frame's label vector through a fixed random projection, plus noise."""
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((NUM_CLASSES, DIM)).astype(np.float32)
    (root / "npy").mkdir()
    annotations = {}
    for index in range(num_videos):
        length = int(rng.integers(20, 32))
        duration = length * HOP_S
        actions = []
        for _ in range(int(rng.integers(2, 6))):
            start = float(rng.uniform(0, duration - 2))
            actions.append([int(rng.integers(NUM_CLASSES)), round(start, 2), round(start + rng.uniform(1, 6), 2)])
        centres = (np.arange(length) + 0.5) * HOP_S
        labels = np.zeros((length, NUM_CLASSES), dtype=np.float32)
        for label, start, end in actions:
            labels[(centres >= start) & (centres <= end), label] = 1
        features = labels @ projection + 0.3 * rng.standard_normal((length, DIM)).astype(np.float32)
        video_id = f"vid{index:02d}"
        np.save(root / "npy" / f"{video_id}.npy", features)
        annotations[video_id] = {"subset": "testing" if index >= num_videos - 2 else "training",
                                 "duration": duration, "actions": actions}
    (root / "annotations.json").write_text(json.dumps(annotations))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """params.yaml, manifest and shards of a small .npy dataset."""
    root = tmp_path_factory.mktemp("npy_data")
    make_npy_dataset(root)
    params = compose_params([
        "experiment=tiny", "dataset.synthetic=null", f"dataset.num_classes={NUM_CLASSES}", "dataset.class_names=null",
        "dataset.feature_source=npy", f"dataset.video_dir={root / 'npy'}", f"dataset.annotations={root / 'annotations.json'}",
        f"dataset.npy_hop_s={HOP_S}", f"train.epochs={EPOCHS}", "train.warmup_epochs=1", "train.batch_size=3",
        "train.num_clips=16", "train.val_fraction=0.25", "+model.overrides.dropout=0.1"])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    manifest_stage.main(["--params", str(root / "params.yaml"), "--out", str(root / "manifest.parquet"),
                         "--report", str(root / "report.json")])
    extract_stage.main(["--params", str(root / "params.yaml"), "--manifest", str(root / "manifest.parquet"),
                        "--out", str(root / "shards")])
    return root


def train_command(data, run):
    return [sys.executable, "-m", "pipelines.stages.train", "--params", str(data / "params.yaml"),
            "--manifest", str(data / "manifest.parquet"), "--shards", str(data / "shards"),
            "--checkpoints", str(run / "checkpoints"), "--out", str(run / "model.pt"), "--log", str(run / "log.csv")]


def run_training(data, run):
    result = subprocess.run(train_command(data, run), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def log_without_timing(path):
    lines = path.read_text().splitlines()
    return [line.rsplit(",", 1)[0] for line in lines]  # the last column is the epoch's wall time


def params_with(prepared, directory, **train):
    """A copy of the prepared run's params with these train settings, beside its manifest and shards."""
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["train"].update(train)
    directory.mkdir()
    for name in ("manifest.parquet", "shards"):
        os.symlink(prepared / name, directory / name)
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    return directory


def kill_after_the_first_checkpoint(data, run) -> int:
    """Start training, SIGKILL it (and its workers) once its first checkpoint exists; the epoch that checkpoint holds."""
    process = subprocess.Popen(train_command(data, run), cwd=PROJECT_ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # In the middle of epoch 2 (or later), never after the last one; the whole process group, so
    # that DataLoader workers (train.num_workers) die with the stage.
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= killed_at < EPOCHS
    return killed_at


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    run_training(prepared, run)
    return run


def chance_map_of(annotations_path, video_ids, lengths):
    """Percent mAP of a constant score on these videos, labels re-derived by a plain loop."""
    from ms_temba.metrics import chance_map

    annotations = json.loads(annotations_path.read_text())
    labels = []
    for video_id in video_ids:
        frames = np.zeros((lengths[video_id], NUM_CLASSES))
        for t in range(lengths[video_id]):
            for label, start, end in annotations[video_id]["actions"]:
                frames[t, label] = max(frames[t, label], float(start <= (t + 0.5) * HOP_S <= end))
        labels.append(frames)
    return 100 * chance_map(np.concatenate(labels))


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(prepared, uninterrupted, tmp_path):
    interrupted = tmp_path / "interrupted"
    killed_at = kill_after_the_first_checkpoint(prepared, interrupted)
    assert not (interrupted / "model.pt").exists()

    output = run_training(prepared, interrupted)
    assert f"resuming after epoch {killed_at}" in output

    expected, resumed = load_bundle(uninterrupted / "model.pt"), load_bundle(interrupted / "model.pt")
    assert expected.state_dict.keys() == resumed.state_dict.keys()
    for name, weight in expected.state_dict.items():
        assert torch.equal(weight, resumed.state_dict[name]), name
    assert (expected.selected_epoch, expected.val_map) == (resumed.selected_epoch, resumed.val_map)
    assert log_without_timing(uninterrupted / "log.csv") == log_without_timing(interrupted / "log.csv")


@pytest.mark.slow
def test_the_bundle_describes_the_run_and_beats_chance(prepared, uninterrupted):
    bundle = load_bundle(uninterrupted / "model.pt")
    assert len(bundle.val_videos) == 2 and len(bundle.train_videos) == 6
    assert not set(bundle.val_videos) & set(bundle.train_videos)
    assert bundle.model_config["num_classes"] == NUM_CLASSES and bundle.model_config["in_dim"] == DIM
    assert bundle.features["backbone"] == "npy" and bundle.class_names == [f"class_{c}" for c in range(NUM_CLASSES)]
    log = log_without_timing(uninterrupted / "log.csv")
    assert len(log) == 1 + EPOCHS
    # Features are standardised (train.normalize_features) with the training part's statistics only.
    train_features = np.concatenate([np.load(prepared / "npy" / f"{v}.npy") for v in bundle.train_videos])
    np.testing.assert_allclose(bundle.feature_mean.numpy(), train_features.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bundle.feature_std.numpy(), train_features.std(axis=0), rtol=1e-4, atol=1e-5)
    x = train_features[:3]
    np.testing.assert_allclose(bundle.normalize(x), (x - train_features.mean(0)) / train_features.std(0),
                               rtol=1e-4, atol=1e-4)
    lengths = {v: len(np.load(prepared / "npy" / f"{v}.npy")) for v in bundle.val_videos}
    assert bundle.val_map > chance_map_of(prepared / "annotations.json", bundle.val_videos, lengths)


@pytest.mark.slow
def test_a_checkpoint_of_another_configuration_is_not_resumed(prepared, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    output = run_training(params_with(prepared, tmp_path / "data", epochs=2), run)
    assert "belongs to another configuration" in output
    assert len(log_without_timing(run / "log.csv")) == 1 + 2  # header + the 2 epochs of the new run


def test_class_prior_init_starts_the_heads_at_the_training_base_rates(prepared, tmp_path):
    """train.class_prior_init: the heads' biases start at the log-odds of each class's share of the
    training part's frames (not the validation part's). With a learning rate of 1e-12 one epoch
    leaves them there, so the saved model shows the initial biases."""
    from pipelines.config import parse_params
    from pipelines.training import train

    values = yaml.safe_load((prepared / "params.yaml").read_text())
    values["train"].update(epochs=1, warmup_epochs=0, lr=1e-12, class_prior_init=True)
    run = tmp_path / "run"
    bundle = train(parse_params(values), prepared / "manifest.parquet", prepared / "shards", run / "checkpoints",
                   run / "model.pt", run / "log.csv")
    lengths = {v: len(np.load(prepared / "npy" / f"{v}.npy")) for v in bundle.train_videos}
    annotations = json.loads((prepared / "annotations.json").read_text())
    positives, frames = np.zeros(NUM_CLASSES), 0
    for video_id in bundle.train_videos:  # a plain loop over the annotations, as chance_map_of
        for t in range(lengths[video_id]):
            frames += 1
            for c in range(NUM_CLASSES):
                positives[c] += any(label == c and start <= (t + 0.5) * HOP_S <= end
                                    for label, start, end in annotations[video_id]["actions"])
    prior = np.clip(positives / frames, 1e-4, 1 - 1e-4)
    expected = np.log(prior / (1 - prior))
    heads = [name for name in bundle.state_dict if name.startswith(("head.", "block_heads.")) and name.endswith("bias")]
    assert len(heads) == 4  # ms_temba_tiny: the fused head and three block heads
    for name in heads:
        np.testing.assert_allclose(bundle.state_dict[name].double().numpy(), expected, rtol=1e-5, atol=1e-5)


def changed_labels_data(prepared, directory, video_id):
    """A copy of `prepared` (same params, shards and ids) whose manifest gives `video_id` other
    actions: what the train stage sees after the annotations changed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.manifest import MANIFEST_SCHEMA, read_manifest

    directory.mkdir()
    os.symlink(prepared / "shards", directory / "shards")
    shutil.copyfile(prepared / "params.yaml", directory / "params.yaml")
    rows = read_manifest(prepared / "manifest.parquet").to_pylist()
    [row] = [r for r in rows if r["video_id"] == video_id]
    row["action_class"] = [(label + 1) % NUM_CLASSES for label in row["action_class"]]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), directory / "manifest.parquet")
    return directory


def same_model(first, second):
    first, second = load_bundle(first / "model.pt"), load_bundle(second / "model.pt")
    return (first.state_dict.keys() == second.state_dict.keys()
            and all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
            and (first.selected_epoch, first.val_map) == (second.selected_epoch, second.val_map))


def differing(output):
    return output.split("(differing: ")[1].split(")")[0]


@pytest.mark.slow
def test_a_checkpoint_of_other_data_is_not_resumed(prepared, uninterrupted, tmp_path):
    """Same params and video ids, one training video's labels changed (its annotations): the
    finished checkpoint of the old data is ignored, naming the part, and the run ends as a fresh
    run on the new data does. Rerun unchanged, it resumes."""
    train_video = load_bundle(uninterrupted / "model.pt").train_videos[0]
    changed = changed_labels_data(prepared, tmp_path / "data", train_video)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    output = run_training(changed, run)
    assert "resuming" not in output and "belongs to another configuration" in output
    assert differing(output) == "data.train.labels"
    assert not same_model(run, uninterrupted)

    fresh = tmp_path / "fresh"
    run_training(changed, fresh)
    assert same_model(run, fresh)
    assert log_without_timing(run / "log.csv") == log_without_timing(fresh / "log.csv")

    output = run_training(changed, run)  # nothing changed since: resumed (nothing left to train)
    assert f"resuming after epoch {EPOCHS}" in output and "another configuration" not in output
    assert same_model(run, fresh)


@pytest.mark.slow
def test_a_checkpoint_of_another_parameter_layout_is_ignored_not_a_crash(prepared, uninterrupted, tmp_path):
    """A checkpoint written before the model's state-dict keys were renamed (commit dfce80e), its
    fingerprint otherwise matching: ignored (it crashed load_state_dict), and the run ends as an
    uninterrupted one."""
    from pipelines.training import setting_hash

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=False)
    checkpoint["epoch"] = 2
    checkpoint["history"] = checkpoint["history"][:2]
    checkpoint["model"] = {f"legacy.{name}": value for name, value in checkpoint["model"].items()}
    layout = [[name, list(value.shape)] for name, value in checkpoint["model"].items()]
    digest, *parts = checkpoint["fingerprint"].split(" ")
    assert any(part.startswith("model_layout=") for part in parts)
    parts = [f"model_layout={setting_hash(layout)}" if part.startswith("model_layout=") else part for part in parts]
    checkpoint["fingerprint"] = " ".join([digest, *parts])
    torch.save(checkpoint, run / "checkpoints" / "last.pt")

    output = run_training(prepared, run)
    assert "resuming" not in output and differing(output) == "model_layout"
    assert same_model(run, uninterrupted)
    assert log_without_timing(run / "log.csv") == log_without_timing(uninterrupted / "log.csv")


def test_the_fingerprint_holds_the_data_and_the_parameter_layout(prepared):
    """Each part of the data (features, labels; training, validation part) and the model's
    parameter layout is a key of its own, so the log names what differs."""
    from pipelines.config import load_params
    from pipelines.training import data_digest, fingerprint, fingerprint_difference, parameter_layout

    params = load_params(prepared / "params.yaml")
    rng = np.random.default_rng(0)
    train = [Sequence(f"v{i}", rng.standard_normal((5, DIM)).astype(np.float32),
                      (rng.random((5, NUM_CLASSES)) > 0.5).astype(np.float32)) for i in range(3)]
    val = [Sequence("w", rng.standard_normal((4, DIM)).astype(np.float32), np.zeros((4, NUM_CLASSES), np.float32))]
    layout = parameter_layout(torch.nn.Linear(DIM, NUM_CLASSES))

    def of(train, val, layout=layout):
        return fingerprint(params, {"dim": DIM}, ["v0", "v1", "v2"], ["w"],
                           {"train": data_digest(train), "val": data_digest(val)}, layout)

    reference = of(train, val)
    assert of([Sequence(s.video_id, s.features.copy(), s.labels.copy()) for s in train], val) == reference
    features = train[1].features.copy()
    features[2, 3] += 1e-3
    edited = [train[0], Sequence("v1", features, train[1].labels), train[2]]
    assert fingerprint_difference(reference, of(edited, val)) == "data.train.features"
    labels = val[0].labels.copy()
    labels[0, 1] = 1
    assert fingerprint_difference(reference, of(train, [Sequence("w", val[0].features, labels)])) == "data.val.labels"
    renamed = [[f"legacy.{name}", shape] for name, shape in layout]
    assert fingerprint_difference(reference, of(train, val, renamed)) == "model_layout"
    # A checkpoint of a version that recorded neither: every new part is named.
    old = fingerprint(params, {"dim": DIM}, ["v0", "v1", "v2"], ["w"])
    assert fingerprint_difference(old, reference) == ("data, data.train.features, data.train.labels, "
                                                      "data.val.features, data.val.labels, model_layout")


def test_read_ahead_workers_give_the_batches_of_the_loop_in_order():
    """train.num_workers: a DataLoader over TrainingBatches with 2 workers yields, epoch after epoch,
    exactly the batches training_batches makes in the loop; creating it draws nothing from the
    global torch RNG (whose state the checkpoints carry)."""
    from pipelines.data import TrainingBatches

    rng = np.random.default_rng(0)
    sequences = [Sequence(f"v{i}", rng.standard_normal((n, 3)).astype(np.float32),
                          (rng.random((n, 2)) > 0.5).astype(np.float32)) for i, n in enumerate([5, 12, 30, 2, 9, 17, 4])]
    expected = [batch for epoch in (3, 4, 5) for batch in training_batches(sequences, 2, 8, seed=1, epoch=epoch)]
    state = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(TrainingBatches(sequences, 2, 8, seed=1, epochs=range(3, 6)), batch_size=None,
                                         num_workers=2, prefetch_factor=2, generator=torch.Generator().manual_seed(1))
    batches = list(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(batches) == len(expected) == 3 * 4
    for got, want in zip(batches, expected):
        for part in ("features", "labels", "mask"):
            assert torch.equal(getattr(got, part), getattr(want, part))


@pytest.mark.slow
def test_a_killed_run_resumes_with_read_ahead_workers_to_the_same_weights(prepared, uninterrupted, tmp_path):
    """The kill-and-resume guarantee with train.num_workers=1 (worker processes in the killed
    process group): the same weights, selected epoch and log as the in-loop uninterrupted run."""
    data = params_with(prepared, tmp_path / "data", num_workers=1)
    interrupted = tmp_path / "interrupted"
    killed_at = kill_after_the_first_checkpoint(data, interrupted)

    output = run_training(data, interrupted)
    assert f"resuming after epoch {killed_at}" in output
    assert same_model(interrupted, uninterrupted)
    assert log_without_timing(uninterrupted / "log.csv") == log_without_timing(interrupted / "log.csv")


def test_an_ema_of_decay_near_zero_is_the_raw_run(prepared, tmp_path):
    """train.ema_decay: what is validated and saved is the average's copy of the model. With a
    decay of 1e-12 the average is the latest weights to float rounding, so every epoch's validation
    mAP is the run's without it, and at the end the average equals the raw weights. (The selected
    epoch is not compared: two epochs of this small run can tie to rounding.)"""
    run_training(params_with(prepared, tmp_path / "raw_data", ema_decay=None), tmp_path / "raw")
    run_training(params_with(prepared, tmp_path / "data", ema_decay=1e-12), tmp_path / "run")
    raw = torch.load(tmp_path / "raw" / "checkpoints" / "last.pt", weights_only=False)
    averaged = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert [h["val_map"] for h in averaged["history"]] == pytest.approx([h["val_map"] for h in raw["history"]], abs=1e-3)
    for name, weight in averaged["model"].items():
        torch.testing.assert_close(averaged["ema"][f"module.{name}"], weight, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(weight, raw["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    bundle = load_bundle(tmp_path / "run" / "model.pt")
    assert bundle.val_map == max(h["val_map"] for h in averaged["history"])

@pytest.mark.slow
def test_a_killed_ema_run_resumes_to_the_same_average(prepared, tmp_path):
    """The average is part of the checkpoint: a run killed after an epoch resumes to the weights of
    the run that was never killed, and those weights are the average's, not the raw ones."""
    data = params_with(prepared, tmp_path / "data", ema_decay=0.9)
    run_training(data, tmp_path / "uninterrupted")
    interrupted = tmp_path / "interrupted"
    kill_after_the_first_checkpoint(data, interrupted)
    run_training(data, interrupted)

    expected, resumed = load_bundle(tmp_path / "uninterrupted" / "model.pt"), load_bundle(interrupted / "model.pt")
    for name, weight in expected.state_dict.items():
        assert torch.equal(weight, resumed.state_dict[name]), name
    assert log_without_timing(tmp_path / "uninterrupted" / "log.csv") == log_without_timing(interrupted / "log.csv")
    last = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "last.pt", weights_only=False)
    raw, average = last["model"], {k.removeprefix("module."): v for k, v in last["ema"].items()}
    assert any(not torch.equal(raw[name], average[name]) for name in raw)
    if expected.selected_epoch == EPOCHS:  # the saved weights are the average's at the selected epoch
        for name, weight in expected.state_dict.items():
            assert torch.equal(weight, average[name]), name
