"""The reproducible pipeline: DVC stages from raw videos to tracked metrics.

Stages (dvc.yaml), each `python -m pipelines.<stage>`: synthesize -> manifest -> extract -> train
-> evaluate. Parameters come from params.yaml through `pipelines.config.load_params`.
"""
