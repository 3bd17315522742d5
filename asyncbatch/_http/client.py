"""Outbound HTTP for handlers: ``ctx.http``, an ``httpx.AsyncClient``-like view per item.

Every unsafe request (POST, PUT, PATCH, DELETE by default) carries an ``Idempotency-Key``::

    HMAC-SHA256(secret, job NUL item key NUL call identity)

where the secret is stored in the ledger (keys cannot be guessed from outside), and the call
identity is ``idempotency_key="step"`` when the caller names the step, else the call's ordinal
within this handler invocation plus method and URL. So the same logical call in a later
attempt of the same item, even in another process after a crash, sends the same key; two items
never share one; two different calls in one handler get different ones. A caller's own
``Idempotency-Key`` header is kept.

Requests that carry a key (and safe methods) are retried on connection errors, timeouts, 5xx,
409 and 429 (honouring ``Retry-After``) with capped, jittered backoff, reusing the key; every
wait, a server's ``Retry-After`` included, is at most ``http_backoff_max`` seconds. 422 on
a keyed request raises :class:`IdempotencyKeyMismatchError`, which fails the item at once.
Redirects are followed here, one hop at a time: each hop gets a key of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from .. import _failpoints as failpoints
from .._exceptions import IdempotencyKeyMismatchError

if TYPE_CHECKING:  # httpx costs ~0.2 s to import: only a handler that calls ctx.http pays it
    import http.cookiejar

    import httpx

__all__ = ["HTTPSettings", "IdempotencyKeys", "ItemHTTP", "SharedClient", "derive_idempotency_key"]

log = logging.getLogger("asyncbatch.http")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
_SEND_KEYS = frozenset({"auth", "follow_redirects"})
#: SHA-256's block size: HMAC pads (or first hashes) its key to it; and the XOR of each byte
#: with HMAC's ipad and opad, as translation tables.
_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def derive_idempotency_key(secret: bytes, job: str, item_key: str, call: str) -> str:
    """The ``Idempotency-Key`` for one logical call of one item (64 hex characters): the
    HMAC-SHA256 of job, item key and call under the ledger's secret (see
    :class:`IdempotencyKeys`, which a run keeps)."""
    return IdempotencyKeys(secret, job).derive(item_key, call)


class IdempotencyKeys:
    """The idempotency keys of one secret and job (a run's, in :class:`HTTPSettings`): the
    HMAC's key schedule made once.

    HMAC-SHA256 (RFC 2104) from two SHA-256 states, the key XOR ipad and XOR opad already
    hashed, copied for each key: in a run whose items each start a command, OpenSSL's
    one-shot HMAC cost ~15 us of CPU a call (its caches cold between items), these copies ~7.
    """

    __slots__ = ("_inner", "_outer", "_prefix")

    def __init__(self, secret: bytes, job: str) -> None:
        key = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))
        self._prefix = f"{job}\0"

    def derive(self, item_key: str, call: str) -> str:
        """The ``Idempotency-Key`` of the call ``call`` of the item ``item_key``."""
        message = f"{self._prefix}{item_key}\0{call}".encode("utf-8", "surrogateescape")
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class SharedClient:
    """The one ``httpx.AsyncClient`` of a run (connection pooling), created on first use.

    ``given`` may be a client (used as is, never closed here), a transport (wrapped in a client
    this object owns) or ``None`` (a default client this object owns).
    """

    def __init__(self, given: httpx.AsyncClient | httpx.AsyncBaseTransport | None) -> None:
        self._given = given
        self._client: httpx.AsyncClient | None = None
        self._owned = False

    def get(self) -> httpx.AsyncClient:
        """The client, created now if this is the first call."""
        import httpx

        if self._client is None:
            if isinstance(self._given, httpx.AsyncClient):
                self._client = self._given
            else:
                self._client = httpx.AsyncClient(
                    transport=self._given, timeout=30.0, cookies=_no_cookies()
                )
                self._owned = True
        return self._client

    async def aclose(self) -> None:
        """Close the client if this object created it."""
        if self._client is not None and self._owned:
            await self._client.aclose()
        self._client = None


def _no_cookies() -> http.cookiejar.CookieJar:
    """A cookie jar that keeps nothing, for the client a run makes.

    A cookie kept from one answer would go out with every later request of the run: the
    retry of an item would not be the request its first attempt sent (an
    ``IdempotencyMiddleware`` names the caller by its ``Cookie`` header, so a load balancer's
    affinity cookie or a session cookie set by the first answer made the retry run again
    under a new namespace), another item's requests would carry it, and a process started
    after a crash would send none.
    """
    import http.cookiejar  # here: with http.client and email, ~15 ms a run without ctx.http

    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings:
    """How a batch's HTTP calls behave; shared by every item of one run (read-only)."""

    shared: SharedClient
    secret: bytes
    job: str
    unsafe_methods: frozenset[str]
    retries: int = 4
    backoff: float = 0.25
    backoff_max: float = 10.0
    sleep: Callable[[float], Any] = anyio.sleep
    jitter: Callable[[], float] = random.random
    #: The run's idempotency keys (of ``secret`` and ``job``).
    keys: IdempotencyKeys = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", IdempotencyKeys(self.secret, self.job))


def _redacted(url: httpx.URL) -> str:
    """An URL fit for logs: no query string, no credentials."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import email.utils  # only for a Retry-After given as an HTTP date

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ItemHTTP:
    """The HTTP client view of one item's attempt: same call signatures as ``httpx.AsyncClient``.

    Extra keyword on every method: ``idempotency_key="step-name"`` names the call, which keeps
    its key stable even if the handler's calls change order between attempts.
    """

    __slots__ = ("_calls", "_item_key", "_settings")

    def __init__(self, settings: HTTPSettings, item_key: str) -> None:
        self._settings = settings
        self._item_key = item_key
        self._calls = 0

    def _prepare(
        self, method: str, url: httpx.URL | str, idempotency_key: str | None, kwargs: Any
    ) -> tuple[httpx.Request, dict[str, Any], str | None]:
        """The request, the keywords for ``send``, and the call identity its key was derived
        from (``None``: the caller set its own key, or the method gets none)."""
        s = self._settings
        method = method.upper()
        self._calls += 1
        send = {k: kwargs.pop(k) for k in list(kwargs) if k in _SEND_KEYS}
        request = s.shared.get().build_request(method, url, **kwargs)
        call = None
        if "Idempotency-Key" not in request.headers and method in s.unsafe_methods:
            call = idempotency_key or f"{self._calls}:{method}:{request.url}"
            request.headers["Idempotency-Key"] = s.keys.derive(self._item_key, call)
        return request, send, call

    def _redirected(self, request: httpx.Request, call: str | None, hop: int) -> httpx.Request:
        """The request of redirect ``hop`` (1 for the first), as httpx built it, with a key of
        its own: the key of the call it follows would name another request (the server behind
        an ``IdempotencyMiddleware`` answers 422). The hop's key is derived from the call's
        identity, the hop, its method and URL, the same in every attempt; a method that gets
        no key (a 303 turns a POST into a GET) sends none. A key the caller set goes on
        unchanged, as httpx sends it."""
        s = self._settings
        if call is None:
            return request
        request.headers.pop("Idempotency-Key", None)
        if request.method in s.unsafe_methods:
            hop_call = f"{call}\0redirect {hop}:{request.method}:{request.url}"
            request.headers["Idempotency-Key"] = s.keys.derive(self._item_key, hop_call)
        return request

    async def _pause(self, attempt: int, response: httpx.Response | None) -> None:
        s = self._settings
        delay = min(s.backoff_max, s.backoff * (2**attempt))
        delay = delay / 2 + delay / 2 * s.jitter()
        if response is not None and (after := _retry_after(response)) is not None:
            delay = min(max(after, delay), s.backoff_max)  # a Retry-After is capped too
        await s.sleep(delay)

    @staticmethod
    def _check(request: httpx.Request, response: httpx.Response) -> None:
        if response.status_code == 422 and "Idempotency-Key" in request.headers:
            raise IdempotencyKeyMismatchError(
                f"{request.method} {_redacted(request.url)}: the server says this key was used "
                "with a different request (HTTP 422)"
            )

    async def _follow(
        self, request: httpx.Request, send: dict[str, Any], call: str | None, *, stream: bool
    ) -> httpx.Response:
        """Send the request (with retries), and follow its redirects when asked (the
        ``follow_redirects`` keyword, else the client's setting) one hop at a time, each hop
        sent with retries and a key of its own (:meth:`_redirected`)."""
        import httpx

        client = self._settings.shared.get()
        follow = send.pop("follow_redirects", client.follow_redirects)
        history: list[httpx.Response] = []
        while True:
            retryable = "Idempotency-Key" in request.headers or request.method in SAFE_METHODS
            hop_send = {**send, "follow_redirects": False}
            response = await self._send(request, hop_send, retryable, stream=stream)
            response.history = list(history)
            redirect = response.next_request
            if not follow or redirect is None:
                return response
            try:
                await response.aread()  # as httpx does before a hop
            finally:
                await response.aclose()
            history.append(response)
            if len(history) > client.max_redirects:
                message = "Exceeded maximum allowed redirects."  # httpx's words
                raise httpx.TooManyRedirects(message, request=redirect)
            request = self._redirected(redirect, call, len(history))
            # The auth of the call was applied to its first request; httpx carries its header
            # on to the same origin only, and so do the hops (no auth flow of their own).
            send = {**send, "auth": httpx.Auth()}

    async def _send(
        self, request: httpx.Request, send: dict[str, Any], retryable: bool, *, stream: bool
    ) -> httpx.Response:
        import httpx

        s = self._settings
        attempts = s.retries + 1 if retryable else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await s.shared.get().send(request, stream=True, **send)
                await failpoints.ahit("http-sent")  # sent; the answer not read yet
                if not stream:
                    try:
                        await response.aread()
                    except BaseException:
                        await response.aclose()
                        raise
            except httpx.TransportError as e:  # connect errors, timeouts, dropped connections
                if last or isinstance(e, httpx.StreamConsumed):
                    raise
                log.info(
                    "retrying %s %s after %s (attempt %d)",
                    request.method,
                    _redacted(request.url),
                    type(e).__name__,
                    attempt + 1,
                )
                await self._pause(attempt, None)
                continue
            replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
            if response.status_code not in RETRY_STATUSES or last or replayed:
                # A replayed answer is what the server stored for this key: asking again
                # brings the same answer back.
                self._check(request, response)
                return response
            if stream:
                await response.aclose()
            log.info(
                "retrying %s %s after HTTP %d (attempt %d)",
                request.method,
                _redacted(request.url),
                response.status_code,
                attempt + 1,
            )
            await self._pause(attempt, response)
        raise AssertionError("unreachable")  # pragma: no cover

    async def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request like ``httpx.AsyncClient.request``, with idempotency and retries."""
        request, send, call = self._prepare(method, url, idempotency_key, kwargs)
        return await self._follow(request, send, call, stream=False)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[httpx.Response]:
        """Like ``httpx.AsyncClient.stream``: retries happen before the body is handed over."""
        request, send, call = self._prepare(method, url, idempotency_key, kwargs)
        response = await self._follow(request, send, call, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def get(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``GET`` (safe: no key, retried on transient failures)."""
        return await self.request("GET", url, **kwargs)

    async def head(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``HEAD``."""
        return await self.request("HEAD", url, **kwargs)

    async def options(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``OPTIONS``."""
        return await self.request("OPTIONS", url, **kwargs)

    async def post(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``POST`` with an ``Idempotency-Key``."""
        return await self.request("POST", url, **kwargs)

    async def put(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``PUT`` with an ``Idempotency-Key``."""
        return await self.request("PUT", url, **kwargs)

    async def patch(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``PATCH`` with an ``Idempotency-Key``."""
        return await self.request("PATCH", url, **kwargs)

    async def delete(self, url: httpx.URL | str, **kwargs: Any) -> httpx.Response:
        """``DELETE`` with an ``Idempotency-Key``."""
        return await self.request("DELETE", url, **kwargs)
