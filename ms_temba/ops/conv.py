"""Depthwise 1D convolution with a fast CPU backward: the TLM's dilated conv and the CPU path of
`ms_temba.ops.causal_conv1d`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ms_temba.ops import workspace


def depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dilation: int = 1,
    padding: tuple[int, int] = (0, 0),
    silu: bool = False,
) -> torch.Tensor:
    """Depthwise 1D convolution, `F.conv1d(F.pad(x, padding), weight[:, None], bias,
    dilation=dilation, groups=dim)`, optionally followed by silu, with a backward ~8x faster on CPU.

    PyTorch's CPU backward of a depthwise conv1d takes ~10x its forward (75 ms vs 7 ms at dim 1152,
    length 2500); in MS-Temba that was a fifth of a training step. Here the kernel's few taps are
    shifted multiply-adds over the whole sequence, forward and backward (`_DepthwiseConv1d`).

    Args:
        x: (batch, dim, length).
        weight: (dim, width).
        bias: optional (dim,).
        dilation: spacing of the taps.
        padding: zeros added (before, after) the sequence.
        silu: apply silu to the output. The backward then recomputes the pre-activation (a few
            multiply-adds) instead of keeping it.
    """
    dilation, (pad_before, pad_after) = int(dilation), (int(padding[0]), int(padding[1]))
    if dilation < 1 or pad_before < 0 or pad_after < 0:
        raise ValueError(f"depthwise_conv1d: need dilation >= 1 and padding >= 0, got {dilation}, "
                         f"{padding}")
    out_length = x.shape[-1] + pad_before + pad_after - dilation * (weight.shape[1] - 1)
    if out_length < 1:
        raise ValueError(f"depthwise_conv1d: a sequence of length {x.shape[-1]} is shorter than the "
                         f"kernel's span {dilation * (weight.shape[1] - 1) + 1}")
    if x.is_cuda:  # cuDNN's depthwise kernels are fast both ways
        out = F.conv1d(F.pad(x, (pad_before, pad_after)), weight.unsqueeze(1), bias,
                       dilation=dilation, groups=x.shape[1])
        return F.silu(out) if silu else out
    return _DepthwiseConv1d.apply(x, weight, bias, dilation, pad_before, pad_after, bool(silu))


# Time steps per block of the weight gradient's products: a (batch, dim, 256) buffer stays in the
# CPU caches and is reused, where the product over the whole sequence is a sequence-long temporary.
_PRODUCT_STEPS = 256


class _DepthwiseConv1d(torch.autograd.Function):
    """out[:, d, t] = bias[d] + sum_k weight[d, k] x[:, d, t + k dilation - pad_before], one
    `addcmul_` per tap over the part of the sequence where the tap reads inside x (the padding
    is zeros, so it adds nothing: no padded copy of x is made); the backward is the same sums
    transposed."""

    @staticmethod
    def tap_windows(length, out_length, width, dilation, pad_before):
        """Per tap: (out window, x window), the slices of out and x the tap pairs up."""
        windows = []
        for tap in range(width):
            offset = tap * dilation - pad_before
            first, stop = max(0, -offset), min(out_length, length - offset)
            if first < stop:
                windows.append((tap, slice(first, stop), slice(first + offset, stop + offset)))
        return windows

    @staticmethod
    def empty_like_layout(x, length, slot=None):
        """An empty (batch, dim, length) tensor in x's memory order: time-major when x's channels
        are adjacent (in BiMamba x is a transposed view of the in_proj output), else channel-first.
        Elementwise ops between tensors of different orders transpose as they go, which measured
        a fifth slower for the whole model at T=10000.

        With `slot`, a buffer of `ms_temba.ops.workspace` (for a temporary that does not leave
        the caller). Without, a tensor of its own, not a view: autograd adds a second gradient
        into a first one in place only when that is not a view (an `x` used twice, as BiMamba's
        x by both directions, otherwise costs one more sequence-long tensor)."""
        batch, dim, _ = x.shape
        time_major = x.stride(1) == 1 and dim > 1
        if slot is not None:
            take = workspace.take_time_major if time_major else workspace.take
            return take(slot, (batch, dim, length), x.dtype, x.device)
        if time_major:
            return x.new_empty_strided((batch, dim, length), (length * dim, 1, dim))
        return x.new_empty(batch, dim, length)

    @staticmethod
    def tap_columns(weight):
        """weight (dim, width) as `width` contiguous (dim, 1) columns. weight[:, tap, None] steps
        through memory by `width` along the channels, which are the innermost axis of a time-major
        x: the multiply-adds then do not vectorise (1.0 ms against 0.12 ms a tap at dim 512,
        length 2500)."""
        return weight.t().contiguous().unsqueeze(-1)

    @staticmethod
    def taps(x, weight, bias, windows, out_length, slot=None):
        out = _DepthwiseConv1d.empty_like_layout(x, out_length, slot)
        columns = _DepthwiseConv1d.tap_columns(weight)
        # A fresh buffer, not bias.expand(...).contiguous(): that can return the bias itself (an
        # expanded (1, dim, 1) counts as contiguous), and addcmul_ would then write into it.
        out.copy_(bias[:, None]) if bias is not None else out.zero_()
        for tap, out_window, x_window in windows:
            out[..., out_window].addcmul_(x[..., x_window], columns[tap])
        return out

    @staticmethod
    def forward(ctx, x, weight, bias, dilation, pad_before, pad_after, silu):
        out_length = x.shape[-1] + pad_before + pad_after - dilation * (weight.shape[1] - 1)
        windows = _DepthwiseConv1d.tap_windows(x.shape[-1], out_length, weight.shape[1], dilation,
                                               pad_before)
        out = _DepthwiseConv1d.taps(x, weight, bias, windows, out_length)
        # In a Mamba block x is a view of the in_proj output, which stays alive anyway (the scan
        # keeps z, the other half of it).
        ctx.save_for_backward(x, weight, bias)
        ctx.windows, ctx.silu = windows, silu
        return F.silu(out, inplace=True) if silu else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        windows, out_length = ctx.windows, grad_out.shape[-1]
        if ctx.silu:
            pre_activation = _DepthwiseConv1d.taps(x, weight, bias, windows, out_length)
            grad_out = _DepthwiseConv1d.silu_backward_(pre_activation, grad_out)
        grad_x, grad_weight = _DepthwiseConv1d.input_and_weight_gradients(x, weight, windows, grad_out)
        grad_bias = _sum_over_batch_and_time(grad_out) if bias is not None else None
        return grad_x, grad_weight, grad_bias, None, None, None, None

    @staticmethod
    def silu_backward_(pre_activation, grad_out, sigmoid_slot=None):
        """d loss / d pre_activation of silu(pre_activation), in pre_activation's buffer: two
        sequence-long temporaries instead of five (the sigmoid in workspace slot `sigmoid_slot`
        if given). d silu(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a)))."""
        if sigmoid_slot is None:
            sigmoid = torch.sigmoid(pre_activation)
        else:
            sigmoid = torch.sigmoid(pre_activation, out=_DepthwiseConv1d.empty_like_layout(
                pre_activation, pre_activation.shape[-1], sigmoid_slot))
        return (pre_activation.addcmul_(pre_activation, sigmoid, value=-1).add_(1)
                .mul_(sigmoid).mul_(grad_out))

    @staticmethod
    def input_and_weight_gradients(x, weight, windows, grad_out):
        """The gradients of x and weight, given that of the conv's output (before any silu)."""
        out_length = grad_out.shape[-1]
        grad_x = _DepthwiseConv1d.empty_like_layout(x, x.shape[-1]).zero_()
        grad_weight = torch.zeros_like(weight)
        product = _DepthwiseConv1d.empty_like_layout(x, min(_PRODUCT_STEPS, out_length))
        columns = _DepthwiseConv1d.tap_columns(weight)
        for tap, out_window, x_window in windows:
            grad_x[..., x_window].addcmul_(grad_out[..., out_window], columns[tap])
            # The sum over batch and time of grad_out * x, a block of time steps at a time.
            # einsum("bdt,bdt->d") makes it a bmm over the channels, which copies each channel's
            # vectors when they are strided (a time-major x): 18 ms a tap at dim 512, length 2500,
            # against 0.9 ms here.
            shift = x_window.start - out_window.start
            for start in range(out_window.start, out_window.stop, _PRODUCT_STEPS):
                stop = min(start + _PRODUCT_STEPS, out_window.stop)
                block = torch.mul(grad_out[..., start:stop], x[..., start + shift:stop + shift],
                                  out=product[..., :stop - start])
                grad_weight[:, tap] += _sum_over_batch_and_time(block)
        return grad_x, grad_weight


def _sum_over_batch_and_time(x):
    """(batch, dim, length) -> (dim,). Over time first, then over the batch: torch's one-call
    sum(dim=(0, 2)) of a time window of a time-major tensor (batch and time not mergeable) took
    3.7 ms at batch 8, dim 512, length 255 on one thread, against 0.09 ms in two steps; it made
    the conv's weight gradient 15-20 ms of a BiMamba layer's backward."""
    return x.sum(dim=2).sum(dim=0)


class CausalConv:
    """`ms_temba.ops.causal_conv1d`'s CPU path (kernel width `width`, over `length` steps) as
    `_DepthwiseConv1d`'s pieces, for a caller that runs its own backward (`mamba_inner`): the
    causal padding, and for `reverse` the kernel flipped and the padding after the sequence."""

    def __init__(self, length, width, reverse):
        self.length, self.reverse = length, reverse
        pad_before = 0 if reverse else width - 1
        self.windows = _DepthwiseConv1d.tap_windows(length, length, width, 1, pad_before)

    def oriented(self, weight):
        """weight (dim, width) as the taps apply it; its own inverse."""
        return weight.flip(-1) if self.reverse else weight

    def pre_activation(self, x, weight, bias, slot=None):
        """The conv's output before silu, in workspace slot `slot` if given."""
        return _DepthwiseConv1d.taps(x, self.oriented(weight), bias, self.windows, self.length, slot)

    def gradients(self, x, weight, grad_pre_activation):
        """(grad_x, grad_weight, grad_bias) from the gradient of the pre-activation."""
        grad_x, grad_weight = _DepthwiseConv1d.input_and_weight_gradients(
            x, self.oriented(weight), self.windows, grad_pre_activation)
        return grad_x, self.oriented(grad_weight), _sum_over_batch_and_time(grad_pre_activation)
