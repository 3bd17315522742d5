"""Handlers for the CLI subprocess tests, configured through environment variables.

AB_LOG: a file each invocation appends ``<relpath>\\n`` to (O_APPEND: one write per line).
AB_SLEEP: seconds to sleep inside the handler (default 0).
AB_GATE: a FIFO ``record`` opens for reading before it logs, which waits until the test holds
it open for writing (``O_RDWR``) once what it needs has happened (both runners registered, say).
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
    """Read the input, wait for AB_GATE (if set), log the invocation, sleep a while."""
    await ctx.read_bytes()
    gate = os.environ.get("AB_GATE")
    if gate:  # a FIFO: opening it for reading waits until the test holds it open for writing
        os.close(await anyio.to_thread.run_sync(os.open, gate, os.O_RDONLY))
    _append(ctx.entry.relpath)
    await anyio.sleep(float(os.environ.get("AB_SLEEP", "0")))


async def record_pid(ctx: TaskContext) -> None:
    """Log ``<pid> <relpath>``: which process handled the file; sleep a while."""
    _append(f"{os.getpid()} {ctx.entry.relpath}")
    await anyio.sleep(float(os.environ.get("AB_SLEEP", "0")))


async def fail_always(ctx: TaskContext) -> None:
    """Fail every attempt."""
    _append(ctx.entry.relpath)
    raise ValueError(f"cannot parse {ctx.entry.relpath}")


def not_async(ctx: TaskContext) -> None:
    """A synchronous function: refused as a handler."""


async def system_exit(ctx: TaskContext) -> None:
    """Raise SystemExit(3) for the second file; handle the others slowly."""
    if ctx.entry.relpath.endswith("00001.txt"):
        raise SystemExit(3)
    await anyio.sleep(0.05)


async def post_to(ctx: TaskContext) -> None:
    """POST the input to AB_URL with ctx.http."""
    response = await ctx.http.post(os.environ["AB_URL"], content=await ctx.read_bytes())
    response.raise_for_status()


async def move_to(ctx: TaskContext) -> None:
    """Move the input to the directory AB_MOVE_TO with ctx.move."""
    await ctx.move(os.environ["AB_MOVE_TO"])


async def move_twice(ctx: TaskContext) -> None:
    """Log the attempt, move the input to AB_STAGING, write its bytes to the output directory
    (when the run has one), then move it on to AB_MOVE_TO (ctx.move twice)."""
    _append(ctx.entry.relpath)
    await ctx.move(os.environ["AB_STAGING"])
    if ctx.output_dir is not None:
        await ctx.write_output(ctx.entry.relpath, await ctx.read_bytes())
    await ctx.move(os.environ["AB_MOVE_TO"])


async def write_copy(ctx: TaskContext) -> None:
    """Write the input's bytes to the output directory under its name."""
    await ctx.write_output(ctx.entry.relpath, await ctx.read_bytes())


async def warn_midway(ctx: TaskContext) -> None:
    """Like ``record``, and log a warning for one file midway."""
    await record(ctx)
    if ctx.entry.relpath.endswith("00015.txt"):
        ctx.log.warning("careful with %s", ctx.entry.relpath)


async def fail_on_bad(ctx: TaskContext) -> None:
    """Fail for good on a file whose content starts with ``bad``; record the others."""
    if (await ctx.read_bytes()).startswith(b"bad"):
        raise ValueError(f"bad content in {ctx.entry.relpath}")
    _append(ctx.entry.relpath)
