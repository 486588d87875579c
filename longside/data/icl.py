"""In-context-learning tasks from vaderSentiment's labelled snippets (Hutto & Gilbert, ICWSM 2014).

`hutto_ICWSM_2014.tar.gz` in the vaderSentiment sdist holds four tab-separated files
`ID <tab> MEAN-RATING <tab> TEXT`, each rating the mean of human ratings in [-4, 4]:
movie-review snippets (10,605, Rotten Tomatoes), tweets (4,200), Amazon review snippets
(3,708) and New York Times editorial snippets (5,190).

Tasks (records `{text, label, label_text}`):
- `mr2`, `tweets2`, `amazon2`, `nyt2`: the sign of the rating; rating exactly 0 dropped.
- `mr5`: five classes of the movie rating r:  r <= -2 terrible, -2 < r <= -1 bad,
  -1 < r < 1 okay, 1 <= r < 2 good, r >= 2 great (symmetric; roughly balanced here).
- `source4`: which of the four collections a snippet comes from, each collection
  subsampled (deterministically) to the size of the smallest, so chance is 25%.
Splits are fixed: a snippet is in test when a hash of its document id falls in the
lowest fifth (Amazon and NYT ids are `document_sentence`, so a document's sentences stay
together); a test text that also occurs in train is dropped. Every task uses the same
rule, so a snippet is on the same side in all of them.
Label words are chosen so that each, after a space, is one token of the SmolLM2 tokenizer.
"""

from __future__ import annotations

import hashlib
import html
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from longside.errors import DataError

# Bump when task building changes, so `prepare` rebuilds tasks made by older code.
TASKS_VERSION = 2  # 2: test snippets that nearly repeat a training one are dropped
TEST_FRACTION = 0.2
MR5_THRESHOLDS = (-2.0, -1.0, 1.0, 2.0)


@dataclass(frozen=True)
class IclTask:
    """One classification task: its label words (index = label) and what it asks."""

    name: str
    labels: tuple[str, ...]
    description: str


ICL_TASKS: Mapping[str, IclTask] = MappingProxyType({
    t.name: t for t in (
        IclTask("mr2", ("negative", "positive"), "movie-review snippet sentiment (sign of the mean rating)"),
        IclTask("mr5", ("terrible", "bad", "okay", "good", "great"),
                "movie-review snippet sentiment in five classes (rating thresholds -2, -1, 1, 2)"),
        IclTask("tweets2", ("negative", "positive"), "tweet sentiment (sign of the mean rating)"),
        IclTask("amazon2", ("negative", "positive"), "Amazon review snippet sentiment (sign)"),
        IclTask("nyt2", ("negative", "positive"), "New York Times editorial snippet sentiment (sign)"),
        IclTask("source4", ("movie", "tweet", "product", "news"),
                "which collection a snippet comes from: movie review, tweet, Amazon product review, NYT"),
    )
})

# Collection -> file in the archive; the order is source4's label order.
_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweet": "tweets_GroundTruth.txt",
    "product": "amazonReviewSnippets_GroundTruth.txt",
    "news": "nytEditorialSnippets_GroundTruth.txt",
}


@dataclass(frozen=True)
class Snippet:
    collection: str
    doc: str  # the unit a split keeps together
    rating: float
    text: str


def read_snippets(raw: Path) -> dict[str, list[Snippet]]:
    """The four ground-truth files from the sdist's nested archive -> collection -> snippets."""
    archives = sorted(raw.glob("vaderSentiment-*/additional_resources/hutto_ICWSM_2014.tar.gz"))
    if not archives:
        raise DataError(f"no hutto_ICWSM_2014.tar.gz under {raw}; run `longside data prepare --force`")
    out: dict[str, list[Snippet]] = {}
    with tarfile.open(archives[0]) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for collection, filename in _FILES.items():
            if filename not in members:
                raise DataError(f"{archives[0].name} lacks {filename}")
            data = tar.extractfile(members[filename]).read().decode("utf-8", errors="replace")
            out[collection] = [_parse_line(collection, line) for line in data.splitlines() if line.strip()]
    return out


def _parse_line(collection: str, line: str) -> Snippet:
    ident, rating, text = line.split("\t", 2)
    return Snippet(collection, ident.split("_")[0], float(rating), html.unescape(text.strip()))


def near_keys(text: str) -> set[str]:
    """What makes two snippets near-duplicates: the same words (case, punctuation and
    spacing aside), or the same first 12 words."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(words)} | ({"^" + " ".join(words[:12])} if len(words) >= 12 else set())


def is_test(s: Snippet) -> bool:
    """The fixed split: a stable hash of (collection, document) in the lowest TEST_FRACTION."""
    digest = hashlib.sha1(f"{s.collection}/{s.doc}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION


def _sign(s: Snippet) -> int | None:
    return None if s.rating == 0 else int(s.rating > 0)


def _mr5(s: Snippet) -> int:
    r = s.rating
    very_neg, neg, pos, very_pos = MR5_THRESHOLDS
    if r <= very_neg:
        return 0
    if r <= neg:
        return 1
    if r < pos:
        return 2
    return 3 if r < very_pos else 4


def _balanced(snippets: dict[str, list[Snippet]]) -> list[Snippet]:
    """Each collection cut to the smallest one's size, keeping a stable hash-ordered subset."""
    size = min(len(v) for v in snippets.values())
    key = lambda s: hashlib.sha1(f"pick/{s.collection}/{s.doc}/{s.text}".encode()).digest()  # noqa: E731
    return [s for collection in _FILES for s in sorted(snippets[collection], key=key)[:size]]


def build_tasks(snippets: dict[str, list[Snippet]]) -> dict[str, dict[str, list[dict]]]:
    """All six tasks -> split -> records `{text, label, label_text}`."""
    source_label = {c: i for i, c in enumerate(_FILES)}
    plans: dict[str, tuple[list[Snippet], Callable[[Snippet], int | None]]] = {
        "mr2": (snippets["movie"], _sign),
        "mr5": (snippets["movie"], _mr5),
        "tweets2": (snippets["tweet"], _sign),
        "amazon2": (snippets["product"], _sign),
        "nyt2": (snippets["news"], _sign),
        "source4": (_balanced(snippets), lambda s: source_label[s.collection]),
    }
    tasks = {}
    for name, (items, labeller) in plans.items():
        words = ICL_TASKS[name].labels
        splits: dict[str, list[dict]] = {"train": [], "test": []}
        for s in items:
            label = labeller(s)
            if label is not None and s.text:
                splits["test" if is_test(s) else "train"].append(
                    {"text": s.text, "label": label, "label_text": words[label]})
        # a test snippet that (nearly) repeats a training one would be answered by the copy
        # read from memory, not by in-context learning: keep it out of the test split
        seen = {k for r in splits["train"] for k in near_keys(r["text"])}
        splits["test"] = [r for r in splits["test"] if not near_keys(r["text"]) & seen]
        tasks[name] = splits
    return tasks
