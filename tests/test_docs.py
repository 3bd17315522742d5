"""The documentation says what the code does: the CLI reference shows each command's --help,
and every shell block of README.md and asyncbatch/docs/ runs as written (see OPTIONS below).

``ASYNCBATCH_REGENERATE_DOCS=1 pytest tests/test_docs.py`` rewrites the usage blocks of
asyncbatch/docs/cli.md from the commands' own --help output (at 100 columns).
"""

from __future__ import annotations

import dataclasses
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from asyncbatch._config import BatchConfig

from .conftest import WARNINGS_FAIL, cli, state_counts

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


# --- Every shell block of README.md and asyncbatch/docs/ runs as written --------------------
#
# Each ```sh, ```bash or ```console block runs with bash (-e -o pipefail) in a sandbox of its
# own: a directory holding ``jobs.py`` (the README's ten lines without their ``main``, so
# ``jobs:handle`` is the README's handler) and ``inbox/`` with a.csv, b.csv, broken.csv and
# partner-7.csv, settled. ``asyncbatch`` on the PATH is a shim that logs each call's exit
# status: every call must exit 0 (the background runners of a ``for ... & done; wait`` too).
# A note in the Markdown just before a block changes that, visibly in the doc's source:
#
#   <!-- not run: REASON -->   the block is skipped, and the test report says why
#   <!-- run: OPTION ... -->   shell words, each one of OPTIONS
OPTIONS = {
    "after-a-failed-run": "the sandbox has out/ and a state.db in which a run of a handler "
    "that raises on broken.csv left it dead (the other files done)",
    "interrupt-when": "=COMMAND: once COMMAND succeeds in the sandbox, Ctrl-C (SIGINT to the "
    "block's process group); the block and its last asyncbatch call exit 130",
    "answer": "=TEXT: stdin is a terminal on which TEXT is typed (and Enter)",
    "postgres": "each postgresql:// DSN is the test server's, in a schema of its own",
    "root": "=DIR: absolute paths under DIR are the sandbox's",
    "needs": "=TOOL: skipped where TOOL is not installed",
}
ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "asyncbatch" / "docs").glob("*.md"))]
INBOX = {
    "a.csv": "id,name\n1,a\n",
    "b.csv": "id,name\n2,b\n",
    "broken.csv": "no header\n",
    "partner-7.csv": "id,name\n7,partner\n",
}
FAILING_HANDLER = '''"""The README's handler before its fix: it raises on broken.csv."""
from asyncbatch import TaskContext


async def handle(ctx: TaskContext) -> None:
    if ctx.entry.relpath == "broken.csv":
        raise ValueError("broken.csv: no header line")
    await ctx.write_output(ctx.entry.relpath + ".out", (await ctx.read_bytes()).upper())
'''
#: ``asyncbatch`` as the blocks call it: each call's exit status and arguments logged. SIGINT
#: is the Python process's to handle (the trap only defers it here until the call returns).
SHIM = """#!/bin/sh
trap : INT
"$ASYNCBATCH_DOCS_PYTHON" -m asyncbatch "$@"
status=$?
echo "$status asyncbatch $*" >> "$ASYNCBATCH_DOCS_LOG"
exit "$status"
"""
_FENCE = re.compile(r"^```(sh|bash|console)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_NOTE = re.compile(r"<!--\s*(not run|run):((?:(?!-->).)*)-->\s*\Z", re.DOTALL)
_ANY_NOTE = re.compile(r"^<!--\s*(?:not run|run):", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """A shell block of a page, with the note before it (if any)."""

    page: str
    line: int
    script: str
    not_run: str | None
    options: dict[str, str]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _options(note: str) -> dict[str, str]:
    words = (word.partition("=") for word in shlex.split(note))
    return {name: value for name, _, value in words}


def _commands(language: str, body: str) -> str:
    if language != "console":
        return body
    return "".join(line[2:] + "\n" for line in body.splitlines() if line.startswith("$ "))


def shell_blocks(page: Path) -> list[Block]:
    """The shell blocks of ``page``, in order."""
    text = page.read_text()
    blocks = []
    for fence in _FENCE.finditer(text):
        note = _NOTE.search(text, 0, fence.start())
        kind, words = (note.group(1), note.group(2).strip()) if note else ("run", "")
        blocks.append(
            Block(
                page=page.relative_to(ROOT).as_posix(),
                line=text.count("\n", 0, fence.start()) + 1,
                script=_commands(fence.group(1), fence.group(2)),
                not_run=words if kind == "not run" else None,
                options=_options(words) if kind == "run" else {},
            )
        )
    return blocks


BLOCKS = [block for page in PAGES for block in shell_blocks(page)]
RUN = [block for block in BLOCKS if block.not_run is None]


def test_every_shell_block_runs_or_its_note_says_why_not() -> None:
    notes = sum(len(_ANY_NOTE.findall(page.read_text())) for page in PAGES)
    noted = [b for b in BLOCKS if b.not_run is not None or b.options]
    assert notes == len(noted), "a <!-- run: --> or <!-- not run: --> note not before a block"
    for block in BLOCKS:
        assert set(block.options) <= set(OPTIONS), f"{block.id}: {block.options}"
        assert block.not_run != "", f"{block.id}: 'not run' without a reason"
    assert {b.page for b in RUN} >= {"README.md", "asyncbatch/docs/cli.md"}
    print(f"{len(RUN)} of {len(BLOCKS)} shell blocks run:", *(b.id for b in RUN))
    print("not run:", *(f"{b.id} ({b.not_run})" for b in BLOCKS if b.not_run is not None))


def _readme_handler() -> str:
    """The README's ten lines without their ``main``: ``jobs:handle``."""
    code = re.search(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)
    assert code is not None
    handler = code.group(1).split("\nasync def main")[0]
    assert "async def handle(ctx: TaskContext)" in handler
    return handler


def _fail_broken_csv(sandbox: Path, failing: Path) -> None:
    (sandbox / "out").mkdir()
    result = cli(
        "run", f"{failing}:handle", "--source", "inbox", "--state", "state.db",
        "--output-dir", "out", "--max-attempts", "1", "--no-progress", cwd=sandbox,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert state_counts(sandbox / "state.db") == {"done": 3, "dead": 1}


def _until_settled(inboxes: list[Path]) -> None:
    """Wait until every inbox file is settled for a run with the default ``--settle``."""
    settle = next(f.default for f in dataclasses.fields(BatchConfig) if f.name == "settle")
    assert isinstance(settle, float)
    stats = [p.stat() for inbox in inboxes for p in inbox.iterdir()]
    changed = max(max(st.st_mtime_ns, st.st_ctime_ns) for st in stats) / 1e9
    time.sleep(max(0.0, changed + settle - time.time()) + 0.01)


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sandbox for each block that runs, made all at once (one wait for the files to
    settle), with ``bin/asyncbatch`` (the shim) beside them."""
    root = tmp_path_factory.mktemp("docs")
    (root / "bin").mkdir()
    (root / "bin" / "asyncbatch").write_text(SHIM)
    (root / "bin" / "asyncbatch").chmod(0o755)
    (root / "failing.py").write_text(FAILING_HANDLER)
    handler = _readme_handler()
    made = {}
    for n, block in enumerate(RUN):
        sandbox = root / f"block{n}" / "sandbox"
        (sandbox / "inbox").mkdir(parents=True)
        (sandbox / "jobs.py").write_text(handler)
        for name, text in INBOX.items():
            (sandbox / "inbox" / name).write_text(text)
        if "after-a-failed-run" in block.options:
            _fail_broken_csv(sandbox, root / "failing.py")
        made[block.id] = sandbox
    _until_settled([sandbox / "inbox" for sandbox in made.values()])
    return made


@dataclass(frozen=True)
class Ran:
    """How a block ended: bash's exit status, its output, and each asyncbatch call's."""

    status: int
    stdout: str
    stderr: str
    calls: list[tuple[int, str]]

    def __str__(self) -> str:
        calls = "".join(f"\n  exit {code}: {args}" for code, args in self.calls)
        return f"exit {self.status}; calls:{calls}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def _holds(condition: str, cwd: Path) -> bool:
    return subprocess.run(["bash", "-c", condition], cwd=cwd, check=False).returncode == 0


def _interrupt_when(proc: subprocess.Popen[bytes], condition: str, cwd: Path) -> None:
    """Ctrl-C once ``condition`` holds (the block's whole process group, as a terminal does)."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and not _holds(condition, cwd):
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{condition!r} did not hold within 60 s")
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)


def run_block(script: str, sandbox: Path, options: dict[str, str]) -> Ran:
    """Run ``script`` with bash in ``sandbox`` as the options say; wait for its end."""
    out, log = sandbox.parent, sandbox.parent / "asyncbatch.log"
    env = {
        **os.environ,
        **WARNINGS_FAIL,
        "PATH": f"{sandbox.parent.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "ASYNCBATCH_DOCS_PYTHON": sys.executable,
        "ASYNCBATCH_DOCS_LOG": str(log),
    }
    terminal = pty.openpty() if "answer" in options else None
    if terminal is not None:
        os.write(terminal[0], f"{options['answer']}\n".encode())
    try:
        with (out / "stdout").open("wb") as stdout, (out / "stderr").open("wb") as stderr:
            proc = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", script],
                cwd=sandbox,
                env=env,
                stdin=subprocess.DEVNULL if terminal is None else terminal[1],
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            if "interrupt-when" in options:
                _interrupt_when(proc, options["interrupt-when"], sandbox)
            try:
                status = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(
                    "still running after 120 s (a block that must be stopped needs "
                    "<!-- run: interrupt-when=... -->)"
                )
    finally:
        for fd in terminal or ():
            os.close(fd)
    lines = log.read_text().splitlines() if log.exists() else []
    return Ran(
        status,
        (out / "stdout").read_text(),
        (out / "stderr").read_text(),
        [(int(code), args) for code, args in (line.split(" ", 1) for line in lines)],
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_shell_block_runs_as_written(
    block: Block, sandboxes: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.id} not run: {block.not_run}")
    tool = block.options.get("needs")
    if tool and shutil.which(tool) is None:
        pytest.skip(f"{block.id} needs {tool}, not installed here")
    sandbox, script = sandboxes[block.id], block.script
    if "postgres" in block.options:
        dsn = request.getfixturevalue("pg_dsn")
        script = re.sub(r"postgresql://[^\s'\"]+", lambda _: dsn, script)
    if "root" in block.options:
        script = script.replace(block.options["root"].rstrip("/") + "/", f"{sandbox}/")

    ran = run_block(script, sandbox, block.options)

    interrupted = "interrupt-when" in block.options
    expected = [0] * len(ran.calls)
    if interrupted and expected:
        expected[-1] = 130
    assert ran.calls, f"{block.id}: no asyncbatch call ran\n{ran}"
    assert (ran.status, [code for code, _ in ran.calls]) == (
        130 if interrupted else 0,
        expected,
    ), f"{block.id}:\n{script}\n{ran}"
