"""Batch end to end in-process: once per file, order, retries, isolation, bad inputs, stop."""

from __future__ import annotations

import asyncio
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncbatch import (
    AsyncBatchError,
    Batch,
    ConfigurationError,
    LockLostError,
    PermanentError,
    TaskContext,
)

from .conftest import make_files, rows, state_counts


async def test_every_settled_file_is_handled_once_and_rerun_redoes_nothing(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 300)
    seen: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        data = await ctx.read_bytes()
        assert data.startswith(ctx.entry.relpath.removesuffix(".txt").encode())
        seen.append(ctx.entry.relpath)

    batch = Batch(handle, source=inbox, state=state, concurrency=16, settle=0)
    first = await batch.run()
    second = await batch.run()

    assert sorted(seen) == sorted(p.name for p in inbox.iterdir())
    assert (first.done, first.seen, first.ok) == (300, 300, True)
    assert (second.done, second.skipped, second.ok) == (0, 300, True)
    assert state_counts(state) == {"done": 300}
    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]
    assert rows(state, "SELECT count(*) FROM runners") == [(0,)]


async def test_a_changed_file_is_new_work_with_stat_identity(inbox: Path, state: Path) -> None:
    (path,) = make_files(inbox, 1)
    contents: list[bytes] = []

    async def handle(ctx: TaskContext) -> None:
        contents.append(await ctx.read_bytes())

    batch = Batch(handle, source=inbox, state=state, settle=0)
    await batch.run()
    path.write_bytes(b"second version")
    old = time.time() - 10
    os.utime(path, (old, old))
    await batch.run()

    assert contents[1] == b"second version"
    assert len(contents) == 2


async def test_path_identity_handles_each_name_once(inbox: Path, state: Path) -> None:
    (path,) = make_files(inbox, 1)
    calls: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.key)

    await Batch(handle, source=inbox, state=state, identity="path", settle=0).run()
    path.write_bytes(b"changed")
    os.utime(path, (time.time() - 10,) * 2)
    await Batch(handle, source=inbox, state=state, identity="path", settle=0).run()

    assert len(calls) == 1


async def test_content_identity_handles_each_content_once(inbox: Path, state: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (inbox / name).write_bytes(b"same bytes" if name != "c.txt" else b"other bytes")
        os.utime(inbox / name, (time.time() - 10,) * 2)
    hashes: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        hashes.append(ctx.input_hash)

    await Batch(handle, source=inbox, state=state, identity="content", settle=0).run()

    import hashlib

    assert sorted(hashes) == sorted(
        {hashlib.sha256(b"same bytes").hexdigest(), hashlib.sha256(b"other bytes").hexdigest()}
    )


async def test_files_are_handled_in_mtime_then_relpath_order(inbox: Path, state: Path) -> None:
    base = time.time() - 100
    names = [f"n{i:03d}.txt" for i in range(60)]
    rng = random.Random(7)
    stamps = {name: base + rng.randrange(20) for name in names}  # many mtime ties
    for name in names:
        (inbox / name).write_text(name)
        os.utime(inbox / name, (stamps[name], stamps[name]))
    order: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        order.append(ctx.entry.relpath)

    await Batch(handle, source=inbox, state=state, concurrency=1, claim_batch=7, settle=0).run()

    expected = sorted(names, key=lambda n: ((inbox / n).stat().st_mtime_ns, n))
    assert order == expected


async def test_failures_are_retried_with_backoff_then_dead(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    attempts: dict[str, list[int]] = {}

    async def handle(ctx: TaskContext) -> None:
        attempts.setdefault(ctx.entry.relpath, []).append(ctx.attempt)
        if ctx.entry.relpath == "f00001.txt":
            raise ValueError("bad row 7")
        if ctx.entry.relpath == "f00002.txt" and ctx.attempt == 1:
            raise ConnectionError("flaky")

    report = await Batch(
        handle, source=inbox, state=state, max_attempts=3, backoff=0.01, settle=0
    ).run()

    assert attempts == {"f00000.txt": [1], "f00001.txt": [1, 2, 3], "f00002.txt": [1, 2]}
    assert (report.done, report.dead, report.failed, report.ok) == (2, 1, 4, False)
    ((error, state_name),) = rows(state, "SELECT last_error, state FROM items WHERE state='dead'")
    assert (error, state_name) == ("ValueError: bad row 7", "dead")


async def test_a_dead_file_still_in_the_inbox_keeps_the_run_not_ok(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "f00000.txt":
            raise PermanentError("unsupported format")

    first = await Batch(handle, source=inbox, state=state, settle=0).run()
    second = await Batch(handle, source=inbox, state=state, settle=0).run()

    assert (first.dead, first.failed, first.done) == (1, 1, 1)
    assert (second.dead, second.dead_before, second.ok) == (0, 1, False)


async def test_a_handler_timeout_fails_the_item(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)

    async def handle(ctx: TaskContext) -> None:
        await anyio.sleep(10)

    report = await Batch(
        handle, source=inbox, state=state, timeout=0.05, max_attempts=1, settle=0
    ).run()

    assert report.dead == 1
    assert "ran over 0.05s" in rows(state, "SELECT last_error FROM items")[0][0]


async def test_a_file_vanishing_before_handling_is_marked_vanished(
    inbox: Path, state: Path
) -> None:
    _, second = make_files(inbox, 2)

    async def handle(ctx: TaskContext) -> None:
        second.unlink(missing_ok=True)

    report = await Batch(handle, source=inbox, state=state, concurrency=1, settle=0).run()
    again = await Batch(handle, source=inbox, state=state, concurrency=1, settle=0).run()

    assert (report.done, report.vanished, report.ok) == (1, 1, True)
    assert (again.done, again.vanished) == (0, 0)
    assert state_counts(state) == {"done": 1, "vanished": 1}


async def test_a_directory_replaced_by_a_file_before_handling_leaves_its_files_vanished(
    inbox: Path, state: Path
) -> None:
    # A directory of the scan replaced by a file of the same name: opening its files fails
    # with ENOTDIR. They are gone (vanished), not failing: no retries, never dead, and when
    # the directory is back, the next run handles them.
    sub = inbox / "sub"
    sub.mkdir()
    old = time.time() - 60
    for name in ("a.csv", "b.csv"):
        (sub / name).write_text(name)
        os.utime(sub / name, (old, old))
    (inbox / "first.csv").write_text("first")
    os.utime(inbox / "first.csv", (old - 10, old - 10))
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "first.csv":
            sub.rename(inbox / ".sub-away")
            (inbox / "sub").write_text("a file now")
        handled.append(ctx.entry.relpath)

    batch = Batch(
        handle, source=inbox, state=state, concurrency=1, settle=0, recursive=True, backoff=0.01
    )
    report = await batch.run()

    assert handled == ["first.csv"]
    assert (report.done, report.vanished, report.dead, report.failed) == (1, 2, 0, 0)
    assert report.ok
    (inbox / "sub").unlink()
    (inbox / ".sub-away").rename(sub)
    again = await batch.run()
    assert sorted(handled) == ["first.csv", "sub/a.csv", "sub/b.csv"]
    assert (again.done, again.dead_before) == (2, 0)


async def test_a_file_changed_after_the_scan_is_not_handled_as_the_old_version(
    inbox: Path, state: Path
) -> None:
    first, second = make_files(inbox, 2)
    read: dict[str, bytes] = {}

    async def handle(ctx: TaskContext) -> None:
        read[ctx.entry.relpath] = await ctx.read_bytes()
        if ctx.entry.relpath == first.name:
            second.write_bytes(b"rewritten while queued")

    report = await Batch(handle, source=inbox, state=state, concurrency=1, settle=0).run()

    # The old version's item vanished; the new version, settled by the end of the run (settle
    # 0), is taken in it as the new item it is: the file is seen once, done, not vanished.
    assert read[second.name] == b"rewritten while queued"
    assert (report.seen, report.done, report.vanished) == (2, 2, 0)
    assert state_counts(state) == {"done": 2, "vanished": 1}


async def test_a_fifo_in_the_inbox_never_blocks_the_run(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    os.mkfifo(inbox / "pipe.csv")
    os.utime(inbox / "pipe.csv", (time.time() - 10,) * 2)

    async def handle(ctx: TaskContext) -> None:
        await ctx.read_bytes()

    with anyio.fail_after(20):
        report = await Batch(handle, source=inbox, state=state, settle=0).run()

    assert report.done == 2
    assert rows(state, "SELECT count(*) FROM items WHERE relpath = ?", (b"pipe.csv",)) == [(0,)]


async def test_contexts_of_concurrent_items_share_nothing(inbox: Path, state: Path) -> None:
    make_files(inbox, 64)
    contexts: list[TaskContext] = []

    async def handle(ctx: TaskContext) -> None:
        ctx.data["mine"] = ctx.key
        ctx.data.setdefault("visits", []).append(ctx.entry.relpath)
        contexts.append(ctx)
        await anyio.sleep(random.random() / 100)
        assert ctx.data["mine"] == ctx.key
        assert ctx.data["visits"] == [ctx.entry.relpath]
        assert ctx.log.extra is not None
        assert ctx.log.extra["key"] == ctx.key

    report = await Batch(handle, source=inbox, state=state, concurrency=16, settle=0).run()

    assert report.done == 64
    assert len({id(c.data) for c in contexts}) == 64
    assert len({id(c.http) for c in contexts}) == 64
    assert len({id(c.log) for c in contexts}) == 64


async def test_an_exception_fails_only_its_item(inbox: Path, state: Path) -> None:
    make_files(inbox, 20)

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "f00007.txt":
            raise RuntimeError("boom")

    report = await Batch(handle, source=inbox, state=state, max_attempts=1, settle=0).run()
    assert (report.done, report.dead) == (19, 1)


async def test_cancelling_a_run_releases_the_lock_and_the_leases(inbox: Path, state: Path) -> None:
    make_files(inbox, 50)
    started = anyio.Event()
    running: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        running.append(ctx.key)
        if len(running) == 4:
            started.set()
        await anyio.sleep(30)

    batch = Batch(handle, source=inbox, state=state, concurrency=4, settle=0)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.run)
            await started.wait()
            tg.cancel_scope.cancel()

    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]
    assert rows(state, "SELECT count(*) FROM items WHERE state = 'running'") == [(0,)]
    # The four cancelled attempts count; the items claimed but never started do not.
    assert rows(state, "SELECT sum(attempts) FROM items") == [(4,)]
    assert rows(state, "SELECT exit_status FROM runs") == [("cancelled",)]


async def test_stop_lets_in_flight_items_finish(inbox: Path, state: Path) -> None:
    make_files(inbox, 40)
    batch: Batch

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "f00002.txt":
            batch.stop()
        await anyio.sleep(0.05)

    batch = Batch(handle, source=inbox, state=state, concurrency=3, settle=0, lease=600)
    started = time.monotonic()
    report = await batch.run()

    # At once: not after a quarter of the lease, 150 s (a wake-up of the claimer was once
    # lost), which no slow machine explains.
    assert time.monotonic() - started < 60
    assert report.stopped
    assert not report.ok, "a run stopped before the end has not done every file"
    assert 3 <= report.done < 40
    counts = state_counts(state)
    assert counts.get("running", 0) == 0
    assert counts["done"] == report.done


async def test_a_batch_object_refuses_to_run_twice_at_once(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    entered, gate = anyio.Event(), anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        entered.set()
        await gate.wait()

    batch = Batch(handle, source=inbox, state=state, settle=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.run)
        with anyio.fail_after(60):
            await entered.wait()
        with pytest.raises(AsyncBatchError, match="already running"):
            await batch.run()
        gate.set()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "'concurrency' has value 0"),
        ({"settle": -1}, "'settle' has value -1"),
        ({"timeout": -5}, "'timeout' has value -5"),
        ({"identity": "inode"}, "'identity' has value 'inode'"),
        ({"on_done": "archive"}, "'on_done' has value 'archive'"),
        ({"on_dead": "delete"}, "'on_dead' has value 'delete'"),
    ],
)
def test_bad_settings_are_refused_with_the_value(
    inbox: Path, state: Path, kwargs: dict[str, object], message: str
) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match=message):
        Batch(handle, source=inbox, state=state, **kwargs)  # type: ignore[arg-type]


def test_missing_source_and_state_inside_source_are_refused(inbox: Path, tmp_path: Path) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match="no such directory"):
        Batch(handle, source=tmp_path / "nope", state=tmp_path / "s.db", settle=0)
    with pytest.raises(ConfigurationError, match="inside the scanned source"):
        Batch(handle, source=inbox, state=inbox / "state.db", settle=0)
    Batch(handle, source=inbox, state=inbox / ".state.db", settle=0)  # hidden: never scanned
    # Ignoring the state alone would leave SQLite's -wal and -shm beside it to the scan.
    with pytest.raises(ConfigurationError, match=r"state\.db-wal'?: is inside the scanned"):
        Batch(handle, source=inbox, state=inbox / "state.db", ignore=["state.db"], settle=0)
    Batch(handle, source=inbox, state=inbox / "state.db", ignore=["state.db*"], settle=0)


@pytest.mark.parametrize("name", ["source", "state", "output_dir"])
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(
    inbox: Path, state: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    monkeypatch.chdir(inbox.parent)  # Path("") is "."; a scan of it would take what is here
    paths: dict[str, Any] = {"source": inbox, "state": state, name: ""}
    with pytest.raises(ConfigurationError, match=f"setting '{name}' has value '': a path, not"):
        Batch(handle, **paths)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("state", 123),
        ("state", b"state.db"),
        ("state", ["state.db"]),
        ("state", None),
        ("source", None),
        ("source", b"inbox"),
        ("output_dir", 1.5),
        ("on_done", None),
        ("on_dead", 0),
        ("ignore", None),
        ("unsafe_methods", 7),
    ],
)
def test_a_setting_of_the_wrong_type_is_refused_with_the_value(
    inbox: Path, state: Path, name: str, value: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # str() of a state that is not a path made a file of that name ("123", "b'state.db'");
    # the others left as AttributeError or TypeError instead of one line naming them.
    async def handle(ctx: TaskContext) -> None:
        pass

    monkeypatch.chdir(inbox.parent)
    settings: dict[str, Any] = {"source": inbox, "state": state, name: value}
    with pytest.raises(
        ConfigurationError, match=re.escape(f"setting {name!r} has value {value!r}")
    ):
        Batch(handle, **settings)
    assert sorted(p.name for p in inbox.parent.iterdir()) == ["inbox"]


def test_a_synchronous_handler_is_refused(inbox: Path, state: Path) -> None:
    def handle(ctx: TaskContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match="an async function"):
        Batch(handle, source=inbox, state=state, settle=0)  # type: ignore[arg-type]


async def test_base_exceptions_from_a_handler_are_never_swallowed(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)

    class Stop(BaseException):
        pass

    async def handle(ctx: TaskContext) -> None:
        raise Stop

    with pytest.raises(Stop):
        await Batch(handle, source=inbox, state=state, concurrency=1, settle=0).run()
    # Nothing was recorded as failed or done; the leases went back.
    assert state_counts(state) == {"pending": 3}
    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]


async def test_stop_before_the_run_began_is_not_lost(inbox: Path, state: Path) -> None:
    make_files(inbox, 5)
    calls: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.key)

    batch = Batch(handle, source=inbox, state=state, settle=0)
    batch.stop()  # e.g. an application shutting down before its watcher got going
    with anyio.fail_after(20):
        report = await batch.watch()
    assert report.stopped
    assert report.ok  # stopping is how a watch ends
    assert calls == []
    again = await batch.run()  # the stop was used up: the next run runs
    assert (again.done, again.ok) == (5, True)


_SIGNALS_RESTORED = """
import asyncio, os, signal, sys

from asyncbatch import Batch


async def handle(ctx):
    pass


async def main():
    heard = []
    both = asyncio.Event()

    def hear(what):
        heard.append(what)
        if len(heard) == 2:
            both.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, hear, "loop SIGTERM")
    signal.signal(signal.SIGINT, lambda signum, frame: hear("SIGINT"))
    batch = Batch(handle, source=sys.argv[1], state=sys.argv[2], settle=0)
    report = await batch.run(handle_signals=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the default action would end this process here
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(both.wait(), 30)  # (a bound on a hang)
    print(report.done, sorted(heard))


asyncio.run(main())
"""


def test_handle_signals_gives_the_applications_handlers_back(inbox: Path, state: Path) -> None:
    # An application with its own SIGINT/SIGTERM handlers (signal.signal, or the event loop's
    # add_signal_handler) has them again once a run with handle_signals=True is over.
    make_files(inbox, 2)
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNALS_RESTORED, str(inbox), str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "2 ['SIGINT', 'loop SIGTERM']\n"), proc.stderr


async def test_reading_the_input_small_large_and_streamed(inbox: Path, state: Path) -> None:
    from asyncbatch._context import INLINE_READ_MAX

    small = inbox / "small.bin"
    small.write_bytes(b"s" * 100)
    large = inbox / "large.bin"
    large.write_bytes(os.urandom(INLINE_READ_MAX * 3 + 7))  # read in a worker thread
    for path in (small, large):
        os.utime(path, (time.time() - 30,) * 2)
    seen: dict[str, tuple[bytes, bytes, bytes]] = {}

    async def handle(ctx: TaskContext) -> None:
        whole = await ctx.read_bytes()
        async with ctx.open() as f:
            streamed = await f.read()
        async with ctx.open() as f:  # a second open starts at the beginning again
            head = await f.read(10)
        seen[ctx.entry.relpath] = (whole, streamed, head)

    report = await Batch(handle, source=inbox, state=state, settle=0).run()

    assert report.done == 2
    for path in (small, large):
        whole, streamed, head = seen[path.name]
        assert whole == streamed == path.read_bytes()
        assert head == path.read_bytes()[:10]


# -- regressions of issue 14 ---------------------------------------------------------------------


async def test_read_bytes_returns_every_byte_of_a_file_over_2_gib(inbox: Path, state: Path) -> None:
    big = inbox / "big.bin"
    size = (2 << 30) + 4096 + 3  # one pread returns at most 2 GiB - 4 KiB on Linux
    with big.open("wb") as f:  # sparse: no disk space, read back as zeros
        f.truncate(size - 3)
        f.seek(size - 3)
        f.write(b"end")
    os.utime(big, (time.time() - 30,) * 2)
    got: list[tuple[int, bytes]] = []

    async def handle(ctx: TaskContext) -> None:
        data = await ctx.read_bytes()
        got.append((len(data), data[-3:]))

    report = await Batch(handle, source=inbox, state=state, max_attempts=1, settle=0).run()

    assert (report.done, report.dead) == (1, 0)
    assert got == [(size, b"end")]


async def test_an_input_that_changes_size_while_read_fails_its_attempt(
    inbox: Path, state: Path
) -> None:
    (path,) = make_files(inbox, 1, size=100)

    async def handle(ctx: TaskContext) -> None:
        with path.open("r+b") as f:  # truncated under the reader after it was opened
            f.truncate(10)
        await ctx.read_bytes()

    report = await Batch(handle, source=inbox, state=state, max_attempts=1, settle=0).run()

    assert (report.done, report.dead) == (0, 1)
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error == (
        "InputChangedError: the input changed size while it was read: "
        "100 bytes when opened, 10 read"
    )


class _Custom(BaseException):
    pass


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), _Custom()])
async def test_a_handler_raising_a_base_exception_stops_the_run_cleanly(
    inbox: Path, state: Path, raised: BaseException
) -> None:
    make_files(inbox, 5)

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "f00002.txt":
            raise raised
        await anyio.sleep(0.01)

    with anyio.fail_after(20), pytest.raises(type(raised)) as info:
        await Batch(handle, source=inbox, state=state, concurrency=2, settle=0).run()

    assert info.value is raised
    assert any("raised by the handler for 'f00002.txt'" in n for n in info.value.__notes__)
    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]
    assert rows(state, "SELECT count(*) FROM items WHERE state = 'running'") == [(0,)]
    ((status,),) = rows(state, "SELECT exit_status FROM runs")
    assert (
        status
        == f"error: the handler raised {type(raised).__name__}"
        + (": 3" if isinstance(raised, SystemExit) else "")
        + " for 'f00002.txt'"
    )


async def test_a_stray_cancelled_error_from_a_handler_fails_only_that_attempt(
    inbox: Path, state: Path
) -> None:
    import asyncio

    make_files(inbox, 5)

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "f00001.txt":
            raise asyncio.CancelledError  # nothing cancelled it

    report = await Batch(handle, source=inbox, state=state, max_attempts=1, settle=0).run()

    assert (report.done, report.dead, report.ok) == (4, 1, False)
    ((error,),) = rows(state, "SELECT last_error FROM items WHERE state = 'dead'")
    assert error.startswith("CancelledError: the handler raised it, but nothing in the run")
    assert rows(state, "SELECT exit_status FROM runs") == [("failed",)]


@pytest.mark.parametrize("delivered", [True, False])
async def test_a_handler_that_cancels_its_own_task_fails_only_its_attempt(
    inbox: Path, state: Path, delivered: bool
) -> None:
    # Regression: task.cancelling() was taken for a cancellation of the run, which then ended
    # at once with exit 0 while the other settled files stayed pending.
    import asyncio

    make_files(inbox, 6)
    attempts: dict[str, list[int]] = {}

    async def handle(ctx: TaskContext) -> None:
        attempts.setdefault(ctx.entry.relpath, []).append(ctx.attempt)
        if ctx.attempt == 1 and ctx.entry.relpath == "f00001.txt":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            if delivered:
                await asyncio.sleep(0)
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(60):
        report = await Batch(handle, source=inbox, state=state, backoff=0.01, settle=0).run()

    assert (report.done, report.ok) == (6, True), report
    assert attempts["f00001.txt"] == [1, 2]
    assert all(a == [1] for k, a in attempts.items() if k != "f00001.txt")
    assert rows(state, "SELECT state, count(*) FROM items GROUP BY state") == [("done", 6)]
    assert rows(state, "SELECT exit_status FROM runs") == [("ok",)]


async def test_a_watch_goes_on_after_a_stray_cancelled_error(inbox: Path, state: Path) -> None:
    import asyncio

    make_files(inbox, 1)
    calls: list[int] = []
    batch: Batch

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise asyncio.CancelledError
        batch.stop()

    batch = Batch(handle, source=inbox, state=state, backoff=0, poll=0.05, settle=0)
    with anyio.fail_after(20):
        report = await batch.watch()
    assert calls == [1, 2]
    assert (report.done, report.failed, report.stopped) == (1, 1, True)


async def test_attempts_cut_short_by_stops_do_not_spend_the_failure_budget(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    runs: list[tuple[str, int]] = []
    # Set when both items of the current run are in their handler.
    arrived = [anyio.Event()]

    async def handle(ctx: TaskContext) -> None:
        runs.append((ctx.entry.relpath, ctx.attempt))
        if len(runs) % 2 == 0:
            arrived[0].set()
        if ctx.entry.relpath == "f00000.txt" and ctx.attempt == 3:
            return  # it succeeds once its runner lives long enough
        await anyio.sleep(3600)

    def batch() -> Batch:
        return Batch(
            handle,
            source=inbox,
            state=state,
            max_attempts=1,
            max_interruptions=3,
            concurrency=2,
            settle=0,
        )

    for round_ in range(3):
        arrived[0] = anyio.Event()
        # The run dies with its items in their handler (the third time, once f00000's
        # success is committed).
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(batch().run)
                await arrived[0].wait()
                while round_ == 2 and state_counts(state).get("done", 0) == 0:  # noqa: ASYNC110 (its commit)
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
    report = await batch().run()

    # f00000 was cut short twice, yet max_attempts=1 did not make it dead; f00001, cut short
    # as often as max_interruptions allows, is given up on without running a fourth time.
    assert (report.done, report.dead) == (0, 1)
    assert [n for name, n in runs if name == "f00001.txt"] == [1, 2, 3]
    assert rows(
        state,
        "SELECT relpath, state, attempts, interrupted, last_error FROM items ORDER BY relpath",
    ) == [
        (b"f00000.txt", "done", 3, 2, None),
        (
            b"f00001.txt",
            "dead",
            3,
            3,
            "given up on: the runner was killed or stopped during 3 of its 3 attempts "
            "(max_interruptions=3); does this file crash or stall its runner?",
        ),
    ]


async def test_settings_beyond_their_bounds_are_refused_with_the_value(
    inbox: Path, state: Path
) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    settings: dict[str, Any] = {
        "settle": 1e308,
        "lease": 1e12,
        "concurrency": 1_000_000,
        "claim_batch": 100_000,
    }
    for setting, value in settings.items():
        with pytest.raises(ConfigurationError, match=f"setting '{setting}' has value"):
            Batch(handle, source=inbox, state=state, **{setting: value})


def test_a_runner_resumed_after_a_takeover_starts_none_of_the_items_it_had_leased(
    inbox: Path, state: Path
) -> None:
    # Regression: a runner whose event loop stalled past its leases (a suspended process, a
    # blocking handler) went on starting the items queued before the stall, although another
    # runner had taken them over, until its next heartbeat noticed.
    import threading

    make_files(inbox, 6)
    started: dict[str, list[str]] = {"a": [], "b": []}

    def runner(name: str) -> Batch:
        async def handle(ctx: TaskContext) -> None:
            started[name].append(ctx.entry.relpath)
            if name == "a" and len(started["a"]) == 1:
                time.sleep(3.3)  # noqa: ASYNC251 - the stall: past the 3 s lease
                taker = threading.Thread(target=anyio.run, args=(runner("b").run,))
                taker.start()
                taker.join()

        return Batch(handle, source=inbox, state=state, lease=3, concurrency=1, settle=0)

    with pytest.raises(LockLostError, match="taken over"):
        anyio.run(runner("a").run)

    assert sorted(started["b"]) == [f"f{i:05d}.txt" for i in range(6)]
    assert started["a"] == ["f00000.txt"]
    assert state_counts(state) == {"done": 6}
    assert rows(state, "SELECT count(*) FROM runners") == [(0,)]


async def test_a_context_and_its_entry_are_read_only(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    refused: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        for obj, name in ((ctx, "key"), (ctx, "attempt"), (ctx, "data"), (ctx.entry, "size")):
            with pytest.raises(AttributeError):
                setattr(obj, name, 1)
            refused.append(name)
        with pytest.raises(AttributeError):
            ctx.anything_else = 1  # type: ignore[attr-defined]
        ctx.data["mine"] = 1  # the handler's own values go here
        assert (ctx.key, ctx.attempt, ctx.entry.size, ctx.data) == (ctx.key, 1, 16, {"mine": 1})

    report = await Batch(handle, source=inbox, state=state, settle=0).run()
    assert report.done == 1
    assert refused == ["key", "attempt", "data", "size"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_heartbeat_beside_a_commit_reports_no_lease_lost(
    inbox: Path,
    state: Path,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A heartbeat that renews the leases of items whose outcomes were just committed (still in
    # flight until the committer returns) found their rows no longer running; it called them
    # "taken over by others" though no other runner existed.
    from asyncbatch import _failpoints as failpoints

    where = request.getfixturevalue("pg_dsn") if backend == "postgres" else state
    make_files(inbox, 20)
    monkeypatch.setattr(failpoints, "ACTIVE", failpoints.parse("after-commit=sleep(1.0)"))

    async def handle(ctx: TaskContext) -> None:
        await anyio.sleep(0.1)

    with caplog.at_level("INFO", logger="asyncbatch"):
        report = await Batch(
            handle, source=inbox, state=where, lease=3, concurrency=4, settle=0
        ).run()

    assert (report.done, report.lost) == (20, 0)
    assert "taken over" not in caplog.text


async def test_a_run_cancelled_just_after_a_handler_returned_records_it_done(
    inbox: Path, state: Path
) -> None:
    # (The commit group was lost to the cancellation, which reached the committer at the
    # ledger's lock: the item went back to pending and the next run handled it again.)
    make_files(inbox, 1)
    calls: list[int] = []
    returned = asyncio.Event()

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        returned.set()

    task = asyncio.create_task(Batch(handle, source=inbox, state=state, settle=0).run())
    await returned.wait()
    await asyncio.sleep(0)  # the handler returns; its outcome waits for its commit group
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state_counts(state) == {"done": 1}
    report = await Batch(handle, source=inbox, state=state, settle=0).run()
    assert calls == [1]
    assert (report.seen, report.done_before) == (1, 1)


@pytest.mark.parametrize("gone", ["source", "archive"])
async def test_a_batch_whose_directory_went_away_since_it_was_made_says_so_in_one_line(
    inbox: Path, state: Path, tmp_path: Path, gone: str
) -> None:
    # An application makes its Batch once and runs it again and again; an inbox deleted or
    # unmounted since raised FileNotFoundError from deep in the run (a traceback, a history
    # row "error: FileNotFoundError ..."), not the ConfigurationError the Batch() gave.
    make_files(inbox, 1)
    archive = tmp_path / "archive"
    archive.mkdir()

    async def handle(ctx: TaskContext) -> None:
        pass

    batch = Batch(handle, source=inbox, state=state, on_done=f"move:{archive}", settle=0)
    away = inbox if gone == "source" else archive
    away.rename(tmp_path / "away")

    with pytest.raises(ConfigurationError, match=f"value '{away}': no such directory"):
        await batch.run()
    assert "did not start" in batch.health().check("running").detail
    assert not state.exists() or rows(state, "SELECT count(*) FROM runs") == [(0,)]

    (tmp_path / "away").rename(away)
    report = await batch.run()
    assert report.done == 1
    assert [p.name for p in archive.iterdir()] == ["f00000.txt"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_leases_a_failed_run_could_not_give_back_go_with_its_runner_record(
    inbox: Path,
    state: Path,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run that died of a full disk gave its runner record and lock back after its release of
    # its leases had failed (a smaller transaction, which the disk still had room for): the
    # next run found leases of an owner with no record, "held by other runners" until they
    # ran out (57 s with the default lease), though no other runner existed.
    from asyncbatch import _failpoints as failpoints
    from asyncbatch._exceptions import LedgerError
    from asyncbatch._ledger.postgres import PostgresLedger
    from asyncbatch._ledger.sqlite import SQLiteLedger

    from .conftest import ledger_rows

    where = request.getfixturevalue("pg_dsn") if backend == "postgres" else str(state)
    make_files(inbox, 12)
    monkeypatch.setattr(failpoints, "ACTIVE", failpoints.parse("before-commit=oserror(ENOSPC)"))
    tried: list[int] = []

    async def full(self: object, job: str, owner: str, items: object) -> None:
        tried.append(len(items))  # type: ignore[arg-type]
        raise LedgerError("database or disk is full")

    ledger_class = PostgresLedger if backend == "postgres" else SQLiteLedger
    monkeypatch.setattr(ledger_class, "release_items", full)

    async def handle(ctx: TaskContext) -> None:
        pass

    with pytest.raises(LedgerError):  # (the release's error, raised last)
        await Batch(handle, source=inbox, state=where, concurrency=4, settle=0).run()
    assert len(tried) == 1  # it had leases to give back, and could not
    assert tried[0] > 0
    leased = ledger_rows(where, "SELECT count(*) FROM items WHERE state = 'running'")[0][0]
    runners = ledger_rows(where, "SELECT count(*) FROM runners")[0][0]
    assert (leased, runners) == (0, 0)  # given back with the runner's record

    monkeypatch.undo()
    started = time.monotonic()
    report = await Batch(handle, source=inbox, state=where, settle=0, wait=False).run()
    assert (report.seen, report.done + report.done_before, report.held) == (12, 12, 0)
    assert time.monotonic() - started < 20  # (never waited for a lease to run out)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_leases_of_an_owner_without_a_runner_record_are_taken_over_at_once(
    inbox: Path,
    state: Path,
    backend: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What an earlier asyncbatch left when a run's release of its leases failed and that of
    # its record did not: leases of an owner that has no runner record. Nobody can renew them:
    # their owner is gone, and the next run puts them back at once, as it does a dead runner's.
    from .conftest import ledger_rows

    where = request.getfixturevalue("pg_dsn") if backend == "postgres" else str(state)
    make_files(inbox, 10)

    async def handle(ctx: TaskContext) -> None:
        pass

    first = await Batch(handle, source=inbox, state=where, settle=0).run()
    assert first.done == 10
    orphan = f"""
        UPDATE items SET state = 'running', owner = 'gone00000000', fence = fence + 1,
                         lease_until = {time.time() + 600!r}
        WHERE key IN (SELECT key FROM items ORDER BY key LIMIT 3)"""
    if backend == "postgres":
        ledger_rows(where, orphan)
    else:
        with sqlite3.connect(state) as db:
            db.execute(orphan)
    assert ledger_rows(where, "SELECT count(*) FROM items WHERE state = 'running'")[0][0] == 3

    with caplog.at_level("WARNING", logger="asyncbatch"):
        report = await Batch(handle, source=inbox, state=where, settle=0, wait=False).run()
    assert (report.seen, report.done, report.done_before, report.held) == (10, 3, 7, 0)
    assert "3 items of runners that are gone put back" in caplog.text
