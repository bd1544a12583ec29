"""Bad inputs and faults (issue 17, docs/reliability.md): each one a one-line error, a counted
skip, or a command that resumes. Real files throughout: .npy files, Parquet shards, decord
videos, subprocesses killed with SIGKILL."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from extractors.shards import FeatureStore, VideoFeatures, write_shard
from pipelines.annotations import IssueLog, clean_video
from pipelines.config import PROJECT_ROOT, ConfigError, compose_params, load_params
from pipelines.import_npy import NpyImportError, import_npy, load_npy_features

PYTHON = sys.executable


def run(args, cwd=PROJECT_ROOT, timeout=300, **env):
    return subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def error_lines(done) -> list[str]:
    """stderr without progress bars and log lines."""
    return [line for line in done.stderr.splitlines() if line.strip() and "[" not in line[:12] and "it/s]" not in line
            and "video/s]" not in line]


def assert_one_line_error(done, *needles):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = error_lines(done)
    assert 1 <= len(lines) <= 2, lines
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


# ----------------------------------------------------------------------------------------------
# 1. actions outside their video
# ----------------------------------------------------------------------------------------------

def test_actions_outside_the_video_are_dropped_and_counted():
    issues = IssueLog()
    entry = {"subset": "training", "duration": 10.0,
             "actions": [[0, 20.0, 30.0], [1, -3.0, -1.0], [2, -1.0, 3.0], [3, 9.0, 12.0], [4, 10.0, 11.0]]}
    clean = clean_video("v", entry, 5, issues)
    assert clean.classes.tolist() == [2, 3]
    assert clean.starts.tolist() == [0.0, 9.0] and clean.ends.tolist() == [3.0, 10.0]
    assert (clean.ends >= clean.starts).all()
    assert issues.counts == {"outside_video": 3, "start_before_zero": 1, "end_after_duration": 1}
    assert "outside the video" in issues.examples["outside_video"][0]["detail"]


# ----------------------------------------------------------------------------------------------
# 2, 5. unreadable .npy files, values float32 cannot hold, complex arrays
# ----------------------------------------------------------------------------------------------

def write_bad_npy_files(src: Path) -> dict[str, str]:
    """Bad files of every kind, with a word of the message each must give."""
    (src / "empty.npy").write_bytes(b"")
    (src / "text.npy").write_text("not an array at all\n")
    np.save(src / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(src / "huge.npy", np.full((3, 4), 1e300))
    np.save(src / "complex.npy", np.ones((3, 4), dtype=np.complex64))
    np.save(src / "nan.npy", np.array([[np.nan] * 4] * 3))
    np.save(src / "wrongdim.npy", np.ones((3, 7), dtype=np.float32))
    np.savez(src / "archive.npy", a=np.ones(3))  # an .npz under a .npy name
    os.replace(src / "archive.npy.npz", src / "archive.npy")
    return {"empty": "EOFError", "text": "not a readable .npy", "strings": "real numbers", "huge": "float32's range",
            "complex": "imaginary", "nan": "NaN", "wrongdim": "differs", "archive": "npz"}


def test_every_bad_npy_file_is_a_listed_failure_and_the_good_ones_are_imported(tmp_path):
    src = tmp_path / "npy"
    src.mkdir()
    rng = np.random.default_rng(0)
    good = {f"good{i}": rng.standard_normal((5 + i, 4)) for i in range(3)}
    for video_id, array in good.items():
        np.save(src / f"{video_id}.npy", array)
    expected = write_bad_npy_files(src)
    done = run(["-m", "pipelines.tools.cli", "import-npy", "--src", str(src), "--out", str(tmp_path / "shards"),
                "--hop-s", "0.5", "--videos-per-shard", "2"])
    assert done.returncode == 0, done.stderr
    assert "imported 3 videos" in done.stdout and f"{len(expected)} failed" in done.stdout
    store = FeatureStore(tmp_path / "shards")
    assert store.video_ids == sorted(good)
    for video_id, array in good.items():
        np.testing.assert_array_equal(store.get(video_id).features, array.astype(np.float32))
    failures = {f["video_id"]: f["message"] for f in store.failures}
    assert set(failures) == set(expected)
    for video_id, word in expected.items():
        assert word in failures[video_id], (video_id, failures[video_id])
    # float64 values float32 can hold are fine; the check is on the cast values
    np.save(src / "fine.npy", np.full((2, 4), 3e38))
    assert np.isfinite(load_npy_features(src / "fine.npy")).all()


# ----------------------------------------------------------------------------------------------
# 3, 10. re-importing, and resuming a killed import
# ----------------------------------------------------------------------------------------------

def make_npy_folder(src: Path, count: int, length: int = 6, dim: int = 4, seed: int = 0) -> None:
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(src / f"v{i:03d}.npy", rng.standard_normal((length, dim)).astype(np.float32))


def test_reimporting_into_one_folder_replaces_the_store(tmp_path):
    src, out = tmp_path / "npy", tmp_path / "shards"
    make_npy_folder(src, 5)
    assert import_npy(src, out, hop_s=0.5, videos_per_shard=1, show_progress=False)[0] == 5
    # Another grouping: shards of the old grouping must not hold the videos a second time.
    assert import_npy(src, out, hop_s=0.5, videos_per_shard=3, show_progress=False)[0] == 5
    store = FeatureStore(out)
    assert store.video_ids == [f"v{i:03d}" for i in range(5)] and len(list(out.glob("*.parquet"))) == 2
    # Other settings: the whole store is replaced (built beside it, swapped in), never mixed.
    assert import_npy(src, out, hop_s=0.25, videos_per_shard=2, show_progress=False)[0] == 5
    store = FeatureStore(out)
    assert store.metadata["hop_s"] == 0.25 and len(store) == 5
    np.testing.assert_allclose(store.get("v000").start_s, np.arange(6) * 0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npy", "shards"]  # no staging folder left
    assert json.loads((out / "import_npy.json").read_text())["complete"] is True
    # A folder of another extractor's shards is refused, with what to do.
    other = tmp_path / "extracted"
    other.mkdir()
    write_shard(other / "shard-00000.parquet", [("x", VideoFeatures(np.ones((2, 4)), [0, 1], [1, 2]))],
                {"backbone": "i3d", "dim": 4})
    with pytest.raises(NpyImportError, match="another extractor .*choose another --out"):
        import_npy(src, other, hop_s=0.5, show_progress=False)
    done = run(["-m", "pipelines.tools.cli", "import-npy", "--src", str(src), "--out", str(other), "--hop-s", "0.5"])
    assert_one_line_error(done, "another extractor (i3d)")


def test_a_npy_file_replaced_under_its_name_is_imported_again(tmp_path):
    """An import resumes by file content, not by id: a .npy file given other content under the same
    name is imported again (its group's shard rewritten, the other shards kept); a file rewritten
    with the same bytes is not."""
    src, out = tmp_path / "npy", tmp_path / "shards"
    make_npy_folder(src, 5)
    assert import_npy(src, out, hop_s=0.5, videos_per_shard=2, show_progress=False)[0] == 5
    assert sorted(json.loads((out / "sources.json").read_text())) == [f"v{i:03d}" for i in range(5)]
    shard_files = lambda: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns,  # noqa: E731
                                    hashlib.sha256(p.read_bytes()).hexdigest()) for p in out.glob("npy-*.parquet")}
    before = shard_files()

    replacement = np.arange(32, dtype=np.float32).reshape(8, 4)
    np.save(src / "v003.npy", replacement)  # in npy-00001 with v002
    assert import_npy(src, out, hop_s=0.5, videos_per_shard=2, show_progress=False)[0] == 5
    store = FeatureStore(out)
    np.testing.assert_array_equal(store.get("v003").features, replacement)
    for video_id in ("v000", "v001", "v002", "v004"):
        np.testing.assert_array_equal(store.get(video_id).features, np.load(src / f"{video_id}.npy"))
    after = shard_files()
    assert after.keys() == before.keys() and after["npy-00001.parquet"] != before["npy-00001.parquet"]
    assert {k: v for k, v in after.items() if k != "npy-00001.parquet"} == \
        {k: v for k, v in before.items() if k != "npy-00001.parquet"}
    # The same as a fresh import of the new files.
    fresh = tmp_path / "fresh"
    import_npy(src, fresh, hop_s=0.5, videos_per_shard=2, show_progress=False)
    assert tree_digest(out) == tree_digest(fresh)

    # The same bytes, a new modification time: nothing imported again.
    before = shard_files()
    stat = os.stat(src / "v000.npy")
    os.utime(src / "v000.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert import_npy(src, out, hop_s=0.5, videos_per_shard=2, show_progress=False)[0] == 5
    assert shard_files() == before


def import_command(src: Path, out: Path) -> list[str]:
    return ["-m", "pipelines.tools.cli", "import-npy", "--src", str(src), "--out", str(out), "--hop-s", "0.5",
            "--videos-per-shard", "2"]


def test_a_killed_import_resumes_and_leaves_no_temporary_file(tmp_path):
    src = tmp_path / "npy"
    make_npy_folder(src, 24, length=3000, dim=128)  # long enough to be killed in the middle
    reference = tmp_path / "reference"
    assert run(import_command(src, reference)).returncode == 0

    out = tmp_path / "killed"
    process = subprocess.Popen([PYTHON, *import_command(src, out)], cwd=PROJECT_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "npy-00001.parquet").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stamp = json.loads((out / "import_npy.json").read_text())
    kept = {p.name: p.stat().st_ino for p in out.glob("npy-*.parquet")}
    assert kept
    if stamp["complete"] is False:  # killed in the middle (nearly always): the store says so
        assert len(kept) < 12
    # What a kill inside write_shard leaves behind:
    (out / ".npy-00011.parquet.0123abcd.tmp").write_bytes(b"PAR1 half a shard")
    done = run(import_command(src, out))
    assert done.returncode == 0, done.stderr
    assert temporaries(out) == []
    assert tree_digest(out) == tree_digest(reference)
    # finished shards were kept, not rewritten
    assert all((out / name).stat().st_ino == inode for name, inode in kept.items())
    assert json.loads((out / "import_npy.json").read_text())["complete"] is True


# ----------------------------------------------------------------------------------------------
# 6. configuration and annotation errors: one line naming the file, the key and the fix, exit 2
# ----------------------------------------------------------------------------------------------

def test_compose_typos_and_unknown_options_are_one_line():
    done = run(["-m", "pipelines.tools.cli", "compose", "train.lrr=1e-3"])
    assert_one_line_error(done, "train.lrr", "did you mean train.lr?", "+train.lrr=")
    done = run(["-m", "pipelines.tools.cli", "compose", "dataset=nope"])
    assert_one_line_error(done, "dataset=nope", "conf/dataset/nope.yaml", "charades", "synthetic")
    done = run(["-m", "pipelines.tools.cli", "compose", "train.lr"])
    assert_one_line_error(done, "train.lr", "key=value")


def test_bad_params_files_are_one_line_for_every_stage(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train:\n  lr: [0.1\n")
    for stage in ("synthesize", "manifest", "extract", "train", "evaluate"):
        args = {"synthesize": ["--out", "x"], "manifest": ["--out", "x", "--report", "y"],
                "extract": ["--manifest", "m", "--out", "x"],
                "train": ["--manifest", "m", "--shards", "s", "--checkpoints", "c", "--out", "o", "--log", "l"],
                "evaluate": ["--model", "m", "--manifest", "m", "--shards", "s", "--metrics", "x",
                             "--predictions", "p", "--per-class", "c", "--timelines", "t"]}[stage]
        done = run(["-m", f"pipelines.stages.{stage}", "--params", str(broken), *args], cwd=tmp_path)
        assert_one_line_error(done, f"pipelines.stages.{stage}: error: {broken}", "not valid YAML at line 3")
    params = compose_params(["experiment=tiny"])
    params["train"]["lrr"] = 0.1
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(params))
    done = run(["-m", "pipelines.tools.cli", "check", "--params", str(typo)])
    assert_one_line_error(done, str(typo), "train.lrr: unknown key; did you mean train.lr?")


def test_a_hand_written_exponent_is_the_number_meant(tmp_path):
    text = re.sub(r"\n  lr: [^\n]+", "\n  lr: 1e-3", yaml.safe_dump(compose_params(["experiment=tiny"])))
    assert "lr: 1e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"  # YAML 1.1 reads it as a string
    assert load_params(tmp_path / "params.yaml").train.lr == 0.001
    bad = text.replace("lr: 1e-3", "lr: fast")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match=r"bad.yaml: train.lr: must be a number, got 'fast'"):
        load_params(tmp_path / "bad.yaml")


def write_params(path: Path, **dataset) -> Path:
    params = compose_params(["experiment=tiny", "dataset.synthetic=null", "dataset.num_classes=4",
                             "dataset.class_names=null"])
    params["dataset"].update(dataset)
    path.write_text(yaml.safe_dump(params))
    return path


def test_an_annotation_file_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "annotations.json").write_text('{"video": {"subset": "training",\n')
    params = write_params(tmp_path / "params.yaml", video_dir=str(tmp_path / "videos"),
                          annotations=str(tmp_path / "annotations.json"))
    done = run(["-m", "pipelines.stages.manifest", "--params", str(params), "--out", str(tmp_path / "m.parquet"),
                "--report", str(tmp_path / "r.json")])
    assert_one_line_error(done, "annotations.json (dataset.annotations) is not valid JSON", "line 2")


# ----------------------------------------------------------------------------------------------
# 7. a manifest without usable training or test videos
# ----------------------------------------------------------------------------------------------

def test_a_manifest_without_usable_videos_fails_at_once(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "annotations.json").write_text("{}")
    params = write_params(tmp_path / "params.yaml", video_dir=str(tmp_path / "videos"),
                          annotations=str(tmp_path / "annotations.json"))
    done = run(["-m", "pipelines.stages.manifest", "--params", str(params), "--out", str(tmp_path / "m.parquet"),
                "--report", str(tmp_path / "r.json")])
    assert_one_line_error(done, "no usable 'training' or 'testing' video", "annotations.json")
    assert not (tmp_path / "m.parquet").exists()  # so extract and train cannot run on it
    assert json.loads((tmp_path / "r.json").read_text())["videos"]["usable"] == 0  # the report says why

    # Only training videos (features as .npy): the test subset is named.
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", np.ones((4, 3), np.float32))
    (tmp_path / "annotations.json").write_text(json.dumps({"a": {"subset": "training", "duration": 2.0,
                                                                 "actions": [[0, 0.0, 1.0]]}}))
    params = write_params(tmp_path / "params.yaml", video_dir=str(tmp_path / "npy"), feature_source="npy",
                          npy_hop_s=0.5, annotations=str(tmp_path / "annotations.json"))
    done = run(["-m", "pipelines.stages.manifest", "--params", str(params), "--out", str(tmp_path / "m.parquet"),
                "--report", str(tmp_path / "r.json")])
    assert_one_line_error(done, "no usable 'testing' video")


# ----------------------------------------------------------------------------------------------
# 4. one device resolver; `cuda` without CUDA is a one-line error everywhere, and `check` says it
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_in_check_train_and_predict(tmp_path):
    from functools import partial

    from extractors.device import DeviceError, resolve_device

    for setting in ("train.device", "extractor.device"):  # as train, evaluate and the extractors ask
        resolve = partial(resolve_device, setting=setting)
        assert str(resolve("auto")) == "cpu"
        with pytest.raises(DeviceError, match=f"{setting} is 'cuda' but this machine cannot run CUDA"):
            resolve("cuda")
    assert str(resolve_device("auto")) == "cpu"

    params = compose_params(["experiment=tiny"])
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(params))
    done = run(["-m", "pipelines.tools.cli", "check", "--params", str(tmp_path / "auto.yaml")])
    assert done.returncode == 0 and "train.device 'auto' -> cpu" in done.stdout, done.stderr
    params["train"]["device"] = "cuda"
    (tmp_path / "cuda.yaml").write_text(yaml.safe_dump(params))
    done = run(["-m", "pipelines.tools.cli", "check", "--params", str(tmp_path / "cuda.yaml")])
    assert_one_line_error(done, "train.device is 'cuda' but this machine cannot run CUDA", "'auto'")
    done = run(["-m", "pipelines.stages.train", "--params", str(tmp_path / "cuda.yaml"), "--manifest", "m", "--shards",
                str(tmp_path), "--checkpoints", "c", "--out", "o", "--log", "l"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr  # the manifest is missing, or the device
    done = run(["-m", "pipelines.tools.cli", "predict", "--features", str(tmp_path), "--checkpoint", "m.pt",
                "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert_one_line_error(done, "--device is 'cuda' but this machine cannot run CUDA")


# ----------------------------------------------------------------------------------------------
# 11. convert-release on files that are not checkpoints
# ----------------------------------------------------------------------------------------------

def test_convert_release_says_what_a_file_is_not_and_never_advises_unsafe_loading(tmp_path):
    import pickle
    import zipfile

    import torch

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_text("<html><body>404 Not Found</body></html>\n")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as archive:
        archive.writestr("notes.txt", "hello")
    torch.save({"w": torch.ones(2)}, tmp_path / "garbled.pth")
    with zipfile.ZipFile(tmp_path / "garbled.pth") as source, zipfile.ZipFile(tmp_path / "garbled2.pth", "w") as out:
        for item in source.infolist():  # the same archive with its pickle replaced by noise
            data = source.read(item)
            out.writestr(item, b"\x80\x02\x92\x93\x94" + data[5:] if item.filename.endswith("data.pkl") else data)
    expected = {"empty": "is empty (0 bytes)", "page": "is not a PyTorch checkpoint", "random": "binary data",
                "plain": "plain Python pickle", "archive": "zip archive but not a PyTorch checkpoint",
                "garbled2": "not a PyTorch checkpoint that can be read safely"}
    for name, message in expected.items():
        done = run(["-m", "pipelines.tools.cli", "convert-release", str(tmp_path / f"{name}.pth"), str(tmp_path / "out.pt")])
        assert_one_line_error(done, message, f"{name}.pth")
        assert "weights_only=False" not in done.stderr and "weights_only` set to `False" not in done.stderr
    assert not (tmp_path / "out.pt").exists()


# ----------------------------------------------------------------------------------------------
# 13. every module a stage imports is a dependency of the stage in dvc.yaml
# ----------------------------------------------------------------------------------------------

PACKAGES = ("ms_temba", "extractors", "pipelines")


def _module_file(name: str) -> Path | None:
    path = PROJECT_ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def import_closure(module: str) -> list[str]:
    """The project files `python -m module` can import, lazily imported ones included (from the AST)."""
    import ast

    seen: set[Path] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for depth in range(1, len(parts) + 1):  # a module imports its packages' __init__ first
            name = ".".join(parts[:depth])
            path = _module_file(name)
            if path is None or path in seen:
                continue
            seen.add(path)
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    todo += [alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    if base.split(".")[0] in PACKAGES:
                        todo.append(base)
                        todo += [f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}")]
    return sorted(str(path.relative_to(PROJECT_ROOT)) for path in seen)


def test_every_imported_module_is_a_stage_dependency():
    import re

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, spec in stages.items():
        module = re.search(r"python -m ([\w.]+)", spec["cmd"]).group(1)
        deps = [dep.rstrip("/") for dep in spec["deps"]]
        closure = import_closure(module)
        assert f"{module.replace('.', '/')}.py" in closure
        gaps = [path for path in closure if not any(path == dep or path.startswith(dep + "/") for dep in deps)]
        if gaps:
            missing[stage] = gaps
        for dep in deps:  # and every code dependency exists
            if dep.split("/")[0] in PACKAGES:
                assert (PROJECT_ROOT / dep).exists(), f"{stage}: dependency {dep} does not exist"
    assert not missing, f"add these to the stages' deps in dvc.yaml: {missing}"
    # the closure does follow lazy imports: the manifest stage probes with extractors.video
    assert "extractors/video.py" in import_closure("pipelines.manifest")


# ----------------------------------------------------------------------------------------------
# 14. resuming a training run across runtime-only settings; naming the keys that forbid it
# ----------------------------------------------------------------------------------------------

def make_npy_dataset(root: Path, num_videos: int = 8, num_classes: int = 3, dim: int = 8, hop_s: float = 0.5):
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((num_classes, dim)).astype(np.float32)
    (root / "npy").mkdir(parents=True)
    annotations = {}
    for index in range(num_videos):
        length = int(rng.integers(16, 24))
        actions = [[int(rng.integers(num_classes)), float(s), float(s) + 3.0]
                   for s in rng.uniform(0, length * hop_s - 3, size=3).round(2)]
        centres = (np.arange(length) + 0.5) * hop_s
        labels = np.zeros((length, num_classes), np.float32)
        for label, start, end in actions:
            labels[(centres >= start) & (centres <= end), label] = 1
        np.save(root / "npy" / f"vid{index:02d}.npy",
                labels @ projection + 0.3 * rng.standard_normal((length, dim)).astype(np.float32))
        annotations[f"vid{index:02d}"] = {"subset": "testing" if index >= num_videos - 2 else "training",
                                          "duration": length * hop_s, "actions": actions}
    (root / "annotations.json").write_text(json.dumps(annotations))
    params = compose_params([
        "experiment=tiny", "dataset.synthetic=null", f"dataset.num_classes={num_classes}", "dataset.class_names=null",
        "dataset.feature_source=npy", f"dataset.video_dir={root / 'npy'}",
        f"dataset.annotations={root / 'annotations.json'}", f"dataset.npy_hop_s={hop_s}", "train.epochs=2",
        "train.warmup_epochs=1", "train.batch_size=3", "train.num_clips=8", "train.val_fraction=0.3"])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return params


@pytest.fixture(scope="module")
def npy_pipeline(tmp_path_factory):
    """params.yaml, manifest and shards of a small .npy dataset (the manifest and extract stages)."""
    from pipelines.stages import extract as extract_stage
    from pipelines.stages import manifest as manifest_stage

    root = tmp_path_factory.mktemp("npy_pipeline")
    make_npy_dataset(root)
    manifest_stage.main(["--params", str(root / "params.yaml"), "--out", str(root / "manifest.parquet"),
                         "--report", str(root / "report.json")])
    extract_stage.main(["--params", str(root / "params.yaml"), "--manifest", str(root / "manifest.parquet"),
                        "--out", str(root / "shards")])
    return root


def train_args(data: Path, run_dir: Path, params: Path) -> list[str]:
    return ["-m", "pipelines.stages.train", "--params", str(params), "--manifest", str(data / "manifest.parquet"),
            "--shards", str(data / "shards"), "--checkpoints", str(run_dir / "checkpoints"),
            "--out", str(run_dir / "model.pt"), "--log", str(run_dir / "log.csv")]


def test_training_resumes_across_runtime_settings_and_names_what_forbids_it(npy_pipeline, tmp_path):
    from pipelines.training import fingerprint, fingerprint_difference

    data = npy_pipeline
    params = yaml.safe_load((data / "params.yaml").read_text())
    done = run(train_args(data, tmp_path, data / "params.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    from pipelines.bundle import load_bundle

    model = load_bundle(tmp_path / "model.pt")

    # Another thread count and device: the finished run is resumed (nothing left to train), same model.
    runtime = {**params, "train": {**params["train"], "num_threads": 1, "device": "cpu"}}
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    done = run(train_args(data, tmp_path, tmp_path / "runtime.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after epoch 2" in done.stderr and "another configuration" not in done.stderr
    resumed = load_bundle(tmp_path / "model.pt")  # the same weights (its train_params record the new threads)
    assert resumed.selected_epoch == model.selected_epoch and resumed.state_dict.keys() == model.state_dict.keys()
    assert all(torch_equal(resumed.state_dict[k], model.state_dict[k]) for k in model.state_dict)

    # A real change: not resumed, and the log names the keys.
    changed = {**params, "train": {**params["train"], "lr": 0.002, "seed": 3}}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    done = run(train_args(data, tmp_path, tmp_path / "changed.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "belongs to another configuration (differing: " in done.stderr
    differing = done.stderr.split("(differing: ")[1].split(")")[0]
    assert "train.lr" in differing and "train.seed" in differing and "num_threads" not in differing

    parsed = lambda values: load_params_from(values, tmp_path)  # noqa: E731
    one, other = parsed(params), parsed(runtime)
    assert fingerprint(one, {"dim": 8, "package_version": "1"}, ["a"], ["b"]) == \
        fingerprint(other, {"dim": 8, "package_version": "2"}, ["a"], ["b"])
    assert fingerprint_difference(fingerprint(one, {"dim": 8}, ["a"], ["b"]),
                                  fingerprint(one, {"dim": 9}, ["a", "c"], ["b"])) == "features.dim, train_ids"
    assert "older version" in fingerprint_difference("0123abcd", fingerprint(one, {}, [], []))


def torch_equal(first, second) -> bool:
    import torch

    return torch.equal(first, second)


def load_params_from(values: dict, directory: Path):
    path = directory / "params_for_fingerprint.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_params(path)


# ----------------------------------------------------------------------------------------------
# Real videos (PyAV writes them, decord reads them)
# ----------------------------------------------------------------------------------------------

def write_video(path: Path, fps: float, frames: int, size: int = 32, faststart: bool = False, seed: int = 0) -> Path:
    """An h264 .mp4 of moving noise blocks (incompressible enough that cutting its end cuts frames)."""
    import av
    from fractions import Fraction

    rng = np.random.default_rng(seed)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "16"}
        for _ in range(frames):
            image = np.repeat(np.repeat(rng.integers(0, 255, (size // 4, size // 4, 3), dtype=np.uint8), 4, 0), 4, 1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


# ----------------------------------------------------------------------------------------------
# 8. a truncated video whose header is intact
# ----------------------------------------------------------------------------------------------

def test_a_truncated_video_with_an_intact_header_is_not_usable(tmp_path):
    import decord

    from extractors.video import VideoDecodeError, iter_frame_chunks, probe
    from pipelines.stages import manifest as manifest_stage

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "good_train.mp4", 8, 48)
    write_video(videos / "good_test.mp4", 8, 48, seed=1)
    whole = write_video(tmp_path / "whole.mp4", 8, 80, size=64, faststart=True, seed=2).read_bytes()
    assert whole.find(b"moov") < whole.find(b"mdat")  # the index comes first, so it survives the cut
    (videos / "cut.mp4").write_bytes(whole[:len(whole) - len(whole) // 200])  # the last 0.5 % lost
    assert len(decord.VideoReader(str(videos / "cut.mp4"))) == 80  # the header still claims every frame
    with pytest.raises(VideoDecodeError):  # and extraction would fail on it
        for _ in iter_frame_chunks(videos / "cut.mp4", None, 32, 16):
            pass
    assert probe(tmp_path / "whole.mp4").frames == 80

    annotations = {name: {"subset": subset, "duration": 6.0, "actions": [[0, 1.0, 2.0]]}
                   for name, subset in (("good_train", "training"), ("good_test", "testing"), ("cut", "training"))}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    params = write_params(tmp_path / "params.yaml", video_dir=str(videos), annotations=str(tmp_path / "annotations.json"))
    manifest_stage.main(["--params", str(params), "--out", str(tmp_path / "m.parquet"),
                         "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["videos"]["usable"] == 2 and report["counts"]["corrupt_video"] == 1
    assert "last frame" in report["examples"]["corrupt_video"][0]["detail"]


# ----------------------------------------------------------------------------------------------
# 9, 12. predict: resumable, one unit per video, failures as they happen; the training time scale
# ----------------------------------------------------------------------------------------------

I3D_CFG = dict(backbone="i3d", weights=None, fps=None, image_size=32, mode="fully_conv", chunk_frames=64,
               batch_size=4, device="cpu")


def make_i3d_checkpoint(path: Path, source_fps: float | None, seed: int = 0) -> dict:
    """A (random) model file for 1024-d random-init I3D features at the videos' native rate, as the
    train stage writes it (`source_fps`: what the extract stage records for such features)."""
    import dataclasses
    import math

    import torch

    import ms_temba
    from extractors.config import ExtractorConfig
    from extractors.run import ExtractionWorker, _shard_metadata
    from pipelines.bundle import ModelBundle, save_bundle

    cfg = ExtractorConfig(**I3D_CFG)
    features = _shard_metadata(cfg, ExtractionWorker(cfg).shard_metadata())
    if source_fps is not None:
        features["source_fps"] = source_fps
    torch.manual_seed(seed)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=1024, num_classes=3).eval()
    save_bundle(path, ModelBundle(
        model_name="ms_temba_tiny", model_config=dataclasses.asdict(model.config), state_dict=model.state_dict(),
        class_names=["a", "b", "c"], features=features, dataset="test", train_params={}, selected_epoch=1,
        val_map=math.nan, train_videos=[], val_videos=[]))
    return features


def predict_args(inputs, checkpoint: Path, out: Path, *extra) -> list[str]:
    return [*map(str, inputs), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
            "--min-duration", "0", *extra]


def test_predict_resamples_new_videos_to_the_training_time_scale(tmp_path, capsys):
    from pipelines.tools.predict import main as predict_main, read_probabilities

    video = write_video(tmp_path / "clip25.mp4", 25, 150)  # 6 s at 25 fps; the model learned 8 fps
    make_i3d_checkpoint(tmp_path / "model.pt", source_fps=8.0)
    assert predict_main(predict_args([video], tmp_path / "model.pt", tmp_path / "out")) == 0
    _, start, end, _ = read_probabilities(tmp_path / "out" / "clip25.probs.parquet")
    # I3D fully_conv: one feature per 8 frames, at 8 fps 1 s apart (not 8 / 25 = 0.32 s)
    np.testing.assert_allclose(np.diff(start), 1.0)
    assert len(start) == 6

    make_i3d_checkpoint(tmp_path / "unknown.pt", source_fps=None)  # an older checkpoint: refuse, say what to do
    capsys.readouterr()
    assert predict_main(predict_args([video], tmp_path / "unknown.pt", tmp_path / "out2")) == 2
    assert "native frame rate" in capsys.readouterr().err and not (tmp_path / "out2" / "clip25.probs.parquet").exists()
    assert predict_main(predict_args([video], tmp_path / "unknown.pt", tmp_path / "out2", "--fps", "8")) == 0
    np.testing.assert_allclose(np.diff(read_probabilities(tmp_path / "out2" / "clip25.probs.parquet")[1]), 1.0)


def test_predict_resumes_per_video_and_redoes_what_changed(tmp_path, capsys):
    from pipelines.tools.predict import main as predict_main

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        write_video(folder / f"v{i}.mp4", 8, 40, seed=i)
    make_i3d_checkpoint(tmp_path / "model.pt", source_fps=8.0)
    out = tmp_path / "out"

    def outputs():
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}

    assert predict_main(predict_args([folder], tmp_path / "model.pt", out, "--plot")) == 0
    first = outputs()
    assert len([n for n in first if n.endswith(".timeline.png")]) == 3
    capsys.readouterr()
    assert predict_main(predict_args([folder], tmp_path / "model.pt", out, "--plot")) == 0
    assert "3 video(s) predicted (3 already done)" in capsys.readouterr().out
    assert outputs() == first  # nothing rewritten

    # A video whose unit was cut short (killed after its segments, before its probs file): redone alone.
    (out / "v1.probs.parquet").unlink()
    (out / "v1.timeline.png").unlink()
    assert predict_main(predict_args([folder], tmp_path / "model.pt", out, "--plot")) == 0
    assert "(2 already done)" in capsys.readouterr().out
    again = outputs()
    assert {n: b for n, (_, b) in again.items()} == {n: b for n, (_, b) in first.items()}  # the same bytes
    assert all(again[n][0] == first[n][0] for n in first if not n.startswith("v1."))

    # Other settings, another checkpoint: redone.
    assert predict_main(predict_args([folder], tmp_path / "model.pt", out, "--plot", "--threshold-on", "0.6")) == 0
    assert "already done" not in capsys.readouterr().out
    make_i3d_checkpoint(tmp_path / "model.pt", source_fps=8.0, seed=1)
    assert predict_main(predict_args([folder], tmp_path / "model.pt", out, "--plot", "--threshold-on", "0.6")) == 0
    assert "already done" not in capsys.readouterr().out


def test_predict_records_failures_as_they_happen(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "a_broken.mp4").write_bytes(b"\x00" * 2000)  # sorted first
    for i in range(6):
        write_video(folder / f"v{i}.mp4", 8, 400, seed=i)  # 50 s each: the run lasts a while
    make_i3d_checkpoint(tmp_path / "model.pt", source_fps=8.0)
    out = tmp_path / "out"
    process = subprocess.Popen([PYTHON, "-m", "pipelines.tools.cli", "predict",
                                *predict_args([folder], tmp_path / "model.pt", out)],
                               cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "failures.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert still_running, "predict finished before its failure was on record"
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["video_id"] for f in failures] == ["a_broken"]
