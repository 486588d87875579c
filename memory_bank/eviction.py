"""Which chunks leave a full memory bank, at a cost that grows with what leaves.

The bank keeps its occupied chunk slots in a queue (`SlotQueue`), oldest first. To free
`n` slots it pops the `policy.window(n)` oldest, asks the policy which `n` of them to
evict, and pushes the survivors back at the young end (a "second chance", with their
retrieval counts halved so that a chunk must keep being retrieved to keep surviving).
Every step touches only the popped slots, never the whole bank, so evicting a 1024-token
segment costs the same in a 64k-token bank as in a 1M-token one.

A policy is any object with `name`, `window(n) -> int`, `choose(hits, n) -> positions`
and `config() -> dict`; `FIFO` and `KeepMostRetrieved` are the two shipped.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from longside.errors import MemoryBankError


@runtime_checkable
class EvictionPolicy(Protocol):
    """Picks which of the oldest chunks to evict."""

    name: str

    def window(self, n: int) -> int:
        """How many of the oldest chunks to look at when `n` must go (>= n)."""
        ...

    def choose(self, hits: np.ndarray, n: int) -> np.ndarray:
        """`hits [m]` int (retrieval counts of the m oldest chunks, oldest first) ->
        the `n` positions (int64, in [0, m)) to evict."""
        ...

    def config(self) -> dict:
        """Keyword arguments that rebuild this policy (saved with the bank)."""
        ...


class FIFO:
    """Oldest first (LongMem's policy). Looks at exactly the `n` chunks it evicts."""

    name = "fifo"

    def window(self, n: int) -> int:
        return n

    def choose(self, hits: np.ndarray, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    def config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return "FIFO()"


class KeepMostRetrieved:
    """Among the `lookahead * n` oldest chunks, evict the `n` retrieved least often.

    Ties go to the older chunk, so a bank nobody searches behaves exactly like FIFO.
    Survivors go back to the young end with their counts halved (second chance).
    """

    name = "keep-most-retrieved"

    def __init__(self, lookahead: int = 4):
        if lookahead < 1:
            raise MemoryBankError(f"lookahead must be >= 1, got {lookahead}")
        self.lookahead = int(lookahead)

    def window(self, n: int) -> int:
        return self.lookahead * n

    def choose(self, hits: np.ndarray, n: int) -> np.ndarray:
        # stable sort: among equal counts the older (earlier) chunk goes first
        return np.sort(np.argsort(hits, kind="stable")[:n])

    def config(self) -> dict:
        return {"lookahead": self.lookahead}

    def __repr__(self) -> str:
        return f"KeepMostRetrieved(lookahead={self.lookahead})"


POLICIES: dict[str, type] = {FIFO.name: FIFO, KeepMostRetrieved.name: KeepMostRetrieved}


def make_policy(spec: str | EvictionPolicy, config: dict | None = None) -> EvictionPolicy:
    """A policy from its name (`"fifo"`, `"keep-most-retrieved"`) or an instance."""
    if isinstance(spec, str):
        if spec not in POLICIES:
            raise MemoryBankError(
                f"unknown eviction policy {spec!r}; use one of {sorted(POLICIES)} "
                "or pass an object with window/choose/config methods")
        return POLICIES[spec](**(config or {}))
    if not isinstance(spec, EvictionPolicy):
        raise MemoryBankError(
            f"eviction must be a policy name or an EvictionPolicy, got {type(spec).__name__}")
    return spec


class SlotQueue:
    """A ring of slot numbers (int64), oldest at the head. push/pop cost O(items moved).

    Holds at most `capacity` slots; the bank never has more occupied slots than that.
    """

    def __init__(self, capacity: int):
        self._ring = np.zeros(capacity, dtype=np.int64)
        self._head = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, slots: np.ndarray) -> None:
        n = len(slots)
        cap = len(self._ring)
        if self._size + n > cap:
            raise MemoryBankError("internal error: slot queue overflow")
        pos = (self._head + self._size + np.arange(n)) % cap
        self._ring[pos] = slots
        self._size += n

    def pop(self, n: int) -> np.ndarray:
        """Remove and return the `n` oldest slots, oldest first."""
        n = min(n, self._size)
        pos = (self._head + np.arange(n)) % len(self._ring)
        out = self._ring[pos].copy()
        self._head = (self._head + n) % len(self._ring)
        self._size -= n
        return out

    def items(self) -> np.ndarray:
        """All slots, oldest first (a copy; O(size), for save and tests)."""
        pos = (self._head + np.arange(self._size)) % len(self._ring)
        return self._ring[pos].copy()

    def clear(self) -> None:
        self._head = 0
        self._size = 0
