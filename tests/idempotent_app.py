"""An API behind IdempotencyMiddleware, served by its own uvicorn process in the tests.

``uvicorn tests.idempotent_app:app``; AB_STATE names the store (a SQLite file or a
postgresql:// DSN), AB_LOG a file each execution of the API appends its key to.
"""

from __future__ import annotations

import json
import os

import anyio

from asyncbatch import IdempotencyMiddleware
from asyncbatch._http.request import Receive, Scope, Send

from .servers import read_body, respond


async def api(scope: Scope, receive: Receive, send: Send) -> None:
    """Take 50 ms, note the execution, answer 201 with this process's pid."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":  # the tests' readiness probe
        await respond(send, 200)
        return
    body = await read_body(receive)
    await anyio.sleep(0.05)
    headers = dict(scope["headers"])
    line = headers.get(b"idempotency-key", b"-") + b"\n"
    fd = os.open(os.environ["AB_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    answer = {"pid": os.getpid(), "bytes": len(body)}
    await respond(send, 201, json.dumps(answer).encode())


app = IdempotencyMiddleware(api, state=os.environ["AB_STATE"])
