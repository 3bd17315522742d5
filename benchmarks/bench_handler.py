"""The asyncbatch handler the benchmark runs: read the input, nothing else.

``BENCH_HANDLED_LOG`` (set by the driver only for the shared-runner duplicate check): each
process keeps the relpaths it handled in memory and writes them, one a line, to
``$BENCH_HANDLED_LOG.<pid>`` when it exits. Unset, the handler costs one read and one branch.
"""

from __future__ import annotations

import atexit
import os

from asyncbatch import TaskContext

__all__ = ["handle"]

_LOG_BASE = os.environ.get("BENCH_HANDLED_LOG") or None
_handled: list[str] = []


def _write_log() -> None:
    if _LOG_BASE is None:
        return
    path = f"{_LOG_BASE}.{os.getpid()}"
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(relpath + "\n" for relpath in _handled)


if _LOG_BASE is not None:
    atexit.register(_write_log)


async def handle(ctx: TaskContext) -> None:
    """Read the whole input (``ctx.read_bytes()``); record its relpath only when asked to."""
    await ctx.read_bytes()
    if _LOG_BASE is not None:
        _handled.append(ctx.entry.relpath)
