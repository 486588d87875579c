"""`matmul_nf4`, the one entry point: dispatches by device (CPU -> C kernel, CUDA -> Triton)
and by the number of rows M (fused decode kernel for small M, tiled dequantize + GEMM for
large M)."""

from __future__ import annotations

import warnings

import torch
from longside.kernels import cpu
from longside.kernels.nf4 import NF4Weight, dequantize_nf4, matmul_nf4_reference

from longside.errors import LongsideError

# Up to this many rows the fused kernel wins on CPU (it decodes the weights once per 4 rows
# of x); above, dequantizing tiles and calling BLAS does (measured by `longside bench kernels`).
CPU_FUSED_MAX_M = 16


def matmul_nf4(x: torch.Tensor, qweight: NF4Weight, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T` for an NF4 weight W `[N, K]`.

    x: float `[..., K]` (any strides, fp32 on CPU; fp32/fp16/bf16 on CUDA) -> float32
    `[..., N]` on CPU, x's dtype on CUDA. absmax: the weight's float32 absmax when the
    caller has it cached (double-quantized weights otherwise decode it on every call).
    """
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise LongsideError(f"matmul_nf4: x has {x.shape[-1]} features, the weight expects {k}")
    if absmax is None:
        absmax = qweight.absmax_f32()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.device.type == "cuda":
        from longside.kernels.nf4_triton import matmul_nf4_triton  # optional: Triton exists only where CUDA does

        return matmul_nf4_triton(x2, qweight.packed, absmax, n, qweight.blocksize).reshape(*lead, n)
    if x2.device.type != "cpu":
        raise LongsideError(f"matmul_nf4 runs on cpu or cuda, got {x2.device}")
    if not cpu.available():
        warnings.warn(f"longside NF4 CPU kernel is not built, using the slow torch reference: {cpu.BUILD_HINT}",
                      RuntimeWarning, stacklevel=2)
        return matmul_nf4_reference(x2, qweight).reshape(*lead, n)
    x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed, absmax = qweight.packed.contiguous(), absmax.contiguous()
    if x2.shape[0] <= CPU_FUSED_MAX_M and k % qweight.blocksize == 0:
        y = cpu.gemv(x2, packed, absmax, n, qweight.blocksize)
    else:
        y = cpu.gemm_tiled(x2, packed, absmax, n, qweight.blocksize)
    return y.reshape(*lead, n)


def dequantize(qweight: NF4Weight, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `[N, K]`, bit-identical to `dequantize_nf4`, with the C kernel on CPU."""
    if absmax is None:
        absmax = qweight.absmax_f32()
    n, k = qweight.shape
    if qweight.packed.device.type == "cpu" and cpu.available():
        return cpu.dequantize_rows(qweight.packed.contiguous(), absmax.contiguous(), 0, n, k, qweight.blocksize)
    if absmax is not qweight.absmax:
        qweight = NF4Weight(qweight.packed, absmax, qweight.shape, qweight.blocksize)
    return dequantize_nf4(qweight)
