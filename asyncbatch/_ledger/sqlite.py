"""The SQLite ledger: one file on a local disk, shared by the runners of one host.

- WAL mode, ``isolation_level=None`` and an explicit ``BEGIN IMMEDIATE`` for every transaction
  that writes (a deferred read-then-write transaction can fail with ``SQLITEBUSY`` that no
  busy timeout waits out). A transaction is one function on aiosqlite's connection thread (one
  hop: :mod:`.aiosqlite_bridge`): the write lock is held only while SQLite works, and a
  cancelled caller never leaves a transaction open, since the function runs to COMMIT or
  ROLLBACK regardless. Waits for another process's write lock are short jittered retries on
  the event loop, up to ``busy_timeout``.
- Times are the runner's wall clock (``clock``), which is what leases are judged by: the
  runners of one host share it.
- A file that is not an asyncbatch ledger, or has a newer schema, is refused before anything is
  written to it (:mod:`.sqlite_open`). So is a damaged one: ``PRAGMA quick_check`` runs before
  the first write of every connection (a run: at its open, before the switch to WAL; about
  50 ms for 100,000 items in the page cache). A damaged page met later (``SQLITE_CORRUPT``)
  stops every write of that connection at once (:class:`~asyncbatch.DamagedLedgerError`):
  no ``runs`` row saying so is written into the damaged file. A new state file and its
  ``-wal``/``-shm`` are made with mode 0600. A state file deleted or replaced while open
  stops the next write.
- sqlite3 errors leave as :class:`~asyncbatch.LedgerError` with the original as ``__cause__``.

Every statement is in :mod:`.sqlite_sql`; the transaction bodies are the synchronous ``_tx_*``
functions below, over a plain ``sqlite3.Connection``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final, Self, TypeVar

import aiosqlite
import anyio

from .. import _failpoints as failpoints
from .._exceptions import (
    DamagedLedgerError,
    LedgerError,
    NotALedgerError,
    SchemaMismatchError,
    SchemaVersionError,
)
from .._procinfo import ProcessIdentity, this_process
from . import sqlite_sql as sql
from . import types as t
from .actions import decode_action, encode_move
from .aiosqlite_bridge import connect, on_thread, raw
from .base import (
    BUSY,
    FORGOTTEN_KEPT,
    WORK_LEFT_NEWEST,
    Busy,
    Ledger,
    PageEnd,
    decide_job,
    decide_lock,
    decode_twins,
    encode_twins,
    end_of_gone,
    glob_regex,
    live_user,
    retrying,
    schema_difference,
    upgrade_refused,
)
from .idempotency import IdempotencyRecord, decide_idempotency, encode_headers
from .sqlite_open import (
    check_state_path,
    companions,
    damaged,
    foreign_wal,
    is_damage,
    open_error,
    read_only_view,
    wal_kept,
)

__all__ = ["SQLiteLedger"]

log = logging.getLogger("asyncbatch.ledger")

T = TypeVar("T")
#: SQLite's own busy wait (ms) before a statement reports the database locked; waits for the
#: write lock are retried by the transaction runner, in short jittered steps, up to busy_timeout.
_SQLITEBUSY_MS = 20
#: The fields of a claimed row that is not finished (see :func:`_claimed`).
_LEASED = len(t.LEASE_FIELDS)


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "locked" in text or "busy" in text


def _named(conn: sqlite3.Connection, query: str, params: Any = ()) -> list[dict[str, Any]]:
    """The rows of ``query``, each a dict by column name: the reads that build value objects
    (the hot path's statements keep plain tuples)."""
    cursor = conn.execute(query, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


#: An item's full record (a row of ``sqlite_sql._ITEM_COLUMNS``).
_item: Final = t.ItemInfo.reader(relpath=os.fsdecode)
#: A registered runner (a row of ``sqlite_sql.RUNNERS_OF_JOB``).
_runner: Final = t.RunnerInfo.reader(shared=bool)


def _claimed(found: str) -> list[t.ClaimedRow]:
    """The rows of a chunk's claim, as :data:`sqlite_sql.CLAIMED_IN_CHUNK` gives them: JSON
    arrays of the :class:`~.types.ClaimedRow` fields, in order (the hot path: a claim makes
    one per item); a finished row has them all, its handled file's relpath in hex."""
    claimed = []
    for values in json.loads(found):
        if len(values) == _LEASED:
            claimed.append(t.ClaimedRow(*values))
        else:
            row = dict(zip(t.ClaimedRow.columns(), values, strict=True))
            claimed.append(t.ClaimedRow.from_row(row, relpath=bytes.fromhex))
    return claimed


def _glob(regex: str, relpath: bytes) -> bool:
    """The SQL function :data:`sqlite_sql.GLOB_FUNCTION`: ``relpath`` against a
    :func:`~.base.glob_regex`, byte for byte (as PostgreSQL matches it)."""
    return re.fullmatch(regex, bytes(relpath).decode("latin-1"), re.DOTALL) is not None


def _log_forgotten(
    conn: sqlite3.Connection, job: str, gone: Sequence[t.ItemInfo], now: float
) -> None:
    """Log the names of forgotten items for watches under way; prune the old entries."""
    _log_names(conn, job, [os.fsencode(item.relpath) for item in gone], now)


def _log_names(conn: sqlite3.Connection, job: str, relpaths: Sequence[bytes], now: float) -> None:
    """Log names for watches under way to look at again; prune the old entries."""
    if relpaths:
        conn.executemany(sql.FORGOTTEN_ADD, [(job, relpath, now) for relpath in relpaths])
        conn.execute(sql.FORGOTTEN_PRUNE, (now - FORGOTTEN_KEPT,))


def _lease_is_live(item: t.ItemInfo, now: float) -> bool:
    return item.state == "running" and item.lease_until is not None and item.lease_until >= now


#: A key JSON writes as it is, between quotes (item keys are digits, ``-`` and hex).
_PLAIN_KEY = re.compile(r"[0-9A-Za-z_.:-]*")


def _fenced_group(pairs: Sequence[tuple[str, int]]) -> tuple[str, str]:
    """The two JSON arguments of a fenced group statement: keys, and "key fence" pairs.

    Keys that need no escaping (all of them, as keys are made) are joined as text: the
    usual group holds one item (an exec run commits every few items, a statement for each
    millisecond their attempts started in), and ``json.dumps`` costs more than the rest."""
    keys = [k for k, _ in pairs]
    fenced = [f"{k} {f}" for k, f in pairs]
    if keys and _PLAIN_KEY.fullmatch("".join(keys)):
        return '["' + '","'.join(keys) + '"]', '["' + '","'.join(fenced) + '"]'
    return json.dumps(keys), json.dumps(fenced)


def _tables(conn: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    tables: dict[str, tuple[str, ...]] = {}
    for table, column in conn.execute(sql.TABLE_COLUMNS).fetchall():
        tables[table] = (*tables.get(table, ()), column)
    return tables


def _check_tables(conn: sqlite3.Connection, name: str, found: int) -> None:
    """Refuse (:class:`SchemaMismatchError`) a ledger whose tables are not those of this
    schema version: a table or column missing, renamed or added by something else."""
    difference = schema_difference(sql.TABLES, _tables(conn))
    if difference is not None:
        raise SchemaMismatchError(name, found, sql.SCHEMA_VERSION, difference)


# -- transaction bodies (run on the ledger's thread, inside BEGIN IMMEDIATE) ---------------------


def _tx_migrate(conn: sqlite3.Connection, now: float, name: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if 0 < version < sql.SCHEMA_VERSION:  # an older asyncbatch's: none of its runners may use it
        # (0: a fresh state; this version: another runner of it upgraded it meanwhile)
        user = live_user(conn.execute(sql.LEDGER_USERS).fetchall(), now, this_process())
        if user is not None:
            raise upgrade_refused(name, version, sql.SCHEMA_VERSION, user)
    found = version
    while version < sql.SCHEMA_VERSION:
        for statement in sql.MIGRATIONS[version].split(";\n"):
            if not statement.strip():
                continue
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as e:
                # (A plain SQL error: a table or column that is there already, or missing.
                # Not a full disk, an I/O error or a busy file: those keep their meaning.)
                if e.sqlite_errorcode != sqlite3.SQLITE_ERROR:
                    raise
                raise SchemaMismatchError(name, found, sql.SCHEMA_VERSION, str(e)) from None
        version += 1
    if found:  # (rolled back with the rest: an upgrade that leaves other tables is refused)
        _check_tables(conn, name, found)
    conn.execute(f"PRAGMA application_id = {sql.APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
    # Made here, on the ledger's thread, never passed as an argument: aiosqlite logs every
    # call's arguments at DEBUG.
    conn.execute(sql.PUT_META, ("secret", secrets.token_hex(32)))
    conn.execute(sql.PUT_META, ("created_at", repr(now)))


def _tx_start_runner(
    conn: sqlite3.Connection, start: t.RunStart, state: str, now: float
) -> t.Started:
    job, settings = start.job, start.settings.to_json()
    conn.execute(sql.ADD_JOB, (job, start.identity, now, settings))
    identity, recorded = conn.execute(sql.GET_JOB_RECORD, (job,)).fetchone()
    record, changed = decide_job(
        state,
        start,
        identity,
        None if recorded is None else t.JobSettings.from_json(recorded, job),
    )
    stale = _take_lock(conn, job, start.owner, start.me, start.ttl, start.shared, now)
    if record:
        conn.execute(sql.SET_JOB_SETTINGS, (settings, job))
    me = start.me
    who = {"job": job, "owner": start.owner, "pid": me.pid, "host": me.host, "now": now}
    conn.execute(
        sql.RUNNER_ADD,
        {**who, "pid_start": me.pid_start, "shared": start.shared, "expires_at": now + start.ttl},
    )
    note = "; ".join(changed) or None
    run = conn.execute(sql.RUN_START, {**who, "mode": start.mode, "settings_changed": note})
    return t.Started(run.lastrowid or 0, stale, changed)


def _take_lock(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    me: ProcessIdentity,
    ttl: float,
    shared: bool,
    now: float,
) -> t.LockInfo | None:
    """The lock part of :meth:`SQLiteLedger.start_runner`; returns the stale lock."""
    held = next((t.LockInfo.from_row(row) for row in _named(conn, sql.LOCK_GET, (job,))), None)
    runners = [] if shared else [_runner(r) for r in _named(conn, sql.RUNNERS_OF_JOB, (job,))]
    stale = decide_lock(job, held, runners, me=me, shared=shared, now=now)
    if stale is not None:
        ended = end_of_gone(stale.holder, me=me)
        conn.execute(
            sql.RUN_KILLED, {"job": job, "owner": stale.owner, "now": now, "status": ended}
        )
    if shared:
        if stale is not None:
            conn.execute(sql.LOCK_RELEASE, (job, stale.owner))
        return stale
    lock = {"job": job, "owner": owner, "pid": me.pid, "host": me.host, "pid_start": me.pid_start}
    lock.update(now=now, expires_at=now + ttl)
    if stale is None:
        conn.execute(sql.LOCK_INSERT, lock)
    else:
        conn.execute(sql.LOCK_TAKE_OVER, {**lock, "stale_owner": stale.owner})
    return stale


def _tx_reap(
    conn: sqlite3.Connection, job: str, me: ProcessIdentity, orphans: bool, now: float
) -> int:
    released = 0
    for runner in [_runner(r) for r in _named(conn, sql.RUNNERS_OF_JOB, (job,))]:
        if runner.alive(now, me):
            continue
        ended = end_of_gone(runner.holder, me=me)
        conn.execute(
            sql.RUN_KILLED, {"job": job, "owner": runner.owner, "now": now, "status": ended}
        )
        released += max(conn.execute(sql.REAP_ITEMS, (now, job, runner.owner)).rowcount, 0)
        conn.execute(sql.RUNNER_REMOVE, (runner.owner,))
    if orphans:
        for (owner,) in conn.execute(sql.ORPHANED_OWNERS, (job,)).fetchall():
            released += max(conn.execute(sql.REAP_ITEMS, (now, job, owner)).rowcount, 0)
    return released


def _tx_heartbeat(
    conn: sqlite3.Connection, beat: t.Heartbeat, until: float, now: float
) -> t.Renewal:
    job, owner = beat.job, beat.owner
    conn.execute(sql.RUN_PROGRESS, {"id": beat.run_id, **asdict(beat.totals)})
    alive = conn.execute(sql.RUNNER_EXTEND, (now, until, owner)).rowcount == 1
    if beat.holds_lock:
        alive = alive and conn.execute(sql.LOCK_EXTEND, (until, job, owner)).rowcount == 1
    if not alive:
        return t.Renewal(False)
    extend = sql.EXTEND_LEASE
    lost = [
        k for k, f in beat.leases if conn.execute(extend, (until, job, k, owner, f)).rowcount == 0
    ]
    lister = beat.lister is not None and (
        conn.execute(
            sql.LISTING_EXTEND, {"job": job, "owner": owner, "fence": beat.lister, "until": until}
        ).rowcount
        == 1
    )
    return t.Renewal(True, frozenset(lost), lister)


def _tx_take_listing(
    conn: sqlite3.Connection, job: str, owner: str, until: float, now: float, fresh: float | None
) -> t.Listing:
    found = _named(conn, sql.LISTING_GET, (job,))
    claim = {"job": job, "owner": owner, "until": until, "now": now}
    if not found:
        conn.execute(sql.LISTING_ADD, claim)
    else:
        role = t.Listing.from_row(found[0])
        if role.owner == owner:
            conn.execute(sql.LISTING_RENEW, claim)
        elif (
            role.owner is None
            or role.lease_until is None
            or role.lease_until < now
            or conn.execute(sql.RUNNER_LIVE, (role.owner, now)).fetchone() is None
            or (fresh is not None and role.stale_for(fresh, now))
        ):
            conn.execute(sql.LISTING_TAKE, claim)
    return t.Listing.from_row(_named(conn, sql.LISTING_GET, (job,))[0])


def _tx_register_listed(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    fence: int,
    query: str,
    params: list[Any],
    keys: str,
) -> t.Registered | None:
    holder = {"job": job, "owner": owner, "fence": fence}
    if conn.execute(sql.LISTING_HELD, holder).fetchone() is None:
        return None
    done, dead = conn.execute(sql.FOUND_FINISHED, (job, keys)).fetchone()
    before = conn.total_changes
    conn.execute(query, params)  # (a WITH statement has no rowcount)
    new = conn.total_changes - before
    conn.execute(sql.LISTING_FOUND, {**holder, "new": new, "done": done, "dead": dead})
    return t.Registered(new, int(done), int(dead))


def _known_states(conn: sqlite3.Connection, job: str, keys: list[str]) -> dict[str, str]:
    """The state of each of these keys the ledger holds: the items between the least and
    the greatest key, else a lookup per key (see types.known_range_limit)."""
    if not keys:
        return {}
    limit = t.known_range_limit(len(keys))
    found = conn.execute(sql.KNOWN_STATES_RANGE, (job, min(keys), max(keys), limit)).fetchall()
    if len(found) < limit:
        wanted = set(keys)
        return {key: state for key, state in found if key in wanted}
    return dict(conn.execute(sql.KNOWN_STATES, (job, json.dumps(keys))).fetchall())


def _tx_queue_listed(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    fence: int,
    rows: Sequence[t.QueuedRow],
    batch: int,
    now: float,
) -> t.Registered | None:
    holder = {"job": job, "owner": owner, "fence": fence}
    if conn.execute(sql.LISTING_HELD, holder).fetchone() is None:
        return None
    known = _known_states(conn, job, [row[0] for row in rows])
    states = list(known.values())
    done, dead = states.count("done"), states.count("dead")
    revived = 0
    if "vanished" in states:
        for key, relpath, size, mtime_ns, inode, *_ in rows:
            if known.get(key) == "vanished":
                row = {"now": now, "job": job, "key": key, "relpath": relpath, "size": size}
                row |= {"mtime_ns": mtime_ns, "inode": inode}
                revived += conn.execute(sql.REVIVE_VANISHED, row).rowcount
    new = [row for row in rows if row[0] not in known] if known else list(rows)
    for start in range(0, len(new), batch):
        part = new[start : start + batch]
        conn.execute(sql.QUEUED_ADD, (job, len(part), t.pack_queued(part)))
    found = {**holder, "new": len(new) + revived, "done": done, "dead": dead}
    conn.execute(sql.LISTING_FOUND, found)
    return t.Registered(len(new) + revived, done, dead)


def _tx_take_queued(
    conn: sqlite3.Connection,
    job: str,
    limit: int,
    claim: Callable[[list[t.QueuedRow]], tuple[str, list[Any], tuple[Any, ...]]],
) -> tuple[list[t.QueuedRow], str | None]:
    taken: list[t.QueuedRow] = []
    while len(taken) < limit:
        first = conn.execute(sql.QUEUED_FIRST, (job,)).fetchone()
        if first is None:
            break
        seq, files, data = first
        if taken and files > limit - len(taken):  # later batches only whole
            break
        rows, rest = t.unpack_queued(data, limit - len(taken))
        if rest:
            conn.execute(sql.QUEUED_KEEP, (files - len(rows), rest, seq))
        else:
            conn.execute(sql.QUEUED_DROP, (seq,))
        taken += rows
    if not taken:
        return taken, None
    return taken, _tx_claim_scanned(conn, *claim(taken))


def _tx_claim_scanned(
    conn: sqlite3.Connection, query: str, params: list[Any], check: tuple[Any, ...]
) -> str | None:
    conn.execute(query, params)
    (found,) = conn.execute(sql.CLAIMED_IN_CHUNK, check).fetchone()
    return None if found is None else str(found)


def _tx_commit(
    conn: sqlite3.Connection,
    job: str,
    owner: str,
    now: float,
    started: tuple[str, str] | None,
    done: list[tuple[str | None, float | None, str, str]],
    other: list[dict[str, Any]],
    keys: str,
    expected: int,
) -> list[tuple[str, str | None, int, str]] | None:
    if started is not None:
        conn.execute(sql.MARK_STARTED, (job, owner, *started, now))
    changed = 0
    for post_action, began, done_keys, pairs in done:
        params = (job, owner, done_keys, pairs, post_action, now, began)
        changed += conn.execute(sql.MARK_DONE, params).rowcount
    if other:
        changed += conn.executemany(sql.MARK_OUTCOME, other).rowcount
    if changed == expected:
        return None
    return [tuple(r) for r in conn.execute(sql.LEASE_STATE, (job, keys)).fetchall()]


def _tx_idempotency_claim(conn: sqlite3.Connection, fresh: dict[str, Any]) -> t.IdempotencyClaim:
    if conn.execute(sql.IDEMPOTENCY_INSERT, fresh).rowcount == 1:
        return t.IdempotencyClaim("run", "new")
    # The insert was ignored inside this write transaction: the row is there.
    (row,) = _named(conn, sql.IDEMPOTENCY_GET, (fresh["scope"], fresh["key"]))
    claim = decide_idempotency(fresh["fingerprint"], IdempotencyRecord.from_row(row), fresh["now"])
    if claim.decision == "run":
        conn.execute(sql.IDEMPOTENCY_TAKE_OVER, fresh)
    return claim


class SQLiteLedger(Ledger):
    """An open SQLite ledger (see the module's documentation). Use :meth:`open`."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
    ) -> None:
        self._db = db
        self.path = path
        self.name = str(path)
        self.clock = clock
        self._busy_timeout = busy_timeout
        self.errors = t.LedgerErrors()
        self._lock = anyio.Lock()
        self._claim_sql: dict[int, str] = {}  # claim statement text by chunk size
        st = os.stat(path)
        #: The file this connection has open: a write checks it is still the one at ``path``.
        self._file_id = (st.st_dev, st.st_ino)
        #: Whether ``PRAGMA quick_check`` found the file sound (before the first write).
        self._checked = False
        #: Whether this connection committed a write (a damaged file: was it modified?).
        self._committed = False
        #: The damage found in the file: nothing more is written to it.
        self._damage: DamagedLedgerError | None = None

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        durability: t.Durability = "normal",
        create: bool = True,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (and with ``create``, create or migrate) the ledger at ``path``.

        ``durability="full"`` sets ``synchronous=FULL`` (a commit survives a power loss),
        ``"normal"`` ``synchronous=NORMAL`` (it survives a crash of any process). Without
        ``create`` (the operator's reads) nothing is created, migrated or left behind.

        Raises :class:`ConfigurationError` for an unusable path, :class:`NotALedgerError` for a
        file that is not ours, :class:`SchemaVersionError` for a newer schema (without
        ``create``, an older one too) and :class:`LedgerError` for a damaged or unreadable
        one; in every such case the file is
        left byte-for-byte as it was.
        """
        path = Path(path)
        existed = check_state_path(path, create=create)
        fresh = not path.exists()
        view = None if create else read_only_view(path)
        try:
            db = await connect(
                view or path, isolation_level=None, cached_statements=256, uri=view is not None
            )
        except sqlite3.Error as e:
            raise open_error(path, e) from e
        if fresh:
            # Made by SQLite's open (nothing but SQLite opens the file: see check_state_path),
            # private before anything is written to it, and so its -wal and -shm, which SQLite
            # makes with the file's mode. (Another runner that made it at the same moment:
            # fine, the migration re-reads the schema version inside its own transaction.)
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
        ledger = cls(db, path, clock=clock, busy_timeout=busy_timeout)
        try:
            await ledger._prepare(existed, durability, migrate=create, read_only=view is not None)
        except BaseException:
            # (Refused, or stopped: the -wal stays as it is, never checkpointed into the file.)
            with anyio.CancelScope(shield=True), wal_kept(path):
                await db.close()
            raise
        return ledger

    async def _prepare(
        self, existed: bool, durability: t.Durability, *, migrate: bool, read_only: bool
    ) -> None:
        db, name = self._db, self.name
        try:
            # While opening, wait as long as it takes (another runner may be switching a new
            # file to WAL or migrating it, which locks it exclusively); short waits afterwards.
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            await db.create_function(sql.GLOB_FUNCTION, 2, _glob, deterministic=True)
            # (One statement, one snapshot: another runner may be making the ledger now.)
            header = await db.execute_fetchall(sql.SCHEMA_HEADER)
            objects, app_id, version = next(iter(header))
        except sqlite3.Error as e:
            if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
                raise LedgerError(f"state {name!r}: {e}") from e
            raise open_error(self.path, e) from e
        self._refuse(existed, objects, app_id, version, migrate=migrate)
        if version == sql.SCHEMA_VERSION:
            # Before anything is written: a ledger whose tables are not its version's is
            # refused, not used until a statement fails in the middle of a run.
            try:
                await on_thread(db, lambda: _check_tables(raw(db), name, version))
            except sqlite3.Error as e:
                raise open_error(self.path, e) from e
        if read_only:
            return
        with self._errors():
            # A run checks now; another command before its first write. A file not in WAL
            # mode yet (made by a restore, say) is checked before the switch writes to it.
            if migrate or str(await self._scalar("PRAGMA journal_mode")).lower() != "wal":
                await on_thread(db, self._check_intact)
            await self._switch_to_wal()
            sync = "FULL" if durability == "full" else "NORMAL"
            await db.execute(f"PRAGMA synchronous = {sync}")
            if version < sql.SCHEMA_VERSION:
                await self._transact(_tx_migrate, self.clock(), name)
            await db.execute(f"PRAGMA busy_timeout = {_SQLITEBUSY_MS}")

    def _refuse(
        self, existed: bool, objects: int, app_id: int, version: int, *, migrate: bool
    ) -> None:
        """Refuse, before anything is written, a file this asyncbatch does not understand:
        another application's, a schema version it does not know, or (without ``migrate``)
        one that holds no ledger or an older one."""
        name = self.name
        if not objects and (app_id not in (0, sql.APPLICATION_ID) or version != 0):
            self._refuse_blank(existed, app_id, version, migrate=migrate)
        if objects and app_id != sql.APPLICATION_ID:
            wal = companions(self.path)[0]
            if foreign_wal(self.path, sql.APPLICATION_ID):
                raise NotALedgerError(
                    f"state {name!r} is an asyncbatch ledger, but its -wal file {str(wal)!r} is "
                    "another application's database (left there by another database?); "
                    "neither was touched: move that -wal aside if it is not the ledger's"
                )
            raise NotALedgerError(
                f"state {name!r} is a SQLite database of another application; it was not touched"
            )
        if objects and not 0 < version <= sql.SCHEMA_VERSION:
            raise SchemaVersionError(name, version, sql.SCHEMA_VERSION)
        if existed and not objects and not migrate:
            wal, shm = companions(self.path)
            if shm.exists() and not wal.exists():
                raise LedgerError(
                    f"state {name!r} holds no ledger, and its -shm file says a -wal file "
                    "existed: was the -wal deleted? Its commits are gone; see "
                    "'asyncbatch help troubleshooting'"
                )
            raise NotALedgerError(f"state {name!r} is an empty database, not a ledger")
        if version < sql.SCHEMA_VERSION and not migrate:
            raise SchemaVersionError(name, version, sql.SCHEMA_VERSION)

    def _refuse_blank(self, existed: bool, app_id: int, version: int, *, migrate: bool) -> None:
        """Refuse a database with no tables that is not blank: one that declares another
        application (``application_id``) or a schema version (``user_version``, which other
        applications use for theirs too). Only a blank one is made a ledger; nothing is
        written to this one."""
        name = self.name
        wal, shm = companions(self.path)
        if existed and not migrate and shm.exists() and not wal.exists():
            return  # (said by the caller: its -wal was deleted)
        if app_id not in (0, sql.APPLICATION_ID):
            raise NotALedgerError(
                f"state {name!r} is a SQLite database of another application (application_id "
                f"{app_id}, no tables); it was not touched"
            )
        if app_id == sql.APPLICATION_ID and 0 < version <= sql.SCHEMA_VERSION:
            raise SchemaMismatchError(name, version, version, "it holds no tables")
        if app_id == sql.APPLICATION_ID:
            raise SchemaVersionError(name, version, sql.SCHEMA_VERSION)
        raise NotALedgerError(
            f"state {name!r} is a SQLite database with no tables whose user_version is "
            f"{version} (set by another application?): not an asyncbatch ledger; it was not "
            "touched"
        )

    async def _switch_to_wal(self) -> None:
        """Put the file in WAL mode, waiting while other runners open it at the same moment.

        Two connections switching a new file at once can deadlock on the exclusive lock the
        switch needs; SQLite then fails one at once instead of calling the busy handler, so the
        switch is retried like a write. Raises :class:`LedgerError` when the file system cannot
        do WAL (SQLite keeps the old journal mode without an error then).
        """

        def switch() -> str | Busy:  # on the connection's thread
            try:
                mode: str = raw(self._db).execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if _is_busy(e):
                    return BUSY
                raise
            return mode

        mode = await self._until_not_busy(lambda: on_thread(self._db, switch))
        if mode.lower() != "wal":
            raise LedgerError(
                f"state {self.name!r}: SQLite cannot use WAL mode here (journal mode stays "
                f"{mode!r}); put the state on a local disk"
            )

    async def close(self) -> None:
        # A damaged file gets nothing more: not even the checkpoint of its -wal by the close.
        keep = wal_kept(self.path) if self._damage is not None else contextlib.nullcontext()
        with anyio.CancelScope(shield=True):
            async with self._lock:
                with keep:
                    await self._db.close()

    # -- transactions ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            if is_damage(e):
                raise self._damaged(str(e)) from e
            raise LedgerError(f"state {self.name!r}: {e}") from e

    def _damaged(self, detail: str) -> DamagedLedgerError:
        """Note that the file is damaged (nothing more is written to it); the error saying so."""
        if self._damage is None:
            self._damage = damaged(self.path, detail, modified=self._committed)
        return DamagedLedgerError(str(self._damage))

    def _check_intact(self) -> None:
        """``PRAGMA quick_check`` on the connection's thread, once: raises
        :class:`DamagedLedgerError` for a damaged file (every b-tree page is read: about 50 ms
        for 100,000 items with the file in the page cache, 0.3 s from disk)."""
        if self._checked:
            return
        try:
            found = raw(self._db).execute("PRAGMA quick_check(1)").fetchall()
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise self._damaged(str(e)) from e
            raise
        if found != [("ok",)]:
            raise self._damaged("; ".join(str(row[0]) for row in found))
        self._checked = True

    def _busy_error(self) -> LedgerError:
        return LedgerError(
            f"state {self.name!r} stayed locked by another process for "
            f"{self._busy_timeout:.0f}s; see 'asyncbatch help troubleshooting'"
        )

    async def _until_not_busy(self, attempt: Callable[[], Awaitable[T | Busy]]) -> T:
        """Repeat ``attempt`` every few milliseconds while another process holds the lock.

        SQLite's own busy handler backs off to 100 ms sleeps, so a runner sharing a job with a
        busy one would mostly find the lock taken when it looks; short jittered retries give
        every runner its turn.
        """
        return await retrying(
            attempt,
            patience=self._busy_timeout,
            first_pause=0.0005,
            longest_pause=0.004,
            on_timeout=self._busy_error,
            errors=self.errors,
            on_wait=self._tell_busy,
        )

    def _tell_busy(self, waited: float, left: float) -> None:
        log.warning(
            "state %r is locked by another process (a write transaction held for %.0fs so "
            "far: another asyncbatch command, or a program holding it open); waiting up to "
            "%.0fs more",
            self.name,
            waited,
            left,
        )

    def _check_file(self) -> None:
        """Refuse to write when the state file was deleted or replaced since it was opened.

        SQLite would go on writing the unlinked file, and a runner starting meanwhile would
        make a fresh state and redo everything (one ``stat``, about a microsecond).
        """
        try:
            st = os.stat(self.path)
            found: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            found = None
        if found != self._file_id:
            raise LedgerError(
                f"state {self.name!r} was {'deleted' if found is None else 'replaced'} while "
                "this runner was using it; it stopped (a runner on a new file would redo every "
                "item): put the state back, or start again on purpose"
            )

    def _in_transaction(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T | Busy:
        """``BEGIN IMMEDIATE``, ``fn(conn, *args)``, ``COMMIT`` on the connection's thread;
        :data:`BUSY` when another process holds the write lock past SQLite's short wait."""
        conn = raw(self._db)
        try:
            self._check_intact()  # before the first write, outside the write lock
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                return BUSY
            raise
        try:
            failpoints.hit("in-transaction")
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._committed = True
        return result

    async def _transact(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one ``BEGIN IMMEDIATE`` transaction on the ledger thread.

        ``fn`` is synchronous and uses the plain ``sqlite3.Connection``. The whole transaction
        is one hop, and the wait for it is shielded (as the PostgreSQL session's is): a caller
        cancelled while it runs still gets its result, so what it committed (leases, the lock)
        is never lost to its caller. Raises :class:`LedgerError` if the state file was deleted
        or replaced since it was opened.
        """
        self._check_file()
        if self._damage is not None:  # not one more write
            raise DamagedLedgerError(str(self._damage))

        async def attempt() -> T | Busy:
            async with self._lock:
                with self._errors():
                    with anyio.CancelScope(shield=True):
                        result = await on_thread(self._db, self._in_transaction, fn, args)
                    return result

        return await self._until_not_busy(attempt)

    async def _fetchall(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Any]:
        async with self._lock:
            with self._errors():
                return list(await self._db.execute_fetchall(query, params))

    async def _fetch_named(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[dict[str, Any]]:
        """The rows of a read, each a dict by column name (see :func:`_named`)."""
        async with self._lock:
            with self._errors():
                return await on_thread(self._db, lambda: _named(raw(self._db), query, params))

    async def _scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(query, params) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def _value(self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        rows = await self._fetchall(query, params)
        return rows[0][0] if rows else None

    # -- jobs --------------------------------------------------------------------------------------

    async def meta(self, name: str) -> str | None:
        value = await self._value(sql.GET_META, (name,))
        return None if value is None else str(value)

    async def jobs(self) -> list[str]:
        return [job for (job,) in await self._fetchall(sql.LIST_JOBS)]

    async def job_identity(self, job: str) -> str | None:
        value = await self._value(sql.GET_JOB, (job,))
        return None if value is None else str(value)

    async def job_settings(self, job: str) -> t.JobSettings | None:
        value = await self._value(sql.GET_JOB_SETTINGS, (job,))
        return None if value is None else t.JobSettings.from_json(value, job)

    # -- the job lock and runners ------------------------------------------------------------------

    async def start_runner(self, start: t.RunStart) -> t.Started:
        return await self._transact(_tx_start_runner, start, self.name, self.clock())

    async def reap_stale_runners(
        self, job: str, me: ProcessIdentity, *, orphans: bool = False
    ) -> int:
        return await self._transact(_tx_reap, job, me, orphans, self.clock())

    async def runners(self, job: str) -> list[t.RunnerInfo]:
        return [_runner(r) for r in await self._fetch_named(sql.RUNNERS_OF_JOB, (job,))]

    async def heartbeat(self, beat: t.Heartbeat) -> t.Renewal:
        now = self.clock()
        return await self._transact(_tx_heartbeat, beat, now + beat.ttl, now)

    async def release_runner(self, end: t.RunEnd) -> None:
        finish = {"id": end.run_id, "exit_status": end.exit_status, **asdict(end.totals)}

        def release(conn: sqlite3.Connection, now: float) -> None:
            # Its leases first: none outlives the runner's record (see RunEnd).
            left = [(now, end.job, key, end.owner, fence) for key, fence in end.leases]
            conn.executemany(sql.RELEASE_ITEM, left)
            conn.execute(sql.RUNNER_REMOVE, (end.owner,))
            if end.holds_lock:
                conn.execute(sql.LOCK_RELEASE, (end.job, end.owner))
            if end.lister:
                conn.execute(sql.LISTING_RELEASE, (end.job, end.owner))
            conn.execute(sql.RUN_FINISH, {**finish, "now": now})

        await self._transact(release, self.clock())

    async def locks(self) -> list[t.LockInfo]:
        return [t.LockInfo.from_row(r) for r in await self._fetch_named(sql.LOCK_LIST)]

    async def force_unlock(self, job: str, owner: str) -> bool:
        def unlock(conn: sqlite3.Connection) -> bool:
            return conn.execute(sql.LOCK_RELEASE, (job, owner)).rowcount == 1

        return await self._transact(unlock)

    # -- the listing role --------------------------------------------------------------------------

    async def take_listing(
        self, job: str, owner: str, ttl: float, *, fresh_since: float | None = None
    ) -> t.Listing:
        now = self.clock()
        return await self._transact(_tx_take_listing, job, owner, now + ttl, now, fresh_since)

    async def listing(self, job: str) -> t.Listing | None:
        found = await self._fetch_named(sql.LISTING_GET, (job,))
        return t.Listing.from_row(found[0]) if found else None

    async def begin_listing(
        self, job: str, owner: str, fence: int, *, watching: bool = False
    ) -> t.Listing | None:
        def begin(conn: sqlite3.Connection, now: float) -> t.Listing | None:
            started = None if watching else now
            holder = {"job": job, "owner": owner, "fence": fence, "started": started}
            if conn.execute(sql.LISTING_BEGIN, holder).rowcount == 0:
                return None
            conn.execute(sql.QUEUED_CLEAR, (job,))
            return t.Listing.from_row(_named(conn, sql.LISTING_GET, (job,))[0])

        return await self._transact(begin, self.clock())

    async def register_listed(
        self, job: str, owner: str, fence: int, rows: Sequence[t.ScannedRow]
    ) -> t.Registered | None:
        params: list[Any] = [job, self.clock()]
        for row in rows:
            params.extend(row)
        keys = json.dumps([row[0] for row in rows])
        return await self._transact(
            _tx_register_listed, job, owner, fence, sql.register_listed(len(rows)), params, keys
        )

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
        def end(conn: sqlite3.Connection, now: float) -> bool:
            holder = {"job": job, "owner": owner, "fence": fence, "now": now}
            counts = {"files": files, "done": done, "dead": dead, "twins": encode_twins(twins)}
            counts["not_ready"] = t.encode_not_ready(not_ready)
            return conn.execute(sql.LISTING_END, {**holder, **counts}).rowcount == 1

        return await self._transact(end, self.clock())

    async def listing_changed(self, job: str, complete: int, not_ready: Mapping[str, int]) -> bool:
        def move(conn: sqlite3.Connection) -> bool:
            row = conn.execute(sql.LISTING_COUNTS, (job, complete)).fetchone()
            if row is None:
                return False
            files, counts = t.changed_counts(row[0], row[1], not_ready)
            conn.execute(sql.LISTING_CHANGED, (files, counts, job, complete))
            return True

        return await self._transact(move)

    async def listing_twins(self, job: str, complete: int) -> dict[str, int]:
        found = await self._fetchall(sql.LISTING_TWINS, (job, complete))
        return decode_twins(found[0][0] if found else None)

    async def _finish_counts(
        self, job: str, owner: str, since: float
    ) -> tuple[dict[str, int], dict[str, int]]:
        def read() -> tuple[dict[str, int], dict[str, int]]:
            conn = raw(self._db)
            counts: dict[str, int] = {}
            others: dict[str, int] = {}
            for state, n, by_others in conn.execute(sql.FINISH_COUNTS, (job, owner, since)):
                counts[state] = n
                if state in ("done", "dead", "vanished") and by_others:
                    others[state] = by_others
            queued = conn.execute(sql.QUEUED_FILES, (job,)).fetchone()[0]
            if queued:
                counts["pending"] = counts.get("pending", 0) + queued
            return counts, others

        async with self._lock:
            with self._errors():
                return await on_thread(self._db, read)

    async def work_left(self, job: str) -> bool:
        return bool(await self._value(sql.WORK_LEFT, (job, WORK_LEFT_NEWEST)))

    # -- claims ------------------------------------------------------------------------------------

    def _claim(
        self, job: str, owner: str, lease: float, rows: Sequence[t.ScannedRow | t.QueuedRow]
    ) -> tuple[str, list[Any], tuple[Any, ...]]:
        """The statement, parameters and read-back parameters of a claim of ``rows``."""
        now = self.clock()
        params: list[Any] = [job, owner, now + lease, now]
        for row in rows:
            params.extend(row[:5])
        query = self._claim_sql.get(len(rows))
        if query is None:
            query = self._claim_sql[len(rows)] = sql.claim_scanned(len(rows))
        check = (job, json.dumps([row[0] for row in rows]), owner)
        return query, params, check

    async def claim_scanned(
        self, job: str, owner: str, lease: float, rows: Sequence[t.ScannedRow]
    ) -> list[t.ClaimedRow]:
        if not rows:
            return []
        found = await self._transact(_tx_claim_scanned, *self._claim(job, owner, lease, rows))
        return _claimed(found) if found else []

    async def queue_listed(
        self, job: str, owner: str, fence: int, rows: Sequence[t.QueuedRow]
    ) -> t.Registered | None:
        return await self._transact(
            _tx_queue_listed, job, owner, fence, rows, t.QUEUED_BATCH, self.clock()
        )

    async def take_queued(
        self, job: str, owner: str, lease: float, limit: int
    ) -> tuple[list[t.QueuedRow], list[t.ClaimedRow]]:
        def claim(rows: list[t.QueuedRow]) -> tuple[str, list[Any], tuple[Any, ...]]:
            return self._claim(job, owner, lease, rows)

        taken, found = await self._transact(_tx_take_queued, job, limit, claim)
        return taken, _claimed(found) if found else []

    async def claim_waiting(
        self,
        job: str,
        owner: str,
        lease: float,
        limit: int,
        skip: Sequence[str] = (),
        after: tuple[int, bytes] | None = None,
    ) -> list[t.ClaimedRow]:
        skipped = json.dumps(list(skip))
        query = sql.CLAIM_WAITING if after is None else sql.CLAIM_WAITING_AFTER

        def claim(conn: sqlite3.Connection, now: float) -> list[t.ClaimedRow]:
            params = (job, owner, now + lease, now, limit, skipped, *(after or ()))
            return [t.ClaimedRow.from_row(r) for r in _named(conn, query, params)]

        return await self._transact(claim, self.clock())

    async def next_retry_at(self, job: str) -> float | None:
        value = await self._value(sql.NEXT_RETRY_AT, (job,))
        return None if value is None else float(value)

    # -- outcomes ----------------------------------------------------------------------------------

    async def commit_outcomes(
        self, job: str, owner: str, outcomes: Sequence[t.Outcome], started: t.Leases = ()
    ) -> set[str]:
        now = self.clock()
        # Done outcomes in groups of one statement each: by post action, and by the millisecond
        # their attempts started (the group's earliest start is its rows' joblog start).
        groups: dict[tuple[str | None, int], list[tuple[str, int]]] = {}
        starts: dict[tuple[str | None, int], float | None] = {}
        other: list[dict[str, Any]] = []
        for o in outcomes:
            if o.state == "done" and o.stat is None:
                began = o.started_at
                at = (o.post_action, -1 if began is None else int(began * 1000))
                group = groups.get(at)
                if group is None:
                    group = groups[at] = []
                    starts[at] = began
                group.append((o.key, o.fence))
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
                        "started_at": o.started_at,
                        "job": job,
                        "key": o.key,
                        "owner": owner,
                        "fence": o.fence,
                    }
                )
        done = [(at[0], starts[at], *_fenced_group(group)) for at, group in groups.items()]
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
        return lost | (set(mine) - {key for key, _, _, _ in rows})

    async def release_items(self, job: str, owner: str, items: t.Leases) -> None:
        if not items:
            return

        def release(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany(
                sql.RELEASE_ITEM, [(now, job, key, owner, fence) for key, fence in items]
            )

        await self._transact(release, self.clock())

    async def record_move(
        self, job: str, owner: str, key: str, fence: int, dst: str, src: str | None = None
    ) -> bool:
        def record(conn: sqlite3.Connection, now: float) -> bool:
            params = (encode_move(dst, src), now, job, key, owner, fence)
            return conn.execute(sql.RECORD_MOVE, params).rowcount == 1

        return await self._transact(record, self.clock())

    async def move_destinations(self, job: str) -> list[str]:
        rows = await self._fetchall(sql.MOVE_DESTINATIONS, (job,))
        return [path for (action,) in rows if (path := decode_action(action)[1]) is not None]

    # -- the operator's reads, and retry ----------------------------------------------------------

    async def _state_counts(self, job: str) -> dict[str, int]:
        def read() -> dict[str, int]:
            conn = raw(self._db)
            counts = dict(conn.execute(sql.COUNTS, (job,)).fetchall())
            queued = conn.execute(sql.QUEUED_FILES, (job,)).fetchone()[0]
            if queued:
                counts["pending"] = counts.get("pending", 0) + queued
            return counts

        async with self._lock:
            with self._errors():
                return await on_thread(self._db, read)

    async def queued_files(self, job: str) -> int:
        return int(await self._scalar(sql.QUEUED_FILES, (job,)))

    async def _states_of(self, job: str, keys: Sequence[str]) -> dict[str, str]:
        rows = await self._fetchall(sql.STATES_OF, (job, json.dumps(list(keys))))
        return {str(key): str(state) for key, state in rows}

    async def oldest_waiting(self, job: str) -> float | None:
        value = await self._value(sql.OLDEST_WAITING, (job,))
        return None if value is None else float(value)

    async def failures(self, job: str, limit: int) -> list[t.ItemInfo]:
        return [_item(r) for r in await self._fetch_named(sql.FAILURES, (job, limit))]

    async def _items_by_key(self, job: str, key: str) -> list[t.ItemInfo]:
        return [_item(r) for r in await self._fetch_named(sql.ITEM_BY_KEY, (job, key))]

    async def _items_by_relpath(self, job: str, relpath: bytes) -> list[t.ItemInfo]:
        return [_item(r) for r in await self._fetch_named(sql.ITEMS_BY_RELPATH, (job, relpath))]

    async def actions_due(self, job: str, keys: Sequence[str]) -> list[t.ItemInfo]:
        rows = await self._fetch_named(sql.ACTIONS_DUE, (job, json.dumps(list(keys))))
        return [_item(r) for r in rows]

    async def list_items(self, job: str, which: t.ItemFilter) -> list[t.ItemInfo]:
        query, params = sql.list_items(which)
        rows = await self._fetch_named(query, self._filter_params(job, which, params))
        return [_item(r) for r in rows]

    async def _items_page(
        self, job: str, which: t.ItemFilter, after: PageEnd | None
    ) -> tuple[list[t.ItemInfo], PageEnd | None]:
        query, params = sql.list_items(which, after=after)
        rows = await self._fetch_named(query, self._filter_params(job, which, params))
        end = (float(rows[-1]["updated_at"]), str(rows[-1]["key"])) if rows else None
        return [_item(r) for r in rows], end

    async def _forget_page(
        self, job: str, done_before: float | None, after: str, limit: int
    ) -> t.Forgotten:
        params: tuple[Any, ...] = (job, after, limit)
        if done_before is None:
            query = sql.FORGET_PAGE_VANISHED
        else:
            query, params = sql.FORGET_PAGE_DONE, (*params, done_before)

        def forget(conn: sqlite3.Connection, now: float) -> t.Forgotten:
            gone = [_item(r) for r in _named(conn, query, params)]
            conn.executemany(sql.FORGET_ITEM, [(job, item.key) for item in gone])
            _log_forgotten(conn, job, gone, now)
            return t.Forgotten(tuple(gone))

        return await self._transact(forget, self.clock())

    async def count_items(self, job: str, which: t.ItemFilter) -> int:
        query, params = sql.list_items(which, count=True)
        return int(await self._value(query, self._filter_params(job, which, params)))

    @staticmethod
    def _filter_params(job: str, which: t.ItemFilter, params: dict[str, Any]) -> dict[str, Any]:
        if which.glob is not None:
            params["glob"] = glob_regex(which.glob)
        return {**params, "job": job}

    async def _forget_keys(self, job: str, keys: list[str]) -> t.Forgotten:
        def forget(conn: sqlite3.Connection, now: float) -> t.Forgotten:
            gone: list[t.ItemInfo] = []
            refused: list[t.ItemInfo] = []
            found = [_item(r) for key in keys for r in _named(conn, sql.FORGET_READ, (job, key))]
            for item in found:
                if _lease_is_live(item, now):
                    refused.append(item)
                    continue
                conn.execute(sql.FORGET_ITEM, (job, item.key))
                gone.append(item)
            _log_forgotten(conn, job, gone, now)
            return t.Forgotten(tuple(gone), tuple(refused))

        return await self._transact(forget, self.clock())

    async def _forget_done_before(self, job: str, before: float) -> t.Forgotten:
        def forget(conn: sqlite3.Connection, now: float) -> t.Forgotten:
            gone = [_item(r) for r in _named(conn, sql.FORGET_READ_DONE_BEFORE, (job, before))]
            conn.execute(sql.FORGET_DONE_BEFORE, (job, before))
            _log_forgotten(conn, job, gone, now)
            return t.Forgotten(tuple(gone))

        return await self._transact(forget, self.clock())

    async def look_again(self, job: str, relpaths: Sequence[bytes]) -> None:
        if relpaths:
            await self._transact(_log_names, job, list(relpaths), self.clock())

    async def forgotten_since(self, job: str, seq: int | None) -> tuple[int, list[bytes]]:
        if seq is None:
            ((last,),) = await self._fetchall(sql.FORGOTTEN_LAST, ())
            return int(last), []
        rows = await self._fetchall(sql.FORGOTTEN_SINCE, (job, seq))
        last = max((number for number, _ in rows), default=seq)
        return int(last), [bytes(relpath) for _, relpath in rows]

    async def _finished_by(self, job: str, owners: Sequence[str]) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for runner, state, n in await self._fetchall(sql.FINISHED_BY, (job, json.dumps(owners))):
            found.setdefault(str(runner), {})[str(state)] = int(n)
        return found

    async def _runs(self, job: str, limit: int) -> list[t.RunInfo]:
        return [
            t.RunInfo.from_row(r) for r in await self._fetch_named(sql.RUNS_OF_JOB, (job, limit))
        ]

    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        states = "'failed', 'dead'" if dead else "'failed'"

        def reset(conn: sqlite3.Connection, now: float) -> int:
            if keys is None:
                return conn.execute(sql.RETRY_ALL.format(states=states), (now, job)).rowcount
            return sum(
                conn.execute(sql.RETRY_ITEM.format(states=states), (now, job, key)).rowcount
                for key in keys
            )

        return await self._transact(reset, self.clock())

    # -- the idempotency store ---------------------------------------------------------------------

    async def idempotency_claim(
        self, request: t.IdempotencyRequest, *, lock_timeout: float, ttl: float
    ) -> t.IdempotencyClaim:
        now = self.clock()
        fresh = {
            **asdict(request),
            "now": now,
            "locked_until": now + lock_timeout,
            "expires_at": now + max(ttl, lock_timeout),
        }
        return await self._transact(_tx_idempotency_claim, fresh)

    async def idempotency_start(self, request: t.IdempotencyRequest) -> bool:
        def start(conn: sqlite3.Connection) -> bool:
            who = (request.scope, request.key, request.token)
            return conn.execute(sql.IDEMPOTENCY_START, who).rowcount == 1

        return await self._transact(start)

    async def idempotency_complete(
        self, request: t.IdempotencyRequest, response: t.StoredResponse, *, ttl: float
    ) -> bool:
        now = self.clock()
        params = {
            **asdict(request),
            "status": response.status,
            "headers": encode_headers(response.headers),
            "body": response.body,
            "now": now,
            "expires_at": now + ttl,
        }

        def complete(conn: sqlite3.Connection) -> bool:
            return conn.execute(sql.IDEMPOTENCY_COMPLETE, params).rowcount == 1

        return await self._transact(complete)

    async def idempotency_unstored(
        self, request: t.IdempotencyRequest, reason: t.UnstoredReason, *, ttl: float
    ) -> bool:
        now = self.clock()
        params = {**asdict(request), "reason": reason, "now": now, "expires_at": now + ttl}

        def unstored(conn: sqlite3.Connection) -> bool:
            return conn.execute(sql.IDEMPOTENCY_UNSTORED, params).rowcount == 1

        return await self._transact(unstored)

    async def idempotency_release(self, request: t.IdempotencyRequest) -> None:
        def release(conn: sqlite3.Connection) -> None:
            conn.execute(sql.IDEMPOTENCY_RELEASE, (request.scope, request.key, request.token))

        await self._transact(release)

    async def idempotency_purge(self) -> int:
        def purge(conn: sqlite3.Connection, now: float) -> int:
            return max(conn.execute(sql.IDEMPOTENCY_PURGE, (now,)).rowcount, 0)

        return await self._transact(purge, self.clock())
