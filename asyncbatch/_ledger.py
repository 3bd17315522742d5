"""The ledger: the only state that outlives a run (see :mod:`._ledger_base` for its guarantees).

This module holds what a runner does with it: the job lock, runner liveness, claims with leases
and fencing tokens, and outcomes. Every write is one transaction on the ledger's thread
(``_transact``); the transaction bodies are the ``_tx_*`` functions below, synchronous code over
a plain ``sqlite3.Connection``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import _sql as sql
from ._actions import decode_action, encode_action
from ._exceptions import ConfigurationError, JobLockedError
from ._ledger_base import Durability, LedgerConnection
from ._ledger_queries import ItemInfo, LedgerQueries, LockInfo, RunInfo
from ._procinfo import ProcessIdentity, holder_is_alive

__all__ = [
    "ClaimedRow",
    "Durability",
    "ItemInfo",
    "Ledger",
    "LedgerConnection",
    "LockInfo",
    "Outcome",
    "RunInfo",
]


class ClaimedRow(NamedTuple):
    """What a claim statement returned for one item.

    ``attempts`` counts the attempts that started, ``interrupted`` those of them that the
    runner's death or stop cut short. ``relpath``, ``size``, ``mtime_ns`` and ``inode`` are the
    row's: for a finished row, the file that was handled.
    """

    key: str
    state: str
    fence: int
    attempts: int
    interrupted: int = 0
    post_action: str | None = None
    relpath: bytes = b""
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0


class Outcome(NamedTuple):
    """A finished attempt, to be committed: ``state`` is done, failed, dead or vanished.

    ``stat`` is ``(size, mtime_ns, inode)`` of the file handled when it is not the scanned one
    (identity ``"path"``: the name was rewritten between the scan and the open), so that a
    post-commit action later recognises the file that was handled. ``attempted`` is ``False``
    for an item given up on without running: no attempt is counted for it.
    """

    key: str
    fence: int
    state: str
    error: str | None = None
    next_attempt_at: float | None = None
    post_action: str | None = None
    stat: tuple[int, int, int] | None = None
    attempted: bool = True


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def _runner_alive(runner: Sequence[Any], now: float, me: ProcessIdentity) -> bool:
    _, pid, host, pid_start, _, _, _, expires_at = runner
    if expires_at < now:
        return False
    return holder_is_alive(ProcessIdentity(host or "", pid or 0, pid_start), me=me) is not False


# -- transaction bodies (run on the ledger's thread, inside BEGIN IMMEDIATE) ---------------------


def _tx_ensure_job(conn: sqlite3.Connection, job: str, identity: str, now: float) -> str:
    conn.execute(sql.ADD_JOB, (job, identity, now))
    return str(conn.execute(sql.GET_JOB, (job,)).fetchone()[0])


def _tx_acquire_lock(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    me: ProcessIdentity,
    ttl: float,
    shared: bool,
    now: float,
) -> LockInfo | None:
    row = conn.execute(sql.LOCK_GET, (job,)).fetchone()
    stale: LockInfo | None = None
    if row is not None:
        held = LockInfo(*row)
        if held.expires_at >= now and holder_is_alive(held.holder, me=me) is not False:
            raise JobLockedError(job, held.pid, held.host, _iso(held.acquired_at))
        stale = held
    if not shared:
        for runner in conn.execute(sql.RUNNERS_OF_JOB, (job,)).fetchall():
            if runner[4] and _runner_alive(runner, now, me):
                raise JobLockedError(job, runner[1], runner[2], _iso(runner[5]))
        lock = (owner, me.pid, me.host, me.pid_start, now, now + ttl)
        if stale is None:
            conn.execute(sql.LOCK_INSERT, (job, *lock))
        else:
            conn.execute(sql.LOCK_TAKE_OVER, (*lock, job, stale.owner))
    elif stale is not None:
        conn.execute(sql.LOCK_RELEASE, (job, stale.owner))
    return stale


def _tx_reap(conn: sqlite3.Connection, job: str, me: ProcessIdentity, now: float) -> int:
    released = 0
    for runner in conn.execute(sql.RUNNERS_OF_JOB, (job,)).fetchall():
        if _runner_alive(runner, now, me):
            continue
        released += max(conn.execute(sql.REAP_ITEMS, (now, job, runner[0])).rowcount, 0)
        conn.execute(sql.RUNNER_REMOVE, (runner[0],))
    return released


def _tx_heartbeat(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    until: float,
    now: float,
    leases: Sequence[tuple[str, int]],
    holds_lock: bool,
) -> bool:
    alive = conn.execute(sql.RUNNER_EXTEND, (now, until, owner)).rowcount == 1
    if holds_lock:
        alive = alive and conn.execute(sql.LOCK_EXTEND, (until, job, owner)).rowcount == 1
    if alive and leases:
        conn.executemany(
            sql.EXTEND_LEASE, [(until, job, key, owner, fence) for key, fence in leases]
        )
    return alive


def _tx_claim_scanned(
    conn: sqlite3.Connection, query: str, params: list[Any], check: tuple[Any, ...]
) -> str | None:
    conn.execute(query, params)
    found = conn.execute(sql.CLAIMED_IN_CHUNK, check).fetchone()
    return None if found is None else str(found[0])


def _tx_commit(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    now: float,
    started: tuple[str, str] | None,
    done: list[tuple[str | None, str, str]],
    other: list[dict[str, Any]],
    keys: str,
    expected: int,
) -> list[tuple[str, str | None, int, str]] | None:
    if started is not None:
        conn.execute(sql.MARK_STARTED, (job, owner, *started))
    changed = 0
    for post_action, done_keys, pairs in done:
        params = (job, owner, done_keys, pairs, post_action, now)
        changed += conn.execute(sql.MARK_DONE, params).rowcount
    if other:
        changed += conn.executemany(sql.MARK_OUTCOME, other).rowcount
    if changed == expected:
        return None
    return [tuple(r) for r in conn.execute(sql.LEASE_STATE, (job, keys)).fetchall()]


def _fenced_group(pairs: Sequence[tuple[str, int]]) -> tuple[str, str]:
    """The two JSON arguments of a fenced group statement: keys, and "key fence" pairs."""
    return json.dumps([k for k, _ in pairs]), json.dumps([f"{k} {f}" for k, f in pairs])


class Ledger(LedgerQueries):
    """An open SQLite ledger: the job lock, runner liveness, claims, outcomes, and queries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim_sql: dict[int, str] = {}  # claim statement text by chunk size

    # -- jobs, the job lock and runners ------------------------------------------------------------

    async def ensure_job(self, job: str, identity: str) -> None:
        """Record the job's identity mode; refuse a different one for an existing job."""
        recorded = await self._transact(_tx_ensure_job, job, identity, self.clock())
        if recorded != identity:
            raise ConfigurationError(
                f"job {job!r} uses identity={recorded!r} in state {str(self.path)!r}, not "
                f"{identity!r}: keep the identity or use another --job"
            )

    async def acquire_lock(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool
    ) -> LockInfo | None:
        """Take the job lock (or, ``shared``, check that no exclusive runner holds it).

        A lock whose holder is gone is taken over at once: same host and a dead pid (or a pid
        now used by another process), or an expired heartbeat. Returns the stale lock that was
        taken over, if any. Raises :class:`JobLockedError` while a live runner holds it.
        """
        return await self._transact(_tx_acquire_lock, job, owner, me, ttl, shared, self.clock())

    async def register_runner(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool, mode: str
    ) -> int:
        """Record this runner (for the liveness of its leases) and open a run history row."""

        def register(conn: sqlite3.Connection, now: float) -> int:
            conn.execute(
                sql.RUNNER_ADD,
                (owner, job, me.pid, me.host, me.pid_start, int(shared), now, now, now + ttl),
            )
            cursor = conn.execute(sql.RUN_START, (job, owner, me.pid, me.host, mode, now))
            return cursor.lastrowid or 0

        return await self._transact(register, self.clock())

    async def reap_stale_runners(self, job: str, me: ProcessIdentity) -> int:
        """Hand the leased items of runners that are gone back to the ledger.

        Returns how many items were released. A full scan of the job's items, done only when a
        runner is found gone (after a crash).
        """
        return await self._transact(_tx_reap, job, me, self.clock())

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
        return await self._transact(
            _tx_heartbeat, job, owner, now + ttl, now, list(leases), holds_lock
        )

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

        def release(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(sql.RUNNER_REMOVE, (owner,))
            if holds_lock:
                conn.execute(sql.LOCK_RELEASE, (job, owner))
            conn.execute(sql.RUN_FINISH, (now, *totals, exit_status, run_id))

        await self._transact(release, self.clock())

    async def force_unlock(self, job: str, owner: str) -> bool:
        """Delete a job lock held by ``owner``; ``False`` when it was not held by it."""

        def unlock(conn: sqlite3.Connection) -> bool:
            return conn.execute(sql.LOCK_RELEASE, (job, owner)).rowcount == 1

        return await self._transact(unlock)

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
        expired entries are leased with ``fence`` and ``attempts`` incremented; finished ones
        cost an index probe. Returns the rows leased to us (``state='running'``), plus dead rows
        and finished rows with a post-commit action, so the caller can count or finish them.
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
        check = (job, json.dumps([row[0] for row in rows]), owner, now)
        found = await self._transact(_tx_claim_scanned, query, params, check)
        if not found:
            return []
        claimed = []
        for r in json.loads(found):
            if len(r) > 6:  # a finished row, with the file that was handled (relpath in hex)
                r[6] = bytes.fromhex(r[6])
            claimed.append(ClaimedRow(*r))
        return claimed

    async def claim_waiting(
        self, job: str, owner: str, lease: float, limit: int
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` items waiting in the ledger: pending, or failed and due."""

        def claim(conn: sqlite3.Connection, now: float) -> list[Any]:
            return conn.execute(sql.CLAIM_WAITING, (job, owner, now + lease, now, limit)).fetchall()

        result = await self._transact(claim, self.clock())
        return [
            ClaimedRow(r[0], "running", r[5], r[6], r[7], r[8], r[1], r[2], r[3], r[4])
            for r in result
        ]

    # -- outcomes ----------------------------------------------------------------------------------

    async def commit_outcomes(
        self,
        job: str,
        owner: str,
        outcomes: Sequence[Outcome],
        started: Sequence[tuple[str, int]] = (),
    ) -> set[str]:
        """Record finished attempts in one transaction; return the keys whose lease was lost.

        ``started`` lists ``(key, fence)`` of attempts that began and are still running: their
        attempt is counted now (a finished one is counted with its outcome). An item is done
        when, and only when, this transaction commits. A row whose owner or fence changed
        (another runner took the lease) is not touched, and its key is returned.
        """
        now = self.clock()
        groups: dict[str | None, list[tuple[str, int]]] = {}
        other: list[dict[str, Any]] = []
        for o in outcomes:
            if o.state == "done" and o.stat is None:
                groups.setdefault(o.post_action, []).append((o.key, o.fence))
            else:
                size, mtime_ns, inode = o.stat or (None, None, None)
                other.append(
                    {
                        "state": o.state,
                        "next_attempt_at": o.next_attempt_at,
                        "error": o.error,
                        "post_action": o.post_action,
                        "size": size,
                        "mtime_ns": mtime_ns,
                        "inode": inode,
                        "now": now,
                        "attempted": o.attempted,
                        "job": job,
                        "key": o.key,
                        "owner": owner,
                        "fence": o.fence,
                    }
                )
        done = [(post, *_fenced_group(group)) for post, group in groups.items()]
        keys = json.dumps([o.key for o in outcomes])
        rows = await self._transact(
            _tx_commit,
            job,
            owner,
            now,
            _fenced_group(started) if started else None,
            done,
            other,
            keys,
            len(outcomes),
        )
        if rows is None:
            return set()
        mine = {o.key: o for o in outcomes}
        lost = {
            key
            for key, row_owner, fence, state in rows
            if row_owner != owner or fence != mine[key].fence or state == "running"
        }
        return lost | (set(mine) - {r[0] for r in rows})

    async def release_items(
        self, job: str, owner: str, items: Sequence[tuple[str, int, bool]]
    ) -> None:
        """Give leased items back (``(key, fence, started)``) to be claimed again.

        Attempts are counted when they start (see ``commit_outcomes``), so nothing is undone.
        """
        if not items:
            return

        def release(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany(
                sql.RELEASE_ITEM,
                [(now, job, key, owner, fence) for key, fence, _started in items],
            )

        await self._transact(release, self.clock())

    async def move_destinations(self, job: str) -> list[str]:
        """Where ``ctx.move()`` took or was taking the inputs of the job's unfinished items."""
        async with self._read():
            rows = await self._fetchall(sql.MOVE_DESTINATIONS, (job,))
        return [path for (action,) in rows if (path := decode_action(action)[1]) is not None]

    async def record_move(self, job: str, owner: str, key: str, fence: int, dst: str) -> bool:
        """Note, under our lease, that the item's input is being moved to ``dst``.

        Returns ``False`` when the lease is no longer ours (the caller must not move).
        """

        def record(conn: sqlite3.Connection, now: float) -> bool:
            params = (encode_action("moved", dst), now, job, key, owner, fence)
            return conn.execute(sql.RECORD_MOVE, params).rowcount == 1

        return await self._transact(record, self.clock())
