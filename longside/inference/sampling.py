"""Choosing the next token, and turning chosen tokens into text pieces that respect stop strings.

`GenerationConfig` carries the Hugging Face arguments users know; `next_token` applies
them in HF's order (repetition penalty, temperature, top-k, top-p) to `[B, V]` logits.
`TextPieces` detokenizes incrementally: it never emits half a UTF-8 character and holds
back text that might still turn into a stop string, so a streamed reply never shows a
stop string (or part of one) that the final text would not contain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from longside.errors import LongsideError
from longside.kernels import ggml_cpu


@dataclass
class GenerationConfig:
    """How `generate`, `stream` and `ChatSession` decode: the Hugging Face arguments users
    know, declared once. `do_sample=False` is greedy (temperature/top_k/top_p ignored).

    max_new_tokens: tokens to choose at most. eos_token_id: ids that end a row (None: the
    tokenizer's). stop: strings that end a row (not included in returned text). seed: for
    `do_sample` (None: random). chat / system: wrap text prompts in the backbone's chat
    template. use_memory / write_memory: read the memory / write segments that fill into it.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (CTRL paper: 1.2 is typical)
    eos_token_id: int | Sequence[int] | None = None
    stop: str | Sequence[str] | None = None
    seed: int | None = None
    chat: bool = False
    system: str | None = None
    use_memory: bool = True
    write_memory: bool = True

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise LongsideError(f"max_new_tokens must be >= 1 (an integer), got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LongsideError(f"{name} must be a finite number, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise LongsideError(f"top_k must be an integer (0 turns it off), got {self.top_k!r}")
        if self.temperature <= 0:
            raise LongsideError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k < 0:
            raise LongsideError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LongsideError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LongsideError(f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}")

    SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")

    def updated(self, **options) -> "GenerationConfig":
        """A copy with `options` (field names) changed; None values are left as they are
        for `max_new_tokens` only, so a positional default can pass through."""
        unknown = set(options) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown generation option(s) {sorted(unknown)}; "
                            f"choose from {[f.name for f in fields(self)]}")
        if options.get("max_new_tokens", 0) is None:
            options.pop("max_new_tokens")
        return replace(self, **options)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def make_generator(seed: int | None) -> torch.Generator:
    """A private random generator: seeded, or seeded at random (torch's global one is
    never touched)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig) -> torch.Tensor:
    """`logits [B, V]` float32 -> processed logits `[B, V]` (filtered entries are -inf).

    `seen [B, S]` int64: tokens already in each sequence, for the repetition penalty."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and seen is not None and seen.numel():
        # CTRL / HF: a seen token's logit is divided by the penalty if positive, else multiplied
        prev = logits.gather(1, seen)
        prev = torch.where(prev > 0, prev / cfg.repetition_penalty, prev * cfg.repetition_penalty)
        logits.scatter_(1, seen, prev)
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the best one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig,
               generator: torch.Generator | None) -> torch.Tensor:
    """`logits [B, V]` -> chosen token ids `[B]` int64 (argmax, or a draw from `generator`)."""
    if not cfg.do_sample and cfg.repetition_penalty == 1.0:  # greedy: nothing to process
        return _argmax(logits)
    logits = process_logits(logits, seen, cfg)
    if not cfg.do_sample:
        return _argmax(logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)`; float32 rows on the CPU in one C call (torch's takes ~55 us for a
    49k vocabulary here, a decode step's own arithmetic a few)."""
    if logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu" \
            and logits.stride(1) == 1 and logits.shape[1] and ggml_cpu.available():
        return ggml_cpu.argmax_rows(logits)
    return logits.argmax(-1)


class TextPieces:
    """Incremental detokenizer for one sequence with optional stop strings.

    `push(token_id) -> str` returns the new text that is safe to show; `.stopped` turns
    True once the text contains a stop string (the text is cut before it); `finish()`
    returns whatever was held back. `.text` is the full text shown so far.

    Each push decodes only the last few tokens, twice (with and without the new one, from
    the same first token, so a tokenizer's treatment of a sequence's start cancels out),
    and looks for stop strings only where the new text can complete one: the cost of a
    token does not grow with the reply (decoding the whole reply each time did: 0.4 ms a
    token at 2,048 tokens here, per row of a batch).
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._full = ""  # the decoded text up to token _read
        self._prefix = 0  # ids[_prefix:_read] is the context the next decode starts from
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return ""
        searched = len(self._full)
        if after.startswith(before):
            self._full += after[len(before):]
        else:  # the new token changed how the context decodes (rare): decode everything once
            self._full = self._decode(self.ids)
            searched = 0
        self._prefix, self._read = self._read, len(self.ids)
        full = self._full
        # a stop string found now ends in the new text: earlier starts were searched before
        start = max(0, searched - max((len(s) for s in self.stop), default=0) + 1)
        cut = min((i for i in (full.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[:len(full) - self._held_back(full)])

    def _held_back(self, full: str) -> int:
        """Length of the longest tail of `full` that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: str) -> str:
        # a revised decoding (above) can change earlier text: only what extends the shown
        # text is emitted
        new = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += new
        return new

    def finish(self) -> str:
        """The held-back tail, once generation ended without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self._full)
