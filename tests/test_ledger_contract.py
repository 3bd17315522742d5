"""One contract, two backends: every test here runs against SQLite and against PostgreSQL.

The PostgreSQL half uses the server named by ``ASYNCBATCH_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets a fresh schema, dropped
afterwards. Without a reachable server that half is skipped, with the reason (set
``ASYNCBATCH_REQUIRE_POSTGRES=1`` to make it fail instead, as CI may).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
import asyncpg
import pytest

from asyncbatch import (
    ConfigurationError,
    JobLockedError,
    LedgerError,
    NotALedgerError,
    SchemaVersionError,
)
from asyncbatch import _failpoints as failpoints
from asyncbatch._config import BatchConfig
from asyncbatch._ledger import (
    STATES,
    ClaimedRow,
    Heartbeat,
    IdempotencyRequest,
    ItemFilter,
    JobSettings,
    Ledger,
    Outcome,
    PostgresDSN,
    Registered,
    Renewal,
    RunEnd,
    RunTotals,
    Started,
    StoredResponse,
    decode_move,
    open_ledger,
    sqlite_sql,
)
from asyncbatch._ledger import postgres_sql as pg_sql
from asyncbatch._ledger.base import WORK_LEFT_NEWEST
from asyncbatch._ledger.postgres import PostgresLedger, _log_names
from asyncbatch._procinfo import ProcessIdentity, holder_is_dead, process_start, this_process

from .conftest import HANDLERS, SOURCE, cli, invocations, make_files, run_start, spawn, until
from .postgres import pg_query, pg_sync

RECORD = f"{HANDLERS}:record"
#: A lease or TTL for the expiry tests, and how far they move the ledger's clock to pass it
#: (:meth:`Store.advance`): nothing waits for it in real time, and what must still be held
#: (a TTL of 60) is held with 15 s to spare however slow the machine.
SHORT = 30.0
PAST_SHORT = 45.0


# -- the two backends ----------------------------------------------------------------------------


async def waiting(ledger: Ledger) -> int:
    """Items pending, or failed and waiting for a retry."""
    counts = await ledger.counts("j")
    return counts["pending"] + counts["failed"]


class Store:
    """One backend's ledger location, with the raw access the tests need."""

    kind: str
    state: str
    schema_version: int

    async def open(self, **kwargs: Any) -> Ledger:
        """Open a ledger (its own connection) on this store."""
        return await open_ledger(self.state, **kwargs)

    async def advance(self, seconds: float) -> None:
        """Move the ledger's time ``seconds`` ahead: the leases, locks and TTLs that end
        sooner have expired, the others are still held."""
        raise NotImplementedError

    def now(self) -> float:
        """The time now in the clock the ledger's times are given in."""
        return time.time()

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run a query (``$1``-style parameters) on a separate connection."""
        raise NotImplementedError

    async def assert_writer_not_blocked(self) -> None:
        """Another connection can write every item at once: no transaction was left open."""
        raise NotImplementedError

    async def set_schema_version(self, version: int) -> None:
        """Pretend a newer asyncbatch wrote this ledger."""
        raise NotImplementedError

    async def make_first_version(self) -> None:
        """Write a ledger as asyncbatch 0.1 did (schema version 1), holding one failed item."""
        raise NotImplementedError

    async def make_second_version(self) -> None:
        """Write a ledger of schema version 2 (before the joblog): one done item of runner
        'old-runner' (done at 1000.0), one failed, one pending."""
        raise NotImplementedError

    async def make_third_version(self) -> None:
        """Write a ledger of schema version 3 (before the job's settings were recorded): job
        'j' with the items of :meth:`make_second_version`, and a finished run."""
        raise NotImplementedError

    async def make_fifth_version(self) -> None:
        """Write a ledger of schema version 5 (before the readiness rules): job 'j' whose
        settings have no rules nor settle window, and a finished run that left 2 files not
        settled yet."""
        raise NotImplementedError


class SqliteStore(Store):
    """A SQLite ledger file."""

    kind = "sqlite"
    schema_version = sqlite_sql.SCHEMA_VERSION

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = str(path)
        self.ahead = 0.0

    def clock(self) -> float:
        """The ledgers' clock: the wall clock, moved ahead by :meth:`advance`."""
        return time.time() + self.ahead

    async def open(self, **kwargs: Any) -> Ledger:
        return await open_ledger(self.state, **{"clock": self.clock, **kwargs})

    async def advance(self, seconds: float) -> None:
        self.ahead += seconds

    def now(self) -> float:
        return self.clock()

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.path)
        try:
            return list(db.execute(re.sub(r"\$(\d+)", r"?\1", query), args))
        finally:
            db.close()

    async def assert_writer_not_blocked(self) -> None:
        db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE items SET updated_at = updated_at")
            db.execute("ROLLBACK")
        finally:
            db.close()

    async def set_schema_version(self, version: int) -> None:
        db = sqlite3.connect(self.path)
        db.execute(f"PRAGMA user_version = {version}")
        db.commit()
        db.close()

    async def make_first_version(self) -> None:
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(sqlite_sql.MIGRATIONS[0])
        db.execute(f"PRAGMA application_id = {sqlite_sql.APPLICATION_ID}")
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO meta VALUES ('secret', ?), ('created_at', '0')", ("ab" * 32,))
        db.execute("INSERT INTO jobs VALUES ('j', 'stat', 0)")
        db.execute(_FIRST_VERSION_ITEM.replace("$", "?"), ("k00001", b"f00001", time.time() - 1))
        db.commit()
        db.close()

    async def make_second_version(self) -> None:
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(sqlite_sql.MIGRATIONS[0])
        db.executescript(sqlite_sql.MIGRATIONS[1])
        db.execute(f"PRAGMA application_id = {sqlite_sql.APPLICATION_ID}")
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO meta VALUES ('secret', ?), ('created_at', '0')", ("ab" * 32,))
        db.execute("INSERT INTO jobs VALUES ('j', 'stat', 0)")
        db.execute(
            "INSERT INTO runs (job, owner, pid, host, mode, started_at) "
            "VALUES ('j', 'old-runner', 4242, 'oldhost', 'run', 990)"
        )
        for item in _second_version_items("CAST({} AS BLOB)"):
            db.execute(item)
        db.commit()
        db.close()

    async def make_third_version(self) -> None:
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA journal_mode = WAL")
        for version in range(3):
            db.executescript(sqlite_sql.MIGRATIONS[version])
        db.execute(f"PRAGMA application_id = {sqlite_sql.APPLICATION_ID}")
        db.execute("PRAGMA user_version = 3")
        db.execute("INSERT INTO meta VALUES ('secret', ?), ('created_at', '0')", ("ab" * 32,))
        db.execute("INSERT INTO jobs VALUES ('j', 'stat', 0)")
        db.execute(_THIRD_VERSION_RUN)
        for item in _second_version_items("CAST({} AS BLOB)"):
            db.execute(item)
        db.commit()
        db.close()

    async def make_fifth_version(self) -> None:
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA journal_mode = WAL")
        for version in range(5):
            db.executescript(sqlite_sql.MIGRATIONS[version])
        db.execute(f"PRAGMA application_id = {sqlite_sql.APPLICATION_ID}")
        db.execute("PRAGMA user_version = 5")
        db.execute("INSERT INTO meta VALUES ('secret', ?), ('created_at', '0')", ("ab" * 32,))
        db.execute("INSERT INTO jobs VALUES ('j', 'stat', 0, ?)", (_FIFTH_VERSION_SETTINGS,))
        db.execute(_FIFTH_VERSION_RUN)
        db.commit()
        db.close()


class PostgresStore(Store):
    """A PostgreSQL ledger in its own schema."""

    kind = "postgres"
    schema_version = pg_sql.SCHEMA_VERSION

    def __init__(self, dsn: str) -> None:
        self.state = dsn

    async def fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        return await pg_query(self.state, query, *args)

    async def advance(self, seconds: float) -> None:
        # Leases, locks and TTLs are judged by the server's clock, which no test can move:
        # every time the ledger stored (all its float8 columns are times, in that clock) is
        # moved as far back instead, which is the same to every comparison with now().
        conn = await asyncpg.connect(self.state, timeout=10)
        try:
            columns = await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND data_type = 'double precision'"
            )
            async with conn.transaction():
                for table, column in columns:
                    await conn.execute(
                        f'UPDATE "{table}" SET "{column}" = "{column}" - $1::float8', seconds
                    )
        finally:
            await conn.close()

    async def assert_writer_not_blocked(self) -> None:
        conn = await asyncpg.connect(self.state, timeout=10)
        try:
            await conn.execute("SET lock_timeout = '200ms'")
            async with conn.transaction():
                await conn.execute("UPDATE items SET updated_at = updated_at")
                await conn.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        finally:
            await conn.close()

    async def set_schema_version(self, version: int) -> None:
        await self.fetch("UPDATE meta SET value = $1 WHERE name = 'schema_version'", str(version))

    async def make_first_version(self) -> None:
        conn = await asyncpg.connect(self.state, timeout=10)
        try:
            schema = PostgresDSN.parse(self.state).schema
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(pg_sql.MIGRATIONS[0])
            await conn.execute(
                "INSERT INTO meta VALUES ('application', 'asyncbatch'), ('schema_version', '1'),"
                " ('secret', $1), ('created_at', '0')",
                "ab" * 32,
            )
            await conn.execute("INSERT INTO jobs VALUES ('j', 'stat', 0)")
            await conn.execute(
                _FIRST_VERSION_ITEM.replace("$3", "extract(epoch FROM now()) - 1"),
                "k00001",
                b"f00001",
            )
        finally:
            await conn.close()

    async def make_second_version(self) -> None:
        conn = await asyncpg.connect(self.state, timeout=10)
        try:
            schema = PostgresDSN.parse(self.state).schema
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(pg_sql.MIGRATIONS[0])
            await conn.execute(pg_sql.MIGRATIONS[1])
            await conn.execute(
                "INSERT INTO meta VALUES ('application', 'asyncbatch'), ('schema_version', '2'),"
                " ('secret', $1), ('created_at', '0')",
                "ab" * 32,
            )
            await conn.execute("INSERT INTO jobs VALUES ('j', 'stat', 0)")
            await conn.execute(
                "INSERT INTO runs (job, owner, pid, host, mode, started_at) "
                "VALUES ('j', 'old-runner', 4242, 'oldhost', 'run', 990)"
            )
            for item in _second_version_items("convert_to({}, 'UTF8')"):
                await conn.execute(item)
        finally:
            await conn.close()

    async def make_third_version(self) -> None:
        conn = await asyncpg.connect(self.state, timeout=10)
        try:
            schema = PostgresDSN.parse(self.state).schema
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            for version in range(3):
                await conn.execute(pg_sql.MIGRATIONS[version])
            await conn.execute(
                "INSERT INTO meta VALUES ('application', 'asyncbatch'), ('schema_version', '3'),"
                " ('secret', $1), ('created_at', '0')",
                "ab" * 32,
            )
            await conn.execute("INSERT INTO jobs VALUES ('j', 'stat', 0)")
            await conn.execute(_THIRD_VERSION_RUN)
            for item in _second_version_items("convert_to({}, 'UTF8')"):
                await conn.execute(item)
        finally:
            await conn.close()

    async def make_fifth_version(self) -> None:
        conn = await asyncpg.connect(self.state, timeout=10)
        try:
            schema = PostgresDSN.parse(self.state).schema
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            for version in range(5):
                await conn.execute(pg_sql.MIGRATIONS[version])
            await conn.execute(
                "INSERT INTO meta VALUES ('application', 'asyncbatch'), ('schema_version', '5'),"
                " ('secret', $1), ('created_at', '0')",
                "ab" * 32,
            )
            await conn.execute(
                "INSERT INTO jobs VALUES ('j', 'stat', 0, $1)", _FIFTH_VERSION_SETTINGS
            )
            await conn.execute(_FIFTH_VERSION_RUN)
        finally:
            await conn.close()


#: A failed item due for a retry, as asyncbatch 0.1 wrote it: $1 key, $2 relpath, $3 due at.
_FIRST_VERSION_ITEM = """
INSERT INTO items (job, key, relpath, size, mtime_ns, inode, state, attempts, fence,
                   started_fence, next_attempt_at, last_error, created_at, updated_at)
VALUES ('j', $1, $2, 10, 1001, 501, 'failed', 1, 1, 1, $3, 'ValueError: x', 0, 0)
"""


#: Job 'j''s settings as schema version 5 recorded them (no readiness rules, no settle).
_FIFTH_VERSION_SETTINGS = json.dumps(
    {"source": SOURCE, "recursive": False, "follow_symlinks": False, "ignore": []}
)
#: A finished run of job 'j' that left 2 files not settled yet, as schema version 5 kept it.
_FIFTH_VERSION_RUN = """
INSERT INTO runs (job, owner, pid, host, mode, started_at, finished_at, seen, done, unsettled,
                  exit_status)
VALUES ('j', 'old-runner', 4242, 'oldhost', 'run', 990, 1000, 1, 1, 2, 'ok')
"""


#: A finished run of job 'j', as schema version 3 recorded it.
_THIRD_VERSION_RUN = """
INSERT INTO runs (job, owner, pid, host, mode, started_at, finished_at, seen, done, exit_status)
VALUES ('j', 'old-runner', 4242, 'oldhost', 'run', 990, 1000, 1, 1, 'ok')
"""


def _second_version_items(blob: str) -> list[str]:
    """Items of a schema-2 ledger: done by 'old-runner' at 1000, failed at 1100, pending;
    ``blob`` casts a text to the backend's bytes (``{}``: the text)."""
    return [
        f"""
INSERT INTO items (job, key, relpath, size, mtime_ns, inode, state, attempts, owner, fence,
                   started_fence, last_error, created_at, updated_at, done_at)
VALUES ('j', '{key}', {blob.format(repr(key))}, 10, 1001, 501, '{state}', 1, 'old-runner', 1, 1,
        {error}, 900, {updated}, {done})
"""
        for key, state, error, updated, done in (
            ("k00001", "done", "NULL", 1000, 1000),
            ("k00002", "failed", "'ValueError: x'", 1100, "NULL"),
            ("k00003", "pending", "NULL", 1200, "NULL"),
        )
    ]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The ledger under test, once per backend."""
    if request.param == "sqlite":
        yield SqliteStore(tmp_path / "state.db")
    else:
        yield PostgresStore(request.getfixturevalue("pg_dsn"))


@pytest.fixture
async def ledger(store: Store) -> AsyncIterator[Ledger]:
    """An open ledger on the store."""
    async with await store.open() as opened:
        yield opened


def dead_process() -> ProcessIdentity:
    """The identity of a process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    me = this_process()
    return ProcessIdentity(me.host, proc.pid, f"{(me.pid_start or 'x:0').split(':')[0]}:1")


OTHER_HOST = ProcessIdentity("elsewhere.example", 4242, None)


def entry(i: int, name: str | None = None) -> tuple[str, bytes, int, int, int]:
    """A scanned entry ``(key, relpath, size, mtime_ns, inode)``."""
    return (f"k{i:05d}", (name or f"f{i:05d}").encode(), 10, 1_000 + i, 500 + i)


async def items(store: Store) -> list[tuple[Any, ...]]:
    """``(key, state, owner, fence, attempts)`` of every item, by key."""
    return await store.fetch("SELECT key, state, owner, fence, attempts FROM items ORDER BY key")


# -- opening ---------------------------------------------------------------------------------------


async def test_a_read_only_open_of_a_missing_ledger_is_refused(store: Store) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        await store.open(create=False)


async def test_a_newer_schema_is_refused_untouched(store: Store) -> None:
    async with await store.open() as ledger:
        await ledger.start_runner(run_start())
    newer = store.schema_version + 1
    await store.set_schema_version(newer)
    with pytest.raises(SchemaVersionError, match=f"schema version {newer}"):
        await store.open()
    with pytest.raises(SchemaVersionError):
        await store.open(create=False)
    assert await store.fetch("SELECT job, identity FROM jobs") == [("j", "stat")]


async def test_a_ledger_of_the_first_schema_is_upgraded_in_place(store: Store) -> None:
    await store.make_first_version()
    with pytest.raises(
        SchemaVersionError, match=r"schema version 1, older than .* 'asyncbatch run'"
    ):
        await store.open(create=False)
    async with await store.open() as ledger:
        assert await ledger.meta("secret") == "ab" * 32
        (row,) = await ledger.claim_waiting("j", "me", 60, 10)
        assert (row.key, row.attempts, row.interrupted, row.fence) == ("k00001", 1, 0, 2)
        assert await ledger.move_destinations("j") == []
    async with await store.open(create=False) as ledger:
        assert (await ledger.counts("j"))["running"] == 1


async def test_the_secret_is_made_once_and_kept(store: Store) -> None:
    async with await store.open() as ledger:
        secret = await ledger.meta("secret")
        assert await ledger.meta("no such value") is None
    assert secret is not None
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    async with await store.open(create=False) as ledger:
        assert await ledger.meta("secret") == secret


async def test_a_job_keeps_its_identity_mode(ledger: Ledger) -> None:
    assert not await ledger.job_exists("j")
    assert await ledger.job_identity("j") is None
    await ledger.start_runner(run_start("a", shared=True))
    await ledger.start_runner(run_start("b", shared=True))
    with pytest.raises(ConfigurationError, match="identity='stat'"):
        await ledger.start_runner(run_start("c", shared=True, identity="content"))
    await ledger.start_runner(run_start("d", job="other", identity="path"))
    assert await ledger.jobs() == ["j", "other"]
    assert await ledger.job_identity("j") == "stat"
    assert await ledger.job_exists("other")


async def job_rows(store: Store) -> list[list[tuple[Any, ...]]]:
    """Everything a runner's start may write: jobs, runs, runners and locks."""
    return [
        await store.fetch(query)
        for query in (
            "SELECT job, identity, settings FROM jobs ORDER BY job",
            "SELECT id, owner, finished_at, settings_changed FROM runs ORDER BY id",
            "SELECT owner FROM runners ORDER BY owner",
            "SELECT job_id, owner FROM task_lock ORDER BY job_id",
        )
    ]


def ended(started: Started, owner: str, *, holds_lock: bool) -> RunEnd:
    """How a runner started by ``started`` leaves, its run ok."""
    return RunEnd(
        job="j",
        owner=owner,
        holds_lock=holds_lock,
        run_id=started.run_id,
        totals=RunTotals(),
        exit_status="ok",
    )


async def test_a_job_keeps_its_source_and_records_changes_of_its_scan_rules(
    ledger: Ledger, store: Store
) -> None:
    first = await ledger.start_runner(run_start("a", ignore=("*.tmp",)))
    assert first.changed == ()
    assert await ledger.job_settings("j") == JobSettings(source=SOURCE, ignore=("*.tmp",))
    assert await ledger.job_settings("nope") is None
    # Another source is refused, naming both and the way out, with nothing written: neither
    # while the first runner holds the lock (a wrong source is said first) nor after it.
    elsewhere = "/srv/elsewhere/inbox"
    for holds in (True, False):
        before = await job_rows(store)
        for shared in (False, True):
            with pytest.raises(ConfigurationError) as info:
                await ledger.start_runner(run_start("b", source=elsewhere, shared=shared))
            assert f"scans {SOURCE!r}, not {elsewhere!r}" in str(info.value)
            assert "--job NAME" in str(info.value)
        assert await job_rows(store) == before
        if holds:
            await ledger.release_runner(ended(first, "a", holds_lock=True))
    # The scan rules may change: recorded, and named in the run's history row.
    second = await ledger.start_runner(run_start("c", recursive=True))
    assert second.changed == ("recursive: off -> on", "ignore: '*.tmp' -> none")
    assert await ledger.job_settings("j") == JobSettings(source=SOURCE, recursive=True)
    await ledger.release_runner(ended(second, "c", holds_lock=True))
    third = await ledger.start_runner(run_start("d", recursive=True))
    assert third.changed == ()
    latest, middle, oldest = await ledger.runs("j")
    assert (latest.settings_changed, oldest.settings_changed) == (None, None)
    assert middle.settings_changed == "recursive: off -> on; ignore: '*.tmp' -> none"
    # A name that is not UTF-8 round-trips.
    odd = os.fsdecode(b"/srv/caf\xe9")
    await ledger.start_runner(run_start("e", job="odd", source=odd))
    assert await ledger.job_settings("odd") == JobSettings(source=odd)


async def test_a_job_keeps_its_readiness_rules_unless_a_run_gives_others_on_purpose(
    ledger: Ledger, store: Store
) -> None:
    marker = ("marker:.done",)
    first = await ledger.start_runner(run_start("a", ready=marker, ready_given=True))
    assert first.changed == ()
    assert await ledger.job_settings("j") == JobSettings(source=SOURCE, ready=marker)
    await ledger.release_runner(ended(first, "a", holds_lock=True))
    # Rules not given (the default, age) are refused, naming the job's and the way out,
    # with nothing written.
    before = await job_rows(store)
    for shared in (False, True):
        with pytest.raises(ConfigurationError) as info:
            await ledger.start_runner(run_start("b", shared=shared))
        (line,) = str(info.value).splitlines()
        assert "is ready by marker:.done, not age: give --ready marker:.done" in line
    assert await job_rows(store) == before
    # The job's rules, not given: accepted; the settle window of the run is recorded, and is
    # no rule change.
    same = await ledger.start_runner(run_start("c", ready=marker, settle=0.0))
    assert same.changed == ()
    assert (await ledger.job_settings("j")) == JobSettings(source=SOURCE, ready=marker, settle=0.0)
    await ledger.release_runner(ended(same, "c", holds_lock=True))
    # Other rules given on purpose: recorded, and named in the run's history row.
    other = ("age", "min-size:1024")
    changed = await ledger.start_runner(run_start("d", ready=other, ready_given=True))
    assert changed.changed == ("ready: marker:.done -> age, min-size:1024",)
    recorded = await ledger.job_settings("j")
    assert recorded is not None
    assert recorded.ready == other
    latest = (await ledger.runs("j"))[0]
    assert latest.settings_changed == "ready: marker:.done -> age, min-size:1024"


async def test_a_ledger_of_schema_5_is_upgraded_its_jobs_ready_by_age_and_its_runs_counts_kept(
    store: Store,
) -> None:
    await store.make_fifth_version()
    with pytest.raises(SchemaVersionError, match="schema version 5, older than"):
        await store.open(create=False)
    async with await store.open() as ledger:
        assert await ledger.job_settings("j") == JobSettings(source=SOURCE)
        (old_run,) = await ledger.runs("j")
        assert (old_run.totals.unsettled, old_run.totals.unmarked, old_run.totals.too_old) == (
            2,
            0,
            0,
        )
        with pytest.raises(ConfigurationError, match=r"is ready by age, not marker:\.done"):
            await ledger.start_runner(run_start("a", ready=("marker:.done",)))
        started = await ledger.start_runner(run_start("a"))
        assert started.changed == ()
        totals = RunTotals(seen=3, done=1, unsettled=1, unmarked=1, too_old=1)
        await ledger.release_runner(
            RunEnd(
                job="j",
                owner="a",
                holds_lock=True,
                run_id=started.run_id,
                totals=totals,
                exit_status="ok",
            )
        )
        latest = (await ledger.runs("j"))[0]
        assert latest.totals == totals


# -- the job lock --------------------------------------------------------------------------------


async def test_a_live_lock_is_refused_and_names_its_holder(ledger: Ledger) -> None:
    me = this_process()
    assert (await ledger.start_runner(run_start("owner-a"))).stale is None
    with pytest.raises(JobLockedError, match=f"pid {me.pid} on host {me.host!r}") as info:
        await ledger.start_runner(run_start("owner-b"))
    assert (info.value.pid, info.value.host) == (me.pid, me.host)
    with pytest.raises(JobLockedError):
        await ledger.start_runner(run_start("owner-c", shared=True))
    # A refused runner left no record.
    assert [r.owner for r in await ledger.runners("j")] == ["owner-a"]
    (lock,) = await ledger.locks()
    assert (lock.job, lock.owner, lock.pid, lock.host) == ("j", "owner-a", me.pid, me.host)
    # Times come back in the caller's clock, whatever the server's.
    assert abs(lock.acquired_at - time.time()) < 5
    assert abs(lock.expires_at - (time.time() + 60)) < 5


async def test_a_dead_holders_lock_is_taken_over_at_once(ledger: Ledger) -> None:
    gone = dead_process()
    assert holder_is_dead(gone)
    await ledger.start_runner(run_start("dead-owner", me=gone, ttl=3600))
    stale = (await ledger.start_runner(run_start("new-owner"))).stale
    assert stale is not None
    assert (stale.owner, stale.pid) == ("dead-owner", gone.pid)
    (lock,) = await ledger.locks()
    assert lock.owner == "new-owner"


async def test_an_expired_heartbeat_is_taken_over(ledger: Ledger, store: Store) -> None:
    await ledger.start_runner(run_start("remote", me=OTHER_HOST, ttl=SHORT))
    with pytest.raises(JobLockedError, match=r"elsewhere\.example"):
        await ledger.start_runner(run_start("local", ttl=30))
    await store.advance(PAST_SHORT)
    stale = (await ledger.start_runner(run_start("local", ttl=30))).stale
    assert stale is not None
    assert stale.owner == "remote"
    assert [lock.owner for lock in await ledger.locks()] == ["local"]


async def test_a_shared_runner_clears_a_stale_lock_and_blocks_an_exclusive_one(
    ledger: Ledger,
) -> None:
    await ledger.start_runner(run_start("gone", me=dead_process()))
    stale = (await ledger.start_runner(run_start("shared-a", shared=True))).stale
    assert stale is not None
    assert stale.owner == "gone"
    assert await ledger.locks() == []
    # Not "locked": there is no lock for 'asyncbatch locks' to show, but a shared runner.
    with pytest.raises(JobLockedError, match="being run by --shared runners") as info:
        await ledger.start_runner(run_start("exclusive"))
    assert info.value.shared_runner


async def start_or_refuse(ledger: Ledger, kind: str, job: str, started: dict[str, bool]) -> None:
    """Start a runner of ``kind`` (``"exclusive"`` or ``"shared"``, its owner ``KIND JOB``) on
    ``job``; note whether it started."""
    try:
        await ledger.start_runner(run_start(f"{kind} {job}", job=job, shared=kind == "shared"))
    except JobLockedError:
        started[kind] = False
    else:
        started[kind] = True


async def test_an_exclusive_and_a_shared_runner_starting_together_never_both_run(
    store: Store,
) -> None:
    # Each start is one transaction that checks for the other kind and registers itself: of
    # an exclusive and a shared runner starting at once (each on its own connection), one is
    # refused, whichever went first (the shared runner used to check and register in two
    # transactions, and an exclusive one could start in between: both ran).
    async with await store.open() as one, await store.open() as other:
        for round_ in range(40):
            job = f"race-{round_}"
            started: dict[str, bool] = {}
            pair = [(one, "exclusive"), (other, "shared")]
            async with anyio.create_task_group() as tg:
                for ledger, kind in pair if round_ % 2 else reversed(pair):
                    tg.start_soon(start_or_refuse, ledger, kind, job, started)
            winners = [kind for kind, ran in started.items() if ran]
            assert len(winners) == 1, started
            owners = [f"{kind} {job}" for kind in winners]
            assert [r.owner for r in await one.runners(job)] == owners
            locks = [lock.owner for lock in await one.locks() if lock.job == job]
            assert locks == (owners if winners == ["exclusive"] else [])


async def test_release_deletes_only_the_owners_lock(ledger: Ledger) -> None:
    await ledger.start_runner(run_start("owner-a"))
    assert not await ledger.force_unlock("j", "owner-b")
    assert len(await ledger.locks()) == 1
    assert await ledger.force_unlock("j", "owner-a")
    assert await ledger.locks() == []
    assert (await ledger.start_runner(run_start("owner-b"))).stale is None


async def test_heartbeat_extends_lock_runner_and_leases_and_reports_a_lost_lock(
    ledger: Ledger,
    store: Store,
) -> None:
    me = this_process()
    await ledger.start_runner(run_start("a", ttl=SHORT))
    (row,) = await ledger.claim_scanned("j", "a", SHORT, [entry(1)])
    assert await ledger.heartbeat(
        Heartbeat(job="j", owner="a", ttl=60, leases=[(row.key, row.fence)], holds_lock=True)
    ) == Renewal(True, frozenset())
    await store.advance(PAST_SHORT)
    # Without the heartbeat, all three would have expired by now.
    with pytest.raises(JobLockedError):
        await ledger.start_runner(run_start("b", me=OTHER_HOST))
    assert await ledger.claim_scanned("j", "b", 60, [entry(1)]) == [
        ClaimedRow("k00001", "held", 1, 0)
    ]
    assert await ledger.reap_stale_runners("j", me) == 0
    (runner,) = await ledger.runners("j")
    assert not runner.shared
    # The heartbeat was before the clock moved on.
    assert abs(runner.heartbeat_at - (store.now() - PAST_SHORT)) < 5
    # An operator removed the lock: the next heartbeat says so.
    assert await ledger.force_unlock("j", "a")
    assert await ledger.heartbeat(
        Heartbeat(job="j", owner="a", ttl=60, leases=[], holds_lock=True)
    ) == Renewal(False)


async def test_heartbeat_reports_a_lost_runner_record(ledger: Ledger, store: Store) -> None:
    await ledger.start_runner(run_start("r", me=OTHER_HOST, ttl=SHORT, shared=True))
    await store.advance(PAST_SHORT)
    assert await ledger.reap_stale_runners("j", this_process()) == 0
    assert not (
        await ledger.heartbeat(Heartbeat(job="j", owner="r", ttl=60, leases=[], holds_lock=False))
    ).alive


async def test_a_run_found_gone_is_killed_when_its_process_is_gone_else_lost(
    ledger: Ledger, store: Store
) -> None:
    # (A runner suspended past its lease showed "exit killed" in history while it was alive.)
    me = this_process()
    await ledger.start_runner(run_start("dead", me=dead_process(), ttl=3600, shared=True))
    await ledger.start_runner(run_start("stalled", me=me, ttl=SHORT, shared=True))
    await ledger.start_runner(run_start("far", me=OTHER_HOST, ttl=SHORT, shared=True))
    await store.advance(PAST_SHORT)
    await ledger.reap_stale_runners("j", me)
    ended = {run.owner: run.exit_status for run in await ledger.runs("j")}
    assert ended == {"dead": "killed", "stalled": "lost", "far": "lost"}
    # A stale lock taken over says the same of its holder's run.
    await ledger.start_runner(run_start("holder", job="k", me=me, ttl=SHORT))
    await store.advance(PAST_SHORT)
    await ledger.start_runner(run_start("next", job="k", me=me))
    assert {run.owner: run.exit_status for run in await ledger.runs("k")} == {
        "holder": "lost",
        "next": None,
    }


async def test_heartbeat_names_the_leases_another_runner_took_over(
    ledger: Ledger, store: Store
) -> None:
    # A runner whose heartbeats came late (suspended, a stalled event loop): its liveness
    # record is still there, but a lease expired and was taken; that one is lost, not renewed.
    await ledger.start_runner(run_start("a", shared=True))
    first, second = await ledger.claim_scanned("j", "a", SHORT, [entry(1), entry(2)])
    (kept,) = await ledger.claim_scanned("j", "a", 60, [entry(3)])
    await store.advance(PAST_SHORT)
    (taken,) = await ledger.claim_scanned("j", "b", 60, [entry(1)])
    assert (taken.state, taken.fence) == ("running", first.fence + 1)
    leases = [(first.key, first.fence), (second.key, second.fence), (kept.key, kept.fence)]
    renewal = await ledger.heartbeat(Heartbeat(job="j", owner="a", ttl=60, leases=leases))
    assert renewal == Renewal(True, frozenset({first.key}))
    # The expired lease nobody took was renewed (still ours), the taken one was left alone.
    assert await ledger.claim_scanned("j", "b", 60, [entry(2)]) == [
        ClaimedRow(second.key, "held", second.fence, 0)
    ]
    assert await ledger.commit_outcomes("j", "a", [Outcome(first.key, first.fence, "done")]) == {
        first.key
    }


async def test_the_items_of_a_runner_that_is_gone_are_put_back(
    ledger: Ledger, store: Store
) -> None:
    me = this_process()
    await ledger.start_runner(run_start("dead", me=dead_process(), ttl=3600, shared=True))
    await ledger.start_runner(run_start("alive", me=me, ttl=3600, shared=True))
    await ledger.claim_scanned("j", "dead", 60, [entry(1), entry(2)])
    await ledger.claim_scanned("j", "alive", 60, [entry(3)])
    await ledger.commit_outcomes("j", "dead", [], [("k00002", 1)])  # k00002 had started
    assert await ledger.reap_stale_runners("j", me) == 2
    assert [r.owner for r in await ledger.runners("j")] == ["alive"]
    assert await items(store) == [
        ("k00001", "pending", None, 1, 0),
        ("k00002", "pending", None, 1, 1),
        ("k00003", "running", "alive", 1, 0),
    ]
    # The started attempt is interrupted: counted as it is put back, not again when leased.
    interrupted = "SELECT key, interrupted FROM items ORDER BY key"
    assert await store.fetch(interrupted) == [("k00001", 0), ("k00002", 1), ("k00003", 0)]
    assert await waiting(ledger) == 2
    claimed = sorted(await ledger.claim_waiting("j", "alive", 60, 10))
    assert [(c.key, c.attempts, c.interrupted) for c in claimed] == [
        ("k00001", 0, 0),
        ("k00002", 1, 1),
    ]


async def test_the_leases_of_owners_without_a_runner_record_are_put_back_by_a_joining_run(
    ledger: Ledger, store: Store
) -> None:
    # A live runner has its record from before its first lease to after its last: a lease
    # whose owner has none is a gone runner's (an earlier asyncbatch removed the record of a
    # run whose release of its leases had failed). A live runner of another host keeps its own.
    me = this_process()
    await ledger.start_runner(run_start("far", me=OTHER_HOST, ttl=3600, shared=True))
    await ledger.claim_scanned("j", "far", 60, [entry(1)])
    await ledger.claim_scanned("j", "gone", 60, [entry(2), entry(3)])
    assert await ledger.reap_stale_runners("j", me) == 0  # only gone runners' records, by default
    assert await ledger.reap_stale_runners("j", me, orphans=True) == 2
    assert await items(store) == [
        ("k00001", "running", "far", 1, 0),
        ("k00002", "pending", None, 1, 0),
        ("k00003", "pending", None, 1, 0),
    ]
    assert [r.owner for r in await ledger.runners("j")] == ["far"]
    assert await ledger.reap_stale_runners("j", me, orphans=True) == 0


async def test_a_runner_leaving_with_leases_gives_them_back_with_its_records(
    ledger: Ledger, store: Store
) -> None:
    # (Its release of them failed: a full disk, an outage. Its records went, its leases
    # stayed, of an owner nobody knew was gone: held until they ran out.)
    started = await ledger.start_runner(run_start("a"))
    first, _ = await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2)])
    end = dataclasses.replace(
        ended(started, "a", holds_lock=True), leases=[(first.key, first.fence)]
    )
    await ledger.release_runner(end)
    assert await items(store) == [
        ("k00001", "pending", None, 1, 0),
        ("k00002", "running", "a", 1, 0),  # (not among its leases: left as it was)
    ]
    assert (await ledger.runners("j"), await ledger.locks()) == ([], [])


# -- claims and fencing --------------------------------------------------------------------------


async def test_a_lease_is_exclusive_until_it_expires(ledger: Ledger, store: Store) -> None:
    (first,) = await ledger.claim_scanned("j", "runner-a", SHORT, [entry(1)])
    # A new item is leased with fence 1; its attempt counts once it starts.
    assert (first.key, first.state, first.fence, first.attempts) == ("k00001", "running", 1, 0)
    assert await ledger.commit_outcomes("j", "runner-a", [], [(first.key, 1)]) == set()
    # Held by runner A: another runner gets it back as held, not leased.
    assert await ledger.claim_scanned("j", "runner-b", SHORT, [entry(1)]) == [
        ClaimedRow("k00001", "held", 1, 1)
    ]
    assert await ledger.claim_waiting("j", "runner-b", SHORT, 10) == []
    await store.advance(PAST_SHORT)
    (second,) = await ledger.claim_scanned("j", "runner-b", 60, [entry(1)])
    assert (second.state, second.fence, second.attempts) == ("running", 2, 1)
    await ledger.commit_outcomes("j", "runner-b", [], [(second.key, 2)])
    assert await items(store) == [("k00001", "running", "runner-b", 2, 2)]


async def test_a_claim_finds_its_owners_live_leases_again(ledger: Ledger) -> None:
    # A claim repeated after its reply was lost (PostgreSQL: the connection died with the
    # commit in flight) must find its leases, not call them another runner's.
    (first,) = await ledger.claim_scanned("j", "runner-a", 60, [entry(1)])
    again = await ledger.claim_scanned("j", "runner-a", 60, [entry(1), entry(2)])
    assert [(r.key, r.state, r.fence) for r in sorted(again)] == [
        ("k00001", "running", first.fence),
        ("k00002", "running", 1),
    ]
    assert [r.state for r in await ledger.claim_scanned("j", "runner-b", 60, [entry(1)])] == [
        "held"
    ]


async def test_a_lost_lease_cannot_mark_done_and_is_reported(ledger: Ledger, store: Store) -> None:
    first, _ = sorted(await ledger.claim_scanned("j", "runner-a", SHORT, [entry(1), entry(2)]))
    await store.advance(PAST_SHORT)
    (second,) = await ledger.claim_scanned("j", "runner-b", 60, [entry(1)])
    assert second.fence == 2
    lost = await ledger.commit_outcomes(
        "j", "runner-a", [Outcome("k00001", 1, "done"), Outcome("k00002", 1, "done")]
    )
    assert lost == {"k00001"}
    assert await items(store) == [
        ("k00001", "running", "runner-b", 2, 0),
        ("k00002", "done", "runner-a", 1, 1),
    ]
    # The fence is what counts: the right owner with an old fence is refused too.
    assert await ledger.commit_outcomes("j", "runner-b", [Outcome("k00001", 1, "done")]) == {
        "k00001"
    }
    assert await ledger.commit_outcomes("j", "runner-b", [Outcome("k00001", 2, "done")]) == set()
    assert (await ledger.counts("j"))["done"] == 2
    assert first.key == "k00001"


async def test_done_items_are_never_leased_again(ledger: Ledger) -> None:
    rows = [entry(i) for i in range(5)]
    claimed = await ledger.claim_scanned("j", "a", 60, rows)
    assert sorted(c.key for c in claimed) == [r[0] for r in rows]
    assert {(c.state, c.fence, c.attempts) for c in claimed} == {("running", 1, 0)}
    await ledger.commit_outcomes("j", "a", [Outcome(c.key, c.fence, "done") for c in claimed])
    await anyio.sleep(0.05)
    assert await ledger.claim_scanned("j", "b", 60, rows) == []
    assert await ledger.claim_waiting("j", "b", 60, 100) == []
    assert await waiting(ledger) == 0


async def test_dead_rows_and_due_post_actions_come_back_from_a_claim(ledger: Ledger) -> None:
    rows = [entry(1), entry(2), entry(3)]
    await ledger.claim_scanned("j", "a", 60, rows)
    await ledger.commit_outcomes(
        "j",
        "a",
        [
            Outcome("k00001", 1, "dead", "ValueError: bad", None, "move:/tmp/dead"),
            Outcome("k00002", 1, "done", None, None, "delete"),
            Outcome("k00003", 1, "done"),
        ],
    )
    # The same names scanned again, rewritten since (identity "path" keeps their keys): the
    # rows come back with the file that was handled, not the one just scanned.
    rewritten = [
        (key, relpath, size + 1, mtime_ns + 1, inode + 1)
        for key, relpath, size, mtime_ns, inode in rows
    ]
    again = sorted(await ledger.claim_scanned("j", "b", 60, rewritten))
    assert again == [
        ClaimedRow("k00001", "dead", 1, 1, 0, "move:/tmp/dead", b"f00001", 10, 1001, 501),
        ClaimedRow("k00002", "done", 1, 1, 0, "delete", b"f00002", 10, 1002, 502),
    ]
    counts = await ledger.counts("j")
    assert counts == {"pending": 0, "running": 0, "done": 2, "failed": 0, "dead": 1, "vanished": 0}


async def test_vanished_items_are_claimed_again_when_seen(ledger: Ledger) -> None:
    await ledger.claim_scanned("j", "a", 60, [entry(1)])
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "vanished", "gone")])
    (row,) = await ledger.claim_scanned("j", "b", 60, [entry(1)])
    assert (row.state, row.fence, row.attempts) == ("running", 2, 1)


async def test_two_runners_claiming_the_same_chunks_never_share_an_item(store: Store) -> None:
    rows = [entry(i) for i in range(600)]
    chunks = [rows[i : i + 100] for i in range(0, len(rows), 100)]
    got: dict[str, list[str]] = {"a": [], "b": []}
    async with await store.open():
        pass  # created first: this test is about claims, not about creating a ledger at once

    async def claim(owner: str, order: list[list[tuple[str, bytes, int, int, int]]]) -> None:
        async with await store.open() as ledger:
            for chunk in order:
                claimed = await ledger.claim_scanned("j", owner, 60, chunk)
                got[owner] += [c.key for c in claimed if c.state == "running"]

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim, "a", chunks)
        tg.start_soon(claim, "b", chunks[3:] + chunks[:3])
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == [r[0] for r in rows]


async def test_attempts_are_counted_once_per_lease_when_they_start(
    ledger: Ledger, store: Store
) -> None:
    rows = [entry(1), entry(2), entry(3)]
    a, b, c = sorted(await ledger.claim_scanned("j", "me", SHORT, rows))
    assert (a.attempts, b.attempts, c.attempts) == (0, 0, 0)
    # Started and still running: counted now, once however often it is reported.
    for _ in range(2):
        assert await ledger.commit_outcomes("j", "me", [], [(a.key, 1), (b.key, 1)]) == set()
    # Reported started and finished in one group: counted once, with its outcome.
    lost = await ledger.commit_outcomes(
        "j", "me", [Outcome(b.key, 1, "done"), Outcome(c.key, 1, "done")], [(b.key, 1), (c.key, 1)]
    )
    assert lost == set()
    # A start under a fence that is not the item's is not counted.
    await ledger.commit_outcomes("j", "me", [], [(a.key, 7)])
    assert await items(store) == [
        ("k00001", "running", "me", 1, 1),
        ("k00002", "done", "me", 1, 1),
        ("k00003", "done", "me", 1, 1),
    ]
    # A runner that dies during an attempt has used it up; the next lease counts its own.
    await store.advance(PAST_SHORT)
    (again,) = await ledger.claim_scanned("j", "other", 60, [entry(1)])
    assert (again.fence, again.attempts) == (2, 1)
    assert await ledger.commit_outcomes("j", "me", [], [(a.key, 1)]) == set()  # not reported
    await ledger.commit_outcomes("j", "other", [Outcome(a.key, 2, "failed", "x", None)])
    assert (await items(store))[0] == ("k00001", "failed", "other", 2, 2)


async def test_interrupted_attempts_are_counted_apart_from_failures(
    ledger: Ledger, store: Store
) -> None:
    (a,) = await ledger.claim_scanned("j", "me", SHORT, [entry(1)])
    await ledger.commit_outcomes("j", "me", [], [(a.key, a.fence)])  # it started; then we died
    await store.advance(PAST_SHORT)
    (b,) = await ledger.claim_scanned("j", "other", 60, [entry(1)])
    assert (b.fence, b.attempts, b.interrupted) == (2, 1, 1)
    # Started, then given back by a runner that stopped: interrupted too, counted as it is
    # given back (`items` shows it at once), not again when it is leased.
    await ledger.commit_outcomes("j", "other", [], [(b.key, b.fence)])
    await ledger.release_items("j", "other", [(b.key, b.fence)])
    assert await store.fetch("SELECT attempts, interrupted FROM items") == [(2, 2)]
    (c,) = await ledger.claim_waiting("j", "third", 60, 10)
    assert (c.attempts, c.interrupted) == (2, 2)
    # Leased and given back before it started: nothing counted.
    await ledger.release_items("j", "third", [(c.key, c.fence)])
    (c,) = await ledger.claim_waiting("j", "third", 60, 10)
    assert (c.attempts, c.interrupted) == (2, 2)
    # A failure is an attempt, not an interruption.
    failed = Outcome(c.key, c.fence, "failed", "ValueError: x", time.time() - 1)
    assert await ledger.commit_outcomes("j", "third", [failed]) == set()
    (d,) = await ledger.claim_waiting("j", "third", 60, 10)
    assert (d.attempts, d.interrupted) == (3, 2)
    # Given up on without running: no attempt is counted for it.
    gave_up = Outcome(d.key, d.fence, "dead", "given up", None, None, None, False)
    assert await ledger.commit_outcomes("j", "third", [gave_up]) == set()
    assert await store.fetch("SELECT state, attempts, interrupted FROM items") == [("dead", 3, 2)]
    (info,) = await ledger.failures("j", 10)
    assert (info.attempts, info.interrupted) == (3, 2)
    # An operator's retry starts both counts afresh.
    assert await ledger.retry("j", None, dead=True) == 1
    (e,) = await ledger.claim_waiting("j", "fourth", 60, 10)
    assert (e.attempts, e.interrupted) == (0, 0)


async def test_a_failed_attempt_keeps_the_record_of_its_move(ledger: Ledger, store: Store) -> None:
    (row,) = await ledger.claim_scanned("j", "a", 60, [entry(1)])
    assert await ledger.record_move("j", "a", row.key, row.fence, "/archive/f00001")
    assert await ledger.move_destinations("j") == ["/archive/f00001"]
    failed = Outcome(row.key, row.fence, "failed", "ValueError: after the move", time.time() - 1)
    await ledger.commit_outcomes("j", "a", [failed])
    (again,) = await ledger.claim_waiting("j", "a", 60, 10)
    assert again.post_action == "moved:/archive/f00001"
    done = Outcome(again.key, again.fence, "done", None, None, "delete", (11, 2002, 777))
    await ledger.commit_outcomes("j", "a", [done])
    assert await ledger.move_destinations("j") == []
    # A done outcome with a stat records the file that was handled.
    assert await store.fetch("SELECT size, mtime_ns, inode, post_action FROM items") == [
        (11, 2002, 777, "delete")
    ]


async def test_release_puts_items_back_without_undoing_started_attempts(
    ledger: Ledger, store: Store
) -> None:
    a, b = sorted(await ledger.claim_scanned("j", "me", 60, [entry(1), entry(2)]))
    await ledger.commit_outcomes("j", "me", [], [(b.key, b.fence)])  # b started, a never did
    await ledger.release_items("j", "me", [(a.key, a.fence), (b.key, b.fence)])
    await ledger.release_items("j", "someone-else", [(a.key, a.fence)])  # not theirs
    assert await items(store) == [
        ("k00001", "pending", None, 1, 0),
        ("k00002", "pending", None, 1, 1),
    ]
    claimed = sorted(await ledger.claim_waiting("j", "me2", 60, 10))
    assert [(c.key, c.fence, c.attempts) for c in claimed] == [("k00001", 2, 0), ("k00002", 2, 1)]
    assert (claimed[0].relpath, claimed[0].size, claimed[0].mtime_ns, claimed[0].inode) == (
        b"f00001",
        10,
        1001,
        501,
    )


async def test_a_released_retry_stays_failed_with_its_attempts_and_last_error(
    ledger: Ledger,
) -> None:
    """A due retry leased and given back unstarted (its file not settled, a run stopping)
    waits as it was: failed, its attempts, its last error (`failures`), its retry time."""
    (a, b) = sorted(await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2)]))
    await ledger.commit_outcomes("j", "a", [], [(a.key, a.fence)])  # a's attempt started
    due = time.time() - 1
    await ledger.commit_outcomes("j", "a", [Outcome(a.key, a.fence, "failed", "boom", due)])
    await ledger.release_items("j", "a", [(b.key, b.fence)])
    leased = sorted(await ledger.claim_waiting("j", "b", 60, 10))
    assert [(r.key, r.attempts) for r in leased] == [("k00001", 1), ("k00002", 0)]
    await ledger.release_items("j", "b", [(r.key, r.fence) for r in leased])
    counts = await ledger.counts("j")
    assert (counts["failed"], counts["pending"]) == (1, 1)
    (failure,) = await ledger.failures("j", 10)
    assert (failure.key, failure.state, failure.attempts, failure.interrupted) == (
        "k00001",
        "failed",
        1,
        0,
    )
    assert failure.last_error == "boom"
    assert failure.next_attempt_at is not None
    assert abs(failure.next_attempt_at - due) < 2
    # Still due: the next claim takes it, as a retry (its attempts go on).
    again = sorted(await ledger.claim_waiting("j", "c", 60, 10))
    assert [(r.key, r.attempts) for r in again] == [("k00001", 1), ("k00002", 0)]


async def test_claim_waiting_takes_the_oldest_first_and_only_due_retries(
    ledger: Ledger,
) -> None:
    rows = [entry(i) for i in (5, 1, 4, 2, 3)]
    claimed = await ledger.claim_scanned("j", "a", 60, rows)
    now = time.time()
    await ledger.commit_outcomes(
        "j",
        "a",
        [
            Outcome("k00001", 1, "failed", "later", now + 60),
            Outcome("k00002", 1, "failed", "due", now - 1),
        ],
    )
    await ledger.release_items(
        "j",
        "a",
        [(c.key, c.fence) for c in claimed if c.key in ("k00003", "k00004", "k00005")],
    )
    assert await waiting(ledger) == 5
    due = await ledger.next_retry_at("j")
    assert due is not None
    assert abs(due - (now - 1)) < 2  # the earliest failed item, in the caller's clock
    first = await ledger.claim_waiting("j", "b", 60, 2)
    assert sorted(c.key for c in first) == ["k00002", "k00003"]  # by (mtime_ns, relpath)
    rest = await ledger.claim_waiting("j", "b", 60, 10)
    assert sorted(c.key for c in rest) == ["k00004", "k00005"]
    assert await ledger.claim_waiting("j", "b", 60, 10) == []  # k00001 is not due yet
    due = await ledger.next_retry_at("j")
    assert due is not None
    assert abs(due - (now + 60)) < 2
    oldest = await ledger.oldest_waiting("j")
    assert oldest is not None
    assert abs(oldest - time.time()) < 5


async def test_a_claim_of_waiting_items_after_a_place_goes_on_from_there(
    ledger: Ledger,
) -> None:
    # A run whose waiting items are mostly not settled leaves them waiting and claims on
    # from where its last claim ended (``after``): it no longer walks past all of them.
    claimed = await ledger.claim_scanned("j", "a", 60, [entry(i) for i in range(1, 7)])
    await ledger.release_items("j", "a", [(c.key, c.fence) for c in claimed])
    first = await ledger.claim_waiting("j", "b", 60, 2)
    assert sorted(c.key for c in first) == ["k00001", "k00002"]
    place = max((c.mtime_ns, c.relpath) for c in first)
    after = await ledger.claim_waiting("j", "b", 60, 2, ["k00004"], place)
    assert sorted(c.key for c in after) == ["k00003", "k00005"]
    await ledger.release_items("j", "b", [(c.key, c.fence) for c in [*first, *after]])
    last = max((c.mtime_ns, c.relpath) for c in after)
    assert [c.key for c in await ledger.claim_waiting("j", "b", 60, 5, (), last)] == ["k00006"]
    rest = await ledger.claim_waiting("j", "b", 60, 10, ["k00004"])  # from the first again
    assert sorted(c.key for c in rest) == ["k00001", "k00002", "k00003", "k00005"]


async def test_two_connections_claiming_waiting_items_never_get_the_same_one(
    store: Store,
) -> None:
    count = 400
    async with await store.open() as setup:
        claimed = []
        for start in range(0, count, 200):
            chunk = [entry(i) for i in range(start, start + 200)]
            claimed += await setup.claim_scanned("j", "setup", 60, chunk)
        await setup.release_items("j", "setup", [(c.key, c.fence) for c in claimed])
    got: dict[str, list[str]] = {"a": [], "b": []}

    async def drain(owner: str) -> None:
        async with await store.open() as ledger:
            while rows := await ledger.claim_waiting("j", owner, 60, 25):
                got[owner] += [r.key for r in rows]
                await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, "a")
        tg.start_soon(drain, "b")
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(c.key for c in claimed)
    assert len(got["a"]) + len(got["b"]) == count


async def test_a_chained_move_records_where_the_input_is_and_where_it_goes(
    ledger: Ledger, store: Store
) -> None:
    # Killed before the second move's rename, the input is still where the first put it: a
    # record of the destination alone sent the retry to look for it there (vanished).
    (row,) = await ledger.claim_scanned("j", "a", 60, [entry(1)])
    assert await ledger.record_move("j", "a", row.key, row.fence, "/staging/f00001")
    chain = ("/staging/f00001", "/archive/f00001")
    assert await ledger.record_move("j", "a", row.key, row.fence, chain[1], chain[0])
    assert await ledger.move_destinations("j") == ["/archive/f00001"]
    failed = Outcome(row.key, row.fence, "failed", "ValueError: after the moves", time.time() - 1)
    await ledger.commit_outcomes("j", "a", [failed])
    (again,) = await ledger.claim_waiting("j", "a", 60, 10)
    assert decode_move(again.post_action) == chain
    # A move from where the input is to the same place records that place alone.
    assert await ledger.record_move("j", "a", again.key, again.fence, chain[0], chain[0])
    assert await store.fetch("SELECT post_action FROM items") == [("moved:/staging/f00001",)]


async def test_a_lease_recorded_move_needs_the_lease(ledger: Ledger, store: Store) -> None:
    (row,) = await ledger.claim_scanned("j", "a", SHORT, [entry(1)])
    assert await ledger.record_move("j", "a", row.key, row.fence, "/archive/f00001")
    assert await store.fetch("SELECT post_action FROM items") == [("moved:/archive/f00001",)]
    await store.advance(PAST_SHORT)
    (taken,) = await ledger.claim_scanned("j", "b", 60, [entry(1)])
    assert taken.post_action == "moved:/archive/f00001"
    assert not await ledger.record_move("j", "a", row.key, row.fence, "/elsewhere")


# -- operator reads and retry ----------------------------------------------------------------------


TOTALS = RunTotals(
    seen=40,
    done=1,
    done_before=2,
    held=3,
    waiting=4,
    dead=5,
    dead_before=6,
    vanished=7,
    unfinished=12,
    failed=9,
    lost=10,
    earlier=11,
)


async def test_counts_failures_find_items_and_runs(ledger: Ledger) -> None:
    me = this_process()
    run_id = (await ledger.start_runner(run_start("a", shared=True))).run_id
    odd = ("k00003", "café ☕.txt".encode(), 10, 1003, 503)  # a non-ASCII name round-trips
    await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2), odd, entry(4)])
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "failed", "first", None)])
    await anyio.sleep(0.01)
    await ledger.commit_outcomes("j", "a", [Outcome("k00002", 1, "dead", "second\nmore")])
    await ledger.commit_outcomes("j", "a", [Outcome("k00003", 1, "done")])
    await ledger.release_runner(
        RunEnd(
            job="j", owner="a", holds_lock=False, run_id=run_id, totals=TOTALS, exit_status="failed"
        )
    )
    assert await ledger.counts("j") == {
        "pending": 0,
        "running": 1,
        "done": 1,
        "failed": 1,
        "dead": 1,
        "vanished": 0,
    }
    assert await ledger.counts("nothing") == dict.fromkeys(STATES, 0)
    failures = await ledger.failures("j", 10)
    assert [(f.key, f.state, f.last_error) for f in failures] == [
        ("k00002", "dead", "second\nmore"),
        ("k00001", "failed", "first"),
    ]
    assert [f.key for f in await ledger.failures("j", 1)] == ["k00002"]
    assert abs(failures[0].updated_at - time.time()) < 5
    (by_key,) = await ledger.find_items("j", "k00003")
    (by_name,) = await ledger.find_items("j", "café ☕.txt")
    assert by_key == by_name
    assert (by_key.relpath, by_key.size, by_key.mtime_ns, by_key.state, by_key.attempts) == (
        "café ☕.txt",
        10,
        1003,
        "done",
        1,
    )
    assert await ledger.find_items("j", "nope") == []
    (run,) = await ledger.runs("j")
    assert (run.id, run.job, run.owner, run.pid, run.host, run.mode) == (
        run_id,
        "j",
        "a",
        me.pid,
        me.host,
        "run",
    )
    assert run.totals == TOTALS
    assert run.exit_status == "failed"
    assert run.finished_at is not None
    assert 0 <= run.finished_at - run.started_at < 5
    assert abs(run.started_at - time.time()) < 5
    second = (await ledger.start_runner(run_start("b", shared=True, mode="watch"))).run_id
    assert [r.id for r in await ledger.runs("j")] == [second, run_id]
    assert [r.id for r in await ledger.runs("j", limit=1)] == [second]


async def test_retry_resets_failed_and_with_dead_dead_items(ledger: Ledger) -> None:
    await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2), entry(3)])
    await ledger.commit_outcomes(
        "j",
        "a",
        [
            Outcome("k00001", 1, "failed", "x", time.time() + 600),
            Outcome("k00002", 1, "dead", "y"),
            Outcome("k00003", 1, "done"),
        ],
    )
    assert await ledger.retry("j", None, dead=False) == 1
    assert await ledger.retry("j", ["k00002"], dead=False) == 0
    assert await ledger.retry("j", ["k00002", "k00003"], dead=True) == 1
    assert await ledger.retry("j", [], dead=True) == 0
    counts = await ledger.counts("j")
    assert (counts["pending"], counts["done"], counts["dead"]) == (2, 1, 0)
    assert [i.attempts for i in await ledger.find_items("j", "k00001")] == [0]
    assert await ledger.next_retry_at("j") is None
    claimed = sorted(await ledger.claim_waiting("j", "b", 60, 10))
    assert [(c.key, c.attempts, c.fence) for c in claimed] == [
        ("k00001", 0, 2),
        ("k00002", 0, 2),
    ]


# -- transactions --------------------------------------------------------------------------------


class InsideTransaction:
    """A failpoint inside the ledger's next transaction: holds it until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.reached.set()
        assert self.release.wait(30), "the test never released the transaction"


async def cancel_inside_a_transaction(
    monkeypatch: pytest.MonkeyPatch, call: Callable[[], Coroutine[Any, Any, object]]
) -> None:
    """Start ``call``, wait until its transaction is under way, cancel it there, let it go."""
    held = InsideTransaction()
    monkeypatch.setattr(failpoints, "ACTIVE", {"in-transaction": failpoints.Call("call", fn=held)})
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.to_thread.run_sync(held.reached.wait, 30)
            assert held.reached.is_set(), "the transaction never started"
            scope.cancel()  # while the transaction is inside its body
            held.release.set()
    monkeypatch.setattr(failpoints, "ACTIVE", None)


async def test_cancellation_inside_a_transaction_neither_leaves_it_open_nor_undoes_it(
    ledger: Ledger, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = [entry(i) for i in range(3000)]
    claimed: list[ClaimedRow] = []
    for start in range(0, len(many), 500):
        claimed += await ledger.claim_scanned("j", "me", 60, many[start : start + 500])
    await ledger.start_runner(run_start("me"))
    leases = [(c.key, c.fence) for c in claimed]
    # A multi-statement transaction (runner, lock and 3,000 leases) cancelled inside.
    beat = Heartbeat(job="j", owner="me", ttl=60, leases=leases, holds_lock=True)
    await cancel_inside_a_transaction(monkeypatch, functools.partial(ledger.heartbeat, beat))
    await store.assert_writer_not_blocked()
    # A commit cancelled inside its transaction still commits, whole.
    outcomes = [Outcome(c.key, c.fence, "done") for c in claimed]
    await cancel_inside_a_transaction(
        monkeypatch, functools.partial(ledger.commit_outcomes, "j", "me", outcomes)
    )
    await store.assert_writer_not_blocked()
    assert (await ledger.counts("j"))["done"] == 3000
    # A claim cancelled inside its transaction leases whole: nothing half-registered.
    more = [entry(i) for i in range(3000, 3500)]
    await cancel_inside_a_transaction(
        monkeypatch, functools.partial(ledger.claim_scanned, "j", "me", 60, more)
    )
    await store.assert_writer_not_blocked()
    assert (await ledger.counts("j"))["running"] == 500
    # The ledger is still usable after the cancellations.
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ledger.heartbeat(Heartbeat(job="j", owner="me", ttl=60, leases=[], holds_lock=False))
    assert await waiting(ledger) == 0


# -- the idempotency store (IdempotencyMiddleware) -----------------------------------------------

RESPONSE = StoredResponse(
    201, [(b"content-type", b"application/json"), (b"x-latin", b"caf\xe9")], b"\x00{}\xff"
)


async def test_the_idempotency_store_runs_a_key_once_and_replays_its_response(
    ledger: Ledger,
) -> None:
    def claim(scope: str, fingerprint: str, token: str) -> Any:
        request = IdempotencyRequest(scope, "key-1", fingerprint, token)
        return ledger.idempotency_claim(request, lock_timeout=60, ttl=3600)

    first = await claim("api", "fp", "t1")
    assert (first.decision, first.why) == ("run", "new")
    assert (await claim("api", "fp", "t2")).decision == "conflict"
    assert (await claim("api", "other", "t2")).decision == "mismatch"
    assert (await claim("tenant-b", "fp", "t3")).why == "new"  # scopes never meet
    # Only the owner's token completes the record.
    assert not await ledger.idempotency_complete(
        IdempotencyRequest("api", "key-1", "fp", "t2"), RESPONSE, ttl=3600
    )
    assert await ledger.idempotency_complete(
        IdempotencyRequest("api", "key-1", "fp", "t1"), RESPONSE, ttl=3600
    )
    replay = await claim("api", "fp", "t4")
    assert (replay.decision, replay.stored) == ("replay", RESPONSE)
    assert (await claim("api", "other", "t4")).decision == "mismatch"
    # A release frees the key, but only the owner's.
    assert (await claim("tenant-b", "fp", "t5")).decision == "conflict"
    await ledger.idempotency_release(IdempotencyRequest("tenant-b", "key-1", "fp", "not-the-owner"))
    assert (await claim("tenant-b", "fp", "t5")).decision == "conflict"
    await ledger.idempotency_release(IdempotencyRequest("tenant-b", "key-1", "fp", "t3"))
    assert (await claim("tenant-b", "fp", "t5")).why == "new"


async def test_idempotency_records_expire_and_abandoned_ones_are_taken_over(
    ledger: Ledger,
    store: Store,
) -> None:
    # A request that outlives its lock is taken for dead; it can no longer store its answer.
    first = await ledger.idempotency_claim(
        IdempotencyRequest("s", "k", "fp", "t1"), lock_timeout=SHORT, ttl=60
    )
    assert first.decision == "run"
    await store.advance(PAST_SHORT)
    taken = await ledger.idempotency_claim(
        IdempotencyRequest("s", "k", "fp", "t2"), lock_timeout=60, ttl=60
    )
    assert (taken.decision, taken.why) == ("run", "abandoned")
    assert not await ledger.idempotency_complete(
        IdempotencyRequest("s", "k", "fp", "t1"), RESPONSE, ttl=60
    )
    assert await ledger.idempotency_complete(
        IdempotencyRequest("s", "k", "fp", "t2"), RESPONSE, ttl=SHORT
    )
    # A stored answer is replayed until it expires; an expired key is as good as new.
    assert (
        await ledger.idempotency_claim(
            IdempotencyRequest("s", "k", "x", "t3"), lock_timeout=60, ttl=60
        )
    ).decision == "mismatch"
    await ledger.idempotency_claim(
        IdempotencyRequest("s", "gone", "fp", "t4"), lock_timeout=SHORT, ttl=SHORT
    )
    await store.advance(PAST_SHORT)
    assert await ledger.idempotency_purge() == 2
    assert await ledger.idempotency_purge() == 0
    again = await ledger.idempotency_claim(
        IdempotencyRequest("s", "k", "x", "t5"), lock_timeout=60, ttl=60
    )
    assert (again.decision, again.why) == ("run", "new")


async def test_a_started_record_never_runs_again_and_an_unstored_one_says_why(
    ledger: Ledger,
    store: Store,
) -> None:
    def request(key: str, token: str, fingerprint: str = "fp") -> IdempotencyRequest:
        return IdempotencyRequest("s", key, fingerprint, token)

    async def claim(key: str, token: str, fingerprint: str = "fp", lock: float = 60) -> Any:
        found = await ledger.idempotency_claim(
            request(key, token, fingerprint), lock_timeout=lock, ttl=60
        )
        return (found.decision, found.why)

    # Started: only its owner marks it; it is a conflict while locked, never released.
    assert await claim("a", "t1", lock=SHORT) == ("run", "new")
    assert not await ledger.idempotency_start(request("a", "not-the-owner"))
    assert await ledger.idempotency_start(request("a", "t1"))
    assert await ledger.idempotency_start(request("a", "t1"))  # again: harmless
    assert await claim("a", "t2") == ("conflict", "")
    await ledger.idempotency_release(request("a", "t1"))
    assert await claim("a", "t2") == ("conflict", "")
    # Past its lock it is not taken over: its response began, its effects may be done.
    await store.advance(PAST_SHORT)
    assert await claim("a", "t3") == ("unstored", "unfinished")
    assert await claim("a", "t3", "other") == ("mismatch", "")
    # Its owner may still complete it: then it is replayed.
    assert await ledger.idempotency_complete(request("a", "t1"), RESPONSE, ttl=60)
    replay = await ledger.idempotency_claim(request("a", "t4"), lock_timeout=60, ttl=60)
    assert (replay.decision, replay.stored) == ("replay", RESPONSE)

    # Unstored, from running or from started, by its owner only; kept for its ttl.
    assert await claim("b", "t1") == ("run", "new")
    assert not await ledger.idempotency_unstored(request("b", "t9"), "too_large", ttl=60)
    assert await ledger.idempotency_unstored(request("b", "t1"), "too_large", ttl=SHORT)
    assert not await ledger.idempotency_complete(request("b", "t1"), RESPONSE, ttl=60)
    assert await claim("b", "t2") == ("unstored", "too_large")
    assert await claim("b", "t2", "other") == ("mismatch", "")
    assert await claim("c", "t1") == ("run", "new")
    assert await ledger.idempotency_start(request("c", "t1"))
    assert await ledger.idempotency_unstored(request("c", "t1"), "incomplete", ttl=60)
    assert not await ledger.idempotency_start(request("c", "t1"))
    await ledger.idempotency_release(request("c", "t1"))
    assert await claim("c", "t2") == ("unstored", "incomplete")
    # An expired unstored record is as good as none.
    await store.advance(PAST_SHORT)
    assert await claim("b", "t3") == ("run", "expired")


async def test_concurrent_claims_of_one_key_from_several_connections_run_it_once(
    store: Store,
) -> None:
    ledgers = [await store.open() for _ in range(4)]
    decisions: list[str] = []

    async def claim(ledger: Ledger, token: str) -> None:
        found = await ledger.idempotency_claim(
            IdempotencyRequest("s", "same", "fp", token), lock_timeout=60, ttl=60
        )
        decisions.append(found.decision)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(claim, ledgers[i % 4], f"t{i}")
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert sorted(decisions) == ["conflict"] * 11 + ["run"]


# -- PostgreSQL only: what SQLite has no counterpart for ------------------------------------------


async def test_postgres_skip_locked_claims_do_not_wait_for_a_locked_row(pg_dsn: str) -> None:
    async with await PostgresLedger.open(pg_dsn) as ledger:
        claimed = await ledger.claim_scanned("j", "setup", 60, [entry(1), entry(2)])
        await ledger.release_items("j", "setup", [(c.key, c.fence) for c in claimed])
        other = await asyncpg.connect(pg_dsn, timeout=10)
        try:
            async with other.transaction():
                await other.execute("SELECT 1 FROM items WHERE key = 'k00001' FOR UPDATE")
                with anyio.fail_after(5):
                    rows = await ledger.claim_waiting("j", "a", 60, 10)
                assert [r.key for r in rows] == ["k00002"]
        finally:
            await other.close()
        assert [r.key for r in await ledger.claim_waiting("j", "a", 60, 10)] == ["k00001"]


def lose_first_reply(monkeypatch: pytest.MonkeyPatch, session: Any) -> list[object]:
    """Make the PostgreSQL ``session``'s next transaction run and commit, then lose its reply
    (its connection "dropped": the session runs it again); returns the list that gets the
    lost reply's result."""
    attempt = session._attempt
    replies_lost: list[object] = []

    async def reply_lost(body: Any, **options: Any) -> Any:
        result = await attempt(body, **options)
        if not replies_lost:
            replies_lost.append(result)
            raise ConnectionResetError("the connection dropped before the reply")
        return result

    monkeypatch.setattr(session, "_attempt", reply_lost)
    return replies_lost


async def test_postgres_a_commit_whose_reply_was_lost_is_not_taken_for_a_lost_lease(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commit ran; its connection dropped before the reply; the session runs it again, and
    # finds the rows finished. They are this lease's outcomes: they were reported as leases
    # taken over ("2 outcomes refused", counted as done before). A lease another runner did
    # take over is still refused.
    async with await PostgresLedger.open(pg_dsn) as ledger:
        a, b, c = sorted(await ledger.claim_scanned("j", "me", 60, [entry(i) for i in (1, 2, 3)]))
        await ledger.release_items("j", "me", [(c.key, c.fence)])
        (taken,) = await ledger.claim_waiting("j", "other", 60, 10)
        assert taken.key == c.key
        session = ledger._outcomes()
        replies_lost = lose_first_reply(monkeypatch, session)
        outcomes = [
            Outcome(a.key, a.fence, "done"),
            Outcome(b.key, b.fence, "failed", "ValueError: x", time.time() + 60),
            Outcome(c.key, c.fence, "done"),
        ]
        assert await ledger.commit_outcomes("j", "me", outcomes) == {c.key}
        assert replies_lost
    states = await pg_query(pg_dsn, "SELECT key, state, owner FROM items ORDER BY key")
    assert [tuple(r) for r in states] == [
        ("k00001", "done", "me"),
        ("k00002", "failed", "me"),
        ("k00003", "running", "other"),
    ]


async def test_postgres_a_queued_chunk_whose_reply_was_lost_is_queued_and_counted_once(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lister's queueing ran; its connection dropped before the reply; the session runs it
    # again: it queued the chunk a second time (claimed once, the listing's counts doubled).
    async with await PostgresLedger.open(pg_dsn) as ledger:
        await ledger.start_runner(run_start("a", shared=True))
        await ledger.claim_scanned("j", "a", 60, [entry(1)])
        await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "done")])
        role = await ledger.take_listing("j", "a", 60)
        await ledger.begin_listing("j", "a", role.fence)
        session = ledger._session
        replies_lost = lose_first_reply(monkeypatch, session)
        found = await ledger.queue_listed("j", "a", role.fence, [queued(i) for i in (1, 2, 3)])
        monkeypatch.undo()
        assert replies_lost == [Registered(2, 1, 0)]
        assert found == Registered(0, 1, 0)  # what the run before did; done found again
        assert await ledger.queued_files("j") == 2
        listing = await ledger.listing("j")
        assert listing is not None
        assert (listing.registered, listing.found_done) == (2, 1)
        # The next chunk (another digest) is queued as usual, and a run that is not a re-run
        # of the same chunk too.
        assert await ledger.queue_listed("j", "a", role.fence, [queued(4)]) == Registered(1)
        taken, _ = await ledger.take_queued("j", "a", 60, 10)
        assert [row[0] for row in taken] == ["k00002", "k00003", "k00004"]


async def test_postgres_items_a_claim_leased_before_its_reply_was_lost_are_put_back(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim ran and committed; its connection dropped before the reply (pg_terminate_backend,
    # a failover); the session ran it again, and that run leased other items. The first run's
    # were leased to a live runner that never heard of them: none of its heartbeats renewed
    # them, no claim took them once expired (only a gone runner's are put back), and every
    # shared runner waited for them for ever. A heartbeat puts them back once their lease ran
    # out; an item the runner holds, or leased since it listed its keys, is left alone.
    async with await PostgresLedger.open(pg_dsn) as ledger:
        await ledger.start_runner(run_start("a", shared=True))
        role = await ledger.take_listing("j", "a", 60)
        await ledger.begin_listing("j", "a", role.fence)
        await ledger.queue_listed("j", "a", role.fence, [queued(i) for i in (1, 2, 3, 4)])
        assert await ledger.end_listing("j", "a", role.fence, 4)
        lose_first_reply(monkeypatch, ledger._session)
        _, taken = await ledger.take_queued("j", "a", 0.5, 2)
        monkeypatch.undo()
        assert [row.key for row in taken] == ["k00003", "k00004"]
        await ledger.commit_outcomes("j", "a", [Outcome(r.key, r.fence, "done") for r in taken])
        await anyio.sleep(0.6)  # the leases of k00001 and k00002 (0.5 s) run out
        fresh = await ledger.claim_scanned("j", "a", 60, [entry(5)])  # after the keys listed
        assert (await ledger.heartbeat(Heartbeat(job="j", owner="a", ttl=60))).alive
        claimed = await ledger.claim_waiting("j", "a", 0.5, 1)
        assert [row.key for row in claimed] == ["k00001"]

        # The same for a claim of waiting items: the lost run leased k00002, the next none.
        lose_first_reply(monkeypatch, ledger._session)
        assert await ledger.claim_waiting("j", "a", 0.5, 1) == []
        monkeypatch.undo()
        await anyio.sleep(0.6)  # k00001's lease ran out too: the runner holds it, kept
        leases = [(claimed[0].key, claimed[0].fence), (fresh[0].key, fresh[0].fence)]
        await ledger.heartbeat(Heartbeat(job="j", owner="a", ttl=60, leases=leases))
        assert [row.key for row in await ledger.claim_waiting("j", "a", 60, 10)] == ["k00002"]
        states = await pg_query(pg_dsn, "SELECT key, state, owner FROM items ORDER BY key")
        assert [tuple(r) for r in states] == [
            ("k00001", "running", "a"),
            ("k00002", "running", "a"),
            ("k00003", "done", "a"),
            ("k00004", "done", "a"),
            ("k00005", "running", "a"),
        ]


async def test_postgres_a_runner_frozen_in_a_transaction_holds_its_rows_for_short(
    pg_dsn: str,
) -> None:
    # A runner stalled mid-transaction (SIGSTOP; here its body waits, a row locked, until the
    # other runner is through): the server ends its session after busy_timeout / 2, so the
    # other runner, waiting for that row, gets it before its own wait (lock_timeout =
    # busy_timeout) fails; the stalled transaction then runs again on a new connection.
    async with (
        await PostgresLedger.open(pg_dsn, busy_timeout=2) as frozen,
        await PostgresLedger.open(pg_dsn, busy_timeout=2) as other,
    ):
        claimed = await frozen.claim_scanned("j", "setup", 60, [entry(1)])
        await frozen.release_items("j", "setup", [(c.key, c.fence) for c in claimed])
        bodies = 0
        locked, through = anyio.Event(), anyio.Event()

        async def stall(conn: asyncpg.Connection) -> int:
            nonlocal bodies
            bodies += 1
            await conn.execute("SELECT 1 FROM items WHERE key = 'k00001' FOR UPDATE")
            if bodies == 1:
                locked.set()
                await through.wait()  # idle inside the transaction meanwhile
            return bodies

        async def touch(conn: asyncpg.Connection) -> str:
            return str(await conn.execute("UPDATE items SET attempts = 7 WHERE key = 'k00001'"))

        result: list[int] = []

        async def run_frozen() -> None:
            result.append(await frozen._session.transact(stall))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_frozen)
            await locked.wait()
            try:
                # A lock wait past lock_timeout raises: this one gets the row.
                assert await other._session.transact(touch) == "UPDATE 1"
            finally:
                through.set()
        assert result == [2], "the stalled transaction ran again on a new connection"


async def test_postgres_a_runner_frozen_as_it_sends_a_new_statement_holds_its_rows_for_short(
    pg_dsn: str,
) -> None:
    # Regression: asyncpg prepares a statement new to its connection with Parse and Describe
    # but no Sync; until the rest comes the server counts the session active (ClientRead), not
    # idle in a transaction, and never ends it. A runner frozen just then (SIGSTOP, a handler
    # blocking its event loop: here, blocked until the other runner is through) kept its
    # transaction's row locks: the other runner's wait for them gave up ("rows stayed locked
    # by another runner"; test_pause's taker exited 69). Such a statement now rolls the
    # transaction back first and is prepared outside it; the transaction then runs again.
    locked, through = threading.Event(), threading.Event()
    bodies = 0

    async def stall(conn: asyncpg.Connection) -> int:
        nonlocal bodies
        bodies += 1
        await conn.execute("SELECT 1 FROM items WHERE key = 'k00001' FOR UPDATE")
        if bodies == 1:
            locked.set()
            # The event loop blocks at its next turn: once this statement is sent.
            asyncio.get_running_loop().call_soon(through.wait, 30)
        return int(await conn.fetchval("SELECT attempts FROM items WHERE key = $1", "k00001"))

    async def frozen_runner() -> int:
        async with await PostgresLedger.open(pg_dsn, busy_timeout=2) as frozen:
            return await frozen._session.transact(stall)

    async def touch(conn: asyncpg.Connection) -> str:
        return str(await conn.execute("UPDATE items SET attempts = 7 WHERE key = 'k00001'"))

    async with await PostgresLedger.open(pg_dsn, busy_timeout=2) as other:
        claimed = await other.claim_scanned("j", "setup", 60, [entry(1)])
        await other.release_items("j", "setup", [(c.key, c.fence) for c in claimed])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # A runner of its own: its event loop, in a thread, blocks; this one goes on.
            frozen = pool.submit(asyncio.run, frozen_runner())
            try:
                assert await anyio.to_thread.run_sync(locked.wait, 30)
                # A lock wait past lock_timeout (2 s) raises: this one gets the row.
                assert await other._session.transact(touch) == "UPDATE 1"
            finally:
                through.set()
            assert await anyio.to_thread.run_sync(frozen.result, 30) == 7
        assert bodies == 2, "the frozen transaction was rolled back and ran again"


async def test_postgres_a_transaction_run_again_for_a_new_statement_is_not_a_lost_reply(
    pg_dsn: str,
) -> None:
    # A transaction refused a statement new to its connection (see the test above) is run
    # again; that run is not one after a lost reply (which may have committed): a claim of
    # queued items does not take it for one (it leased nothing unknown to its runner).
    async with await PostgresLedger.open(pg_dsn) as ledger:
        await ledger.start_runner(run_start("a", shared=True))
        role = await ledger.take_listing("j", "a", 60)
        await ledger.begin_listing("j", "a", role.fence)
        assert await ledger.queue_listed("j", "a", role.fence, [queued(1)]) == Registered(1)
        _, taken = await ledger.take_queued("j", "a", 60, 10)
        assert [row.key for row in taken] == ["k00001"]
        assert ledger._unknown_leases == set()


async def _log_held_open(
    ledger: PostgresLedger, name: bytes, logged: anyio.Event, commit: anyio.Event, pid: list[int]
) -> None:
    """Log ``name`` for job 'j' in a transaction of ``ledger``'s that stays open, numbered,
    until ``commit`` is set (as a forget or a committer's log that is slow to commit)."""

    async def body(conn: asyncpg.Connection) -> None:
        await _log_names(conn, "j", [name])
        if not logged.is_set():  # the first time: a run again (a deadlock) just commits
            pid.append(conn.get_server_pid())
            logged.set()
            await commit.wait()

    await ledger._session.transact(body)


async def _waiting_for(pg_dsn: str, pid: int) -> bool:
    """Whether some session waits for a lock that the session ``pid`` holds."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
    return bool((await pg_query(pg_dsn, query, pid))[0][0])


async def test_postgres_a_watch_gets_an_entry_of_the_log_that_committed_after_a_later_one(
    pg_dsn: str,
) -> None:
    # Regression: two transactions logging names at once could commit out of the order of
    # their numbers (the first, numbered N, still open as the second, N + 1, committed); a
    # watch that read N + 1 then moved past N for good and never looked at that file again.
    async with (
        await PostgresLedger.open(pg_dsn) as first,
        await PostgresLedger.open(pg_dsn) as second,
        await PostgresLedger.open(pg_dsn) as watch,
    ):
        start, _ = await watch.forgotten_since("j", None)
        logged, commit, logged_second = anyio.Event(), anyio.Event(), anyio.Event()
        pid: list[int] = []

        async def log_second() -> None:
            await second.look_again("j", [b"second"])
            logged_second.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(_log_held_open, first, b"first", logged, commit, pid)
            await logged.wait()
            tg.start_soon(log_second)
            # The second log commits at once, or waits for the first to end (the server's
            # state: no event to wait on).
            await until(
                lambda: logged_second.is_set() or _waiting_for(pg_dsn, pid[0]),
            )
            mark, before = await watch.forgotten_since("j", start)
            commit.set()
        assert logged_second.is_set()
        later, after = await watch.forgotten_since("j", mark)
        assert sorted(before + after) == [b"first", b"second"]  # each once
        assert await watch.forgotten_since("j", later) == (later, [])


async def test_postgres_a_watch_starting_as_its_job_logs_gets_that_entry(pg_dsn: str) -> None:
    # Regression: a watch started following the log after the newest entry of every job's; an
    # entry of its job still being committed, numbered before another job's newest, was
    # skipped.
    async with (
        await PostgresLedger.open(pg_dsn) as first,
        await PostgresLedger.open(pg_dsn) as other,
        await PostgresLedger.open(pg_dsn) as watch,
    ):
        logged, commit = anyio.Event(), anyio.Event()
        pid: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_log_held_open, first, b"first", logged, commit, pid)
            await logged.wait()
            with anyio.fail_after(30):  # another job's log does not wait for this one's
                await other.look_again("other", [b"elsewhere"])
            start, _ = await watch.forgotten_since("j", None)
            commit.set()
        mark, names = await watch.forgotten_since("j", start)
        assert names == [b"first"]
        assert await watch.forgotten_since("j", mark) == (mark, [])


async def test_postgres_a_name_that_is_not_utf8_round_trips(pg_dsn: str) -> None:
    async with await PostgresLedger.open(pg_dsn) as ledger:
        await ledger.claim_scanned("j", "a", 60, [("k1", b"caf\xe9.txt", 1, 1, 1)])
        (found,) = await ledger.find_items("j", os.fsdecode(b"caf\xe9.txt"))
        assert (found.key, os.fsencode(found.relpath)) == ("k1", b"caf\xe9.txt")


async def test_postgres_a_schema_of_another_application_is_refused_untouched(
    pg_dsn: str,
) -> None:
    schema = PostgresDSN.parse(pg_dsn).schema
    await pg_query(pg_dsn, f'CREATE SCHEMA "{schema}"')
    await pg_query(pg_dsn, f'CREATE TABLE "{schema}".customers (id integer)')
    with pytest.raises(NotALedgerError, match="another application"):
        await PostgresLedger.open(pg_dsn)
    tables = await pg_query(pg_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    assert tables == [("customers",)]


async def test_postgres_runners_creating_a_fresh_ledger_at_once_all_succeed(pg_dsn: str) -> None:
    ledgers = await asyncio.gather(*(PostgresLedger.open(pg_dsn) for _ in range(4)))
    try:
        secrets = {await ledger.meta("secret") for ledger in ledgers}
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert len(secrets) == 1


async def test_postgres_durability_sets_synchronous_commit(pg_dsn: str) -> None:
    settings: list[tuple[Literal["normal", "full"], str]] = [("normal", "off"), ("full", "on")]
    for durability, expected in settings:
        async with await PostgresLedger.open(pg_dsn, durability=durability) as ledger:
            conn = await ledger._session._connection()
            assert await conn.fetchval("SHOW synchronous_commit") == expected
            assert await conn.fetchval("SELECT current_schema()") == ledger._session.target.schema


async def test_postgres_a_lost_connection_is_an_error_then_reconnects(pg_dsn: str) -> None:
    async with await PostgresLedger.open(pg_dsn) as ledger:
        await ledger.start_runner(run_start())
        for pause in (0.0, 0.2):
            conn = await ledger._session._connection()
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await pg_query(pg_dsn, "SELECT pg_terminate_backend($1)", pid)
            await anyio.sleep(pause)
            error: LedgerError | None = None
            try:  # noticed in time: a new connection at once; else one clear error
                await ledger.counts("j")
            except LedgerError as e:
                error = e
            assert error is None or str(error).startswith("state 'postgresql://")
            assert (await ledger.counts("j"))["done"] == 0
            assert await ledger._session._connection() is not conn


async def test_postgres_a_lost_listening_connection_is_made_again_when_asked(
    pg_dsn: str,
) -> None:
    # A runner asks at every wait for work: the same callback is not called twice, and a
    # listening connection that was lost (the server restarted, the backend killed) is
    # made again (else its wake-ups would stop, and it would wait its whole poll).
    calls: list[str] = []
    announced = anyio.Event()

    def woken() -> None:
        calls.append("j")
        announced.set()

    async with (
        await PostgresLedger.open(pg_dsn) as ledger,
        await PostgresLedger.open(pg_dsn) as other,
    ):
        assert await ledger.on_registered("j", woken)
        listener = ledger._session._listener
        assert listener is not None
        ended = anyio.Event()
        listener.add_termination_listener(lambda _conn: ended.set())
        await pg_query(pg_dsn, "SELECT pg_terminate_backend($1)", listener.get_server_pid())
        with anyio.fail_after(30):
            await ended.wait()
        assert listener.is_closed()
        assert await ledger.on_registered("j", woken)  # asked again: listens again
        assert ledger._session._listener is not listener
        await other.start_runner(run_start("a", shared=True))
        role = await other.take_listing("j", "a", 60)
        await other.begin_listing("j", "a", role.fence)
        await other.register_listed("j", "a", role.fence, [entry(1)])
        with anyio.fail_after(30):
            await announced.wait()
        await ledger.listing("j")  # a round trip: a second notification would be in by now
        assert calls == ["j"]


async def test_postgres_registrations_wake_the_runners_of_their_own_schema_only(
    pg_dsn: str,
) -> None:
    # Notifications are the database's: a job of the same name in another schema (another
    # deployment, or another test) woke this ledger's runners.
    other_schema = f"abtest_other_{uuid.uuid4().hex[:12]}"
    other_dsn = re.sub(r"search_path=[^&]*", f"search_path={other_schema}", pg_dsn)
    calls: list[str] = []
    announced = anyio.Event()

    def woken() -> None:
        calls.append("j")
        announced.set()

    try:
        async with (
            await PostgresLedger.open(pg_dsn) as ledger,
            await PostgresLedger.open(other_dsn) as elsewhere,
            await PostgresLedger.open(pg_dsn) as here,
        ):
            assert await ledger.on_registered("j", woken)
            for lister in (elsewhere, here):
                await lister.start_runner(run_start("a", shared=True))
                role = await lister.take_listing("j", "a", 60)
                await lister.begin_listing("j", "a", role.fence)
                await lister.register_listed("j", "a", role.fence, [entry(1)])
                await ledger.listing("j")  # a round trip: a notification would be in by now
                if lister is elsewhere:
                    assert calls == []
            with anyio.fail_after(30):
                await announced.wait()
            assert calls == ["j"]
    finally:
        base = re.sub(r"[?&]search_path=[^&]*", "", pg_dsn)
        await pg_query(base, f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE')


async def test_postgres_an_unreachable_server_is_one_line_without_the_password() -> None:
    with pytest.raises(LedgerError) as info:
        await PostgresLedger.open("postgresql://user:s3cret@127.0.0.1:1/db")
    message = str(info.value)
    assert "s3cret" not in message
    assert "'postgresql://user@127.0.0.1:1/db'" in message
    assert "\n" not in message


def test_postgres_dsn_without_a_host_is_printed_as_given() -> None:
    # (urlunsplit printed "postgresql:" and "postgresql:/db": no longer the value given.)
    assert PostgresDSN.parse("postgresql://").redacted == "postgresql://"
    assert PostgresDSN.parse("postgresql:///db").redacted == "postgresql:///db"
    assert PostgresDSN.parse("postgres://:pw@/db?password=x&a=1").redacted == "postgres:///db?a=1"


def test_postgres_dsn_is_checked_up_front(tmp_path: Path) -> None:
    assert PostgresDSN.parse("postgresql://h/db").schema == "asyncbatch"
    assert PostgresDSN.parse("postgres://h/db?search_path=batches,public").schema == "batches"
    assert PostgresDSN.parse("postgresql://h/db?options=-c%20search_path%3Dx").schema == "x"
    assert PostgresDSN.parse("postgresql://u:pw@h:5/d?password=pw").redacted == (
        "postgresql://u@h:5/d"
    )
    for bad in (
        "postgresql://u:pw@host:notaport/db",
        "postgresql://u:pw@host/db?search_path=",
        "postgresql://u:pw@host/db?a=1&&&b",
        "postgresql://u:pw@host/a/b",
        "postgresql://u:pw@host/db?search_path=a%00b",
        "postgresql://u:pw@host/d%00b",
    ):
        with pytest.raises(ConfigurationError, match="setting 'state'") as info:
            PostgresDSN.parse(bad)
        assert ":pw" not in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigurationError, match="notaport"):
        BatchConfig(source=tmp_path, state="postgresql://u:pw@host:notaport/db")
    BatchConfig(source=tmp_path, state="postgresql://u:pw@host:5432/db")


def test_postgres_dsn_that_does_not_parse_is_named_without_its_password() -> None:
    # (It was named 'postgresql://...', whatever was given.)
    with pytest.raises(ConfigurationError) as info:
        PostgresDSN.parse("postgresql://u:s3cret@[::1/test?password=x&a=b")
    message = str(info.value)
    assert "'postgresql://u@[::1/test?a=b'" in message
    assert "Invalid IPv6 URL" in message
    assert "s3cret" not in message
    assert "password" not in message


def test_postgres_dsn_connect_timeout_bounds_the_connection(pg_dsn: str) -> None:
    # libpq's connect_timeout went to the server as a setting, which refused it ("unrecognized
    # configuration parameter"): the state could not be used with it.
    sep = "&" if "?" in pg_dsn else "?"
    parsed = PostgresDSN.parse(f"{pg_dsn}{sep}connect_timeout=5")
    assert parsed.connect_timeout == 5.0
    assert "connect_timeout" not in parsed.dsn
    assert parsed.dsn == pg_dsn
    assert PostgresDSN.parse("postgresql://h/db?connect_timeout=1").connect_timeout == 2.0
    assert PostgresDSN.parse("postgresql://h/db?connect_timeout=0").connect_timeout is None
    with pytest.raises(ConfigurationError, match="connect_timeout must be whole seconds"):
        PostgresDSN.parse("postgresql://h/db?connect_timeout=soon")
    result = cli("status", "--state", f"{pg_dsn}{sep}connect_timeout=5")
    assert result.returncode in (0, 2), result.stderr  # a ledger, or none in that schema yet
    assert "unrecognized configuration parameter" not in result.stderr
    assert "does not exist" in result.stderr or result.returncode == 0


def test_postgres_cli_unreachable_state_exits_69_without_the_password(tmp_path: Path) -> None:
    result = cli("status", "--state", "postgresql://user:s3cret@127.0.0.1:1/db", "--json")
    assert result.returncode == 69, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "s3cret" not in result.stderr
    assert "postgresql://user@127.0.0.1:1/db" in result.stderr


@pytest.mark.parametrize(
    ("tail", "named"),
    [
        ("?sslmode=bogus", "sslmode"),
        ("?no_such_parameter=1", "no_such_parameter"),
        ("?statement_timeout=abc", "statement_timeout"),
        ("?search_path=x%00y", "NUL"),
    ],
)
def test_postgres_cli_a_dsn_the_server_refuses_is_exit_2_naming_it(
    pg_dsn: str, tail: str, named: str
) -> None:
    # (These were exit 69, "unavailable, try later": no later try can succeed.)
    dsn = pg_dsn.split("?", 1)[0] + tail
    result = cli("status", "--state", dsn)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"setting 'state' has value {dsn!r}" in result.stderr
    assert named in result.stderr


def test_postgres_cli_a_database_or_role_that_does_not_exist_is_exit_2(pg_dsn: str) -> None:
    parts = urllib.parse.urlsplit(pg_dsn)
    host = f"{parts.hostname}:{parts.port or 5432}"
    for dsn in (
        urllib.parse.urlunsplit(parts._replace(path="/no_such_database")),
        urllib.parse.urlunsplit(parts._replace(netloc=f"no_such_role@{host}")),
    ):
        result = cli("status", "--state", dsn)
        assert result.returncode == 2, result.stderr
        assert "does not exist" in result.stderr, result.stderr


# -- end to end: the CLI on PostgreSQL ----------------------------------------------------------


def test_cli_run_and_status_on_postgres(pg_dsn: str, inbox: Path, tmp_path: Path) -> None:
    make_files(inbox, 300)
    log = tmp_path / "calls.log"
    args = ("run", RECORD, "--source", inbox, "--state", pg_dsn, "--no-progress", "-j", "8")
    result = cli(*args, env={"AB_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    assert "300 done" in result.stdout
    assert len(invocations(log)) == 300
    assert max(invocations(log).values()) == 1
    again = cli(*args, env={"AB_LOG": str(log)})
    assert again.returncode == 0, again.stderr
    assert sum(invocations(log).values()) == 300  # nothing redone

    status = cli("status", "--state", pg_dsn, "--json")
    assert status.returncode == 0, status.stderr
    out = json.loads(status.stdout)
    assert out["counts"] == {
        "pending": 0,
        "running": 0,
        "done": 300,
        "failed": 0,
        "dead": 0,
        "vanished": 0,
    }
    assert out["total"] == 300
    assert out["locks"] == []
    assert out["last_run"]["exit_status"] == "ok"
    assert abs(out["last_run"]["started_at"] - time.time()) < 120
    unknown = cli("status", "--state", pg_dsn, "--job", "nope")
    assert unknown.returncode == 2
    assert "unknown job 'nope'" in unknown.stderr
    if "://postgres@" in pg_dsn:  # trust auth ignores a password: prove it is never printed
        with_password = pg_dsn.replace("://postgres@", "://postgres:s3cr3t-pw@", 1)
        for command in (("status", "--json"), ("status",), ("status", "--job", "nope")):
            shown = cli(command[0], "--state", with_password, *command[1:])
            assert "s3cr3t-pw" not in shown.stdout + shown.stderr


def test_two_shared_runners_on_postgres_handle_every_file_exactly_once(
    pg_dsn: str, inbox: Path, tmp_path: Path
) -> None:
    files = 1000
    make_files(inbox, files)
    log = tmp_path / "calls.log"
    args = (
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        pg_dsn,
        "--shared",
        "-j",
        "4",
        "--no-progress",
        "--claim-batch",
        "64",
    )
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.005"}
    runners = [spawn(*args, env=env) for _ in range(2)]
    outputs = [r.communicate(timeout=180) for r in runners]

    for runner, (_, err) in zip(runners, outputs, strict=True):
        assert runner.returncode == 0, err
    handled = invocations(log)
    assert len(handled) == files
    assert max(handled.values()) == 1
    assert pg_sync(pg_dsn, "SELECT state, count(*) FROM items GROUP BY state") == [("done", files)]
    owners = pg_sync(pg_dsn, "SELECT owner, count(*) FROM items GROUP BY owner")
    assert len(owners) == 2, "both runners took part"
    assert pg_sync(pg_dsn, "SELECT count(*) FROM runners") == [(0,)]
    status = cli("status", "--state", pg_dsn, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["done"] == files


# -- the joblog, listing and forgetting items ----------------------------------------------------


async def test_a_ledger_of_schema_2_is_upgraded_and_keeps_its_finished_items_joblog(
    store: Store,
) -> None:
    await store.make_second_version()
    older = f"schema version 2, older than the {store.schema_version}"
    with pytest.raises(SchemaVersionError, match=older):
        await store.open(create=False)
    async with await store.open() as ledger:
        (done,) = await ledger.find_items("j", "k00001")
        (failed,) = await ledger.find_items("j", "k00002")
        (pending,) = await ledger.find_items("j", "k00003")
        # Finished items got their outcome's time and runner; their start is not known.
        assert done.finished_at is not None
        assert abs(done.finished_at - 1000) < 5
        assert (done.runner, done.runner_pid, done.runner_host) == ("old-runner", 4242, "oldhost")
        assert done.started_at is None
        assert done.duration is None
        assert failed.finished_at is not None
        assert abs(failed.finished_at - 1100) < 5
        assert (pending.finished_at, pending.runner) == (None, None)
        # The upgraded ledger records new attempts.
        (row,) = await ledger.claim_waiting("j", "me", 60, 10)
        assert row.key == "k00003"
        assert await ledger.commit_outcomes("j", "me", [Outcome("k00003", 2, "done")]) == set()
        (now_done,) = await ledger.find_items("j", "k00003")
        assert (now_done.state, now_done.runner) == ("done", "me")
    async with await store.open(create=False) as ledger:
        assert (await ledger.counts("j"))["done"] == 2


async def test_a_ledger_of_schema_3_is_upgraded_and_its_jobs_record_their_source_on_their_next_run(
    store: Store,
) -> None:
    await store.make_third_version()
    with pytest.raises(SchemaVersionError, match="schema version 3, older than"):
        await store.open(create=False)
    async with await store.open() as ledger:
        assert await ledger.job_settings("j") is None  # not recorded yet: no refusal
        (old_run,) = await ledger.runs("j")
        assert (old_run.exit_status, old_run.settings_changed) == ("ok", None)
        started = await ledger.start_runner(run_start("a", ignore=("*.skip",)))
        assert started.changed == ()
        assert await ledger.job_settings("j") == JobSettings(source=SOURCE, ignore=("*.skip",))
        assert (await ledger.counts("j"))["done"] == 1
        await ledger.release_runner(ended(started, "a", holds_lock=True))
        with pytest.raises(ConfigurationError, match="a job keeps its source"):
            await ledger.start_runner(run_start("b", source="/srv/elsewhere"))
    async with await store.open(create=False) as ledger:
        assert await ledger.job_settings("j") == JobSettings(source=SOURCE, ignore=("*.skip",))


async def test_a_newer_schema_is_refused_by_the_operator_commands_in_one_line(
    store: Store,
) -> None:
    async with await store.open() as ledger:
        await ledger.start_runner(run_start())
    await store.set_schema_version(store.schema_version + 1)
    for args in (("items",), ("forget", "--done-before", "1h", "--yes")):
        refused = cli(*args, "--state", store.state, "--job", "j")
        assert refused.returncode == 2, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert f"schema version {store.schema_version + 1}" in line
    assert await store.fetch("SELECT job FROM jobs") == [("j",)]


async def test_the_joblog_records_each_attempts_start_finish_and_runner(
    ledger: Ledger, store: Store
) -> None:
    # PostgreSQL stores the server's times: shifted back into ours to within the offset.
    close = 0.002 if isinstance(store, SqliteStore) else 1.0
    me = this_process()
    await ledger.start_runner(run_start("a", me=me))
    await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2), entry(3)])
    (leased,) = await ledger.find_items("j", "k00001")
    assert (leased.owner, leased.started_at, leased.finished_at) == ("a", None, None)
    # A long attempt (begun half a second ago) is noted at the group commit that sees it
    # running...
    long_start = time.time() - 0.5
    await ledger.commit_outcomes("j", "a", [], started=[("k00001", 1)])
    (running,) = await ledger.find_items("j", "k00001")
    assert running.started_at is not None
    assert running.finished_at is None
    assert long_start + 0.5 - close <= running.started_at
    await anyio.sleep(0.3)
    began = time.time()
    outcomes = [
        Outcome("k00001", 1, "done", started_at=long_start),
        Outcome("k00002", 1, "failed", "ValueError: no", time.time() + 60, started_at=began),
        Outcome("k00003", 1, "dead", "PermanentError: never", started_at=began),
    ]
    assert await ledger.commit_outcomes("j", "a", outcomes) == set()
    ended = time.time()
    found = {i.key: i for i in await ledger.list_items("j", ItemFilter(limit=None))}
    done = found["k00001"]
    # ... then its outcome brings its exact start (SQLite: to the millisecond, never later),
    # and its duration spans the whole attempt.
    assert done.started_at is not None
    assert abs(done.started_at - long_start) <= close
    assert done.duration is not None
    assert done.duration >= 0.3
    assert done.finished_at is not None
    assert done.finished_at <= ended + 5
    for item in found.values():
        assert (item.runner, item.runner_pid, item.runner_host) == ("a", me.pid, me.host)
        assert item.started_at is not None
        assert item.finished_at is not None
        assert item.started_at <= item.finished_at
        assert item.attempts == 1
    assert found["k00002"].last_error == "ValueError: no"
    # Every outcome carries its attempt's start.
    for key in ("k00002", "k00003"):
        start, end = found[key].started_at, found[key].finished_at
        assert start is not None
        assert end is not None
        assert abs(start - began) <= close
        assert start <= end


async def test_list_items_filters_by_state_glob_and_time(ledger: Ledger) -> None:
    names = ["a.csv", "b.csv", "sub/c.csv", "d.txt", os.fsdecode(b"caf\xe9.csv"), "x[1].csv"]
    rows = [(f"k{i:05d}", os.fsencode(name), 10, 1000 + i, 500 + i) for i, name in enumerate(names)]
    await ledger.claim_scanned("j", "a", 60, rows)
    await ledger.commit_outcomes(
        "j", "a", [Outcome("k00000", 1, "done"), Outcome("k00001", 1, "dead", "E: x")]
    )
    between = time.time()
    await anyio.sleep(0.05)
    await ledger.commit_outcomes("j", "a", [Outcome("k00002", 1, "done")])

    async def keys(**kwargs: Any) -> list[str]:
        return [i.key for i in await ledger.list_items("j", ItemFilter(**kwargs))]

    assert await keys(states=("done",)) == ["k00002", "k00000"]  # the latest change first
    assert sorted(await keys(states=("done", "dead"))) == ["k00000", "k00001", "k00002"]
    assert sorted(await keys(states=("running",))) == ["k00003", "k00004", "k00005"]
    assert sorted(await keys(glob="*.csv")) == ["k00000", "k00001", "k00002", "k00004", "k00005"]
    assert await keys(glob="sub/*") == ["k00002"]
    assert await keys(glob="?.txt") == ["k00003"]
    assert sorted(await keys(glob="[ab].csv")) == ["k00000", "k00001"]
    assert await keys(glob="[!ab].csv") == []
    assert await keys(glob="x[[]1].csv") == ["k00005"]
    assert await keys(glob=os.fsdecode(b"caf\xe9*")) == ["k00004"]  # a non-UTF-8 name
    assert await keys(glob="*.CSV") == []
    assert await keys(time="finished", before=between) != []
    assert sorted(await keys(time="finished", before=between)) == ["k00000", "k00001"]
    assert await keys(time="finished", after=between) == ["k00002"]
    assert await keys(time="updated", after=time.time() + 60) == []
    assert len(await keys(limit=2)) == 2
    which = ItemFilter(glob="*.csv", states=("running",), limit=1)
    assert await ledger.count_items("j", which) == 2
    assert await ledger.count_items("other", ItemFilter()) == 0


async def test_forget_deletes_chosen_items_and_refuses_live_leases(
    ledger: Ledger, store: Store
) -> None:
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in range(1, 6)])
    await ledger.commit_outcomes(
        "j",
        "a",
        [
            Outcome("k00001", 1, "done"),
            Outcome("k00002", 1, "dead", "E"),
            Outcome("k00004", 1, "done"),
        ],
    )
    result = await ledger.forget("j", keys=["k00001", "k00002", "k00003", "nope", "k00001"])
    assert sorted(i.key for i in result.forgotten) == ["k00001", "k00002"]
    assert [(i.key, i.owner) for i in result.refused] == [("k00003", "a")]
    assert [r[0] for r in await items(store)] == ["k00003", "k00004", "k00005"]
    # Forgotten items are new work again: the next claim leases them afresh.
    claimed = await ledger.claim_scanned("j", "c", 60, [entry(1), entry(2)])
    assert sorted((r.key, r.state, r.fence, r.attempts) for r in claimed) == [
        ("k00001", "running", 1, 0),
        ("k00002", "running", 1, 0),
    ]
    # An expired lease is not live: its item may be forgotten.
    expire = "UPDATE items SET lease_until = 0 WHERE key = 'k00005'"
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            db.execute(expire)
    else:
        await store.fetch(expire)
    (gone,) = (await ledger.forget("j", keys=["k00005"])).forgotten
    assert gone.state == "running"
    with pytest.raises(ConfigurationError):
        await ledger.forget("j")


async def test_forget_done_before_forgets_only_items_done_before_then(ledger: Ledger) -> None:
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in range(1, 5)])
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "done")])
    await ledger.commit_outcomes("j", "a", [Outcome("k00002", 1, "dead", "E")])
    await anyio.sleep(0.05)
    cutoff = time.time()
    await anyio.sleep(0.05)
    await ledger.commit_outcomes("j", "a", [Outcome("k00003", 1, "done")])
    result = await ledger.forget("j", done_before=cutoff)
    assert [i.key for i in result.forgotten] == ["k00001"]
    assert result.refused == ()
    assert sorted(i.key for i in await ledger.list_items("j", ItemFilter())) == [
        "k00002",
        "k00003",
        "k00004",
    ]
    assert (await ledger.forget("j", done_before=cutoff)).forgotten == ()


async def test_forget_logs_the_names_it_forgot_for_watches_under_way(ledger: Ledger) -> None:
    start, none = await ledger.forgotten_since("j", None)
    assert none == []
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in range(1, 5)])
    await ledger.claim_scanned("other", "a", 60, [entry(9)])
    await ledger.commit_outcomes(
        "j", "a", [Outcome("k00001", 1, "done"), Outcome("k00002", 1, "done")]
    )
    await ledger.commit_outcomes("other", "a", [Outcome("k00009", 1, "done")])
    assert await ledger.forgotten_since("j", start) == (start, [])

    await ledger.forget("j", keys=["k00002", "k00003"])  # k00003 is leased: refused
    await ledger.forget("other", keys=["k00009"])
    seq, names = await ledger.forgotten_since("j", start)
    assert names == [b"f00002"]
    await ledger.forget("j", done_before=time.time() + 60)
    later, more = await ledger.forgotten_since("j", seq)
    assert more == [b"f00001"]
    assert later > seq
    assert await ledger.forgotten_since("j", later) == (later, [])
    assert (await ledger.forgotten_since("j", None))[0] >= later


async def test_look_again_logs_names_for_watches_under_way(ledger: Ledger) -> None:
    start, _ = await ledger.forgotten_since("j", None)
    await ledger.look_again("j", [])
    assert await ledger.forgotten_since("j", start) == (start, [])
    await ledger.look_again("j", [b"a.csv", b"sub/b\xff.csv"])
    await ledger.look_again("other", [b"c.csv"])
    seq, names = await ledger.forgotten_since("j", start)
    assert names == [b"a.csv", b"sub/b\xff.csv"]
    assert await ledger.forgotten_since("j", seq) == (seq, [])


async def forgotten_at_index(store: Store) -> list[tuple[Any, ...]]:
    if store.kind == "sqlite":
        return await store.fetch("SELECT name FROM sqlite_schema WHERE name = 'forgotten_at'")
    return await store.fetch(
        "SELECT indexname FROM pg_indexes"
        " WHERE schemaname = current_schema() AND indexname = 'forgotten_at'"
    )


async def test_a_ledger_of_schema_9_keeps_its_log_and_gets_the_prunes_index(store: Store) -> None:
    async with await store.open() as ledger:
        start, _ = await ledger.forgotten_since("j", None)
        await ledger.look_again("j", [b"a.csv"])
        role = await ledger.take_listing("j", "lister", 60)
        await ledger.begin_listing("j", "lister", role.fence)
    assert await forgotten_at_index(store) == [("forgotten_at",)]
    await store.fetch("DROP INDEX forgotten_at")
    await store.fetch("ALTER TABLE listers DROP COLUMN twins")
    await store.fetch("ALTER TABLE listers DROP COLUMN not_ready")  # (schema 11's)
    await store.set_schema_version(9)
    async with await store.open() as ledger:
        seq, names = await ledger.forgotten_since("j", start)
        assert names == [b"a.csv"]
        await ledger.look_again("j", [b"b.csv"])
        later, more = await ledger.forgotten_since("j", seq)
        assert (more, later > seq) == ([b"b.csv"], True)
        # The listing begun before the upgrade ends with its twins (schema 10's column).
        assert await ledger.end_listing("j", "lister", role.fence, 3, twins={"k": 2})
        complete = await ledger.listing("j")
        assert complete is not None
        assert await ledger.listing_twins("j", complete.complete) == {"k": 2}
    assert await forgotten_at_index(store) == [("forgotten_at",)]


async def test_a_listing_keeps_its_twins_until_the_next_one_is_complete(store: Store) -> None:
    async with await store.open() as ledger:
        role = await ledger.take_listing("j", "lister", 60)
        await ledger.begin_listing("j", "lister", role.fence)
        assert await ledger.end_listing("j", "lister", role.fence, 5, twins={"k1": 1, "k2": 2})
        first = await ledger.listing("j")
        assert first is not None
        assert await ledger.listing_twins("j", first.complete) == {"k1": 1, "k2": 2}
        assert await ledger.listing_twins("j", first.complete - 1) == {}  # not the last one
        # A listing under way: a runner still going by the last one reads them (one began
        # between its look at the role and its read of the twins: they were gone, and it
        # counted them unfinished, exit 1, every item done).
        await ledger.begin_listing("j", "lister", role.fence)
        assert await ledger.listing_twins("j", first.complete) == {"k1": 1, "k2": 2}
        assert await ledger.end_listing("j", "lister", role.fence, 5)
        second = await ledger.listing("j")
        assert second is not None
        assert await ledger.listing_twins("j", first.complete) == {}
        assert await ledger.listing_twins("j", second.complete) == {}


#: The counts of a listing's files not ready yet (``Listing.not_ready_counts``).
_NOT_READY = ("unsettled", "unstable", "unmarked", "dir_unmarked", "too_small", "too_old", "future")


def not_ready(**counts: int) -> dict[str, int]:
    """What ``Listing.not_ready_counts`` reads: every count, 0 unless given."""
    return {name: counts.get(name, 0) for name in _NOT_READY}


async def test_a_listing_keeps_its_files_not_ready_until_the_next_one_is_complete(
    store: Store,
) -> None:
    # What a listing left out as not ready yet goes with it: a runner that goes by another
    # runner's listing reports those files too (it said nothing of them).
    left = {"unsettled": 3, "future": 1, "unmarked": 2, "too_old": 1}
    async with await store.open() as ledger:
        role = await ledger.take_listing("j", "lister", 60)
        await ledger.begin_listing("j", "lister", role.fence)
        assert await ledger.end_listing("j", "lister", role.fence, 5, not_ready=left)
        first = await ledger.listing("j")
        assert first is not None
        assert first.not_ready_counts() == not_ready(**left)
        # Kept while the next listing is under way (the runners still go by this one).
        await ledger.begin_listing("j", "lister", role.fence)
        under_way = await ledger.listing("j")
        assert under_way is not None
        assert under_way.not_ready_counts() == not_ready(**left)
        assert await ledger.end_listing("j", "lister", role.fence, 8)
        second = await ledger.listing("j")
        assert second is not None
        assert second.not_ready_counts() == not_ready()
        assert await ledger.end_listing("j", "lister", role.fence, 8, not_ready={"too_small": 2})
        third = await ledger.listing("j")
        assert third is not None
        assert third.not_ready_counts() == not_ready(too_small=2)


async def test_files_found_changed_and_not_ready_since_move_to_the_listings_not_ready(
    ledger: Ledger,
) -> None:
    # A shared runner found files of the listing changed after it queued them, and not
    # settled on a look again: every runner that goes by that listing counts them not settled
    # yet, not among its found files (they said "vanished", for a file sitting in the source).
    role = await ledger.take_listing("j", "lister", 60)
    await ledger.begin_listing("j", "lister", role.fence)
    assert await ledger.end_listing("j", "lister", role.fence, 5, not_ready={"unmarked": 1})
    assert await ledger.listing_changed("j", 1, {"unsettled": 2, "future": 1})
    listing = await ledger.listing("j")
    assert listing is not None
    assert listing.listed_files == 3
    assert listing.not_ready_counts() == not_ready(unsettled=2, future=1, unmarked=1)
    # Not the last complete listing any more (the next one found the files as they are):
    # nothing changes.
    await ledger.begin_listing("j", "lister", role.fence)
    assert await ledger.end_listing("j", "lister", role.fence, 4)
    assert not await ledger.listing_changed("j", 1, {"unsettled": 1})
    assert not await ledger.listing_changed("other", 2, {"unsettled": 1})
    listing = await ledger.listing("j")
    assert listing is not None
    assert (listing.listed_files, listing.not_ready_counts()) == (4, not_ready())


async def test_a_ledger_of_schema_10_keeps_its_listing_and_gets_its_files_not_ready(
    store: Store,
) -> None:
    async with await store.open() as ledger:
        role = await ledger.take_listing("j", "lister", 60)
        await ledger.begin_listing("j", "lister", role.fence)
        assert await ledger.end_listing("j", "lister", role.fence, 4, twins={"k": 1})
        await ledger.begin_listing("j", "lister", role.fence)  # under way at the upgrade
    await store.fetch("ALTER TABLE listers DROP COLUMN not_ready")
    await store.set_schema_version(10)
    with pytest.raises(SchemaVersionError, match="schema version 10, older than"):
        await store.open(create=False)  # (the other commands: until a run upgrades it)
    async with await store.open() as ledger:
        before = await ledger.listing("j")
        assert before is not None
        assert (before.complete, before.listed_files) == (1, 4)
        assert before.not_ready_counts() == not_ready()  # not recorded then: none said
        assert await ledger.listing_twins("j", 1) == {"k": 1}
        # The listing begun before the upgrade ends with its files not ready yet.
        assert await ledger.end_listing("j", "lister", role.fence, 6, not_ready={"unsettled": 2})
        after = await ledger.listing("j")
        assert after is not None
        assert (after.complete, after.not_ready_counts()) == (2, not_ready(unsettled=2))
    assert await _schema_version(store) == store.schema_version


# -- the listing role ----------------------------------------------------------------------------


async def expire_listing(store: Store) -> None:
    """The listing role's lease runs out (its holder stalled past it)."""
    expire = "UPDATE listers SET lease_until = 0 WHERE job = 'j'"
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            db.execute(expire)
    else:
        await store.fetch(expire)


async def test_one_runner_takes_the_listing_role_and_another_once_it_is_free(
    ledger: Ledger, store: Store
) -> None:
    for owner in ("a", "b"):
        await ledger.start_runner(run_start(owner, shared=True))
    first = await ledger.take_listing("j", "a", 60)
    assert (first.owner, first.fence, first.generation, first.complete) == ("a", 1, 0, 0)
    assert first.held_by("a", time.time() - 1)
    held = await ledger.take_listing("j", "b", 60)  # a holds it: b gets to know, not the role
    assert (held.owner, held.fence) == ("a", 1)
    assert (await ledger.take_listing("j", "a", 60)).fence == 1  # renewed, not retaken
    # Its lease expired (the holder stalled): b takes it over, and the fence grows.
    await expire_listing(store)
    taken = await ledger.take_listing("j", "b", 60)
    assert (taken.owner, taken.fence) == ("b", 2)
    # The old holder's heartbeat finds it lost; the new one's renews it.
    assert not (await ledger.heartbeat(Heartbeat(job="j", owner="a", ttl=60, lister=1))).lister
    assert (await ledger.heartbeat(Heartbeat(job="j", owner="b", ttl=60, lister=2))).lister
    # A holder that ends gives it up: the next runner takes it at once.
    await ledger.release_runner(
        RunEnd(
            job="j",
            owner="b",
            holds_lock=False,
            run_id=0,
            totals=RunTotals(),
            exit_status="ok",
            lister=True,
        )
    )
    assert (await ledger.take_listing("j", "a", 60)).owner == "a"


async def test_a_run_takes_the_listing_role_from_a_holder_done_with_an_older_listing(
    ledger: Ledger,
) -> None:
    # A run() goes by a listing that began when it started or later: from a live holder done
    # with an older one it takes the role over (fresh_since), and lists again.
    for owner in ("a", "b", "c"):
        await ledger.start_runner(run_start(owner, shared=True))
    role = await ledger.take_listing("j", "a", 60)
    begun = await ledger.begin_listing("j", "a", role.fence)
    assert begun is not None
    assert begun.started_at is not None
    later = begun.started_at + 10
    # Under way: not handed over, however late the run started (it waits for that one's end).
    assert (await ledger.take_listing("j", "b", 60, fresh_since=later)).owner == "a"
    assert await ledger.end_listing("j", "a", role.fence, 0)
    # Complete: a run started before it began goes by it, and a watch (no start) too ...
    assert (await ledger.take_listing("j", "b", 60, fresh_since=later - 11)).owner == "a"
    assert (await ledger.take_listing("j", "b", 60)).owner == "a"
    # ... one started after it began takes the role over: the fence grows, a's is refused.
    taken = await ledger.take_listing("j", "b", 60, fresh_since=later)
    assert (taken.owner, taken.fence) == ("b", 2)
    assert not (await ledger.heartbeat(Heartbeat(job="j", owner="a", ttl=60, lister=1))).lister
    # b has not begun its listing yet (it is about to): c, as late, does not take it from b.
    assert (await ledger.take_listing("j", "c", 60, fresh_since=later + 1)).owner == "b"
    # A watch's scans (without a start) are never handed over.
    assert await ledger.begin_listing("j", "b", 2, watching=True)
    assert await ledger.end_listing("j", "b", 2, 0)
    assert (await ledger.take_listing("j", "c", 60, fresh_since=later + 100)).owner == "b"


async def test_a_listing_role_whose_holder_is_gone_is_taken_over(ledger: Ledger) -> None:
    await ledger.start_runner(run_start("a", shared=True))
    await ledger.start_runner(run_start("b", shared=True))
    assert (await ledger.take_listing("j", "a", 600)).owner == "a"
    # a's runner record is gone (it ended, or a later runner reaped it): its role is free.
    await ledger.release_runner(
        RunEnd(
            job="j", owner="a", holds_lock=False, run_id=0, totals=RunTotals(), exit_status="killed"
        )
    )
    assert (await ledger.take_listing("j", "b", 600)).owner == "b"


async def test_a_listing_registers_waiting_items_and_counts_what_it_found(
    ledger: Ledger,
) -> None:
    await ledger.start_runner(run_start("a", shared=True))
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in (1, 2, 3)])
    await ledger.commit_outcomes(
        "j",
        "a",
        [
            Outcome("k00001", 1, "done"),
            Outcome("k00002", 1, "dead", "E"),
            Outcome("k00003", 1, "vanished", "gone"),
        ],
    )
    role = await ledger.take_listing("j", "a", 60)
    begun = await ledger.begin_listing("j", "a", role.fence)
    assert begun is not None
    assert (begun.generation, begun.complete, begun.listed_files) == (1, 0, 0)
    found = await ledger.register_listed("j", "a", role.fence, [entry(i) for i in (1, 2, 3, 4, 5)])
    assert found == Registered(3, 1, 1)  # 4, 5 new; 3 (vanished) waits again
    # Two more found, not registered, that the ledger had finished (rules changed since).
    assert await ledger.end_listing("j", "a", role.fence, 7, done=1, dead=1)
    after = await ledger.listing("j")
    assert after is not None
    assert (after.generation, after.complete, after.listed_files) == (1, 1, 7)
    assert (after.found_done, after.found_dead, after.registered) == (2, 2, 3)
    assert after.listed_at is not None
    assert after.started_at is not None
    waiting = await ledger.claim_waiting("j", "a", 60, 10)
    assert sorted(r.key for r in waiting) == ["k00003", "k00004", "k00005"]
    # The vanished one never started: its vanishing is not an interrupted attempt (it was
    # counted one at this lease, and a file rewritten often enough ended dead of it).
    assert {r.key: r.interrupted for r in waiting}["k00003"] == 0
    # A watch's full scan is a listing without a start (no report counts its files).
    scan = await ledger.begin_listing("j", "a", role.fence, watching=True)
    assert scan is not None
    assert (scan.generation, scan.complete, scan.started_at) == (2, 1, None)
    assert scan.listed_files == 7  # the complete listing's, while the next is under way
    assert await ledger.end_listing("j", "a", role.fence, 4)
    after = await ledger.listing("j")
    assert after is not None
    assert (after.generation, after.complete, after.listed_files, after.started_at) == (
        2,
        2,
        4,
        None,
    )


async def test_a_listing_by_a_holder_taken_over_is_refused(ledger: Ledger, store: Store) -> None:
    for owner in ("a", "b"):
        await ledger.start_runner(run_start(owner, shared=True))
    old = await ledger.take_listing("j", "a", 60)
    assert await ledger.begin_listing("j", "a", old.fence) is not None
    await expire_listing(store)
    new = await ledger.take_listing("j", "b", 60)
    assert await ledger.register_listed("j", "a", old.fence, [entry(1)]) is None
    assert not await ledger.end_listing("j", "a", old.fence, 1)
    assert await ledger.begin_listing("j", "a", old.fence) is None
    assert await ledger.claim_waiting("j", "b", 60, 10) == []  # nothing was registered
    assert await ledger.register_listed("j", "b", new.fence, [entry(1)]) == Registered(1, 0, 0)


def queued(i: int) -> tuple[str, bytes, int, int, int, int, str]:
    """A listed file as a listing queues it: :func:`entry`, its ctime and input hash."""
    return (*entry(i), 2_000 + i, f"h{i:063d}")


@pytest.mark.parametrize("how", ["queue", "register"])
async def test_a_vanished_item_listed_again_under_another_name_waits_as_that_file(
    ledger: Ledger, how: str
) -> None:
    # Identity content: x.csv vanished (deleted while queued); y.csv has its bytes, so its
    # key. Listed again, the item waits as y.csv: it kept x.csv's name and stat, and every
    # lease of it vanished again, y.csv handled by no runner.
    await ledger.claim_scanned("j", "a", 60, [("k1", b"x.csv", 10, 1_001, 501)])
    await ledger.commit_outcomes("j", "a", [Outcome("k1", 1, "vanished", "gone")])
    role = await ledger.take_listing("j", "a", 60)
    assert await ledger.begin_listing("j", "a", role.fence) is not None
    y = ("k1", b"y.csv", 10, 2_002, 602)
    if how == "queue":
        found = await ledger.queue_listed("j", "a", role.fence, [(*y, 3_003, "h1")])
    else:
        found = await ledger.register_listed("j", "a", role.fence, [y])
    assert found == Registered(1, 0, 0)
    (row,) = await ledger.claim_waiting("j", "b", 60, 10)
    assert (row.key, row.relpath, row.size, row.mtime_ns, row.inode) == y


async def test_a_listing_queues_new_files_and_a_take_leases_them_in_order(
    ledger: Ledger, store: Store
) -> None:
    for owner in ("a", "b"):
        await ledger.start_runner(run_start(owner, shared=True))
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in (1, 2, 3)])
    await ledger.commit_outcomes(
        "j",
        "a",
        [
            Outcome("k00001", 1, "done"),
            Outcome("k00002", 1, "dead", "E"),
            Outcome("k00003", 1, "vanished", "gone"),
        ],
    )
    role = await ledger.take_listing("j", "a", 60)
    assert await ledger.begin_listing("j", "a", role.fence) is not None
    found = await ledger.queue_listed("j", "a", role.fence, [queued(i) for i in range(1, 8)])
    assert found == Registered(5, 1, 1)  # 4-7 queued; 3 (vanished) waits again
    listing = await ledger.listing("j")
    assert listing is not None
    assert (listing.registered, listing.found_done, listing.found_dead) == (5, 1, 1)
    # Queued files are pending, though no item row holds them yet.
    counts = await ledger.counts("j")
    assert (counts["pending"], counts["running"], counts["done"]) == (5, 0, 1)
    assert len(await items(store)) == 3
    assert await ledger.queued_files("j") == 4  # (the fifth pending is the revived item 3)
    taken, claimed = await ledger.take_queued("j", "b", 60, 3)
    assert taken == [queued(4), queued(5), queued(6)]
    assert sorted((r.key, r.state, r.fence) for r in claimed) == [
        ("k00004", "running", 1),
        ("k00005", "running", 1),
        ("k00006", "running", 1),
    ]
    assert [row[:3] for row in await items(store) if row[0] >= "k00004"] == [
        ("k00004", "running", "b"),
        ("k00005", "running", "b"),
        ("k00006", "running", "b"),
    ]
    assert await ledger.queued_files("j") == 1
    taken, claimed = await ledger.take_queued("j", "a", 60, 10)
    assert taken == [queued(7)]
    assert await ledger.queued_files("j") == 0
    assert [(r.key, r.state) for r in claimed] == [("k00007", "running")]
    assert await ledger.take_queued("j", "a", 60, 10) == ([], [])
    counts = await ledger.counts("j")
    assert (counts["pending"], counts["running"]) == (1, 4)
    assert [r.key for r in await ledger.claim_waiting("j", "a", 60, 10)] == ["k00003"]


async def test_a_listing_finds_what_the_ledger_holds_among_many_other_items(
    ledger: Ledger,
) -> None:
    # The items between a chunk's least and greatest key are read at once unless there are
    # many more of them than the chunk has keys (see types.known_range_limit): then each key
    # is looked up. Both ways find the same.
    await ledger.start_runner(run_start("a", shared=True))
    others = [entry(i) for i in range(10, 400)]  # finished items of files no longer listed
    await ledger.claim_scanned("j", "a", 60, others)
    await ledger.commit_outcomes("j", "a", [Outcome(key, 1, "done") for key, *_ in others])
    await ledger.claim_scanned("j", "a", 60, [entry(1), entry(500)])
    await ledger.commit_outcomes(
        "j", "a", [Outcome("k00001", 1, "done"), Outcome("k00500", 1, "dead", "E")]
    )
    role = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", role.fence)
    near = [queued(1), queued(2)]  # one item between k00001 and k00002: read at once
    assert await ledger.queue_listed("j", "a", role.fence, near) == Registered(1, 1, 0)
    near = [queued(500), queued(501)]
    assert await ledger.queue_listed("j", "a", role.fence, near) == Registered(1, 0, 1)
    far = [queued(i) for i in (9, 10, 11, 12, 13, 600)]  # 391 items between: looked up
    assert await ledger.queue_listed("j", "a", role.fence, far) == Registered(2, 4, 0)
    taken, _ = await ledger.take_queued("j", "a", 60, 10)
    assert [row[0] for row in taken] == ["k00002", "k00501", "k00009", "k00600"]


async def test_a_take_of_queued_files_reports_what_the_ledger_held_already(
    ledger: Ledger,
) -> None:
    for owner in ("a", "b"):
        await ledger.start_runner(run_start(owner, shared=True))
    role = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", role.fence)
    assert await ledger.queue_listed("j", "a", role.fence, [queued(1), queued(2)]) == Registered(
        2, 0, 0
    )
    # Meanwhile another path registered them (an unshared claim, a second listing's take).
    await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2)])
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "done", post_action="delete")])
    taken, claimed = await ledger.take_queued("j", "b", 60, 10)
    assert taken == [queued(1), queued(2)]
    by_key = {r.key: r for r in claimed}
    assert by_key["k00001"].state == "done"
    assert by_key["k00001"].post_action == "delete"
    assert by_key["k00002"].state == "held"  # a's lease: b leases nothing
    assert (await ledger.counts("j"))["running"] == 1


async def test_takes_split_a_queued_batch_and_keep_the_listing_order(ledger: Ledger) -> None:
    await ledger.start_runner(run_start("a", shared=True))
    role = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", role.fence)
    files = [queued(i) for i in range(1, 1201)]  # more than one batch (QUEUED_BATCH: 512)
    assert await ledger.queue_listed("j", "a", role.fence, files[:1000]) == Registered(1000)
    assert await ledger.queue_listed("j", "a", role.fence, files[1000:]) == Registered(200)
    got: list[tuple[str, bytes, int, int, int, int, str]] = []
    # Batches of 512, 488 and 200: the first batch whole or in part, the next ones only
    # whole (a batch taken in part is written again, its rest).
    for size, expected in ((300, 300), (300, 212), (7, 7), (500, 481), (500, 200), (5, 0)):
        taken, claimed = await ledger.take_queued("j", "a", 60, size)
        assert len(taken) == expected
        assert len(claimed) == len(taken)
        got += taken
    assert got == files
    assert (await ledger.counts("j"))["pending"] == 0


async def test_a_new_listing_drops_what_the_last_one_queued(ledger: Ledger, store: Store) -> None:
    for owner in ("a", "b"):
        await ledger.start_runner(run_start(owner, shared=True))
    old = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", old.fence)
    await ledger.queue_listed("j", "a", old.fence, [queued(1), queued(2)])
    await expire_listing(store)
    new = await ledger.take_listing("j", "b", 60)
    assert await ledger.queue_listed("j", "a", old.fence, [queued(3)]) is None  # taken over
    assert (await ledger.counts("j"))["pending"] == 2
    assert await ledger.begin_listing("j", "b", new.fence) is not None
    assert (await ledger.counts("j"))["pending"] == 0  # it lists every file again
    assert await ledger.take_queued("j", "b", 60, 10) == ([], [])


async def test_concurrent_takes_of_queued_files_take_each_once(
    ledger: Ledger, store: Store
) -> None:
    await ledger.start_runner(run_start("a", shared=True))
    role = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", role.fence)
    files = [queued(i) for i in range(1, 2001)]
    await ledger.queue_listed("j", "a", role.fence, files)
    taken: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    async def take_all(owner: str) -> None:
        async with await store.open() as mine:
            while True:
                rows, claimed = await mine.take_queued("j", owner, 60, 97)
                if not rows:
                    return
                assert {r.key for r in claimed if r.state == "running"} == {r[0] for r in rows}
                taken[owner] += [r[0] for r in rows]

    async with anyio.create_task_group() as tg:
        for owner in taken:
            tg.start_soon(take_all, owner)
    every = [key for keys in taken.values() for key in keys]
    assert sorted(every) == sorted(f[0] for f in files)  # each once
    assert (await ledger.counts("j"))["running"] == len(files)


async def test_a_ledger_of_the_schema_before_the_queue_is_upgraded(store: Store) -> None:
    async with await store.open() as ledger:
        await ledger.start_runner(run_start("a", shared=True))
        await ledger.claim_scanned("j", "a", 60, [entry(1)])
    await _as_the_schema_before_the_queue(store)
    async with await store.open() as ledger:
        await ledger.start_runner(run_start("b", shared=True))
        role = await ledger.take_listing("j", "b", 60)
        await ledger.begin_listing("j", "b", role.fence)
        assert await ledger.queue_listed("j", "b", role.fence, [queued(2)]) == Registered(1)
        taken, _ = await ledger.take_queued("j", "b", 60, 10)
        assert taken == [queued(2)]
    if isinstance(store, SqliteStore):
        assert await store.fetch("PRAGMA user_version") == [(store.schema_version,)]
    else:
        found = await store.fetch("SELECT value FROM meta WHERE name = 'schema_version'")
        assert found == [(str(store.schema_version),)]


async def _as_the_schema_before_the_queue(store: Store) -> None:
    """Make the store's ledger what the version before the listing's queue left."""
    await store.fetch("DROP TABLE queued")
    await store.fetch("DROP INDEX forgotten_at")  # (the newest migration's)
    await store.fetch("ALTER TABLE listers DROP COLUMN twins")  # (the same)
    await store.fetch("ALTER TABLE listers DROP COLUMN not_ready")  # (schema 11's)
    if isinstance(store, SqliteStore):
        await store.set_schema_version(8)
    else:  # the schema as version 7 left it (8 added a column of the listing role's)
        await store.fetch("ALTER TABLE listers DROP COLUMN queued_last")
        await store.set_schema_version(7)


async def _schema_version(store: Store) -> int:
    if isinstance(store, SqliteStore):
        return int((await store.fetch("PRAGMA user_version"))[0][0])
    return int((await store.fetch("SELECT value FROM meta WHERE name = 'schema_version'"))[0][0])


async def test_a_ledger_a_runner_of_an_older_asyncbatch_uses_is_not_upgraded_under_it(
    store: Store,
) -> None:
    # A runner of the older version goes on writing the rows of its schema: a newer one that
    # upgraded the ledger under it counted what it finished as unfinished (no joblog).
    async with await store.open() as ledger:
        await ledger.claim_scanned("j", "mine", 60, [entry(1)])
    await _as_the_schema_before_the_queue(store)
    before = await _schema_version(store)
    other = await anyio.open_process(["sleep", "60"])
    try:
        row = (other.pid, this_process().host, process_start(other.pid))
        insert = (
            "INSERT INTO runners (owner, job, pid, host, pid_start, shared, started_at,"
            " heartbeat_at, expires_at) VALUES ('old', 'j', $1, $2, $3, true, 0, 0, 1e11)"
        )
        if isinstance(store, SqliteStore):
            with contextlib.closing(sqlite3.connect(store.path)) as db, db:
                db.execute(insert.replace("$", "?"), row)
        else:
            await store.fetch(insert, *row)
        with pytest.raises(LedgerError, match=rf"pid {other.pid} on host .* is using it"):
            await store.open()
        assert await _schema_version(store) == before  # not modified
    finally:
        other.kill()
        await other.wait()
        await other.aclose()
    # Its process gone, the next run upgrades the ledger (a runner that was killed does
    # not hold the upgrade back).
    async with await store.open() as ledger:
        assert (await ledger.counts("j"))["running"] == 1
    assert await _schema_version(store) == store.schema_version


async def test_finish_counts_count_what_other_runners_finished_since(
    ledger: Ledger,
) -> None:
    for owner in ("a", "b"):
        await ledger.start_runner(run_start(owner, shared=True))
    await ledger.claim_scanned("j", "a", 60, [entry(1), entry(2)])
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "done")])
    # After a's, before b's, in the ledger's own times (PostgreSQL's clock, whose offset from
    # ours is measured: time.time() here was once behind the commit's time under load).
    (a_done,) = await ledger.find_items("j", "k00001")
    assert a_done.finished_at is not None
    since = a_done.finished_at + 1e-6
    while time.time() <= since + 0.01:  # noqa: ASYNC110 (b's commit must come after it)
        await anyio.sleep(0.005)
    await ledger.claim_scanned("j", "b", 60, [entry(3), entry(4), entry(5), entry(6)])
    await ledger.commit_outcomes(
        "j",
        "b",
        [
            Outcome("k00003", 1, "done"),
            Outcome("k00004", 1, "done"),
            Outcome("k00005", 1, "dead", "E"),
            Outcome("k00006", 1, "vanished"),  # its file gone: vanished for a's report too
        ],
    )
    await ledger.commit_outcomes("j", "a", [Outcome("k00002", 1, "failed", "E", time.time())])
    counts = dict.fromkeys(STATES, 0) | {"done": 3, "dead": 1, "failed": 1, "vanished": 1}
    assert await ledger.finish_counts("j", "a", since) == (
        counts,
        {"done": 2, "dead": 1, "vanished": 1},
    )
    assert await ledger.finish_counts("j", "b", since) == (counts, {})  # a's was done before
    assert await ledger.finish_counts("j", "a", time.time() + 60) == (counts, {})
    assert await ledger.finish_counts("nothing", "a", since) == (dict.fromkeys(STATES, 0), {})


async def test_work_left_looks_at_the_queue_the_waiting_items_and_the_newest(
    ledger: Ledger, store: Store
) -> None:
    await ledger.start_runner(run_start("a", shared=True))
    assert not await ledger.work_left("j")  # nothing at all
    role = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", role.fence)
    await ledger.queue_listed("j", "a", role.fence, [queued(1), queued(2)])
    assert await ledger.work_left("j")  # files queued
    await ledger.take_queued("j", "a", 60, 10)
    assert await ledger.work_left("j")  # both running
    await ledger.commit_outcomes("j", "a", [Outcome("k00002", 1, "done")])
    assert await ledger.work_left("j")  # k00001 running
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 1, "failed", "E", time.time() - 1)])
    assert await ledger.work_left("j")  # waiting for its retry
    await ledger.claim_waiting("j", "a", 60, 10)
    await ledger.commit_outcomes("j", "a", [Outcome("k00001", 2, "dead", "E")])
    assert not await ledger.work_left("j")  # all finished
    assert not await ledger.work_left("other")
    # Running, but older than the newest WORK_LEFT_NEWEST items: not seen (a count knows).
    many = [entry(i) for i in range(10, 10 + WORK_LEFT_NEWEST)]
    await ledger.claim_scanned("j", "a", 60, [entry(3)])
    for start in range(0, len(many), 512):
        await ledger.claim_scanned("j", "a", 60, many[start : start + 512])
    await ledger.commit_outcomes("j", "a", [Outcome(key, 1, "done") for key, *_ in many])
    assert not await ledger.work_left("j")
    assert (await ledger.counts("j"))["running"] == 1
    await ledger.claim_scanned("j", "a", 60, [entry(10 + WORK_LEFT_NEWEST)])
    assert await ledger.work_left("j")


async def test_registrations_are_announced_where_the_ledger_can(
    ledger: Ledger, store: Store
) -> None:
    announced = anyio.Event()
    listens = await ledger.on_registered("j", announced.set)
    assert listens == (store.kind == "postgres")  # SQLite: runners read the count instead
    await ledger.start_runner(run_start("a", shared=True))
    role = await ledger.take_listing("j", "a", 60)
    await ledger.begin_listing("j", "a", role.fence)
    async with await store.open() as other:  # another runner's ledger registers
        await other.register_listed("j", "a", role.fence, [entry(1)])
    if listens:
        with anyio.fail_after(30):
            await announced.wait()
    listing = await ledger.listing("j")
    assert listing is not None
    assert listing.registered == 1


async def test_a_claim_of_waiting_items_leaves_the_skipped_ones_waiting(ledger: Ledger) -> None:
    # A run leaves waiting the items whose file it found not settled yet: the next claim of
    # waiting items must go past them (a claim of the oldest few would lease them again).
    rows = [entry(i) for i in range(4)]
    claimed = await ledger.claim_scanned("j", "a", 60, rows)
    await ledger.release_items("j", "a", [(c.key, c.fence) for c in claimed])
    first = await ledger.claim_waiting("j", "a", 60, 2, ["k00000", "k00001"])
    assert sorted(c.key for c in first) == ["k00002", "k00003"]
    assert await ledger.claim_waiting("j", "a", 60, 2, ["k00000", "k00001"]) == []
    assert sorted(c.key for c in await ledger.claim_waiting("j", "a", 60, 10)) == [
        "k00000",
        "k00001",
    ]


async def test_iter_items_reads_keyset_pages_in_the_order_of_list_items(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in range(1, 12)])
    # Outcomes committed together share their updated_at: ties that pages must cut through.
    await ledger.commit_outcomes("j", "a", [Outcome(f"k0000{i}", 1, "done") for i in (3, 1, 2)])
    await ledger.commit_outcomes("j", "a", [Outcome(f"k0000{i}", 1, "dead", "E") for i in (5, 4)])
    await ledger.claim_scanned("other", "a", 60, [entry(i) for i in range(1, 4)])
    pages: list[int | None] = []
    read_page = type(ledger)._items_page

    async def counted(self: Ledger, job: str, which: ItemFilter, after: Any) -> Any:
        pages.append(which.limit)
        return await read_page(self, job, which, after)

    monkeypatch.setattr(type(ledger), "_items_page", counted)
    for which in (
        ItemFilter(limit=None),
        ItemFilter(limit=5),
        ItemFilter(limit=100),
        ItemFilter(states=("done", "dead"), limit=None),
        ItemFilter(glob="*0000[1-6]*", limit=None),
        ItemFilter(states=("failed",), limit=None),
    ):
        pages.clear()
        streamed = [item async for item in ledger.iter_items("j", which, page=2)]
        assert streamed == await ledger.list_items("j", which)
        assert len(pages) == len(streamed) // 2 + 1  # every page full but the last
    assert [i.key for i in await ledger.list_items("j", ItemFilter(limit=5))][:3] == [
        "k00004",
        "k00005",
        "k00001",
    ]


async def test_forget_chunks_forgets_a_chunk_a_transaction(ledger: Ledger) -> None:
    start, _ = await ledger.forgotten_since("j", None)
    await ledger.claim_scanned("j", "a", 60, [entry(i) for i in range(1, 9)])
    done = [Outcome(f"k0000{i}", 1, "done") for i in range(1, 6)]
    await ledger.commit_outcomes("j", "a", [*done, Outcome("k00006", 1, "dead", "E")])
    await anyio.sleep(0.05)
    cutoff = time.time()
    await anyio.sleep(0.05)
    await ledger.commit_outcomes("j", "a", [Outcome("k00007", 1, "done")])
    chunks = [c async for c in ledger.forget_chunks("j", done_before=cutoff, chunk=2)]
    assert [[i.key for i in c.forgotten] for c in chunks] == [
        ["k00001", "k00002"],
        ["k00003", "k00004"],
        ["k00005"],
    ]
    assert all(c.refused == () for c in chunks)
    left = sorted(i.key for i in await ledger.list_items("j", ItemFilter(limit=None)))
    assert left == ["k00006", "k00007", "k00008"]
    _, names = await ledger.forgotten_since("j", start)
    assert names == [b"f00001", b"f00002", b"f00003", b"f00004", b"f00005"]
    assert [c async for c in ledger.forget_chunks("j", done_before=cutoff, chunk=2)] == []
    # Without a time: the vanished items.
    await ledger.commit_outcomes("j", "a", [Outcome("k00008", 1, "vanished")])
    (chunk,) = [c async for c in ledger.forget_chunks("j", chunk=2)]
    assert [i.key for i in chunk.forgotten] == ["k00008"]
