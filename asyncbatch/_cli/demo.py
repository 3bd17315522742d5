"""``asyncbatch demo``: make an inbox, run a batch over it, run again, show the status.

Every demo starts afresh, so its headings are true however often it runs. A ``--dir`` that
holds an earlier demo (the demo leaves the marker file ``.asyncbatch-demo`` in it) first loses
the files that demo made, and only those: its inputs ``inbox/partner-NNNNNN.csv``, their
summaries in ``out/`` and its ledger ``state.db``. A ``--dir`` that exists, is not empty and
has no marker is refused (exit 2): the demo never deletes what it did not make.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import time
from pathlib import Path

import anyio

from .._batch import Batch
from .._context import TaskContext
from .._exceptions import ConfigurationError
from .._report import Report
from .progress import show_progress

__all__ = ["MARKER", "demo", "demo_handler", "make_inbox", "prepare"]

MARKER = ".asyncbatch-demo"
_MARKER_TEXT = (
    "This directory holds an asyncbatch demo. The next `asyncbatch demo` here removes the files\n"
    "the demo made (inbox/partner-NNNNNN.csv, out/partner-NNNNNN.csv.summary, state.db) and\n"
    "nothing else, then makes them again.\n"
)
_INPUT = re.compile(r"partner-\d{6}\.csv")
_SUMMARY = re.compile(r"partner-\d{6}\.csv\.summary")
# SQLite's companions first: a log left without its database would be read into a new one.
_STATE = ("state.db-wal", "state.db-shm", "state.db-journal", "state.db")


async def demo_handler(ctx: TaskContext) -> None:
    """Count the rows of a CSV and write a summary next to it in the output directory."""
    data = await ctx.read_bytes()
    rows = data.count(b"\n")
    digest = hashlib.sha256(data).hexdigest()
    await ctx.write_output(ctx.entry.relpath + ".summary", f"{rows} rows, sha256 {digest}\n")
    ctx.log.debug("summarised %d rows", rows)


def _made_by_a_demo(base: Path) -> list[Path]:
    """The files an earlier demo made in ``base`` that are still there."""
    found: list[Path] = []
    for directory, name in ((base / "inbox", _INPUT), (base / "out", _SUMMARY)):
        if directory.is_dir() and not directory.is_symlink():
            found += (
                path
                for path in directory.iterdir()
                if name.fullmatch(path.name) and path.is_file() and not path.is_symlink()
            )
    found += (base / state for state in _STATE if (base / state).is_file())
    return found


def prepare(base: Path) -> int:
    """Make ``base`` ready for a fresh demo; return how many files of an earlier demo went.

    Refuses (``ConfigurationError``) a path that is not a directory, and a directory that is
    not empty and holds no earlier demo.
    """
    if base.exists() and not base.is_dir():
        raise ConfigurationError(f"--dir {str(base)!r} is not a directory")
    if base.is_dir() and not (base / MARKER).is_file() and any(base.iterdir()):
        raise ConfigurationError(
            f"--dir {str(base)!r} is not empty and holds no earlier demo (no {MARKER} file "
            "in it); pass a new or empty directory"
        )
    base.mkdir(parents=True, exist_ok=True)
    (base / MARKER).write_text(_MARKER_TEXT)
    earlier = _made_by_a_demo(base)
    for path in earlier:
        path.unlink(missing_ok=True)
    return len(earlier)


def make_inbox(inbox: Path, files: int) -> int:
    """Create ``files`` small CSV files in ``inbox`` (already settled); return how many are new."""
    inbox.mkdir(parents=True, exist_ok=True)
    old = time.time() - 60
    made = 0
    for i in range(files):
        path = inbox / f"partner-{i:06d}.csv"
        if path.exists():
            continue
        rows = "".join(f"{i},{j},{(i * 31 + j) % 997}\n" for j in range(1 + i % 20))
        path.write_text("id,row,value\n" + rows)
        os.utime(path, (old + i * 0.001, old + i * 0.001))
        made += 1
    return made


async def _run(batch: Batch, progress: bool) -> Report:
    report: Report | None = None
    async with anyio.create_task_group() as tg:
        if progress:
            tg.start_soon(show_progress, batch)
        try:
            report = await batch.run(handle_signals=True)
        finally:
            tg.cancel_scope.cancel()
    assert report is not None
    return report


async def demo(args: argparse.Namespace) -> int:
    """Run the demo; print what happened at each step."""
    from .operator import status

    base = Path(args.dir).absolute()
    inbox, out, state = base / "inbox", base / "out", base / "state.db"
    removed = await anyio.to_thread.run_sync(prepare, base)
    if removed:
        print(f"demo {base}: removed the earlier demo's {removed} files (inputs, outputs, ledger)")
    made = await anyio.to_thread.run_sync(make_inbox, inbox, args.files)
    out.mkdir(parents=True, exist_ok=True)
    print(f"inbox {inbox}: {made} new files; outputs {out}; ledger {state}")
    batch = Batch(demo_handler, source=inbox, state=state, output_dir=out, concurrency=16, settle=0)
    print("\n== run 1: handle every file ==")
    first = await _run(batch, not args.no_progress)
    print(first)
    print("\n== run 2: the same command again; nothing is redone ==")
    second = await _run(batch, not args.no_progress)
    print(second)
    print("\n== asyncbatch status ==")
    await status(argparse.Namespace(state=str(state), job="default", json=False))
    return 0 if first.ok and second.ok else 1
