"""The HTTP-bound benchmark's server: an API that answers a POST after a 5 ms sleep.

``python -m benchmarks.systems.http_server --port P --state FILE --counts FILE [--delay S]``

A bare ASGI application behind :class:`asyncbatch.IdempotencyMiddleware` (its own SQLite
state), served by uvicorn in this process with one worker, so its CPU is apart from the
client's. ``POST /items`` reads the body, sleeps ``--delay`` (0.005 s), answers 200 with a
small JSON body; ``GET /health`` answers 200 at once.

What it saw is written to ``--counts`` as JSON at shutdown (SIGTERM or SIGINT), to check that
every file was executed exactly once: ``received`` counts every POST that arrived (before the
middleware, replays and 409s included), ``executed`` the POSTs the application ran, ``bodies``
the distinct body digests it ran, ``repeated_bodies`` / ``repeated_keys`` how many ran more
than once, and ``connections`` the distinct client (address, port) pairs: TCP connections.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

from asyncbatch import IdempotencyMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]


class Api:
    """The application: ``POST /items`` after a sleep, ``GET /health``; counts what it ran."""

    def __init__(self, delay: float, counts: Path) -> None:
        self.delay = delay
        self.counts_path = counts
        self.received = 0
        self.bodies: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        self.peers: set[tuple[str, int]] = set()

    def counts(self) -> dict[str, int]:
        return {
            "received": self.received,
            "executed": sum(self.bodies.values()),
            "bodies": len(self.bodies),
            "keys": len(self.keys),
            "repeated_bodies": sum(1 for n in self.bodies.values() if n > 1),
            "repeated_keys": sum(1 for n in self.keys.values() if n > 1),
            "connections": len(self.peers),
        }

    def write_counts(self) -> None:
        self.counts_path.write_text(json.dumps(self.counts()) + "\n")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.write_counts()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await self._respond(send, 200, b'{"ok": true}')
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        key = next((bytes(v) for k, v in scope["headers"] if bytes(k) == b"idempotency-key"), b"")
        self.bodies[hashlib.sha256(body).hexdigest()] += 1
        self.keys[key.decode("latin-1")] += 1
        await asyncio.sleep(self.delay)
        await self._respond(send, 200, json.dumps({"ok": True, "bytes": len(body)}).encode())

    @staticmethod
    async def _respond(send: Send, status: int, body: bytes) -> None:
        headers = [*_JSON, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def counting(app: ASGIApp, api: Api) -> ASGIApp:
    """Count every POST that arrives, before the middleware decides what it gets."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            api.received += 1
            client = scope.get("client")
            if client is not None:
                api.peers.add((str(client[0]), int(client[1])))
        await app(scope, receive, send)

    return outer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True, help="the middleware's SQLite state")
    parser.add_argument("--counts", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.005)
    args = parser.parse_args()
    api = Api(args.delay, args.counts)
    app = counting(IdempotencyMiddleware(api, state=args.state), api)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=1024,
    )


if __name__ == "__main__":
    main()
