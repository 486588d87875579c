"""`SideNetConfig`: every choice of the side network and its memory, with defaults that work."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from longside.errors import CheckpointError

MAX_CAPACITY_TOKENS = 1 << 24  # 16M tokens: ~12 GB of float16 keys/values for SmolLM2
MAX_WINDOW = 1 << 16


@dataclass
class SideNetConfig:
    """How the side network is shaped, initialised and wired to the memory.

    Widths: the side network runs at `hidden_size / reduction` with the backbone's number
    of query and key/value heads (each head `head_dim / reduction` wide), so structured
    pruning can copy whole heads of the backbone.
    """

    reduction: int = 4  # r: side width d/r (576/4 = 144 for SmolLM2)
    layer_stride: int = 3  # side layer j reads the output of backbone block stride*(j+1)-1
    init: str = "prune"  # "prune" (LST: structured pruning of the backbone) or "random"
    downsample: str = "prune"  # "prune" (fixed selection), "avgpool", "adapter" (QST d->16->d/r)
    adapter_rank: int = 16
    gate_init: float = 0.0  # per-layer gates z_j: mix = (1 - s(z)) * down(h) + s(z) * side
    # memory
    memory_layer: int = 15  # backbone block whose pre-rotary keys/values are cached
    memory_attention: str = "joint"  # "joint" (one softmax over memory and window, as shipped) or "gated"
    memory_gate_init: float = 0.0  # LongMem: g = 0, so s(g) = 0.5
    chunk_size: int = 4
    k_chunks: int = 16
    capacity_tokens: int = 65536
    index: str = "flat"
    window: int = 1024  # local segment length in tokens
    # tokens of a full segment carried into the next one's window (read again there, not written
    # twice), so no segment starts cold; 0: every segment starts empty (as trained)
    window_carry: int = 0
    # the first tokens of each forward are the backbone's attention sinks: their keys/values are
    # not written to the memory layer's bank (position-free, a sink's key outscores the text in
    # every later search and memory attention reads the sink); the token cache keeps them.
    # 0 (every token written) is how the checkpoints before session 41 were trained and read
    memory_sink_tokens: int = 0
    # memory attention scores memory keys as if they sat this many tokens before the query
    # (rotary at that offset, as backbone memory does); 0: position-free, as LongMem and the
    # checkpoints before session 41
    memory_distance: int = 0
    # token cache (longside/token_cache.py): (hidden state, next token) pairs of the same text
    token_cache: bool = True
    token_depth: float = 0.83  # keys are hidden_states[round(token_depth * N)]: block 25 of SmolLM2's 30
    token_k: int = 64  # neighbours that vote
    token_copy_k: int = 16  # exact-match candidates that vote (0: no copy read)
    token_spread: bool = True  # the neighbour gate also sees how many distinct tokens they vote for
    # backbone memory (longside/backbone_memory.py): blocks that read their own cached keys/values,
    # training-free; [] turns it off
    backbone_memory_layers: list[int] = field(default_factory=list)
    backbone_memory_k_chunks: int = 16  # chunks (of chunk_size tokens) each query retrieves per block
    backbone_memory_distance: int = 0  # rotary distance memory keys are scored at (0: 3/4 of the window)
    # provenance (filled by LongSideModel)
    backbone: str = "smollm2-135m"
    backbone_fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._check_types()
        if not 1 <= self.capacity_tokens <= MAX_CAPACITY_TOKENS:
            raise CheckpointError(f"capacity_tokens must be 1..{MAX_CAPACITY_TOKENS:,}, got {self.capacity_tokens:,}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise CheckpointError(f"window must be 1..{MAX_WINDOW}, got {self.window}")
        if self.init not in ("prune", "random"):
            raise CheckpointError(f"init must be 'prune' or 'random', not {self.init!r}")
        if self.downsample not in ("prune", "avgpool", "adapter"):
            raise CheckpointError(f"downsample must be 'prune', 'avgpool' or 'adapter', not {self.downsample!r}")
        if self.memory_attention not in ("gated", "joint"):
            raise CheckpointError(f"memory_attention must be 'gated' or 'joint', not {self.memory_attention!r}")
        if not 0 <= self.window_carry < self.window:
            raise CheckpointError(f"window_carry must be 0..{self.window - 1} (below the window), got {self.window_carry}")
        if not 0 <= self.memory_sink_tokens < self.window:
            raise CheckpointError(f"memory_sink_tokens must be 0..{self.window - 1} (below the window), "
                                  f"got {self.memory_sink_tokens}")
        if self.memory_distance < 0:
            raise CheckpointError(f"memory_distance must be >= 0, got {self.memory_distance}")
        if self.reduction < 1 or self.layer_stride < 1 or self.k_chunks < 1 or self.chunk_size < 1:
            raise CheckpointError("reduction, layer_stride, k_chunks and chunk_size must be >= 1")
        self.backbone_memory_layers = sorted({int(L) for L in self.backbone_memory_layers})
        if self.backbone_memory_k_chunks < 1 or self.backbone_memory_distance < 0:
            raise CheckpointError("backbone_memory_k_chunks must be >= 1 and backbone_memory_distance >= 0")
        if not 0.0 < self.token_depth <= 1.0 or self.token_k < 1 or self.token_copy_k < 0:
            raise CheckpointError(f"token_depth must lie in (0, 1], token_k be >= 1 and token_copy_k >= 0, got "
                                  f"{self.token_depth}, {self.token_k}, {self.token_copy_k}")

    def _check_types(self) -> None:
        """Each field holds the type it is declared with (JSON `"no"` is not a bool, `1.5`
        not a block count)."""
        for f in fields(self):
            v, kind = getattr(self, f.name), f.type
            if kind == "int":
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            elif kind == "bool":
                ok = isinstance(v, bool)
            elif kind == "str":
                ok = isinstance(v, str)
            elif kind == "list[int]":
                ok = isinstance(v, (list, tuple, range)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in v)
            else:  # dict
                ok = isinstance(v, dict)
            if not ok:
                raise CheckpointError(f"side-network config field {f.name!r} must be {kind}, got {v!r}")

    def carry_for(self, window: int) -> int:
        """The carry of a reading in segments of `window` tokens: `window_carry` where `window`
        is the model's, scaled down with a shorter one (an evaluation's `--window`), so each
        segment still brings the same share of new tokens (at 256 of 1024 carrying 256: 64
        carried, 192 new) rather than one. Always below `window`."""
        return self.window_carry * min(window, self.window) // self.window

    def token_layer(self, num_layers: int) -> int:
        """Index into `hidden_states` (0 = embeddings, i = output of block i-1) of the token-cache keys."""
        return max(1, min(num_layers, round(self.token_depth * num_layers)))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: str | Path) -> "SideNetConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"no side-network config at {path}") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object of side-network settings, got "
                                  f"{type(raw).__name__}; the checkpoint is corrupt")
        raw.setdefault("token_cache", False)  # checkpoints from before the token cache have none
        raw.setdefault("token_copy_k", 0)  # nor the copy read
        raw.setdefault("token_spread", False)  # nor the vote-spread gate features
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise CheckpointError(f"{path} has unknown fields {sorted(unknown)}: written by a newer longside?")
        return cls(**raw)


def parse_blocks(text: str) -> list[int]:
    """Block numbers from a command line: "15-29", "12,20,27" or a mix ("10,15-29"); "" -> []."""
    blocks: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            if hi and int(hi) < int(lo):
                raise ValueError
            blocks += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise CheckpointError(f"blocks must look like 15-29 or 12,20,27, got {text!r}") from None
    return sorted(set(blocks))
