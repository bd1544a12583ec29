"""benchmarks/gpu/patch_sources.py on the code it patches: the flag block of mamba-ssm 2.3.2.post1's
setup.py (copied verbatim below) must, once patched, still run and add no -gencode flag, and a layout
it does not know must stop the build instead of letting it compile for nine architectures."""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "patch_sources.py"
spec = importlib.util.spec_from_file_location("patch_sources", SCRIPT)
patch_sources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patch_sources)

# mamba-ssm 2.3.2.post1 setup.py, the CUDA branch of its flag selection, verbatim.
SETUP_EXCERPT = textwrap.dedent('''\
    cc_flag = []
    if True:
        if True:
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_75,code=sm_75")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_80,code=sm_80")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_87,code=sm_87")
            if bare_metal_version >= Version("11.8"):
                cc_flag.append("-gencode")
                cc_flag.append("arch=compute_90,code=sm_90")
            if bare_metal_version >= Version("13.0"):
                cc_flag.append("-gencode")
                cc_flag.append("arch=compute_121,code=sm_121")
        extra_compile_args = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"] + cc_flag}
    ''')


def run_flag_block(text: str) -> dict:
    namespace = {"bare_metal_version": (13, 0), "Version": lambda v: tuple(map(int, v.split(".")))}
    exec(compile(text, "setup.py", "exec"), namespace)
    return namespace


def test_unpatched_excerpt_adds_every_architecture():  # the premise of the patch
    assert run_flag_block(SETUP_EXCERPT)["cc_flag"].count("-gencode") == 5


def test_patched_setup_adds_no_gencode_and_can_raise_the_standard(tmp_path):
    setup_py = tmp_path / "setup.py"
    setup_py.write_text(SETUP_EXCERPT)
    assert patch_sources.patch_setup(setup_py) == 10
    assert patch_sources.patch_cxx_standard(setup_py, "20") == 2
    namespace = run_flag_block(setup_py.read_text())
    assert namespace["cc_flag"] == []
    assert namespace["extra_compile_args"] == {"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20"]}


def test_unknown_layout_stops(tmp_path):
    setup_py = tmp_path / "setup.py"
    setup_py.write_text("cc_flag = ['-gencode', 'arch=compute_90,code=sm_90']\n")
    with pytest.raises(SystemExit, match="layout changed"):
        patch_sources.patch_setup(setup_py)


def test_mamba_init_imports_become_optional(tmp_path):
    init_py = tmp_path / "__init__.py"
    init_py.write_text(textwrap.dedent('''\
        __version__ = "2.3.2.post1"

        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, mamba_inner_fn
        from mamba_ssm.modules.mamba_simple import Mamba
        from mamba_ssm.modules.mamba2 import Mamba2
        from mamba_ssm.modules.mamba3 import Mamba3
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        '''))
    assert patch_sources.patch_mamba_init(init_py) == 3
    # With the three modules missing, the patched file runs as far as the two it keeps.
    text = init_py.read_text().replace("from mamba_ssm.ops.selective_scan_interface import", "# ")
    text = text.replace("from mamba_ssm.modules.mamba_simple import Mamba", "")
    exec(compile(text, "__init__.py", "exec"), {})


# --trim, on excerpts of the files it edits (mamba-ssm 2.3.2.post1 / causal-conv1d 1.7.0, verbatim
# but for the lines left out between them).
DISPATCH_EXCERPT = textwrap.dedent('''\
    #define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...)                    \\
        if (ITYPE == at::ScalarType::Half) {                                            \\
            using input_t = at::Half;                                                   \\
            __VA_ARGS__();                                                              \\
        } else if (ITYPE == at::ScalarType::BFloat16) {                                 \\
            using input_t = at::BFloat16;                                               \\
            __VA_ARGS__();                                                              \\
        } else if (ITYPE == at::ScalarType::Float)  {                                   \\
            using input_t = float;                                                      \\
            __VA_ARGS__();                                                              \\
        } else {                                                                        \\
            AT_ERROR(#NAME, " not implemented for input type '", toString(ITYPE), "'"); \\
        }

    #define DISPATCH_WTYPE_FLOAT_AND_COMPLEX(WTYPE, NAME, ...)                           \\
        if (WTYPE == at::ScalarType::Float) {                                            \\
           using weight_t = float;                                                       \\
            __VA_ARGS__();                                                               \\
        } else if (WTYPE == at::ScalarType::ComplexFloat) {                              \\
            using weight_t = c10::complex<float>;                                        \\
            __VA_ARGS__();                                                               \\
        } else {                                                                         \\
            AT_ERROR(#NAME, " not implemented for weight type '", toString(WTYPE), "'"); \\
        }
    ''')
INSTANTIATIONS = textwrap.dedent('''\
    template void selective_scan_fwd_cuda<float, float>(SSMParamsBase &params, cudaStream_t stream);
    template void selective_scan_fwd_cuda<float, complex_t>(SSMParamsBase &params, cudaStream_t stream);
    template void causal_conv1d_bwd_cuda<at::BFloat16, float>(ConvParamsBwd &params, cudaStream_t stream);
    template void causal_conv1d_bwd_cuda<at::Half, float>(ConvParamsBwd &params, cudaStream_t stream);
    template void causal_conv1d_bwd_cuda<at::BFloat16, at::BFloat16>(ConvParamsBwd &params, cudaStream_t stream);
    ''')
SWITCHES = textwrap.dedent('''\
        BOOL_SWITCH(params.seqlen % (kNThreads * kNItems) == 0, kIsEvenLen, [&] {
            BOOL_SWITCH(params.is_variable_B, kIsVariableB, [&] {
                BOOL_SWITCH(params.is_variable_C, kIsVariableC, [&] {
                    BOOL_SWITCH(params.delta_softplus, kDeltaSoftplus, [&] {
    ''')


def test_trim_keeps_what_ms_temba_calls_and_makes_the_rest_an_error(tmp_path):
    scan = tmp_path / "csrc" / "selective_scan"
    scan.mkdir(parents=True)
    (scan / "selective_scan.cpp").write_text(DISPATCH_EXCERPT)
    (scan / "selective_scan_fwd.cu").write_text(INSTANTIATIONS)
    (scan / "selective_scan_bwd_kernel.cuh").write_text(SWITCHES)
    (scan / "static_switch.h").write_text("#pragma once\n")

    # 2 dispatch branches (Half input, complex weight), 3 instantiations, 3 switches.
    assert patch_sources.trim_kernels(tmp_path) == 8

    cpp = (scan / "selective_scan.cpp").read_text()
    assert cpp.count("__VA_ARGS__();") == 3  # float and bf16 input, float weight
    assert cpp.count('" not built for this dtype (ms-temba --trim)");') == 2
    kept = [line for line in (scan / "selective_scan_fwd.cu").read_text().splitlines()
            if line.startswith("template void")]
    assert kept == ["template void selective_scan_fwd_cuda<float, float>(SSMParamsBase &params, cudaStream_t stream);",
                    "template void causal_conv1d_bwd_cuda<at::BFloat16, float>(ConvParamsBwd &params, cudaStream_t stream);"]
    switches = (scan / "selective_scan_bwd_kernel.cuh").read_text()
    assert switches.count("TRUE_ONLY_SWITCH(") == 3 and "BOOL_SWITCH(params.seqlen" in switches
    assert "#define TRUE_ONLY_SWITCH(COND, CONST_NAME, ...)" in (scan / "static_switch.h").read_text()


def test_trim_that_finds_nothing_stops(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "other.cu").write_text("// nothing to trim\n")
    with pytest.raises(SystemExit, match="changed nothing"):
        patch_sources.trim_kernels(tmp_path)
