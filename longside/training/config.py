"""`TrainConfig`: everything a training run needs, with presets (`preset(name)`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from longside.config import SideNetConfig
from longside.errors import LongsideError


@dataclass
class TrainConfig:
    """One training run. `side` configures the side network; the rest the optimisation."""

    side: SideNetConfig = field(default_factory=SideNetConfig)
    backbone: str = "smollm2-135m"
    quantize: str | None = None  # backbone weights: None = default (a GGUF's own blocks), "fp32", "nf4"
    batch_size: int = 1  # rows per process, each streaming its own document
    segment: int = 1024  # tokens per segment (<= side.window)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 400
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    synthetic_share: float = 0.25  # share of documents that are synthetic pass-key tasks
    synthetic_max_segments: int = 16  # a pass key stated up to this many segments back
    max_book_segments: int = 64  # a book is cut after this many segments (more books seen)
    eval_every: int = 100
    eval_segments: int = 6  # per validation book: memory helps from the second on
    save_every: int = 100
    seed: int = 0
    out: str = "runs/smollm2-135m"
    feature_cache: str | None = None  # a directory: backbone features replayed when a segment recurs
    feature_cache_gb: float = 20.0
    feature_cache_dtype: str = "bfloat16"
    # distillation from the long-context backbone (teacher.py): documents of at most
    # teacher_window tokens; loss = lm_weight * next-token + distill_mse * mse + distill_kl * kl
    # + distill_attn * attn (the memory layer's own change)
    distill: bool = False
    teacher_window: int = 8192
    teacher_top_k: int = 16
    teacher_cache: str | None = None  # default: <cache>/teacher/<backbone>-<fingerprint>-w.-s.-k.-m.[-nf4]-v2
    teacher_store: bool = True  # False: compute each document's targets when read, keep none on disk
    lm_weight: float = 1.0
    distill_mse: float = 1.0
    distill_kl: float = 1.0
    distill_attn: float = 0.0
    init_from: str | None = None  # start from this checkpoint's side network (and its side config)
    # with init_from: zero its memory reader's query correction (LongSideModel.reset_memory_query),
    # e.g. when the run scores memory at a distance the checkpoint was not trained with
    reset_memory_query: bool = False
    # False: the next-token loss reads the side network's output alone, the token cache left
    # out. With the cache in the loss its copy read already names a recalled fact, so the
    # loss asks nothing of memory attention on exactly the tokens that need memory.
    token_cache_in_loss: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type
            ok = {"int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  "str": isinstance(v, str), "bool": isinstance(v, bool), "str | None": v is None or isinstance(v, str),
                  "SideNetConfig": isinstance(v, SideNetConfig)}.get(kind, True)
            if not ok:
                raise LongsideError(f"training option {f.name!r} must be {kind}, got {v!r}")
        small = [n for n in ("batch_size", "segment", "max_steps", "eval_every", "save_every", "eval_segments",
                             "synthetic_max_segments", "max_book_segments") if getattr(self, n) < 1]
        if small or self.warmup_steps < 0 or self.lr <= 0 or not 0 <= self.synthetic_share <= 1:
            raise LongsideError(f"training options out of range: {small or ''} (counts >= 1, warmup_steps >= 0, "
                                "lr > 0, synthetic_share in [0, 1])")
        weights = (self.lm_weight, self.distill_mse, self.distill_kl, self.distill_attn)
        if min(weights) < 0 or self.teacher_top_k < 1 or (self.distill and not any(weights)):
            raise LongsideError(f"loss weights must be >= 0 and not all 0, teacher_top_k >= 1; got {weights}, "
                                f"{self.teacher_top_k}")
        if not self.distill and weights != (1.0, 1.0, 1.0, 0.0):
            raise LongsideError(f"loss weights {weights} (lm_weight, distill_mse, distill_kl, distill_attn) only "
                                "apply with distill; set distill (--distill) or leave them at their defaults")
        if self.teacher_cache and not self.teacher_store:
            raise LongsideError(f"teacher_cache {self.teacher_cache!r} names a store, but teacher_store is False "
                                "(targets computed when read, none kept); drop one of the two")
        if self.reset_memory_query and not self.init_from:
            raise LongsideError("reset_memory_query zeroes the query correction of an init_from checkpoint; a new "
                                "side network starts with none: set init_from or drop reset_memory_query")
        if self.distill:
            longest = max(self.max_book_segments, self.synthetic_max_segments) * self.segment
            if longest > self.teacher_window or self.teacher_window % self.segment:
                raise LongsideError(
                    f"with distill, a document ({longest} tokens: max_book_segments {self.max_book_segments} / "
                    f"synthetic_max_segments {self.synthetic_max_segments} x segment {self.segment}) must fit the "
                    f"teacher window {self.teacher_window}, a multiple of the segment; lower max_book_segments")

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        if not isinstance(raw, dict):
            raise LongsideError(f"a training config must be a JSON object of TrainConfig fields, got "
                                f"{type(raw).__name__}")
        raw = dict(raw)
        side = raw.pop("side", {})
        if not isinstance(side, dict):
            raise LongsideError(f"the training config's \"side\" must be an object of SideNetConfig fields, got {side!r}")
        given, side = set(side), SideNetConfig(**side)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - known:
            raise LongsideError(f"unknown training options {sorted(set(raw) - known)}")
        cfg = cls(side=side, **raw)
        # which side settings were written out: with init_from, those (and only those) that
        # differ from the checkpoint's change it, even where they equal SideNetConfig's default
        cfg.side_given = frozenset(given)
        return cfg


# The shipped checkpoint, trained further against the long-context backbone (teacher.py):
# 8-segment documents, so the teacher (SmolLM2's native 8k) sees each whole document.
_DISTILL = {"out": "runs/smollm2-135m-distill", "max_steps": 600, "warmup_steps": 20, "lr": 5e-4,
            "synthetic_share": 0.3, "synthetic_max_segments": 4, "max_book_segments": 8, "eval_every": 200,
            "eval_segments": 6, "save_every": 25, "distill": True, "distill_attn": 1.0, "init_from": "shipped"}

# The distillation preset with memory read the way backbone memory reads it: the backbone's
# attention sinks held out of the bank, memory keys scored at a rotary distance, and the reader's
# query correction (learned for position-free scores) restarted at the backbone's own query.
# Its memory-layer error is 0.70 over steps 126-151 (the preset above: 0.91; with sinks and
# distance but the checkpoint's query, 0.80); docs/results.md#backbone-query.
_ROTARY = {**_DISTILL, "out": "runs/smollm2-135m-distill-rotary", "reset_memory_query": True,
           "side": {"memory_sink_tokens": 4, "memory_distance": 768}}

PRESETS: dict[str, dict] = {
    # The shipped checkpoint: SmolLM2-135M, r=4 (side width 144), 10 side layers, memory at
    # block 15, 1024-token segments. Sized for this 2-core CPU (see docs/results.md for wall time).
    # window_carry is a reading setting, not a training one (training reads cold segments); it is
    # here so that the checkpoint this preset writes reads text as the shipped one does.
    "smollm2-135m": {"out": "runs/smollm2-135m", "max_steps": 1200, "warmup_steps": 30,
                     "synthetic_share": 0.5, "synthetic_max_segments": 4, "max_book_segments": 16,
                     "eval_every": 300, "eval_segments": 4, "save_every": 50,
                     "side": {"memory_attention": "joint", "window_carry": 256}},
    "smollm2-135m-distill": _DISTILL,
    "smollm2-135m-distill-rotary": _ROTARY,
    # The same, reading memory at block 20 instead of 15: a perfect read (the teacher's
    # attention) there alone, carried by the backbone's blocks above, is worth -4.3% perplexity,
    # at block 15 -0.9% (experiments/oracle_read.py). The read moves to side layer 6 (of 10); the
    # side weights are the shipped ones, the query correction starts at zero. Distilled, a perfect read
    # lowers the side network's perplexity by ~2% here as at block 15: docs/results.md#memory-block.
    "smollm2-135m-distill-block20": {**_ROTARY, "out": "runs/smollm2-135m-distill-block20",
                                     "side": {**_ROTARY["side"], "memory_layer": 20}},
    # A few steps on short segments: for tests and smoke runs.
    "tiny": {"segment": 64, "max_steps": 6, "warmup_steps": 2, "eval_every": 3, "eval_segments": 2,
             "save_every": 3, "synthetic_max_segments": 3, "max_book_segments": 4,
             "side": {"window": 64, "capacity_tokens": 1024}, "out": "runs/tiny"},
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise LongsideError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    raw = json.loads(json.dumps(PRESETS[name]))
    side = {**raw.pop("side", {}), **overrides.pop("side", {})}
    return TrainConfig.from_dict({**raw, **overrides, "side": side})
