"""`TokenMemory`: a per-token memory of (context vector, next token) pairs.

The key/value bank (bank.py) feeds memory attention; this one feeds a copy distribution
at the output (a continuous cache / kNN-LM over the sequence's own past): token t of the
memorized text is stored as its unit-norm hidden state h_t and the token that followed
it, x_{t+1}. A query h finds the k most similar stored contexts, and their next tokens,
weighted by similarity, vote for the next token (see longside/token_cache.py).

The next token of the newest stored token is not known until more text arrives, so
that token is held back ("pending") and stored by the next `add`. Storage is a ring
buffer: past capacity the oldest pairs are overwritten (FIFO). Search scores every stored
key in a cheap form (bfloat16; once `basis_after` pairs are stored, a `shortlist_dim`-wide
projection onto the keys' principal directions, fitted then from the memory itself, kept
in int8 with one scale per key: 8.7x fewer bytes to read per query) to shortlist
candidates, then rescores those exactly in float32. The arrays persist inside the owning
MemoryBank's file.

The stored next tokens, in time order, are also the memorized text itself, so the same
arrays answer a second question (`match`): where in memory did the text that ends at a
query position occur before, and for how many tokens does it agree? Exact n-gram lookup
through sorted hashes (built once per memory state) finds the candidates; a direct
comparison gives their exact match lengths. This is what copies a pass key or a name
spelled out 50k tokens ago, where a hidden-state neighbour is only roughly right.
"""

from __future__ import annotations

import numpy as np
import torch

from longside.errors import MemoryBankError

from . import pages, search_cpu

_HASH_P = 2_147_483_647  # a prime below 2^31: hash * base stays inside int64
_HASH_BASE = 1_000_003
MATCH_ORDERS = (2, 4, 8, 16, 32)  # n-gram lengths looked up, longest found first
MAX_MATCH = 64  # match lengths are counted up to this
MAX_SHORTLIST_DIM = 512  # int16 query x int8 row summed in int32: 512 x 32767 x 127 < 2^31


def _hash_ints(tokens: list[int]) -> int:
    """The hash `_ngram_hashes` gives the n-gram `tokens`, on Python ints."""
    h = 0
    for t in tokens:
        h = (h * _HASH_BASE + t + 2) % _HASH_P
    return h


def _int8_rows(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections `p [n, s]` float32 -> int8 `[n, s]` and one float32 scale per row `[n]`
    (its largest magnitude / 127), p ~ int8 * scale."""
    amax = p.abs().amax(1)
    # a row with NaN keeps a NaN scale: its scores are NaN, which no shortlist takes
    scale = torch.where(amax > 0, amax / 127, torch.where(amax.isnan(), amax, torch.ones_like(amax)))
    return (p / scale[:, None]).round().clamp_(-127, 127).to(torch.int8), scale


def _sort_hashes(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`h [L]` int64 in [0, 2^31) -> (sorted hashes, their positions) `[L]` int64, equal
    hashes in time order (a stable sort). On CPU one sort of the unique keys hash * 2^32 +
    position: numpy sorts int64 with SIMD, ~18x torch's stable sort of 16k hashes here."""
    if h.device.type != "cpu" or h.shape[0] >= 1 << 32:
        return torch.sort(h, stable=True)
    key = torch.from_numpy(np.sort(((h << 32) | torch.arange(h.shape[0])).numpy()))
    return key >> 32, key & 0xFFFFFFFF


def _ngram_hashes(seq: torch.Tensor, n: int, half: torch.Tensor | None = None) -> torch.Tensor:
    """`seq [L]` int64 -> hash of the n tokens ending at each position n-1..L-1, `[L - n + 1]`
    int64 in [0, 2^31). Equal n-grams hash equal; unequal ones rarely collide (matches are
    verified token by token afterwards). `half`: this function's hashes of `seq` for n // 2
    (n even), from which the n-gram hashes take two operations instead of n (the hash is a
    polynomial: an n-gram's is its first half's times base^(n/2) plus its second half's)."""
    L = seq.shape[0] - n + 1
    if half is not None and n % 2 == 0 and L > 0:
        shift = pow(_HASH_BASE, n // 2, _HASH_P)  # < 2^31, so half * shift stays inside int64
        return (half[:L] * shift + half[n // 2:n // 2 + L]) % _HASH_P
    if 0 < L <= 4:  # decoding asks for one: n tiny tensor ops cost ~20x this loop
        vals = seq.tolist()
        return torch.tensor([_hash_ints(vals[s:s + n]) for s in range(L)], dtype=torch.int64, device=seq.device)
    h = torch.zeros(max(L, 0), dtype=torch.int64, device=seq.device)
    for i in range(n):
        h = (h * _HASH_BASE + seq[i:i + L] + 2) % _HASH_P
    return h


class TokenMemory:
    """Up to `capacity` (unit vector `[dim]`, next token id) pairs, oldest overwritten first.

    Keys are stored in `dtype`: bfloat16 by default (64k tokens x 576 dims = 75 MB), since
    CPU matrix products are several times faster in bfloat16 than in float16. With
    `shortlist_dim` (0 = off, as are >= dim and float32 keys) they are also kept projected
    onto their top principal directions (`shortlist_dim` + 4 more bytes per token: int8 and
    a scale), once `basis_after` pairs are stored, for a faster shortlist. Rounding the
    projections to int8 instead of bfloat16 leaves the shortlist's recall as it was (0.9907
    against 0.9904 of the 64 true neighbours, 2 x 16k tokens of validation books, see
    docs/results.md#token-shortlist-int8)."""

    def __init__(self, dim: int, capacity: int, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", shortlist_dim: int = 128, basis_after: int = 4096):
        if dim < 1 or capacity < 1:
            raise MemoryBankError(f"token memory needs dim >= 1 and capacity >= 1, got {dim}, {capacity}")
        self.dim, self.capacity, self.dtype, self.device = dim, capacity, dtype, torch.device(device)
        # float32 keys are searched exactly in one product: no shortlist, no projection to keep
        if shortlist_dim > MAX_SHORTLIST_DIM:
            raise MemoryBankError(f"shortlist_dim must be at most {MAX_SHORTLIST_DIM} (the int8 scores' integer "
                                  f"sums must fit 32 bits), got {shortlist_dim}")
        self.shortlist_dim = shortlist_dim if 0 < shortlist_dim < dim and dtype != torch.float32 else 0
        self.basis_after = max(basis_after, self.shortlist_dim)
        self._basis: torch.Tensor | None = None  # [dim, shortlist_dim] float32, orthonormal columns
        self._proj: torch.Tensor | None = None  # [capacity, shortlist_dim] int8: keys @ basis / scale
        self._proj_scale: torch.Tensor | None = None  # [capacity] float32, one per key
        self._keys = pages.empty((capacity, dim), dtype, self.device)  # 2 MB pages where the kernel has them
        self._next = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self._pending = torch.zeros(dim, dtype=dtype, device=self.device)
        self._has_pending = False
        self._size = 0  # pairs stored
        self._head = 0  # slot the next pair goes to
        self._match_index = None  # (text, next ids, {n: (sorted hashes, positions)}), built on demand

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        self._size, self._head, self._has_pending = 0, 0, False
        self._match_index = None
        self._basis = self._proj = self._proj_scale = None

    def add(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Append tokens in text order: `keys [T, dim]` (normalised here), `ids [T]` int.

        Stores (key of token t, id of token t+1) for every t whose successor is known:
        the held-back last token of the previous call pairs with `ids[0]`."""
        if keys.dim() != 2 or keys.shape[1] != self.dim or ids.shape != keys.shape[:1]:
            raise MemoryBankError(f"token memory add needs keys [T, {self.dim}] and ids [T], got "
                                  f"{tuple(keys.shape)} and {tuple(ids.shape)}")
        T = keys.shape[0]
        if T == 0:
            return
        keys = torch.nn.functional.normalize(keys.detach().float(), dim=-1).to(self.device, self.dtype)
        ids = ids.detach().to(self.device, torch.int64)
        if self._has_pending:
            new_keys, new_next = torch.cat([self._pending[None], keys[:-1]]), ids
        else:
            new_keys, new_next = keys[:-1], ids[1:]
        self._pending.copy_(keys[-1])
        self._has_pending = True
        self._write(new_keys, new_next)

    def _write(self, keys: torch.Tensor, nxt: torch.Tensor) -> None:
        n = keys.shape[0]
        if n > self.capacity:  # only the newest fit
            keys, nxt, n = keys[-self.capacity:], nxt[-self.capacity:], self.capacity
        slots = (self._head + torch.arange(n, device=self.device)) % self.capacity
        self._keys[slots] = keys
        self._next[slots] = nxt
        self._head = (self._head + n) % self.capacity
        self._size = min(self.capacity, self._size + n)
        self._match_index = None
        if self._basis is not None:
            self._proj[slots], self._proj_scale[slots] = _int8_rows(keys.float() @ self._basis)
        elif self.shortlist_dim and self._size >= self.basis_after:
            self._fit_basis()

    def _fit_basis(self) -> None:
        """Principal directions of the stored keys (uncentred: the projection that best keeps
        their dot products), from up to 8192 of them."""
        n = self._size
        sample = self._keys[torch.linspace(0, n - 1, min(n, 8192), device=self.device).long()].float()
        _, vecs = torch.linalg.eigh(sample.T @ sample)  # ascending eigenvalues
        self._set_basis(vecs[:, -self.shortlist_dim:].flip(-1).contiguous())

    def _set_basis(self, basis: torch.Tensor, proj: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> None:
        """Use `basis [dim, s]` float32; `proj [size, s]` (the stored keys' projections, as
        saved: int8 with their `scale [size]`, or bfloat16 from files written before int8) is
        taken as it is, else computed."""
        self._basis = basis.to(self.device, torch.float32)
        s = basis.shape[1]
        self._proj = pages.empty((self.capacity, s), torch.int8, self.device)
        self._proj_scale = torch.empty(self.capacity, dtype=torch.float32, device=self.device)
        n = self._size
        if proj is not None and proj.dtype == torch.int8 and scale is not None:
            self._proj[:n] = proj.view(n, s)
            self._proj_scale[:n] = scale.view(n)
            return
        for i in range(0, n, 8192):
            p = proj[i:i + 8192].view(-1, s).float() if proj is not None else \
                self._keys[i:min(i + 8192, n)].float() @ self._basis
            self._proj[i:i + p.shape[0]], self._proj_scale[i:i + p.shape[0]] = _int8_rows(p)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`queries [T, dim]` (normalised here) -> cosine similarities `[T, k']` float32
        (exact against the stored keys), best first, and the next token ids `[T, k']` int64
        of those contexts; k' = min(k, len(self)) (0 for an empty memory). The k' are the
        best of a shortlist (2k by bfloat16 products, or 4k by the projection). One query on
        CPU runs in one C call (search_cpu.py; equal scores go to the lower index there)."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise MemoryBankError(f"token memory search needs queries [T, {self.dim}], got {tuple(queries.shape)}")
        kk = min(k, self._size)
        T = queries.shape[0]
        if kk == 0:
            return (torch.zeros(T, 0, device=self.device), torch.zeros(T, 0, dtype=torch.int64, device=self.device))
        live = self._keys[:self._size]  # slots [0, size) are live: the ring fills from 0
        if T == 1 and self._basis is not None and self.dtype == torch.bfloat16 and self.device.type == "cpu" \
                and search_cpu.int8_in_c():  # a decode step: one call, from the raw query
            return search_cpu.token_search_step(queries.detach()[0].to(self.device), live, self._basis, self._proj,
                                                self._proj_scale, self._next, min(4 * kk, self._size), kk)
        q = torch.nn.functional.normalize(queries.detach().float(), dim=-1).to(self.device)
        if self.dtype == torch.float32:
            top, idx = (q @ live.T).topk(kk, dim=-1)
            return top, self._next[idx]
        # a cheap product (int8 projections, or the keys in the storage dtype) rounds the
        # similarities (and the projection drops the keys' minor directions): use it to
        # shortlist candidates, then score those exactly in float32
        if self._basis is not None:
            short, qs = min(4 * kk, self._size), q @ self._basis
        else:
            short, qs = min(2 * kk, self._size), q.to(self.dtype)
        if T == 1 and self._basis is None and self.dtype == torch.bfloat16 and self.device.type == "cpu" \
                and search_cpu.fast():
            sims, idx = search_cpu.search_tokens(q, live, qs, self._keys, short, kk)  # a decode step: one call
            return sims, self._next[idx]
        rows = self._proj[:self._size].float() if self._basis is not None else live
        tops, idxs = [], []
        for i in range(0, T, 256):  # blocks bound the [block, size] scores and [block, short, dim] keys
            approx = qs[i:i + 256] @ rows.T
            if self._basis is not None:
                approx *= self._proj_scale[:self._size]
            # a key with NaN (NaN scale) is never a neighbour, as in the C call (topk ranks NaN first)
            inf = float("inf")
            c = approx.nan_to_num_(-inf, inf, -inf).topk(short, dim=-1).indices  # [block, short]
            exact = torch.einsum("td,tkd->tk", q[i:i + 256], live[c].float()).nan_to_num_(-inf, inf, -inf)
            top, j = exact.topk(kk, dim=-1)
            tops.append(top)
            idxs.append(c.gather(1, j))
        idx = torch.cat(idxs)
        return torch.cat(tops), self._next[idx]

    def _index(self):
        """The memorized text in time order and its n-gram hash index (cached until the next add).

        text `[M + 1]`: text[j] is the token whose context pair j stores (text[0] is not
        known: the oldest pair's own token was never stored, -1), text[M] the pending token.
        """
        if self._match_index is None:
            M = self._size
            nxt = self._next[:M]
            if M == self.capacity:  # full ring: the oldest pair sits at the head
                nxt = torch.roll(nxt, -self._head)
            text = torch.cat([nxt.new_full((1,), -1), nxt])
            orders, hashes = {}, {}
            for n in MATCH_ORDERS:
                if M >= n:  # n-grams ending at pairs n-1..M-1 (from the half-length ones where known)
                    hashes[n] = h = _ngram_hashes(text[:M], n, hashes.get(n // 2))
                    vals, order = _sort_hashes(h)
                    orders[n] = (vals, order + (n - 1))
            self._match_index = (text, nxt, orders)
        return self._match_index

    def match(self, context: torch.Tensor, n_queries: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact matches of the text ending at each query position.

        `context [C]` int64: the tokens that follow the memorized text (the current
        segment); the queries are its last `n_queries` positions. For each query, the k
        most recent stored positions whose preceding n tokens equal the query's, for the
        longest n in MATCH_ORDERS that occurs at all. Returns match lengths `[n_queries, k]`
        int64 (exact, counted back through memory and context up to MAX_MATCH; 0 = no
        candidate) and the token that followed each candidate `[n_queries, k]` int64.
        """
        Q = n_queries
        if context.dim() != 1 or not 1 <= Q <= context.shape[0]:
            raise MemoryBankError(f"match needs context [C] and 1 <= n_queries <= C, got "
                                  f"{tuple(context.shape)} and {n_queries}")
        dev = self.device
        lens = torch.zeros(Q, k, dtype=torch.int64, device=dev)
        if self._size == 0 or not self._has_pending or k < 1:
            return lens, lens.clone()
        text, nxt, orders = self._index()
        if Q == 1 and dev.type == "cpu" and search_cpu.fast():  # a decode step: one call, no copy of the text
            return search_cpu.match_last(text, context, orders, nxt, k, MAX_MATCH)
        stream = torch.cat([text, context.to(dev, torch.int64)])  # memory, then the segment
        qpos = torch.arange(stream.shape[0] - Q, stream.shape[0], device=dev)
        if Q == 1:
            pos, found = self._candidates_of_one(stream, orders, k)
        else:
            pos, found = self._candidates(stream, orders, Q, k)
        back = torch.arange(MAX_MATCH, device=dev)
        p, q = pos[..., None] - back, qpos[:, None, None] - back  # [Q, k, MAX_MATCH]
        same = (stream[p.clamp_min(0)] == stream[q.clamp_min(0)]) & (p >= 1) & found[..., None]
        lens = same.long().cumprod(-1).sum(-1)
        return lens, torch.where(lens > 0, nxt[pos], 0)

    def _candidates_of_one(self, stream: torch.Tensor, orders: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`_candidates` for the last position alone (a decode step), on Python ints: one
        search per n-gram order instead of ~20 tiny tensor ops. The same result."""
        pos, found = [0] * k, [False] * k
        tail = stream[-max(orders):].tolist() if orders else []  # no order yet: nothing to look up
        for n in sorted(orders, reverse=True):
            if len(tail) < n:  # too short: no hash
                continue
            vals, positions = orders[n]
            h = _hash_ints(tail[-n:])
            # hashes are integers: the right bound of h is the left bound of h + 1
            lo, hi = torch.searchsorted(vals, torch.tensor([h, h + 1], device=vals.device)).tolist()
            if hi > lo:
                idx = [hi - 1 - j for j in range(k)]  # most recent first
                found = [i >= lo for i in idx]
                got = positions[torch.tensor([max(i, 0) for i in idx], device=vals.device)].tolist()
                pos = [g if f else 0 for g, f in zip(got, found)]
                break
        dev = stream.device
        return torch.tensor([pos], dtype=torch.int64, device=dev), torch.tensor([found], dtype=torch.bool, device=dev)

    def _candidates(self, stream: torch.Tensor, orders: dict, Q: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of the last Q positions of `stream`, the k most recent stored positions
        whose preceding n tokens equal the query's, for the longest n in `orders` found:
        positions `[Q, k]` int64 and which of them exist `[Q, k]` bool."""
        dev = stream.device
        pos = torch.zeros(Q, k, dtype=torch.int64, device=dev)
        found = torch.zeros(Q, k, dtype=torch.bool, device=dev)
        done = torch.zeros(Q, dtype=torch.bool, device=dev)
        for n in sorted(orders, reverse=True):
            vals, positions = orders[n]
            span = stream[max(0, stream.shape[0] - Q - n + 1):]
            qh = _ngram_hashes(span, n)
            qh = torch.cat([qh.new_full((Q - qh.shape[0],), -1), qh])  # too short: no hash
            lo = torch.searchsorted(vals, qh)
            hi = torch.searchsorted(vals, qh, right=True)
            new = (hi > lo) & ~done
            if new.any():
                idx = hi[:, None] - 1 - torch.arange(k, device=dev)  # most recent first
                ok = (idx >= lo[:, None]) & new[:, None]
                pos = torch.where(ok, positions[idx.clamp_min(0)], pos)
                found |= ok
                done |= new
            if done.all():
                break
        return pos, found

    def nbytes(self) -> int:
        proj = self._basis.shape[1] + 4 if self._basis is not None else 0  # int8 and a scale
        return self._size * (self.dim * self._keys.element_size() + proj + 8)

    # -- persistence (inside the owning MemoryBank's file; see persist.py) ----------------
    def state(self) -> dict:
        return {"size": self._size, "head": self._head, "has_pending": self._has_pending}

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {"token_keys": self._keys[:self._size], "token_next": self._next[:self._size],
               "token_pending": self._pending}
        if self._basis is not None:  # saved with their projection: recomputing it took half a load
            out["token_basis"] = self._basis
            out["token_proj_i8"] = self._proj[:self._size]
            out["token_proj_scale"] = self._proj_scale[:self._size]
        return out

    def restore(self, state: dict, arrays: dict[str, torch.Tensor]) -> None:
        n = int(state["size"])
        if not 0 <= n <= self.capacity or not 0 <= int(state["head"]) < self.capacity:
            raise MemoryBankError(f"token memory state {state} does not fit capacity {self.capacity}")
        self._keys[:n] = arrays["token_keys"].view(n, self.dim)
        self._next[:n] = arrays["token_next"].view(n)
        self._pending.copy_(arrays["token_pending"].view(self.dim))
        self._size, self._head, self._has_pending = n, int(state["head"]), bool(state["has_pending"])
        self._match_index = None
        self._basis = self._proj = self._proj_scale = None
        if "token_basis" in arrays:
            proj, scale = arrays.get("token_proj_i8"), arrays.get("token_proj_scale")
            self._set_basis(arrays["token_basis"].view(self.dim, -1), arrays.get("token_proj") if proj is None else proj,
                            scale)
        elif self.shortlist_dim and n >= self.basis_after:  # saved before bases existed
            self._fit_basis()
