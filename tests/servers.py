"""A real HTTP server for tests: uvicorn on 127.0.0.1, in a thread with its own event loop.

Used as a context manager from sync or async tests; no task group outlives the ``with``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Literal

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RealServer:
    """Serve ``app`` on a free port of 127.0.0.1 until the ``with`` block ends (or ``stop()``).

    ``lifespan=True`` sends the ASGI lifespan events (the idempotency middleware closes its store
    at shutdown), ``"on"`` and ``"auto"`` are uvicorn's own settings; ``log_level="critical"``
    quiets servers whose tests break connections on purpose.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifespan: bool | Literal["on", "auto"] = False,
        log_level: str = "warning",
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            lifespan=lifespan if isinstance(lifespan, str) else "on" if lifespan else "off",
            loop="asyncio",
            http="h11",
            ws="none",
            log_level=log_level,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> RealServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        try:
            while not self._server.started:
                assert self._thread.is_alive(), "uvicorn exited during startup"
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut the server down (lifespan shutdown included) and wait for its thread; idempotent."""
        if self._sock.fileno() == -1:
            return
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self._sock.close()
        assert not self._thread.is_alive(), "uvicorn did not stop"


async def read_body(receive: Receive) -> bytes:
    """Read a whole ASGI request body."""
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def respond(send: Send, status: int, body: bytes = b"", headers: Any = ()) -> None:
    """Send a complete ASGI response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
