"""The receiving side of HTTP idempotency: an ASGI middleware that honours ``Idempotency-Key``.

It implements the IETF httpapi ``Idempotency-Key`` draft with Stripe's semantics, over the
asyncbatch ledger (a SQLite file: the one a :class:`~asyncbatch.Batch` uses, or another):

- The first request with a key runs the application; its response (status, headers, body;
  errors included) is stored, then sent.
- A repeat with the same key and the same request (method, path and query, body) gets the
  stored response with ``Idempotent-Replayed: true``; the application is not called.
- The same key while the first request still runs gets 409 with ``Retry-After: 1``; the same
  key with a different request gets 422. A key expires ``ttl`` seconds after its response was
  stored; an expired key is as good as new.

It is a pure ASGI middleware: it wraps any ASGI 3 application (Starlette, FastAPI, a bare
callable) and needs nothing from a framework::

    app = IdempotencyMiddleware(app, state="state.db")
    # or, with Starlette/FastAPI:
    app.add_middleware(IdempotencyMiddleware, state="state.db")
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite
import anyio

from . import _sql as sql
from ._exceptions import ConfigurationError
from ._ledger import Ledger

__all__ = ["IdempotencyMiddleware"]

log = logging.getLogger("asyncbatch.middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The longest key accepted, in characters (after unquoting).
MAX_KEY_LENGTH: Final = 255
#: Expired records are purged at most this often (seconds of the middleware's clock).
PURGE_INTERVAL: Final = 60.0
DEFAULT_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_HEADER: Final = b"idempotency-key"
_REPLAYED: Final = (b"idempotent-replayed", b"true")
# Send extensions that would deliver a body the middleware cannot capture: hidden from the app.
_UNCAPTURABLE: Final = frozenset({"http.response.pathsend", "http.response.zerocopysend"})
_SHUTDOWN_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


def parse_key(value: bytes) -> str:
    """The key carried by one ``Idempotency-Key`` header value.

    Accepts a structured-field string (RFC 8941 sf-string: ``"abc"``, with ``\\"`` and ``\\\\``
    escapes) or, leniently, a bare token of visible ASCII characters (``abc``); both spell the
    same key. Surrounding spaces and tabs are ignored. Raises :class:`ValueError` with a
    one-line message for an empty, malformed or too long (over 255 characters) value.
    """
    text = value.strip(b" \t")
    if text.startswith(b'"'):
        key = _parse_sf_string(text)
    elif any(c < 0x21 or c > 0x7E or c in b'"\\,' for c in text):
        raise ValueError(
            "Idempotency-Key must be a quoted string or a token of visible ASCII characters "
            "(no spaces, quotes, backslashes or commas)"
        )
    else:
        key = text.decode("ascii")
    if not key:
        raise ValueError("Idempotency-Key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"Idempotency-Key is longer than {MAX_KEY_LENGTH} characters")
    return key


def _parse_sf_string(text: bytes) -> str:
    """Unquote an RFC 8941 sf-string that makes up all of ``text`` (which starts with ``"``)."""
    out = bytearray()
    i, end = 1, len(text)
    while i < end:
        c = text[i]
        if c == 0x5C:  # backslash: only \" and \\ are escapes
            if i + 1 >= end or text[i + 1] not in b'"\\':
                raise ValueError(
                    'Idempotency-Key has an invalid escape: only \\" and \\\\ are allowed'
                )
            out.append(text[i + 1])
            i += 2
        elif c == 0x22:  # the closing quote must end the value
            if i != end - 1:
                raise ValueError("Idempotency-Key has characters after its closing quote")
            return out.decode("ascii")
        elif c < 0x20 or c > 0x7E:
            raise ValueError("Idempotency-Key may only hold printable ASCII characters")
        else:
            out.append(c)
            i += 1
    raise ValueError("Idempotency-Key has no closing quote")


def _fingerprint_head(scope: Scope) -> Any:
    """A sha256 of the request line (method, path, query string), to be fed the body next.

    The request fingerprint is this digest once every body chunk went in: computed while the
    body arrives, not in a second pass over it.
    """
    digest = hashlib.sha256()
    path = str(scope.get("path", "")).encode("utf-8", "surrogatepass")
    for part in (str(scope["method"]).encode("ascii"), path, bytes(scope.get("query_string", b""))):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest


def _key_tag(namespace: str, key: str) -> str:
    """What the logs show instead of a key: a short hash of scope and key."""
    data = f"{namespace}\0{key}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class _Stored:
    """A stored response."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


Decision = Literal["run", "replay", "conflict", "mismatch"]


@dataclass(slots=True)
class _Capture:
    """The response an application is sending, held back until it is stored."""

    start: Message | None = None
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False


async def _read_body(scope: Scope, receive: Receive) -> tuple[bytes, str] | None:
    """The whole request body and the request's fingerprint (sha256 over method, path, query
    string and body), or ``None`` when the client disconnected first."""
    digest = _fingerprint_head(scope)
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            chunk = bytes(message.get("body", b""))
            digest.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), digest.hexdigest()


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _problem(
    send: Send, status: int, title: str, detail: str, *, retry_after: int | None = None
) -> None:
    """An RFC 9457 problem response (``application/problem+json``)."""
    body = json.dumps({"title": title, "status": status, "detail": detail}).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await _respond(send, status, headers, body)


class IdempotencyMiddleware:
    """Make unsafe HTTP requests that carry ``Idempotency-Key`` run once; replay their response.

    ``app`` is any ASGI 3 application. ``state`` is a SQLite ledger path (created with mode
    0600 if missing; the same file a :class:`~asyncbatch.Batch` uses is fine). It is opened on
    the first keyed request and closed at ASGI lifespan shutdown or by :meth:`aclose`.

    Requests whose method is not in ``methods`` (POST, PUT, PATCH, DELETE by default), and
    non-HTTP scopes, pass through untouched. For the others:

    - no key: pass through, or with ``required=True`` answer 400;
    - an empty, malformed or over-long key (or more than one ``Idempotency-Key`` header): 400;
    - a new key: the request body is buffered and replayed to ``app``; the response it sends
      is stored for ``ttl`` seconds before it is sent, 2xx, 3xx and 4xx alike. A 5xx answer is
      not stored by default: the key is freed so the client's retry runs the request again
      (a transient outage must not be replayed for a day); ``store_server_errors=True`` stores
      5xx too (Stripe's choice, for apps whose 5xx may follow a side effect). If ``app`` raises
      (or is cancelled) before completing its response, nothing is stored and the key is free
      again for a retry; the exception propagates;
    - a key whose response is stored, with the same request fingerprint (sha256 over method,
      path and query string, body): the stored response plus ``Idempotent-Replayed: true``;
    - a key whose first request still runs: 409 with ``Retry-After: 1``. A first request older
      than ``lock_timeout`` seconds is taken for dead and its key is taken over by the next
      request (so keep ``lock_timeout`` above your slowest handler); the late first request
      still answers its client but cannot overwrite the new owner's record;
    - a key used with a different fingerprint: 422.

    ``scope_of(scope)`` names the namespace of a request's keys (an API client, a tenant); keys
    of different namespaces never meet. ``clock`` gives Unix seconds. Error responses are
    ``application/problem+json`` with ``title``, ``status`` and ``detail``.

    Guarantees: the decision for a key (run, replay, 409, 422) is taken in one ``BEGIN
    IMMEDIATE`` transaction, so concurrent duplicates, in one process or several sharing the
    state file, never both run (within ``lock_timeout``); every ledger transaction is shielded
    from cancellation. The response is stored before any of it reaches the client. Logs show a
    hash of the key, never the key, a body or a query string.

    Raises :class:`~asyncbatch.ConfigurationError` for a non-positive ``ttl`` or
    ``lock_timeout``, an empty ``methods`` or a ``postgresql://`` state; opening the ledger
    raises what :meth:`Ledger.open <asyncbatch._ledger.Ledger.open>` raises (at the first keyed
    request): :class:`~asyncbatch.ConfigurationError`, :class:`~asyncbatch.LedgerError`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: str | os.PathLike[str],
        ttl: float = 86400.0,
        required: bool = False,
        lock_timeout: float = 60.0,
        methods: Collection[str] = DEFAULT_METHODS,
        scope_of: Callable[[Scope], str] | None = None,
        store_server_errors: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("ttl", ttl), ("lock_timeout", lock_timeout)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigurationError.bad_value(name, value, "a positive number of seconds")
        if str(state).startswith(("postgresql://", "postgres://")):
            raise ConfigurationError.bad_value(
                "state", "postgresql://...", "a SQLite file path (PostgreSQL is not supported here)"
            )
        if isinstance(methods, str) or not methods:
            raise ConfigurationError.bad_value(
                "methods", methods, "a non-empty collection of HTTP method names"
            )
        self.app = app
        self.state = Path(state)
        self.ttl = float(ttl)
        self.required = required
        self.lock_timeout = float(lock_timeout)
        self.methods = frozenset(m.upper() for m in methods)
        self.scope_of = scope_of
        self.store_server_errors = store_server_errors
        self.clock = clock
        self._ledger: Ledger | None = None
        self._open_lock: anyio.Lock | None = None
        self._next_purge = -math.inf

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection (see the class documentation)."""
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        method = str(scope["method"])
        values = [v for k, v in scope.get("headers", ()) if bytes(k).lower() == _HEADER]
        if not values:
            if self.required:
                await _problem(
                    send,
                    400,
                    "Idempotency-Key is missing",
                    f"Idempotency-Key header is required for {method}",
                )
            else:
                await self.app(scope, receive, send)
            return
        try:
            if len(values) > 1:
                raise ValueError("Idempotency-Key header given more than once")
            key = parse_key(bytes(values[0]))
        except ValueError as e:
            log.debug("%s %s: invalid Idempotency-Key: %s", method, scope.get("path"), e)
            await _problem(send, 400, "Idempotency-Key is invalid", str(e))
            return
        request = await _read_body(scope, receive)
        if request is None:
            return  # the client is gone before its request was complete: nothing to run
        namespace = self.scope_of(scope) if self.scope_of is not None else ""
        await self._keyed(scope, receive, send, namespace, key, *request)

    async def _keyed(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        namespace: str,
        key: str,
        body: bytes,
        fingerprint: str,
    ) -> None:
        ledger = await self._store()
        tag = _key_tag(namespace, key)
        where = f"{scope['method']} {scope.get('path', '')}"
        token = secrets.token_hex(16)
        decision, why, stored = await self._claim(ledger, namespace, key, fingerprint, token)
        if decision == "replay":
            assert stored is not None
            log.debug("%s: replaying the stored %d for key %s", where, stored.status, tag)
            await _respond(send, stored.status, [*stored.headers, _REPLAYED], stored.body)
        elif decision == "conflict":
            log.info("%s: key %s is in use by a running request: 409", where, tag)
            await _problem(
                send,
                409,
                "A request is outstanding for this Idempotency-Key",
                "a request with this Idempotency-Key is still being processed; retry later",
                retry_after=1,
            )
        elif decision == "mismatch":
            log.info("%s: key %s was used with a different request: 422", where, tag)
            await _problem(
                send,
                422,
                "Idempotency-Key is already used",
                "this Idempotency-Key was used with a different request (method, path, query "
                "or body); use a new key for a new request",
            )
        else:
            if why != "new":
                log.warning("%s: key %s taken over (%s record)", where, tag, why)
            await self._run(scope, receive, send, ledger, namespace, key, token, body, tag)

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ledger: Ledger,
        namespace: str,
        key: str,
        token: str,
        body: bytes,
        tag: str,
    ) -> None:
        """Run the app with the buffered body; store its response, then send it."""
        capture = _Capture()
        body_sent = False

        async def app_receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client leaves

        async def app_send(message: Message) -> None:
            if capture.complete:
                await send(message)  # e.g. trailers, after the response went out
            elif message["type"] == "http.response.start":
                capture.start = message
            elif message["type"] == "http.response.body" and capture.start is not None:
                capture.chunks.append(bytes(message.get("body", b"")))
                if message.get("more_body", False):
                    return
                response = b"".join(capture.chunks)
                status = int(capture.start["status"])
                headers = [(bytes(n), bytes(v)) for n, v in capture.start.get("headers", ())]
                if status >= 500 and not self.store_server_errors:
                    await self._release(ledger, namespace, key, token)
                    log.debug("%s: a %d is not stored; key %s freed", scope["method"], status, tag)
                elif not await self._complete(
                    ledger, namespace, key, token, status, headers, response
                ):
                    log.warning(
                        "%s %s: key %s was taken over while this request ran (longer than "
                        "lock_timeout): its response was not stored",
                        scope["method"],
                        scope.get("path", ""),
                        tag,
                    )
                capture.complete = True
                await send(capture.start)
                await send({"type": "http.response.body", "body": response, "more_body": False})
            else:
                await send(message)

        extensions = scope.get("extensions") or {}
        if _UNCAPTURABLE & extensions.keys():
            hidden = {k: v for k, v in extensions.items() if k not in _UNCAPTURABLE}
            scope = {**scope, "extensions": hidden}
        try:
            await self.app(scope, app_receive, app_send)
        except BaseException:
            if not capture.complete:
                try:
                    await self._release(ledger, namespace, key, token)
                except Exception:  # the app's exception matters more; the lock times out
                    log.exception("could not release key %s after the app raised", tag)
                else:
                    log.debug("%s: the app raised; key %s released", scope["method"], tag)
            raise
        if not capture.complete:
            await self._release(ledger, namespace, key, token)
            log.warning(
                "%s %s: the app returned without completing its response; key %s released",
                scope["method"],
                scope.get("path", ""),
                tag,
            )
            if capture.start is not None:  # pass on what it sent: the server ends the exchange
                await send(capture.start)
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"".join(capture.chunks),
                        "more_body": True,
                    }
                )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass lifespan through; close the store once the app's shutdown is complete."""
        spoken = False

        async def app_receive() -> Message:
            nonlocal spoken
            spoken = True
            return await receive()

        async def app_send(message: Message) -> None:
            nonlocal spoken
            spoken = True
            if message["type"] in _SHUTDOWN_DONE:
                await self.aclose()
            await send(message)

        await self.app(scope, app_receive, app_send)
        if spoken:
            return
        # The app returned at once, ignoring lifespan: speak it so the store is closed at the end.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the store -------------------------------------------------------------------------------

    async def _store(self) -> Ledger:
        if self._ledger is not None:
            return self._ledger
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self._ledger is None:
                self._ledger = await Ledger.open(self.state, clock=self.clock)
            return self._ledger

    async def aclose(self) -> None:
        """Close the store (idempotent). A later keyed request opens it again."""
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            await ledger.close()

    async def purge(self) -> int:
        """Delete every expired record now; return how many were deleted.

        Keyed requests also purge, at most once a minute; this is for a scheduled cleanup.
        """
        ledger = await self._store()
        async with ledger._write() as db:
            return await self._purge(db, self.clock())

    async def _purge(self, db: aiosqlite.Connection, now: float) -> int:
        self._next_purge = now + PURGE_INTERVAL
        async with db.execute(sql.IDEMPOTENCY_PURGE, (now,)) as cur:
            count = max(cur.rowcount, 0)
        if count:
            log.debug("purged %d expired idempotency keys", count)
        return count

    async def _claim(
        self, ledger: Ledger, namespace: str, key: str, fp: str, token: str
    ) -> tuple[Decision, str, _Stored | None]:
        """Decide, in one transaction, what a keyed request gets; a "run" leaves it the owner."""
        now = self.clock()
        fresh = (fp, token, now, now + self.lock_timeout, now + max(self.ttl, self.lock_timeout))
        async with ledger._write() as db:
            if now >= self._next_purge:
                await self._purge(db, now)
            async with db.execute(sql.IDEMPOTENCY_INSERT, (namespace, key, *fresh)) as cur:
                if cur.rowcount == 1:
                    return "run", "new", None
            async with db.execute(sql.IDEMPOTENCY_GET, (namespace, key)) as cur:
                row = await cur.fetchone()
            assert row is not None  # the insert was ignored inside this write transaction
            stored_fp, state, status, headers, body, locked_until, expires_at = row
            if expires_at < now:
                why = "expired"
            elif stored_fp != fp:
                return "mismatch", "", None
            elif state == "done":
                pairs = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(headers)]
                return "replay", "", _Stored(int(status), pairs, bytes(body or b""))
            elif locked_until >= now:
                return "conflict", "", None
            else:
                why = "abandoned running"
            await db.execute(sql.IDEMPOTENCY_TAKE_OVER, (*fresh, namespace, key))
        return "run", why, None

    async def _complete(
        self,
        ledger: Ledger,
        namespace: str,
        key: str,
        token: str,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> bool:
        """Store the response of the running record we own; ``False`` if it was taken over."""
        now = self.clock()
        text = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers])
        params = (status, text, body, now, now + self.ttl, namespace, key, token)
        async with ledger._write() as db, db.execute(sql.IDEMPOTENCY_COMPLETE, params) as cur:
            return cur.rowcount == 1

    async def _release(self, ledger: Ledger, namespace: str, key: str, token: str) -> None:
        """Delete the running record we own so the key can be retried (even when cancelled)."""
        with anyio.CancelScope(shield=True):
            async with ledger._write() as db:
                await db.execute(sql.IDEMPOTENCY_RELEASE, (namespace, key, token))
