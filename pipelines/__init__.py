"""The reproducible pipeline: DVC stages from raw videos to tracked metrics.

Stages (dvc.yaml), each `python -m pipelines.<stage>`: synthesize -> manifest -> extract -> train
-> evaluate. Parameters come from params.yaml through `pipelines.config.load_params`.

Importing this package also sets up the process for long CPU runs (below); the benchmarks import
it for the same settings.
"""

import ctypes
import os
import sys

# Idle OpenMP threads sleep instead of spinning. With the default (active) waiting, a spinning idle
# thread takes the core from the one doing the work whenever anything else runs on the machine
# (a Ray actor, another stage): training steps measured 100x slower on a shared 2-core machine.
# It must be set before torch loads its OpenMP runtime, hence here, before any stage imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _keep_large_allocations_on_the_heap() -> None:
    """glibc gives every allocation above its mmap threshold (dynamic, at most 32 MiB) fresh pages
    from the kernel, which are faulted in and zeroed when first written and unmapped when freed. On
    long videos most activations are above it (at T=10000 a (T, 1152) float tensor is 46 MB), and
    the page faults made a forward+backward at T=10000 cost 5.4-6.2x the T=2500 one instead of 4x
    (benchmarks/README.md). A 1 GiB threshold keeps such blocks in the heap, and a 1 GiB trim
    threshold keeps the heap from handing its freed top back to the kernel, so they are reused.
    MS_TEMBA_MALLOC_TUNING=0, or a MALLOC_MMAP_THRESHOLD_ of your own, leaves glibc's choice."""
    if os.environ.get("MS_TEMBA_MALLOC_TUNING", "1") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


_keep_large_allocations_on_the_heap()


def _report_user_errors(kind, error, traceback) -> None:
    """sys.excepthook of every process that imports the pipelines (the stages, `ms-temba`): an
    error of the user's making (a bad parameter, an unusable annotation file, an empty manifest,
    a device the machine lacks; marked by a true `user_error` class attribute, or a
    FileNotFoundError raised with our own message) is one line on stderr and exit status 2, not
    a traceback. Anything else goes to the default hook (a traceback: a bug to report)."""
    ours = getattr(error, "user_error", False) or (isinstance(error, FileNotFoundError) and error.errno is None)
    if not ours:
        _default_excepthook(kind, error, traceback)
        return
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program.endswith(".py"):  # `python -m pipelines.train` runs .../pipelines/train.py
        program = f"{os.path.basename(os.path.dirname(sys.argv[0]))}.{program[:-3]}"
    sys.stderr.write(f"{program}: error: {error}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    import atexit

    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)  # what a normal exit runs (CPython)
    if run_exit_functions is not None:
        run_exit_functions()
    os._exit(2)  # an excepthook cannot choose the exit status otherwise


_default_excepthook = sys.excepthook
sys.excepthook = _report_user_errors
