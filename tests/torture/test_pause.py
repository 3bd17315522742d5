"""A runner paused past its lease (SIGSTOP, a blocked event loop) and resumed (SIGCONT) records
nothing and overwrites nothing of the runner that took its items over.

What is fenced: the ledger row always (owner and fence); ``ctx.write_output`` and ``ctx.move``
check the item's local lease deadline before they start and just before they become visible,
and once it passed ask the ledger: a lease taken over (or not renewed in time) is refused
(:class:`LockLostError`, nothing written or moved), one that nobody took over is renewed and
the effect made. What is not: an effect already past its last check when the pause began,
and HTTP calls (the receiver's idempotency key covers those). See
asyncbatch/docs/RELIABILITY.md.

Over an ``s3://`` inbox with ``s3://`` outputs the same holds of the ``PUT``s: the output
prefix is in a versioned bucket, so every ``PUT`` leaves a version, and the versions the paused
runner made after it resumed are counted (none: its lease had run out).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from asyncbatch import Batch, LockLostError, TaskContext
from asyncbatch import _failpoints as failpoints
from asyncbatch._ledger.types import CATEGORIES

from ..conftest import make_files, spawn, take_over_lease, wait_for
from ..s3 import Bucket
from .handlers import output_name
from .harness import HANDLERS, create_ledger_with_audit, query, record_figures

LEASE = 3.0  # the shortest lease asyncbatch accepts; its local deadline is 2.7 s


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@dataclass
class Pause:
    """What happened to a runner paused past its lease while another took its items over."""

    names: list[str]
    #: The item whose handler was paused; each done item -> the pid that completed it.
    at_pause: str
    done: dict[str, str]
    outputs: dict[str, str]
    paused_pid: int
    taker_pid: int
    paused_exit: int
    paused_err: str
    late_writes: list[str]
    started_after_resume: list[str]
    completions: list[int]
    #: The paused runner's history row: each count of the report by name.
    paused_run: dict[str, int]

    @property
    def lost_lines(self) -> list[str]:
        return [w for w in self.paused_err.splitlines() if "taken over" in w or "ran out" in w]


def pause_and_take_over(state: str, tmp_path: Path, bucket: Bucket | None = None) -> Pause:
    """SIGSTOP a ``--shared`` runner in a handler, past its lease; let another runner take its
    items over and finish; SIGCONT the first; collect what each did. With ``bucket``, the
    inbox is ``s3://BUCKET/in/`` and the outputs go to ``s3://BUCKET/out/`` (versioned)."""
    names = [f"f{i:05d}.txt" for i in range(6)]
    created = tmp_path / "inbox", tmp_path / "out"
    if bucket is None:
        source, out = created
        make_files(source, 6)
        out.mkdir()
    else:
        bucket.client.put_bucket_versioning(
            Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
        )
        for name in names:
            bucket.put(f"in/{name}", name.encode())
    create_ledger_with_audit(state)
    started, wrote = tmp_path / "started.log", tmp_path / "wrote.log"
    args = (
        "run",
        f"{HANDLERS}:stamp_after_block",
        "--source",
        created[0] if bucket is None else bucket.url("in/"),
        "--state",
        state,
        "--output-dir",
        created[1] if bucket is None else bucket.url("out/"),
        "--shared",
        "-j",
        "2",
        "--lease",
        str(LEASE),
        "--no-progress",
    )
    env = {"AB_LOG": str(started), "AB_WROTE": str(wrote), **(bucket.env if bucket else {})}
    paused = spawn(*args, env={**env, "AB_BLOCK": "1.0"})
    puts_before_resume: Counter[tuple[str, bytes]] = Counter()
    try:
        # Its handlers block the event loop one after the other: the second is inside its
        # blocking sleep (the first one wrote, and may have committed, before it). Over a
        # bucket the first one's PUT is awaited: its object is there before the pause.
        wait_for(lambda: len(lines(started)) >= 2 and _first_written(bucket, started), 60)
        paused.send_signal(signal.SIGSTOP)
        started_before_pause = len(lines(started))
        at_pause = lines(started)[-1].split(" ", 1)[1]
        wrote_before_pause = len(lines(wrote))
        time.sleep(LEASE + 1.0)  # its leases and its runner record expire meanwhile
        taker = spawn(*args, env={**env, "AB_BLOCK": "0"})
        _, taker_err = taker.communicate(timeout=120)
        assert taker.returncode == 0, taker_err
        if bucket is not None:
            puts_before_resume = Counter(bucket.versions("out/"))
    finally:
        paused.send_signal(signal.SIGCONT)
    _, paused_err = paused.communicate(timeout=60)

    pid_of = {str(owner): str(pid) for owner, pid in query(state, "SELECT owner, pid FROM runs")}
    totals = ("seen", *CATEGORIES)
    (paused_row,) = query(state, f"SELECT {', '.join(totals)} FROM runs WHERE pid = {paused.pid}")
    mine = f"{paused.pid} "
    if bucket is None:
        outputs = {n: (created[1] / output_name(n)).read_text().strip() for n in names}
        late = [w for w in lines(wrote)[wrote_before_pause:] if w.startswith(mine)]
    else:
        outputs = {n: (bucket.get(f"out/{output_name(n)}") or b"").decode().strip() for n in names}
        # Every PUT the paused runner made after it resumed (its lease had run out by then).
        late = [
            f"{body.decode().strip()} {key}"
            for key, body in (Counter(bucket.versions("out/")) - puts_before_resume).elements()
            if body.decode().strip() == str(paused.pid)
        ]
    return Pause(
        names=names,
        at_pause=at_pause,
        done={
            bytes(relpath).decode(): pid_of[str(owner)]
            for relpath, owner in query(
                state, "SELECT relpath, owner FROM items WHERE state = 'done'"
            )
        },
        outputs=outputs,
        paused_pid=paused.pid,
        taker_pid=taker.pid,
        paused_exit=paused.returncode,
        paused_err=paused_err,
        late_writes=late,
        started_after_resume=[
            w for w in lines(started)[started_before_pause:] if w.startswith(mine)
        ],
        completions=sorted(
            n for _, n in query(state, "SELECT key, count(*) FROM torture_completions GROUP BY key")
        ),
        paused_run=dict(zip(totals, map(int, paused_row), strict=True)),
    )


def _first_written(bucket: Bucket | None, started: Path) -> bool:
    """Over a bucket: whether the output of the first item started is there (its ``PUT``
    done); over a directory: true (the first handler wrote before the second began)."""
    if bucket is None:
        return True
    first = lines(started)[0].split(" ", 1)[1]
    return bucket.get(f"out/{output_name(first)}") is not None


@pytest.fixture(scope="module")
def sqlite_pause(tmp_path_factory: pytest.TempPathFactory) -> Pause:
    """One pause on SQLite, for the tests of what it did and of what it should not have."""
    root = tmp_path_factory.mktemp("pause")
    return pause_and_take_over(str(root / "state.db"), root)


@pytest.mark.parametrize("source", ["dir", "s3"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_runner_resumed_after_its_items_were_taken_over_records_and_overwrites_nothing(
    backend: str, source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite" and source == "dir":
        found: Pause = request.getfixturevalue("sqlite_pause")
    else:
        state = (
            str(tmp_path / "state.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
        )
        bucket = request.getfixturevalue("bucket") if source == "s3" else None
        found = pause_and_take_over(state, tmp_path, bucket)
    record_figures(
        "pause",
        backend=backend if source == "dir" else f"{backend}, s3://",
        taken_over=sum(pid == str(found.taker_pid) for pid in found.done.values()),
        paused_exit=found.paused_exit,
        late_writes=len(found.late_writes),
        handlers_started_after_resume=len(found.started_after_resume),
        lease_lost_log_lines=len(found.lost_lines),
    )
    # Every output is the result of the runner whose completion was recorded.
    assert sorted(found.done) == found.names
    assert found.outputs == found.done, found.paused_err
    # The item in the paused handler was taken over; the paused runner wrote nothing late.
    assert found.done[found.at_pause] == str(found.taker_pid)
    assert found.late_writes == []
    assert found.completions == [1] * 6
    # The paused runner noticed, said so, and stopped.
    assert found.paused_exit == 1, found.paused_err
    assert found.lost_lines, found.paused_err
    assert "Traceback" not in found.paused_err
    if source == "s3":
        assert found.started_after_resume == []


def test_a_resumed_runner_records_what_became_of_each_file(sqlite_pause: Pause) -> None:
    # Its run ends on the lost lease; its history row still says, from the ledger, that the
    # runner that took over finished the rest (it said "0 seen: 2 done, 1 held by other
    # runners": seen below its own categories, the taker's files uncounted).
    run = sqlite_pause.paused_run
    assert run["seen"] == len(sqlite_pause.names), run
    assert sum(run[name] for name in CATEGORIES) == run["seen"], run
    assert run["done"] + run["done_before"] == run["seen"], run


def test_a_resumed_runner_starts_no_handler_for_items_it_no_longer_holds(
    sqlite_pause: Pause,
) -> None:
    found = sqlite_pause
    assert found.started_after_resume == []
    # One line for each handler the pause caught (its attempt failed: the lease was lost),
    # and one for the stop; not one per item it had queued.
    lines = found.lost_lines
    per_item = Counter(n for line in lines for n in found.names if f"'{n}'" in line)
    assert all(count == 1 for count in per_item.values()), "\n".join(lines)
    assert len(lines) <= len(per_item) + 1, "\n".join(lines)


async def test_write_output_after_the_lease_was_taken_over_refuses_and_writes_nothing(
    inbox: Path, state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The event loop blocked past the lease, and another runner took the lease over
    # meanwhile (take_over_lease: what its claim does to the row). The late effects ask the
    # ledger (a lease that nobody took over is renewed, and they go ahead: see
    # tests/test_effects.py), which says it is taken: both are refused. The item comes back
    # later (the other's lease runs out at once), and its next call writes.
    make_files(inbox, 1)
    out = tmp_path / "out"
    out.mkdir()
    refused: list[BaseException] = []
    calls: list[int] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            time.sleep(LEASE)  # noqa: ASYNC251 - the event loop blocked past the lease
            take_over_lease(str(state), ctx.entry.relpath)
            try:
                await ctx.write_output("late.txt", b"attempt 1")
            except LockLostError as e:
                refused.append(e)
                raise
            try:
                await ctx.move(tmp_path)
            except LockLostError as e:
                refused.append(e)
                raise
        await ctx.write_output("late.txt", f"call {len(calls)}")

    batch = Batch(
        handle, source=inbox, state=state, output_dir=out, lease=LEASE, backoff=0.01, settle=0
    )
    with caplog.at_level(logging.WARNING, "asyncbatch"):
        report = await batch.run()

    assert report.done == 1
    assert (out / "late.txt").read_text() == "call 2"
    assert len(refused) == 1
    assert "another runner holds it" in str(refused[0])
    assert [p.name for p in inbox.iterdir()] == ["f00000.txt"]  # nothing moved either
    assert not [p for p in out.iterdir() if p.name.startswith(".asyncbatch-tmp-")]


async def test_move_after_the_lease_was_taken_over_refuses_and_moves_nothing(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    archive = tmp_path / "archive"
    archive.mkdir()
    refused: list[BaseException] = []
    calls: list[int] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            time.sleep(LEASE)  # noqa: ASYNC251 - the event loop blocked past the lease
            take_over_lease(str(state), ctx.entry.relpath)  # by another runner, meanwhile
            try:
                await ctx.move(archive)
            except LockLostError as e:
                refused.append(e)
                raise
        await ctx.move(archive)

    report = await Batch(
        handle, source=inbox, state=state, lease=LEASE, backoff=0.01, settle=0
    ).run()

    assert report.done == 1
    assert len(refused) == 1
    assert len(calls) == 2
    assert [p.name for p in archive.iterdir()] == ["f00000.txt"]
    assert os.listdir(inbox) == []


@pytest.mark.parametrize("taken_over", [True, False])
async def test_a_write_stalled_past_the_lease_after_its_first_check_asks_before_its_rename(
    inbox: Path, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_over: bool
) -> None:
    # Regression: the lease was checked only before the thread hop, so a write that had passed
    # the check and was then held up (its runner suspended, the event loop blocked by another
    # handler) replaced the output of the runner that had taken the item over. Its check just
    # before the rename finds the local deadline passed: nothing is renamed into place, and
    # the ledger is asked. Taken over meanwhile: refused (LockLostError). Nobody took it over
    # (regression: refused all the same, the attempt failed): renewed, the write is made.
    make_files(inbox, 1)
    out = tmp_path / "out"
    out.mkdir()
    reached, go = threading.Event(), threading.Event()

    def hold_first_write() -> None:
        if not reached.is_set():
            reached.set()
            go.wait(30)  # the temp file is written; the rename waits

    monkeypatch.setattr(
        failpoints, "ACTIVE", {"output-temp-written": failpoints.Call("call", fn=hold_first_write)}
    )
    errors: list[str] = []
    calls: list[int] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        try:
            if len(calls) == 1:
                # Shielded: once the loop runs again, the watchdog cancels this attempt (its
                # lease ran out); what the held write does must be seen first.
                with anyio.CancelScope(shield=True):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(ctx.write_output, "out.txt", "held")
                        assert await anyio.to_thread.run_sync(reached.wait, 30)
                        # The loop stalls (no heartbeat) until the lease ran out, as the
                        # write's own check sees it.
                        hooks = ctx._hooks
                        assert hooks is not None
                        while not hooks.lease_lost(ctx):
                            time.sleep(0.05)  # noqa: ASYNC251 - blocking is the point
                        if taken_over:  # by another runner, while this one is stalled
                            take_over_lease(str(state), ctx.entry.relpath)
                        # Still stalled until the held write has made its check: a
                        # heartbeat that ran first would renew the lease, and the write would
                        # rightly go ahead.
                        checked = threading.Event()
                        lease_lost = hooks.lease_lost

                        def checked_lease_lost(of: TaskContext) -> bool:
                            lost = lease_lost(of)
                            if threading.current_thread() is not threading.main_thread():
                                checked.set()  # the write's own check, in its thread
                            return lost

                        hooks.lease_lost = checked_lease_lost  # type: ignore[method-assign,assignment]
                        go.set()
                        assert checked.wait(30)  # (the event loop stays blocked meanwhile)
                return
            await ctx.write_output("out.txt", f"call {len(calls)}")
        except* LockLostError as group:
            errors.extend(str(e) for e in group.exceptions)
            raise

    report = await Batch(
        handle, source=inbox, state=state, output_dir=out, lease=LEASE, backoff=0.01, settle=0
    ).run()

    assert report.done == 1
    if taken_over:
        assert len(errors) == 1
        assert "the output was not written" in errors[0]
        assert "another runner holds it" in errors[0]
        assert (out / "out.txt").read_text() == "call 2"
    else:
        assert errors == []
        assert len(calls) == 1
        assert (out / "out.txt").read_text() == "held"
    assert [p.name for p in out.iterdir()] == ["out.txt"]  # the held temp file was removed
