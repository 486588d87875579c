"""`LocalWindow`: incremental, segment-aligned decoding with key/value caches.

Training reads text in segments of `window` tokens: a segment sees its own tokens
(causally, positions 0..window-1) plus what memory retrieves from earlier segments, and
is written into memory whole once it is done. Generation must see text the same way, so:

    tokens accumulate in the current segment (positions 0..n-1): the backbone's
        DynamicCache, every side block's (k, v) cache, and the memory layer's pre-rotary
        keys/values of the segment grow with each token;
    when n reaches `window`, the segment's keys/values go into the memory bank and all
        local caches restart empty (the next token is position 0 of a new segment); with
        `config.window_carry` = c, the new segment first reads the old one's last c tokens
        again (positions 0..c-1, already in memory: not written twice), so that no token
        starts cold.

So memory is written once per `window` tokens, never per step, and the logits of
incremental decoding equal those of `LongSideModel.forward` on the same segment.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from longside.errors import LongsideError
from longside.nn.growing import Room, append
from longside.nn.memory_attention import memory_inputs

if TYPE_CHECKING:
    from longside.memory import Memory
    from longside.model import LongSideModel


class LocalWindow:
    """The local window of a batch of B sequences, decoded incrementally.

    `feed(ids [B, T])` runs any number of tokens through backbone and side network,
    splitting at segment boundaries, and returns the logits of the last position `[B, V]`
    (or of every position `[B, T, V]` with `all_logits=True`). All tensors float32.

    Attributes: `n` (tokens in the current segment), `carried` (how many of them were carried
    from the segment before), `ids [B, n]` (their token ids),
    `keys, values [B, n, G, D]` (the memory layer's pre-rotary keys/values, written to
    memory when the segment fills), `token_keys [B, n, d]` (the token cache's keys, or
    None), `segments_written`. With a token cache the returned logits are those of the
    cache-mixed distribution (see `LongSideModel.output`).
    """

    def __init__(self, model: "LongSideModel", batch_size: int = 1, *, use_memory: bool = True,
                 write_memory: bool = True, memory: "Memory | None" = None):
        if batch_size < 1:
            raise LongsideError(f"batch_size must be >= 1, got {batch_size}")
        if memory is not None and memory.rows != batch_size:
            raise LongsideError(f"a memory of {memory.rows} row(s) for a batch of {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.use_memory, self.write_memory = use_memory, write_memory
        self.window, self.carry = model.config.window, model.config.window_carry
        self.layer = model.config.memory_layer
        # the settings its caches were made under: every `use_*`/`drop_token_cache` replaces the
        # model's config (and its memory), and a window kept across that would read and write
        # the new memory the old way
        self._config = model.config
        # whose memory this window reads and writes: its own (a server's user), or the model's
        self._own_memory = memory
        if memory is None and (use_memory or write_memory):
            model.memory_for(batch_size)
        self.segments_written = 0
        self._restart()

    def _restart(self) -> None:
        """Empty local caches: the next token is position 0 of a new segment."""
        spec, B = self.model.backbone.spec, self.batch_size
        dev = self.model.backbone.device
        self.cache = DynamicCache()
        self.carried = 0
        self.side_caches: list | None = None
        self.ids = torch.zeros(B, 0, dtype=torch.long, device=dev)
        self.keys = torch.zeros(B, 0, spec.num_kv_heads, spec.head_dim, device=dev)
        self.values = torch.zeros_like(self.keys)
        self.token_keys = torch.zeros(B, 0, spec.hidden_size, device=dev) if self.model.config.token_cache else None
        self._grown: dict[str, Room] = {}  # the buffers behind ids, keys, values, token_keys
        bm = self.memory.blocks if self.model.config.backbone_memory_layers else None
        self.backbone_segment = bm.segment() if bm is not None else None  # this window's own

    @property
    def memory(self) -> "Memory":
        return self._own_memory if self._own_memory is not None else self.model.memory

    @property
    def n(self) -> int:
        return self.ids.shape[1]

    def reset(self) -> None:
        """Drop the current segment without writing it to memory."""
        self._restart()

    def flush(self) -> None:
        """Write the current (possibly partial) segment to memory and start a new one."""
        if self.n and self.write_memory:
            self._check_current()
            self.memory.add(self.keys, self.values, token_keys=self.token_keys,
                            token_ids=self.ids if self.token_keys is not None else None,
                            backbone_segment=self.backbone_segment, skip=self.carried)
            self.segments_written += 1
        self._restart()

    def fork(self) -> "LocalWindow":
        """A copy of this window that continues on its own: the same model and memory,
        its own local caches. Scoring several continuations of one prefix then costs the
        prefix once (feed it, then `fork().feed(continuation)` per continuation). A fork
        that completes its segment writes to the shared memory, so forks used to score
        are made with `write_memory=False`."""
        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache)  # DynamicCache grows in place
        twin.side_caches = None if self.side_caches is None else list(self.side_caches)
        twin._grown = dict(self._grown)  # shared buffers: whichever grows second copies
        if self.backbone_segment is not None:
            twin.backbone_segment = self.backbone_segment.fork()
        return twin

    def _check_current(self) -> None:
        if self.model.config is not self._config:
            changed = [f.name for f in dataclasses.fields(self._config)
                       if getattr(self._config, f.name) != getattr(self.model.config, f.name)]
            what = ", ".join(changed) or "query maps, or a setting made again"
            raise LongsideError(f"this window was made before the model's settings changed ({what}); make a new "
                                "window (a chat: a new ChatSession)")

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run `ids [B, T]` (int64, T >= 1) through the window; logits `[B, V]` of the last
        token, or `[B, T, V]` of every token when `all_logits`."""
        if ids.dim() != 2 or ids.shape[0] != self.batch_size or ids.shape[1] == 0:
            raise LongsideError(f"expected token ids [batch={self.batch_size}, tokens>=1], got {tuple(ids.shape)}")
        self._check_current()
        ids = ids.to(self.model.backbone.device)
        outs, pos = [], 0
        while pos < ids.shape[1]:
            take = min(self.window - self.n, ids.shape[1] - pos)
            outs.append(self._step(ids[:, pos:pos + take], all_logits))
            pos += take
            if self.n == self.window:  # the segment is complete: it leaves the window
                tail = self.ids[:, self.window - self.carry:].clone() if self.carry else None
                self.flush()
                if tail is not None:  # the new segment reads the old one's end again
                    self._step(tail, False)
                    self.carried = self.carry
        return torch.cat(outs, 1) if all_logits else outs[-1]

    def _step(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """T new tokens that fit in the current segment -> logits `[B, T, V]` or `[B, V]`."""
        model, bb = self.model, self.model.backbone
        B, T = ids.shape
        start = self.n
        position_ids = torch.arange(start, start + T, device=ids.device).expand(B, T)
        memory = self.memory
        out = model.encode(ids, self.use_memory, self.backbone_segment, memory, cache=self.cache, use_cache=True,
                           position_ids=position_ids)
        self.cache = out.cache
        self.ids = append(self._grown, "ids", self.ids, ids)
        self.keys = append(self._grown, "keys", self.keys, out.memory_keys)
        self.values = append(self._grown, "values", self.values, out.memory_values)
        # an empty memory adds exactly nothing (the reader's contribution is zero, no token
        # hits): skip the searches
        reads = self.use_memory and not memory.is_empty()
        mem = None
        if reads:
            k = model.config.k_chunks
            mem = memory_inputs(bb, out, self.layer, lambda q: memory.search(q, k),
                                start=start, window_keys=self.keys)
        # the side blocks see every new token (their caches need it); the LM head only
        # the positions whose logits are wanted
        h, self.side_caches = model.side(out.states, mem, start=start, caches=self.side_caches)
        tok_keys = model.token_keys(out)
        if tok_keys is not None:
            self.token_keys = append(self._grown, "token_keys", self.token_keys, tok_keys)
        if not all_logits:
            h, tok_keys = h[:, -1:], None if tok_keys is None else tok_keys[:, -1:]
        hits = model.search_tokens(tok_keys, self.ids, memory) if reads else None
        logits = model.output(h, hits)
        return logits if all_logits else logits[:, -1]
