"""Process set-up for long CPU runs, done explicitly by every entry point: the stages' entry helper
(pipelines.stages.entry), the `ms-temba` command (pipelines.tools.cli) and the benchmarks.

    from pipelines.process import setup_process
    setup_process()  # first, before anything imports torch

It makes idle OpenMP threads sleep (OMP_WAIT_POLICY, read when torch loads its OpenMP runtime, so
it only takes effect if torch is not loaded yet), keeps large allocations on glibc's heap, and
turns errors of the user's making into one line on stderr and exit status 2 (a sys.excepthook).
Calling it again does nothing more. Importing this module changes nothing.
"""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_done = False


def setup_process() -> None:
    """The three settings below, once per process."""
    global _done
    if _done:
        return
    _done = True
    # Idle OpenMP threads sleep instead of spinning. With the default (active) waiting, a spinning
    # idle thread takes the core from the one doing the work whenever anything else runs on the
    # machine (a Ray actor, another stage): training steps measured 100x slower on a shared 2-core
    # machine. It must be set before torch loads its OpenMP runtime: the entry points call this
    # before they import torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_large_allocations_on_the_heap()
    report_user_errors_briefly()


def keep_large_allocations_on_the_heap() -> None:
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


def is_user_error(error: BaseException) -> bool:
    """An error of the user's making (a bad parameter, an unusable annotation file, an empty
    manifest, a device the machine lacks): marked by a true `user_error` class attribute, or a
    FileNotFoundError raised with our own message (no errno)."""
    return bool(getattr(error, "user_error", False)) or (isinstance(error, FileNotFoundError) and error.errno is None)


def program_name() -> str:
    """How the running command is called in its error lines: the module of `python -m MODULE`
    (e.g. pipelines.stages.train), else the script's name (ms-temba)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return program[:-3] if program.endswith(".py") else program


def _report_user_errors(kind, error, traceback) -> None:
    """sys.excepthook of every entry point: a user error (is_user_error) is one line on stderr and
    exit status 2, not a traceback. Anything else goes to the default hook (a traceback: a bug to
    report)."""
    if not is_user_error(error):
        _default_excepthook(kind, error, traceback)
        return
    sys.stderr.write(f"{program_name()}: error: {error}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    import atexit

    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)  # what a normal exit runs (CPython)
    if run_exit_functions is not None:
        run_exit_functions()
    os._exit(2)  # an excepthook cannot choose the exit status otherwise


_default_excepthook = sys.excepthook


def report_user_errors_briefly() -> None:
    """Install the excepthook above (see _report_user_errors)."""
    sys.excepthook = _report_user_errors
