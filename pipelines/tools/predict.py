"""`ms-temba predict`: detect actions in new videos with a trained model (models/model.pt).

    ms-temba predict VIDEO_OR_DIR... --checkpoint models/model.pt --out predictions/ [--plot] [--ray]

For every video: decode and extract features with the *same* extractor the model was trained on
(rebuilt from the feature metadata recorded in the checkpoint, and checked against it), run the
network over the whole video in one pass (MS-Temba is linear in the length, so no windowing), and
write

    {video}.probs.parquet    index, start_s, end_s, one float32 column per class (probabilities)
    {video}.segments.json    [{"class_id", "class_name", "start_s", "end_s", "score"}, ...]
    {video}.segments.csv     the same table as CSV
    {video}.timeline.png     with --plot: the top classes' probabilities over time, segments drawn

Segments come from `ms_temba.segments.probabilities_to_segments` (hysteresis thresholds, merge,
minimum duration; see docs/predict.md). A video that fails (unreadable, too short) is recorded in
`failures.jsonl` and the others go on; the exit code is non-zero only if every video failed. A
checkpoint that does not fit the features (other backbone, feature dim, extractor weights) is a
`PredictError` before any video is touched.

`--ray` extracts a whole folder in parallel on Ray (extractors.run.extract_videos into a temporary
shard directory in the output directory, `.ray-features.<random>.tmp`, which the next run removes
if a killed one left it) and then runs the model over the shards; `--features DIR` skips
extraction and predicts every video of an existing shard directory.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from extractors.config import BACKBONE_FIELDS, ExtractorConfig
from extractors.device import DEVICE_CHOICES, resolve_device
from extractors.files import atomic_path, file_sha256
from extractors.shards import (FeatureStore, VideoFeatures, failure_record, metadata_mismatch,
                               remove_stale_temporaries, write_failures)
from ms_temba.segments import Segment, probabilities_to_segments
from pipelines.bundle import ModelBundle, load_bundle
from pipelines.inference import video_probabilities
from pipelines.io import write_json, write_text
from pipelines.predictions import PROBS_SUFFIX, RUN_KEY, read_probabilities, write_probabilities  # noqa: F401

# Defaults of the segment rule (docs/predict.md explains the choice).
DEFAULT_THRESHOLD_ON = 0.5
DEFAULT_THRESHOLD_OFF = 0.35
DEFAULT_MIN_DURATION_S = 0.5
DEFAULT_MERGE_GAP_S = 0.5
DEFAULT_PLOT_TOP_K = 5

# Feature metadata that may differ between training and prediction without changing the features'
# meaning: the package version, the precision (fp16 on a GPU, fp32 on a CPU) and the weights
# file's name (its sha256 is what identifies the weights).
_NOT_FEATURE_DEFINING = {"package_version", "precision", "checkpoint", "source_fps"}
# How a backbone's shard metadata names hub weights ("checkpoint" starts with the prefix), and the
# ExtractorConfig field that downloads them again.
_HUB_WEIGHTS = {"clip": ("timm-hub:", "pretrained_from_hub"), "vim": ("hf-hub:", "weights_from_hub")}


class PredictError(ValueError):
    """A checkpoint or input that cannot be used for prediction; the message says why."""


# ----------------------------------------------------------------------------------------------
# The trained model and the extractor it needs
# ----------------------------------------------------------------------------------------------

@dataclass
class Predictor:
    """A trained model with its class names and the description of the features it expects."""

    model: torch.nn.Module
    class_names: list[str]
    feature_metadata: dict[str, Any]  # the training shards' extractor metadata (at least "dim")
    device: torch.device
    # The per-dimension standardisation the model was trained with (ModelBundle.feature_mean/std,
    # train.normalize_features), applied to the raw extractor features before the model; None = none.
    feature_mean: torch.Tensor | None = None
    feature_std: torch.Tensor | None = None
    checkpoint_sha256: str = ""  # identifies the model in the outputs (a rerun skips what it already did)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu") -> "Predictor":
        bundle = read_model_file(path)
        model = bundle.build_model(device)
        in_dim = model.config.in_dim
        trained_dim = bundle.features.get("dim")
        if trained_dim is not None and trained_dim != in_dim:
            raise PredictError(f"{path} is inconsistent: the model reads {in_dim}-d features but its feature "
                               f"metadata says the training features were {trained_dim}-d")
        if len(bundle.class_names) != model.config.num_classes:
            raise PredictError(f"{path} is inconsistent: {len(bundle.class_names)} class names for a model with "
                               f"{model.config.num_classes} classes")
        standardisation = (bundle.feature_mean, bundle.feature_std)
        if bundle.feature_mean is not None and any(s is None or tuple(s.shape) != (in_dim,) for s in standardisation):
            raise PredictError(f"{path} is inconsistent: its feature standardisation does not have {in_dim} "
                               f"dimensions like the model's input")
        return cls(model=model, class_names=list(bundle.class_names),
                   feature_metadata={"dim": in_dim, **bundle.features}, device=torch.device(device),
                   feature_mean=bundle.feature_mean, feature_std=bundle.feature_std,
                   checkpoint_sha256=file_sha256(path))

    @property
    def in_dim(self) -> int:
        return self.model.config.in_dim

    def check_features(self, metadata: Mapping[str, Any], source: str) -> None:
        """Raise PredictError if features described by `metadata` are not the ones the model was
        trained on: a different dim always; a different backbone, sampling or extractor weights
        when the checkpoint records them."""
        if metadata.get("dim") != self.in_dim:
            raise PredictError(f"{source} gives {metadata.get('dim')}-d features ({metadata.get('backbone')}), "
                               f"but the model was trained on {self.in_dim}-d features "
                               f"({self.feature_metadata.get('backbone', 'backbone not recorded')})")
        if "backbone" not in self.feature_metadata:  # e.g. a converted release checkpoint: dim is all we know
            return
        differing = [key for key in metadata_mismatch(self.feature_metadata, metadata)
                     if key not in _NOT_FEATURE_DEFINING and key in self.feature_metadata]
        rate = training_frame_rate(self.feature_metadata)
        if self.feature_metadata.get("fps") is None and rate is not None and metadata.get("fps") == rate:
            # trained at the videos' native rate, `rate`; new videos are resampled to it
            differing = [key for key in differing if key not in ("fps", "feature_hop_s")]
        if differing:
            details = ", ".join(f"{key}: trained {self.feature_metadata.get(key)!r}, now {metadata.get(key)!r}"
                                for key in differing)
            raise PredictError(f"{source} does not make the features the model was trained on ({details})")

    def probabilities(self, video: VideoFeatures) -> np.ndarray:
        """(T, classes) probabilities of one video, the whole video in one forward pass, standardised
        as in training (pipelines.inference.video_probabilities)."""
        if video.dim != self.in_dim:
            raise PredictError(f"features are {video.dim}-d but the model expects {self.in_dim}-d features")
        if len(video) == 0:
            raise PredictError("the video has no features (shorter than one snippet)")
        return video_probabilities(self.model, video.features, self.device, self.feature_mean, self.feature_std)


def read_model_file(path: str | os.PathLike) -> ModelBundle:
    """The ModelBundle in `path` (the train stage's models/model.pt), or PredictError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (the train stage writes models/model.pt; "
                                f"`ms-temba convert-release` converts an official release checkpoint)")
    try:
        return load_bundle(path)
    except Exception as error:  # torch.load / format check: anything here means "not our model file"
        raise PredictError(f"{path} is not an ms-temba model file ({type(error).__name__}: {error}); "
                           f"an official release best_model.pth must first go through "
                           f"`ms-temba convert-release`") from error


def training_frame_rate(feature_metadata: Mapping[str, Any]) -> float | None:
    """The frame rate the training features were sampled at: extractor.fps, or, for features at the
    videos' native rate (fps null), the training videos' common rate the extract stage recorded
    (`source_fps`); None when neither is known."""
    return feature_metadata.get("fps") or feature_metadata.get("source_fps")


def extractor_config_for(feature_metadata: Mapping[str, Any], weights: str | None = None,
                         device: str = "auto", base: ExtractorConfig | None = None,
                         fps: float | None = None) -> ExtractorConfig:
    """The ExtractorConfig that makes the features described by `feature_metadata` (the shard
    metadata recorded in the checkpoint). The metadata records the weights file only by name and
    hash, so a pretrained backbone needs its file passed as `weights` (the hash is checked after
    building). `base` supplies what the metadata does not record (e.g. a converted release)."""
    base = base or ExtractorConfig()
    values = dataclasses.asdict(base)
    values["device"] = device
    if "backbone" in feature_metadata:
        backbone = values["backbone"] = feature_metadata["backbone"]
        # The metadata records the sampling and the backbone's own fields under their config names
        # (I3D's mode, snippet_len, stride; CLIP's model_name, clip_window; Vim's variant, token, window).
        for key in ("fps", "image_size", *BACKBONE_FIELDS.get(backbone, ())):
            if feature_metadata.get(key) is not None or key == "fps":
                values[key] = feature_metadata.get(key)
        if feature_metadata.get("fps") is None:
            # Trained at the training videos' native rate: a new video at another rate would give
            # features at another time step than the model learned. Resample it to the training rate.
            rate = training_frame_rate(feature_metadata) or fps
            if rate is None:
                raise PredictError("the model was trained on features at its videos' native frame rate "
                                   "(extractor.fps: null), which the checkpoint does not record, so new videos "
                                   "cannot be brought to its time scale: pass --fps with the training videos' "
                                   "frame rate, or retrain with extractor.fps set")
            if fps is not None and fps != rate:
                raise PredictError(f"--fps {fps} differs from the training videos' frame rate {rate} that the "
                                   f"checkpoint records")
            values["fps"] = float(rate)
        checkpoint = str(feature_metadata.get("checkpoint", ""))
        hub_prefix, hub_field = _HUB_WEIGHTS.get(backbone, (None, None))
        # A local copy of the hub file (--extractor-weights) is used instead; its sha256 is checked.
        from_hub = hub_prefix is not None and checkpoint.startswith(hub_prefix) and weights is None
        if hub_field is not None:
            values[hub_field] = from_hub
        if feature_metadata.get("pretrained") and weights is None and not from_hub:
            raise PredictError(f"the model was trained on features of pretrained {values['backbone']} weights "
                               f"({checkpoint!r}); pass that file with --extractor-weights")
    if weights is not None:
        values["weights"] = str(weights)
    try:
        return ExtractorConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise PredictError(f"cannot rebuild the extractor from the checkpoint's feature metadata: {error}") from error


def build_checked_extractor(predictor: Predictor, cfg: ExtractorConfig):
    """Build the extractor exactly as the extract stage does (same seeding of a randomly initialised
    backbone) and check that it makes the features the model was trained on."""
    from extractors.run import ExtractionWorker

    extractor = ExtractionWorker(cfg).extractor
    predictor.check_features(extractor.metadata(), f"the {cfg.backbone} extractor")
    return extractor


# ----------------------------------------------------------------------------------------------
# Outputs of one video
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentRule:
    """The parameters of ms_temba.segments.probabilities_to_segments."""

    threshold_on: float = DEFAULT_THRESHOLD_ON
    threshold_off: float = DEFAULT_THRESHOLD_OFF
    min_duration_s: float = DEFAULT_MIN_DURATION_S
    merge_gap_s: float = DEFAULT_MERGE_GAP_S

    def apply(self, probs: np.ndarray, video: VideoFeatures) -> list[Segment]:
        return probabilities_to_segments(probs, video.start_s, video.end_s, **dataclasses.asdict(self))


def segment_records(segments: list[Segment], class_names: list[str]) -> list[dict[str, Any]]:
    return [{"class_id": s.class_id, "class_name": class_names[s.class_id], "start_s": round(s.start_s, 4),
             "end_s": round(s.end_s, 4), "score": round(s.score, 6)} for s in segments]


def write_segments(out_dir: Path, video_id: str, records: list[dict[str, Any]]) -> None:
    write_json(out_dir / f"{video_id}.segments.json", records)
    fields = ["class_id", "class_name", "start_s", "end_s", "score"]
    lines = [",".join(fields)]
    for record in records:
        lines.append(_csv_row([record[f] for f in fields]))
    write_text(out_dir / f"{video_id}.segments.csv", "\n".join(lines) + "\n")


def _csv_row(values: list[Any]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def plot_timeline(path: Path, video_id: str, video: VideoFeatures, probs: np.ndarray, segments: list[Segment],
                  class_names: list[str], rule: SegmentRule, top_k: int = DEFAULT_PLOT_TOP_K) -> None:
    """A PNG: the probability curves of the top-k classes (by peak probability) over time, one row
    each, with the detected segments shaded and the on/off thresholds drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    peaks = probs.max(axis=0) if len(probs) else np.zeros(probs.shape[1])
    shown = [int(c) for c in np.argsort(-peaks, kind="stable")[:top_k]]
    centres = (video.start_s + video.end_s) / 2
    figure, axes = plt.subplots(len(shown), 1, figsize=(10, 1.1 * len(shown) + 0.8), sharex=True, squeeze=False)
    for axis, class_id in zip(axes[:, 0], shown):
        axis.plot(centres, probs[:, class_id], color="tab:blue", linewidth=1.0)
        for segment in segments:
            if segment.class_id == class_id:
                axis.axvspan(segment.start_s, segment.end_s, color="tab:orange", alpha=0.35, linewidth=0)
        axis.axhline(rule.threshold_on, color="grey", linestyle="--", linewidth=0.6)
        axis.axhline(rule.threshold_off, color="grey", linestyle=":", linewidth=0.6)
        axis.set_ylim(0, 1)
        axis.set_ylabel(class_names[class_id], rotation=0, ha="right", va="center", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    figure.suptitle(f"{video_id}: top {len(shown)} classes (shaded: detected segments)", fontsize=9)
    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(figure)


# ----------------------------------------------------------------------------------------------
# Many videos
# ----------------------------------------------------------------------------------------------

@dataclass
class PredictSummary:
    ok: list[str] = field(default_factory=list)  # predicted now or by an earlier run (`skipped`)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done by an earlier run with the same settings

    def __str__(self) -> str:
        done = f" ({len(self.skipped)} already done)" if self.skipped else ""
        return f"{len(self.ok)} video(s) predicted{done}, {len(self.failures)} failed"


# The probs file is each video's commit record: written last, and its schema metadata (RUN_KEY,
# pipelines.predictions) holds what produced the video's outputs (checkpoint, segment rule, plot,
# input, extractor). A rerun skips a video whose record matches and redoes it otherwise.
# The temporary shard folder of `--ray`, in the output directory.
RAY_FEATURES_PREFIX = ".ray-features."


def _input_record(path: str | os.PathLike) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": os.fspath(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_record(predictor: Predictor, rule: SegmentRule, plot: bool, source: dict[str, Any],
               cfg: ExtractorConfig | None = None) -> dict[str, Any]:
    """What one video's outputs depend on (stored in its probs file)."""
    extractor = None
    if cfg is not None:  # how the work is spread does not change the features
        extractor = {k: v for k, v in dataclasses.asdict(cfg).items()
                     if k not in ("device", "batch_size", "chunk_frames", "num_actors", "videos_per_shard")}
    return {"checkpoint_sha256": predictor.checkpoint_sha256, "rule": dataclasses.asdict(rule), "plot": plot,
            "input": source, "extractor": extractor}


def already_done(out_dir: Path, video_id: str, record: dict[str, Any]) -> bool:
    """True if out_dir holds this video's complete outputs made with `record`."""
    import pyarrow.parquet as pq

    path = out_dir / f"{video_id}{PROBS_SUFFIX}"
    if not path.is_file():
        return False
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata.get(RUN_KEY.encode(), b"null")) == json.loads(json.dumps(record))
    except Exception:  # unreadable: redo it
        return False


def predict_one(predictor: Predictor, video_id: str, video: VideoFeatures, out_dir: Path, rule: SegmentRule,
                plot: bool, record: dict[str, Any] | None = None) -> list[Segment]:
    """Probabilities, segments (and the timeline with `plot`) of one video's features, written to out_dir.

    The outputs appear as one unit: the old probs file (the unit's commit record) goes first, each
    file is written atomically, and the probs file, holding `record`, comes last."""
    probs = predictor.probabilities(video)
    segments = rule.apply(probs, video)
    probs_path = out_dir / f"{video_id}{PROBS_SUFFIX}"
    probs_path.unlink(missing_ok=True)
    write_segments(out_dir, video_id, segment_records(segments, predictor.class_names))
    if plot:
        plot_timeline(out_dir / f"{video_id}.timeline.png", video_id, video, probs, segments,
                      predictor.class_names, rule)
    write_probabilities(probs_path, video, probs, predictor.class_names, record)
    return segments


def predict_videos(videos: Mapping[str, str], predictor: Predictor, cfg: ExtractorConfig, out_dir: str | os.PathLike,
                   rule: SegmentRule = SegmentRule(), plot: bool = False, use_ray: bool = False,
                   ray_address: str | None = None, log=print) -> PredictSummary:
    """Predict every video of {video_id: path}; a failing video is recorded and skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # of a run killed inside a write
    for stale in out_dir.glob(f"{RAY_FEATURES_PREFIX}*.tmp"):  # the features of a killed --ray run
        shutil.rmtree(stale, ignore_errors=True)
    summary = PredictSummary()
    write_failures(out_dir, [])  # every video not done is attempted again: an old record would mislead
    records = {}
    for video_id, path in videos.items():
        try:
            records[video_id] = run_record(predictor, rule, plot, _input_record(path), cfg)
        except OSError:  # unreadable: it fails (and is recorded) when extracted
            records[video_id] = None
    todo = {video_id: path for video_id, path in videos.items()
            if records[video_id] is None or not already_done(out_dir, video_id, records[video_id])}
    summary.skipped = [video_id for video_id in videos if video_id not in todo]
    summary.ok += summary.skipped
    if summary.skipped:
        log(f"{len(summary.skipped)} video(s) already done with this checkpoint and these settings: skipped")
    if use_ray and todo:
        from extractors.run import extract_videos

        # Beside the outputs, not in $TMPDIR, where a killed run's features would stay for good.
        with tempfile.TemporaryDirectory(prefix=RAY_FEATURES_PREFIX, suffix=".tmp", dir=out_dir) as shards_dir:
            extraction = extract_videos(dict(todo), cfg, shards_dir, ray_address=ray_address)
            log(f"extracted on Ray: {extraction}")
            store = FeatureStore(shards_dir)
            summary.failures += [failure_record(f.get("video_id", "?"), f.get("path", "?"), f.get("error_type", "Error"),
                                                f.get("message", "")) for f in store.failures]
            write_failures(out_dir, summary.failures)
            if len(store):
                predictor.check_features(store.metadata, "the Ray extraction")
            _predict_features(((video_id, lambda v=video_id: store.get(v)) for video_id in store.video_ids),
                              predictor, out_dir, rule, plot, summary, videos, log, records)
    elif todo:
        extractor = build_checked_extractor(predictor, cfg)
        _predict_features(((video_id, lambda p=path: extractor.extract(p)) for video_id, path in todo.items()),
                          predictor, out_dir, rule, plot, summary, videos, log, records)
    write_failures(out_dir, summary.failures)
    return summary


def predict_store(store: FeatureStore, predictor: Predictor, out_dir: str | os.PathLike,
                  rule: SegmentRule = SegmentRule(), plot: bool = False, log=print) -> PredictSummary:
    """Predict every video of an existing shard directory (no decoding)."""
    if len(store) == 0:
        raise PredictError(f"{store.shards_dir} holds no feature shards")
    predictor.check_features(store.metadata, f"the feature shards in {store.shards_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # of a run killed inside a write
    summary = PredictSummary()
    write_failures(out_dir, [])
    records = {video_id: run_record(predictor, rule, plot, {"shards": os.fspath(store.shards_dir.resolve()),
                                                            **_input_record(store.shard_of(video_id))})
               for video_id in store.video_ids}
    todo = [video_id for video_id in store.video_ids if not already_done(out_dir, video_id, records[video_id])]
    summary.skipped = [video_id for video_id in store.video_ids if video_id not in set(todo)]
    summary.ok += summary.skipped
    _predict_features(((video_id, lambda v=video_id: store.get(v)) for video_id in todo),
                      predictor, out_dir, rule, plot, summary, {}, log, records)
    write_failures(out_dir, summary.failures)
    return summary


def _predict_features(items: Iterable, predictor, out_dir, rule, plot, summary, paths, log, records=None) -> None:
    records = records or {}
    for video_id, load in items:
        try:
            video = load()
            segments = predict_one(predictor, video_id, video, out_dir, rule, plot, records.get(video_id))
        except PredictError:
            raise  # the checkpoint does not fit: every other video would fail the same way
        except Exception as error:  # one bad video (unreadable, too short...) must not stop the rest
            summary.failures.append(failure_record(video_id, paths.get(video_id, ""), error))
            write_failures(out_dir, summary.failures)  # on record as it happens, should the run be killed
            log(f"FAILED {video_id}: {type(error).__name__}: {error}")
            continue
        summary.ok.append(video_id)
        log(f"{video_id}: {len(video)} feature frames, {len(segments)} segments")


def collect_videos(inputs: list[str]) -> dict[str, str]:
    """{video_id: path} of the given files and of the video files in the given directories."""
    from extractors.run import find_videos

    videos: dict[str, str] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = find_videos(path)
            if not found:
                raise PredictError(f"{path} contains no video files")
        elif path.exists():
            found = {path.stem: str(path)}
        else:
            raise FileNotFoundError(f"{path}: no such video file or directory")
        for video_id, video_path in found.items():
            if video_id in videos and videos[video_id] != video_path:
                raise PredictError(f"two inputs are named {video_id!r}: {videos[video_id]} and {video_path}; "
                                   f"outputs are named after the video, so rename one")
            videos[video_id] = video_path
    return videos


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="ms-temba predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="VIDEO_OR_DIR", help="video files and/or folders of videos")
    parser.add_argument("--checkpoint", default="models/model.pt", help="the trained model (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--features", metavar="SHARDS_DIR",
                        help="predict the videos of an existing feature shard directory instead of decoding videos")
    parser.add_argument("--plot", action="store_true", help="also write a timeline PNG per video")
    parser.add_argument("--html", action="store_true",
                        help="also write an interactive HTML viewer per video and index.html (pipelines/viewer.py)")
    parser.add_argument("--ray", action="store_true", help="extract the videos in parallel on Ray")
    parser.add_argument("--ray-address", help="Ray cluster to join with --ray (default: a local one)")
    parser.add_argument("--extractor-weights", help="the backbone weights file the training features were made with "
                                                    "(required when they came from a pretrained backbone)")
    parser.add_argument("--extractor-config", help="YAML of ExtractorConfig fields, for checkpoints that do not "
                                                   "record their extractor (converted release checkpoints)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate of the training videos, for a checkpoint trained at the videos' native "
                             "rate that does not record it (new videos are resampled to it)")
    parser.add_argument("--threshold-on", type=float, default=DEFAULT_THRESHOLD_ON)
    parser.add_argument("--threshold-off", type=float, default=DEFAULT_THRESHOLD_OFF)
    parser.add_argument("--min-duration", type=float, default=DEFAULT_MIN_DURATION_S, help="seconds")
    parser.add_argument("--merge-gap", type=float, default=DEFAULT_MERGE_GAP_S, help="seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 if at least one video was predicted, 1 if all failed, 2 for a usage/checkpoint error."""
    args = build_parser().parse_args(argv)
    videos: dict[str, str] = {}  # video id -> file, for the viewer's <video> element
    try:
        if bool(args.inputs) == bool(args.features):
            raise PredictError("give either videos/folders or --features SHARDS_DIR (exactly one of them)")
        rule = SegmentRule(args.threshold_on, args.threshold_off, args.min_duration, args.merge_gap)
        probabilities_to_segments(np.zeros((0, 1)), np.zeros(0), np.zeros(0), **dataclasses.asdict(rule))  # validate
        device = str(resolve_device(args.device, "--device"))  # a clear error on a machine without CUDA
        predictor = Predictor.from_checkpoint(args.checkpoint, device)
        if args.features:
            summary = predict_store(FeatureStore(args.features), predictor, args.out, rule, args.plot)
        else:
            videos = collect_videos(args.inputs)
            base = None
            if args.extractor_config:
                from extractors.run import load_config

                base = load_config(args.extractor_config, [])
            elif "backbone" not in predictor.feature_metadata:
                raise PredictError(f"{args.checkpoint} does not record which extractor made its features; "
                                   f"pass --extractor-config")
            cfg = extractor_config_for(predictor.feature_metadata, args.extractor_weights, args.device, base,
                                       fps=args.fps)
            if args.fps is not None and training_frame_rate(predictor.feature_metadata) is None:
                predictor.feature_metadata["source_fps"] = args.fps  # the user's word for the training rate
            summary = predict_videos(videos, predictor, cfg, args.out, rule, args.plot, args.ray, args.ray_address)
    except (PredictError, FileNotFoundError, ValueError) as error:
        print(f"ms-temba predict: error: {error}", file=sys.stderr)
        return 2
    print(f"ms-temba predict: {summary} -> {args.out}")
    if args.html and summary.ok:
        from pipelines.viewer import write_predict_viewer

        print(f"  viewer: {write_predict_viewer(args.out, summary.ok, videos)}")
    for failure in summary.failures:
        print(f"  failed: {failure['video_id']} ({failure['error_type']}: {failure['message']})", file=sys.stderr)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
