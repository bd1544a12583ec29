"""Feature extraction over Ray: videos fan out to actors that each hold one backbone; the driver writes shards.

    extract_videos({video_id: path}, cfg, out_dir)  ->  ExtractionSummary(ok, skipped, failed, changed)

How the work is organised, and why:

* Shards. Videos are sorted by id and cut into groups of `cfg.videos_per_shard`; group g is written
  to `shard-{g:05d}.parquet`. The same video set always gives the same shard names, so deleting a
  shard and rerunning rebuilds exactly that shard. Only the driver writes shards, each one
  atomically (`shards.write_shard`) once every video of its group has come back, so a shard on
  disk is always complete and a crash anywhere loses at most the groups still in flight.
* Resuming. A video is done when it is in a shard present in `out_dir` (the shards are the
  done-list) and its video file is the one its features were computed from. `sources.json` in
  `out_dir` records each video file's size, modification time and sha256
  (`extractors.shards.changed_sources`); at the start of a run, a stored video whose file now has
  other content (replaced, re-encoded, regenerated under the same name), or that has no record, is
  removed from its shard (the shard is rewritten without it, or deleted if nothing else is in it)
  before the new record is written, and extracted again (`ExtractionSummary.changed`). Only files
  whose size or modification time changed are hashed again; one rewritten with the same bytes is
  not extracted again. A rerun extracts only the videos not done; when a group's shard already
  exists (some of its videos had failed before, or were removed as stale), it is rewritten with
  its old rows plus the new ones.
* Actors. One per GPU (num_gpus=1) when the cluster has GPUs and cfg.device allows, else one per
  CPU core (num_cpus=1), or cfg.num_actors. Each builds the backbone once and pulls one video at a
  time, so a long video never holds up the queue and a failure concerns one video only.
* Failures. An exception while extracting a video (VideoDecodeError, ...) is recorded in
  `out_dir/failures.jsonl` and the run goes on. A worker process that dies (killed, out of memory)
  is restarted by Ray and the video retried once on it (max_restarts, max_task_retries); if it
  dies again the video is recorded as failed and the actor replaced. Failed videos are retried by
  the next run.

CLI (also the entrypoint of `ray job submit`, see docs/extraction.md):

    python -m extractors.run --videos DIR_OR_MANIFEST --out OUT_DIR [--config extractor.yaml]
                             [--ray-address ADDR] [key=value ...]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from extractors.config import ExtractorConfig
from extractors.shards import (FeatureStore, VideoFeatures, _read_footer, changed_sources, failure_record, iter_shard,
                               metadata_mismatch, remove_stale_temporaries, write_failures, write_shard, write_sources)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
# A worker process that dies is restarted this often; the video it was working on is retried once.
ACTOR_MAX_RESTARTS = 2
ACTOR_MAX_TASK_RETRIES = 1
# Seeded before each actor builds its backbone: without a checkpoint the weights are a random init,
# and every actor (and every restart) must draw the same one or shards would mix different networks.
RANDOM_INIT_SEED = 0


class ExtractorBuildError(RuntimeError):
    """The backbone could not be built in a worker (bad weights path, unknown model, ...)."""


@dataclass(frozen=True)
class ExtractionSummary:
    ok: int  # videos extracted and written by this run
    skipped: int  # videos already in a shard
    failed: int  # videos recorded in failures.jsonl by this run
    changed: int = 0  # stored videos whose file changed: their features were dropped and extracted again

    def __str__(self) -> str:
        text = f"{self.ok} ok, {self.skipped} skipped (already done), {self.failed} failed"
        return text + (f"; {self.changed} extracted again: their video file changed" if self.changed else "")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def plan_shards(video_ids: Iterable[str], videos_per_shard: int) -> list[list[str]]:
    """Sorted ids cut into consecutive groups; group g goes to shard_name(g)."""
    ordered = sorted(video_ids)
    return [ordered[start:start + videos_per_shard] for start in range(0, len(ordered), videos_per_shard)]


class ExtractionWorker:
    """The body of one Ray actor: builds the backbone once, then extracts one video per call."""

    def __init__(self, cfg: ExtractorConfig):
        import torch

        from extractors.backbones import build_extractor  # imported in the worker process

        # fork_rng: seed the build without changing the random state of a process that builds a
        # worker in-process (pipelines.tools.predict does). Weights are initialised on the CPU.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            self.extractor = build_extractor(cfg)

    def shard_metadata(self) -> dict[str, Any]:
        return dict(self.extractor.metadata())

    def extract(self, path: str) -> VideoFeatures:
        return self.extractor.extract(path)


def _shard_metadata(cfg: ExtractorConfig, extractor_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone's own description, completed with the sampling settings it may leave out."""
    defaults = {"fps": cfg.fps, "image_size": cfg.image_size, "mode": cfg.mode,
                "snippet_len": cfg.snippet_len, "stride": cfg.stride}
    return {**defaults, **extractor_metadata}


def _connect(ray_address: str | None) -> bool:
    """Join the cluster this process is already in, `ray_address`, or RAY_ADDRESS (set for `ray job
    submit` drivers); else start a private local cluster. Returns True if this call started Ray.

    Without an address we start Ray with address="local" rather than ray.init()'s default, which
    would silently join whatever cluster was last started with `ray start` on this machine.
    Pass ray_address="auto" to get that behaviour.
    """
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True)
    else:
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 ignore_reinit_error=True)
    return True


def _actor_class(cfg: ExtractorConfig):
    """(the Ray actor class with its resources, how many actors) for this cluster and config."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if cfg.device != "cpu" else 0
    per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    # More actors than the cluster can place would never start, and the videos handed to them
    # would wait forever: cap num_actors at the cluster's GPUs (or CPUs).
    capacity = gpus or max(1, int(resources.get("CPU", 1)))
    count = min(cfg.num_actors or capacity, capacity)
    actor = ray.remote(ExtractionWorker).options(
        **per_actor, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_TASK_RETRIES)
    return actor, count


def _failure(video_id: str, path: str, error: BaseException) -> dict[str, str]:
    import ray.exceptions

    if isinstance(error, ray.exceptions.RayTaskError):  # the task raised: report the original exception
        error = error.cause if error.cause is not None else error
    elif isinstance(error, ray.exceptions.RayActorError):
        return failure_record(video_id, path, "WorkerDied",
                              "the worker process died while extracting this video, twice (retried once)")
    return failure_record(video_id, path, error)


def extract_videos(videos: Mapping[str, str | os.PathLike], cfg: ExtractorConfig, out_dir: str | os.PathLike,
                   ray_address: str | None = None, progress: bool = True,
                   extra_metadata: Mapping[str, Any] | None = None) -> ExtractionSummary:
    """Extract features of `videos` ({video_id: path}) into Parquet shards in out_dir, skipping videos
    already there. Per-video failures are recorded in out_dir/failures.jsonl, never raised.
    `extra_metadata` is added to the shards' metadata (the pipeline records `source_fps` there)."""
    import ray
    import ray.exceptions
    from tqdm import tqdm

    if not isinstance(cfg, ExtractorConfig):
        raise TypeError(f"cfg must be an ExtractorConfig, got {type(cfg).__name__}")
    for video_id in videos:
        if not isinstance(video_id, str) or not video_id:
            raise ValueError(f"video ids must be non-empty strings, got {video_id!r}")
    paths = {video_id: os.fspath(path) for video_id, path in videos.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # a killed run's half-written shard or failures file

    store = FeatureStore(out_dir)
    changed = drop_changed_videos(out_dir, store, paths)
    if changed:
        store = FeatureStore(out_dir)
    skipped = sum(video_id in store for video_id in paths)
    groups = plan_shards(paths, cfg.videos_per_shard)
    pending = {shard: [v for v in group if v not in store] for shard, group in enumerate(groups)}
    pending = {shard: members for shard, members in pending.items() if members}
    queue = collections.deque(video_id for members in pending.values() for video_id in members)
    shard_of = {video_id: shard for shard, members in pending.items() for video_id in members}
    # Earlier failures of videos not attempted now stay on record; this run's attempts replace the rest.
    failures = [f for f in store.failures if f.get("video_id") not in shard_of]
    if not queue:
        return ExtractionSummary(ok=0, skipped=skipped, failed=0, changed=len(changed))

    started_ray = _connect(ray_address)
    actor_class, num_actors = _actor_class(cfg)
    actors = [actor_class.remote(cfg) for _ in range(min(num_actors, len(queue)))]
    try:
        # Building the backbone fails the same way in every actor (bad weights path, ...): that is
        # a configuration error, raised here before any video is attempted.
        try:
            metadata = {**_shard_metadata(cfg, ray.get(actors[0].shard_metadata.remote())), **(extra_metadata or {})}
        except ray.exceptions.RayActorError as error:
            raise ExtractorBuildError(f"building the {cfg.backbone!r} extractor failed: {error}") from error
        if store.metadata and (differing := metadata_mismatch(store.metadata, metadata)):
            raise ValueError(f"{out_dir} holds features of a different extractor (differs in {differing}); "
                             f"use another output directory")

        results: dict[int, dict[str, VideoFeatures]] = {shard: {} for shard in pending}
        remaining = {shard: len(members) for shard, members in pending.items()}
        in_flight: dict[ray.ObjectRef, tuple[Any, str]] = {}
        idle = list(actors)
        ok = failed = 0
        with tqdm(total=len(queue), desc="extract", unit="video", disable=not progress) as bar:
            while queue or in_flight:
                while idle and queue:
                    actor, video_id = idle.pop(), queue.popleft()
                    in_flight[actor.extract.remote(paths[video_id])] = (actor, video_id)
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                actor, video_id = in_flight.pop(ref)
                try:
                    features = ray.get(ref)
                    if len(features) == 0:
                        raise ValueError("no features: the video is shorter than one snippet")
                    results[shard_of[video_id]][video_id] = features
                    ok += 1
                except Exception as error:  # anything one video raises (ray wraps it) is that video's failure
                    failures.append(_failure(video_id, paths[video_id], error))
                    write_failures(out_dir, failures)
                    failed += 1
                    if isinstance(error, ray.exceptions.RayActorError):
                        ray.kill(actor, no_restart=True)
                        actors.remove(actor)
                        actor = actor_class.remote(cfg)
                        actors.append(actor)
                idle.append(actor)
                bar.update(1)
                bar.set_postfix(failed=failed)

                shard = shard_of[video_id]
                remaining[shard] -= 1
                if remaining[shard] == 0:
                    _write_group(out_dir / shard_name(shard), results.pop(shard), metadata)
        write_failures(out_dir, failures)
        return ExtractionSummary(ok=ok, skipped=skipped, failed=failed, changed=len(changed))
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()


def drop_changed_videos(out_dir: Path, store: FeatureStore, paths: Mapping[str, str]) -> list[str]:
    """Remove from the shards of out_dir the videos whose file changed since they were extracted
    (or that have no record of their file), then record the files' current identities in
    out_dir/sources.json (extractors.shards.changed_sources). Returns the removed video ids.

    A shard holding such videos is rewritten (atomically) with its other videos only, or deleted
    if it holds nothing else; the run then extracts the removed videos as missing ones. The record
    is written last: a run killed before finds the same videos stale, or already removed."""
    stale, record = changed_sources(out_dir, paths, store.video_ids)
    by_shard: dict[Path, set[str]] = collections.defaultdict(set)
    for video_id in stale:
        by_shard[store.shard_of(video_id)].add(video_id)
    for shard, removed in sorted(by_shard.items()):
        metadata, video_ids, _ = _read_footer(shard)
        kept = [video_id for video_id in video_ids if video_id not in removed]
        if kept:
            write_shard(shard, [(v, features) for v, features in iter_shard(shard) if v not in removed], metadata)
        else:
            shard.unlink()
    write_sources(out_dir, record)
    return stale


def _write_group(path: Path, new: dict[str, VideoFeatures], metadata: Mapping[str, Any]) -> None:
    """Write a group's shard: its earlier rows (if the shard exists) plus the newly extracted videos."""
    if not new:  # every pending video of the group failed: keep whatever shard there is
        return
    old = dict(iter_shard(path)) if path.exists() else {}
    write_shard(path, sorted({**old, **new}.items()), metadata)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def find_videos(source: str | os.PathLike) -> dict[str, str]:
    """{video_id: path} from a directory (every video file, id = file name without extension) or a
    JSON manifest ({video_id: path} or {video_id: {"path": path, ...}}, relative paths from its folder)."""
    source = Path(source)
    if source.is_dir():
        videos: dict[str, str] = {}
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
                if path.stem in videos:
                    raise ValueError(f"two videos named {path.stem!r} in {source}: {videos[path.stem]} and {path}")
                videos[path.stem] = str(path)
        return videos
    if source.is_file():
        try:
            manifest = json.loads(source.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is neither a directory nor a JSON manifest: {error}") from error
        if not isinstance(manifest, dict):
            raise ValueError(f"manifest {source} must be a JSON object {{video_id: path}}")
        videos = {}
        for video_id, entry in manifest.items():
            path = entry.get("path") if isinstance(entry, dict) else entry
            if not isinstance(path, str):
                raise ValueError(f"manifest {source}: no path for video {video_id!r}")
            videos[video_id] = str(source.parent / path)  # an absolute path stays as it is
        return videos
    raise FileNotFoundError(f"--videos {source}: no such directory or manifest")


def load_config(config_path: str | os.PathLike | None, overrides: Sequence[str]) -> ExtractorConfig:
    """ExtractorConfig from a YAML file in the params form (conf/extractor/i3d.yaml, or a params.yaml)
    and key=value overrides (`fps=null`, `i3d.mode=snippets`): ExtractorConfig.from_yaml."""
    return ExtractorConfig.from_yaml(config_path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractors.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, help="directory of videos, or a JSON manifest {video_id: path}")
    parser.add_argument("--out", required=True, help="output directory of the Parquet shards")
    parser.add_argument("--config", help="YAML file of ExtractorConfig fields (e.g. conf/extractor/i3d.yaml)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="ExtractorConfig overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        videos = find_videos(args.videos)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as error:
        parser.error(str(error))  # exits with status 2
    if not videos:
        parser.error(f"no videos found in {args.videos}")
    try:
        summary = extract_videos(videos, cfg, args.out, ray_address=args.ray_address,
                                 progress=not args.no_progress)
    except (ExtractorBuildError, ValueError) as error:  # configuration problems, not per-video ones
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
