"""Stage `evaluate`: the selected model on every test video at full length; metrics, predictions, plots.

    python -m pipelines.stages.evaluate --model models/model.pt --manifest data/<dataset>/manifest.parquet \
        --shards data/<dataset>/shards --metrics metrics.json --predictions reports/predictions.parquet \
        --per-class reports/per_class_ap.csv --timelines reports/timelines

What is measured and written is pipelines.evaluation's (evaluate).
"""
from __future__ import annotations

from pipelines.stages.entry import run_stage


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--per-class", required=True)
    parser.add_argument("--timelines", required=True)
    parser.add_argument("--detection-ap", help="CSV of detection mAP vs tIoU (reports/detection_ap.csv)")
    parser.add_argument("--detections", help="directory for the ActivityNet results / ground truth JSON")
    parser.add_argument("--viewer", help="directory for the HTML viewer (one page per video + index.html)")


def run(params, args, log) -> dict:
    from pipelines.evaluation import evaluate  # imports torch: after the process set-up

    return evaluate(params, args.model, args.manifest, args.shards, args.metrics, args.predictions, args.per_class,
                    args.timelines, log=log, detection_ap_path=args.detection_ap, detections_dir=args.detections,
                    viewer_dir=args.viewer)


def main(argv: list[str] | None = None) -> None:
    run_stage("evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
