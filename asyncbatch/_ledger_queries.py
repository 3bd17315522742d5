"""What the operator commands read from the ledger (and ``retry``, their one write)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _sql as sql
from ._ledger_base import LedgerConnection
from ._procinfo import ProcessIdentity

__all__ = ["ItemInfo", "LedgerQueries", "LockInfo", "RunInfo"]


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A job lock as recorded in the ledger."""

    job: str
    owner: str
    pid: int | None
    host: str | None
    pid_start: str | None
    acquired_at: float
    expires_at: float

    @property
    def holder(self) -> ProcessIdentity:
        """The process that holds the lock."""
        return ProcessIdentity(self.host or "", self.pid or 0, self.pid_start)


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """One item as the operator commands show it."""

    key: str
    relpath: str
    size: int
    mtime_ns: int
    state: str
    #: Attempts that started, and how many of them the runner's death or stop cut short.
    attempts: int
    interrupted: int
    last_error: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One row of the run history."""

    id: int
    job: str
    owner: str
    pid: int | None
    host: str | None
    mode: str
    started_at: float
    finished_at: float | None
    seen: int
    done: int
    failed: int
    dead: int
    vanished: int
    exit_status: str | None


def _item(row: Sequence[Any]) -> ItemInfo:
    key, relpath, size, mtime_ns, state, attempts, interrupted, error, updated = row
    name = os.fsdecode(relpath) if isinstance(relpath, bytes) else str(relpath)
    return ItemInfo(key, name, size, mtime_ns, state, attempts, interrupted, error, updated)


class LedgerQueries(LedgerConnection):
    """Reads for ``status``, ``failures``, ``locks``, ``history``; and ``retry``."""

    async def meta(self, name: str) -> str | None:
        """A value from the ledger's ``meta`` table (``secret``, ``created_at``)."""
        async with self._read():
            value = await self._scalar(sql.GET_META, (name,))
        return None if value is None else str(value)

    async def jobs(self) -> list[str]:
        """Every job this ledger knows."""
        async with self._read():
            return [r[0] for r in await self._fetchall(sql.LIST_JOBS)]

    async def job_identity(self, job: str) -> str | None:
        """The identity mode recorded for ``job``, or ``None`` for an unknown job."""
        async with self._read():
            value = await self._scalar(sql.GET_JOB, (job,))
        return None if value is None else str(value)

    async def job_exists(self, job: str) -> bool:
        """Whether this ledger knows ``job``."""
        return await self.job_identity(job) is not None

    async def locks(self) -> list[LockInfo]:
        """Every job lock in the ledger."""
        async with self._read():
            return [LockInfo(*r) for r in await self._fetchall(sql.LOCK_LIST)]

    async def runners(self, job: str) -> list[tuple[str, int | None, str | None, bool, float]]:
        """``(owner, pid, host, shared, heartbeat_at)`` of the job's registered runners."""
        async with self._read():
            rows = await self._fetchall(sql.RUNNERS_OF_JOB, (job,))
        return [(r[0], r[1], r[2], bool(r[4]), r[6]) for r in rows]

    async def counts(self, job: str) -> dict[str, int]:
        """Items of the job by state; every state is present."""
        async with self._read():
            rows = await self._fetchall(sql.COUNTS, (job,))
        counts = dict.fromkeys(sql.STATES, 0)
        counts.update(dict(rows))
        return counts

    async def oldest_waiting(self, job: str) -> float | None:
        """When the oldest pending or failed item was first registered."""
        async with self._read():
            value = await self._scalar(sql.OLDEST_WAITING, (job,))
        return None if value is None else float(value)

    async def next_retry_at(self, job: str) -> float | None:
        """When the earliest failed item of the job becomes due, or ``None``."""
        async with self._read():
            value = await self._scalar(sql.NEXT_RETRY_AT, (job,))
        return None if value is None else float(value)

    async def failures(self, job: str, limit: int) -> list[ItemInfo]:
        """Failed and dead items, the most recent first."""
        async with self._read():
            rows = await self._fetchall(sql.FAILURES, (job, limit))
        return [_item(r) for r in rows]

    async def find_items(self, job: str, key_or_relpath: str) -> list[ItemInfo]:
        """Items whose key is, or whose relpath is, ``key_or_relpath``."""
        async with self._read():
            rows = []
            if key_or_relpath.isascii():  # keys are ASCII; a non-UTF-8 name cannot be bound
                rows += await self._fetchall(sql.ITEM_BY_KEY, (job, key_or_relpath))
            rows += await self._fetchall(sql.ITEMS_BY_RELPATH, (job, os.fsencode(key_or_relpath)))
        return [_item(r) for r in rows]

    async def runs(self, job: str, limit: int = 50) -> list[RunInfo]:
        """The job's run history, the most recent first."""
        async with self._read():
            return [RunInfo(*r) for r in await self._fetchall(sql.RUNS_OF_JOB, (job, limit))]

    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        """Put failed (and with ``dead``, dead) items back to pending with fresh attempts.

        ``keys=None`` retries every such item of the job. Returns how many were reset.
        """
        states = "'failed', 'dead'" if dead else "'failed'"

        def reset(conn: sqlite3.Connection, now: float) -> int:
            if keys is None:
                return conn.execute(sql.RETRY_ALL.format(states=states), (now, job)).rowcount
            return sum(
                conn.execute(sql.RETRY_ITEM.format(states=states), (now, job, key)).rowcount
                for key in keys
            )

        return await self._transact(reset, self.clock())
