"""`ms-temba train-vim`: train or fine-tune a Vision Mamba (`ms_temba.vim`) on images, with Vim's recipe.

    ms-temba train-vim --data DIR --out OUT [--model vim_tiny] [--epochs 300] [--img-size 224] ...
    ms-temba train-vim --data DIR --out OUT8 --finer-granularity --init OUT/model.pt    # stride 8
    ms-temba train-vim --data DIR --out OUT --finer-epochs 30        # both: OUT/model.pt, OUT/finer/model.pt
    ms-temba train-vim --frames-from data/synthetic/manifest.parquet --out OUT          # video frames

Data: DIR in the ImageFolder layout, one sub-folder of images per class: DIR/train/<class>/ and
DIR/val/<class>/ (ImageNet's layout, as Vim's --data-path), or DIR/<class>/ alone, of which every
image whose index in its class is a multiple of round(1 / --val-fraction) is held out for validation.
With --frames-from, the images are frames of a dataset's videos (the manifest stage's table: paths,
subsets, actions in seconds) sampled at --frames-fps, each filed under every class annotated at its
time (`write_frame_folder`), into DIR (default OUT/frames): the training subset's under train/, the
other videos' under val/.

Recipe: Vim's, which is DeiT's, all from timm: training images through `create_transform`
(random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1 capped at magnitude 9: `AUTO_AUGMENT`,
colour jitter 0.3, random erasing 0.25), `Mixup` (mixup 0.8, cutmix 1.0, label smoothing 0.1) and
`SoftTargetCrossEntropy` (`LabelSmoothingCrossEntropy` without mixup), AdamW (`create_optimizer_v2`,
no weight decay on biases, norms, pos_embed and cls_token) at lr * batch_size / 512,
`CosineLRScheduler` (linear warmup, cosine to min_lr, stepped per epoch), drop path, optionally an
EMA of the weights (`ModelEmaV3`). With --finer-granularity the defaults are Vim's fine-tuning ones (30 epochs,
lr 5e-6, weight decay 1e-8, no drop path): `RECIPES`.

--finer-granularity (with --init): fine-tune a trained Vim at half its patch stride (the `_stride8`
form of its variant: overlapping 16 x 16 patches at stride 8, 4x the tokens), its position
embedding resampled to the finer grid (`ms_temba.vim.resize_pos_embed`). --init alone fine-tunes
at the same stride (or another --img-size). A head of another class count is left out and starts fresh.
--finer-epochs N does both in one command: train, then fine-tune the result at the finer granularity
for N epochs into OUT/finer (Vim's fine-tuning recipe; the recipe options given are the first run's).

Resumable: after every epoch OUT/last.pt (model, EMA, optimizer, history) is written atomically; a
rerun with the same settings and data resumes after the last finished epoch and ends with the same
weights as an uninterrupted run (everything random is seeded from (seed, epoch)). A checkpoint of
other settings is ignored, and the log says which settings differ.

Writes OUT/model.pt ({"model": weights, "model_ema": EMA weights or absent, "vim_variant": name,
"vim_config": architecture, "classes": [...]}: `extractor=vim` loads it, rebuilding the recorded
architecture), OUT/metrics.json (last and best validation top-1 / top-5), OUT/train_log.csv and
OUT/train_curves.png (per epoch; `dvc plots` reads the CSV). docs/vim.md has a DVC recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, LOG_FILE, PLOT_FILE = (
    "last.pt", "model.pt", "metrics.json", "train_log.csv", "train_curves.png")
LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "seconds")
FRAMES_STAMP = "frames.json"  # what a --frames-from folder was written from
TRAIN_SUBSET = "training"  # the manifest subset --frames-from trains on (pipelines.config's default)
# Vim's (DeiT's) settings: training from scratch (scripts/pt-vim-*.sh with DeiT's defaults) and
# fine-tuning at the finer granularity (scripts/ft-vim-*.sh). Options left unset take these.
RECIPES: dict[str, dict[str, Any]] = {
    "train": dict(epochs=300, lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                  drop_path=0.1),
    "finer": dict(epochs=30, lr=5e-6, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=5, weight_decay=1e-8,
                  drop_path=0.0),
}
# Vim's RandAugment (rand-m9-mstd0.5-inc1) with the magnitude capped at 9 instead of 10 ("mmax9"): at
# 10, timm's increasing posterize keeps 0 bits, which Pillow >= 13 refuses (ValueError mid-epoch).
AUTO_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
# Settings that do not change the weights a run ends with: a run resumes across changes of these
# (finer_epochs concerns the run after it).
RUNTIME_ONLY = ("out", "device", "workers", "finer_epochs")


# ----------------------------------------------------------------------------------------------
# Data


def image_folders(data: Path, val_fraction: float, train_transform, val_transform):
    """(training set, validation set or None, class names) of an ImageFolder tree (see the module docstring)."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder")
    if (data / "train").is_dir():
        # allow_empty: a class without validation images (frames of videos) keeps its folder, and its index.
        train = ImageFolder(data / "train", transform=train_transform, allow_empty=True)
        val = ImageFolder(data / "val", transform=val_transform, allow_empty=True) if (data / "val").is_dir() else None
        if val is not None and val.classes != train.classes:
            raise ValueError(f"{data}/val has classes {val.classes}, {data}/train has {train.classes}: they must agree")
        return train, val, train.classes
    train, val = ImageFolder(data, transform=train_transform), ImageFolder(data, transform=val_transform)
    if val_fraction <= 0:
        return train, None, train.classes
    every = max(2, round(1 / val_fraction))
    rank_in_class: dict[int, int] = {}
    held_out = []
    for _, label in train.samples:  # sorted by class, then by file name
        rank_in_class[label] = rank_in_class.get(label, -1) + 1
        held_out.append(rank_in_class[label] % every == every - 1)
    train_indices = [i for i, out in enumerate(held_out) if not out]
    val_indices = [i for i, out in enumerate(held_out) if out]
    return Subset(train, train_indices), Subset(val, val_indices) if val_indices else None, train.classes


def write_frame_folder(manifest: Path, folder: Path, fps: float, size: int) -> None:
    """An ImageFolder tree of the frames of a dataset's usable videos (`manifest`, the manifest
    stage's table) sampled at `fps`, decoded at `size` (short side, centre crop) and saved as JPEG:
    folder/train/<class>/ from the training subset, folder/val/<class>/ from the others, every class
    folder ("007") in both. A frame goes under every class annotated at its time (pipelines.labels'
    rule, the frame's time as the centre); a frame without an action is left out. Written whole (in
    a temporary folder, renamed at the end), and written again when the manifest or settings change."""
    import shutil
    import uuid

    import numpy as np
    from PIL import Image

    from extractors.files import file_sha256
    from extractors.video import iter_frame_chunks
    from pipelines.labels import build_labels
    from pipelines.manifest import read_manifest, usable_videos

    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # what a killed run was writing
        shutil.rmtree(stale, ignore_errors=True)
    settings = {"manifest_sha256": file_sha256(manifest), "fps": fps, "size": size}
    stamp = folder / FRAMES_STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return
    if folder.exists() and not stamp.exists():
        raise ValueError(f"{folder} exists and holds no {FRAMES_STAMP}: it is not a frame folder of --frames-from, "
                         f"which would replace it; give another --data")
    rows = usable_videos(read_manifest(manifest))
    if not rows:
        raise ValueError(f"{manifest} has no usable video")
    num_classes = 1 + max(max(row["action_class"], default=-1) for row in rows)
    if not num_classes:
        raise ValueError(f"the videos of {manifest} have no annotated action: no frame has a class")
    partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    try:
        partial.mkdir(parents=True)
        for split in ("train", "val"):
            for label in range(num_classes):
                (partial / split / f"{label:03d}").mkdir(parents=True)
        for row in tqdm(rows, desc="frames", unit="video"):
            split = "train" if row["subset"] == TRAIN_SUBSET else "val"
            first = 0
            for chunk in iter_frame_chunks(row["path"], fps, size):
                labels = build_labels(chunk.times_s, row["action_class"], row["action_start_s"], row["action_end_s"],
                                      num_classes)
                for index, (frame, positive) in enumerate(zip(chunk.frames, labels), start=first):
                    name = f"{row['video_id']}_{index:06d}.jpg"
                    for label in np.flatnonzero(positive):
                        Image.fromarray(frame).save(partial / split / f"{label:03d}" / name, quality=95)
                first += len(chunk.frames)
        (partial / FRAMES_STAMP).write_text(json.dumps(settings))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def data_identity(data: Path) -> str:
    """A digest of the image files under `data` (relative paths and sizes): a changed data set is not resumed."""
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what ImageFolder reads

    files = sorted((str(path.relative_to(data)), path.stat().st_size) for path in data.rglob("*")
                   if path.suffix.lower() in IMG_EXTENSIONS and path.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _seed_worker(worker_id: int) -> None:
    # Torch seeds each loader worker (and Python's random) from the loader's generator; numpy,
    # which timm's RandAugment draws from, it leaves alone.
    import numpy as np

    np.random.seed(torch.initial_seed() % 2**32)


# ----------------------------------------------------------------------------------------------
# The model


def read_init(path: str | None) -> tuple[dict[str, torch.Tensor] | None, str | None, dict | None]:
    """(state dict, recorded model name, recorded architecture) of an --init checkpoint (official
    Vim .pth or a train-vim model.pt; names and architecture only in the latter)."""
    if path is None:
        return None, None, None
    from extractors.vim import CONFIG_KEY, VARIANT_KEY
    from ms_temba.checkpoint import load_checkpoint_file, unwrap_state_dict

    saved = load_checkpoint_file(path, what="--init checkpoint")
    recorded = saved if isinstance(saved, dict) else {}
    return unwrap_state_dict(saved, f"--init checkpoint {path}"), recorded.get(VARIANT_KEY), recorded.get(CONFIG_KEY)


def finer_variant(name: str) -> str:
    """The stride-8 form of a Vim variant: vim_tiny -> vim_tiny_stride8."""
    return name if name.endswith("_stride8") else f"{name}_stride8"


def build_model(args, num_classes: int, init_name: str | None, init_config: dict | None):
    """(model name, the Vim to train): --model (or the --init checkpoint's recorded model) with its
    recorded architecture, then --model-args, then this run's image size, classes and drop path;
    at half the patch stride with --finer-granularity."""
    import ms_temba
    from ms_temba.registry import model_class
    from ms_temba.vim import VisionMamba

    if args.model and init_name and args.model not in (init_name, finer_variant(init_name)):
        raise ValueError(f"--model {args.model} differs from the --init checkpoint's model {init_name}")
    name = init_name or args.model or "vim_tiny"
    if not issubclass(model_class(name), VisionMamba):
        raise ValueError(f"--model {name} is not a Vim model (it builds a {model_class(name).__name__})")
    architecture = {key: value for key, value in (init_config or {}).items()
                    if key not in ("img_size", "num_classes", "drop_path_rate")}
    architecture.update(args.model_args)
    if args.finer_granularity:
        name = finer_variant(name)
        patch_size = architecture.get("patch_size", ms_temba.model_config(name).patch_size)
        architecture["stride"] = patch_size // 2
    return name, ms_temba.create_model(name, **architecture, img_size=args.img_size, num_classes=num_classes,
                                       drop_path_rate=args.drop_path)


def load_init(model, state: dict[str, torch.Tensor], init_config: dict | None, log) -> None:
    """The --init weights into `model`: the position embedding resampled to its grid, a head of
    another class count left out (DeiT's fine-tuning rule); every other key must fit."""
    from extractors.base import load_state_dict_strict
    from ms_temba.vim import VimConfig, resize_pos_embed

    state = dict(state)
    old_grid = VimConfig(**init_config).grid_size if init_config else None  # None: official, square
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.config.grid_size, old_grid)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in own and (key not in state or state[key].shape != own[key].shape):
            if key in state:
                log(f"--init: leaving out {key} {tuple(state[key].shape)}: "
                    f"this model has {model.config.num_classes} classes")
            state[key] = own[key]  # this model's fresh head
    load_state_dict_strict(model, state, "--init checkpoint")


# ----------------------------------------------------------------------------------------------
# Training


def run_fingerprint(settings: dict[str, Any]) -> str:
    """What a checkpoint must have been trained with to be resumed, in pipelines.training's format
    ("<digest> key=<hash> ...") so that `fingerprint_difference` can name the settings that differ."""
    from pipelines.training import setting_hash

    parts = {key: setting_hash(value) for key, value in sorted(settings.items())}
    return " ".join([hashlib.sha256(json.dumps(parts).encode()).hexdigest(), *(f"{k}={v}" for k, v in parts.items())])


@torch.inference_mode()
def evaluate(model, loader, device) -> dict[str, float]:
    from timm.utils import accuracy

    model.eval()
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0}
    count = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        totals["loss"] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        totals["top1"] += top1.item() * len(images) / 100
        totals["top5"] += top5.item() * len(images) / 100
        count += len(images)
    return {"loss": totals["loss"] / count, "top1": 100 * totals["top1"] / count, "top5": 100 * totals["top5"] / count}


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    from extractors.files import atomic_path

    epochs = [row["epoch"] for row in history]
    figure, (losses, accuracies) = plt.subplots(1, 2, figsize=(10, 3.5))
    losses.plot(epochs, [row["train_loss"] for row in history], label="train (mixup targets)")
    losses.plot(epochs, [row["val_loss"] for row in history], label="validation")
    losses.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracies.plot(epochs, [row["val_top1"] for row in history], label="top-1")
    accuracies.plot(epochs, [row["val_top5"] for row in history], label="top-5")
    if any(row.get("val_top1_ema") is not None for row in history):
        accuracies.plot(epochs, [row["val_top1_ema"] for row in history], label="top-1, EMA")
    accuracies.set(xlabel="epoch", ylabel="%", title="validation accuracy")
    for axes in (losses, accuracies):
        axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def train_vim(args) -> dict[str, Any]:
    """Train as `args` say (see build_parser); returns the metrics written to OUT/metrics.json."""
    from timm.data import Mixup, create_transform
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader

    from extractors.device import resolve_device
    from extractors.files import atomic_path, file_sha256
    from extractors.vim import CONFIG_KEY, VARIANT_KEY
    from pipelines.io import remove_stale_temporaries_of, write_csv, write_json
    from pipelines.training import fingerprint_difference, seed_everything

    def log(message: str) -> None:
        print(f"train-vim: {message}", file=sys.stderr, flush=True)

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "frames"
    if args.frames_from:
        # Stored above the training resolution, like ImageNet's images: the transforms crop them.
        write_frame_folder(Path(args.frames_from), data, args.frames_fps, round(args.img_size / 0.875))
    elif not args.data:
        raise ValueError("give the images with --data DIR, or a dataset's manifest with --frames-from")
    device = resolve_device(args.device, "--device")
    for key, value in RECIPES["finer" if args.finer_granularity else "train"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0 (0 writes the initial model), got {args.epochs}")
    if args.finer_granularity and args.init is None:
        raise ValueError("--finer-granularity fine-tunes a trained Vim: give its checkpoint with --init")

    train_transform = create_transform(args.img_size, is_training=True, color_jitter=0.3,
                                       auto_augment=args.auto_augment or None, interpolation="bicubic",
                                       re_prob=args.reprob, re_mode="pixel", re_count=1)
    val_transform = create_transform(args.img_size, is_training=False, interpolation="bicubic", crop_pct=0.875)
    train_set, val_set, classes = image_folders(data, args.val_fraction, train_transform, val_transform)
    if len(train_set) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images "
                         f"(every batch is full: Vim drops the last, smaller one)")
    mixup_active = args.mixup > 0 or args.cutmix > 0
    if mixup_active and args.batch_size % 2:
        raise ValueError(f"--batch-size {args.batch_size} must be even for mixup / cutmix (they pair images)")

    init_state, init_name, init_config = read_init(args.init)
    settings = {key: value for key, value in vars(args).items() if key not in RUNTIME_ONLY}
    settings.update(classes=classes, data=data_identity(data),
                    init_sha256=file_sha256(args.init) if args.init else None)
    seed_everything(args.seed)
    name, model = build_model(args, len(classes), init_name, init_config)
    if init_state is not None:
        load_init(model, init_state, init_config, log)
    model.to(device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    lr = args.lr * args.batch_size / 512  # Vim's (DeiT's) linear scaling rule
    # timm spares 1-d parameters and biases, and the names of model.no_weight_decay() (pos_embed, cls_token).
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=args.weight_decay)
    # t_initial >= 1: timm refuses 0, and --epochs 0 (write the initial model) never steps it.
    scheduler = CosineLRScheduler(optimizer, t_initial=max(args.epochs, 1), lr_min=args.min_lr,
                                  warmup_t=args.warmup_epochs, warmup_lr_init=args.warmup_lr)
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=len(classes)) if mixup_active else None
    criterion = (SoftTargetCrossEntropy() if mixup_active else
                 LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss())
    val_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers) if val_set else None

    checkpoint_path = out / CHECKPOINT_FILE
    remove_stale_temporaries_of(*(out / name_ for name_ in (CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, LOG_FILE,
                                                            PLOT_FILE)))
    run_id = run_fingerprint(settings)
    start_epoch, history = 0, []
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if checkpoint["fingerprint"] == run_id:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if ema is not None:
                ema.module.load_state_dict(checkpoint["model_ema"])
            start_epoch, history = checkpoint["epoch"], checkpoint["history"]
            log(f"resuming after epoch {start_epoch} from {checkpoint_path}")
        else:
            log(f"ignoring {checkpoint_path}: it belongs to other settings "
                f"(differing: {fingerprint_difference(checkpoint['fingerprint'], run_id)})")
    log(f"{name} ({sum(p.numel() for p in model.parameters()):,} parameters, {model.config.num_patches} patches "
        f"of {model.config.patch_size} px at stride {model.config.patch_stride}), {len(classes)} classes, "
        f"{len(train_set)} training / {len(val_set) if val_set else 0} validation images, device {device}")

    steps_per_epoch = len(train_set) // args.batch_size
    for epoch in range(start_epoch, args.epochs):  # 0-based here, 1-based in the log
        started = time.perf_counter()
        seed_everything(args.seed * 100_003 + epoch)  # from (seed, epoch): a resumed epoch draws what it would have
        scheduler.step(epoch)
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.workers, worker_init_fn=_seed_worker,
                            generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch),
                            pin_memory=device.type == "cuda")
        model.train()
        train_loss = 0.0
        for step, (images, targets) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                                                       leave=False)):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            loss = criterion(model(images), targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step}: stopping")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(model, step=epoch * steps_per_epoch + step)
            train_loss += loss.item()

        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss / steps_per_epoch,
               "val_loss": None, "val_top1": None, "val_top5": None, "val_top1_ema": None}
        if val_loader is not None:
            scores = evaluate(model, val_loader, device)
            row.update(val_loss=scores["loss"], val_top1=scores["top1"], val_top5=scores["top5"])
            if ema is not None:
                row["val_top1_ema"] = evaluate(ema.module, val_loader, device)["top1"]
        row["seconds"] = round(time.perf_counter() - started, 3)
        history.append(row)
        log(f"epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f}"
            + (f", val top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%" if val_loader else ""))
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint_path) as temporary:
            torch.save({"fingerprint": run_id, "epoch": epoch + 1, "model": model.state_dict(),
                        "model_ema": ema.module.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(), "history": history}, temporary)
        write_csv(out / LOG_FILE, history, LOG_COLUMNS)

    final = {"model": model.state_dict(), VARIANT_KEY: name, CONFIG_KEY: dataclasses.asdict(model.config),
             "classes": list(classes), "epoch": args.epochs}
    if ema is not None:
        final["model_ema"] = ema.module.state_dict()
    with atomic_path(out / MODEL_FILE) as temporary:
        torch.save(final, temporary)
    metrics = {"epochs": args.epochs, "train_loss": history[-1]["train_loss"] if history else None}
    scored = [row for row in history if row["val_top1"] is not None]
    if scored:
        best = max(scored, key=lambda row: row["val_top1"])
        metrics.update(val_top1=scored[-1]["val_top1"], val_top5=scored[-1]["val_top5"],
                       val_loss=scored[-1]["val_loss"], best_val_top1=best["val_top1"], best_epoch=best["epoch"])
        if ema is not None:
            metrics["val_top1_ema"] = scored[-1]["val_top1_ema"]
    write_json(out / METRICS_FILE, metrics)
    write_csv(out / LOG_FILE, history, LOG_COLUMNS)
    if history:
        plot_curves(out / PLOT_FILE, history)
    log(f"{name} -> {out / MODEL_FILE}; metrics in {out / METRICS_FILE}")
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line


def _key_value(text: str) -> tuple[str, Any]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-temba train-vim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None, help="ImageFolder tree: DIR/train/<class>/, DIR/val/<class>/ or "
                                                      "DIR/<class>/ (with --frames-from: where the frames go)")
    parser.add_argument("--frames-from", default=None, metavar="MANIFEST",
                        help="train on frames of a dataset's videos: its manifest.parquet (the manifest stage's)")
    parser.add_argument("--frames-fps", type=float, default=1.0, help="--frames-from: frames per second of video")
    parser.add_argument("--out", required=True, help="folder for model.pt, last.pt, metrics.json, train_log.csv")
    parser.add_argument("--model", default=None, help="a Vim of ms_temba.create_model (default: vim_tiny, or "
                                                       "the --init checkpoint's)")
    parser.add_argument("--model-args", nargs="*", default=[], type=_key_value, metavar="KEY=VALUE",
                        help="fields of the model's VimConfig, e.g. depth=12 embed_dim=256")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--init", default=None,
                        help="start from this checkpoint (an official .pth or a train-vim model.pt)")
    parser.add_argument("--finer-granularity", action="store_true",
                        help="fine-tune the --init Vim at half its patch stride (the _stride8 variant)")
    parser.add_argument("--finer-epochs", type=int, default=0,
                        help="then fine-tune the trained Vim at half its stride for this many epochs, into OUT/finer")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="held out for validation when DATA has no train/ and val/ folders")
    recipe = parser.add_argument_group("recipe (unset: Vim's, RECIPES; its fine-tuning one with --finer-granularity)")
    recipe.add_argument("--epochs", type=int, default=None)
    recipe.add_argument("--batch-size", type=int, default=128)
    recipe.add_argument("--lr", type=float, default=None, help="for a batch of 512; scaled by batch-size / 512")
    recipe.add_argument("--min-lr", type=float, default=None)
    recipe.add_argument("--warmup-lr", type=float, default=None)
    recipe.add_argument("--warmup-epochs", type=int, default=None)
    recipe.add_argument("--weight-decay", type=float, default=None)
    recipe.add_argument("--drop-path", type=float, default=None)
    recipe.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: none)")
    recipe.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    recipe.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    recipe.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    recipe.add_argument("--auto-augment", default=AUTO_AUGMENT, help="timm RandAugment policy ('': off)")
    recipe.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    recipe.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (model.pt's model_ema)")
    recipe.add_argument("--model-ema-decay", type=float, default=0.99996)
    recipe.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                        help="data loader processes")
    return parser


def finer_stage(args, argv: list[str] | None) -> argparse.Namespace:
    """The arguments of --finer-epochs' second run: the trained OUT/model.pt fine-tuned at half its
    stride into OUT/finer, on the same images, with Vim's fine-tuning recipe (the recipe options
    given on the command line are the first run's)."""
    finer = build_parser().parse_args(argv)
    for key in RECIPES["finer"]:
        setattr(finer, key, None)
    out = Path(args.out)
    vars(finer).update(finer_granularity=True, init=str(out / MODEL_FILE), out=str(out / "finer"),
                       epochs=args.finer_epochs, model=None, model_args={}, frames_from=None,
                       data=args.data or str(out / "frames"))
    return finer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model_args = dict(args.model_args)
    try:
        if args.finer_epochs and args.finer_granularity:
            raise ValueError("--finer-epochs adds a --finer-granularity run after this one: give one of them")
        train_vim(args)
        if args.finer_epochs:
            train_vim(finer_stage(args, argv))
    except (FileNotFoundError, ValueError) as error:  # ConfigFieldError and CheckpointError are ValueErrors
        print(f"ms-temba train-vim: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from pipelines.process import setup_process

    setup_process()
    sys.exit(main())
