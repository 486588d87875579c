"""What every evaluation shares: loading the model, scoring text after a long prefix,
reading data arguments, and writing the JSON report and plot.

The central helper is `score_after_prefix`. A longside model only sees its local window
directly; everything older must come through memory. To score a continuation after a
long prefix it therefore (1) writes the early part of the prefix into memory, one
window-sized segment at a time, (2) keeps the last part of the prefix local, and (3)
scores each candidate after the local prefix, reading but not writing memory, so every
candidate sees exactly the same memory. The local prefix is run once and its caches
forked per candidate (`prefix_logits`; the bare backbone's `backbone_prefix_logits`):
the same logits as one forward over `[local prefix + candidate]`, up to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from longside.backbone import Backbone
from longside.data import load_books, load_jsonl, load_local_dataset, load_text_books
from longside.errors import LongsideError
from longside.inference.window import LocalWindow
from longside.loading import load_model, model_info
from longside.model import LongSideModel
from longside.paths import write_json
from longside.provenance import git_state


class EvalError(LongsideError):
    """An evaluation was asked for something it cannot do (bad sizes, unusable data)."""


# -- model ---------------------------------------------------------------------------------


def with_capacity(model, capacity_tokens: int):
    """The same side network (shared, not copied) with a memory of another capacity."""
    if capacity_tokens < model.config.chunk_size:
        raise EvalError(f"memory capacity {capacity_tokens} is below one chunk ({model.config.chunk_size} tokens)")
    config = dataclasses.replace(model.config, capacity_tokens=capacity_tokens)
    return LongSideModel(model.backbone, config, side=model.side).eval()


def eval_window(model, window: int | None) -> int:
    """The local window an evaluation uses: `window`, at most the model's own (default)."""
    limit = model.config.window
    if window is None:
        return limit
    if not 2 <= window <= limit:
        raise EvalError(f"window {window} must be between 2 and the model's window {limit}")
    return window


# -- scoring -------------------------------------------------------------------------------


@dataclass
class Continuation:
    """How a model scores one candidate: summed log-probability over its tokens, the
    token count, and whether every token is the argmax given the true previous ones
    (which is exactly when greedy decoding would produce the candidate)."""

    logprob: float
    n_tokens: int
    greedy: bool

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.n_tokens


def _continuation(logits: torch.Tensor, targets: torch.Tensor) -> Continuation:
    """`logits [n, V]` at the positions that predict `targets [n]`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return Continuation(float(picked.sum()), len(targets), bool((logits.argmax(-1) == targets).all()))


def memorize(model, ids: Sequence[int], window: int, encoded: dict | None = None) -> int:
    """Write `ids` into the model's memory in window-sized segments, oldest first (what
    `model(segment)` would write, computed by the backbone alone). Returns the number of
    segments written. `encoded`: see `Memory.write_ids`."""
    return model.memory.write_ids(ids, window=window, encoded=encoded)


def prefix_logits(model, prefix: Sequence[int], continuations: Sequence[Sequence[int]], *,
                  use_memory: bool, last_only: bool = False) -> list[torch.Tensor]:
    """Longside logits after `prefix` (>= 1 token) for each continuation, memory read
    but never written: per continuation `c` the float32 `[len(c) + 1, V]` logits of
    positions `len(prefix) - 1 ..`, i.e. the prediction of `c[0]` first and the one
    after `c[-1]` last (only that last one, `[V]`, with `last_only`, where `prefix` may
    be empty). `prefix + c` must fit the model's window; the prefix is run once."""
    if not prefix and not last_only:
        raise EvalError("an empty prefix cannot be scored against")
    if len(prefix) + max(map(len, continuations)) > model.config.window:
        raise EvalError(f"a prefix of {len(prefix)} tokens and continuations of up to "
                        f"{max(map(len, continuations))} exceed the window {model.config.window}")
    window = LocalWindow(model, use_memory=use_memory, write_memory=False)
    if len(prefix) > 1:
        window.feed(torch.tensor([list(prefix[:-1])]))
    return [window.fork().feed(torch.tensor([[*prefix[-1:], *c]]), all_logits=not last_only)[0]
            for c in continuations]


def backbone_prefix_logits(backbone: Backbone, prefix: Sequence[int], continuations: Sequence[Sequence[int]],
                           *, last_only: bool = False, block: int = 1024) -> list[torch.Tensor]:
    """Bare-backbone logits after `prefix` (>= 1 token) for each continuation, as
    `prefix_logits` (float32 `[len(c) + 1, V]` each, `[V]` with `last_only`); the
    prefix's key/value cache is computed once and copied per continuation."""
    if not prefix and not last_only:
        raise EvalError("an empty prefix cannot be scored against")
    cache = None
    if len(prefix) > 1:
        cache = backbone.encode(torch.tensor([list(prefix[:-1])]), use_cache=True).cache
    start = max(len(prefix) - 1, 0)
    out = []
    for c in continuations:
        ids = torch.tensor([[*prefix[-1:], *c]])
        pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        hidden = backbone.encode(ids, position_ids=pos, cache=copy.deepcopy(cache),
                                 use_cache=cache is not None).last_hidden[0]
        logits = blocked_logits(backbone, hidden[-1:] if last_only else hidden, block)
        out.append(logits[-1] if last_only else logits)
    return out


def score_after_prefix(model, prefix: Sequence[int], candidates: Sequence[Sequence[int]], *,
                       window: int, use_memory: bool = True, encoded: dict | None = None) -> list[Continuation]:
    """Score each candidate after `prefix` with a longside model.

    The last `window - len(longest candidate)` prefix tokens stay local; with
    `use_memory`, everything before them is written to a freshly reset memory first.
    Without it the earlier prefix is simply not seen (the "memory off" row). Calls on
    suffixes of one text that share `encoded` (a dict) encode each segment once.
    """
    longest = max(len(c) for c in candidates)
    local_len = window - longest
    if local_len < 1 or min(len(c) for c in candidates) < 1:
        raise EvalError(f"candidates of up to {longest} tokens leave no room for context in a "
                        f"window of {window}; use shorter candidates or a larger window")
    split = max(0, len(prefix) - local_len)
    local = list(prefix[split:])
    model.reset_memory()
    if use_memory:
        memorize(model, prefix[:split], window, encoded)
    logits = prefix_logits(model, local, candidates, use_memory=use_memory)
    model.reset_memory()
    return [_continuation(lg[:-1], torch.tensor(list(c))) for lg, c in zip(logits, candidates)]


def backbone_hidden_logits(backbone: Backbone, ids: Sequence[int], start: int, block: int = 1024) -> torch.Tensor:
    """Bare-backbone logits `[len(ids) - start, V]` for positions `start..end` of `ids`,
    computed in blocks so an 8k context never holds all 8k x V logits at once."""
    return blocked_logits(backbone, backbone.encode(torch.tensor([list(ids)])).last_hidden[0, start:], block)


def blocked_logits(backbone: Backbone, hidden: torch.Tensor, block: int) -> torch.Tensor:
    """Final states `[T, d]` -> logits `[T, V]`, `block` rows at a time."""
    with torch.no_grad():
        return torch.cat([backbone.lm_head(hidden[i:i + block]) for i in range(0, len(hidden), block)])


def score_backbone(backbone: Backbone, prefix: Sequence[int], candidates: Sequence[Sequence[int]], *,
                   context: int) -> list[Continuation]:
    """Score each candidate after the last `context - len(longest)` prefix tokens with
    the bare backbone (its attention over that context; nothing older is seen)."""
    longest = max(len(c) for c in candidates)
    local_len = context - longest
    if local_len < 1:
        raise EvalError(f"candidates of {longest} tokens do not fit a context of {context}")
    local = list(prefix[-local_len:]) if prefix else []
    if not local:
        raise EvalError("an empty prefix cannot be scored against")
    logits = backbone_prefix_logits(backbone, local, candidates)
    return [_continuation(lg[:-1], torch.tensor(list(c))) for lg, c in zip(logits, candidates)]


# -- data ----------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without special tokens (texts are concatenated freely)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_book_data(data: str | Path | None, split: str = "test"):
    """Books from `--data`: the prepared corpus split by default, else a `.txt` file or
    folder, a `.jsonl` of `{title, chapters}` / `{title, text}`, or a `datasets` folder.
    Returns `(records, identifier)`; each record has `title` and `chapters`."""
    if data is None:
        books = load_books(split)
        return [dict(b) for b in books], f"prepared:{split}"
    path = Path(data)
    if path.suffix == ".jsonl":
        rows = load_jsonl(path)
    elif path.is_dir() and not any(path.rglob("*.txt")):
        rows = load_local_dataset(path)
        if hasattr(rows, "keys"):  # a DatasetDict: take the requested split, else the first
            rows = rows[split] if split in rows else rows[next(iter(rows.keys()))]
    else:
        rows = load_text_books(path)
    books = []
    for i, row in enumerate(rows):
        row = dict(row)
        if "chapters" not in row:
            if "text" not in row:
                raise EvalError(f"{path}: record {i} has neither 'chapters' nor 'text'")
            row["chapters"] = [{"title": row.get("title", ""), "text": row["text"]}]
        row.setdefault("title", row.get("book_id", f"book {i}"))
        books.append(row)
    if not books:
        raise EvalError(f"{path} holds no books")
    return books, str(path)


def book_chapters(tokenizer, book: dict) -> list[list[int]]:
    """Token ids per chapter; each chapter ends with a blank line, so the text before a
    chapter break ends where a reader's eye would."""
    return [encode(tokenizer, ch["text"].strip() + "\n\n") for ch in book["chapters"] if ch["text"].strip()]


# -- reporting -----------------------------------------------------------------------------


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the source tree, or None outside a repository."""
    return git_state()[0]


def report(evaluation: str, config: Any, info: dict, data: Any, results: dict, started: float) -> dict:
    """The report every evaluation returns and writes as JSON."""
    return {"evaluation": evaluation,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
            "model": info, "data": data, "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(time.time() - started, 1), "results": results}


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend (no display needed)."""
    import matplotlib  # heavy, and only the --plot path needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise EvalError(f"--plot wants a .png path, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:  # figures with a colorbar bring their own layout
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def title_of(result: dict) -> str:
    """A plot subtitle naming the model, so a plot of the untrained fallback says so."""
    m = result["model"]
    what = f"checkpoint {m['side_state_hash']}" if m["trained"] else "UNTRAINED side network (= backbone)"
    return f"{m['backbone']} + longside, {what}"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = list(values)
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


__all__ = ["Continuation", "EvalError", "backbone_hidden_logits", "backbone_prefix_logits", "book_chapters", "encode",
           "eval_window", "load_book_data", "load_model", "mean_std", "memorize", "model_info", "prefix_logits", "pyplot",
           "report", "save_figure", "score_after_prefix", "score_backbone", "title_of", "with_capacity", "write_json"]
