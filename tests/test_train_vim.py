"""`ms-temba train-vim`: a SIGKILLed run resumes to the same weights, fine-tuning at the finer
granularity starts from the trained weights with the position embedding resampled, the learning
rate follows Vim's warmup + cosine formula, the outputs DVC tracks, and bad input.

Tiny Vims (2 layers, width 32, 8 px patches on 32 px images) on tiny ImageFolders the tests write
with PIL; every run is a real `python -m pipelines.tools.cli train-vim` subprocess.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
TINY = ["--model-args", "depth=2", "embed_dim=32", "patch_size=8", "stride=8", "d_state=4", "--img-size", "32"]
# Small and fast; the recipe is Vim's otherwise (RandAugment, mixup / cutmix, random erasing, drop path).
FAST = ["--batch-size", "8", "--warmup-epochs", "1", "--lr", "0.05", "--device", "cpu"]


def write_images(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{index:03d}.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An ImageNet-layout folder: train/<class>/ (16 per class) and val/<class>/ (4 per class)."""
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", 16, seed=0)
    write_images(root / "val", 4, seed=1)
    return root


def train_command(data: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.tools.cli", "train-vim", "--data", str(data), "--out", str(out), *options]


def environment() -> dict[str, str]:
    # One thread: the same float sums in every run (and fair to a shared machine); no progress bars.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def train(data: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    done = subprocess.run(train_command(data, out, *options), cwd=REPO, env=environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]


def log_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "train_log.csv") as lines:
        return list(csv.DictReader(lines))


def test_a_killed_run_resumes_to_the_same_weights(images, tmp_path):
    options = [*TINY, *FAST, "--epochs", "6", "--workers", "1", "--model-ema", "--model-ema-decay", "0.9"]
    other_options = [*TINY, *FAST, "--epochs", "1", "--workers", "0"]
    uninterrupted = tmp_path / "uninterrupted"
    train(images, uninterrupted, *options)

    # The same run, SIGKILLed (with its data-loader worker: the whole process group) as soon as
    # its checkpoint says epoch 2 is done, then run again.
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(images, killed, *options), cwd=REPO, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = killed / "last.pt"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 2:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.pt").exists()
    epochs_done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 2 <= epochs_done < 6

    resumed = train(images, killed, *options)
    assert f"resuming after epoch {epochs_done}" in resumed.stderr
    expected, actual = final_weights(uninterrupted), final_weights(killed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    ema = torch.load(killed / "model.pt", weights_only=True)["model_ema"]
    reference_ema = torch.load(uninterrupted / "model.pt", weights_only=True)["model_ema"]
    assert all(torch.equal(ema[key], reference_ema[key]) for key in ema)
    drop_seconds = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop_seconds(log_rows(killed)) == drop_seconds(log_rows(uninterrupted))

    # Other settings: the checkpoint is not resumed, and the log says why.
    other = train(images, killed, *other_options)
    assert "ignoring" in other.stderr and "epochs" in other.stderr and "resuming" not in other.stderr


def test_outputs_and_the_learning_rate_schedule(images, tmp_path):
    out = tmp_path / "run"
    train(images, out, *TINY, *FAST, "--epochs", "4", "--warmup-epochs", "2", "--min-lr", "1e-4",
          "--warmup-lr", "1e-5", "--workers", "0")
    rows = log_rows(out)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    # timm's CosineLRScheduler, per epoch e = 0, 1, ...: linear warmup from warmup_lr for
    # warmup_epochs, then cosine from lr (scaled by batch_size / 512) to min_lr over all epochs.
    base = 0.05 * 8 / 512
    expected = [1e-5 + e * (base - 1e-5) / 2 if e < 2 else 1e-4 + 0.5 * (base - 1e-4) * (1 + math.cos(math.pi * e / 4))
                for e in range(4)]
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected, rel=1e-9)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and metrics["val_top1"] == pytest.approx(float(rows[-1]["val_top1"]))
    assert metrics["best_val_top1"] == max(float(row["val_top1"]) for row in rows)
    assert 0 <= metrics["val_top1"] <= metrics["val_top5"] <= 100
    assert (out / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["vim_variant"] == "vim_tiny" and saved["classes"] == sorted(COLOURS)
    assert (saved["vim_config"]["depth"], saved["vim_config"]["num_classes"]) == (2, 3)
    assert not list(out.glob(".*.tmp"))


def test_finer_granularity_fine_tunes_at_half_the_stride(images, tmp_path):
    coarse, fine = tmp_path / "stride8", tmp_path / "stride4"
    train(images, coarse, *TINY, *FAST, "--epochs", "1", "--workers", "0")
    trained = final_weights(coarse)

    # --epochs 0: the model as fine-tuning starts from it: the trained weights, position embedding resampled.
    done = train(images, fine, "--finer-granularity", "--init", str(coarse / "model.pt"), "--img-size", "32",
                 "--epochs", "0", "--batch-size", "8", "--device", "cpu", "--workers", "0")
    assert "vim_tiny_stride8" in done.stderr and "49 patches of 8 px at stride 4" in done.stderr
    saved = torch.load(fine / "model.pt", weights_only=True)
    assert saved["vim_variant"] == "vim_tiny_stride8" and saved["vim_config"]["stride"] == 4
    start = saved["model"]
    for key, value in trained.items():
        if key != "pos_embed":
            assert torch.equal(start[key], value), key
    # 4 x 4 patches -> 7 x 7, independently: the patch embeddings (class token's, at index 8, taken
    # out) as an image, bicubically resized; the class token's embedding at the new middle, 24.
    old = trained["pos_embed"][0]
    grid = torch.cat([old[:8], old[9:]]).T.reshape(1, 32, 4, 4)
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).reshape(32, 49).T
    new = start["pos_embed"][0]
    torch.testing.assert_close(new[24], old[8])
    torch.testing.assert_close(torch.cat([new[:24], new[25:]]), expected)

    # In one command: train, then fine-tune the result at stride 4 (Vim's fine-tuning recipe) into OUT/finer.
    both = tmp_path / "both"
    train(images, both, *TINY, *FAST, "--epochs", "1", "--workers", "0", "--finer-epochs", "1")
    assert torch.load(both / "model.pt", weights_only=True)["vim_config"]["stride"] == 8
    finer = torch.load(both / "finer" / "model.pt", weights_only=True)
    assert finer["vim_variant"] == "vim_tiny_stride8" and finer["vim_config"]["stride"] == 4
    assert finer["model"]["pos_embed"].shape == (1, 50, 32)
    assert [float(row["lr"]) for row in log_rows(both / "finer")] == [1e-5]  # the fine-tuning warmup's start

    # extractor=vim takes the fine-tuned model as trained: its recorded architecture, its weights, no head.
    from extractors.config import ExtractorConfig
    from extractors.vim import VimExtractor

    extractor = VimExtractor(ExtractorConfig(backbone="vim", variant="vim_tiny_stride8", image_size=32, device="cpu",
                                             weights=str(both / "finer" / "model.pt")))
    assert (extractor.dim, extractor.metadata()["patch_stride"]) == (32, 4)
    assert torch.equal(extractor.model.layers[1].mixer.in_proj.weight, finer["model"]["layers.1.mixer.in_proj.weight"])


def test_weight_decay_spares_what_vims_does():
    import ms_temba
    from timm.optim import param_groups_weight_decay

    model = ms_temba.create_model("vim_tiny", img_size=32, num_classes=3, depth=2, embed_dim=32, patch_size=8)
    # Vim's models_mamba.VisionMamba.no_weight_decay() lists pos_embed and cls_token (and tokens it
    # does not have here); timm adds every 1-d parameter and bias.
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    spared = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in spared}
    assert names == {"pos_embed", "cls_token"} | {name for name, p in model.named_parameters() if p.ndim <= 1}
    assert "layers.0.mixer.A_log" not in names  # 2-d, decayed as in Vim's training


def test_a_flat_class_folder_holds_out_a_fraction(tmp_path):
    from pipelines.tools.train_vim import image_folders

    write_images(tmp_path / "flat", 10, seed=2)
    train_set, val_set, classes = image_folders(tmp_path / "flat", 0.25, None, None)
    assert classes == sorted(COLOURS)
    # Every 4th image of each class (ranks 3 and 7 of 10) is held out: 2 per class.
    held_out = sorted((Path(path).parent.name, Path(path).name) for path, _ in
                      (val_set.dataset.samples[i] for i in val_set.indices))
    assert held_out == sorted((name, f"{rank:03d}.png") for name in COLOURS for rank in (3, 7))
    assert len(train_set) == 24 and not set(train_set.indices) & set(val_set.indices)


def test_bad_input_is_a_clear_error(images, tmp_path, capsys):
    from pipelines.tools.train_vim import main

    def fails(*options: str) -> str:
        assert main(["--data", str(images), "--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0",
                     *options]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "fine-tunes a trained Vim: give its checkpoint with --init" in fails("--finer-granularity")
    assert "larger than the 48 training images" in fails(*TINY, "--batch-size", "64")
    assert "must be even" in fails(*TINY, "--batch-size", "7")
    assert "is not a Vim model" in fails("--model", "ms_temba_tiny", "--batch-size", "8")
    assert "VimConfig" in fails("--model-args", "depth=0", "--batch-size", "8")
    assert "does not exist" in fails("--init", str(tmp_path / "absent.pt"), "--batch-size", "8")
    assert "is not a folder" in fails("--data", str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()


def test_frames_of_a_datasets_videos_filed_under_their_annotated_classes(tmp_path):
    import pyarrow.parquet as pq

    from extractors.synthetic import make_dataset
    from pipelines.config import DatasetParams
    from pipelines.manifest import build_manifest
    from pipelines.tools.train_vim import main

    # 8-12 s videos of the first 8 classes: some actions in every video, classes 4..7 among them.
    annotations = make_dataset(tmp_path / "dataset", num_videos=4, num_classes=8, seed=3, fps=8, size=32,
                               min_duration=8.0, max_duration=12.0, test_fraction=0.5)
    dataset = DatasetParams(name="synthetic", video_dir=str(tmp_path / "dataset" / "videos"),
                            annotations=str(tmp_path / "dataset" / "annotations.json"), num_classes=8)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(build_manifest(dataset, show_progress=False).table, manifest)

    out = tmp_path / "run"
    assert main(["--frames-from", str(manifest), "--frames-fps", "2", "--out", str(out), *TINY, *FAST,
                 "--epochs", "1", "--workers", "0"]) == 0
    # Independently, from the annotations: frame k at k / 2 s (every 4th of the 8 fps video), under
    # each class with an action [start, end] around it.
    expected: dict[tuple[str, str], int] = {}
    for video_id, entry in annotations.items():
        split = "train" if entry["subset"] == "training" else "val"
        for k in range(math.ceil(round(entry["duration"] * 8) / 4)):
            for label in {c for c, start, end in entry["actions"] if start <= k / 2 <= end}:
                expected[split, f"{label:03d}"] = expected.get((split, f"{label:03d}"), 0) + 1
    written = {(split, folder.name): len(list(folder.glob("*.jpg")))
               for split in ("train", "val") for folder in (out / "frames" / split).iterdir()}
    assert {key: count for key, count in written.items() if count} == expected
    classes = [f"{label:03d}" for label in range(1 + max(c for v in annotations.values() for c, _, _ in v["actions"]))]
    assert sorted(folder for split, folder in written) == sorted(classes * 2)  # every class in both splits
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["classes"] == classes and saved["model"]["head.weight"].shape == (len(classes), 32)

    # A rerun reuses the frames (same manifest, same settings) and resumes: nothing is written again.
    stamp = (out / "frames" / "frames.json").stat().st_mtime_ns
    assert main(["--frames-from", str(manifest), "--frames-fps", "2", "--out", str(out), *TINY, *FAST,
                 "--epochs", "1", "--workers", "0"]) == 0
    assert (out / "frames" / "frames.json").stat().st_mtime_ns == stamp
