"""Files still being copied are never handled as whole, whatever the copier does to the mtime.

Copy tools that keep the source's times (SMB and Windows copies, some sync tools) put the old
mtime back while they write, and a preallocating one keeps the size too. The ctime, set by the
kernel at every write and at every ``utime``, is the time no writer can set back: a file is
settled once its mtime *and* its ctime are ``settle`` seconds old.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asyncbatch import Batch, Report, TaskContext

from .conftest import (
    HANDLERS,
    cli,
    make_files,
    polls_after,
    rows,
    state_counts,
    until,
    until_settled,
)

MONTH = 30 * 86400.0


class Copier(threading.Thread):
    """Writes ``chunks`` chunks into ``path`` every ``pause`` seconds, setting its mtime back a
    month after each: preallocated to the final size first (``prealloc``), or appended. With
    ``hold``, the last chunk is written again (the same bytes) every ``pause`` seconds until
    ``finish`` is set: a copy that lasts as long as the test needs it to."""

    def __init__(
        self,
        path: Path,
        *,
        chunks: int,
        chunk: int,
        pause: float,
        prealloc: bool,
        hold: bool = False,
    ):
        super().__init__(daemon=True)
        self.path, self.chunks, self.chunk, self.pause = path, chunks, chunk, pause
        self.prealloc = prealloc
        self.finish = threading.Event()
        if not hold:
            self.finish.set()
        self.started_writing = threading.Event()
        self.content = b"".join(bytes([65 + i % 26]) * chunk for i in range(chunks))

    def run(self) -> None:
        old = time.time() - MONTH
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if self.prealloc:
                os.ftruncate(fd, len(self.content))
            i = 0
            while i < self.chunks or not self.finish.is_set():
                at = min(i, self.chunks - 1) * self.chunk
                os.pwrite(fd, self.content[at : at + self.chunk], at)
                os.utime(fd, (old, old))
                self.started_writing.set()
                time.sleep(self.pause)
                i += 1
        finally:
            os.close(fd)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def errors(state: Path) -> list[str]:
    """The items' last errors."""
    return [str(e) for (e,) in rows(state, "SELECT last_error FROM items WHERE last_error <> ''")]


@pytest.mark.parametrize("prealloc", [True, False], ids=["prealloc", "append"])
async def test_a_run_during_a_copy_that_sets_the_mtime_back_leaves_the_file_alone(
    inbox: Path, state: Path, prealloc: bool
) -> None:
    # The copy goes on (a write every 50 ms) until the run during it has ended.
    copier = Copier(
        inbox / "big.csv", chunks=40, chunk=4096, pause=0.05, prealloc=prealloc, hold=True
    )
    handled: dict[str, str] = {}

    async def handle(ctx: TaskContext) -> None:
        handled[ctx.entry.relpath] = digest(await ctx.read_bytes())

    copier.start()
    await anyio.to_thread.run_sync(copier.started_writing.wait)
    try:
        during = await Batch(handle, source=inbox, state=state, settle=1.0, on_done="delete").run()
    finally:
        copier.finish.set()
    await anyio.to_thread.run_sync(copier.join)

    assert "big.csv" not in handled
    assert (inbox / "big.csv").read_bytes() == copier.content  # not deleted mid-copy
    assert (during.seen, during.done) == (0, 0)
    after = await Batch(handle, source=inbox, state=state, settle=0, on_done="delete").run()
    assert after.done == 1
    assert handled["big.csv"] == digest(copier.content)
    assert not (inbox / "big.csv").exists()


@pytest.mark.parametrize("prealloc", [True, False], ids=["prealloc", "append"])
async def test_watch_handles_a_copy_that_sets_the_mtime_back_once_whole(
    inbox: Path, state: Path, prealloc: bool
) -> None:
    # The copy lasts twice the settle window and more: a watch that trusted size, mtime and
    # inode would take it half-written (they do not change while it is written).
    copier = Copier(inbox / "big.csv", chunks=24, chunk=8192, pause=0.15, prealloc=prealloc)
    handled: list[str] = []
    done = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        handled.append(digest(await ctx.read_bytes()))
        done.set()

    batch = Batch(handle, source=inbox, state=state, settle=1.5, poll=0.1, on_done="delete")
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        copier.start()
        with anyio.fail_after(60):
            await done.wait()
        batch.stop()
    copier.join()

    assert handled == [digest(copier.content)]
    assert state_counts(state) == {"done": 1}


async def test_an_input_written_to_while_it_is_read_fails_the_attempt(
    inbox: Path, state: Path
) -> None:
    (path,) = make_files(inbox, 1, size=4096)

    async def handle(ctx: TaskContext) -> None:
        # A preallocating copier writes into it meanwhile: same size, its mtime set back.
        st = os.stat(path)
        with path.open("r+b") as f:
            f.write(b"X" * 100)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        await ctx.read_bytes()

    report = await Batch(handle, source=inbox, state=state, settle=0, max_attempts=1).run()

    assert report.dead == 1
    assert state_counts(state) == {"dead": 1}
    (error,) = errors(state)
    assert "InputChangedError" in error
    assert "ctime" in error


async def test_an_input_removed_while_its_handler_runs_is_read_whole_and_done(
    inbox: Path, state: Path
) -> None:
    # Removed (or renamed over) after it was opened: its ctime changed for that, not for a
    # write; its bytes, read from the descriptor opened for the item, are the file's. It was
    # failed as "written to (its ctime changed)".
    (path,) = make_files(inbox, 1, size=4096)
    content = path.read_bytes()
    read: list[bytes] = []

    async def handle(ctx: TaskContext) -> None:
        path.unlink()
        read.append(await ctx.read_bytes())

    report = await Batch(handle, source=inbox, state=state, settle=0, max_attempts=1).run()

    assert read == [content]
    assert (report.done, report.dead) == (1, 0)
    assert state_counts(state) == {"done": 1}


async def test_an_input_written_to_while_it_is_streamed_fails_the_attempt(
    inbox: Path, state: Path
) -> None:
    (path,) = make_files(inbox, 1, size=4096)
    read: list[int] = []

    async def handle(ctx: TaskContext) -> None:
        async with ctx.open() as f:
            read.append(len(await f.read(1024)))
            st = os.stat(path)
            with path.open("r+b") as w:
                w.seek(2048)
                w.write(b"X" * 100)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            read.append(len(await f.read()))

    report = await Batch(handle, source=inbox, state=state, settle=0, max_attempts=1).run()

    assert read == [1024, 3072]
    assert report.dead == 1
    (error,) = errors(state)
    assert "the input changed while it was handled" in error


async def test_a_file_written_to_between_its_scan_and_its_start_waits_for_the_next_scan(
    inbox: Path, state: Path
) -> None:
    first, second = make_files(inbox, 2, size=4096)
    await until_settled(0.5, first, second)
    seen: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        seen.append(ctx.entry.relpath)
        if ctx.entry.relpath == first.name:
            # The second file was scanned settled; a copier writes into it now.
            st = os.stat(second)
            with second.open("r+b") as f:
                f.write(b"X" * 10)
            os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns))

    report = await Batch(handle, source=inbox, state=state, settle=0.5, concurrency=1).run()
    # The settle window passes only after the scan that found both settled: scan again then.
    # The run looks at it again before it ends: there, not settled, it is counted so (not
    # vanished, not seen).
    assert seen == [first.name]
    assert (report.seen, report.done, report.vanished, report.unsettled) == (1, 1, 0, 1)
    await until_settled(0.5, second)
    again = await Batch(handle, source=inbox, state=state, settle=0.5, concurrency=1).run()
    assert again.done == 1
    assert seen == [first.name, second.name]
    assert state_counts(state) == {"done": 2}


YEAR_2300_NS = 10_413_792_000 * 10**9  # past the signed 64-bit nanoseconds of 2262


async def test_a_file_from_after_2262_is_reported_not_settled_by_a_run(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 1)
    far = inbox / "far.csv"
    far.write_text("from the future")
    os.utime(far, ns=(YEAR_2300_NS, YEAR_2300_NS))
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

    report = await Batch(handle, source=inbox, state=state, settle=0).run()

    assert handled == ["f00000.txt"]
    assert (report.seen, report.done, report.unsettled, report.future) == (1, 1, 1, 1)
    assert "1 file not settled yet (1 changed at a time ahead of this host's clock)" in str(report)


async def test_a_watch_lives_on_when_a_file_from_after_2262_is_dropped_in(
    inbox: Path, state: Path
) -> None:
    handled: list[str] = []
    got = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        got.set()

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        far = inbox / "far.csv"
        far.write_text("from the future")
        os.utime(far, ns=(YEAR_2300_NS, YEAR_2300_NS))
        (inbox / "now.csv").write_text("today")
        with anyio.fail_after(30):
            await got.wait()
        batch.stop()

    assert handled == ["now.csv"]
    assert state_counts(state) == {"done": 1}


def test_explain_says_which_time_keeps_a_file_from_settling(inbox: Path, state: Path) -> None:
    far = inbox / "far.csv"
    far.write_text("from the future")
    os.utime(far, ns=(YEAR_2300_NS, YEAR_2300_NS))
    copying = inbox / "copying.csv"
    copying.write_text("half")
    os.utime(copying, (time.time() - MONTH,) * 2)  # the mtime set back: the ctime is now
    # (--settle 60: neither file is handled, and explain's answer is about settling alone.)
    run = cli("run", f"{HANDLERS}:record", "--source", inbox, "--state", state, "--settle", "60")
    assert run.returncode == 0

    def explain(path: Path) -> tuple[str, str]:
        out = cli("explain", path, "--source", inbox, "--state", state, "--settle", "60")
        assert out.returncode == 0, out.stderr
        verdict, message = out.stdout.splitlines()[:2]
        return verdict, message

    verdict, message = explain(far)
    assert verdict.endswith(": not-settled")
    assert "in the future by this host's clock" in message
    verdict, message = explain(copying)
    assert verdict.endswith(": not-settled")
    assert "written to (ctime; its mtime says earlier)" in message
    assert "--settle 60" in message


def test_explain_says_ahead_of_the_clock_only_what_is_later_than_the_clock(inbox: Path) -> None:
    # explain reads the clock (``now``) and then looks at the file: one written in between
    # is not settled (its settle decision is ``now``'s), but not in the future either.
    from asyncbatch._cli.explain_objects import _unsettled as object_unsettled
    from asyncbatch._cli.items import _unsettled
    from asyncbatch._sources.store import ObjectInfo

    fresh = inbox / "fresh.csv"
    fresh.write_text("written after explain read its clock")
    skewed = inbox / "skewed.csv"
    skewed.write_text("from a host an hour ahead")
    hour_ahead = time.time() + 3600
    os.utime(skewed, (hour_ahead, hour_ahead))
    now = time.time() - 10  # the clock explain read, before the files were written
    clock = time.time()  # the clock read after their stat

    said = _unsettled(fresh.stat(), 60, now, clock)
    assert said is not None
    assert "in the future" not in said
    assert "s ago" in said
    said = _unsettled(skewed.stat(), 60, now, clock)
    assert said is not None
    assert "in the future by this host's clock" in said
    assert _unsettled(fresh.stat(), 5, now + 60, clock) is None  # settled: as before

    since = ObjectInfo("in/a.csv", 1, time.time_ns() - 10**9, None, None, 1)
    said = object_unsettled(since, 60, now, clock)
    assert said is not None
    assert "in the future" not in said
    ahead = ObjectInfo("in/b.csv", 1, int(hour_ahead * 1e9), None, None, 2)
    said = object_unsettled(ahead, 60, now, clock)
    assert said is not None
    assert "in the future by this host's clock" in said


async def test_a_watch_counts_its_files_not_settled_yet_in_its_metrics(
    inbox: Path, state: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    make_files(inbox, 2)
    far = inbox / "far.csv"
    far.write_text("from the future")
    os.utime(far, ns=(YEAR_2300_NS, YEAR_2300_NS))
    done = anyio.Event()
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if len(handled) == 2:
            done.set()

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05, metrics=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(30):
            await done.wait()
        # The gauge is set after each poll: read it as a poll after the two were handled left
        # it (right after, it may still count them as they were first seen).
        await polls_after(batch)
        transport = httpx.ASGITransport(app=batch.metrics_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://batch") as client:
            text = (await client.get("/metrics")).text
        batch.stop()

    found = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "asyncbatch_files_unsettled"
    }
    assert found == {"asyncbatch_files_unsettled": 1.0}


# -- done files that wait to settle again ----------------------------------------------------------


async def nothing(ctx: TaskContext) -> None:
    pass


#: (mode, ready rules, shared): a one-shot run and a watch, with the default rule (age) alone,
#: among runners sharing the job, and with ``stable:2`` (files still being looked at).
DONE_BEFORE_CASES = [
    pytest.param("run", None, False, id="run"),
    pytest.param("run", None, True, id="run-shared"),
    pytest.param("run", ["stable:2"], False, id="run-stable"),
    pytest.param("watch", None, False, id="watch"),
    pytest.param("watch", None, True, id="watch-shared"),
    pytest.param("watch", ["stable:2"], False, id="watch-stable"),
]


@pytest.mark.parametrize(("mode", "ready", "shared"), DONE_BEFORE_CASES)
async def test_done_files_whose_ctime_changed_are_done_before_not_waiting_to_settle(
    inbox: Path, any_state: str, mode: str, ready: list[str] | None, shared: bool
) -> None:
    """A ``chmod`` (a ``touch -d``, a link) sets a done file's ctime to now and keeps its key:
    it is not settled (or not seen unchanged) yet, but it is done, and never taken again. A
    run, or a watch stopped before such files settle, counts them done before: it said "0
    seen: 0 done; 20 files not settled yet", and ``status`` "20 not settled yet (taken once
    they settle)", with all 20 done in the ledger."""
    paths = make_files(inbox, 20)
    settings: dict[str, Any] = {"source": inbox, "state": any_state, "ready": ready}
    first = await Batch(nothing, **settings, settle=0, shared=shared).run()
    assert first.done == 20, str(first)
    for path in paths:
        os.chmod(path, 0o600)  # the ctime is now; size, mtime and inode (the key) are kept
    rule = "unsettled" if ready is None else "unstable"
    # Settled in 30 s: the run's (or the watch's) stop comes long before.
    batch = Batch(nothing, **settings, settle=30, poll=0.1, shared=shared)
    report: Report | None = None

    async def go() -> None:
        nonlocal report
        report = await (batch.run() if mode == "run" else batch.watch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        if mode == "watch" or ready is not None:  # a watch, or a run's looks: stopped early
            await until(lambda: getattr(batch.statistics(), rule, 0) == 20 or report is not None)
            batch.stop()
    assert report is not None
    counts = (report.seen, report.done, report.done_before, getattr(report, rule))
    assert counts == (20, 0, 20, 0), str(report)
    assert "not settled" not in str(report)
    assert "not ready" not in str(report)
    status = cli("status", "--state", any_state)
    assert status.returncode == 0, status.stderr
    text = " ".join(status.stdout.split())
    assert "20 seen: 0 done, 20 done before" in text, text
    assert "left in the source by the last run (at its end): nothing it found" in text, text
    assert "taken once" not in text, text


async def test_a_watch_stopped_before_done_files_were_seen_settled_long_enough_says_done(
    inbox: Path, any_state: str
) -> None:
    """A file settled when a watch first sees it must still be seen unchanged for ``settle``
    seconds: a watch stopped before that, right after a run that did every file, said "0
    seen: 0 done; 20 files not settled yet" (exit 130), and ``status`` "20 not settled yet
    (taken once they settle)". They are done: counted done before."""
    await until_settled(2.0, *make_files(inbox, 20))
    first = await Batch(nothing, source=inbox, state=any_state, settle=2).run()
    assert first.done == 20, str(first)
    batch = Batch(nothing, source=inbox, state=any_state, settle=2, poll=0.1)
    report: Report | None = None

    async def go() -> None:
        nonlocal report
        report = await batch.watch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        await until(lambda: getattr(batch.statistics(), "unsettled", 0) == 20)
        batch.stop()
    assert report is not None
    counts = (report.seen, report.done_before, report.unsettled)
    assert counts == (20, 20, 0), str(report)
    status = " ".join(cli("status", "--state", any_state).stdout.split())
    assert "20 seen: 0 done, 20 done before" in status, status
    assert "taken once" not in status, status


async def test_a_watch_under_identity_path_counts_a_done_file_written_again_once(
    inbox: Path, tmp_path: Path
) -> None:
    # Identity path: a file this watch handled is written again (the same item, not handled
    # again) and waits to settle when the watch stops. The end asked the ledger about it and
    # counted it again, as done before: "2 seen: 1 done, 1 done before" for one file; and a
    # file never to be taken again is not "not settled yet (taken once they settle)".
    (path,) = make_files(inbox, 1, age=100)

    async def nothing(ctx: TaskContext) -> None:
        pass

    batch = Batch(
        nothing, source=inbox, state=tmp_path / "s.db", settle=0.5, poll=0.1, identity="path"
    )
    reports: list[Report] = []

    async def watch() -> None:
        reports.append(await batch.watch())

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await until(lambda: (s := batch.statistics()) is not None and s.done == 1)
            path.write_bytes(b"a new version\n")  # written again: waits to settle
            await until(lambda: getattr(batch.statistics(), "unsettled", 0) == 1)
            batch.stop()
    (report,) = reports
    assert (report.seen, report.done, report.done_before, report.unsettled) == (1, 1, 0, 0)


@pytest.mark.parametrize("how", ["moved back", "chmod"])
def test_a_waiting_item_whose_file_is_not_settled_is_left_waiting_and_counted_once(
    tmp_path: Path, how: str
) -> None:
    # A dead file's item put back by `retry --dead`, its file moved back into the source from
    # the --on-dead quarantine (or chmod'ed): its ctime is new. The next run handled it at
    # once (an item leased from the ledger was never checked for settling) AND counted it
    # among the files not settled yet: counted twice, and handled unsettled.
    inbox, quarantine, log = tmp_path / "inbox", tmp_path / "q", tmp_path / "log"
    quarantine.mkdir()
    (name,) = [p.name for p in make_files(inbox, 1, age=3600)]
    state = tmp_path / "state.db"
    src = ("--source", inbox, "--state", state)
    dead = ["--max-attempts", "1"]
    if how == "moved back":
        dead += ["--on-dead", f"move:{quarantine}"]
    first = cli("run", f"{HANDLERS}:fail_always", *src, *dead)
    assert first.returncode == 1, first.stderr
    assert cli("retry", "--dead", "--state", state).returncode == 0
    if how == "moved back":
        (quarantine / name).rename(inbox / name)
    else:
        os.chmod(inbox / name, 0o600)
    env = {"AB_LOG": str(log)}
    second = cli("run", f"{HANDLERS}:record", *src, "--settle", "60", env=env)
    assert second.returncode == 0, second.stderr
    assert not log.exists(), "an unsettled file was handled"
    assert "0 seen: 0 done; 1 file not settled yet" in second.stdout, second.stdout
    (row,) = json.loads(cli("history", "--state", state, "--json").stdout)[:1]
    assert {k: row[k] for k in ("seen", "done", "dead", "vanished", "earlier", "unsettled")} == {
        "seen": 0,
        "done": 0,
        "dead": 0,
        "vanished": 0,
        "earlier": 0,
        "unsettled": 1,
    }
    assert state_counts(state) == {"pending": 1}
    status = " ".join(cli("status", "--state", state).stdout.split())
    assert "left in the source by the last run (at its end): 1 not settled yet" in status
    explained = cli("explain", inbox / name, "--state", state, "--settle", "60").stdout
    assert f"{name} (job 'default'): waiting" in explained, explained
    assert "the next run that finds its file settled handles it" in explained
    # The run that finds it settled handles it, once.
    third = cli("run", f"{HANDLERS}:record", *src, env=env)
    assert third.returncode == 0, third.stderr
    assert log.read_text().split() == [name]
    assert "1 seen: 1 done;" in third.stdout, third.stdout
    assert state_counts(state) == {"done": 1}


def test_a_shared_run_leaves_a_waiting_item_whose_file_is_not_settled(tmp_path: Path) -> None:
    # As above, with --shared: the job's listing left the chmod'ed file out (not settled
    # yet) and counted it so, but the runner leased its item from the ledger and handled it
    # at once, unsettled: counted not settled AND done.
    inbox, log = tmp_path / "inbox", tmp_path / "log"
    (name,) = [p.name for p in make_files(inbox, 1, age=3600)]
    state = tmp_path / "state.db"
    src = ("--source", inbox, "--state", state, "--shared")
    first = cli("run", f"{HANDLERS}:fail_always", *src, "--max-attempts", "1")
    assert first.returncode == 1, first.stderr
    assert cli("retry", "--dead", "--state", state).returncode == 0
    os.chmod(inbox / name, 0o600)
    env = {"AB_LOG": str(log)}
    second = cli("run", f"{HANDLERS}:record", *src, "--settle", "60", env=env)
    assert second.returncode == 0, second.stderr
    assert not log.exists(), "an unsettled file was handled"
    assert "0 seen: 0 done; 1 file not settled yet" in second.stdout, second.stdout
    assert state_counts(state) == {"pending": 1}
    # The run that finds it settled handles it, once.
    third = cli("run", f"{HANDLERS}:record", *src, env=env)
    assert third.returncode == 0, third.stderr
    assert log.read_text().split() == [name]
    assert "1 seen: 1 done;" in third.stdout, third.stdout
    assert state_counts(state) == {"done": 1}


async def test_a_watch_takes_a_waiting_item_whose_file_is_not_settled_once_it_settles(
    inbox: Path, state: Path
) -> None:
    # Items a stopped run left pending, one of whose files is chmod'ed (its ctime new): a
    # watch leased it from the ledger and handled it at once, unsettled.
    first, second = make_files(inbox, 2, age=3600)
    started = anyio.Event()

    async def stop_at_first(ctx: TaskContext) -> None:
        started.set()
        await anyio.sleep_forever()

    stopped = Batch(stop_at_first, source=inbox, state=state, settle=0, concurrency=1, grace=0.1)
    async with anyio.create_task_group() as tg:

        async def stop() -> None:
            await started.wait()
            stopped.stop()

        tg.start_soon(stop)
        await stopped.run()
    assert state_counts(state) == {"pending": 2}
    settle = 1.5
    await until_settled(settle, first)  # the first one is handled at once, from the ledger
    os.chmod(second, 0o600)
    changed = os.stat(second).st_ctime_ns / 1e9
    handled: dict[str, float] = {}

    async def handle(ctx: TaskContext) -> None:
        handled[ctx.entry.relpath] = time.time()

    watch = Batch(handle, source=inbox, state=state, settle=settle, poll=0.1, concurrency=1)
    async with anyio.create_task_group() as tg:

        async def stop_when_both() -> None:
            await until(lambda: len(handled) == 2, within=30)
            watch.stop()

        tg.start_soon(stop_when_both)
        report = await watch.watch()
    assert handled[second.name] >= changed + settle, "handled before it settled"
    assert (report.seen, report.done, report.unsettled) == (2, 2, 0), report
    assert state_counts(state) == {"done": 2}


@pytest.mark.parametrize("identity", ["stat", "content"])
async def test_a_file_changed_while_queued_and_not_settled_at_the_end_is_counted_not_settled(
    inbox: Path, state: Path, identity: str
) -> None:
    # A file appended to after the scan and before its turn: the run said "2 seen: 1 done,
    # 1 vanished", status "nothing it found" left in the source, explain "never-seen", while
    # its new version sat in the source. Not settled by the end: counted not settled yet.
    first, second = make_files(inbox, 2, age=3600)
    await until_settled(3, first, second)
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if ctx.entry.relpath == first.name:
            with second.open("ab") as f:
                f.write(b"v2")

    report = await Batch(
        handle, source=inbox, state=state, settle=3, concurrency=1, identity=identity
    ).run()
    assert handled == [first.name]
    assert (report.seen, report.done, report.vanished, report.unsettled) == (1, 1, 0, 1)
    assert "1 file not settled yet" in str(report)
    status = " ".join(cli("status", "--state", state).stdout.split())
    assert "left in the source by the last run (at its end): 1 not settled yet" in status
    explained = cli("explain", second.name, "--state", state, "--settle", "600")
    assert "not-settled" in explained.stdout or "not settled" in explained.stdout, explained
    assert "never-seen" not in explained.stdout


@pytest.mark.parametrize("shared", [False, True])
async def test_a_file_written_to_without_end_does_not_keep_a_run_going(
    inbox: Path, state: Path, shared: bool
) -> None:
    # settle 0: a file appended to all along (a live log) from after the scan. Found changed
    # when its turn came, it was looked at again, taken, found changed, and so on: the run
    # never ended, its handler called again and again. A path is looked at again once a run,
    # and by the scan's rule (settled before the look began): it is left not settled yet.
    (first,) = make_files(inbox, 1, age=60, prefix="a")
    (live,) = make_files(inbox, 1, age=30, prefix="z")
    stop, written = threading.Event(), threading.Event()

    def append() -> None:
        while not stop.is_set():
            with live.open("ab") as f:
                f.write(b"x")
            written.set()
            time.sleep(0.0005)  # (the writer's pace, not a wait of the test's)

    writer = threading.Thread(target=append)
    calls: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        calls.append(ctx.entry.relpath)
        if ctx.entry.relpath == first.name:
            writer.start()  # from now on, until the run ended
            await anyio.to_thread.run_sync(written.wait)  # (its turn comes written to)

    try:
        with anyio.fail_after(60):
            batch = Batch(handle, source=inbox, state=state, settle=0, concurrency=1, shared=shared)
            report = await batch.run()
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()

    assert calls.count(first.name) == 1
    # Taken once at most: when its look found it quiet for a moment (settled by then), its
    # new version is handled (done, or found written to and failed); else it is left, not
    # settled yet. Either way, said so.
    assert calls.count(live.name) <= 1, calls
    assert (report.done, report.unsettled) in ((1, 1), (2, 0)), report
    assert report.vanished == 0, report


@pytest.mark.parametrize("settle", ["0", "1"])
def test_an_item_waiting_in_the_ledger_whose_marker_is_missing_is_not_handled(
    tmp_path: Path, settle: str
) -> None:
    # --ready marker:.done, no age rule in play (settle 0) or one that holds (settle 1): an item
    # put back by `retry --dead`, its marker since removed, was handled and counted twice
    # ("1 seen: 1 done; ... 1 file not ready yet: marker missing").
    inbox, log = tmp_path / "inbox", tmp_path / "log"
    (path,) = make_files(inbox, 1, age=3600)
    marker = inbox / (path.name + ".done")
    marker.write_text("")
    os.utime(marker, (path.stat().st_mtime + 1,) * 2)
    state = tmp_path / "state.db"
    src = ("--source", inbox, "--state", state, "--ready", "marker:.done", "--settle", settle)
    first = cli("run", f"{HANDLERS}:fail_always", *src, "--max-attempts", "1")
    assert first.returncode == 1, first.stdout + first.stderr
    assert cli("retry", "--dead", "--state", state).returncode == 0
    marker.unlink()

    second = cli("run", f"{HANDLERS}:record", *src, env={"AB_LOG": str(log)})

    assert second.returncode == 0, second.stderr
    assert not log.exists(), "a file not ready was handled: " + second.stdout
    assert "0 seen: 0 done" in second.stdout, second.stdout
    assert "1 file not ready yet" in second.stdout, second.stdout
    (last,) = json.loads(cli("history", "--state", state, "--json", "--limit", "1").stdout)
    assert (last["done"], last["unmarked"]) == (0, 1), last


async def test_a_run_whose_waiting_items_are_not_settled_claims_each_of_them_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `retry --dead` of many items, their files chmod'ed (ctime new): each claim of waiting
    # items left the rows it found not settled waiting, and every later claim passed all of
    # them as keys to skip and walked past them, a few rows a claim (2 x -j: no rate yet). At
    # 30,000 items a run took 69 s, at 100,000 695 s (O(n²)); now it goes on after the last
    # claim, a whole --claim-batch at a time.
    from asyncbatch._ledger.sqlite import SQLiteLedger

    inbox, state, n = tmp_path / "inbox", tmp_path / "state.db", 400
    files = make_files(inbox, n, age=3600)

    async def fail(ctx: TaskContext) -> None:
        raise ValueError("no")

    first = await Batch(fail, source=inbox, state=state, settle=0, max_attempts=1).run()
    assert first.dead == n
    assert cli("retry", "--dead", "--state", state).returncode == 0
    for path in files:
        os.chmod(path, 0o600)  # ctime new: not settled
    skipped: list[int] = []
    claim = SQLiteLedger.claim_waiting

    async def counted(self: SQLiteLedger, *args: Any, **kwargs: Any) -> Any:
        rows = await claim(self, *args, **kwargs)
        skipped.append(len(args[4]) if len(args) > 4 else len(kwargs.get("skip", ())))
        return rows

    monkeypatch.setattr(SQLiteLedger, "claim_waiting", counted)

    async def handle(ctx: TaskContext) -> None:
        raise AssertionError("an unsettled file was handled")

    batch = Batch(handle, source=inbox, state=state, settle=600, concurrency=2, claim_batch=32)
    report = await batch.run()
    assert (report.seen, report.done, report.unsettled) == (0, 0, n)
    assert state_counts(state) == {"pending": n}
    assert len(skipped) <= n // 32 + 4, skipped  # (was n / 4 claims)
    assert sum(skipped) <= 2 * n, skipped  # each key left waiting skipped about once
