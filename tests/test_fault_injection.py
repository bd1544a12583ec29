"""Fault injection (issue 17, docs/reliability.md): each long command SIGKILLed at seeded random points.

For each command (`extract` on a real local Ray cluster, `ms-temba import-npy`, `train`, `ms-temba
predict`), an uninterrupted run gives the reference outputs and the run's duration. The same command
then runs into fresh output folders and is killed at a chain of kill points, each run resuming what
the killed one left; a last run goes to the end. It must finish, leave no temporary file (in its
outputs and in its TMPDIR), and its outputs must be byte-identical to the reference (where an output
embeds timings, its deterministic content is compared instead; each place says why).

Every run is a real subprocess (`python -m pipelines.stages.<stage>`, or `python -m pipelines.tools.cli`, the
`ms-temba` command) in a session of its own; a kill is SIGKILL to its whole process group (for
`extract`: the driver and the Ray GCS, raylet, dashboard and agents it started). Every run gets a
private TMPDIR / RAY_TMPDIR and a marker in its environment, which every process it starts
inherits, so its processes are found wherever they are: Ray's workers run in sessions of their own,
out of the group's reach, and must exit by themselves once their raylet is gone (they do in ~2 s);
after a normal end nothing of the run may be left either. Whatever is left is killed, and the
private temporary folder (Ray's session files with it) deleted, so no later Ray can find a dead
cluster's address file there.

Kill points, drawn from a seeded RNG per command (`KillPoint`), in this order:
* a random (or no) delay after an output appears that was not there when the run started: the
  first new shard or video result, or the temporary file of an atomic write (killed inside the
  write: shards, checkpoints, the model file, a video's outputs);
* a random delay after the start, drawn within the uninterrupted run's measured duration.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from pipelines.config import PROJECT_ROOT, compose_params

pytestmark = pytest.mark.slow

PYTHON = sys.executable
SEED = 17
MARKER = "MS_TEMBA_FAULT_RUN"  # in the environment of every process a run starts
POLL_S = 0.002  # a temporary file of a checkpoint or shard write lives for 10-40 ms
RUN_TIMEOUT_S = 300
# Ray workers exit ~2 s after their raylet dies; on a loaded 2-core CI box one Python process of a
# killed `predict --ray` was once still there after 30 s (and gone in every rerun).
ORPHANS_EXIT_S = 90
# What libraries keep in TMPDIR by design, across runs: Ray's session folders, torch's compile cache.
LIBRARY_CACHES = ("ray", "torchinductor_")
NUM_CLASSES, EPOCHS = 8, 12


# ----------------------------------------------------------------------------------------------
# Running and killing a command
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KillPoint:
    """Kill `delay_s` seconds after the start (pattern None) or after a file whose name matches
    `pattern` first appears in one of the watched folders (one not there when the run started)."""

    delay_s: float
    pattern: str | None = None

    def __str__(self) -> str:
        return f"{self.delay_s:.2f} s after " + (f"a new {self.pattern}" if self.pattern else "the start")


@dataclass
class Outcome:
    point: KillPoint | None
    returncode: int
    seconds: float
    interrupted: bool  # still running when the kill came
    log: str
    left: list[str]  # what the watched folders held afterwards
    strays: list[str]  # processes of the run outside its process group, alive after the group's kill

    def __str__(self) -> str:
        what = "killed" if self.interrupted else f"had ended (exit {self.returncode})"
        temporary = [name for name in self.left if name.endswith(".tmp")]
        return (f"{self.point}: {what} at {self.seconds:.2f} s, leaving {len(self.left)} files"
                + (f", temporary: {', '.join(temporary)}" if temporary else "")
                + (f"; outside its process group, exited by themselves: {', '.join(self.strays)}"
                   if self.strays else ""))


def marked_processes(token: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == token:
                found.append(process)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    return found


def describe(process: psutil.Process) -> str:
    """pid, status and command line: which of Ray's processes (worker, dashboard, agent) it is."""
    try:
        return f"{process.pid} {process.status()}: {' '.join(process.cmdline())[:300]}"
    except psutil.Error:
        return f"{process.pid} (gone)"


def outside_group(processes: list[psutil.Process], group: int) -> list[str]:
    names = []
    for process in processes:
        try:
            if os.getpgid(process.pid) != group:
                names.append(process.name())
        except (psutil.Error, ProcessLookupError):
            pass
    return sorted(names)


def await_exit(token: str, timeout_s: float) -> list[psutil.Process]:
    """Wait until no process of the run is left, or timeout_s; those still alive then."""
    deadline = time.monotonic() + timeout_s
    while (alive := marked_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_marked(token: str) -> None:
    """SIGKILL whatever is left of a run (cleanup only: the test has failed if anything is)."""
    for _ in range(10):
        if not (survivors := marked_processes(token)):
            return
        for process in survivors:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(survivors, timeout=2)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended, and nothing it started is left in its group
        pass


def run_command(command: list[str], watch: list[Path], log_path: Path, point: KillPoint | None = None) -> Outcome:
    """Run `command` to its end (point None) or until `point`, then SIGKILL its process group and
    every process it started; check that no process and no temporary file of it is left outside."""
    token = uuid.uuid4().hex
    scratch = Path(tempfile.mkdtemp(prefix="fi", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, MARKER: token, "TMPDIR": str(scratch), "RAY_TMPDIR": str(scratch),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a private local cluster, never one that happens to run on the machine
    before = {(folder, name) for folder in watch if folder.is_dir() for name in os.listdir(folder)}
    strays: list[str] = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "w") as log:
            started = time.monotonic()
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                if point is None:
                    returncode = process.wait(timeout=RUN_TIMEOUT_S)
                    interrupted = False
                else:
                    interrupted = wait_for(process, point, watch, before, started)
                    kill_group(process.pid)
                    returncode = process.wait()
            except BaseException:
                kill_group(process.pid)
                process.wait()
                raise
            seconds = time.monotonic() - started
        if point is not None:
            strays = outside_group(marked_processes(token), process.pid)
        # A run that ended has shut its Ray cluster down; in a killed one, the Ray workers (each in
        # a session of its own, out of reach of the group's SIGKILL) exit when they lose the raylet.
        alive = await_exit(token, ORPHANS_EXIT_S)
        assert not alive, (f"processes of {command[2:4]} still alive {ORPHANS_EXIT_S} s after it: "
                           f"{[describe(process) for process in alive]}")
        junk = sorted(p.name for p in scratch.iterdir() if not p.name.startswith(LIBRARY_CACHES))
        assert not junk, f"temporary files left in TMPDIR by {command[2:4]}: {junk}"
    finally:
        kill_marked(token)
        shutil.rmtree(scratch, ignore_errors=True)
    left = sorted(name for folder in watch if folder.is_dir() for name in os.listdir(folder))
    return Outcome(point, returncode, seconds, interrupted, log_path.read_text(errors="replace"), left, strays)


def wait_for(process: subprocess.Popen, point: KillPoint, watch: list[Path], before: set[tuple[Path, str]],
             started: float) -> bool:
    """Wait for the kill point; True if the process is still running then."""
    clock = started if point.pattern is None else None
    while process.poll() is None:
        now = time.monotonic()
        if clock is None:
            for folder in watch:
                try:
                    names = os.listdir(folder)
                except FileNotFoundError:
                    continue
                if any(fnmatch.fnmatch(name, point.pattern) and (folder, name) not in before for name in names):
                    clock = now
                    break
        if clock is not None and now - clock >= point.delay_s:
            return process.poll() is None
        assert now - started < RUN_TIMEOUT_S, f"kill point {point} never came"
        time.sleep(POLL_S)
    return False


def kill_and_finish(command: list[str], watch: list[Path], logs: Path, points: list[KillPoint]) -> list[Outcome]:
    """Kill the command at each point in turn (each run resuming the previous one), then run it to
    its end; returns the outcomes, the last one the finishing run's."""
    outcomes = []
    for index, point in enumerate(points):
        outcome = run_command(command, watch, logs / f"kill-{index}.log", point)
        outcomes.append(outcome)
        print(f"{' '.join(command[2:4])}: {outcome}")
        if not outcome.interrupted:
            assert outcome.returncode == 0, outcome.log[-3000:]
    final = run_command(command, watch, logs / "final.log")
    assert final.returncode == 0, final.log[-3000:]
    return outcomes + [final]


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


def tree_digest(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under directory, hidden ones included."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_some_kills_interrupted(outcomes: list[Outcome], at_least: int) -> None:
    """At least `at_least` kills came while the command ran (a poll may miss a short-lived
    temporary file; a kill at a random time may come after the end): the test is not vacuous."""
    interrupted = [o for o in outcomes if o.interrupted]
    assert len(interrupted) >= at_least, "\n".join(map(str, outcomes))


# ----------------------------------------------------------------------------------------------
# Data: a small synthetic video dataset through the manifest stage
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic videos, params.yaml (tiny model, 32 x 32 I3D, one video per shard) and the manifest."""
    from extractors.synthetic import make_dataset
    from pipelines.stages import manifest as manifest_stage

    root = tmp_path_factory.mktemp("data")
    make_dataset(root / "generated", num_videos=8, num_classes=NUM_CLASSES, seed=0, fps=8, size=32,
                 min_duration=12.0, max_duration=16.0)
    params = compose_params([
        "experiment=tiny", "dataset.synthetic=null", f"dataset.num_classes={NUM_CLASSES}",
        f"dataset.video_dir={root / 'generated' / 'videos'}",
        f"dataset.annotations={root / 'generated' / 'annotations.json'}",
        f"dataset.class_names={root / 'generated' / 'classes.txt'}",
        "extractor.image_size=32", "extractor.chunk_frames=160", "extractor.batch_size=4", "extractor.device=cpu",
        "extractor.videos_per_shard=1", f"train.epochs={EPOCHS}", "train.num_threads=1", "train.device=cpu"])
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    manifest_stage.main(["--params", str(root / "params.yaml"), "--out", str(root / "manifest.parquet"),
                         "--report", str(root / "manifest_report.json")])
    (root / "broken.mp4").write_bytes(os.urandom(3000))  # for predict: a video that fails
    # The C++ scan is compiled the first time a scan runs on a machine (ms_temba/ops): here, not
    # in a run whose duration is measured.
    import ms_temba

    ms_temba.create_model("ms_temba_tiny", in_dim=8, num_classes=2)(torch.randn(1, 16, 8))
    return root


def points_for(name: str, duration_s: float, triggers: list[tuple[str, float]]) -> list[KillPoint]:
    """The given (pattern, maximum delay) triggers, each with a random delay up to its maximum, then
    a random delay after the start within the uninterrupted run's duration; seeded per command.
    The triggers come first: each consumes little of the work, so each finds some left, where a
    kill at a random time may come after the work is done (during the shutdown)."""
    rng = random.Random(f"{SEED}:{name}")
    return [*(KillPoint(rng.uniform(0, most), pattern) for pattern, most in triggers),
            KillPoint(rng.uniform(0.1, 0.9) * duration_s)]


# ----------------------------------------------------------------------------------------------
# extract, on a real local Ray cluster
# ----------------------------------------------------------------------------------------------

def extract_command(data: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "pipelines.stages.extract", "--params", str(data / "params.yaml"),
            "--manifest", str(data / "manifest.parquet"), "--out", str(out)]


@pytest.fixture(scope="module")
def reference_extract(data, tmp_path_factory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("extract_reference")
    out = root / "shards"
    outcome = run_command(extract_command(data, out), [out], root / "logs" / "run.log")
    assert outcome.returncode == 0, outcome.log[-3000:]
    assert len(list(out.glob("shard-*.parquet"))) == 8
    print(f"extract, uninterrupted: {outcome.seconds:.2f} s")
    return out, outcome.seconds


def test_extract_on_ray_killed_anywhere_resumes_to_the_same_shards(data, reference_extract, tmp_path):
    reference, duration = reference_extract
    out = tmp_path / "run" / "shards"
    # Inside a shard's write; between shards, with actors busy; at a random time (mostly inside
    # Ray's start: the cluster half up, actors building the backbone).
    points = points_for("extract", duration, [(".shard-*.parquet.*.tmp", 0.0), ("shard-*.parquet", 0.3)])
    outcomes = kill_and_finish(extract_command(data, out), [out], tmp_path / "logs", points)
    assert_some_kills_interrupted(outcomes, 2)
    assert "skipped (already done)" in outcomes[-1].log
    assert temporaries(tmp_path / "run") == []
    # Shards, extraction.json: byte for byte (same features from the seeded random init, one
    # thread per actor; the footer holds no time or path).
    assert tree_digest(out) == tree_digest(reference)


# ----------------------------------------------------------------------------------------------
# ms-temba import-npy
# ----------------------------------------------------------------------------------------------

def import_command(src: Path, out: Path, hop_s: float) -> list[str]:
    return [PYTHON, "-m", "pipelines.tools.cli", "import-npy", "--src", str(src), "--out", str(out),
            "--hop-s", str(hop_s), "--videos-per-shard", "2"]


def test_import_npy_killed_anywhere_resumes_to_the_same_store(tmp_path):
    src = tmp_path / "npy"
    src.mkdir()
    rng = np.random.default_rng(SEED)
    for index in range(15):
        np.save(src / f"v{index:03d}.npy", rng.standard_normal((1500, 64)).astype(np.float32))
    # A failure on record (failures.jsonl must come out the same), in one group with a good file.
    (src / "v999.npy").write_bytes(b"")

    references = {}
    for hop_s in (0.5, 0.25):
        reference = tmp_path / f"reference-{hop_s}" / "shards"
        outcome = run_command(import_command(src, reference, hop_s), [reference], tmp_path / "logs" / "reference.log")
        assert outcome.returncode == 0, outcome.log[-3000:]
        print(f"import-npy --hop-s {hop_s}, uninterrupted: {outcome.seconds:.2f} s")
        references[hop_s] = (reference, outcome.seconds)

    # A fresh import, killed at random points.
    out = tmp_path / "run" / "shards"
    staging = out.with_name(".shards.import.tmp")
    watch = [out, out.parent, staging]
    points = points_for("import-npy", references[0.5][1], [(".npy-*.parquet.*.tmp", 0.0), ("npy-*.parquet", 0.05)])
    outcomes = kill_and_finish(import_command(src, out, 0.5), watch, tmp_path / "logs" / "fresh", points)
    assert_some_kills_interrupted(outcomes, 2)
    assert temporaries(tmp_path / "run") == []
    assert tree_digest(out) == tree_digest(references[0.5][0])  # import_npy.json too: same source path

    # Re-imported into the same folder with another --hop-s: the new store is built beside the old
    # one (.shards.import.tmp) and swapped in when complete. Killed inside a write of the new
    # store, and between its shards.
    points = points_for("import-npy-again", references[0.25][1], [(".npy-*.parquet.*.tmp", 0.0),
                                                                   ("npy-*.parquet", 0.05)])
    outcomes = kill_and_finish(import_command(src, out, 0.25), watch, tmp_path / "logs" / "again", points)
    assert_some_kills_interrupted(outcomes, 2)
    assert temporaries(tmp_path / "run") == [] and sorted(os.listdir(out.parent)) == ["shards"]
    assert tree_digest(out) == tree_digest(references[0.25][0])


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------

def train_command(data: Path, shards: Path, run: Path) -> list[str]:
    return [PYTHON, "-m", "pipelines.stages.train", "--params", str(data / "params.yaml"),
            "--manifest", str(data / "manifest.parquet"), "--shards", str(shards),
            "--checkpoints", str(run / "models" / "checkpoints"), "--out", str(run / "models" / "model.pt"),
            "--log", str(run / "reports" / "train_log.csv")]


def train_watch(run: Path) -> list[Path]:
    return [run / "models" / "checkpoints", run / "models", run / "reports"]


@pytest.fixture(scope="module")
def reference_train(data, reference_extract, tmp_path_factory) -> tuple[Path, float]:
    shards, _ = reference_extract
    run = tmp_path_factory.mktemp("train_reference")
    outcome = run_command(train_command(data, shards, run), train_watch(run), run / "logs" / "run.log")
    assert outcome.returncode == 0, outcome.log[-3000:]
    print(f"train, uninterrupted: {outcome.seconds:.2f} s")
    return run, outcome.seconds


def log_without_timing(path: Path) -> list[str]:
    return [line.rsplit(",", 1)[0] for line in path.read_text().splitlines()]  # the last column: wall time


def checkpoint_without_timing(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for epoch in checkpoint["history"]:
        epoch.pop("seconds")
    return checkpoint


def assert_same(expected, actual, where: str = "") -> None:
    """Deep equality of nested dicts/lists of tensors, arrays and plain values."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(expected, actual, err_msg=where)
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (first, second) in enumerate(zip(expected, actual)):
            assert_same(first, second, f"{where}[{index}]")
    elif isinstance(expected, float) and np.isnan(expected):
        assert np.isnan(actual), where
    else:
        assert expected == actual, where


def test_train_killed_anywhere_resumes_to_the_same_model(data, reference_extract, reference_train, tmp_path):
    shards, _ = reference_extract
    reference, duration = reference_train
    run = tmp_path / "run"
    # Inside a checkpoint's write; between two checkpoints (an epoch takes ~0.2 s); inside the
    # final model file's write, after the last epoch; at a random time.
    points = points_for("train", duration, [(".last.pt.*.tmp", 0.0), (".last.pt.*.tmp", 0.3), (".model.pt.*.tmp", 0.0)])
    outcomes = kill_and_finish(train_command(data, shards, run), train_watch(run), tmp_path / "logs", points)
    assert_some_kills_interrupted(outcomes, 2)
    assert "resuming after epoch" in outcomes[-1].log
    assert temporaries(run) == []
    assert sorted(os.listdir(run / "models" / "checkpoints")) == ["last.pt"]
    # The model file: byte for byte.
    assert (run / "models" / "model.pt").read_bytes() == (reference / "models" / "model.pt").read_bytes()
    # The log and the checkpoint record each epoch's wall time: everything else is the same.
    assert log_without_timing(run / "reports" / "train_log.csv") == \
        log_without_timing(reference / "reports" / "train_log.csv")
    assert_same(checkpoint_without_timing(reference / "models" / "checkpoints" / "last.pt"),
                checkpoint_without_timing(run / "models" / "checkpoints" / "last.pt"), "last.pt")


# ----------------------------------------------------------------------------------------------
# ms-temba predict
# ----------------------------------------------------------------------------------------------

def predict_command(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "pipelines.tools.cli", "predict", str(data / "generated" / "videos"), str(data / "broken.mp4"),
            "--checkpoint", str(model), "--out", str(out), "--device", "cpu", "--plot", "--html", *extra]


def test_predict_killed_anywhere_resumes_to_the_same_outputs(data, reference_train, tmp_path):
    model = reference_train[0] / "models" / "model.pt"
    reference = tmp_path / "reference" / "predictions"  # a sibling of the killed run's: the pages link
    outcome = run_command(predict_command(data, model, reference), [reference], tmp_path / "logs" / "reference.log")
    assert outcome.returncode == 0, outcome.log[-3000:]
    assert len(list(reference.glob("*.probs.parquet"))) == 8 and (reference / "failures.jsonl").exists()
    print(f"predict, uninterrupted: {outcome.seconds:.2f} s")

    out = tmp_path / "run" / "predictions"
    # Inside a video's unit (its segments written, not yet its probabilities file, the unit's
    # commit record); inside any atomic write; between two videos; at a random time.
    points = points_for("predict", outcome.seconds, [("*.segments.json", 0.0), (".*.tmp", 0.0),
                                                     ("*.probs.parquet", 0.3)])
    outcomes = kill_and_finish(predict_command(data, model, out), [out], tmp_path / "logs", points)
    assert_some_kills_interrupted(outcomes, 2)
    assert "already done" in outcomes[-1].log
    assert temporaries(tmp_path / "run") == []
    # Probabilities (with their run record: checkpoint hash, settings, input path and mtime),
    # segments, timelines, pages, failures.jsonl: byte for byte.
    assert tree_digest(out) == tree_digest(reference)


def test_predict_on_ray_killed_resumes_to_the_same_outputs(data, reference_train, tmp_path):
    """`predict --ray` extracts every video first, on a local Ray cluster, into a temporary shard
    folder, then predicts from it."""
    model = reference_train[0] / "models" / "model.pt"
    # Its own reference: a Ray actor extracts with one thread, `predict` without Ray with all, and
    # float sums in another order may differ in the last bit.
    reference = tmp_path / "reference" / "predictions"
    outcome = run_command(predict_command(data, model, reference, "--ray"), [reference],
                          tmp_path / "logs" / "reference.log")
    assert outcome.returncode == 0, outcome.log[-3000:]
    print(f"predict --ray, uninterrupted: {outcome.seconds:.2f} s")

    out = tmp_path / "run" / "predictions"
    # Among the videos' predictions, with the extracted features on disk; at a random time.
    points = points_for("predict-ray", outcome.seconds, [("*.probs.parquet", 0.2)])
    outcomes = kill_and_finish(predict_command(data, model, out, "--ray"), [out], tmp_path / "logs", points)
    assert_some_kills_interrupted(outcomes, 1)
    assert temporaries(tmp_path / "run") == []
    assert tree_digest(out) == tree_digest(reference)
