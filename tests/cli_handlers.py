"""Handlers for the CLI subprocess tests, configured through environment variables.

AB_LOG: a file each invocation appends ``<relpath>\\n`` to (O_APPEND: one write per line).
AB_SLEEP: seconds to sleep inside the handler (default 0).
"""

from __future__ import annotations

import os

import anyio

from asyncbatch import TaskContext


def _append(line: str) -> None:
    path = os.environ.get("AB_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)


async def record(ctx: TaskContext) -> None:
    """Read the input, log the invocation, sleep a while."""
    await ctx.read_bytes()
    _append(ctx.entry.relpath)
    await anyio.sleep(float(os.environ.get("AB_SLEEP", "0")))


async def fail_always(ctx: TaskContext) -> None:
    """Fail every attempt."""
    _append(ctx.entry.relpath)
    raise ValueError(f"cannot parse {ctx.entry.relpath}")


def not_async(ctx: TaskContext) -> None:
    """A synchronous function: refused as a handler."""
