"""`RaggedWindows`: decode many sequences together, each at its own length, with its own memory.

A `LocalWindow` decodes a batch in lockstep: every row sits at the same position of its
segment. A server's users do not: one has 900 tokens in its window, another 12, and each
reads its own memory bank. Here each row joins with the state of its own batch-1
`LocalWindow` (after reading its prompt there) and leaves with it, and between the two
every `step` feeds one token per row through backbone and side network as one batch:

    columns 0..S-1 of every cache are shared; row b's real tokens are its last n_b
        columns (padding on the left), at positions 0..n_b-1 of its segment;
    a step writes column S for every row; `key_mask [B, S+1]` hides each row's padding
        from the backbone's attention, the side blocks' and the memory layer's causal
        softmax; positions, rotary angles and memory retrieval are per row;
    a row whose segment fills writes it to its own bank and restarts at n_b = 0 (its old
        columns become padding), or, with a carried window (`config.window_carry` = c),
        at n_b = c: its own window reads the old segment's last c tokens again and they take
        the row's last c columns; columns no row uses are dropped now and then.

`feed` reads several tokens per row at once, as many as each row has (users joining with
prompts of different lengths, read together instead of one by one): the T new columns
hold row b's t_b tokens at their end, padding before them (a padding column sees the
row's earlier tokens and itself, never an empty softmax, and no real token sees it; its
retrievals do not count as bank hits), and afterwards row b's earlier columns move right
past that padding, so its real tokens are again its last n_b columns.

A row's logits equal those its own `LocalWindow` would give to float rounding (tested),
so rows never see each other. Llama-family backbones without backbone memory take the
batched path (the lean decode step of backbone/decode_step.py); others step row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from longside.backbone import BackboneOutput
from longside.backbone.decode_step import llama_step
from longside.errors import LongsideError
from longside.inference.window import LocalWindow
from longside.memory import Memory
from longside.nn.growing import Room, append
from longside.nn.memory_attention import memory_inputs

if TYPE_CHECKING:
    from longside.model import LongSideModel

# columns that no row uses any more are dropped once this many have gathered
_COMPACT_AT = 64
# at most this many tokens per row in one `feed` step (bounds the [B, heads, T, S] scores)
FEED_TOKENS = 128
# prompts of up to this many tokens are read on the batch's path (`read_prompt`, and several
# users' together in the server); a longer one by its own window, whose BLAS products
# already have rows enough
PROMPT_TOKENS = 512


class _Cache:
    """The backbone's key/value cache for rows padded on the left: per block, keys and
    values `[B, G, capacity, D]` of which the first `length` columns are used. Written in
    place (a DynamicCache would copy the whole cache at every step)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values = keys, values
        self.lengths = [length] * len(keys)

    def get_seq_length(self) -> int:
        return self.lengths[0]

    def _reserve(self, layer: int, T: int) -> None:
        n = self.lengths[layer]
        if n + T > self.keys[layer].shape[2]:
            grow = max(n + T, 2 * self.keys[layer].shape[2], 64)
            for store in (self.keys, self.values):
                old = store[layer]
                store[layer] = old.new_zeros(old.shape[0], old.shape[1], grow, old.shape[3])
                store[layer][:, :, :n] = old[:, :, :n]

    def rooms(self, T: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every block's key and value buffers `[B, G, capacity, D]` (contiguous), with room
        for T more columns after the `length` used (the decode step's C path writes them in
        place, then calls `advance(T)`); None where they are not laid out so."""
        for layer in range(len(self.keys)):
            self._reserve(layer, T)
        rooms = list(zip(self.keys, self.values))
        if len(set(self.lengths)) != 1 or not all(k.is_contiguous() and v.is_contiguous() for k, v in rooms):
            return None
        return rooms

    def advance(self, T: int) -> None:
        self.lengths = [n + T for n in self.lengths]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        """Append `k, v [B, G, T, D]` to block `layer` -> its keys, values `[B, G, S, D]`."""
        n, T = self.lengths[layer], k.shape[2]
        self._reserve(layer, T)
        self.keys[layer][:, :, n:n + T] = k
        self.values[layer][:, :, n:n + T] = v
        self.lengths[layer] = n + T
        return self.keys[layer][:, :, :n + T], self.values[layer][:, :, :n + T]

    def columns(self, layer: int, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, sl], self.values[layer][:, :, sl]


@dataclass
class _Row:
    """A row's own state; for rows that step one by one, `window` holds it (n, carried and
    segments_written here are then those it joined with)."""

    memory: Memory
    n: int  # tokens in the row's current segment (its last n columns)
    segments_written: int
    carried: int = 0  # of the n, how many the segment before ended with (already in memory)
    window: LocalWindow | None = None  # the row's own window, when rows step one by one
    own_memory: bool = True  # False: the row reads the model's memory (`LocalWindow(memory=None)`)


def batched_path(model: "LongSideModel") -> bool:
    """Whether rows of `model` can step as one batch (else they step one by one)."""
    return model.backbone.spec.family == "llama" and not model.config.backbone_memory_layers


def read_prompt(window: LocalWindow, ids: torch.Tensor) -> tuple[LocalWindow, torch.Tensor]:
    """Read a batch-1 window's new tokens `ids [1, T]` -> (the window after them, logits
    `[1, V]` after the last). Up to PROMPT_TOKENS tokens on the batch's path (a
    `RaggedWindows` of one row): the products decode steps use, so a reply is the same read
    here, alone in `longside serve` or among other users' prompts there (to float rounding),
    and 2-4x sooner than the window's exact read (`python experiments/serve_profile.py
    prefill`). Longer ones, other windows and models without the batched path: `window.feed`.
    Use the returned window afterwards, not the one passed in."""
    if window.batch_size != 1 or ids.shape[1] > PROMPT_TOKENS or window.backbone_segment is not None \
            or not batched_path(window.model):
        return window, window.feed(ids)
    group = RaggedWindows(window.model, use_memory=window.use_memory, write_memory=window.write_memory)
    group.join(window)
    logits = group.feed([ids[0]])
    return group.leave(0), logits


class RaggedWindows:
    """Rows that decode together, each with its own length and memory (see the module docstring).

    `join(window) -> row index` takes over a batch-1 `LocalWindow` (its caches, its
    memory); `step(ids [B]) -> logits [B, V]` float32 feeds one token per row; `feed([ids_b])`
    any number per row; `leave(i)` gives the row back as a `LocalWindow` and the rows after
    it move up by one.
    """

    def __init__(self, model: "LongSideModel", *, use_memory: bool = True, write_memory: bool = True):
        self.model, self.use_memory, self.write_memory = model, use_memory, write_memory
        self.window, self.carry = model.config.window, model.config.window_carry  # config: carry < window
        self.batched = batched_path(model)
        self.rows: list[_Row] = []
        self._empty()

    def _empty(self) -> None:
        spec, dev, dt = self.model.backbone.spec, self.model.backbone.device, torch.float32
        G, D = spec.num_kv_heads, spec.head_dim
        L = spec.num_layers
        self.cache = _Cache([torch.zeros(0, G, 0, D, device=dev, dtype=dt) for _ in range(L)],
                            [torch.zeros(0, G, 0, D, device=dev, dtype=dt) for _ in range(L)], 0)
        side = self.model.side
        hd, blocks = side.blocks[0].head_dim, len(side.blocks)
        self.side_caches = [(torch.zeros(0, G, 0, hd, device=dev), torch.zeros(0, G, 0, hd, device=dev))
                            for _ in range(blocks)]
        self.ids = torch.zeros(0, 0, dtype=torch.long, device=dev)
        self.keys = torch.zeros(0, 0, G, D, device=dev)
        self.values = torch.zeros_like(self.keys)
        self.token_keys = torch.zeros(0, 0, spec.hidden_size, device=dev) if self.model.config.token_cache else None
        self._grown: dict[str, Room] = {}  # the buffers behind ids, keys, values, token_keys
        # (rows joining or leaving and columns dropped make new tensors: they continue in new buffers)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        """S: columns of every cache (the longest row's tokens plus padding)."""
        return self.ids.shape[1]

    # -- rows coming and going -------------------------------------------------------
    def join(self, window: LocalWindow) -> int:
        """Take over `window` (batch 1, with its own memory) as a new last row -> its index."""
        if window.batch_size != 1:
            raise LongsideError(f"a row joins from a batch-1 window, got a batch of {window.batch_size}")
        window._check_current()  # a window made under other settings must not carry them into the batch
        if window.backbone_segment is not None:
            raise LongsideError("windows with backbone memory step one by one; they cannot join a batch")
        row = _Row(window.memory, window.n, window.segments_written, window.carried,
                   own_memory=window._own_memory is not None)
        if not self.batched:
            row.window = window
            self.rows.append(row)
            return len(self.rows) - 1
        S = max(window.n, self.columns)
        if S > self.columns:
            self._pad_left(S - self.columns)
        spec = self.model.backbone.spec

        def empty_row(t: torch.Tensor, dim: int) -> torch.Tensor:
            """`t`'s first S columns along `dim`, with one more row of zeros."""
            t = t.narrow(dim, 0, S)
            return torch.cat([t, t.new_zeros((1, *t.shape[1:]))])

        for i in range(spec.num_layers):
            self.cache.keys[i], self.cache.values[i] = empty_row(self.cache.keys[i], 2), empty_row(self.cache.values[i], 2)
        self.cache.lengths = [S] * spec.num_layers
        self.side_caches = [(empty_row(k, 2), empty_row(v, 2)) for k, v in self.side_caches]
        self.ids, self.keys, self.values = (empty_row(t, 1) for t in (self.ids, self.keys, self.values))
        if self.token_keys is not None:
            self.token_keys = empty_row(self.token_keys, 1)
        self.rows.append(row)
        self._place(len(self.rows) - 1, window)
        return len(self.rows) - 1

    def _place(self, b: int, window: LocalWindow) -> None:
        """Copy a batch-1 window's n tokens into row `b`'s last n columns (S >= n; the row's
        other columns are padding)."""
        n, S = window.n, self.columns
        if not n:
            return
        cols = slice(S - n, S)
        for i in range(len(self.cache.keys)):
            self.cache.keys[i][b, :, cols] = window.cache.layers[i].keys[0]
            self.cache.values[i][b, :, cols] = window.cache.layers[i].values[0]
        for (k, v), (wk, wv) in zip(self.side_caches, window.side_caches):
            k[b, :, cols], v[b, :, cols] = wk[0], wv[0]
        self.ids[b, cols] = window.ids[0]
        self.keys[b, cols], self.values[b, cols] = window.keys[0], window.values[0]
        if self.token_keys is not None:
            self.token_keys[b, cols] = window.token_keys[0]

    def leave(self, i: int) -> LocalWindow:
        """Remove row `i` -> its state as a batch-1 `LocalWindow` (its own memory)."""
        if not 0 <= i < len(self.rows):
            raise LongsideError(f"row {i} out of range: {len(self.rows)} row(s) decode together")
        row = self.rows.pop(i)
        if row.window is not None:
            return row.window
        model, S, n = self.model, self.columns, row.n
        win = LocalWindow(model, 1, use_memory=self.use_memory, write_memory=self.write_memory,
                          memory=row.memory if row.own_memory else None)
        win.segments_written, win.carried = row.segments_written, row.carried
        if n:
            cols = slice(S - n, S)
            cache = DynamicCache()
            for L in range(model.backbone.spec.num_layers):
                k, v = self.cache.columns(L, cols)
                cache.update(k[i:i + 1].clone(), v[i:i + 1].clone(), L)
            win.cache = cache
            win.side_caches = [(k[i:i + 1, :, cols].clone(), v[i:i + 1, :, cols].clone()) for k, v in self.side_caches]
            win.ids = self.ids[i:i + 1, cols].clone()
            win.keys, win.values = self.keys[i:i + 1, cols].clone(), self.values[i:i + 1, cols].clone()
            if self.token_keys is not None:
                win.token_keys = self.token_keys[i:i + 1, cols].clone()
        if not self.rows:
            self._empty()
            return win
        keep = torch.tensor([r for r in range(len(self.rows) + 1) if r != i], device=self.ids.device)
        self._select(keep)
        self._compact()
        return win

    def _select(self, rows: torch.Tensor) -> None:
        S = self.columns
        for L in range(len(self.cache.keys)):
            self.cache.keys[L] = self.cache.keys[L][:, :, :S].index_select(0, rows)
            self.cache.values[L] = self.cache.values[L][:, :, :S].index_select(0, rows)
        self.side_caches = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.side_caches]
        self.ids, self.keys, self.values = (t.index_select(0, rows) for t in (self.ids, self.keys, self.values))
        if self.token_keys is not None:
            self.token_keys = self.token_keys.index_select(0, rows)

    def _pad_left(self, p: int) -> None:
        """Add `p` padding columns on the left of every row."""
        S = self.columns

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = p
            return torch.cat([t.new_zeros(shape), t], dim)

        for L in range(len(self.cache.keys)):
            self.cache.keys[L] = pad(self.cache.keys[L][:, :, :S], 2)
            self.cache.values[L] = pad(self.cache.values[L][:, :, :S], 2)
        self.cache.lengths = [S + p] * len(self.cache.keys)
        self.side_caches = [(pad(k, 2), pad(v, 2)) for k, v in self.side_caches]
        self.ids, self.keys, self.values = pad(self.ids, 1), pad(self.keys, 1), pad(self.values, 1)
        if self.token_keys is not None:
            self.token_keys = pad(self.token_keys, 1)

    def _compact(self, at_least: int = 1) -> None:
        """Drop the leading columns that no row uses, once there are `at_least` of them."""
        S = self.columns
        drop = S - max((r.n for r in self.rows), default=0)
        if not self.batched or drop < at_least:
            return
        keep = slice(drop, S)
        for L in range(len(self.cache.keys)):
            self.cache.keys[L] = self.cache.keys[L][:, :, keep].contiguous()
            self.cache.values[L] = self.cache.values[L][:, :, keep].contiguous()
        self.cache.lengths = [S - drop] * len(self.cache.keys)
        self.side_caches = [(k[:, :, keep].contiguous(), v[:, :, keep].contiguous()) for k, v in self.side_caches]
        self.ids, self.keys, self.values = (t[:, keep].contiguous() for t in (self.ids, self.keys, self.values))
        if self.token_keys is not None:
            self.token_keys = self.token_keys[:, keep].contiguous()

    # -- decoding --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, `ids [B]` int64 -> each row's next-token logits `[B, V]` float32."""
        B = len(self.rows)
        if B == 0:
            raise LongsideError("no rows to step: join a window first")
        ids = ids.reshape(-1).to(self.ids.device, torch.long)
        if ids.shape[0] != B:
            raise LongsideError(f"one token per row: expected {B}, got {ids.shape[0]}")
        if not self.batched:
            return torch.cat([r.window.feed(ids[b:b + 1, None]) for b, r in enumerate(self.rows)])
        S, dev = self.columns + 1, self.ids.device
        n = torch.tensor([r.n for r in self.rows], device=dev)  # positions of the new tokens
        first = S - 1 - n  # each row's first real column
        cols = torch.arange(S, device=dev)
        key_mask = cols[None] >= first[:, None]  # [B, S]
        key_pos = (cols[None] - first[:, None]).clamp(min=0)
        pos = n[:, None]
        memory = Memory.stack([r.memory for r in self.rows])
        h, tok_keys = self._forward(ids[:, None], pos, key_mask, key_pos, memory)
        for row in self.rows:
            row.n += 1
        return self._read_out(h, tok_keys, memory)

    @torch.no_grad()
    def feed(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Feed each row its own tokens, `ids[b] [T_b]` int64 (T_b >= 1, lengths may differ),
        together -> each row's next-token logits after its last token `[B, V]` float32. Each
        row splits at its segment boundaries as `LocalWindow.feed` does; a row whose tokens
        are all read waits as padding while longer ones go on."""
        B = len(self.rows)
        if B == 0:
            raise LongsideError("no rows to feed: join a window first")
        if len(ids) != B:
            raise LongsideError(f"one sequence of token ids per row: expected {B}, got {len(ids)}")
        ids = [t.reshape(-1).to(self.ids.device, torch.long) for t in ids]
        if any(t.numel() == 0 for t in ids):
            raise LongsideError("every row needs at least one token to feed")
        if not self.batched:
            return torch.cat([r.window.feed(t[None]) for r, t in zip(self.rows, ids)])
        logits: list[torch.Tensor | None] = [None] * B
        done = [0] * B
        while any(d < len(t) for d, t in zip(done, ids)):
            take = [min(len(t) - d, self.window - r.n, FEED_TOKENS) for t, d, r in zip(ids, done, self.rows)]
            out = self._feed_step([t[d:d + k] for t, d, k in zip(ids, done, take)])
            for b, k in enumerate(take):
                done[b] += k
                if k and done[b] == len(ids[b]):
                    logits[b] = out[b]
        return torch.stack(logits)

    def _feed_step(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Row b reads `chunks[b]` (t_b tokens, 0 <= t_b <= its segment's room) -> logits
        `[B, V]` after each row's last column (meaningful where t_b > 0)."""
        dev = self.ids.device
        B, S = len(self.rows), self.columns
        t = torch.tensor([len(c) for c in chunks], device=dev)
        T = int(t.max())
        n = torch.tensor([r.n for r in self.rows], device=dev)
        new = torch.zeros(B, T, dtype=torch.long, device=dev)
        for b, c in enumerate(chunks):
            new[b, T - len(c):] = c
        j = torch.arange(T, device=dev)
        pad = T - t  # padding columns before each row's new tokens
        pos = (n[:, None] + j[None] - pad[:, None]).clamp(min=0)  # [B, T]
        cols = torch.arange(S + T, device=dev)
        filled = ((cols[None] >= (S - n)[:, None]) & (cols[None] < S)) | (cols[None] >= (S + pad)[:, None])
        own = cols[None] == (S + j)[:, None]  # [T, S+T]
        key_mask = ((cols[None] <= (S + j)[:, None])[None] & filled[:, None]) | own[None]  # [B, T, S+T]
        key_pos = torch.cat([(cols[None, :S] - (S - n)[:, None]).clamp(min=0), pos], 1)
        memory = Memory.stack([r.memory for r in self.rows])
        h, tok_keys = self._forward(new, pos, key_mask, key_pos, memory, real=j[None] >= pad[:, None])
        for b, row in enumerate(self.rows):
            if row.n and pad[b]:  # the row's earlier tokens move up to its new ones
                self._shift_row(b, S - row.n, S, int(pad[b]))
            row.n += len(chunks[b])
        return self._read_out(h, tok_keys, memory)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, key_pos: torch.Tensor,
                 memory: Memory, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`ids [B, T]` at `pos [B, T]` through backbone, memory read and side network,
        appended to every cache -> the side network's output `[B, T, d]` and the token-cache
        keys `[B, T, d]` (or None). `key_mask [B, S+T]` or `[B, T, S+T]`; `key_pos [B, S+T]`;
        `real [B, T]` bool: which new tokens are not padding (their retrievals alone count
        in a bank's hit counters, so a row's stored state never depends on the others)."""
        model, bb = self.model, self.model.backbone
        out = BackboneOutput.of_step(llama_step(bb, ids, pos, self.cache, model.config.memory_layer, key_mask),
                                     self.cache)
        self.ids = append(self._grown, "ids", self.ids, ids)
        self.keys = append(self._grown, "keys", self.keys, out.memory_keys)
        self.values = append(self._grown, "values", self.values, out.memory_values)
        mem = None
        if self.use_memory and not memory.is_empty():  # an empty memory adds exactly nothing
            k = model.config.k_chunks
            mem = memory_inputs(bb, out, model.config.memory_layer, lambda q: memory.search(q, k, real),
                                window_keys=self.keys, positions=pos, key_positions=key_pos, key_mask=key_mask)
        h, self.side_caches = model.side(out.states, mem, caches=self.side_caches, positions=pos,
                                         key_mask=key_mask)
        tok_keys = model.token_keys(out)
        if tok_keys is not None:
            self.token_keys = append(self._grown, "token_keys", self.token_keys, tok_keys)
        return h, tok_keys

    def _read_out(self, h: torch.Tensor, tok_keys: torch.Tensor | None, memory: Memory) -> torch.Tensor:
        """After `_forward` (each row's n counting its new tokens): the logits `[B, V]` after
        every row's last column; then rows whose segment is complete write it to memory."""
        hits = None
        if self.use_memory and not memory.is_empty():
            # a row waiting in `feed` right after its segment ended has no tokens: its logits
            # are not used, but the exact-match read needs one token to look up
            contexts = [self.ids[b, self.columns - max(r.n, 1):] for b, r in enumerate(self.rows)]
            hits = self.model.search_tokens(None if tok_keys is None else tok_keys[:, -1:], contexts, memory)
        logits = self.model.output(h[:, -1:], hits)[:, -1]
        for b, row in enumerate(self.rows):
            if row.n == self.window:  # the row's segment is complete: it leaves the window
                self._flush(b)
        self._compact(_COMPACT_AT)
        return logits

    def _shift_row(self, b: int, start: int, end: int, by: int) -> None:
        """Move row `b`'s columns [start, end) of every cache `by` columns to the right."""
        def move(t: torch.Tensor, dim: int) -> None:
            row = t[b]
            row.narrow(dim, start + by, end - start).copy_(row.narrow(dim, start, end - start).clone())

        for store in (self.cache.keys, self.cache.values):
            for L in range(len(store)):
                move(store[L], 1)
        for k, v in self.side_caches:
            move(k, 1)
            move(v, 1)
        for t in (self.ids, self.keys, self.values, self.token_keys):
            if t is not None:
                move(t, 0)

    def _flush(self, b: int) -> None:
        """Write row `b`'s full segment to its memory; the row restarts at position 0, or
        after reading the segment's last `carry` tokens again as its own window would."""
        row, W, c = self.rows[b], self.window, self.carry
        if self.write_memory:
            tk = self.token_keys[b:b + 1, -W:] if self.token_keys is not None else None
            row.memory.add(self.keys[b:b + 1, -W:], self.values[b:b + 1, -W:], token_keys=tk,
                           token_ids=self.ids[b:b + 1, -W:] if tk is not None else None, skip=row.carried)
            row.segments_written += 1
        row.n = row.carried = 0
        if c:
            tail = self.ids[b:b + 1, -c:].clone()
            # the row's own batch-1 window reads them (one row's prefill; the others wait)
            alone = LocalWindow(self.model, 1, use_memory=self.use_memory, write_memory=False, memory=row.memory)
            alone._step(tail, False)
            self._place(b, alone)
            row.n = row.carried = c
