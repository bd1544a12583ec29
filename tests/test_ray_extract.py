"""extractors.run on real Ray clusters: fan-out, resume, failure isolation, worker death, `ray job submit`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from extractors.config import ExtractorConfig, field_path
from extractors.files import file_sha256
from extractors.run import RANDOM_INIT_SEED, ExtractionSummary, extract_videos, load_config, main
from extractors.shards import SOURCES_FILE, FeatureStore, read_sources

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# A tiny random-init I3D on 32 x 32 frames: the fan-out is under test, not the backbone.
CONFIG = dict(backbone="i3d", weights=None, fps=8.0, image_size=32, mode="fully_conv", batch_size=4,
              chunk_frames=32, device="cpu", num_actors=2, videos_per_shard=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six synthetic videos plus one corrupt file, as {video_id: path}."""
    from extractors.synthetic import make_dataset

    root = tmp_path_factory.mktemp("dataset")
    make_dataset(root, num_videos=6, num_classes=4, seed=0, fps=8, size=32, min_duration=3.0, max_duration=6.0)
    videos = {path.stem: str(path) for path in sorted((root / "videos").glob("*.mp4"))}
    assert len(videos) == 6
    broken = root / "videos" / "broken.mp4"
    broken.write_bytes(os.urandom(3000))
    return {**videos, "broken": str(broken)}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_features(dataset):
    """Each good video extracted in this process, without Ray, from the same (seeded) random init."""
    import torch

    from extractors.backbones import build_extractor

    torch.manual_seed(RANDOM_INIT_SEED)
    extractor = build_extractor(ExtractorConfig(**CONFIG))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a num_cpus=1 actor, so the float sums run in the same order
    try:
        return {video_id: extractor.extract(path) for video_id, path in dataset.items() if video_id != "broken"}
    finally:
        torch.set_num_threads(threads)


def assert_store_matches(store: FeatureStore, reference) -> None:
    assert store.video_ids == sorted(reference)
    for video_id, expected in reference.items():
        actual = store.get(video_id)
        # Same weights (seeded random init), same frames, same thread count: the same numbers.
        np.testing.assert_array_equal(actual.features, expected.features)
        np.testing.assert_array_equal(actual.start_s, expected.start_s)
        np.testing.assert_array_equal(actual.end_s, expected.end_s)


def test_extract_resume_and_rebuild(local_ray, dataset, reference_features, tmp_path):
    cfg = ExtractorConfig(**CONFIG)
    out = tmp_path / "features"

    summary = extract_videos(dataset, cfg, out, progress=False)
    assert (summary.ok, summary.skipped, summary.failed) == (6, 0, 1)
    assert str(summary) == "6 ok, 0 skipped (already done), 1 failed"
    shards = sorted(p.name for p in out.glob("*.parquet"))
    assert shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]  # 7 ids, 3 per shard
    store = FeatureStore(out)
    assert_store_matches(store, reference_features)
    assert store.metadata["backbone"] == "i3d" and store.metadata["dim"] == 1024
    [failure] = store.failures
    assert (failure["video_id"], failure["path"], failure["error_type"]) == (
        "broken", dataset["broken"], "VideoDecodeError")
    assert dataset["broken"] in failure["message"]

    # Rerun: nothing left but the broken file, which is tried again and fails again.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    summary = extract_videos(dataset, cfg, out, progress=False)
    assert (summary.ok, summary.skipped, summary.failed) == (0, 6, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    assert len(FeatureStore(out).failures) == 1

    # Lose one shard: the rerun rebuilds exactly that one, under the same name.
    lost = out / "shard-00001.parquet"
    lost_ids = [v for v in store.video_ids if store.shard_of(v) == lost]
    lost.unlink()
    summary = extract_videos(dataset, cfg, out, progress=False)
    assert (summary.ok, summary.skipped) == (len(lost_ids), 6 - len(lost_ids))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before if name != lost.name)
    assert_store_matches(FeatureStore(out), reference_features)


def test_a_video_replaced_under_its_name_is_extracted_again(local_ray, dataset, reference_features, tmp_path):
    """Features are valid only for the file they came from: a video file given other content under
    the same name (a regenerated dataset, a re-encoded video) is extracted again on the rerun; the
    other videos are not, nor is a file rewritten with the same bytes."""
    cfg = ExtractorConfig(**CONFIG)
    folder, out = tmp_path / "videos", tmp_path / "features"
    folder.mkdir()
    videos = {}
    for video_id, path in dataset.items():
        if video_id != "broken":
            videos[video_id] = str(shutil.copy2(path, folder / Path(path).name))
    assert extract_videos(videos, cfg, out, progress=False) == ExtractionSummary(ok=6, skipped=0, failed=0)
    record = read_sources(out)
    assert sorted(record) == sorted(videos)
    assert record[next(iter(videos))]["sha256"] == file_sha256(next(iter(videos.values())))
    ids = FeatureStore(out).video_ids
    target, donor = ids[0], ids[-1]  # in shard-00000 and shard-00001
    shards = lambda: {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}  # noqa: E731
    before = shards()

    # Another video's content under the target's name.
    shutil.copyfile(videos[donor], videos[target])
    summary = extract_videos(videos, cfg, out, progress=False)
    assert summary == ExtractionSummary(ok=1, skipped=5, failed=0, changed=1)
    assert str(summary) == "1 ok, 5 skipped (already done), 0 failed; 1 extracted again: their video file changed"
    # Its features are a fresh extraction of the new file; the others' are untouched, and so is
    # the shard that does not hold it (the target's shard is rewritten: its rows plus the new ones).
    assert_store_matches(FeatureStore(out), {**reference_features, target: reference_features[donor]})
    after = shards()
    assert after.keys() == before.keys() and after["shard-00001.parquet"] == before["shard-00001.parquet"]
    assert read_sources(out)[target]["sha256"] == read_sources(out)[donor]["sha256"]

    # The same bytes with a new modification time: hashed again, recorded, nothing extracted.
    before = shards()
    untouched = ids[1]
    stat = os.stat(videos[untouched])
    os.utime(videos[untouched], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert extract_videos(videos, cfg, out, progress=False) == ExtractionSummary(ok=0, skipped=6, failed=0)
    assert shards() == before
    assert read_sources(out)[untouched]["mtime_ns"] == stat.st_mtime_ns + 5_000_000_000

    # A stored video with no record of its file (shards of an older version): extracted again.
    record = read_sources(out)
    del record[ids[4]]
    (out / SOURCES_FILE).write_text(json.dumps(record))
    summary = extract_videos(videos, cfg, out, progress=False)
    assert summary == ExtractionSummary(ok=1, skipped=5, failed=0, changed=1)
    assert_store_matches(FeatureStore(out), {**reference_features, target: reference_features[donor]})
    assert sorted(read_sources(out)) == sorted(videos)


def test_refuses_to_mix_extractors_in_one_directory(local_ray, dataset, tmp_path):
    good = {video_id: path for video_id, path in dataset.items() if video_id != "broken"}
    first = dict(sorted(good.items())[:1])
    extract_videos(first, ExtractorConfig(**CONFIG), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different extractor"):
        extract_videos(good, ExtractorConfig(**{**CONFIG, "image_size": 48}), tmp_path, progress=False)


def test_killed_worker_loses_nothing(local_ray, dataset, reference_features, tmp_path):
    """SIGKILL one actor process mid-run: Ray restarts it and retries its video; every good video ends up stored."""
    cfg = ExtractorConfig(**{**CONFIG, "videos_per_shard": 2})
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(summary=extract_videos(dataset, cfg, tmp_path,
                                                                                   progress=False)))
    run.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and run.is_alive() and time.monotonic() < deadline:
        # Our cluster was started by this process, so its workers are our descendants.
        for process in psutil.Process().children(recursive=True):
            try:
                if " ".join(process.cmdline()).startswith("ray::ExtractionWorker.extract"):
                    process.send_signal(signal.SIGKILL)
                    killed = process.pid
                    break
            except psutil.Error:
                continue
        time.sleep(0.01)
    run.join(timeout=120)
    assert killed is not None, "no worker was seen extracting"
    summary = outcome["summary"]
    assert (summary.ok, summary.failed) == (6, 1)
    assert_store_matches(FeatureStore(tmp_path), reference_features)
    assert [f["video_id"] for f in FeatureStore(tmp_path).failures] == ["broken"]


def test_workers_draw_the_same_random_init_and_leave_the_rng_alone(dataset):
    import torch

    from extractors.run import ExtractionWorker

    cfg = ExtractorConfig(**CONFIG)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, second = ExtractionWorker(cfg), ExtractionWorker(cfg)
    assert torch.equal(torch.rand(3), expected_draw)
    path = dataset["synthetic_0000"]
    np.testing.assert_array_equal(first.extract(path).features, second.extract(path).features)


def test_cli_rejects_bad_config(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    with pytest.raises(SystemExit) as exited:
        main(["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "backbone=resnet"])
    assert exited.value.code == 2 and "backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "no_such_key=1"])
    assert exited.value.code == 2


def test_find_videos_from_directory_and_manifest(tmp_path):
    from extractors.run import find_videos

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.avi").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a video")
    assert find_videos(tmp_path) == {"a": str(tmp_path / "a.mp4"), "b": str(tmp_path / "b.avi")}
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"x": "a.mp4", "y": {"path": "/abs/y.mp4", "fps": 30}}')
    assert find_videos(manifest) == {"x": str(tmp_path / "a.mp4"), "y": "/abs/y.mp4"}
    with pytest.raises(FileNotFoundError):
        find_videos(tmp_path / "absent")


def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "extractor.yaml"
    path.write_text("extractor:\n  backbone: i3d\n  fps: 25.0\n  num_actors: 3\n")
    cfg = load_config(path, ["image_size=64", "fps=null", "extractor.batch_size=2"])
    assert (cfg.backbone, cfg.fps, cfg.num_actors, cfg.image_size, cfg.batch_size) == ("i3d", None, 3, 64, 2)


# ----------------------------------------------------------------------------------------------
# `ray start` + `ray job submit`, as on a real cluster
# ----------------------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop_cluster(temp_dir: str) -> None:
    """Stop the cluster that lives in temp_dir, and only it (`ray stop` would stop every Ray on the machine)."""
    ours = []
    for process in psutil.process_iter():
        try:
            if temp_dir in " ".join(process.cmdline()):
                ours.append(process)
                ours.extend(process.children(recursive=True))
        except psutil.Error:
            continue
    for process in ours:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(ours, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    # The address file `ray start` left behind would send a later address-less ray.init() to a dead cluster.
    Path(temp_dir, "ray_current_cluster").unlink(missing_ok=True)


def test_ray_job_submit(dataset, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "features"
    try:
        subprocess.run(
            ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, text=True, timeout=120)
        # Dotted as in the params form: the backbone's own fields under its name (i3d.mode=...).
        overrides = [f"{field_path(key)}={'null' if value is None else value}" for key, value in CONFIG.items()]
        video_dir = Path(dataset["broken"]).parent
        job = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
             "--", "python", "-m", "extractors.run", "--videos", str(video_dir), "--out", str(out),
             "--no-progress", *overrides],
            env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "6 ok, 0 skipped (already done), 1 failed" in job.stdout
        assert "succeeded" in job.stdout
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    store = FeatureStore(out)
    assert len(store.video_ids) == 6 and [f["video_id"] for f in store.failures] == ["broken"]
