"""Watch mode with change events: real inotify events in tmp_path wake the watch long before
its poll; the settle rule holds all the same; nothing of the watcher outlives the watch."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import anyio
import pytest

from asyncbatch import Batch, TaskContext
from asyncbatch._pipeline import events

from .conftest import make_files, polls_after, state_counts
from .test_watch import append_slowly

#: Far longer than any test waits: whatever a test sees handled came through an event (or a
#: look scheduled after one), not through a poll.
LONG_POLL = 300.0

pytest.importorskip("watchfiles")


def inotify_fds() -> int:
    """inotify descriptors this process holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                count += 1
        except OSError:
            pass
    return count


def notify_threads() -> list[str]:
    """Names of this process's threads that belong to the notify crate (watchfiles)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:
            continue
        if "notify" in name:
            names.append(name)
    return names


class Recorder:
    """A handler that records each call and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self._changed = anyio.Event()

    async def __call__(self, ctx: TaskContext) -> None:
        self.calls.append((ctx.entry.relpath, await ctx.read_bytes()))
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int, within: float = 20.0) -> None:
        with anyio.fail_after(within):
            while len(self.calls) < count:
                await self._changed.wait()


async def test_a_dropped_file_is_handled_long_before_the_poll(inbox: Path, state: Path) -> None:
    make_files(inbox, 1, prefix="early")
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0.2, poll=LONG_POLL)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await handle.wait_for(1)  # the watch is up (the first scan found this one)
        (inbox / "new.csv").write_bytes(b"a,b\n1,2\n")
        await handle.wait_for(2)
        batch.stop()
    assert [rel for rel, _ in handle.calls] == ["early00000.txt", "new.csv"]
    assert state_counts(state) == {"done": 2}


async def test_a_file_still_being_written_waits_until_settled_and_unchanged(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 1, prefix="early")
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=1.0, poll=LONG_POLL)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await handle.wait_for(1)
        # Every write is an event and refreshes the mtime: not one of them may start it (the
        # writer's pauses, 50 ms, are far shorter than the settle window).
        content = await append_slowly(inbox / "slow.csv", 12, 0.05)
        await handle.wait_for(2)
        # A file dropped after the last write is handled after every look the writes asked
        # for: by then slow.csv would have been handled again, if it were to be.
        (inbox / "after.csv").write_bytes(b"after")
        await handle.wait_for(3)
        batch.stop()
    assert handle.calls[1:] == [("slow.csv", content), ("after.csv", b"after")]


async def test_a_file_moved_in_with_an_old_mtime_waits_settle_seconds_seen_unchanged(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1, prefix="early")
    outside = make_files(tmp_path / "elsewhere", 1, prefix="old", age=3600)[0]
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0.3, poll=LONG_POLL)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await handle.wait_for(1)
        os.rename(outside, inbox / outside.name)  # one event; its mtime an hour old
        await handle.wait_for(2)
        batch.stop()
    assert [rel for rel, _ in handle.calls] == ["early00000.txt", "old00000.txt"]


async def test_a_burst_of_files_is_handled_exactly_once_each(inbox: Path, state: Path) -> None:
    make_files(inbox, 1, prefix="early")
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0.2, poll=LONG_POLL, concurrency=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await handle.wait_for(1)
        for i in range(400):
            (inbox / f"burst{i:04d}.csv").write_bytes(b"x" * (i % 7 + 1))
            # hidden, temporary and deleted names: events that must cause no work
            (inbox / f".hidden{i}").write_bytes(b"h")
            (inbox / f"part{i}.tmp").write_bytes(b"t")
            os.unlink(inbox / f"part{i}.tmp")
            if i % 50 == 0:
                await anyio.sleep(0.01)
        await handle.wait_for(401, within=60)
        # Handled after every look the burst's events asked for: nothing was handled twice.
        (inbox / "after.csv").write_bytes(b"after")
        await handle.wait_for(402)
        batch.stop()
    counts = Counter(rel for rel, _ in handle.calls)
    assert handle.calls[-1] == ("after.csv", b"after")
    assert len(counts) == 402
    assert set(counts.values()) == {1}
    assert not [rel for rel in counts if rel.startswith(".") or rel.endswith(".tmp")]
    assert state_counts(state) == {"done": 402}


async def test_recursive_watch_handles_files_in_new_subdirectories(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1, prefix="early")
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0.2, poll=LONG_POLL, recursive=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await handle.wait_for(1)
        (inbox / "a" / "b").mkdir(parents=True)
        (inbox / "a" / "b" / "first.csv").write_bytes(b"first")
        # Handled once the watch took in the new directories (their event, then a scan of
        # them): from then on they are watched too.
        await handle.wait_for(2)
        (inbox / "a" / "b" / "deep.csv").write_bytes(b"deep")
        # A directory that arrives whole: its files send no events of their own.
        make_files(tmp_path / "whole", 3, prefix="w")
        os.rename(tmp_path / "whole", inbox / "whole")
        await handle.wait_for(6)
        batch.stop()
    assert sorted(rel for rel, _ in handle.calls) == [
        "a/b/deep.csv",
        "a/b/first.csv",
        "early00000.txt",
        "whole/w00000.txt",
        "whole/w00001.txt",
        "whole/w00002.txt",
    ]


async def test_with_events_off_polling_still_finds_files_and_no_watcher_runs(
    inbox: Path, state: Path
) -> None:
    before = inotify_fds()
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0.1, poll=0.1, events=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await polls_after(batch, 1)  # the files come after the first scan: a poll finds them
        make_files(inbox, 3, age=0)
        await handle.wait_for(3)
        assert inotify_fds() == before
        batch.stop()
    assert state_counts(state) == {"done": 3}


async def test_stop_ends_the_watch_promptly_and_leaves_no_watcher_behind(
    inbox: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop that waited for the poll (LONG_POLL) or for the watcher thread's wait (made as
    # long here) would take minutes: the bounds below are generous for a loaded machine
    # (a stop is seen within watchfiles' step, 50 ms) and still fail such a stop.
    monkeypatch.setattr(events, "_TIMEOUT_MS", int(LONG_POLL * 1000))
    fds, threads = inotify_fds(), notify_threads()
    make_files(inbox, 1)
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0, poll=LONG_POLL)
    ended = anyio.Event()

    async def watch() -> None:
        await batch.watch()
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await handle.wait_for(1)
        assert inotify_fds() == fds + 1  # the events are on
        batch.stop()
        with anyio.fail_after(LONG_POLL / 5):  # far less than the poll, or the thread's wait
            await ended.wait()
    assert inotify_fds() == fds
    with anyio.fail_after(LONG_POLL / 5):  # the notify thread ends once its watcher is dropped
        while len(notify_threads()) > len(threads):  # noqa: ASYNC110  (a thread: no event)
            await anyio.sleep(0.02)


async def test_cancelling_the_watch_ends_it_promptly_and_closes_the_watcher(
    inbox: Path, state: Path
) -> None:
    fds = inotify_fds()
    make_files(inbox, 1)
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0, poll=LONG_POLL)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.watch)
            await handle.wait_for(1)
            tg.cancel_scope.cancel()
    assert inotify_fds() == fds
    assert state_counts(state) == {"done": 1}


async def test_without_watchfiles_one_warning_and_polling_goes_on(
    inbox: Path, state: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # `import watchfiles` fails
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.1)
    with caplog.at_level(logging.WARNING, logger="asyncbatch"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.watch)
            make_files(inbox, 2)
            await handle.wait_for(2)
            batch.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "watchfiles is not installed" in warnings[0]
    assert "polling every 0.1s" in warnings[0]


def test_importing_asyncbatch_does_not_import_watchfiles() -> None:
    code = "import sys, asyncbatch, asyncbatch._cli.main; print('watchfiles' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_a_watcher_error_is_one_warning_and_polling_goes_on(
    inbox: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_files(inbox, 1)
    handle = Recorder()
    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.2)
    with caplog.at_level(logging.WARNING, logger="asyncbatch"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.watch)
            await handle.wait_for(1)
            # A name that is not UTF-8: the watcher cannot decode it and fails (a real
            # watchfiles error); the watch goes on by polling and handles it all the same.
            (inbox / os.fsdecode(b"caf\xe9.csv")).write_bytes(b"latin-1 name")
            (inbox / "after.csv").write_bytes(b"after")
            await handle.wait_for(3)
            batch.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("change events are off: ")
    assert sorted(rel for rel, _ in handle.calls) == sorted(
        ["f00000.txt", "after.csv", os.fsdecode(b"caf\xe9.csv")]
    )


LIMITED = textwrap.dedent(
    """
    import logging, sys, anyio
    from asyncbatch import Batch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    async def main() -> None:
        done = anyio.Event()

        async def handle(ctx):
            done.set()

        batch = Batch(handle, source=sys.argv[1], state=sys.argv[2], settle=0, poll=0.2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.watch)
            with anyio.fail_after(20):
                await done.wait()
            batch.stop()
        print("handled")

    anyio.run(main)
    """
)


def test_the_inotify_watch_limit_is_one_warning_and_polling_goes_on(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # The limit lowered to 0 in a user namespace of its own: the machine's stays as it is.
    unshare = shutil.which("unshare")
    probe = None
    if unshare is not None:
        probe = subprocess.run(
            [unshare, "-U", "-r", "sh", "-c", "echo 0 > /proc/sys/user/max_inotify_watches"],
            capture_output=True,
        )
    if probe is None or probe.returncode != 0:
        pytest.skip("no user namespace in which to lower the inotify watch limit")
    make_files(inbox, 1)
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    out = subprocess.run(
        [
            unshare or "unshare",
            "-U",
            "-r",
            "sh",
            "-c",
            'echo 0 > /proc/sys/user/max_inotify_watches && exec "$@"',
            "sh",
            sys.executable,
            str(script),
            str(inbox),
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "handled"
    lines = [line for line in out.stderr.splitlines() if line.startswith("WARNING")]
    assert len(lines) == 1, out.stderr
    assert "watch limit reached" in lines[0]
    assert "fs.inotify.max_user_watches" in lines[0]


async def test_a_failed_item_is_retried_when_due_not_at_the_next_poll(
    inbox: Path, state: Path
) -> None:
    attempts: list[int] = []
    third = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise TimeoutError("upstream slow")
        third.set()

    make_files(inbox, 1)
    batch = Batch(handle, source=inbox, state=state, settle=0, poll=LONG_POLL, backoff=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(20):
            await third.wait()
        batch.stop()
    assert attempts == [1, 2, 3]
    assert state_counts(state) == {"done": 1}
