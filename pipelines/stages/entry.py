"""The one entry helper of the stages: process set-up, arguments, logging, params.yaml.

    def main(argv=None):
        return run_stage("train", __doc__, add_arguments, run, argv)

`run_stage` first sets the process up (pipelines.process.setup_process: before the stage imports
torch, so a stage module imports torch only inside its `run`), then parses `--params` (default
params.yaml) and the stage's own arguments, starts the stage's logging, loads the params, and
calls `run(params, args, log)`. An error of the user's making (a params file that is not valid,
a missing input) then ends the process with one line on stderr and exit status 2 (see
pipelines.process); called in-process (tests), `main` raises it instead.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from pipelines.process import setup_process


def run_stage(name: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
              run: Callable[[Any, argparse.Namespace, logging.Logger], Any], argv: list[str] | None = None):
    """Run the stage `name` (see the module docstring); returns what `run` returns."""
    setup_process()
    from pipelines.config import load_params
    from pipelines.io import setup_logging

    parser = argparse.ArgumentParser(prog=f"python -m pipelines.stages.{name}", description=doc.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    add_arguments(parser)
    args = parser.parse_args(argv)
    log = setup_logging(name)
    return run(load_params(args.params), args, log)
