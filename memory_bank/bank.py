"""`MemoryBank`: the cached keys/values of one sequence, searchable by chunk.

Layout. Tokens are grouped in chunks of `chunk_size`; every chunk lives in a fixed slot
of preallocated tensors (nothing grows or moves after construction):

    keys, values  [H_kv, C + 1, chunk_size, D]  `dtype`   the tokens themselves
    chunk_keys    [H_kv, C + 1, D]              `dtype`   what search compares against
    fill          [C + 1] uint8                           tokens present in the chunk
    hits          [C] int32                               times the chunk was retrieved

where C = capacity in chunks. Slot C is a sentinel of zeros that masked results point
at, so a missing result gathers zeros without a second pass. Unfilled token rows of a
partial chunk are zero too.

Search. "flat" is exact: a float32 matmul of the queries against the chunk keys of the
slots in use, then `topk`; for one query token (a decode step) on CPU with float16 keys,
one C call that does the same (search_cpu.py; equal scores go to the lower slot). On the
2-core dev CPU the matmul beat faiss's IndexFlatIP for the ~3k queries per head a segment
brings (285 vs 353 ms per head at 16k chunks, same run), and the same code runs on a CUDA
device, where it is the GPU path.
"ivf" and "hnsw" use faiss IVF indexes (see ivf.py) once enough chunks exist to train
them, then rerank `rerank * k` candidates exactly against `chunk_keys`; before training
they search exactly like "flat".

The partial last chunk. A demanding user expects the newest tokens to be retrievable,
so a partial chunk is searchable at once: its chunk key is the mean of the tokens it has
so far and is refreshed as it fills; its missing tokens are masked. (The side network
writes a segment after reading, so a segment never retrieves itself.)

Eviction. Past capacity, chunks leave as the eviction policy says (eviction.py), at a
cost that grows with the chunks evicted, never with the bank.

Concurrency. One lock serialises every public method: a search that runs while another
thread adds sees the bank entirely before or entirely after that add (each call is
atomic), never a half-written chunk. Searches do not run in parallel with each other
(they use all cores already).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longside.errors import MemoryBankError

from . import pages, search_cpu
from .eviction import EvictionPolicy, SlotQueue, make_policy
from .ivf import IVFIndexes
from .persist import load_bank, save_bank
from .token_memory import TokenMemory

INDEXES = ("flat", "ivf", "hnsw")
CHUNK_KEYS = ("mean", "last")
_SCORE_BUDGET = 1 << 24  # floats of scores materialised at once (64 MiB)


class MemoryBank:
    """Chunked key/value memory of one sequence with top-k chunk retrieval.

    Args:
        num_kv_heads, head_dim: shape of the keys/values written (`[T, H_kv, D]`).
        chunk_size: tokens per chunk (LongMem: 4).
        capacity_tokens: tokens kept; rounded up to whole chunks.
        index: "flat" (exact), "ivf" or "hnsw" (faiss IVF with a flat or HNSW coarse
            quantizer, for large banks).
        dtype: storage dtype of keys/values/chunk keys.
        device: where the tensors live and search computes ("cpu" or "cuda").
        chunk_key: "mean" of the chunk's keys (LongMem) or the "last" token's key.
        eviction: "fifo", "keep-most-retrieved" or an EvictionPolicy.
        owner: identifier of the backbone and layer that writes the keys, e.g.
            "smollm2-135m:<sha>:layer15"; `load(expect_owner=...)` checks it.
        nlist, nprobe, ef_search, ivf_codes, rerank, train_min_chunks: IVF settings
            (defaults scale with capacity; see ivf.py).
        token_dim, token_layer: when set, the bank also keeps a `TokenMemory` of
            (hidden state of width token_dim at backbone depth token_layer, next token)
            pairs of the same text, with the same capacity in tokens (`add(...,
            token_keys=, token_ids=)`, `search_tokens`).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, chunk_size: int = 4,
                 capacity_tokens: int = 65536, index: str = "flat",
                 dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                 chunk_key: str = "mean", eviction: str | EvictionPolicy = "fifo",
                 owner: str | None = None, *, nlist: int | None = None, nprobe: int | None = None,
                 ef_search: int = 64, ivf_codes: str = "sq8", rerank: int = 2,
                 train_min_chunks: int | None = None, token_dim: int | None = None,
                 token_layer: int | None = None):
        if num_kv_heads < 1 or head_dim < 1:
            raise MemoryBankError(f"num_kv_heads and head_dim must be >= 1, got {num_kv_heads}, {head_dim}")
        if not 1 <= chunk_size <= 255:
            raise MemoryBankError(f"chunk_size must be in [1, 255], got {chunk_size}")
        if capacity_tokens < chunk_size:
            raise MemoryBankError(f"capacity_tokens ({capacity_tokens}) must hold at least one chunk ({chunk_size})")
        if index not in INDEXES:
            raise MemoryBankError(f"unknown index {index!r}; use one of {INDEXES}")
        if chunk_key not in CHUNK_KEYS:
            raise MemoryBankError(f"unknown chunk_key {chunk_key!r}; use one of {CHUNK_KEYS}")
        if not dtype.is_floating_point:
            raise MemoryBankError(f"dtype must be a float dtype, got {dtype}")
        if rerank < 1:
            raise MemoryBankError(f"rerank must be >= 1, got {rerank}")
        self.num_kv_heads, self.head_dim, self.chunk_size = num_kv_heads, head_dim, chunk_size
        self.capacity_chunks = math.ceil(capacity_tokens / chunk_size)
        self.capacity_tokens = self.capacity_chunks * chunk_size
        self.index, self.dtype, self.device = index, dtype, torch.device(device)
        self.chunk_key, self.owner, self.rerank = chunk_key, owner, rerank
        self.policy = make_policy(eviction)
        self._lock = threading.Lock()

        H, C, S, D = num_kv_heads, self.capacity_chunks, chunk_size, head_dim
        # empty buffers leave pages untouched until written: an empty 1M-token bank costs no
        # memory; slots are zeroed as they are allocated. On the CPU they ask for 2 MB pages
        # (pages.py): a decode step scans the chunk keys with fewer TLB misses.
        self._keys = pages.empty((H, C + 1, S, D), dtype, self.device)
        self._values = pages.empty((H, C + 1, S, D), dtype, self.device)
        self._chunk_keys = pages.empty((H, C + 1, D), dtype, self.device)
        self._fill = torch.zeros(C + 1, dtype=torch.uint8, device=self.device)
        self._hits = torch.zeros(C + 1, dtype=torch.int32, device=self.device)
        self._keys[:, C] = 0
        self._values[:, C] = 0
        self._chunk_keys[:, C] = 0
        self._queue = SlotQueue(C)  # occupied slots, oldest first
        self._free = np.zeros(C, dtype=np.int64)  # stack of freed slots below _used
        self._nfree = 0
        self._used = 0  # slots [0, _used) have been allocated at least once
        self._partial = -1  # slot of the partial last chunk, or -1
        self._tokens = 0
        self._evicted_chunks = 0
        self._dropped_tokens = 0

        self.token_layer = token_layer
        self.tokens = TokenMemory(token_dim, self.capacity_tokens, device=self.device) if token_dim else None

        self._ivf: IVFIndexes | None = None
        self.train_min_chunks = 0
        if index != "flat":
            nlist = nlist or max(1, min(4096, int(4 * math.sqrt(C))))
            self._ivf = IVFIndexes(H, D, nlist, codes=ivf_codes,
                                   quantizer="hnsw" if index == "hnsw" else "flat",
                                   nprobe=nprobe or max(1, nlist // 8), ef_search=ef_search)
            # faiss wants ~39 training points per centroid; never wait past capacity
            self.train_min_chunks = min(C, train_min_chunks or 39 * nlist)

    # -- sizes -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Tokens stored (the partial last chunk included)."""
        return self._tokens

    @property
    def num_chunks(self) -> int:
        """Chunks stored (the partial last chunk included)."""
        return len(self._queue)

    @property
    def nprobe(self) -> int | None:
        return self._ivf.nprobe if self._ivf else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._ivf is None:
            raise MemoryBankError("nprobe applies to index='ivf' or 'hnsw', this bank is flat")
        self._ivf.nprobe = value

    @property
    def ef_search(self) -> int | None:
        return self._ivf.ef_search if self._ivf else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self._ivf is None or self._ivf.quantizer != "hnsw":
            raise MemoryBankError("ef_search applies to index='hnsw' only")
        self._ivf.ef_search = value

    # -- writing -----------------------------------------------------------------------
    def add(self, keys: torch.Tensor, values: torch.Tensor, token_keys: torch.Tensor | None = None,
            token_ids: torch.Tensor | None = None, sinks: int = 0) -> None:
        """Append `keys, values [T, H_kv, D]` (any float dtype; stored in `dtype`), and, in a
        bank with a token memory, the same tokens' `token_keys [T, token_dim]` and ids `[T]`.
        The first `sinks` tokens go to the token memory only: attention sinks, whose keys
        would outscore the text in every search.

        Keys are the memory layer's pre-rotary keys. The first tokens top up the partial
        last chunk; the rest form new chunks (the last may be partial). Past capacity the
        eviction policy frees slots; if T alone exceeds capacity, only its newest
        chunks are kept.
        """
        self._check_kv(keys, values)
        if (self.tokens is not None) != (token_keys is not None and token_ids is not None):
            raise MemoryBankError("pass token_keys and token_ids exactly when the bank has a token memory "
                                  f"(token_dim={self.tokens.dim if self.tokens else None})")
        T = keys.shape[0]
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise MemoryBankError(f"sinks must be an int >= 0, got {sinks!r}")
        if T == 0:
            return
        if self.tokens is not None and token_keys.shape[0] != T:
            raise MemoryBankError(f"token_keys hold {token_keys.shape[0]} tokens, keys {T}")
        keys, values = keys[sinks:], values[sinks:]
        T = keys.shape[0]  # the keys written (may be none: a short forward of sinks only)
        S = self.chunk_size
        keys = keys.detach().to(self.device, self.dtype)
        values = values.detach().to(self.device, self.dtype)
        # checked after the cast: a float32 key too large for float16 becomes inf there, and a
        # non-finite key would outscore every other chunk in each search
        if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(values).all())):
            raise MemoryBankError(f"keys/values hold NaN or inf (in {self.dtype} storage); nothing was added. "
                                  "Check the encoder's output, or store float32 keys (dtype=torch.float32)")
        if self.tokens is not None and not bool(torch.isfinite(token_keys).all()):
            raise MemoryBankError("token_keys hold NaN or inf; nothing was added")
        with self._lock:
            if self.tokens is not None:
                self.tokens.add(token_keys, token_ids)
            if T == 0:
                return
            pos = 0
            if self._partial >= 0:
                pos = self._top_up(keys, values)
            rest = T - pos
            if rest == 0:
                return
            n_new = math.ceil(rest / S)
            if n_new > self.capacity_chunks:  # keep the newest, chunk-aligned
                skip = n_new - self.capacity_chunks
                self._dropped_tokens += skip * S
                pos += skip * S
                rest -= skip * S
                n_new = self.capacity_chunks
            short = n_new - (self._nfree + self.capacity_chunks - self._used)
            if short > 0:
                self._evict(short)
            slots = self._allocate(n_new)
            pad = n_new * S - rest
            k = torch.nn.functional.pad(keys[pos:], (0, 0, 0, 0, 0, pad))
            v = torch.nn.functional.pad(values[pos:], (0, 0, 0, 0, 0, pad))
            idx = torch.from_numpy(slots).to(self.device)
            # [n*S, H, D] -> [H, n, S, D]
            self._keys[:, idx] = k.view(n_new, S, *k.shape[1:]).permute(2, 0, 1, 3)
            self._values[:, idx] = v.view(n_new, S, *v.shape[1:]).permute(2, 0, 1, 3)
            fill = torch.full((n_new,), S, dtype=torch.uint8, device=self.device)
            fill[-1] = S - pad
            self._fill[idx] = fill
            self._hits[idx] = 0
            self._chunk_keys[:, idx] = self._compute_chunk_keys(idx)
            self._queue.push(slots)
            self._tokens += rest
            self._partial = int(slots[-1]) if pad else -1
            self._index_add(slots)

    def _top_up(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Write the first tokens into the partial chunk; returns how many it took."""
        p, S = self._partial, self.chunk_size
        have = int(self._fill[p])
        n = min(S - have, keys.shape[0])
        self._keys[:, p, have:have + n] = keys[:n].transpose(0, 1)
        self._values[:, p, have:have + n] = values[:n].transpose(0, 1)
        self._fill[p] = have + n
        idx = torch.tensor([p], device=self.device)
        self._chunk_keys[:, idx] = self._compute_chunk_keys(idx)
        self._tokens += n
        if have + n == S:
            self._partial = -1
        if self._ivf is not None and self._ivf.trained:
            slot = np.array([p], dtype=np.int64)
            self._ivf.remove(slot)
            self._ivf.add(slot, self._chunk_keys_np(slot))
        return n

    def _compute_chunk_keys(self, idx: torch.Tensor) -> torch.Tensor:
        """Search keys of slots `idx [n]` from their stored tokens -> `[H, n, D]` dtype."""
        fill = self._fill[idx].long()
        if self.chunk_key == "last":
            last = (fill - 1).clamp(min=0).view(1, -1, 1, 1).expand(self.num_kv_heads, -1, 1, self.head_dim)
            return self._keys[:, idx].gather(2, last).squeeze(2)
        # unfilled rows are zero, so sum / fill is the mean of the tokens present
        total = self._keys[:, idx].sum(2, dtype=torch.float32)
        return (total / fill.clamp(min=1).view(1, -1, 1)).to(self.dtype)

    def _chunk_keys_np(self, slots: np.ndarray) -> np.ndarray:
        idx = torch.from_numpy(slots).to(self.device)
        return self._chunk_keys[:, idx].float().cpu().numpy()

    def _allocate(self, n: int) -> np.ndarray:
        """n free slots: reuse freed ones first, then never-used ones. O(n)."""
        take = min(n, self._nfree)
        reused = self._free[self._nfree - take:self._nfree].copy()
        self._nfree -= take
        fresh = np.arange(self._used, self._used + n - take, dtype=np.int64)
        self._used += n - take
        return np.concatenate([reused, fresh])

    def _evict(self, n: int) -> None:
        """Free `n` occupied slots as the policy says. O(policy window), never O(bank)."""
        n = min(n, len(self._queue))
        if n == 0:
            return
        cand = self._queue.pop(self.policy.window(n))
        cand_t = torch.from_numpy(cand).to(self.device)
        hits = self._hits[cand_t].cpu().numpy()
        pick = np.asarray(self.policy.choose(hits, n), dtype=np.int64)
        if len(pick) != n or len(np.unique(pick)) != n or pick.min() < 0 or pick.max() >= len(cand):
            raise MemoryBankError(f"eviction policy {self.policy!r} must choose {n} distinct positions")
        keep = np.ones(len(cand), dtype=bool)
        keep[pick] = False
        gone, survivors = cand[pick], cand[keep]
        if len(survivors):  # second chance at the young end; count halved
            self._queue.push(survivors)
            surv_t = cand_t[torch.from_numpy(keep).to(self.device)]
            self._hits[surv_t] = self._hits[surv_t] // 2
        gone_t = torch.from_numpy(gone).to(self.device)
        self._tokens -= int(self._fill[gone_t].sum())
        self._fill[gone_t] = 0
        if self._partial >= 0 and self._partial in gone:
            self._partial = -1
        self._free[self._nfree:self._nfree + n] = gone
        self._nfree += n
        self._evicted_chunks += n
        if self._ivf is not None and self._ivf.trained:
            self._ivf.remove(gone)

    def _index_add(self, slots: np.ndarray) -> None:
        if self._ivf is None:
            return
        if self._ivf.trained:
            self._ivf.add(slots, self._chunk_keys_np(slots))
        elif len(self._queue) >= self.train_min_chunks:
            live = self._queue.items()
            self._ivf.train(self._chunk_keys_np(live))
            self._ivf.add(live, self._chunk_keys_np(live))

    def clear(self) -> None:
        """Forget everything (a document boundary). O(1) in tensors; IVF training too is
        forgotten, since the next document may cluster differently."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        if self.tokens is not None:
            self.tokens.clear()
        self._queue.clear()
        self._nfree = 0
        self._used = 0
        self._partial = -1
        self._tokens = 0
        self._fill.zero_()
        if self._ivf is not None:
            self._ivf.reset()

    # -- reading -----------------------------------------------------------------------
    def search_tokens(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest stored contexts of the token memory: `queries [T, token_dim]` ->
        similarities `[T, k']` float32 and next-token ids `[T, k']` (see TokenMemory)."""
        if self.tokens is None:
            raise MemoryBankError("this bank keeps no token memory (built without token_dim)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MemoryBankError(f"k must be an integer >= 1, got {k!r}")
        with self._lock:
            return self.tokens.search(queries, k)

    def match_tokens(self, context: torch.Tensor, n_queries: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact earlier occurrences of the text ending at the last `n_queries` positions of
        `context [C]` (the tokens after the memorized text) -> match lengths `[n_queries, k]`
        and the tokens that followed `[n_queries, k]`, int64 (see TokenMemory.match)."""
        if self.tokens is None:
            raise MemoryBankError("this bank keeps no token memory (built without token_dim)")
        with self._lock:
            return self.tokens.match(context, n_queries, k)

    def search(self, queries: torch.Tensor, k_chunks: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-`k_chunks` chunks per query token and query head.

        Args:
            queries: `[T, H_q, D]` float; query head h reads key/value head
                h // (H_q // H_kv) (grouped-query attention).
        Returns:
            keys, values: `[T, H_q, k_chunks * chunk_size, D]` float32 on the bank's
                device, chunks best first, each chunk's tokens in order.
            mask: `[T, H_q, k_chunks * chunk_size]` bool, True where a slot holds a
                real token; masked slots are zeros (empty bank, fewer chunks than
                k_chunks, unfilled tail of a partial chunk).
        """
        T, Hq = self._check_queries(queries, k_chunks)
        L, D = k_chunks * self.chunk_size, self.head_dim
        keys = torch.empty(T, Hq, L, D, dtype=torch.float32, device=self.device)
        values = torch.empty_like(keys)
        mask = torch.empty(T, Hq, L, dtype=torch.bool, device=self.device)
        self._search_into(queries, k_chunks, keys, values, mask)
        return keys, values, mask

    def _search_into(self, queries: torch.Tensor, k: int, keys_out: torch.Tensor,
                     values_out: torch.Tensor, mask_out: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """`search` into given tensors; `counted [T]` bool: the query tokens whose retrievals
        count as hits (None: all)."""
        T, Hq, D = queries.shape
        H, S, C = self.num_kv_heads, self.chunk_size, self.capacity_chunks
        g = Hq // H
        # [T, Hq, D] -> [H, T*g, D]: the queries that read each kv head, together
        q = queries.detach().to(self.device, torch.float32).view(T, H, g, D).permute(1, 0, 2, 3).reshape(H, T * g, D)
        with self._lock:
            if len(self._queue) == 0:
                slots = torch.full((H, T * g, k), C, dtype=torch.long, device=self.device)
            elif self._ivf is not None and self._ivf.trained:
                slots = self._ivf_topk(q, k)
            elif self._one_call_search():
                # one C scan for any number of queries: 1.4-2.3x torch's product + topk for
                # a prompt's 8-1024 tokens over 8k chunks (2 threads, AVX2), the same slots
                freed = self._free[:self._nfree] if self._nfree else None
                slots = search_cpu.search_chunks(q, self._chunk_keys, self._used, k, C, freed)
            else:
                slots = self._flat_topk(q, k)
            if self._one_call_search() and keys_out.is_contiguous() and values_out.is_contiguous() \
                    and mask_out.is_contiguous():  # the reading in one C call
                search_cpu.read_chunks(slots, T, self._keys, self._values, self._fill, self._hits,
                                       None if counted is None else counted.to(self.device),
                                       keys_out, values_out, mask_out)
                return
            hit = slots if counted is None else slots.view(H, T, g, k)[:, counted.to(self.device)]
            real = hit[hit != C]
            if real.numel():
                self._hits.index_add_(0, real, torch.ones_like(real, dtype=torch.int32))
            # [H, T*g, k] -> [T, Hq, k], then rows of the flattened [H*(C+1), S*D] storage
            slots = slots.view(H, T, g, k).permute(1, 0, 2, 3).reshape(T, Hq, k)
            head = (torch.arange(Hq, device=self.device) // g) * (C + 1)
            rows = (slots + head.view(1, Hq, 1)).reshape(-1)
            fill = self._fill[slots].long()
            for store, out in ((self._keys, keys_out), (self._values, values_out)):
                out.view(-1, S * D).copy_(store.view(H * (C + 1), S * D).index_select(0, rows))
        mask_out.copy_((torch.arange(S, device=self.device) < fill.unsqueeze(-1)).view(T, Hq, k * S))

    def _one_call_search(self) -> bool:
        """Whether a decode step's search runs in one C call (search_cpu.py) here."""
        return self.device.type == "cpu" and self._chunk_keys.dtype == torch.float16 and search_cpu.fast()

    def _flat_topk(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Exact top-k slots `[H, Tq, k]` (sentinel C where fewer exist)."""
        H, Tq, _ = q.shape
        C, used = self.capacity_chunks, self._used
        out = torch.full((H, Tq, k), C, dtype=torch.long, device=self.device)
        kk = min(k, used)
        freed = torch.from_numpy(self._free[:self._nfree]).to(self.device) if self._nfree else None
        # every head in one product where scores and keys fit the budget (decoding: 3x fewer
        # calls), else a head at a time, in blocks of query rows
        together = H * max(Tq, self.head_dim) * used <= _SCORE_BUDGET
        heads = [slice(0, H)] if together else [slice(h, h + 1) for h in range(H)]
        rows = Tq if together else max(1, _SCORE_BUDGET // used)
        for hs in heads:
            keys_t = self._chunk_keys[hs, :used].float().transpose(1, 2)  # [heads, D, used]
            for a in range(0, Tq, rows):
                scores = torch.bmm(q[hs, a:a + rows], keys_t)  # [heads, rows, used]
                if freed is not None:  # freed slots below _used: never returned
                    scores.index_fill_(2, freed, float("-inf"))
                top, idx = scores.topk(kk, dim=2)
                idx[top == float("-inf")] = C
                out[hs, a:a + rows, :kk] = idx
        return out

    def _ivf_topk(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """IVF candidates (`rerank * k`), reranked exactly against the chunk keys."""
        C = self.capacity_chunks
        cand = torch.from_numpy(self._ivf.search(q.cpu().numpy(), self.rerank * k)).to(self.device)
        missing = cand < 0
        cand[missing] = C
        out = torch.empty(*cand.shape[:2], k, dtype=torch.long, device=self.device)
        for h in range(self.num_kv_heads):
            ck = self._chunk_keys[h][cand[h]].float()  # [Tq, k', D]
            exact = (ck * q[h].unsqueeze(1)).sum(-1)  # [Tq, k']; faster than einsum/bmm here
            exact[missing[h]] = float("-inf")
            top, idx = exact.topk(min(k, exact.shape[1]), dim=1)
            best = cand[h].gather(1, idx)
            best[top == float("-inf")] = C
            out[h] = C
            out[h, :, :best.shape[1]] = best
        return out

    # -- checks ------------------------------------------------------------------------
    def _check_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        want = (self.num_kv_heads, self.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != want:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise MemoryBankError(f"{name} must be a tensor [T, {want[0]}, {want[1]}], got {shape}")
            if not t.is_floating_point():
                raise MemoryBankError(f"{name} must be a float tensor, got {t.dtype}")
        if keys.shape != values.shape:
            raise MemoryBankError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")

    def _check_queries(self, queries: torch.Tensor, k_chunks: int) -> tuple[int, int]:
        if not isinstance(queries, torch.Tensor) or queries.dim() != 3 or queries.shape[2] != self.head_dim:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise MemoryBankError(f"queries must be [T, H_q, {self.head_dim}], got {shape}")
        T, Hq, _ = queries.shape
        if Hq % self.num_kv_heads:
            raise MemoryBankError(
                f"{Hq} query heads cannot share {self.num_kv_heads} key/value heads evenly")
        if isinstance(k_chunks, bool) or not isinstance(k_chunks, int) or k_chunks < 1:
            raise MemoryBankError(f"k_chunks must be an integer >= 1, got {k_chunks!r}")
        return T, Hq

    # -- reporting and persistence -------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of what is stored: per-slot tensors of the slots in use, queue and free
        list, and the IVF indexes (estimated)."""
        H, S, D = self.num_kv_heads, self.chunk_size, self.head_dim
        es = self._keys.element_size()
        per_slot = 2 * H * S * D * es + H * D * es + 1 + 4 + 8 + 8  # kv, chunk key, fill, hits, queue, free
        return (self._used * per_slot + (self._ivf.nbytes() if self._ivf else 0)
                + (self.tokens.nbytes() if self.tokens is not None else 0))

    def stats(self) -> dict[str, Any]:
        """Sizes and counters, JSON-serialisable."""
        with self._lock:
            return {
                "tokens": self._tokens,
                "chunks": len(self._queue),
                "capacity_tokens": self.capacity_tokens,
                "chunk_size": self.chunk_size,
                "index": self.index,
                "trained": bool(self._ivf.trained) if self._ivf else None,
                "nlist": self._ivf.nlist if self._ivf else None,
                "nprobe": self.nprobe,
                "eviction": self.policy.name,
                "evicted_chunks": self._evicted_chunks,
                "dropped_tokens": self._dropped_tokens,
                "bytes": self.nbytes(),
                "bytes_per_token": self.nbytes() / self._tokens if self._tokens else None,
                "owner": self.owner,
                "token_memory": len(self.tokens) if self.tokens is not None else None,
            }

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild an empty bank like this one."""
        cfg = dict(num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, chunk_size=self.chunk_size,
                   capacity_tokens=self.capacity_tokens, index=self.index,
                   dtype=str(self.dtype).removeprefix("torch."), chunk_key=self.chunk_key,
                   eviction=self.policy.name, eviction_config=self.policy.config(),
                   owner=self.owner, rerank=self.rerank)
        if self.tokens is not None:
            cfg.update(token_dim=self.tokens.dim, token_layer=self.token_layer)
        if self._ivf is not None:
            cfg.update(nlist=self._ivf.nlist, nprobe=self._ivf.nprobe, ef_search=self._ivf.ef_search,
                       ivf_codes=self._ivf.codes, train_min_chunks=self.train_min_chunks)
        return cfg

    def save(self, path: str | Path) -> None:
        """Write the bank to one file, atomically, with a checksum (see persist.py)."""
        with self._lock:
            save_bank(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, expect_owner: str | None = None,
             device: str | torch.device = "cpu",
             eviction: EvictionPolicy | None = None) -> "MemoryBank":
        """Read a bank written by `save`. Raises MemoryBankError if the file is corrupt or
        truncated, or if `expect_owner` is given and differs from the bank's owner.
        `eviction` supplies a custom policy object that was saved by name. The bank's
        `file_sha256` is then the SHA-256 (hex) of the whole file it was read from."""
        return load_bank(cls, Path(path), expect_owner=expect_owner, device=device, eviction=eviction)

    def __repr__(self) -> str:
        return (f"MemoryBank({self._tokens}/{self.capacity_tokens} tokens, index={self.index!r}, "
                f"heads={self.num_kv_heads}, dim={self.head_dim}, chunk={self.chunk_size}, "
                f"owner={self.owner!r})")
