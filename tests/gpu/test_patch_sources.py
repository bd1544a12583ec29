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
