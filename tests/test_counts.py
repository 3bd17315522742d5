"""Every count asyncbatch prints is true: reports, history, status, after stops and kills."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from asyncbatch import Batch, TaskContext

from .conftest import (
    HANDLERS,
    cli,
    invocations,
    kill,
    ledger_rows,
    make_files,
    rows,
    spawn,
    start_recording,
    state_counts,
    until,
    wait_for,
)

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


async def test_a_shared_runner_stopped_after_its_partner_finished_reports_from_the_ledger(
    inbox: Path, state: Path
) -> None:
    # A slow shared runner, stopped once its partner has done every file it does not hold:
    # its report must say those are done (before), not "unfinished" or "held by others".
    make_files(inbox, 40)
    blocked = anyio.Event()

    async def stuck(ctx: TaskContext) -> None:
        blocked.set()
        await anyio.sleep_forever()

    async def fast(ctx: TaskContext) -> None:
        pass

    slow = Batch(stuck, source=inbox, state=state, settle=0, shared=True, concurrency=2, grace=0.1)
    partner = Batch(fast, source=inbox, state=state, settle=0, shared=True, concurrency=4)
    reports = {}

    async def run(name: str, batch: Batch) -> None:
        reports[name] = await batch.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "slow", slow)
        with anyio.fail_after(30):
            await blocked.wait()
        tg.start_soon(run, "partner", partner)
        with anyio.fail_after(30):
            while counts(state).get("done", 0) + in_flight(slow) < 40:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        left = in_flight(slow)
        slow.stop()

    stopped, finished = reports["slow"], reports["partner"]
    assert (stopped.seen, stopped.done, stopped.held, stopped.unregistered) == (40, 0, 0, 0)
    assert (stopped.done_before, stopped.unfinished) == (40 - left, left)
    assert f"40 seen: 0 done, {40 - left} done before, {left} unfinished" in str(stopped)
    assert finished.done + finished.done_before == 40
    assert counts(state) == {"done": 40}


def in_flight(batch: Batch) -> int:
    """Items leased to the running batch and not committed yet."""
    stats = batch.statistics()
    return 0 if stats is None else stats.in_flight


def test_a_killed_runs_history_counts_what_the_ledger_says_it_finished(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 200)
    log = tmp_path / "calls.log"
    proc = start_recording(inbox, state, log, jobs=4, sleep=0.02)
    wait_for(lambda: counts(state).get("done", 0) >= 40, timeout=60)
    kill(proc)
    done = counts(state)["done"]
    assert done < 200

    (run,) = json.loads(cli("history", "--state", state, "--json").stdout)
    assert run["exit_status"] is None  # nobody has found it gone yet
    assert run["done"] == done  # from the joblog, not its last heartbeat (15 s away)
    assert run["seen"] >= done
    # The next run finds it gone: killed, its counts still the ledger's.
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    _, first = json.loads(cli("history", "--state", state, "--json").stdout)
    assert (first["exit_status"], first["done"]) == ("killed", done)
    text = cli("history", "--state", state).stdout
    assert "exit killed (done, dead and vanished from the ledger" in text


def test_a_run_killed_before_its_first_heartbeat_counts_what_it_held_as_unfinished(
    inbox: Path, any_state: str, tmp_path: Path
) -> None:
    make_files(inbox, 300)  # it cannot finish before the kill
    log = tmp_path / "calls.log"
    proc = start_recording(inbox, any_state, log, jobs=4, sleep=0.05)
    # Its first heartbeat, which would save its counts, is --lease/4 (15 s) away.
    wait_for(lambda: invocations(log).total() >= 8, timeout=60)
    # Alive, before its first heartbeat: what it left in the source is not known yet (its
    # row's counts are the zeros it started with, not "nothing").
    live = cli("status", "--state", any_state, env={"COLUMNS": "300"}).stdout
    assert "left in the source by the last run: not known (it saved no counts: its first " in live
    assert "nothing it found" not in live
    kill(proc)
    started = invocations(log).total()
    by_state = dict(ledger_rows(any_state, "SELECT state, count(*) FROM items GROUP BY state"))
    done, leased = by_state.get("done", 0), by_state.get("running", 0)
    assert leased > 0  # in flight, or leased and queued
    assert done + leased >= started  # none failed
    assert ledger_rows(any_state, "SELECT seen, unfinished FROM runs") == [(0, 0)]

    def counted(run: dict[str, int]) -> tuple[int, int, int]:
        return run["seen"], run["done"], run["unfinished"]

    # Live (not found gone yet): what it finished and what it holds, from the ledger.
    (run,) = json.loads(cli("history", "--state", any_state, "--json").stdout)
    assert counted(run) == (done + leased, done, leased)
    last = json.loads(cli("status", "--state", any_state, "--json").stdout)["last_run"]
    assert counted(last) == (done + leased, done, leased)
    shown = f"{done + leased} seen: {done} done, {leased} unfinished"
    assert shown in cli("history", "--state", any_state).stdout
    text = cli("status", "--state", any_state, env={"COLUMNS": "300"}).stdout
    assert shown in text
    assert "the rest not known: no heartbeat saved its counts" in text
    assert "not known (it saved no counts: gone before its first heartbeat)" in text
    assert "duration not known: gone before its first heartbeat" in text  # not "0.0s (0/s)"
    assert last["rate"] is None
    assert " -> ? (duration not known" in cli("history", "--state", any_state).stdout
    assert "nothing it found" not in text
    assert (last["counts_saved"], run["counts_saved"]) == (False, False)

    # The next run finds it gone and puts its leases back (and finishes them): the killed
    # run's row keeps what it held.
    assert cli("run", RECORD, "--source", inbox, "--state", any_state).returncode == 0
    second, first = json.loads(cli("history", "--state", any_state, "--json").stdout)
    assert first["exit_status"] == "killed"
    assert counted(first) == (done + leased, done, leased)
    assert (first["counts_saved"], second["counts_saved"]) == (False, True)
    text = cli("history", "--state", any_state).stdout
    assert shown in text
    assert "the rest not known: no heartbeat saved its counts" in text


def test_a_killed_run_not_found_gone_yet_is_not_said_to_be_still_running(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2000)  # it cannot finish before the kill
    # A heartbeat every 0.75 s: one has saved its counts before the kill.
    log = tmp_path / "calls.log"
    proc = start_recording(inbox, state, log, "--lease", "3", jobs=4, sleep=0.02)
    beats = "SELECT count(*) FROM runners WHERE heartbeat_at > started_at"
    wait_for(lambda: counts(state).get("done", 0) >= 20 and ledger_rows(str(state), beats)[0][0])
    alive = json.loads(cli("history", "--state", state, "--json").stdout)[0]
    assert (alive["exit_status"], alive["runner_alive"]) == (None, True)
    assert "; still running (" in cli("history", "--state", state).stdout
    kill(proc)
    beat = sqlite3.connect(state).execute("SELECT heartbeat_at FROM runners").fetchone()[0]

    # No runner has found it gone yet, but its process is dead: not "still running".
    (run,) = json.loads(cli("history", "--state", state, "--json").stdout)
    assert (run["exit_status"], run["runner_alive"]) == (None, False)
    text = cli("history", "--state", state, env={"COLUMNS": "300"}).stdout
    assert "still running" not in text
    assert "not running: its runner is gone" in text
    assert f"({beat - run['started_at']:.1f}s)" in text  # until its last heartbeat, not now
    shown = cli("status", "--state", state, env={"COLUMNS": "300"}).stdout
    assert "still running" not in shown
    assert "not running: its runner is gone" in shown
    last = json.loads(cli("status", "--state", state, "--json").stdout)["last_run"]
    assert (last["exit_status"], last["runner_alive"]) == (None, False)

    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    _, first = json.loads(cli("history", "--state", state, "--json").stdout)
    assert (first["exit_status"], first["runner_alive"]) == ("killed", None)


async def test_status_of_a_live_watch_counts_what_it_finished(inbox: Path, state: Path) -> None:
    make_files(inbox, 10)
    batch = Batch(handle_nothing, source=inbox, state=state, settle=0, poll=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(30):
            while counts(state).get("done", 0) < 10:  # noqa: ASYNC110 (the ledger's rows)
                await anyio.sleep(0.02)
        shown = await anyio.to_thread.run_sync(lambda: cli("status", "--state", state, "--json"))
        text = await anyio.to_thread.run_sync(
            lambda: cli("status", "--state", state, env={"COLUMNS": "300"})
        )
        batch.stop()
    last = json.loads(shown.stdout)["last_run"]
    assert (last["exit_status"], last["done"], last["seen"]) == (None, 10, 10)
    assert "still running (done, dead and vanished from the ledger" in text.stdout


def test_status_says_what_a_stopped_run_left_in_the_source(inbox: Path, state: Path) -> None:
    make_files(inbox, 30)
    proc = spawn(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "1",
        "--claim-batch",
        "4",
        "--no-progress",
        env={"AB_SLEEP": "0.05"},
    )
    wait_for(lambda: counts(state).get("done", 0) >= 3, timeout=60)
    kill(proc, signal.SIGINT)
    assert proc.returncode == 130
    status = cli("status", "--state", state, env={"COLUMNS": "300"})
    (run,) = json.loads(cli("history", "--state", state, "--json").stdout)
    registered = sum(counts(state).values())
    assert run["unregistered"] == 30 - registered
    assert f"{30 - registered} files not registered yet" in status.stdout
    ahead = inbox / "ahead.csv"  # written by a host whose clock is an hour ahead
    ahead.write_text("from the future")
    os.utime(ahead, (time.time() + 3600,) * 2)
    again = cli("run", RECORD, "--source", inbox, "--state", state)
    assert again.returncode == 0, again.stderr
    assert "30 seen: " in again.stdout
    assert "1 file not settled yet (1 changed at a time ahead of this host's clock)" in (
        again.stdout
    )
    after = cli("status", "--state", state, env={"COLUMNS": "300"}).stdout
    assert "nothing it found" not in after
    assert "1 not settled yet" in after


async def handle_nothing(ctx: TaskContext) -> None:
    """A handler that does nothing."""


def one_dead_file(inbox: Path, state: Path) -> tuple[Path, str, tuple[str | os.PathLike[str], ...]]:
    """Two files, one of them dead after a run: ``(that file, the handler, the run's other
    arguments)``."""
    broken = make_files(inbox, 2)[1]
    broken.write_text("bad row")
    os.utime(broken, (time.time() - 30,) * 2)
    handler = f"{HANDLERS}:fail_on_bad"
    args = ("--source", inbox, "--state", state, "--max-attempts", "1")
    assert cli("run", handler, *args).returncode == 1
    assert counts(state) == {"done": 1, "dead": 1}
    return broken, handler, args


def test_a_dead_file_fixed_in_place_is_a_new_item_and_retry_clears_the_old_one(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    broken, handler, args = one_dead_file(inbox, state)
    broken.write_text("fixed, a longer row")  # fixed in place: a new version, a new item
    retried = cli("retry", "--state", state, "--dead")
    assert retried.returncode == 0, retried.stderr
    assert "1 dead item whose file changed since ('f00001.txt') cleared" in retried.stdout
    log = tmp_path / "calls.log"
    rerun = cli("run", handler, *args, env={"AB_LOG": str(log)})
    assert rerun.returncode == 0, rerun.stderr
    assert invocations(log) == {"f00001.txt": 1}
    assert counts(state) == {"done": 2}  # no vanished row left behind
    assert "forget --vanished" not in cli("status", "--state", state).stdout


def test_retry_by_name_clears_a_dead_version_whose_newer_version_is_done(
    inbox: Path, state: Path
) -> None:
    broken, handler, args = one_dead_file(inbox, state)
    broken.write_text("fixed, a longer row")  # fixed in place, and handled: a new, done item
    assert cli("run", handler, *args).returncode == 0
    assert counts(state) == {"done": 2, "dead": 1}

    # The name names both versions: the dead one is retried as `retry --dead` without names
    # does it (cleared: its file changed since), the done one left alone.
    refused = cli("retry", "--state", state, "f00001.txt")
    assert refused.returncode == 2
    assert "is dead, not failed: nothing to retry; add --dead" in refused.stderr
    retried = cli("retry", "--state", state, "--dead", "f00001.txt")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == (
        "0 failed or dead items put back to pending; 1 dead item whose file changed since "
        "('f00001.txt') cleared: the new version of a file is a new item, which the next run "
        "handles"
    )
    assert counts(state) == {"done": 2}
    done = cli("retry", "--state", state, "--dead", "f00001.txt")
    assert done.returncode == 2
    assert "is done, not failed: nothing to retry" in done.stderr


def test_retry_by_name_puts_back_its_failed_version_and_says_its_dead_one_is_left(
    inbox: Path, state: Path
) -> None:
    (bad,) = make_files(inbox, 1)
    bad.write_text("bad row")
    handler = f"{HANDLERS}:fail_on_bad"
    args = ("--source", inbox, "--state", state, "--no-progress")
    assert cli("run", handler, *args, "--max-attempts", "1").returncode == 1
    bad.write_text("bad row again, a longer one")  # a new version: fails, its retry far off
    runner = spawn("run", handler, *args, "--max-attempts", "3", "--backoff", "3600")
    try:
        wait_for(lambda: counts(state) == {"dead": 1, "failed": 1})
    finally:
        kill(runner, signal.SIGTERM)
    retried = cli("retry", "--state", state, bad.name)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == (
        "1 failed item put back to pending: the next run (or a live watch) handles them; "
        "1 dead item left as it is: add --dead to retry dead items too"
    )
    assert counts(state) == {"dead": 1, "pending": 1}


def test_forget_vanished_clears_the_rows_of_files_gone_before_their_turn(
    inbox: Path, state: Path
) -> None:
    gone = make_files(inbox, 2)[0]
    handler = f"{HANDLERS}:fail_on_bad"
    gone.write_text("bad")
    os.utime(gone, (time.time() - 30,) * 2)
    assert cli("run", handler, "--source", inbox, "--state", state).returncode == 1
    assert cli("retry", "--state", state, "--dead").returncode == 0  # unchanged: put back
    gone.unlink()
    assert cli("run", handler, "--source", inbox, "--state", state).returncode == 0
    assert counts(state) == {"done": 1, "vanished": 1}
    shown = cli("status", "--state", state, env={"COLUMNS": "300"}).stdout
    assert "'asyncbatch forget --vanished' clears their rows" in shown
    forgot = cli("forget", "--vanished", "--state", state, "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert "f00000.txt (was vanished)" in forgot.stdout
    assert counts(state) == {"done": 1}
    again = cli("forget", "--vanished", "--state", state, "--yes")
    assert "no items vanished; nothing forgotten" in again.stdout


def test_retry_of_a_dead_item_moved_away_by_on_dead_says_to_put_its_file_back(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # (It said "put back to pending: the next run handles them"; the next run found the
    # quarantined file gone: vanished.)
    make_files(inbox, 1)
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    args = ("--source", inbox, "--state", state, "--max-attempts", "1")
    moved = cli("run", f"{HANDLERS}:fail_always", *args, "--on-dead", f"move:{quarantine}")
    assert moved.returncode == 1, moved.stderr
    assert [p.name for p in quarantine.iterdir()] == ["f00000.txt"]
    retried = cli("retry", "--state", state, "--dead")
    assert retried.returncode == 0, retried.stderr
    assert "1 of them ('f00000.txt') has no file in the source now" in retried.stdout
    assert "put each back first, or the next run finds it vanished" in retried.stdout


async def test_a_vanished_file_is_counted_vanished_though_its_bytes_are_done_later(
    tmp_path: Path,
) -> None:
    # Identity content: x is deleted while queued (vanished); y, the same bytes, is claimed
    # later under the same key (done, or done before if x's attempt was still in flight).
    # x's count stays: 9 files seen, not 8 ("8 seen: 8 done").
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    state = tmp_path / "state.db"
    base = time.time() - 60
    names = ["a", "x", *(f"f{i}" for i in range(6)), "y"]
    for i, name in enumerate(names):
        path = inbox / f"{name}.txt"
        path.write_bytes(b"same bytes\n" if name in ("x", "y") else f"{name}\n".encode())
        os.utime(path, (base + i, base + i))

    x = (b"x.txt",)

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "a.txt":
            await until(lambda: bool(rows(state, "SELECT 1 FROM items WHERE relpath = ?", x)))
            (inbox / "x.txt").unlink()  # queued behind a: gone before it is opened

    report = await Batch(
        handle,
        source=inbox,
        state=state,
        identity="content",
        settle=0,
        concurrency=1,
        claim_batch=1,
    ).run()
    assert (report.seen, report.done + report.done_before, report.vanished) == (9, 8, 1), report


def twins_inbox(inbox: Path, names: list[str], twins: str) -> None:
    """Files ``NAME.txt`` in ``names``' order (by mtime, a second apart, settled); those in
    ``twins`` with the same bytes (identity content: one item), the others their own."""
    inbox.mkdir(exist_ok=True)
    base = time.time() - 60
    for i, name in enumerate(names):
        path = inbox / f"{name}.txt"
        path.write_bytes(b"same bytes\n" if name in twins else f"{name}\n".encode())
        os.utime(path, (base + i, base + i))


@pytest.mark.parametrize("third", [False, True])
async def test_a_file_counted_done_before_on_its_twins_attempt_is_handled_when_that_vanished(
    tmp_path: Path, any_state: str, third: bool
) -> None:
    # Identity content: y has x's bytes (one item), claimed in x's chunk: counted done before
    # on the strength of x's attempt. x is deleted while queued (vanished): y was then never
    # handled, and the run said "done before" for it, exit 0. A third copy z, claimed in a
    # later chunk, follows whichever attempt of the item is under way (y's, or its own: then
    # y follows it), and the report counts every file once.
    inbox = tmp_path / "inbox"
    names = ["a", "b", "x", "y", "c", "d", "e", "z"] if third else ["a", "b", "x", "y", "c"]
    twins_inbox(inbox, names, "xyz")
    deleted = anyio.Event()
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "a.txt":  # a, b, x, y: one claim, x queued behind a and b
            (inbox / "x.txt").unlink()
            deleted.set()
        elif ctx.entry.relpath == "b.txt":
            await deleted.wait()
        handled.append(ctx.entry.relpath)

    report = await Batch(
        handle,
        source=inbox,
        state=any_state,
        identity="content",
        settle=0,
        concurrency=2,
        claim_batch=4,
    ).run()
    twins = [name for name in handled if name in ("y.txt", "z.txt")]
    assert len(twins) == 1, handled  # one of them handled, the other done before on it
    assert sorted(set(handled) - set(twins)) == [f"{n}.txt" for n in names if n not in "xyz"]
    counts = (report.seen, report.done, report.done_before, report.vanished, report.unfinished)
    assert counts == (len(names), len(names) - 1 - third, third, 1, 0), report
    assert report.ok, report


async def test_a_file_with_the_bytes_of_an_item_waiting_for_its_retry_follows_that_retry(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content: y has x's bytes (one item), claimed well after x, whose first attempt
    # failed: the item waits for its retry (open, not in flight) when y's claim comes. y's
    # record replaced x's among the open items: one file was counted nowhere, and a run
    # with every item done said "1 unfinished" (exit 1).
    inbox = tmp_path / "inbox"
    fillers = [f"f{i:02}" for i in range(30)]
    twins_inbox(inbox, ["a", "x", "b", *fillers, "y"], "xy")
    tries: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath in ("x.txt", "y.txt"):
            tries.append(ctx.entry.relpath)
            if len(tries) == 1:
                raise ValueError("once")

    report = await Batch(
        handle,
        source=inbox,
        state=any_state,
        identity="content",
        settle=0,
        concurrency=1,
        claim_batch=1,
        max_attempts=3,
        backoff=2.0,
    ).run()
    assert len(tries) == 2, tries  # the attempt and its retry: one item
    counts = (report.seen, report.done, report.done_before, report.unfinished, report.waiting)
    assert counts == (34, 33, 1, 0, 0), report
    assert report.ok


async def test_a_file_counted_done_before_on_its_twins_attempt_is_dead_before_when_that_died(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content: y has x's bytes (one item), counted done before on the strength of
    # x's attempt, which fails for good: y is dead before (it was "done before", exit 1 for
    # x alone).
    inbox = tmp_path / "inbox"
    twins_inbox(inbox, ["a", "x", "y", "b"], "xy")
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if ctx.entry.relpath in ("x.txt", "y.txt"):
            raise ValueError("cannot parse these bytes")

    report = await Batch(
        handle,
        source=inbox,
        state=any_state,
        identity="content",
        settle=0,
        concurrency=1,
        claim_batch=4,
        max_attempts=1,
    ).run()
    assert len([name for name in handled if name in ("x.txt", "y.txt")]) == 1, handled
    counts = (report.seen, report.done, report.dead, report.dead_before, report.done_before)
    assert counts == (4, 2, 1, 1, 0), report
    assert not report.ok


def test_retry_dead_looks_at_the_dead_items_a_page_at_a_time(inbox: Path, state: Path) -> None:
    files = make_files(inbox, 7)
    args = ("--source", inbox, "--state", state, "--max-attempts", "1")
    assert cli("run", f"{HANDLERS}:fail_always", *args).returncode == 1
    for path in (files[0], files[3], files[6]):
        path.write_text("fixed in place, a longer row")  # a new version: a new item
    files[5].unlink()
    retried = cli("retry", "--state", state, "--dead", "--page", "2")
    assert retried.returncode == 0, retried.stderr
    assert "4 failed or dead items put back to pending" in retried.stdout
    assert "3 dead items whose file changed since (" in retried.stdout
    assert "1 of them ('f00005.txt') has no file in the source now" in retried.stdout
    assert counts(state) == {"pending": 4}
