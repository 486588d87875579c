"""Finding and loading one of longside's compiled kernel libraries (plain shared libraries,
no Python headers) for ctypes."""

from __future__ import annotations

import ctypes
from pathlib import Path

from longside.paths import compiled_library

_HERE = Path(__file__).resolve().parent
BUILD_HINT = "run `pip install --no-deps --no-build-isolation -e .` (or `make install`) in the longside checkout"


def load_library(stem: str) -> ctypes.CDLL | None:
    """`kernels/<stem><extension suffix>` loaded with ctypes, or None when it was not built."""
    return compiled_library(_HERE, stem)
