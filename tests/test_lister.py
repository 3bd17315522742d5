"""One lister per job: runners sharing a job list its source once, and all of them claim."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncbatch import Batch, Report, TaskContext
from asyncbatch._ledger import open_ledger

from .conftest import (
    HANDLERS,
    cli,
    invocations,
    kill,
    make_files,
    spawn,
    wait_for,
)

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

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

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
            while len(handled) < 20:  # noqa: ASYNC110 (handled files, not an event)
                await anyio.sleep(0.02)
        first.stop()  # the lister ends: the other takes the role at once, and watches
        with anyio.fail_after(60):
            while not (await is_lister(any_state, second)):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        make_files(inbox, 5, prefix="late")
        with anyio.fail_after(60):
            while len(handled) < 25:  # noqa: ASYNC110 (handled files, not an event)
                await anyio.sleep(0.02)
        second.stop()
    assert sorted(handled) == sorted(set(handled))
    assert len(handled) == 25


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


def lister_pid(state: str) -> int | None:
    try:
        listing = status_json(state)["listing"]
    except AssertionError:
        return None
    return None if listing is None else listing["pid"]


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
