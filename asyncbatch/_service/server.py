"""The small HTTP server of ``Batch(metrics="HOST:PORT")`` and ``asyncbatch run --metrics``.

It answers :class:`~.endpoints.Endpoints` inside the run's task group and stops with it: one
request per connection (``Connection: close``), ``GET``/``HEAD`` only, what a scraper and a
probe need. Whatever its clients do, it never ends the run it serves:

- it keeps at most ``max_connections`` (64) connections open: one more makes it drop the oldest
  idle one (a connection is idle until its request head has arrived);
- a request head must arrive within ``head_timeout`` (10 s) and fit in 16 KiB, and the answer
  must be taken within ``send_timeout`` (10 s), or the connection is closed;
- a failed ``accept()`` (out of file descriptors, a connection aborted before it was accepted,
  ...) is logged once per burst and retried after a short back-off (out of descriptors, at
  once after dropping the oldest idle connection, if there is one);
- a broken listening socket, or any failure of the server itself, is logged and stops the
  server: the run goes on without it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.streams.stapled

from .endpoints import Answer, Endpoints

__all__ = ["HEAD_TIMEOUT", "MAX_CONNECTIONS", "SEND_TIMEOUT", "serve"]

log = logging.getLogger("asyncbatch")

#: Connections held at once; one more drops the oldest idle one.
MAX_CONNECTIONS = 64
#: Seconds a connection gets to send its request head.
HEAD_TIMEOUT = 10.0
#: Seconds a connection gets to take its answer.
SEND_TIMEOUT = 10.0

_HEAD_LIMIT = 16384
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
#: ``accept()`` errors that mean the listening socket itself is unusable; any other is retried.
_BROKEN = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT})
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
#: What a client can make happen to its own connection: closed quietly.
_CLIENT_ERRORS = (
    TimeoutError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def serve(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    endpoints: Endpoints,
    *,
    max_connections: int = MAX_CONNECTIONS,
    head_timeout: float = HEAD_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT,
) -> None:
    """Answer requests on ``listener`` until cancelled, then close it.

    Never raises but the cancellation that stops it: a broken listener or a failure of the
    server is logged, and ``serve()`` returns (closing the listener and its connections).
    """
    connections = _Connections(max_connections)

    async def handle(stream: anyio.abc.SocketStream, connection: _Connection) -> None:
        try:
            with connection.scope:
                async with stream:
                    await _exchange(stream, connection, endpoints, head_timeout, send_timeout)
        except _CLIENT_ERRORS:
            pass
        except Exception:  # a bug here must not end the run it serves
            log.exception("the metrics endpoint failed on a connection")
        finally:
            connections.release(connection)

    try:
        async with listener, anyio.create_task_group() as tg:
            for inner in _socket_listeners(listener):
                tg.start_soon(_accept_loop, inner, connections, handle, tg)
    except Exception:
        log.exception("the metrics endpoint failed and stopped; the run goes on without it")


def _socket_listeners(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
) -> list[anyio.abc.SocketListener]:
    """The listening sockets of ``listener`` (one per address of the host it listens on)."""
    inner = (
        listener.listeners
        if isinstance(listener, anyio.streams.stapled.MultiListener)
        else [listener]
    )
    found = [one for one in inner if isinstance(one, anyio.abc.SocketListener)]
    if len(found) != len(inner):
        raise TypeError(f"not a socket listener: {listener!r}")
    return found


class _Connection:
    """One connection held: ``scope`` closes it when cancelled; ``idle`` until its head came."""

    __slots__ = ("idle", "scope")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.idle = True


class _Connections:
    """The connections the server holds, oldest first, at most ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[_Connection, None] = {}  # an ordered set
        self._released = anyio.Event()
        self._drops = _Burst(
            f"the metrics endpoint is full ({limit} connections): it drops the oldest idle "
            "ones to take new ones",
            "the metrics endpoint has room again, after dropping {count} idle connections "
            "in {seconds:.1f}s",
        )

    def add(self) -> _Connection:
        """Hold a new connection (the newest)."""
        connection = _Connection()
        self._held[connection] = None
        return connection

    def release(self, connection: _Connection) -> None:
        """Forget ``connection`` (closed); wakes whoever waits for room."""
        self._held.pop(connection, None)
        self._released.set()
        self._released = anyio.Event()

    async def make_room(self) -> None:
        """Wait until one more connection fits: drop the oldest idle ones, or, all of them
        busy answering, wait for one to finish (within its send timeout)."""
        if len(self._held) < self.limit:
            self._drops.ended()
            return
        while len(self._held) >= self.limit:
            if await self.drop_oldest_idle():
                self._drops.occurred()
            else:
                await self._released.wait()

    async def drop_oldest_idle(self) -> bool:
        """Close the oldest idle connection and wait until it is released; ``False`` if no
        connection is idle."""
        oldest = next((c for c in self._held if c.idle), None)
        if oldest is None:
            return False
        oldest.idle = False
        oldest.scope.cancel()
        while oldest in self._held:
            await self._released.wait()
        return True


class _Burst:
    """One recurring problem: its first occurrence is logged, and its end with a count.

    ``start`` may name ``{detail}``, ``end`` names ``{count}`` and ``{seconds}``.
    """

    def __init__(self, start: str, end: str) -> None:
        self.start = start
        self.end = end
        self.count = 0
        self.since = 0.0

    def occurred(self, detail: str = "") -> None:
        """Count one occurrence; the first of a burst is logged (a WARNING)."""
        if self.count == 0:
            self.since = time.monotonic()
            log.warning("%s (logged once until it stops)", self.start.format(detail=detail))
        self.count += 1

    def ended(self) -> None:
        """The burst, if any, is over: log how many it had, over how long (a WARNING)."""
        if self.count:
            seconds = time.monotonic() - self.since
            log.warning("%s", self.end.format(count=self.count, seconds=seconds))
            self.count = 0


async def _accept_loop(
    listener: anyio.abc.SocketListener,
    connections: _Connections,
    handle: Callable[[anyio.abc.SocketStream, _Connection], Coroutine[Any, Any, None]],
    server: anyio.abc.TaskGroup,
) -> None:
    """Accept connections on one listening socket and start ``handle`` for each in
    ``server``; stops the whole server if that socket is broken."""
    failures = _Burst(
        "the metrics endpoint cannot accept connections: {detail}; it retries",
        "the metrics endpoint accepts connections again, after {count} failed accepts "
        "in {seconds:.1f}s",
    )
    backoff = _BACKOFF_FIRST
    while True:
        try:
            stream = await listener.accept()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as e:
            _stop(server, f"its listening socket is unusable ({type(e).__name__})")
            return
        except OSError as e:
            if e.errno in _BROKEN:
                _stop(server, f"its listening socket is unusable: {e}")
                return
            failures.occurred(str(e))
            if e.errno in _OUT_OF_DESCRIPTORS and await connections.drop_oldest_idle():
                continue
            await anyio.sleep(backoff)
            backoff = min(2 * backoff, _BACKOFF_MAX)
            continue
        failures.ended()
        backoff = _BACKOFF_FIRST
        try:
            await connections.make_room()
        except BaseException:  # cancelled while waiting: the new connection is closed too
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        server.start_soon(handle, stream, connections.add())


def _stop(server: anyio.abc.TaskGroup, why: str) -> None:
    log.error("the metrics endpoint stopped: %s; the run goes on without it", why)
    server.cancel_scope.cancel()


async def _exchange(
    stream: anyio.abc.SocketStream,
    connection: _Connection,
    endpoints: Endpoints,
    head_timeout: float,
    send_timeout: float,
) -> None:
    """Read one request head, send its answer."""
    with anyio.fail_after(head_timeout):
        head = await _read_head(stream)
    connection.idle = False
    try:
        status, content_type, body = _answer_head(endpoints, head)
    except Exception:  # a bug here must not end the run it serves
        log.exception("the metrics endpoint failed to answer")
        status, content_type, body = 500, "text/plain; charset=utf-8", b"error\n"
    method = head.split(b" ", 1)[0]
    response = _response(status, content_type, b"" if method == b"HEAD" else body, len(body))
    with anyio.fail_after(send_timeout):
        await stream.send(response)


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < _HEAD_LIMIT:
        data += await stream.receive(_HEAD_LIMIT - len(data))
    return data


def _answer_head(endpoints: Endpoints, head: bytes) -> Answer:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, "text/plain; charset=utf-8", b"bad request\n"
    method, target = parts[0], parts[1]
    return endpoints.answer(method, target.split("?", 1)[0])


def _response(status: int, content_type: str, body: bytes, length: int) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
