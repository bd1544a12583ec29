"""Tests of the MS-Temba network (ms_temba.mamba, ms_temba.model, ms_temba.registry).

The references are written independently of the code under test: the bidirectional Mamba
recurrence in float64 on the library's per-step reference kernels (ms_temba.ops.causal_conv1d_ref
and selective_scan_ref, plain loops that share no code with the fast paths), and a per-video
re-implementation of the MS-Temba forward pass that handles each dilated sub-sequence by slicing
(as the release does) instead of by masking.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import ms_temba
from ms_temba.convert import model_to_release_state_dict
from ms_temba.mamba import BiMamba
from ms_temba.model import MSTemba, MSTembaConfig, dilated_temporal_ssm
from ms_temba.ops import causal_conv1d_ref, selective_scan_ref
from shared_data import read_reference_shapes



# ----------------------------------------------------------------------------------------------
# Independent float64 references
# ----------------------------------------------------------------------------------------------


def reference_scan_direction(x, z, conv, x_proj, dt_proj, A_log, D):
    """One Mamba direction over a single unpadded sequence, in float64: the causal conv (+ silu),
    the projections to delta, B and C, and the selective scan, as the per-step references compute them.

    x, z: (length, d_inner). Returns y (length, d_inner) and C (length, d_state).
    """
    d_state = A_log.shape[1]
    dt_rank = dt_proj.weight.shape[1]
    # Causal depthwise conv: output t reads inputs t - width + 1 .. t (zeros before 0).
    u = causal_conv1d_ref(x.T[None], conv.weight[:, 0], conv.bias, "silu")[0].T
    proj = u @ x_proj.weight.double().T
    dt_low, B, C = proj.split([dt_rank, d_state, d_state], dim=-1)
    # Zero-order-hold discretisation of A, Euler for B (Mamba's choice); delta = softplus(W dt_low + b).
    y = selective_scan_ref(u.T[None], (dt_low @ dt_proj.weight.double().T).T[None], -torch.exp(A_log.double()),
                           B.T[None], C.T[None], D, z.T[None], delta_bias=dt_proj.bias, delta_softplus=True)
    return y[0].T, C


def reference_bimamba(mixer: BiMamba, hidden):
    """Vim's bimamba v2 on one sequence hidden (length, d_model) -> (out, C (length, 2 d_state))."""
    xz = hidden.double() @ mixer.in_proj.weight.double().T
    x, z = xz.chunk(2, dim=-1)
    y_f, c_f = reference_scan_direction(
        x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D
    )
    y_b, c_b = reference_scan_direction(
        x.flip(0), z.flip(0),
        mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b,
    )
    y = (y_f + y_b.flip(0)) / 2
    return y @ mixer.out_proj.weight.double().T, torch.cat([c_f, c_b.flip(0)], dim=-1)


def reference_rms_norm(x, norm):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


def reference_stack(stack, x):
    """Pre-norm residual Mamba layers, then the final RMSNorm (the release's VisionMamba)."""
    c = None
    for layer in stack.layers:
        mixed, c = reference_bimamba(layer.mixer, reference_rms_norm(x, layer.norm))
        x = x + mixed
    return reference_rms_norm(x, stack.norm_f), c


def reference_linear(x, linear):
    return x @ linear.weight.double().T + linear.bias.double()


def reference_layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def reference_ms_temba(model: MSTemba, features):
    """MS-Temba on one unpadded video features (time, in_dim), in float64.

    Returns logits (time, classes), block_logits [K x (time, classes)] and, per block, the list of
    the k branches' C sequences (sub_length_i, 2 d_state) (empty sub-sequences skipped).
    """
    cfg = model.config
    x = reference_linear(features.double(), model.proj)
    block_outputs, block_cs = [], []
    for k in range(1, cfg.num_blocks + 1):
        block = model.blocks[k - 1]
        projection = block.projection
        x = reference_layer_norm(reference_linear(x, projection.linear), projection.norm)
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # exact GELU
        if cfg.tlm:
            conv = block.tlm.conv
            half = (cfg.tlm_kernel - 1) // 2
            conv_out = torch.zeros_like(x) + conv.bias.double()
            for t in range(x.shape[0]):
                for j in range(cfg.tlm_kernel):
                    s = t + (j - half) * k  # centred, dilation k
                    if 0 <= s < x.shape[0]:
                        conv_out[t] += conv.weight[:, 0, j].double() * x[s]
            x = x + conv_out
        branches = list(block.dts.branches)
        out, cs = torch.zeros_like(x), []
        for i, branch in enumerate(branches):
            if i < x.shape[0]:
                out[i::k], c = reference_stack(branch, x[i::k])
                cs.append(c)
        x = out
        block_outputs.append(out)
        block_cs.append(cs)
    scale_projs = list(model.fuser.scale_projs)
    fused = sum(
        reference_layer_norm(reference_linear(out, scale_proj), model.fuser.norm)
        for out, scale_proj in zip(block_outputs, scale_projs)
    )
    fused, _ = reference_stack(model.fuser.interaction_block, fused)
    logits = reference_linear(fused, model.head)
    block_logits = [
        reference_linear(out, head) for out, head in zip(block_outputs, model.block_heads)
    ]
    return logits, block_logits, block_cs


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its (structured) initial value, so that e.g. A = -(1..N),
    D = 1 and zero biases cannot hide a mix-up between parameters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        scale = 0.1 if ("A_log" in name or "A_b_log" in name) else 0.2
        p.add_(scale * noise)
    return module


def tiny_model(seed=0, **overrides) -> MSTemba:
    torch.manual_seed(seed)
    return randomize_(ms_temba.create_model("ms_temba_tiny", **overrides), seed).eval()


def padded_batch(lengths, dim, garbage=1e3, seed=0):
    """Features (batch, max(lengths), dim) with large garbage in the padded frames, and the mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    features = garbage * torch.randn(len(lengths), T, dim, generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        features[b, :n] = torch.randn(n, dim, generator=g)
        mask[b, :n] = True
    return features, mask


# ----------------------------------------------------------------------------------------------
# BiMamba
# ----------------------------------------------------------------------------------------------


def test_bimamba_matches_float64_loop():
    torch.manual_seed(0)
    mixer = randomize_(BiMamba(d_model=16, d_state=4)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, c = mixer(x, return_c=True)
    assert out.shape == (2, 9, 16) and c.shape == (2, 9, 8)
    for b in range(2):
        ref_out, ref_c = reference_bimamba(mixer, x[b])
        torch.testing.assert_close(out[b], ref_out, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(c[b], ref_c, rtol=1e-9, atol=1e-10)


def test_bimamba_shapes_and_init_follow_mamba_simple():
    mixer = BiMamba(d_model=40, d_state=16)
    d_inner, dt_rank = 80, math.ceil(40 / 16)
    assert mixer.in_proj.weight.shape == (2 * d_inner, 40) and mixer.in_proj.bias is None
    assert mixer.out_proj.weight.shape == (40, d_inner) and mixer.out_proj.bias is None
    for conv, x_proj, dt_proj, A_log, D in [
        (mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D),
        (mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b),
    ]:
        assert conv.weight.shape == (d_inner, 1, 4) and conv.bias.shape == (d_inner,)
        assert x_proj.weight.shape == (dt_rank + 32, d_inner) and x_proj.bias is None
        assert dt_proj.weight.shape == (d_inner, dt_rank)
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
        assert dt_proj.weight.abs().max() <= dt_rank**-0.5
        torch.testing.assert_close(-torch.exp(A_log), -torch.arange(1.0, 17).expand(d_inner, 16))
        torch.testing.assert_close(D, torch.ones(d_inner))


def test_bimamba_reversing_input_reverses_output_with_swapped_directions():
    torch.manual_seed(1)
    mixer = randomize_(BiMamba(d_model=16, d_state=4), seed=1).double()
    swapped = BiMamba(d_model=16, d_state=4).double()
    state = mixer.state_dict()
    forward = ["conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
               "A_log", "D"]
    backward = ["conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                "dt_proj_b.bias", "A_b_log", "D_b"]
    swap = dict(state)
    for f, b in zip(forward, backward):
        swap[f], swap[b] = state[b], state[f]
    assert set(state) == set(forward) | set(backward) | {"in_proj.weight", "out_proj.weight"}
    swapped.load_state_dict(swap)

    x = torch.randn(3, 11, 16, dtype=torch.float64)
    out, c = mixer(x, return_c=True)
    out_rev, c_rev = swapped(x.flip(1), return_c=True)
    torch.testing.assert_close(out_rev, out.flip(1))
    # The C of the swapped mixer's forward direction is the original's backward one.
    torch.testing.assert_close(c_rev, torch.cat([c[..., 4:], c[..., :4]], dim=-1).flip(1))


@pytest.mark.parametrize("lengths", [(12, 7, 1, 3, 12), (5, 2)])
def test_bimamba_padding_never_reaches_real_frames(lengths):
    torch.manual_seed(2)
    mixer = randomize_(BiMamba(d_model=16, d_state=4), seed=2).double()
    x, mask = padded_batch(lengths, 16)
    x = x.double()
    x[1, -1] = float("inf")  # row 1 is padded at its end: inf there must not leak either
    out, c = mixer(x, mask, return_c=True)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths):
        alone_out, alone_c = mixer(x[b:b + 1, :n], return_c=True)
        torch.testing.assert_close(out[b, :n], alone_out[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c[b, :n], alone_c[0], rtol=1e-12, atol=1e-12)
        # Nothing at padded frames either: out and C are exactly zero there.
        assert (out[b, n:] == 0).all() and (c[b, n:] == 0).all()


def test_bimamba_gradients_match_the_float64_loop():
    # The custom scan backward, the flips and the masking, checked end to end against autograd
    # through the independent frame-by-frame reference.
    torch.manual_seed(11)
    mixer = randomize_(BiMamba(d_model=8, d_state=4), seed=11).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    # Random output weights (d_model = 2 * d_state = 8), so every output element matters.
    weights = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    out, c = mixer(x, return_c=True)
    ((out * weights[0]).sum() + (c * weights[1]).sum()).backward()
    got = [x.grad] + [p.grad.clone() for p in mixer.parameters()]

    x_ref = x.detach().clone().requires_grad_()
    mixer.zero_grad()
    loss = 0
    for b in range(2):
        ref_out, ref_c = reference_bimamba(mixer, x_ref[b])
        loss = loss + (ref_out * weights[0][b]).sum() + (ref_c * weights[1][b]).sum()
    loss.backward()
    expected = [x_ref.grad] + [p.grad for p in mixer.parameters()]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


def test_rms_norm_matches_torch_values_and_gradients():
    # mamba.RMSNorm runs its own Function on CPU (it keeps less for the backward than torch's).
    from ms_temba.mamba import RMSNorm

    torch.manual_seed(3)
    ours, theirs = RMSNorm(12).double(), torch.nn.RMSNorm(12, eps=1e-5).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 12, dtype=torch.float64)
    results = []
    for norm in (ours, theirs):
        out = norm(x)
        results.append((out, *torch.autograd.grad((out * weights).sum(), [x, norm.weight])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_bimamba_keeps_neither_u_nor_delta_for_the_backward():
    # On CPU each direction recomputes its conv output u and step size delta in the backward
    # (ops.projected_selective_scan) rather than keeping them: what autograd keeps is the mixer's
    # input, the in_proj output xz (x for the conv, z for the gate), out_proj's input y (each
    # direction's u and delta were as large as y) and a few small tensors.
    mixer = BiMamba(d_model=32, d_state=4).train()
    hidden = torch.randn(1, 512, 32)
    params = {p.untyped_storage().data_ptr() for p in mixer.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mixer(hidden, return_c=True)
    y_bytes = 512 * mixer.d_inner * 4
    # hidden 0.5, xz 2, y 1 and the small ones: 4.05 here, against 8.4 when u and delta were kept.
    assert sum(storages.values()) < 5 * y_bytes


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tlm", [True, False])
def test_model_matches_float64_reference(tlm):
    model = tiny_model(seed=3, tlm=tlm, layers_per_branch=2).double()
    features = torch.randn(2, 8, 64, dtype=torch.float64)
    out = model(features)
    assert out.logits.shape == (2, 8, 8)
    for b in range(2):
        logits, block_logits, block_cs = reference_ms_temba(model, features[b])
        torch.testing.assert_close(out.logits[b], logits, rtol=1e-8, atol=1e-9)
        for k in range(3):
            torch.testing.assert_close(
                out.block_logits[k][b], block_logits[k], rtol=1e-8, atol=1e-9
            )
            for i, c in enumerate(block_cs[k]):
                torch.testing.assert_close(out.branch_c[k][b, i, : len(c)], c, rtol=1e-8, atol=1e-9)


def test_model_padded_batch_equals_each_video_alone():
    model = tiny_model(seed=4)
    lengths = (17, 9, 1, 2, 4, 16)
    features, mask = padded_batch(lengths, 64)
    features[1, -1] = float("nan")  # NaN in padding is ignored, not an error
    out = model(features, mask)
    assert torch.equal(out.mask, mask)
    for b, n in enumerate(lengths):
        alone = model(features[b:b + 1, :n])
        torch.testing.assert_close(out.logits[b, :n], alone.logits[0], rtol=1e-5, atol=1e-5)
        for k in range(3):
            torch.testing.assert_close(
                out.block_logits[k][b, :n], alone.block_logits[k][0], rtol=1e-5, atol=1e-5
            )
            sub_length = math.ceil(n / (k + 1))
            torch.testing.assert_close(
                out.branch_c[k][b, :, :sub_length], alone.branch_c[k][0], rtol=1e-5, atol=1e-5
            )
        assert torch.isfinite(out.logits[b]).all()


@pytest.mark.parametrize("length", [1, 2, 5, 257])
def test_dilated_ssm_equals_each_subsequence_alone(length):
    model = tiny_model(seed=5, tlm=False)
    torch.manual_seed(length)
    with torch.no_grad():
        for k in (2, 3):
            branches = model.blocks[k - 1].dts.branches
            assert len(branches) == k
            x = torch.randn(2, length, model.config.widths[k - 1])
            mask = torch.ones(2, length, dtype=torch.bool)
            out, c = dilated_temporal_ssm(x, mask, branches)
            sub_length = math.ceil(length / k)
            assert out.shape == x.shape and c.shape == (2, k, sub_length, 2 * 8)
            for i in range(k):
                if i >= length:  # an empty sub-sequence: its branch only sees padding
                    assert (c[:, i] == 0).all()
                    continue
                alone_out, alone_c = branches[i](x[:, i::k], None)
                torch.testing.assert_close(out[:, i::k], alone_out, rtol=1e-5, atol=1e-5)
                n = alone_c.shape[1]
                torch.testing.assert_close(c[:, i, :n], alone_c, rtol=1e-5, atol=1e-5)
                assert (c[:, i, n:] == 0).all()
        if length in (5, 257):
            out = model(torch.randn(1, length, 64))
            assert out.logits.shape == (1, length, 8) and torch.isfinite(out.logits).all()


def test_branch_c_shapes_and_zeros_at_padding():
    model = tiny_model(seed=6)
    lengths = (10, 4)
    features, mask = padded_batch(lengths, 64)
    out = model(features, mask)
    assert len(out.branch_c) == 3 and len(out.block_logits) == 3
    for k, c in enumerate(out.branch_c, start=1):
        assert c.shape == (2, k, math.ceil(10 / k), 2 * model.config.d_state)
        for b, n in enumerate(lengths):
            for i in range(k):
                frames = torch.arange(i, k * c.shape[2], k)  # the frames of sub-sequence i
                padded = frames >= n
                assert (c[b, i, padded] == 0).all()
                assert (c[b, i, ~padded].abs().sum(-1) > 0).all()


def test_release_parameter_counts():
    # The paper's numbers for the release architecture (I3D 1024-d and CLIP 768-d features).
    release = ms_temba.create_model("ms_temba_release")
    assert sum(p.numel() for p in release.parameters()) == 13_344_244
    clip = ms_temba.create_model("ms_temba_release", in_dim=768)
    assert sum(p.numel() for p in clip.parameters()) == 13_278_708


def test_state_dict_matches_release_keys():
    reference = {}
    for key, shape in read_reference_shapes("ms_temba_release_keys_i3d_157.tsv").items():
        # The release's VisionMamba modules carry a never-used 1000-way ImageNet `head`.
        if key.endswith((".head.weight", ".head.bias")) and not key.startswith("head."):
            assert shape[0] == 1000
            continue
        reference[key] = shape
    # Our module names differ from the release's; ms_temba.convert maps them (key by key, 1:1).
    model = ms_temba.create_model("ms_temba_release")
    ours = {key: tuple(value.shape) for key, value in model_to_release_state_dict(model.state_dict()).items()}
    assert ours == reference
    assert sum(math.prod(s) for s in reference.values()) == 13_344_244
    # The same architecture with TLMs adds only the TLM parameters, under their own names.
    with_tlm = model_to_release_state_dict(ms_temba.create_model("ms_temba").state_dict())
    without_tlm = {k: tuple(v.shape) for k, v in with_tlm.items() if not k.startswith("tlms.")}
    assert without_tlm == reference


def test_every_parameter_gets_a_gradient():
    model = tiny_model(seed=7, layers_per_branch=2, dropout=0.1).train()
    features, mask = padded_batch((12, 7), 64, garbage=1.0)
    out = model(features, mask)
    targets = (torch.rand_like(out.logits) > 0.7).float()
    loss = sum(
        F.binary_cross_entropy_with_logits(logits[mask], targets[mask])
        for logits in [out.logits, *out.block_logits]
    )
    loss.backward()
    missing = [
        name for name, p in model.named_parameters()
        if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def saved_for_backward_bytes(model, features, mask) -> tuple[object, int]:
    """The model's output and the bytes autograd keeps for its backward (one count per storage)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(features, mask)
    return out, sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpoint_blocks_gives_identical_outputs_and_gradients(dropout):
    """Activation checkpointing recomputes each block in the backward: the outputs and every
    gradient must be exactly those of the plain model (dropout masks included), while autograd
    keeps a fraction of the memory."""
    features, mask = padded_batch((40, 23), 64, garbage=1.0)
    results = []
    for checkpoint_blocks in (False, True):
        model = tiny_model(seed=11, dropout=dropout, checkpoint_blocks=checkpoint_blocks).train()
        torch.manual_seed(5)  # the same dropout masks in both runs
        out, saved = saved_for_backward_bytes(model, features, mask)
        loss = sum((logits * torch.linspace(-1, 1, logits.shape[-1])).sum()
                   for logits in [out.logits, *out.block_logits])
        (loss + sum(c.square().sum() for c in out.branch_c)).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((out, grads, saved))
    (plain, plain_grads, plain_saved), (checkpointed, checkpointed_grads, checkpointed_saved) = results
    for a, b in zip([plain.logits, *plain.block_logits, *plain.branch_c],
                    [checkpointed.logits, *checkpointed.block_logits, *checkpointed.branch_c]):
        assert torch.equal(a, b)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(grad, checkpointed_grads[name]), name
    assert checkpointed_saved < plain_saved / 4


def test_checkpoint_blocks_does_nothing_without_autograd():
    model = tiny_model(seed=12, checkpoint_blocks=True)
    features, mask = padded_batch((9, 6), 64)
    with torch.no_grad():
        expected = tiny_model(seed=12)(features, mask).logits
        assert torch.equal(model(features, mask).logits, expected)


def test_config_round_trips_through_asdict():
    model = ms_temba.create_model("ms_temba_tiny", widths=[16, 24], num_classes=3)
    assert model.config.widths == (16, 24) and len(model.block_heads) == 2
    again = MSTembaConfig(**dataclasses.asdict(model.config))
    assert again == model.config
    assert model(torch.randn(1, 5, 64)).logits.shape == (1, 5, 3)


@pytest.mark.parametrize(
    "key, value",
    [("in_dim", 0), ("num_classes", -1), ("widths", ()), ("widths", (32, 0)), ("d_state", 0),
     ("expand", 1.5), ("d_conv", 0), ("layers_per_branch", 0), ("tlm_kernel", 0),
     ("dropout", 1.0), ("tlm", "yes"), ("checkpoint_blocks", 1)],
)
def test_config_validation_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        MSTembaConfig(**{key: value})


def test_bad_inputs_raise_value_errors():
    model = tiny_model(seed=8)
    good = torch.randn(2, 6, 64)
    with pytest.raises(ValueError, match="in_dim=64"):
        model(torch.randn(2, 6, 32))
    with pytest.raises(ValueError, match="time"):
        model(torch.randn(2, 6))
    with pytest.raises(ValueError, match="zero frames"):
        model(torch.randn(2, 0, 64))
    bad = good.clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    bad[1, 3, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    with pytest.raises(ValueError, match="mask has shape"):
        model(good, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        model(good, torch.ones(2, 6))
    with pytest.raises(ValueError, match="padding must be at the end"):
        model(good, torch.tensor([[True] * 6, [False, True, True, True, True, True]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(good.numpy())


def test_registry():
    assert {"ms_temba", "ms_temba_tiny", "ms_temba_release"} <= set(ms_temba.list_models())
    assert ms_temba.list_models() == sorted(ms_temba.list_models())
    assert isinstance(ms_temba.create_model("ms_temba_tiny"), ms_temba.MSTemba)
    assert ms_temba.create_model("ms_temba_tiny").config.tlm is True
    assert ms_temba.create_model("ms_temba_release", in_dim=64, widths=(8,)).config.tlm is False
    assert ms_temba.create_model("ms_temba_tiny", in_dim=5, num_classes=2).config.in_dim == 5
    with pytest.raises(ValueError, match="ms_temba_tiny"):  # lists the known names
        ms_temba.create_model("ms_tembaa")
    with pytest.raises(ValueError, match="num_clases"):
        ms_temba.create_model("ms_temba_tiny", num_clases=3)
    with pytest.raises(ValueError, match="already registered"):
        ms_temba.register_model(ms_temba.MSTemba)(ms_temba.model.ms_temba_tiny)


def test_model_summary_counts():
    model = ms_temba.create_model("ms_temba_tiny")
    summary = ms_temba.model_summary(model)
    total = sum(p.numel() for p in model.parameters())
    tlm = sum(p.numel() for block in model.blocks for p in block.tlm.parameters())
    assert f"{total:,}" in summary and f"{total - tlm:,}" in summary
    assert "interaction_block" in summary and "blocks.2.tlm" in summary
    release = ms_temba.model_summary(ms_temba.create_model("ms_temba_release"))
    assert "13,344,244" in release


def test_submodules_are_reachable_as_attributes():
    assert callable(ms_temba.ops.selective_scan)
    with pytest.raises(AttributeError, match="no_such_thing"):
        ms_temba.no_such_thing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    # On a GPU machine this runs the mamba_ssm / causal_conv1d kernels when they are installed.
    model = tiny_model(seed=9)
    features, mask = padded_batch((40, 23), 64)
    expected = model(features, mask)
    got = model.cuda()(features.cuda(), mask.cuda())
    torch.testing.assert_close(got.logits.cpu(), expected.logits, rtol=1e-3, atol=1e-3)
    for k in range(3):
        torch.testing.assert_close(
            got.branch_c[k].cpu(), expected.branch_c[k], rtol=1e-3, atol=1e-3
        )
