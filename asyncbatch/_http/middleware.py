"""The receiving side of HTTP idempotency: an ASGI middleware that honours ``Idempotency-Key``.

It implements the IETF httpapi ``Idempotency-Key`` draft with Stripe's semantics, over the
asyncbatch ledger's idempotency store (a SQLite file, the one a :class:`~asyncbatch.Batch` uses
or another, for the processes of one host; or a ``postgresql://`` state for several hosts):

- The first request with a key runs the application; its response (status, headers, body;
  errors included) is stored, then sent.
- A repeat with the same key and the same request (method, path and query, body) gets the
  stored response with ``Idempotent-Replayed: true``; the application is not called.
- The same key while the first request still runs gets 409 with ``Retry-After: 1``; the same
  key with a different request gets 422. A key whose request ran but whose response could not
  be stored (cut short, too large) gets 409 naming the reason: it never runs twice. A key
  expires ``ttl`` seconds after its response was stored; an expired key is as good as new.
- Keys belong to the caller (its credentials, hashed), unless ``scope_of`` says otherwise.

The store is all the middleware knows of the ledger: an
:class:`~asyncbatch._ledger.idempotency.IdempotencyStore` (the six operations of a keyed
request), which both ledger backends implement.

It is a pure ASGI middleware: it wraps any ASGI 3 application (Starlette, FastAPI, a bare
callable) and needs nothing from a framework::

    app = IdempotencyMiddleware(app, state="state.db")
    # or, with Starlette/FastAPI:
    app.add_middleware(IdempotencyMiddleware, state="postgresql://api@db/api")

Each keyed request is served by one :class:`~asyncbatch._http.responder.Responder` (its
state: the buffered body, the response held back until it is stored), as Starlette's
middlewares do.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Collection
from typing import Final

import anyio

from .._exceptions import ConfigurationError
from .._ledger import IdempotencyRequest, IdempotencyStore, is_postgres, open_idempotency_store
from .._ledger.dsn import PostgresDSN
from .request import (
    ASGIApp,
    BodyTooLarge,
    Message,
    Receive,
    Scope,
    Send,
    caller_scope,
    parse_key,
    problem,
    read_body,
)
from .responder import Policy, Responder

__all__ = [
    "DEFAULT_MAX_REQUEST_BODY",
    "DEFAULT_MAX_STORED_BODY",
    "DEFAULT_METHODS",
    "PURGE_INTERVAL",
    "IdempotencyMiddleware",
]

log = logging.getLogger("asyncbatch.middleware")

#: Expired records are purged at most this often (seconds of the middleware's clock).
PURGE_INTERVAL: Final = 60.0
DEFAULT_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The longest request body read for a keyed request (bytes); a longer one gets 413.
DEFAULT_MAX_REQUEST_BODY: Final = 10 * 2**20
#: The longest response body stored for a key (bytes); a longer one is sent, not stored.
DEFAULT_MAX_STORED_BODY: Final = 2**20

_HEADER: Final = b"idempotency-key"
_SHUTDOWN_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class IdempotencyMiddleware:
    """Make unsafe HTTP requests that carry ``Idempotency-Key`` run once; replay their response.

    ``app`` is any ASGI 3 application. ``state`` is the store: a SQLite ledger path (created
    with mode 0600 if missing; the same file a :class:`~asyncbatch.Batch` uses is fine) for the
    server processes of one host, or a ``postgresql://`` DSN (``pip install
    'asyncbatch[postgres]'``) for servers on several hosts behind one key space. It is opened at
    ASGI lifespan startup (a store that cannot be used fails the startup with one line naming
    it) or, without lifespan, on the first keyed request; it is closed at lifespan shutdown or
    by :meth:`aclose`. ``state`` may also be an open
    :class:`~asyncbatch._ledger.idempotency.IdempotencyStore` (the interface the ledger
    implements; the tests give one kept in memory): it is used as it is, and stays its
    caller's to close.

    Requests whose method is not in ``methods`` (POST, PUT, PATCH, DELETE by default), and
    non-HTTP scopes, pass through untouched. For the others:

    - no key: pass through, or with ``required=True`` answer 400;
    - an empty, malformed or over-long key (or more than one ``Idempotency-Key`` header): 400;
    - a request body longer than ``max_request_body`` bytes (10 MiB): 413, ``app`` not run;
    - a new key: the request body is buffered and replayed to ``app``; the response it sends
      is stored for ``ttl`` seconds before it is sent, 2xx, 3xx and 4xx alike. A 5xx answer is
      not stored by default: the key is freed so the client's retry runs the request again
      (a transient outage must not be replayed for a day); ``store_server_errors=True`` stores
      5xx too (Stripe's choice, for apps whose 5xx may follow a side effect). If ``app`` raises
      (or is cancelled) before it has started its response, nothing is stored and the key is
      free again for a retry; the exception propagates. Once it has started its response the
      key never runs again: a response that is cut short (the client disconnects, ``app``
      raises or returns in the middle of it) or whose body is longer than ``max_stored_body``
      bytes (1 MiB; such a response is still sent whole) is recorded as not stored, with the
      reason;
    - a key whose response is stored, with the same request fingerprint (sha256 over method,
      path and query string, body): the stored response (without ``Set-Cookie``) plus
      ``Idempotent-Replayed: true``;
    - a key whose first request still runs: 409 with ``Retry-After: 1``. A first request older
      than ``lock_timeout`` seconds that had not begun streaming its response is taken for
      dead and its key is taken over by the next request (so keep ``lock_timeout`` above your
      slowest handler); the late first request still answers its client but cannot overwrite
      the new owner's record;
    - a key whose response was not stored, or whose response began streaming more than
      ``lock_timeout`` seconds ago and has not ended: 409 whose ``reason`` member says which
      (``"incomplete"``, ``"too_large"``, ``"unfinished"``), without ``Retry-After``;
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
    and holds no lock across the application's work. The response is stored (or recorded as
    not stored) before any of it reaches the client. Logs show a hash of the key, never the
    key, a body or a query string.

    Raises :class:`~asyncbatch.ConfigurationError` for a non-positive ``ttl``,
    ``lock_timeout``, ``max_request_body`` or ``max_stored_body``, an empty ``methods`` or a
    ``postgresql://`` state that does not parse (the password never printed); opening the
    store raises what :func:`~asyncbatch._ledger.open_idempotency_store` raises:
    :class:`~asyncbatch.ConfigurationError`, :class:`~asyncbatch.LedgerError`,
    :class:`~asyncbatch.NotALedgerError`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: str | os.PathLike[str] | IdempotencyStore,
        ttl: float = 86400.0,
        required: bool = False,
        lock_timeout: float = 60.0,
        methods: Collection[str] = DEFAULT_METHODS,
        scope_of: Callable[[Scope], str] | None = None,
        store_server_errors: bool = False,
        max_request_body: int = DEFAULT_MAX_REQUEST_BODY,
        max_stored_body: int = DEFAULT_MAX_STORED_BODY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (("ttl", ttl), ("lock_timeout", lock_timeout)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigurationError.bad_value(name, value, "a positive number of seconds")
        for name, size in (
            ("max_request_body", max_request_body),
            ("max_stored_body", max_stored_body),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ConfigurationError.bad_value(name, size, "a positive number of bytes")
        if isinstance(methods, str) or not methods:
            raise ConfigurationError.bad_value(
                "methods", methods, "a non-empty collection of HTTP method names"
            )
        if not isinstance(state, IdempotencyStore) and is_postgres(state):
            PostgresDSN.parse(str(state))  # a one-line ConfigurationError, without the password
        self.app = app
        self.state = state
        self.ttl = float(ttl)
        self.required = required
        self.lock_timeout = float(lock_timeout)
        self.methods = frozenset(m.upper() for m in methods)
        self.scope_of = scope_of if scope_of is not None else caller_scope
        self.store_server_errors = store_server_errors
        self.max_request_body = max_request_body
        self.max_stored_body = max_stored_body
        self.clock = clock
        #: The store this middleware opened (``None``: not open, or given as ``state``).
        self._opened: IdempotencyStore | None = None
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
        values = [v for k, v in scope.get("headers", ()) if bytes(k).lower() == _HEADER]
        if not values:
            await self._unkeyed(scope, receive, send)
            return
        try:
            if len(values) > 1:
                raise ValueError("Idempotency-Key header given more than once")
            key = parse_key(bytes(values[0]))
        except ValueError as e:
            log.debug("%s %s: invalid Idempotency-Key: %s", scope["method"], scope.get("path"), e)
            await problem(send, 400, "Idempotency-Key is invalid", str(e))
            return
        await self._keyed(key, scope, receive, send)

    async def _unkeyed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request without a key: through to the app, or 400 when keys are required."""
        if not self.required:
            await self.app(scope, receive, send)
            return
        await problem(
            send,
            400,
            "Idempotency-Key is missing",
            f"Idempotency-Key header is required for {scope['method']}",
        )

    async def _keyed(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A request with a valid key: read its body (413 if too long), then let a
        :class:`Responder` claim the key and answer."""
        try:
            request = await read_body(scope, receive, limit=self.max_request_body)
        except BodyTooLarge as e:
            log.info("%s %s: request body too large: 413", scope["method"], scope.get("path"))
            await problem(send, 413, "Request body too large", str(e))
            return
        if request is None:
            return  # the client is gone before its request was complete: nothing to run
        body, fingerprint = request
        keyed = IdempotencyRequest(self.scope_of(scope), key, fingerprint, secrets.token_hex(16))
        policy = Policy(self.ttl, self.lock_timeout, self.store_server_errors, self.max_stored_body)
        store = await self._store()
        await self._purge_if_due()
        await Responder(self.app, policy, store, scope, keyed, body).serve(receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the store at startup (failing the startup if it cannot be used), pass lifespan
        through, and close the store once the app's shutdown is complete. An app that returns
        or raises at once, before a lifespan message, does not speak lifespan: it is spoken
        for it."""
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

        try:
            await self.app(scope, app_receive, app_send)
        except Exception:
            if spoken:
                raise
            # It raised at once: an app that does not speak lifespan (``assert scope["type"] ==
            # "http"``), as the ASGI spec reads it. Let through, its exception made the server
            # send no more lifespan events: the store stayed open at shutdown.
            log.debug("the application does not support lifespan", exc_info=True)
        if spoken:
            return
        # The app returned or raised at once, ignoring lifespan: speak it so the store is
        # closed at the end.
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

    async def _store(self) -> IdempotencyStore:
        """The store: the one given as ``state``, else the one opened (once) from it."""
        if isinstance(self.state, IdempotencyStore):
            return self.state
        if self._opened is not None:
            return self._opened
        if self._open_lock is None:
            self._open_lock = anyio.Lock()
        async with self._open_lock:
            if self._opened is None:
                self._opened = await open_idempotency_store(self.state, clock=self.clock)
            return self._opened

    async def aclose(self) -> None:
        """Close the store it opened (idempotent; a store given as ``state`` is left open). A
        later keyed request opens it again."""
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.close()

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
