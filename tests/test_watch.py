"""Settling and watch mode: a file being written is handled once, after its last write."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncbatch import Batch, TaskContext, _scanner
from asyncbatch._identity import Identity

from .conftest import cli, make_files, polls_after, rows, state_counts, until, until_settled
from .postgres import pg_sync


async def append_slowly(path: Path, rows: int, pause: float, *, backdate: bool = False) -> bytes:
    """Append ``rows`` lines to ``path``, ``pause`` seconds apart, in a thread of its own: a
    busy event loop (the watch's) does not lengthen the pauses past the settle window."""

    def write() -> bytes:
        written = b""
        for i in range(rows):
            line = b"row %d\n" % i
            with path.open("ab") as f:
                f.write(line)
            written += line
            if backdate:  # a writer whose clock lags (NFS): mtime looks old while it writes
                old = time.time() - 3600
                os.utime(path, (old, old))
            time.sleep(pause)
        return written

    return await anyio.to_thread.run_sync(write)


def append_until(path: Path, done: threading.Event, pause: float = 0.05) -> bytes:
    """Append a line to ``path`` every ``pause`` seconds until ``done`` is set (run it in a
    thread)."""
    written = b""
    while not done.is_set():
        line = b"row %d\n" % len(written)
        with path.open("ab") as f:
            f.write(line)
        written += line
        time.sleep(pause)
    return written


async def test_run_skips_a_file_still_being_written_and_a_later_run_gets_it_whole(
    inbox: Path, state: Path
) -> None:
    await until_settled(1.0, *make_files(inbox, 2))
    handled: dict[str, bytes] = {}

    async def handle(ctx: TaskContext) -> None:
        handled[ctx.entry.relpath] = await ctx.read_bytes()

    # Written to every 50 ms (by a thread, whatever the event loop does) until the first run
    # has ended: it changed well within the settle window whenever that run looks.
    slow = inbox / "slow.csv"
    done = threading.Event()
    async with anyio.create_task_group() as tg:
        written: list[bytes] = []

        async def writer() -> None:
            written.append(await anyio.to_thread.run_sync(append_until, slow, done))

        tg.start_soon(writer)
        while not slow.exists():  # noqa: ASYNC110 (a file the thread writes)
            await anyio.sleep(0.01)
        try:
            first = await Batch(handle, source=inbox, state=state, settle=1.0).run()
        finally:
            done.set()
    assert "slow.csv" not in handled
    assert first.done == 2

    await until_settled(1.0, slow)
    second = await Batch(handle, source=inbox, state=state, settle=1.0).run()
    assert second.done == 1
    assert handled["slow.csv"] == written[0]


async def test_watch_handles_an_appended_file_once_after_its_last_write(
    inbox: Path, state: Path
) -> None:
    calls: list[tuple[str, bytes]] = []
    handled = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        calls.append((ctx.entry.relpath, await ctx.read_bytes()))
        handled.set()

    # The writer's pauses (50 ms) are far shorter than the settle window.
    batch = Batch(handle, source=inbox, state=state, settle=1.0, poll=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        content = await append_slowly(inbox / "slow.csv", 12, 0.05)
        with anyio.fail_after(30):
            await handled.wait()
        await polls_after(batch)  # more polls, and their claims: nothing is handled twice
        batch.stop()

    assert calls == [("slow.csv", content)]
    assert rows(state, "SELECT fence, attempts FROM items") == [(1, 1)]


async def test_watch_waits_for_the_size_to_hold_still_even_with_an_old_mtime(
    inbox: Path, state: Path
) -> None:
    calls: list[bytes] = []
    handled = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        calls.append(await ctx.read_bytes())
        handled.set()

    # Its mtime says settled all along: the watch must see it unchanged for `settle` seconds
    # (longer than the writer's pauses, as settle always must be).
    batch = Batch(handle, source=inbox, state=state, settle=1.0, poll=0.3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        content = await append_slowly(inbox / "skewed.csv", 15, 0.05, backdate=True)
        with anyio.fail_after(30):
            await handled.wait()
        batch.stop()

    assert calls == [content]


async def test_watch_picks_up_new_files_and_stop_returns_a_report(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    seen: list[str] = []
    three, five = anyio.Event(), anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        seen.append(ctx.entry.relpath)
        if len(seen) == 3:
            three.set()
        if len(seen) == 5:
            five.set()

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05)
    report = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal report
            report = await batch.watch()

        tg.start_soon(watch)
        with anyio.fail_after(10):
            await three.wait()
            make_files(inbox, 2, prefix="late")
            await five.wait()
        batch.stop()

    assert report is not None
    assert report.stopped
    assert report.done == 5
    assert sorted(seen) == sorted(p.name for p in inbox.iterdir())
    assert state_counts(state) == {"done": 5}


async def test_watch_retries_failed_items_without_a_rescan(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    attempts: list[int] = []
    third = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise TimeoutError("upstream slow")
        third.set()

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05, backoff=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(30):
            await third.wait()
            while state_counts(state) != {"done": 1}:  # noqa: ASYNC110 (its commit)
                await anyio.sleep(0.02)
        batch.stop()

    assert attempts == [1, 2, 3]
    assert state_counts(state) == {"done": 1}


class _Handled:
    """A handler that records the relpath of each call; :meth:`reach` waits for a number of
    calls (an event the handler sets, not a poll)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._waits: dict[int, anyio.Event] = {}

    async def __call__(self, ctx: TaskContext) -> None:
        self.seen.append(ctx.entry.relpath)
        for count, reached in self._waits.items():
            if len(self.seen) >= count:
                reached.set()

    async def reach(self, count: int) -> None:
        """Wait until the handler was called ``count`` times."""
        if len(self.seen) < count:
            await self._waits.setdefault(count, anyio.Event()).wait()


@pytest.mark.parametrize("events", [False, True])
async def test_a_watch_waits_for_a_source_that_went_away_and_goes_on_when_it_is_back(
    inbox: Path, state: Path, events: bool, caplog: pytest.LogCaptureFixture
) -> None:
    make_files(inbox, 2)
    handled = _Handled()
    batch = Batch(handled, source=inbox, state=state, settle=0, poll=0.05, events=events)
    moved = inbox.with_name("moved-away")
    report = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal report
            report = await batch.watch()

        tg.start_soon(watch)
        with anyio.fail_after(20):
            await handled.reach(2)
            inbox.rename(moved)  # an unmounted share, a directory moved by mistake
            while "is gone" not in caplog.text:  # noqa: ASYNC110 (a log record, not an event)
                await anyio.sleep(0.05)
            moved.rename(inbox)
            make_files(inbox, 1, prefix="late")
            await handled.reach(3)
        batch.stop()

    assert report is not None
    assert (report.done, report.stopped) == (3, True)
    assert "waiting for it to be back" in caplog.text


async def test_a_watch_whose_source_cannot_be_listed_waits_for_it(
    inbox: Path, state: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a source that is there but cannot be listed (its permission taken away, an
    I/O error, a stale network handle) ended the watch with a traceback and exit 1 at its next
    poll. It is waited for, as a source gone is."""
    make_files(inbox, 1)
    denied = threading.Event()
    walk = _scanner._walk

    def failing_walk(*args: Any, **kwargs: Any) -> Any:
        if denied.is_set():
            raise PermissionError(errno.EACCES, "Permission denied", os.fsencode(inbox))
        return walk(*args, **kwargs)

    monkeypatch.setattr(_scanner, "_walk", failing_walk)
    handled = _Handled()
    batch = Batch(handled, source=inbox, state=state, settle=0, poll=0.05, events=False)
    report = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal report
            report = await batch.watch()

        tg.start_soon(watch)
        with anyio.fail_after(20):
            await handled.reach(1)
            denied.set()
            while batch.health().check("source").ok:  # noqa: ASYNC110 (a poll's finding)
                await anyio.sleep(0.02)
            assert "cannot be listed" in batch.health().check("source").detail
            make_files(inbox, 1, prefix="late")
            denied.clear()
            await handled.reach(2)
        assert batch.health().check("source").ok
        batch.stop()

    assert report is not None
    assert (report.done, report.stopped, report.vanished) == (2, True, 0)
    assert caplog.text.count("cannot be listed (Permission denied)") == 1
    assert "can be listed again" in caplog.text


async def test_a_watch_whose_poll_fails_for_want_of_descriptors_ends_with_that_error(
    inbox: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll failing for a reason of this process's own (too many open files), not the
    source's, ends the watch with the error: it is not "waiting for the source" (one warning,
    for ever) while nothing about the source is wrong (a second review)."""
    make_files(inbox, 1)
    walk = _scanner._walk
    handled = threading.Event()

    def failing_walk(*args: Any, **kwargs: Any) -> Any:
        if handled.is_set():
            raise OSError(errno.EMFILE, "Too many open files")
        return walk(*args, **kwargs)

    monkeypatch.setattr(_scanner, "_walk", failing_walk)

    async def handle(ctx: TaskContext) -> None:
        handled.set()

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05, events=False)
    with anyio.fail_after(20), pytest.raises(OSError, match="Too many open files"):
        await batch.watch()


async def test_a_run_whose_source_is_gone_does_not_say_it_waits_for_it(
    inbox: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Only a watch waits for its source to be back; a run ends with what it found (it said
    # "waiting for it to be back", then ended at once).
    make_files(inbox, 4)

    async def handle(ctx: TaskContext) -> None:
        if inbox.exists():
            shutil.rmtree(inbox)  # removed by mistake, its files with it

    report = await Batch(handle, source=inbox, state=state, settle=0, concurrency=1).run()

    assert "is gone" in caplog.text
    assert "waiting for it to be back" not in caplog.text
    assert "its files not handled yet are left (a run that finds them takes them)" in caplog.text
    assert (report.done, report.vanished) == (1, 3)


@pytest.mark.parametrize("events", [False, True])
async def test_a_watch_whose_source_is_deleted_and_made_again_handles_the_new_files(
    inbox: Path, state: Path, events: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A re-created inbox (a remount, an inbox moved away and made anew): the watch must open
    # the new directory, not call every new file vanished from the old one, and must not say
    # it is ready while the source is gone.
    make_files(inbox, 1)
    handled = _Handled()
    batch = Batch(handled, source=inbox, state=state, settle=0, poll=0.05, events=events)
    report = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal report
            report = await batch.watch()

        tg.start_soon(watch)
        with anyio.fail_after(30):
            await handled.reach(1)
            shutil.rmtree(inbox)
            while batch.health().check("source").ok:  # noqa: ASYNC110 (a poll's finding)
                await anyio.sleep(0.02)
            assert not batch.health().ready
            assert "is gone" in batch.health().check("source").detail
            inbox.mkdir()
            make_files(inbox, 2, prefix="new")
            await handled.reach(3)
        assert batch.health().check("source").ok
        batch.stop()

    assert report is not None
    assert sorted(handled.seen) == ["f00000.txt", "new00000.txt", "new00001.txt"]
    assert (report.done, report.vanished) == (3, 0)
    assert state_counts(state) == {"done": 3}
    assert "was replaced" in caplog.text


def counts_at(where: str) -> dict[str, int]:
    """Items by state, of a SQLite ledger (a path) or a PostgreSQL one (a DSN)."""
    if "://" not in where:
        return state_counts(Path(where))
    query = "SELECT state, count(*) FROM items WHERE job = 'default' GROUP BY state"
    return {str(s): int(n) for s, n in pg_sync(where, query)}


def where_state(backend: str, state: Path, request: pytest.FixtureRequest) -> str:
    """The ledger a test's runs use: ``state`` (SQLite), or a fresh PostgreSQL schema."""
    return str(state) if backend == "sqlite" else str(request.getfixturevalue("pg_dsn"))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_file_forgotten_during_a_live_watch_is_handled_again(
    inbox: Path, state: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    where = where_state(backend, state, request)
    make_files(inbox, 2)
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

    batch = Batch(handle, source=inbox, state=where, settle=0, poll=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(30):
            while len(handled) < 2:  # noqa: ASYNC110 (handled files, not an event)
                await anyio.sleep(0.02)
            forgot = await anyio.to_thread.run_sync(
                lambda: cli("forget", "f00000.txt", "--state", where, "--yes")
            )
            assert forgot.returncode == 0, forgot.stderr
            assert "f00000.txt (was done)" in forgot.stdout
            while len(handled) < 3:  # noqa: ASYNC110 (handled files, not an event)
                await anyio.sleep(0.02)
        batch.stop()

    assert sorted(handled) == ["f00000.txt", "f00000.txt", "f00001.txt"]
    assert counts_at(where) == {"done": 2}


async def test_a_dead_item_retried_during_a_live_watch_is_counted_once(
    inbox: Path, state: Path
) -> None:
    # (The watch counted it dead, then done: "2 seen: 1 done, 1 dead" for one file.)
    make_files(inbox, 1)
    broken = True
    calls = 0
    first, second = anyio.Event(), anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1
        (first if calls == 1 else second).set()
        if broken:
            raise ValueError("broken")

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05, max_attempts=1)
    report = None

    async def watch() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(30):  # a bound on a hang, not a wait
            await first.wait()
            # Dead once its outcome is committed (no event says so): the run's own count.
            while (stats := batch.statistics()) is None or stats.dead != 1:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            broken = False
            retried = await anyio.to_thread.run_sync(
                lambda: cli("retry", "--dead", "--state", state)
            )
            assert retried.returncode == 0, retried.stderr
            await second.wait()
        batch.stop()  # its outcome is committed as the watch ends

    assert calls == 2
    assert state_counts(state) == {"done": 1}
    assert report is not None
    assert (report.seen, report.done, report.dead, report.failed) == (1, 1, 0, 1), report


@pytest.mark.parametrize("events", [False, True])
async def test_a_done_file_touched_during_a_watch_by_path_is_counted_once(
    inbox: Path, state: Path, events: bool
) -> None:
    # (Under identity "path" each touch made the watch count the file again: one file, done
    # once and touched six times, was "7 seen: 1 done, 6 done before".)
    (path,) = make_files(inbox, 1)
    calls = 0
    handled = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1
        handled.set()

    batch = Batch(
        handle, source=inbox, state=state, identity="path", settle=0, poll=0.05, events=events
    )
    report = None

    async def watch() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(30):  # a bound on a hang, not a wait
            await handled.wait()
            await until(lambda: state_counts(state) == {"done": 1})  # its commit
            base = time.time() - 20
            for touch in range(6):
                os.utime(path, (base + touch, base + touch))  # a new mtime each time
                # A full scan looks at it (events off, or the tenth poll): each touch is seen.
                await polls_after(batch, 12 if events else 3)
        batch.stop()

    assert calls == 1
    assert state_counts(state) == {"done": 1}
    assert report is not None
    assert (report.seen, report.done, report.done_before) == (1, 1, 0), report


async def test_a_failed_file_touched_during_a_watch_by_path_is_retried_and_counted_once(
    inbox: Path, state: Path
) -> None:
    # Touched while it waits for its retry, it is claimed as before (still waiting, then
    # retried), and seen once: it was "2 seen: 1 done, 1 unfinished".
    (path,) = make_files(inbox, 1)
    attempts: list[int] = []
    second = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise TimeoutError("upstream slow")
        second.set()

    batch = Batch(
        handle, source=inbox, state=state, identity="path", settle=0, poll=0.05, backoff=1.0
    )
    report = None

    async def watch() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(30):  # a bound on a hang, not a wait
            await until(lambda: (stats := batch.statistics()) is not None and stats.waiting == 1)
            base = time.time() - 20
            os.utime(path, (base, base))
            await polls_after(batch, 3)
            await second.wait()
            await until(lambda: state_counts(state) == {"done": 1})  # its commit
            await polls_after(batch, 3)
        batch.stop()

    assert attempts == [1, 2]
    assert report is not None
    assert (report.seen, report.done, report.failed, report.unfinished) == (1, 1, 1, 0), report


@pytest.mark.parametrize(
    ("identity", "change", "events", "backend"),
    [
        ("path", "touch", False, "sqlite"),
        ("path", "touch", True, "sqlite"),
        ("stat", "ctime", True, "sqlite"),
        ("content", "ctime", False, "sqlite"),
        ("stat", "ctime", False, "postgres"),
    ],
)
async def test_a_file_changed_while_queued_is_handled_once_settled_and_counted_once(
    inbox: Path,
    state: Path,
    identity: Identity,
    change: str,
    events: bool,
    backend: str,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    # A file changed after its scan, while it was queued, is given back (vanished: still being
    # written?) and, once settled again, leased again and handled: one file, done. Under
    # identity "path" it was "3 seen: 2 done, 1 vanished" for two files (b seen twice); a
    # change that keeps its key (its ctime alone: a chmod, a link, a copier setting its mtime
    # back) left it vanished for the rest of the watch, which remembered it as registered.
    caplog.set_level(logging.INFO, "asyncbatch")
    where = where_state(backend, state, request)
    a, b = make_files(inbox, 2)
    settle = 2.5  # b is opened within it after its touch, or it is not given back: a margin
    await until_settled(settle, a, b)
    started, release = anyio.Event(), anyio.Event()
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == a.name:
            started.set()
            await release.wait()
        handled.append(ctx.entry.relpath)

    batch = Batch(
        handle,
        source=inbox,
        state=where,
        identity=identity,
        settle=settle,
        poll=0.05,
        concurrency=1,
        events=events,
    )
    report = None

    async def watch() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(30):  # a bound on a hang, not a wait
            # b is leased behind a, which its handler holds (one worker)
            await started.wait()
            await until(lambda: counts_at(where) == {"running": 2})
            if change == "touch":
                os.utime(b)  # written to while queued
            else:  # its ctime alone
                st = b.stat()
                os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
            release.set()
            await until(lambda: counts_at(where) == {"done": 2})
            await polls_after(batch, 12 if events else 3)
        batch.stop()

    assert f"{b.name!r} vanished: the file changed" in caplog.text  # given back once
    assert handled == [a.name, b.name]
    assert report is not None
    assert (report.seen, report.done, report.vanished) == (2, 2, 0), report


@pytest.mark.parametrize("events", [False, True])
async def test_a_file_replaced_while_queued_is_a_new_item_counted_once(
    inbox: Path, state: Path, events: bool
) -> None:
    # Its new version (another size: a new key) is registered behind the old one, which is
    # given back as vanished: the watch must not take the new version for a file to look at
    # again ("4 seen: 2 done, 1 done before, 1 vanished" for 3 versions).
    a, b = make_files(inbox, 2)
    settle = 0.5
    await until_settled(settle, a, b)
    started, release = anyio.Event(), anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == a.name:
            started.set()
            await release.wait()

    batch = Batch(
        handle, source=inbox, state=state, settle=settle, poll=0.05, concurrency=1, events=events
    )
    report = None

    async def watch() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(30):  # a bound on a hang, not a wait
            await started.wait()
            await until(lambda: state_counts(state) == {"running": 2})
            b.write_bytes(b"a new version, longer\n")
            old = time.time() - 30
            os.utime(b, (old, old))  # settled at once (its ctime: after a settle)
            await until(lambda: state_counts(state) == {"running": 3})  # both versions
            release.set()
            await until(lambda: state_counts(state) == {"done": 2, "vanished": 1})
            await polls_after(batch, 12 if events else 6)
            await until_settled(settle, b)
            await polls_after(batch, 12 if events else 6)
        batch.stop()
    assert report is not None
    counts = (report.seen, report.done, report.vanished, report.done_before)
    assert counts == (3, 2, 1, 0), report


async def test_a_content_file_changed_while_queued_with_a_twin_is_counted_once_not_vanished(
    inbox: Path, state: Path
) -> None:
    # Identity content: y has x's bytes (one item), counted done before on the strength of
    # x's attempt; x's ctime changes while it is queued (a chmod: its key kept), so x is given
    # back as vanished and y, handled by none, is taken in its place. The watch then looks at
    # x again: its bytes are done (by y), so it is done before, not left "vanished".
    a = inbox / "a.txt"
    a.write_bytes(b"a\n")
    x, y = inbox / "x.txt", inbox / "y.txt"
    for path in (x, y):
        path.write_bytes(b"same bytes\n")
    base = time.time() - 60
    for i, path in enumerate((a, x, y)):
        os.utime(path, (base + i, base + i))
    settle = 2.5  # x is opened within it after its chmod, or it is not given back: a margin
    await until_settled(settle, a, x, y)
    started, release = anyio.Event(), anyio.Event()
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == a.name:
            started.set()
            await release.wait()
        handled.append(ctx.entry.relpath)

    batch = Batch(
        handle,
        source=inbox,
        state=state,
        identity="content",
        settle=settle,
        poll=0.05,
        concurrency=1,
    )
    report = None

    async def watch() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with anyio.fail_after(30):  # a bound on a hang, not a wait
            await started.wait()  # x is leased behind a, which its handler holds
            await until(lambda: state_counts(state) == {"running": 2})
            await until(lambda: (stats := batch.statistics()) is not None and stats.seen == 3)
            x.chmod(0o600)  # its ctime alone: the same bytes, the same key
            release.set()
            await until(lambda: state_counts(state) == {"done": 2})
            await until_settled(settle, x)
            await polls_after(batch, 6)
        batch.stop()

    assert handled in ([a.name, x.name], [a.name, y.name])  # one of the two, once
    assert report is not None
    counts = (report.seen, report.done, report.done_before, report.vanished)
    assert counts == (3, 2, 1, 0), report


def test_a_source_replaced_and_reopened_by_a_worker_first_still_restarts_the_watch(
    tmp_path: Path,
) -> None:
    # A worker that finds an input changed looks at the source too (--exec, just before a
    # command starts) and may be the one that reopens a replaced source directory: the watch,
    # which went by its own look's answer, then kept following the old directory's events
    # and scanned it whole only at its next periodic full scan.
    from types import SimpleNamespace

    from asyncbatch._pipeline.claimer import Claimer
    from asyncbatch._pipeline.source import SourceDir

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = SourceDir(inbox)
    source.open()
    watch = SimpleNamespace(
        run=SimpleNamespace(source=source), _reopened=0, _restart_events=anyio.Event()
    )
    try:
        assert not Claimer._source_replaced(watch)  # type: ignore[arg-type]
        inbox.rename(tmp_path / "inbox.old")
        inbox.mkdir()
        assert source.refresh()  # the worker's look reopens it
        assert Claimer._source_replaced(watch)  # type: ignore[arg-type]
        assert watch._restart_events.is_set()
        assert not Claimer._source_replaced(watch)  # type: ignore[arg-type]
    finally:
        source.close()
