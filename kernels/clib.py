"""Finding and loading one of longside's compiled kernel libraries (plain shared libraries,
no Python headers) for ctypes."""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

_HERE = Path(__file__).resolve().parent
BUILD_HINT = "run `pip install --no-deps --no-build-isolation -e .` (or `make install`) in the longside checkout"


def load_library(stem: str, where: Path = _HERE) -> ctypes.CDLL | None:
    """`<where>/<stem><extension suffix>` (default: kernels/) loaded with ctypes, or None when
    it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = where / f"{stem}{suffix}"
        if path.exists():
            return ctypes.CDLL(str(path))
    return None
