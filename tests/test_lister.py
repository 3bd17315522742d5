"""One lister per job: runners sharing a job list its source once, and all of them claim."""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncbatch import Batch, Report, TaskContext
from asyncbatch._ledger import RunEnd, RunTotals, open_ledger
from asyncbatch._ledger.postgres_session import PostgresSession

from .conftest import (
    HANDLERS,
    WARNINGS_FAIL,
    cli,
    invocations,
    kill,
    ledger_rows,
    make_files,
    run_start,
    settled_now,
    spawn,
    until,
    until_settled,
    wait_for,
)
from .postgres import pg_query
from .test_sharing import assert_adds_up, report_counts

RECORD_PID = f"{HANDLERS}:record_pid"


@pytest.fixture(params=["sqlite", "postgres"])
def any_state(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite state file, then a PostgreSQL one in its own schema."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return str(request.getfixturevalue("pg_dsn"))


async def listing_of(state: str) -> Any:
    ledger = await open_ledger(state, create=False)
    try:
        return await ledger.listing("default")
    finally:
        await ledger.close()


async def test_two_shared_runners_list_the_source_once_and_both_handle_files(
    inbox: Path, any_state: str
) -> None:
    make_files(inbox, 400)
    handled: dict[str, list[str]] = {"a": [], "b": []}
    both_started = anyio.Event()

    def handler(name: str) -> Any:
        async def handle(ctx: TaskContext) -> None:
            handled[name].append(ctx.entry.relpath)
            if handled["a"] and handled["b"]:
                both_started.set()
            await both_started.wait()  # neither finishes the job alone

        return handle

    reports: dict[str, Report] = {}

    async def run(name: str) -> None:
        batch = Batch(
            handler(name), source=inbox, state=any_state, settle=0, shared=True, concurrency=4
        )
        reports[name] = await batch.run()

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a")
            tg.start_soon(run, "b")

    every = handled["a"] + handled["b"]
    assert sorted(every) == sorted(set(every))
    assert len(every) == 400
    assert handled["a"]
    assert handled["b"]
    listing = await listing_of(any_state)
    assert (listing.generation, listing.complete, listing.listed_files) == (1, 1, 400)
    for name, report in reports.items():
        assert report.seen == 400, report
        assert report.done == len(handled[name])
        assert report.done_before == 400 - report.done, report
        assert report.ok


async def test_shared_watches_list_once_and_hand_the_role_on_at_a_stop(
    inbox: Path, any_state: str
) -> None:
    handled: list[str] = []
    reached = {20: anyio.Event(), 25: anyio.Event()}

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if len(handled) in reached:
            reached[len(handled)].set()

    first = Batch(handle, source=inbox, state=any_state, settle=0, poll=0.05, shared=True)
    second = Batch(handle, source=inbox, state=any_state, settle=0, poll=0.05, shared=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.watch)
        with anyio.fail_after(30):
            while (await listing_of_or_none(any_state)) is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        tg.start_soon(second.watch)
        make_files(inbox, 20)
        with anyio.fail_after(60):
            await reached[20].wait()
        # One listing for the job, whatever the number of runners: the second never scanned.
        observed = second._observe()
        assert observed is not None
        assert observed.last_scan is None
        assert not observed.lister
        # ... and it is ready all the same once it looked at the role: it has no scan of its
        # own to wait for (it was never ready: "the first scan has not finished yet").
        with anyio.fail_after(30):  # a bound on a hang: its look at the role comes within a lease
            while not second.health().check("scan").ok:  # noqa: ASYNC110 (no event for a look)
                await anyio.sleep(0.02)
        first.stop()  # the lister ends: the other takes the role at once, and watches
        with anyio.fail_after(60):
            while not (await is_lister(any_state, second)):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        make_files(inbox, 5, prefix="late")
        with anyio.fail_after(60):
            await reached[25].wait()
        second.stop()
    assert sorted(handled) == sorted(set(handled))
    assert len(handled) == 25


async def test_a_shared_watch_listens_again_once_its_listening_connection_is_lost(
    inbox: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL wakes a runner waiting for work when a listing registers some (LISTEN): a
    # listening connection that was lost (the server restarted, the backend killed) is made
    # again at its next wait, else its wake-ups would stop for the rest of the watch.
    handled: list[str] = []
    all_handled = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if len(handled) == 10:
            all_handled.set()

    # Every listening connection a session makes sets the events waiting for one.
    made: list[anyio.Event] = []
    listen = PostgresSession.listen

    async def listen_and_tell(self: PostgresSession, *args: Any) -> bool:
        before = self._listener
        listening = await listen(self, *args)
        if self._listener is not before:
            while made:
                made.pop().set()
        return listening

    monkeypatch.setattr(PostgresSession, "listen", listen_and_tell)
    first = Batch(handle, source=inbox, state=pg_dsn, settle=0, poll=0.05, shared=True)
    second = Batch(handle, source=inbox, state=pg_dsn, settle=0, poll=0.05, shared=True)

    def listener() -> Any:
        run = second._run
        state = None if run is None else run._state
        ledger: Any = None if state is None else state.ledger
        return None if ledger is None else ledger._session._listener

    async def listening_anew(than: Any) -> Any:
        """The second runner's listening connection, once it has one other than ``than``."""
        with anyio.fail_after(30):
            while (now := listener()) is None or now is than or now.is_closed():
                made.append(event := anyio.Event())
                await event.wait()
        return now

    async with anyio.create_task_group() as tg:
        tg.start_soon(first.watch)
        with anyio.fail_after(30):
            while (await listing_of_or_none(pg_dsn)) is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        tg.start_soon(second.watch)
        lost = await listening_anew(None)  # it waits for work: it listens
        await pg_query(pg_dsn, "SELECT pg_terminate_backend($1)", lost.get_server_pid())
        await listening_anew(lost)  # within its next wait (a second at most)
        make_files(inbox, 10)
        with anyio.fail_after(60):
            await all_handled.wait()
        first.stop()
        second.stop()
    assert sorted(handled) == sorted(set(handled))


async def test_a_shared_watchs_lister_counts_what_the_others_finished_as_done_before(
    inbox: Path, any_state: str
) -> None:
    # (The lister of a shared watch said "200 seen: 102 done, 98 unfinished", all 200 done.)
    by_other: list[str] = []
    others_share = anyio.Event()

    async def lister_handles(ctx: TaskContext) -> None:
        with anyio.fail_after(30):
            await others_share.wait()  # the other runner handles some meanwhile

    async def other_handles(ctx: TaskContext) -> None:
        by_other.append(ctx.entry.relpath)
        if len(by_other) >= 5:
            others_share.set()

    common: dict[str, Any] = {"source": inbox, "state": any_state, "settle": 0, "poll": 0.05}
    lister = Batch(lister_handles, **common, shared=True, concurrency=1)
    other = Batch(other_handles, **common, shared=True, concurrency=4)
    reports = {}

    async def watch(name: str, batch: Batch) -> None:
        reports[name] = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, "lister", lister)
        with anyio.fail_after(30):
            while (await listing_of_or_none(any_state)) is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        tg.start_soon(watch, "other", other)
        make_files(inbox, 20)
        with anyio.fail_after(60):
            while status_json(any_state)["counts"]["done"] < 20:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        lister.stop()
        other.stop()
    assert len(by_other) >= 5
    mine = reports["lister"]
    assert mine.seen == 20, mine
    assert (mine.done, mine.done_before, mine.unfinished) == (20 - len(by_other), len(by_other), 0)
    assert reports["other"].done == len(by_other)


async def test_a_shared_run_beside_a_shared_watch_ends_once_what_was_there_is_done(
    inbox: Path, any_state: str
) -> None:
    # (A run beside a watch holding the role waited for a listing the watch never made, until
    # it was stopped.) Each full scan of the watch is a listing now: the run goes by the first
    # to begin after it looked at the role, and ends once the files it found are finished.
    make_files(inbox, 30)
    by_watch: list[str] = []
    by_run: list[str] = []
    run_handled = anyio.Event()

    async def watch_handles(ctx: TaskContext) -> None:
        by_watch.append(ctx.entry.relpath)
        with anyio.fail_after(30):
            await run_handled.wait()  # the run finds some of the files left to do

    async def run_handles(ctx: TaskContext) -> None:
        by_run.append(ctx.entry.relpath)
        run_handled.set()

    common: dict[str, Any] = {"source": inbox, "state": any_state, "settle": 0, "shared": True}
    watch = Batch(watch_handles, **common, poll=0.05, concurrency=2)
    run = Batch(run_handles, **common, concurrency=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.watch)
        with anyio.fail_after(30):
            while (await listing_of_or_none(any_state)) is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        listed_before = (await listing_of(any_state)).generation
        with anyio.fail_after(60):  # before: it never ended
            report = await run.run()
        late = await listing_of(any_state)
        watch.stop()
    every = by_watch + by_run
    assert sorted(every) == sorted(set(every)) == sorted(p.name for p in inbox.iterdir())
    assert by_run, "the run found none of the files left to do"
    # Its own work, counted as such: the watch's scans are no count of this run's files.
    assert (report.seen, report.done, report.unfinished) == (len(by_run), len(by_run), 0), report
    assert report.ok
    assert late.complete > listed_before  # it went by a scan that began after it looked
    assert late.started_at is None


async def listing_of_or_none(state: str) -> Any:
    try:
        return await listing_of(state)
    except Exception:  # the ledger is not made yet
        return None


async def is_lister(state: str, batch: Batch) -> bool:
    observed = batch._observe()
    return observed is not None and observed.lister


def status_json(state: str) -> dict[str, Any]:
    result = cli("status", "--state", state, "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def listing_field(state: str, name: str) -> Any:
    """A field of ``status --json``'s listing (``None`` before there is a ledger or one)."""
    try:
        listing = status_json(state)["listing"]
    except AssertionError:  # no ledger yet
        return None
    return None if listing is None else listing[name]


def host_of(recorded: str | None) -> str | None:
    """The hostname of a runner's recorded host (``NAME/pidns:INODE`` in a pid namespace)."""
    return None if recorded is None else recorded.split("/", 1)[0]


def lister_pid(state: str) -> int | None:
    pid: int | None = listing_field(state, "pid")
    return pid


def test_a_killed_listers_role_is_taken_over_within_about_a_lease(
    inbox: Path, any_state: str, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    args = (
        "run",
        RECORD_PID,
        "--source",
        inbox,
        "--state",
        any_state,
        "--shared",
        "--watch",
        "--poll",
        "0.2",
        "--lease",
        "3",
        "--no-progress",
    )
    env = {"AB_LOG": str(log)}
    runners = {}
    first = spawn(*args, env=env)
    wait_for(lambda: lister_pid(any_state) is not None, timeout=60)
    second = spawn(*args, env=env)
    runners = {first.pid: first, second.pid: second}
    try:
        make_files(inbox, 10)
        # Every one committed before the kill (one in flight then would be run again).
        wait_for(lambda: status_json(any_state)["counts"]["done"] == 10, timeout=60)
        lister = lister_pid(any_state)
        assert lister in runners
        kill(runners[lister], signal.SIGKILL)
        survivor = next(p for pid, p in runners.items() if pid != lister)
        wait_for(lambda: lister_pid(any_state) == survivor.pid, timeout=30)
        make_files(inbox, 5, prefix="late")
        wait_for(lambda: len(invocations(log)) >= 15, timeout=60)
        assert status_json(any_state)["listing"]["pid"] == survivor.pid
    finally:
        for proc in runners.values():
            if proc.poll() is None:
                kill(proc, signal.SIGINT)
    calls = invocations(log)
    files = [line.split(" ", 1)[1] for line in calls]
    assert sorted(files) == sorted(set(files))
    assert len(files) == 15


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for separate UTS and pid namespaces",
)
def test_three_hosts_share_a_job_and_the_listers_host_dies(
    inbox: Path, tmp_path: Path, pg_dsn: str
) -> None:
    # Three runners, each on its own "host" (its hostname and pid namespace), share a job on
    # PostgreSQL; the host that lists is killed: the others take the role over, list again,
    # and finish the job, every file once but those in flight on the dead host.
    files = 600  # about 5 s of work for the three: the kill comes well before the end
    make_files(inbox, files)
    log = tmp_path / "calls.log"

    def host(name: str) -> subprocess.Popen[str]:
        command = (
            f"hostname {name} && exec '{sys.executable}' -m asyncbatch run '{RECORD_PID}' "
            f"--source '{inbox}' --state '{pg_dsn}' --shared -j 4 --lease 5 --no-progress "
            "--settle 0"
        )
        return subprocess.Popen(
            ["unshare", "--uts", "--pid", "--fork", "--kill-child", "sh", "-c", command],
            env={**os.environ, **WARNINGS_FAIL, "AB_LOG": str(log), "AB_SLEEP": "0.1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    hosts = {name: host(name) for name in ("host-a", "host-b", "host-c")}
    try:
        wait_for(lambda: host_of(listing_field(pg_dsn, "host")) in hosts, 60)
        wait_for(lambda: len(invocations(log)) >= 60, timeout=60)
        shown = status_json(pg_dsn)
        lister = str(host_of(shown["listing"]["host"]))
        assert lister in hosts, (shown["listing"], shown["shared_runners"])
        hosts[lister].send_signal(signal.SIGKILL)  # --kill-child SIGKILLs its runner too
        hosts[lister].communicate(timeout=30)
        started = time.monotonic()
        results = {
            name: proc.communicate(timeout=180) for name, proc in hosts.items() if name != lister
        }
        took = time.monotonic() - started
    finally:
        for proc in hosts.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    for name, (_, err) in results.items():
        assert hosts[name].returncode == 0, (name, err)
    status = status_json(pg_dsn)
    assert status["counts"]["done"] == files
    assert status["listing"]["host"] is None  # the survivors ended: nobody holds it
    assert status["listing"]["complete"] >= 1
    calls = collections.Counter(line.split(" ", 1)[1] for line in invocations(log))
    assert set(calls) == {p.name for p in inbox.iterdir()}
    assert sum(calls.values()) - files <= 2 * 4  # only what the dead host had in flight
    assert took < 120


async def test_a_shared_run_started_after_a_listing_lists_again_what_settled_since(
    inbox: Path, any_state: str
) -> None:
    # (Runner A, slow, went by its listing of 6 files; 50 more were added and settled; B,
    # started then, went by A's old listing: "6 seen: 0 done, 6 done before", exit 0, the 50
    # files in no count of either report.) B takes the role over from A, done listing, and
    # lists again: the files settled when it started are seen, and handled.
    make_files(inbox, 6, prefix="old")
    two = HeldAndFree("a", "b")
    handled, reports = two.handled, two.reports
    common: dict[str, Any] = {"source": inbox, "state": any_state, "settle": 0, "shared": True}

    async with anyio.create_task_group() as tg:
        tg.start_soon(two.run, "a", Batch(two.held, **common, concurrency=1))
        with anyio.fail_after(30):
            await two.busy.wait()  # A listed (its listing is complete) and works on a file
        assert (await listing_of(any_state)).complete == 1
        make_files(inbox, 50, prefix="new")
        tg.start_soon(two.run, "b", Batch(two.free, **common, concurrency=4))
        # B lists again (before: it went by A's listing, and waited for A's file): a second
        # listing, which finds every file there.
        await until(lambda: listed_twice(any_state), within=60)
        two.release.set()
    every = handled["a"] + handled["b"]
    assert sorted(every) == sorted(set(every)) == sorted(p.name for p in inbox.iterdir())
    listing = await listing_of(any_state)
    assert (listing.generation, listing.complete, listing.listed_files) == (2, 2, 56)
    for name, report in reports.items():
        # Both go by B's listing (A's moved on to it): 56 seen, each file in one category.
        assert report.seen == 56, (name, report)
        assert report.done == len(handled[name]), (name, report)
        assert report.done + report.done_before == 56, (name, report)
        assert report.ok, (name, report)


class HeldAndFree:
    """The handlers of two shared runners: :meth:`held` records each file and holds it
    (:attr:`busy` set) until :attr:`release`; :meth:`free` records each file. :meth:`run`
    keeps each runner's report by name."""

    def __init__(self, held: str, free: str) -> None:
        self.names = held, free
        self.handled: dict[str, list[str]] = {held: [], free: []}
        self.reports: dict[str, Report] = {}
        self.busy, self.release = anyio.Event(), anyio.Event()

    async def held(self, ctx: TaskContext) -> None:
        self.handled[self.names[0]].append(ctx.entry.relpath)
        self.busy.set()
        with anyio.fail_after(60):
            await self.release.wait()

    async def free(self, ctx: TaskContext) -> None:
        self.handled[self.names[1]].append(ctx.entry.relpath)

    async def run(self, name: str, batch: Batch) -> None:
        self.reports[name] = await batch.run()


async def listed_twice(state: str) -> bool:
    return bool((await listing_of(state)).complete >= 2)


async def listing_by(ledger: Any, inbox: Path, *owners: str, end: bool = True) -> Any:
    """Live runner records of ``owners`` (default ``a``) for a shared job over ``inbox``; the
    first takes the listing role and begins a listing of nothing, ended if ``end``. Returns
    the role as taken."""
    owners = owners or ("a",)
    for owner in owners:
        await ledger.start_runner(
            run_start(owner, job="default", shared=True, source=str(inbox), ttl=600)
        )
    role = await ledger.take_listing("default", owners[0], 600)
    assert await ledger.begin_listing("default", owners[0], role.fence)
    if end:
        assert await ledger.end_listing("default", owners[0], role.fence, 0)
    return role


async def lister_ends(ledger: Any, owner: str) -> None:
    """The runner record ``owner``, which holds the listing role, ends (stopped): the role is
    free (its lease_until NULL)."""
    end = RunEnd(
        job="default",
        owner=owner,
        holds_lock=False,
        run_id=0,
        totals=RunTotals(),
        exit_status="stopped",
        lister=True,
    )
    await ledger.release_runner(end)


async def test_a_shared_run_takes_the_role_from_a_live_holder_done_with_an_older_listing(
    inbox: Path, any_state: str
) -> None:
    # (Runner A listed 0 files, none settled yet, and was SIGSTOPped; B, started with 300
    # settled files in the inbox, ended at once: "0 seen", exit 0.) Here A is a live runner
    # record holding the role, its listing of nothing complete: B takes the role over at once
    # (no lease to wait out) and lists what is there now.
    ledger = await open_ledger(any_state)
    try:
        await listing_by(ledger, inbox)
    finally:
        await ledger.close()
    make_files(inbox, 30)
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

    batch = Batch(handle, source=inbox, state=any_state, settle=0, shared=True)
    with anyio.fail_after(60):
        report = await batch.run()
    assert (report.seen, report.done, report.ok) == (30, 30, True), report
    assert sorted(handled) == sorted(p.name for p in inbox.iterdir())
    listing = await listing_of(any_state)
    assert (listing.generation, listing.complete, listing.listed_files) == (2, 2, 30)
    assert listing.fence == 2  # taken over from a, which held it


async def test_a_shared_run_started_during_a_listing_goes_by_the_next_one(
    inbox: Path, any_state: str
) -> None:
    # A listing under way that began before a run started may have passed files that settled
    # since: the run goes by the next listing (made once the holder is done with that one),
    # not by it. One that began after the run started it goes by (runners started together
    # share one listing: see the first test).
    ledger = await open_ledger(any_state)
    try:
        role = await listing_by(ledger, inbox, end=False)
        make_files(inbox, 10)
        handled: list[str] = []

        async def handle(ctx: TaskContext) -> None:
            handled.append(ctx.entry.relpath)

        batch = Batch(handle, source=inbox, state=any_state, settle=0, shared=True)
        reports: list[Report] = []

        async def run() -> None:
            reports.append(await batch.run())

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await until(lambda: batch._observe() is not None and target_of(batch) is not None)
            assert target_of(batch) == 2  # not a's listing under way (#1)
            # a's listing ends, having found none of the files (it passed them before).
            assert await ledger.end_listing("default", "a", role.fence, 0)
    finally:
        await ledger.close()
    (report,) = reports
    assert (report.seen, report.done, report.ok) == (10, 10, True), report
    assert len(handled) == 10


def target_of(batch: Batch) -> int | None:
    run = batch._run
    state = None if run is None else run._state
    return None if state is None else state.listing_target


async def test_a_shared_run_takes_the_role_from_a_holder_that_took_it_with_nothing_to_list(
    inbox: Path, any_state: str
) -> None:
    # (Runner D went by listing #1; #1's holder ended (SIGTERM) and gave the role up; D took
    # the free role and did not list (its listing was complete). Its tenure began after #1
    # did, and a run E started later neither took the role over nor got a listing: E's new
    # files waited until D ended.) Here a lists #1 and ends, d (a live runner record) takes the
    # free role without listing: the run takes it over once d is past the grace a holder about
    # to list has (d, just after its take, is not taken over), and lists what is there now.
    ledger = await open_ledger(any_state)
    try:
        await listing_by(ledger, inbox, "a", "d")
        await lister_ends(ledger, "a")  # a ended: the role is free (lease_until NULL)
        taken = await ledger.take_listing("default", "d", 600)
        assert (taken.owner, taken.fence, taken.generation, taken.complete) == ("d", 2, 1, 1)
        assert taken.started_at is not None
        assert taken.since is not None
        assert taken.since > taken.started_at  # d took it after #1 began, and has not listed
        # Right after its take, d may be about to list: a run started since does not take the
        # role from it (one lister per job).
        later = await ledger.take_listing("default", "e", 600, fresh_since=taken.since)
        assert (later.owner, later.fence) == ("d", 2)
    finally:
        await ledger.close()
    make_files(inbox, 20)
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

    batch = Batch(handle, source=inbox, state=any_state, settle=0, shared=True)
    with anyio.fail_after(45):  # before: it waited for d to end (its lease: 600 s)
        report = await batch.run()
    assert (report.seen, report.done, report.ok) == (20, 20, True), report
    assert sorted(handled) == sorted(p.name for p in inbox.iterdir())
    listing = await listing_of(any_state)
    assert (listing.generation, listing.complete, listing.listed_files) == (2, 2, 20)
    assert listing.fence == 3  # taken over from d, which held it


async def test_a_holder_idle_in_a_tenure_it_took_hands_the_role_over_without_a_warning(
    inbox: Path, any_state: str, caplog: pytest.LogCaptureFixture
) -> None:
    # D lists #1 and works on a file; x, a run started after #1 began, takes the role over and
    # ends without listing (giving it up): D takes the free role back, with nothing to list.
    # A run E started then takes it from D (which is not about to list) and lists E's files:
    # D says so as a hand-over (info), not as a role lost for late heartbeats.
    caplog.set_level(logging.INFO, logger="asyncbatch")
    make_files(inbox, 1, prefix="old")
    two = HeldAndFree("d", "e")
    handled, reports = two.handled, two.reports
    common: dict[str, Any] = {"source": inbox, "state": any_state, "settle": 0, "shared": True}
    d = Batch(two.held, **common, concurrency=1, lease=3)

    async with anyio.create_task_group() as tg:
        tg.start_soon(two.run, "d", d)
        with anyio.fail_after(30):
            await two.busy.wait()
        ledger = await open_ledger(any_state)
        try:
            await ledger.start_runner(
                run_start("x", job="default", shared=True, source=str(inbox), ttl=600)
            )
            listed = await ledger.listing("default")
            assert listed is not None
            assert listed.started_at is not None
            x = await ledger.take_listing("default", "x", 600, fresh_since=listed.started_at + 1)
            assert (x.owner, x.fence) == ("x", 2)
            await lister_ends(ledger, "x")
        finally:
            await ledger.close()
        await until(lambda: holder_is(any_state, fence=3), within=30)  # D took it back
        # ... idle (it goes by #1): its heartbeat, finding the role gone, says a hand-over.
        await until(lambda: idle_holder(d), within=30)
        make_files(inbox, 5, prefix="new")
        tg.start_soon(two.run, "e", Batch(two.free, **common))
        await until(lambda: listed_twice(any_state), within=45)  # before: not until D ended
        two.release.set()
    assert sorted(handled["d"] + handled["e"]) == sorted(p.name for p in inbox.iterdir())
    assert all(report.ok for report in reports.values()), reports
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "was it suspended" in m], said
    handed = [m for m in said if "went to a runner started after the last listing" in m]
    assert handed, said  # to E (to x too, if D's heartbeat came before D took it back)


async def holder_is(state: str, *, fence: int) -> bool:
    role = await listing_of(state)
    return bool(role.fence == fence and role.lease_until is not None)


def idle_holder(batch: Batch) -> bool:
    run = batch._run
    state = None if run is None else run._state
    return state is not None and state.lister_fence == 3 and state.lister_idle


async def test_a_run_that_goes_by_a_later_listing_does_not_count_its_own_unsettled_files(
    inbox: Path, any_state: str
) -> None:
    # A lists 5 settled files and 3 not settled yet; B, started once those settled, lists
    # again (A's listing began before B started) and finds all 8. A goes by B's listing: the 3
    # are among its seen (done before, or done), not also "3 files not settled yet" (A said
    # "8 seen: ...; 3 files not settled yet" of an 8-file inbox).
    settle = 0.5
    make_files(inbox, 5)
    await until_settled(settle, *inbox.iterdir())
    for i in range(3):
        (inbox / f"new{i}.txt").write_text(f"new {i}\n")
    gate = anyio.Event()

    async def slow(ctx: TaskContext) -> None:
        await gate.wait()

    async def quick(ctx: TaskContext) -> None:
        pass

    reports: dict[str, Report] = {}

    async def run(name: str, handler: Any) -> None:
        batch = Batch(handler, source=inbox, state=any_state, settle=settle, shared=True)
        reports[name] = await batch.run()

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a", slow)
            await until(lambda: listed(any_state, 1))
            await until_settled(settle, *inbox.iterdir())
            tg.start_soon(run, "b", quick)
            await until(lambda: listed(any_state, 2))
            gate.set()
    a, b = reports["a"], reports["b"]
    assert (a.seen, b.seen) == (8, 8), reports
    assert a.unsettled == 0, a  # the 3 are seen: counted once
    assert a.seen == a.seen_accounted() + a.unfinished, a
    assert a.done + b.done == 8, reports


async def listed(state: str, complete: int) -> bool:
    listing = await listing_of_or_none(state)
    return listing is not None and listing.complete >= complete


def took_up_the_listing(batch: Batch) -> bool:
    """Whether the shared ``batch``, running, counts a complete listing (its own or another's)."""
    stats = batch.statistics()
    return stats is not None and stats.scanned


def unsettled_gauge(batch: Batch) -> float | None:
    """The batch's ``/metrics`` gauge of files not settled yet (``None``: not running)."""
    if batch._observe() is None:
        return None
    text = prometheus_client.generate_latest(batch.metrics_registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "asyncbatch_files_unsettled":
                return float(sample.value)
    return None


async def test_every_runner_that_goes_by_a_listing_reports_the_files_it_found_not_ready(
    inbox: Path, any_state: str
) -> None:
    # Two runners started together go by one listing. It finds 5 files ready, 3 not settled
    # yet (changed at a time ahead of the clock: they stay so while the test runs) and 1
    # smaller than min-size. The runner that did not list said nothing of the 4: its report,
    # its history row (what `status` says the last run left in the source) and its /metrics
    # gauge claimed an inbox of 5 files; only the lister's said "3 files not settled yet".
    make_files(inbox, 5)
    ahead = time.time() + 3600
    for i in range(3):
        path = inbox / f"ahead{i}.txt"
        path.write_text(f"ahead {i}\n")
        os.utime(path, (ahead, ahead))
    (inbox / "small.txt").write_bytes(b"x")
    os.utime(inbox / "small.txt", (time.time() - 30,) * 2)
    gate = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        await gate.wait()

    batches = {
        name: Batch(
            handle,
            source=inbox,
            state=any_state,
            settle=0,
            shared=True,
            ready=["age", "min-size:4"],
            metrics=True,
        )
        for name in ("a", "b")
    }
    reports: dict[str, Report] = {}

    async def run(name: str) -> None:
        reports[name] = await batches[name].run()

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            for name in batches:
                tg.start_soon(run, name)
            # Under way, once each took the listing up, its live counts (its heartbeat's,
            # /metrics) count them.
            await until(lambda: all(took_up_the_listing(b) for b in batches.values()))
            gauges = {name: unsettled_gauge(b) for name, b in batches.items()}
            gate.set()
    assert gauges == {"a": 3, "b": 3}
    listing = await listing_of(any_state)
    assert (listing.generation, listing.complete, listing.listed_files) == (1, 1, 5)
    for report in reports.values():
        assert report.seen == 5, reports
        assert (report.unsettled, report.future, report.too_small) == (3, 3, 1), reports
        assert "3 files not settled yet (3 changed at a time ahead" in str(report), report
    assert sum(report.done for report in reports.values()) == 5, reports
    ledger = await open_ledger(any_state, create=False)
    try:
        runs = await ledger.runs("default")
    finally:
        await ledger.close()
    assert [(r.totals.unsettled, r.totals.too_small) for r in runs] == [(3, 1), (3, 1)], runs
    status = cli("status", "--state", any_state, env={"COLUMNS": "300"})
    assert "3 not settled yet (taken once they settle)" in status.stdout, status.stdout


def test_a_lister_suspended_mid_listing_past_its_lease_stops_listing_once_it_resumes(
    inbox: Path, any_state: str, tmp_path: Path
) -> None:
    # A lists the job and is held mid-listing (its files registered, its listing not ended:
    # the failpoint), then SIGSTOPped past its lease; B, busy with files of A's listing (so it
    # does not reap A's runner record meanwhile), takes the role over and lists again. A,
    # resumed, finds its role gone at its first heartbeat: it says so (a warning: its
    # heartbeats came late, not a hand-over), stops listing, and both end with every file
    # done once.
    files = 12
    make_files(inbox, files)
    calls = tmp_path / "calls.log"
    gates = {name: tmp_path / f"gate-{name}" for name in ("a", "b")}
    for gate in gates.values():
        os.mkfifo(gate)
    common = (
        *("--source", inbox, "--state", any_state, "--shared", "--lease", "3"),
        *("--log-level", "INFO"),  # a hand-over is said at INFO, and so is a listing's end
    )
    a = spawn_logged(
        tmp_path / "a",
        "run",
        f"{HANDLERS}:record",
        *common,
        "-j",
        "1",
        env={
            "AB_LOG": str(calls),
            "AB_GATE": str(gates["a"]),
            "ASYNCBATCH_FAILPOINTS": "listing-registered=sleep(600)",
        },
    )
    procs = [a]
    held: list[int] = []  # the gates the test holds open (for writing): open for the runners
    try:
        # A holds the role, its listing #1 registered (queued) and not ended; what it takes
        # waits at its gate.
        wait_for(lambda: listers(any_state)[1:] == (1, 1, 0, files), timeout=60)
        b = spawn_logged(
            tmp_path / "b",
            "run",
            f"{HANDLERS}:record",
            *common,
            "-j",
            "4",
            env={"AB_LOG": str(calls), "AB_GATE": str(gates["b"])},
        )
        procs.append(b)
        # B took what A left queued: every file is leased, some of them to B.
        wait_for(lambda: queued_files(any_state) == 0 and running_by(any_state, b.pid) > 0, 60)
        held.append(os.open(gates["a"], os.O_RDWR))  # A handles its files, and has none left
        wait_for(lambda: running_by(any_state, a.pid) == 0, timeout=60)
        assert len(invocations(calls)) == files - running_by(any_state, b.pid)
        a_owner = owner_of(any_state, a.pid)
        suspend(a, any_state)
        # ... mid-listing: its listing #1 is not complete, it holds the role.
        assert listers(any_state) == (a_owner, 1, 1, 0, files)
        b_owner = owner_of(any_state, b.pid)
        # Past A's lease B takes the role over (B has files in flight: it reaps no runner
        # record meanwhile) and lists the job again.
        wait_for(lambda: listers(any_state)[:4] == (b_owner, 2, 2, 2), timeout=60)
        a.send_signal(signal.SIGCONT)
        wait_for(lambda: "the listing role of job" in a.err_text(), timeout=60)
        held.append(os.open(gates["b"], os.O_RDWR))
        results = {p.pid: p.finish(timeout=120) for p in (a, b)}
    finally:
        for proc in procs:
            proc.stop()
        for fd in held:
            os.close(fd)
    for pid, (code, out, err) in results.items():
        name = "a" if pid == a.pid else "b"
        assert code == 0, (name, out, err)
        assert "Traceback" not in err, (name, err)
        counts = assert_adds_up(out)
        assert report_counts(out)[0] == files, (name, out)
        assert set(counts) <= {"done", "done before"}, (name, out)
    a_err = results[a.pid][2]
    late = [line for line in a_err.splitlines() if "was taken over by another runner" in line]
    assert len(late) == 1, a_err  # said once: it stopped listing, its role given up
    assert "heartbeats came late: was it suspended?" in late[0], a_err
    assert "went to a runner started after the last listing began" not in a_err, a_err
    assert "listed" not in a_err, a_err  # its listing #1 never ended: B's #2 is the job's
    assert f"listed {files} files for the runners" in results[b.pid][2], results[b.pid][2]
    calls_made = invocations(calls)
    assert set(calls_made) == {p.name for p in inbox.iterdir()}
    assert max(calls_made.values()) == 1, calls_made
    done = {pid: report_counts(out)[1].get("done", 0) for pid, (_, out, _) in results.items()}
    assert sum(done.values()) == files, results
    history = ledger_rows(any_state, "SELECT pid, done, exit_status FROM runs")
    assert sorted(history) == sorted((pid, n, "ok") for pid, n in done.items()), history
    shown = status_json(any_state)
    assert {k: v for k, v in shown["counts"].items() if v} == {"done": files}, shown
    listing = shown["listing"]
    assert (listing["generation"], listing["complete"]) == (2, 2), listing


class Logged:
    """A CLI spawned with its output in files: what it said so far can be read while it
    runs (a pipe is read only once it ends)."""

    def __init__(self, base: Path, args: tuple[Any, ...], env: dict[str, str]) -> None:
        self.out_path, self.err_path = base.with_suffix(".out"), base.with_suffix(".err")
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "asyncbatch", *settled_now(args)],
                env={**os.environ, **WARNINGS_FAIL, **env},
                stdout=out,
                stderr=err,
                text=True,
            )
        self.pid = self.proc.pid

    def err_text(self) -> str:
        return self.err_path.read_text()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.out_path.read_text(), self.err_text()

    def stop(self) -> None:
        """End it (a test that failed half-way: SIGCONT too, in case it is stopped)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=60)


def spawn_logged(base: Path, *args: Any, env: dict[str, str]) -> Logged:
    return Logged(base, (*args, "--no-progress"), env)


def listers(state: str) -> tuple[Any, ...]:
    """The job's listing role: ``(owner, fence, generation, complete, registered)``
    (``None``s and 0s before a runner made the ledger and took the role)."""
    try:
        found = ledger_rows(
            state,
            "SELECT owner, fence, generation, complete, registered FROM listers"
            " WHERE job = 'default'",
        )
    except Exception:  # no ledger yet
        return (None, 0, 0, 0, 0)
    return tuple(found[0]) if found else (None, 0, 0, 0, 0)


def queued_files(state: str) -> int:
    """Files a listing queued that no runner took yet."""
    (found,) = ledger_rows(state, "SELECT coalesce(sum(files), 0) FROM queued")
    return int(found[0])


def owner_of(state: str, pid: int) -> str:
    (found,) = ledger_rows(state, f"SELECT owner FROM runners WHERE pid = {pid}")
    return str(found[0])


def running_by(state: str, pid: int) -> int:
    """Items leased to the runner of process ``pid`` (0 before it has a runner record)."""
    (found,) = ledger_rows(
        state,
        "SELECT count(*) FROM items JOIN runners ON items.owner = runners.owner"
        f" WHERE items.state = 'running' AND runners.pid = {pid}",
    )
    return int(found[0])


def suspend(runner: Logged, state: str) -> None:
    """SIGSTOP ``runner``, outside a transaction of its SQLite ledger: a runner frozen inside
    one holds the write lock, and no other runner can write until it resumes (on PostgreSQL
    the server ends such a transaction after 15 s: the others go on)."""
    while True:
        runner.send_signal(signal.SIGSTOP)
        wait_for(lambda: process_state(runner.pid) == "T", timeout=30)
        if state.startswith("postgresql://") or not holds_write_lock(Path(state)):
            return
        runner.send_signal(signal.SIGCONT)  # caught mid-transaction: let it end it, again
        wait_for(lambda: not holds_write_lock(Path(state)), timeout=30)


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def holds_write_lock(state: Path) -> bool:
    """Whether a process holds the SQLite state's write lock past 5 s (a runner's transaction
    takes milliseconds: one frozen inside it holds it)."""
    db = sqlite3.connect(state, timeout=5, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as e:
        if "locked" not in str(e):
            raise
        return True
    finally:
        db.close()
