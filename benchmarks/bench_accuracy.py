"""Accuracy benchmark: every model, the same recipe and budget, in one run, on dense real timelines.

    python benchmarks/bench_accuracy.py                        # the default table (~30 min, 2 cores)
    python benchmarks/bench_accuracy.py --datasets multithumos --models ms_temba_small mlp --epochs 10
    python benchmarks/bench_accuracy.py --rows "ms_temba_small:train=release" "ms_temba_small:train.alpha=0"

The data are feature-level: the timelines (which actions happen when, densely overlapping) are the
real annotations of Multi-THUMOS and Charades (../shared/annotations, or --annotations), and the
features are generated on them, one D-dimensional feature every --hop-s seconds:

    x_t = sum_{direct classes c active at t} a * v_c                   weak per-frame evidence
        + sum_{context-only actions (c, start, end)} b * (bump(t - start) s_c + bump(t - end) e_c)
        + video offset u + slow nuisance n_t + white noise w_t

- direct classes (half of them) show a weak signal (a = --evidence, white noise 1 per dimension)
  at every frame they are active, so averaging over time helps;
- context-only classes show nothing while active: only a short cue at the start and another at the
  end of every instance. Their middle can only be inferred from context on both sides (bidirectional
  and as long-range as the action is long);
- the nuisance is a low-pass filtered random process (time constant --nuisance-tau-s) in a
  random 16-dimensional subspace, plus a constant per-video offset: both fool a per-frame classifier,
  and a temporal model can see them for what they are.

Each dataset goes through the pipeline's own code: `<video>.npy` features and the real annotation
file -> pipelines.manifest.build_manifest (feature_source npy) -> pipelines.import_npy (Parquet
shards) -> pipelines.training.train -> pipelines.evaluation.evaluate, with the model and recipe composed
from conf/ exactly as `dvc exp run -S model=... -S train=...` would. Every row trains with the same
recipe and budget (conf/train/<--recipe>, --epochs) unless the row names its own overrides. The table
reports test per-frame mAP, mAP over the context-only classes and over the others, the parameter
count and the training time. Results land in --out (JSON and the markdown table).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.process import setup_process  # noqa: E402

setup_process()  # the stages' process set-up for long CPU runs, before torch loads

from pipelines.annotations import IssueLog, clean_video, read_annotations  # noqa: E402
from pipelines.labels import build_labels  # noqa: E402

DATASETS = {"multithumos": 65, "charades": 157}
# The default pipeline's own data (rendered videos -> I3D features), run after `dvc repro`: the
# table of part 4 of the accuracy issue (does the default synthetic run tell models apart?).
PIPELINE_DATASETS = ("synthetic",)
# Seconds between features: Multi-THUMOS actions are short (median 1.9 s), Charades' long (~10 s).
HOP_S = {"multithumos": 0.5, "charades": 1.0}
DEFAULT_MODELS = ["ms_temba_small", "ms_tct_small", "mstcn", "mstcn_single", "mlp"]
SHARED_ANNOTATIONS = ROOT.parent / "shared" / "annotations"


# ----------------------------------------------------------------------------------------------
# Feature-level data on real timelines
# ----------------------------------------------------------------------------------------------

def context_only_classes(num_classes: int, seed: int) -> np.ndarray:
    """The half of the classes whose evidence lies only at the actions' boundaries."""
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.permutation(num_classes)[: num_classes // 2])


def select_videos(annotations: dict, max_train: int | None, max_test: int | None) -> list[str]:
    """Up to max_train training and max_test testing videos, chosen by a hash of the id (stable)."""
    by_subset: dict[str, list[str]] = {"training": [], "testing": []}
    for video_id in sorted(annotations, key=lambda v: hashlib.sha256(v.encode()).hexdigest()):
        subset = annotations[video_id].get("subset") if isinstance(annotations[video_id], dict) else None
        if subset in by_subset:
            by_subset[subset].append(video_id)
    return sorted(by_subset["training"][:max_train] + by_subset["testing"][:max_test])


def make_features(annotations: dict, video_ids: list[str], num_classes: int, out_dir: Path, *, hop_s: float,
                  dim: int, evidence: float, boundary: float, nuisance: float, nuisance_tau_s: float,
                  offset: float, seed: int) -> dict:
    """Write out_dir/features/<video>.npy and out_dir/annotations.json (the real entries of
    `video_ids`); returns a summary. Deterministic in (seed, the annotations)."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    unit = lambda n: (lambda m: m / np.linalg.norm(m, axis=1, keepdims=True))(rng.standard_normal((n, dim)))
    direction, start_cue, end_cue = unit(num_classes), unit(num_classes), unit(num_classes)
    nuisance_basis = rng.standard_normal((16, dim)) / np.sqrt(16)
    context = np.zeros(num_classes, dtype=bool)
    context[context_only_classes(num_classes, seed)] = True
    rho = float(np.exp(-hop_s / nuisance_tau_s))
    bump = np.array([0.5, 1.0, 0.5])  # a cue spans 3 features around the boundary

    features_dir = out_dir / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    kept, num_features, issues = {}, 0, IssueLog()
    for video_id in video_ids:
        clean = clean_video(video_id, annotations[video_id], num_classes, issues)
        if clean is None or not len(clean.classes):
            continue
        length = int(clean.duration // hop_s)
        if length < 8:
            continue
        video_rng = np.random.default_rng([seed, int(hashlib.sha256(video_id.encode()).hexdigest()[:8], 16)])
        centres = (np.arange(length) + 0.5) * hop_s
        labels = build_labels(centres, clean.classes, clean.starts, clean.ends, num_classes)
        x = evidence * (labels * ~context) @ direction
        for c, start, end in zip(clean.classes, clean.starts, clean.ends):
            if context[c]:
                for time_s, cue in ((start, start_cue[c]), (end, end_cue[c])):
                    t = int(round(time_s / hop_s))
                    for k, weight in zip(range(t - 1, t + 2), bump):
                        if 0 <= k < length:
                            x[k] += boundary * weight * cue
        slow = lfilter([np.sqrt(1 - rho ** 2)], [1, -rho], video_rng.standard_normal((length, 16)), axis=0)
        x += nuisance * slow @ nuisance_basis + offset * video_rng.standard_normal(dim)
        x += video_rng.standard_normal((length, dim))
        np.save(features_dir / f"{video_id}.npy", x.astype(np.float32))
        kept[video_id] = annotations[video_id]
        num_features += length
    (out_dir / "annotations.json").write_text(json.dumps(kept))
    subsets = [entry["subset"] for entry in kept.values()]
    return {"videos": len(kept), "training": subsets.count("training"), "testing": subsets.count("testing"),
            "features": num_features, "context_only_classes": np.flatnonzero(context).tolist()}


# ----------------------------------------------------------------------------------------------
# Through the pipeline
# ----------------------------------------------------------------------------------------------

def pipeline_params(dataset: str, data_dir: Path, hop_s: float | None, overrides: list[str], threads: int):
    """PipelineParams composed from conf/ with `overrides` (as `dvc exp run -S` does), pointed at
    the generated data (or, for a pipeline dataset, at the pipeline's own)."""
    from pipelines.config import compose_params, parse_params

    values = compose_params([f"dataset={dataset}", *overrides])
    if dataset not in PIPELINE_DATASETS:
        values["dataset"].update(name=f"bench_{dataset}", video_dir=str(data_dir / "features"),
                                 annotations=str(data_dir / "annotations.json"), feature_source="npy",
                                 npy_hop_s=hop_s, class_names=None)
    values["eval"].update(num_timelines=0)
    if "viewer_videos" in values["eval"]:
        values["eval"]["viewer_videos"] = 0
    values["train"]["num_threads"] = threads
    return parse_params(values)


def prepare(dataset: str, data_dir: Path, hop_s: float, threads: int) -> None:
    """Manifest and shards of the generated data, by the pipeline's own stages."""
    from pipelines.import_npy import import_npy
    from pipelines.io import write_parquet
    from pipelines.manifest import build_manifest

    params = pipeline_params(dataset, data_dir, hop_s, [], threads)
    manifest = build_manifest(params.dataset, show_progress=False)
    write_parquet(data_dir / "manifest.parquet", manifest.table)
    import_npy(data_dir / "features", data_dir / "shards", hop_s=hop_s, show_progress=False)


def run_row(dataset: str, data_dir: Path, hop_s: float | None, model: str, overrides: list[str], threads: int,
            context: np.ndarray, log, runs_dir: Path) -> dict:
    """Train and evaluate one row through the pipeline's stages; data_dir holds manifest.parquet and
    shards/, the run's files go to runs_dir/<hash of the row>."""
    from pipelines.evaluation import evaluate
    from pipelines.training import train

    params = pipeline_params(dataset, data_dir, hop_s, [f"model={model}", *overrides], threads)
    run_dir = runs_dir / hashlib.sha256(json.dumps([model, overrides]).encode()).hexdigest()[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train(params, data_dir / "manifest.parquet", data_dir / "shards", run_dir / "checkpoints", run_dir / "model.pt",
          run_dir / "train_log.csv", log=log)
    train_s = time.perf_counter() - started
    metrics = evaluate(params, run_dir / "model.pt", data_dir / "manifest.parquet", data_dir / "shards",
                       run_dir / "metrics.json", run_dir / "predictions.parquet", run_dir / "per_class.csv",
                       run_dir / "timelines", log=log)
    with open(run_dir / "per_class.csv") as stream:
        ap = np.array([float(row["ap"]) if row["ap"] not in ("", None) else np.nan for row in csv.DictReader(stream)])
    is_context = np.zeros(len(ap), dtype=bool)
    is_context[context] = True
    history = json.loads(json.dumps(_history(run_dir)))
    return {"dataset": dataset, "model": model, "overrides": overrides, "map": metrics["map"],
            "map_context": float(np.nanmean(ap[is_context])), "map_other": float(np.nanmean(ap[~is_context])),
            "chance_map": metrics["chance_map"], "parameters": metrics["num_parameters"],
            "train_s": round(train_s, 1), "selected_epoch": metrics["selected_epoch"], "run_dir": str(run_dir),
            "history": history}


def _history(run_dir: Path) -> list[dict]:
    """The per-epoch history of the run's checkpoint (loss terms and gradient norms included)."""
    import torch

    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return checkpoint["history"]


def plot_diagnostics(rows: list[dict], path: Path) -> None:
    """One row of panels per trained model: the loss terms per epoch, the mean gradient norm of
    every part of the model per epoch, and the validation mAP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 3, figsize=(15, 3.2 * len(rows)), squeeze=False, layout="constrained")
    for (loss_axis, grad_axis, map_axis), row in zip(axes, rows):
        epochs = [entry["epoch"] for entry in row["history"]]
        title = f"{row['dataset']} {row['model']} {' '.join(row['overrides'])}"
        for term in row["history"][0]["loss_terms"]:
            loss_axis.plot(epochs, [entry["loss_terms"][term] for entry in row["history"]], label=term)
        loss_axis.set_yscale("log")
        loss_axis.set_title(f"{title}: loss terms", fontsize=8)
        loss_axis.legend(fontsize=6)
        for part in row["history"][0]["grad_norms"]:
            grad_axis.plot(epochs, [entry["grad_norms"].get(part, np.nan) for entry in row["history"]], label=part)
        grad_axis.set_yscale("log")
        grad_axis.set_title("gradient norm per part (mean over steps)", fontsize=8)
        grad_axis.legend(fontsize=5, ncol=2)
        map_axis.plot(epochs, [entry["val_map"] for entry in row["history"]])
        map_axis.set_title("validation mAP (%)", fontsize=8)
        map_axis.set_xlabel("epoch")
    figure.savefig(path, dpi=70)
    plt.close(figure)


def table(rows: list[dict]) -> str:
    """One line per (dataset, model, recipe): the mean over its seeds, with the standard deviation
    across seeds where there are several."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        recipe = tuple(o for o in row["overrides"] if not o.startswith("train.seed="))
        groups.setdefault((row["dataset"], row["model"], recipe), []).append(row)

    def stat(values: list[float]) -> str:
        mean = float(np.mean(values))
        return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {float(np.std(values, ddof=1)):.1f}"

    lines = ["| dataset | model | recipe | seeds | test mAP | context-only | others | chance | parameters | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, model, recipe), group in groups.items():
        lines.append(f"| {dataset} | {model} | {' '.join(recipe) or '(default)'} | {len(group)} | "
                     f"{stat([r['map'] for r in group])} | {stat([r['map_context'] for r in group])} | "
                     f"{stat([r['map_other'] for r in group])} | {group[0]['chance_map']:.1f} | "
                     f"{group[0]['parameters']:,} | {np.mean([r['train_s'] for r in group]):.0f} s |")
    return "\n".join(lines)


def pipeline_data(dataset: str, log) -> tuple[Path, np.ndarray]:
    """The default pipeline's data directory (manifest.parquet, shards/) and its context classes."""
    from extractors.synthetic import CLASSES

    data_dir = ROOT / "data" / dataset
    if not (data_dir / "manifest.parquet").is_file() or not (data_dir / "shards").is_dir():
        raise SystemExit(f"{data_dir}/manifest.parquet and shards/ not found: run `dvc repro` first")
    num_classes = pipeline_params(dataset, data_dir, None, [], 1).dataset.num_classes
    context = np.array([i for i, c in enumerate(CLASSES[:num_classes]) if c.context_only])
    log.info("%s: the pipeline's data in %s; context classes %s", dataset, data_dir, context.tolist())
    return data_dir, context


def generated_data(dataset: str, args, log) -> tuple[Path, float, np.ndarray]:
    """Features generated on the dataset's real timelines, imported by the pipeline's stages."""
    path = args.annotations / f"{dataset}.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --annotations DIR with {dataset}.json")
    annotations = read_annotations(path)
    max_train, max_test = (args.charades_videos if dataset == "charades" else (args.max_train, args.max_test))
    max_train = args.max_train if args.max_train is not None else max_train
    max_test = args.max_test if args.max_test is not None else max_test
    data_dir = args.out / dataset
    hop_s = args.hop_s or HOP_S[dataset]
    summary = make_features(annotations, select_videos(annotations, max_train, max_test), DATASETS[dataset],
                            data_dir, hop_s=hop_s, dim=args.dim, evidence=args.evidence,
                            boundary=args.boundary, nuisance=args.nuisance, nuisance_tau_s=args.nuisance_tau_s,
                            offset=args.offset, seed=args.seed)
    log.info("%s: %s", dataset, {k: v for k, v in summary.items() if k != "context_only_classes"})
    prepare(dataset, data_dir, hop_s, args.threads)
    return data_dir, hop_s, np.array(summary["context_only_classes"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", type=Path, default=SHARED_ANNOTATIONS,
                        help="folder with multithumos.json / charades.json (default ../shared/annotations)")
    parser.add_argument("--datasets", nargs="+", default=["multithumos", "charades"],
                        choices=sorted(DATASETS) + sorted(PIPELINE_DATASETS),
                        help="synthetic: the default pipeline's own features (run `dvc repro` first)")
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--rows", nargs="*", default=["ms_temba_small:train=release"],
                        help="extra rows MODEL:OVERRIDE[,OVERRIDE...] (Hydra overrides, e.g. train=release)")
    parser.add_argument("--recipe", default=[], nargs="*", help="overrides for every row (default: conf's default recipe)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="train.epochs for every row, the budget all models share (0: each recipe's own)")
    parser.add_argument("--max-train", type=int, default=None, help="at most this many training videos per dataset")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--charades-videos", type=int, nargs=2, default=[400, 200], metavar=("TRAIN", "TEST"),
                        help="Charades subset (its 9848 short videos would dominate the time)")
    parser.add_argument("--hop-s", type=float, default=None, help="default: 0.5 s Multi-THUMOS, 1 s Charades")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--evidence", type=float, default=2.5)
    parser.add_argument("--boundary", type=float, default=3.0)
    parser.add_argument("--nuisance", type=float, default=1.5)
    parser.add_argument("--nuisance-tau-s", type=float, default=30.0)
    parser.add_argument("--offset", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="of the generated data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train.seed of each row: several seeds give the seed-to-seed spread")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy")
    args = parser.parse_args(argv)

    from pipelines.io import setup_logging
    log = setup_logging("bench_accuracy")
    common = list(args.recipe) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    rows_spec = [(model, list(common)) for model in args.models]
    for spec in args.rows:
        model, _, extra = spec.partition(":")
        # Commas separate overrides, except inside a list value: widths=[128,192,256].
        rows_spec.append((model, [o for o in re.split(r",(?![^\[]*\])", extra) if o] + common))

    results = []
    for dataset in args.datasets:
        if dataset in PIPELINE_DATASETS:
            data_dir, context = pipeline_data(dataset, log)
            hop_s = None
        else:
            data_dir, hop_s, context = generated_data(dataset, args, log)
        for model, overrides in rows_spec:
            for seed in args.seeds:
                row_overrides = overrides + ([f"train.seed={seed}"] if len(args.seeds) > 1 or seed else [])
                row = run_row(dataset, data_dir, hop_s, model, row_overrides, args.threads, context, log,
                              args.out / dataset / "runs")
                results.append(row)
                log.info("%s %s %s: mAP %.2f (context %.2f / others %.2f) in %.0f s", dataset, model,
                         row_overrides, row["map"], row["map_context"], row["map_other"], row["train_s"])
                (args.out / "results.json").write_text(json.dumps(
                    {"args": {k: str(v) for k, v in vars(args).items()}, "rows": results}, indent=1))
    markdown = table(results)
    (args.out / "table.md").write_text(markdown + "\n")
    plot_diagnostics(results, args.out / "diagnostics.png")
    print(markdown)


if __name__ == "__main__":
    main()
