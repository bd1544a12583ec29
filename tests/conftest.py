"""Settings for the whole test session."""
import os

# As in pipelines/process.py: idle OpenMP threads must sleep, not spin, or the Ray actors and
# subprocesses some tests start make every torch op in the others crawl on a 2-core machine.
# Set before any test module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
