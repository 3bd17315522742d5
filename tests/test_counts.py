"""Every count asyncbatch prints is true: reports, history, status, after stops and kills."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio

from asyncbatch import Batch, TaskContext

from .conftest import HANDLERS, cli, make_files, spawn, state_counts

RECORD = f"{HANDLERS}:record"


def done_before(batch: Batch) -> int:
    """The running batch's count of files found done before (0 before it runs)."""
    stats = batch.statistics()
    return 0 if stats is None else stats.done_before


def counts(state: Path) -> dict[str, int]:
    """Items by state, ``{}`` before the ledger has its tables."""
    try:
        return state_counts(state)
    except sqlite3.OperationalError:
        return {}


async def test_a_watch_after_an_interrupted_one_counts_each_file_once(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 20)
    started: list[str] = []

    async def four_then_hang(ctx: TaskContext) -> None:
        started.append(ctx.entry.relpath)
        if len(started) > 4:
            await anyio.sleep_forever()  # stopped mid-attempt: given back unfinished

    first = Batch(
        four_then_hang,
        source=inbox,
        state=state,
        settle=0,
        poll=0.05,
        concurrency=4,
        claim_batch=8,
        grace=0.1,
    )

    async def stop_when_four_are_done() -> None:
        while counts(state).get("done", 0) < 4 or len(started) < 8:  # noqa: ASYNC110
            await anyio.sleep(0.02)
        first.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_four_are_done)
        stopped = await first.watch()
    assert stopped.done == 4
    assert state_counts(state)["done"] == 4

    second_seen: list[str] = []

    async def fast(ctx: TaskContext) -> None:
        second_seen.append(ctx.entry.relpath)

    second = Batch(fast, source=inbox, state=state, settle=0, poll=0.05, concurrency=4)

    async def stop_when_all_are_done() -> None:
        # Every file done, and the scan's look at the four done before claimed too (with it
        # the sixteen this watch leased from the ledger first, as left waiting).
        while counts(state) != {"done": 20} or done_before(second) < 4:  # noqa: ASYNC110
            await anyio.sleep(0.02)
        second.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_all_are_done)
        report = await second.watch()

    assert sorted(second_seen) == sorted(set(second_seen))
    assert len(second_seen) == 16
    assert (report.seen, report.done, report.done_before, report.earlier) == (20, 16, 4, 0)
    assert "20 seen: 16 done, 4 done before" in str(report)


def test_a_run_waiting_for_a_ledger_another_process_locked_says_so(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 3)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    make_files(inbox, 2, prefix="new")
    holder = sqlite3.connect(state, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
    proc = spawn("run", RECORD, "--source", inbox, "--state", state, "--no-progress")
    try:
        assert proc.stderr is not None
        told = ""
        deadline = time.monotonic() + 60
        while "is locked by another process" not in told:
            line = proc.stderr.readline()
            assert line, f"the run ended without saying why it waits: {told}"
            assert time.monotonic() < deadline
            told += line
        assert "waiting up to" in told
        assert proc.poll() is None  # still waiting, not failed
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert state_counts(state) == {"done": 5}
