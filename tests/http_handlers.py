"""HTTP handlers for the CLI subprocess tests, configured through environment variables.

AB_URL: the base URL of the server the handlers POST to (required).
AB_POST_SLEEP: seconds to sleep after a successful POST, before the handler returns (default 0),
so that a SIGKILL often lands between the POST and the completion commit.
"""

from __future__ import annotations

import os

import anyio

from asyncbatch import TaskContext


def _url(path: str) -> str:
    return os.environ["AB_URL"].rstrip("/") + path


async def post_file(ctx: TaskContext) -> None:
    """POST the file's content (its relpath in the query), check the answer, then linger."""
    data = await ctx.read_bytes()
    response = await ctx.http.post(
        _url("/effects"), params={"relpath": ctx.entry.relpath}, content=data
    )
    response.raise_for_status()
    await anyio.sleep(float(os.environ.get("AB_POST_SLEEP", "0")))


async def post_attempt_then_crash(ctx: TaskContext) -> None:
    """POST a body that names the attempt (same call, so same key), then fail attempt 1.

    The second attempt re-sends the call with a different body: the server answers 422.
    """
    body = f"{ctx.entry.relpath} attempt {ctx.attempt}".encode()
    response = await ctx.http.post(
        _url("/effects"), params={"relpath": ctx.entry.relpath}, content=body
    )
    response.raise_for_status()
    if ctx.attempt == 1:
        raise RuntimeError("the handler crashed after its POST")
