"""``asyncbatch demo``: make an inbox, run a batch over it, run again, show the status."""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import anyio

from ._batch import Batch
from ._context import TaskContext
from ._progress import show_progress
from ._report import Report

__all__ = ["demo", "demo_handler"]


async def demo_handler(ctx: TaskContext) -> None:
    """Count the rows of a CSV and write a summary next to it in the output directory."""
    data = await ctx.read_bytes()
    rows = data.count(b"\n")
    digest = hashlib.sha256(data).hexdigest()
    await ctx.write_output(ctx.entry.relpath + ".summary", f"{rows} rows, sha256 {digest}\n")
    ctx.log.debug("summarised %d rows", rows)


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
    from ._operator import status

    base = Path(args.dir).absolute()
    inbox, out, state = base / "inbox", base / "out", base / "state.db"
    made = await anyio.to_thread.run_sync(make_inbox, inbox, args.files)
    out.mkdir(parents=True, exist_ok=True)
    print(f"inbox {inbox}: {made} new files ({args.files} in all); ledger {state}")
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
