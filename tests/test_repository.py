"""The repository's top level holds the project, not the output of a session at a terminal.

Three files of `asyncbatch items`, `locks` and `status` output (o.items, o.locks, o.status,
with another machine's /tmp paths) were once committed there by a merge.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What the top level of a checkout tracks; anything else is added here on purpose.
TOP_LEVEL = {
    ".ci",
    ".gitignore",
    "LICENSE",
    "Makefile",
    "README.md",
    "asyncbatch",
    "benchmarks",
    "examples",
    "pyproject.toml",
    "tests",
}


def test_the_top_level_tracks_only_the_project() -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    top = {name.split(b"/", 1)[0].decode() for name in listed.split(b"\0") if name}
    assert top <= TOP_LEVEL, f"unexpected files at the top level: {sorted(top - TOP_LEVEL)}"


def test_the_package_keeps_no_cache_of_calls() -> None:
    # Nothing is shared between items or batches: no functools.cache or lru_cache (one was
    # added once, for a constant a test now checks instead: sqlite_sql.TABLES).
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "asyncbatch").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\b(?:functools\.)?(?:lru_)?cache\b\s*(?:\(|$)", line.split("#")[0])
        and "@" in line
    ]
    assert not found, f"calls cached at module level: {found}"
