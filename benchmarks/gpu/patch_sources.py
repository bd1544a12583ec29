"""Patch unpacked mamba-ssm and causal-conv1d sources so that they build for one GPU in minutes.

    python benchmarks/gpu/patch_sources.py [--cxx-std 20] SOURCE_DIR [SOURCE_DIR ...]

Two changes, each checked to have applied (a new release that moved the code fails here, loudly,
rather than building for an hour), and one on request:

* setup.py (both packages) appends `-gencode` flags for nine architectures (sm_75 to sm_121 with
  CUDA 13) to every nvcc command, whatever TORCH_CUDA_ARCH_LIST says, and neither package has a
  variable to limit them. Each appended flag becomes `pass`: torch's cpp_extension then compiles
  for TORCH_CUDA_ARCH_LIST alone (check.sh sets the GPU's own, 9.0 on an H100 / H200), one ninth
  of the device code.
* mamba_ssm/__init__.py imports Mamba2, Mamba3 and the language model on `import mamba_ssm`, which
  need packages the check does not carry (tilelang, quack-kernels, transformers' generation API);
  any `import mamba_ssm.ops...` runs it first. Those imports are made optional. The selective scan
  interface, which ms_temba uses, is imported as before.
* --cxx-std 20: mamba-ssm's setup.py pins `-std=c++17`, and torch >= 2.14's headers require C++20
  (`#error C++20 or later compatible compiler is required to use ATen`; state-spaces/mamba PR
  #1000 proposes the same bump upstream). check.sh asks for it when the installed torch's ATen.h
  says so; torch 2.11, on the GPU machine today, builds with the pinned C++17.

Standard library only: it runs on the GPU machine before anything is installed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# cc_flag.append("-gencode") / cc_flag.append("arch=compute_90,code=sm_90") lines of setup.py.
GENCODE_LINE = re.compile(r'^(?P<indent>[ \t]*)cc_flag\.append\("(-gencode|arch=compute_\w+,code=sm_\w+)"\)[ \t]*$',
                          re.MULTILINE)
OPTIONAL_IMPORTS = re.compile(r"^(from mamba_ssm\.(modules\.mamba2|modules\.mamba3|models\.mixer_seq_simple) "
                              r"import .+)$", re.MULTILINE)


def patch_setup(setup_py: Path) -> int:
    """Drop the hard-coded -gencode flags; returns how many lines changed."""
    text = setup_py.read_text()
    patched, count = GENCODE_LINE.subn(lambda m: f"{m['indent']}pass  # ms-temba: TORCH_CUDA_ARCH_LIST only", text)
    if count < 2:
        raise SystemExit(f"patch_sources: no hard-coded -gencode flags found in {setup_py}; "
                         f"its layout changed, check it by hand")
    setup_py.write_text(patched)
    return count


def patch_cxx_standard(setup_py: Path, standard: str) -> int:
    """Replace pinned -std=c++17 flags by -std=c++<standard>; returns how many."""
    text = setup_py.read_text()
    count = text.count('"-std=c++17"')
    setup_py.write_text(text.replace('"-std=c++17"', f'"-std=c++{standard}"'))
    return count


def patch_mamba_init(init_py: Path) -> int:
    """Make the imports of the modules ms_temba does not use optional; returns how many."""
    text = init_py.read_text()
    patched, count = OPTIONAL_IMPORTS.subn(
        lambda m: f"try:  # ms-temba: optional, needs packages not carried\n    {m[1]}\nexcept ImportError:\n    pass",
        text)
    if "from mamba_ssm.ops.selective_scan_interface import" not in patched or count == 0:
        raise SystemExit(f"patch_sources: {init_py} is not laid out as expected; check it by hand")
    init_py.write_text(patched)
    return count


def main(arguments: list[str]) -> None:
    standard = None
    if arguments[:1] == ["--cxx-std"]:
        standard, arguments = arguments[1], arguments[2:]
    if not arguments:
        raise SystemExit(__doc__.strip().splitlines()[2])
    for directory in map(Path, arguments):
        setup_py = directory / "setup.py"
        if not setup_py.is_file():
            raise SystemExit(f"patch_sources: {setup_py} does not exist")
        print(f"{setup_py}: {patch_setup(setup_py)} -gencode lines removed")
        if standard:
            print(f"{setup_py}: {patch_cxx_standard(setup_py, standard)} -std=c++17 flags made c++{standard}")
        init_py = directory / "mamba_ssm" / "__init__.py"
        if init_py.is_file():
            print(f"{init_py}: {patch_mamba_init(init_py)} imports made optional")


if __name__ == "__main__":
    main(sys.argv[1:])
