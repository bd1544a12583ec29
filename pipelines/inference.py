"""From features to probabilities: the one implementation that training (validation), evaluation
and prediction share.

    standardize(features, mean, std)                  the per-dimension standardisation a model was
                                                      trained with (train.normalize_features)
    video_probabilities(model, features, device)      (T, classes) probabilities of one whole video,
                                                      in one forward pass (no truncation, no window)

`pipelines.data.standardized` (training sequences), `ModelBundle.normalize` (a model file's
statistics), `pipelines.training.validation_map`, `pipelines.evaluation.evaluate` and
`pipelines.tools.predict.Predictor` call these.
"""
from __future__ import annotations

import numpy as np
import torch


def standardize(features, mean, std):
    """(features - mean) / std per dimension. numpy features give a numpy array of their dtype;
    a tensor gives a tensor on its device and of its dtype. mean and std: numpy or torch, (D,)."""
    if isinstance(features, torch.Tensor):
        return (features - torch.as_tensor(mean).to(features)) / torch.as_tensor(std).to(features)
    mean = mean.numpy() if isinstance(mean, torch.Tensor) else mean
    std = std.numpy() if isinstance(std, torch.Tensor) else std
    return ((features - mean) / std).astype(features.dtype, copy=False)


@torch.no_grad()
def video_probabilities(model, features: np.ndarray, device: str | torch.device, mean=None, std=None,
                        blocks: bool = False):
    """(T, classes) float32 probabilities of one video: its (T, D) features through `model` whole.

    With `mean` and `std` the features are standardised first (on the device, `standardize`).
    With blocks=True, returns (probabilities, [(T, classes) of each auxiliary head of the model,
    MS-Temba's blocks]) instead."""
    x = torch.tensor(features, device=device)[None]  # a copy: shard arrays are read-only
    if mean is not None:
        x = standardize(x, mean, std)
    output = model(x)
    probabilities = torch.sigmoid(output.logits[0].float()).cpu().numpy()
    if not blocks:
        return probabilities
    return probabilities, [torch.sigmoid(logits[0].float()).cpu().numpy()
                           for logits in getattr(output, "block_logits", ())]
