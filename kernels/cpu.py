"""ctypes bindings of the C kernel (kernels/nf4_cpu.c, built as `longside.kernels._nf4_cpu`).

The library is loaded once per process, on first use. When it has not been built,
`available()` is False and `kernels.ops` falls back to the plain-torch reference with a
warning; build it with `pip install --no-deps --no-build-isolation -e .` (or `make`).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from longside.kernels.clib import BUILD_HINT, load_library


# Tiled path: dequantize this many fp32 bytes of weight rows at a time, then one GEMM.
_TILE_BYTES = 4 << 20


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library("_nf4_cpu")
    if lib is None:
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.nf4_cpu_has_avx2.restype = cint
    lib.nf4_cpu_has_avx2.argtypes = []
    lib.nf4_dequant_rows.restype = None
    lib.nf4_dequant_rows.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, cint, cint]
    lib.nf4_gemv.restype = None
    lib.nf4_gemv.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64, cint, cint]
    return lib


def available() -> bool:
    """True when the compiled library is present."""
    return _lib() is not None


@functools.cache
def _use_avx2() -> bool:
    # LONGSIDE_NF4_SCALAR=1 forces the portable path (tests run both).
    return bool(_lib().nf4_cpu_has_avx2()) and os.environ.get("LONGSIDE_NF4_SCALAR") != "1"


def isa() -> str:
    """Which path the C kernel takes here: "avx2" or "scalar"."""
    return "avx2" if _use_avx2() else "scalar"


def dequantize_rows(packed: torch.Tensor, absmax: torch.Tensor, n0: int, n1: int, k: int,
                    blocksize: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `[n0, n1)` of an NF4 weight with K columns -> float32 `[n1-n0, K]` (contiguous).

    packed: uint8, contiguous, flat layout; absmax: float32 `[n_blocks]`, contiguous.
    """
    if out is None:
        out = torch.empty(n1 - n0, k, dtype=torch.float32)
    _lib().nf4_dequant_rows(packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), n0, n1, k,
                            blocksize, torch.get_num_threads(), int(_use_avx2()))
    return out


def gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Fused dequantize-and-multiply: float32 x `[M, K]` (unit stride in K) -> `[M, N]`.

    Needs K % blocksize == 0. Cost grows with M (weights are decoded once per 4 rows of
    x), so it is the path for small M.
    """
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    _lib().nf4_gemv(x.data_ptr(), x.stride(0), m, packed.data_ptr(), absmax.data_ptr(),
                    y.data_ptr(), n, n, k, blocksize, torch.get_num_threads(), int(_use_avx2()))
    return y


def gemm_tiled(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Dequantize cache-sized tiles of weight rows, then one BLAS GEMM per tile.

    x: float32 `[M, K]` -> `[M, N]`. Any K (blocks spanning rows are decoded by the
    scalar path). The path for large M, where the GEMM dominates.
    """
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    rows = max(1, min(n, _TILE_BYTES // (4 * k)))
    tile = torch.empty(rows, k, dtype=torch.float32)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = dequantize_rows(packed, absmax, n0, n1, k, blocksize, out=tile[: n1 - n0])
        torch.mm(x, w.t(), out=y[:, n0:n1])
    return y
