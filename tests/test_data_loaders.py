"""Users' own data: text books, JSONL, saved datasets, ChapterBreak's release format."""

from __future__ import annotations

import json

import datasets
import pytest

from longside.data import load_chapterbreak, load_jsonl, load_local_dataset, load_text_books
from longside.data.chapters import merge_same_titles, split_chapters, strip_gutenberg
from longside.errors import DataError

GUTENBERG_BOOK = """The Project Gutenberg EBook of A Test
Release Date: never

*** START OF THIS PROJECT GUTENBERG EBOOK A TEST ***

A TEST
by Nobody

CHAPTER I

It was a dark night.

CHAPTER II.   The Return

She came home.

*** END OF THIS PROJECT GUTENBERG EBOOK A TEST ***
Licence text that is not the book.
"""


def test_split_chapters_and_boilerplate():
    chapters = split_chapters(strip_gutenberg(GUTENBERG_BOOK))
    assert [c["title"] for c in chapters] == ["CHAPTER I", "CHAPTER II. The Return"]
    assert chapters[0]["text"] == "It was a dark night."
    assert chapters[1]["text"] == "She came home."
    with_preamble = split_chapters("front\n\nX\nbody", [r"X"], preamble_title="Front")
    assert with_preamble == [{"title": "Front", "text": "front"}, {"title": "X", "text": "body"}]
    merged = merge_same_titles([{"title": "A", "text": "1"}, {"title": "A", "text": "2"}, {"title": "B", "text": "3"}])
    assert merged == [{"title": "A", "text": "1\n\n2"}, {"title": "B", "text": "3"}]


def test_text_folder_loader(tmp_path):
    (tmp_path / "shelf").mkdir()
    (tmp_path / "shelf" / "a_test.txt").write_text(GUTENBERG_BOOK)
    (tmp_path / "shelf" / "poem.txt").write_text("One short poem\nwith no headings.\n")
    (tmp_path / "shelf" / "empty.txt").write_text("\n")
    books = load_text_books(tmp_path / "shelf")
    by_title = {b["title"]: b for b in books}
    assert set(by_title) == {"a_test", "poem"}
    assert [c["title"] for c in by_title["a_test"]["chapters"]] == ["CHAPTER I", "CHAPTER II. The Return"]
    assert "Licence" not in by_title["a_test"]["chapters"][-1]["text"]
    assert len(by_title["poem"]["chapters"]) == 1  # no heading: the whole file is one chapter

    custom = tmp_path / "custom.txt"
    custom.write_text("== Part A ==\nalpha\n== Part B ==\nbeta\n")
    book = load_text_books(custom, heading_patterns=[r"== Part \w ==", r"Epilogue"])[0]
    assert [(c["title"], c["text"]) for c in book["chapters"]] == [("== Part A ==", "alpha"), ("== Part B ==", "beta")]
    with pytest.raises(DataError, match="does not exist"):
        load_text_books(tmp_path / "nowhere")


def test_jsonl_and_saved_dataset(tmp_path):
    path = tmp_path / "books.jsonl"
    path.write_text(json.dumps({"title": "t", "text": "a b"}) + "\n\n" + json.dumps({"title": "u", "text": "c"}) + "\n")
    ds = load_jsonl(path)
    assert ds["title"] == ["t", "u"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(saved))
    assert load_local_dataset(saved)["train"]["text"] == ["a b", "c"]
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        load_jsonl(path)
    with pytest.raises(DataError, match="save_to_disk"):
        load_local_dataset(tmp_path)


def test_chapterbreak_release_format(tmp_path):
    """ChapterBreak's JSON: {"pg19"|"ao3": {work_id: [{"ctx", "pos", "negs": [5]}]}}."""
    examples = {
        "pg19": {"111": [{"ctx": f"prefix {i}", "pos": f"true {i}", "negs": [f"neg {i}.{j}" for j in range(5)]}
                         for i in range(4)]},
        "ao3": {"222": [{"ctx": "fic prefix", "pos": "fic true", "negs": [f"fic neg {j}" for j in range(5)]}]},
    }
    path = tmp_path / "chapterbreak_ctx_512.json"
    path.write_text(json.dumps(examples))
    items = load_chapterbreak(path)
    assert len(items) == 5
    for item in items:
        assert len(item["candidates"]) == 6
        truth = item["candidates"][item["label"]]
        assert truth.startswith("true") or truth == "fic true"
        assert sum(c.startswith(("true", "fic true")) for c in item["candidates"]) == 1
    pg19 = load_chapterbreak(path, subset="pg19")
    assert [x["prefix"] for x in pg19] == [f"prefix {i}" for i in range(4)]
    assert set(pg19["work_id"]) == {"111"} and set(pg19["subset"]) == {"pg19"}
    assert load_chapterbreak(path)["label"] == items["label"]  # the placement is fixed, not random
    with pytest.raises(DataError, match="no subset"):
        load_chapterbreak(path, subset="nope")
    path.write_text(json.dumps({"pg19": {"1": [{"ctx": "x"}]}}))
    with pytest.raises(DataError, match="lacks ctx/pos/negs"):
        load_chapterbreak(path)
