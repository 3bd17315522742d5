"""The PostgreSQL ledger: the contract of :class:`~asyncbatch._ledger.base.Ledger`, for runners
on several hosts. Its SQL is in :mod:`.postgres_sql`, its connection in :mod:`.postgres_session`.

What differs from SQLite, and why:

- **Clocks.** Leases, locks and heartbeats are stored and compared in the server's time
  (``now()``), so hosts whose clocks disagree still agree on who holds what; the caller only
  passes durations (a lease, a TTL, a retry delay). Times handed back (lock, item and run
  times) are shifted into the caller's ``clock`` (see :meth:`PostgresSession.local`);
  ``next_retry_at`` is the server's remaining delay added to ``clock()``. A runner still stops
  its own work at its local monotonic deadline, before its lease can be taken over.
- **Claims.** A scanned chunk is registered and leased in one ``INSERT ... SELECT FROM
  unnest(...) ON CONFLICT (job, key) DO UPDATE ... WHERE <claimable>``: a row another runner is
  writing is waited for and re-checked on its committed version, so two runners never lease the
  same item. Waiting items are leased with ``FOR UPDATE SKIP LOCKED`` in ``(mtime_ns, relpath)``
  order: concurrent runners take disjoint sets without queueing behind each other.
- **The job lock.** The start of a runner on a job (its settings check, lock decision and
  registration, one transaction) is serialised by a transaction-scoped advisory lock on the
  job (the SQLite backend's ``BEGIN IMMEDIATE``); the lock row is taken with ``INSERT ... ON
  CONFLICT DO NOTHING`` and released with ``DELETE ... WHERE job_id=$1 AND owner=$2``.
- **Plans.** Every hot statement looks items up by ``(job, key)``; the ledger refreshes the
  planner's statistics of ``items`` as it grows the table (see ``_analyze``), so a server
  without autovacuum still plans them as index lookups.
- **Where.** The tables live in their own schema: the DSN's ``search_path`` (its first entry,
  e.g. ``postgresql://host/db?search_path=batches``), else ``asyncbatch``. A schema holding
  tables of another application, or a newer ledger schema, is refused untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple
from typing import TYPE_CHECKING, Any, Self

try:
    import asyncpg
except ImportError as e:  # pragma: no cover - depends on the install
    from .._exceptions import ConfigurationError

    raise ConfigurationError(
        "a postgresql:// state needs asyncpg: pip install 'asyncbatch[postgres]'"
    ) from e

from .._exceptions import JobLockedError
from .._procinfo import ProcessIdentity
from . import postgres_sql as sql
from . import types as t
from .actions import decode_action, encode_move
from .base import (
    FORGOTTEN_KEPT,
    WORK_LEFT_NEWEST,
    Ledger,
    PageEnd,
    decide_job,
    decide_lock,
    decode_twins,
    encode_twins,
    end_of_gone,
    glob_regex,
)
from .dsn import PostgresDSN
from .idempotency import IdempotencyRecord, decide_idempotency, encode_headers
from .postgres_session import PostgresSession

if TYPE_CHECKING:
    from .postgres_session import Connection

__all__ = ["PostgresLedger"]

#: New items after which this ledger first refreshes the planner's statistics.
_FIRST_ANALYZE = 2000
#: Runners sharing a job (their takes of queued files): items this ledger adds before it
#: first looks whether the table grew enough to refresh the statistics, and the growth of
#: its own additions between looks (see ``_analyze_grown``).
_GROWN_FIRST_LOOK = 256
_GROWN_LOOK_STEP = 1.5
_INT64 = 1 << 64
_INT63 = 1 << 63


async def _log_forgotten(conn: Connection, job: str, gone: Sequence[t.ItemInfo]) -> None:
    """Log the names of forgotten items for watches under way; prune the old entries."""
    await _log_names(conn, job, [os.fsencode(i.relpath) for i in gone])


async def _log_names(conn: Connection, job: str, relpaths: Sequence[bytes]) -> None:
    """Log names for watches under way to look at again; prune the old entries."""
    if relpaths:
        await conn.execute(sql.FORGOTTEN_LOCK, job)  # held to the end: see FORGOTTEN_LOCK
        await conn.execute(sql.FORGOTTEN_ADD, job, list(relpaths))
        await conn.execute(sql.FORGOTTEN_PRUNE, FORGOTTEN_KEPT)


def _totals(totals: t.RunTotals) -> list[int]:
    """A run's counts as statement parameters, in the order of :data:`~.types.TOTALS`."""
    return [getattr(totals, name) for name in t.TOTALS]


def _signed(inode: int) -> int:
    """An inode (unsigned 64-bit) as PostgreSQL's signed ``bigint``."""
    return inode - _INT64 if inode >= _INT63 else inode


def _claim_columns(rows: Sequence[t.ScannedRow | t.QueuedRow]) -> tuple[list[Any], ...]:
    """A claim's arrays (keys, relpaths, sizes, mtimes, inodes), each key once: ON CONFLICT
    cannot touch a row twice in one statement."""
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    seen: set[str] = set()
    for row in rows:
        key, relpath, size, mtime_ns, inode = row[:5]
        if key in seen:
            continue
        seen.add(key)
        for column, value in zip(
            columns, (key, relpath, size, mtime_ns, _signed(inode)), strict=True
        ):
            column.append(value)
    return columns


async def _known_states(conn: Connection, job: str, keys: list[str]) -> dict[str, str]:
    """The state of each of these keys the ledger holds: the items between the least and
    the greatest key, else a lookup per key (see types.known_range_limit)."""
    if not keys:
        return {}
    limit = t.known_range_limit(len(keys))
    found = await conn.fetch(sql.KNOWN_STATES_RANGE, job, keys, limit)
    if len(found) < limit:
        wanted = set(keys)
        return {str(k): str(s) for k, s in found if k in wanted}
    return {str(k): str(s) for k, s in await conn.fetch(sql.KNOWN_STATES, job, keys)}


def _unsigned(inode: int) -> int:
    """A ``bigint`` inode as read, unsigned 64-bit again."""
    return inode + _INT64 if inode < 0 else inode


class PostgresLedger(Ledger):
    """An open PostgreSQL ledger (see the module's documentation). Use :meth:`open`."""

    def __init__(self, session: PostgresSession) -> None:
        self._session = session
        #: A second connection for the outcomes (made on first use): a runner's claims and
        #: its commits then overlap on the server instead of taking turns on one connection.
        self._commits: PostgresSession | None = None
        self.name = session.name
        self.clock = session.clock
        self.errors = session.errors
        #: Items this ledger registered, and when to refresh the statistics (see _analyze).
        self._added = 0
        self._analyze_after = _FIRST_ANALYZE
        self._look_after = _GROWN_FIRST_LOOK
        #: An item's full record (a row of ``postgres_sql._ITEM_COLUMNS``), its times in the
        #: caller's clock.
        self._item = t.ItemInfo.reader(times=session.local, relpath=os.fsdecode, inode=_unsigned)
        #: What to call when listings register waiting items, by job (see on_registered).
        self._on_registered: dict[str, list[Callable[[], None]]] = {}
        #: The ledger's schema, read when it first listens (see NOTIFY_REGISTERED).
        self._schema: str | None = None
        #: ``(job, owner)`` of claims that were run again (their connection lost: a run
        #: before may have committed, leasing items its caller never heard of), until a
        #: heartbeat finds none of those left (see heartbeat).
        self._unknown_leases: set[tuple[str, str]] = set()

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        durability: t.Durability = "normal",
        create: bool = True,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        outage_timeout: float = 120.0,
    ) -> Self:
        """Connect to the ledger at ``dsn`` (and with ``create``, create or migrate its schema).

        ``durability="normal"`` sets ``synchronous_commit = off`` for the session: a commit
        returns before its WAL record is flushed, so a crash of the *server* (not of a runner)
        may lose the last fraction of a second of commits, never corrupt anything; those
        items are then redone (the effects are idempotent), as with SQLite's
        ``synchronous=NORMAL``. ``"full"`` keeps ``synchronous_commit = on`` (PostgreSQL's
        default): every commit is on disk (and on synchronous replicas) before it returns,
        at the cost of one WAL flush per transaction.

        ``busy_timeout`` bounds waits for row locks and retries of deadlocked transactions;
        ``outage_timeout``, how long an unreachable server is waited out (see
        :mod:`.postgres_session`).
        ``clock`` is only used to express returned times in the caller's clock; leases and
        locks use the server's.

        Raises :class:`ConfigurationError` for a DSN that does not parse or (without
        ``create``) a ledger that does not exist, :class:`LedgerError` when the server cannot
        be reached, :class:`NotALedgerError` for a schema holding another application's
        tables and :class:`SchemaVersionError` for a newer schema (without ``create``, an
        older one too); in those cases nothing is written.
        """
        session = PostgresSession(
            PostgresDSN.parse(dsn),
            durability=durability,
            busy_timeout=busy_timeout,
            clock=clock,
            outage_timeout=outage_timeout,
        )
        try:
            await session.prepare(create=create)
        except BaseException:
            await session.close()
            raise
        return cls(session)

    async def close(self) -> None:
        if self._commits is not None:
            await self._commits.close()
        await self._session.close()

    def _outcomes(self) -> PostgresSession:
        """The session that records outcomes (and gives leases back, after them)."""
        if self._commits is None:
            self._commits = self._session.twin()
        return self._commits

    # -- jobs --------------------------------------------------------------------------------------

    async def meta(self, name: str) -> str | None:
        value = await self._session.fetchval(sql.GET_META, name)
        return None if value is None else str(value)

    async def jobs(self) -> list[str]:
        return [job for (job,) in await self._session.fetch(sql.LIST_JOBS)]

    async def job_identity(self, job: str) -> str | None:
        value = await self._session.fetchval(sql.GET_JOB, job)
        return None if value is None else str(value)

    async def job_settings(self, job: str) -> t.JobSettings | None:
        value = await self._session.fetchval(sql.GET_JOB_SETTINGS, job)
        return None if value is None else t.JobSettings.from_json(value, job)

    # -- the job lock and runners ------------------------------------------------------------------

    async def start_runner(self, start: t.RunStart) -> t.Started:
        job, me, settings = start.job, start.me, start.settings.to_json()

        async def begin(conn: Connection) -> t.Started:
            await conn.execute(sql.JOB_LOCK_GUARD, job)
            await conn.execute(sql.ADD_JOB, job, start.identity, settings)
            identity, recorded = await conn.fetchrow(sql.GET_JOB_RECORD, job) or (None, None)
            record, changed = decide_job(
                self.name,
                start,
                str(identity),
                None if recorded is None else t.JobSettings.from_json(recorded, job),
            )
            stale = await self._take_lock(conn, start)
            if record:
                await conn.execute(sql.SET_JOB_SETTINGS, job, settings)
            await conn.execute(
                sql.RUNNER_ADD,
                start.owner,
                job,
                me.pid,
                me.host,
                me.pid_start,
                start.shared,
                start.ttl,
            )
            note = "; ".join(changed) or None
            run_id = await conn.fetchval(
                sql.RUN_START, job, start.owner, me.pid, me.host, start.mode, note
            )
            return t.Started(int(run_id), stale, changed)

        return await self._session.transact(begin, again=False)  # may have taken the lock

    async def _take_lock(self, conn: Connection, start: t.RunStart) -> t.LockInfo | None:
        """The lock part of :meth:`start_runner` (inside its transaction, after the guard);
        returns the stale lock taken over or cleared, in the caller's clock."""
        job, me, shared = start.job, start.me, start.shared
        row = await conn.fetchrow(sql.LOCK_GET, job)
        now = await conn.fetchval(sql.SERVER_NOW) if row is None else row["now"]
        held = None if row is None else t.LockInfo.from_row(row)  # in the server's clock
        runners = (
            []
            if shared
            else [t.RunnerInfo.from_row(r) for r in await conn.fetch(sql.RUNNERS_OF_JOB, job)]
        )
        local = self._session.local
        stale = decide_lock(job, held, runners, me=me, shared=shared, now=now, shown=local)
        if stale is not None:
            await conn.execute(sql.RUN_KILLED, job, stale.owner, end_of_gone(stale.holder, me=me))
        if shared:
            if stale is not None:
                await conn.execute(sql.LOCK_RELEASE, job, stale.owner)
        else:
            lock = (start.owner, me.pid, me.host, me.pid_start, start.ttl)
            if stale is None:
                taken = await conn.fetchval(sql.LOCK_INSERT, job, *lock)
            else:
                taken = await conn.fetchval(sql.LOCK_TAKE_OVER, job, stale.owner, *lock)
            if taken is None:  # only a writer bypassing the guard could get here
                raise JobLockedError(job, None, None, "just now")
        if row is None or stale is None:
            return None
        return t.LockInfo.from_row(row, times=local)  # the stale lock is the row held

    async def reap_stale_runners(
        self, job: str, me: ProcessIdentity, *, orphans: bool = False
    ) -> int:
        async def reap(conn: Connection) -> int:
            released = 0
            for row in await conn.fetch(sql.RUNNERS_OF_JOB, job):
                runner = t.RunnerInfo.from_row(row)
                if runner.alive(row["now"], me):
                    continue
                ended = end_of_gone(runner.holder, me=me)
                await conn.execute(sql.RUN_KILLED, job, row["owner"], ended)
                released += int(await conn.fetchval(sql.REAP_ITEMS, job, row["owner"]))
                await conn.execute(sql.RUNNER_REMOVE, row["owner"])
            if orphans:
                for (owner,) in await conn.fetch(sql.ORPHANED_OWNERS, job):
                    released += int(await conn.fetchval(sql.REAP_ITEMS, job, owner))
            return released

        return await self._session.transact(reap)

    async def runners(self, job: str) -> list[t.RunnerInfo]:
        local = self._session.local
        rows = await self._session.fetch(sql.RUNNERS_OF_JOB, job)
        return [t.RunnerInfo.from_row(r, times=local) for r in rows]

    async def heartbeat(self, beat: t.Heartbeat) -> t.Renewal:
        job, owner, ttl = beat.job, beat.owner, beat.ttl
        keys = [key for key, _ in beat.leases]
        fences = [fence for _, fence in beat.leases]
        unknown = (job, owner) in self._unknown_leases
        unknown_left = unknown

        async def renew(conn: Connection) -> t.Renewal:
            nonlocal unknown_left
            await conn.execute(sql.RUN_PROGRESS, beat.run_id, *_totals(beat.totals))
            alive = await conn.fetchval(sql.RUNNER_EXTEND, owner, ttl) is not None
            if beat.holds_lock:
                alive = alive and await conn.fetchval(sql.LOCK_EXTEND, job, owner, ttl) is not None
            if not alive:
                return t.Renewal(False)
            if unknown:  # a claim's lost reply: put back what it leased, once expired
                await conn.fetchval(sql.RELEASE_UNKNOWN_LEASES, job, owner, keys)
                unknown_left = await conn.fetchval(sql.UNKNOWN_LEASES_LEFT, job, owner, keys)
            lister = beat.lister is not None and (
                await conn.fetchval(sql.LISTING_EXTEND, job, owner, beat.lister, ttl) is not None
            )
            if not keys:
                return t.Renewal(True, lister=lister)
            rows = await conn.fetch(sql.EXTEND_LEASES, job, owner, ttl, keys, fences)
            return t.Renewal(True, frozenset(keys) - {key for (key,) in rows}, lister)

        renewal = await self._session.transact(renew)
        if unknown and not unknown_left:
            self._unknown_leases.discard((job, owner))
        return renewal

    async def release_runner(self, end: t.RunEnd) -> None:
        keys = [key for key, _ in end.leases]
        fences = [fence for _, fence in end.leases]

        async def release(conn: Connection) -> None:
            if keys:  # its leases first: none outlives the runner's record (see RunEnd)
                await conn.execute(sql.RELEASE_ITEMS, end.job, end.owner, keys, fences)
            await conn.execute(sql.RUNNER_REMOVE, end.owner)
            if end.holds_lock:
                await conn.execute(sql.LOCK_RELEASE, end.job, end.owner)
            if end.lister:
                await conn.execute(sql.LISTING_RELEASE, end.job, end.owner)
            await conn.execute(sql.RUN_FINISH, end.run_id, end.exit_status, *_totals(end.totals))

        await self._session.transact(release)

    async def locks(self) -> list[t.LockInfo]:
        local = self._session.local
        return [
            t.LockInfo.from_row(r, times=local) for r in await self._session.fetch(sql.LOCK_LIST)
        ]

    async def force_unlock(self, job: str, owner: str) -> bool:
        async def unlock(conn: Connection) -> bool:
            return await conn.fetchval(sql.LOCK_RELEASE, job, owner) is not None

        return await self._session.transact(unlock, one=True)

    # -- claims ------------------------------------------------------------------------------------

    async def claim_scanned(
        self, job: str, owner: str, lease: float, rows: Sequence[t.ScannedRow]
    ) -> list[t.ClaimedRow]:
        if not rows:
            return []
        columns = _claim_columns(rows)

        async def claim(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql.CLAIM_SCANNED, job, owner, lease, *columns)

        found = await self._session.transact(claim, one=True)
        return await self._claimed(job, owner, found)

    async def _claimed(
        self, job: str, owner: str, found: list[asyncpg.Record], *, shared: bool = False
    ) -> list[t.ClaimedRow]:
        """What a claim (CLAIM_SCANNED's rows) found, the keys it did not lease read back."""
        # The leased rows' columns are ClaimedRow's LEASE_FIELDS, in order: made by position,
        # one per item (the hot path).
        claimed = [t.ClaimedRow(*r) for r in found if r["state"] == "running"]
        unclaimed = [r["key"] for r in found if r["state"] == "check"]
        for row in (
            await self._session.fetch(sql.CLAIM_CHECK, job, unclaimed, owner) if unclaimed else []
        ):
            # The handled file only when finished.
            lease_only = row["state"] in ("running", "held", "failed")
            claimed.append(
                t.ClaimedRow.from_row(row, lease_only=lease_only, relpath=bytes, inode=_unsigned)
            )
        self._added += sum(1 for r in claimed if r.fence == 1 and r.state == "running")
        if shared:
            if self._added >= self._look_after:
                await self._analyze_grown()
        elif self._added >= self._analyze_after:
            await self._analyze()
        return claimed

    async def queue_listed(
        self, job: str, owner: str, fence: int, rows: Sequence[t.QueuedRow]
    ) -> t.Registered | None:
        keys = [row[0] for row in rows]
        digest = hashlib.blake2b("\n".join(keys).encode(), digest_size=16).hexdigest()
        # Runs that reached their end: only those may have committed (a run ended early, by a
        # deadlock or a statement prepared first, was rolled back).
        ended = 0

        async def queue(conn: Connection) -> t.Registered | None:
            nonlocal ended
            holder = await conn.fetchrow(sql.LISTING_QUEUED_LAST, job, owner, fence)
            if holder is None:
                return None
            known = await _known_states(conn, job, keys)
            states = list(known.values())
            done, dead = states.count("done"), states.count("dead")
            if ended and holder["queued_last"] == digest:
                # Run again after its connection was lost, and the run before committed (its
                # reply lost with the connection): queued, and counted, once.
                return t.Registered(0, done, dead)
            revived = 0
            if "vanished" in states:
                columns: tuple[list[Any], ...] = ([], [], [], [], [])
                for key, relpath, size, mtime_ns, inode, *_ in rows:
                    if known.get(key) == "vanished":
                        row = (key, relpath, size, mtime_ns, _signed(inode))
                        for column, value in zip(columns, row, strict=True):
                            column.append(value)
                revived = int(await conn.fetchval(sql.REVIVE_VANISHED, job, *columns))
            new = [row for row in rows if row[0] not in known] if known else list(rows)
            parts = [new[i : i + t.QUEUED_BATCH] for i in range(0, len(new), t.QUEUED_BATCH)]
            if parts:
                sizes = [len(part) for part in parts]
                await conn.execute(sql.QUEUED_ADD, job, sizes, [t.pack_queued(p) for p in parts])
            found = len(new) + revived
            await conn.execute(sql.LISTING_QUEUED, job, owner, fence, found, done, dead, digest)
            if new or revived:  # delivered when this transaction commits
                await conn.execute(sql.NOTIFY_REGISTERED, job)
            ended += 1
            return t.Registered(len(new) + revived, done, dead)

        return await self._session.transact(queue)

    async def take_queued(
        self, job: str, owner: str, lease: float, limit: int
    ) -> tuple[list[t.QueuedRow], list[t.ClaimedRow]]:
        ended = 0  # runs that reached their end (see queue_listed)

        async def take(conn: Connection) -> tuple[list[t.QueuedRow], list[asyncpg.Record]]:
            nonlocal ended
            taken: list[t.QueuedRow] = []
            while len(taken) < limit:
                first = await conn.fetchrow(sql.QUEUED_FIRST, job)
                if first is None:
                    break
                seq, files, data = first
                if taken and files > limit - len(taken):  # later batches only whole
                    break
                rows, rest = t.unpack_queued(data, limit - len(taken))
                if rest:
                    await conn.execute(sql.QUEUED_KEEP, seq, files - len(rows), rest)
                else:
                    await conn.execute(sql.QUEUED_DROP, seq)
                taken += rows
            if not taken:
                return taken, []
            columns = _claim_columns(taken)
            found = await conn.fetch(sql.CLAIM_SCANNED, job, owner, lease, *columns)
            ended += 1
            return taken, found

        taken, found = await self._session.transact(take)
        if ended > 1:
            self._unknown_leases.add((job, owner))
        return taken, (await self._claimed(job, owner, found, shared=True)) if taken else []

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
            # Runners sharing a job grow the table together: each analyzes only if nobody
            # did since the table doubled (ANALYZE reads a sample of the whole table, and
            # concurrent ones contend; four runners each analyzing cost 8 s of the server's).
            found = await conn.fetchrow(sql.ITEMS_ROWS)
            if found is not None and found[0] > 0 and 0 < found[1] < 2 * found[0]:
                return
            await conn.execute(sql.ANALYZE_ITEMS)

        await self._session.transact(analyze, one=True)

    async def _analyze_grown(self) -> None:
        """Refresh the planner's statistics of ``items`` once the table has grown fourfold
        since they were last taken (or first reached
        :data:`~.postgres_sql.FIRST_ANALYZE_PAGES`, about 2,000 items), for runners that
        grow it together (their takes of queued files).

        The table's size on disk, not what this ledger added, says when: four runners each
        waiting until they alone had added 2,000 items left 8,000 items on a fresh table's
        plans (claims at 340-410 us a row), then analyzed at once, contending. One runner
        analyzes at a time: one that finds another analyzing leaves it to that one. What the
        plans need is statistics that say the table is not tiny (see ``_analyze``); each
        ``ANALYZE`` of a large table costs the server ~0.1 s, hence fourfold, not twofold
        (4 at 100,000 items instead of 6). Looked at each time this ledger's own additions
        have grown by half (a cheap read of the catalog), so about as often as the table
        grows by half.
        """
        self._look_after = int(self._added * _GROWN_LOOK_STEP) + 1

        async def due(conn: Connection) -> bool:
            return bool(await conn.fetchval(sql.ANALYZE_DUE, sql.FIRST_ANALYZE_PAGES))

        if not await self._session.transact(due, one=True):
            return

        async def analyze(conn: Connection) -> None:
            if await conn.fetchval(sql.ANALYZE_TAKE, sql.FIRST_ANALYZE_PAGES):
                await conn.execute(sql.ANALYZE_ITEMS)

        await self._session.transact(analyze)

    async def claim_waiting(
        self,
        job: str,
        owner: str,
        lease: float,
        limit: int,
        skip: Sequence[str] = (),
        after: tuple[int, bytes] | None = None,
    ) -> list[t.ClaimedRow]:
        runs = 0
        args: tuple[Any, ...] = (job, owner, lease, limit, list(skip), *(after or ()))
        query = sql.CLAIM_WAITING if after is None else sql.CLAIM_WAITING_AFTER

        async def claim(conn: Connection) -> list[asyncpg.Record]:
            nonlocal runs
            runs += 1
            return await conn.fetch(query, *args)

        rows = await self._session.transact(claim, one=True)
        if runs > 1:
            self._unknown_leases.add((job, owner))
        return [t.ClaimedRow.from_row(r, relpath=bytes, inode=_unsigned) for r in rows]

    async def next_retry_at(self, job: str) -> float | None:
        wait = await self._session.fetchval(sql.NEXT_RETRY_IN, job)
        return None if wait is None else self.clock() + float(wait)

    # -- the listing role --------------------------------------------------------------------------

    def _listing(self, row: asyncpg.Record) -> t.Listing:
        return t.Listing.from_row(row, times=self._session.local)

    async def take_listing(
        self, job: str, owner: str, ttl: float, *, fresh_since: float | None = None
    ) -> t.Listing:
        fresh = None if fresh_since is None else self._session.server(fresh_since)

        async def take(conn: Connection) -> asyncpg.Record | None:
            await conn.execute(sql.LISTING_TAKE, job, owner, ttl, fresh, t.LISTING_GRACE)
            return await conn.fetchrow(sql.LISTING_GET, job)

        found = await self._session.transact(take)
        assert found is not None  # inserted or kept by the statement just before
        return self._listing(found)

    async def listing(self, job: str) -> t.Listing | None:
        found = await self._session.fetch(sql.LISTING_GET, job)
        return self._listing(found[0]) if found else None

    async def begin_listing(
        self, job: str, owner: str, fence: int, *, watching: bool = False
    ) -> t.Listing | None:
        async def begin(conn: Connection) -> asyncpg.Record | None:
            if await conn.fetchval(sql.LISTING_BEGIN, job, owner, fence, not watching) is None:
                return None
            await conn.execute(sql.QUEUED_CLEAR, job)
            return await conn.fetchrow(sql.LISTING_GET, job)

        found = await self._session.transact(begin)
        return None if found is None else self._listing(found)

    async def register_listed(
        self, job: str, owner: str, fence: int, rows: Sequence[t.ScannedRow]
    ) -> t.Registered | None:
        columns: tuple[list[Any], ...] = ([], [], [], [], [])
        seen: set[str] = set()
        for key, relpath, size, mtime_ns, inode in rows:
            if key in seen:  # ON CONFLICT cannot touch a row twice in one statement
                continue
            seen.add(key)
            for column, value in zip(
                columns, (key, relpath, size, mtime_ns, _signed(inode)), strict=True
            ):
                column.append(value)

        async def register(conn: Connection) -> asyncpg.Record | None:
            found = await conn.fetchrow(sql.REGISTER_LISTED, job, owner, fence, *columns)
            if found is not None and found[0]:  # delivered when this transaction commits
                await conn.execute(sql.NOTIFY_REGISTERED, job)
            return found

        found = await self._session.transact(register, one=True)
        return None if found is None else t.Registered(*(int(n) for n in found))

    async def end_listing(
        self,
        job: str,
        owner: str,
        fence: int,
        files: int,
        *,
        done: int = 0,
        dead: int = 0,
        twins: Mapping[str, int] | None = None,
        not_ready: Mapping[str, int] | None = None,
    ) -> bool:
        async def end(conn: Connection) -> bool:
            found = (done, dead, encode_twins(twins), t.encode_not_ready(not_ready))
            params = (job, owner, fence, files, *found)
            return await conn.fetchval(sql.LISTING_END, *params) is not None

        return await self._session.transact(end, one=True)

    async def listing_changed(self, job: str, complete: int, not_ready: Mapping[str, int]) -> bool:
        async def move(conn: Connection) -> bool:
            row = await conn.fetchrow(sql.LISTING_COUNTS, job, complete)
            if row is None:
                return False
            files, counts = t.changed_counts(row[0], row[1], not_ready)
            await conn.execute(sql.LISTING_CHANGED, job, complete, files, counts)
            return True

        return await self._session.transact(move)

    async def listing_twins(self, job: str, complete: int) -> dict[str, int]:
        return decode_twins(await self._session.fetchval(sql.LISTING_TWINS, job, complete))

    async def on_registered(self, job: str, callback: Callable[[], None]) -> bool:
        callbacks = self._on_registered.setdefault(job, [])
        if callback not in callbacks:
            callbacks.append(callback)
        if self._schema is None:
            self._schema = str(await self._session.fetchval(sql.CURRENT_SCHEMA))
        return await self._session.listen(sql.REGISTERED_CHANNEL, self._registered)

    def _registered(self, payload: str) -> None:
        try:
            schema, job = json.loads(payload)
        except (ValueError, TypeError):  # an older asyncbatch's: the job alone
            schema, job = self._schema, payload
        if schema != self._schema or not isinstance(job, str):
            return  # a ledger in another schema of the database
        for callback in self._on_registered.get(job, ()):
            callback()

    async def _finish_counts(
        self, job: str, owner: str, since: float
    ) -> tuple[dict[str, int], dict[str, int]]:
        server_since = self._session.server(since)

        async def read(conn: Connection) -> tuple[dict[str, int], dict[str, int]]:
            counts: dict[str, int] = {}
            others: dict[str, int] = {}
            for state, n, by_others in await conn.fetch(
                sql.FINISH_COUNTS, job, owner, server_since
            ):
                counts[str(state)] = int(n)
                if state in ("done", "dead", "vanished") and by_others:
                    others[str(state)] = int(by_others)
            queued = int(await conn.fetchval(sql.QUEUED_FILES, job))
            if queued:
                counts["pending"] = counts.get("pending", 0) + queued
            return counts, others

        return await self._session.read(read)

    async def work_left(self, job: str) -> bool:
        return bool(await self._session.fetchval(sql.WORK_LEFT, job, WORK_LEFT_NEWEST))

    # -- outcomes ----------------------------------------------------------------------------------

    async def commit_outcomes(
        self, job: str, owner: str, outcomes: Sequence[t.Outcome], started: t.Leases = ()
    ) -> set[str]:
        # A retry time (``next_attempt_at``, in the caller's clock) is stored as the same delay
        # from the server's now.
        now = self.clock()
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [], [], [])
        for o in outcomes:
            size, mtime_ns, inode = o.stat or (None, None, None)
            delay = None if o.next_attempt_at is None else o.next_attempt_at - now
            began = None if o.started_at is None else min(o.started_at - now, 0.0)
            row = (o.key, o.fence, o.state, o.error, delay, o.post_action, size, mtime_ns)
            inode_value = None if inode is None else _signed(inode)
            for column, value in zip(columns, (*row, inode_value, o.attempted, began), strict=True):
                column.append(value)
        finished = {o.key for o in outcomes}
        for key, fence in started:
            if key not in finished:  # a finished attempt is counted with its outcome
                finished.add(key)
                # state NULL: started, still running
                running = (key, fence, None, None, None, None, None, None, None, True, None)
                for column, value in zip(columns, running, strict=True):
                    column.append(value)
        if not finished:
            return set()

        runs = 0

        async def commit(conn: Connection) -> list[asyncpg.Record]:
            nonlocal runs
            runs += 1
            return await conn.fetch(sql.COMMIT_OUTCOMES, job, owner, *columns)

        session = self._outcomes()
        rows = await session.transact(commit, one=True)
        lost = {o.key for o in outcomes} - {key for key, outcome in rows if outcome}
        if lost and runs > 1:
            # Run again after its connection was lost: a run before may have committed, its
            # reply lost with the connection. A row that holds this lease's outcome (still this
            # runner's, the same fence, finished) is that commit's, not a lease taken over.
            fences = {o.key: o.fence for o in outcomes}
            for key, row_owner, fence, state in await session.fetch(
                sql.LEASE_STATE, job, sorted(lost)
            ):
                if row_owner == owner and fence == fences[key] and state != "running":
                    lost.discard(key)
        return lost

    async def release_items(self, job: str, owner: str, items: t.Leases) -> None:
        if not items:
            return
        keys = [key for key, _ in items]
        fences = [fence for _, fence in items]

        async def release(conn: Connection) -> None:
            await conn.execute(sql.RELEASE_ITEMS, job, owner, keys, fences)

        await self._outcomes().transact(release, one=True)

    async def record_move(
        self, job: str, owner: str, key: str, fence: int, dst: str, src: str | None = None
    ) -> bool:
        async def record(conn: Connection) -> bool:
            moved = encode_move(dst, src)
            return await conn.fetchval(sql.RECORD_MOVE, job, key, owner, fence, moved) is not None

        return await self._session.transact(record, one=True)

    async def move_destinations(self, job: str) -> list[str]:
        rows = await self._session.fetch(sql.MOVE_DESTINATIONS, job)
        return [path for (action,) in rows if (path := decode_action(action)[1])]

    # -- the operator's reads, and retry ----------------------------------------------------------

    async def _state_counts(self, job: str) -> dict[str, int]:
        async def read(conn: Connection) -> dict[str, int]:
            counts = {str(s): int(n) for s, n in await conn.fetch(sql.COUNTS, job)}
            queued = int(await conn.fetchval(sql.QUEUED_FILES, job))
            if queued:
                counts["pending"] = counts.get("pending", 0) + queued
            return counts

        return await self._session.read(read)

    async def queued_files(self, job: str) -> int:
        return int(await self._session.fetchval(sql.QUEUED_FILES, job))

    async def _states_of(self, job: str, keys: Sequence[str]) -> dict[str, str]:
        rows = await self._session.fetch(sql.STATES_OF, job, list(keys))
        return {str(key): str(state) for key, state in rows}

    async def oldest_waiting(self, job: str) -> float | None:
        oldest = await self._session.fetchval(sql.OLDEST_WAITING, job)
        return None if oldest is None else self._session.local(float(oldest))

    async def failures(self, job: str, limit: int) -> list[t.ItemInfo]:
        return [self._item(r) for r in await self._session.fetch(sql.FAILURES, job, limit)]

    async def _items_by_key(self, job: str, key: str) -> list[t.ItemInfo]:
        return [self._item(r) for r in await self._session.fetch(sql.ITEM_BY_KEY, job, key)]

    async def _items_by_relpath(self, job: str, relpath: bytes) -> list[t.ItemInfo]:
        rows = await self._session.fetch(sql.ITEMS_BY_RELPATH, job, relpath)
        return [self._item(r) for r in rows]

    async def actions_due(self, job: str, keys: Sequence[str]) -> list[t.ItemInfo]:
        rows = await self._session.fetch(sql.ACTIONS_DUE, job, list(keys))
        return [self._item(r) for r in rows]

    def _filter_args(
        self, which: t.ItemFilter, names: list[str], after: PageEnd | None = None
    ) -> list[Any]:
        """The arguments of a :func:`postgres_sql.list_items` statement, times the server's
        (``after``: a keyset page's start, as the ledger gave it: its time the server's)."""
        server = self._session.server
        values: dict[str, Any] = {
            "after_u": None if after is None else after[0],
            "after_k": None if after is None else after[1],
            "states": list(which.states),
            "after": None if which.after is None else server(which.after),
            "before": None if which.before is None else server(which.before),
            "glob": None if which.glob is None else glob_regex(which.glob),
            "limit": which.limit,
        }
        return [values[name] for name in names]

    async def list_items(self, job: str, which: t.ItemFilter) -> list[t.ItemInfo]:
        query, names = sql.list_items(which)
        rows = await self._session.fetch(query, job, *self._filter_args(which, names))
        return [self._item(r) for r in rows]

    async def _items_page(
        self, job: str, which: t.ItemFilter, after: PageEnd | None
    ) -> tuple[list[t.ItemInfo], PageEnd | None]:
        query, names = sql.list_items(which, keyset=after is not None)
        rows = await self._session.fetch(query, job, *self._filter_args(which, names, after))
        end = (float(rows[-1]["updated_at"]), str(rows[-1]["key"])) if rows else None
        return [self._item(r) for r in rows], end

    async def _forget_page(
        self, job: str, done_before: float | None, after: str, limit: int
    ) -> t.Forgotten:
        params: tuple[Any, ...] = (job, after, limit)
        if done_before is None:
            query = sql.FORGET_PAGE_VANISHED
        else:
            query, params = sql.FORGET_PAGE_DONE, (*params, self._session.server(done_before))

        async def forget(conn: Connection) -> t.Forgotten:
            gone = [self._item(r) for r in await conn.fetch(query, *params)]
            if gone:
                await conn.execute(sql.FORGET_KEYS, job, [item.key for item in gone])
                await _log_forgotten(conn, job, gone)
            return t.Forgotten(tuple(gone))

        return await self._session.transact(forget)

    async def count_items(self, job: str, which: t.ItemFilter) -> int:
        query, names = sql.list_items(which, count=True)
        return int(await self._session.fetchval(query, job, *self._filter_args(which, names)))

    async def _forget_keys(self, job: str, keys: list[str]) -> t.Forgotten:
        async def forget(conn: Connection) -> t.Forgotten:
            gone: list[t.ItemInfo] = []
            refused: list[t.ItemInfo] = []
            for row in await conn.fetch(sql.FORGET_READ, job, keys):
                lease = row["lease_until"]  # in the server's clock, as is "now"
                live = row["state"] == "running" and lease is not None and lease >= row["now"]
                (refused if live else gone).append(self._item(row))
            if gone:
                await conn.execute(sql.FORGET_KEYS, job, [item.key for item in gone])
                await _log_forgotten(conn, job, gone)
            return t.Forgotten(tuple(gone), tuple(refused))

        return await self._session.transact(forget)

    async def _forget_done_before(self, job: str, before: float) -> t.Forgotten:
        cutoff = self._session.server(before)

        async def forget(conn: Connection) -> t.Forgotten:
            gone = [
                self._item(r) for r in await conn.fetch(sql.FORGET_READ_DONE_BEFORE, job, cutoff)
            ]
            await conn.execute(sql.FORGET_DONE_BEFORE, job, cutoff)
            await _log_forgotten(conn, job, gone)
            return t.Forgotten(tuple(gone))

        return await self._session.transact(forget)

    async def look_again(self, job: str, relpaths: Sequence[bytes]) -> None:
        if not relpaths:
            return

        async def log(conn: Connection) -> None:
            await _log_names(conn, job, relpaths)

        await self._session.transact(log)  # not one statement: the lock is held to its end

    async def forgotten_since(self, job: str, seq: int | None) -> tuple[int, list[bytes]]:
        if seq is None:
            return int(await self._session.fetchval(sql.FORGOTTEN_LAST, job)), []
        rows = await self._session.fetch(sql.FORGOTTEN_SINCE, job, seq)
        last = max((number for number, _ in rows), default=seq)
        return int(last), [bytes(relpath) for _, relpath in rows]

    async def _finished_by(self, job: str, owners: Sequence[str]) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for runner, state, n in await self._session.fetch(sql.FINISHED_BY, job, list(owners)):
            found.setdefault(str(runner), {})[str(state)] = int(n)
        return found

    async def _runs(self, job: str, limit: int) -> list[t.RunInfo]:
        local = self._session.local
        rows = await self._session.fetch(sql.RUNS_OF_JOB, job, limit)
        return [t.RunInfo.from_row(r, times=local) for r in rows]

    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        states = ["failed", "dead"] if dead else ["failed"]

        async def reset(conn: Connection) -> Any:
            if keys is None:
                return await conn.fetchval(sql.RETRY_ALL, job, states)
            return await conn.fetchval(sql.RETRY_KEYS, job, states, list(keys))

        return int(await self._session.transact(reset, one=True))

    # -- the idempotency store ---------------------------------------------------------------------

    async def idempotency_claim(
        self, request: t.IdempotencyRequest, *, lock_timeout: float, ttl: float
    ) -> t.IdempotencyClaim:
        fresh = (*astuple(request), lock_timeout, max(ttl, lock_timeout))

        async def claim(conn: Connection) -> t.IdempotencyClaim:
            if await conn.fetchval(sql.IDEMPOTENCY_INSERT, *fresh) is not None:
                return t.IdempotencyClaim("run", "new")
            row = await conn.fetchrow(sql.IDEMPOTENCY_GET, request.scope, request.key)
            assert row is not None  # a conflicting insert waits for the row's commit
            record = IdempotencyRecord.from_row(row)  # in the server's clock, as is "now"
            found = decide_idempotency(request.fingerprint, record, row["now"])
            if found.decision == "run":
                await conn.execute(sql.IDEMPOTENCY_TAKE_OVER, *fresh)
            return found

        return await self._session.transact(claim, again=False)  # a lost commit: 409, not run twice

    async def idempotency_start(self, request: t.IdempotencyRequest) -> bool:
        who = (request.scope, request.key, request.token)

        async def start(conn: Connection) -> bool:
            return await conn.fetchval(sql.IDEMPOTENCY_START, *who) is not None

        return await self._session.transact(start, one=True)

    async def idempotency_complete(
        self, request: t.IdempotencyRequest, response: t.StoredResponse, *, ttl: float
    ) -> bool:
        headers = encode_headers(response.headers)
        who = (request.scope, request.key, request.token)
        params = (*who, response.status, headers, response.body, ttl)

        async def complete(conn: Connection) -> bool:
            return await conn.fetchval(sql.IDEMPOTENCY_COMPLETE, *params) is not None

        return await self._session.transact(complete, one=True)

    async def idempotency_unstored(
        self, request: t.IdempotencyRequest, reason: t.UnstoredReason, *, ttl: float
    ) -> bool:
        params = (request.scope, request.key, request.token, reason, ttl)

        async def unstored(conn: Connection) -> bool:
            return await conn.fetchval(sql.IDEMPOTENCY_UNSTORED, *params) is not None

        return await self._session.transact(unstored, one=True)

    async def idempotency_release(self, request: t.IdempotencyRequest) -> None:
        async def release(conn: Connection) -> None:
            await conn.execute(sql.IDEMPOTENCY_RELEASE, request.scope, request.key, request.token)

        await self._session.transact(release, one=True)

    async def idempotency_purge(self) -> int:
        async def purge(conn: Connection) -> int:
            return int(await conn.fetchval(sql.IDEMPOTENCY_PURGE))

        return await self._session.transact(purge, one=True)
