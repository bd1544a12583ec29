"""The manifest stage on real (tiny) videos with every kind of defect, and the .npy import."""
from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from extractors.shards import FeatureStore
from pipelines.stages import manifest as manifest_stage
from pipelines.config import compose_params
from pipelines.import_npy import import_npy

NUM_CLASSES = 6


def write_params(path, **dataset):
    params = compose_params(["experiment=tiny", "dataset.synthetic=null", f"dataset.num_classes={NUM_CLASSES}",
                             "dataset.class_names=null"])
    params["dataset"].update(dataset)
    path.write_text(yaml.safe_dump(params))
    return path


def pyav_frames_and_rate(path):
    """Independent reference: decode every frame with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, float(stream.average_rate)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from extractors.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    annotations = make_dataset(root, num_videos=3, num_classes=NUM_CLASSES, seed=1, fps=8, size=32,
                               min_duration=6.0, max_duration=8.0)
    # The defect counts below assume every generated video starts out with actions.
    assert all(entry["actions"] for entry in annotations.values())
    return root, annotations


def test_manifest_counts_every_defect_and_never_crashes(tmp_path, videos):
    source, generated = videos
    video_dir = tmp_path / "videos"
    shutil.copytree(source / "videos", video_dir)
    good = sorted(generated)
    (video_dir / "corrupt.mp4").write_bytes(b"this is not an mp4 file" * 50)
    (video_dir / "empty.mp4").write_bytes(b"")
    shutil.copy(video_dir / f"{good[0]}.mp4", video_dir / "unannotated.mp4")
    annotations = dict(generated)
    duration = generated[good[1]]["duration"]
    annotations[good[1]] = {**generated[good[1]], "actions": [
        [0, 0.5, 1.0], [NUM_CLASSES, 0.5, 1.0], [1, 2.0, 1.0], [2, -0.5, 1.0], [3, 1.0, duration + 5]]}
    annotations[good[2]] = {**generated[good[2]], "actions": []}
    annotations["corrupt"] = {"subset": "training", "duration": 3.0, "actions": [[0, 0.0, 1.0]]}
    annotations["empty"] = {"subset": "testing", "duration": 3.0, "actions": [[0, 0.0, 1.0]]}
    annotations["missing"] = {"subset": "training", "duration": 3.0, "actions": [[0, 0.0, 1.0]]}
    annotations["validation_only"] = {"subset": "validation", "duration": 3.0, "actions": []}
    annotations["broken_entry"] = {"subset": "training", "actions": [[0, 0, 1]]}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    params = write_params(tmp_path / "params.yaml", video_dir=str(video_dir),
                          annotations=str(tmp_path / "annotations.json"))

    out, report_path = tmp_path / "out" / "manifest.parquet", tmp_path / "out" / "report.json"
    manifest_stage.main(["--params", str(params), "--out", str(out), "--report", str(report_path)])

    report = json.loads(report_path.read_text())
    assert report["counts"] == {
        "class_out_of_range": 1, "end_before_start": 1, "start_before_zero": 1, "end_after_duration": 1,
        "no_actions": 2,  # good[2] and validation_only
        "corrupt_video": 2, "missing_video": 1, "unannotated_video": 1, "unknown_subset": 1, "malformed_entry": 1}
    assert report["examples"]["corrupt_video"][0]["video_id"] == "corrupt"
    rows = {row["video_id"]: row for row in pq.read_table(out).to_pylist()}
    assert {v: r["status"] for v, r in rows.items() if r["status"] != "ok"} == {
        "corrupt": "corrupt_video", "empty": "corrupt_video", "missing": "missing_video",
        "unannotated": "unannotated_video", "validation_only": "unknown_subset", "broken_entry": "malformed_entry"}
    assert report["videos"]["usable"] == 3 == sum(r["status"] == "ok" for r in rows.values())

    for video_id in good:  # probed values agree with PyAV decoding the whole file
        frames, rate = pyav_frames_and_rate(video_dir / f"{video_id}.mp4")
        assert (rows[video_id]["frames"], rows[video_id]["fps"]) == (frames, pytest.approx(rate))
        assert (rows[video_id]["width"], rows[video_id]["height"]) == (32, 32)
        assert rows[video_id]["duration_s"] == pytest.approx(generated[video_id]["duration"], abs=0.2)
    repaired = rows[good[1]]
    assert repaired["action_class"] == [0, 2, 3]
    assert repaired["action_start_s"] == [0.5, 0.0, 1.0]
    assert repaired["action_end_s"] == [1.0, 1.0, pytest.approx(duration)]


def test_frame_annotations_use_the_probed_rate(tmp_path, videos):
    source, generated = videos
    video_id = sorted(generated)[0]
    frames, rate = pyav_frames_and_rate(source / "videos" / f"{video_id}.mp4")
    other = sorted(generated)[1]  # the manifest needs a usable test video too
    other_frames, _ = pyav_frames_and_rate(source / "videos" / f"{other}.mp4")
    annotations = {video_id: {"subset": "training", "duration": frames, "actions": [[1, 8, 16]]},
                   other: {"subset": "testing", "duration": other_frames, "actions": []}}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    params = write_params(tmp_path / "params.yaml", video_dir=str(source / "videos"),
                          annotations=str(tmp_path / "annotations.json"), time_unit="frames")
    out = tmp_path / "manifest.parquet"
    manifest_stage.main(["--params", str(params), "--out", str(out), "--report", str(tmp_path / "r.json")])
    row = next(r for r in pq.read_table(out).to_pylist() if r["video_id"] == video_id)
    assert row["status"] == "ok"
    assert row["action_start_s"] == [pytest.approx(8 / rate)] and row["action_end_s"] == [pytest.approx(16 / rate)]
    assert row["annotated_duration_s"] == pytest.approx(frames / rate)


def test_missing_annotation_file_is_a_clear_error(tmp_path, videos):
    params = write_params(tmp_path / "params.yaml", video_dir=str(videos[0] / "videos"),
                          annotations=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="nope.json does not exist"):
        manifest_stage.main(["--params", str(params), "--out", str(tmp_path / "m.parquet"),
                             "--report", str(tmp_path / "r.json")])


def test_import_npy_round_trips_both_layouts(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "npy"
    src.mkdir()
    flat = rng.standard_normal((7, 5)).astype(np.float32)
    nested = rng.standard_normal((4, 1, 1, 5)).astype(np.float32)
    np.save(src / "flat.npy", flat)
    np.save(src / "nested.npy", nested)
    np.save(src / "wrong.npy", rng.standard_normal((3, 2, 5)))
    imported, failures = import_npy(src, tmp_path / "shards", hop_s=0.25, fps=24.0, videos_per_shard=1,
                                    show_progress=False)
    assert imported == 2
    assert [f["video_id"] for f in failures] == ["wrong"] and "(3, 2, 5)" in failures[0]["message"]

    store = FeatureStore(tmp_path / "shards")
    assert store.video_ids == ["flat", "nested"]
    assert store.metadata["backbone"] == "npy" and store.metadata["dim"] == 5 and store.metadata["hop_s"] == 0.25
    np.testing.assert_array_equal(store.get("flat").features, flat)
    np.testing.assert_array_equal(store.get("nested").features, nested[:, 0, 0, :])
    np.testing.assert_allclose(store.get("flat").start_s, [0.25 * t for t in range(7)])
    np.testing.assert_allclose(store.get("flat").end_s, [0.25 * (t + 1) for t in range(7)])
    assert [f["video_id"] for f in store.failures] == ["wrong"]
