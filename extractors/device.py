"""The one place that turns a device setting ("auto" | "cpu" | "cuda") into a torch.device.

Every part that runs a network asks here: the train and evaluate stages (`train.device`), `ms-temba
predict --device`, the feature extractors (`extractor.device`), and `ms-temba check`, which reports
what each setting resolves to on this machine. "auto" is CUDA when torch can use a GPU, else the
CPU; "cuda" on a machine without a usable GPU is a `DeviceError` naming the setting and why,
raised before any work starts (not torch's "Found no NVIDIA driver" from deep inside a run).
"""
from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device setting this machine cannot honour; the message names the setting and the fix."""

    user_error = True  # one line and exit 2 from the command line (pipelines/process.py)


def cuda_unavailable_reason() -> str | None:
    """Why torch cannot use CUDA here, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or NVIDIA driver"


def resolve_device(name: str, setting: str = "device"):
    """torch.device for `name` ("auto", "cpu", "cuda" or "cuda:N"); `setting` names the option in
    messages (e.g. "train.device", "--device")."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not isinstance(name, str) or not (name == "cuda" or name.startswith("cuda:")):
        raise DeviceError(f"{setting} must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise DeviceError(f"{setting} is {name!r} but this machine cannot run CUDA: {reason}; "
                          f"use 'auto' (CUDA when present, else the CPU) or 'cpu'")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"{setting} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
