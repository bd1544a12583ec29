"""Evaluation (the evaluate stage, pipelines.stages.evaluate): the selected model on every test
video at full length; metrics, predictions, plots.

    evaluate(params, model_path, manifest_path, shards_dir, metrics_path, predictions_path,
             per_class_path, timelines_dir, detection_ap_path=..., detections_dir=..., viewer_dir=...)

Each test video goes through the network whole (no truncation, no sliding window), as in the
paper's evaluation. Outputs:

    metrics.json                 map, map_sampled25, chance_map (percent; `dvc metrics show/diff`),
                                 per-block mAP, action-conditional metrics, counts, parameter count,
                                 inference throughput (features/s)
    reports/predictions.parquet  video_id, index, probabilities (one row per feature)
    reports/per_class_ap.csv     class, ap, detection_ap (percent) for the bar plot of dvc.yaml
    reports/timelines/*.png      ground truth vs predicted probabilities of a few test videos
    reports/detection_ap.csv     tiou, map: segment-level detection mAP (percent) per tIoU threshold
    reports/detections/          results.json / results.csv (ActivityNet results) and ground_truth.json
    reports/viewer/              the interactive HTML viewer: index.html and one page per test video

Detection mAP (`detection_map`, `detection_map_at` in metrics.json; `detection_metrics`) is computed
from the per-video probabilities only, so it is the same for every model: segments by the eval
settings (pipelines.detections), ground truth = the manifest's clean action instances.
"""
from __future__ import annotations

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

from extractors.device import resolve_device
from extractors.files import atomic_path
from pipelines.bundle import load_bundle
from pipelines.data import Sequence, load_sequences
from pipelines.inference import video_probabilities
from pipelines.io import setup_logging, write_json, write_parquet, write_text
from pipelines.manifest import read_manifest, usable_videos

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


def ground_truth_actions(row: dict) -> list[tuple[int, float, float]]:
    """The ground-truth action instances of a manifest row: (class, start_s, end_s) of its clean
    actions, as annotated (not the per-feature label runs, which are quantised to the feature grid
    and fuse overlapping or touching instances of a class)."""
    return [(int(c), float(s), float(e)) for c, s, e in zip(row["action_class"], row["action_start_s"],
                                                             row["action_end_s"])]


def detection_metrics(eval_params, videos, num_classes: int) -> dict:
    """Segment-level detection mAP of the test videos, from per-frame probabilities alone (any model).

    videos: (video_id, probabilities (T, classes), start_s (T,), end_s (T,), ground truth
    [(class, start_s, end_s), ...]) per video. Segments come from the probabilities by the eval
    settings (`eval.segment_rule` ...; pipelines.detections.segments_of_eval_params).

    Returns {"result": DetectionMAP.compute() of all videos, "segments": {video_id: [Segment]},
    "ground_truth": {video_id: [...]}, "per_video": {video_id: detection mAP of that video alone
    (NaN if it has no instance)}}.
    """
    from ms_temba.metrics import DetectionMAP
    from pipelines.detections import segments_of_eval_params

    overall = DetectionMAP(num_classes, eval_params.detection_tiou)
    segments_of, ground_truth_of, per_video = {}, {}, {}
    for video_id, probabilities, start_s, end_s, ground_truth in videos:
        segments = segments_of_eval_params(eval_params, probabilities, start_s, end_s)
        overall.update(segments, ground_truth, video_id=video_id)
        alone = DetectionMAP(num_classes, eval_params.detection_tiou)
        alone.update(segments, ground_truth, video_id=video_id)
        per_video[video_id] = alone.compute()["map"]
        segments_of[video_id], ground_truth_of[video_id] = segments, list(ground_truth)
    return {"result": overall.compute(), "segments": segments_of, "ground_truth": ground_truth_of,
            "per_video": per_video}


def write_detection_reports(detection: dict, class_names: list[str], subset: str, detection_ap_path=None,
                            detections_dir=None) -> None:
    """reports/detection_ap.csv (tiou, map: the AP-vs-tIoU plot) and reports/detections/
    (results.json + results.csv in the ActivityNet results format, ground_truth.json in its
    database format: `ms-temba score --pred ... --gt ...` reproduces metrics.json's detection_map)."""
    from pipelines.detections import ground_truth_document, write_results

    result = detection["result"]
    if detection_ap_path is not None:
        lines = ["tiou,map"] + [f"{t:g},{'' if math.isnan(v) else round(100.0 * v, 4)}"
                                for t, v in result["map_at"].items()]
        write_text(detection_ap_path, "\n".join(lines) + "\n")
    if detections_dir is not None:
        write_results(detections_dir, detection["segments"], class_names)
        write_json(Path(detections_dir) / "ground_truth.json",
                    ground_truth_document(detection["ground_truth"], class_names, subset))


def evaluate(params, model_path, manifest_path, shards_dir, metrics_path, predictions_path, per_class_path,
             timelines_dir, log=None, detection_ap_path=None,
             detections_dir=None, viewer_dir=None) -> dict:
    from extractors.shards import FeatureStore
    from ms_temba.metrics import ActionConditionalMetrics, FrameMAP, SampledFrameMAP, chance_map

    log = log or setup_logging("evaluate")
    torch.set_num_threads(params.train.num_threads)
    device = resolve_device(params.train.device, "train.device")
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
        video_probabilities(model, sequences[0].features[:8], device)  # warm-up, not timed
        for sequence in tqdm(sequences, desc="evaluate", unit="video"):
            started = time.perf_counter()
            probabilities, block_probabilities = video_probabilities(model, sequence.features, device, blocks=True)
            inference_s += time.perf_counter() - started
            for metric in (frame_map, sampled_map, conditional):
                metric.update(probabilities, sequence.labels)
            block_maps = block_maps or [FrameMAP(num_classes) for _ in block_probabilities]
            for metric, block in zip(block_maps, block_probabilities):
                metric.update(block, sequence.labels)
            probabilities_of[sequence.video_id] = probabilities
            predictions.append(pa.table({
                "video_id": [sequence.video_id] * len(probabilities),
                "index": np.arange(len(probabilities), dtype=np.int32),
                "probabilities": list(probabilities.astype(np.float32))}, schema=PREDICTIONS_SCHEMA))

    overall = frame_map.compute()
    row_of = {row["video_id"]: row for row in rows}
    times_of = {}  # feature times of each test video: segments are in seconds
    for s in sequences:
        video = store.get(s.video_id)
        times_of[s.video_id] = (video.start_s, video.end_s)
    detection = detection_metrics(params.eval, [
        (s.video_id, probabilities_of[s.video_id], *times_of[s.video_id], ground_truth_actions(row_of[s.video_id]))
        for s in sequences], num_classes)
    all_labels = np.concatenate([s.labels for s in sequences])
    num_features = len(all_labels)
    metrics = {
        "map": percent(overall["map"]),
        "map_sampled25": percent(sampled_map.compute()["map"]),
        "chance_map": percent(chance_map(all_labels)),
        "detection_map": percent(detection["result"]["map"]),  # segments, mean over eval.detection_tiou
        "detection_map_at": {f"{t:g}": percent(v) for t, v in detection["result"]["map_at"].items()},
        "detection_segments": {"predicted": detection["result"]["num_detections"],
                               "ground_truth": detection["result"]["num_instances"]},
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
    writer.writerow(["class", "ap", "detection_ap"])  # per-frame AP, detection AP (mean over the tIoUs)
    for name, ap, detection_ap in zip(bundle.class_names, overall["ap"], detection["result"]["class_ap"]):
        writer.writerow([name] + ["" if math.isnan(v) else round(100.0 * float(v), 4) for v in (ap, detection_ap)])
    write_text(per_class_path, buffer.getvalue())
    write_detection_reports(detection, bundle.class_names, params.dataset.test_subset, detection_ap_path,
                            detections_dir)
    if viewer_dir is not None:
        from pipelines.viewer import write_evaluate_viewer

        shown = sequences if params.eval.viewer_videos is None else sequences[:params.eval.viewer_videos]
        write_evaluate_viewer(viewer_dir, [
            {"video_id": s.video_id, "probabilities": probabilities_of[s.video_id], "start_s": times_of[s.video_id][0],
             "end_s": times_of[s.video_id][1], "segments": detection["segments"][s.video_id],
             "ground_truth": detection["ground_truth"][s.video_id], "labels": s.labels,
             "detection_map": detection["per_video"][s.video_id]} for s in shown], bundle.class_names)

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
    log.info("detection mAP %s%% (tIoU %s; %s)", metrics["detection_map"], ", ".join(metrics["detection_map_at"]),
             ", ".join(f"{t}: {v}" for t, v in metrics["detection_map_at"].items()))
    return metrics
