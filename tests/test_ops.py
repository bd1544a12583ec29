"""ms_temba.ops against independent references.

The references are the library's own (`ops.selective_scan_ref`, `ops.causal_conv1d_ref`): the
definitions written as plain loops, step by step in float64, sharing no code with the fast paths,
and differentiated by autograd; the implementation under test runs in float32 with its own
backward. Every scan test runs twice (the `scan_path` fixture): through the C++ extension and
through the pure-PyTorch fallback.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ms_temba import ops


@pytest.fixture(params=["extension", "eager"])
def scan_path(request, monkeypatch):
    """Run the test through the C++ recurrence, then through the pure-PyTorch one."""
    if request.param == "eager":
        monkeypatch.setattr(ops, "CPU_SCAN_EXTENSION", False)
    else:  # this machine has a compiler: a failed build is a failure, not a silent fallback
        assert ops._cpu_scan_extension() is not None, "the C++ selective scan did not build"
    return request.param


def reference_selective_scan(*args, **kwargs):
    """(out, last_state) of the float64 step-by-step reference `ops.selective_scan_ref`."""
    return ops.selective_scan_ref(*args, **kwargs, return_last_state=True)


def make_scan_inputs(batch, dim, state, length, groups=None, seed=0, with_D=True, with_z=True,
                     with_delta_bias=True):
    """Float32 inputs in the ranges a Mamba block produces (A < 0, delta a positive step)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    inputs = dict(
        u=randn(batch, dim, length),
        delta=0.5 * randn(batch, dim, length) - 1.0,
        A=-torch.exp(0.5 * randn(dim, state)),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim) if with_D else None,
        z=randn(batch, dim, length) if with_z else None,
        delta_bias=0.2 * randn(dim) if with_delta_bias else None,
    )
    return inputs


def relative_error(actual, expected):
    """Norm-relative error ||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_against_reference(inputs, delta_softplus, chunk_length=None, tolerance=1e-5,
                            reverse=False):
    """ops.selective_scan against the float64 loop: outputs, last state and every gradient.
    With reverse, the reference is the loop over the time-flipped inputs, flipped back."""
    differentiable = {k: v for k, v in inputs.items() if v is not None}
    ours = {k: v.clone().requires_grad_() for k, v in differentiable.items()}
    ref = {k: v.double().requires_grad_() for k, v in differentiable.items()}

    out, last_state = ops.selective_scan(**ours, delta_softplus=delta_softplus,
                                         return_last_state=True, chunk_length=chunk_length,
                                         reverse=reverse)
    if reverse:
        per_step = ("u", "delta", "B", "C", "z")
        flipped = {k: v.flip(-1) if k in per_step else v for k, v in ref.items()}
        ref_out, ref_last_state = reference_selective_scan(**flipped, delta_softplus=delta_softplus)
        ref_out = ref_out.flip(-1)
    else:
        ref_out, ref_last_state = reference_selective_scan(**ref, delta_softplus=delta_softplus)
    assert out.dtype == torch.float32 and out.shape == inputs["u"].shape
    assert relative_error(out, ref_out) <= tolerance
    assert relative_error(last_state, ref_last_state) <= tolerance

    # A generic upstream gradient, so every output element matters.
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    (out * grad_out).sum().backward()
    (ref_out * grad_out.double()).sum().backward()
    for name in differentiable:
        error = relative_error(ours[name].grad, ref[name].grad)
        assert error <= tolerance, f"grad of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("length", [1, 7, 129, 1000])
@pytest.mark.usefixtures("scan_path")
def test_full_scan_matches_reference(length):
    inputs = make_scan_inputs(batch=2, dim=6, state=4, length=length, seed=length)
    check_against_reference(inputs, delta_softplus=True)


@pytest.mark.parametrize("chunk_length", [5, 32])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.usefixtures("scan_path")
def test_reverse_scan_is_the_scan_of_the_flipped_sequence(chunk_length, groups):
    # 203 steps: chunks of 5 and 32 both leave a short last chunk, which runs first in reverse.
    inputs = make_scan_inputs(batch=2, dim=6, state=4, length=203, groups=groups, seed=11)
    check_against_reference(inputs, delta_softplus=True, chunk_length=chunk_length, reverse=True)


@pytest.mark.parametrize(
    "options",
    [
        dict(with_D=False, with_z=False, with_delta_bias=False),
        dict(with_D=True, with_z=False, with_delta_bias=False),
        dict(with_D=False, with_z=True, with_delta_bias=True),
    ],
    ids=["bare", "D-only", "z-and-bias"],
)
@pytest.mark.parametrize("delta_softplus", [False, True])
@pytest.mark.usefixtures("scan_path")
def test_optional_inputs(options, delta_softplus):
    inputs = make_scan_inputs(batch=2, dim=5, state=3, length=37, **options)
    if not delta_softplus:
        # Without the softplus the step must already be positive, as in a real Mamba block.
        inputs["delta"] = inputs["delta"].abs()
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    check_against_reference(inputs, delta_softplus=delta_softplus)


@pytest.mark.parametrize("length", [7, 129])
@pytest.mark.usefixtures("scan_path")
def test_grouped_B_C(length):
    inputs = make_scan_inputs(batch=2, dim=6, state=4, length=length, groups=3, seed=5)
    check_against_reference(inputs, delta_softplus=True)


@pytest.mark.parametrize("chunk_length,length", [(1, 9), (4, 30), (16, 129), (64, 1000)])
@pytest.mark.usefixtures("scan_path")
def test_chunked_scan_with_partial_last_chunk(chunk_length, length):
    inputs = make_scan_inputs(batch=1, dim=4, state=3, length=length, groups=2, seed=7)
    check_against_reference(inputs, delta_softplus=True, chunk_length=chunk_length)


@pytest.mark.usefixtures("scan_path")
def test_default_chunk_length_is_module_constant(monkeypatch):
    # A length that is not a multiple of the default chunk, run through the default code path.
    monkeypatch.setattr(ops, "SCAN_CHUNK_LENGTH", 5)
    monkeypatch.setattr(ops, "EXTENSION_CHUNK_LENGTH", 5)
    inputs = make_scan_inputs(batch=1, dim=3, state=2, length=23, seed=3)
    check_against_reference(inputs, delta_softplus=True)


@pytest.mark.usefixtures("scan_path")
def test_return_last_state_is_the_final_state():
    inputs = make_scan_inputs(batch=2, dim=4, state=3, length=50, seed=11)
    out_only = ops.selective_scan(**inputs, delta_softplus=True)
    out, last_state = ops.selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(out_only, out)
    assert last_state.shape == (2, 4, 3)
    _, ref_state = reference_selective_scan(**inputs, delta_softplus=True)
    assert relative_error(last_state, ref_state) <= 1e-5


@pytest.mark.usefixtures("scan_path")
def test_float64_inputs_are_computed_in_float64():
    inputs = {k: (v.double() if v is not None else None)
              for k, v in make_scan_inputs(batch=1, dim=3, state=2, length=40).items()}
    out = ops.selective_scan(**inputs, delta_softplus=True)
    ref_out, _ = reference_selective_scan(**inputs, delta_softplus=True)
    assert out.dtype == torch.float64
    assert relative_error(out, ref_out) <= 1e-12


@pytest.mark.usefixtures("scan_path")
def test_bfloat16_inputs_compute_in_float32():
    # As in mamba_ssm: half-precision activations, float32 A and D; the scan runs in float32 and
    # returns the activations' dtype, so only the input rounding to bfloat16 separates the result
    # from the float64 reference of the same (rounded) inputs.
    inputs = make_scan_inputs(batch=1, dim=4, state=3, length=60, seed=9)
    for name in ("u", "delta", "B", "C", "z"):
        inputs[name] = inputs[name].to(torch.bfloat16)
    out = ops.selective_scan(**inputs, delta_softplus=True)
    ref_out, _ = reference_selective_scan(**inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref_out) <= 1e-2  # bfloat16 output rounding: 2^-8


@pytest.mark.usefixtures("scan_path")
def test_non_contiguous_inputs():
    inputs = make_scan_inputs(batch=2, dim=4, state=3, length=20, seed=2)
    # (batch, length, dim) storage viewed as (batch, dim, length), as a Mamba block produces.
    transposed = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z")
                      else v) for k, v in inputs.items()}
    assert not transposed["u"].is_contiguous()
    check_against_reference(transposed, delta_softplus=True)


def written_out_direction(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                          delta_bias, mask, reverse):
    """What `ops.mamba_direction` stands for, op by op: (out, C)."""
    state = A.shape[1]
    u = ops.causal_conv1d(x, conv_weight, conv_bias, "silu", reverse=reverse)
    u = u.masked_fill(~mask.unsqueeze(1), 0.0)
    dt, B, C = F.linear(u.transpose(1, 2), x_proj_weight).split(
        [dt_proj_weight.shape[1], state, state], dim=-1)
    out = ops.selective_scan(u, F.linear(dt, dt_proj_weight).transpose(1, 2), A, B.mT.contiguous(),
                             C.mT.contiguous(), D, z, delta_bias, delta_softplus=True,
                             reverse=reverse)
    return out, C.mT


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("grad_of", ["out and C", "C only"])
@pytest.mark.usefixtures("scan_path")
def test_mamba_direction_matches_the_ops_written_out(reverse, grad_of):
    # Its own backward recomputes u and delta instead of keeping them: the values and every
    # gradient (x, z, the conv, x_proj and dt_proj weights, A, D, delta_bias) must be those of
    # autograd through the ops one by one, in float64, padding included.
    batch, dim, state, length, dt_rank = 2, 6, 3, 40, 2
    g = torch.Generator().manual_seed(7)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    inputs = [randn(batch, dim, length), randn(batch, dim, length), randn(dim, 4, scale=0.5),
              randn(dim), randn(dt_rank + 2 * state, dim, scale=0.3), randn(dim, dt_rank),
              -torch.exp(randn(dim, state, scale=0.5)).detach().requires_grad_(), randn(dim),
              randn(dim, scale=0.2)]
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 30:] = False
    results = []
    for direction in (ops.mamba_direction, written_out_direction):
        out, C = direction(*inputs, mask=mask, reverse=reverse)
        loss = C.sin().sum() if grad_of == "C only" else (out.cos().sum() + C.sin().sum())
        results.append((out, C, torch.autograd.grad(loss, inputs, allow_unused=True)))
    (out, C, grads), (expected_out, expected_C, expected_grads) = results
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(C, expected_C, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, expected_grads):
        if expected is None:  # z gets nothing when only C has a gradient
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("scan_path")
def test_mamba_direction_through_the_workspace_matches_the_ops_written_out(monkeypatch):
    # On the CPU, MambaInnerFunction keeps its sequence-long temporaries in buffers of
    # ops.workspace that every call reuses (normally only those of 1 MiB and more; here all), and
    # the C++ backward writes grad_delta over delta. As in BiMamba: x and z are the time-major
    # halves of one tensor and both directions read them, so their gradients are summed. Run
    # twice, so that the second run reuses every buffer the first left: the values and gradients
    # must be those of autograd through the ops one by one, in float64, padding included.
    from ms_temba.ops import workspace

    monkeypatch.setattr(workspace, "_MIN_ELEMENTS", 0)
    workspace.release_workspace()
    batch, dim, state, length, dt_rank = 2, 6, 3, 70, 2
    g = torch.Generator().manual_seed(11)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    def direction_parameters():
        return [randn(dim, 4, scale=0.5), randn(dim), randn(dt_rank + 2 * state, dim, scale=0.3),
                randn(dim, dt_rank), -torch.exp(randn(dim, state, scale=0.5)).detach().requires_grad_(),
                randn(dim), randn(dim, scale=0.2)]

    xz = randn(batch, length, 2 * dim)
    parameters = [direction_parameters(), direction_parameters()]
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 55:] = False

    def both_directions(direction):
        x, z = xz.transpose(1, 2).chunk(2, dim=1)
        (out_f, C_f), (out_b, C_b) = (direction(x, z, *p, mask=mask, reverse=reverse)
                                      for p, reverse in zip(parameters, (False, True)))
        loss = (out_f + 0.5 * out_b).cos().sum() + C_f.sin().sum() + C_b.cos().sum()
        inputs = [xz, *parameters[0], *parameters[1]]
        return [out_f, out_b, C_f, C_b, *torch.autograd.grad(loss, inputs)]

    expected = both_directions(written_out_direction)
    for _ in range(2):
        for got, wanted in zip(both_directions(ops.mamba_direction), expected):
            torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-12)
    assert workspace._buffers.slots, "the workspace was not used"
    workspace.release_workspace()


def test_failed_extension_build_warns_and_falls_back(tmp_path):
    # A real failed build: no C++ compiler (CXX points at `false`), in an empty extensions
    # directory, in a fresh process. The scan must warn once and still give the right answer.
    script = textwrap.dedent("""
        import warnings
        import torch
        from ms_temba import ops
        u, delta = torch.randn(1, 4, 40), torch.randn(1, 4, 40)
        A, B, C = -torch.rand(4, 3), torch.randn(1, 3, 40), torch.randn(1, 3, 40)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ops.selective_scan(u, delta, A, B, C, delta_softplus=True)
            again = ops.selective_scan(u, delta, A, B, C, delta_softplus=True)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "could not be built" in messages[0], messages
        assert not ops.CPU_SCAN_EXTENSION
        torch.save((u, delta, A, B, C, out), "result.pt")
    """)
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=600)
    u, delta, A, B, C, out = torch.load(tmp_path / "result.pt")
    expected, _ = reference_selective_scan(u, delta, A, B, C, delta_softplus=True)
    assert relative_error(out, expected) <= 1e-5


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(u=torch.zeros(2, 4)), "u must be"),
        (dict(delta=torch.zeros(2, 4, 9)), "delta must"),
        (dict(A=torch.zeros(5, 3)), "A must be"),
        (dict(A=torch.zeros(4, 3, dtype=torch.complex64)), "complex"),
        (dict(B=torch.zeros(2, 3, 9)), "B must have shape"),
        (dict(B=torch.zeros(3, 8)), "B must be"),
        (dict(C=torch.zeros(2, 2, 3, 8)), "groups"),
        (dict(B=torch.zeros(2, 3, 3, 8), C=torch.zeros(2, 3, 3, 8)), "divisible"),
        (dict(D=torch.zeros(5)), "D must be"),
        (dict(delta_bias=torch.zeros(4, 1)), "delta_bias must be"),
        (dict(z=torch.zeros(2, 4, 7)), "z must"),
        (dict(u=torch.zeros(2, 4, 8, dtype=torch.int64)), "floating-point"),
        (dict(u=torch.zeros(2, 4, 0), delta=torch.zeros(2, 4, 0), B=torch.zeros(2, 3, 0),
              C=torch.zeros(2, 3, 0)), "length is 0"),
    ],
)
def test_bad_shapes_raise_value_error(change, message):
    inputs = make_scan_inputs(batch=2, dim=4, state=3, length=8)
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        ops.selective_scan(**inputs)


def test_bad_chunk_length_raises():
    inputs = make_scan_inputs(batch=1, dim=2, state=2, length=4)
    with pytest.raises(ValueError, match="chunk_length"):
        ops.selective_scan(**inputs, chunk_length=0)


# ---------------------------------------------------------------------------------------------
# The references themselves: the definitions by hand on tiny cases, and their options
# ---------------------------------------------------------------------------------------------


def test_references_compute_the_definitions_by_hand():
    # dim 1, state 1, length 2: h0 = 1 * 2 * 1 = 2, h1 = exp(-0.5) h0 + 0.5 * 1 * 2; y = C h; + D u.
    u, delta, A = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[1.0, 0.5]]]), torch.tensor([[-1.0]])
    B, C, D = torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[1.0, 3.0]]]), torch.tensor([0.5])
    out, last_state = ops.selective_scan_ref(u, delta, A, B, C, D, return_last_state=True)
    h1 = 2 * math.exp(-0.5) + 1
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([[[2.0 + 0.5, 3 * h1 + 1.0]]], dtype=torch.float64))
    torch.testing.assert_close(last_state, torch.tensor([[[h1]]], dtype=torch.float64))
    # out[t] = bias + w0 x[t-1] + w1 x[t], zeros before the start.
    conv = ops.causal_conv1d_ref(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[10.0, 1.0]]), torch.tensor([0.5]))
    torch.testing.assert_close(conv, torch.tensor([[[1.5, 12.5, 23.5]]], dtype=torch.float64))


def test_reference_options_agree():
    inputs = make_scan_inputs(batch=2, dim=6, state=3, length=30, groups=2, seed=21)
    out, last_state = reference_selective_scan(**inputs, delta_softplus=True)
    indexed = ops.selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True, unbind=False)
    assert torch.equal(indexed[0], out) and torch.equal(indexed[1], last_state)
    per_step = ("u", "delta", "B", "C", "z")
    flipped = {k: v.flip(-1) if k in per_step else v for k, v in inputs.items()}
    backwards = ops.selective_scan_ref(**flipped, delta_softplus=True, reverse=True)
    assert torch.equal(backwards.flip(-1), out)
    in_float32 = ops.selective_scan_ref(**inputs, delta_softplus=True, dtype=None)
    assert in_float32.dtype == torch.float32 and relative_error(in_float32, out) <= 1e-5

    x, weight = torch.randn(2, 3, 9), torch.randn(3, 4)
    forward = ops.causal_conv1d_ref(x.flip(-1), weight, None, "silu")
    assert torch.equal(ops.causal_conv1d_ref(x, weight, None, "silu", reverse=True), forward.flip(-1))
    assert ops.causal_conv1d_ref(x, weight, dtype=None).dtype == torch.float32
    with pytest.raises(ValueError, match="activation"):
        ops.causal_conv1d_ref(x, weight, None, "relu")


# ---------------------------------------------------------------------------------------------
# causal_conv1d
# ---------------------------------------------------------------------------------------------


reference_causal_conv1d = ops.causal_conv1d_ref  # explicit loop over steps and taps, in float64


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width,length", [(4, 1), (4, 3), (4, 50), (2, 17)])
def test_causal_conv1d_matches_loop(activation, with_bias, width, length):
    g = torch.Generator().manual_seed(width * 100 + length)
    x = torch.randn(2, 5, length, generator=g)
    weight = torch.randn(5, width, generator=g)
    bias = torch.randn(5, generator=g) if with_bias else None
    out = ops.causal_conv1d(x, weight, bias, activation)
    expected = reference_causal_conv1d(x, weight, bias, activation)
    assert out.shape == x.shape
    assert relative_error(out, expected) <= 1e-6


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width,length", [(4, 1), (4, 50), (2, 17)])
def test_reverse_causal_conv1d_is_the_conv_of_the_flipped_sequence(activation, width, length):
    g = torch.Generator().manual_seed(width * 100 + length + 1)
    x = torch.randn(2, 5, length, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, width, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    out = ops.causal_conv1d(x, weight, bias, activation, reverse=True)
    expected = reference_causal_conv1d(x.flip(-1), weight, bias, activation).flip(-1)
    assert relative_error(out, expected) <= 1e-12
    assert torch.autograd.gradcheck(
        lambda *a: ops.causal_conv1d(*a, activation=activation, reverse=True), (x, weight, bias))


def test_causal_conv1d_is_causal():
    # Changing the input at time s must leave every output before s unchanged.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 20, generator=g)
    weight = torch.randn(3, 4, generator=g)
    changed = x.clone()
    changed[:, :, 12] += 1.0
    a, b = ops.causal_conv1d(x, weight), ops.causal_conv1d(changed, weight)
    assert torch.equal(a[..., :12], b[..., :12])
    assert not torch.equal(a[..., 12:16], b[..., 12:16])


def test_causal_conv1d_gradients_flow():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.causal_conv1d(*a, activation="silu"),
                                    (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.zeros(2, 3), torch.zeros(3, 4)), "x must be"),
        ((torch.zeros(2, 3, 5), torch.zeros(4, 4)), "weight must be"),
        ((torch.zeros(2, 3, 5), torch.zeros(3, 4), torch.zeros(4)), "bias must be"),
        ((torch.zeros(2, 3, 5), torch.zeros(3, 4), None, "relu"), "activation"),
    ],
)
def test_causal_conv1d_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        ops.causal_conv1d(*args)


# ---------------------------------------------------------------------------------------------
# depthwise_conv1d (the TLM's conv and the CPU path of causal_conv1d)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,dilation,padding", [(3, 1, (1, 1)), (3, 2, (2, 2)), (3, 3, (3, 3)),
                                                    (4, 1, (3, 0)), (4, 2, (3, 3)), (1, 1, (0, 0)),
                                                    (5, 2, (0, 1))])
@pytest.mark.parametrize("with_bias", [False, True])
def test_depthwise_conv1d_matches_torch_conv1d_with_gradients(width, dilation, padding, with_bias):
    # Reference: torch's own conv1d (a different implementation), forward and every gradient.
    g = torch.Generator().manual_seed(width * 10 + dilation)
    # A transposed view, as the TLM passes it: (batch, length, dim) storage.
    x = torch.randn(2, 23, 6, generator=g, dtype=torch.float64).transpose(1, 2)
    weight = torch.randn(6, width, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64) if with_bias else None
    grad_out = None
    results = []
    for conv in (ops.depthwise_conv1d, None):
        inputs = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
        if conv is None:
            out = torch.nn.functional.conv1d(torch.nn.functional.pad(inputs[0], padding),
                                             inputs[1].unsqueeze(1), inputs[2] if with_bias else None,
                                             dilation=dilation, groups=6)
        else:
            out = conv(inputs[0], inputs[1], inputs[2] if with_bias else None, dilation, padding)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in inputs])
    for ours, reference in zip(*results):
        assert ours.shape == reference.shape
        assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-12)


def test_depthwise_conv1d_leaves_its_inputs_alone_on_a_one_frame_output():
    # batch 1, one output frame: bias[:, None].expand(1, dim, 1) counts as contiguous, the trap of
    # building the output from the bias in place.
    x, weight, bias = torch.randn(1, 4, 1), torch.randn(4, 4), torch.randn(4)
    before = [t.clone() for t in (x, weight, bias)]
    out = ops.depthwise_conv1d(x, weight, bias, 1, (3, 0))
    torch.testing.assert_close(out[0, :, 0], bias + weight[:, 3] * x[0, :, 0])
    for tensor, original in zip((x, weight, bias), before):
        assert torch.equal(tensor, original)


def test_depthwise_conv1d_gradcheck_and_bad_arguments():
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *a: ops.depthwise_conv1d(*a, 2, (2, 2)), inputs)
    with pytest.raises(ValueError, match="dilation"):
        ops.depthwise_conv1d(*inputs, 0, (1, 1))
    with pytest.raises(ValueError, match="shorter than the kernel"):
        ops.depthwise_conv1d(inputs[0][..., :3], inputs[1], None, 4, (0, 0))


def test_has_cuda_kernels_is_bool():
    assert isinstance(ops.HAS_CUDA_KERNELS, bool)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the CPU path
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS),
                    reason="needs CUDA and the mamba_ssm / causal_conv1d kernels")
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_kernels_match_cpu_path(reverse):
    inputs = make_scan_inputs(batch=2, dim=64, state=16, length=300, groups=1, seed=4)
    cpu = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    gpu = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
    out_cpu, state_cpu = ops.selective_scan(**cpu, delta_softplus=True, return_last_state=True,
                                            reverse=reverse)
    out_gpu, state_gpu = ops.selective_scan(**gpu, delta_softplus=True, return_last_state=True,
                                            reverse=reverse)
    assert relative_error(out_gpu.cpu(), out_cpu) <= 1e-4
    assert relative_error(state_gpu.cpu(), state_cpu) <= 1e-4
    grad_out = torch.randn(out_cpu.shape)
    (out_cpu * grad_out).sum().backward()
    (out_gpu * grad_out.cuda()).sum().backward()
    for name in inputs:
        assert relative_error(gpu[name].grad.cpu(), cpu[name].grad) <= 1e-3, name

    x = torch.randn(2, 64, 100)
    weight, bias = torch.randn(64, 4), torch.randn(64)
    conv_cpu = ops.causal_conv1d(x, weight, bias, "silu", reverse=reverse)
    conv_gpu = ops.causal_conv1d(x.cuda(), weight.cuda(), bias.cuda(), "silu", reverse=reverse)
    assert relative_error(conv_gpu.cpu(), conv_cpu) <= 1e-5
