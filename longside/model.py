"""`LongSideModel`: frozen backbone + side network + a `Memory` (one row per sequence).

    model = LongSideModel.from_pretrained()          # the shipped SmolLM2 checkpoint
    for segment in segments:                         # [B, <= window] token ids, in order
        out = model(segment, labels=segment)         # reads memory, then writes the segment
    model.reset_memory()                             # new documents
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from longside.backbone import Backbone, BackboneOutput, check_token_ids, load_backbone
from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError
from longside.memory import Memory
from longside.nn.memory_attention import memory_inputs
from longside.nn.side_network import SideNetwork
from longside.nn.token_cache import TokenHits, target_terms
from longside.paths import atomic_dir, recover

SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "smollm2-135m"
_WEIGHTS = "side_model.safetensors"
_CONFIG = "side_config.json"
_QUERY_MAPS = "query_maps.safetensors"  # optional: backbone memory's trained query maps
_QUERY_MAPS_FORMAT = "longside-query-maps-v1"


@dataclass
class LongSideOutput:
    """logits `[B, T, V]` float32; loss: mean next-token cross-entropy when labels are given
    (labels `[B, T]` aligned with the input, -100 ignored, shifted inside)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    n_tokens: int = 0


class LongSideModel(nn.Module):
    """A frozen backbone with a trainable side network and a per-sequence memory bank.

    Only `side` holds trainable parameters; the backbone runs under `no_grad`, so the
    training graph holds side-network activations only.
    """

    def __init__(self, backbone: Backbone, config: SideNetConfig | None = None, side: SideNetwork | None = None):
        super().__init__()
        config = config or SideNetConfig()
        if not config.backbone_fingerprint:  # a new side network: record what it is built on
            config.backbone = backbone.name
        if config.backbone_fingerprint and config.backbone_fingerprint != backbone.fingerprint:
            raise CheckpointError(
                f"this side network was trained on backbone {config.backbone!r} with fingerprint "
                f"{config.backbone_fingerprint}, but the loaded backbone {backbone.name!r} has "
                f"{backbone.fingerprint}; load the backbone it was trained with")
        config.backbone_fingerprint = backbone.fingerprint
        self.backbone = backbone  # a plain attribute: not a submodule, never in state_dict
        self.config = config
        self.side = side if side is not None else SideNetwork(config, backbone.spec, backbone)
        self._memory: Memory | None = None  # made on first use (`memory`)
        # what forward calls: `side` itself, or its data-parallel wrapper during training
        self.side_runner: nn.Module | None = None
        # a FeatureCache that stands in for the backbone's encode (training)
        self.feature_cache = None

    # -- memory ------------------------------------------------------------------------
    @property
    def memory(self) -> Memory:
        """The model's `Memory` (one row per sequence), created with one row on first use."""
        if self._memory is None:
            self._memory = self.new_memory(1)
        return self._memory

    @property
    def query_maps(self) -> Mapping[int, torch.Tensor]:
        """Backbone memory's trained query maps `{block: [H, D, D] float32}` (`use_query_maps`);
        they belong to the side network, so models sharing it share them."""
        return MappingProxyType(self.side.query_maps)  # read-only: change them with use_query_maps

    def new_memory(self, rows: int = 1, config: SideNetConfig | None = None) -> Memory:
        """A fresh, empty `Memory` of `rows` sequences for this model (its config unless
        `config`, its query maps), not attached to the model (a chat session's, a server's)."""
        return Memory(self.backbone, config or self.config, rows, query_maps=self.query_maps)

    @property
    def has_memory(self) -> bool:
        """Whether a memory exists yet (`memory` makes one on first use)."""
        return self._memory is not None

    @property
    def backbone_memory(self):
        """The `BackboneMemory` read inside the backbone's own blocks, or None (see config)."""
        return self.memory.blocks

    def init_memory(self, batch_size: int = 1) -> Memory:
        """A fresh, empty memory with one row per sequence of a `batch_size` batch."""
        self._memory = self.new_memory(batch_size)
        return self._memory

    def memory_for(self, batch_size: int) -> Memory:
        """The memory, with one row per sequence of a `batch_size` batch: an empty memory of
        another size is rebuilt; one that holds text is never dropped silently."""
        mem = self._memory
        if mem is not None and mem.rows == batch_size:
            return mem
        if mem is not None and not mem.is_empty():
            raise LongsideError(
                f"memory holds {mem.rows} sequence(s) but the batch size is {batch_size}; call "
                f"model.init_memory({batch_size}) to start fresh (or reset_memory()), or keep {mem.rows} rows")
        return self.init_memory(batch_size)

    @contextlib.contextmanager
    def scoped_memory(self, batch_size: int = 1) -> Iterator[Memory]:
        """A scratch memory for the duration of a `with` block (validation, probes); the
        model's own memory is put back afterwards, untouched."""
        saved = self._memory
        self._memory = self.new_memory(batch_size)
        try:
            yield self._memory
        finally:
            self._memory = saved

    def use_backbone_memory(self, layers: Sequence[int], k_chunks: int | None = None) -> None:
        """Let blocks `layers` of the backbone read memory themselves ([] switches it off);
        needs no training (see `longside.nn.backbone_memory`). Refused while memory holds
        text, which was written without it: reset or start a new memory first."""
        self._reconfigure("written without this setting", backbone_memory_layers=list(layers),
                          backbone_memory_k_chunks=k_chunks or self.config.backbone_memory_k_chunks)

    def use_query_maps(self, maps: dict[int, torch.Tensor] | None) -> None:
        """Read backbone memory with trained query maps `{block: [H, D, D]}` (see
        `longside.training.query_maps`; `{}` or None: every block's own query). Refused while
        memory holds text, which was written reading the other way."""
        spec, maps = self.backbone.spec, dict(maps or {})
        shape = (spec.num_heads, spec.head_dim, spec.head_dim)
        for b, A in maps.items():
            if not isinstance(b, int) or not 0 <= b < spec.num_layers or not isinstance(A, torch.Tensor) \
                    or tuple(A.shape) != shape or not bool(torch.isfinite(A).all()):
                raise LongsideError(f"a query map must be a finite {list(shape)} tensor for a block 0..{spec.num_layers - 1}; "
                                    f"got block {b!r}, shape {list(getattr(A, 'shape', []))}")
        old = self.side.query_maps
        self.side.query_maps = {b: A.detach().float().to(self.backbone.device) for b, A in sorted(maps.items())}
        try:
            self._reconfigure("read with other query maps")
        except BaseException:
            self.side.query_maps = old
            raise

    def use_window_carry(self, tokens: int) -> None:
        """Carry the last `tokens` of each full segment into the next one's window (0: every
        segment starts empty, as the side network was trained): see `config.window_carry` and
        `LocalWindow`. Refused while memory holds text (it was written the other way)."""
        self._reconfigure("read with another window carry", window_carry=tokens)

    def use_memory_sink_tokens(self, tokens: int) -> None:
        """Write memory without the keys/values of each forward's first `tokens` (the
        backbone's attention sinks; see `config.memory_sink_tokens`). Refused while memory
        holds text (it was written the other way)."""
        self._reconfigure("written with another sink setting", memory_sink_tokens=tokens)

    def use_memory_distance(self, tokens: int) -> None:
        """Score memory keys as if they sat `tokens` before the query (0: position-free; see
        `config.memory_distance`). Refused while memory holds text."""
        self._reconfigure("read at another distance", memory_distance=tokens)
        self.side.reader.distance = tokens

    def use_memory_layer(self, layer: int) -> None:
        """Read memory at backbone block `layer` instead: its pre-rotary keys/values are what
        memory stores, and the side network reads them before its first layer past that
        block. The side weights stay; the reader's query correction is zeroed (it was learned
        for another block's queries), so memory is read with the block's own query. Refused
        while memory holds text (it holds another block's keys). Where a perfect read is
        worth most: `experiments/oracle_read.py` (docs/results.md#memory-block)."""
        index = self.side.memory_index_for(layer)  # a block the backbone lacks is refused before anything changes
        self._reconfigure("written at another block", memory_layer=layer)
        self.side.config, self.side.memory_index = self.config, index
        self.reset_memory_query()

    def reset_memory_query(self) -> None:
        """Zero the memory reader's learned query correction, so memory is searched and read
        with the backbone's own query at the memory layer. A correction learned for
        position-free scores (`memory_distance` 0) steers the query away from the text once
        memory is scored at a distance (`experiments/memory_read_probe.py`)."""
        with torch.no_grad():
            self.side.reader.q_delta.weight.zero_()

    def drop_token_cache(self, only_copy: bool = False) -> None:
        """Switch the token cache off (memory attention alone reads memory), or with
        `only_copy` only its exact-match copy read (the neighbour vote stays): for
        measuring what each read path gives. Refused while memory holds text."""
        self._reconfigure("written with the token cache", **({"token_copy_k": 0} if only_copy else {"token_cache": False}))

    def _reconfigure(self, held: str, **change) -> None:
        """The config with `change` (checked by the config) and a new empty memory of as many
        rows; refused while memory holds text, which was `held` (e.g. "written without this
        setting")."""
        if self._memory is not None and not self._memory.is_empty():
            raise LongsideError(f"memory already holds text {held}; call reset_memory() first and memorize it again")
        rows = self._memory.rows if self._memory is not None else 1
        config = dataclasses.replace(self.config, **change)
        memory = self.new_memory(rows, config)  # checks what the config cannot (backbone memory's blocks)
        self.config, self._memory = config, memory

    def reset_memory(self, rows: list[int] | None = None) -> None:
        """Forget everything (or only `rows`), e.g. at document boundaries."""
        if self._memory is not None:
            self._memory.reset(rows)

    def memorize(self, source, *, row: int | None = None, progress: bool = True, as_text: bool = False) -> int:
        """Read text / a file / an iterable of those into memory row `row` (every row when
        None); returns the tokens written. A string that looks like a path but names no
        file is refused (`as_text=True` stores it as text). See `Memory.memorize`."""
        return self.memory.memorize(source, rows=None if row is None else [row], progress=progress, as_text=as_text)

    def save_memory(self, path: str | Path, row: int = 0) -> None:
        """Write memory row `row` to `path`, atomically and checksummed: one file, or a
        directory when backbone memory is on (it holds each block's bank too)."""
        self.memory.save(path, row)

    def load_memory(self, path: str | Path, row: int = 0) -> None:
        """Replace memory row `row` by one `save_memory` wrote; refuses memory from another
        backbone or with other backbone-memory blocks, and corrupt files."""
        self.memory.load(path, row)

    def encode(self, input_ids: torch.Tensor, use_memory: bool = True, segment=None, memory: Memory | None = None,
               **kwargs):
        """`Backbone.encode` of `input_ids [B, T]` at the memory layer. With backbone memory,
        its blocks also read memory (`use_memory`) and record the tokens' keys/values in
        `segment` (a `backbone_memory.Segment`; default a new one, for a whole segment from
        position 0), which `write_segment` stores; the output keeps it as `out.backbone_segment`.
        `memory`: whose backbone memory (default the model's). kwargs go to `Backbone.encode`
        (cache, positions for incremental decoding)."""
        ids = input_ids.to(self.backbone.device)
        memory = memory if memory is not None else self._memory
        bm = memory.blocks if memory is not None else None
        if bm is None:
            return self.backbone.encode(ids, memory_layer=self.config.memory_layer, **kwargs)
        segment = segment if segment is not None else bm.segment()
        out = self.backbone.encode(ids, memory_layer=self.config.memory_layer,
                                   block_reads=bm.block_reads(segment, read=use_memory), **kwargs)
        out.backbone_segment = segment
        return out

    @property
    def token_layer(self) -> int | None:
        """Which `hidden_states` entry keys the token cache (None: no token cache)."""
        return self.config.token_layer(self.backbone.spec.num_layers) if self.config.token_cache else None

    def feature_layers(self) -> list[int]:
        """The `hidden_states` entries a segment's forward reads: the side network's layer
        map, the last state and the token-cache layer (what a FeatureCache must keep)."""
        n = self.backbone.spec.num_layers
        return sorted(set(self.side.layer_map) | {n} | ({self.token_layer} if self.config.token_cache else set()))

    def token_keys(self, out) -> torch.Tensor | None:
        """The token-cache keys `[B, T, d]` of a `BackboneOutput` (None without a token cache)."""
        return out.states[self.token_layer] if self.config.token_cache else None

    def search_tokens(self, keys: torch.Tensor | None, ids: torch.Tensor | None = None,
                      memory: Memory | None = None) -> TokenHits | None:
        """Token-cache hits for the positions of `keys [B, T, d]`: nearest stored contexts
        and, with the copy read, exact matches of the text ending there (`ids [B, C]`: the
        current segment's tokens up to these positions, C >= T). None when there is no
        token cache or nothing stored yet. `memory`: whose (default the model's)."""
        memory = memory if memory is not None else self._memory
        if keys is None or memory is None:
            return None
        sims, nxt = memory.layer.search_tokens(keys, self.config.token_k)
        if not sims.shape[-1]:
            return None
        B, T = keys.shape[:2]
        ck = self.config.token_copy_k
        if ck and ids is not None:
            lens, cnxt = memory.layer.match_tokens(ids, T, ck)
        else:
            lens = cnxt = torch.zeros(B, T, 0, dtype=torch.int64, device=sims.device)
        return TokenHits(sims, nxt, lens.to(sims.device), cnxt.to(sims.device))

    # -- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                use_memory: bool = True, write_memory: bool = True, return_logits: bool = True,
                encoded: BackboneOutput | None = None, token_cache: bool = True, carried: int = 0) -> LongSideOutput:
        """One segment `input_ids [B, T]` (T <= window): read memory, predict, write the segment.

        The segment never retrieves itself: it is written after it is read. `encoded`: the
        `encode(input_ids)` of these ids, made once and shared by several models reading the
        same segment (e.g. one per memory capacity); not with backbone memory, whose blocks
        read this model's own memory. `token_cache=False` leaves the token cache out of this
        read (memory attention alone); the segment is still written to it. `carried`: the first
        tokens are the end of the segment before, read again as context (a carried window,
        `config.window_carry`) and already in memory: not written again; label them -100."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0 \
                or input_ids.shape[0] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise LongsideError(f"input_ids must be a non-empty [batch, tokens] tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise LongsideError(f"input_ids must be integer token ids (int64), got {input_ids.dtype}")
        check_token_ids(input_ids, self.backbone.spec.vocab_size)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise LongsideError(f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)} "
                                "(-100 where not scored)")
        B, T = input_ids.shape
        if T > self.config.window:
            raise LongsideError(f"segment of {T} tokens exceeds the window of {self.config.window}; "
                                "split the text into segments (or use memorize / generate)")
        if not 0 <= carried < T:
            raise LongsideError(f"carried must count tokens of the segment before its new ones: 0..{T - 1}, got {carried}")
        if use_memory or write_memory:
            self.memory_for(B)
        if encoded is not None and self.config.backbone_memory_layers:
            raise LongsideError("a shared `encoded` segment cannot be used with backbone memory: its blocks "
                                "read this model's own memory; leave encoded=None")
        if encoded is not None and (encoded.memory_keys is None or encoded.last_hidden.shape[:2] != (B, T)):
            raise LongsideError("`encoded` must be `model.encode(input_ids)` of these very ids "
                                f"([{B}, {T}] tokens, with the memory layer's keys)")
        out, h, tok_keys, hits = self.read_segment(input_ids, use_memory, encoded, token_cache)
        loss, n = None, 0
        logits = None
        if labels is not None:
            loss, n = self.lm_loss(h, labels, hits)
        if return_logits:
            logits = self.output(h, hits)
        if write_memory:
            self.write_segment(out, input_ids, tok_keys, skip=carried)
        return LongSideOutput(logits=logits, loss=loss, n_tokens=n)

    def read_segment(self, input_ids: torch.Tensor, use_memory: bool, encoded: BackboneOutput | None = None,
                     token_cache: bool = True):
        """Backbone (unless `encoded` is given), memory read and side network over one
        segment -> (BackboneOutput, final states `h [B, T, d]`, token-cache keys `[B, T, d]`
        or None, token-cache hits or None: always None without `use_memory` or
        `token_cache`). Nothing is written."""
        layer = self.config.memory_layer
        if encoded is not None:
            out = encoded
        elif self.feature_cache is not None:
            out = self.feature_cache.encode(input_ids)
        else:
            out = self.encode(input_ids, use_memory)
        mem = None
        if use_memory:
            k = self.config.k_chunks
            mem = memory_inputs(self.backbone, out, layer, lambda q: self._memory.search(q, k))
        runner = self.side if self.side_runner is None else self.side_runner
        h, _ = runner(out.hidden_states, mem)
        tok_keys = self.token_keys(out)
        return out, h, tok_keys, self.search_tokens(tok_keys, input_ids) if use_memory and token_cache else None

    def write_segment(self, out, input_ids: torch.Tensor, tok_keys: torch.Tensor | None, skip: int = 0) -> None:
        """Write a segment read by `read_segment` into memory, all but its first `skip` tokens
        (already there: a carried window's)."""
        self.memory.add(out.memory_keys, out.memory_values, token_keys=tok_keys,
                        token_ids=input_ids if tok_keys is not None else None,
                        backbone_segment=getattr(out, "backbone_segment", None), skip=skip)

    def output(self, h: torch.Tensor, hits=None, block: int = 256) -> torch.Tensor:
        """Final states `h [B, T, d]` -> logits `[B, T, V]` float32; with token-cache `hits`
        (`search_tokens`), the logits of the cache-mixed distribution (see
        `TokenCacheReader.mix`: unchanged where the cache is silent). One position per row (a
        decode step) runs the LM head as decoding does (`Backbone.lm_head(decode=True)`)."""
        bb = self.backbone
        B, T, _ = h.shape
        if hits is None or self.side.token_reader is None:
            return bb.lm_head(bb.final_norm(h), decode=T == 1)
        out = []
        for i in range(0, T, block):  # blocks keep the dense [tokens, V] cache tensors small
            lg = bb.lm_head(bb.final_norm(h[:, i:i + block]), decode=T == 1)
            t = lg.shape[1]
            out.append(self.side.token_reader.mix(lg.flatten(0, 1), hits.map(lambda x: x[:, i:i + t].flatten(0, 1)),
                                                  decode=T == 1).view(B, t, -1))
        return out[0] if len(out) == 1 else torch.cat(out, 1)  # one block (a decode step): no copy

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor, hits=None, block: int = 256):
        """Next-token cross-entropy, in blocks of tokens so the `[B, T, V]` logits of a long
        segment are never all alive at once during backward. With token-cache `hits`, the
        mixture's log-probability of each target is computed from the target's own terms
        (`TokenCacheReader.log_prob`), never from a dense `[tokens, V]` cache distribution."""
        target = labels[:, 1:].to(h.device)
        total = h.new_zeros(())
        n = int((target != -100).sum())
        T = h.shape[1] - 1
        reader = self.side.token_reader
        for i in range(0, T, block):
            j = min(i + block, T)
            lg = self.backbone.lm_head(self.backbone.final_norm(h[:, i:j])).flatten(0, 1)
            tg = target[:, i:j].flatten()
            if hits is None or reader is None:
                total = total + F.cross_entropy(lg, tg, ignore_index=-100, reduction="sum")
                continue
            keep = tg != -100
            t = tg[keep]
            lpt, ent, lpmax = target_terms(lg[keep], t)
            part = hits.map(lambda x: x[:, i:j].flatten(0, 1)[keep])
            total = total - reader.log_prob(part, t, lpt, ent, lpmax).sum()
        return total / max(n, 1), n

    # -- save / load -------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Side weights (safetensors, `dtype`) + config JSON; the backbone by name and hash."""
        tensors = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in self.side.state_dict().items()}
        with atomic_dir(path, marker=_CONFIG) as tmp:
            save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "longside-side-v1"})
            if self.query_maps:
                # float32 whatever `dtype`: small, and what was measured is what loads
                save_file({f"block.{b}": A.float().contiguous() for b, A in self.query_maps.items()},
                          str(tmp / _QUERY_MAPS), metadata={"format": _QUERY_MAPS_FORMAT})
            self.config.to_json(tmp / _CONFIG)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, backbone: Backbone | str | None = None,
                        quantize: str | None = None) -> "LongSideModel":
        """Load a checkpoint directory (default: the one shipped with longside)."""
        path = Path(path) if path is not None else SHIPPED_CHECKPOINT
        recover(path)
        if not (path / _CONFIG).exists() or not (path / _WEIGHTS).exists():
            raise CheckpointError(f"{path} is not a longside checkpoint (needs {_CONFIG} and {_WEIGHTS}); "
                                  "train one with `longside train` or omit the path for the shipped one")
        config = SideNetConfig.from_json(path / _CONFIG)
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone or config.backbone, quantize=quantize)
        model = cls(backbone, config)
        try:
            state = load_file(str(path / _WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / _WEIGHTS} is corrupt or truncated ({e}); re-train or re-copy it") from None
        target = model.side.state_dict()
        missing, extra = set(target) - set(state), set(state) - set(target)
        if missing or extra:
            raise CheckpointError(f"{path} does not match this side network (missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(extra)[:3]}): saved by another longside version?")
        model.side.load_state_dict({k: v.float() for k, v in state.items()})
        if (path / _QUERY_MAPS).exists():
            maps = _load_query_maps(path / _QUERY_MAPS)
            try:
                model.use_query_maps(maps)
            except LongsideError as e:
                raise CheckpointError(f"{path / _QUERY_MAPS}: {e}; re-fit it or delete it") from None
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.side.parameters() if p.requires_grad]


def _load_query_maps(path: Path) -> dict[int, torch.Tensor]:
    """`{block: [H, D, D] float32}` from a checkpoint's query-map file, or a clear error."""
    try:
        with safe_open(str(path), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); re-fit it (`longside fit-query-maps`) "
                              "or delete it to read backbone memory untrained") from None
    if fmt != _QUERY_MAPS_FORMAT or not all(k.startswith("block.") and k[6:].isascii() and k[6:].isdigit() for k in state):
        raise CheckpointError(f"{path} is not a longside query-map file (format {fmt!r}); re-fit it or delete it")
    return {int(k[6:]): v.float() for k, v in state.items()}


def state_hash(model: LongSideModel) -> str:
    """Short hash of the side weights (for provenance in reports)."""
    h = hashlib.sha256()
    for k, v in sorted(model.side.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    for b, A in sorted(model.query_maps.items()):
        h.update(f"query_map.{b}".encode())
        h.update(A.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

