"""Extraction benchmark: decoding (decord vs PyAV), backbone throughput (I3D, CLIP) on CPU, Ray fan-out.

Measured, in float32, on test videos this script writes with PyAV into a temporary directory:
  - decode: every frame of a few h264 files to RGB uint8 numpy, with decord (raw
    `VideoReader.get_batch`, and `extractors.video.iter_frame_chunks` at native fps, which also
    resizes and centre-crops to 224 px) against PyAV's `frame.to_ndarray(format="rgb24")`. All
    decoders use one thread, as each extraction actor does. Methods alternate round by round and
    the best round of each is kept, so a co-tenant's load hits all of them alike.
  - backbones: I3D (random init) snippets/s in snippets mode (16/16) and frames/s in fully_conv
    mode at 224 and 112 px; CLIP (random init) frames/s for the default ViT-L/14 and for a
    ViT-B/16, with snippets (16-frame windows)/s. Frames are in memory already (extract_frames),
    so these exclude decoding. Ratios are against real time at 24 fps.
  - Ray: `extractors.run.extract_videos` on a decode-heavy mix (larger videos, I3D at a small
    image size) with num_actors=1 vs 2, fresh output directories, Ray started once beforehand
    (extract_videos reuses an initialised Ray), so the ratio excludes the cluster start-up but
    includes each run's actor start-up (process, imports, building the backbone).

    python benchmarks/bench_extract.py                  # about 2.5 minutes on 2 cores
    python benchmarks/bench_extract.py --skip-clip-large --ray-videos 4   # a quicker look
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from fractions import Fraction
from pathlib import Path

# Idle OpenMP threads must sleep rather than spin, or on a shared machine they steal the core the
# working thread needs; export OMP_WAIT_POLICY=active to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

THREADS = 2
REAL_TIME_FPS = 24.0


# ----------------------------------------------------------------------------------------------
# Test videos


def write_test_video(path: Path, width: int, height: int, fps: int, seconds: float, seed: int) -> int:
    """h264 yuv420p mp4 with moving content (scrolling gradients, a moving block, some noise). Returns frames."""
    import av

    rng = np.random.default_rng(seed)
    frames = int(round(seconds * fps))
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    diagonal = ((x[None, :] + y[:, None]) % 256).astype(np.uint8)
    noise = rng.integers(0, 4, size=(8, height, width, 3), dtype=np.uint8)
    block = max(8, min(width, height) // 5)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23", "g": str(2 * fps)}
        image = np.empty((height, width, 3), np.uint8)
        for t in range(frames):
            phase = 2 * np.pi * t / fps
            image[..., 0] = (127 + 120 * np.sin(x / 23.0 + phase)).astype(np.uint8)[None, :]  # scrolls sideways
            image[..., 1] = (127 + 120 * np.sin(y / 17.0 - 0.7 * phase)).astype(np.uint8)[:, None]  # scrolls up
            np.add(diagonal, np.uint8((5 * t) % 256), out=image[..., 2])  # drifts diagonally (wraps mod 256)
            x0 = int((t * 7) % (width - block))
            y0 = int((height - block) * (0.5 + 0.4 * np.sin(phase / 3)))
            image[y0:y0 + block, x0:x0 + block] = (255, 255, 0)
            image += noise[t % len(noise)]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return frames


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_pyav(path: Path) -> int:
    import av

    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            count += 1
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    return count


def decode_decord_raw(path: Path, batch: int = 64) -> int:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    count = 0
    for start in range(0, len(reader), batch):
        frames = reader.get_batch(list(range(start, min(start + batch, len(reader))))).asnumpy()
        count += len(frames)
    assert frames.ndim == 4 and frames.shape[3] == 3
    return count


def decode_decord_next(path: Path) -> int:
    """decord frame by frame in order (VideoReader.next), for comparison with get_batch."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    for _ in range(len(reader)):
        frame = reader.next().asnumpy()
    assert frame.ndim == 3 and frame.shape[2] == 3
    return len(reader)


def decode_iter_chunks(path: Path) -> int:
    from extractors.video import iter_frame_chunks

    return sum(len(chunk.frames) for chunk in iter_frame_chunks(path, target_fps=None, size=224))


def bench_decode(paths: list[Path], rounds: int) -> dict[str, float]:
    methods = {"pyav": decode_pyav, "decord_raw": decode_decord_raw, "decord_next": decode_decord_next,
               "decord_iter_frame_chunks": decode_iter_chunks}
    best = {name: float("inf") for name in methods}
    frames = {}
    for name, fn in methods.items():  # warm-up (imports, page cache), untimed
        fn(paths[0])
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            frames[name] = sum(fn(p) for p in paths)
            best[name] = min(best[name], time.perf_counter() - start)
    if len(set(frames.values())) != 1:
        raise RuntimeError(f"decoders disagree on the frame count: {frames}")
    return {name: frames[name] / best[name] for name in methods} | {"frames": frames["pyav"]}


# ----------------------------------------------------------------------------------------------
# Backbones


def time_extract(extractor, frames: np.ndarray, warmup_frames: int, min_seconds: float = 2.0,
                 max_runs: int = 3) -> float:
    """Best seconds per extract_frames call (an untimed warm-up on the first warmup_frames frames, then
    timed calls until min_seconds or max_runs)."""
    times_s = np.arange(len(frames)) / REAL_TIME_FPS
    extractor.extract_frames(frames[:warmup_frames], times_s[:warmup_frames])
    best, spent, runs = float("inf"), 0.0, 0
    while runs < max_runs and (runs == 0 or spent < min_seconds):
        start = time.perf_counter()
        extractor.extract_frames(frames, times_s)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def bench_backbones(skip_clip_large: bool) -> list[dict]:
    import torch

    from extractors.backbones import build_extractor
    from extractors.config import ExtractorConfig

    rng = np.random.default_rng(0)
    rows = []

    def frames(n, size):
        return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)

    cases = [
        # (name, config, frames, size, unit, units per call)
        ("I3D snippets 16/16, 224 px", dict(backbone="i3d", mode="snippets", image_size=224, batch_size=4), 64, 224,
         "snippet", 4),
        ("I3D fully_conv, 224 px", dict(backbone="i3d", mode="fully_conv", image_size=224, chunk_frames=64), 64, 224,
         "frame", 64),
        ("I3D fully_conv, 112 px", dict(backbone="i3d", mode="fully_conv", image_size=112, chunk_frames=128), 128, 112,
         "frame", 128),
        ("CLIP ViT-B/16, 224 px", dict(backbone="clip", model_name="vit_base_patch16_clip_224.openai",
                                       batch_size=8), 16, 224, "frame", 16),
    ]
    if not skip_clip_large:
        cases.append(("CLIP ViT-L/14 (default), 224 px", dict(backbone="clip", batch_size=4), 4, 224, "frame", 4))
    for name, overrides, n, size, unit, units in cases:
        cfg = ExtractorConfig(fps=REAL_TIME_FPS, device="cpu", **overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "randomly initialised network": intended here
            torch.manual_seed(0)
            start = time.perf_counter()
            extractor = build_extractor(cfg)
            build_s = time.perf_counter() - start
        assert next(extractor.model.parameters()).dtype == torch.float32
        seconds = time_extract(extractor, frames(n, size), warmup_frames=16 if cfg.backbone == "i3d" else 2)
        frames_per_s = n / seconds
        row = {"name": name, "frames_per_s": frames_per_s, "build_s": build_s, "seconds": seconds}
        if unit == "snippet":
            row["snippets_per_s"] = units / seconds
        elif cfg.backbone == "clip":
            row["snippets_per_s"] = frames_per_s / cfg.clip_window  # 16-frame windows
        rows.append(row)
        print(f"  {name}: {frames_per_s:.2f} frames/s" +
              (f", {row['snippets_per_s']:.3f} snippets/s" if "snippets_per_s" in row else "") +
              f" (best call {seconds:.2f} s, build {build_s:.1f} s)", flush=True)
        del extractor
    return rows


# ----------------------------------------------------------------------------------------------
# Ray


def cpu_ceiling(paths: list[Path]) -> float:
    """How much faster 2 processes decode than 1 right now (plain processes, no Ray): the speed-up the
    machine itself allows, which a co-tenant's load caps below 2x. Work: `iter_frame_chunks` (the actors'
    decoding) of 2 videos."""
    import concurrent.futures
    import multiprocessing

    pair = paths[:2]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(decode_iter_chunks, pair))  # start both workers, import decord, warm the page cache
        start = time.perf_counter()
        for path in pair:  # one at a time
            pool.submit(decode_iter_chunks, path).result()
        one = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(decode_iter_chunks, pair))  # both at once
        two = time.perf_counter() - start
    return one / two


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine so far (all processes, user + system), from /proc/stat.
    Over a run, its growth divided by the wall time is how many cores the run kept busy."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def bench_ray(paths: list[Path], image_size: int, work_dir: Path) -> dict:
    import ray

    from extractors.config import ExtractorConfig
    from extractors.run import extract_videos

    videos = {p.stem: str(p) for p in paths}
    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        for actors in (1, 2):
            cfg = ExtractorConfig(backbone="i3d", mode="fully_conv", image_size=image_size, fps=None, device="cpu",
                                  num_actors=actors, videos_per_shard=4)
            out = work_dir / f"ray_out_{actors}"
            start, busy_start = time.perf_counter(), busy_cpu_seconds()
            summary = extract_videos(videos, cfg, out, progress=False)
            wall = time.perf_counter() - start
            results[actors] = (wall, (busy_cpu_seconds() - busy_start) / wall)
            if summary.ok != len(videos) or summary.failed:
                raise RuntimeError(f"num_actors={actors}: {summary}")
            print(f"  num_actors={actors}: {wall:.1f} s, {results[actors][1]:.2f} cores busy ({summary})",
                  flush=True)
    finally:
        ray.shutdown()
    return results


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-size", default="640x360", help="WxH of the decode test videos")
    parser.add_argument("--decode-seconds", type=float, default=20.0)
    parser.add_argument("--decode-fps", type=int, default=24)
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--ray-videos", type=int, default=8)
    parser.add_argument("--ray-size", default="1280x720", help="WxH of the Ray (decode-heavy) videos")
    parser.add_argument("--ray-seconds", type=float, default=10.0)
    parser.add_argument("--ray-fps", type=int, default=30)
    parser.add_argument("--ray-image-size", type=int, default=48, help="I3D image_size of the Ray runs")
    parser.add_argument("--skip-clip-large", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {THREADS} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        width, height = map(int, args.decode_size.split("x"))
        decode_paths = []
        for i in range(3):
            path = tmp / f"decode_{i}.mp4"
            write_test_video(path, width, height, args.decode_fps, args.decode_seconds, seed=i)
            decode_paths.append(path)
        print(f"decode: 3 files {width}x{height}, {args.decode_seconds:g} s at {args.decode_fps} fps "
              f"(written in {time.perf_counter() - started:.1f} s)", flush=True)
        decode = bench_decode(decode_paths, args.decode_rounds)
        for name in ("pyav", "decord_raw", "decord_next", "decord_iter_frame_chunks"):
            print(f"  {name}: {decode[name]:.0f} frames/s, {decode[name] / decode['pyav']:.2f}x PyAV", flush=True)

        print("backbones (random init, float32, frames already in memory):", flush=True)
        backbones = bench_backbones(args.skip_clip_large)

        ray_times = ceiling = None
        if not args.skip_ray:
            mark = time.perf_counter()
            rwidth, rheight = map(int, args.ray_size.split("x"))
            ray_dir = tmp / "ray_videos"
            ray_dir.mkdir()
            ray_paths = []
            for i in range(args.ray_videos):
                path = ray_dir / f"video_{i:02d}.mp4"
                write_test_video(path, rwidth, rheight, args.ray_fps, args.ray_seconds, seed=100 + i)
                ray_paths.append(path)
            print(f"ray: {args.ray_videos} videos {rwidth}x{rheight}, {args.ray_seconds:g} s at {args.ray_fps} fps, "
                  f"I3D fully_conv at {args.ray_image_size} px (written in {time.perf_counter() - mark:.1f} s)",
                  flush=True)
            ceiling = cpu_ceiling(ray_paths)
            print(f"  2 plain processes vs 1 (decode only, no Ray): {ceiling:.2f}x", flush=True)
            ray_times = bench_ray(ray_paths, args.ray_image_size, tmp)

    # ------------------------------------------------------------------------------------------
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average at end {os.getloadavg()[0]:.2f}\n")
    print("| measurement | throughput | ratio | target |")
    print("|---|---:|---:|---|")
    pyav = decode["pyav"]
    print(f"| decode {args.decode_size}, PyAV `to_ndarray(rgb24)` (reference) | {pyav:.0f} frames/s | 1.00x | |")
    for name, label in (("decord_raw", "decord `get_batch` (64-frame batches)"),
                        ("decord_next", "decord `next()` frame by frame"),
                        ("decord_iter_frame_chunks", "decord `iter_frame_chunks` (native fps, 224 px crop)")):
        ratio = decode[name] / pyav
        print(f"| decode {args.decode_size}, {label} | {decode[name]:.0f} frames/s | {ratio:.2f}x PyAV | "
              f">= 1.0x: {'met' if ratio >= 1.0 else '**not met**'} |")
    for row in backbones:
        snippets = f", {row['snippets_per_s']:.3f} snippets/s" if "snippets_per_s" in row else ""
        print(f"| {row['name']} | {row['frames_per_s']:.2f} frames/s{snippets} | "
              f"{row['frames_per_s'] / REAL_TIME_FPS:.3f}x real time (24 fps) | |")
    if ray_times:
        (one, one_busy), (two, two_busy) = ray_times[1], ray_times[2]
        ratio = one / two
        print(f"| Ray extract_videos, 1 actor (reference) | {one:.1f} s wall, {one_busy:.2f} cores busy | 1.00x | |")
        print(f"| Ray extract_videos, 2 actors | {two:.1f} s wall, {two_busy:.2f} cores busy | {ratio:.2f}x 1 actor | "
              f">= 1.6x: {'met' if ratio >= 1.6 else '**not met**'} |")
        print(f"| ceiling of 2 actors vs 1 from the cores the 1-actor run kept busy (2 / {one_busy:.2f}) "
              f"| | {2 / one_busy:.2f}x | |")
        print(f"| machine ceiling: decode in 2 plain processes vs 1 (no Ray) | | {ceiling:.2f}x | |")


if __name__ == "__main__":
    main()
