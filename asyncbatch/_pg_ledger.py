"""The PostgreSQL ledger: the SQLite ledger's contract, for runners on several hosts.

``PostgresLedger`` has the public methods and return types of :class:`asyncbatch._ledger.Ledger`
(checked by mypy against :class:`asyncbatch._ledgers.LedgerLike`); all of its SQL is in
:mod:`._pg_sql`. What differs, and why:

- **Clocks.** Leases, locks and heartbeats are stored and compared in the server's time
  (``now()``), so hosts whose clocks disagree still agree on who holds what; the caller only
  passes durations (a lease, a TTL, a retry delay). Times handed back (lock, item and run
  times) are shifted into the caller's ``clock`` by the offset between the two clocks,
  measured on connecting and again every minute (to within half a round trip), so they compare
  correctly with ``clock()`` on that host; ``next_retry_at`` is the server's remaining delay
  added to ``clock()``. A runner still stops its own work at its local monotonic deadline,
  before its lease can be taken over (unchanged).
- **Transactions.** One connection per ledger; an :class:`anyio.Lock` runs one transaction at a
  time on it. A transaction runs inside ``anyio.CancelScope(shield=True)`` once it has the lock,
  so cancelling the caller never leaves one open; if a transaction is nevertheless interrupted
  with the connection still inside it, the connection is terminated (the server rolls back) and
  a new one is made for the next call. Deadlocks and serialization failures are retried, with
  jittered pauses, for up to ``busy_timeout``; row-lock waits give up after ``busy_timeout``
  (``lock_timeout``); a statement gets ``2 * busy_timeout`` (at least 60 s) before the client
  gives up on the connection.
- **Claims.** A scanned chunk is registered and leased in one ``INSERT ... SELECT FROM
  unnest(...) ON CONFLICT (job, key) DO UPDATE ... WHERE <claimable>``: a row another runner is
  writing is waited for and re-checked on its committed version, so two runners never lease the
  same item. Waiting items are leased with ``FOR UPDATE SKIP LOCKED`` in ``(mtime_ns, relpath)``
  order: concurrent runners take disjoint sets without queueing behind each other.
- **Fencing.** Every item write is ``WHERE job AND key AND owner AND fence AND
  state='running'``; a completion that changes no row lost its lease and is reported, never
  counted.
- **The job lock.** Lock decisions for a job are serialised by a transaction-scoped advisory
  lock (the SQLite backend's ``BEGIN IMMEDIATE``); the lock row is taken with ``INSERT ... ON
  CONFLICT DO NOTHING`` and released with ``DELETE ... WHERE job_id=$1 AND owner=$2``.
- **Plans.** Every hot statement looks items up by ``(job, key)``; the ledger refreshes the
  planner's statistics of ``items`` as it grows the table (see ``_analyze``), so a server
  without autovacuum still plans them as index lookups.
- **Where.** The tables live in their own schema: the DSN's ``search_path`` (its first entry,
  e.g. ``postgresql://host/db?search_path=batches``), else ``asyncbatch``. A schema holding
  tables of another application, or a newer ledger schema, is refused untouched.
- **Errors.** asyncpg and PostgreSQL errors leave as :class:`LedgerError`, one line, naming
  the DSN without its password.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias, TypeVar

import anyio

try:
    import asyncpg
    import asyncpg.exceptions as pg_errors
except ImportError as e:  # pragma: no cover - depends on the install
    from ._exceptions import ConfigurationError

    raise ConfigurationError(
        "a postgresql:// state needs asyncpg: pip install 'asyncbatch[postgres]'"
    ) from e

from . import _pg_sql as sql
from ._actions import decode_action, encode_action
from ._exceptions import (
    ConfigurationError,
    JobLockedError,
    LedgerError,
    NotALedgerError,
    SchemaVersionError,
)
from ._ledger import ClaimedRow, ItemInfo, LockInfo, Outcome, RunInfo
from ._ledgers import PostgresDSN
from ._procinfo import ProcessIdentity, holder_is_alive

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]

__all__ = ["PostgresLedger"]

T = TypeVar("T")
Durability = Literal["normal", "full"]

#: Errors after which the whole transaction is simply run again.
_RETRYABLE = (pg_errors.DeadlockDetectedError, pg_errors.SerializationError)
#: Errors that mean the connection itself is gone or unusable.
_CONNECTION_LOST = (OSError, TimeoutError, asyncpg.InterfaceError, pg_errors.InternalClientError)
#: How often (seconds) the offset between the server's clock and ours is measured again.
_OFFSET_TTL = 60.0
#: New items after which this ledger first refreshes the planner's statistics.
_FIRST_ANALYZE = 2000
_INT64 = 1 << 64
_INT63 = 1 << 63


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _signed(inode: int) -> int:
    """An inode (unsigned 64-bit) as PostgreSQL's signed ``bigint``."""
    return inode - _INT64 if inode >= _INT63 else inode


def _unsigned(inode: int) -> int:
    return inode + _INT64 if inode < 0 else inode


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def _runner_alive(runner: asyncpg.Record, me: ProcessIdentity) -> bool:
    """A runner row (with the server's now last) is alive: heartbeat current, process not gone."""
    if runner["expires_at"] < runner[8]:
        return False
    holder = ProcessIdentity(runner["host"] or "", runner["pid"] or 0, runner["pid_start"])
    return holder_is_alive(holder, me=me) is not False


class PostgresLedger:
    """An open PostgreSQL ledger: the job lock, runner liveness, claims, outcomes, and queries.

    Use :meth:`open`; close with :meth:`close` or ``async with``. Each instance holds one
    connection and runs one transaction at a time on it (a runner is one connection).
    """

    def __init__(
        self,
        target: PostgresDSN,
        *,
        durability: Durability = "normal",
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        #: The DSN without its password (for messages).
        self.name = target.redacted
        self.clock = clock
        self._durability = durability
        self._busy_timeout = busy_timeout
        self._conn: Connection | None = None
        #: Add to a server time to express it in ``clock``'s time (measured, see _connection).
        self._shift = 0.0
        self._shift_measured = -math.inf
        self._lock = anyio.Lock()
        self._random = random.Random()
        #: Items this ledger registered, and when to refresh the statistics (see _analyze).
        self._added = 0
        self._analyze_after = _FIRST_ANALYZE

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        durability: Durability = "normal",
        create: bool = True,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Connect to the ledger at ``dsn`` (and with ``create``, create or migrate its schema).

        ``durability="normal"`` sets ``synchronous_commit = off`` for the session: a commit
        returns before its WAL record is flushed, so a crash of the *server* (not of a runner)
        may lose the last fraction of a second of commits, never corrupt anything; those
        items are then redone (the effects are idempotent), as with SQLite's
        ``synchronous=NORMAL``. ``"full"`` keeps ``synchronous_commit = on`` (PostgreSQL's
        default): every commit is on disk (and on synchronous replicas) before it returns,
        at the cost of one WAL flush per transaction.

        ``busy_timeout`` bounds waits for row locks and retries of deadlocked transactions.
        ``clock`` is only used to express returned times in the caller's clock; leases and
        locks use the server's.

        Raises :class:`ConfigurationError` for a DSN that does not parse or (without
        ``create``) a ledger that does not exist, :class:`LedgerError` when the server cannot
        be reached, :class:`NotALedgerError` for a schema holding another application's
        tables and :class:`SchemaVersionError` for a newer schema; in those cases nothing is
        written.
        """
        ledger = cls(
            PostgresDSN.parse(dsn),
            durability=durability,
            busy_timeout=busy_timeout,
            clock=clock,
        )
        try:
            await ledger._prepare(create=create)
        except BaseException:
            await ledger.close()
            raise
        return ledger

    async def _connect(self) -> Connection:
        target = self.target
        settings = {
            "search_path": _quote_ident(target.schema),
            "synchronous_commit": "off" if self._durability == "normal" else "on",
            "lock_timeout": f"{max(1, round(self._busy_timeout * 1000))}ms",
            "idle_in_transaction_session_timeout": f"{round(self._statement_timeout * 1000)}ms",
            "jit": "off",  # claims are many small statements: compiling them only costs
        }
        if not target.names_application:
            settings["application_name"] = "asyncbatch"
        try:
            conn: Connection = await asyncpg.connect(
                target.dsn,
                timeout=min(self._busy_timeout, 60.0),
                command_timeout=self._statement_timeout,
                server_settings=settings,
            )
        except (asyncpg.PostgresError, *_CONNECTION_LOST, ValueError) as e:
            raise LedgerError(f"cannot connect to state {self.name!r}: {_one_line(e)}") from None
        return conn

    @property
    def _statement_timeout(self) -> float:
        return max(60.0, 2 * self._busy_timeout)

    async def _prepare(self, *, create: bool) -> None:
        version = await self._read(self._inspect)
        if version == sql.SCHEMA_VERSION:
            return
        if not create:
            if version == 0:
                raise ConfigurationError(
                    f"state {self.name!r} does not exist (no asyncbatch ledger in schema "
                    f"{self.target.schema!r}); run 'asyncbatch run' once to create it"
                )
            raise LedgerError(
                f"state {self.name!r} has schema version {version}; run 'asyncbatch run' "
                "once to upgrade it"
            )
        await self._transact(self._migrate)

    async def _inspect(self, conn: Connection) -> int:
        """The ledger's schema version (0: none yet); refuse what is not ours or too new."""
        schema = self.target.schema
        row = await conn.fetchrow(sql.INSPECT_SCHEMA, schema)
        assert row is not None
        _, relations, has_meta = row
        where = f"state {self.name!r}: schema {schema!r}"
        if not has_meta:
            if relations:
                raise NotALedgerError(
                    f"{where} holds tables of another application; it was not touched "
                    "(choose another schema with ?search_path=NAME)"
                )
            return 0
        application, version = await conn.fetchrow(sql.READ_VERSION) or (None, None)
        if application != sql.APPLICATION:
            raise NotALedgerError(
                f"{where} holds a 'meta' table of another application; it was not touched"
            )
        try:
            found = int(version or "")
        except ValueError:
            raise NotALedgerError(
                f"{where} has no valid schema_version; it was not touched"
            ) from None
        if found > sql.SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.name} (schema {schema})", found, sql.SCHEMA_VERSION)
        return found

    async def _migrate(self, conn: Connection) -> None:
        """Create the schema or bring it up to date (one transaction, one client at a time)."""
        schema = self.target.schema
        await conn.execute(sql.MIGRATION_LOCK, schema)
        version = await self._inspect(conn)  # again: another client may have done it meanwhile
        if version == sql.SCHEMA_VERSION:
            return
        exists = (await conn.fetchrow(sql.INSPECT_SCHEMA, schema) or (False,))[0]
        if not exists:
            await conn.execute(sql.CREATE_SCHEMA.format(schema=_quote_ident(schema)))
        while version < sql.SCHEMA_VERSION:
            await conn.execute(sql.MIGRATIONS[version])
            version += 1
        now = await conn.fetchval(sql.SERVER_NOW)
        await conn.execute(sql.SET_META, "application", sql.APPLICATION)
        await conn.execute(sql.SET_META, "schema_version", str(sql.SCHEMA_VERSION))
        await conn.execute(sql.PUT_META, "secret", secrets.token_hex(32))
        await conn.execute(sql.PUT_META, "created_at", repr(float(now)))

    async def close(self) -> None:
        """Close the connection, after the transaction in flight (shielded: always completes)."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                conn, self._conn = self._conn, None
                if conn is None or conn.is_closed():
                    return
                try:
                    await conn.close(timeout=5)
                except Exception:
                    conn.terminate()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transactions ------------------------------------------------------------------------------

    async def _connection(self) -> Connection:
        """The open connection (a new one if it was lost), with a fresh enough clock offset."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
            self._shift_measured = -math.inf
        if time.monotonic() - self._shift_measured > _OFFSET_TTL:
            before = self.clock()
            try:
                server = await self._conn.fetchval(sql.SERVER_CLOCK)
            except _CONNECTION_LOST:
                self._discard(self._conn)
                raise
            after = self.clock()
            self._shift = (before + after) / 2 - float(server)
            self._shift_measured = time.monotonic()
        return self._conn

    def _discard(self, conn: Connection) -> None:
        """Drop a connection that may be inside a transaction: the server rolls it back."""
        if self._conn is conn:
            self._conn = None
        if not conn.is_closed():
            conn.terminate()

    def _ledger_error(self, error: Exception) -> LedgerError:
        """The one-line :class:`LedgerError` for an asyncpg or PostgreSQL error."""
        if isinstance(error, pg_errors.LockNotAvailableError):
            return LedgerError(
                f"state {self.name!r}: rows stayed locked by another runner for "
                f"{self._busy_timeout:.0f}s ({_one_line(error)})"
            )
        if isinstance(error, asyncpg.PostgresError):
            return LedgerError(f"state {self.name!r}: {_one_line(error)}")
        return LedgerError(f"state {self.name!r}: connection lost ({_one_line(error)})")

    async def _transact(
        self, body: Callable[[Connection], Awaitable[T]], *, one: bool = False
    ) -> T:
        """Run ``body(conn)`` as one transaction, to its end even if the caller is cancelled.

        With ``one``, the body is a single statement and runs as its own (implicit)
        transaction: one round trip instead of three. Deadlocks and serialization failures
        re-run the body (for up to ``busy_timeout``); any other error rolls it back.
        """
        async with self._lock:
            with anyio.CancelScope(shield=True):
                try:
                    result = await self._retrying(body, one=one)
                except (asyncpg.PostgresError, *_CONNECTION_LOST) as e:
                    raise self._ledger_error(e) from e
        return result

    async def _retrying(self, body: Callable[[Connection], Awaitable[T]], *, one: bool) -> T:
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.002
        while True:
            conn = await self._connection()
            try:
                if one:
                    return await body(conn)
                async with conn.transaction():
                    return await body(conn)
            except _RETRYABLE:
                if time.monotonic() > deadline:
                    raise
            except _CONNECTION_LOST:
                self._discard(conn)
                raise
            finally:
                if not conn.is_closed() and conn.is_in_transaction():
                    self._discard(conn)  # interrupted inside: never leave it open
            await anyio.sleep(pause * (0.5 + self._random.random()))
            pause = min(pause * 2, 0.25)

    async def _read(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """Run read statements (each its own snapshot), shielded like a transaction."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                conn: Connection | None = None
                try:
                    conn = await self._connection()
                    result = await body(conn)
                except _CONNECTION_LOST as e:
                    if conn is not None:
                        self._discard(conn)
                    raise self._ledger_error(e) from e
                except asyncpg.PostgresError as e:
                    raise self._ledger_error(e) from e
        return result

    def _local(self, server_time: float) -> float:
        """A server time expressed in the caller's clock."""
        return server_time + self._shift

    def _lock_info(self, row: asyncpg.Record) -> LockInfo:
        """A task_lock row, its times in the caller's clock."""
        acquired, expires = self._local(row[5]), self._local(row[6])
        return LockInfo(row[0], row[1], row[2], row[3], row[4], acquired, expires)

    def _item(self, row: asyncpg.Record) -> ItemInfo:
        key, relpath, size, mtime_ns, state, attempts, interrupted, error, updated = row
        name = os.fsdecode(bytes(relpath))
        return ItemInfo(
            key, name, size, mtime_ns, state, attempts, interrupted, error, self._local(updated)
        )

    # -- reads -------------------------------------------------------------------------------------

    async def meta(self, name: str) -> str | None:
        """A value from the ledger's ``meta`` table (``secret``, ``created_at``)."""

        async def read(conn: Connection) -> Any:
            return await conn.fetchval(sql.GET_META, name)

        value = await self._read(read)
        return None if value is None else str(value)

    async def jobs(self) -> list[str]:
        """Every job this ledger knows."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.LIST_JOBS)

        return [r[0] for r in await self._read(read)]

    async def job_identity(self, job: str) -> str | None:
        """The identity mode recorded for ``job``, or ``None`` for an unknown job."""

        async def read(conn: Connection) -> Any:
            return await conn.fetchval(sql.GET_JOB, job)

        value = await self._read(read)
        return None if value is None else str(value)

    async def job_exists(self, job: str) -> bool:
        """Whether this ledger knows ``job``."""
        return await self.job_identity(job) is not None

    async def locks(self) -> list[LockInfo]:
        """Every job lock in the ledger."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.LOCK_LIST)

        return [self._lock_info(r) for r in await self._read(read)]

    async def runners(self, job: str) -> list[tuple[str, int | None, str | None, bool, float]]:
        """``(owner, pid, host, shared, heartbeat_at)`` of the job's registered runners."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.RUNNERS_OF_JOB, job)

        return [(r[0], r[1], r[2], bool(r[4]), self._local(r[6])) for r in await self._read(read)]

    async def counts(self, job: str) -> dict[str, int]:
        """Items of the job by state; every state is present."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.COUNTS, job)

        counts = dict.fromkeys(sql.STATES, 0)
        counts.update({str(state): int(n) for state, n in await self._read(read)})
        return counts

    async def oldest_waiting(self, job: str) -> float | None:
        """When the oldest pending or failed item was first registered."""

        async def read(conn: Connection) -> Any:
            return await conn.fetchval(sql.OLDEST_WAITING, job)

        oldest = await self._read(read)
        return None if oldest is None else self._local(float(oldest))

    async def next_retry_at(self, job: str) -> float | None:
        """When the earliest failed item of the job becomes due (in the caller's clock)."""

        async def read(conn: Connection) -> Any:
            return await conn.fetchval(sql.NEXT_RETRY_IN, job)

        wait = await self._read(read)
        return None if wait is None else self.clock() + float(wait)

    async def failures(self, job: str, limit: int) -> list[ItemInfo]:
        """Failed and dead items, the most recent first."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.FAILURES, job, limit)

        return [self._item(r) for r in await self._read(read)]

    async def find_items(self, job: str, key_or_relpath: str) -> list[ItemInfo]:
        """Items whose key is, or whose relpath is, ``key_or_relpath``."""

        # A name that is not UTF-8 (surrogate-escaped) cannot be a key, only a relpath.
        is_text = key_or_relpath.isascii() or not any(
            "\udc80" <= c <= "\udcff" for c in key_or_relpath
        )

        async def read(conn: Connection) -> list[asyncpg.Record]:
            rows = await conn.fetch(sql.ITEM_BY_KEY, job, key_or_relpath) if is_text else []
            return rows + await conn.fetch(sql.ITEMS_BY_RELPATH, job, os.fsencode(key_or_relpath))

        return [self._item(r) for r in await self._read(read)]

    async def runs(self, job: str, limit: int = 50) -> list[RunInfo]:
        """The job's run history, the most recent first."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.RUNS_OF_JOB, job, limit)

        result = []
        for r in await self._read(read):
            finished = None if r[7] is None else self._local(r[7])
            seen, done, failed, dead, vanished, status = r[8:14]
            result.append(
                RunInfo(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    r[5],
                    self._local(r[6]),
                    finished,
                    seen,
                    done,
                    failed,
                    dead,
                    vanished,
                    status,
                )
            )
        return result

    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        """Put failed (and with ``dead``, dead) items back to pending with fresh attempts.

        ``keys=None`` retries every such item of the job. Returns how many were reset.
        """
        states = ["failed", "dead"] if dead else ["failed"]

        async def reset(conn: Connection) -> Any:
            if keys is None:
                return await conn.fetchval(sql.RETRY_ALL, job, states)
            return await conn.fetchval(sql.RETRY_KEYS, job, states, list(keys))

        return int(await self._transact(reset, one=True))

    # -- jobs, the job lock and runners ------------------------------------------------------------

    async def ensure_job(self, job: str, identity: str) -> None:
        """Record the job's identity mode; refuse a different one for an existing job."""

        async def ensure(conn: Connection) -> Any:
            await conn.execute(sql.ADD_JOB, job, identity)
            return await conn.fetchval(sql.GET_JOB, job)

        recorded = str(await self._transact(ensure))
        if recorded != identity:
            raise ConfigurationError(
                f"job {job!r} uses identity={recorded!r} in state {self.name!r}, not "
                f"{identity!r}: keep the identity or use another --job"
            )

    async def acquire_lock(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool
    ) -> LockInfo | None:
        """Take the job lock (or, ``shared``, check that no exclusive runner holds it).

        A lock whose holder is gone is taken over at once: same host and a dead pid (or a pid
        now used by another process), or a heartbeat expired by the server's clock. Returns
        the stale lock that was taken over, if any. Raises :class:`JobLockedError` while a
        live runner holds it.
        """

        async def acquire(conn: Connection) -> LockInfo | None:
            await conn.execute(sql.JOB_LOCK_GUARD, job)
            row = await conn.fetchrow(sql.LOCK_GET, job)
            stale: LockInfo | None = None
            if row is not None:
                held = self._lock_info(row)
                if row["expires_at"] >= row[7] and holder_is_alive(held.holder, me=me) is not False:
                    raise JobLockedError(job, held.pid, held.host, _iso(held.acquired_at))
                stale = held
            if shared:
                if stale is not None:
                    await conn.execute(sql.LOCK_RELEASE, job, stale.owner)
                return stale
            for runner in await conn.fetch(sql.RUNNERS_OF_JOB, job):
                if runner["shared"] and _runner_alive(runner, me):
                    started = self._local(runner["started_at"])
                    raise JobLockedError(job, runner["pid"], runner["host"], _iso(started))
            lock = (owner, me.pid, me.host, me.pid_start, ttl)
            if stale is None:
                taken = await conn.fetchval(sql.LOCK_INSERT, job, *lock)
            else:
                taken = await conn.fetchval(sql.LOCK_TAKE_OVER, job, stale.owner, *lock)
            if taken is None:  # only a writer bypassing the guard could get here
                raise JobLockedError(job, None, None, "just now")
            return stale

        return await self._transact(acquire)

    async def register_runner(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool, mode: str
    ) -> int:
        """Record this runner (for the liveness of its leases) and open a run history row."""

        async def register(conn: Connection) -> Any:
            await conn.execute(
                sql.RUNNER_ADD, owner, job, me.pid, me.host, me.pid_start, shared, ttl
            )
            return await conn.fetchval(sql.RUN_START, job, owner, me.pid, me.host, mode)

        return int(await self._transact(register))

    async def reap_stale_runners(self, job: str, me: ProcessIdentity) -> int:
        """Hand the leased items of runners that are gone back to the ledger.

        Returns how many items were released. A scan of the job's items, done only when a
        runner is found gone (after a crash).
        """

        async def reap(conn: Connection) -> int:
            released = 0
            for runner in await conn.fetch(sql.RUNNERS_OF_JOB, job):
                if _runner_alive(runner, me):
                    continue
                released += int(await conn.fetchval(sql.REAP_ITEMS, job, runner["owner"]))
                await conn.execute(sql.RUNNER_REMOVE, runner["owner"])
            return released

        return await self._transact(reap)

    async def heartbeat(
        self,
        job: str,
        owner: str,
        ttl: float,
        leases: Sequence[tuple[str, int]],
        *,
        holds_lock: bool,
    ) -> bool:
        """Extend this runner's lock, liveness and item leases by ``ttl`` (server time).

        Returns ``False`` when the lock or the runner record was taken from us: the caller
        must stop.
        """
        keys = [key for key, _ in leases]
        fences = [fence for _, fence in leases]

        async def beat(conn: Connection) -> bool:
            alive = await conn.fetchval(sql.RUNNER_EXTEND, owner, ttl) is not None
            if holds_lock:
                alive = alive and await conn.fetchval(sql.LOCK_EXTEND, job, owner, ttl) is not None
            if alive and keys:
                await conn.execute(sql.EXTEND_LEASES, job, owner, ttl, keys, fences)
            return alive

        return await self._transact(beat)

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

        async def release(conn: Connection) -> None:
            await conn.execute(sql.RUNNER_REMOVE, owner)
            if holds_lock:
                await conn.execute(sql.LOCK_RELEASE, job, owner)
            await conn.execute(sql.RUN_FINISH, run_id, *totals, exit_status)

        await self._transact(release)

    async def force_unlock(self, job: str, owner: str) -> bool:
        """Delete a job lock held by ``owner``; ``False`` when it was not held by it."""

        async def unlock(conn: Connection) -> bool:
            return await conn.fetchval(sql.LOCK_RELEASE, job, owner) is not None

        return await self._transact(unlock, one=True)

    # -- claims ------------------------------------------------------------------------------------

    async def claim_scanned(
        self,
        job: str,
        owner: str,
        lease: float,
        rows: Sequence[tuple[str, bytes, int, int, int]],
    ) -> list[ClaimedRow]:
        """Register scanned entries ``(key, relpath, size, mtime_ns, inode)`` and lease them.

        New entries are inserted leased to ``owner``; pending, vanished, failed (due) and
        expired entries are leased with ``fence`` incremented (``attempts`` counts attempts
        that started: see :meth:`commit_outcomes`); finished ones cost an index probe.
        Returns the rows leased to us (``state='running'``), plus dead rows and finished rows
        with a post-commit action, so the caller can count or finish them. One statement,
        one round trip.
        """
        if not rows:
            return []
        keys: list[str] = []
        relpaths: list[bytes] = []
        sizes: list[int] = []
        mtimes: list[int] = []
        inodes: list[int] = []
        seen: set[str] = set()
        for key, relpath, size, mtime_ns, inode in rows:
            if key in seen:  # ON CONFLICT cannot touch a row twice in one statement
                continue
            seen.add(key)
            keys.append(key)
            relpaths.append(relpath)
            sizes.append(size)
            mtimes.append(mtime_ns)
            inodes.append(_signed(inode))

        async def claim(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(
                sql.CLAIM_SCANNED, job, owner, lease, keys, relpaths, sizes, mtimes, inodes
            )

        claimed = [
            ClaimedRow(
                key,
                state,
                fence,
                attempts,
                interrupted,
                post,
                b"" if relpath is None else bytes(relpath),
                size or 0,
                mtime_ns or 0,
                _unsigned(inode or 0),
            )
            for key, state, fence, attempts, interrupted, post, relpath, size, mtime_ns, inode in (
                await self._transact(claim, one=True)
            )
        ]
        self._added += sum(1 for r in claimed if r.fence == 1 and r.state == "running")
        if self._added >= self._analyze_after:
            await self._analyze()
        return claimed

    async def _analyze(self) -> None:
        """Refresh the planner's statistics of ``items`` as this ledger grows it.

        Every statement here looks items up by ``(job, key)``. Without statistics (a fresh
        table, and no autovacuum yet, or none at all) PostgreSQL guesses that a job has a
        handful of items and hash-joins a commit against *all* of them: each commit would cost
        O(items). Autovacuum fixes that within a minute where it runs; this does it at once,
        each time the rows this ledger added have doubled (about 20 times for a million).
        """
        self._analyze_after = 2 * self._added

        async def analyze(conn: Connection) -> None:
            await conn.execute(sql.ANALYZE_ITEMS)

        await self._transact(analyze, one=True)

    async def claim_waiting(
        self, job: str, owner: str, lease: float, limit: int
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` items waiting in the ledger: pending, or failed and due.

        The oldest ``(mtime_ns, relpath)`` first; items another runner is claiming at this
        moment are skipped (``SKIP LOCKED``), so concurrent runners get disjoint sets.
        """

        async def claim(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.CLAIM_WAITING, job, owner, lease, limit)

        return [
            ClaimedRow(
                r[0], "running", r[5], r[6], r[7], r[8], bytes(r[1]), r[2], r[3], _unsigned(r[4])
            )
            for r in await self._transact(claim, one=True)
        ]

    # -- outcomes ----------------------------------------------------------------------------------

    async def commit_outcomes(
        self,
        job: str,
        owner: str,
        outcomes: Sequence[Outcome],
        started: Sequence[tuple[str, int]] = (),
    ) -> set[str]:
        """Record finished attempts in one statement; return the keys whose lease was lost.

        ``started`` lists ``(key, fence)`` of attempts that began and are still running: their
        attempt is counted now (a finished one is counted with its outcome). An item is done
        when, and only when, this statement commits. A row whose owner or fence changed
        (another runner took the lease) is not touched, and its key is returned. A retry time
        (``next_attempt_at``, in the caller's clock) is stored as the same delay from the
        server's now.
        """
        now = self.clock()
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [], [])
        keys, fences, states, errors, delays, posts, sizes, mtimes, inodes, attempted = columns
        for o in outcomes:
            keys.append(o.key)
            fences.append(o.fence)
            states.append(o.state)
            errors.append(o.error)
            delays.append(None if o.next_attempt_at is None else o.next_attempt_at - now)
            posts.append(o.post_action)
            size, mtime_ns, inode = o.stat or (None, None, None)
            sizes.append(size)
            mtimes.append(mtime_ns)
            inodes.append(None if inode is None else _signed(inode))
            attempted.append(o.attempted)
        finished = set(keys)
        for key, fence in started:
            if key not in finished:  # a finished attempt is counted with its outcome
                finished.add(key)
                # state NULL: started, still running
                row = (key, fence, None, None, None, None, None, None, None, True)
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
        if not keys:
            return set()

        async def commit(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.COMMIT_OUTCOMES, job, owner, *columns)

        changed = {r[0] for r in await self._transact(commit, one=True) if r[1]}
        return {o.key for o in outcomes} - changed

    async def release_items(
        self, job: str, owner: str, items: Sequence[tuple[str, int, bool]]
    ) -> None:
        """Give leased items back (``(key, fence, started)``) to be claimed again.

        Attempts are counted when they start (see ``commit_outcomes``), so nothing is undone.
        """
        if not items:
            return
        keys = [key for key, _, _ in items]
        fences = [fence for _, fence, _ in items]

        async def release(conn: Connection) -> None:
            await conn.execute(sql.RELEASE_ITEMS, job, owner, keys, fences)

        await self._transact(release, one=True)

    async def move_destinations(self, job: str) -> list[str]:
        """Where ``ctx.move()`` took or was taking the inputs of the job's unfinished items."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.MOVE_DESTINATIONS, job)

        return [path for (action,) in await self._read(read) if (path := decode_action(action)[1])]

    async def record_move(self, job: str, owner: str, key: str, fence: int, dst: str) -> bool:
        """Note, under our lease, that the item's input is being moved to ``dst``.

        Returns ``False`` when the lease is no longer ours (the caller must not move).
        """

        async def record(conn: Connection) -> bool:
            moved = encode_action("moved", dst)
            return await conn.fetchval(sql.RECORD_MOVE, job, key, owner, fence, moved) is not None

        return await self._transact(record, one=True)
