"""The configuration: conf/ composes into valid params for every dataset, params.yaml is the
composed default (as DVC itself would write it), and bad values are rejected naming the key."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from pipelines.config import (CONF_DIR, PROJECT_ROOT, ConfigError, compose_params, compose_params_yaml,
                              load_params, parse_params)

DATASETS = sorted(path.stem for path in (CONF_DIR / "dataset").glob("*.yaml"))


@pytest.fixture(scope="module")
def default_params() -> dict:
    return compose_params()


def test_committed_params_yaml_is_the_composed_default():
    # DVC's own Hydra composition (what `dvc exp run -S ...` writes) is the reference.
    from dvc.utils.hydra import compose_and_dump

    written_by_dvc = PROJECT_ROOT / ".pytest-params-by-dvc.yaml"
    try:
        compose_and_dump(written_by_dvc, str(CONF_DIR), None, "config", str(PROJECT_ROOT), [])
        by_dvc = written_by_dvc.read_text()
    finally:
        written_by_dvc.unlink(missing_ok=True)
    assert compose_params_yaml() == by_dvc
    assert (PROJECT_ROOT / "params.yaml").read_text() == by_dvc, \
        "params.yaml is stale: regenerate it with `ms-temba compose > params.yaml`"


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("recipe", [[], ["model=ms_temba", "train=release"]])
def test_every_dataset_composes_into_valid_params(dataset, recipe):
    params = parse_params(compose_params([f"dataset={dataset}", *recipe]))
    assert params.dataset.name == dataset
    if recipe:  # the release's recipe as published
        assert params.train.lr == 5e-4 and params.train.weight_decay == 0.01 and params.train.alpha == 100
        assert not params.train.class_prior_init and params.train.ema_decay is None
    else:  # the default recipe (conf/train/default.yaml, docs/accuracy.md)
        assert params.train.lr == 1e-3 and params.train.weight_decay == 0 and params.train.alpha == 3
        assert params.train.class_prior_init and params.train.num_clips == 256 and params.train.ema_decay == 0.99


def test_tiny_experiment_shrinks_the_synthetic_run():
    tiny, default = parse_params(compose_params(["experiment=tiny"])), parse_params(compose_params())
    assert tiny.dataset.synthetic["num_videos"] < default.dataset.synthetic["num_videos"]
    assert tiny.train.epochs < default.train.epochs
    assert tiny.dataset.num_classes == tiny.dataset.synthetic["num_classes"] == 6
    # It is made for the synthetic data: on a real dataset its synthetic settings are an error.
    with pytest.raises(ConfigError, match="^dataset.num_classes: is 157 but dataset.synthetic.num_classes is 6"):
        parse_params(compose_params(["dataset=charades", "experiment=tiny"]))


def test_dataset_specifics():
    tsu = parse_params(compose_params(["dataset=tsu"])).dataset
    assert (tsu.num_classes, tsu.time_unit, tsu.synthetic) == (51, "frames", None)
    charades = parse_params(compose_params(["dataset=charades", "extractor=clip"]))
    assert (charades.dataset.num_classes, charades.extractor.backbone) == (157, "clip")
    assert charades.extractor.image_size == 224  # synthetic's 112 px does not leak into real data
    synthetic = parse_params(compose_params())
    assert synthetic.dataset.num_classes == synthetic.dataset.synthetic["num_classes"]
    assert synthetic.extractor.image_size == synthetic.dataset.synthetic["size"]


def test_release_recipe():
    recipe = parse_params(compose_params(["train=release"])).train
    assert (recipe.lr, recipe.weight_decay, recipe.warmup_epochs, recipe.beta, recipe.alpha) == (5e-4, 0.01, 5, 0.3, 100.0)


def with_value(params: dict, dotted: str, value) -> dict:
    changed = copy.deepcopy(params)
    *parents, last = dotted.split(".")
    node = changed
    for key in parents:
        node = node.setdefault(key, {}) if key == "overrides" else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return changed


DELETE = object()
BAD_VALUES = [
    ("train.lr", -1e-3),
    ("train.lr", 0),
    ("train.lrr", 1e-3),  # typo: unknown key
    ("train.epochs", "ten"),
    ("train.epochs", 2.5),
    ("train.epochs", 0),
    ("train.batch_size", True),
    ("train.val_fraction", 0.0),
    ("train.val_fraction", 1.0),
    ("train.warmup_epochs", 50),
    ("train.weight_decay", -0.1),
    ("train.device", "tpu"),
    ("train.normalize_features", "yes"),
    ("model.name", "ms_temba_huge"),
    ("model.overrides.widths", []),
    ("model.overrides.d_state", 0),
    ("model.overrides.in_dim", 768),
    ("model.overrides.colour", "red"),
    ("dataset.num_classes", 0),
    ("dataset.time_unit", "hours"),
    ("dataset.annotation_fps", -25.0),
    ("dataset.feature_source", "pixels"),
    ("dataset.name", "a/b"),
    ("dataset.annotations", DELETE),
    ("dataset.synthetic.num_vidoes", 3),
    ("dataset.test_subset", "training"),
    ("extractor.fps", -1.0),
    ("extractor.image_size", 0),
    ("extractor.backbone", "resnet"),
    ("extractor.batchsize", 4),
    ("extractor.i3d.mode", "dense"),
    ("extractor.i3d.stride", 0),
    ("extractor.i3d.fps", 24.0),  # a shared field inside the backbone's section
    ("extractor.clip_window", 16),  # CLIP's field, at the top and for I3D
    ("dataset.video_fps", 0),
    ("eval.threshold", 1.5),
    ("eval.action_offsets", [-1]),
    ("eval.num_timelines", "all"),
    ("ray_address", 5),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_values_name_the_key(default_params, key, value):
    with pytest.raises(ConfigError) as raised:
        parse_params(with_value(default_params, key, value))
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}:")


def test_missing_section_and_non_mapping(default_params):
    without_train = {k: v for k, v in default_params.items() if k != "train"}
    with pytest.raises(ConfigError, match="^train: section is missing"):
        parse_params(without_train)
    with pytest.raises(ConfigError, match="^train: must be a mapping"):
        parse_params({**default_params, "train": [1, 2]})
    with pytest.raises(ConfigError, match="^<root>"):
        parse_params(["not", "a", "mapping"])


def test_npy_source_needs_a_hop(default_params):
    npy = with_value(with_value(default_params, "dataset.feature_source", "npy"), "dataset.synthetic", None)
    with pytest.raises(ConfigError, match="^dataset.npy_hop_s:"):
        parse_params(npy)
    assert parse_params(with_value(npy, "dataset.npy_hop_s", 0.5)).dataset.npy_hop_s == 0.5


def test_cli_check_reports_the_key(tmp_path, default_params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_value(default_params, "train.val_fraction", 1.5)))
    result = subprocess.run([sys.executable, "-m", "pipelines.tools.cli", "check", "--params", str(path)],
                            capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 2
    assert "train.val_fraction: must be in (0, 1), got 1.5" in result.stderr
    assert load_params(PROJECT_ROOT / "params.yaml").dataset.name == "synthetic"


@pytest.mark.parametrize("model, overrides, field, message", [
    ("ms_temba_tiny", {"d_state": 0}, "d_state", "MSTembaConfig.d_state must be a positive int, got 0"),
    ("ms_temba_tiny", {"widths": []}, "widths", "MSTembaConfig.widths is empty: MS-Temba needs at least one block"),
    ("ms_tct_small", {"num_heads": 7}, "widths", "MSTCTConfig.widths: 64 is not divisible by num_heads=7"),
    ("mstcn", {"dropout": 1.0}, "dropout", "MSTCNConfig.dropout must be in [0, 1), got 1.0"),
    ("mlp", {"colour": "red"}, "colour", "unknown FrameMLPConfig key(s) 'colour'; valid keys: "),
])
def test_model_config_errors_carry_the_field(model, overrides, field, message):
    import ms_temba
    from ms_temba.errors import ConfigFieldError

    with pytest.raises(ConfigFieldError) as raised:
        ms_temba.model_config(model, **overrides)
    assert raised.value.field == field and str(raised.value).startswith(message)
    assert isinstance(raised.value, ValueError)  # callers catching ValueError keep working


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small_stride8"])
def test_an_image_model_is_not_a_pipeline_model(default_params, name):
    # Vim is in ms_temba's registry (extractor=vim, train-vim) but reads images, not feature sequences.
    with pytest.raises(ConfigError, match=rf"^model.name: '{name}' is an image model .* one of 'mlp', ") as raised:
        parse_params(with_value(default_params, "model.name", name))
    listed = raised.value.problem.split("one of ")[1]
    assert "vim" not in listed and all(f"'{model}'" in listed for model in ("ms_temba", "ms_tct", "mstcn", "mlp"))
    assert parse_params(with_value(default_params, "model.name", "ms_temba_tiny")).model.name == "ms_temba_tiny"


def test_extractor_config_errors_carry_the_field():
    from extractors.config import ExtractorConfig
    from ms_temba.errors import ConfigFieldError

    with pytest.raises(ConfigFieldError) as raised:
        ExtractorConfig(fps=-1.0)
    assert (raised.value.owner, raised.value.field, raised.value.problem) == ("extractor", "fps",
                                                                             "must be positive or null, got -1.0")
    assert str(raised.value) == "extractor.fps must be positive or null, got -1.0"


def test_extractor_value_of_the_wrong_type_names_the_key(default_params):
    with pytest.raises(ConfigError, match=r"^extractor.fps: must be a number, got 'fast' \(str\)"):
        parse_params(with_value(default_params, "extractor.fps", "fast"))


def test_only_experiment_files_are_global():
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        is_global = path.read_text().startswith("# @package _global_")
        assert is_global == (path.parent.name == "experiment"), path


def test_extractor_files_hold_their_backbone_fields_only():
    from extractors.config import BACKBONE_FIELDS

    for backbone, own in BACKBONE_FIELDS.items():
        section = compose_params([f"extractor={backbone}"])["extractor"]
        assert section["backbone"] == backbone and tuple(section[backbone]) == own
        others = {name for other, fields in BACKBONE_FIELDS.items() if other != backbone for name in (other, *fields)}
        assert not others & set(section), f"extractor={backbone} lists other backbones' fields"


def test_switching_the_backbone_keeps_nothing_of_the_default(default_params):
    # The default (synthetic) run extracts I3D at the videos' own rate and size, one pass per video:
    # the dataset states facts about its videos, and the I3D config reads them.
    videos = default_params["dataset"]["synthetic"]
    i3d = parse_params(default_params).extractor
    assert (i3d.fps, i3d.image_size) == (videos["fps"], videos["size"])
    assert i3d.chunk_frames >= round(videos["max_duration"] * videos["fps"])
    # CLIP on the same data: the same frame rate, but its own image size and chunking.
    clip_params = compose_params(["extractor=clip"])
    assert "i3d" not in clip_params["extractor"]
    clip = parse_params(clip_params).extractor
    assert (clip.backbone, clip.fps, clip.image_size, clip.chunk_frames) == ("clip", videos["fps"], 224, 128)
    # A real dataset states no such facts: 24 fps, 224 px, chunks of 128 frames.
    for backbone in ("i3d", "clip"):
        real = parse_params(compose_params(["dataset=charades", f"extractor={backbone}"]))
        assert (real.extractor.fps, real.extractor.image_size, real.extractor.chunk_frames) == (24.0, 224, 128)
        assert real.dataset.video_fps is real.dataset.frame_size is real.dataset.max_video_frames is None


def test_misplaced_extractor_fields_say_where_they_belong(default_params):
    flat = with_value(default_params, "extractor.i3d.mode", DELETE)
    flat["extractor"]["mode"] = "snippets"
    with pytest.raises(ConfigError, match=r"^extractor.mode: is a setting of the i3d backbone: write it as "
                                          r"extractor.i3d.mode"):
        parse_params(flat)
    with pytest.raises(ConfigError, match=r"^extractor.i3d.fps: is read by every backbone: write it as extractor.fps"):
        parse_params(with_value(default_params, "extractor.i3d.fps", 24.0))
    other = copy.deepcopy(default_params)
    other["extractor"]["clip"] = {"clip_window": 8}
    with pytest.raises(ConfigError, match=r"^extractor.clip: holds settings of the clip backbone, but "
                                          r"extractor.backbone is 'i3d'"):
        parse_params(other)
    # `-S extractor.mode=...` (the key before it moved) names the new one.
    with pytest.raises(ConfigError, match=r"^extractor.mode: unknown key; did you mean extractor.i3d.mode\?"):
        compose_params(["extractor.mode=snippets"])


def test_extractor_params_form_round_trips(default_params):
    from extractors.config import ExtractorConfig

    parsed = parse_params(default_params).extractor
    assert parsed.to_params() == default_params["extractor"]
    assert ExtractorConfig.from_params(parsed.to_params()) == parsed
    # The group files alone (python -m extractors.run --config ...): the dataset's facts take their defaults.
    from_file = ExtractorConfig.from_yaml(CONF_DIR / "extractor" / "i3d.yaml", ["i3d.mode=snippets", "fps=null"])
    assert (from_file.fps, from_file.image_size, from_file.chunk_frames, from_file.mode) == (None, 224, 128, "snippets")


def test_the_synthetic_videos_follow_the_stated_facts():
    smaller = parse_params(compose_params(["dataset.frame_size=32", "dataset.video_fps=4"]))
    assert (smaller.dataset.synthetic["size"], smaller.dataset.synthetic["fps"]) == (32, 4)
    assert (smaller.extractor.image_size, smaller.extractor.fps) == (32, 4)
    with pytest.raises(ConfigError, match=r"^dataset.frame_size: is 64 but dataset.synthetic.size is 32"):
        parse_params(compose_params(["dataset.synthetic.size=32"]))
    # Without the generator (a test's own videos), the facts still make a valid extractor.
    assert parse_params(compose_params(["experiment=tiny", "dataset.synthetic=null", "dataset.num_classes=4"]))
