"""Cutting a plain text into chapters at heading lines, and cleaning it on the way.

Used both for the bundled books (with per-book heading rules) and for users' own text
files (with heading patterns they pass). A heading is a whole line (stripped) that
matches one of the patterns; the chapter runs to the next heading.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

# Common chapter headings in novels and plays: "CHAPTER XII", "Chapter 3.", "BOOK I",
# "ACT II", "PART ONE". Users override these with `heading_patterns=`.
DEFAULT_HEADING_PATTERNS: tuple[str, ...] = (
    r"(?i)(chapter|book|part|act|canto|letter|volume)\s+([0-9]+|[ivxlcdm]+|one|two|three|four|"
    r"five|six|seven|eight|nine|ten|first|second|third|fourth|fifth)\b[^a-z]{0,3}(\s.{0,60})?",
)

# Project Gutenberg wrapper: everything up to the START marker and from the END marker on
# is licence boilerplate, not the book.
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and footer (licence, credits) if present."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def clean_text(text: str) -> str:
    """Normalise newlines, trailing spaces and runs of blank lines; strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def compile_patterns(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate: does this stripped line match one of the patterns in full?"""
    compiled = [re.compile(p) for p in patterns]
    return lambda line: any(p.fullmatch(line) for p in compiled)


def split_chapters(
    text: str,
    is_heading: Callable[[str], bool] | Sequence[str] = DEFAULT_HEADING_PATTERNS,
    preamble_title: str | None = None,
) -> list[dict[str, str]]:
    """Cut `text` at heading lines into `[{title, text}, ...]`.

    The heading line becomes the chapter's title (whitespace collapsed), not part of its
    text. Text before the first heading is dropped (title pages, contents), unless
    `preamble_title` is given, when it becomes a first chapter of that name. Chapters
    left empty (a heading straight after a heading) are dropped.
    """
    if not callable(is_heading):
        is_heading = compile_patterns(is_heading)
    chapters: list[dict[str, str]] = []
    title, body = preamble_title, []

    def close() -> None:
        chapter_text = clean_text("\n".join(body))
        if title is not None and chapter_text:
            chapters.append({"title": title, "text": chapter_text})

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = line.strip()
        if stripped and is_heading(stripped):
            close()
            title, body = " ".join(stripped.split()), []
        else:
            body.append(line)
    close()
    return chapters


def merge_same_titles(chapters: list[dict[str, str]], key: Callable[[str], str] = str) -> list[dict[str, str]]:
    """Join consecutive chapters whose titles have the same `key` (e.g. an act repeated
    above each of its scenes); the first title is kept."""
    merged: list[dict[str, str]] = []
    for chapter in chapters:
        if merged and key(merged[-1]["title"]) == key(chapter["title"]):
            merged[-1] = {"title": merged[-1]["title"], "text": merged[-1]["text"] + "\n\n" + chapter["text"]}
        else:
            merged.append(dict(chapter))
    return merged
