"""The README and docs/ as a reader follows them: every relative link (and its #anchor) leads
somewhere, the README fits on a screen or two and leads to every page of docs/."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1", re.M | re.S)
# [text](target) and [text](target "title"); images too
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks (a `[x](y)` inside code is no link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to
    hyphens (so "Video: re-tracking" -> "video-re-tracking")."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor GitHub makes for the headings of a page (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose(path.read_text())):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for m in LINK.finditer(prose(page.read_text())):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def test_the_docs_pages_the_readme_promises_exist():
    names = {p.name for p in DOCS}
    expected = {
        "configuration.md",
        "video.md",
        "bulk.md",
        "fine-tuning.md",
        "deployment.md",
        "workers.md",
        "http-api.md",
        "benchmarks.md",
        "architecture.md",
        "contributing.md",
    }
    assert expected <= names, f"missing from docs/: {sorted(expected - names)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.relative_to(REPO)}: {broken_links(page)}"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The check itself: a missing file and a missing heading are both reported, good ones are not."""
    (tmp_path / "other.md").write_text("# Video: re-tracking (`bench.video`)\n\n## Twice\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](other.md) [ok](other.md#video-re-tracking-benchvideo) [ok](other.md#twice-1)\n"
        "[ok](#title) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [no heading](other.md#nothing-here) [here](#nope)\n"
        "```\n[in code](not-a-link.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nothing-here: no heading #nothing-here in other.md",
        "#nope: no heading #nope in page.md",
    ]


def test_the_readme_fits_in_250_lines():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move the detail into docs/"


def test_the_readme_links_every_docs_page():
    linked = {
        (README.parent / m.group(1).partition("#")[0]).resolve()
        for m in LINK.finditer(prose(README.read_text()))
    }
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


def _rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| `")
    ]


def test_the_readme_settings_have_the_defaults_of_the_code():
    """The README's short table of settings gives each the default the generated table (the code) has;
    a renamed setting is found under the name it replaced ("was `OLD`") until the code has the new one."""
    generated = {}
    table = re.search(
        r"<!-- env-table:start -->\n(.*?)\n<!-- env-table:end -->",
        (REPO / "docs" / "configuration.md").read_text(),
        re.S,
    )
    for cells in _rows(table.group(1)):
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            generated[name] = cells[1].strip("`")
    readme_rows = [
        cells for cells in _rows(README.read_text()) if re.fullmatch(r"(`[A-Z][A-Z0-9_]+`(, )?)+", cells[0])
    ]
    assert len(readme_rows) >= 10, "the README's table of the commonest settings is gone"
    wrong = []
    for cells in readme_rows:
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1]) or [""] * len(names)
        former = re.findall(r"\(was `([A-Z][A-Z0-9_]+)`\)", cells[2])
        for name, default in zip(names, defaults, strict=True):
            known = next((n for n in [name, *former] if n in generated), None)
            if known is None:
                wrong.append(f"{name}: not a setting")
            elif generated[known] != default:
                wrong.append(f"{name}: README says {default!r}, the code {generated[known]!r}")
    assert not wrong, wrong
