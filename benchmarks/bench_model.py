"""Whole-model benchmark: MS-Temba vs a Transformer detector of MS-TCT's size, on long videos.

For every sequence length T it measures, at batch 1 in float32 with 2 threads:
  - forward time (inference_mode) and forward+backward time (loss = logits.sum()),
  - peak resident memory of the process (each case runs in a fresh subprocess, so ru_maxrss is the
    peak of that case alone; the baseline after `import torch` and building the model is printed too),
and prints the ratios the performance issue asks for: MS-Temba vs the Transformer reference measured in
the same run, and the growth from T=2500 to T=10000. It also times one training step of the default
recipe (num_clips 256, batch 5, AdamW) and a one-hour video at 3 features/s (T=10800) in one pass.

    python benchmarks/bench_model.py                      # the full table (about 3 minutes)
    python benchmarks/bench_model.py --lengths 256 1024   # a quick look

The reference is a multi-stage Transformer encoder shaped like MS-TCT (stages of width 256/384/576/864,
temporal downsampling by 2 between stages, global self-attention with a wide feed-forward in every
layer, the stages upsampled and fused for the per-frame classifier): about 6x MS-Temba's parameters.
It stands for "a Transformer detector of MS-TCT's size"; it is not MS-TCT itself.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

THREADS = 2
# Idle OpenMP threads must sleep rather than spin, or on a shared machine they steal the core the
# working thread needs (measured: up to 20x slower forwards); export OMP_WAIT_POLICY=active to
# measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

# The pipeline stages' process settings, here for the allocator: glibc keeps large blocks in the
# heap instead of fresh mmaps (see pipelines/process.py; --no-malloc-tuning measures without).
from pipelines.process import setup_process  # noqa: E402

setup_process()


class TransformerDetector:
    """Builds the MS-TCT-sized Transformer reference (a function, so torch loads only in workers)."""

    @staticmethod
    def build(in_dim: int, num_classes: int):
        import torch.nn as nn
        import torch.nn.functional as F

        class Stage(nn.Module):
            def __init__(self, in_width, width, depth, downsample):
                super().__init__()
                stride = 2 if downsample else 1
                self.merge = nn.Conv1d(in_width, width, kernel_size=3, stride=stride, padding=1)
                layer = nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=8 * width,
                                                   batch_first=True, norm_first=True, dropout=0.0)
                self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

            def forward(self, x):  # (batch, time, width)
                x = self.merge(x.transpose(1, 2)).transpose(1, 2)
                return self.encoder(x)

        class Detector(nn.Module):
            def __init__(self):
                super().__init__()
                widths = (256, 384, 576, 864)
                self.stages = nn.ModuleList(
                    Stage(w_in, w, depth=3, downsample=i > 0)
                    for i, (w_in, w) in enumerate(zip((in_dim,) + widths[:-1], widths)))
                self.fuse = nn.ModuleList(nn.Linear(w, widths[-1]) for w in widths)
                self.head = nn.Linear(widths[-1], num_classes)

            def forward(self, features):
                length = features.shape[1]
                x, fused = features, 0
                for stage, fuse in zip(self.stages, self.fuse):
                    x = stage(x)
                    up = F.interpolate(fuse(x).transpose(1, 2), size=length, mode="linear")
                    fused = fused + up.transpose(1, 2)
                return self.head(fused)

        return Detector()


def run_case(model_name: str, length: int, mode: str, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if model_name == "ms_temba":
        import ms_temba

        model = ms_temba.create_model("ms_temba", in_dim=1024, num_classes=157)
        logits_of = lambda out: out.logits  # noqa: E731
    else:
        model = TransformerDetector.build(1024, 157)
        logits_of = lambda out: out  # noqa: E731
    params = sum(p.numel() for p in model.parameters())
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if mode == "train_step":
        return run_train_step(model, logits_of, repeats) | {"params": params, "baseline_mb": baseline_mb}

    features = torch.randn(1, length, 1024)

    def step():
        if mode == "forward":
            model.eval()
            with torch.inference_mode():
                logits_of(model(features))
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            logits_of(model(features)).sum().backward()

    step()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"time_s": statistics.median(times), "peak_rss_mb": peak_mb, "baseline_mb": baseline_mb,
            "params": params}


def run_train_step(model, logits_of, repeats: int, batch: int = 5, num_clips: int = 256) -> dict:
    """Sequences/s of a full training step (forward, BCE loss, backward, AdamW)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    features = torch.randn(batch, num_clips, 1024)
    targets = (torch.rand(batch, num_clips, 157) < 0.05).float()
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(logits_of(model(features)), targets).backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    elapsed = (time.perf_counter() - start) / repeats
    return {"time_s": elapsed, "sequences_per_s": batch / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(model_name: str, length: int, mode: str, repeats: int) -> dict:
    """Runs one case in a fresh subprocess so its peak RSS is its own."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    command = [sys.executable, __file__, "--case", model_name, "--length", str(length), "--mode", mode,
               "--repeats", str(repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(result: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    return "error" if "error" in result else f"{result[key] * scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2500, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="MS-Temba only")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="glibc's default mmap threshold (MS_TEMBA_MALLOC_TUNING=0)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # a worker: one measurement, JSON on the last line
        print(json.dumps(run_case(args.case, args.length, args.mode, args.repeats)))
        return

    if args.no_malloc_tuning:
        os.environ["MS_TEMBA_MALLOC_TUNING"] = "0"  # read by setup_process() in the workers
    tuning = os.environ.get("MS_TEMBA_MALLOC_TUNING", "1") != "0"
    print(f"# whole-model benchmark, batch 1, float32, {THREADS} threads, median of {args.repeats}, "
          f"glibc mmap threshold {'1 GiB (pipelines)' if tuning else 'default'}")
    rows = {}
    for length in args.lengths:
        repeats = 1 if length > 5000 else args.repeats
        row = {"temba_fwd": measure("ms_temba", length, "forward", repeats),
               "temba_fb": measure("ms_temba", length, "fwd_bwd", repeats)}
        if not args.skip_reference:
            row["ref_fb"] = measure("transformer", length, "fwd_bwd", repeats)
        rows[length] = row
        print(f"T={length}: " + json.dumps(row), flush=True)

    temba_params = next(iter(rows.values()))["temba_fb"].get("params")
    print()
    print(f"MS-Temba parameters: {temba_params:,}")
    if not args.skip_reference:
        ref_params = next(iter(rows.values()))["ref_fb"].get("params")
        if ref_params:
            print(f"Transformer reference parameters: {ref_params:,} ({ref_params / temba_params:.1f}x)")
    print()
    # The baseline (RSS after `import torch` and building the model) is mostly torch's shared
    # libraries, and how much of them is resident depends on the page cache: 505 MB after
    # `echo 3 > /proc/sys/vm/drop_caches`, ~700 MB right after the venv's files were written.
    print("| T | MS-Temba fwd s | MS-Temba fwd+bwd s | MS-Temba peak RSS MiB (baseline) | reference fwd+bwd s "
          "| reference peak RSS MiB | time ratio ref/Temba | memory ratio ref/Temba |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for length, row in rows.items():
        temba, ref = row["temba_fb"], row.get("ref_fb", {"error": "skipped"})
        if "error" in temba or "error" in ref:
            ratios = "n/a | n/a"
        else:
            ratios = f"{ref['time_s'] / temba['time_s']:.2f}x | {ref['peak_rss_mb'] / temba['peak_rss_mb']:.2f}x"
        print(f"| {length} | {fmt(row['temba_fwd'], 'time_s', digits=3)} | {fmt(temba, 'time_s', digits=3)} "
              f"| {fmt(temba, 'peak_rss_mb', digits=0)} ({fmt(temba, 'baseline_mb', digits=0)}) "
              f"| {fmt(ref, 'time_s', digits=3)} "
              f"| {fmt(ref, 'peak_rss_mb', digits=0)} | {ratios} |")

    if 2500 in rows and 10000 in rows:
        a, b = rows[2500]["temba_fb"], rows[10000]["temba_fb"]
        if "error" not in a and "error" not in b:
            print()
            print(f"growth T=10000 / T=2500 (4x the length): time {b['time_s'] / a['time_s']:.2f}x, "
                  f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x, "
                  f"peak RSS above baseline {(b['peak_rss_mb'] - b['baseline_mb']) / max(a['peak_rss_mb'] - a['baseline_mb'], 1):.2f}x "
                  f"(target <= 4.4x)")
        if "error" not in a:
            print(f"T=2500 forward+backward: {a['time_s']:.2f} s (target <= 2.8 s), "
                  f"peak RSS {a['peak_rss_mb'] / 1024:.2f} GiB = "
                  f"{a['peak_rss_mb'] * 2**20 / 1e9:.2f} GB (target <= 1.8 GB)")

    hour = measure("ms_temba", 10800, "forward", 1)
    print(f"one-hour video (T=10800) forward in one pass: {fmt(hour, 'time_s')} s, "
          f"peak RSS {fmt(hour, 'peak_rss_mb', digits=0)} MiB")
    train = measure("ms_temba", 256, "train_step", 3)
    print(f"training step (num_clips 256, batch 5, AdamW): {fmt(train, 'time_s', digits=3)} s, "
          f"{fmt(train, 'sequences_per_s')} sequences/s")


if __name__ == "__main__":
    main()
