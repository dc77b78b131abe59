"""Every relative link in README.md, CHANGELOG.md and docs/*.md resolves: the file exists and, for
`path#anchor` or `#anchor`, the target file has a heading with that anchor (GitHub's slugs).
The README links each section of the Redis session storage spec directly (issue 14 item 6).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.gateway_process import REPO_ROOT

DOCUMENTS = sorted(
    [REPO_ROOT / "README.md", REPO_ROOT / "CHANGELOG.md", *(REPO_ROOT / "docs").glob("*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of `path`'s headings; a repeated one gets -1, -2 ... as on GitHub."""
    found: set[str] = set()
    seen: Counter[str] = Counter()
    for line in prose_lines(path.read_text()):
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return found


def relative_links(path: Path) -> list[str]:
    """Link targets in `path` (outside code blocks) that are not URLs with a scheme."""
    targets = [t for line in prose_lines(path.read_text()) for t in LINK.findall(line)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_slugs_match_githubs() -> None:
    assert slug("Applications (`APPS_FILE`)") == "applications-apps_file"
    assert (
        slug("Redis topologies: Sentinel, Cluster, TLS") == "redis-topologies-sentinel-cluster-tls"
    )
    assert slug("Forwarding headers (issue 12 row 5)") == "forwarding-headers-issue-12-row-5"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken: list[str] = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


def test_every_section_of_the_session_storage_spec_is_linked_from_the_readme() -> None:
    readme_links = set(relative_links(REPO_ROOT / "README.md"))
    spec_sections = {
        "docs/configuration.md#environment-variables",  # the env table with defaults
        "docs/redis.md#enable-redis-sessions",
        "docs/sessions.md#key-format",
        "docs/sessions.md#ttl-behaviour",
        "docs/redis.md#the-redis-connection",
        "docs/redis.md#graceful-shutdown",
        "docs/redis.md#running-redis-locally",
        "docs/troubleshooting.md#connection-errors",
        "docs/troubleshooting.md#session-not-persisting",
    }
    assert sorted(spec_sections - readme_links) == []


def test_the_docs_contents_list_names_every_page() -> None:
    contents = REPO_ROOT / "docs" / "README.md"
    listed = {t.partition("#")[0] for t in relative_links(contents)}
    pages = {p.name for p in (REPO_ROOT / "docs").glob("*.md")} - {"README.md"}
    assert sorted(pages - listed) == []
