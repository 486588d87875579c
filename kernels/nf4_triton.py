"""Triton NF4 kernels for CUDA: fused dequantize-and-multiply for small M, tiled
dequantize + `tl.dot` for large M. Same bitsandbytes layout as kernels/nf4.py.

Weights are addressed by flat element index e = n*K + k (byte e//2, high nibble when e is
even, absmax block e//blocksize), so any N, K work, including blocks that span rows.
Dequantized values are `code[idx] * absmax` in fp32, bit-identical to the reference.
(The few lines that decode a tile are repeated in both kernels rather than factored into
a nested @triton.jit helper, which the interpreter fails to call when triton was imported
before TRITON_INTERPRET was set.)

The suite runs these on CPU tensors under `TRITON_INTERPRET=1` (set before this module is
imported); `kernels/bench_gpu.py` checks and times them on a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from longside.kernels.nf4 import NF4_CODE

# Up to this many rows of x the fused kernel runs (weights are read once per BLOCK_M rows).
FUSED_MAX_M = 16


@triton.jit
def _load_tiles(x_ptr, packed_ptr, absmax_ptr, code_ptr, offs_m, offs_n, offs_k, M, N, K, stride_xm,
                BLOCKSIZE: tl.constexpr):
    """The dequantized weight tile `[BLOCK_N, BLOCK_K]` (fp32) and the x tile `[BLOCK_M, BLOCK_K]`."""
    w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    e = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    byte = tl.load(packed_ptr + e // 2, mask=w_mask, other=0).to(tl.int32)
    idx = tl.where(e % 2 == 0, byte >> 4, byte & 0xF)
    w = tl.load(code_ptr + idx) * tl.load(absmax_ptr + e // BLOCKSIZE, mask=w_mask, other=0.0)
    x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
    return w, x


@triton.jit
def _nf4_fused_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """y[m, n] for BLOCK_M rows of x and BLOCK_N output features; fp32 accumulation with
    broadcast multiply-sum (M is too small for tensor cores to pay off)."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w, x = _load_tiles(x_ptr, packed_ptr, absmax_ptr, code_ptr, offs_m, offs_n, offs_k, M, N, K,
                           stride_xm, BLOCKSIZE)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _nf4_tiled_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """y tile [BLOCK_M, BLOCK_N] = x tile @ dequantized W tile.T, accumulated over K with
    tl.dot (tensor cores in x's dtype; exact fp32 products when IEEE)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w, x = _load_tiles(x_ptr, packed_ptr, absmax_ptr, code_ptr, offs_m, offs_n, offs_k, M, N, K,
                           stride_xm, BLOCKSIZE)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@functools.cache
def _code_on(device: str) -> torch.Tensor:
    return NF4_CODE.to(device)


def matmul_nf4_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                      fused: bool | None = None) -> torch.Tensor:
    """x `[M, K]` (fp32/fp16/bf16) @ W.T -> `[M, N]` in x's dtype. packed: uint8 flat NF4,
    absmax: float32 `[n_blocks]`. `fused` forces a kernel (default: by M)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    packed, absmax = packed.reshape(-1).contiguous(), absmax.float().contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    code = _code_on(str(x.device))
    if fused if fused is not None else m <= FUSED_MAX_M:
        block_m = min(16, triton.next_power_of_2(m))
        block_n, block_k = 32 if block_m <= 2 else 16, 128
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _nf4_fused_kernel[grid](x, packed, absmax, code, y, m, n, k, x.stride(0), y.stride(0),
                                BLOCKSIZE=blocksize, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        block_m, block_n, block_k = 64, 64, 32
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _nf4_tiled_kernel[grid](x, packed, absmax, code, y, m, n, k, x.stride(0), y.stride(0),
                                BLOCKSIZE=blocksize, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                IEEE=x.dtype == torch.float32)
    return y
