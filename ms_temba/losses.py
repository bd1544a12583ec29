"""The MS-Temba training objective (arXiv 2501.06138, Sec. 3 and the official release).

    loss = bce + beta * block_bce + alpha * consistency

bce          multi-label binary cross-entropy of the fused prediction `output.logits`, summed over
             the real frames and the classes and divided by the number of real frames (the
             normalisation of MS-TCT / MS-Temba: a loss per frame, not per frame and class).
block_bce    the same for every block's auxiliary head `output.block_logits[k]`, summed over blocks.
consistency  for each block k with several DTS branches, 1 - cosine similarity between the
             branches' C sequences (`output.branch_c[k]`), each flattened per sample over
             (sub_length, 2 * d_state); averaged over branch pairs and samples, summed over blocks.
             The branches of block k see interleaved frames of the same video, so their output
             projections C should agree: the term ties the k branches to one temporal model.

Padding: only real frames (mask True) enter the BCE terms; they are selected by indexing, so
whatever the model outputs at padded frames (even NaN) does not reach the loss or its gradient.
The consistency term relies on the model contract that `branch_c` is zero at padded positions:
zeros add nothing to the dot products or the norms, so padding does not change the cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ms_temba.model import check_padding_mask

__all__ = ["ms_temba_loss", "masked_bce", "branch_consistency"]


def ms_temba_loss(output, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  beta: float = 0.3, alpha: float = 100.0) -> dict[str, torch.Tensor]:
    """The MS-Temba loss of one batch.

    Args:
        output: an `MSTembaOutput` (anything with `logits`, `block_logits`, `branch_c` and
            optionally `mask`, see docs/CONTRACTS.md).
        targets: (batch, time, classes), 1 where the class is active at the frame, else 0.
        mask: (batch, time) bool, True = real frame. None: `output.mask` if the output has one,
            else all frames are real.
        beta: weight of the per-block BCE terms.
        alpha: weight of the branch-consistency term.

    Returns:
        {"loss": the total (differentiable), "bce", "block_bce", "consistency"}: scalar tensors,
        the three unweighted terms alongside the total.
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
    return {"loss": loss, "bce": bce, "block_bce": block_bce, "consistency": consistency}


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
