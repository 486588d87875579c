"""`longside eval chapterbreak`: ChapterBreak-style suffix identification.

An item is a prefix that ends at a chapter break and six candidate openings: the true
next chapter and five other chapters' openings of the same book (`candidate_tokens`
each). Negatives are drawn from *later* chapters, so no candidate ever appears inside
the prefix (a memory could otherwise recognise a negative it has already read). Two
protocols pick a candidate:

- `likelihood`: the highest mean log-probability after the prefix (ChapterBreak's own);
- `pmi`: the highest gain of that mean log-probability over the same model's with no
  prefix (the candidate after a bare chapter break, "\n\n"): how much the prefix makes
  the candidate likelier, so an opening of plain, predictable words does not win on
  fluency alone (domain-conditional PMI, Holtzman et al. 2021).

From held-out books, an item is kept only when its break has at least the longest
prefix length of text before it, so every prefix length is scored on the same items.
With `--data FILE.json` the original ChapterBreak release is read instead (its items are
as long as the file's context; longer prefix lengths then have no items).

Rows: the bare backbone at the local window and at its native context (only for prefix
lengths that fit it), longside with memory off, longside with the prefix in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

from longside.eval.common import (
    EvalError,
    book_chapters,
    encode,
    eval_window,
    load_book_data,
    pyplot,
    report,
    save_figure,
    score_after_prefix,
    score_backbone,
    title_of,
)
from tqdm.auto import tqdm

from longside.data import load_chapterbreak

PROTOCOLS = ("likelihood", "pmi")
# the rows, in order: bare backbone at the local window and at its native context,
# longside with memory off, longside with the prefix in memory
ROW_KINDS = ("local", "native", "off", "memory")
BREAK = "\n\n"  # what every candidate follows when scored without a prefix (pmi)


@dataclass
class ChapterBreakConfig:
    window: int | None = None  # local window (default: the model's)
    prefix_tokens: tuple[int, ...] = (4096, 8192, 16384, 32768)
    candidate_tokens: int = 128
    negatives: int = 5
    items_per_book: int | None = 5  # None: every eligible break
    max_items: int | None = None
    max_books: int | None = None
    native_context: int | None = None  # bare backbone's long context (default: its max positions)
    subset: str | None = None  # original ChapterBreak JSON only: "pg19" or "ao3"
    rows: tuple[str, ...] = ROW_KINDS  # which rows to score (see ROW_KINDS)
    seed: int = 0

    @classmethod
    def quick(cls) -> "ChapterBreakConfig":
        return cls(window=256, prefix_tokens=(512, 1024), candidate_tokens=32, items_per_book=1, max_items=1,
                   max_books=1)


def book_items(tokenizer, books: list[dict], config: ChapterBreakConfig) -> list[dict]:
    """Items `{book, chapter, prefix, candidates, label}` (token ids) from chaptered books."""
    rng = random.Random(config.seed)
    need = max(config.prefix_tokens)
    items = []
    for book in books:
        chapters = book_chapters(tokenizer, book)
        starts = [0]
        for ch in chapters:
            starts.append(starts[-1] + len(ch))
        eligible = [i for i in range(1, len(chapters) - config.negatives) if starts[i] >= need]
        if config.items_per_book is not None and len(eligible) > config.items_per_book:
            eligible = sorted(rng.sample(eligible, config.items_per_book))
        for i in eligible:
            prefix = [t for ch in chapters[:i] for t in ch][-need:]
            negatives = rng.sample(range(i + 1, len(chapters)), config.negatives)
            candidates = [chapters[j][:config.candidate_tokens] for j in [i] + negatives]
            label = rng.randrange(len(candidates))
            candidates.insert(label, candidates.pop(0))
            items.append({"book": book["title"], "chapter": i, "prefix": prefix, "candidates": candidates,
                          "label": label})
    return items


def json_items(tokenizer, path: str | Path, config: ChapterBreakConfig) -> list[dict]:
    """Items from the original ChapterBreak JSON (texts tokenized here)."""
    items = []
    for i, ex in enumerate(load_chapterbreak(path, subset=config.subset)):
        items.append({"book": f"{ex['subset']}/{ex['work_id']}", "chapter": i,
                      "prefix": encode(tokenizer, ex["prefix"]),
                      "candidates": [encode(tokenizer, c)[:config.candidate_tokens] for c in ex["candidates"]],
                      "label": ex["label"]})
    return items


def _picks(scores, base) -> dict[str, int]:
    """The candidate each protocol picks, from scores after the prefix and without it."""
    means = [s.mean_logprob for s in scores]
    gains = [m - b.mean_logprob for m, b in zip(means, base)]
    return {"likelihood": means.index(max(means)), "pmi": gains.index(max(gains))}


def run(model, info: dict, config: ChapterBreakConfig, data=None) -> dict:
    """Run the evaluation; returns the report with accuracy per prefix length and row."""
    started = time.time()
    if not config.rows or set(config.rows) - set(ROW_KINDS):
        raise EvalError(f"rows must be some of {', '.join(ROW_KINDS)}, got {config.rows}")
    window = eval_window(model, config.window)
    backbone = model.backbone
    native = config.native_context or backbone.spec.max_positions
    if config.candidate_tokens >= window:
        raise EvalError(f"candidates of {config.candidate_tokens} tokens leave no context in a window of {window}")
    if data is not None and Path(data).suffix == ".json":
        items, data_id = json_items(backbone.tokenizer, data, config), {"chapterbreak": str(data)}
    else:
        books, source = load_book_data(data, "test")
        books = books[:config.max_books] if config.max_books else books
        items, data_id = book_items(backbone.tokenizer, books, config), {"books": source}
    rng = random.Random(config.seed)
    if config.max_items is not None and len(items) > config.max_items:
        items = [items[i] for i in sorted(rng.sample(range(len(items)), config.max_items))]
    if not items:
        raise EvalError(f"no chapter break has {max(config.prefix_tokens)} tokens before it and "
                        f"{config.negatives} chapters after it; use shorter --prefix-tokens or longer books")

    lengths = sorted(config.prefix_tokens)
    names = dict(zip(ROW_KINDS, [f"backbone@{window}", f"backbone@{native}", "longside memory off",
                                 "longside memory"]))
    want = set(config.rows)
    rows = [names[k] for k in ROW_KINDS if k in want]
    brk = encode(backbone.tokenizer, BREAK)
    picks: list[dict] = []  # per item: {row: {length: {protocol: predicted index}}}
    n_steps = len(items) * (4 + 2 * len(lengths))
    with tqdm(total=n_steps, desc="chapterbreak", unit="score", leave=False) as bar:
        for item in items:
            prefix, cands = item["prefix"], item["candidates"]
            got: dict[str, dict[int, dict]] = {r: {} for r in rows}
            encoded: dict = {}  # prefix lengths a window apart share their memory segments
            # each candidate without a prefix, once per model (pmi's baseline); both longside
            # rows share theirs, so pmi compares them on the prefix alone
            if want & {"local", "native"}:
                base_bb = score_backbone(backbone, brk, cands, context=len(brk) + max(map(len, cands)))
            if want & {"off", "memory"}:
                base_ls = score_after_prefix(model, brk, cands, window=window, use_memory=False)
            bar.update(2)
            # Both window-only rows see the same last tokens whatever the prefix length.
            fixed = {}
            if "local" in want:
                fixed["local"] = _picks(score_backbone(backbone, prefix, cands, context=window), base_bb)
            if "off" in want:
                fixed["off"] = _picks(score_after_prefix(model, prefix, cands, window=window, use_memory=False),
                                      base_ls)
            bar.update(2)
            for L in lengths:
                if len(prefix) >= L:
                    for kind, pick in fixed.items():
                        got[names[kind]][L] = pick
                    if "native" in want and L <= native:
                        got[names["native"]][L] = _picks(score_backbone(backbone, prefix[-L:], cands,
                                                                        context=native), base_bb)
                    if "memory" in want:
                        got[names["memory"]][L] = _picks(score_after_prefix(model, prefix[-L:], cands,
                                                                            window=window, encoded=encoded),
                                                         base_ls)
                bar.update(2)
            picks.append(got)

    by_length = {}
    for L in lengths:
        scored = [(item, got) for item, got in zip(items, picks) if len(item["prefix"]) >= L]
        entry = {"n_items": len(scored), "rows": {}}
        for r in rows:
            row = {"n_items": sum(L in got[r] for _, got in scored)}
            for p in PROTOCOLS:
                hits = [got[r][L][p] == item["label"] for item, got in scored if L in got[r]]
                row[p] = {"correct": sum(hits), "accuracy": sum(hits) / len(hits) if hits else None}
            entry["rows"][r] = row
        by_length[str(L)] = entry
    results = {
        "chance": 1 / len(items[0]["candidates"]),
        "n_items": len(items),
        "protocols": list(PROTOCOLS),
        "by_prefix_tokens": by_length,
        "notes": {f"backbone@{native}": f"only where the prefix fits the native context; the prefix is cut to its "
                                        f"last {native} - candidate tokens",
                  f"backbone@{window} / longside memory off": "see only the last window - candidate tokens, "
                                                              "the same at every prefix length"},
        "items": [{"book": it["book"], "chapter": it["chapter"], "label": it["label"],
                   "prefix_tokens": len(it["prefix"]),
                   "predicted": {r: {str(k): v for k, v in got[r].items()} for r in rows}}
                  for it, got in zip(items, picks)],
    }
    cfg = dataclasses.replace(config, window=window, native_context=native)
    return report("chapterbreak", cfg, info, data_id, results, started)


def plot(result: dict, path) -> None:
    """Accuracy against prefix length, one line per row, one panel per protocol, chance dashed."""
    plt = pyplot()
    res = result["results"]
    lengths = list(res["by_prefix_tokens"])
    rows = next(iter(res["by_prefix_tokens"].values()))["rows"]
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(11, 4.5), sharey=True)
    for ax, p in zip(axes, PROTOCOLS):
        for r in rows:
            acc = [res["by_prefix_tokens"][L]["rows"][r][p]["accuracy"] for L in lengths]
            ax.plot(lengths, [100 * a if a is not None else float("nan") for a in acc], marker="o", label=r)
        ax.axhline(100 * res["chance"], ls="--", color="gray", label="chance")
        ax.set_xlabel("prefix length (tokens)")
        ax.set_title(f"protocol: {p}")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ChapterBreak-style suffix identification, {res['n_items']} items\n" + title_of(result),
                 fontsize=9)
    save_figure(plt, fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, help="local window (default: the model's)")
    p.add_argument("--prefix-tokens", type=int, nargs="+", help="prefix lengths (default 4096 8192 16384 32768)")
    p.add_argument("--candidate-tokens", type=int, help="tokens per candidate opening (default 128)")
    p.add_argument("--items-per-book", type=int, help="chapter breaks per book (default 5)")
    p.add_argument("--max-items", type=int)
    p.add_argument("--max-books", type=int)
    p.add_argument("--native-context", type=int, help="bare backbone long context (default: its max positions)")
    p.add_argument("--subset", choices=("pg19", "ao3"), help="original ChapterBreak JSON: one subset only")
    p.add_argument("--rows", nargs="+", choices=ROW_KINDS, help="rows to score (default all: the bare backbone "
                   "at the local window and at its native context, longside with memory off and on)")


__all__ = ["PROTOCOLS", "ROW_KINDS", "ChapterBreakConfig", "add_arguments", "book_items", "json_items", "plot", "run"]
