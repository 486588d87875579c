"""The documentation's links: every local file a link or figure names exists, and every
`#anchor` names an `<a id>` or a heading of the file it points into (results move and
sections get renamed; a figure or number a reader cannot reach is a broken promise)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]


def _anchors(path: Path) -> set[str]:
    """`<a id="...">` targets and GitHub's heading slugs (lower case, punctuation dropped, spaces to -)."""
    text = path.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+\s+(.*)$", text, re.M):
        ids.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return ids


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(doc):
    broken = []
    for link in _links(doc):
        name, _, anchor = link.partition("#")
        target = (doc.parent / name).resolve() if name else doc
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no such anchor in {target.name})")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_anchor_check_can_fail(tmp_path):
    """The check above finds a missing anchor and a missing file (so a pass means something)."""
    (tmp_path / "a.md").write_text('<a id="here"></a>\n# A heading, with commas\n')
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md#here) [ok](a.md#a-heading-with-commas) [bad](a.md#gone) [bad](c.md)\n")
    assert _anchors(tmp_path / "a.md") >= {"here", "a-heading-with-commas"}
    with pytest.raises(AssertionError, match=r"a.md#gone.*c.md"):
        test_local_links_resolve(doc)
