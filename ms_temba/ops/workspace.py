"""Reused CPU buffers for the sequence-long temporaries that live only inside one call of our
autograd Functions (`mamba_inner.MambaInnerFunction`'s u, delta and gradients).

Why: glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with fresh
pages from mmap, faulted in and zeroed on first write and unmapped again on free. In the default
MS-Temba at T=10000 the Temba Fuser's mixer (d_inner 1152) has (length, 1152) fp32 temporaries of
44 MiB: each forward + backward allocated 16 of them inside MambaInnerFunction, about 180k page
faults, where at T=2500 (11 MiB each) malloc reuses its heap. That made the model's time grow
faster than the length. A library must not change the process's allocator settings (mallopt) to
avoid it, so the Functions take those buffers from here instead and keep them for the next call.

The buffers are per thread (two threads running models at once get their own) and per named
slot; a slot grows to the largest request it has had and is then reused for any shape that fits.
A caller owns what `take` returns until it takes from the same slot again, so a slot must only
hold a temporary that neither escapes the Function (no output, nothing saved for the backward)
nor outlives the next `take` of that slot. They stay allocated between calls, at most a few
sequence-long tensors of the widest mixer (4 x 44 MiB at T=10000 for the default model, where the
backward's peak holds them anyway); `release_workspace()` frees them.

Only CPU tensors use it: CUDA's caching allocator already reuses memory.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["release_workspace", "take", "take_time_major"]

# Below this many elements a temporary is left to the allocator, which serves it from its heap
# without page faults (and a slot would only keep memory for nothing).
_MIN_ELEMENTS = 1 << 18  # 1 MiB of fp32


class _Buffers(threading.local):
    def __init__(self):
        self.slots: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_buffers = _Buffers()


def take(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`, the start of slot `slot`'s buffer on the
    CPU (a fresh tensor on other devices, or when it is small)."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel < _MIN_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (slot, dtype)
    buffer = _buffers.slots.get(key)
    if buffer is None or buffer.numel() < numel:
        # Drop the old buffer first, so that it and its larger successor are not both alive.
        _buffers.slots.pop(key, None)
        buffer = _buffers.slots[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def take_time_major(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`take` for a (batch, dim, length) `shape` stored time-major (a transposed view of
    (batch, length, dim)): the layout of BiMamba's x and z and of the scan's outputs."""
    batch, dim, length = shape
    return take(slot, (batch, length, dim), dtype, device).transpose(1, 2)


def release_workspace() -> None:
    """Free this thread's buffers (they are taken again, at their new size, by the next call)."""
    _buffers.slots.clear()
