"""Users' own data: text books, JSONL, local `datasets` folders, and ChapterBreak's JSON.

Books come back as `datasets.Dataset` records in the same shape as the prepared corpus:
`{book_id, source, title, split, chapters: [{title, text}]}`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import datasets

from longside.data.chapters import DEFAULT_HEADING_PATTERNS, split_chapters, strip_gutenberg
from longside.data.prepare import BOOK_FEATURES
from longside.errors import DataError


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    return path


def load_text_books(
    path: str | os.PathLike,
    heading_patterns: Sequence[str] = DEFAULT_HEADING_PATTERNS,
    split: str = "user",
) -> datasets.Dataset:
    """A `.txt` file, or a folder of them (searched recursively), as books.

    Chapters start at lines that match one of `heading_patterns` in full (Python
    regexes, tried on the stripped line, e.g. `r"CHAPTER [IVXLC]+"`); a Project
    Gutenberg header and footer are removed. A file with no heading is one chapter.
    """
    path = _existing(path)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .txt files under {path}")
    records = []
    for file in files:
        text = strip_gutenberg(file.read_bytes().decode("utf-8", errors="replace"))
        chapters = split_chapters(text, heading_patterns)
        if not chapters:
            chapters = split_chapters(text, lambda line: False, preamble_title=file.stem)
        if not chapters:
            continue  # an empty file
        rel = file.relative_to(path).with_suffix("") if path.is_dir() else Path(file.stem)
        records.append({"book_id": f"user/{rel.as_posix()}", "source": "user", "title": file.stem,
                        "split": split, "chapters": chapters})
    if not records:
        raise DataError(f"the .txt files under {path} are all empty")
    return datasets.Dataset.from_list(records, features=BOOK_FEATURES)


def load_jsonl(path: str | os.PathLike) -> datasets.Dataset:
    """A JSON-lines file (one object per line) as a Dataset, columns as in the file.

    For books, use the fields `title` and `chapters` (a list of `{title, text}`) or
    `text`; the evaluations read those.
    """
    path = _existing(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{path}:{n} is not valid JSON ({e})") from e
    if not rows:
        raise DataError(f"{path} holds no records")
    return datasets.Dataset.from_list(rows)


def load_local_dataset(path: str | os.PathLike) -> datasets.Dataset | datasets.DatasetDict:
    """Any folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    path = _existing(path)
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is not a folder written by datasets' save_to_disk ({e})") from e


def load_chapterbreak(path: str | os.PathLike, subset: str | None = None) -> datasets.Dataset:
    """ChapterBreak's released JSON (e.g. `chapterbreak_ctx_8192.json`) as suffix-choice items.

    The release is `{"pg19": {work_id: [{"ctx", "pos", "negs"}, ...]}, "ao3": {...}}`:
    `ctx` the text before a chapter break, `pos` the true start of the next chapter,
    `negs` five starts of other chapters of the same work. Items come back as
    `{prefix, candidates, label, subset, work_id}`, the true suffix placed at a
    position fixed by a hash of the work and item (so it is not always first).
    `subset` keeps only "pg19" or "ao3".
    """
    path = _existing(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e})") from e
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path} is not a ChapterBreak file (expected {{'pg19': ..., 'ao3': ...}})")
    if subset is not None and subset not in data:
        raise DataError(f"{path} has no subset {subset!r}; it has {', '.join(data)}")
    items = []
    for name, works in data.items():
        if subset is not None and name != subset:
            continue
        if not isinstance(works, dict):
            raise DataError(f"{path}: subset {name!r} should map work ids to lists of examples")
        for work_id, examples in works.items():
            for i, ex in enumerate(examples):
                if not all(k in ex for k in ("ctx", "pos", "negs")):
                    raise DataError(f"{path}: {name}/{work_id}[{i}] lacks ctx/pos/negs")
                candidates = list(ex["negs"])
                label = int.from_bytes(hashlib.sha1(f"{name}/{work_id}/{i}".encode()).digest()[:4], "big") % (
                    len(candidates) + 1)
                candidates.insert(label, ex["pos"])
                items.append({"prefix": ex["ctx"], "candidates": candidates, "label": label,
                              "subset": name, "work_id": str(work_id)})
    if not items:
        raise DataError(f"{path} holds no ChapterBreak examples")
    return datasets.Dataset.from_list(items)
