"""The `ms-temba` command.

    ms-temba compose [OVERRIDE ...]          print params.yaml composed from conf/ (Hydra overrides)
    ms-temba check [--params params.yaml]    validate a params file
    ms-temba import-npy --src DIR --out SHARDS --hop-s S [--fps F]
                                             per-video .npy features -> feature shards
    ms-temba predict VIDEO_OR_DIR... --checkpoint models/model.pt --out DIR [--plot]
                                             per-frame probabilities and action segments (docs/predict.md)
    ms-temba convert-release SRC DST         official MS-Temba release checkpoint -> a model file
    ms-temba export-mstct SOURCE --out DIR   predictions in MS-TCT's {video: (classes, T)} layout
    ms-temba export PREDICT_DIR --out DIR    segments as ActivityNet results JSON + CSV (pipelines/detections.py)
    ms-temba score --pred R.json --gt G.json detection mAP at tIoU 0.1..0.9 of any ActivityNet results file
    ms-temba train-vim --data DIR --out OUT  train or fine-tune a Vision Mamba on an image folder (docs/vim.md)

Each command is a module of pipelines/tools/ (predict, convert_release, export, activitynet) or,
for the small ones, a function here. `main` sets the process up first (pipelines.process).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.process import setup_process


def _compose(args) -> int:
    from pipelines.config import compose_params_yaml, parse_params

    text = compose_params_yaml(args.overrides)
    parse_params(__import__("yaml").safe_load(text))  # refuse to print an invalid configuration
    sys.stdout.write(text)
    return 0


def _check(args) -> int:
    from extractors.device import resolve_device
    from pipelines.config import load_params

    params = load_params(args.params)
    # The devices as this machine resolves them (the stages would fail the same way, later).
    devices = [f"train.device {params.train.device!r} -> {resolve_device(params.train.device, 'train.device')}",
               f"extractor.device {params.extractor.device!r} -> "
               f"{resolve_device(params.extractor.device, 'extractor.device')}"]
    print(f"{args.params}: ok ({'; '.join(devices)} on this machine)")
    return 0


def _import_npy(args) -> int:
    from pipelines.import_npy import import_npy

    imported, failures = import_npy(args.src, args.out, hop_s=args.hop_s, fps=args.fps, window_s=args.window_s,
                                    videos_per_shard=args.videos_per_shard)
    print(f"imported {imported} videos into {args.out}; {len(failures)} failed"
          + (f" (see {args.out}/failures.jsonl)" if failures else ""))
    return 1 if failures and not imported else 0


# Commands with their own argument parsers: `ms-temba NAME ...` hands the rest of the line to them.
DELEGATED = {
    "predict": ("pipelines.tools.predict", "main", "predict actions in new videos with a trained model"),
    "convert-release": ("pipelines.tools.convert_release", "convert_release_main",
                        "convert an official MS-Temba release checkpoint"),
    "export-mstct": ("pipelines.tools.export", "export_main", "export predictions in MS-TCT's layout"),
    "export": ("pipelines.tools.activitynet", "export_main",
               "export predicted segments as ActivityNet results JSON and CSV"),
    "score": ("pipelines.tools.activitynet", "score_main",
              "detection mAP of ActivityNet results JSON against ActivityNet ground truth"),
    "train-vim": ("pipelines.tools.train_vim", "main", "train or fine-tune a Vision Mamba on a folder of images"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-temba", description="MS-Temba pipeline tools (see docs/pipeline.md)")
    commands = parser.add_subparsers(dest="command", required=True)

    compose = commands.add_parser("compose", help="print params.yaml composed from conf/ with Hydra overrides")
    compose.add_argument("overrides", nargs="*", help="e.g. dataset=tsu train.lr=1e-3")
    compose.set_defaults(run=_compose)

    check = commands.add_parser("check", help="validate a params file")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(run=_check)

    npy = commands.add_parser("import-npy", help="import per-video .npy features ((T, D) or (T, 1, 1, D)) as shards")
    npy.add_argument("--src", required=True, help="folder of <video_id>.npy files")
    npy.add_argument("--out", required=True, help="shard directory to write")
    npy.add_argument("--hop-s", type=float, required=True, help="seconds between consecutive features")
    npy.add_argument("--window-s", type=float, default=None, help="seconds covered by one feature (default: hop)")
    npy.add_argument("--fps", type=float, default=None, help="frame rate the features were extracted at (recorded)")
    npy.add_argument("--videos-per-shard", type=int, default=16)
    npy.set_defaults(run=_import_npy)

    for name, (_, _, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)  # listed here, parsed by its module
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_process()  # before a command imports torch
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:  # pipelines.config.ConfigError is a ValueError
        print(f"ms-temba {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
