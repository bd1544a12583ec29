"""The MS-Temba training objective (arXiv 2501.06138, Sec. 3 and the official release).

    loss = bce + beta * block_bce + alpha * consistency + smoothing * smooth

bce          multi-label binary cross-entropy of the fused prediction `output.logits`, summed over
             the real frames and the classes and divided by the number of real frames (the
             normalisation of MS-TCT / MS-Temba: a loss per frame, not per frame and class).
block_bce    the same for every block's auxiliary head `output.block_logits[k]`, summed over blocks.
consistency  for each block k with several DTS branches, 1 - cosine similarity between the
             branches' C sequences (`output.branch_c[k]`), each flattened per sample over
             (sub_length, 2 * d_state); averaged over branch pairs and samples, summed over blocks.
             The branches of block k see interleaved frames of the same video, so their output
             projections C should agree: the term ties the k branches to one temporal model.
smooth       MS-TCN's truncated temporal smoothing of the fused prediction (`temporal_smoothing`),
             summed over the classes like the BCE terms (MS-TCN averages over them), so that one
             weight means the same for 17 classes and for 157. Not in the paper (the release's
             weight is 0); our default recipe uses it: it lifted the classes whose middle shows
             nothing, which the model must carry across from their boundaries (docs/accuracy.md).

Padding: only real frames (mask True) enter the BCE terms; they are selected by indexing, so
whatever the model outputs at padded frames (even NaN) does not reach the loss or its gradient.
The consistency term relies on the model contract that `branch_c` is zero at padded positions:
zeros add nothing to the dot products or the norms, so padding does not change the cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ms_temba.model import check_padding_mask

__all__ = ["model_loss", "ms_temba_loss", "mstct_loss", "mstcn_loss", "frame_bce_loss", "masked_bce",
           "branch_consistency", "temporal_smoothing", "action_heatmap", "heatmap_focal_loss"]


def model_loss(output, targets: torch.Tensor, mask: torch.Tensor | None = None, *,
               beta: float = 0.3, alpha: float = 100.0, smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The training objective of whichever model produced `output`, each model its own loss:
    MS-Temba's (`ms_temba_loss`, with beta, alpha and smoothing), MS-TCT's (`mstct_loss`), MS-TCN's
    (`mstcn_loss`), and plain BCE for a per-frame model. Always has "loss" and "bce" (the BCE of the
    final prediction), plus each loss's own terms."""
    from ms_temba.mlp import FrameOutput
    from ms_temba.model import MSTembaOutput
    from ms_temba.mstcn import MSTCNOutput
    from ms_temba.mstct import MSTCTOutput

    if isinstance(output, MSTembaOutput):
        return ms_temba_loss(output, targets, mask, beta=beta, alpha=alpha, smoothing=smoothing)
    if isinstance(output, MSTCTOutput):
        return mstct_loss(output, targets, mask)
    if isinstance(output, MSTCNOutput):
        return mstcn_loss(output, targets, mask)
    if isinstance(output, FrameOutput):
        return frame_bce_loss(output, targets, mask)
    raise TypeError(f"no loss is known for a model output of type {type(output).__name__}")


def frame_bce_loss(output, targets: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """BCE of `output.logits` only (per frame, as `masked_bce`)."""
    mask, targets = _checked(output, targets, mask)
    bce = masked_bce(output.logits, targets, mask)
    return {"loss": bce, "bce": bce}


def ms_temba_loss(output, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  beta: float = 0.3, alpha: float = 100.0, smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The MS-Temba loss of one batch.

    Args:
        output: an `MSTembaOutput` (anything with `logits`, `block_logits`, `branch_c` and
            optionally `mask`, see docs/CONTRACTS.md).
        targets: (batch, time, classes), 1 where the class is active at the frame, else 0.
        mask: (batch, time) bool, True = real frame. None: `output.mask` if the output has one,
            else all frames are real.
        beta: weight of the per-block BCE terms.
        alpha: weight of the branch-consistency term.
        smoothing: weight of the temporal smoothing of the fused prediction, summed over the
            classes (0: not computed).

    Returns:
        {"loss": the total (differentiable), "bce", "block_bce", "consistency"}, and "smoothing"
        when its weight is not 0: scalar tensors, the unweighted terms alongside the total.
    """
    logits = output.logits
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            f"output.logits must be a (batch, time, classes) tensor, got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    if mask is None:
        mask = getattr(output, "mask", None)
    mask = _check_mask(mask, logits)
    targets = _check_targets(targets, logits, mask)

    bce = masked_bce(logits, targets, mask)
    block_bce = logits.new_zeros(())
    for k, block_logits in enumerate(output.block_logits, start=1):
        if not isinstance(block_logits, torch.Tensor) or block_logits.shape != logits.shape:
            raise ValueError(
                f"output.block_logits[{k - 1}] (block {k}) has shape "
                f"{tuple(getattr(block_logits, 'shape', ()))}, expected {tuple(logits.shape)} "
                f"like output.logits"
            )
        block_bce = block_bce + masked_bce(block_logits, targets, mask)
    consistency = logits.new_zeros(())
    for k, c in enumerate(output.branch_c, start=1):
        consistency = consistency + branch_consistency(c, block=k)

    loss = bce + beta * block_bce + alpha * consistency
    terms = {"bce": bce, "block_bce": block_bce, "consistency": consistency}
    if smoothing:
        terms["smoothing"] = temporal_smoothing(logits, mask) * logits.shape[-1]
        loss = loss + smoothing * terms["smoothing"]
    return {"loss": loss, **terms}


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits summed over the real frames and the classes, divided by the number of real
    frames. logits, targets: (batch, time, classes); mask: (batch, time) bool with a True."""
    # Boolean indexing keeps only the real frames: (num_real_frames, classes).
    real_logits, real_targets = logits[mask], targets[mask]
    summed = F.binary_cross_entropy_with_logits(real_logits, real_targets, reduction="sum")
    return summed / real_logits.shape[0]


def branch_consistency(c: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """1 - cosine similarity between the DTS branches' C sequences, averaged over branch pairs
    and samples.

    c: (batch, branches, sub_length, channels), zero at padded positions. A block with a single
    branch has nothing to agree with and contributes 0. A branch that is all zero (a video shorter
    than the block's dilation leaves some branches without a real frame) has cosine 0 with every
    other branch, a constant that carries no gradient.
    """
    where = f"output.branch_c[{block - 1}] (block {block})" if block is not None else "c"
    if not isinstance(c, torch.Tensor) or c.dim() != 4:
        raise ValueError(
            f"{where} must be a (batch, branches, sub_length, channels) tensor, got "
            f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}"
        )
    batch, branches = c.shape[:2]
    if branches < 2:
        return c.new_zeros(())
    flat = c.reshape(batch, branches, -1)
    first, second = torch.triu_indices(branches, branches, offset=1, device=c.device)
    # (batch, pairs): cosine between branch first[p] and branch second[p] of every sample.
    cosine = F.cosine_similarity(flat[:, first], flat[:, second], dim=-1)
    return (1.0 - cosine).mean()


def temporal_smoothing(logits: torch.Tensor, mask: torch.Tensor, clamp: float = 4.0) -> torch.Tensor:
    """MS-TCN's truncated MSE (Farha & Gall 2019, Eq. 4-5), with a sigmoid per class for
    multi-label data: the mean over pairs of neighbouring real frames and over the classes of
    min(|log sigmoid(l_t) - log sigmoid(l_{t-1})|, clamp)^2, the previous frame's value detached as
    in the paper's code. 0 when no two neighbouring frames are real.

    logits: (batch, time, classes); mask: (batch, time) bool, True = real frame."""
    pairs = mask[:, 1:] & mask[:, :-1]
    if not pairs.any():
        return logits.new_zeros(())
    log_p = F.logsigmoid(logits)
    step = (log_p[:, 1:] - log_p[:, :-1].detach()).abs().clamp(max=clamp) ** 2
    return step[pairs].mean()


def _check_mask(mask, logits: torch.Tensor) -> torch.Tensor:
    batch, length = logits.shape[:2]
    mask = check_padding_mask(mask, batch, length, logits.device, needed_by="the logits")
    if not mask.any():
        raise ValueError("mask has no real frame: the loss is undefined on an all-padding batch")
    return mask


def _check_targets(targets, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)} but the logits are (batch, time, classes) "
            f"= {tuple(logits.shape)}"
        )
    targets = targets.to(dtype=logits.dtype)
    real = targets[mask]
    if not torch.isfinite(real).all() or (real < 0).any() or (real > 1).any():
        raise ValueError("targets must be in [0, 1] (1 = class active) at real frames")
    return targets


def mstct_loss(output, targets: torch.Tensor, mask: torch.Tensor | None = None,
               heatmap_weight: float = 0.05) -> dict[str, torch.Tensor]:
    """MS-TCT's objective (official train.py, alpha_l = 1, beta_l = 0.05):

        loss = bce(logits) + heatmap_weight * focal(heatmap_logits, action_heatmap(targets))
    """
    mask, targets = _checked(output, targets, mask)
    bce = masked_bce(output.logits, targets, mask)
    focal = heatmap_focal_loss(output.heatmap_logits, action_heatmap(targets, mask), mask)
    return {"loss": bce + heatmap_weight * focal, "bce": bce, "heatmap_focal": focal}


def mstcn_loss(output, targets: torch.Tensor, mask: torch.Tensor | None = None,
               smooth_weight: float = 0.15, smooth_clamp: float = 4.0) -> dict[str, torch.Tensor]:
    """MS-TCN's objective, summed over the stages (Farha & Gall 2019, Eq. 3-5, with a sigmoid per
    class for multi-label data):

        loss = sum_s bce(stage_s) + smooth_weight * T-MSE(stage_s)
        T-MSE = temporal_smoothing(stage_s, mask, smooth_clamp)
    """
    mask, targets = _checked(output, targets, mask)
    bce = smooth = output.logits.new_zeros(())
    for logits in output.stage_logits:
        bce = bce + masked_bce(logits, targets, mask)
        smooth = smooth + temporal_smoothing(logits, mask, smooth_clamp)
    final_bce = masked_bce(output.logits, targets, mask)
    return {"loss": bce + smooth_weight * smooth, "bce": final_bce, "stage_bce": bce, "smoothing": smooth}


def action_heatmap(targets: torch.Tensor, mask: torch.Tensor, gamma: float = 0.5, tau: float = 4.0) -> torch.Tensor:
    """MS-TCT's ground-truth heatmap (official charades_dataloader.make_dataset), from the labels.

    Every run of consecutive positive frames of a class is one action instance of d frames, centred
    at c = (first + last + 1) // 2; it contributes a Gaussian exp(-(t - c)^2 / sigma^2) over
    |t - c| <= r, with r = int(d / gamma) and sigma = (2r + 1) / tau, exactly 1 at c; instances of
    one class are combined by max. (The official code takes the instances from the annotations of
    the whole video before cropping; here they come from the labels of the crop, so an action cut
    by the crop is centred on its visible part.) Zero at padded frames.
    targets (batch, time, classes) in {0, 1} -> heatmap of the same shape.
    """
    positive = (targets > 0.5) & mask.unsqueeze(-1)
    batch, length, classes = targets.shape
    padded = F.pad(positive.transpose(1, 2).to(torch.int8), (1, 1)).cpu()  # (batch, classes, time + 2)
    edges = padded[..., 1:] - padded[..., :-1]  # +1 at a run's first frame, -1 after its last
    starts = (edges == 1).nonzero()  # (instances, 3): batch, class, first frame
    end = (edges == -1).nonzero()[:, 2]  # same order: runs do not nest
    sample, cls, first = starts.unbind(1)
    # All instances at once, one row each (a loop over instances costs seconds on crops with many
    # short runs); radius and sigma in float64 as the official Python computes them.
    centre = (first + end) // 2
    radius = ((end - first).double() / gamma).long()  # int(): the quotient is never negative
    sigma = (2 * radius + 1).double() / tau
    offset = torch.arange(length, dtype=torch.float32) - centre.unsqueeze(1)  # (instances, time)
    gaussians = torch.exp(-(offset ** 2) / (sigma ** 2).float().unsqueeze(1))
    gaussians *= offset.abs() <= radius.unsqueeze(1)
    # Instances of one class in one sample are combined by max.
    heatmap = torch.zeros(batch * classes, length)
    row = (sample * classes + cls).unsqueeze(1).expand(-1, length)
    heatmap.scatter_reduce_(0, row, gaussians, "amax")
    heatmap = heatmap.view(batch, classes, length).transpose(1, 2)
    return heatmap.to(device=targets.device, dtype=targets.dtype) * mask.unsqueeze(-1)


def heatmap_focal_loss(heatmap_logits: torch.Tensor, heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MS-TCT's (CenterNet-style) focal loss over the real frames, normalised by the number of
    instance centres (frames where the heatmap is 1):

        pos: -log(p) (1 - p)^2            where heatmap == 1
        neg: -log(1 - p) p^2 (1 - h)^4    elsewhere,  p = clamp(sigmoid(logit), 1e-4, 1 - 1e-4)

    (The official function pairs every sample's prediction with the targets of the whole batch;
    here each sample is compared with its own heatmap.)"""
    p = torch.sigmoid(heatmap_logits[mask]).clamp(1e-4, 1 - 1e-4)
    h = heatmap[mask]
    positive = h.eq(1).to(p.dtype)
    pos_loss = (torch.log(p) * (1 - p) ** 2 * positive).sum()
    neg_loss = (torch.log(1 - p) * p ** 2 * (1 - h) ** 4 * (1 - positive)).sum()
    return -(pos_loss + neg_loss) / positive.sum().clamp(min=1)


def _checked(output, targets, mask):
    """The mask (from `output.mask` when None) and targets, validated against `output.logits`."""
    logits = output.logits
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError("output.logits must be a (batch, time, classes) tensor")
    if mask is None:
        mask = getattr(output, "mask", None)
    mask = _check_mask(mask, logits)
    return mask, _check_targets(targets, logits, mask)
