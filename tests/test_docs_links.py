"""Every relative link in the README and docs/ points at a file the repository holds.

A report quoted in the README is evidence only if a clean clone has it: evaluation runs land in the ignored
``reports/<run>/`` and must be added deliberately (``git add -f``), which was forgotten more than once.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _tracked() -> set[str] | None:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an sdist): existence is all we can check
    return {p for p in out.stdout.decode().split("\0") if p}


def _relative_links(doc: Path) -> list[str]:
    targets = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, in-page anchors
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_link_pattern_finds_links() -> None:
    # The check is only as good as its parser: the README quotes reports and images this way.
    assert "reports/x/results.md" in LINK.findall("see [`reports/x`](reports/x/results.md) and ![a](b.png)")
    assert _relative_links(ROOT / "README.md"), "the README has no relative links: the parser is broken"


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.name)
def test_relative_links_resolve_to_tracked_files(doc: Path) -> None:
    tracked = _tracked()
    missing = []
    for target in _relative_links(doc):
        path = (doc.parent / target).resolve()
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else None
        exists = path.exists()
        in_git = tracked is None or rel is None or rel in tracked or any(t.startswith(rel + "/") for t in tracked)
        if not (exists and in_git):
            missing.append(target)
    assert not missing, f"{doc.name} links to files a clean clone does not have: {missing}"
