"""``/metrics``, ``/healthz`` and ``/readyz`` of a batch: one set of answers, served two ways.

- :class:`EndpointsApp`: an ASGI application, to mount into the user's own app
  (``Batch.metrics_app()``).
- :func:`.server.serve`: a small HTTP/1.1 server on the listener :func:`listen` opens, for
  ``Batch(metrics="HOST:PORT")`` and ``asyncbatch run --metrics HOST:PORT``.

``/healthz`` answers 200 while the batch is live, ``/readyz`` 200 while it is ready, 503
otherwise, each with the JSON of :meth:`Health.as_dict`. ``/metrics`` (also ``/``, for an app
mounted at ``/metrics``) answers the Prometheus text exposition.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.abc

from .._exceptions import ConfigurationError
from .health import Health

__all__ = [
    "ASGIApp",
    "Endpoints",
    "EndpointsApp",
    "bound_address",
    "listen",
    "parse_address",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: An ASGI application.
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: ``(status, content type, body)``.
Answer = tuple[int, str, bytes]


class Endpoints:
    """The answers: ``health`` gives the batch's health now, ``metrics`` its exposition and
    content type (``None`` when the batch has metrics off: ``/metrics`` is then 404)."""

    def __init__(
        self,
        health: Callable[[], Health],
        metrics: Callable[[], tuple[bytes, str]] | None,
    ) -> None:
        self.health = health
        self.metrics = metrics

    def answer(self, method: str, path: str) -> Answer:
        """What ``method path`` gets."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
        if path in ("/healthz", "/readyz"):
            health = self.health()
            ok = health.live if path == "/healthz" else health.ready
            body = json.dumps(health.as_dict(), indent=2).encode() + b"\n"
            return (200 if ok else 503), "application/json", body
        if path in ("", "/", "/metrics"):
            if self.metrics is None:
                return 404, "text/plain; charset=utf-8", b"metrics are off: Batch(metrics=True)\n"
            body, content_type = self.metrics()
            return 200, content_type, body
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz, /readyz\n"


class EndpointsApp:
    """An ASGI application answering ``/metrics``, ``/healthz`` and ``/readyz`` (relative to
    where it is mounted)."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own (uvicorn): nothing to start
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):  # Starlette's Mount keeps the full path
            path = path[len(root) :]
        status, content_type, body = self.endpoints.answer(scope["method"], path)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9108`` for IPv6) as ``(host, port)``; port 0 picks a free one.

    Raises :class:`ConfigurationError` naming the value.
    """
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError.bad_value(
            "metrics", value, "expected HOST:PORT, e.g. 127.0.0.1:9108 (port 0: any free port)"
        )
    return host, int(port)


async def listen(value: str) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Listen on ``HOST:PORT``; raises :class:`ConfigurationError` naming it if that fails
    (the port in use, say)."""
    host, port = parse_address(value)
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as e:
        raise ConfigurationError(
            f"metrics address {value!r}: cannot listen there: {e.strerror or e}"
        ) from None


def bound_address(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> tuple[str, int]:
    """The ``(host, port)`` a listener made by :func:`listen` is bound to (the first one)."""
    inner = getattr(listener, "listeners", [listener])[0]
    address = inner.extra(anyio.abc.SocketAttribute.local_address)
    return str(address[0]), int(address[1])
