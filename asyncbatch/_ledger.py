"""The ledger: the only state that outlives a run, in one SQLite file through aiosqlite.

Guarantees:

- WAL mode, ``busy_timeout``, ``isolation_level=None`` and an explicit ``BEGIN IMMEDIATE`` for
  every transaction that writes; transactions are serialised per connection and shielded from
  cancellation, so none is ever left open (a cancelled caller still sees its transaction either
  committed or rolled back).
- A file that is not an asyncbatch ledger, or has a newer schema, is refused before anything is
  written to it. A new state file and its ``-wal``/``-shm`` are created with mode 0600.
- sqlite3 errors leave this module as :class:`LedgerError` with the original as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiosqlite
import anyio

from . import _sql as sql
from ._exceptions import (
    ConfigurationError,
    JobLockedError,
    LedgerError,
    NotALedgerError,
    SchemaVersionError,
)
from ._fsinfo import network_filesystem
from ._procinfo import ProcessIdentity, holder_is_alive

__all__ = ["ClaimedRow", "ItemInfo", "Ledger", "LockInfo", "Outcome", "RunInfo"]

_SQLITE_HEADER = b"SQLite format 3\x00"
Durability = Literal["normal", "full"]


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


class ClaimedRow(NamedTuple):
    """What a claim statement returned for one item."""

    key: str
    state: str
    fence: int
    attempts: int
    post_action: str | None = None
    relpath: bytes = b""
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """One item as the operator commands show it."""

    key: str
    relpath: str
    size: int
    mtime_ns: int
    state: str
    attempts: int
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


class Outcome(NamedTuple):
    """A finished attempt, to be committed: ``state`` is done, failed, dead or vanished."""

    key: str
    fence: int
    state: str
    error: str | None = None
    next_attempt_at: float | None = None
    post_action: str | None = None


def _check_state_path(path: Path, *, create: bool) -> bool:
    """Refuse a state path we must not open; return whether the file exists."""
    if path.is_dir():
        raise ConfigurationError.bad_value("state", str(path), "a file path, not a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigurationError(
            f"state {str(path)!r}: directory {str(parent)!r} does not exist; create it first"
        )
    if fs := network_filesystem(parent):
        raise ConfigurationError(
            f"state {str(path)!r} is on a {fs} network filesystem: SQLite's WAL needs shared "
            "memory on one host; put the state on a local disk or use a postgresql:// state"
        )
    if not path.exists():
        if not create:
            raise ConfigurationError(f"state {str(path)!r} does not exist")
        return False
    with path.open("rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head and head != _SQLITE_HEADER:
        raise NotALedgerError(f"state {str(path)!r} is not a SQLite database; it was not touched")
    return bool(head)


class Ledger:
    """An open SQLite ledger. Use :meth:`open`; close with :meth:`close` or ``async with``."""

    def __init__(
        self, db: aiosqlite.Connection, path: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        self.path = path
        self.clock = clock
        self._lock = anyio.Lock()
        self._claim_sql: dict[int, str] = {}  # claim statement text by chunk size

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        create: bool = True,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> Ledger:
        """Open (and with ``create``, create or migrate) the ledger at ``path``.

        Raises :class:`ConfigurationError` for an unusable path, :class:`NotALedgerError` for a
        file that is not ours and :class:`SchemaVersionError` for a newer schema; in every such
        case the file is left byte-for-byte as it was.
        """
        path = Path(path)
        existed = _check_state_path(path, create=create)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        try:
            db = await aiosqlite.connect(path, isolation_level=None, cached_statements=256)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open state {str(path)!r}: {e}") from e
        ledger = cls(db, path, clock)
        try:
            await ledger._prepare(existed, durability, busy_timeout, migrate=create)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        return ledger

    async def _prepare(
        self, existed: bool, durability: Durability, busy_timeout: float, *, migrate: bool
    ) -> None:
        db, name = self._db, str(self.path)
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            objects = await self._scalar(sql.SCHEMA_OBJECTS)
            app_id = await self._scalar("PRAGMA application_id")
            version = await self._scalar("PRAGMA user_version")
        except sqlite3.DatabaseError as e:
            raise NotALedgerError(
                f"state {name!r} is not a usable SQLite database ({e}); it was not touched"
            ) from e
        if objects and app_id != sql.APPLICATION_ID:
            raise NotALedgerError(
                f"state {name!r} is a SQLite database of another application; it was not touched"
            )
        if version > sql.SCHEMA_VERSION:
            raise SchemaVersionError(name, version, sql.SCHEMA_VERSION)
        if existed and not objects and not migrate:
            raise NotALedgerError(f"state {name!r} is an empty database, not a ledger")
        with self._errors():
            await db.execute("PRAGMA journal_mode = WAL")
            sync = "FULL" if durability == "full" else "NORMAL"
            await db.execute(f"PRAGMA synchronous = {sync}")
            # A ledger's B-tree is touched all over by claims and commits: keep up to 64 MiB of
            # it in SQLite's page cache instead of re-reading pages with pread (allocated on use).
            await db.execute("PRAGMA cache_size = -65536")
            if version < sql.SCHEMA_VERSION:
                if not migrate:
                    raise LedgerError(
                        f"state {name!r} has schema version {version}; run 'asyncbatch run' "
                        "once to upgrade it"
                    )
                await self._migrate()

    async def _migrate(self) -> None:
        async with self._write() as db:
            version = await self._scalar("PRAGMA user_version")
            while version < sql.SCHEMA_VERSION:
                for statement in sql.MIGRATIONS[version].split(";\n"):
                    if statement.strip():
                        await db.execute(statement)
                version += 1
            await db.execute(f"PRAGMA application_id = {sql.APPLICATION_ID}")
            await db.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
            await db.execute(sql.PUT_META, ("secret", secrets.token_hex(32)))
            await db.execute(sql.PUT_META, ("created_at", repr(self.clock())))

    async def close(self) -> None:
        """Close the connection (shielded: always completes)."""
        with anyio.CancelScope(shield=True):
            await self._db.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise LedgerError(f"state {str(self.path)!r}: {e}") from e

    async def _scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(query, params) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def _fetchall(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._db.execute_fetchall(query, params))

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, serialised and shielded from cancellation."""
        async with self._lock:
            with anyio.CancelScope(shield=True), self._errors():
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            with self._errors():
                yield self._db

    # -- meta and jobs ---------------------------------------------------------------------------

    async def meta(self, name: str) -> str | None:
        """A value from the ledger's ``meta`` table (``secret``, ``created_at``)."""
        async with self._read():
            value = await self._scalar(sql.GET_META, (name,))
        return None if value is None else str(value)

    async def ensure_job(self, job: str, identity: str) -> None:
        """Record the job's identity mode; refuse a different one for an existing job."""
        async with self._write() as db:
            await db.execute(sql.ADD_JOB, (job, identity, self.clock()))
            recorded = await self._scalar(sql.GET_JOB, (job,))
        if recorded != identity:
            raise ConfigurationError(
                f"job {job!r} uses identity={recorded!r} in state {str(self.path)!r}, not "
                f"{identity!r}: keep the identity or use another --job"
            )

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
        async with self._read():
            return await self._scalar(sql.GET_JOB, (job,)) is not None

    # -- the job lock and runners ------------------------------------------------------------------

    @staticmethod
    def _lock_info(row: Sequence[Any]) -> LockInfo:
        return LockInfo(*row)

    async def acquire_lock(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool
    ) -> LockInfo | None:
        """Take the job lock (or, ``shared``, check that no exclusive runner holds it).

        A lock whose holder is gone is taken over at once: same host and a dead pid (or a pid
        now used by another process), or an expired heartbeat. Returns the stale lock that was
        taken over, if any. Raises :class:`JobLockedError` while a live runner holds it.
        """
        now = self.clock()
        async with self._write() as db:
            row = await self._fetchone(sql.LOCK_GET, (job,))
            stale: LockInfo | None = None
            if row is not None:
                held = self._lock_info(row)
                if held.expires_at >= now and holder_is_alive(held.holder, me=me) is not False:
                    raise JobLockedError(job, held.pid, held.host, _iso(held.acquired_at))
                stale = held
            if not shared:
                for runner in await self._fetchall(sql.RUNNERS_OF_JOB, (job,)):
                    if runner[4] and self._runner_alive(runner, now, me):
                        raise JobLockedError(job, runner[1], runner[2], _iso(runner[5]))
                lock = (owner, me.pid, me.host, me.pid_start, now, now + ttl)
                if stale is None:
                    await db.execute(sql.LOCK_INSERT, (job, *lock))
                else:
                    await db.execute(sql.LOCK_TAKE_OVER, (*lock, job, stale.owner))
            elif stale is not None:
                await db.execute(sql.LOCK_RELEASE, (job, stale.owner))
        return stale

    async def _fetchone(self, query: str, params: Sequence[Any]) -> Any:
        async with self._db.execute(query, params) as cur:
            return await cur.fetchone()

    @staticmethod
    def _runner_alive(runner: Sequence[Any], now: float, me: ProcessIdentity) -> bool:
        _, pid, host, pid_start, _, _, _, expires_at = runner
        if expires_at < now:
            return False
        return holder_is_alive(ProcessIdentity(host or "", pid or 0, pid_start), me=me) is not False

    async def register_runner(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool, mode: str
    ) -> int:
        """Record this runner (for the liveness of its leases) and open a run history row."""
        now = self.clock()
        async with self._write() as db:
            await db.execute(
                sql.RUNNER_ADD,
                (owner, job, me.pid, me.host, me.pid_start, int(shared), now, now, now + ttl),
            )
            async with db.execute(sql.RUN_START, (job, owner, me.pid, me.host, mode, now)) as cur:
                return cur.lastrowid or 0

    async def reap_stale_runners(self, job: str, me: ProcessIdentity) -> int:
        """Hand the leased items of runners that are gone back to the ledger.

        Returns how many items were released. A full scan of the job's items, done only when a
        runner is found gone (after a crash).
        """
        released = 0
        async with self._write() as db:
            now = self.clock()
            for runner in await self._fetchall(sql.RUNNERS_OF_JOB, (job,)):
                if self._runner_alive(runner, now, me):
                    continue
                async with db.execute(sql.REAP_ITEMS, (now, job, runner[0])) as cur:
                    released += max(cur.rowcount, 0)
                await db.execute(sql.RUNNER_REMOVE, (runner[0],))
        return released

    async def heartbeat(
        self,
        job: str,
        owner: str,
        ttl: float,
        leases: Sequence[tuple[str, int]],
        *,
        holds_lock: bool,
    ) -> bool:
        """Extend this runner's lock, liveness and item leases by ``ttl``.

        Returns ``False`` when the lock or the runner record was taken from us: the caller
        must stop.
        """
        now = self.clock()
        until = now + ttl
        async with self._write() as db:
            async with db.execute(sql.RUNNER_EXTEND, (now, until, owner)) as cur:
                alive = cur.rowcount == 1
            if holds_lock:
                async with db.execute(sql.LOCK_EXTEND, (until, job, owner)) as cur:
                    alive = alive and cur.rowcount == 1
            if alive and leases:
                await db.executemany(
                    sql.EXTEND_LEASE, [(until, job, key, owner, fence) for key, fence in leases]
                )
        return alive

    async def release_runner(
        self,
        job: str,
        owner: str,
        *,
        holds_lock: bool,
        run_id: int,
        totals: tuple[int, int, int, int, int],
        exit_status: str,
    ) -> None:
        """Remove this runner's records and finish its run history row."""
        async with self._write() as db:
            await db.execute(sql.RUNNER_REMOVE, (owner,))
            if holds_lock:
                await db.execute(sql.LOCK_RELEASE, (job, owner))
            await db.execute(sql.RUN_FINISH, (self.clock(), *totals, exit_status, run_id))

    async def locks(self) -> list[LockInfo]:
        """Every job lock in the ledger."""
        async with self._read():
            return [self._lock_info(r) for r in await self._fetchall(sql.LOCK_LIST)]

    async def force_unlock(self, job: str, owner: str) -> bool:
        """Delete a job lock held by ``owner``; ``False`` when it was not held by it."""
        async with self._write() as db, db.execute(sql.LOCK_RELEASE, (job, owner)) as cur:
            return cur.rowcount == 1

    # -- claims ---------------------------------------------------------------------------------

    async def claim_scanned(
        self,
        job: str,
        owner: str,
        lease: float,
        rows: Sequence[tuple[str, bytes, int, int, int]],
    ) -> list[ClaimedRow]:
        """Register scanned entries ``(key, relpath, size, mtime_ns, inode)`` and lease them.

        One statement: new entries are inserted leased to ``owner``; pending, vanished, failed
        (due) and expired entries are leased with ``fence`` and ``attempts`` incremented.
        Finished ones cost an index probe and return nothing, except dead rows and finished
        rows with a post-commit action, which come back so the caller can count or finish them.
        """
        if not rows:
            return []
        now = self.clock()
        params: list[Any] = [job, owner, now + lease, now]
        for row in rows:
            params.extend(row)
        query = self._claim_sql.get(len(rows))
        if query is None:
            query = self._claim_sql[len(rows)] = sql.claim_scanned(len(rows))
        keys = json.dumps([row[0] for row in rows])
        async with self._write() as db:
            await db.execute(query, params)
            async with db.execute(sql.CLAIMED_IN_CHUNK, (job, keys, owner, now)) as cur:
                found = await cur.fetchone()
        return [ClaimedRow(*r) for r in json.loads(found[0])] if found else []

    async def claim_waiting(
        self, job: str, owner: str, lease: float, limit: int
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` items waiting in the ledger: pending, or failed and due."""
        now = self.clock()
        async with self._write() as db:
            result = await db.execute_fetchall(
                sql.CLAIM_WAITING, (job, owner, now + lease, now, limit)
            )
        return [
            ClaimedRow(r[0], "running", r[5], r[6], r[7], r[1], r[2], r[3], r[4]) for r in result
        ]

    async def next_retry_at(self, job: str) -> float | None:
        """When the earliest failed item of the job becomes due, or ``None``."""
        async with self._read():
            value = await self._scalar(sql.NEXT_RETRY_AT, (job,))
        return None if value is None else float(value)

    async def waiting_count(self, job: str) -> int:
        """How many items of the job wait (pending, or failed and waiting for a retry)."""
        async with self._read():
            return int(await self._scalar(sql.WAITING_COUNT, (job,)))

    # -- outcomes -------------------------------------------------------------------------------

    async def commit_outcomes(self, job: str, owner: str, outcomes: Sequence[Outcome]) -> set[str]:
        """Record finished attempts in one transaction; return the keys whose lease was lost.

        An item is done when, and only when, this transaction commits. A row whose owner or
        fence changed (another runner took the lease) is not touched and its key is returned.
        """
        now = self.clock()
        done = [o for o in outcomes if o.state == "done"]
        other = [
            (o.state, o.next_attempt_at, o.error, o.post_action, now, job, o.key, owner, o.fence)
            for o in outcomes
            if o.state != "done"
        ]
        changed = 0
        async with self._write() as db:
            for post_action, group in _by_post_action(done).items():
                keys = json.dumps([o.key for o in group])
                pairs = json.dumps([f"{o.key} {o.fence}" for o in group])
                async with db.execute(
                    sql.MARK_DONE, (job, owner, keys, pairs, post_action, now)
                ) as cur:
                    changed += cur.rowcount
            if other:
                async with db.executemany(sql.MARK_FAILED, other) as cur:
                    changed += cur.rowcount
            if changed == len(outcomes):
                return set()
            rows = await db.execute_fetchall(
                sql.LEASE_STATE, (job, json.dumps([o.key for o in outcomes]))
            )
        mine = {o.key: o for o in outcomes}
        return {
            key
            for key, row_owner, fence, state in rows
            if row_owner != owner or fence != mine[key].fence or state == "running"
        } | (set(mine) - {r[0] for r in rows})

    async def release_items(
        self, job: str, owner: str, items: Sequence[tuple[str, int, bool]]
    ) -> None:
        """Give leased items back (``(key, fence, started)``); unstarted ones lose the attempt."""
        if not items:
            return
        now = self.clock()
        async with self._write() as db:
            await db.executemany(
                sql.RELEASE_ITEM,
                [
                    (0 if started else 1, now, job, key, owner, fence)
                    for key, fence, started in items
                ],
            )

    async def record_move(self, job: str, owner: str, key: str, fence: int, dst: str) -> bool:
        """Note, under our lease, that the item's input is being moved to ``dst``.

        Returns ``False`` when the lease is no longer ours (the caller must not move).
        """
        async with (
            self._write() as db,
            db.execute(
                sql.RECORD_MOVE, (f"moved:{dst}", self.clock(), job, key, owner, fence)
            ) as cur,
        ):
            return cur.rowcount == 1

    # -- reading ---------------------------------------------------------------------------------

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

    @staticmethod
    def _item(row: Sequence[Any]) -> ItemInfo:
        key, relpath, size, mtime_ns, state, attempts, error, updated = row
        name = os.fsdecode(relpath) if isinstance(relpath, bytes) else str(relpath)
        return ItemInfo(key, name, size, mtime_ns, state, attempts, error, updated)

    async def failures(self, job: str, limit: int) -> list[ItemInfo]:
        """Failed and dead items, the most recent first."""
        async with self._read():
            rows = await self._fetchall(sql.FAILURES, (job, limit))
        return [self._item(r) for r in rows]

    async def find_items(self, job: str, key_or_relpath: str) -> list[ItemInfo]:
        """Items whose key is, or whose relpath is, ``key_or_relpath``."""
        async with self._read():
            rows = await self._fetchall(sql.ITEM_BY_KEY, (job, key_or_relpath))
            rows += await self._fetchall(sql.ITEMS_BY_RELPATH, (job, os.fsencode(key_or_relpath)))
        return [self._item(r) for r in rows]

    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        """Put failed (and with ``dead``, dead) items back to pending with fresh attempts.

        ``keys=None`` retries every such item of the job. Returns how many were reset.
        """
        states = "'failed', 'dead'" if dead else "'failed'"
        now = self.clock()
        changed = 0
        async with self._write() as db:
            if keys is None:
                async with db.execute(sql.RETRY_ALL.format(states=states), (now, job)) as cur:
                    changed = cur.rowcount
            else:
                for key in keys:
                    async with db.execute(
                        sql.RETRY_ITEM.format(states=states), (now, job, key)
                    ) as cur:
                        changed += cur.rowcount
        return changed

    async def runs(self, job: str, limit: int = 50) -> list[RunInfo]:
        """The job's run history, the most recent first."""
        async with self._read():
            return [RunInfo(*r) for r in await self._fetchall(sql.RUNS_OF_JOB, (job, limit))]

    async def runners(self, job: str) -> list[tuple[str, int | None, str | None, bool, float]]:
        """``(owner, pid, host, shared, heartbeat_at)`` of the job's registered runners."""
        async with self._read():
            rows = await self._fetchall(sql.RUNNERS_OF_JOB, (job,))
        return [(r[0], r[1], r[2], bool(r[4]), r[6]) for r in rows]


def _by_post_action(outcomes: Sequence[Outcome]) -> dict[str | None, list[Outcome]]:
    groups: dict[str | None, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.post_action, []).append(outcome)
    return groups


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))
