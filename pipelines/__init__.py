"""The reproducible pipeline: DVC stages from raw videos to tracked metrics.

Stages (dvc.yaml), each `python -m pipelines.<stage>`: synthesize -> manifest -> extract -> train
-> evaluate. Parameters come from params.yaml through `pipelines.config.load_params`.
"""

import os

# Idle OpenMP threads sleep instead of spinning. With the default (active) waiting, a spinning idle
# thread takes the core from the one doing the work whenever anything else runs on the machine
# (a Ray actor, another stage): training steps measured 100x slower on a shared 2-core machine.
# It must be set before torch loads its OpenMP runtime, hence here, before any stage imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
