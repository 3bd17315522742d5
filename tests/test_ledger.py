"""The SQLite ledger: refusing what is not ours, the job lock, leases and fencing, transactions."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from asyncbatch import ConfigurationError, JobLockedError, NotALedgerError, SchemaVersionError
from asyncbatch._ledger import Ledger, Outcome
from asyncbatch._procinfo import ProcessIdentity, holder_is_alive, this_process
from asyncbatch._sql import SCHEMA_VERSION

from .conftest import rows


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def dead_process() -> ProcessIdentity:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    me = this_process()
    return ProcessIdentity(me.host, proc.pid, f"{(me.pid_start or 'x:0').split(':')[0]}:1")


async def test_new_state_files_are_private(state: Path) -> None:
    async with await Ledger.open(state) as ledger:
        await ledger.ensure_job("default", "stat")
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE((state.parent / (state.name + suffix)).stat().st_mode)
            assert mode == 0o600, suffix
    assert rows(state, "PRAGMA journal_mode") == [("wal",)]


async def test_a_file_that_is_not_sqlite_is_refused_untouched(state: Path) -> None:
    state.write_text("id,name\n1,precious data\n")
    before = digest(state)
    with pytest.raises(NotALedgerError, match="not a SQLite database"):
        await Ledger.open(state)
    assert digest(state) == before
    assert not Path(f"{state}-wal").exists()


async def test_another_applications_database_is_refused_untouched(state: Path) -> None:
    db = sqlite3.connect(state)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    before = digest(state)
    with pytest.raises(NotALedgerError, match="another application"):
        await Ledger.open(state)
    assert digest(state) == before


async def test_a_newer_schema_is_refused_untouched(state: Path) -> None:
    async with await Ledger.open(state):
        pass
    db = sqlite3.connect(state)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = digest(state)
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await Ledger.open(state)
    assert digest(state) == before


async def test_state_in_a_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        await Ledger.open(tmp_path / "nope" / "state.db")


async def test_read_only_open_never_creates_the_state(state: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        await Ledger.open(state, create=False)
    assert not state.exists()


async def test_a_job_keeps_its_identity_mode(state: Path) -> None:
    async with await Ledger.open(state) as ledger:
        await ledger.ensure_job("j", "stat")
        with pytest.raises(ConfigurationError, match="identity='stat'"):
            await ledger.ensure_job("j", "content")


async def test_a_live_lock_is_refused_and_names_its_holder(state: Path) -> None:
    me = this_process()
    async with await Ledger.open(state) as ledger:
        assert await ledger.acquire_lock("j", "owner-a", me, 60, shared=False) is None
        with pytest.raises(JobLockedError, match=f"pid {me.pid} on host") as info:
            await ledger.acquire_lock("j", "owner-b", me, 60, shared=False)
        assert info.value.pid == me.pid
        with pytest.raises(JobLockedError):
            await ledger.acquire_lock("j", "owner-c", me, 60, shared=True)


async def test_a_dead_holders_lock_is_taken_over_at_once(state: Path) -> None:
    gone = dead_process()
    assert holder_is_alive(gone) is False
    async with await Ledger.open(state) as ledger:
        await ledger.acquire_lock("j", "dead-owner", gone, 3600, shared=False)
        stale = await ledger.acquire_lock("j", "new-owner", this_process(), 60, shared=False)
        assert stale is not None
        assert stale.owner == "dead-owner"
        (lock,) = await ledger.locks()
        assert lock.owner == "new-owner"


async def test_an_expired_heartbeat_is_taken_over(state: Path) -> None:
    clock = Clock()
    other_host = ProcessIdentity("elsewhere", 4242, None)
    async with await Ledger.open(state, clock=clock) as ledger:
        await ledger.acquire_lock("j", "remote", other_host, 30, shared=False)
        with pytest.raises(JobLockedError):
            await ledger.acquire_lock("j", "local", this_process(), 30, shared=False)
        clock.now += 31
        assert await ledger.acquire_lock("j", "local", this_process(), 30, shared=False)


async def test_a_runner_whose_lease_was_taken_over_cannot_mark_done(state: Path) -> None:
    clock = Clock()
    row = ("k1", b"a.txt", 1, 1, 1)
    async with await Ledger.open(state, clock=clock) as ledger:
        (first,) = await ledger.claim_scanned("j", "runner-a", 10, [row])
        assert (first.state, first.fence, first.attempts) == ("running", 1, 0)
        # Runner A starts its attempt (counted at the next group commit).
        assert await ledger.commit_outcomes("j", "runner-a", [], [("k1", 1)]) == set()
        # Runner A stalls past its lease; runner B takes the item over.
        clock.now += 11
        (second,) = await ledger.claim_scanned("j", "runner-b", 10, [row])
        assert (second.fence, second.attempts) == (2, 1)
        lost = await ledger.commit_outcomes("j", "runner-a", [Outcome("k1", 1, "done")])
        assert lost == {"k1"}
        assert rows(state, "SELECT state, owner, fence FROM items") == [("running", "runner-b", 2)]
        assert await ledger.commit_outcomes("j", "runner-b", [Outcome("k1", 2, "done")]) == set()
        assert rows(state, "SELECT state, owner FROM items") == [("done", "runner-b")]
        # A done item is never leased again.
        assert await ledger.claim_scanned("j", "runner-c", 10, [row]) == []


async def test_cancellation_during_a_commit_leaves_no_open_transaction(state: Path) -> None:
    many = [(f"k{i:06d}", f"f{i}".encode(), 1, i, i) for i in range(3000)]
    async with await Ledger.open(state) as ledger:
        claimed = []
        for start in range(0, len(many), 500):
            claimed += await ledger.claim_scanned("j", "me", 60, many[start : start + 500])
        outcomes = [Outcome(c.key, c.fence, "done") for c in claimed]
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ledger.commit_outcomes, "j", "me", outcomes)
                await anyio.sleep(0.001)
                scope.cancel()
        # The commit ran to its end (shielded) and released the write lock at once.
        other = sqlite3.connect(state, timeout=0.05, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
        assert await ledger.counts("j") == {
            "pending": 0,
            "running": 0,
            "done": 3000,
            "failed": 0,
            "dead": 0,
            "vanished": 0,
        }


async def test_released_items_return_to_pending(state: Path) -> None:
    async with await Ledger.open(state) as ledger:
        a, b = await ledger.claim_scanned(
            "j", "me", 60, [("a", b"a", 1, 1, 1), ("b", b"b", 1, 2, 2)]
        )
        await ledger.release_items("j", "me", [(a.key, a.fence, False), (b.key, b.fence, True)])
        # Attempts are counted when they start, so releasing undoes nothing.
        assert rows(state, "SELECT key, state, attempts, owner FROM items ORDER BY key") == [
            ("a", "pending", 0, None),
            ("b", "pending", 0, None),
        ]
        claimed = await ledger.claim_waiting("j", "me2", 60, 10)
        assert [c.key for c in claimed] == ["a", "b"]


def test_runners_creating_a_fresh_state_at_the_same_moment_both_succeed(tmp_path: Path) -> None:
    state = tmp_path / "fresh.db"
    script = (
        "import anyio, sys, time\n"
        "from asyncbatch._ledger import Ledger\n"
        "async def main():\n"
        "    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together\n"
        "    async with await Ledger.open(sys.argv[1]) as ledger:\n"
        "        await ledger.ensure_job('default', 'stat')\n"
        "anyio.run(main)\n"
    )
    for _ in range(5):
        state.unlink(missing_ok=True)
        start = str(time.time() + 1.5)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(state), start], stderr=subprocess.PIPE
            )
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
        assert len(rows(state, "SELECT value FROM meta WHERE name = 'secret'")) == 1


async def test_many_connections_switching_a_fresh_state_to_wal_at_once_all_succeed(
    tmp_path: Path,
) -> None:
    # Two connections switching a new file to WAL at once can deadlock on its exclusive lock;
    # SQLite fails one of them at once ("database is locked") instead of waiting. Racing four
    # opens on many fresh files makes that happen (it did in about one round in twenty).
    async def open_and_use(state: Path) -> None:
        async with await Ledger.open(state) as ledger:
            await ledger.ensure_job("default", "stat")

    for round_ in range(60):
        state = tmp_path / f"fresh-{round_}.db"
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(open_and_use, state)
        assert rows(state, "PRAGMA journal_mode") == [("wal",)]


async def test_a_write_waits_for_another_writer_and_the_wait_can_be_cancelled(
    state: Path,
) -> None:
    async with await Ledger.open(state, busy_timeout=30) as ledger:
        await ledger.ensure_job("j", "stat")
        other = sqlite3.connect(state, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            started = time.monotonic()
            with anyio.move_on_after(0.3) as scope:
                await ledger.claim_scanned("j", "cancelled", 60, [("k", b"a", 1, 1, 1)])
            assert scope.cancelled_caught, "the claim waited for the lock"
            assert time.monotonic() - started < 2, "and stopped waiting when cancelled"

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
