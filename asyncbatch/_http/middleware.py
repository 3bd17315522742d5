"""The receiving side of HTTP idempotency: an ASGI middleware that honours ``Idempotency-Key``.

It implements the IETF httpapi ``Idempotency-Key`` draft with Stripe's semantics, over the
asyncbatch ledger's idempotency store (a SQLite file, the one a :class:`~asyncbatch.Batch` uses
or another, for the processes of one host; or a ``postgresql://`` state for several hosts):

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
    app.add_middleware(IdempotencyMiddleware, state="postgresql://api@db/api")

Each keyed request is served by one :class:`_Responder` (its state: the buffered body, the
response held back until it is stored), as Starlette's middlewares do.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Final

import anyio

from .. import _failpoints as failpoints
from .._exceptions import ConfigurationError
from .._ledger import IdempotencyRequest, Ledger, StoredResponse, is_postgres, open_ledger
from .._ledger.dsn import PostgresDSN
from .request import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    caller_scope,
    key_tag,
    parse_key,
    problem,
    read_body,
    respond,
)

__all__ = ["DEFAULT_METHODS", "PURGE_INTERVAL", "IdempotencyMiddleware"]

log = logging.getLogger("asyncbatch.middleware")

#: Expired records are purged at most this often (seconds of the middleware's clock).
PURGE_INTERVAL: Final = 60.0
DEFAULT_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_HEADER: Final = b"idempotency-key"
_REPLAYED: Final = (b"idempotent-replayed", b"true")
# Response headers that belong to the client who made the request: never stored nor replayed.
_NOT_STORED: Final = frozenset({b"set-cookie"})
# Send extensions that would deliver a body the middleware cannot capture: hidden from the app.
_UNCAPTURABLE: Final = frozenset({"http.response.pathsend", "http.response.zerocopysend"})
_SHUTDOWN_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class IdempotencyMiddleware:
    """Make unsafe HTTP requests that carry ``Idempotency-Key`` run once; replay their response.

    ``app`` is any ASGI 3 application. ``state`` is the store: a SQLite ledger path (created
    with mode 0600 if missing; the same file a :class:`~asyncbatch.Batch` uses is fine) for the
    server processes of one host, or a ``postgresql://`` DSN (``pip install
    'asyncbatch[postgres]'``) for servers on several hosts behind one key space. It is opened at
    ASGI lifespan startup (a store that cannot be used fails the startup with one line naming
    it) or, without lifespan, on the first keyed request; it is closed at lifespan shutdown or
    by :meth:`aclose`.

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
      path and query string, body): the stored response (without ``Set-Cookie``) plus
      ``Idempotent-Replayed: true``;
    - a key whose first request still runs: 409 with ``Retry-After: 1``. A first request older
      than ``lock_timeout`` seconds is taken for dead and its key is taken over by the next
      request (so keep ``lock_timeout`` above your slowest handler); the late first request
      still answers its client but cannot overwrite the new owner's record;
    - a key used with a different fingerprint: 422.

    ``scope_of(scope)`` names the namespace of a request's keys (an API client, a tenant); keys
    of different namespaces never meet, so a stored response is replayed only within its
    namespace. By default it is the caller: a sha256 of the ``Authorization`` header, else of
    the ``Cookie`` header; requests with neither share one namespace
    (:func:`~asyncbatch._http.request.caller_scope`). ``scope_of=lambda scope: ""`` shares
    keys between all callers. A response's ``Set-Cookie`` headers go to the client it was made
    for and are never stored nor replayed. ``clock`` gives Unix seconds (a SQLite store's
    clock; a PostgreSQL store uses the server's). Error responses are
    ``application/problem+json`` with ``title``, ``status`` and ``detail``.

    Guarantees: the decision for a key (run, replay, 409, 422) is taken in one transaction of
    the store (``BEGIN IMMEDIATE`` on SQLite, a row lock on PostgreSQL), so concurrent
    duplicates, in one process or several sharing the store, never both run (within
    ``lock_timeout``); each store operation is one transaction, shielded from cancellation,
    and holds no lock across the application's work. The response is stored before any of it
    reaches the client. Logs show a hash of the key, never the key, a body or a query string.

    Raises :class:`~asyncbatch.ConfigurationError` for a non-positive ``ttl`` or
    ``lock_timeout``, an empty ``methods`` or a ``postgresql://`` state that does not parse (the
    password never printed); opening the store raises what
    :func:`~asyncbatch._ledger.open_ledger` raises: :class:`~asyncbatch.ConfigurationError`,
    :class:`~asyncbatch.LedgerError`, :class:`~asyncbatch.NotALedgerError`.
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
        if isinstance(methods, str) or not methods:
            raise ConfigurationError.bad_value(
                "methods", methods, "a non-empty collection of HTTP method names"
            )
        if is_postgres(state):
            PostgresDSN.parse(str(state))  # a one-line ConfigurationError, without the password
        self.app = app
        self.state = state
        self.ttl = float(ttl)
        self.required = required
        self.lock_timeout = float(lock_timeout)
        self.methods = frozenset(m.upper() for m in methods)
        self.scope_of = scope_of if scope_of is not None else caller_scope
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
                await problem(
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
            await problem(send, 400, "Idempotency-Key is invalid", str(e))
            return
        request = await read_body(scope, receive)
        if request is None:
            return  # the client is gone before its request was complete: nothing to run
        body, fingerprint = request
        namespace = self.scope_of(scope)
        keyed = IdempotencyRequest(namespace, key, fingerprint, secrets.token_hex(16))
        responder = _Responder(self, await self._store(), scope, keyed, body)
        await responder.serve(receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the store at startup (failing the startup if it cannot be used), pass lifespan
        through, and close the store once the app's shutdown is complete."""
        spoken = False
        first = await receive()
        if first["type"] == "lifespan.startup":
            try:
                await self._store()
            except Exception as e:
                await send({"type": "lifespan.startup.failed", "message": str(e)})
                return
        pending: list[Message] = [first]

        async def app_receive() -> Message:
            nonlocal spoken
            spoken = True
            return pending.pop() if pending else await receive()

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
        message = first
        while True:
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
            message = await receive()

    # -- the store -------------------------------------------------------------------------------

    async def _store(self) -> Ledger:
        if self._ledger is not None:
            return self._ledger
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self._ledger is None:
                self._ledger = await open_ledger(self.state, clock=self.clock)
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
        self._next_purge = self.clock() + PURGE_INTERVAL
        count = await (await self._store()).idempotency_purge()
        if count:
            log.debug("purged %d expired idempotency keys", count)
        return count

    async def _purge_if_due(self) -> None:
        if self.clock() >= self._next_purge:
            await self.purge()


@dataclass(eq=False)
class _Responder:
    """One keyed request: decides what it gets, runs the app if it owns the key, stores the
    response before sending it."""

    middleware: IdempotencyMiddleware
    store: Ledger
    scope: Scope
    #: The key, its scope, the request's fingerprint and its owner token (random).
    request: IdempotencyRequest
    body: bytes
    start: Message | None = None
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False
    body_given: bool = False

    @property
    def where(self) -> str:
        return f"{self.scope['method']} {self.scope.get('path', '')}"

    @property
    def tag(self) -> str:
        """What the logs show instead of the key."""
        return key_tag(self.request.scope, self.request.key)

    async def serve(self, receive: Receive, send: Send) -> None:
        m = self.middleware
        await m._purge_if_due()
        claim = await self.store.idempotency_claim(
            self.request, lock_timeout=m.lock_timeout, ttl=m.ttl
        )
        if claim.decision == "replay":
            stored = claim.stored
            assert stored is not None
            log.debug("%s: replaying the stored %d for key %s", self.where, stored.status, self.tag)
            await respond(send, stored.status, [*storable(stored.headers), _REPLAYED], stored.body)
        elif claim.decision == "conflict":
            log.info("%s: key %s is in use by a running request: 409", self.where, self.tag)
            await problem(
                send,
                409,
                "A request is outstanding for this Idempotency-Key",
                "a request with this Idempotency-Key is still being processed; retry later",
                retry_after=1,
            )
        elif claim.decision == "mismatch":
            log.info("%s: key %s was used with a different request: 422", self.where, self.tag)
            await problem(
                send,
                422,
                "Idempotency-Key is already used",
                "this Idempotency-Key was used with a different request (method, path, query "
                "or body); use a new key for a new request",
            )
        else:
            if claim.why != "new":
                log.warning("%s: key %s taken over (%s record)", self.where, self.tag, claim.why)
            await self.run(receive, send)

    async def run(self, receive: Receive, send: Send) -> None:
        """Run the app with the buffered body; store its response, then send it."""
        scope = self.scope
        extensions = scope.get("extensions") or {}
        if _UNCAPTURABLE & extensions.keys():
            hidden = {k: v for k, v in extensions.items() if k not in _UNCAPTURABLE}
            scope = {**scope, "extensions": hidden}

        async def app_receive() -> Message:
            if not self.body_given:
                self.body_given = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client leaves

        async def app_send(message: Message) -> None:
            await self.send(message, send)

        try:
            await self.middleware.app(scope, app_receive, app_send)
        except BaseException:
            if not self.complete:
                try:
                    await self.release()
                except Exception:  # the app's exception matters more; the lock times out
                    log.exception("could not release key %s after the app raised", self.tag)
                else:
                    log.debug("%s: the app raised; key %s released", self.where, self.tag)
            raise
        if not self.complete:
            await self.release()
            log.warning(
                "%s: the app returned without completing its response; key %s released",
                self.where,
                self.tag,
            )
            if self.start is not None:  # pass on what it sent: the server ends the exchange
                await send(self.start)
                body = b"".join(self.chunks)
                await send({"type": "http.response.body", "body": body, "more_body": True})

    async def send(self, message: Message, send: Send) -> None:
        """The app's ``send``: hold the response back until it is complete and stored."""
        if self.complete:
            await send(message)  # e.g. trailers, after the response went out
        elif message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(bytes(message.get("body", b"")))
            if message.get("more_body", False):
                return
            response = StoredResponse(
                int(self.start["status"]),
                storable((bytes(n), bytes(v)) for n, v in self.start.get("headers", ())),
                b"".join(self.chunks),
            )
            await failpoints.ahit("middleware-executed")
            await self.store_response(response)
            self.complete = True
            await send(self.start)
            await send({"type": "http.response.body", "body": response.body, "more_body": False})
        else:
            await send(message)

    async def store_response(self, response: StoredResponse) -> None:
        """Store a complete response (a 5xx only if asked to: else the key is freed)."""
        m = self.middleware
        if response.status >= 500 and not m.store_server_errors:
            await self.release()
            log.debug("%s: a %d is not stored; key %s freed", self.where, response.status, self.tag)
            return
        stored = await self.store.idempotency_complete(self.request, response, ttl=m.ttl)
        if not stored:
            log.warning(
                "%s: key %s was taken over while this request ran (longer than lock_timeout): "
                "its response was not stored",
                self.where,
                self.tag,
            )

    async def release(self) -> None:
        """Free the key we own so it can be retried (even when cancelled)."""
        with anyio.CancelScope(shield=True):
            await self.store.idempotency_release(self.request)


def storable(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The response headers that may be stored and replayed: all but ``Set-Cookie`` (a cookie
    belongs to the client the response was made for; a record stored before this rule is
    filtered on replay as well)."""
    return [(n, v) for n, v in headers if n.lower() not in _NOT_STORED]
