"""Stage `synthesize`: render the synthetic dataset, or record that the dataset is a real one.

    python -m pipelines.stages.synthesize --out data/<dataset>/generated

With `dataset.synthetic` set (the default dataset) this calls extractors.synthetic.make_dataset
with those arguments, writing out/videos/*.mp4, out/annotations.json and out/classes.txt. A real
dataset has `dataset.synthetic: null`: the stage then only writes out/NOT_SYNTHETIC.txt, so the
pipeline has the same stages for every dataset and `dvc repro` runs unchanged on real data.

The directory is rendered under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from pipelines.stages.entry import run_stage


def synthesize(synthetic: dict | None, dataset_name: str, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    try:
        staging.mkdir(parents=True)
        if synthetic is None:
            (staging / "NOT_SYNTHETIC.txt").write_text(
                f"dataset {dataset_name!r} is not synthetic (dataset.synthetic is null): nothing was generated.\n")
        else:
            from extractors.synthetic import make_dataset

            make_dataset(staging, **synthetic)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="directory to generate")


def run(params, args, log) -> None:
    if params.dataset.synthetic is None:
        log.info("dataset %r is not synthetic: skipping generation", params.dataset.name)
    else:
        log.info("rendering the synthetic dataset %s into %s", params.dataset.synthetic, args.out)
    synthesize(params.dataset.synthetic, params.dataset.name, args.out)


def main(argv: list[str] | None = None) -> None:
    run_stage("synthesize", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
