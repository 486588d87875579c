"""`BatchMemory`: one MemoryBank per row of a batch, so rows never read each other.

LongMem shares one bank across the batch, so a row retrieves other documents' text.
Here row b writes to and searches only bank b; `reset(rows)` clears the banks of rows
that start a new document.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from longside.errors import MemoryBankError

from .bank import MemoryBank


class BatchMemory:
    """`batch_size` independent banks built with the same `bank_kwargs` (see MemoryBank)."""

    def __init__(self, batch_size: int, **bank_kwargs: Any):
        if batch_size < 1:
            raise MemoryBankError(f"batch_size must be >= 1, got {batch_size}")
        self.banks = [MemoryBank(**bank_kwargs) for _ in range(batch_size)]

    @classmethod
    def of(cls, banks: Sequence[MemoryBank]) -> "BatchMemory":
        """A batch whose row b is `banks[b]` itself (shared, not copied): rows that come
        and go, each with a bank of its own (a server's users)."""
        if not banks:
            raise MemoryBankError("a batch needs at least one bank")
        batch = cls.__new__(cls)
        batch.banks = list(banks)
        return batch

    def __len__(self) -> int:
        return len(self.banks)

    def __getitem__(self, row: int) -> MemoryBank:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(self.banks):
            raise MemoryBankError(f"row {row!r} out of range for a batch of {len(self.banks)}")
        return self.banks[row]

    def _check_batch(self, t: torch.Tensor, name: str, rows: int | None = None) -> None:
        B = len(self.banks) if rows is None else rows
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != B:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise MemoryBankError(f"{name} must be [B={B}, T, H, D], got {shape}")

    def add(self, keys: torch.Tensor, values: torch.Tensor, token_keys: torch.Tensor | None = None,
            token_ids: torch.Tensor | None = None, sinks: int = 0) -> None:
        """`keys, values [B, T, H_kv, D]`: row b goes to bank b; with token memories also
        `token_keys [B, T, token_dim]` and `token_ids [B, T]`. `sinks`: see `MemoryBank.add`."""
        self._check_batch(keys, "keys")
        self._check_batch(values, "values")
        for b, (bank, k, v) in enumerate(zip(self.banks, keys, values)):
            if token_keys is None:
                bank.add(k, v, sinks=sinks)
            else:
                bank.add(k, v, token_keys=token_keys[b], token_ids=token_ids[b], sinks=sinks)

    def search_tokens(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`queries [B, T, token_dim]` -> similarities `[B, T, k']` float32 and next-token
        ids `[B, T, k']`, k' the largest row's min(k, stored pairs); row b from bank b.
        Rows with fewer pairs are padded with similarity -inf and id 0, which a reader must
        ignore (longside's token-cache reader does: a row reads the same whatever the
        others hold)."""
        hits = [bank.search_tokens(q, k) for bank, q in zip(self.banks, queries)]
        if len(hits) == 1:  # one row (a decode step of one user): nothing to pad
            return hits[0][0][None], hits[0][1][None]
        kk = max(s.shape[1] for s, _ in hits)
        pad = [kk - s.shape[1] for s, _ in hits]
        sims = torch.stack([torch.nn.functional.pad(s, (0, p), value=float("-inf")) for (s, _), p in zip(hits, pad)])
        nxt = torch.stack([torch.nn.functional.pad(n, (0, p), value=0) for (_, n), p in zip(hits, pad)])
        return sims, nxt

    def match_tokens(self, context, n_queries: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`context [B, C]` token ids after each row's memorized text (or a list of B `[C_b]`
        tensors, rows of different lengths) -> match lengths and next ids `[B, n_queries, k]`
        int64 for its last `n_queries` positions (0: none)."""
        if len(context) != len(self.banks) or (isinstance(context, torch.Tensor) and context.dim() != 2):
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else f"{len(context)} rows"
            raise MemoryBankError(f"context must be [B={len(self.banks)}, C], got {shape}")
        hits = [bank.match_tokens(c, n_queries, k) for bank, c in zip(self.banks, context)]
        if len(hits) == 1:
            return hits[0][0][None], hits[0][1][None]
        return torch.stack([h[0] for h in hits]), torch.stack([h[1] for h in hits])

    def search(self, queries: torch.Tensor, k_chunks: int, rows: Sequence[int] | None = None,
               counted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`queries [B, T, H_q, D]` -> keys, values `[B, T, H_q, k_chunks*chunk_size, D]`
        float32 and mask `[B, T, H_q, k_chunks*chunk_size]` bool; row b from bank b, or
        from bank `rows[b]` when `rows` is given. `counted [B, T]` bool: the queries whose
        retrievals count in the banks' hit counters (default all; padding does not)."""
        banks = self.banks if rows is None else [self[r] for r in rows]
        self._check_batch(queries, "queries", len(banks))
        B, T, Hq, D = queries.shape
        first = banks[0]
        first._check_queries(queries[0], k_chunks)
        L = k_chunks * first.chunk_size
        keys = torch.empty(B, T, Hq, L, D, dtype=torch.float32, device=first.device)
        values = torch.empty_like(keys)
        mask = torch.empty(B, T, Hq, L, dtype=torch.bool, device=first.device)
        for b, bank in enumerate(banks):  # written in place: no stacking copy
            bank._search_into(queries[b], k_chunks, keys[b], values[b], mask[b],
                              None if counted is None else counted[b])
        return keys, values, mask

    def reset(self, rows: Iterable[int] | torch.Tensor | None = None) -> None:
        """Clear the banks of `rows` (all rows when None): a new document starts there.
        A bool tensor `[B]` selects the rows where it is True."""
        if rows is None:
            rows = range(len(self.banks))
        elif isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
            rows = rows.nonzero().flatten().tolist()
        for r in (int(r) for r in rows):
            if not 0 <= r < len(self.banks):
                raise MemoryBankError(f"row {r} out of range for batch of {len(self.banks)}")
            self.banks[r].clear()

    def lengths(self) -> list[int]:
        """Tokens stored per row."""
        return [len(b) for b in self.banks]

    def stats(self) -> list[dict]:
        return [b.stats() for b in self.banks]
