"""extractors.shards: Parquet layout, round trips, atomic writes, per-video reads, metadata checks."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractors.shards import FeatureStore, VideoFeatures, read_failures, write_failures, write_shard

METADATA = {"backbone": "i3d", "dim": 12, "checkpoint_sha256": "random", "pretrained": False, "fps": 24.0,
            "snippet_len": 16, "stride": 16, "mode": "fully_conv", "image_size": 224}


def random_videos(seed: int, count: int, dim: int = 12) -> dict[str, VideoFeatures]:
    rng = np.random.default_rng(seed)
    videos = {}
    for number in range(count):
        length = int(rng.integers(1, 40))
        start = np.sort(rng.uniform(0, 100, length))
        videos[f"vid{seed}_{number:02d}"] = VideoFeatures(
            features=rng.standard_normal((length, dim)).astype(np.float32),
            start_s=start, end_s=start + rng.uniform(0.1, 2.0, length))
    return videos


def assert_same(actual: VideoFeatures, expected: VideoFeatures) -> None:
    assert actual.features.dtype == np.float32 and actual.start_s.dtype == np.float64
    np.testing.assert_array_equal(actual.features, expected.features)  # exact, bit for bit
    np.testing.assert_array_equal(actual.start_s, expected.start_s)
    np.testing.assert_array_equal(actual.end_s, expected.end_s)


def test_round_trip_is_exact_across_shards(tmp_path):
    first, second = random_videos(0, 5), random_videos(1, 3)
    assert write_shard(tmp_path / "shard-00000.parquet", first.items(), METADATA) == 5
    assert write_shard(tmp_path / "shard-00001.parquet", second.items(), METADATA) == 3
    store = FeatureStore(tmp_path)
    everything = {**first, **second}
    assert store.video_ids == sorted(everything) and len(store) == 8 and "vid1_02" in store
    for video_id, expected in everything.items():
        assert_same(store.get(video_id), expected)
    iterator = iter(store)
    assert inspect.isgenerator(iterator)
    assert [video_id for video_id, _ in iterator] == sorted(everything)


def test_file_layout_one_row_group_per_video(tmp_path):
    videos = random_videos(2, 4)
    write_shard(tmp_path / "s.parquet", videos.items(), METADATA)
    parquet = pq.ParquetFile(tmp_path / "s.parquet")
    assert parquet.schema_arrow.field("feature").type == pa.list_(pa.float32(), 12)
    assert parquet.schema_arrow.field("index").type == pa.int32()
    assert parquet.num_row_groups == 4
    for row_group, (video_id, video) in enumerate(videos.items()):
        table = parquet.read_row_group(row_group)
        assert table.column("video_id").to_pylist() == [video_id] * len(video)
        assert table.column("index").to_pylist() == list(range(len(video)))
        statistics = parquet.metadata.row_group(row_group).column(0).statistics
        assert statistics.min == statistics.max == video_id


def test_get_reads_only_that_videos_row_group(tmp_path):
    # Overwrite the bytes of every other row group's column chunks with garbage: reading the whole
    # file then fails, but get() of the untouched video still returns it exactly.
    videos = random_videos(3, 4, dim=64)
    path = tmp_path / "s.parquet"
    write_shard(path, videos.items(), METADATA | {"dim": 64})
    keep = 2
    footer = pq.read_metadata(path)
    data = bytearray(path.read_bytes())
    for row_group in range(footer.num_row_groups):
        if row_group == keep:
            continue
        for column in range(footer.num_columns):
            chunk = footer.row_group(row_group).column(column)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))

    store = FeatureStore(tmp_path)  # the footer is intact, so the index still loads
    video_ids = list(videos)
    assert_same(store.get(video_ids[keep]), videos[video_ids[keep]])
    with pytest.raises(Exception):
        store.get(video_ids[0])
    with pytest.raises(Exception):
        pq.read_table(path)


def failing_items(videos, after: int):
    for number, item in enumerate(videos.items()):
        if number == after:
            raise RuntimeError("extractor crashed")
        yield item


def test_crash_inside_items_leaves_no_partial_shard_nor_temporary_file(tmp_path):
    with pytest.raises(RuntimeError, match="extractor crashed"):
        write_shard(tmp_path / "shard-00000.parquet", failing_items(random_videos(4, 5), after=3), METADATA)
    assert list(tmp_path.iterdir()) == []
    assert FeatureStore(tmp_path).video_ids == []


def test_failed_rewrite_keeps_the_previous_shard(tmp_path):
    path = tmp_path / "shard-00000.parquet"
    original = random_videos(5, 3)
    write_shard(path, original.items(), METADATA)
    with pytest.raises(RuntimeError):
        write_shard(path, failing_items(random_videos(6, 3), after=2), METADATA)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    store = FeatureStore(tmp_path)
    assert store.video_ids == sorted(original)
    assert_same(store.get("vid5_01"), original["vid5_01"])


def test_metadata_round_trip(tmp_path):
    metadata = METADATA | {"checkpoint_sha256": "ab" * 32, "pretrained": True, "extra": {"mean": [0.5, 0.5]}}
    write_shard(tmp_path / "s.parquet", random_videos(7, 2).items(), metadata)
    stored = FeatureStore(tmp_path).metadata
    assert {key: stored[key] for key in metadata} == metadata
    assert isinstance(stored["package_version"], str) and stored["package_version"]
    raw = pq.read_schema(tmp_path / "s.parquet").metadata[b"ms_temba.extractor"]
    assert json.loads(raw)["backbone"] == "i3d"  # plain JSON, readable by any Parquet tool


@pytest.mark.parametrize("key,value", [("dim", 8), ("backbone", "clip")])
def test_shards_from_different_extractors_are_refused(tmp_path, key, value):
    write_shard(tmp_path / "a.parquet", random_videos(8, 2).items(), METADATA)
    write_shard(tmp_path / "b.parquet", random_videos(9, 2, dim=METADATA["dim"] if key != "dim" else value).items(),
                METADATA | {key: value})
    with pytest.raises(ValueError, match=key) as raised:
        FeatureStore(tmp_path)
    assert "a.parquet" in str(raised.value) and "b.parquet" in str(raised.value)


def test_bad_writes_are_refused(tmp_path):
    videos = random_videos(10, 2)
    with pytest.raises(ValueError, match="dim"):
        write_shard(tmp_path / "s.parquet", videos.items(), METADATA | {"dim": 13})
    with pytest.raises(ValueError, match="twice"):
        write_shard(tmp_path / "s.parquet", [("a", videos["vid10_00"]), ("a", videos["vid10_01"])], METADATA)
    with pytest.raises(ValueError, match="backbone"):
        write_shard(tmp_path / "s.parquet", videos.items(), {"dim": 12})
    empty = VideoFeatures(np.zeros((0, 12), np.float32), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="no features"):
        write_shard(tmp_path / "s.parquet", [("empty", empty)], METADATA)
    assert list(tmp_path.iterdir()) == []


def test_the_same_video_in_two_shards_is_refused(tmp_path):
    videos = random_videos(11, 2)
    write_shard(tmp_path / "a.parquet", videos.items(), METADATA)
    write_shard(tmp_path / "b.parquet", videos.items(), METADATA)
    with pytest.raises(ValueError, match="stored twice"):
        FeatureStore(tmp_path)


def test_missing_video_and_missing_directory(tmp_path):
    write_shard(tmp_path / "a.parquet", random_videos(12, 1).items(), METADATA)
    with pytest.raises(KeyError, match="nope"):
        FeatureStore(tmp_path).get("nope")
    with pytest.raises(FileNotFoundError):
        FeatureStore(tmp_path / "absent")


def test_failures_file_round_trip(tmp_path):
    failures = [{"video_id": "bad", "path": "/v/bad.mp4", "error_type": "VideoDecodeError", "message": "empty"}]
    write_failures(tmp_path, failures)
    assert read_failures(tmp_path) == failures == FeatureStore(tmp_path).failures
    assert [p.name for p in tmp_path.iterdir()] == ["failures.jsonl"]


def test_video_features_validates_shapes():
    with pytest.raises(ValueError, match="start_s"):
        VideoFeatures(np.zeros((3, 4)), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(T, dim\)"):
        VideoFeatures(np.zeros(3), np.zeros(3), np.zeros(3))
    video = VideoFeatures(np.zeros((3, 4), np.float64), [0, 1, 2], [1, 2, 3])
    assert video.features.dtype == np.float32 and video.end_s.dtype == np.float64 and video.dim == 4
