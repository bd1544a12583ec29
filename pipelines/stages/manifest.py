"""Stage `manifest`: probe every video, cross-check the annotations, write the dataset's manifest.

    python -m pipelines.stages.manifest --out data/<dataset>/manifest.parquet --report reports/manifest_report.json

The manifest and its checks are pipelines.manifest's (build_manifest). The report is written
first; a dataset without a usable training or test video is an error (exit status 2) before the
manifest is written, as the later stages would fail on it.
"""
from __future__ import annotations

from pipelines.stages.entry import run_stage


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="manifest.parquet to write")
    parser.add_argument("--report", required=True, help="JSON report of the checks")


def run(params, args, log) -> None:
    from pipelines.io import write_json, write_parquet
    from pipelines.manifest import build_manifest, require_usable

    manifest = build_manifest(params.dataset)
    report = manifest.report()
    write_json(args.report, report)
    require_usable(report, params.dataset, args.report)  # before the manifest: later stages would fail
    write_parquet(args.out, manifest.table)
    log.info("%d videos usable of %d rows; left out or repaired: %s", report["videos"]["usable"],
             report["videos"]["rows"], report["counts"] or "nothing")


def main(argv: list[str] | None = None) -> None:
    run_stage("manifest", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
