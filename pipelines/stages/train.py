"""Stage `train`: train MS-Temba on the training subset, select the best epoch on a held-out part.

    python -m pipelines.stages.train --manifest data/<dataset>/manifest.parquet --shards data/<dataset>/shards \
        --checkpoints models/checkpoints --out models/model.pt --log reports/train_log.csv

    torchrun --nproc_per_node N -m pipelines.stages.train ... --train-log reports/train_log.csv   # train.distributed: true

The recipe, model selection, reproducibility, resuming and distributed training are
pipelines.training's (train).
"""
from __future__ import annotations

from pipelines.stages.entry import run_stage


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--checkpoints", required=True, help="directory of the resumable checkpoint")
    parser.add_argument("--out", required=True, help="the selected model (models/model.pt)")
    # --train-log: torchrun's own parser reads the script's arguments too and rejects --log as an
    # abbreviation of its --log-dir / --log-line-prefix-template options.
    parser.add_argument("--log", "--train-log", dest="log", required=True, help="per-epoch CSV (reports/train_log.csv)")


def run(params, args, log) -> None:
    from pipelines.training import train  # imports torch: after the process set-up

    train(params, args.manifest, args.shards, args.checkpoints, args.out, args.log, log=log)


def main(argv: list[str] | None = None) -> None:
    run_stage("train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
