"""Tests of Vision Mamba (ms_temba.vim) and of reading its checkpoints (ms_temba.checkpoint).

The references are independent of the code under test: the whole Vim forward pass written out
step by step in float64 (each patch embedded by its own matmul, the class token inserted by hand,
each layer's RMSNorm by its formula and the bimamba v2 mixer by the per-time-step loop of
tests/test_model.py's `reference_bimamba`), bicubic resampling by the cubic-convolution formula,
and the official module's key listing (shared/reference/vim_tiny_midclstok_keys.tsv).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch

import ms_temba
from ms_temba.checkpoint import CheckpointError, read_state_dict
from ms_temba.errors import ConfigFieldError
from ms_temba.vim import VimConfig, VisionMamba, resize_pos_embed
from shared_data import read_reference_shapes
from test_model import randomize_, reference_bimamba, reference_rms_norm

VARIANTS = ["vim_tiny", "vim_small", "vim_base", "vim_tiny_stride8", "vim_small_stride8", "vim_base_stride8"]
OFFICIAL_NAMES = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_stride8",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_stride8",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
}
# A Vim small enough for the float64 loops and for training on CPU in a second.
SMALL = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, d_state=8, num_classes=8,
             drop_path_rate=0.0)


def small_vim(seed: int = 0, **overrides) -> VisionMamba:
    torch.manual_seed(seed)
    return ms_temba.create_model("vim_tiny", **{**SMALL, **overrides})


# ----------------------------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------------------------


def reference_vim(model: VisionMamba, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vim's logits and final normalised tokens (N + 1, D) for one image (channels, H, W), in
    float64, one step at a time."""
    config = model.config
    p, s = config.patch_size, config.patch_stride
    rows, cols = ((side - p) // s + 1 for side in config.img_size)
    weight = model.patch_embed.proj.weight.double().reshape(config.embed_dim, -1)
    bias = model.patch_embed.proj.bias.double()
    # Every patch, row by row, flattened and projected: what the strided Conv2d computes.
    tokens = [weight @ image[:, r * s:r * s + p, c * s:c * s + p].double().reshape(-1) + bias
              for r in range(rows) for c in range(cols)]
    middle = len(tokens) // 2
    tokens.insert(middle, model.cls_token.double()[0, 0])
    x = torch.stack(tokens) + model.pos_embed.double()[0]
    for layer in model.layers:
        mixed, _ = reference_bimamba(layer.mixer, reference_rms_norm(x, layer.norm))
        x = x + mixed
    tokens = reference_rms_norm(x, model.norm_f)
    return tokens[middle] @ model.head.weight.double().T + model.head.bias.double(), tokens


@pytest.mark.parametrize("geometry", [
    dict(img_size=(12, 12), patch_size=4, stride=4),  # 3 x 3 patches: the class token at index 4 of 10
    # 5 x 3 overlapping patches (as in the stride-8 variants), the last pixel row in none of them.
    dict(img_size=(17, 10), patch_size=4, stride=3),
])
def test_vim_matches_float64_reference_with_gradients(geometry):
    model = small_vim(seed=3, **geometry, embed_dim=16, d_state=4, num_classes=5)
    randomize_(model, seed=3)  # no parameter keeps a structured value (zero bias, D = 1) that hides a mix-up
    model.double()
    images = torch.randn(2, 3, *model.config.img_size, dtype=torch.float64, requires_grad=True)
    out_weights = torch.randn(2, 5, dtype=torch.float64)

    logits = model(images)
    (logits * out_weights).sum().backward()
    got = [images.grad] + [p.grad.clone() for p in model.parameters()]

    images_ref = images.detach().clone().requires_grad_()
    model.zero_grad()
    expected_logits, expected_tokens = (torch.stack(parts) for parts in
                                        zip(*(reference_vim(model, image) for image in images_ref)))
    (expected_logits * out_weights).sum().backward()
    expected = [images_ref.grad] + [p.grad for p in model.parameters()]

    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens(images), expected_tokens.detach(), rtol=1e-9, atol=1e-10)
    names = ["images"] + [name for name, _ in model.named_parameters()]
    for name, g, e in zip(names, got, expected):
        assert e.abs().max() > 0, f"{name}: the reference gradient is zero, the check would be empty"
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_forward_features_and_the_head():
    model = small_vim().eval()
    images = torch.randn(3, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (3, 32)
    torch.testing.assert_close(model(images), features @ model.head.weight.T + model.head.bias)
    assert model.cls_position == 8  # N // 2 of the 4 x 4 patches
    headless = ms_temba.create_model("vim_tiny", **{**SMALL, "num_classes": 0})
    assert isinstance(headless.head, torch.nn.Identity) and headless(images).shape == (3, 32)


def test_residual_stream_stays_fp32_in_bfloat16():
    model = small_vim().to(torch.bfloat16).eval()
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    features = model.forward_features(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert seen == [(torch.float32, torch.float32)] * len(model.layers)
    assert features.dtype == torch.bfloat16 and torch.isfinite(features).all()
    # Without residual_in_fp32 the stream stays in the model's dtype.
    seen.clear()
    model = small_vim(residual_in_fp32=False).to(torch.bfloat16).eval()
    for layer in model.layers:
        layer.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    model.forward_features(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert seen == [(torch.bfloat16, torch.bfloat16)] * len(model.layers)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def test_vim_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = small_vim(seed=0)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # the loss falls from 2.1 (chance: log 8) to about 0.005 (seeds 0-2)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert (logits.argmax(-1) == labels).all()
    assert torch.nn.functional.cross_entropy(logits, labels) < 0.05


def test_initialisation_is_vims():
    torch.manual_seed(0)
    depth, dim = 16, 64
    model = ms_temba.create_model("vim_tiny", img_size=64, embed_dim=dim, depth=depth, num_classes=10)
    # Each out_proj: PyTorch's Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), scaled by 1/sqrt(depth).
    out_proj = torch.cat([layer.mixer.out_proj.weight.flatten() for layer in model.layers])
    bound = 1 / math.sqrt(2 * dim) / math.sqrt(depth)
    assert out_proj.abs().max() <= bound
    assert out_proj.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    # Position embedding, class token and head: normal, std 0.02 (truncated at +-2, which a std of
    # 0.02 never reaches); zero head bias.
    for tensor in (torch.cat([model.pos_embed.flatten(), model.cls_token.flatten()]), model.head.weight):
        assert tensor.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.head.bias.abs().max() == 0
    # Patch embedding: LeCun normal (std 1/sqrt(fan_in), truncated at 2 std), zero bias.
    weight = model.patch_embed.proj.weight
    lecun_std = 1 / math.sqrt(weight[0].numel())
    assert weight.std().item() == pytest.approx(lecun_std, rel=0.03)
    assert weight.abs().max() <= 2 * lecun_std / 0.87962566103423978
    assert model.patch_embed.proj.bias.abs().max() == 0
    # Both directions' initial step sizes softplus(dt bias) in [dt_min, dt_max] (mamba_simple).
    for layer in model.layers:
        for dt_proj in (layer.mixer.dt_proj, layer.mixer.dt_proj_b):
            step = torch.nn.functional.softplus(dt_proj.bias)
            assert step.min() >= 1e-3 * (1 - 1e-5) and step.max() <= 0.1 * (1 + 1e-5)


def test_drop_path_rates_rise_linearly_to_the_last_layer():
    model = ms_temba.create_model("vim_tiny", **{**SMALL, "depth": 5, "drop_path_rate": 0.2})
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)} >= {
        "pos_embed", "cls_token"}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def test_vim_tiny_has_the_official_keys_and_shapes():
    expected = read_reference_shapes("vim_tiny_midclstok_keys.tsv")
    with torch.device("meta"):  # the shapes only, no 7 M parameters to initialise
        model = ms_temba.create_model("vim_tiny")
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys, in the checkpoint's order
    assert got == expected


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_have_the_official_geometry(name):
    config = ms_temba.model_config(name)
    width = {"tiny": 192, "small": 384, "base": 768}[name.split("_")[1]]
    patches = 729 if name.endswith("stride8") else 196  # (224 - 16) // 8 + 1 = 27; 224 / 16 = 14
    assert (config.embed_dim, config.depth, config.patch_size, config.num_patches) == (width, 24, 16, patches)
    with torch.device("meta"):
        model = ms_temba.create_model(name)
    assert model.pos_embed.shape == (1, patches + 1, width)
    assert model.layers[0].mixer.in_proj.weight.shape == (4 * width, width)


@pytest.mark.parametrize("name, patch_size, stride, grid", [
    ("vim_tiny", 8, None, (28, 28)),  # the stride follows patch_size: 224 / 8 patches that tile the image
    ("vim_tiny", 8, 4, (55, 55)),  # (224 - 8) // 4 + 1, overlapping as asked
    ("vim_tiny_stride8", 32, None, (25, 25)),  # a stride-8 variant keeps its stride: (224 - 32) // 8 + 1
])
def test_the_stride_follows_an_overridden_patch_size_unless_set(name, patch_size, stride, grid):
    overrides = {"patch_size": patch_size} if stride is None else {"patch_size": patch_size, "stride": stride}
    config = ms_temba.model_config(name, **overrides)
    assert config.grid_size == grid
    with torch.device("meta"):
        proj = ms_temba.create_model(name, **overrides).patch_embed.proj
    assert proj.kernel_size == (patch_size, patch_size)
    expected_stride = stride or (8 if name.endswith("stride8") else patch_size)
    assert proj.stride == (expected_stride, expected_stride) and config.patch_stride == expected_stride


def test_no_weight_decay_is_vims_list_and_timms_optimizer_reads_it():
    from timm.optim import create_optimizer_v2

    model = small_vim()
    # Vim's models_mamba.VisionMamba.no_weight_decay() names pos_embed and cls_token (and tokens this
    # model does not have); the mixers' A_log stays decayed as in Vim's training.
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    spared = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in spared}
    assert names == {"pos_embed", "cls_token"} | {name for name, p in model.named_parameters() if p.ndim <= 1}
    assert "layers.0.mixer.A_log" not in names
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}


def test_official_names_are_aliases():
    for official, short in OFFICIAL_NAMES.items():
        assert ms_temba.model_config(official) == ms_temba.model_config(short)
        assert official not in ms_temba.list_models()
    assert set(VARIANTS) <= set(ms_temba.list_models())
    with pytest.raises(ValueError, match="unknown model 'vim_huge'"):
        ms_temba.create_model("vim_huge")

    def vim_registry_probe() -> VimConfig:
        return VimConfig()

    # A name or alias that is taken is refused, and nothing of the refused entry is registered.
    with pytest.raises(ValueError, match="'vim_tiny' is already registered"):
        ms_temba.register_model(VisionMamba, aliases=["vim_tiny"])(vim_registry_probe)
    assert "vim_registry_probe" not in ms_temba.list_models()


@pytest.mark.parametrize("wrapper", ["model", "model_ema"])
def test_checkpoint_round_trip_loads_strictly(tmp_path, wrapper):
    model = small_vim(seed=1).eval()
    path = tmp_path / "checkpoint.pth"
    # What a DeiT-style script (Vim's main.py) saves: weights beside the optimizer state and the
    # argparse arguments.
    torch.save({wrapper: model.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=5e-4, model="vim_tiny")},
               path)
    loaded = small_vim(seed=2).eval()
    loaded.load_state_dict(read_state_dict(path), strict=True)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_checkpoint_prefers_the_trained_weights_over_the_ema():
    trained, ema = small_vim(seed=1).state_dict(), small_vim(seed=2).state_dict()
    unwrapped = ms_temba.checkpoint.unwrap_state_dict({"model": trained, "model_ema": ema})
    assert all(unwrapped[key] is trained[key] for key in trained)


def test_checkpoint_still_refuses_other_pickled_objects(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {}, "loss": torch.nn.CrossEntropyLoss()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(path)


# ----------------------------------------------------------------------------------------------
# Position embeddings on another grid
# ----------------------------------------------------------------------------------------------


def reference_bicubic_1d(values: torch.Tensor, size: int) -> torch.Tensor:
    """Resample (n, ...) along dim 0 to `size` by cubic convolution (Keys, a = -0.75, PyTorch's
    choice), half-pixel centres (align_corners=False) and edge samples repeated, in float64."""
    n = values.shape[0]

    def kernel(d):  # the cubic convolution weight of a sample at distance |d|
        d, a = abs(d), -0.75
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        if d < 2:
            return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
        return 0.0

    rows = []
    for i in range(size):
        source = (i + 0.5) * n / size - 0.5
        base = math.floor(source)
        rows.append(sum(kernel(source - k) * values[min(max(k, 0), n - 1)].double()
                        for k in range(base - 1, base + 3)))
    return torch.stack(rows)


def test_resize_pos_embed_is_bicubic_over_the_grid_with_the_class_token_kept():
    old_grid, new_grid, dim = (3, 4), (5, 7), 6
    pos_embed = torch.randn(1, 3 * 4 + 1, dim)
    cls_embed = pos_embed[0, 6]  # index N // 2 = 6 of the 12 patches
    patches = torch.cat([pos_embed[0, :6], pos_embed[0, 7:]]).reshape(3, 4, dim)
    expected_grid = reference_bicubic_1d(reference_bicubic_1d(patches, 5).transpose(0, 1), 7).transpose(0, 1)
    expected = expected_grid.reshape(35, dim)
    expected = torch.cat([expected[:17], cls_embed[None].double(), expected[17:]])

    resized = resize_pos_embed(pos_embed, new_grid, old_grid)
    assert resized.shape == (1, 36, dim) and resized.dtype == pos_embed.dtype
    torch.testing.assert_close(resized[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert resize_pos_embed(pos_embed, old_grid, old_grid) is pos_embed


def test_stride16_checkpoint_loads_into_a_stride8_model_after_resizing():
    # 32 x 32 images, 8 x 8 patches: stride 8 gives 4 x 4 patches, stride 4 gives 7 x 7.
    coarse = small_vim(seed=1)
    fine = small_vim(seed=2, stride=4)
    state = coarse.state_dict()
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], fine.patch_embed.grid_size)
    fine.load_state_dict(state, strict=True)
    assert fine(torch.randn(1, 3, 32, 32)).shape == (1, 8)
    # A constant embedding stays constant: the interpolation weights sum to one.
    flat = torch.full((1, 17, 4), 0.25)
    torch.testing.assert_close(resize_pos_embed(flat, (7, 7)), torch.full((1, 50, 4), 0.25))
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 13, 4), (7, 7))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("img_size", 0), ("img_size", (32, 32, 3)), ("patch_size", 256), ("stride", 0), ("embed_dim", 1.5),
    ("num_classes", -1), ("drop_path_rate", 1.0), ("residual_in_fp32", 1),
])
def test_bad_config_fields_name_the_field(field, value):
    with pytest.raises(ConfigFieldError) as caught:
        ms_temba.model_config("vim_tiny", **{field: value})
    assert (caught.value.owner, caught.value.field) == ("VimConfig", field)


def test_config_round_trips():
    model = small_vim()
    rebuilt = ms_temba.create_model("vim_tiny", **dataclasses.asdict(model.config))
    assert rebuilt.config == model.config == VimConfig(**dataclasses.asdict(model.config))
    assert model.config.img_size == (32, 32)


def test_images_of_another_size_are_refused():
    model = small_vim()
    with pytest.raises(ValueError, match=r"images of shape \(batch, 3, 32, 32\).*got \(1, 3, 64, 64\)"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.skipif(not (torch.cuda.is_available() and ms_temba.ops.HAS_CUDA_KERNELS),
                    reason="needs CUDA and the mamba_ssm / causal_conv1d kernels")
@pytest.mark.gpu
def test_cuda_kernels_match_the_cpu_path():
    model = small_vim(seed=4).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    torch.testing.assert_close(model.cuda()(images.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)
