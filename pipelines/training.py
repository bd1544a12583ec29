"""Training (the train stage, pipelines.stages.train): MS-Temba on the training subset, the best
epoch selected on a held-out part.

    train(params, manifest_path, shards_dir, checkpoint_dir, out_path, log_path) -> ModelBundle (None on ranks > 0)

The recipe is the release's: AdamW (lr 5e-4, weight decay 0.01), a per-step schedule that rises
linearly for `warmup_epochs` and then follows a cosine to 0, the MS-Temba loss (BCE + beta *
per-block BCE + alpha * scale consistency), random crops of `num_clips` features per training
sequence. Model selection never sees the test subset: `val_fraction` of the training videos
(chosen by video, deterministically) are held out, and the epoch with the best validation
per-frame mAP is the one written to --out (see pipelines.bundle).

Reproducible and resumable: everything random is seeded (the data order and crops from (seed,
epoch); torch, numpy and random from the seed), and after every epoch a checkpoint with the model,
optimizer, scheduler and RNG states, the best epoch so far and the history is written atomically.
A re-run with the same configuration resumes from it and ends with the same weights as an
uninterrupted run; a checkpoint of another configuration (its fingerprint differs) is ignored.
The fingerprint covers the parameters, the features' metadata, the training and validation video
ids, the data themselves (a sha256 of each part's features and labels: `data_digest`, so changed
annotations or features under the same ids are not resumed from a model of the old data) and the
model's parameter layout (names and shapes of its state dict: `parameter_layout`, so a checkpoint
written before the layout changed is ignored instead of failing to load). The log names the parts
that differ.

Throughput (docs/pipeline.md, "Precision, read-ahead and several GPUs"):
  * `train.precision`: bf16 or fp16 runs the forward pass and the loss under torch.autocast (fp16
    with a GradScaler); weights and optimizer stay fp32, and the scan's recurrence is fp32 (ms_temba.ops).
  * `train.num_workers`: DataLoader workers collate the next batches while this one trains
    (pipelines.data.TrainingBatches: the same batches in the same order as in the loop).
  * `train.distributed`: under torchrun, one process per GPU (nccl) or per CPU process group (gloo),
    DistributedDataParallel. Every rank draws the same global batch of batch_size and trains on its
    part; only rank 0 validates and writes checkpoints, logs and the model. The weights equal those
    of one process with the whole batch, within float tolerance (see `distributed_weight`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from extractors.device import resolve_device
from extractors.files import atomic_path
from pipelines.bundle import ModelBundle, save_bundle
from pipelines.config import ConfigError, PipelineParams
from pipelines.data import (Sequence, TrainingBatches, feature_statistics, load_sequences, num_batches,
                            split_train_val, standardized)
from pipelines.inference import video_probabilities
from pipelines.io import remove_stale_temporaries_of, setup_logging, write_csv
from pipelines.manifest import read_manifest, usable_videos

CHECKPOINT_FILE = "last.pt"
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH_FACTOR = 2  # batches each DataLoader worker keeps ready
LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_bce", "val_map", "seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, total_steps: int, decay: bool = True):
    """lr multiplier at optimizer step s: linear 0 -> 1 over warmup, then cosine 1 -> 0 (or, with
    decay=False, constant 1)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the weight matrices and conv kernels only. Biases, norm
    scales and the SSM parameters (A_log, D: marked `_no_weight_decay`, mamba_ssm's convention) are
    not decayed: decaying A_log pulls every state's decay rate to the same value."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.dim() < 2 or getattr(parameter, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def gradient_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradients per top-level part of the model (`blocks.1`, `head`, ...)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            names = name.split(".")
            part = ".".join(names[:2]) if len(names) > 2 and names[1].isdigit() else names[0]
            parts.setdefault(part, []).append(parameter.grad.detach())
    # One fused norm per part and one read-back for all of them, rather than a reduction and a
    # Python float per parameter (MS-Temba has ~160 small ones: that was 3-5 ms a step).
    if not parts:
        return {}
    norms = torch.stack([torch.nn.utils.get_total_norm(grads) for grads in parts.values()])
    return dict(zip(parts, norms.tolist()))


def class_names(path: str | None, num_classes: int) -> list[str]:
    if path is None:
        return [f"class_{c}" for c in range(num_classes)]
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{path} (dataset.class_names) lists {len(names)} classes, dataset.num_classes is {num_classes}")
    return names


def validation_map(model, sequences: list[Sequence], num_classes: int, device: torch.device) -> float:
    """Per-frame mAP (percent) over the full-length sequences; NaN if no class has a positive."""
    from ms_temba.metrics import FrameMAP

    metric = FrameMAP(num_classes)
    model.eval()
    for sequence in sequences:
        metric.update(video_probabilities(model, sequence.features, device), sequence.labels)
    return 100.0 * metric.compute()["map"]


# Settings that say how a run executes, not what it computes: a checkpoint resumes across them (a run
# started on one machine may go on on another, with another thread count). The package version is
# provenance, like everywhere else (extractors.shards).
# train.num_workers changes nothing in the batches; train.distributed only the order of float sums.
RUNTIME_ONLY_KEYS = frozenset({"train.device", "train.num_threads", "train.num_workers", "train.distributed",
                               "features.package_version"})


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {key: leaf for name, item in value.items() for key, leaf in _flatten(item, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


def data_digest(sequences: list[Sequence]) -> dict[str, str]:
    """{"features": sha256, "labels": sha256} over the sequences in order (id, shape, dtype and bytes
    of each array): what a run trains on, beyond the video ids."""
    digests = {"features": hashlib.sha256(), "labels": hashlib.sha256()}
    for sequence in sequences:
        for part, digest in digests.items():
            array = np.ascontiguousarray(getattr(sequence, part))
            digest.update(json.dumps([sequence.video_id, list(array.shape), array.dtype.str]).encode())
            digest.update(array.tobytes())
    return {part: digest.hexdigest() for part, digest in digests.items()}


def parameter_layout(model: torch.nn.Module) -> list[list]:
    """[name, shape] of every entry of the model's state dict, in order."""
    return [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]


def setting_hash(value) -> str:
    """The short hash of one setting in a fingerprint."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint(params: PipelineParams, feature_metadata: dict, train_ids: list[str], val_ids: list[str],
                data: dict | None = None, layout: list | None = None) -> str:
    """What a checkpoint must have been trained with to be resumed: "<digest> key=<hash> ...", one
    short hash per setting (so that `fingerprint_difference` can name the keys that differ).
    `data`: {"train": data_digest(training part), "val": data_digest(validation part)} (keys
    data.train.features, data.val.labels, ...); `layout`: parameter_layout(model) (key model_layout)."""
    identity = _flatten({"dataset": dataclasses.asdict(params.dataset), "model": dataclasses.asdict(params.model),
                         "train": dataclasses.asdict(params.train), "features": feature_metadata,
                         "train_ids": train_ids, "val_ids": val_ids, "data": data or {}, "model_layout": layout})
    parts = {key: setting_hash(value) for key, value in sorted(identity.items()) if key not in RUNTIME_ONLY_KEYS}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return " ".join([digest, *(f"{key}={value}" for key, value in parts.items())])


def fingerprint_difference(old: str, new: str) -> str:
    """The keys in which two fingerprints differ, e.g. "train.lr, model.overrides.widths"."""
    def parts(text: str) -> dict | None:
        fields = str(text).split(" ")
        return dict(field.split("=", 1) for field in fields[1:]) if len(fields) > 1 else None
    first, second = parts(old), parts(new)
    if first is None or second is None:
        return "settings not recorded: a checkpoint of an older version"
    return ", ".join(sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))) or "nothing"


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its node

    @property
    def writer(self) -> bool:
        """Only rank 0 validates and writes files."""
        return self.rank == 0


def start_distributed(distributed: bool, device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    environment): nccl between GPUs, gloo between CPU processes. Returns the ranks and this
    process's device (cuda:LOCAL_RANK on GPUs)."""
    if not distributed:
        return Ranks(), device
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("train.distributed", "is true but this process was not started by torchrun (no WORLD_SIZE "
                                               "in its environment): run `torchrun --nproc_per_node N -m "
                                               "pipelines.stages.train ...` (README, Training on GPUs), or set "
                                               "train.distributed=false")
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def distributed_weight(share: float, world_size: int) -> float:
    """The factor on a rank's loss that makes DistributedDataParallel's gradient that of the global
    batch's loss. The BCE terms are a sum over real frames divided by the batch's real frames, so
    the global loss is the sum over ranks of share_r * loss_r (share_r: rank r's part of the global
    batch's real frames, Batch.share), not the mean of the ranks' losses, which would give a rank
    with fewer frames the same weight. DDP averages the ranks' gradients (divides their sum by
    world_size), hence share * world_size. Exact for every frame-normalised term (bce, block_bce,
    MS-TCN's stage BCE); terms averaged over samples (MS-Temba's consistency) or over other counts
    (MS-TCT's focal loss, MS-TCN's smoothing) are weighted by frames too, which equals the global
    batch's value when the ranks' parts have the same frames per sample (full-length crops)."""
    return share * world_size


def train(params: PipelineParams, manifest_path: str | Path, shards_dir: str | Path, checkpoint_dir: str | Path,
          out_path: str | Path, log_path: str | Path, log=None) -> ModelBundle | None:
    import ms_temba
    from ms_temba.losses import model_loss
    from extractors.shards import FeatureStore

    log = log or setup_logging("train")
    dataset, recipe = params.dataset, params.train
    torch.set_num_threads(recipe.num_threads)
    ranks, device = start_distributed(recipe.distributed, resolve_device(recipe.device, "train.device"))

    names = class_names(dataset.class_names, dataset.num_classes)
    store = FeatureStore(shards_dir)
    rows = usable_videos(read_manifest(manifest_path), subset=dataset.train_subset)
    sequences = load_sequences(rows, store, dataset.num_classes)
    train_ids, val_ids = split_train_val([s.video_id for s in sequences], recipe.val_fraction, recipe.seed)
    train_set = [s for s in sequences if s.video_id in set(train_ids)]
    val_set = [s for s in sequences if s.video_id in set(val_ids)]
    data = {"train": data_digest(train_set), "val": data_digest(val_set)}  # before standardisation
    feature_mean = feature_std = None
    if recipe.normalize_features:  # statistics of the training part only
        feature_mean, feature_std = feature_statistics(train_set)
        train_set, val_set = (standardized(part, feature_mean, feature_std) for part in (train_set, val_set))
    log.info("%d training videos, %d held out for validation, %d-d features, device %s, precision %s%s",
             len(train_set), len(val_set), store.dim, device, recipe.precision,
             f", rank {ranks.rank} of {ranks.world_size}" if recipe.distributed else "")

    seed_everything(recipe.seed)
    model = ms_temba.create_model(params.model.name, in_dim=store.dim, num_classes=dataset.num_classes,
                                  **params.model.overrides)
    if recipe.class_prior_init:
        prior = np.concatenate([s.labels for s in train_set]).mean(axis=0)
        ms_temba.init_class_prior(model.class_heads(), torch.from_numpy(prior))
    model = model.to(device)
    # The weights that are validated, selected and saved: the model's own, or their exponential
    # moving average over the optimizer steps (train.ema_decay), which the steps leave alone.
    ema = None
    if recipe.ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
    evaluated = model if ema is None else ema.module
    if ranks.world_size > 1:  # the same initial weights on every rank (above), then each rank its own dropout
        torch.manual_seed(recipe.seed + ranks.rank)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=recipe.lr)
    autocast_dtype = AUTOCAST_DTYPES[recipe.precision]
    # fp16's small range underflows small gradients: the scaler multiplies the loss and divides the
    # gradients back (skipping a step that overflowed). bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16")
    steps_per_epoch = num_batches(len(train_set), recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(recipe.warmup_epochs * steps_per_epoch, recipe.epochs * steps_per_epoch,
                                 decay=recipe.schedule == "warmup_cosine"))

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    if ranks.writer:
        remove_stale_temporaries_of(checkpoint_path, out_path, log_path)  # a run killed inside a write left them
    run_id = fingerprint(params, store.metadata, train_ids, val_ids, data, parameter_layout(model))
    start_epoch, history, best = 1, [], {"epoch": 0, "val_map": -math.inf, "state_dict": None}
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint["fingerprint"] == run_id:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint.get("scaler", {}))
            if ema is not None:
                ema.load_state_dict(checkpoint["ema"])
            rank_rng = checkpoint.get("rank_rng") or []  # each rank's own, if it ran on as many
            restore_rng_states(rank_rng[ranks.rank] if len(rank_rng) == ranks.world_size else checkpoint["rng"])
            start_epoch, history, best = checkpoint["epoch"] + 1, checkpoint["history"], checkpoint["best"]
            log.info("resuming after epoch %d from %s", checkpoint["epoch"], checkpoint_path)
        else:
            log.info("ignoring %s: it belongs to another configuration (differing: %s)", checkpoint_path,
                     fingerprint_difference(checkpoint["fingerprint"], run_id))

    trained = model  # what the training steps call: the model, or DDP around it
    if ranks.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # One DataLoader over all the epochs left: its workers read ahead across epoch ends (and during
    # validation) and live until training ends. Its own generator: creating it must not draw from
    # the global torch RNG, whose state the checkpoint carries (dropout).
    loader = torch.utils.data.DataLoader(
        TrainingBatches(train_set, recipe.batch_size, recipe.num_clips, recipe.seed,
                        range(start_epoch, recipe.epochs + 1), ranks.rank, ranks.world_size),
        batch_size=None, num_workers=recipe.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_FACTOR if recipe.num_workers else None,
        generator=torch.Generator().manual_seed(recipe.seed))
    batches = iter(loader)
    for epoch in range(start_epoch, recipe.epochs + 1):
        started = time.perf_counter()
        model.train()
        totals: dict[str, float] = {}  # every term of the global batches' loss, summed over the epoch
        grad_totals: dict[str, float] = {}
        for batch in tqdm(itertools.islice(batches, steps_per_epoch), total=steps_per_epoch,
                          desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False, disable=not ranks.writer):
            mask = batch.mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = trained(batch.features.to(device, non_blocking=True), mask)
                losses = model_loss(output, batch.labels.to(device, non_blocking=True), mask,
                                    beta=recipe.beta, alpha=recipe.alpha, smoothing=recipe.smoothing)
            optimizer.zero_grad(set_to_none=True)
            weight = distributed_weight(batch.share, ranks.world_size)  # 1 in one process
            scaler.scale(losses["loss"] * weight).backward()
            scaler.unscale_(optimizer)  # the true gradients for the norms and the clipping
            for part, norm in gradient_norms(model).items():  # before clipping: what the loss asks for
                grad_totals[part] = grad_totals.get(part, 0.0) + norm
            if recipe.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            # The global batch's terms: the ranks' terms weighted by their shares.
            values = torch.stack([value.detach().float() for value in losses.values()]) * batch.share
            if ranks.world_size > 1:
                torch.distributed.all_reduce(values)
            for term, value in zip(losses, values.tolist()):
                totals[term] = totals.get(term, 0.0) + value

        if ranks.world_size > 1:
            rank_rng = [None] * ranks.world_size
            torch.distributed.all_gather_object(rank_rng, rng_states())
        if not ranks.writer:
            continue
        val_map = validation_map(evaluated, val_set, dataset.num_classes, device)
        history.append({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": totals["loss"] / steps_per_epoch, "train_bce": totals["bce"] / steps_per_epoch,
                        "val_map": val_map, "seconds": round(time.perf_counter() - started, 3),
                        # not in the CSV: per-term losses and gradient norms per part (docs/accuracy.md)
                        "loss_terms": {term: value / steps_per_epoch for term, value in totals.items()},
                        "grad_norms": {part: value / steps_per_epoch for part, value in grad_totals.items()}})
        if val_map > best["val_map"]:  # NaN (no positives in the held-out part) never wins
            best = {"epoch": epoch, "val_map": val_map,
                    "state_dict": {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}}
        log.info("epoch %d: loss %.4f, val mAP %.2f%% (best %.2f%% at epoch %d)", epoch, history[-1]["train_loss"],
                 val_map, best["val_map"], best["epoch"])
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint_path) as temporary:
            torch.save({"fingerprint": run_id, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng": rng_states(), "history": history, "best": best,
                        **({"ema": ema.state_dict()} if ema is not None else {}),
                        **({"rank_rng": rank_rng} if ranks.world_size > 1 else {})}, temporary)
        write_csv(log_path, history, LOG_COLUMNS)

    if recipe.distributed:
        # DDP's reducer holds the process group: let it go first, rather than tearing the group
        # down under it (a rank once aborted at this point in CI under load).
        del trained
        torch.distributed.destroy_process_group()
    if not ranks.writer:
        return None
    if best["state_dict"] is None:  # validation mAP was NaN throughout: keep the last epoch
        best = {"epoch": recipe.epochs, "val_map": float("nan"), "state_dict": evaluated.state_dict()}
    write_csv(log_path, history, LOG_COLUMNS)
    config = dataclasses.asdict(model.config)
    bundle = ModelBundle(
        model_name=params.model.name, model_config=config, state_dict=best["state_dict"],
        class_names=names, features=store.metadata,
        dataset=dataset.name, train_params=dataclasses.asdict(recipe), selected_epoch=best["epoch"],
        val_map=best["val_map"], train_videos=train_ids, val_videos=val_ids,
        feature_mean=None if feature_mean is None else torch.from_numpy(feature_mean),
        feature_std=None if feature_std is None else torch.from_numpy(feature_std))
    save_bundle(out_path, bundle)
    log.info("selected epoch %d (val mAP %.2f%%) -> %s", best["epoch"], best["val_map"], out_path)
    return bundle
