"""The pipeline's parameters: `conf/` (Hydra) is composed into `params.yaml`, read here, validated.

Every stage reads its parameters through `load_params`, so there is one place that knows the
schema. Composition (`compose_params`) uses Hydra's compose API exactly as `dvc exp run -S ...`
does (DVC calls `hydra.compose` and dumps `OmegaConf.to_yaml`), so a params.yaml written by
`ms-temba compose` is byte-identical to the one DVC would write.

Validation is strict: an unknown key (usually a typo), a value of the wrong type or an impossible
value raises `ConfigError` naming the key, e.g. `train.lr: must be > 0, got -0.001`.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from extractors import config as extractor_config
from extractors.config import ExtractorConfig
from extractors.device import DEVICE_CHOICES
from ms_temba.errors import ConfigFieldError

# The Hydra tree ships with the repository (it is not package data): conf/ next to pipelines/.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
DEFAULT_PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A bad parameter; `.key` is its dotted path in params.yaml (e.g. "train.lr"), `.source` the
    file it came from when known (the message then starts with it)."""

    user_error = True  # one line and exit 2 from the command line (pipelines/process.py)

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key = key
        self.problem = problem
        self.source = source
        super().__init__(": ".join(part for part in (source, key, problem) if part))


# ----------------------------------------------------------------------------------------------
# The schema: one frozen dataclass per section of params.yaml
# ----------------------------------------------------------------------------------------------

TIME_UNITS = ("seconds", "frames")
FEATURE_SOURCES = ("videos", "npy")
SCHEDULES = ("warmup_cosine", "constant")
SEGMENT_RULES = ("hysteresis", "sweep")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DatasetParams:
    name: str  # names the data directory: data/<name>/...
    video_dir: str  # the videos, or the <video_id>.npy features when feature_source is "npy"
    annotations: str  # JSON {video_id: {subset, duration, actions: [[class, start, end], ...]}}
    num_classes: int
    class_names: str | None = None  # text file, one class name per line
    time_unit: str = "seconds"  # of start, end and duration in the annotations
    annotation_fps: float | None = None  # time_unit=frames: frames per second; None = probed fps
    train_subset: str = "training"
    test_subset: str = "testing"
    feature_source: str = "videos"  # "videos": decode + extract; "npy": import video_dir/<video_id>.npy
    npy_hop_s: float | None = None  # seconds between consecutive .npy features
    synthetic: dict | None = None  # keyword arguments of extractors.synthetic.make_dataset
    # Facts about the videos, stated by a dataset whose videos all share them (the synthetic one)
    # and left out by the others. No stage reads them: conf/extractor/*.yaml interpolate them
    # (docs/pipeline.md, "Configuration").
    video_fps: float | None = None  # every video's frame rate
    frame_size: int | None = None  # every video's frame width and height, in pixels
    max_video_frames: int | None = None  # no video has more frames than this

    def check(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "dataset.name",
                 f"must be a non-empty name without '/', got {self.name!r}")
        _require(self.num_classes > 0, "dataset.num_classes", f"must be > 0, got {self.num_classes}")
        _require_choice("dataset.time_unit", self.time_unit, TIME_UNITS)
        _require_choice("dataset.feature_source", self.feature_source, FEATURE_SOURCES)
        if self.annotation_fps is not None:
            _require(self.annotation_fps > 0, "dataset.annotation_fps", f"must be > 0 or null, got {self.annotation_fps}")
        _require(self.train_subset != self.test_subset, "dataset.test_subset",
                 f"must differ from dataset.train_subset ({self.train_subset!r})")
        if self.feature_source == "npy":
            _require(self.npy_hop_s is not None and self.npy_hop_s > 0, "dataset.npy_hop_s",
                     f"must be > 0 when dataset.feature_source is 'npy', got {self.npy_hop_s}")
            _require(self.synthetic is None, "dataset.synthetic",
                     "must be null when dataset.feature_source is 'npy' (synthetic data is videos)")
        for key in ("video_fps", "frame_size", "max_video_frames"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"dataset.{key}", f"must be > 0 or left out, got {value}")
        if self.synthetic is not None:
            _check_synthetic_arguments(self.synthetic)
            _require(self.synthetic.get("num_classes", self.num_classes) == self.num_classes, "dataset.num_classes",
                     f"is {self.num_classes} but dataset.synthetic.num_classes is {self.synthetic.get('num_classes')}")
            for fact, argument in (("video_fps", "fps"), ("frame_size", "size")):  # what the extractor is told
                stated, rendered = getattr(self, fact), self.synthetic.get(argument)
                _require(stated is None or rendered is None or stated == rendered, f"dataset.{fact}",
                         f"is {stated} but dataset.synthetic.{argument} is {rendered} (set dataset.{fact}: "
                         f"the synthetic videos follow it)")


@dataclass(frozen=True)
class ModelParams:
    name: str  # a model of ms_temba.create_model
    overrides: dict = field(default_factory=dict)  # fields of that model's config dataclass

    # Set by the pipeline from the data, so they must not be overridden by hand.
    FROM_DATA: typing.ClassVar[tuple[str, ...]] = ("in_dim", "num_classes")

    def check(self) -> None:
        import ms_temba
        from ms_temba.registry import model_class

        # The registry also holds image models (Vim, for extractor=vim); the pipeline trains only
        # models over feature sequences.
        registered = ms_temba.list_models()
        temporal = tuple(name for name in registered if not issubclass(model_class(name), ms_temba.VisionMamba))
        if self.name in registered and self.name not in temporal:
            raise ConfigError("model.name", f"{self.name!r} is an image model (Vim; extractor=vim uses it to make "
                                            f"features, `ms-temba train-vim` trains it); the pipeline trains a "
                                            f"temporal model: one of {', '.join(map(repr, temporal))}")
        _require_choice("model.name", self.name, temporal)
        defaults = ms_temba.model_config(self.name)
        config_name = type(defaults).__name__
        known = [f.name for f in dataclasses.fields(defaults) if f.name not in self.FROM_DATA]
        for key in self.overrides:
            if key in self.FROM_DATA:
                raise ConfigError(f"model.overrides.{key}", "is set from the data (feature dim / dataset.num_classes); remove it")
            if key not in known:
                raise ConfigError(f"model.overrides.{key}", f"unknown {config_name} field; known: {', '.join(known)}")
        widths = self.overrides.get("widths")
        if widths is not None:
            _require(isinstance(widths, (list, tuple)) and len(widths) > 0, "model.overrides.widths",
                     f"must be a non-empty list of block widths (K = len(widths) >= 1), got {widths!r}")
        try:  # the config checks every value (positive ints, ...); its error names the field
            ms_temba.model_config(self.name, **self.overrides)
        except ConfigFieldError as error:
            key = f"model.overrides.{error.field}" if error.field in self.overrides else "model.overrides"
            raise ConfigError(key, str(error)) from error


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 50
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    batch_size: int = 8
    num_clips: int = 256  # random crop length of a training sequence, in features
    val_fraction: float = 0.15
    seed: int = 0
    beta: float = 0.3
    alpha: float = 100.0
    smoothing: float = 0.0  # MS-Temba's temporal smoothing term (ms_temba.losses.temporal_smoothing)
    max_grad_norm: float | None = None
    # Validate and keep an exponential moving average of the weights (decay per optimizer step)
    # instead of the raw weights; null = the raw weights.
    ema_decay: float | None = None
    normalize_features: bool = False  # standardise each feature dim with training-set mean/std
    num_threads: int = 2
    device: str = "auto"
    schedule: str = "warmup_cosine"  # learning rate per step: warmup_cosine | constant (after warmup)
    # Start every class head's bias at the log-odds of the class's share of training frames
    # (ms_temba.init_class_prior); false = the model's own initialisation (zero biases), as released.
    class_prior_init: bool = False
    # Forward pass and loss under torch.autocast in this dtype (fp16 with a gradient scaler); the
    # weights, the optimizer and the SSM scan's recurrence stay fp32. fp32 = no autocast.
    precision: str = "fp32"
    # DataLoader worker processes that collate the next batches while the model trains on this one
    # (same batches, same order); 0 = collate in the training loop.
    num_workers: int = 0
    # One process per GPU (or CPU process group) under torchrun, DistributedDataParallel; each rank
    # trains on its part of every batch of batch_size (README, "Training on GPUs").
    distributed: bool = False

    def check(self) -> None:
        for key in ("epochs", "batch_size", "num_clips", "num_threads"):
            _require(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        _require(self.num_workers >= 0, "train.num_workers", f"must be >= 0, got {self.num_workers}")
        _require_choice("train.precision", self.precision, PRECISIONS)
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        for key in ("weight_decay", "beta", "alpha", "smoothing"):
            _require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs",
                 f"must be in [0, train.epochs={self.epochs}), got {self.warmup_epochs}")
        _require(0 < self.val_fraction < 1, "train.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        if self.max_grad_norm is not None:
            _require(self.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0 or null, got {self.max_grad_norm}")
        if self.ema_decay is not None:
            _require(0 < self.ema_decay < 1, "train.ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}")
        _require_choice("train.device", self.device, DEVICE_CHOICES)
        _require_choice("train.schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class EvalParams:
    num_timelines: int = 4
    sampled_frames: int = 25
    action_offsets: list[int] = field(default_factory=lambda: [0, 20, 40])
    threshold: float = 0.5
    # Segment-level detection mAP (ms_temba.metrics.DetectionMAP) of the segments extracted from
    # the probabilities by `segment_rule`: "hysteresis" (predict's rule) or "sweep" (several
    # thresholds merged by per-class NMS, ms_temba.segments.sweep_segments).
    detection_tiou: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    segment_rule: str = "sweep"
    threshold_on: float = 0.5
    threshold_off: float = 0.35
    sweep_thresholds: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    nms_tiou: float = 0.5
    context_ratio: float | None = 0.25  # sweep: score = mean inside - mean of this much context; null = mean
    min_duration_s: float = 0.5
    merge_gap_s: float = 0.5
    viewer_videos: int | None = None  # HTML viewer pages written (the first N test videos); null = all

    def check(self) -> None:
        _require(len(self.detection_tiou) > 0 and all(0 < t <= 1 for t in self.detection_tiou), "eval.detection_tiou",
                 f"must be a non-empty list of tIoU thresholds in (0, 1], got {self.detection_tiou}")
        _require_choice("eval.segment_rule", self.segment_rule, SEGMENT_RULES)
        _require(0 <= self.threshold_off <= self.threshold_on <= 1, "eval.threshold_off",
                 f"must satisfy 0 <= threshold_off <= threshold_on <= 1, got {self.threshold_off} and {self.threshold_on}")
        _require(len(self.sweep_thresholds) > 0 and all(0 <= t <= 1 for t in self.sweep_thresholds),
                 "eval.sweep_thresholds", f"must be a non-empty list of numbers in [0, 1], got {self.sweep_thresholds}")
        _require(0 <= self.nms_tiou <= 1, "eval.nms_tiou", f"must be in [0, 1], got {self.nms_tiou}")
        if self.context_ratio is not None:
            _require(self.context_ratio >= 0, "eval.context_ratio", f"must be >= 0 or null, got {self.context_ratio}")
        for key in ("min_duration_s", "merge_gap_s"):
            _require(getattr(self, key) >= 0, f"eval.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.viewer_videos is not None:
            _require(self.viewer_videos >= 0, "eval.viewer_videos", f"must be >= 0 or null, got {self.viewer_videos}")
        _require(self.num_timelines >= 0, "eval.num_timelines", f"must be >= 0, got {self.num_timelines}")
        _require(self.sampled_frames > 0, "eval.sampled_frames", f"must be > 0, got {self.sampled_frames}")
        _require(len(self.action_offsets) > 0 and all(o >= 0 for o in self.action_offsets), "eval.action_offsets",
                 f"must be a non-empty list of offsets >= 0, got {self.action_offsets}")
        _require(0 < self.threshold < 1, "eval.threshold", f"must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class PipelineParams:
    dataset: DatasetParams
    extractor: ExtractorConfig
    model: ModelParams
    train: TrainParams
    eval: EvalParams
    ray_address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> PipelineParams:
    """Read and validate params.yaml; raises ConfigError naming the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: compose it with `ms-temba compose > {path}` "
                                f"(or `dvc exp run`), see docs/pipeline.md")
    try:
        with open(path) as stream:
            values = yaml.safe_load(stream)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError("", f"not valid YAML at {where} ({problem}); fix the file or recompose it "
                                    f"with `ms-temba compose > {path}`", source=str(path)) from None
    try:
        return parse_params(values)
    except ConfigError as error:
        raise ConfigError(error.key, error.problem, source=str(path)) from None


def parse_params(values: Any) -> PipelineParams:
    """Validate a params mapping (the content of params.yaml) into PipelineParams."""
    if not isinstance(values, Mapping):
        raise ConfigError("<root>", f"params must be a mapping of sections, got {type(values).__name__}")
    _reject_unknown(values, {f.name for f in dataclasses.fields(PipelineParams)}, prefix="")
    for section in ("dataset", "extractor", "model", "train", "eval"):
        if section not in values:
            raise ConfigError(section, "section is missing")
    dataset = _build(DatasetParams, values["dataset"], "dataset")
    extractor = _build_extractor(values["extractor"])
    model = _build(ModelParams, values["model"], "model")
    train = _build(TrainParams, values["train"], "train")
    evaluation = _build(EvalParams, values["eval"], "eval")
    ray_address = values.get("ray_address")
    if ray_address is not None and not isinstance(ray_address, str):
        raise ConfigError("ray_address", f"must be a string or null, got {ray_address!r}")
    for section in (dataset, model, train, evaluation):
        section.check()
    return PipelineParams(dataset=dataset, extractor=extractor, model=model, train=train, eval=evaluation,
                          ray_address=ray_address)


def compose_params(overrides: list[str] = (), conf_dir: str | Path = CONF_DIR) -> dict[str, Any]:
    """Compose conf/ with Hydra overrides (e.g. ["dataset=tsu", "train.lr=1e-3"]) into a plain dict."""
    return yaml.safe_load(compose_params_yaml(overrides, conf_dir))


def compose_params_yaml(overrides: list[str] = (), conf_dir: str | Path = CONF_DIR) -> str:
    """The text of params.yaml, exactly as `dvc exp run -S ...` writes it (hydra compose + to_yaml)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir).resolve()
    try:
        with initialize_config_dir(str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise _composition_error(error, list(overrides), conf_dir) from None
    return OmegaConf.to_yaml(cfg)


def _composition_error(error: Exception, overrides: list[str], conf_dir: Path) -> ConfigError:
    """A one-line ConfigError for what Hydra / OmegaConf raised while composing."""
    import re

    from hydra.errors import MissingConfigException, OverrideParseException

    message = str(error).strip()
    if isinstance(error, MissingConfigException):  # `dataset=nope`: no conf/dataset/nope.yaml
        found = re.search(r"Could not find '([^']+)'", message)
        missing = found.group(1) if found else (error.missing_cfg_file or "?")
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml")) if group else []
        if options:
            return ConfigError(f"{group}={option}", f"there is no {conf_dir.name}/{missing}.yaml; choose one of "
                                                    f"{', '.join(options)}")
        return ConfigError(missing, message.splitlines()[0])
    if isinstance(error, OverrideParseException):
        return ConfigError(message.splitlines()[0].removeprefix("Error parsing override ").strip("'"),
                           "not an override of the form key=value (or +key=value, group=option)")
    found = re.search(r"Could not override '([^']+)'", message)
    if found:  # `train.lrr=1e-3`: a key the composed configuration does not have
        key = found.group(1)
        return ConfigError(key, f"unknown key{_did_you_mean(key, _composed_keys(conf_dir))}; to add a new key "
                                f"write +{key}=...")
    return ConfigError("compose", message.splitlines()[0])


def _composed_keys(conf_dir: Path) -> list[str]:
    """Every dotted key of the default composition (for suggestions)."""
    def walk(value: Any, prefix: str) -> list[str]:
        if isinstance(value, Mapping):
            return [key for name, item in value.items() for key in [f"{prefix}{name}", *walk(item, f"{prefix}{name}.")]]
        return []
    try:
        return walk(compose_params([], conf_dir), "")
    except ConfigError:
        return []


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    """'; did you mean train.lr?' for the closest known keys, or ''."""
    import difflib

    known = list(known)
    prefix, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == prefix and k != key}
    close = [siblings[c] for c in difflib.get_close_matches(name, list(siblings), n=3, cutoff=0.6)]
    if not close:  # the name elsewhere in the section, e.g. extractor.mode -> extractor.i3d.mode
        section = key.partition(".")[0]
        close = [k for k in known if k.startswith(f"{section}.") and k.rpartition(".")[2] == name and k != key]
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(key, problem)


def _require_choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _reject_unknown(values: Mapping, known: set[str], prefix: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        hint = _did_you_mean(key, [f"{prefix}{k}" for k in known])
        raise ConfigError(key, f"unknown key{hint} (known: {', '.join(sorted(known))})")


# YAML 1.1 (PyYAML) reads `1e-3` and `5E-4`, without a dot, as strings; a user writing them means a number.
_NUMBER = __import__("re").compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _as_number(value: Any, annotation: Any) -> Any:
    """`value` converted to float where the field is a float (or a list of floats) and the value a
    string spelling a number; anything else unchanged (and checked by _check_type)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next((a for a in args if a is not type(None)), annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if origin is list and args and isinstance(value, list):
        return [_as_number(item, args[0]) for item in value]
    return value


def _build(cls, values: Any, section: str):
    """cls(**values) after checking keys and the type of every value against cls's annotations."""
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, set(fields), prefix=f"{section}.")
    hints = typing.get_type_hints(cls)
    values = {name: _as_number(value, hints[name]) for name, value in values.items()}
    for name, spec in fields.items():
        key = f"{section}.{name}"
        if name not in values:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        _check_type(key, values[name], hints[name])
    return cls(**values)


def _check_type(key: str, value: Any, annotation: Any) -> None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    expected = origin or annotation
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, Mapping),
    }[expected]
    if not ok:
        raise ConfigError(key, f"must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})")
    if expected is list and args:
        for index, item in enumerate(value):
            _check_type(f"{key}[{index}]", item, args[0])


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return f"a list of {typing.get_args(annotation)[0].__name__}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(annotation, str(annotation))


def _build_extractor(values: Any) -> ExtractorConfig:
    """The extractor section: shared fields at the top, the backbone's own under extractor.<backbone>
    (extractors.config); every field's type checked as in the other sections."""
    if not isinstance(values, Mapping):
        raise ConfigError("extractor", f"must be a mapping, got {values!r}")
    hints = typing.get_type_hints(ExtractorConfig)
    try:
        fields = extractor_config.flatten_params(values)  # each key where it belongs
        fields = {name: _as_number(value, hints[name]) for name, value in fields.items()}
        for name, value in fields.items():
            _check_type(f"extractor.{extractor_config.field_path(name)}", value, hints[name])
        return ExtractorConfig(**fields)
    except ConfigFieldError as error:  # ExtractorConfig's own checks name the field
        raise ConfigError(f"extractor.{error.field}", error.problem) from error


def _check_synthetic_arguments(arguments: Mapping) -> None:
    """Keys must be keyword arguments of make_dataset (other than out_dir)."""
    from extractors.synthetic import make_dataset

    accepted = [name for name in inspect.signature(make_dataset).parameters if name != "out_dir"]
    for key in arguments:
        if key not in accepted:
            raise ConfigError(f"dataset.synthetic.{key}",
                              f"unknown argument of extractors.synthetic.make_dataset; known: {', '.join(accepted)}")
