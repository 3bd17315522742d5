"""Handlers for the torture runs (loaded by the CLI as ``tests/torture/handlers.py:NAME``).

Configured through environment variables:

- ``AB_LOG``: a file each invocation appends ``<relpath>\\n`` to (one ``O_APPEND`` write;
  :func:`transform_and_post` ``<hostname> <pid> <relpath>\\n``: which runner handled it);
- ``AB_URL``: the idempotent receiver's base URL (:mod:`tests.torture.receiver`);
- ``AB_SLEEP``: seconds the handler lingers after its effects (default 0);
- ``AB_GATE``: a path :func:`transform_and_post` waits for before it does anything (the
  test creates it once every runner holds items);
- ``AB_BLOCK``: seconds :func:`stamp_after_block` blocks the event loop (``time.sleep``).

Every effect depends only on the input, so a repeat leaves what the first attempt left
(:func:`expected_output`), except in :func:`stamp_after_block`, which writes the pid of its
process on purpose: there a late write by a runner that lost its lease would show.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import anyio

from asyncbatch import TaskContext


def expected_output(data: bytes) -> bytes:
    """What :func:`transform_and_post` writes for an input: its hash, then its bytes reversed."""
    return hashlib.sha256(data).hexdigest().encode() + b"\n" + data[::-1]


def output_name(relpath: str) -> str:
    """Where :func:`transform_and_post` writes the output of ``relpath``."""
    return relpath + ".out"


def note(line: str, variable: str = "AB_LOG") -> None:
    """Append one line to the file named by ``variable`` (nothing if unset)."""
    path = os.environ.get(variable)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)


async def transform_and_post(ctx: TaskContext) -> None:
    """Read, write the output atomically, POST the input with its idempotency key, linger."""
    gate = os.environ.get("AB_GATE")
    while gate and not os.path.exists(gate):  # noqa: ASYNC110 - another process's file
        await anyio.sleep(0.02)
    data = await ctx.read_bytes()
    note(f"{socket.gethostname()} {os.getpid()} {ctx.entry.relpath}")
    await ctx.write_output(output_name(ctx.entry.relpath), expected_output(data))
    url = os.environ.get("AB_URL")
    if url:
        response = await ctx.http.post(
            url.rstrip("/") + "/effects", params={"relpath": ctx.entry.relpath}, content=data
        )
        response.raise_for_status()
    await anyio.sleep(float(os.environ.get("AB_SLEEP", "0")))


async def stamp_after_block(ctx: TaskContext) -> None:
    """Note the start, block the event loop ``AB_BLOCK`` seconds, then write this pid.

    A runner suspended (SIGSTOP) or blocked past its lease reaches ``write_output`` with no
    chance for its watchdog to cancel it first: only the effect fence can stop the write.
    """
    await ctx.read_bytes()
    note(f"{os.getpid()} {ctx.entry.relpath}")
    time.sleep(float(os.environ.get("AB_BLOCK", "0")))  # noqa: ASYNC251 - on purpose
    await ctx.write_output(output_name(ctx.entry.relpath), f"{os.getpid()}\n")
    note(f"{os.getpid()} {ctx.entry.relpath}", "AB_WROTE")


#: A secret that must never reach a log, a status output or the ledger.
CANARY = "canary-7f3a9c1e-do-not-log"


async def post_secret(ctx: TaskContext) -> None:
    """POST the input (which holds the canary) with the canary in a header and the query."""
    data = await ctx.read_bytes()
    ctx.log.info("posting %d bytes", len(data))
    url = os.environ["AB_URL"].rstrip("/") + f"/fail?token={CANARY}"
    response = await ctx.http.post(
        url, content=data, headers={"Authorization": f"Bearer {CANARY}", "X-Api-Key": CANARY}
    )
    response.raise_for_status()


async def stream_in_chunks(ctx: TaskContext) -> None:
    """Read the input through ``ctx.open()`` 1 MiB at a time (bounded memory)."""
    total = 0
    async with ctx.open() as f:
        while chunk := await f.read(1 << 20):
            total += len(chunk)
    assert total == ctx.entry.size


async def read_whole(ctx: TaskContext) -> None:
    """``ctx.read_bytes()`` of the whole input."""
    data = await ctx.read_bytes()
    assert len(data) == ctx.entry.size
