"""Triton kernels for x @ W.T with W in a ggml block format, kept in the file's own bytes.

Formats and the bit-exact torch reference are in kernels/ggml.py. A weight `[N, K]` is
uint8 `[N, row_bytes]`, row n holding K / block_elems blocks of block_bytes each. Element
(n, k) of a tile lies in block b = k // block_elems at byte n*row_bytes + b*block_bytes,
offset j = k % block_elems inside it; the kernel gathers its quant bits and its block's
scales byte by byte (f16 scales as two little-endian bytes -> uint16 -> float16 ->
float32) and decodes with the same fp32 operations in the same order as
`ggml.dequantize_blocks`, so the decoded weights are bit-identical to the reference.
(Every product in a decode is exact in fp32: an f16 scale's 11 significant bits times
integers of at most 6+4, 7+5 or 8 bits. Only Q4_1's add and Q4_K's subtract round, once,
so a compiler contracting them into an fma cannot change a decoded value either.)

One @triton.jit function serves both paths, specialised by constexprs: QTYPE (the ggml
type id) picks the decode code, FUSED picks a broadcast multiply-sum over a few rows of x
(M <= FUSED_MAX_M, where tensor cores do not pay off) or a tiled `tl.dot` (IEEE fp32
products when x is fp32). Keeping the decode in one body, rather than in a nested
@triton.jit helper, avoids repeating it and the interpreter's failure to call nested
helpers when triton was imported before TRITON_INTERPRET was set (see nf4_triton.py).

The suite runs this on CPU tensors under `TRITON_INTERPRET=1` (set before this module is
imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from longside.kernels.ggml import type_info

from longside.errors import LongsideError

# Up to this many rows of x the fused kernel runs (weights are read once per BLOCK_M rows).
FUSED_MAX_M = 16


@triton.jit
def _ggml_matmul_kernel(x_ptr, w_ptr, y_ptr, M, N, K, row_bytes, stride_xm, stride_ym,
                        QTYPE: tl.constexpr, BLOCK_ELEMS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FUSED: tl.constexpr, IEEE: tl.constexpr):
    """y tile `[BLOCK_M, BLOCK_N]` = x tile @ decoded W tile.T, fp32 accumulation over K."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        wm = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        # byte address of each element's block, and the element's offset j inside it
        base = offs_n[:, None].to(tl.int64) * row_bytes + (offs_k[None, :] // BLOCK_ELEMS) * BLOCK_BYTES
        j = offs_k[None, :] % BLOCK_ELEMS
        if QTYPE == 14:  # Q6_K: ql[128], qh[64], scales int8[16], d f16 at byte 208
            lo_b = tl.load(w_ptr + base + 208, mask=wm, other=0).to(tl.uint16)
            hi_b = tl.load(w_ptr + base + 209, mask=wm, other=0).to(tl.uint16)
        else:  # every other format starts with d f16
            lo_b = tl.load(w_ptr + base, mask=wm, other=0).to(tl.uint16)
            hi_b = tl.load(w_ptr + base + 1, mask=wm, other=0).to(tl.uint16)
        d = (lo_b | (hi_b << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        if QTYPE == 2:  # Q4_0: qs[16] at 2; j < 16 the low nibble of qs[j], else high of qs[j-16]
            byte = tl.load(w_ptr + base + 2 + j % 16, mask=wm, other=0).to(tl.int32)
            q = tl.where(j < 16, byte & 0xF, byte >> 4) - 8
            w = d * q.to(tl.float32)
        elif QTYPE == 3:  # Q4_1: m f16 at 2, qs[16] at 4; d*q + m (a multiply, then an add)
            lo_b = tl.load(w_ptr + base + 2, mask=wm, other=0).to(tl.uint16)
            hi_b = tl.load(w_ptr + base + 3, mask=wm, other=0).to(tl.uint16)
            mn = (lo_b | (hi_b << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            byte = tl.load(w_ptr + base + 4 + j % 16, mask=wm, other=0).to(tl.int32)
            q = tl.where(j < 16, byte & 0xF, byte >> 4)
            w = d * q.to(tl.float32) + mn
        elif QTYPE == 6:  # Q5_0: qh u32 LE at 2, qs[16] at 6; nibble as Q4_0, fifth bit (qh >> j) & 1
            byte = tl.load(w_ptr + base + 6 + j % 16, mask=wm, other=0).to(tl.int32)
            hb = tl.load(w_ptr + base + 2 + j // 8, mask=wm, other=0).to(tl.int32)  # byte of qh bit j
            q = (tl.where(j < 16, byte & 0xF, byte >> 4) | (((hb >> (j % 8)) & 1) << 4)) - 16
            w = d * q.to(tl.float32)
        elif QTYPE == 8:  # Q8_0: qs int8[32] at 2; q*d
            q = tl.load(w_ptr + base + 2 + j, mask=wm, other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32) * d
        elif QTYPE == 12:  # Q4_K: dmin f16 at 2, scales[12] at 4, qs[128] at 16
            lo_b = tl.load(w_ptr + base + 2, mask=wm, other=0).to(tl.uint16)
            hi_b = tl.load(w_ptr + base + 3, mask=wm, other=0).to(tl.uint16)
            dmin = (lo_b | (hi_b << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            s = j // 32  # sub-block of 32 elements, 0..7
            # six-bit scale/min of sub-block s: s < 4 in the low bits of bytes s and s+4;
            # s >= 4 split between the nibbles of byte s+4 and the top bits of bytes s-4 and s
            b_lo = tl.load(w_ptr + base + 4 + s % 4, mask=wm, other=0).to(tl.int32)      # byte s or s-4
            b_mid = tl.load(w_ptr + base + 8 + s % 4, mask=wm, other=0).to(tl.int32)     # byte s+4 or s
            b_hi = tl.load(w_ptr + base + 12 + s % 4, mask=wm, other=0).to(tl.int32)     # byte s+4 (s >= 4)
            sc = tl.where(s < 4, b_lo & 0x3F, (b_hi & 0x0F) | ((b_lo >> 2) & 0x30))
            mi = tl.where(s < 4, b_mid & 0x3F, (b_hi >> 4) | ((b_mid >> 2) & 0x30))
            # qs: per 32 bytes, 32 low nibbles then 32 high nibbles
            byte = tl.load(w_ptr + base + 16 + (j // 64) * 32 + j % 32, mask=wm, other=0).to(tl.int32)
            q = tl.where(s % 2 == 0, byte & 0xF, byte >> 4)
            w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mi.to(tl.float32)
        else:  # Q6_K, halves of 128 elements h: ql[64h + r%64] (low nibble for r < 64, else high)
            h = j // 128  # plus two bits of qh[32h + r%32] at shift 2*(r//32); scale j//16
            r = j % 128
            ql = tl.load(w_ptr + base + h * 64 + r % 64, mask=wm, other=0).to(tl.int32)
            qh = tl.load(w_ptr + base + 128 + h * 32 + r % 32, mask=wm, other=0).to(tl.int32)
            q = (tl.where(r < 64, ql & 0xF, ql >> 4) | (((qh >> (2 * (r // 32))) & 3) << 4)) - 32
            scale = tl.load(w_ptr + base + 192 + j // 16, mask=wm, other=0).to(tl.int8, bitcast=True)
            w = (d * scale.to(tl.float32)) * q.to(tl.float32)
        xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=xm, other=0.0)
        if FUSED:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    ym = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


def matmul_ggml_triton(x: torch.Tensor, blocks: torch.Tensor, qtype: str, n: int, k: int,
                       fused: bool | None = None) -> torch.Tensor:
    """x `[M, K]` (fp32/fp16/bf16) @ W.T -> `[M, N]` in x's dtype, W `[N, K]` given by its
    ggml blocks: uint8 `[N, row_bytes]` (`GGMLWeight.blocks`) of type `qtype`. `fused`
    forces a kernel (default: the fused one for M <= FUSED_MAX_M)."""
    type_id, elems, nbytes = type_info(qtype)
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or k % elems:
        raise LongsideError(f"x {tuple(x.shape)} against a {qtype} weight [{n}, {k}] (K a multiple of {elems})")
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, k // elems * nbytes):
        raise LongsideError(f"{qtype} blocks {tuple(blocks.shape)} {blocks.dtype} do not hold a [{n}, {k}] weight")
    if x.stride(-1) != 1:
        x = x.contiguous()
    blocks = blocks.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # Tiles from a sweep on an H200 (docs/results.md, "Triton kernels on a GPU"): few rows and long
    # K slices per program for the fused path, where the byte gathers, not bandwidth, bound it.
    if fused if fused is not None else m <= FUSED_MAX_M:
        block_m = min(16, triton.next_power_of_2(m))
        block_n, block_k, warps, is_fused = 4, 512, 2, True
    else:
        block_m, block_n, block_k, warps, is_fused = 128, 128, 32, 4, False
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _ggml_matmul_kernel[grid](x, blocks, y, m, n, k, blocks.shape[1], x.stride(0), y.stride(0),
                              QTYPE=type_id, BLOCK_ELEMS=elems, BLOCK_BYTES=nbytes, BLOCK_M=block_m,
                              BLOCK_N=block_n, BLOCK_K=block_k, FUSED=is_fused,
                              IEEE=x.dtype == torch.float32, num_warps=warps)
    return y
