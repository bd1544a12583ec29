"""Stage `extract`: features of every usable video of the manifest, as Parquet shards.

    python -m pipelines.stages.extract --manifest data/<dataset>/manifest.parquet --out data/<dataset>/shards

dataset.feature_source = videos: extractors.run.extract_videos (Ray; local unless `ray_address`).
dataset.feature_source = npy: the per-video .npy files in dataset.video_dir are imported instead.

The shard directory is a `persist: true` output in dvc.yaml, so DVC does not delete it before a
re-run: a killed extraction resumes where it stopped (extract_videos skips the videos already in a
shard). `extraction.json` in the directory records what produced the shards; when the extractor
settings change, the old shards are deleted first instead of being mixed with new ones. With the
same settings, a video is skipped only if its file is the one its features were computed from
(`sources.json` in the directory: size, time and sha256 of each file); a video whose file changed
under the same name (a regenerated dataset, a replaced or re-encoded video) is extracted again, and
the log says how many ("N extracted again: their video file changed"). The same holds for .npy
files (pipelines.import_npy).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from extractors.device import resolve_device
from pipelines.config import PipelineParams
from pipelines.io import write_json
from pipelines.manifest import ManifestError, read_manifest, usable_videos
from pipelines.stages.entry import run_stage

STAMP_FILE = "extraction.json"


def source_metadata(params: PipelineParams, rows: list[dict]) -> dict:
    """With extractor.fps null the features follow each video's native rate, and nothing in the
    extractor's metadata says what time step the model will learn: record the videos' common
    frame rate (`source_fps`, None if they differ) so `ms-temba predict` can resample new videos
    to it (docs/reliability.md)."""
    if params.extractor.fps is not None:
        return {}
    rates = sorted({round(float(row["fps"]), 6) for row in rows if row.get("fps")})
    return {"source_fps": rates[0] if len(rates) == 1 else None}


def extraction_settings(params: PipelineParams, rows: list[dict] | None = None) -> dict:
    """Everything the shards' content depends on (compared with the stamp of existing shards)."""
    dataset = params.dataset
    if dataset.feature_source == "npy":
        return {"feature_source": "npy", "video_dir": dataset.video_dir, "npy_hop_s": dataset.npy_hop_s}
    import torch  # not needed for npy features

    from extractors.base import compute_dtype, dtype_name

    cfg = params.extractor
    # The params form holds only the chosen backbone's fields: a field added to another backbone
    # leaves the stamp, and so the existing shards, alone.
    settings = cfg.to_params()
    # These change how the work is spread, not the features.
    for key in ("batch_size", "chunk_frames", "device", "num_actors", "videos_per_shard"):
        settings.pop(key)
    # The dtype `precision` means on the actors' device (auto: fp16 on CUDA, fp32 on the CPU), named as
    # the shard metadata names it: features computed on a GPU are not resumed on the CPU as if they
    # were the same. "cuda" is the actors' GPU, which this process (the head of a cluster) may lack;
    # "auto" is resolved here, on the machine of the local cluster.
    device = torch.device(cfg.device) if cfg.device != "auto" else resolve_device("auto", "extractor.device")
    settings["precision"] = dtype_name(compute_dtype(cfg.precision, device))
    return {"feature_source": "videos", "extractor": settings, **source_metadata(params, rows or [])}


def prepare_output(out_dir: Path, settings: dict, log) -> None:
    """Keep out_dir if its shards were made with `settings` (to resume), else empty it."""
    stamp = out_dir / STAMP_FILE
    if out_dir.exists():
        previous = json.loads(stamp.read_text()) if stamp.exists() else None
        if previous == settings:
            log.info("resuming into %s (same extraction settings)", out_dir)
            return
        log.info("extraction settings changed: deleting the old shards in %s", out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    write_json(stamp, settings)


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="shard directory")


def run(params: PipelineParams, args, log) -> None:
    rows = usable_videos(read_manifest(args.manifest))
    if not rows:
        raise ManifestError(f"{args.manifest} has no usable video: nothing to extract (rerun the manifest stage "
                            f"and see its report)")
    out_dir = Path(args.out)
    prepare_output(out_dir, extraction_settings(params, rows), log)
    log.info("%d usable videos in the manifest", len(rows))

    if params.dataset.feature_source == "npy":
        from pipelines.import_npy import import_npy

        imported, failures = import_npy(params.dataset.video_dir, out_dir, hop_s=params.dataset.npy_hop_s,
                                        video_ids=[r["video_id"] for r in rows],
                                        videos_per_shard=params.extractor.videos_per_shard)
        log.info("imported %d videos' .npy features, %d failed (see %s/failures.jsonl)", imported,
                 len(failures), out_dir)
        return

    from extractors.run import extract_videos

    source = source_metadata(params, rows)
    if source.get("source_fps", 0) is None:
        log.warning("the videos have different frame rates and extractor.fps is null: their features have "
                    "different time steps (set extractor.fps to sample them all at one rate)")
    summary = extract_videos({r["video_id"]: r["path"] for r in rows}, params.extractor, out_dir,
                             ray_address=params.ray_address, extra_metadata=source)
    log.info("extraction: %s", summary)
    if summary.changed:
        log.info("%d videos were extracted again because their video file changed since their features were "
                 "computed (%s/sources.json)", summary.changed, out_dir)
    if summary.failed:
        log.warning("%d videos failed; they are listed in %s/failures.jsonl and left out of training",
                    summary.failed, out_dir)


def main(argv: list[str] | None = None) -> None:
    run_stage("extract", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
