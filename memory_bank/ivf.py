"""Approximate chunk search for large banks: one faiss IVF index per key/value head.

Ids in every index are the bank's chunk slot numbers. Each index keeps a hash-table
direct map (`faiss.DirectMap.Hashtable`), which makes `remove_ids` cost O(ids removed):
faiss's default would scan every inverted list, O(bank), on each eviction.

`quantizer="hnsw"` puts an HNSW graph over the coarse centroids (faiss's
"IVF{nlist}_HNSW32"), which is how faiss scales HNSW to large, changing collections: a
plain HNSW graph over the chunks themselves cannot delete, so FIFO eviction would mean
rebuilding it. `efSearch` then tunes the centroid search and `nprobe` the lists visited.

Codes are 8-bit scalar-quantized by default (64 bytes per 64-dim chunk key, a quarter of
fp32); the bank reranks the candidates exactly, so the quantization costs speed, not
recall. faiss IVF indexes stay on the CPU: faiss-gpu IVF cannot remove by id in O(ids).
"""

from __future__ import annotations

import faiss
import numpy as np

from longside.errors import MemoryBankError

CODES = ("sq8", "fp16", "flat")
QUANTIZERS = ("flat", "hnsw")


class IVFIndexes:
    """`num_heads` inner-product IVF indexes over `dim`-dim float32 chunk keys."""

    def __init__(self, num_heads: int, dim: int, nlist: int, *, codes: str = "sq8",
                 quantizer: str = "flat", nprobe: int = 32, ef_search: int = 64,
                 hnsw_m: int = 32):
        if codes not in CODES:
            raise MemoryBankError(f"unknown IVF codes {codes!r}; use one of {CODES}")
        if quantizer not in QUANTIZERS:
            raise MemoryBankError(f"unknown IVF quantizer {quantizer!r}; use one of {QUANTIZERS}")
        if nlist < 1:
            raise MemoryBankError(f"nlist must be >= 1, got {nlist}")
        self.num_heads, self.dim, self.nlist = num_heads, dim, nlist
        self.codes, self.quantizer, self.hnsw_m = codes, quantizer, hnsw_m
        self._nprobe, self._ef_search = nprobe, ef_search
        self._indexes = [self._new_index() for _ in range(num_heads)]

    def _new_index(self) -> faiss.IndexIVF:
        d, ip = self.dim, faiss.METRIC_INNER_PRODUCT
        if self.quantizer == "hnsw":
            q = faiss.IndexHNSWFlat(d, self.hnsw_m, ip)
            q.hnsw.efSearch = self._ef_search
        else:
            q = faiss.IndexFlatIP(d)
        if self.codes == "flat":
            index = faiss.IndexIVFFlat(q, d, self.nlist, ip)
        else:
            qt = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}
            index = faiss.IndexIVFScalarQuantizer(q, d, self.nlist, qt[self.codes], ip)
        index.referenced_objects = [q]  # keep the quantizer alive as long as the index
        if self.quantizer == "hnsw":
            # k-means assigns with an exact flat index; the HNSW graph is built once at the end
            flat = faiss.IndexFlatIP(d)
            index.clustering_index = flat
            index.referenced_objects.append(flat)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = self._nprobe
        return index

    # -- knobs ---------------------------------------------------------------------
    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = int(value)
        for index in self._indexes:
            index.nprobe = self._nprobe

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = int(value)
        if self.quantizer == "hnsw":
            for index in self._indexes:
                faiss.downcast_index(index.quantizer).hnsw.efSearch = self._ef_search

    @property
    def trained(self) -> bool:
        return bool(self._indexes[0].is_trained)

    @property
    def ntotal(self) -> int:
        return int(self._indexes[0].ntotal)

    # -- content -------------------------------------------------------------------
    def train(self, keys: np.ndarray) -> None:
        """`keys [H, n, D]` float32: k-means per head on these chunk keys."""
        for index, x in zip(self._indexes, keys):
            index.train(np.ascontiguousarray(x, dtype=np.float32))
        if self.quantizer == "hnsw":
            self.ef_search = self._ef_search  # the trained quantizer is a fresh graph

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """`slots [n]` int64 ids, `keys [H, n, D]` float32."""
        ids = np.ascontiguousarray(slots, dtype=np.int64)
        for index, x in zip(self._indexes, keys):
            index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)

    def remove(self, slots: np.ndarray) -> None:
        """Drop these ids from every head; O(len(slots)) through the hash-table map."""
        sel = faiss.IDSelectorArray(np.ascontiguousarray(slots, dtype=np.int64))
        for index in self._indexes:
            index.remove_ids(sel)

    def ids(self, head: int) -> np.ndarray:
        """Every id stored in head `head`'s inverted lists (sorted int64)."""
        lists = self._indexes[head].invlists
        out = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
               for i in range(self.nlist) if lists.list_size(i)]
        return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """`queries [H, Tq, D]` float32 -> ids `[H, Tq, k]` int64, best first, -1 where an
        index has fewer than k candidates in the probed lists."""
        out = np.empty((self.num_heads, queries.shape[1], k), dtype=np.int64)
        for h, index in enumerate(self._indexes):
            _, out[h] = index.search(np.ascontiguousarray(queries[h], dtype=np.float32), k)
        return out

    def reset(self) -> None:
        """Forget the contents and the training (a new document may cluster differently)."""
        self._indexes = [self._new_index() for _ in range(self.num_heads)]

    def nbytes(self) -> int:
        """Approximate resident size: codes, ids, hash-map entries, centroids."""
        per = self._indexes[0].code_size + 8 + 32  # code, id, ~unordered_map node
        return self.num_heads * (self.ntotal * per + self.nlist * self.dim * 4)

    # -- persistence ---------------------------------------------------------------
    def serialize(self) -> list[np.ndarray]:
        """One uint8 array per head (faiss's own format, direct map included)."""
        return [faiss.serialize_index(index) for index in self._indexes]

    def load_serialized(self, blobs: list[np.ndarray]) -> None:
        if len(blobs) != self.num_heads:
            raise MemoryBankError(f"saved bank has {len(blobs)} IVF indexes, expected {self.num_heads}")
        try:
            indexes = [faiss.deserialize_index(b) for b in blobs]  # already the concrete class
        except RuntimeError as e:
            raise MemoryBankError(f"saved IVF index cannot be read ({str(e).splitlines()[0][:200]})") from None
        for index in indexes:
            if (not isinstance(index, faiss.IndexIVF) or index.d != self.dim or index.nlist != self.nlist
                    or not index.is_trained):
                raise MemoryBankError("saved IVF index does not match the bank's dim/nlist")
            index.nprobe = self._nprobe
        self._indexes = indexes
        self.ef_search = self._ef_search
