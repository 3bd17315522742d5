"""The idempotency store of :class:`~asyncbatch.IdempotencyMiddleware`: its interface, the
record it keeps per key, and the decision taken on it, whatever holds the records.

:class:`IdempotencyStore` is all the middleware sees of the ledger (as httpx's client sees
only its transport): the six operations of a keyed request and ``close``. Both ledger
backends implement it (:class:`~asyncbatch._ledger.base.Ledger` extends it); a test can give
the middleware a store of its own. :func:`decide_idempotency` is the backend-neutral decision
a store takes, inside one transaction, on the :class:`IdempotencyRecord` it read.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from .rows import RowValue, column
from .types import IdempotencyClaim, IdempotencyRequest, StoredResponse, UnstoredReason

__all__ = ["IdempotencyRecord", "IdempotencyStore", "decide_idempotency", "encode_headers"]


def encode_headers(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """Response headers as stored: a JSON list of ``[name, value]`` latin-1 strings."""
    return json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers])


@dataclass(frozen=True, slots=True)
class IdempotencyRecord(RowValue):
    """What a store holds for a key: the request's ``fingerprint`` and the record's ``state``,
    ``running`` (its request runs), ``started`` (its response has begun), ``done`` (its
    response is stored: ``status``, ``headers`` as :func:`encode_headers` makes them, ``body``)
    or ``unstored`` (its request ran, its response could not be stored: ``headers`` holds why).
    While ``running`` or ``started``, ``headers`` holds the owning request's token. Times are
    the store's (the server's clock on PostgreSQL)."""

    fingerprint: str
    state: str
    status: int | None
    headers: str | None
    body: bytes | None
    locked_until: float = field(metadata=column(time=True))
    expires_at: float = field(metadata=column(time=True))

    @property
    def response(self) -> StoredResponse | None:
        """The stored response of a ``done`` record; ``None`` for any other."""
        if self.state != "done" or self.status is None or self.headers is None:
            return None
        pairs = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(self.headers)]
        return StoredResponse(int(self.status), pairs, bytes(self.body or b""))

    @property
    def reason(self) -> str:
        """Why an ``unstored`` record has no response (an :data:`UnstoredReason`); else ``""``."""
        return (self.headers or "") if self.state == "unstored" else ""


def decide_idempotency(fingerprint: str, record: IdempotencyRecord, now: float) -> IdempotencyClaim:
    """What a keyed request with ``fingerprint`` gets when its key already has ``record``
    (``now`` in the record's clock).

    An expired record is as good as none; a different request under the key is a mismatch; a
    stored response is replayed; an unstored one is ``"unstored"``; a request younger than its
    lock is a conflict. Past its lock, a request that had started its response is
    ``"unstored"`` (``"unfinished"``): it may have had its effects, so it never runs again; one
    that had not was abandoned (its process died), and the key is taken over.
    """
    if record.expires_at < now:
        return IdempotencyClaim("run", "expired")
    if record.fingerprint != fingerprint:
        return IdempotencyClaim("mismatch")
    response = record.response
    if response is not None:
        return IdempotencyClaim("replay", stored=response)
    if record.state == "unstored":
        return IdempotencyClaim("unstored", record.reason)
    if record.locked_until >= now:
        return IdempotencyClaim("conflict")
    if record.state == "started":
        return IdempotencyClaim("unstored", "unfinished")
    return IdempotencyClaim("run", "abandoned")


class IdempotencyStore(abc.ABC):
    """Where :class:`~asyncbatch.IdempotencyMiddleware` keeps one record per key: each
    operation is one transaction, shielded from cancellation, holding no lock after it returns.

    Open the ledger's with :func:`asyncbatch._ledger.open_idempotency_store`; close it with
    :meth:`close` or ``async with``.
    """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the store, after the operation in flight (shielded: always completes)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def idempotency_claim(
        self, request: IdempotencyRequest, *, lock_timeout: float, ttl: float
    ) -> IdempotencyClaim:
        """Decide, in one transaction, what a request with this key gets (see
        :func:`decide_idempotency`).

        ``"run"`` makes the request's token the key's owner for ``lock_timeout`` seconds: only
        it may start, complete, give up or release the record. Concurrent requests with one
        key, from any process sharing the store, never both get ``"run"`` within
        ``lock_timeout``, and a key whose record was started never gets ``"run"`` again until
        the record expires. Times are the store's (the server's clock on PostgreSQL).
        """

    @abc.abstractmethod
    async def idempotency_start(self, request: IdempotencyRequest) -> bool:
        """Mark the running record the request owns as started (its response has begun): from
        now on it is never released nor taken over. ``False`` if it was taken over meanwhile.
        Marking a started record again is harmless (``True``)."""

    @abc.abstractmethod
    async def idempotency_complete(
        self, request: IdempotencyRequest, response: StoredResponse, *, ttl: float
    ) -> bool:
        """Store the response of the running or started record the request owns, kept for
        ``ttl`` seconds; ``False`` if it was taken over meanwhile (nothing is stored then)."""

    @abc.abstractmethod
    async def idempotency_unstored(
        self, request: IdempotencyRequest, reason: UnstoredReason, *, ttl: float
    ) -> bool:
        """Record that the running or started record the request owns has a response that
        could not be stored, for ``reason``; kept for ``ttl`` seconds, during which a repeat
        gets ``"unstored"`` with that reason. ``False`` if it was taken over meanwhile."""

    @abc.abstractmethod
    async def idempotency_release(self, request: IdempotencyRequest) -> None:
        """Delete the running record the request owns, so the key can be used again (a
        started record is not released: its request may have had its effects)."""

    @abc.abstractmethod
    async def idempotency_purge(self) -> int:
        """Delete every expired record; return how many."""
