"""The CUDA paths against the CPU: the scan and conv kernels, the whole model, a bf16 training
step, and I3D and CLIP extraction. Every test skips without CUDA, so CI (no GPU) collects them
harmlessly; benchmarks/gpu/check.sh runs them on a GPU machine.

The scan and conv run on CUDA two ways: through mamba_ssm / causal_conv1d's kernels ("kernels") and
through the library's own torch-op path ("torch-ops", what a CUDA machine without the kernels runs).
ms_temba.ops has no switch for the second today; `without_kernels` sets its two kernel handles to
None, which is what ops does when the packages do not import. Both are checked against the float64
step-by-step references, forward and every gradient, in both scan directions.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

import ms_temba
from ms_temba import ops
from ms_temba.losses import ms_temba_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

needs_kernels = pytest.mark.skipif(not ops.HAS_CUDA_KERNELS,
                                   reason="needs the mamba_ssm and causal_conv1d CUDA kernels")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 products would differ from the CPU's float32 by ~1e-3; the comparisons are of fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def without_kernels(monkeypatch):
    """ms_temba.ops as it runs on a CUDA machine without mamba_ssm / causal_conv1d."""
    with monkeypatch.context() as patch:
        patch.setattr(ops, "USE_CUDA_KERNELS", False)
        yield


def kernel_paths(monkeypatch, path):
    return contextlib.nullcontext() if path == "kernels" else without_kernels(monkeypatch)


PATHS = [pytest.param("kernels", marks=needs_kernels), "torch-ops"]


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------------------
# The two kernels against the float64 references


def scan_inputs(batch, dim, state, length, seed):
    """Inputs in the ranges a Mamba block produces (A < 0, delta around softplus(-1))."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(u=randn(batch, dim, length), delta=0.5 * randn(batch, dim, length) - 1.0,
                A=-torch.exp(0.5 * randn(dim, state)), B=randn(batch, state, length),
                C=randn(batch, state, length), D=randn(dim), z=randn(batch, dim, length),
                delta_bias=0.2 * randn(dim))


# 300: one kernel chunk; 2100: two chunks of the kernels' 2048 steps, the state carried across.
@pytest.mark.parametrize("length", [300, 2100])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("path", PATHS)
def test_selective_scan_on_cuda_matches_the_float64_loop(path, reverse, length, monkeypatch):
    inputs = scan_inputs(batch=2, dim=8, state=16, length=length, seed=length)
    ours = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
    ref = {k: v.double().requires_grad_() for k, v in inputs.items()}
    with kernel_paths(monkeypatch, path):
        out, last_state = ops.selective_scan(**ours, delta_softplus=True, return_last_state=True,
                                             reverse=reverse)
    ref_out, ref_last_state = ops.selective_scan_ref(**ref, delta_softplus=True, return_last_state=True,
                                                     reverse=reverse)
    assert out.is_cuda and out.dtype == torch.float32
    # The kernels use fast-math exp and a parallel scan: float32 error, larger than the CPU loop's.
    tolerance = 1e-4 if path == "kernels" else 1e-5
    assert relative_error(out, ref_out) <= tolerance
    assert relative_error(last_state, ref_last_state) <= tolerance
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * grad_out.cuda()).sum().backward()
    (ref_out * grad_out.double()).sum().backward()
    for name in inputs:
        error = relative_error(ours[name].grad, ref[name].grad)
        assert error <= 10 * tolerance, f"grad of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("path", PATHS)
def test_causal_conv1d_on_cuda_matches_the_float64_loop(path, reverse, monkeypatch):
    g = torch.Generator().manual_seed(3)
    inputs = dict(x=torch.randn(2, 64, 1000, generator=g), weight=torch.randn(64, 4, generator=g),
                  bias=torch.randn(64, generator=g))
    ours = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
    ref = {k: v.double().requires_grad_() for k, v in inputs.items()}
    with kernel_paths(monkeypatch, path):
        out = ops.causal_conv1d(**ours, activation="silu", reverse=reverse)
    ref_out = ops.causal_conv1d_ref(**ref, activation="silu", reverse=reverse)
    assert relative_error(out, ref_out) <= 1e-5
    grad_out = torch.randn(out.shape, generator=g)
    (out * grad_out.cuda()).sum().backward()
    (ref_out * grad_out.double()).sum().backward()
    for name in inputs:
        error = relative_error(ours[name].grad, ref[name].grad)
        assert error <= 1e-5, f"grad of {name}: relative error {error:.2e}"


# ----------------------------------------------------------------------------------------------
# The whole model


def model_case(seed=0, length=700):
    """A small MS-Temba (3 blocks, so DTS branches of 1, 2 and 3) and a padded batch."""
    torch.manual_seed(seed)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=32, num_classes=5).eval()
    features = torch.randn(2, length, 32)
    mask = torch.arange(length) < torch.tensor([length, length - 123])[:, None]
    targets = (torch.rand(2, length, 5) < 0.2).float()
    return model, features, mask, targets


def loss_and_gradients(model, features, mask, targets):
    model.zero_grad()
    output = model(features, mask)
    loss = ms_temba_loss(output, targets, mask)["loss"]
    loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach().cpu(), loss.detach().cpu(), grads


@pytest.mark.parametrize("path", PATHS)
def test_model_on_cuda_matches_cpu(path, monkeypatch):
    model, features, mask, targets = model_case()
    cpu_logits, cpu_loss, cpu_grads = loss_and_gradients(model, features, mask, targets)
    with kernel_paths(monkeypatch, path):
        cuda_logits, cuda_loss, cuda_grads = loss_and_gradients(
            model.cuda(), features.cuda(), mask.cuda(), targets.cuda())
    assert relative_error(cuda_logits, cpu_logits) <= 1e-4
    assert abs(cuda_loss.item() - cpu_loss.item()) <= 1e-4 * abs(cpu_loss.item())
    assert cuda_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        error = relative_error(cuda_grads[name], grad)
        assert error <= 1e-3, f"grad of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("path", PATHS)
def test_bf16_training_step(path, monkeypatch):
    """One AdamW step under bf16 autocast: finite loss and gradients, a loss within bf16's
    precision of the fp32 loss, and a step that lowers the (fp32) loss on the same batch."""
    model, features, mask, targets = model_case(length=1000)
    model, features, mask, targets = model.cuda().train(), features.cuda(), mask.cuda(), targets.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_of(dtype):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return ms_temba_loss(model(features, mask), targets, mask)["loss"]

    with kernel_paths(monkeypatch, path):
        with torch.no_grad():
            fp32_before = loss_of(torch.float32).item()
        loss = loss_of(torch.bfloat16)
        loss.backward()
        assert torch.isfinite(loss)
        assert abs(loss.item() - fp32_before) <= 5e-2 * abs(fp32_before)
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"grad of {name} is not finite"
        optimizer.step()
        with torch.no_grad():
            assert loss_of(torch.float32).item() < fp32_before


# ----------------------------------------------------------------------------------------------
# Feature extraction on the GPU against the CPU


# CLIP's architecture at test size (as tests/test_clip.py), random weights.
CLIP_TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8, num_classes=48)


def extractor_features(backbone, device, precision, frames, **kwargs):
    """Features of in-memory frames from a random-weight extractor, the same weights on every device."""
    from extractors.clip import ClipExtractor
    from extractors.config import ExtractorConfig
    from extractors.i3d import I3DExtractor

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning
        cfg = ExtractorConfig(backbone=backbone, device=device, precision=precision, fps=8.0, **kwargs)
        extractor = I3DExtractor(cfg) if backbone == "i3d" else ClipExtractor(cfg, model_kwargs=CLIP_TINY)
    return extractor.extract_frames(frames, np.arange(len(frames)) / 8.0).features


@pytest.mark.parametrize("backbone,kwargs", [
    ("i3d", dict(image_size=64, mode="fully_conv", chunk_frames=32)),
    ("clip", dict(image_size=32, model_name="vit_base_patch16_clip_224.openai", clip_window=4)),
])
def test_extraction_on_cuda_matches_cpu(backbone, kwargs):
    from extractors.config import PRECISION_TOLERANCE

    frames = np.random.default_rng(0).integers(0, 256, (64, kwargs["image_size"], kwargs["image_size"], 3),
                                               dtype=np.uint8)
    cpu = extractor_features(backbone, "cpu", "fp32", frames, **kwargs)
    cuda = extractor_features(backbone, "cuda", "fp32", frames, **kwargs)
    assert cuda.shape == cpu.shape and len(cpu) > 1
    assert relative_error(torch.from_numpy(cuda), torch.from_numpy(cpu)) <= 1e-4
    half = extractor_features(backbone, "cuda", "fp16", frames, **kwargs)
    assert relative_error(torch.from_numpy(half), torch.from_numpy(cpu)) <= PRECISION_TOLERANCE["fp16"]
