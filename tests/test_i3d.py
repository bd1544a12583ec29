"""I3D: pytorch-i3d compatibility (padding, state dict), temporal geometry, and both sampling modes.

References are independent of the code under test: TensorFlow's documented SAME-padding formula, an
explicit conv/batch-norm/ReLU in float64, the key list of the real rgb_imagenet.pt, brute-force
enumeration of snippets, pytorch-i3d's AvgPool3d, and one forward pass over the whole video.
Small spatial sizes keep the network cheap; the temporal behaviour does not depend on them.
"""
from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors.base import CheckpointError
from extractors.config import ExtractorConfig
from extractors.i3d import (CONTEXT_FRAMES, FEATURE_DIM, I3DExtractor, InceptionI3d, MaxPool3dSame, Unit3D,
                            load_i3d, num_snippets, same_padding)
from shared_data import read_reference_shapes

FPS = 24.0


def make_extractor(**overrides) -> I3DExtractor:
    """A random-weight I3D extractor; the same seed gives the same weights for every config."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning, tested on its own below
        return I3DExtractor(ExtractorConfig(**{"backbone": "i3d", "fps": FPS, "device": "cpu", **overrides}))


def random_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def network_input(frames: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (1, 3, n, H, W) in [-1, 1], written out as pytorch-i3d's loaders do it."""
    return torch.from_numpy(frames.astype(np.float32) / 255.0 * 2.0 - 1.0).permute(3, 0, 1, 2)[None]


def randomise_batch_norm(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.1 + (
                    1.0 if tensor is module.weight else 0.0)
            module.running_var.data = torch.rand(module.running_var.shape, generator=generator,
                                                 dtype=module.running_var.dtype) + 0.5


# ----------------------------------------------------------------------------------------------
# The network


def tensorflow_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    # TensorFlow's documented rule: out = ceil(in / stride), pad = max((out - 1) * stride + kernel - in, 0),
    # with pad // 2 in front.
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def test_same_padding_is_tensorflows():
    for size in range(1, 40):
        for kernel in range(1, 8):
            for stride in range(1, 4):
                assert same_padding(size, kernel, stride) == tensorflow_same_padding(size, kernel, stride)


def test_unit3d_is_same_padded_conv_batch_norm_relu():
    torch.manual_seed(0)
    kernel, stride = (3, 5, 7), (2, 1, 2)
    unit = Unit3D(3, 4, kernel=kernel, stride=stride).double().eval()
    randomise_batch_norm(unit)
    x = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)

    pads = [tensorflow_same_padding(size, k, s) for size, k, s in zip(x.shape[2:], kernel, stride)]
    padded = torch.zeros(2, 3, *(size + sum(p) for size, p in zip(x.shape[2:], pads)), dtype=torch.float64)
    padded[:, :, pads[0][0]:pads[0][0] + 9, pads[1][0]:pads[1][0] + 10, pads[2][0]:pads[2][0] + 11] = x
    conv = F.conv3d(padded, unit.conv3d.weight, stride=stride)
    bn = unit.bn
    shape = (1, -1, 1, 1, 1)
    expected = torch.relu((conv - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 1e-3)
                          * bn.weight.view(shape) + bn.bias.view(shape))

    out = unit(x)
    assert out.shape == (2, 4, 5, 10, 6)  # ceil(size / stride) on every axis
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_max_pool_same_output_size():
    pool = MaxPool3dSame(kernel=(3, 3, 3), stride=(2, 2, 2))
    for t in range(1, 12):
        assert pool(torch.rand(1, 2, t, 5, 6)).shape[2:] == (math.ceil(t / 2), 3, 3)


def test_state_dict_matches_pytorch_i3d_rgb_imagenet():
    expected = read_reference_shapes("pytorch_i3d_rgb_keys.tsv")
    ours = {key: tuple(value.shape) for key, value in InceptionI3d(num_classes=400).state_dict().items()}
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    bn_eps = {m.eps for m in InceptionI3d().modules() if isinstance(m, torch.nn.BatchNorm3d)}
    assert bn_eps == {1e-3}


def test_checkpoint_round_trip_records_sha256(tmp_path):
    torch.manual_seed(1)
    original = InceptionI3d()
    randomise_batch_norm(original)
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(original.state_dict(), path)

    loaded, checkpoint = load_i3d(path)
    assert checkpoint.pretrained and checkpoint.source == "rgb_imagenet.pt"
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.training
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_charades_checkpoint_with_157_classes_loads(tmp_path):
    path = tmp_path / "rgb_charades.pt"
    torch.save(InceptionI3d(num_classes=157).state_dict(), path)
    model, _ = load_i3d(path)
    assert model.num_classes == 157
    assert model(torch.zeros(1, 3, 8, 16, 16)).shape == (1, 157)


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    state = InceptionI3d().state_dict()
    del state["Mixed_4c.b1b.conv3d.weight"], state["Conv3d_2b_1x1.bn.running_var"]
    state["Mixed_6a.b0.conv3d.weight"] = torch.zeros(1)
    state["Mixed_5c.b0.bn.bias"] = torch.zeros(7)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_i3d(path)
    message = str(error.value)
    for name in ("Mixed_4c.b1b.conv3d.weight", "Conv3d_2b_1x1.bn.running_var", "Mixed_6a.b0.conv3d.weight",
                 "Mixed_5c.b0.bn.bias"):
        assert name in message
    assert "missing" in message and "unexpected" in message and "broken.pt" in message


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_i3d(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_i3d(garbage)
    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_i3d(not_tensors)


def test_random_weights_warn_loudly():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model, checkpoint = load_i3d(None)
    assert not checkpoint.pretrained and checkpoint.sha256 == "random"
    assert isinstance(model, InceptionI3d)


def test_bad_input_shape_is_a_clear_error():
    model = InceptionI3d()
    with pytest.raises(ValueError, match="batch, 3, frames, H, W"):
        model.forward_features(torch.zeros(1, 8, 16, 16, 3))


def test_one_mixed_5c_step_per_8_frames():
    torch.manual_seed(0)
    model = InceptionI3d().eval()
    with torch.inference_mode():
        for frames in (1, 7, 8, 9, 16, 17, 30):
            steps = model.forward_features(torch.rand(1, 3, frames, 8, 8) * 2 - 1)
            assert steps.shape == (1, FEATURE_DIM, math.ceil(frames / 8))


def test_receptive_field_of_a_mixed_5c_step():
    # With the input padded to a multiple of 8, step p reads frames [8p - 44, 8p + 54] (module docstring),
    # so changing frame f changes steps ceil((f - 54) / 8) ... floor((f + 44) / 8) and no others.
    torch.manual_seed(0)
    model = InceptionI3d().eval()
    frames = random_frames(160, 8)
    changed_frame = 100
    altered = frames.copy()
    altered[changed_frame] = 255 - altered[changed_frame]
    with torch.inference_mode():
        before = model.forward_features(network_input(frames))[0]
        after = model.forward_features(network_input(altered))[0]
    changed = [p for p in range(before.shape[1]) if not torch.equal(before[:, p], after[:, p])]
    first, last = math.ceil((changed_frame - 54) / 8), (changed_frame + 44) // 8
    assert changed == list(range(first, last + 1))
    # The chunking context must cover that reach on both sides of a window's own frames.
    assert CONTEXT_FRAMES >= 44 and CONTEXT_FRAMES >= 54 - 7


@pytest.mark.slow
def test_snippet_feature_is_pytorch_i3d_average_pool_at_224():
    # pytorch-i3d: extract_features = AvgPool3d((2, 7, 7), stride 1) of Mixed_5c; 16 frames at 224 give (2, 7, 7).
    torch.manual_seed(0)
    model = InceptionI3d().eval()
    mixed_5c = {}
    model.Mixed_5c.register_forward_hook(lambda module, inputs, output: mixed_5c.update(map=output))
    with torch.inference_mode():
        ours = model.extract_features(network_input(random_frames(16, 224)))
    assert mixed_5c["map"].shape[2:] == (2, 7, 7)
    reference = F.avg_pool3d(mixed_5c["map"], kernel_size=(2, 7, 7), stride=1).flatten(1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Snippets


def enumerate_snippets(num_frames: int, length: int, stride: int) -> list[tuple[int, int]]:
    """The rule in words: starts at every multiple of stride below n, stop after the snippet reaching the end."""
    spans, start = [], 0
    while start < num_frames:
        spans.append((start, min(start + length, num_frames)))
        if start + length >= num_frames:
            break
        start += stride
    return spans


def test_snippet_count_formula():
    for n in range(0, 70):
        for length in range(1, 20):
            for stride in range(1, 20):
                assert num_snippets(n, length, stride) == len(enumerate_snippets(n, length, stride)), (n, length, stride)
    assert num_snippets(160, 16, 16) == 10 and num_snippets(161, 16, 16) == 11  # TSU's ceil(n / 16)


@pytest.mark.parametrize("num_frames, length, stride, batch_size", [
    (37, 16, 12, 3),  # overlapping snippets, a padded last one, a partial last batch
    (30, 8, 12, 2),  # gaps between snippets; the last starts at frame 24 and is padded
    (5, 16, 16, 8),  # a video shorter than one snippet
])
def test_snippets_equal_independent_clips(num_frames, length, stride, batch_size):
    extractor = make_extractor(mode="snippets", snippet_len=length, stride=stride, batch_size=batch_size,
                               image_size=8)
    frames = random_frames(num_frames, 8)
    # Decoded in chunks of 7 frames, so snippets straddle chunk boundaries.
    chunks = np.array_split(frames, range(7, num_frames, 7))
    with torch.inference_mode():
        features, spans = map(np.concatenate, zip(*extractor.iter_features(iter(chunks))))

    expected_spans = enumerate_snippets(num_frames, length, stride)
    assert spans.tolist() == [list(span) for span in expected_spans]
    assert len(features) == num_snippets(num_frames, length, stride)
    clips = np.stack([frames[np.minimum(np.arange(first, first + length), num_frames - 1)]  # pad: repeat the last
                      for first, _ in expected_spans])
    with torch.inference_mode():
        expected = torch.cat([extractor.model.extract_features(network_input(clip)) for clip in clips]).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------
# Fully convolutional


def whole_video_features(model: InceptionI3d, frames: np.ndarray) -> np.ndarray:
    """The definition: pad the video to a multiple of 8 frames (repeating the last), one forward pass,
    then pytorch-i3d's 2-step temporal average with the last step repeated."""
    padded = frames[np.minimum(np.arange(math.ceil(len(frames) / 8) * 8), len(frames) - 1)]
    with torch.inference_mode():
        steps = model.forward_features(network_input(padded))  # (1, 1024, T')
    steps = torch.cat([steps, steps[:, :, -1:]], dim=2)
    return F.avg_pool1d(steps, kernel_size=2, stride=1)[0].T.numpy()


FULLY_CONV_FRAMES = 117  # not a multiple of 8: the last feature covers 5 frames


@pytest.fixture(scope="module")
def whole_video():
    """(frames, features by the definition) for the chunking tests, computed once."""
    frames = random_frames(FULLY_CONV_FRAMES, 8, seed=3)
    return frames, whole_video_features(make_extractor(image_size=8).model, frames)


@pytest.mark.parametrize("chunk_frames", [8, 16, 40])
def test_fully_conv_chunked_equals_whole_video(chunk_frames, whole_video):
    # 117 frames in windows of 8, 16 or 40: windows smaller than the 48-frame context, interior windows
    # with context on both sides, and a final window that pads the video's tail.
    frames, expected = whole_video
    extractor = make_extractor(mode="fully_conv", chunk_frames=chunk_frames, image_size=8)
    result = extractor.extract_frames(frames, np.arange(FULLY_CONV_FRAMES) / FPS)

    assert result.features.shape == (math.ceil(FULLY_CONV_FRAMES / 8), FEATURE_DIM) == expected.shape
    # float32 rounding differs by ~1e-6 of the largest feature; a context short by one step errs by ~1e-4.
    np.testing.assert_allclose(result.features, expected, rtol=1e-5, atol=5e-6 * np.abs(expected).max())
    starts = np.arange(0, FULLY_CONV_FRAMES, 8)
    np.testing.assert_allclose(result.start_s, starts / FPS)
    np.testing.assert_allclose(result.end_s, np.minimum(starts + 8, FULLY_CONV_FRAMES) / FPS)


def test_fully_conv_matches_pytorch_i3d_extract_features():
    # For a multiple of 8 frames, all features but our extra last one are pytorch-i3d's
    # extract_features of the whole clip: AvgPool3d((2, h, w), stride 1) over the Mixed_5c map.
    extractor = make_extractor(mode="fully_conv", chunk_frames=16, image_size=16)
    frames = random_frames(40, 16, seed=5)
    mixed_5c = {}
    hook = extractor.model.Mixed_5c.register_forward_hook(lambda module, inputs, output: mixed_5c.update(map=output))
    with torch.inference_mode():
        extractor.model.forward_features(network_input(frames))
    hook.remove()
    reference = F.avg_pool3d(mixed_5c["map"], kernel_size=(2, *mixed_5c["map"].shape[3:]), stride=1)
    reference = reference.flatten(2)[0].T.numpy()  # (4, 1024)

    result = extractor.extract_frames(frames, np.arange(40) / FPS)
    assert len(result) == 5 and len(reference) == 4
    np.testing.assert_allclose(result.features[:-1], reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_fully_conv_streams_without_reading_the_whole_video():
    extractor = make_extractor(mode="fully_conv", chunk_frames=16, image_size=8)
    frames = random_frames(400, 8)
    chunks_read = []

    def decoder():
        for start in range(0, 400, 10):
            chunks_read.append(start)
            yield frames[start:start + 10]

    with torch.inference_mode():
        first_batch, spans = next(extractor.iter_features(decoder()))
    # The first features come out once the second window (frames up to 32 + 48) has been decoded.
    assert len(chunks_read) < 10
    assert spans[0].tolist() == [0, 8]
