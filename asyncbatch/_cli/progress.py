"""Progress for the command line: a rich bar on a terminal, a periodic line otherwise.

Both show the counts of :class:`~asyncbatch.Statistics` as they stand: the bar's position is
the seen files that are finished (done, done before, dead, vanished), which never goes back.
While the bar is shown, log records go through its console, above it, not across it.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import TYPE_CHECKING, TextIO

import anyio

from .._batch import Batch
from .._report import Statistics

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["show_progress"]


def _counts(stats: Statistics) -> str:
    parts = [f"{stats.done} done"]
    for count, what in (
        (stats.done_before, "done before"),
        (stats.in_flight, "in flight"),
        (stats.held, "held by others"),
        (stats.waiting, "waiting for a retry"),
        (stats.dead + stats.dead_before, "dead"),
        (stats.vanished, "vanished"),
    ):
        if count:
            parts.append(f"{count} {what}")
    if stats.failed:
        parts.append(f"{stats.failed} failed attempts")
    return ", ".join(parts)


def _line(stats: Statistics) -> str:
    rate = stats.done / stats.elapsed if stats.elapsed > 0 else 0.0
    total = stats.seen if stats.scanned else f"{stats.seen}+ (scanning)"
    return (
        f"progress: {stats.finished}/{total} files ({_counts(stats)}), {rate:.0f}/s, "
        f"{stats.elapsed:.0f}s"
    )


async def _plain(batch: Batch, stream: TextIO, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        stats = batch.statistics()
        if stats is not None:
            print(_line(stats), file=stream, flush=True)


async def _bar(
    batch: Batch, stream: TextIO, log_handler: logging.StreamHandler[TextIO] | None
) -> None:
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
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    finished = 0
    with Progress(*columns, console=console, transient=False) as progress:
        # Log records through the console: printed above the bar, never spliced into it.
        writer = _ConsoleWriter(progress.console)
        old_stream = log_handler.setStream(writer) if log_handler else None  # type: ignore[arg-type]
        task = progress.add_task("scanning", total=None, rate=0.0, counts="")
        try:
            while True:
                stats = batch.statistics()
                if stats is not None:
                    finished = max(finished, stats.finished)  # never backwards
                    progress.update(
                        task,
                        description="working" if stats.scanned else "scanning",
                        total=stats.seen if stats.scanned else None,
                        completed=finished,
                        rate=stats.done / stats.elapsed if stats.elapsed > 0 else 0.0,
                        counts=_counts(stats),
                    )
                await anyio.sleep(0.1)
        finally:
            # The last frame stays on the screen: its counts are the run's final ones, as its
            # position is (not those of the last poll, with items still in flight).
            stats = batch.statistics()
            if stats is not None:
                progress.update(
                    task,
                    total=stats.seen,
                    completed=max(finished, stats.finished),
                    rate=stats.done / stats.elapsed if stats.elapsed > 0 else 0.0,
                    counts=_counts(stats),
                )
            if log_handler is not None and old_stream is not None:
                log_handler.setStream(old_stream)


class _ConsoleWriter(io.TextIOBase):
    """A text stream that prints log records through a rich console (above its bar)."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        """Print ``text`` (a formatted record) above the bar."""
        if text.strip():
            self._console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        """Nothing to flush: every record is printed at once."""


async def show_progress(
    batch: Batch,
    *,
    stream: TextIO | None = None,
    interval: float = 10.0,
    log_handler: logging.StreamHandler[TextIO] | None = None,
) -> None:
    """Show the batch's progress until cancelled: a bar on a TTY, else a line per ``interval``.

    ``log_handler`` (the CLI's) is pointed at the bar's console while the bar is shown.
    """
    out = stream or sys.stderr
    if out.isatty():
        await _bar(batch, out, log_handler)
    else:
        await _plain(batch, out, interval)
