"""Progress for the command line: a rich bar on a terminal, a periodic line otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

import anyio

from .._batch import Batch
from .._report import Statistics

__all__ = ["show_progress"]


def _line(stats: Statistics) -> str:
    rate = stats.done / stats.elapsed if stats.elapsed > 0 else 0.0
    return (
        f"progress: {stats.done + stats.skipped + stats.dead + stats.vanished}/{stats.seen} "
        f"files ({stats.done} done, {stats.skipped} skipped, {stats.failed} failed attempts, "
        f"{stats.dead} dead), {rate:.0f}/s, {stats.elapsed:.0f}s"
    )


async def _plain(batch: Batch, stream: TextIO, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        stats = batch.statistics()
        if stats is not None:
            print(_line(stats), file=stream, flush=True)


async def _bar(batch: Batch, stream: TextIO) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=stream)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.0f}/s"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("scanning", total=None, rate=0.0, failed=0)
        try:
            while True:
                stats = batch.statistics()
                if stats is not None:
                    handled = stats.done + stats.skipped + stats.dead + stats.vanished
                    progress.update(
                        task,
                        description="working" if stats.scanned else "scanning",
                        total=stats.seen if stats.scanned else None,
                        completed=handled,
                        rate=stats.done / stats.elapsed if stats.elapsed > 0 else 0.0,
                        failed=stats.failed + stats.dead,
                    )
                await anyio.sleep(0.1)
        finally:
            stats = batch.statistics()
            if stats is not None:
                progress.update(
                    task,
                    total=stats.seen,
                    completed=stats.done + stats.skipped + stats.dead + stats.vanished,
                )


async def show_progress(
    batch: Batch, *, stream: TextIO | None = None, interval: float = 10.0
) -> None:
    """Show the batch's progress until cancelled: a bar on a TTY, else a line per ``interval``."""
    out = stream or sys.stderr
    if out.isatty():
        await _bar(batch, out)
    else:
        await _plain(batch, out, interval)
