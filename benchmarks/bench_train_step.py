"""One training step of the default recipe, model beside model, in one process.

The step is what the pipeline's training loop does per batch (pipelines/training.py): forward,
the model's own loss (`model_loss` with the default recipe's beta, alpha and smoothing), backward,
the per-part gradient norms it logs, clipping at the recipe's max_grad_norm, Adam, and the update
of the weights' moving average. The batch is the accuracy benchmark's Charades shape: 8 crops of
256 features of 256-d, 157 classes, with realistic labels (8 action runs of 10-90 frames per
sample; random per-frame labels would make MS-TCT's heat-map target unrealistically slow).

The models take turns step by step, so a load on the machine falls on all of them alike, and the
script prints each one's median step and its ratio to the first model's:

    python benchmarks/bench_train_step.py                                  # ms_temba_small vs ms_tct_small
    python benchmarks/bench_train_step.py --models ms_temba_small ms_tct_small ms_tct --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.process import setup_process  # noqa: E402


def realistic_labels(batch: int, length: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.zeros(batch, length, classes)
    for b in range(batch):
        for _ in range(8):
            c = int(torch.randint(classes, (1,), generator=generator))
            start = int(torch.randint(length - 20, (1,), generator=generator))
            labels[b, start:start + int(torch.randint(10, 90, (1,), generator=generator)), c] = 1
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ms_temba_small", "ms_tct_small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="of which the first 2 are warm-up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=157)
    args = parser.parse_args()

    setup_process()  # the pipeline's allocator tuning: what a training run gets
    torch.set_num_threads(args.threads)
    import ms_temba
    from ms_temba.losses import model_loss
    from pipelines.config import compose_params, parse_params
    from pipelines.training import gradient_norms

    recipe = parse_params(compose_params([])).train  # the default recipe's loss weights and clipping
    torch.manual_seed(0)
    features = torch.randn(args.batch, args.length, args.dim)
    mask = torch.ones(args.batch, args.length, dtype=torch.bool)
    labels = realistic_labels(args.batch, args.length, args.classes, torch.Generator().manual_seed(1))

    runs = {}
    for name in args.models:
        model = ms_temba.create_model(name, in_dim=args.dim, num_classes=args.classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
        runs[name] = (model, optimizer, ema, [])

    for step in range(args.steps):
        for name, (model, optimizer, ema, times) in runs.items():
            started = time.perf_counter()
            losses = model_loss(model(features, mask), labels, mask,
                                beta=recipe.beta, alpha=recipe.alpha, smoothing=recipe.smoothing)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            gradient_norms(model)
            if recipe.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            ema.update_parameters(model)
            if step >= 2:
                times.append(time.perf_counter() - started)

    reference = statistics.median(runs[args.models[0]][3])
    print(f"one training step, batch {args.batch} x {args.length} features of {args.dim}-d, {args.classes} classes, "
          f"{args.threads} threads, median of {args.steps - 2}")
    print(f"| model | parameters | step | vs {args.models[0]} |")
    print("|---|---|---|---|")
    for name, (model, _, _, times) in runs.items():
        median = statistics.median(times)
        print(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {1000 * median:.0f} ms | "
              f"{median / reference:.2f}x |")


if __name__ == "__main__":
    main()
