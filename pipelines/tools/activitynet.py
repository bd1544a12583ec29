"""`ms-temba export` and `ms-temba score`: predicted segments as ActivityNet results, and the
detection mAP of any results file (the formats and the scoring are pipelines.detections').

    ms-temba export PREDICT_DIR --out DIR [--rule hysteresis|sweep] [segment options]
    ms-temba score --pred results.json --gt ground_truth.json [--subset testing] [--tiou 0.5 ...]
"""
from __future__ import annotations

import argparse
import sys

from ms_temba.metrics import DEFAULT_TIOU_THRESHOLDS
from pipelines.detections import (RULES, DetectionFormatError, export_segments, read_ground_truth, read_results,
                                  score_detections, score_report)
from pipelines.io import write_json


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rule", default="hysteresis", choices=RULES,
                        help="hysteresis: predict's rule (default); sweep: several thresholds merged by NMS")
    parser.add_argument("--threshold-on", type=float, default=0.5)
    parser.add_argument("--threshold-off", type=float, default=0.35)
    parser.add_argument("--sweep-thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                                              0.8, 0.9])
    parser.add_argument("--nms-tiou", type=float, default=0.5, help="sweep: NMS tIoU")
    parser.add_argument("--context-ratio", type=float, default=0.25,
                        help="sweep: score = mean p inside - mean p of this fraction of the length on each side; "
                             "a negative value scores by the mean p alone")
    parser.add_argument("--min-duration", type=float, default=0.5, help="seconds")
    parser.add_argument("--merge-gap", type=float, default=0.5, help="seconds")


def export_main(argv: list[str] | None = None) -> int:
    """`ms-temba export PREDICT_DIR --out DIR [--rule ...]`."""
    parser = argparse.ArgumentParser(prog="ms-temba export",
                                     description="Write predicted segments as ActivityNet results JSON and CSV.")
    parser.add_argument("source", help="a directory of `ms-temba predict` outputs ({video}.probs.parquet)")
    parser.add_argument("--out", required=True, help="output directory (results.json, results.csv)")
    add_segment_options(parser)
    args = parser.parse_args(argv)
    try:
        videos, written = export_segments(
            args.source, args.out, rule=args.rule, threshold_on=args.threshold_on, threshold_off=args.threshold_off,
            sweep_thresholds=args.sweep_thresholds, nms_tiou=args.nms_tiou, min_duration_s=args.min_duration,
            merge_gap_s=args.merge_gap, context_ratio=None if args.context_ratio < 0 else args.context_ratio)
    except (DetectionFormatError, FileNotFoundError, ValueError) as error:
        print(f"ms-temba export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported the segments of {videos} video(s): {', '.join(map(str, written))}")
    return 0


def score_main(argv: list[str] | None = None) -> int:
    """`ms-temba score --pred results.json --gt ground_truth.json [--subset S] [--tiou ...] [--out F]`."""
    parser = argparse.ArgumentParser(prog="ms-temba score",
                                     description="Detection mAP (ActivityNet protocol) of a results file.")
    parser.add_argument("--pred", required=True, help="ActivityNet results JSON ({'results': ...})")
    parser.add_argument("--gt", required=True, help="ActivityNet ground-truth JSON ({'database': ...})")
    parser.add_argument("--subset", help="only the ground-truth videos of this subset (e.g. validation, testing)")
    parser.add_argument("--tiou", type=float, nargs="+", default=list(DEFAULT_TIOU_THRESHOLDS),
                        help="tIoU thresholds (default: 0.1 ... 0.9)")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        ground_truth = read_ground_truth(args.gt, args.subset)
        predictions = read_results(args.pred)
        if args.subset is not None:  # predictions of other subsets' videos are not part of this evaluation
            predictions = {v: rows for v, rows in predictions.items() if v in ground_truth}
        report = score_report(score_detections(predictions, ground_truth, args.tiou))
    except (DetectionFormatError, FileNotFoundError, ValueError) as error:
        print(f"ms-temba score: error: {error}", file=sys.stderr)
        return 2
    print(f"detection mAP {report['detection_map']} % (mean over tIoU {', '.join(report['detection_map_at'])}) "
          f"on {report['num_videos']} videos, {report['num_detections']} detections, "
          f"{report['num_instances']} ground-truth segments")
    print("  " + "  ".join(f"{t}: {v}" for t, v in report["detection_map_at"].items()))
    if report["ignored_labels"]:
        print(f"  ignored predicted labels without ground truth: {report['ignored_labels']}", file=sys.stderr)
    if report["unknown_videos"]:
        print(f"  {report['unknown_videos']} predicted video(s) are not in the ground truth (false positives)",
              file=sys.stderr)
    if args.out:
        write_json(args.out, report)
    return 0
