"""ms_temba.convert: importing the official MS-Temba release's checkpoints.

The release's state dict is rebuilt from the reference key list of its I3D/Charades model
(../shared/reference/ms_temba_release_keys_i3d_157.tsv, or its shape-for-shape copy at small
sizes), and the forward pass is checked against `release_forward`, a functional re-statement of the
release's `MSTemba.forward` (vim/models_MSTemba.py + mamba_simple's bimamba v2, fused add-norm)
that reads the release's own key names and runs its SSM as a plain float64 loop.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import ms_temba
from ms_temba.convert import (
    ReleaseCheckpointError,
    convert_release_state_dict,
    load_release_checkpoint,
    model_to_release_key,
    model_to_release_state_dict,
    read_release_state_dict,
    release_to_model_key,
)
from shared_data import read_reference_shapes

SMALL = dict(in_dim=16, num_classes=5, widths=(8, 12, 16), d_state=4)
HEAD_KEY = re.compile(r"^(blocks\.\d+(\.\d+)?|interaction_block)\.head\.(weight|bias)$")


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the given shapes, in ranges a trained model could have: A_log such that
    A = -exp(A_log) is in [-e, -1/e], everything else N(0, 0.3^2), norm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator) * 0.3
        if key.endswith(("norm.weight", "norm_f.weight")):
            value = value + 1.0
        state[key] = value
    return state


def release_shapes(config: ms_temba.MSTembaConfig) -> dict[str, tuple[int, ...]]:
    """The key -> shape table of a release model with this config: our tlm=False architecture's
    keys plus the 1000-way head of every VisionMamba stack (which our model does not have)."""
    model = ms_temba.create_model("ms_temba_release", **{**SMALL, **_fields(config)})
    shapes = {key: tuple(value.shape) for key, value in model_to_release_state_dict(model.state_dict()).items()}
    stacks = ["blocks.1"] + [f"blocks.{2 * k - 1}.{i}" for k in range(2, len(config.widths) + 1)
                             for i in range(k)] + ["interaction_block"]
    for stack in stacks:
        width = shapes[f"{stack}.norm_f.weight"][0]
        shapes[f"{stack}.head.weight"] = (1000, width)
        shapes[f"{stack}.head.bias"] = (1000,)
    return shapes


def _fields(config):
    import dataclasses

    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------
# The release's keys convert and load strictly
# --------------------------------------------------------------------------------------------

def test_reference_key_list_converts_to_the_paper_configuration():
    shapes = read_reference_shapes("ms_temba_release_keys_i3d_157.tsv")
    state = random_tensors(shapes)
    config, converted = convert_release_state_dict(state)
    assert config == ms_temba.MSTembaConfig(in_dim=1024, num_classes=157, widths=(256, 384, 576),
                                            d_state=16, expand=2, d_conv=4, layers_per_branch=1, tlm=False)
    # Exactly the release's keys minus the 14 VisionMamba heads, tensors passed through untouched.
    heads = [key for key in shapes if HEAD_KEY.match(key)]
    assert len(heads) == 2 * (1 + 2 + 3 + 1)
    assert set(model_to_release_state_dict(converted)) == set(shapes) - set(heads)
    assert all(converted[key] is state[model_to_release_key(key)] for key in converted)

    model = load_release_checkpoint(state)
    assert model.config == config and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[model_to_release_key(key)]), key


def test_small_release_state_dict_gives_the_same_outputs_as_the_project_model():
    torch.manual_seed(0)
    ours = ms_temba.create_model("ms_temba_release", **SMALL).eval()
    state = {key: value.clone() for key, value in model_to_release_state_dict(ours.state_dict()).items()}
    # Add the release-only heads; they must be dropped.
    for key, shape in release_shapes(ours.config).items():
        state.setdefault(key, torch.randn(shape))
    converted = load_release_checkpoint(state)
    assert converted.config == ours.config
    features = torch.randn(2, 23, SMALL["in_dim"])
    with torch.no_grad():
        expected, got = ours(features), converted(features)
    assert torch.equal(expected.logits, got.logits)
    for a, b in zip(expected.block_logits, got.block_logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrap", ["plain", "data_parallel", "model", "state_dict", "data_parallel_in_model"])
def test_state_dict_wrappers_and_prefixes(wrap, tmp_path):
    state = random_tensors(release_shapes(ms_temba.MSTembaConfig(**SMALL, tlm=False)))
    prefixed = {f"module.{key}": value for key, value in state.items()}
    saved = {"plain": state, "data_parallel": prefixed, "model": {"model": state, "epoch": 3},
             "state_dict": {"state_dict": state, "optimizer": {}},
             "data_parallel_in_model": {"model": prefixed}}[wrap]
    path = tmp_path / "best_model.pth"
    torch.save(saved, path)  # as the release's training script does
    model = load_release_checkpoint(path)
    assert model.config.widths == SMALL["widths"]
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])


def test_whole_module_file_needs_trust_pickle(tmp_path):
    torch.manual_seed(1)
    original = ms_temba.create_model("ms_temba_release", **SMALL)
    path = tmp_path / "whole_model.pth"
    torch.save(original, path)
    with pytest.raises(ReleaseCheckpointError, match="trust_pickle"):
        load_release_checkpoint(path)
    model = load_release_checkpoint(path, trust_pickle=True)
    assert torch.equal(model.state_dict()["proj.weight"], original.state_dict()["proj.weight"])


def test_deeper_branches_are_inferred():
    # layers_per_branch=2 as the release's `depths` argument would make; interaction block stays 1.
    config = ms_temba.MSTembaConfig(**SMALL, layers_per_branch=2, expand=3, d_conv=3, tlm=False)
    state = random_tensors(release_shapes(config))
    got, _ = convert_release_state_dict(state)
    assert got == config


# --------------------------------------------------------------------------------------------
# Bad checkpoints give errors naming the problem
# --------------------------------------------------------------------------------------------

def small_release_state():
    return random_tensors(release_shapes(ms_temba.MSTembaConfig(**SMALL, tlm=False)))


def test_missing_key_is_named():
    state = small_release_state()
    del state["blocks.3.1.layers.0.mixer.D_b"]
    with pytest.raises(ReleaseCheckpointError, match=r"missing key\(s\) 'blocks\.3\.1\.layers\.0\.mixer\.D_b'"):
        convert_release_state_dict(state)


def test_extra_key_is_named():
    state = small_release_state()
    state["blocks.1.layers.0.mixer.gamma"] = torch.ones(8)  # e.g. a layer-scale parameter
    with pytest.raises(ReleaseCheckpointError, match=r"unexpected key\(s\) 'blocks\.1\.layers\.0\.mixer\.gamma'"):
        convert_release_state_dict(state)


def test_wrong_shape_is_named():
    state = small_release_state()
    state["scale_proj2.bias"] = torch.zeros(7)
    with pytest.raises(ReleaseCheckpointError, match=r"scale_proj2\.bias has shape \(7,\)"):
        convert_release_state_dict(state)


def test_key_needed_for_inference_is_named():
    state = small_release_state()
    del state["proj.weight"]
    with pytest.raises(ReleaseCheckpointError, match="missing key 'proj.weight'"):
        convert_release_state_dict(state)


def test_not_a_state_dict():
    with pytest.raises(ReleaseCheckpointError, match="not tensors"):
        read_release_state_dict({"epoch": 3, "best_map": 0.2})
    with pytest.raises(ReleaseCheckpointError, match="only some keys have the DataParallel prefix"):
        read_release_state_dict({"module.a": torch.zeros(1), "b": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_release_checkpoint("/nonexistent/best_model.pth")


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "best_model.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ReleaseCheckpointError, match="cannot read"):
        load_release_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Forward parity with the release's forward, restated functionally on its key names
# --------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def release_mixer(sd, prefix, hidden):
    """mamba_simple's Mamba with bimamba_type="v2", if_divide_out=True: (B, L, D) -> (B, L, D)."""
    length = hidden.shape[1]
    xz = (hidden @ sd[f"{prefix}.in_proj.weight"].T).transpose(1, 2)  # (B, 2 * d_inner, L)

    def direction(xz, suffix):
        conv_w, conv_b = sd[f"{prefix}.conv1d{suffix}.weight"], sd[f"{prefix}.conv1d{suffix}.bias"]
        A = -torch.exp(sd[f"{prefix}.A{suffix}_log"])
        D = sd[f"{prefix}.D{suffix}"]
        d_inner, d_state = A.shape
        x, z = xz.chunk(2, dim=1)
        # Conv1d with padding d_conv - 1 on both sides, cut to the first L outputs: causal.
        u = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=d_inner)[..., :length])
        x_dbl = u.transpose(1, 2) @ sd[f"{prefix}.x_proj{suffix}.weight"].T
        dt, B, C = x_dbl.split([x_dbl.shape[-1] - 2 * d_state, d_state, d_state], dim=-1)
        delta = F.softplus(dt @ sd[f"{prefix}.dt_proj{suffix}.weight"].T + sd[f"{prefix}.dt_proj{suffix}.bias"])
        h = torch.zeros(xz.shape[0], d_inner, d_state, dtype=xz.dtype)
        ys = []
        for t in range(length):
            h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, :, t, None]
            ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, :, t])
        return torch.stack(ys, dim=-1) * F.silu(z)  # (B, d_inner, L)

    y = (direction(xz, "") + direction(xz.flip(-1), "_b").flip(-1)) / 2
    return y.transpose(1, 2) @ sd[f"{prefix}.out_proj.weight"].T


def release_vision_mamba(sd, prefix, x):
    """VisionMamba.forward_features with fused add-norm, no cls token, final_pool_type='all'."""
    residual, hidden = None, x
    layer = 0
    while f"{prefix}.layers.{layer}.norm.weight" in sd:
        residual = hidden if residual is None else residual + hidden
        hidden = release_mixer(sd, f"{prefix}.layers.{layer}.mixer",
                               rms_norm(residual, sd[f"{prefix}.layers.{layer}.norm.weight"]))
        layer += 1
    return rms_norm(residual + hidden, sd[f"{prefix}.norm_f.weight"])


def release_forward(sd, inputs):
    """MSTemba.forward of the release: inputs (B, in_dim, T) channel-first -> (logits, block logits)."""
    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def projection(x, name):
        x = linear(x, f"{name}.linear")
        x = F.layer_norm(x, x.shape[-1:], sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])
        return F.gelu(x)

    x = linear(inputs.permute(0, 2, 1), "proj")
    outputs = []
    x = projection(x, "blocks.0")
    x = release_vision_mamba(sd, "blocks.1", x)
    outputs.append(x)

    x = projection(x, "blocks.2")
    out = torch.zeros_like(x)
    out[:, ::2] = release_vision_mamba(sd, "blocks.3.0", x[:, ::2])
    out[:, 1::2] = release_vision_mamba(sd, "blocks.3.1", x[:, 1::2])
    x = out
    outputs.append(x)

    x = projection(x, "blocks.4")
    length = x.shape[1]
    pad = (3 - length % 3) % 3
    x = F.pad(x, (0, 0, 0, pad))  # zero frames, not masked
    out = torch.zeros_like(x)
    for i in range(3):
        out[:, i::3] = release_vision_mamba(sd, f"blocks.5.{i}", x[:, i::3])
    x = out[:, :length]
    outputs.append(x)

    block_logits = [linear(o, f"block_heads.{k}") for k, o in enumerate(outputs)]

    def norm(v):
        return F.layer_norm(v, v.shape[-1:], sd["norm.weight"], sd["norm.bias"])

    fused = sum(norm(linear(o, f"scale_proj{k + 1}")) for k, o in enumerate(outputs))
    fused = release_vision_mamba(sd, "interaction_block", fused)
    return linear(fused, "head"), block_logits


@pytest.fixture(scope="module")
def release_pair():
    state = {k: v.double() for k, v in small_release_state().items()}
    model = load_release_checkpoint(state).double()
    return state, model


@pytest.mark.parametrize("length", [12, 21])
def test_forward_matches_the_release_when_length_is_a_multiple_of_three(release_pair, length):
    state, model = release_pair
    features = torch.randn(2, length, SMALL["in_dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours = model(features)
        logits, block_logits = release_forward(state, features.transpose(1, 2))
    torch.testing.assert_close(ours.logits, logits, rtol=1e-9, atol=1e-9)
    for a, b in zip(ours.block_logits, block_logits):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_forward_differs_from_the_release_only_through_block_three_padding(release_pair):
    """With T % 3 != 0 the release runs zero padding through block 3's branches unmasked. Blocks 1
    and 2 still agree exactly; block 3 and the fused logits differ (documented in convert.py)."""
    state, model = release_pair
    features = torch.randn(1, 13, SMALL["in_dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(features)
        logits, block_logits = release_forward(state, features.transpose(1, 2))
    torch.testing.assert_close(ours.block_logits[0], block_logits[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.block_logits[1], block_logits[1], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ours.block_logits[2], block_logits[2], rtol=1e-6, atol=1e-6)
    # Branch 0 (frames 0, 3, ..., 12) has no padding appended: its frames agree.
    torch.testing.assert_close(ours.block_logits[2][:, 0::3], block_logits[2][:, 0::3], rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The key mapping, and model files of the previous bundle format (the release's names)
# --------------------------------------------------------------------------------------------

def format1_name(key: str) -> str:
    """The name bundle format 1 (= the release's names, TLMs as `tlms.{k}`) gave our key `key`,
    written out by hand here independently of ms_temba.convert."""
    parts = key.split(".")
    if parts[0] == "blocks":
        block, part, rest = int(parts[1]), parts[2], parts[3:]
        if part == "projection":  # projections and DTS modules interleaved: 0, 2, 4, ...
            return ".".join(["blocks", str(2 * block), *rest])
        if part == "tlm":
            return ".".join(["tlms", str(block), *rest])
        assert part == "dts" and rest[0] == "branches"
        branch, rest = rest[1], rest[2:]
        if block == 0:  # block 1's single branch is stored bare
            assert branch == "0"
            return ".".join(["blocks", "1", *rest])
        return ".".join(["blocks", str(2 * block + 1), branch, *rest])
    if parts[0] == "fuser":
        if parts[1] == "scale_projs":
            return ".".join([f"scale_proj{int(parts[2]) + 1}", *parts[3:]])
        return ".".join(parts[1:])
    return key


def test_key_mapping_is_the_hand_written_one_both_ways():
    model = ms_temba.create_model("ms_temba_tiny", widths=(8, 12, 16, 20), layers_per_branch=2)
    keys = list(model.state_dict())
    assert {key.split(".")[0] for key in keys} == {"proj", "blocks", "block_heads", "fuser", "head"}
    for key in keys:
        assert model_to_release_key(key) == format1_name(key), key
        assert release_to_model_key(format1_name(key)) == key, key
    assert len({format1_name(key) for key in keys}) == len(keys)
    assert model_to_release_key("blocks.2.projection.linear.weight") == "blocks.4.linear.weight"
    assert model_to_release_key("blocks.0.dts.branches.0.norm_f.weight") == "blocks.1.norm_f.weight"
    assert model_to_release_key("blocks.2.dts.branches.1.layers.0.mixer.D") == "blocks.5.1.layers.0.mixer.D"
    assert model_to_release_key("fuser.scale_projs.0.bias") == "scale_proj1.bias"
    assert model_to_release_key("fuser.interaction_block.norm_f.weight") == "interaction_block.norm_f.weight"
    # The release's unused VisionMamba heads map too (they are dropped after the mapping).
    assert release_to_model_key("blocks.3.1.head.weight") == "blocks.1.dts.branches.1.head.weight"
    assert release_to_model_key("interaction_block.head.bias") == "fuser.interaction_block.head.bias"


def test_reference_key_list_round_trips_through_our_names():
    shapes = read_reference_shapes("ms_temba_release_keys_i3d_157.tsv")
    kept = [key for key in shapes if not HEAD_KEY.match(key)]
    ours = ms_temba.create_model("ms_temba_release").state_dict()
    assert {release_to_model_key(key): shapes[key] for key in kept} == {k: tuple(v.shape) for k, v in ours.items()}
    assert [format1_name(key) for key in ours] == [model_to_release_key(key) for key in ours]
    assert all(model_to_release_key(release_to_model_key(key)) == key for key in shapes)


@pytest.mark.parametrize("model_name", ["ms_temba_tiny", "ms_temba_release"])
def test_previous_format_model_file_loads_and_gives_the_same_outputs(tmp_path, model_name):
    import dataclasses
    import math

    from pipelines.bundle import BUNDLE_FORMAT, ModelBundle, load_bundle, save_bundle

    torch.manual_seed(4)
    model = ms_temba.create_model(model_name, in_dim=16, num_classes=3, widths=(8, 12, 16), d_state=4).eval()
    bundle = ModelBundle(
        model_name=model_name, model_config=dataclasses.asdict(model.config), state_dict=model.state_dict(),
        class_names=["a", "b", "c"], features={"dim": 16}, dataset="test", train_params={}, selected_epoch=2,
        val_map=12.5, train_videos=["v1"], val_videos=["v2"])
    # A file as format 1 wrote it: MSTemba's weights under the release's names (TLMs as tlms.{k}).
    old = {**dataclasses.asdict(bundle), "state_dict": {format1_name(k): v for k, v in model.state_dict().items()}}
    assert "scale_proj1.weight" in old["state_dict"] and "blocks.5.2.norm_f.weight" in old["state_dict"]
    assert ("tlms.2.conv.weight" in old["state_dict"]) == model.config.tlm
    with open(tmp_path / "old.pt", "wb") as file:
        torch.save({"format": 1, **old}, file)

    loaded = load_bundle(tmp_path / "old.pt")
    assert BUNDLE_FORMAT == 2
    assert list(loaded.state_dict) == list(model.state_dict())
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in model.state_dict().items())
    assert (loaded.class_names, loaded.selected_epoch, loaded.val_map) == (["a", "b", "c"], 2, 12.5)
    features = torch.randn(2, 11, 16)
    mask = torch.tensor([[True] * 11, [True] * 7 + [False] * 4])
    with torch.no_grad():
        expected, got = model(features, mask), loaded.build_model()(features, mask)
    assert torch.equal(expected.logits, got.logits)
    for a, b in zip(expected.block_logits, got.block_logits):
        assert torch.equal(a, b)

    # Saved again it is a file of the current format, which loads unchanged.
    save_bundle(tmp_path / "new.pt", loaded)
    assert torch.load(tmp_path / "new.pt", weights_only=True)["format"] == BUNDLE_FORMAT
    again = load_bundle(tmp_path / "new.pt")
    assert list(again.state_dict) == list(model.state_dict()) and math.isclose(again.val_map, 12.5)


def test_previous_format_model_file_of_a_baseline_is_unchanged(tmp_path):
    import dataclasses

    from pipelines.bundle import ModelBundle, load_bundle

    model = ms_temba.create_model("mstcn", in_dim=16, num_classes=3)
    bundle = ModelBundle(
        model_name="mstcn", model_config=dataclasses.asdict(model.config), state_dict=model.state_dict(),
        class_names=["a", "b", "c"], features={"dim": 16}, dataset="test", train_params={}, selected_epoch=1,
        val_map=1.0, train_videos=[], val_videos=[])
    with open(tmp_path / "old.pt", "wb") as file:
        torch.save({"format": 1, **dataclasses.asdict(bundle)}, file)
    assert list(load_bundle(tmp_path / "old.pt").state_dict) == list(model.state_dict())
    with open(tmp_path / "other.pt", "wb") as file:
        torch.save({"format": 0, **dataclasses.asdict(bundle)}, file)
    with pytest.raises(ValueError, match="not an ms-temba model file"):
        load_bundle(tmp_path / "other.pt")
