"""GPU benchmark: MS-Temba against the MS-TCT baseline on long videos, and I3D extraction throughput.

Models (batch 1, I3D features in_dim 1024, 157 classes, float32 weights), at T = 2500 / 10000 / 50000:
  - forward time (inference_mode) and forward+backward time (loss = logits.sum()),
  - peak GPU memory (`torch.cuda.max_memory_allocated`) of each, from a reset before it;
for these variants, each skipped where it cannot run here:
  - `ms_temba[fused]`: BiMamba through mamba_ssm's fused `mamba_inner_fn` (ms_temba.ops.fused, which
    BiMamba.forward takes on CUDA where it applies),
  - `ms_temba[kernels]`: the unfused path on mamba_ssm / causal_conv1d's kernels,
  - `ms_temba[no-kernels]`: the library's own scan and conv (torch ops on CUDA; on CPU its C++ scan),
  - `ms_tct`: `create_model("ms_tct")`, the official MS-TCT (global self-attention through SDPA);
    an out-of-memory is recorded as such, and the longer lengths of that variant are then skipped.
I3D: frames per second of the fully convolutional network (random weights) on random 224x224 clips
of 64 frames, fp32 against fp16, as extractors.i3d runs it.

Times are CUDA-event medians over `--repeats` runs after one warm-up (wall-clock on CPU). Every case
has a share of `--budget-s`: once the budget is spent, the remaining cases are recorded as skipped,
so the script ends in time on a machine held by the minute. Results: JSON and a Markdown table in
`--out`.

    python benchmarks/gpu/bench_gpu.py --out $OUT               # on the GPU machine (check.sh)
    python benchmarks/gpu/bench_gpu.py --device cpu --quick     # a smoke run of the script on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a file

import ms_temba  # noqa: E402
from extractors.files import atomic_path  # noqa: E402
from extractors.i3d import InceptionI3d  # noqa: E402
from ms_temba import ops  # noqa: E402
from ms_temba.ops import fused  # noqa: E402

IN_DIM, NUM_CLASSES = 1024, 157


@contextlib.contextmanager
def variant(name: str):
    """Run the model as `name` says: which kernels, and whether BiMamba goes through the fused chain."""
    saved = ops.USE_CUDA_KERNELS, fused.ENABLED
    try:
        fused.ENABLED = name == "ms_temba[fused]"  # BiMamba.forward takes the fused chain where it applies
        ops.USE_CUDA_KERNELS = name != "ms_temba[no-kernels]"
        yield
    finally:
        ops.USE_CUDA_KERNELS, fused.ENABLED = saved


def available_variants(device: torch.device) -> list[str]:
    """The variants that can run here; on CUDA the torch-op path last, as the slowest by far."""
    names = []
    if device.type == "cuda" and fused.mamba_inner_fn is not None:
        names.append("ms_temba[fused]")
    if device.type == "cuda" and ops.HAS_CUDA_KERNELS:
        names.append("ms_temba[kernels]")
    return names + ["ms_tct", "ms_temba[no-kernels]"]


class Timer:
    """Median seconds of a function over repeats, after one warm-up; CUDA events on a GPU. A run
    slower than `slow_s` is timed once: its launch overheads no longer matter, the lease does."""

    def __init__(self, device: torch.device, repeats: int, slow_s: float = 2.0):
        self.device, self.repeats, self.slow_s = device, repeats, slow_s

    def __call__(self, function) -> float:
        start = time.perf_counter()
        function()  # warm-up: kernel selection, allocator growth, the CPU scan's JIT build
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        repeats = 1 if time.perf_counter() - start > self.slow_s else self.repeats
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def peak_memory(device: torch.device, function) -> int | None:
    """Peak bytes allocated on the GPU while `function` runs (None on CPU)."""
    if device.type != "cuda":
        function()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bench_model(name: str, length: int, device: torch.device, repeats: int, quick: bool) -> dict:
    """Forward and forward+backward time and peak memory of one variant at one length."""
    torch.manual_seed(0)
    overrides = dict(in_dim=IN_DIM, num_classes=NUM_CLASSES)
    if quick:  # the small registered variants: a CPU smoke run of the script, not a measurement
        model_name = "ms_tct_small" if name == "ms_tct" else "ms_temba_small"
    else:
        model_name = "ms_tct" if name == "ms_tct" else "ms_temba"
    model = ms_temba.create_model(model_name, **overrides).to(device)
    features = torch.randn(1, length, IN_DIM, device=device)
    timer = Timer(device, repeats)

    def forward():
        with torch.inference_mode():
            model(features)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(features).logits.sum().backward()

    row = dict(model=name, length=length)
    with variant(name):
        row["forward_s"] = timer(forward)
        row["forward_peak_bytes"] = peak_memory(device, forward)
        row["forward_backward_s"] = timer(forward_backward)
        row["forward_backward_peak_bytes"] = peak_memory(device, forward_backward)
    row["parameters"] = sum(p.numel() for p in model.parameters())
    return row


def bench_i3d(dtype: torch.dtype, device: torch.device, repeats: int, quick: bool) -> dict:
    """Frames per second of I3D's fully convolutional pass over one clip, in `dtype`."""
    frames, size = (16, 64) if quick else (64, 224)
    torch.manual_seed(0)
    model = InceptionI3d().to(device, dtype).eval().requires_grad_(False)
    clip = torch.rand(1, 3, frames, size, size, device=device, dtype=dtype) * 2 - 1

    def forward():
        with torch.inference_mode():
            model.forward_features(clip)

    seconds = Timer(device, repeats)(forward)
    return dict(model=f"i3d[{str(dtype).removeprefix('torch.')}]", frames=frames, image_size=size,
                seconds=seconds, frames_per_s=frames / seconds,
                peak_bytes=peak_memory(device, forward))


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def machine_description(device: torch.device) -> dict:
    described = dict(torch=torch.__version__, python=platform.python_version(),
                     mamba_ssm_kernels=ops.HAS_CUDA_KERNELS, fused=fused.mamba_inner_fn is not None)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                         cuda=torch.version.cuda)
    else:
        described.update(cpu=platform.processor() or platform.machine())
    return described


def markdown(results: dict) -> str:
    def fmt(value, scale=1.0, digits=3):
        return "" if value is None else f"{value * scale:.{digits}f}"

    lines = ["| model | T | forward s | fwd+bwd s | forward peak GiB | fwd+bwd peak GiB | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in results["models"]:
        lines.append(f"| {row['model']} | {row['length']} | {fmt(row.get('forward_s'))} | "
                     f"{fmt(row.get('forward_backward_s'))} | {fmt(row.get('forward_peak_bytes'), 2**-30, 2)} | "
                     f"{fmt(row.get('forward_backward_peak_bytes'), 2**-30, 2)} | {row.get('note', '')} |")
    lines += ["", "| I3D | frames x size | frames/s | peak GiB | note |", "|---|---|---:|---:|---|"]
    for row in results["i3d"]:
        lines.append(f"| {row['model']} | {row.get('frames', '')} x {row.get('image_size', '')} | "
                     f"{fmt(row.get('frames_per_s'), digits=1)} | {fmt(row.get('peak_bytes'), 2**-30, 2)} | "
                     f"{row.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 2500 10000 50000; --quick: 128 256)")
    parser.add_argument("--models", nargs="+", default=None, help="variants (default: all that can run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3; --quick 1)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no new case after this many seconds; the rest are recorded as skipped")
    parser.add_argument("--quick", action="store_true", help="small models and lengths: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu"),
                        help="folder for bench_gpu.json and bench_gpu.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu --quick for a smoke run)")
    lengths = args.lengths or ([128, 256] if args.quick else [2500, 10000, 50000])
    repeats = args.repeats or (1 if args.quick else 3)
    names = args.models or available_variants(device)
    # Exact float32 products, as the CPU computes them; what the library runs by default.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    results = dict(machine=machine_description(device), models=[], i3d=[])
    started = time.monotonic()
    # I3D first (seconds), then the models from the shortest length up, every variant at each
    # length: what a spent budget leaves out is the longest.
    cases = [("i3d", dtype, None) for dtype in ([torch.float32, torch.float16] if device.type == "cuda"
                                                 else [torch.float32])]
    cases += [("model", name, length) for length in lengths for name in names]
    out_of_memory = set()
    for kind, what, length in tqdm(cases, desc="bench_gpu", unit="case"):
        table = results["models"] if kind == "model" else results["i3d"]
        label = (dict(model=what, length=length) if kind == "model"
                 else dict(model=f"i3d[{str(what).removeprefix('torch.')}]"))
        if time.monotonic() - started > args.budget_s:
            table.append({**label, "note": "skipped: time budget spent"})
            continue
        if kind == "model" and what in out_of_memory:
            table.append({**label, "note": "skipped: out of memory at a shorter length"})
            continue
        try:
            row = (bench_model(what, length, device, repeats, args.quick) if kind == "model"
                   else bench_i3d(what, device, repeats, args.quick))
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory.add(what)
            row = {**label, "note": "out of memory"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        table.append(row)
        tqdm.write(json.dumps(row))
        results["seconds"] = round(time.monotonic() - started, 1)
        write_results(results, args.out)  # after every case: a run killed at its time limit keeps them
    write_results(results, args.out)
    print(json.dumps(results["machine"]))
    print(markdown(results))


def write_results(results: dict, out: Path) -> None:
    with atomic_path(out / "bench_gpu.json") as path:
        path.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(out / "bench_gpu.md") as path:
        path.write_text(markdown(results))


if __name__ == "__main__":
    main()
