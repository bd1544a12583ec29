"""ms_temba.losses against slow float64 references written from the definition."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ms_temba.losses import ms_temba_loss


@dataclasses.dataclass
class FakeOutput:
    """The fields of an MSTembaOutput the loss reads (an input built by hand, not a mock)."""

    logits: torch.Tensor
    block_logits: list
    branch_c: list
    mask: torch.Tensor | None = None


def make_batch(lengths=(11, 7, 4), classes=5, d_c=6, blocks=3, seed=0, dtype=torch.float64):
    """Random logits/targets/C for a padded batch; C is zero at padded positions (the contract)."""
    gen = torch.Generator().manual_seed(seed)
    batch, time = len(lengths), max(lengths)
    mask = torch.arange(time)[None, :] < torch.tensor(lengths)[:, None]
    logits = torch.randn(batch, time, classes, generator=gen, dtype=dtype) * 2
    targets = (torch.rand(batch, time, classes, generator=gen) < 0.3).to(dtype)
    block_logits = [torch.randn(batch, time, classes, generator=gen, dtype=dtype)
                    for _ in range(blocks)]
    branch_c = []
    for k in range(1, blocks + 1):
        sub_length = math.ceil(time / k)
        c = torch.randn(batch, k, sub_length, d_c, generator=gen, dtype=dtype)
        # Frame t = j * k + i of the video sits at c[:, i, j]; zero where t is padding.
        for b, length in enumerate(lengths):
            for i in range(k):
                for j in range(sub_length):
                    if j * k + i >= length:
                        c[b, i, j] = 0.0
        branch_c.append(c)
    return FakeOutput(logits, block_logits, branch_c, mask), targets


def reference_bce(logits, targets, mask):
    """Sum of BCE over the real frames (picked one by one) and classes / number of real frames."""
    rows_logits, rows_targets = [], []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                rows_logits.append(logits[b, t].double())
                rows_targets.append(targets[b, t].double())
    probabilities = torch.sigmoid(torch.stack(rows_logits))
    total = F.binary_cross_entropy(probabilities, torch.stack(rows_targets), reduction="sum")
    return total / len(rows_logits)


def reference_consistency(c):
    """1 - cos over every pair of branches of every sample, with explicit dot products."""
    batch, branches = c.shape[:2]
    if branches < 2:
        return 0.0
    terms = []
    for b in range(batch):
        for i, j in itertools.combinations(range(branches), 2):
            x = c[b, i].double().flatten().tolist()
            y = c[b, j].double().flatten().tolist()
            dot = sum(u * v for u, v in zip(x, y))
            norm_x = math.sqrt(sum(u * u for u in x))
            norm_y = math.sqrt(sum(v * v for v in y))
            terms.append(1.0 - dot / (norm_x * norm_y))
    return sum(terms) / len(terms)


def test_terms_match_float64_references():
    output, targets = make_batch()
    result = ms_temba_loss(output, targets, beta=0.3, alpha=100.0)

    bce = reference_bce(output.logits, targets, output.mask)
    block_bce = sum(reference_bce(bl, targets, output.mask) for bl in output.block_logits)
    consistency = sum(reference_consistency(c) for c in output.branch_c)
    torch.testing.assert_close(result["bce"], bce, rtol=1e-10, atol=0)
    torch.testing.assert_close(result["block_bce"], block_bce, rtol=1e-10, atol=0)
    assert result["consistency"].item() == pytest.approx(consistency, rel=1e-10)
    expected_total = bce + 0.3 * block_bce + 100.0 * consistency
    assert result["loss"].item() == pytest.approx(expected_total.item(), rel=1e-10)


def test_weights_beta_alpha_scale_their_terms():
    output, targets = make_batch(seed=1)
    plain = ms_temba_loss(output, targets, beta=0.0, alpha=0.0)
    weighted = ms_temba_loss(output, targets, beta=2.0, alpha=5.0)
    assert plain["loss"].item() == pytest.approx(plain["bce"].item(), rel=1e-12)
    expected = plain["bce"] + 2.0 * plain["block_bce"] + 5.0 * plain["consistency"]
    assert weighted["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def reference_smoothing(logits, mask, clamp=4.0):
    """MS-TCN's truncated MSE written out: the mean over every pair of neighbouring real frames
    and every class."""
    values = []
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if mask[b, t] and mask[b, t - 1]:
                for c in range(logits.shape[2]):
                    step = math.log(1 / (1 + math.exp(-logits[b, t, c].item()))) \
                        - math.log(1 / (1 + math.exp(-logits[b, t - 1, c].item())))
                    values.append(min(abs(step), clamp) ** 2)
    return sum(values) / len(values)


def test_smoothing_term_matches_a_float64_loop_and_is_off_by_default():
    output, targets = make_batch(seed=2)
    output.logits = output.logits * 3  # some steps beyond the clamp of 4
    plain = ms_temba_loss(output, targets, beta=0.3, alpha=2.0)
    assert "smoothing" not in plain
    smoothed = ms_temba_loss(output, targets, beta=0.3, alpha=2.0, smoothing=0.7)
    expected = reference_smoothing(output.logits, output.mask) * output.logits.shape[-1]  # summed over classes
    assert smoothed["smoothing"].item() == pytest.approx(expected, rel=1e-10)
    assert smoothed["loss"].item() == pytest.approx(plain["loss"].item() + 0.7 * expected, rel=1e-10)


def test_smoothing_gradient_flows_only_to_the_later_frame_of_each_pair():
    # Two real frames and one padded: the earlier frame's value is detached (MS-TCN's code), so only
    # frame 1 gets the smoothing gradient, and the padded frame none.
    logits = torch.tensor([[[0.0], [2.0], [9.0]]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    output = FakeOutput(logits, [], [], mask)
    terms = ms_temba_loss(output, torch.zeros(1, 3, 1, dtype=torch.float64), beta=0, alpha=0, smoothing=1.0)
    terms["smoothing"].backward()
    step = F.logsigmoid(torch.tensor(2.0, dtype=torch.float64)) - F.logsigmoid(torch.tensor(0.0, dtype=torch.float64))
    expected = 2 * step * torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64))  # d/dl log sigmoid(l) = sigmoid(-l)
    torch.testing.assert_close(logits.grad[0, :, 0], torch.stack([torch.zeros((), dtype=torch.float64), expected,
                                                                  torch.zeros((), dtype=torch.float64)]))


def test_single_branch_blocks_have_no_consistency_term():
    output, targets = make_batch(blocks=1)
    assert ms_temba_loss(output, targets)["consistency"].item() == 0.0


def test_identical_branches_are_perfectly_consistent():
    output, targets = make_batch(lengths=(12, 12), blocks=3)
    output.branch_c = [c[:, :1].expand_as(c).clone() for c in output.branch_c]
    assert ms_temba_loss(output, targets)["consistency"].item() == pytest.approx(0.0, abs=1e-12)


def test_padded_frames_do_not_change_the_loss():
    output, targets = make_batch(lengths=(9, 5))
    reference = ms_temba_loss(output, targets)

    # Garbage (even NaN) logits and arbitrary targets at padded frames change nothing.
    padded = ~output.mask
    output.logits = output.logits.masked_fill(padded[..., None], float("nan"))
    output.block_logits = [bl.masked_fill(padded[..., None], 1e4) for bl in output.block_logits]
    targets = targets.masked_fill(padded[..., None], 1.0)
    changed = ms_temba_loss(output, targets)
    for key in ("loss", "bce", "block_bce", "consistency"):
        torch.testing.assert_close(changed[key], reference[key], rtol=1e-12, atol=0)


def test_one_padded_video_equals_the_same_video_unpadded():
    output, targets = make_batch(lengths=(6, 6))
    lengths, time = (6,), 6
    # The same first video alone, padded to 10 frames (zero C where padded, as the model does).
    padded_time = 10
    logits = F.pad(output.logits[:1], (0, 0, 0, padded_time - time), value=3.0)
    block_logits = [F.pad(bl[:1], (0, 0, 0, padded_time - time), value=-3.0)
                    for bl in output.block_logits]
    branch_c = []
    for k, c in enumerate(output.branch_c, start=1):
        padded_c = torch.zeros(1, k, math.ceil(padded_time / k), c.shape[-1], dtype=c.dtype)
        padded_c[:, :, : c.shape[2]] = c[:1]
        branch_c.append(padded_c)
    mask = torch.arange(padded_time)[None] < torch.tensor(lengths)[:, None]
    padded_targets = F.pad(targets[:1], (0, 0, 0, padded_time - time), value=1.0)

    unpadded_output = FakeOutput(output.logits[:1], [bl[:1] for bl in output.block_logits],
                                 [c[:1] for c in output.branch_c])
    unpadded = ms_temba_loss(unpadded_output, targets[:1])
    padded = ms_temba_loss(FakeOutput(logits, block_logits, branch_c, mask), padded_targets)
    for key in ("loss", "bce", "block_bce", "consistency"):
        torch.testing.assert_close(padded[key], unpadded[key], rtol=1e-12, atol=0)


def test_output_mask_is_used_when_no_mask_is_given_and_explicit_mask_wins():
    output, targets = make_batch(lengths=(8, 3))
    from_output = ms_temba_loss(output, targets)["bce"]
    torch.testing.assert_close(from_output, reference_bce(output.logits, targets, output.mask))

    all_real = torch.ones_like(output.mask)
    explicit = ms_temba_loss(output, targets, mask=all_real)["bce"]
    torch.testing.assert_close(explicit, reference_bce(output.logits, targets, all_real))


def test_gradients_reach_real_frames_and_branches_but_not_padding():
    output, targets = make_batch(lengths=(7, 4), dtype=torch.float32)
    leaves = [output.logits, *output.block_logits, *output.branch_c]
    for leaf in leaves:
        leaf.requires_grad_(True)
    ms_temba_loss(output, targets)["loss"].backward()

    real, padded = output.mask, ~output.mask
    for logits in [output.logits, *output.block_logits]:
        assert logits.grad[real].abs().sum() > 0
        assert torch.all(logits.grad[padded] == 0)
        assert torch.isfinite(logits.grad).all()
    for c in output.branch_c[1:]:  # block 1 has one branch: no consistency term
        assert c.grad.abs().sum() > 0


def test_gradient_of_bce_matches_the_closed_form():
    # d bce / d logit = (sigmoid(logit) - target) / num_real_frames at real frames.
    output, targets = make_batch(lengths=(5, 3), blocks=1)
    output.logits.requires_grad_(True)
    ms_temba_loss(output, targets, beta=0.0, alpha=0.0)["loss"].backward()
    expected = (torch.sigmoid(output.logits.detach()) - targets) / output.mask.sum()
    expected = expected * output.mask[..., None]
    torch.testing.assert_close(output.logits.grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda o, t, m: (o, t[:, :-1], m), "targets have shape"),
        (lambda o, t, m: (o, t[..., :-1], m), "targets have shape"),
        (lambda o, t, m: (o, t * 2, m), "targets must be in"),
        (lambda o, t, m: (o, t.tolist(), m), "targets must be a torch.Tensor"),
        (lambda o, t, m: (o, t, m[:, :-1]), "mask has shape"),
        (lambda o, t, m: (o, t, m.float()), "mask must be a bool"),
        (lambda o, t, m: (o, t, torch.zeros_like(m)), "no real frame"),
        (lambda o, t, m: (dataclasses.replace(o, block_logits=[b[:, :-1] for b in o.block_logits]),
                          t, m),
         r"block_logits\[0\]"),
        (lambda o, t, m: (dataclasses.replace(o, branch_c=[c[0] for c in o.branch_c]), t, m),
         r"branch_c\[0\]"),
        (lambda o, t, m: (dataclasses.replace(o, logits=o.logits[0]), t, m), "output.logits"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(change, message):
    output, targets = make_batch()
    output, targets, mask = change(output, targets, output.mask)
    with pytest.raises(ValueError, match=message):
        ms_temba_loss(output, targets, mask=mask)


def test_real_model_output_gives_finite_loss_and_gradients_for_every_parameter():
    import ms_temba

    torch.manual_seed(0)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=16, num_classes=4, widths=(8, 8, 8),
                                  d_state=4, tlm=True)
    features = torch.randn(2, 13, 16)
    mask = torch.arange(13)[None] < torch.tensor([[13], [9]])
    targets = (torch.rand(2, 13, 4) < 0.3).float()
    result = ms_temba_loss(model(features, mask), targets)
    assert all(torch.isfinite(v) for v in result.values())
    assert result["consistency"] > 0
    result["loss"].backward()
    without_grad = [name for name, p in model.named_parameters()
                    if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without_grad, without_grad


def test_real_model_loss_of_a_padded_video_equals_the_unpadded_video():
    # The model is exact about padding (zero C at padded positions, real frames independent of
    # the padding), so the whole loss must not see the padding either.
    import ms_temba

    torch.manual_seed(1)
    model = ms_temba.create_model("ms_temba_tiny", in_dim=16, num_classes=4, widths=(8, 8, 8),
                                  d_state=4).double()
    features = torch.randn(1, 11, 16, dtype=torch.float64)
    targets = (torch.rand(1, 11, 4) < 0.3).double()
    alone = ms_temba_loss(model(features), targets)

    padded_features = torch.cat([features, torch.randn(1, 6, 16, dtype=torch.float64)], dim=1)
    padded_targets = torch.cat([targets, torch.ones(1, 6, 4, dtype=torch.float64)], dim=1)
    mask = torch.arange(17)[None] < 11
    padded = ms_temba_loss(model(padded_features, mask), padded_targets)
    for key in ("loss", "bce", "block_bce", "consistency"):
        torch.testing.assert_close(padded[key], alone[key], rtol=1e-9, atol=1e-12)
