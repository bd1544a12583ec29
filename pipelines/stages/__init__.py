"""The DVC stages (dvc.yaml), each run as `python -m pipelines.stages.<stage>`:

    synthesize -> manifest -> extract -> train -> evaluate

Each module is an entry point: its arguments and a call into the libraries (pipelines/*.py),
through the shared helper `pipelines.stages.entry.run_stage`. Stages do not import each other.
"""
