"""Every relative link in README.md, docs/*.md and the results indexes points at a file that exists (and, with a
#fragment, at a heading of that file), so moving a page or a result table cannot leave a dangling link."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "eval" / "results" / "README.md",
         ROOT / "eval" / "results" / "archive" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(text: str) -> list[str]:
    """Link targets outside fenced code blocks and inline code."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", path.read_text(), re.M)}


def test_the_link_parser_and_slugs():
    text = "a [x](docs/a.md) ![i](b.png) `[no](c.md)` [w](https://e.org)\n```\n[no](d.md)\n```\n[y](e.md#h-1)"
    assert links(text) == ["docs/a.md", "b.png", "https://e.org", "e.md#h-1"]
    assert slug("In-LLM methods and `keep`") == "in-llm-methods-and-keep"
    assert slug("Support matrix (method × family)") == "support-matrix-method--family"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), f"{page} is gone: update PAGES"
    bad = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target} (no heading #{frag} in {dest.name})")
    assert not bad, f"{page.relative_to(ROOT)}: dangling links: " + "; ".join(bad)
