"""mamba.RMSNorm's CPU Function over blocks of frames (`_RMSNormFunction.ROWS`): the values and
gradients of torch's RMSNorm, in float64, across block boundaries and a short last block."""

import pytest
import torch

from ms_temba.mamba import RMSNorm, _RMSNormFunction


@pytest.mark.parametrize("rows_per_block", [1, 5, 1024])
@pytest.mark.parametrize("transposed", [False, True])
def test_rms_norm_over_blocks_matches_torch(monkeypatch, rows_per_block, transposed):
    monkeypatch.setattr(_RMSNormFunction, "ROWS", rows_per_block)
    torch.manual_seed(5)
    ours, theirs = RMSNorm(12).double(), torch.nn.RMSNorm(12, eps=1e-5).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    # 2 x 23 = 46 frames: 9 blocks of 5 and a last one of 1; a non-contiguous input too.
    base = torch.randn(2, 12, 23, dtype=torch.float64) if transposed else torch.randn(2, 23, 12, dtype=torch.float64)
    base.requires_grad_()
    weights = torch.randn(2, 23, 12, dtype=torch.float64)
    results = []
    for norm in (ours, theirs):
        x = base.transpose(1, 2) if transposed else base
        out = norm(x)
        results.append((out, *torch.autograd.grad((out * weights).sum(), [base, norm.weight])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_rms_norm_float32_over_blocks_matches_float64(monkeypatch):
    monkeypatch.setattr(_RMSNormFunction, "ROWS", 64)
    torch.manual_seed(6)
    norm = RMSNorm(40)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 1000, 40, requires_grad=True)
    weights = torch.randn(1, 1000, 40)
    out = norm(x)
    grads = torch.autograd.grad((out * weights).sum(), [x, norm.weight])
    reference = torch.nn.RMSNorm(40, eps=1e-5).double()
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    x64 = x.detach().double().requires_grad_()
    out64 = reference(x64)
    grads64 = torch.autograd.grad((out64 * weights.double()).sum(), [x64, reference.weight])
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, grads64):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
