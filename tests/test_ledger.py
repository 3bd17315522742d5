"""The SQLite ledger's own behaviour (the shared contract is tests/test_ledger_contract.py):
private files, refusing what is not ours, fresh files opened at once, waiting for the write
lock, and the aiosqlite private API it depends on."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch import ConfigurationError, DamagedLedgerError, NotALedgerError
from asyncbatch import _failpoints as failpoints
from asyncbatch._ledger import Heartbeat, RunEnd, RunTotals, sqlite_sql
from asyncbatch._ledger.base import decode_twins, encode_twins
from asyncbatch._ledger.sqlite import SQLiteLedger, _fenced_group
from asyncbatch._ledger.sqlite import _tables as tables_of
from asyncbatch._ledger.sqlite_open import check_state_path
from asyncbatch._ledger.types import NOT_READY_KEPT, decode_not_ready, encode_not_ready
from asyncbatch._procinfo import this_process

from .conftest import rows, run_start


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_new_state_files_are_private(state: Path) -> None:
    async with await SQLiteLedger.open(state) as ledger:
        await ledger.start_runner(run_start(shared=True))
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE((state.parent / (state.name + suffix)).stat().st_mode)
            assert mode == 0o600, suffix
    assert rows(state, "PRAGMA journal_mode") == [("wal",)]


async def test_a_file_that_is_not_sqlite_is_refused_untouched(state: Path) -> None:
    state.write_text("id,name\n1,precious data\n")
    before = digest(state)
    with pytest.raises(NotALedgerError, match="not a SQLite database"):
        await SQLiteLedger.open(state)
    assert digest(state) == before
    assert not Path(f"{state}-wal").exists()


async def test_another_applications_database_is_refused_untouched(state: Path) -> None:
    db = sqlite3.connect(state)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    before = digest(state)
    with pytest.raises(NotALedgerError, match="another application"):
        await SQLiteLedger.open(state)
    assert digest(state) == before


async def test_state_in_a_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        await SQLiteLedger.open(tmp_path / "nope" / "state.db")


def test_runners_creating_a_fresh_state_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    state = tmp_path / "fresh.db"
    go = tmp_path / "go"
    script = (
        "import anyio, os, sys, time\n"
        "from asyncbatch._ledger import JobSettings, RunStart\n"
        "from asyncbatch._ledger.sqlite import SQLiteLedger\n"
        "from asyncbatch._procinfo import this_process\n"
        "async def main():\n"
        "    open(sys.argv[2] + '.' + str(os.getpid()), 'w').close()  # ready\n"
        "    while not os.path.exists(sys.argv[2]):  # start together\n"
        "        time.sleep(0.001)\n"
        "    async with await SQLiteLedger.open(sys.argv[1]) as ledger:\n"
        "        await ledger.start_runner(RunStart(job='default', owner=str(os.getpid()),\n"
        "            me=this_process(), ttl=60, shared=True, mode='run', identity='stat',\n"
        "            settings=JobSettings(source='/srv/inbox')))\n"
        "anyio.run(main)\n"
    )
    for _ in range(5):
        state.unlink(missing_ok=True)
        go.unlink(missing_ok=True)
        for ready in tmp_path.glob("go.*"):
            ready.unlink()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(state), str(go)], stderr=subprocess.PIPE
            )
            for _ in range(4)
        ]
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        go.touch()
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
        assert len(rows(state, "SELECT value FROM meta WHERE name = 'secret'")) == 1


async def test_many_connections_switching_a_fresh_state_to_wal_at_once_all_succeed(
    tmp_path: Path,
) -> None:
    # Two connections switching a new file to WAL at once can deadlock on its exclusive lock;
    # SQLite fails one of them at once ("database is locked") instead of waiting. Racing four
    # opens on many fresh files makes that happen (it did in about one round in twenty).
    async def open_and_use(state: Path, owner: str) -> None:
        async with await SQLiteLedger.open(state) as ledger:
            await ledger.start_runner(run_start(owner, shared=True))

    for round_ in range(60):
        state = tmp_path / f"fresh-{round_}.db"
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(open_and_use, state, f"runner-{i}")
        assert rows(state, "PRAGMA journal_mode") == [("wal",)]


async def test_a_write_waits_for_another_writer_and_the_wait_can_be_cancelled(
    state: Path,
) -> None:
    async with await SQLiteLedger.open(state, busy_timeout=30) as ledger:
        await ledger.start_runner(run_start(shared=True))
        other = sqlite3.connect(state, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            started = time.monotonic()
            with anyio.move_on_after(0.3) as scope:
                await ledger.claim_scanned("j", "cancelled", 60, [("k", b"a", 1, 1, 1)])
            assert scope.cancelled_caught, "the claim waited for the lock"
            # (Else it would have waited out its 30 s busy timeout.)
            assert time.monotonic() - started < 20, "and stopped waiting when cancelled"

            async with anyio.create_task_group() as tg:
                tg.start_soon(ledger.claim_scanned, "j", "me", 60, [("k", b"a", 1, 1, 1)])
                await anyio.sleep(0.2)
                other.execute("ROLLBACK")  # the lock is free: the waiting claim goes through
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")
            other.close()
        # The cancelled claim never took effect, even once the lock was free.
        assert rows(state, "SELECT key, state, owner, fence FROM items") == [
            ("k", "running", "me", 1)
        ]
        writer = sqlite3.connect(state, timeout=0.05, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # nothing left open by the cancelled attempt
        writer.execute("ROLLBACK")
        writer.close()


def test_aiosqlite_has_the_private_api_the_ledger_uses() -> None:
    import aiosqlite

    from asyncbatch._ledger import aiosqlite_bridge

    low, high = aiosqlite_bridge.SUPPORTED
    version = tuple(int(p) for p in aiosqlite.__version__.split(".")[:2])
    assert low <= version < high, (
        f"aiosqlite {aiosqlite.__version__} is outside the range checked by "
        "asyncbatch/_ledger/aiosqlite_bridge.py: check Connection._execute and _conn, then "
        "widen SUPPORTED and the pin in pyproject.toml"
    )
    aiosqlite_bridge.check()  # raises ImportError naming the version if they changed


async def test_a_transaction_is_one_function_on_the_connection_thread(state: Path) -> None:
    import threading

    from asyncbatch._ledger import aiosqlite_bridge

    seen: list[str] = []
    async with await SQLiteLedger.open(state) as ledger:
        db = ledger._db

        def body() -> str:
            thread = threading.current_thread()
            seen.append(thread.name if thread.daemon else "not a daemon thread")
            return str(aiosqlite_bridge.raw(db).execute("SELECT 'ok'").fetchone()[0])

        assert await aiosqlite_bridge.on_thread(db, body) == "ok"
    assert len(seen) == 1
    assert seen[0] not in (threading.main_thread().name, "not a daemon thread")


def damaged_database(path: Path) -> sqlite3.Connection:
    """A small SQLite file whose one table's leaf page is overwritten (as a bad disk would):
    reading the table raises a real SQLITE_CORRUPT error."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (v TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [("x" * 100,) for _ in range(200)])
    db.commit()
    (root,) = db.execute("SELECT rootpage FROM sqlite_schema WHERE name = 't'").fetchone()
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with path.open("r+b") as f:
        f.seek((root - 1 + 2) * size)  # a leaf after the root (an interior page here)
        f.write(b"\xa5" * size)
    return sqlite3.connect(path, check_same_thread=False)


async def test_damage_met_mid_way_stops_every_write_at_once(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = damaged_database(tmp_path / "broken.db")
    with pytest.raises(sqlite3.DatabaseError) as found:
        broken.execute("SELECT count(*) FROM t WHERE v != ''").fetchall()
    assert found.value.sqlite_errorname == "SQLITE_CORRUPT"
    async with await SQLiteLedger.open(state) as ledger:
        started = await ledger.start_runner(run_start())

        def meets_damage() -> None:  # a statement of the transaction reads a damaged page
            broken.execute("SELECT count(*) FROM t WHERE v != ''").fetchall()

        call = failpoints.Call("call", fn=meets_damage)
        monkeypatch.setattr(failpoints, "ACTIVE", {"in-transaction": call})
        beat = Heartbeat(job="j", owner="a", ttl=60, holds_lock=True, run_id=started.run_id)
        with pytest.raises(DamagedLedgerError) as damage:
            await ledger.heartbeat(beat)
        message = str(damage.value)
        assert f"state {str(state)!r} is a damaged SQLite database" in message
        assert "malformed" in message
        assert "stopped writing to it at once" in message  # it had written: not "not modified"
        assert "\n" not in message
        before = [digest(p) for p in (state, Path(f"{state}-wal"))]
        # Not one more transaction: the release that would record the error included.
        end = RunEnd(
            job="j",
            owner="a",
            holds_lock=True,
            run_id=started.run_id,
            totals=RunTotals(),
            exit_status=f"error: {message}",
        )
        writes = (
            lambda: ledger.heartbeat(beat),
            lambda: ledger.reap_stale_runners("j", this_process()),
            lambda: ledger.release_runner(end),
        )
        for write in writes:
            with pytest.raises(DamagedLedgerError, match="stopped writing"):
                await write()
        assert call.hits == 1
        assert [digest(p) for p in (state, Path(f"{state}-wal"))] == before
    broken.close()
    assert rows(state, "SELECT exit_status FROM runs") == [(None,)]


def _waiting(state: Path, now: float) -> None:
    """Waiting items of job 'j' as a listing and earlier runs leave them: pending ones, a
    retry due, a retry not due yet (and one running: never claimed)."""
    items = [
        ("k1", b"one", 300, "pending", None),
        ("k2", b"two", 100, "pending", None),
        ("k3", b"three", 200, "failed", now - 5),
        ("k4", b"four", 50, "failed", now + 3600),
        ("k5", b"five", 400, "pending", None),
        ("k6", b"six", 10, "running", None),
    ]
    db = sqlite3.connect(state)
    db.executemany(
        "INSERT INTO items (job, key, relpath, size, mtime_ns, state, next_attempt_at, "
        "created_at, updated_at) VALUES ('j', ?, ?, 1, ?, ?, ?, 0, 0)",
        items,
    )
    db.commit()
    db.close()


async def test_waiting_items_are_claimed_oldest_first_from_an_index_in_claim_order(
    state: Path,
) -> None:
    """A claim of waiting items reads the first ones of the partial index ``items_claim``,
    in (mtime, relpath) order, instead of sorting every waiting item of the job: runners
    sharing a job claim every file its listing registered so, and a sort per claim made a
    claim cost O(waiting) (seconds of CPU at 100,000 files). It leases the oldest waiting
    items first, retries due among them, not one due later."""
    async with await SQLiteLedger.open(state) as ledger:
        await ledger.start_runner(run_start())
    now = time.time()
    _waiting(state, now)
    plan = [
        step[-1]
        for step in rows(
            state, "EXPLAIN QUERY PLAN " + sqlite_sql.CLAIM_WAITING, ("j", "a", 1, now, 2, '["k"]')
        )
    ]
    assert any("USING INDEX items_claim" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan
    async with await SQLiteLedger.open(state) as ledger:
        first = await ledger.claim_waiting("j", "a", 60, 2)
        rest = await ledger.claim_waiting("j", "a", 60, 10)
    assert sorted(r.key for r in first) == ["k2", "k3"]
    assert sorted(r.key for r in rest) == ["k1", "k5"]


async def test_a_ledger_of_schema_7_gets_the_claim_order_index(state: Path) -> None:
    async with await SQLiteLedger.open(state) as ledger:
        await ledger.start_runner(run_start())
    db = sqlite3.connect(state)
    db.execute("DROP INDEX items_claim")
    db.execute("DROP TABLE queued")  # (schema 8's)
    db.execute("DROP INDEX forgotten_at")  # (the newest migration's)
    db.execute("ALTER TABLE listers DROP COLUMN twins")  # (the same)
    db.execute("ALTER TABLE listers DROP COLUMN not_ready")  # (schema 11's)
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    async with await SQLiteLedger.open(state) as ledger:
        assert await ledger.claim_waiting("j", "a", 60, 10) == []
    assert rows(state, "PRAGMA user_version") == [(sqlite_sql.SCHEMA_VERSION,)]
    assert rows(state, "SELECT name FROM sqlite_schema WHERE name = 'items_claim'") == [
        ("items_claim",)
    ]


@given(
    st.lists(
        st.tuples(
            st.one_of(st.from_regex(r"[0-9]{19}-[0-9a-f]{24}", fullmatch=True), st.text()),
            st.integers(0, 2**63 - 1),
        ),
        max_size=5,
    )
)
def test_a_fenced_groups_arguments_are_json_of_its_keys_and_pairs(
    pairs: list[tuple[str, int]],
) -> None:
    # Keys as items have them are joined as text; any other is written by json.dumps.
    keys, fenced = _fenced_group(pairs)
    assert json.loads(keys) == [k for k, _ in pairs]
    assert json.loads(fenced) == [f"{k} {f}" for k, f in pairs]


def test_checking_a_state_path_keeps_the_locks_this_process_holds_on_it(tmp_path: Path) -> None:
    # The check read the file's header through a descriptor of its own: closing it dropped
    # every POSIX lock of this process on the file, SQLite's included. Another process that
    # then closed its connection took itself for the last one, checkpointed and deleted the
    # WAL under the ledger open here (two shared watches in one process, and `status` run
    # meanwhile, left "database disk image is malformed").
    state = tmp_path / "state.db"
    wal = tmp_path / "state.db-wal"
    holder = sqlite3.connect(state, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE t (x)")
        holder.execute("INSERT INTO t VALUES (1)")
        assert wal.exists()
        assert check_state_path(state, create=False)
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                "c.execute('SELECT count(*) FROM t').fetchall(); c.close()",
                str(state),
            ],
            check=True,
            timeout=60,
        )
        assert wal.exists(), "another process deleted the WAL this process has open"
        assert holder.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        holder.close()


def test_a_state_that_is_not_sqlite_is_refused_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    for content in (b"not a database, but text", b"SQLite format 3", b"\x00" * 4096):
        state.write_bytes(content)
        with pytest.raises(NotALedgerError, match="not a SQLite database"):
            anyio.run(SQLiteLedger.open, state)
        assert state.read_bytes() == content
        assert not (tmp_path / "state.db-wal").exists()


def test_a_state_that_is_not_sqlite_beside_a_leftover_wal_is_refused_untouched(
    tmp_path: Path,
) -> None:
    # SQLite reads page 1 from a -wal beside the file: left by another database, it made a
    # text file look like one, and the closing connection checkpointed that WAL into it.
    other = tmp_path / "other.db"
    keep = sqlite3.connect(other, isolation_level=None)
    keep.execute("PRAGMA journal_mode=WAL")
    keep.execute("CREATE TABLE t (x)")
    state = tmp_path / "state.db"
    wal = tmp_path / "state.db-wal"
    wal.write_bytes((tmp_path / "other.db-wal").read_bytes())
    keep.close()
    content = b"not a database: a partner's CSV, say\n" * 20
    state.write_bytes(content)
    leftover = wal.read_bytes()
    with pytest.raises(NotALedgerError, match="not a SQLite database"):
        anyio.run(SQLiteLedger.open, state)
    assert state.read_bytes() == content
    assert wal.read_bytes() == leftover


@pytest.mark.parametrize(
    "stored",
    [None, "", "not json", "[1, 2]", '{"k": "two"}', '{"k": true}', '{"k": -1}', '{"k": 0}'],
)
def test_twins_the_listing_did_not_write_read_as_none(stored: str | None) -> None:
    # A value this code did not write counts no file done before: less said, never more.
    assert decode_twins(stored) == {}


def test_twins_read_back_as_written() -> None:
    assert encode_twins({}) is None
    assert decode_twins(encode_twins({"k1": 1, "k2": 3})) == {"k1": 1, "k2": 3}


@pytest.mark.parametrize(
    "stored",
    [
        None,
        "",
        "not json",
        "[1, 2]",
        '{"unsettled": "two"}',
        '{"unsettled": true}',
        '{"unsettled": -1}',
        '{"other": 3}',
    ],
)
def test_files_not_ready_the_listing_did_not_write_read_as_none(stored: str | None) -> None:
    # A value this code did not write counts no file not ready yet: less said, never more.
    assert decode_not_ready(stored) == dict.fromkeys(NOT_READY_KEPT, 0)


def test_files_not_ready_read_back_as_written() -> None:
    assert encode_not_ready({}) is None
    assert encode_not_ready({"unsettled": 0, "too_old": 0}) is None
    left = {"unsettled": 3, "future": 2, "unmarked": 1}
    assert decode_not_ready(encode_not_ready(left)) == {**dict.fromkeys(NOT_READY_KEPT, 0), **left}
    # Of the unsettled, never more ahead of the clock than there are.
    assert decode_not_ready('{"unsettled": 1, "future": 4}')["future"] == 1


async def test_the_tables_a_ledger_is_checked_against_are_those_its_migrations_make(
    tmp_path: Path,
) -> None:
    # sqlite_sql.TABLES is what every open compares a ledger's tables with: a migration that
    # changes them must change it too (else every ledger of the new version is refused).
    memory = sqlite3.connect(":memory:")
    try:
        for version in range(sqlite_sql.SCHEMA_VERSION):
            memory.executescript(sqlite_sql.MIGRATIONS[version])
        made = tables_of(memory)
    finally:
        memory.close()
    assert made == sqlite_sql.TABLES
    state = tmp_path / "s.db"
    ledger = await SQLiteLedger.open(state)
    await ledger.close()
    conn = sqlite3.connect(state)
    try:
        on_disk = tables_of(conn)
    finally:
        conn.close()
    assert on_disk == sqlite_sql.TABLES
