"""The documentation says what the code does: the CLI reference shows each command's --help.

``ASYNCBATCH_REGENERATE_DOCS=1 pytest tests/test_docs.py`` rewrites the usage blocks of
asyncbatch/docs/cli.md from the commands' own --help output (at 100 columns).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .conftest import cli

CLI_MD = Path(__file__).parent.parent / "asyncbatch" / "docs" / "cli.md"
#: A section heading "## `asyncbatch NAME`" (or the page's title, for ``asyncbatch --help``)
#: followed, before the next heading, by a usage block.
_SECTION = re.compile(
    r"((?:## `asyncbatch (\w+)`|# Command-line reference)\n(?:(?!## |```)[^\n]*\n)*```text\n)"
    r"(usage: (?:(?!```)[^\n]*\n)*)(```\n)"
)


def _help(command: str | None) -> str:
    result = cli(*([command] if command else []), "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_cli_reference_shows_every_commands_own_help() -> None:
    text = CLI_MD.read_text()
    sections = list(_SECTION.finditer(text))
    assert {m.group(2) for m in sections} == {
        None,  # asyncbatch --help
        *re.findall(r"^    (\w+) ", _help(None), flags=re.MULTILINE),  # its list of commands
    }
    fresh = _SECTION.sub(lambda m: m.group(1) + _help(m.group(2)) + m.group(4), text)
    if os.environ.get("ASYNCBATCH_REGENERATE_DOCS"):
        CLI_MD.write_text(fresh)
        pytest.skip("asyncbatch/docs/cli.md regenerated")
    assert fresh == text, (
        "asyncbatch/docs/cli.md is stale: ASYNCBATCH_REGENERATE_DOCS=1 pytest tests/test_docs.py"
    )
