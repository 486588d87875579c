"""`longside eval ppl`: perplexity of long held-out books, streamed in segments.

Each book is read in window-sized segments in order, by all the local-window rows
together: the backbone runs once per segment and every row reads its output (a row with
backbone memory runs its own). Every token but the first is scored exactly once in every
row (the last position of a segment predicts the first token of the next one), so rows
are comparable token for token. Rows:

- `backbone@W`: the bare backbone, each segment on its own (what longside sees locally).
- `backbone@native`: the bare backbone at its native context (8k for SmolLM2), sliding
  with a stride: each scored token sees at least `context - stride` earlier tokens.
- `longside memory 0`: the side network with memory off (no reads, no writes).
- `longside memory M`: memory on with a bank of capacity M tokens (oldest evicted first).

Perplexities are also bucketed by the scored token's position in the book, since memory
can only help where there is history to remember.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from longside.eval.common import (
    EvalError,
    backbone_hidden_logits,
    blocked_logits,
    book_chapters,
    eval_window,
    git_commit,
    load_book_data,
    pyplot,
    report,
    save_figure,
    title_of,
    with_capacity,
    write_json,
)
from longside.memory import segment_starts
from tqdm.auto import tqdm

# the rows, in order: bare backbone at the local window and at its native context,
# longside with memory off, longside with memory on (one row per memory capacity)
ROW_KINDS = ("local", "native", "off", "memory")


@dataclass
class PplConfig:
    """What `ppl` measures. `None` sizes mean "the model's/backbone's own"."""

    window: int | None = None  # local segment length (default: the model's window)
    native_context: int | None = None  # bare backbone's long context (default: its max positions)
    native_stride: int | None = None  # tokens scored per long-context forward (default: context / 2)
    memory_tokens: tuple[int, ...] = (4096, 16384, 65536)  # capacities of the memory-on rows
    buckets: tuple[int, ...] = (0, 1024, 4096, 16384, 65536)  # lower edges of position buckets
    # per book: 128k lets the 64k memory fill, then be used for another 64k (None: whole book)
    max_tokens: int | None = 131072
    max_books: int | None = None
    seed: int = 0  # recorded only: this evaluation draws nothing at random
    rows: tuple[str, ...] = ROW_KINDS  # which rows to score (see ROW_KINDS)
    # a JSON file keeping each finished book's scores: a run that stops (or covers only
    # `max_books`) continues where it left off when given the same file again
    resume: str | None = None
    # prepared books to read without --data: "test" (Austen) or "unseen" (Moby-Dick: prose
    # neither training nor the cache fit read)
    split: str = "test"

    @classmethod
    def quick(cls) -> "PplConfig":
        return cls(window=256, memory_tokens=(512,), buckets=(0, 256, 512), max_tokens=1024, max_books=1)


def _segmented_nll(tokens: torch.Tensor, window: int, backbone, models: list, memory_layer: int,
                   bar) -> list[torch.Tensor]:
    """NLL of tokens 1..N-1 (entry i is token i+1) for each of `models`, reading the book in
    window-sized segments in order. `models` holds `(longside model, memory on)` pairs, or
    None for the bare backbone over the segment alone; every model reads segment s before
    any reads s+1, so the backbone runs once per segment for all of them (not for a model
    with backbone memory, whose blocks read its own memory). Memories are reset first."""
    n = len(tokens)
    nll = [torch.empty(n - 1) for _ in models]
    for row in models:
        if row is not None:
            row[0].reset_memory()  # every book starts with an empty memory
    # a model that carries its window reads the book as its generation does (_carried_nll)
    carrying = [i for i, row in enumerate(models) if row is not None and row[0].config.window_carry]
    for i in carrying:
        nll[i] = _carried_nll(tokens, window, *models[i], bar=bar)
    if len(carrying) == len(models):
        return nll
    # one encoding per segment for the rows that can read it (a row with backbone memory runs its own)
    share = any(row is None or row[0].backbone_memory is None for i, row in enumerate(models) if i not in carrying)
    for a in range(0, n - 1, window):
        seg = tokens[a:a + window][None]
        targets = tokens[a + 1:a + 1 + seg.shape[1]]
        shared = backbone.encode(seg, memory_layer=memory_layer) if share else None
        for i, row in enumerate(models):
            if i in carrying:
                continue
            if row is None:
                logits = blocked_logits(backbone, shared.last_hidden[0], 1024)
            else:
                m, memory = row
                with torch.no_grad():
                    logits = m(seg, use_memory=memory, write_memory=memory,
                               encoded=shared if m.backbone_memory is None else None).logits[0]
            nll[i][a:a + len(targets)] = F.cross_entropy(logits[:len(targets)].float(), targets, reduction="none")
        bar.update(1)
    return nll


def _carried_nll(tokens: torch.Tensor, window: int, model, memory: bool, bar=None) -> torch.Tensor:
    """NLL of tokens 1..N-1 for a model with `config.window_carry`, c = `config.carry_for(window)`:
    readings of `window` tokens starting every window - c, each after the first beginning with the c tokens the one
    before ended with (read again, not written again, not scored again): how `LocalWindow`
    reads a text. Every token but the first is scored once, as in `_segmented_nll`."""
    n, c = len(tokens), model.config.carry_for(window)
    nll = torch.empty(n - 1)
    for a in segment_starts(n - 1, window, c):  # readings with targets left to score
        seg = tokens[a:a + window][None]
        first = c if a else 0  # earlier positions predicted tokens the reading before scored
        with torch.no_grad():
            logits = model(seg, use_memory=memory, write_memory=memory, carried=first).logits[0]
        targets = tokens[a + 1 + first:a + 1 + seg.shape[1]]
        nll[a + first:a + first + len(targets)] = F.cross_entropy(
            logits[first:first + len(targets)].float(), targets, reduction="none")
        if bar is not None:
            bar.update(1)
    return nll


def _strided_nll(backbone, tokens: torch.Tensor, context: int, stride: int, bar) -> torch.Tensor:
    """NLL of tokens 1..N-1 with the bare backbone over a sliding context: each forward
    reads up to `context` tokens and scores its last `stride` ones."""
    n = len(tokens)
    nll = torch.empty(n - 1)
    for t0 in range(1, n, stride):
        t1 = min(t0 + stride, n)
        b = max(0, t1 - context)
        logits = backbone_hidden_logits(backbone, tokens[b:t1].tolist(), t0 - 1 - b)[:-1]
        nll[t0 - 1:t1 - 1] = F.cross_entropy(logits.float(), tokens[t0:t1], reduction="none")
        bar.update(1)
    return nll


def _buckets(nll: torch.Tensor, edges: tuple[int, ...]) -> list[dict]:
    """Sum and count of NLL per position bucket (position of the scored token)."""
    pos = torch.arange(1, len(nll) + 1)
    out = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        sel = (pos >= lo) & (pos < hi) if hi is not None else pos >= lo
        out.append({"lo": lo, "hi": hi, "nll_sum": float(nll[sel].sum()), "n_tokens": int(sel.sum())})
    return out


def _ppl(nll_sum: float, n: int) -> float | None:
    return math.exp(nll_sum / n) if n else None


def _load_resume(path: str | None, identity: dict) -> dict:
    """Finished books `{title: {"tokens", "ids_sha256", "git_commit", "elapsed_s", "rows": {row: buckets}}}`
    kept in the resume file `path` (empty when there is none yet); refuses a file written
    for another configuration, model, data or set of rows."""
    if path is None or not Path(path).exists():
        return {}
    try:
        kept = json.loads(Path(path).read_text())
        books, have = kept["books"], kept["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"resume file {path} is unreadable ({e}); move it away to start afresh") from e
    identity = json.loads(json.dumps(identity))  # tuples as lists, as the file holds them
    if identity != have:
        diff = sorted(k for k in identity if identity[k] != have.get(k))
        raise EvalError(f"resume file {path} was written for another run (different {', '.join(diff)}); "
                        "give another --resume path, or the same options as that run")
    return books


def run(model, info: dict, config: PplConfig, data=None) -> dict:
    """Run the perplexity evaluation; returns the report (see module docstring)."""
    started = time.time()
    window = eval_window(model, config.window)
    backbone = model.backbone
    context = config.native_context or backbone.spec.max_positions
    stride = config.native_stride or context // 2
    if not 1 <= stride < context or context > backbone.spec.max_positions:
        raise EvalError(f"native stride {stride} must be below the native context {context}, itself at most "
                        f"the backbone's {backbone.spec.max_positions} positions")
    if not config.rows or set(config.rows) - set(ROW_KINDS):
        raise EvalError(f"rows must be some of {', '.join(ROW_KINDS)}, got {config.rows}")
    if list(config.buckets) != sorted(set(config.buckets)) or config.buckets[0] != 0:
        raise EvalError(f"buckets must be increasing lower edges starting at 0, got {config.buckets}")
    if config.split not in ("test", "unseen"):
        raise EvalError(f"split must be test or unseen (held-out books), got {config.split!r}")
    books, data_id = load_book_data(data, config.split)
    books = books[:config.max_books] if config.max_books else books
    streams = []
    for book in books:
        ids = [t for ch in book_chapters(backbone.tokenizer, book) for t in ch][:config.max_tokens or None]
        if len(ids) < 2:
            raise EvalError(f"book {book['title']!r} has fewer than 2 tokens")
        streams.append((book["title"], torch.tensor(ids)))

    # (name, description, longside model or None for the bare backbone, memory on)
    want = set(config.rows)
    rows: list[tuple[str, dict, object, bool]] = []
    if "local" in want:
        rows.append((f"backbone@{window}", {"kind": "backbone", "context": window, "memory_tokens": 0}, None, False))
    if "native" in want:
        rows.append((f"backbone@{context}", {"kind": "backbone", "context": context, "stride": stride,
                                             "memory_tokens": 0}, None, False))
    if "off" in want:
        rows.append(("longside memory 0", {"kind": "longside", "context": window, "memory_tokens": 0,
                                            "carry": model.config.carry_for(window)}, model, False))
    for cap in config.memory_tokens if "memory" in want else ():
        rows.append((f"longside memory {cap}", {"kind": "longside", "context": window, "memory_tokens": cap,
                                                   "carry": model.config.carry_for(window)},
                     with_capacity(model, cap), True))

    cfg = dataclasses.replace(config, window=window, native_context=context, native_stride=stride)
    identity = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("max_books", "resume")},
                "side_state_hash": info["side_state_hash"], "backbone_fingerprint": info["backbone_fingerprint"],
                "side_config": info["side_config"], "data": data_id,
                "rows": [name for name, *_ in rows]}
    done = _load_resume(config.resume, identity)
    digests = {t: hashlib.sha256(ids.numpy().tobytes()).hexdigest() for t, ids in streams}
    for t in set(done) & set(digests):
        if done[t].get("ids_sha256") != digests[t]:
            raise EvalError(f"resume file {config.resume} holds other text for {t!r} than the data now gives; "
                            "give another --resume path")
    native = [name for name, desc, *_ in rows if "stride" in desc]
    segmented = [(name, None if m is None else (m, memory)) for name, desc, m, memory in rows if name not in native]
    todo = [(t, ids) for t, ids in streams if t not in done]
    carrying = sum(1 for _, r in segmented if r is not None and r[0].config.window_carry)  # read on their own
    steps = sum(math.ceil((len(ids) - 1) / stride) * bool(native)
                + math.ceil((len(ids) - 1) / window) * (len(segmented) > carrying)
                + carrying * len(segment_starts(len(ids) - 1, window, model.config.carry_for(window)))
                for _, ids in todo)
    with tqdm(total=steps, desc="ppl", unit="seg") as bar:
        for title, ids in todo:
            t0 = time.time()
            bar.set_postfix_str(title)
            nll = {}
            if native:
                nll[native[0]] = _strided_nll(backbone, ids, context, stride, bar)
            if segmented:
                per_row = _segmented_nll(ids, window, backbone, [r for _, r in segmented],
                                         model.config.memory_layer, bar)
                nll.update({name: x for (name, _), x in zip(segmented, per_row)})
            done[title] = {"tokens": len(ids), "ids_sha256": digests[title], "git_commit": git_commit(),
                           "elapsed_s": round(time.time() - t0, 1),
                           "rows": {name: _buckets(nll[name], config.buckets) for name, *_ in rows}}
            if config.resume:
                write_json({"identity": identity, "books": done}, config.resume)

    results: dict = {"rows": {}, "books": [{"title": t, "tokens": len(ids), "git_commit": done[t]["git_commit"],
                                            "elapsed_s": done[t]["elapsed_s"]} for t, ids in streams],
                     "tokens_scored": sum(len(ids) - 1 for _, ids in streams)}
    for name, desc, *_ in rows:
        books_b = [done[t]["rows"][name] for t, _ in streams]
        per_book = {t: _ppl(sum(x["nll_sum"] for x in b), sum(x["n_tokens"] for x in b))
                    for (t, _), b in zip(streams, books_b)}
        totals = [{"lo": b[0]["lo"], "hi": b[0]["hi"], "nll_sum": sum(x["nll_sum"] for x in b),
                   "n_tokens": sum(x["n_tokens"] for x in b)} for b in zip(*books_b)]
        nll_sum = sum(t["nll_sum"] for t in totals)
        n = sum(t["n_tokens"] for t in totals)
        results["rows"][name] = {**desc, "ppl": _ppl(nll_sum, n), "n_tokens": n, "per_book": per_book,
                                 "buckets": [{"lo": t["lo"], "hi": t["hi"], "n_tokens": t["n_tokens"],
                                              "ppl": _ppl(t["nll_sum"], t["n_tokens"])} for t in totals]}
    return report("ppl", cfg, info, {"books": data_id, "titles": [t for t, _ in streams]}, results, started)


def plot(result: dict, path) -> None:
    """Perplexity per position bucket, one line per row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in result["results"]["rows"].items():
        labels = [f"{b['lo']}-{b['hi'] or 'end'}" for b in row["buckets"]]
        ppl = [b["ppl"] if b["ppl"] is not None else float("nan") for b in row["buckets"]]
        ax.plot(labels, ppl, marker="o", label=f"{name} ({row['ppl']:.2f})")
    ax.set_xlabel("position of the scored token in the book (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("held-out book perplexity by position\n" + title_of(result), fontsize=9)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, help="local segment length (default: the model's window)")
    p.add_argument("--memory-tokens", type=int, nargs="+", help="memory capacities (default 4096 16384 65536)")
    p.add_argument("--buckets", type=int, nargs="+", help="lower edges of position buckets, from 0")
    p.add_argument("--max-tokens", type=int, help="tokens per book (default 131072; 0: whole book)")
    p.add_argument("--max-books", type=int)
    p.add_argument("--native-context", type=int, help="bare backbone long context (default: its max positions)")
    p.add_argument("--native-stride", type=int, help="tokens scored per long-context forward (default: half)")
    p.add_argument("--resume", metavar="PATH", help="keep each finished book's scores in this JSON file, and skip "
                   "the books it already holds (same options, model and data): a long run can stop and go on later")
    p.add_argument("--split", choices=("test", "unseen"), help="prepared books: test (Austen, the default) or "
                   "unseen (Melville's Moby-Dick, prose neither training nor the cache fit read)")
    p.add_argument("--rows", nargs="+", choices=ROW_KINDS, help="rows to score (default all: the bare backbone "
                   "at the local window and at its native context, longside with memory off and on)")


__all__ = ["ROW_KINDS", "PplConfig", "add_arguments", "plot", "run"]
