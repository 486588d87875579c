"""ctypes bindings of the decode-step memory searches (memory_bank/search_cpu.c, built as
`longside.memory_bank._search_cpu`), loaded once per process on first use.

A decode step asks each user's memory one query token; torch answers it with a dozen small
operations per search, whose dispatch costs more than the scan itself. These run a whole
search in one call (a scan in blocks that stay in L1, a heap for the top-k, both threads on
the larger scans). Callers keep torch's path for
many queries at once (a segment, a prompt), where one large product is faster, and where
the library was not built.

`LONGSIDE_SEARCH_ISA=scalar` runs the plain C path (tests run both), `off` torch's path; by
default AVX2 is used where the CPU has it, and torch's path where it does not.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import torch

from longside.paths import compiled_library


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = compiled_library(Path(__file__).resolve().parent, "_search_cpu")
    if lib is None:
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.search_cpu_features.restype = cint
    lib.search_cpu_features.argtypes = []
    lib.search_chunks_f16.restype = None
    lib.search_chunks_f16.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, cint, cint]
    lib.search_tokens_bf16.restype = None
    lib.search_tokens_bf16.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, ptr, ptr, cint, cint]
    lib.token_search_step.restype = cint
    lib.token_search_step.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, cint, cint]
    lib.read_chunks_f16.restype = None
    lib.read_chunks_f16.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr,
                                    cint, cint]
    lib.match_last.restype = None
    lib.match_last.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr]
    return lib


def available() -> bool:
    """True when the compiled library is present."""
    return _lib() is not None


@functools.cache
def _vector_isa() -> bool:
    return bool(_lib().search_cpu_features())


def _isa() -> int:
    """1: the AVX2 path; 0: plain C (no AVX2 here, or LONGSIDE_SEARCH_ISA=scalar)."""
    return int(os.environ.get("LONGSIDE_SEARCH_ISA") != "scalar" and _vector_isa())


def fast() -> bool:
    """Whether searches of one query token take the one-call path: the library is built and
    runs its vector path here (the plain C path is slower than torch: it is there for tests),
    or `LONGSIDE_SEARCH_ISA=scalar` asks for it; `LONGSIDE_SEARCH_ISA=off` keeps torch's path."""
    mode = os.environ.get("LONGSIDE_SEARCH_ISA")
    if mode == "off" or _lib() is None:
        return False
    return mode == "scalar" or _vector_isa()


def int8_in_c() -> bool:
    """Whether a decode step's token search over int8 projections takes the one C call: the
    library is built and `LONGSIDE_SEARCH_ISA` is not "off". Unlike the bfloat16 scans, the
    plain C path is used where the CPU has no AVX2 too: its integer sums vectorize as they are
    (torch would widen the whole int8 projection to float32 for each query)."""
    return os.environ.get("LONGSIDE_SEARCH_ISA") != "off" and _lib() is not None


def isa() -> str:
    """The instruction set the searches use here: "avx2" or "scalar"."""
    return ("scalar", "avx2")[_isa()]


def search_chunks(q: torch.Tensor, keys: torch.Tensor, used: int, k: int, sentinel: int,
                  freed: np.ndarray | None = None) -> torch.Tensor:
    """The `k` best of the first `used` chunk slots per (head, query) by q . key, best first.

    q `[H, Tq, D]` float32; keys `[H, slots, D]` float16 (rows of D contiguous, slots >=
    used); freed: slot indices below `used` never returned. -> `[H, Tq, k]` int64 slots,
    `sentinel` where fewer than k exist (or were all -inf)."""
    H, Tq, D = q.shape
    q = q.float().contiguous()
    if keys.dtype != torch.float16 or keys.dim() != 3 or keys.shape[0] != H or keys.shape[2] != D \
            or keys.stride(2) != 1 or keys.stride(1) != D:
        raise ValueError(f"search_chunks needs float16 keys [{H}, slots, {D}] with contiguous rows, got "
                         f"{keys.dtype} {tuple(keys.shape)} strides {keys.stride()}")
    if not 1 <= used <= keys.shape[1] or k < 1 or q.device.type != "cpu" or keys.device.type != "cpu":
        raise ValueError(f"search_chunks needs CPU tensors, 1 <= used <= {keys.shape[1]} slots and k >= 1, "
                         f"got used={used}, k={k}")
    skip = None
    if freed is not None and len(freed):
        skip = np.zeros(used, dtype=np.uint8)
        skip[freed] = 1
    out = torch.empty(H, Tq, k, dtype=torch.int64)
    _lib().search_chunks_f16(q.data_ptr(), H, Tq, D, keys.data_ptr(), keys.stride(0), used,
                             None if skip is None else skip.ctypes.data, k, sentinel, out.data_ptr(),
                             torch.get_num_threads(), _isa())
    return out


def read_chunks(slots: torch.Tensor, T: int, keys: torch.Tensor, values: torch.Tensor, fill: torch.Tensor,
                hits: torch.Tensor | None, counted: torch.Tensor | None, keys_out: torch.Tensor,
                values_out: torch.Tensor, mask_out: torch.Tensor) -> None:
    """What MemoryBank.search returns for `slots [H, T*g, k]` (from `search_chunks`), written
    into keys_out, values_out `[T, H*g, k*S, D]` float32 and mask_out `[T, H*g, k*S]` bool,
    from the bank's keys, values `[H, C+1, S, D]` float16 and fill `[C+1]` uint8; adds one to
    `hits [C+1]` int32 for each real slot a counted token (`counted [T]` bool, None: all)
    retrieved."""
    H, Tg, k = slots.shape
    _, C1, S, D = keys.shape
    if keys_out.shape != (T, H * (Tg // T), k * S, D) or mask_out.shape != keys_out.shape[:3] \
            or values_out.shape != keys_out.shape or values.shape != keys.shape or Tg % T:
        raise ValueError(f"read_chunks: outputs must be [T, H*g, k*S, D] = {(T, H * (Tg // T), k * S, D)}, got "
                         f"{tuple(keys_out.shape)}")
    for t, dtype in ((keys, torch.float16), (values, torch.float16), (fill, torch.uint8), (keys_out, torch.float32),
                     (values_out, torch.float32), (mask_out, torch.bool)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"read_chunks needs contiguous {dtype} tensors, got {t.dtype}")
    if hits is not None and (hits.dtype != torch.int32 or not hits.is_contiguous()):
        raise ValueError("read_chunks counts hits in a contiguous int32 tensor")
    slots = slots.contiguous()
    counted = None if counted is None else counted.to(torch.uint8).contiguous()
    _lib().read_chunks_f16(slots.data_ptr(), H, T, Tg // T, k, S, D, keys.data_ptr(), values.data_ptr(),
                           fill.data_ptr(), C1 - 1, None if hits is None else hits.data_ptr(),
                           None if counted is None else counted.data_ptr(), keys_out.data_ptr(),
                           values_out.data_ptr(), mask_out.data_ptr(), torch.get_num_threads(), _isa())


def search_tokens(q: torch.Tensor, keys: torch.Tensor, qs: torch.Tensor, rows: torch.Tensor, shortlist: int,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenMemory's search before its projection exists, in one call: unit queries q
    `[T, dim]` float32 against keys `[N, dim]` bfloat16 -> exact cosines `[T, k]` float32 and
    key indices `[T, k]` int64, best first, the k best of the `shortlist` (k <= shortlist <=
    N) best by the bfloat16 product of `qs [T, s]` bfloat16 (the queries rounded) with `rows
    [>= N, s]` bfloat16 (the keys themselves). Equal scores: the lower index. (With the
    projection, `token_search_step`.)"""
    T, dim = q.shape
    N, s = keys.shape[0], qs.shape[1]
    if keys.dtype != torch.bfloat16 or rows.dtype != torch.bfloat16 or not keys.is_contiguous() \
            or not rows.is_contiguous() or rows.shape[0] < N or rows.shape[1] != s or not 1 <= k <= shortlist <= N \
            or keys.shape[1] != dim or qs.shape[0] != T or any(t.device.type != "cpu" for t in (q, keys, qs, rows)):
        raise ValueError(f"search_tokens needs CPU tensors, q [T, dim], contiguous bfloat16 keys [N, dim] and "
                         f"rows [>= N, {s}], qs [T, {s}], 1 <= k <= shortlist <= N, got {keys.dtype}/{rows.dtype}, k={k}, shortlist={shortlist}, N={N}")
    q = q.float().contiguous()
    qs = qs.float().contiguous()
    sims = torch.empty(T, k, dtype=torch.float32)
    index = torch.empty(T, k, dtype=torch.int64)
    _lib().search_tokens_bf16(q.data_ptr(), T, dim, qs.data_ptr(), rows.data_ptr(), s, keys.data_ptr(), N,
                              shortlist, k, sims.data_ptr(), index.data_ptr(), torch.get_num_threads(), _isa())
    return sims, index


def token_search_step(query: torch.Tensor, keys: torch.Tensor, basis: torch.Tensor, rows: torch.Tensor,
                      scale: torch.Tensor, next_ids: torch.Tensor, shortlist: int,
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenMemory's search of one decode step's raw query `[dim]` in one call: normalized
    (as torch's `normalize`) and projected onto `basis [dim, s]` float32 in the call; the
    `shortlist` best by the projection against int8 `rows [>= N, s]` times their `scale
    [>= N]` float32 (the projected query rounded to int16 with one scale, its largest
    magnitude / 32767: exact integer sums), rescored exactly against keys `[N, dim]`
    bfloat16 -> the k best cosines `[1, k]` float32 and their stored next tokens
    `next_ids[index]` `[1, k]` int64 (`next_ids [>= N]` int64; 0 past those found). Equal
    scores: the lower index."""
    dim, s = basis.shape
    N = keys.shape[0]
    if query.shape != (dim,) or keys.dtype != torch.bfloat16 or not keys.is_contiguous() or keys.shape[1] != dim \
            or basis.dtype != torch.float32 or not basis.is_contiguous() or rows.dtype != torch.int8 \
            or not rows.is_contiguous() or rows.shape[0] < N or rows.shape[1] != s or scale.dtype != torch.float32 \
            or not scale.is_contiguous() or scale.shape[0] < N or next_ids.dtype != torch.int64 \
            or not next_ids.is_contiguous() or next_ids.shape[0] < N or not 1 <= k <= shortlist <= N \
            or any(t.device.type != "cpu" for t in (query, keys, basis, rows, scale, next_ids)):
        raise ValueError("token_search_step: unexpected shapes, dtypes or layouts")
    q = query.float().contiguous()
    sims = torch.empty(1, k, dtype=torch.float32)
    nxt = torch.empty(1, k, dtype=torch.int64)
    rc = _lib().token_search_step(q.data_ptr(), dim, basis.data_ptr(), s, rows.data_ptr(), scale.data_ptr(),
                                  keys.data_ptr(), N, shortlist, k, next_ids.data_ptr(), sims.data_ptr(),
                                  nxt.data_ptr(), torch.get_num_threads(), _isa())
    if rc:
        raise MemoryError("token_search_step: could not allocate its scratch buffers")
    return sims, nxt


def match_last(text: torch.Tensor, context: torch.Tensor, orders: dict, next_ids: torch.Tensor, k: int,
               max_match: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenMemory.match for the last position of `context` alone (a decode step), from the
    memory's match index (`TokenMemory._index`): text `[M + 1]`, orders {n: (sorted hashes,
    positions)} and next ids `[M]`, all int64 -> lens and next ids `[1, k]` int64."""
    ns = sorted(orders, reverse=True)
    arrays = [(orders[n][0].contiguous(), orders[n][1].contiguous()) for n in ns]
    text, next_ids = text.contiguous(), next_ids.contiguous()
    context = context.to(text.device, torch.int64).contiguous()  # the memory's (CPU) device, as the text
    # every buffer the call reads is named here, so none is freed before it returns
    order_n = np.array(ns or [0], dtype=np.int64)
    lengths = np.array([v.shape[0] for v, _ in arrays] or [0], dtype=np.int64)
    ptrs = ctypes.c_void_p * max(len(ns), 1)
    vals, positions = ptrs(*[v.data_ptr() for v, _ in arrays]), ptrs(*[p.data_ptr() for _, p in arrays])
    lens = torch.empty(1, k, dtype=torch.int64)
    follow = torch.empty(1, k, dtype=torch.int64)
    _lib().match_last(text.data_ptr(), text.shape[0], context.data_ptr(), context.shape[0], len(ns),
                      order_n.ctypes.data, vals, positions, lengths.ctypes.data, next_ids.data_ptr(), k, max_match,
                      lens.data_ptr(), follow.data_ptr())
    return lens, follow
