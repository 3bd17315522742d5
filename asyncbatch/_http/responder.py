"""One keyed request that the middleware let through: what it gets, and, if it owns its key,
the application's run, its response held back until it is stored.

A request that owns its key goes through the phases of :class:`Phase`, only forwards. The
store learns of each step that must outlive the process:

- the application fails or returns before it has started its response: the key is released
  (a retry runs it again: nothing was answered);
- the response's first part comes with more to follow (a streamed response): the record is
  marked *started* and is never released nor taken over again;
- the response is complete: it is stored (a 5xx, unless asked to, frees the key instead),
  then sent;
- the response cannot be stored whole (cut short by the client or the application, or larger
  than ``max_stored_body``): the record becomes *unstored* with the reason, and every repeat
  is answered 409 naming it, until the record expires. A response too large to store is still
  sent whole to its client, streamed once the record says so.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import anyio

from .. import _failpoints as failpoints
from .._ledger import IdempotencyRequest, IdempotencyStore, StoredResponse, UnstoredReason
from .request import ASGIApp, Message, Receive, Scope, Send, key_tag, problem, respond

__all__ = ["Phase", "Policy", "Responder", "storable", "unstored_detail"]

log = logging.getLogger("asyncbatch.middleware")

_REPLAYED: Final = (b"idempotent-replayed", b"true")
# Response headers that belong to the client who made the request: never stored nor replayed.
_NOT_STORED: Final = frozenset({b"set-cookie"})
# Send extensions that would deliver a body the middleware cannot capture: hidden from the app.
_UNCAPTURABLE: Final = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


class Phase(enum.Enum):
    """Where a request that owns its key is; it only moves down this list."""

    #: The application runs; nothing of its response yet. A failure here frees the key.
    RUNNING = "running"
    #: Its response has begun, and is held back until it is whole.
    STARTED = "started"
    #: Too large to store: what was held went out, the rest follows as it comes.
    PASSING = "passing"
    #: Complete: stored (or, a 5xx, the key freed) and sent.
    SENT = "sent"


@dataclass(frozen=True, slots=True)
class Policy:
    """The middleware's settings that a keyed request needs."""

    ttl: float
    lock_timeout: float
    store_server_errors: bool
    max_stored_body: int


def storable(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The response headers that may be stored and replayed: all but ``Set-Cookie`` (a cookie
    belongs to the client the response was made for; a record stored before this rule is
    filtered on replay as well)."""
    return [(n, v) for n, v in headers if n.lower() not in _NOT_STORED]


def unstored_detail(reason: str) -> str:
    """What a repeat of a key whose response was not stored is told, for ``reason``."""
    if reason == "too_large":
        why = "its response was larger than this server stores (max_stored_body)"
    elif reason == "unfinished":
        why = (
            "it started its response more than lock_timeout seconds ago and has not finished "
            "it (its server stopped while sending it, or is still sending it)"
        )
    else:
        why = (
            "its response was cut short (the client disconnected, or the application stopped "
            "in the middle of it) or could not be stored"
        )
    return (
        f"the request with this Idempotency-Key ran, but {why}, so there is no response to "
        "replay; it will not run again under this key: use a new key to run it again"
    )


@dataclass(eq=False)
class Responder:
    """One keyed request: decides what it gets, runs the app if it owns the key, stores the
    response before sending it."""

    app: ASGIApp
    policy: Policy
    store: IdempotencyStore
    scope: Scope
    #: The key, its scope, the request's fingerprint and its owner token (random).
    request: IdempotencyRequest
    body: bytes
    phase: Phase = Phase.RUNNING
    start: Message | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    body_given: bool = False

    @property
    def where(self) -> str:
        return f"{self.scope['method']} {self.scope.get('path', '')}"

    @property
    def tag(self) -> str:
        """What the logs show instead of the key."""
        return key_tag(self.request.scope, self.request.key)

    @property
    def kept(self) -> bool:
        """Whether the started response is one the store keeps: not a 5xx, unless asked to."""
        assert self.start is not None
        return int(self.start["status"]) < 500 or self.policy.store_server_errors

    # -- the decision ------------------------------------------------------------------------------

    async def serve(self, receive: Receive, send: Send) -> None:
        """Claim the key; replay, refuse, or run the app, as the store decides."""
        p = self.policy
        claim = await self.store.idempotency_claim(
            self.request, lock_timeout=p.lock_timeout, ttl=p.ttl
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
        elif claim.decision == "unstored":
            log.info(
                "%s: key %s ran, response not stored (%s): 409", self.where, self.tag, claim.why
            )
            await problem(
                send,
                409,
                "The response to this Idempotency-Key was not stored",
                unstored_detail(claim.why),
                extra={"reason": claim.why},
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

    # -- running the app ---------------------------------------------------------------------------

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
            await self.app(scope, app_receive, app_send)
        except BaseException:
            await self.app_failed()
            raise
        if self.phase in (Phase.RUNNING, Phase.STARTED):
            await self.app_returned_early(send)

    async def app_failed(self) -> None:
        """The app raised (or was cancelled): free the key it had not answered, or record that
        its started response was cut short. Never raises: the app's exception matters more."""
        if self.phase not in (Phase.RUNNING, Phase.STARTED):
            return
        started = self.phase is Phase.STARTED
        try:
            await (self.give_up("incomplete") if started else self.release())
        except Exception:  # an unreleased key is taken over after lock_timeout
            log.exception("could not record the end of key %s after the app raised", self.tag)
        else:
            log.debug("%s: the app raised; key %s %s", self.where, self.tag, self.ending)

    async def app_returned_early(self, send: Send) -> None:
        """The app returned without completing its response: as :meth:`app_failed`, then pass
        on what it sent (the server ends the exchange)."""
        started = self.phase is Phase.STARTED
        await (self.give_up("incomplete") if started else self.release())
        log.warning(
            "%s: the app returned without completing its response; key %s %s",
            self.where,
            self.tag,
            self.ending,
        )
        if self.start is not None:
            await send(self.start)
            body = b"".join(self.chunks)
            await send({"type": "http.response.body", "body": body, "more_body": True})

    @property
    def ending(self) -> str:
        """How the key ended up after an app's failure, for the logs."""
        if self.phase is Phase.RUNNING or not self.kept:
            return "released"
        return "kept: its response was not stored"

    # -- the app's send ----------------------------------------------------------------------------

    async def send(self, message: Message, send: Send) -> None:
        """The app's ``send``: hold the response back until it is complete and stored."""
        if self.phase in (Phase.PASSING, Phase.SENT):
            await send(message)  # a response too large to store, or trailers after it went out
        elif message["type"] == "http.response.start" and self.phase is Phase.RUNNING:
            self.start = message
            self.phase = Phase.STARTED
        elif message["type"] == "http.response.body" and self.phase is Phase.STARTED:
            await self.hold(message, send)
        else:
            await send(message)

    async def hold(self, message: Message, send: Send) -> None:
        """Take one body chunk: store and send a complete response, or mark it started."""
        chunk = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        first = not self.chunks
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size > self.policy.max_stored_body:
            await self.pass_through(more, send)
        elif not more:
            await self.finish(send)
        elif first and self.kept:
            await self.mark_started()

    async def mark_started(self) -> None:
        """Record that the response has begun: the key never runs again."""
        if not await self.store.idempotency_start(self.request):
            log.warning(
                "%s: key %s was taken over before its response began (longer than lock_timeout)",
                self.where,
                self.tag,
            )

    async def finish(self, send: Send) -> None:
        """Store the complete response, then send it."""
        assert self.start is not None
        response = StoredResponse(
            int(self.start["status"]),
            storable((bytes(n), bytes(v)) for n, v in self.start.get("headers", ())),
            b"".join(self.chunks),
        )
        await failpoints.ahit("middleware-executed")
        try:
            await self.store_response(response)
        except Exception:
            await self.store_failed()
        self.phase = Phase.SENT
        await send(self.start)
        await send({"type": "http.response.body", "body": response.body, "more_body": False})

    async def store_failed(self) -> None:
        """The complete response could not be stored (the store fails: a full disk, an
        outage). Its effects are done: record the key as not stored if the store still takes
        that (repeats get 409, never a second run), and let the response go out all the same.
        Raising instead made the server answer 500, which its client's retry (the same key)
        turned into a second run once ``lock_timeout`` had passed."""
        log.exception(
            "%s: the response for key %s could not be stored; it is sent unstored",
            self.where,
            self.tag,
        )
        await self.give_up_or_say("incomplete")

    async def give_up_or_say(self, reason: UnstoredReason) -> None:
        """:meth:`give_up`, logging rather than raising when the store fails: the response
        still goes to its client (a raise would reach the app's ``send``: a 500, and a retry)."""
        try:
            await self.give_up(reason)
        except Exception:
            log.exception(
                "%s: key %s could not be recorded as not stored: a repeat after "
                "lock_timeout runs the request again",
                self.where,
                self.tag,
            )

    async def pass_through(self, more: bool, send: Send) -> None:
        """A response larger than ``max_stored_body``: record so, then send what was held and
        let the rest through."""
        assert self.start is not None
        await self.give_up_or_say("too_large")
        self.phase = Phase.PASSING if more else Phase.SENT
        await send(self.start)
        body = b"".join(self.chunks)
        self.chunks.clear()
        await send({"type": "http.response.body", "body": body, "more_body": more})

    # -- the store ---------------------------------------------------------------------------------

    async def store_response(self, response: StoredResponse) -> None:
        """Store a complete response (a 5xx only if asked to: else the key is freed)."""
        p = self.policy
        if not self.kept:
            await self.release()
            log.debug("%s: a %d is not stored; key %s freed", self.where, response.status, self.tag)
            return
        stored = await self.store.idempotency_complete(self.request, response, ttl=p.ttl)
        if not stored:
            log.warning(
                "%s: key %s was taken over while this request ran (longer than lock_timeout): "
                "its response was not stored",
                self.where,
                self.tag,
            )

    async def give_up(self, reason: UnstoredReason) -> None:
        """The started response cannot be stored whole: record why, so that repeats get 409
        instead of a second run (a 5xx that is not kept frees the key instead). Completes even
        when cancelled."""
        if not self.kept:
            await self.release()
            return
        with anyio.CancelScope(shield=True):
            recorded = await self.store.idempotency_unstored(
                self.request, reason, ttl=self.policy.ttl
            )
        if recorded:
            log.warning(
                "%s: the response for key %s was not stored (%s): repeats get 409",
                self.where,
                self.tag,
                reason,
            )
        else:
            log.warning(
                "%s: key %s was taken over while this request ran (longer than lock_timeout)",
                self.where,
                self.tag,
            )

    async def release(self) -> None:
        """Free the key we own so it can be retried (even when cancelled)."""
        with anyio.CancelScope(shield=True):
            await self.store.idempotency_release(self.request)
