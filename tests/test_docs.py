"""The README is a front door: every relative link of it and of docs/ resolves (files and
heading anchors), its quick start is what CI runs, and it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"(?s)```.*?```", "", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} leads nowhere"
        if anchor:
            assert file.suffix == ".md", f"{page.name}: {target}: an anchor into a non-page"
            assert anchor in anchors(file), f"{page.name}: {target}: no such heading"


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    for page in (ROOT / "docs").glob("*.md"):
        reached = page.resolve() in linked or any(
            page.name in links(other) for other in PAGES if other.resolve() in linked
        )
        assert reached, f"docs/{page.name} is not reachable from the README"
    assert len(readme.splitlines()) <= 260


def test_the_quick_start_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = [line.strip() for line in ci.splitlines() if "pytest" in line]
    quick = re.search(r"## Quick start\n+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert quick and command in quick.group(1).splitlines(), (command, quick)
