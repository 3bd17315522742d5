"""What the operator's commands share: opening the state, the job's recorded source and
rules and identity, and how times, ages and states are shown."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigurationError
from .._identity import IDENTITIES, Identity
from .._ledger import JobSettings, Ledger, PostgresDSN, is_postgres, open_ledger
from .._ledger.sqlite_open import check_writable
from .._sources.url import ObjectURL, is_object_url

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "EXIT_OK",
    "console",
    "job_identity",
    "job_settings",
    "open_state",
    "show_age",
    "show_state",
    "show_time",
    "write_json_list",
]

EXIT_OK = 0


def console() -> Console:
    """A rich console for stdout whose broken pipe (``asyncbatch status | head``) is the CLI's
    to handle (exit 141), not rich's (which exits 1, the code for dead items)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _Console()


async def write_json_list(rows: AsyncIterable[dict[str, Any]], depth: int = 0) -> int:
    """Write ``rows`` to stdout as they come, as ``json.dumps(list(rows), indent=2)`` would
    write them (nested ``depth`` levels deep in a document of that format, without a newline
    after the list), holding one row at a time; returns how many. A JSON listing of any
    number of items is written so (see ``Ledger.iter_items``)."""
    pad = "\n" + "  " * (depth + 1)
    count = 0
    async for row in rows:
        # Rows of scalars: a newline is only ever json's own (a string's is escaped).
        sys.stdout.write(("[" if count == 0 else ",") + pad)
        sys.stdout.write(json.dumps(row, indent=2).replace("\n", pad))
        count += 1
    sys.stdout.write("[]" if count == 0 else "\n" + "  " * depth + "]")
    return count


def show_time(ts: float | None) -> str:
    """A time as local ``YYYY-MM-DD HH:MM:SS`` (``-`` for none)."""
    if ts is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, ValueError, OSError):  # past what this platform can show
        return f"{ts:.0f} s after the epoch"


def show_age(ts: float | None) -> str:
    """How long ago a time was, in words (``-`` for none)."""
    if ts is None:
        return "-"
    seconds = max(time.time() - ts, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min ago"
    return f"{seconds / 3600:.1f}h ago"


def show_state(state: str) -> str:
    """The state as it may be printed: a DSN without its password."""
    return PostgresDSN.parse(state).redacted if is_postgres(state) else state


async def open_state(args: argparse.Namespace, *, job: bool = True, writes: bool = False) -> Ledger:
    """Open the state for a command (``writes``: one that changes it, like ``retry``).

    A command that writes a SQLite state is refused, as a run is, when this user may not
    write it: it would otherwise read it and fail at its first write.
    """
    ledger = await open_ledger(args.state, create=False)
    try:
        if writes and not is_postgres(args.state):
            check_writable(Path(args.state), f"'asyncbatch {args.command}' changes it")
        if job and not await ledger.job_exists(args.job):
            known = await ledger.jobs()
            raise ConfigurationError(
                f"unknown job {args.job!r} in state {show_state(args.state)!r} "
                f"(known: {', '.join(map(repr, known)) or 'none'})"
            )
    except BaseException:
        await ledger.close()
        raise
    return ledger


def _source_text(given: str) -> str:
    """A ``--source`` as a job records it: an ``s3://`` location in its canonical form, a
    directory absolute with its symlinks resolved."""
    if is_object_url(given):
        return str(ObjectURL.parse("source", given))
    return os.path.realpath(given)


async def job_settings(args: argparse.Namespace, ledger: Ledger) -> JobSettings | None:
    """The job's recorded source and scan rules (``None``: not recorded yet), checked against
    the ``--source`` the command was given, if any.

    Raises :class:`ConfigurationError` naming both when ``--source`` is another directory
    than the job's (compared as absolute paths with their symlinks resolved).
    """
    recorded = await ledger.job_settings(args.job)
    given = getattr(args, "source", None)
    if given is None or recorded is None:
        return recorded
    if (resolved := _source_text(str(given))) != recorded.source:
        raise ConfigurationError(
            f"job {args.job!r} in state {show_state(args.state)!r} scans {recorded.source!r}, "
            f"not {resolved!r} (--source): leave --source out (the job's is used), or give "
            "the job of that source with --job"
        )
    return recorded


async def job_identity(ledger: Ledger, job: str) -> Identity:
    """The identity the job's items are keyed by (``stat`` for a job that recorded none)."""
    value = await ledger.job_identity(job)
    for identity in IDENTITIES:
        if value == identity:
            return identity
    return "stat"
