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
* --trim: compile only the kernels ms_temba calls. Measured on the H200 machine, the full build for
  sm_90a alone took over 330 s (causal-conv1d's backward unit instantiates 18 dtype pairs; each
  selective-scan unit 16-32 flag variants). ms_temba feeds fp32 or bf16 activations with fp32
  weights, real A, per-step B and C and softplus on delta, so --trim keeps the <float|bf16, float>
  instantiations and pins kIsVariableB, kIsVariableC and kDeltaSoftplus to true. Any other call
  fails with a clear error (TORCH_CHECK / AT_ERROR) rather than running a missing kernel.

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


# A `template void name<input, weight>(...);` explicit instantiation line.
INSTANTIATION = re.compile(r"^template void (?P<name>\w+)<(?P<input>[\w:]+), ?(?P<weight>[\w:]+)>\(.*\);[ \t]*$",
                           re.MULTILINE)
# The dtype-dispatch branches of the .cpp files that --trim turns into errors: in each, the line
# `using <role> = <type>; \` followed by `__VA_ARGS__(); \`.
TRIMMED_BRANCHES = (("input_t", "at::Half"), ("weight_t", "at::Half"), ("weight_t", "at::BFloat16"),
                    ("weight_t", "c10::complex<float>"))
TRIMMED_FLAGS = ("is_variable_B", "is_variable_C", "delta_softplus")
TRUE_ONLY_SWITCH = """
// ms-temba --trim: a flag ms_temba always sets compiles its true case only.
#define TRUE_ONLY_SWITCH(COND, CONST_NAME, ...)                                                   \\
    [&] {                                                                                        \\
        TORCH_CHECK(COND, #COND " is false: this build (ms-temba --trim) has the true case only"); \\
        constexpr bool CONST_NAME = true;                                                        \\
        return __VA_ARGS__();                                                                    \\
    }()
"""


def _kept(match: re.Match) -> bool:
    """ms_temba's dtypes: fp32 or bf16 activations, fp32 weights (real A)."""
    return match["input"] in ("float", "at::BFloat16") and match["weight"] == "float"


def trim_kernels(directory: Path) -> int:
    """Keep the instantiations and flag variants ms_temba calls (see --trim); returns the edits."""
    edits = 0
    for cu in sorted(directory.glob("csrc/**/*.cu")):
        text = cu.read_text()
        edits += sum(not _kept(m) for m in INSTANTIATION.finditer(text))
        cu.write_text(INSTANTIATION.sub(lambda m: m[0] if _kept(m) else f"// ms-temba --trim: {m[0]}", text))
    for cpp in sorted(directory.glob("csrc/**/*.cpp")):
        text = cpp.read_text()
        for role, dtype in TRIMMED_BRANCHES:
            branch = rf"(using {role} = {re.escape(dtype)};[ \t]*\\\n[ \t]*)__VA_ARGS__\(\);"
            text, count = re.subn(branch, r'\1AT_ERROR(#NAME, " not built for this dtype (ms-temba --trim)");', text)
            edits += count
        cpp.write_text(text)
    scan_sources = directory / "csrc" / "selective_scan"
    for cuh in sorted(scan_sources.glob("selective_scan_*_kernel.cuh")):
        text = cuh.read_text()
        for flag in TRIMMED_FLAGS:
            text, count = re.subn(rf"BOOL_SWITCH\((params\.{flag}),", r"TRUE_ONLY_SWITCH(\1,", text)
            edits += count
        cuh.write_text(text)
    switch_h = scan_sources / "static_switch.h"
    if switch_h.is_file():
        switch_h.write_text(switch_h.read_text() + TRUE_ONLY_SWITCH)
    if edits == 0:
        raise SystemExit(f"patch_sources: --trim changed nothing under {directory}; check the layout by hand")
    return edits


def main(arguments: list[str]) -> None:
    standard, trim = None, False
    while arguments[:1] in (["--cxx-std"], ["--trim"]):
        if arguments[0] == "--trim":
            trim, arguments = True, arguments[1:]
        else:
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
        if trim:
            print(f"{directory}: {trim_kernels(directory)} kernel instantiations / switches trimmed")
        init_py = directory / "mamba_ssm" / "__init__.py"
        if init_py.is_file():
            print(f"{init_py}: {patch_mamba_init(init_py)} imports made optional")


if __name__ == "__main__":
    main(sys.argv[1:])
