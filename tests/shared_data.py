"""The real reference files in ../shared/ beside the project (tests skip where it is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_file(relative: str) -> Path:
    """The path of shared/<relative>; skips the calling test when the file is not there."""
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def read_reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a state-dict listing in shared/reference/ (lines `key<TAB>AxBxC`, # comments)."""
    shapes = {}
    for line in shared_file(f"reference/{name}").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(size) for size in shape.split("x")) if shape else ()
    return shapes
