"""End-to-end sanity check: the tiny MS-Temba, trained with ms_temba_loss, memorises a small data
set, and the metrics see it. If the model, the loss or the metrics are wired wrongly (a detached
term, a sign error, frames shuffled between scores and labels), this is where it shows."""

from __future__ import annotations

import pytest
import torch

import ms_temba
from ms_temba.losses import ms_temba_loss
from ms_temba.metrics import FrameMAP, chance_map

BATCH, TIME, IN_DIM, CLASSES = 4, 48, 32, 6
STEPS = 200


@pytest.fixture
def one_thread():
    """One intra-op thread, restored afterwards: the model is small, and on a shared machine
    several spinning OpenMP threads per process slow every step down by an order of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_dataset(seed: int = 0):
    """Fixed random features and multi-label targets made of action segments (each class is
    active for 1-2 runs of 4-19 frames per video), with videos of different lengths padded at
    the end."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, TIME, IN_DIM, generator=gen)
    targets = torch.zeros(BATCH, TIME, CLASSES)
    for b in range(BATCH):
        for c in range(CLASSES):
            for _ in range(2):
                start = int(torch.randint(0, TIME, (1,), generator=gen))
                length = int(torch.randint(4, 20, (1,), generator=gen))
                targets[b, start : start + length, c] = 1
    lengths = torch.randint(TIME // 2, TIME + 1, (BATCH,), generator=gen)
    lengths[0] = TIME
    mask = torch.arange(TIME)[None, :] < lengths[:, None]
    return features, targets, mask


def train_set_map(model, features, targets, mask) -> float:
    metric = FrameMAP(CLASSES)
    model.eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(model(features, mask).logits)
    model.train()
    for b in range(BATCH):
        metric.update(probabilities[b], targets[b], mask[b])
    return metric.compute()["map"]


def test_tiny_model_overfits_a_small_dataset(one_thread):
    torch.manual_seed(0)
    features, targets, mask = make_dataset()
    model = ms_temba.create_model("ms_temba_tiny", in_dim=IN_DIM, num_classes=CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    map_before = train_set_map(model, features, targets, mask)
    history = []
    for _ in range(STEPS):
        terms = ms_temba_loss(model(features, mask), targets)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append({key: value.item() for key, value in terms.items()})
    map_after = train_set_map(model, features, targets, mask)
    chance = chance_map(targets[mask])

    first, last = history[0], history[-1]
    for key in ("loss", "bce", "block_bce", "consistency"):
        print(f"{key}: {first[key]:.4f} -> {last[key]:.4f}")
    print(f"train mAP: {map_before:.3f} -> {map_after:.3f} (chance {chance:.3f})")
    assert last["loss"] < first["loss"] / 10
    # The predictions themselves are learnt, not only the (initially dominant) consistency term.
    assert last["bce"] < first["bce"] / 10
    assert last["block_bce"] < first["block_bce"] / 10
    assert map_after > 0.9 and map_after > chance + 0.5
