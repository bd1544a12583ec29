"""The whole pipeline under real DVC, in a temporary git repository holding a copy of the project:
`dvc repro` on the tiny configuration, `dvc exp run -S ...` (Hydra composition), `dvc metrics diff`,
`dvc plots show`, and a second `dvc repro` that has nothing to do."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import PROJECT_ROOT, compose_params_yaml

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]
OUTPUTS = ["metrics.json", "models/model.pt", "reports/predictions.parquet", "reports/train_log.csv",
           "data/synthetic/manifest.parquet"]


def run(command, cwd, timeout=900):
    # The stages' `python` must be this interpreter (the project's environment), and import the copy.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd)})
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def git(cwd, *args):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repository with the project's tracked files and a tiny params.yaml, committed."""
    repo = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = PROJECT_ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    # Plain `dvc repro` runs what params.yaml says: compose the tiny configuration into it.
    (repo / "params.yaml").write_text(compose_params_yaml(["experiment=tiny"]))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "project with the tiny configuration")
    return repo


def test_repro_exp_run_metrics_diff_and_noop(repo):
    run(DVC + ["repro"], repo)
    metrics = json.loads((repo / "metrics.json").read_text())
    for key in ("map", "map_sampled25", "chance_map"):
        assert 0 < metrics[key] <= 100, key
    assert metrics["num_videos"] == 2  # 8 tiny videos, 25 % of them in the test subset
    assert 0 <= metrics["detection_map"] <= 100 and set(metrics["detection_map_at"]) == {
        f"0.{k}" for k in range(1, 10)}
    assert (repo / "reports" / "detection_ap.csv").read_text().startswith("tiou,map\n")
    assert (repo / "reports" / "detections" / "results.json").is_file()
    assert (repo / "reports" / "viewer" / "index.html").is_file()
    assert len(list((repo / "reports" / "viewer").glob("*.html"))) == 1 + metrics["num_videos"]
    assert (repo / "reports" / "timelines").is_dir() and any((repo / "reports" / "timelines").glob("*.png"))
    report = json.loads((repo / "reports" / "manifest_report.json").read_text())
    assert report["videos"]["usable"] == 8
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first run")

    # An experiment: Hydra composes params.yaml from conf/ with the overrides, DVC re-runs what changed.
    output = run(DVC + ["exp", "run", "-S", "experiment=tiny", "-S", "train.epochs=3", "-S", "train.lr=0.003"], repo)
    assert "Stage 'extract' didn't change, skipping" in output
    params = (repo / "params.yaml").read_text()
    assert "epochs: 3" in params and "lr: 0.003" in params and "ms_temba_tiny" in params
    diff = json.loads(run(DVC + ["metrics", "diff", "--json"], repo))
    changed = diff["metrics.json"]
    assert changed["map"]["old"] == pytest.approx(metrics["map"])
    assert changed["map"]["new"] != changed["map"]["old"]
    assert (repo / "reports" / "train_log.csv").read_text().count("\n") == 1 + 3  # header + 3 epochs

    plots = json.loads(run(DVC + ["plots", "show", "--json"], repo))["data"]
    assert {"Training loss", "Validation mAP (%)", "Test AP per class (%)", "Test detection mAP vs tIoU (%)",
            "Test detection AP per class (%, mean over tIoU)"} <= set(plots)
    assert any(key.startswith("reports/timelines/") and key.endswith(".png") for key in plots)

    # The baselines through the same stages: `-S model=...` retrains and re-evaluates only, and
    # `dvc metrics diff` compares each with the MS-Temba run of the last commit.
    for model in ("mlp", "mstcn_single", "ms_tct_small"):
        output = run(DVC + ["exp", "run", "-S", "experiment=tiny", "-S", f"model={model}"], repo)
        assert "Stage 'extract' didn't change, skipping" in output
        assert f"name: {model}\n" in (repo / "params.yaml").read_text()
        changed = json.loads(run(DVC + ["metrics", "diff", "--json"], repo))["metrics.json"]
        assert changed["map"]["old"] == pytest.approx(metrics["map"]) and 0 < changed["map"]["new"] <= 100
        assert changed["num_parameters"]["new"] != changed["num_parameters"]["old"]

    # Nothing changed since: a second repro skips every stage and leaves the outputs alone.
    before = {name: sha256(repo / name) for name in OUTPUTS}
    output = run(DVC + ["repro"], repo)
    assert "Data and pipelines are up to date" in output or all(
        f"Stage '{stage}' didn't change, skipping" in output
        for stage in ("synthesize", "manifest", "extract", "train", "evaluate"))
    assert {name: sha256(repo / name) for name in OUTPUTS} == before
    assert "Data and pipelines are up to date" in run(DVC + ["status"], repo)
