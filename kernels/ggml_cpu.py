"""ctypes bindings of the GGUF block kernels (kernels/ggml_cpu.c, built as
`longside.kernels._ggml_cpu`), loaded once per process on first use.

`LONGSIDE_GGML_ISA=scalar|avx2|vnni|avx512` caps the instruction set (tests run every path the
machine has); by default the best one is used. `LONGSIDE_DECODE=torch` sends decode steps
through the torch loops instead of the one-call C steps (`llama_decode_step`,
`side_decode_layers`): the baseline `bench generate` compares them with.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from longside.errors import LongsideError
from longside.kernels.clib import BUILD_HINT, load_library
from longside.kernels.ggml import GGMLWeight, type_info

INT8_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # types with an int8-activation dot product
_TILE_BYTES = 4 << 20  # fp32 weight rows decoded at a time on the GEMM path


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library("_ggml_cpu")
    if lib is None:
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ggml_cpu_features.restype = cint
    lib.ggml_cpu_features.argtypes = []
    lib.ggml_dequant_rows.restype = None
    lib.ggml_dequant_rows.argtypes = [cint, ptr, i64, ptr, i64, i64, i64, cint]
    lib.ggml_gemv_f32.restype = None
    lib.ggml_gemv_f32.argtypes = [cint, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, cint, cint]
    lib.ggml_gemv_int8.restype = None
    lib.ggml_gemv_int8.argtypes = [cint, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, cint, cint]
    lib.ggml_quantize_x.restype = None
    lib.ggml_quantize_x.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, cint]
    lib.llama_decode_step.restype = cint
    lib.llama_decode_step.argtypes = [i64] * 7 + [ptr, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_float, ctypes.c_float,
                                                  i64, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                                  ptr, i64, ptr, ptr, ptr, cint, cint]
    lib.side_decode_layers.restype = cint
    lib.side_decode_layers.argtypes = [i64] * 8 + [ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_float, cint,
                                                  cint, ptr, ctypes.c_float, ptr, ctypes.c_float, ptr, ptr, cint, cint]
    lib.memory_read_step.restype = cint
    lib.memory_read_step.argtypes = [i64] * 6 + [ptr] * 8 + [i64, i64, ptr, i64, ptr, ptr, ctypes.c_float, ptr, cint,
                                                           cint]
    lib.logit_stats.restype = None
    lib.logit_stats.argtypes = [ptr, i64, i64, i64, ptr, cint, cint]
    lib.argmax_rows.restype = None
    lib.argmax_rows.argtypes = [ptr, i64, i64, i64, ptr, cint]
    lib.token_cache_mix.restype = cint
    lib.token_cache_mix.argtypes = [i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, cint, cint, cint, cint]
    return lib


def available() -> bool:
    """True when the compiled library is present."""
    return _lib() is not None


@functools.cache
def _isa_level() -> int:
    feats = _lib().ggml_cpu_features()
    has = [True, bool(feats & 1), feats & 3 == 3, bool(feats & 1 and feats & 4)]  # bit 4: AVX-512 VNNI
    cap = {"scalar": 0, "avx2": 1, "vnni": 2, "avx512": 3}.get(os.environ.get("LONGSIDE_GGML_ISA", "avx512"), 3)
    return max(level for level in range(cap + 1) if has[level])


def isa() -> str:
    """The instruction set the int8 kernels use here: "avx512" (AVX-512 VNNI, two blocks per
    instruction), "vnni" (AVX2 + AVX-VNNI), "avx2" or "scalar"."""
    return ("scalar", "avx2", "vnni", "avx512")[_isa_level()]


def decode_in_c() -> bool:
    """True when decode steps may run in C: the library is built and `LONGSIDE_DECODE` is not "torch"."""
    return os.environ.get("LONGSIDE_DECODE", "c") != "torch" and available()


# a type id with this bit: the blocks are in the lanes layout (kernels/ggml.py pack_lanes)
LANES_PACKED = 0x100


def _tid(w: GGMLWeight) -> int:
    return type_info(w.qtype)[0] | (LANES_PACKED if w.packed else 0)


def dequantize_rows(w: GGMLWeight, n0: int = 0, n1: int | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `[n0, n1)` of `w` as float32 `[n1-n0, K]`, bit-identical to the gguf package."""
    n1 = w.shape[0] if n1 is None else n1
    k = w.shape[1]
    if out is None:
        out = torch.empty(n1 - n0, k, dtype=torch.float32)
    blocks = w.blocks if w.blocks.is_contiguous() else w.blocks.contiguous()
    _lib().ggml_dequant_rows(_tid(w), blocks.data_ptr(), w.row_bytes, out.data_ptr(), n0, n1, k,
                             torch.get_num_threads())
    return out


def gemv_f32(x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """float32 x `[M, K]` (unit stride in K) @ W.T -> `[M, N]`, weights decoded exactly."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _lib().ggml_gemv_f32(_tid(w), w.blocks.data_ptr(), w.row_bytes, x.data_ptr(), x.stride(0), m,
                         y.data_ptr(), n, n, k, torch.get_num_threads(), int(_isa_level() > 0))
    return y


def gemv_int8(x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """float32 x `[M, K]` (unit stride in K) @ W.T -> `[M, N]` with x quantized to int8 per
    block of 32 (as llama.cpp does for its dot products). Types in `INT8_TYPES`."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _lib().ggml_gemv_int8(_tid(w), w.blocks.data_ptr(), w.row_bytes, x.data_ptr(), x.stride(0), m,
                          y.data_ptr(), n, n, k, torch.get_num_threads(), _isa_level())
    return y


# The tables `llama_decode_step` and `side_decode_layers` read (kernels/decode_cpu.c's enums):
# one row of int64 words per block; a product is 4 words (see `product_words`).
DECODE_WORDS = {"attn_norm": 0, "qkv": 1, "o": 5, "ffn_norm": 9, "gate_up": 10, "down": 14, "kbuf": 18, "vbuf": 19,
                "cap": 20}
DECODE_TABLE_WORDS = 21
SIDE_WORDS = {"state": 0, "mix": 1, "block": 2, "attn_norm": 3, "q": 4, "k": 5, "v": 6, "o": 7, "mlp_norm": 8,
              "gate": 9, "up": 10, "down": 11, "kbuf": 12, "vbuf": 13, "cap": 14, "half": 15}


def table_row(layout: dict[str, int], width: int, **words: int | list[int]) -> list[int]:
    """One block's row of a decode table: each named entry (a word, or a product's 4 words)
    at its place in `layout`; entries not given are 0."""
    row = [0] * width
    for name, value in words.items():
        value = value if isinstance(value, list) else [value]
        row[layout[name]:layout[name] + len(value)] = value
    return row


def product_words(w: GGMLWeight, int8: bool) -> list[int]:
    """A product's 4 words in the decode table: blocks pointer, type id, row bytes, int8 flag."""
    return [w.blocks.data_ptr(), _tid(w), w.row_bytes, int(int8)]


def key_mask_bytes(key_mask: torch.Tensor | None, B: int, S: int) -> torch.Tensor | None:
    """A decode step's key mask for its one new token per row, `[B, S]` or `[B, T, S]` bool,
    as the C steps read it: uint8 `[B, S]` contiguous (None stays None). Raises ValueError
    for another shape."""
    if key_mask is None:
        return None
    mask = (key_mask if key_mask.dim() == 2 else key_mask[:, -1]).to(torch.uint8).contiguous()
    if mask.shape != (B, S):
        raise ValueError(f"a key mask for {B} rows of {S} keys, got {tuple(key_mask.shape)}")
    return mask


def llama_decode_step(table: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n: int,
                      key_mask: torch.Tensor | None, eps: float, scaling: float, heads: int, kv_heads: int,
                      ffn: int, mem_layer: int, mem: tuple[torch.Tensor, ...], *, blocks: tuple[int, int] | None = None,
                      resume: bool = False, att: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      kv_pre: torch.Tensor | None = None, rot_m: tuple[torch.Tensor, torch.Tensor] | None = None,
                      qm: torch.Tensor | None = None,
                      memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Every block of a Llama-style backbone for one new token per row, in one call
    (kernels/decode_cpu.c). `table` int64 `[L, DECODE_TABLE_WORDS]` (weights, norms, each
    block's cache buffers `[B, G, cap, D]`); `hidden` float32 `[L+1, B, d]`, row 0 filled,
    the rest written; `cos, sin [B, D]`; `n` cached columns (the new key/value goes to column
    n of every buffer); `key_mask` uint8 `[B, >= n+1]` or None; `mem`: the memory layer's q,
    k, v, attention output `[B, H*D]`, `[B, G*D]`, `[B, G*D]`, `[B, H*D]`, written.

    Backbone memory splits the step (all float32, contiguous): `blocks=(l0, l1)` runs blocks
    [l0, l1) and, where l1 < L, block l1's attention alone into `att [B, H*D]`, `lse [B, H]`
    and its memory query `qm [B, H*D]` (the pre-rotary q rotated by `rot_m`'s cos, sin `[D]`);
    the next call with `resume=True` and l0 = that block blends `memory` in (keys, values
    `[B, H, M, D]`, mask `[B, H, M]` bool: what that query retrieved; None: nothing) and
    finishes the block. `kv_pre [L, B, 2, G*D]`: every run block's pre-rotary k, v, written."""
    L, B, d = table.shape[0], hidden.shape[1], hidden.shape[2]
    D = cos.shape[1]
    l0, l1 = blocks if blocks is not None else (0, L)
    mask_ptr, ldm = (key_mask.data_ptr(), key_mask.stride(0)) if key_mask is not None else (None, 0)
    ptr = (lambda t: None if t is None else t.data_ptr())
    M = memory[0].shape[-2] if memory is not None else 0
    mk, mv, mm = memory if memory is not None else (None, None, None)
    cm, sm = rot_m if rot_m is not None else (None, None)
    rc = _lib().llama_decode_step(L, B, d, heads, kv_heads, D, ffn, table.data_ptr(), hidden.data_ptr(),
                                  cos.data_ptr(), sin.data_ptr(), n, mask_ptr, ldm, eps, scaling, mem_layer,
                                  *(t.data_ptr() for t in mem), l0, l1, int(resume), ptr(att), ptr(lse), ptr(kv_pre),
                                  ptr(cm), ptr(sm), ptr(qm), M, ptr(mk), ptr(mv), ptr(mm), torch.get_num_threads(),
                                  _isa_level())
    if rc == -2:
        raise ValueError(f"llama_decode_step: blocks {l0}..{l1} of {L} (resume={resume}) need att, lse and qm "
                         "(and values and mask with memory keys)")
    if rc:
        raise MemoryError("llama_decode_step: could not allocate its scratch buffers")


def logit_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits `[N, V]` float32 (rows contiguous) -> logsumexp `[N, 1]`, the softmax's entropy
    `[N]` and its largest log-probability `[N]`, float32, in one C call (kernels/decode_cpu.c):
    what `logsumexp`, `-(p * log p).sum()` and `log_softmax(...).max()` give, to float
    rounding, without their vocabulary-wide temporaries."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu" \
            or logits.stride(1) != 1:
        raise ValueError(f"logit_stats needs float32 [N, V] rows on the CPU, got {logits.dtype} {tuple(logits.shape)}")
    N, V = logits.shape
    out = torch.empty(N, 3, dtype=torch.float32)
    _lib().logit_stats(logits.data_ptr(), N, V, logits.stride(0), out.data_ptr(), torch.get_num_threads(),
                       _isa_level())
    return out[:, :1], out[:, 1], out[:, 2]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` of float32 `[N, V]` rows on the CPU (unit stride) in one C call
    (kernels/decode_cpu.c): the same indices (the first of equal maxima, the first NaN), ~10x
    faster than torch's at a vocabulary's width. Raises ValueError for other layouts."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu" \
            or logits.stride(1) != 1 or not logits.shape[1]:
        raise ValueError(f"argmax_rows needs float32 [N, V>0] rows on the CPU, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _lib().argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(),
                       _isa_level())
    return out


def token_cache_mix(logits: torch.Tensor, sims: torch.Tensor, nxt: torch.Tensor, copy_len: torch.Tensor,
                    copy_nxt: torch.Tensor, params: torch.Tensor, spread: bool, copy: bool) -> torch.Tensor:
    """`TokenCacheReader.mix` (nn/token_cache.py) in one C call (kernels/decode_cpu.c): logits
    `[N, V]` float32, sims `[N, k]` float32, nxt `[N, k]`, copy_len and copy_nxt `[N, c]` int64,
    all contiguous on the CPU; `params` float32 `[14]`: log tau, the gate (5), the spread gate
    (2), log copy scale, the copy gate (5) -> the mixed logits `[N, V]` float32 (a new tensor),
    what the torch code gives to float rounding, and the input logits bit for bit in rows
    where memory is silent. Raises ValueError for other layouts."""
    N, V = logits.shape if logits.dim() == 2 else (0, 0)
    k, c = sims.shape[-1], copy_len.shape[-1]
    parts = (logits, sims, nxt, copy_len, copy_nxt, params)
    if logits.dim() != 2 or any(not t.is_contiguous() or t.device.type != "cpu" for t in parts) \
            or logits.dtype != torch.float32 or sims.dtype != torch.float32 or params.dtype != torch.float32 \
            or params.shape != (14,) or sims.shape != (N, k) or nxt.shape != (N, k) or copy_len.shape != (N, c) \
            or copy_nxt.shape != (N, c) or any(t.dtype != torch.int64 for t in (nxt, copy_len, copy_nxt)):
        raise ValueError("token_cache_mix: unexpected shapes, dtypes or layouts")
    out = torch.empty_like(logits)
    rc = _lib().token_cache_mix(N, V, logits.data_ptr(), out.data_ptr(), sims.data_ptr(), nxt.data_ptr(), k,
                                copy_len.data_ptr(), copy_nxt.data_ptr(), c, params.data_ptr(), int(spread),
                                int(copy), torch.get_num_threads(), _isa_level())
    if rc == -2:
        raise ValueError(f"token_cache_mix: a stored next token is outside the {V}-token vocabulary "
                         "(a memory written with another tokenizer?)")
    if rc:
        raise MemoryError("token_cache_mix: could not allocate its scratch buffers")
    return out


def memory_read_step(q: torch.Tensor, qr: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor, kr: torch.Tensor, key_mask: torch.Tensor | None, a_local: torch.Tensor,
                     gate: torch.Tensor | None, scaling: float,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The side network's memory read for one token per row in one C call (kernels/decode_cpu.c):
    q, qr `[B, H, D]` (the query, and rotated at the token's position; qr None: rotated in the
    call by `rotary` = cos, sin `[B, D]`, rotate-half layout), retrieved keys, values
    `[B, H, S, D]` and mask `[B, H, S]` bool, the window's rotated keys `kr [B, G, P1, D]`
    (each position's D contiguous), `key_mask` uint8 `[B, P1]` or None, the layer's local
    attention output `a_local [B, H, D]`, `gate [H]` float32 (gated mode, with `kr` and
    `key_mask` None: nothing local is read) or None (joint) ->
    `delta [B, H, D]` = w (a_mem - a_local), what `MemoryReader` adds before its projections.
    All float32 on the CPU. Raises ValueError for other layouts."""
    B, H, D = q.shape
    if kr is None and gate is None:
        raise ValueError("memory_read_step: the joint mode reads the window's keys `kr`")
    S = keys.shape[2]
    G, P1 = (1, 0) if kr is None else kr.shape[1:3]
    cos, sin = rotary if rotary is not None else (None, None)
    parts = [t for t in (q, keys, values, a_local, gate, qr, cos, sin) if t is not None]
    if (qr is None and rotary is None and gate is None) \
            or any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" for t in parts) \
            or (qr is not None and qr.shape != q.shape) or (qr is None and rotary is not None
                                                            and (cos.shape != (B, D) or sin.shape != (B, D))) \
            or a_local.shape != q.shape or keys.shape != (B, H, S, D) \
            or values.shape != keys.shape or mask.shape != (B, H, S) or mask.dtype != torch.bool \
            or (kr is not None and (kr.dtype != torch.float32 or kr.shape[0] != B or kr.shape[3] != D
                                    or kr.stride(3) != 1 or kr.stride(2) != D)) \
            or H % G or (gate is not None and gate.shape != (H,)) \
            or (key_mask is not None and (key_mask.shape != (B, P1) or key_mask.dtype != torch.uint8
                                          or not key_mask.is_contiguous())):
        raise ValueError("memory_read_step: unexpected shapes, dtypes or layouts")
    mask = mask.contiguous().view(torch.uint8)
    delta = torch.empty_like(q)
    ptr = (lambda t: None if t is None else t.data_ptr())
    rc = _lib().memory_read_step(B, H, G, D, S, P1, q.data_ptr(), ptr(qr), ptr(cos), ptr(sin), keys.data_ptr(),
                                 values.data_ptr(), mask.data_ptr(), None if kr is None else kr.data_ptr(),
                                 0 if kr is None else kr.stride(0), 0 if kr is None else kr.stride(1),
                                 None if key_mask is None else key_mask.data_ptr(), P1, a_local.data_ptr(),
                                 None if gate is None else gate.data_ptr(), scaling, delta.data_ptr(),
                                 torch.get_num_threads(), _isa_level())
    if rc:
        raise MemoryError("memory_read_step: could not allocate its scratch buffers")
    return delta


def side_decode_layers(table: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor, x: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, P: int, key_mask: torch.Tensor | None, eps: float,
                       dims: tuple[int, int, int, int, int], first_mix: bool = True, last_block: bool = True,
                       final: tuple | None = None) -> None:
    """Side-network layers for one new token per row in one call (kernels/decode_cpu.c):
    `table` int64 `[J, len(SIDE_WORDS)]` (rows contiguous), `gates` float32 `[J]` (sigmoid of
    each layer's mix gate), `keep` int64 `[s]` (the kept backbone dimensions), `x` float32
    `[B, s]` updated in place, `cos, sin [B, Dh]`, `P` cached positions, `key_mask` uint8
    `[B, >= P+1]` or None, `dims` = (d, H, G, Dh, ffn). `first_mix=False` skips the first
    layer's mixing, `last_block=False` the last layer's block. `final` = (norm weight `[s]`,
    its eps, up `[d, s]`, gate value, last `[B, d]`, out `[B, d]`): each row then ends with
    out = last + gate * up(norm(x)) (the side network's output)."""
    J, (B, s_) = table.shape[0], x.shape
    d, H, G, Dh, F = dims
    mask_ptr, ldm = (key_mask.data_ptr(), key_mask.stride(0)) if key_mask is not None else (None, 0)
    norm, final_eps, up, gate, last, out = (None, 0.0, None, 0.0, None, None) if final is None else final
    ptr = (lambda t: None if t is None else t.data_ptr())
    rc = _lib().side_decode_layers(J, B, d, s_, H, G, Dh, F, table.data_ptr(), gates.data_ptr(), keep.data_ptr(),
                                   x.data_ptr(), cos.data_ptr(), sin.data_ptr(), P, mask_ptr, ldm, eps,
                                   int(first_mix), int(last_block), ptr(norm), final_eps, ptr(up), gate, ptr(last),
                                   ptr(out), torch.get_num_threads(), _isa_level())
    if rc:
        raise MemoryError("side_decode_layers: could not allocate its scratch buffers")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 activations `gemv_int8` multiplies with: float32 x `[M, K]` (K a multiple of
    32) -> codes int8 `[M, K]`, scales float32 `[M, K/32]` and scale * code sums `[M, K/32]`."""
    m, k = x.shape
    if k % 32 or not available():
        raise LongsideError(f"quantize_int8 needs the compiled kernels and K a multiple of 32, got K={k} "
                            f"({'built' if available() else BUILD_HINT})")
    x = x.float().contiguous()
    nb = k // 32
    q = torch.empty(m, k, dtype=torch.int8)
    d, s = torch.empty(m, nb, dtype=torch.float32), torch.empty(m, nb, dtype=torch.float32)
    _lib().ggml_quantize_x(x.data_ptr(), k, m, k, q.data_ptr(), d.data_ptr(), s.data_ptr(), nb, _isa_level())
    return q, d, s


def gemm_tiled(x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """Decode cache-sized tiles of weight rows exactly, one BLAS GEMM per tile: x `[M, K]`
    -> `[M, N]`. The path for large M (prefill), where the GEMM dominates."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rows = max(1, min(n, _TILE_BYTES // (4 * k)))
    tile = torch.empty(rows, k, dtype=torch.float32)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        torch.mm(x, dequantize_rows(w, n0, n1, out=tile[: n1 - n0]).t(), out=y[:, n0:n1])
    return y
