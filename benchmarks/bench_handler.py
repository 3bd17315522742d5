"""The asyncbatch handlers the benchmark runs: read the input (``handle``), or read it and
POST it to ``$BENCH_HTTP_URL`` with ``ctx.http`` (``post``, the HTTP-bound benchmark).

``BENCH_HANDLED_LOG`` (set by the driver only for the shared-runner duplicate check): each
process keeps the relpaths it handled in memory and writes them, one a line, to
``$BENCH_HANDLED_LOG.<pid>`` when it exits. Unset, the handler costs one read and one branch.
"""

from __future__ import annotations

import atexit
import os

from asyncbatch import TaskContext

__all__ = ["handle", "post"]

_LOG_BASE = os.environ.get("BENCH_HANDLED_LOG") or None
_URL = os.environ.get("BENCH_HTTP_URL", "")
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


async def post(ctx: TaskContext) -> None:
    """POST the input to ``$BENCH_HTTP_URL`` (``ctx.http``: keyed, retried); fail unless 2xx."""
    response = await ctx.http.post(_URL, content=await ctx.read_bytes())
    response.raise_for_status()
    if _LOG_BASE is not None:
        _handled.append(ctx.entry.relpath)
