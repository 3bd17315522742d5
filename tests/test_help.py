"""``asyncbatch help [TOPIC]``: the documentation pages, from the package itself.

What an installed wheel prints is checked by tests/test_packaging.py; here the command, and
that every pointer the package prints names a page it has.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .conftest import cli

PACKAGE = Path(__file__).resolve().parent.parent / "asyncbatch"
DOCS = PACKAGE / "docs"
TOPICS = sorted(p.stem.lower() for p in DOCS.glob("*.md"))


def test_help_lists_every_page_with_its_title() -> None:
    result = cli("help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == TOPICS
    assert "  troubleshooting  Troubleshooting\n" in result.stdout
    assert "  cli              Command-line reference\n" in result.stdout


def test_help_topic_prints_the_page_as_written() -> None:
    for topic in ("troubleshooting", "TROUBLESHOOTING", "troubleshooting.md"):
        result = cli("help", topic)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (DOCS / "troubleshooting.md").read_text()
    reliability = cli("help", "reliability")
    assert reliability.stdout == (DOCS / "RELIABILITY.md").read_text()


def test_an_unknown_topic_is_one_line_naming_it_and_the_topics() -> None:
    result = cli("help", "nope")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"asyncbatch: error: help: no topic 'nope'; the topics: {', '.join(TOPICS)}\n"
    )


def _messages(path: Path) -> list[str]:
    """The string literals of a module that are not docstrings: what it can print or log."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_messages_point_to_help_topics_not_to_files_the_user_does_not_have() -> None:
    pointers = []
    for module in PACKAGE.rglob("*.py"):
        for text in _messages(module):
            assert not re.search(r"docs/\w+\.md", text), f"{module}: {text!r}"
            pointers += re.findall(r"asyncbatch help ([a-z]+)", text)
    assert "troubleshooting" in pointers
    assert set(pointers) <= set(TOPICS)
