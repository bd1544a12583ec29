"""ms_temba.ops.fused: BiMamba through mamba_ssm's `mamba_inner_fn`, against BiMamba.forward.

On CPU (here and in CI) `bimamba_forward` runs with `reference_inner_fn` in place of
mamba_inner_fn: mamba_ssm's `mamba_inner_ref` written out in float64 over the library's step-by-step
loops, so what is checked is everything around the fused chain (which parameter goes where, the
per-sample reversal of padded sequences, the recomputed C, the averaging). On CUDA with mamba_ssm
the same comparison runs with the real mamba_inner_fn against the unfused path's kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ms_temba import ops
from ms_temba.mamba import BiMamba
from ms_temba.ops import fused


def reference_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                       out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                       delta_softplus=True):
    """mamba_ssm's mamba_inner_ref (variable B and C, real A), in float64."""
    assert B is None and C is None and delta_softplus
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x, z = d(xz).chunk(2, dim=1)
    rank, state = delta_proj_weight.shape[1], A.shape[-1]
    u = ops.causal_conv1d_ref(x, d(conv1d_weight).squeeze(1), d(conv1d_bias), activation="silu")
    x_dbl = u.transpose(1, 2) @ d(x_proj_weight).T  # (batch, length, rank + 2 * state)
    delta = (x_dbl[..., :rank] @ d(delta_proj_weight).T).transpose(1, 2)
    B = x_dbl[..., rank:rank + state].transpose(1, 2)
    C = x_dbl[..., -state:].transpose(1, 2)
    y = ops.selective_scan_ref(u, delta, d(A), B, C, d(D), z=z, delta_bias=d(delta_bias),
                               delta_softplus=True)
    return F.linear(y.transpose(1, 2), d(out_proj_weight), d(out_proj_bias))


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_case(device, batch=3, length=23, d_model=8, lengths=(23, 17, 5), seed=0):
    """A BiMamba with perturbed parameters (so that no term is trivially 0 or 1), inputs with
    large values in the padding (which must not reach a real frame), and the padding mask of
    `lengths` (None: no mask)."""
    torch.manual_seed(seed)
    module = BiMamba(d_model, d_state=4, d_conv=4, expand=2)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    module = module.to(device)
    hidden = torch.randn(batch, length, d_model, device=device)
    mask = None
    if lengths is not None:
        mask = torch.arange(length, device=device) < torch.tensor(lengths, device=device)[:, None]
        hidden = torch.where(mask.unsqueeze(-1), hidden, 100 * torch.randn_like(hidden))
    return module, hidden, mask


def outputs_and_gradients(forward, module, hidden, mask):
    """(out, C, gradients of every parameter and the input) for a generic upstream gradient."""
    hidden = hidden.detach().clone().requires_grad_()
    module.zero_grad()
    out, c = forward(hidden, mask)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grad_c = torch.randn(c.shape, generator=g).to(c.device, c.dtype)
    ((out * grad_out).sum() + (c * grad_c).sum()).backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    grads["input"] = hidden.grad.detach().clone()
    return out.detach(), c.detach(), grads


def check_same(a, b, tolerance):
    out_a, c_a, grads_a = a
    out_b, c_b, grads_b = b
    assert torch.isfinite(out_a).all() and torch.isfinite(c_a).all()
    assert relative_error(out_a, out_b) <= tolerance
    assert relative_error(c_a, c_b) <= tolerance
    for name in grads_b:
        assert torch.isfinite(grads_a[name]).all(), f"grad of {name} is not finite"
        error = relative_error(grads_a[name], grads_b[name])
        assert error <= tolerance, f"grad of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("lengths", [None, (23, 17, 5), (23, 23, 1)], ids=["no-mask", "padded", "one-frame"])
def test_fused_plumbing_matches_bimamba_on_cpu(lengths):
    module, hidden, mask = make_case("cpu", lengths=lengths)
    unfused = outputs_and_gradients(lambda h, m: module(h, m, return_c=True), module, hidden, mask)
    with_reference = outputs_and_gradients(
        lambda h, m: fused.bimamba_forward(module, h, m, return_c=True, inner_fn=reference_inner_fn),
        module, hidden, mask)
    check_same(with_reference, unfused, tolerance=1e-5)
    if mask is not None:  # zero at padded frames, as BiMamba's contract says
        assert (with_reference[0][~mask] == 0).all() and (with_reference[1][~mask] == 0).all()


def test_fused_without_return_c_is_the_output_alone_and_ignores_nan_padding():
    module, hidden, mask = make_case("cpu")
    hidden = hidden.masked_fill(~mask.unsqueeze(-1), float("nan"))
    with torch.no_grad():
        out = fused.bimamba_forward(module, hidden, mask, inner_fn=reference_inner_fn)
        expected = module(hidden, mask)
    assert relative_error(out, expected) <= 1e-5


def test_fused_does_not_apply_on_cpu_or_when_disabled(monkeypatch):
    assert not fused.applies(torch.zeros(1, 4, 8))
    monkeypatch.setattr(fused, "ENABLED", False)
    assert not fused.applies(torch.zeros(1, 4, 8, device="cuda" if torch.cuda.is_available() else "cpu"))
    if fused.mamba_inner_fn is None:  # no mamba_ssm: a clear error, not an AttributeError deep inside
        module, hidden, _ = make_case("cpu", lengths=None)
        with pytest.raises(RuntimeError, match="mamba_inner_fn is not available"):
            fused.bimamba_forward(module, hidden)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fused.mamba_inner_fn is None,
                    reason="needs CUDA and mamba_ssm + causal_conv1d (the fused kernels)")
@pytest.mark.parametrize("length,lengths", [(300, None), (2300, None), (2300, (2300, 1500))],
                         ids=["300", "2300-two-kernel-chunks", "2300-padded"])
def test_fused_kernels_match_unfused_kernels_on_cuda(length, lengths, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # exact fp32 products
    batch = 1 if lengths is None else len(lengths)
    module, hidden, mask = make_case("cuda", batch=batch, length=length, d_model=64, lengths=lengths)
    monkeypatch.setattr(fused, "ENABLED", False)  # BiMamba.forward must take its unfused path
    unfused = outputs_and_gradients(lambda h, m: module(h, m, return_c=True), module, hidden, mask)
    monkeypatch.setattr(fused, "ENABLED", True)
    assert fused.applies(hidden)
    fused_result = outputs_and_gradients(
        lambda h, m: fused.bimamba_forward(module, h, m, return_c=True), module, hidden, mask)
    # Both run mamba_ssm's float32 kernels; they differ in the order of float32 sums only.
    check_same(fused_result, unfused, tolerance=1e-4)
