"""A process that uses IdempotencyMiddleware the way an async test does, then just returns.

``python tests/asgi_no_lifespan.py STATE``: one keyed POST through ``httpx.ASGITransport`` (no
lifespan events) to an app wrapped in the middleware over STATE (a SQLite path or a
``postgresql://`` DSN), the answer printed, and no ``aclose()``: the store is left open, as
when the user never holds the middleware instance. The process must still exit.
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from asyncbatch import IdempotencyMiddleware
from asyncbatch._http.request import Receive, Scope, Send


async def api(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer 201 to every request."""
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"created"})


async def main(state: str) -> None:
    app = IdempotencyMiddleware(api, state=state)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        response = await client.post("/things", content=b"x", headers={"Idempotency-Key": "k"})
    print(response.status_code, response.text, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
