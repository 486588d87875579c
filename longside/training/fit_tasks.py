"""Many-shot classification documents for fitting the token-cache reader.

The reader's gate (token_cache.TokenCacheReader) learns from what it is fitted on when
to trust stored neighbours. Fitted on books alone it barely opens at the label position
of a many-shot prompt, even where the neighbours (earlier demonstrations with their
labels) predict the label better than the model (`longside eval icl`, docs/results.md). These
documents teach it that case, from data the evaluations never use: passages of the
*training* books (the Bible, Shakespeare, Milton), labelled by facts about where they
come from, in prompt wordings other than the ICL evaluation's.

A document is a long run of demonstrations of one task, `PROMPT(text) + " label" + SEP`;
only the first token of each label is scored (labels -100 elsewhere), so every
demonstration after the first window is a query with the earlier ones in memory.
"""

from __future__ import annotations

import re

import numpy as np

from longside.errors import LongsideError

# the KJV's sections, by the book's title in the prepared corpora
_LAW = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy")
_HISTORY = ("Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
            "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Acts")
_POETRY = ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon")
_GOSPEL = ("Matthew", "Mark", "Luke", "John")
_PROPHECY = ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
             "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Revelation")
# the First Folio's grouping of the plays (Pericles and the poems are in none of the three)
_HISTORIES = ("King John", "King Richard II", "King Henry IV, Part 1", "King Henry IV, Part 2", "King Henry V",
              "King Henry VI, Part 1", "King Henry VI, Part 2", "King Henry VI, Part 3", "King Richard III",
              "King Henry VIII")
_TRAGEDIES = ("Troilus and Cressida", "Coriolanus", "The Tragedy of Titus Andronicus", "Romeo and Juliet",
              "Timon of Athens", "Julius Caesar", "Macbeth", "Hamlet", "King Lear", "Othello",
              "Antony and Cleopatra", "Cymbeline")
_COMEDIES = ("The Tempest", "Two Gentlemen of Verona", "The Merry Wives of Windsor", "Measure for Measure",
             "The Comedy of Errors", "Much Ado About Nothing", "Love's Labour's Lost", "A Midsummer Night's Dream",
             "The Merchant of Venice", "As You Like It", "The Taming of the Shrew", "All's Well That Ends Well",
             "Twelfth Night", "The Winter's Tale")


def _testament(book) -> str | None:
    section = _section(book)
    if section is None:
        return None
    new = section in ("gospel", "letter") or book["title"] in ("Acts", "Revelation")
    return "new" if new else "old"


def _section(book) -> str | None:
    if book["source"] != "bible":
        return None
    t = book["title"]
    for name, titles in (("law", _LAW), ("history", _HISTORY), ("poetry", _POETRY), ("gospel", _GOSPEL),
                         ("prophecy", _PROPHECY)):
        if t in titles:
            return name
    return "letter"


def _genre(book) -> str | None:
    if book["source"] != "shakespeare":
        return None
    for name, titles in (("history", _HISTORIES), ("tragedy", _TRAGEDIES), ("comedy", _COMEDIES)):
        if book["title"] in titles:
            return name
    return None


def _author(book) -> str | None:
    return {"bible": "scripture", "shakespeare": "shakespeare", "milton": "milton"}.get(book["source"])


# name -> (labeller of a book, label words)
TASKS = {
    "testament": (_testament, ("old", "new")),
    "bible_section": (_section, ("law", "history", "poetry", "prophecy", "gospel", "letter")),
    "play_genre": (_genre, ("comedy", "tragedy", "history")),
    "author": (_author, ("scripture", "shakespeare", "milton")),
}
# (before the text, between text and label, after the label): not the ICL evaluation's wording
PROMPTS = (("Text: ", "\nClass:", "\n\n"), ("Passage: ", "\nCategory:", "\n\n"), ("", "\nAnswer:", "\n---\n"))

_VERSE = re.compile(r"^\d+\s+")


def _snippets(book) -> list[str]:
    """Passages of a book: verses of the Bible, speeches and verse paragraphs elsewhere
    (speaker names and stage directions dropped), each at least 6 words."""
    out = []
    for ch in book["chapters"]:
        parts = ch["text"].split("\n") if book["source"] == "bible" else ch["text"].split("\n\n")
        for p in parts:
            p = _VERSE.sub("", p.strip()).replace("\n", " ")
            if len(p.split()) >= 6 and not p.startswith("["):
                out.append(p)
    return out


def classification_tasks(tokenizer, books: list[dict], n: int, window: int, windows: int = 12,
                         max_text_tokens: int = 40, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` many-shot documents (ids, labels) int64 `[windows * window]` cycling through
    TASKS and PROMPTS; `books` are prepared books (dicts with source, title, chapters),
    normally the training split. Passages are cut to `max_text_tokens` tokens; demonstrations
    are drawn class-balanced, so a constant guess gets no lower loss than chance."""
    if n <= 0:
        return []
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    rng = np.random.default_rng(seed)
    docs = []
    names = list(TASKS)
    pools: dict[str, dict[str, list[str]]] = {}
    for name in names:
        labeller, words = TASKS[name]
        pool: dict[str, list[str]] = {w: [] for w in words}
        for b in books:
            label = labeller(b)
            if label is not None:
                pool[label] += _snippets(b)
        pools[name] = {w: s for w, s in pool.items() if s}
        firsts = [enc(" " + w)[0] for w in pools[name]]
        if len(set(firsts)) != len(firsts):
            raise LongsideError(f"labels of task {name} share a first token in this tokenizer")
    usable = [m for m in names if len(pools[m]) >= 2]
    if not usable:
        raise LongsideError("the books given hold no two classes of any classification task; "
                            "pass the prepared training books (longside.data.load_books('train'))")
    length = windows * window
    for i in range(n):
        pool = pools[usable[i % len(usable)]]
        words = list(pool)
        before, between, after = (enc(s) for s in PROMPTS[i % len(PROMPTS)])
        ids: list[int] = []
        labels: list[int] = []
        while True:
            w = words[int(rng.integers(len(words)))]
            text = enc(pool[w][int(rng.integers(len(pool[w])))])[:max_text_tokens]
            label = enc(" " + w)
            demo = before + text + between + label + after
            if len(ids) + len(demo) > length:
                break
            at = len(ids) + len(before) + len(text) + len(between)
            ids += demo
            labels += [-100] * len(demo)
            labels[at] = label[0]
        while len(ids) < length:  # fill the end with unlabelled passages of the same task
            w = words[int(rng.integers(len(words)))]
            ids += before + enc(pool[w][int(rng.integers(len(pool[w])))])[:max_text_tokens] + after
        ids = ids[:length]
        labels += [-100] * (length - len(labels))
        docs.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return docs


__all__ = ["PROMPTS", "TASKS", "classification_tasks"]
