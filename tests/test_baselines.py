"""The baselines of the model library (ms_temba.mstct, ms_temba.mstcn, ms_temba.mlp) and their losses.

MS-TCT is compared with an independent float64 re-implementation of the official forward
(dairui01/MS-TCT, MSTCT/*.py) written here from the state dict alone: explicit softmax attention,
functional convs and norms, in the official (batch, channels, time) layout.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ms_temba
from ms_temba.losses import action_heatmap, heatmap_focal_loss, model_loss, mstcn_loss, mstct_loss
from shared_data import read_reference_shapes

SMALL_TCT = dict(in_dim=12, num_classes=5, widths=(16, 24, 32, 40), num_block=2, num_heads=4, mlp_ratio=2,
                 embedding_dim=8)


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn anew (so no test depends on an initialisation that zeroes anything)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


# ----------------------------------------------------------------------------------------------
# MS-TCT
# ----------------------------------------------------------------------------------------------

def test_ms_tct_has_exactly_the_official_keys_and_shapes():
    expected = read_reference_shapes("mstct_keys_i3d_157.tsv")
    model = ms_temba.create_model("ms_tct")
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected
    # and official checkpoints load strictly: a state dict built from the listing alone
    state = {key: torch.randn(shape) for key, shape in expected.items()}
    model.load_state_dict(state, strict=True)


def official_forward(state: dict, x: torch.Tensor, num_heads: int, num_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official MS-TCT forward in eval mode, float64, from a state dict. x: (batch, in_dim, time).
    Returns (logits (batch, time, classes), heatmap (batch, classes, time)) as the official module."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()

    def layer_norm(t, prefix):  # t (..., C)
        return F.layer_norm(t, t.shape[-1:], s[prefix + ".weight"], s[prefix + ".bias"], eps=1e-5)

    def linear(t, prefix):
        return t @ s[prefix + ".weight"].T + s[prefix + ".bias"]

    outs = []
    for stage in range(1, 5):
        p = f"TemporalEncoder.Temporal_Merging_Block{stage}"
        x = F.conv1d(x, s[p + ".proj.weight"], s[p + ".proj.bias"], stride=1 if stage == 1 else 2, padding=1)
        x = layer_norm(x.transpose(1, 2), p + ".norm")  # (B, T, C)
        for i in range(num_block):
            b = f"TemporalEncoder.block{stage}.{i}"
            h = layer_norm(x, b + ".norm1")
            batch, length, width = h.shape
            g = b + ".Global_Relational_Block"
            q = linear(h, g + ".q").reshape(batch, length, num_heads, -1).permute(0, 2, 1, 3)
            kv = linear(h, g + ".kv").reshape(batch, length, 2, num_heads, -1).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(q @ kv[0].transpose(-2, -1) * (width // num_heads) ** -0.5, dim=-1)
            x = x + linear((attention @ kv[1]).transpose(1, 2).reshape(batch, length, width), g + ".proj")
            h = layer_norm(x, b + ".norm2")
            lr = b + ".Local_Relational_Block"
            h = linear(h, lr + ".linear1").transpose(1, 2)
            h = F.conv1d(h, s[lr + ".TC.weight"], s[lr + ".TC.bias"], padding=1, groups=h.shape[1])
            h = F.gelu(h.transpose(1, 2))
            x = x + linear(h, lr + ".linear2")
        x = layer_norm(x, f"TemporalEncoder.norm{stage}").transpose(1, 2)  # (B, C, T)
        outs.append(x)
    size = outs[0].shape[2]
    scaled = []
    for stage, f in zip((1, 2, 3, 4), outs):
        f = linear(f.transpose(1, 2), f"Temporal_Mixer.linear_f{stage}.proj").transpose(1, 2)
        if stage > 1:
            f = F.interpolate(f, size=size, mode="linear", align_corners=False)
        scaled.append(f)
    f1, f2, f3, f4 = scaled

    def conv(t, prefix, padding=0):
        return F.conv1d(t, s[prefix + ".weight"], s[prefix + ".bias"], padding=padding)

    concat = torch.cat([f4, f3 + conv(f4, "Temporal_Mixer.linear1"), f2 + conv(f4, "Temporal_Mixer.linear2"),
                        f1 + conv(f4, "Temporal_Mixer.linear3")], dim=1)
    concat_hm = torch.cat([f4, f3, f2, f1], dim=1)
    heatmap = conv(F.relu(conv(concat_hm, "Classfication_Module.hm.0", padding=1)), "Classfication_Module.hm.2")
    logits = conv(conv(concat, "Classfication_Module.linear_fuse"), "Classfication_Module.linear_pred")
    return logits.permute(0, 2, 1), heatmap


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("length", [1, 7, 16, 37])
def test_ms_tct_forward_matches_the_official_forward(length, attention):
    model = seeded(ms_temba.create_model("ms_tct_small", **SMALL_TCT, attention=attention), seed=length)
    features = torch.randn(2, length, SMALL_TCT["in_dim"], generator=torch.Generator().manual_seed(1))
    logits, heatmap = official_forward(model.state_dict(), features.transpose(1, 2), num_heads=4, num_block=2)
    got = model.double()(features.double())
    torch.testing.assert_close(got.logits, logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.heatmap_logits, heatmap.transpose(1, 2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, kwargs", [
    ("ms_tct_small", SMALL_TCT),
    ("ms_tct_small", {**SMALL_TCT, "attention": "explicit"}),
    ("mstcn", dict(in_dim=12, num_classes=5, num_stages=3, num_layers=4, channels=8)),
    ("mlp", dict(in_dim=12, num_classes=5, hidden=16)),
])
def test_a_padded_sequence_gives_the_outputs_of_the_unpadded_one(name, kwargs):
    model = seeded(ms_temba.create_model(name, **kwargs)).double()
    features = torch.randn(3, 29, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lengths = [29, 17, 5]
    mask = torch.arange(29)[None] < torch.tensor(lengths)[:, None]
    padded = model(features.masked_fill(~mask[..., None], 1e3), mask)  # garbage in the padding
    for b, n in enumerate(lengths):
        alone = model(features[b:b + 1, :n])
        for got, expected in zip(padded[:-1], alone[:-1]):  # every output but the mask
            got, expected = (list(got), list(expected)) if isinstance(got, list) else ([got], [expected])
            for g, e in zip(got, expected):
                torch.testing.assert_close(g[b, :n], e[0], rtol=1e-9, atol=1e-9)


def frame_dependency(model, length=40, dim=12) -> np.ndarray:
    """(time, time) bool: output frame t depends on input frame s (gradient of the summed logits)."""
    model = seeded(model).double()
    features = torch.randn(1, length, dim, dtype=torch.float64, requires_grad=True)
    rows = []
    for t in range(length):
        (grad,) = torch.autograd.grad(model(features).logits[0, t].sum(), features)
        rows.append((grad[0].abs().sum(-1) > 0).numpy())
    return np.array(rows)


def test_mlp_sees_one_frame_and_a_tcn_stage_sees_its_receptive_field():
    assert (frame_dependency(ms_temba.create_model("mlp", in_dim=12, num_classes=3)) == np.eye(40, dtype=bool)).all()
    layers = 3  # dilations 1, 2, 4: each layer reads +-dilation, so the stage sees +-(2^layers - 1)
    tcn = ms_temba.create_model("mstcn_single", in_dim=12, num_classes=3, num_layers=layers)
    reach = 2 ** layers - 1
    distance = np.abs(np.arange(40)[:, None] - np.arange(40)[None, :])
    assert (frame_dependency(tcn) == (distance <= reach)).all()


def test_mstcn_stages_refine_the_previous_stage():
    model = ms_temba.create_model("mstcn", in_dim=12, num_classes=3, num_stages=3, num_layers=2)
    out = model(torch.randn(2, 20, 12))
    assert len(out.stage_logits) == 3 and out.logits is out.stage_logits[-1]
    assert all(logits.shape == (2, 20, 3) for logits in out.stage_logits)
    assert model.stages[1].conv_in.in_channels == 3  # stage 2 reads stage 1's probabilities


def test_bad_configs_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="num_heads"):
        ms_temba.create_model("ms_tct", widths=(10, 20, 30, 40), num_heads=8)
    with pytest.raises(ValueError, match="4 stages"):
        ms_temba.create_model("ms_tct", widths=(8, 16))
    with pytest.raises(ValueError, match="MSTCTConfig.attention"):
        ms_temba.create_model("ms_tct", attention="flash")
    with pytest.raises(ValueError, match="MSTCNConfig.num_layers"):
        ms_temba.create_model("mstcn", num_layers=0)
    with pytest.raises(ValueError, match="unknown FrameMLPConfig key"):
        ms_temba.create_model("mlp", widths=(1,))
    with pytest.raises(ValueError, match="in_dim=12"):
        ms_temba.create_model("mlp", in_dim=12)(torch.randn(1, 4, 10))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def official_gaussian_heatmap(length: int, instances: list[tuple[int, int]], gamma=0.5, tau=4.0) -> np.ndarray:
    """MS-TCT's gaussian1D / generate_gaussian for instances (first, end) in frames, written out."""
    heatmap = np.zeros(length)
    for first, end in instances:
        centre = (first + end) // 2
        radius = int((end - first) / gamma)
        diameter = 2 * radius + 1
        sigma = diameter / tau
        offsets = np.arange(diameter) - (diameter - 1) / 2
        gaussian = np.exp(-(offsets ** 2) / sigma ** 2)
        for k, value in zip(range(centre - radius, centre + radius + 1), gaussian):
            if 0 <= k < length:
                heatmap[k] = max(heatmap[k], value)
    return heatmap


def test_action_heatmap_is_the_official_gaussian_per_instance():
    targets = torch.zeros(2, 30, 3)
    targets[0, 3:7, 0] = 1
    targets[0, 20:21, 0] = 1
    targets[0, 0:30, 1] = 1
    targets[1, 25:30, 2] = 1
    mask = torch.ones(2, 30, dtype=torch.bool)
    heatmap = action_heatmap(targets, mask).numpy()
    np.testing.assert_allclose(heatmap[0, :, 0], official_gaussian_heatmap(30, [(3, 7), (20, 21)]), atol=1e-6)
    np.testing.assert_allclose(heatmap[0, :, 1], official_gaussian_heatmap(30, [(0, 30)]), atol=1e-6)
    np.testing.assert_allclose(heatmap[1, :, 2], official_gaussian_heatmap(30, [(25, 30)]), atol=1e-6)
    assert heatmap[1, :, :2].max() == 0
    mask[1, 27:] = False  # padding ends the run and is zero
    assert action_heatmap(targets, mask)[1, 27:].abs().max() == 0


def test_action_heatmap_matches_the_official_gaussians_on_many_short_instances():
    """Random labels: many runs per class, touching, at the crop's edges, none at all."""
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(3, 40, 5, generator=generator) < 0.4).float()
    targets[2] = 0
    mask = torch.ones(3, 40, dtype=torch.bool)
    heatmap = action_heatmap(targets, mask).numpy()
    for sample in range(3):
        for cls in range(5):
            frames = np.flatnonzero(np.diff(np.concatenate([[0], targets[sample, :, cls].numpy(), [0]])))
            runs = list(zip(frames[::2], frames[1::2]))
            np.testing.assert_allclose(heatmap[sample, :, cls], official_gaussian_heatmap(40, runs), atol=1e-6)
    assert heatmap[2].max() == 0


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([[[2.0], [-1.0], [0.5], [0.0]]])
    heatmap = torch.tensor([[[1.0], [0.5], [0.0], [1.0]]])
    mask = torch.tensor([[True, True, True, False]])
    p = torch.sigmoid(logits[0, :3, 0])
    expected = -(math.log(p[0]) * (1 - p[0]) ** 2 + math.log(1 - p[1]) * p[1] ** 2 * 0.5 ** 4
                 + math.log(1 - p[2]) * p[2] ** 2) / 1
    torch.testing.assert_close(heatmap_focal_loss(logits, heatmap, mask), torch.tensor(float(expected)))


def test_mstcn_smoothing_term_matches_a_loop():
    torch.manual_seed(0)
    stage_logits = [torch.randn(2, 9, 3) * 4 for _ in range(2)]
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    targets = (torch.rand(2, 9, 3) > 0.5).float()
    output = ms_temba.MSTCNOutput(stage_logits[-1], stage_logits, mask)
    terms = mstcn_loss(output, targets, mask)
    smooth = 0.0
    for logits in stage_logits:
        values = []
        for b in range(2):
            for t in range(1, int(mask[b].sum())):
                step = (F.logsigmoid(logits[b, t]) - F.logsigmoid(logits[b, t - 1])).abs().clamp(max=4.0) ** 2
                values += step.tolist()
        smooth += sum(values) / len(values)
    torch.testing.assert_close(terms["smoothing"], torch.tensor(smooth))
    bce = sum(F.binary_cross_entropy_with_logits(l[mask], targets[mask], reduction="sum") / mask.sum()
              for l in stage_logits)
    torch.testing.assert_close(terms["loss"], bce + 0.15 * terms["smoothing"])


def test_model_loss_gives_each_model_its_own_loss():
    targets = torch.zeros(1, 16, 5)
    targets[0, 2:9, 1] = 1
    features = torch.randn(1, 16, 12)
    cases = {"ms_tct_small": {"heatmap_focal"}, "mstcn": {"stage_bce", "smoothing"}, "mlp": set(),
             "ms_temba_tiny": {"block_bce", "consistency"}}
    for name, own_terms in cases.items():
        kwargs = SMALL_TCT if name == "ms_tct_small" else dict(in_dim=12, num_classes=5)
        output = ms_temba.create_model(name, **kwargs)(features)
        terms = model_loss(output, targets)
        assert set(terms) == {"loss", "bce"} | own_terms, name
        terms["loss"].backward()
    tct = ms_temba.create_model("ms_tct_small", **SMALL_TCT)(features)
    direct = mstct_loss(tct, targets)
    torch.testing.assert_close(direct["loss"], direct["bce"] + 0.05 * direct["heatmap_focal"])
    with pytest.raises(TypeError, match="no loss"):
        model_loss(("not", "an", "output"), targets)


@pytest.mark.parametrize("name", ["ms_tct_small", "mstcn", "mlp"])
def test_each_baseline_fits_a_small_problem(name):
    """A few hundred Adam steps on 4 sequences drive each model's BCE far below its start."""
    torch.manual_seed(0)
    kwargs = {"ms_tct_small": SMALL_TCT, "mlp": dict(in_dim=12, num_classes=5),
              "mstcn": dict(in_dim=12, num_classes=5, num_stages=2, num_layers=3, channels=16)}[name]
    model = ms_temba.create_model(name, **{**kwargs, "dropout": 0.0})
    features = torch.randn(4, 24, 12)
    targets = (features[..., :5] > 0.3).float()  # learnable per frame, so every model can fit it
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(100):
        terms = model_loss(model(features), targets)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        first = first if first is not None else terms["bce"].item()
    assert terms["bce"].item() < 0.25 * first


@pytest.mark.parametrize("name", ["ms_temba_tiny", "mlp", "mstcn", "ms_tct_small"])
def test_class_prior_init_makes_the_heads_predict_the_base_rates(name):
    """ms_temba.init_class_prior on a model's class_heads(): with the heads' weights zeroed, every
    frame's probabilities are the given base rates (those of a class never seen are clipped to 1e-4)."""
    torch.manual_seed(0)
    num_classes = 5
    model = ms_temba.create_model(name, in_dim=16, num_classes=num_classes).eval()
    prior = torch.tensor([0.02, 0.3, 0.0, 0.5, 0.9])
    ms_temba.init_class_prior(model.class_heads(), prior)
    expected_bias = np.log(np.clip(prior.double().numpy(), 1e-4, 1 - 1e-4) /
                           (1 - np.clip(prior.double().numpy(), 1e-4, 1 - 1e-4)))
    for head in model.class_heads():
        np.testing.assert_allclose(head.bias.detach().double().numpy(), expected_bias, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            head.weight.zero_()
    output = model(torch.randn(2, 12, 16))
    every_logits = [output.logits, *getattr(output, "block_logits", [])]
    for logits in every_logits:
        probabilities = torch.sigmoid(logits).detach().double().numpy()
        np.testing.assert_allclose(probabilities, np.broadcast_to(np.clip(prior.numpy(), 1e-4, 1 - 1e-4),
                                                                  probabilities.shape), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bias has shape"):
        ms_temba.init_class_prior(model.class_heads(), torch.full((num_classes + 1,), 0.1))
