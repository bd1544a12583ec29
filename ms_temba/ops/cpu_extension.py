"""The C++ recurrence of the CPU selective scan (`ms_temba/csrc/selective_scan_cpu.cpp`), compiled
with torch.utils.cpp_extension the first time a scan runs on a machine (about 25 s, with the
machine's C++ compiler and `ninja`) and cached in `$TORCH_EXTENSIONS_DIR` (default
`~/.cache/torch_extensions`), one build per CPU type and torch installation.

`ms_temba.ops` decides whether to use it (`CPU_SCAN_EXTENSION`) and falls back to the pure-PyTorch
recurrence, with one warning, when `build_cpu_scan_extension` fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch


def build_cpu_scan_extension():
    """Compile (or load the cached build of) the C++ recurrence; raises whatever the toolchain raises."""
    # cpp_extension logs "No CUDA runtime is found" on import on CPU-only machines: not our concern.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; the pip package has one
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    source = Path(__file__).resolve().parents[1] / "csrc" / "selective_scan_cpu.cpp"
    build_directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    build_directory = build_directory / f"ms_temba_scan_{_build_signature()}"
    build_directory.mkdir(parents=True, exist_ok=True)
    return load(name="ms_temba_selective_scan_cpu", sources=[str(source)],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                build_directory=str(build_directory), verbose=False)


def _build_signature() -> str:
    """A short hash of what the build depends on besides the source, which ninja compares with its
    last build: the CPU's model and feature flags (-march=native compiles for them) and the torch
    installation (its include path, as this process sees it, is on the command line). Two venvs,
    or two spellings of one venv's path, then get one build each instead of rebuilding in turn."""
    described = f"{platform.machine()} {torch.__version__} {os.path.dirname(torch.__file__)}"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            described += "".join(line for line in cpuinfo
                                 if line.startswith(("model name", "flags", "Features")))
    except OSError:
        described += platform.processor()
    return hashlib.sha1(described.encode()).hexdigest()[:12]
