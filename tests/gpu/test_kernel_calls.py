"""How ms_temba.ops calls the CUDA kernels, checked on CPU.

The first GPU run (H200, 2026-12-04) found `ops.causal_conv1d` passing `activation` as the fourth
positional argument, which causal-conv1d >= 1.1 reads as `seq_idx`: every conv on the kernels
failed. The kernels cannot run here, so these tests put stand-ins with the packages' exact
signatures (mamba-ssm 2.3.2 `selective_scan_fn`, causal-conv1d 1.7.0 `causal_conv1d_fn`) in their
place and compute with the float64 references: a call that binds an argument to the wrong
parameter fails or gives another result. Where benchmarks/gpu/fetch_deps.sh has fetched the source
distributions, the stand-ins' signatures are also checked against the released code.
"""
from __future__ import annotations

import ast
import inspect
import tarfile
from pathlib import Path

import pytest
import torch

from ms_temba import ops

DEPS = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "deps"


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn's signature."""
    return ops.selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal_conv1d.causal_conv1d_fn's signature."""
    assert seq_idx is None and initial_states is None and not return_final_states
    assert activation in (None, "silu", "swish"), f"activation must be None, silu, or swish, got {activation!r}"
    return ops.causal_conv1d_ref(x, weight, bias, activation=activation)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(ops, "_cuda_selective_scan", selective_scan_fn)
    monkeypatch.setattr(ops, "_cuda_causal_conv1d", causal_conv1d_fn)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_kernel_call_binds_every_argument(stand_ins, activation, reverse):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 19, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), \
        torch.randn(6, dtype=torch.float64)
    through_kernel = ops._kernel_causal_conv1d(x, weight, bias, activation, reverse)
    cpu_path = ops.causal_conv1d(x, weight, bias, activation=activation, reverse=reverse)
    torch.testing.assert_close(through_kernel, cpu_path, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("return_last_state", [False, True])
def test_scan_kernel_call_binds_every_argument(stand_ins, return_last_state, reverse):
    torch.manual_seed(0)
    batch, dim, state, length = 2, 5, 3, 17
    f64 = dict(dtype=torch.float64)
    u, delta, z = (torch.randn(batch, dim, length, **f64) for _ in range(3))
    A, D, delta_bias = -torch.rand(dim, state, **f64) - 0.1, torch.randn(dim, **f64), torch.randn(dim, **f64)
    B, C = torch.randn(batch, state, length, **f64), torch.randn(batch, state, length, **f64)
    through_kernel = ops._kernel_selective_scan(u, delta, A, B, C, D, z, delta_bias, True,
                                                return_last_state, reverse)
    cpu_path = ops.selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                  return_last_state=return_last_state, reverse=reverse)
    torch.testing.assert_close(through_kernel, cpu_path, rtol=1e-9, atol=1e-9)


def released_signature(archive_glob: str, member_suffix: str, function: str) -> list[str]:
    archives = sorted(DEPS.glob(archive_glob))
    if not archives:
        pytest.skip(f"no {archive_glob} in {DEPS} (benchmarks/gpu/fetch_deps.sh fetches it)")
    with tarfile.open(archives[-1]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(member_suffix))
        tree = ast.parse(archive.extractfile(member).read())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return [argument.arg for argument in node.args.args]


@pytest.mark.parametrize("archive,member,stand_in", [
    ("mamba_ssm-*.tar.gz", "mamba_ssm/ops/selective_scan_interface.py", selective_scan_fn),
    ("causal_conv1d-*.tar.gz", "causal_conv1d/causal_conv1d_interface.py", causal_conv1d_fn),
])
def test_stand_ins_have_the_released_signatures(archive, member, stand_in):
    assert released_signature(archive, member, stand_in.__name__) == list(inspect.signature(stand_in).parameters)
