"""The idempotent HTTP receiver of the torture runs: ``uvicorn tests.torture.receiver:app``.

An API behind :class:`~asyncbatch.IdempotencyMiddleware` whose every execution applies one
effect: a line ``<relpath>`` appended to ``AB_EFFECTS``. ``AB_STATE`` names the middleware's
store (a SQLite file or a ``postgresql://`` DSN); ``AB_LOCK_TIMEOUT`` its lock timeout
(default 2 s: a request of a killed receiver is taken over soon after).
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import parse_qs

from asyncbatch import IdempotencyMiddleware
from asyncbatch._http.request import Receive, Scope, Send

from ..servers import read_body, respond


async def api(scope: Scope, receive: Receive, send: Send) -> None:
    """Apply the effect (one line per execution) and answer 201 with the body's hash."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":  # readiness probe
        await respond(send, 200)
        return
    body = await read_body(receive)
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("utf-8", "surrogateescape"))
    relpath = query.get("relpath", [""])[0]
    fd = os.open(os.environ["AB_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (relpath + "\n").encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)
    digest = hashlib.sha256(body).hexdigest()
    await respond(send, 201, f'{{"sha256": "{digest}"}}'.encode())


app = IdempotencyMiddleware(
    api,
    state=os.environ["AB_STATE"],
    lock_timeout=float(os.environ.get("AB_LOCK_TIMEOUT", "2")),
)
