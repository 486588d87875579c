"""`BackboneMemory`: memory read by the frozen backbone's own attention, with no training.

The side network's memory attention has to be trained to read memory, which this CPU
cannot do at scale. The backbone's own attention already knows how to read keys and
values it wrote itself; it only lacks them once they leave its window. So blocks
`layers` each keep a chunked bank (one per sequence) of their own pre-rotary keys/values,
and in each of those blocks every query also attends to the top `k_chunks` chunks it
retrieves from its block's bank, in one softmax with its local causal attention:

    a' = a + w * (a_mem - a),   w = sigmoid(lse_mem - lse_local)   per query and head

which is exactly the attention over [retrieved memory; local window]. Memory keys are
scored as if they sat `distance` tokens before the query (rotary at that relative
offset; a checkpoint's default is 3/4 of its window, chosen by measurement on the validation
books, experiments/backbone_memory_k_bound.py): to the block they look like text that has
just left its window, which is what they are. A block may carry a trained query map
`A [H, D, D]` (`query_maps`, zero when untrained): memory is then searched and scored with
`q + q A_h^T` per head, while the local attention keeps the block's own query; training
(longside/training/query_maps.py) fits A to the long-context teacher's attention output at
that block, with no gradient through the backbone. The edited output goes into the residual stream,
so every block above reads it as usual. Segments start at position 0, and their first
`sink_tokens` tokens act as attention sinks; they are not written to memory, where
every old segment's sink would otherwise outscore the text.

Llama-style backbones only (rotary, plain causal attention scaled by 1/sqrt(D)).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

import torch

from longside.backbone import Backbone
from longside.errors import LongsideError
from longside.memory_bank import BatchMemory
from longside.nn.attention import attend_retrieved, causal_lse


READ_SLICE = 128  # query tokens retrieved and attended at a time in a forward of many


class BackboneMemory:
    """Per-block memory banks for a batch of sequences, read inside the backbone.

    Use: `seg = bm.segment()`, then `with bm.attach(seg, read=True): backbone.encode(ids)`
    runs one forward whose blocks `layers` read memory and record the new tokens'
    keys/values in `seg`; `write(seg)` appends them to the banks. Tokens fed in several
    forwards of one segment (incremental decoding) accumulate in its `Segment`, so each
    open window keeps its own and nothing else can disturb it.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[int], batch_size: int, *, k_chunks: int = 16,
                 distance: int = 1024, chunk_size: int = 4, capacity_tokens: int = 65536, index: str = "flat",
                 sink_tokens: int = 4, query_maps: dict[int, torch.Tensor] | None = None):
        spec = backbone.spec
        if spec.family != "llama":
            raise LongsideError(f"backbone memory reads inside Llama-style attention only; {backbone.name!r} is "
                                f"{spec.family!r}: set backbone_memory_layers to [] for it")
        bad = [L for L in layers if not 0 <= L < spec.num_layers]
        if bad or not layers:
            raise LongsideError(f"backbone memory layers must be blocks 0..{spec.num_layers - 1}, got {list(layers)}")
        if k_chunks < 1 or distance < 0 or sink_tokens < 0:
            raise LongsideError("backbone memory needs k_chunks >= 1, distance >= 0 and sink_tokens >= 0")
        self.backbone, self.layers = backbone, sorted(set(layers))
        self.k_chunks, self.distance, self.sink_tokens = k_chunks, distance, sink_tokens
        self.query_maps: dict[int, torch.Tensor] = {}
        for L, A in (query_maps or {}).items():
            if L not in self.layers:
                continue  # a map for a block that does not read memory now: unused
            if tuple(A.shape) != (spec.num_heads, spec.head_dim, spec.head_dim):
                raise LongsideError(f"query map of block {L} is {tuple(A.shape)}, expected "
                                    f"[{spec.num_heads}, {spec.head_dim}, {spec.head_dim}] for this backbone")
            self.query_maps[L] = A.detach().float().to(backbone.device)
        self._rotated_maps: dict[int, torch.Tensor] = {}  # the maps in the rotated frame (C decode step)
        self.banks = {L: BatchMemory(batch_size, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                     chunk_size=chunk_size, capacity_tokens=capacity_tokens, index=index,
                                     owner=backbone.owner_id(L), device=backbone.device)
                      for L in self.layers}

    @classmethod
    def from_config(cls, backbone: Backbone, config, rows: int,
                    query_maps: dict[int, torch.Tensor] | None = None) -> "BackboneMemory":
        """Backbone memory of `rows` sequences as a model's `SideNetConfig` sets it
        (`backbone_memory_*`, chunk size, capacity, index; distance 0 means 3/4 of the window)."""
        return cls(backbone, config.backbone_memory_layers, rows, k_chunks=config.backbone_memory_k_chunks,
                   distance=config.backbone_memory_distance or config.window * 3 // 4, chunk_size=config.chunk_size,
                   capacity_tokens=config.capacity_tokens, index=config.index, query_maps=query_maps)

    def __len__(self) -> int:
        return len(self.banks[self.layers[0]])

    def maps_digest(self) -> str | None:
        """A short sha256 of the query maps this memory reads with (None: none, every block
        reads with its own query). Keys written above a mapped block depend on its map, so a
        saved memory records this and is refused by a model reading with other maps."""
        if not self.query_maps:
            return None
        h = hashlib.sha256()
        for L, A in sorted(self.query_maps.items()):
            h.update(f"{L}:".encode())
            h.update(A.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def lengths(self) -> list[int]:
        """Tokens stored per row (the same in every block)."""
        return self.banks[self.layers[0]].lengths()

    def segment(self, rows: Sequence[int] | None = None) -> "Segment":
        """A new, empty segment whose batch row b belongs to memory row `rows[b]` (default b)."""
        return Segment(list(range(len(self))) if rows is None else list(rows))

    @contextlib.contextmanager
    def attach(self, seg: "Segment", read: bool = True) -> Iterator[None]:
        """Hooks for the forwards inside the `with`: blocks record the new tokens'
        keys/values in `seg` and, with `read`, attend to memory."""
        handles = []
        try:
            for L in self.layers:
                handles += self.backbone.edit_attention(L, self._editor(L, seg, read))
            yield
        finally:
            for h in handles:
                h.remove()

    def block_reads(self, seg: "Segment", read: bool = True) -> "BlockReads":
        """What `Backbone.encode` needs to let the blocks read memory in a forward (as `attach`),
        without hooks where a decode step runs in C."""
        return BlockReads(self, seg, read)

    def write(self, seg: "Segment", skip: int = 0) -> None:
        """Append `seg` to the banks of its rows, and empty it: all but its first `skip` tokens
        (already in memory: a carried window's) and its sink tokens."""
        first = max(self.sink_tokens, skip)
        for L in seg.layers():
            k, v, _ = seg.window(L)
            k, v = k[:, first:], v[:, first:]
            for b, r in enumerate(seg.rows):
                self.banks[L][r].add(k[b], v[b])
        seg.clear()

    def reset(self, rows=None) -> None:
        """Clear the banks of `rows` (all when None)."""
        rows = None if rows is None or isinstance(rows, torch.Tensor) else list(rows)
        for bank in self.banks.values():
            bank.reset(rows)

    def memory_query(self, L: int, q: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:
        """Block `L`'s memory query `[B, T, H, D]` (pre-rotary, rotated at `distance`): its
        own query `q [B, T, H, D]` through its query map (`A`, default the stored one)."""
        A = self.query_maps.get(L) if A is None else A
        if A is not None:
            q = q + torch.einsum("bthd,hed->bthe", q, A.to(q.dtype))
        return self.backbone.rotate(q, torch.full(q.shape[:2], self.distance, device=q.device), L)

    def map_rotated_query(self, L: int, qm: torch.Tensor) -> None:
        """Apply block `L`'s query map in place to `qm [B, T, H, D]`, the block's own query
        already rotated at `distance` (the C decode step's): rotation is linear, x -> x R with
        R = rotate(I), so rotate(q + q A^T) = qm + qm R^-1 A^T R (R^-1 = R^T for plain rotary;
        the inverse also holds where a rope scaling folds a factor into cos and sin)."""
        A = self.query_maps.get(L)
        if A is None:
            return
        Bm = self._rotated_maps.get(L)
        if Bm is None:
            D = A.shape[-1]
            eye = torch.eye(D, device=A.device).view(1, D, 1, D)
            R = self.backbone.rotate(eye, torch.full((1, D), self.distance, device=A.device), L)[0, :, 0]  # x @ R
            Bm = self._rotated_maps[L] = torch.linalg.inv(R) @ A.transpose(1, 2) @ R  # [H, D, D]: qm' = qm + qm @ Bm[h]
        qm += torch.einsum("bthd,hde->bthe", qm, Bm.to(qm.dtype))

    # -- the edit inside one block -------------------------------------------------------
    def _editor(self, L: int, seg: "Segment", read: bool):
        def edit(kv: dict) -> torch.Tensor | None:
            q, k, v, a = kv["q"], kv["k"], kv["v"], kv["a"]
            if k.shape[0] != len(seg.rows):
                raise LongsideError(f"a forward of {k.shape[0]} rows on a segment of {len(seg.rows)} memory rows")
            window_kr = self.record_tokens(L, seg, k, v)
            if not read:
                return None
            return self.read(L, seg.rows, q, window_kr, a)
        return edit

    def record_tokens(self, L: int, seg: "Segment", k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Record block `L`'s new tokens' pre-rotary `k, v [B, T, G, D]` in `seg` -> the
        segment's keys so far rotated at their positions, `[B, P+T, G, D]`."""
        B, T = k.shape[:2]
        P = seg.length(L)
        # rotated once, at its position in the segment: decoding a token does not
        # rotate the whole window again
        kr = self.backbone.rotate(k, torch.arange(P, P + T, device=k.device).expand(B, T), L)
        return seg.append(L, k, v, kr)[2]

    def read(self, L: int, rows: list[int], q: torch.Tensor, window_kr: torch.Tensor,
              a: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor | None:
        """q, a `[B, T, H, D]` of the new tokens at positions P..P+T-1; window_kr `[B, P+T, G,
        D]` the segment's keys so far, rotated at their positions -> the edited attention output.
        `A`: a query map to read with instead of the stored one (training: gradients reach it,
        through the scores of the retrieved keys; retrieval itself is not differentiable)."""
        B, T, H, D = q.shape
        banks = self.banks[L]
        if not any(len(banks[r]) for r in rows):
            return None
        bb = self.backbone
        qm = self.memory_query(L, q, A)
        P = window_kr.shape[1] - T
        local = causal_lse(bb.rotate(q, torch.arange(P, P + T, device=q.device).expand(B, T), L), window_kr)
        out, parts = torch.empty_like(a), []
        # a segment's queries a slice at a time: all 1,024 at once would retrieve 150 MB of
        # float32 keys/values per block (16 chunks of 4 for each of 9 heads), fresh memory each
        for t in range(0, T, READ_SLICE):
            s = slice(t, t + READ_SLICE)
            keys, values, mask = banks.search(qm[:, s].detach(), self.k_chunks, rows=rows)  # [B, t, H, S, D], [B, t, H, S]
            a_mem, lse_mem, has = attend_retrieved(qm[:, s], keys, values, mask)
            part = a[:, s] + torch.sigmoid(lse_mem - local[:, s]) * has * (a_mem - a[:, s])
            if part.requires_grad:  # training a query map: no in-place writes into the graph
                parts.append(part)
            else:
                out[:, s] = part
        return torch.cat(parts, 1) if parts else out


class BlockReads:
    """One forward's reads of backbone memory (`BackboneMemory.block_reads`). The C decode step
    (backbone/decode_step.py) runs the blocks and calls `search` between them, at the blocks
    `layers` when `reads()`, then `record`s each block's new keys/values in the segment;
    any other forward uses `attach()`'s hooks. Both give the attention of `_read`."""

    def __init__(self, bm: BackboneMemory, seg: "Segment", read: bool):
        self.bm, self.seg, self.read = bm, seg, read
        self.layers, self.distance = bm.layers, bm.distance

    def attach(self):
        return self.bm.attach(self.seg, self.read)

    def reads(self) -> bool:
        """Whether memory is read in this forward (reading on, and some row's bank holds tokens)."""
        banks = self.bm.banks[self.layers[0]]
        return self.read and any(len(banks[r]) for r in self.seg.rows)

    def search(self, layer: int, qm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block `layer`'s retrieval for memory queries `qm [B, 1, H, D]` (pre-rotary queries
        rotated at `distance`): keys, values `[B, 1, H, M, D]` float32, mask `[B, 1, H, M]` bool.
        A block with a query map maps `qm` first, in place: the C step scores memory with it."""
        self.bm.map_rotated_query(layer, qm)
        return self.bm.banks[layer].search(qm, self.bm.k_chunks, rows=self.seg.rows)

    def record(self, layer: int, k: torch.Tensor, v: torch.Tensor, kr: torch.Tensor) -> None:
        """Block `layer`'s new tokens' pre-rotary `k, v` and rotated `kr`, each `[B, T, G, D]`
        (the C step has checked B against the segment's rows before it ran)."""
        self.seg.append(layer, k, v, kr)


class Segment:
    """The segment being read: its memory rows and, per block, its tokens' pre-rotary keys
    and values and their keys rotated at their positions (what `causal_lse` scores), each
    `[B, n, G, D]`. They grow in buffers of doubling capacity, so that decoding one token
    appends to the window instead of copying it."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        self._buffers: dict[int, list[torch.Tensor]] = {}  # block -> [k, v, k rotated]
        self._lengths: dict[int, int] = {}

    def layers(self) -> list[int]:
        """Blocks that recorded tokens in this segment."""
        return list(self._buffers)

    def length(self, layer: int) -> int:
        """Tokens recorded by block `layer` (0 when none)."""
        return self._lengths.get(layer, 0)

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block `layer`'s keys, values and rotated keys `[B, n, G, D]` so far (views)."""
        n = self._lengths[layer]
        return tuple(t[:, :n] for t in self._buffers[layer])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, kr: torch.Tensor):
        """Record `k, v, kr [B, T, G, D]` of block `layer`'s new tokens; returns `window(layer)`."""
        n, T = self.length(layer), k.shape[1]
        bufs = self._buffers.get(layer)
        if bufs is None or n + T > bufs[0].shape[1]:
            cap = max(n + T, 2 * (bufs[0].shape[1] if bufs else 0), 64)
            new = [t.new_empty(t.shape[0], cap, *t.shape[2:]) for t in (k, v, kr)]
            for old, t in zip(bufs or (), new):
                t[:, :n] = old[:, :n]
            bufs = self._buffers[layer] = new
        for buf, t in zip(bufs, (k, v, kr)):
            buf[:, n:n + T] = t
        self._lengths[layer] = n + T
        return self.window(layer)

    def clear(self) -> None:
        """Forget every recorded token (after `BackboneMemory.write`)."""
        self._buffers, self._lengths = {}, {}

    def fork(self) -> "Segment":
        """An independent copy: appends to one never show in the other."""
        twin = Segment(list(self.rows))
        for L in self.layers():
            twin._buffers[L] = [t.clone() for t in self.window(L)]
            twin._lengths[L] = self._lengths[L]
        return twin


__all__ = ["BackboneMemory", "BlockReads", "Segment"]
