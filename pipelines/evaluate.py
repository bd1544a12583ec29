"""Stage `evaluate`: the selected model on every test video at full length; metrics, predictions, plots.

    python -m pipelines.evaluate --model models/model.pt --manifest data/<dataset>/manifest.parquet \
        --shards data/<dataset>/shards --metrics metrics.json --predictions reports/predictions.parquet \
        --per-class reports/per_class_ap.csv --timelines reports/timelines

Each test video goes through the network whole (no truncation, no sliding window), as in the
paper's evaluation. Outputs:

    metrics.json                 map, map_sampled25, chance_map (percent; `dvc metrics show/diff`),
                                 per-block mAP, action-conditional metrics, counts, parameter count,
                                 inference throughput (features/s)
    reports/predictions.parquet  video_id, index, probabilities (one row per feature)
    reports/per_class_ap.csv     class, ap (percent) for the bar plot of dvc.yaml
    reports/timelines/*.png      ground truth vs predicted probabilities of a few test videos
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipelines.bundle import load_bundle
from pipelines.config import load_params
from pipelines.data import Sequence, load_sequences
from pipelines.io import atomic_path, setup_logging, write_json, write_parquet, write_text
from pipelines.manifest import read_manifest, usable_videos
from pipelines.train import pick_device

PREDICTIONS_SCHEMA = pa.schema([("video_id", pa.string()), ("index", pa.int32()),
                                ("probabilities", pa.list_(pa.float32()))])


def percent(value: float) -> float | None:
    """A fraction as a percentage rounded for reports; None (JSON null) for NaN."""
    return None if value is None or math.isnan(value) else round(100.0 * float(value), 4)


def json_ready(value):
    """Nested metric dicts with numpy scalars/arrays and NaN -> plain JSON values."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(item) for item in value]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    return value


def draw_timeline(path: Path, sequence: Sequence, probabilities: np.ndarray, class_names: list[str],
                  seconds_per_feature: float) -> None:
    """Two aligned heat maps (classes x time): ground truth above, predicted probabilities below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    active = np.flatnonzero(sequence.labels.any(axis=0) | (probabilities.max(axis=0) >= 0.5))
    active = active if len(active) else np.arange(len(class_names))
    extent = (0, len(sequence.labels) * seconds_per_feature, len(active) - 0.5, -0.5)
    figure, axes = plt.subplots(2, 1, figsize=(12, 1.5 + 0.5 * len(active)), sharex=True, layout="constrained")
    for axis, values, title in ((axes[0], sequence.labels, "ground truth"), (axes[1], probabilities, "predicted")):
        image = axis.imshow(values[:, active].T, aspect="auto", interpolation="nearest", cmap="viridis",
                            vmin=0, vmax=1, extent=extent)
        axis.set_yticks(range(len(active)), [class_names[c] for c in active], fontsize=7)
        axis.set_title(f"{sequence.video_id}: {title}", fontsize=9)
    axes[1].set_xlabel("time (s)")
    figure.colorbar(image, ax=axes, fraction=0.02)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=80, format="png")
    finally:
        plt.close(figure)


def evaluate(params, model_path, manifest_path, shards_dir, metrics_path, predictions_path, per_class_path,
             timelines_dir, log=None) -> dict:
    from extractors.shards import FeatureStore
    from ms_temba.metrics import ActionConditionalMetrics, FrameMAP, SampledFrameMAP, chance_map

    log = log or setup_logging("evaluate")
    torch.set_num_threads(params.train.num_threads)
    device = pick_device(params.train.device)
    bundle = load_bundle(model_path)
    model = bundle.build_model(device)
    num_classes = model.config.num_classes
    store = FeatureStore(shards_dir)
    rows = usable_videos(read_manifest(manifest_path), subset=params.dataset.test_subset)
    sequences = [Sequence(s.video_id, bundle.normalize(s.features), s.labels)
                 for s in load_sequences(rows, store, num_classes)]
    if not sequences:
        raise ValueError(f"no test videos (subset {params.dataset.test_subset!r}) with features in {shards_dir}")
    log.info("evaluating epoch %d of %s on %d test videos", bundle.selected_epoch, model_path, len(sequences))

    frame_map, sampled_map = FrameMAP(num_classes), SampledFrameMAP(num_classes, params.eval.sampled_frames)
    conditional = ActionConditionalMetrics(num_classes, params.eval.action_offsets, params.eval.threshold)
    block_maps = []  # one per auxiliary head of the model (MS-Temba's blocks), made on the first video
    predictions, probabilities_of, inference_s = [], {}, 0.0
    with torch.no_grad():
        model(torch.from_numpy(sequences[0].features[:8])[None].to(device))  # warm-up, not timed
        for sequence in tqdm(sequences, desc="evaluate", unit="video"):
            started = time.perf_counter()
            output = model(torch.from_numpy(sequence.features)[None].to(device))
            probabilities = torch.sigmoid(output.logits[0]).float().cpu().numpy()
            inference_s += time.perf_counter() - started
            for metric in (frame_map, sampled_map, conditional):
                metric.update(probabilities, sequence.labels)
            block_outputs = getattr(output, "block_logits", ())
            block_maps = block_maps or [FrameMAP(num_classes) for _ in block_outputs]
            for metric, block_logits in zip(block_maps, block_outputs):
                metric.update(torch.sigmoid(block_logits[0]).float().cpu().numpy(), sequence.labels)
            probabilities_of[sequence.video_id] = probabilities
            predictions.append(pa.table({
                "video_id": [sequence.video_id] * len(probabilities),
                "index": np.arange(len(probabilities), dtype=np.int32),
                "probabilities": list(probabilities.astype(np.float32))}, schema=PREDICTIONS_SCHEMA))

    overall = frame_map.compute()
    all_labels = np.concatenate([s.labels for s in sequences])
    num_features = len(all_labels)
    metrics = {
        "map": percent(overall["map"]),
        "map_sampled25": percent(sampled_map.compute()["map"]),
        "chance_map": percent(chance_map(all_labels)),
        "map_per_block": {f"block{k + 1}": percent(m.compute()["map"]) for k, m in enumerate(block_maps)},
        "action_conditional": {
            offset: {key: (percent(value) if key != "num_pairs" else int(value)) for key, value in result.items()}
            for offset, result in conditional.compute().items()},
        "num_videos": len(sequences),
        "num_features": num_features,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "features_per_second": round(num_features / inference_s, 1),
        "selected_epoch": bundle.selected_epoch,
        "val_map": None if math.isnan(bundle.val_map) else round(bundle.val_map, 4),  # already percent
    }
    metrics = json_ready(metrics)
    write_json(metrics_path, metrics)
    write_parquet(predictions_path, pa.concat_tables(predictions))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", "ap"])
    for name, ap in zip(bundle.class_names, overall["ap"]):
        writer.writerow([name, "" if math.isnan(ap) else round(100.0 * float(ap), 4)])
    write_text(per_class_path, buffer.getvalue())

    # The timelines directory is replaced as a whole, so no stale image of an earlier run survives.
    timelines_dir = Path(timelines_dir)
    staging = timelines_dir.with_name(f".{timelines_dir.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir(parents=True)
    for sequence in sequences[:params.eval.num_timelines]:
        video = store.get(sequence.video_id)
        hop = float(np.median(np.diff(video.start_s))) if len(video) > 1 else 1.0
        draw_timeline(staging / f"{sequence.video_id}.png", sequence, probabilities_of[sequence.video_id],
                      bundle.class_names, hop)
    if timelines_dir.exists():
        shutil.rmtree(timelines_dir)
    staging.rename(timelines_dir)

    log.info("test mAP %.2f%% (sampled-%d %.2f%%), chance %.2f%%, on %d videos / %d features",
             metrics["map"], params.eval.sampled_frames, metrics["map_sampled25"], metrics["chance_map"],
             len(sequences), num_features)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--per-class", required=True)
    parser.add_argument("--timelines", required=True)
    args = parser.parse_args(argv)
    evaluate(load_params(args.params), args.model, args.manifest, args.shards, args.metrics, args.predictions,
             args.per_class, args.timelines)


if __name__ == "__main__":
    main()
