"""Distributed training (train.distributed, torchrun, DistributedDataParallel) on CPU with gloo.

The reference for two processes with batch b each is one process with batch 2b: the same global
batches, so the same weights within float tolerance (the ranks pad their parts to other lengths and
sum the gradients in another order). The crops are shorter than some videos and longer than others,
so the ranks' parts of a batch hold different numbers of real frames: the case where a mean of the
ranks' per-frame losses would differ from the global batch's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipelines.config import PROJECT_ROOT, compose_params, parse_params
from pipelines.data import Sequence, epoch_crops, rank_batch
from pipelines.stages import extract as extract_stage
from pipelines.stages import manifest as manifest_stage
from pipelines.training import distributed_weight
from test_pipeline_train import HOP_S, NUM_CLASSES, make_npy_dataset

EPOCHS = 3


def test_ranks_split_every_global_batch_and_their_shares_sum_to_one():
    rng = np.random.default_rng(0)
    lengths = [5, 12, 30, 2, 9]
    sequences = [Sequence(f"v{i}", rng.standard_normal((n, 3)).astype(np.float32),
                          (rng.random((n, 2)) > 0.5).astype(np.float32)) for i, n in enumerate(lengths)]
    for items in epoch_crops(sequences, batch_size=4, crop_length=8, seed=1, epoch=2):
        parts = [rank_batch(items, rank, 3) for rank in range(3)]
        assert sum(part.share for part in parts) == pytest.approx(1.0)
        # Every crop of the global batch is in exactly one rank's part.
        real = sorted(part.features[row, :int(part.mask[row].sum())].numpy().tobytes() for part in parts
                      if part.share for row in range(len(part.features)))
        assert real == sorted(features.tobytes() for features, _ in items)
        for part in parts:  # frames of the part over frames of the global batch, counted by hand
            frames = int(part.mask.sum()) if part.share else 0
            assert part.share == pytest.approx(frames / sum(len(f) for f, _ in items))
    # A last batch of one item: the other ranks get a single padding-free zero frame with share 0.
    last = list(epoch_crops(sequences, batch_size=4, crop_length=8, seed=1, epoch=2))[-1]
    idle = rank_batch(last, 1, 2)
    assert len(last) == 1 and idle.share == 0 and idle.features.shape[:2] == (1, 1) and not idle.features.any()


def test_share_weighted_losses_are_the_global_batch_loss():
    """masked_bce per rank, weighted as training weights it (distributed_weight / world_size), sums
    to the BCE of the whole batch written out in float64; the plain mean of the ranks' losses does not."""
    from ms_temba.losses import masked_bce

    rng = np.random.default_rng(1)
    lengths = [7, 3, 12, 5]
    items = [(rng.standard_normal((n, 4)).astype(np.float32), (rng.random((n, 4)) > 0.6).astype(np.float32))
             for n in lengths]
    reference = sum(float(F.binary_cross_entropy_with_logits(torch.from_numpy(x).double(), torch.from_numpy(y).double(),
                                                             reduction="sum")) for x, y in items) / sum(lengths)
    world_size = 2
    losses = []
    for rank in range(world_size):
        part = rank_batch(items, rank, world_size)
        losses.append((masked_bce(part.features, part.labels, part.mask).item(), part.share))
    weighted = sum(loss * distributed_weight(share, world_size) for loss, share in losses) / world_size
    assert weighted == pytest.approx(reference, rel=1e-6)
    assert np.mean([loss for loss, _ in losses]) != pytest.approx(reference, rel=1e-3)


def test_distributed_outside_torchrun_is_a_clear_error(monkeypatch):
    from pipelines.config import ConfigError
    from pipelines.training import start_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="train.distributed.*torchrun"):
        start_distributed(True, torch.device("cpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small .npy dataset (5 training videos of 20-31 features, 2 held out) and params for batches
    of 4 cropped to 28 features: global batches of 4 and 1 (rank 1 idle in the second)."""
    root = tmp_path_factory.mktemp("ddp_data")
    make_npy_dataset(root, num_videos=9)
    params = compose_params([
        "experiment=tiny", "dataset.synthetic=null", f"dataset.num_classes={NUM_CLASSES}", "dataset.class_names=null",
        "dataset.feature_source=npy", f"dataset.video_dir={root / 'npy'}", f"dataset.annotations={root / 'annotations.json'}",
        f"dataset.npy_hop_s={HOP_S}", f"train.epochs={EPOCHS}", "train.warmup_epochs=1", "train.batch_size=4",
        "train.num_clips=28", "train.val_fraction=0.25", "train.beta=0.3", "train.num_threads=1",
        # Only the frame-normalised terms are exact across ranks with unequal frames per sample
        # (pipelines.training.distributed_weight); the consistency term is a mean over samples, the
        # smoothing term one over pairs of neighbouring frames.
        "train.alpha=0", "train.smoothing=0"])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    manifest_stage.main(["--params", str(root / "params.yaml"), "--out", str(root / "manifest.parquet"),
                         "--report", str(root / "report.json")])
    extract_stage.main(["--params", str(root / "params.yaml"), "--manifest", str(root / "manifest.parquet"),
                        "--out", str(root / "shards")])
    params["train"]["distributed"] = True
    (root / "params_ddp.yaml").write_text(yaml.safe_dump(params))
    return root


def stage_arguments(data, run, params_file):
    # --train-log, not --log: torchrun's parser takes --log for an abbreviation of its own options.
    return ["-m", "pipelines.stages.train", "--params", str(data / params_file), "--manifest", str(data / "manifest.parquet"),
            "--shards", str(data / "shards"), "--checkpoints", str(run / "checkpoints"), "--out", str(run / "model.pt"),
            "--train-log", str(run / "log.csv")]


def torchrun_command(data, run, processes=2):
    # --standalone: a rendezvous on a free local port, so that parallel test sessions do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            *stage_arguments(data, run, "params_ddp.yaml")]


def run(command):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def last_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: one process, batches of 4."""
    run_dir = tmp_path_factory.mktemp("one_process")
    run([sys.executable, *stage_arguments(data, run_dir, "params.yaml")])
    return run_dir


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_processes")
    run(torchrun_command(data, run_dir))
    return run_dir


def test_two_processes_train_the_weights_of_one_with_the_whole_batch(one_process, two_processes):
    expected, distributed = last_weights(one_process), last_weights(two_processes)
    assert expected["model"].keys() == distributed["model"].keys()
    for name, weight in expected["model"].items():
        torch.testing.assert_close(distributed["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)  # measured: 2.4e-7 at most
    # The logged losses are the global batches' (the ranks' terms weighted by their shares, all-reduced).
    for mine, theirs in zip(expected["history"], distributed["history"]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["val_map"] == pytest.approx(theirs["val_map"], abs=1e-3)
    # Only rank 0 writes: the one checkpoint, model and log, and no temporary left by another rank.
    files = sorted(str(path.relative_to(two_processes)) for path in two_processes.rglob("*") if path.is_file())
    assert files == ["checkpoints/last.pt", "log.csv", "model.pt"]
    assert "rank 1 of 2" not in (two_processes / "log.csv").read_text()


@pytest.mark.slow
def test_a_killed_distributed_run_resumes_to_the_same_weights(data, two_processes, tmp_path):
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(torchrun_command(data, interrupted), cwd=PROJECT_ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    checkpoint = interrupted / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun starts each rank in a session of its own: kill the ranks, then torchrun (a lost job).
    for rank in psutil.Process(process.pid).children(recursive=True):
        rank.kill()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= killed_at < EPOCHS

    output = run(torchrun_command(data, interrupted))
    assert f"resuming after epoch {killed_at}" in output
    expected, resumed = last_weights(two_processes), last_weights(interrupted)
    for name, weight in expected["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name
    assert [h["train_loss"] for h in expected["history"]] == [h["train_loss"] for h in resumed["history"]]
