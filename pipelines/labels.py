"""Per-feature multi-label targets from action intervals.

Feature t covers [start_s[t], end_s[t]) seconds of its video. It is positive for class c when its
centre time lies inside an action of class c, ends included:

    labels[t, c] = 1  iff  exists action (c, start, end) with start <= centre[t] <= end

(MS-TCT's loaders use the same rule with the feature's index / feature rate as its time.)
"""
from __future__ import annotations

import numpy as np


def feature_centres(start_s: np.ndarray, end_s: np.ndarray) -> np.ndarray:
    """Centre time (seconds) of every feature."""
    return (np.asarray(start_s, dtype=np.float64) + np.asarray(end_s, dtype=np.float64)) / 2.0


def build_labels(centres_s: np.ndarray, action_classes: np.ndarray, action_starts_s: np.ndarray,
                 action_ends_s: np.ndarray, num_classes: int) -> np.ndarray:
    """(T, num_classes) float32 in {0, 1}: frame t positive for the classes of the actions around it.

    Vectorised: a (T, actions) "inside" matrix times the (actions, classes) one-hot class matrix.
    Actions must already be clean (see pipelines.annotations.clean_video): classes in
    [0, num_classes), times in seconds.
    """
    centres = np.asarray(centres_s, dtype=np.float64).reshape(-1)
    classes = np.asarray(action_classes, dtype=np.int64).reshape(-1)
    starts = np.asarray(action_starts_s, dtype=np.float64).reshape(-1)
    ends = np.asarray(action_ends_s, dtype=np.float64).reshape(-1)
    if not (len(classes) == len(starts) == len(ends)):
        raise ValueError(f"action_classes, action_starts_s and action_ends_s must have one entry per action, "
                         f"got lengths {len(classes)}, {len(starts)}, {len(ends)}")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"action classes must be in [0, {num_classes}), got {classes.min()}..{classes.max()}")
    inside = (starts[None, :] <= centres[:, None]) & (centres[:, None] <= ends[None, :])  # (T, A)
    one_hot = np.zeros((len(classes), num_classes), dtype=np.float32)
    one_hot[np.arange(len(classes)), classes] = 1.0
    return (inside.astype(np.float32) @ one_hot > 0).astype(np.float32)
