"""Each readiness rule in runs: one-shot and watch, on SQLite and PostgreSQL.

A file is handled once every rule holds, and only then; the report counts the files not ready
yet by rule; markers are never inputs and follow their files to the archive; a marker's
arrival (an event, or a poll) makes its file ready in watch mode. Watches are waited on with
conditions and deadlines, never fixed sleeps.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbatch import Batch, Report, TaskContext
from asyncbatch._pipeline import claimer
from asyncbatch._ready import parse_rule
from asyncbatch._scanner import Scanner

from .conftest import polls_after, until
from .test_ready import write

MODES = ["run", "watch"]


class Job:
    """A job over ``inbox`` in ``state``, archiving to ``archive``; what its handler saw."""

    def __init__(self, root: Path, state: str, **settings: Any) -> None:
        self.inbox = root / "inbox"
        self.inbox.mkdir(exist_ok=True)
        self.archive = root / "archive"
        self.archive.mkdir(exist_ok=True)
        self.state = state
        self.handled: list[str] = []
        self.settings = {
            "source": self.inbox,
            "state": state,
            "settle": 0,
            "on_done": f"move:{self.archive}",
            "poll": 0.1,
            **settings,
        }

    async def handle(self, ctx: TaskContext) -> None:
        await ctx.read_bytes()
        self.handled.append(ctx.entry.relpath)

    def batch(self, **more: Any) -> Batch:
        return Batch(self.handle, **{**self.settings, **more})

    async def run(self, **more: Any) -> Report:
        return await self.batch(**more).run()

    def archived(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.archive)) for p in self.archive.rglob("*") if p.is_file()
        )

    def left(self) -> list[str]:
        return sorted(str(p.relative_to(self.inbox)) for p in self.inbox.rglob("*") if p.is_file())


class Watching:
    """A watch under way (``async with``): its batch, stopped at the end."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.report: Report | None = None

    async def __aenter__(self) -> Watching:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._watch)
        return self

    async def _watch(self) -> None:
        self.report = await self.batch.watch()

    def count(self, name: str) -> int:
        stats = self.batch.statistics()
        return 0 if stats is None else int(getattr(stats, name))

    async def __aexit__(self, *exc: object) -> None:
        self.batch.stop()
        await self._tg.__aexit__(None, None, None)


# -- marker:SUFFIX -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_marker_a_file_is_handled_once_its_marker_is_there_and_the_marker_follows_it(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    job = Job(tmp_path, any_state, ready=["marker:.done"])
    a = write(job.inbox / "a.csv", b"a")
    write(job.inbox / "a.csv.done", after=a)
    b = write(job.inbox / "b.csv", b"b")
    if mode == "run":
        report = await job.run()
        assert (report.seen, report.done, report.unmarked) == (1, 1, 1)
        assert "1 file not ready yet: marker missing, or older than its file" in str(report)
        write(job.inbox / "b.csv.done", after=b)
        again = await job.run()
        assert (again.seen, again.done, again.unmarked) == (1, 1, 0)
    else:
        async with Watching(job.batch()) as w:
            await until(lambda: job.handled == ["a.csv"] and w.count("unmarked") == 1)
            write(job.inbox / "b.csv.done", after=b)  # its arrival makes b.csv ready
            await until(lambda: len(job.handled) == 2 and w.count("unmarked") == 0)
    assert sorted(job.handled) == ["a.csv", "b.csv"]  # each once; markers never
    await until(lambda: job.left() == [])
    assert job.archived() == ["a.csv", "a.csv.done", "b.csv", "b.csv.done"]


async def test_marker_arrival_is_found_by_polling_without_events(
    tmp_path: Path, any_state: str
) -> None:
    job = Job(tmp_path, any_state, ready=["marker:.ok", "age"], events=False)
    f = write(job.inbox / "f.csv")
    async with Watching(job.batch()) as w:
        await until(lambda: w.count("unmarked") == 1)
        write(job.inbox / "f.csv.ok", after=f)
        await until(lambda: job.handled == ["f.csv"])
    assert job.archived() == ["f.csv", "f.csv.ok"]


async def test_marker_a_file_changed_after_its_marker_waits_for_a_newer_one(
    tmp_path: Path, any_state: str
) -> None:
    job = Job(tmp_path, any_state, ready=["marker:.done"], on_done="keep")
    marker = write(job.inbox / "a.csv.done")
    a = write(job.inbox / "a.csv", after=marker)
    assert (await job.run()).unmarked == 1
    write(job.inbox / "a.csv.done", after=a)  # rewritten: newer than the file
    assert (await job.run()).done == 1
    assert job.handled == ["a.csv"]


def modified_after(path: Path, marker: Path) -> None:
    """Give ``marker`` an mtime a minute ago and ``path`` one half a minute ago: the file was
    modified after its marker (times set, not waited for)."""
    now = time.time_ns()
    os.utime(marker, ns=(now - 60 * 10**9, now - 60 * 10**9))
    os.utime(path, ns=(now - 30 * 10**9, now - 30 * 10**9))


#: A rule, the marker of ``out/late.csv`` under it, its count, and the report's label of it.
LATE = [
    ("marker:.done", "out/late.csv.done", "unmarked", "marker missing, or older than its file"),
    (
        "dir-marker:_SUCCESS",
        "out/_SUCCESS",
        "dir_unmarked",
        "directory marker missing, or older than its file",
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("rule", "marker", "counter", "label"), LATE)
async def test_a_file_modified_after_its_marker_is_not_said_to_lack_one(
    tmp_path: Path, any_state: str, mode: str, rule: str, marker: str, counter: str, label: str
) -> None:
    # Its marker exists: the report must not say "marker missing" alone (explain says the
    # file changed after it; the count and its words cover both cases).
    job = Job(tmp_path, any_state, ready=[rule], recursive=True, on_done="keep")
    late = write(job.inbox / "out" / "late.csv")
    write(job.inbox / marker)
    modified_after(late, job.inbox / marker)
    if mode == "run":
        report = await job.run()
    else:
        async with Watching(job.batch()) as w:
            await until(lambda: w.count(counter) == 1)
        assert w.report is not None
        report = w.report
    assert (report.seen, getattr(report, counter)) == (0, 1)
    assert f"0 seen: 0 done; 1 file not ready yet: {label}" in str(report)
    assert job.handled == []


async def test_marker_a_waiting_file_deleted_is_no_longer_counted_at_the_next_listing(
    tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file waiting for its marker has no look scheduled, and a deletion wakes nothing: the
    # polls that list names (9 in 10 with events on) must drop it, not the next full scan.
    pytest.importorskip("watchfiles")
    monkeypatch.setattr(claimer, "FULL_SCAN_EVERY", 10**6)  # every poll after the first lists
    job = Job(tmp_path, str(state), ready=["marker:.done"], poll=0.05)
    gone = write(job.inbox / "gone.csv")
    write(job.inbox / "kept.csv")
    async with Watching(job.batch()) as w:
        await until(lambda: w.count("unmarked") == 2)
        gone.unlink()
        await polls_after(w.batch, 3)
        seen = w.batch._observe()
        assert seen is not None
        assert seen.last_scan is not None
        assert not seen.last_scan.full
        assert w.count("unmarked") == 1
    assert w.report is not None
    assert w.report.unmarked == 1
    assert job.handled == []


# -- dir-marker:NAME -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_dir_marker_a_directorys_files_are_handled_once_it_holds_its_marker(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    job = Job(tmp_path, any_state, ready=["dir-marker:_SUCCESS"], recursive=True)
    last = write(job.inbox / "out" / "part-0")
    write(job.inbox / "out" / "p=1" / "part-1")
    write(job.inbox / "other" / "x.csv")
    if mode == "run":
        first = await job.run()
        assert (first.seen, first.dir_unmarked) == (0, 3)
        write(job.inbox / "out" / "_SUCCESS", after=last)
        second = await job.run()
        assert (second.seen, second.done, second.dir_unmarked) == (2, 2, 1)
    else:
        async with Watching(job.batch()) as w:
            await until(lambda: w.count("dir_unmarked") == 3)
            write(job.inbox / "out" / "_SUCCESS", after=last)
            await until(lambda: len(job.handled) == 2 and w.count("dir_unmarked") == 1)
            # Its directory done, the marker follows its files (a watch: by its next scan
            # at the latest).
            await until(lambda: "out/_SUCCESS" in job.archived())
    assert sorted(job.handled) == ["out/p=1/part-1", "out/part-0"]
    assert job.archived() == ["out/_SUCCESS", "out/p=1/part-1", "out/part-0"]
    assert job.left() == ["other/x.csv"]


async def test_dir_marker_files_written_after_the_marker_wait_and_are_reported(
    tmp_path: Path, any_state: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = Job(tmp_path, any_state, ready=["dir-marker:_SUCCESS"], recursive=True, on_done="keep")
    first = write(job.inbox / "out" / "part-0")
    ok = write(job.inbox / "out" / "_SUCCESS", after=first)
    write(job.inbox / "out" / "part-late", after=ok)
    report = await job.run()
    assert (report.done, report.dir_unmarked) == (1, 1)
    assert "1 file in out changed after its marker 'out/_SUCCESS'" in caplog.text


# -- stable:N ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_stable_a_file_is_handled_once_seen_unchanged_n_times(
    tmp_path: Path, any_state: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = Job(tmp_path, any_state, ready=["stable:3"], settle=0.1)
    write(job.inbox / "a.csv", b"a")
    b = write(job.inbox / "b.csv", b"b")
    looks: list[int] = []
    real_look = Scanner.look

    async def look(self: Scanner, relpaths: Any) -> Any:
        looks.append(len(relpaths))
        if len(looks) == 1:  # b.csv changes between the run's first and second look
            with b.open("ab") as f:
                f.write(b"more")
        return await real_look(self, relpaths)

    if mode == "run":
        monkeypatch.setattr(Scanner, "look", look)
        report = await job.run()
        assert looks == [2, 1]  # it looked again itself, twice, and waited for the answers
        assert (report.seen, report.done, report.unstable) == (1, 1, 1)
        assert "1 file not ready yet: not seen unchanged enough" in str(report)
        monkeypatch.undo()
        assert (await job.run()).done == 1  # b.csv, unchanged since
    else:
        async with Watching(job.batch()) as w:
            await until(lambda: len(job.handled) == 2 and w.count("unstable") == 0)
    assert sorted(job.handled) == ["a.csv", "b.csv"]


async def test_a_shared_run_holds_to_every_rule_and_counts_what_is_not_ready(
    tmp_path: Path, any_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = Job(tmp_path, any_state, ready=["stable:3", "marker:.done"], settle=0.1, shared=True)
    for name in ("a.csv", "c.csv"):
        write(job.inbox / f"{name}.done", after=write(job.inbox / name, b"x"))
    write(job.inbox / "b.csv")  # no marker
    real_look = Scanner.look

    async def look(self: Scanner, relpaths: Any) -> Any:
        with (job.inbox / "c.csv").open("ab") as f:  # still being written
            f.write(b"more")
        return await real_look(self, relpaths)

    monkeypatch.setattr(Scanner, "look", look)
    report = await job.run()
    assert job.handled == ["a.csv"]
    assert (report.seen, report.done, report.unstable, report.unmarked) == (1, 1, 1, 1)
    assert "1 file not ready yet: marker missing, or older than its file" in str(report)


async def test_stable_a_stopped_run_does_not_wait_for_its_looks(
    tmp_path: Path, any_state: str
) -> None:
    job = Job(tmp_path, any_state, ready=["stable:2"], settle=3600)
    write(job.inbox / "a.csv")
    batch = job.batch()
    async with anyio.create_task_group() as tg:

        async def stop_once_looking() -> None:
            await until(lambda: (s := batch.statistics()) is not None and s.unstable == 1)
            batch.stop()

        tg.start_soon(stop_once_looking)
        report = await batch.run()
    assert report.stopped
    assert (report.seen, report.unstable) == (0, 1)
    assert job.handled == []


# -- min-size:BYTES and max-age:DURATION ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_min_size_a_small_file_waits_until_it_grows(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    job = Job(tmp_path, any_state, ready=["min-size:1k", "age"])
    write(job.inbox / "big.csv", b"x" * 2048)
    small = write(job.inbox / "small.csv", b"x" * 10)
    if mode == "run":
        report = await job.run()
        assert (report.done, report.too_small) == (1, 1)
        small.write_bytes(b"x" * 1024)
        assert (await job.run()).done == 1
    else:
        async with Watching(job.batch()) as w:
            await until(lambda: job.handled == ["big.csv"] and w.count("too_small") == 1)
            small.write_bytes(b"x" * 1024)
            await until(lambda: len(job.handled) == 2)
    assert sorted(job.handled) == ["big.csv", "small.csv"]


@pytest.mark.parametrize("mode", MODES)
async def test_max_age_an_older_file_is_left_alone_and_counted(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    job = Job(tmp_path, any_state, ready=["max-age:7d", "age"])
    write(job.inbox / "new.csv")
    old = write(job.inbox / "old.csv")
    eight_days = time.time() - 8 * 86400
    os.utime(old, (eight_days, eight_days))
    if mode == "run":
        report = await job.run()
        assert (report.done, report.too_old) == (1, 1)
        assert "1 file left alone: older than max-age" in str(report)
        os.utime(old)  # touched: new again
        assert (await job.run()).done == 1
    else:
        async with Watching(job.batch()) as w:
            await until(lambda: job.handled == ["new.csv"] and w.count("too_old") == 1)
            os.utime(old)
            await until(lambda: len(job.handled) == 2)
    assert sorted(job.handled) == ["new.csv", "old.csv"]


# -- rules changed ---------------------------------------------------------------------------------


async def fail_bad(ctx: TaskContext) -> None:
    if ctx.entry.relpath == "bad.csv":
        raise ValueError("bad")


@pytest.mark.parametrize("mode", MODES)
async def test_a_file_finished_before_the_rules_changed_is_not_said_to_wait(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    """Done or dead files that fail rules given since (no marker) are finished: counted done
    (dead) before, as they would be if they passed, never as not ready yet."""
    inbox = tmp_path / "inbox"
    write(inbox / "good.csv")
    write(inbox / "bad.csv")
    settings: dict[str, Any] = {"source": inbox, "state": any_state, "settle": 0, "poll": 0.1}
    first = await Batch(fail_bad, **settings, max_attempts=1).run()
    assert (first.done, first.dead) == (1, 1)
    write(inbox / "new.csv")  # never handled: it waits for its marker
    batch = Batch(fail_bad, **settings, ready=["marker:.ok"])
    if mode == "run":
        report = await batch.run()
    else:
        async with Watching(batch) as w:
            await until(lambda: w.count("done_before") == 1 and w.count("dead_before") == 1)
            await polls_after(batch)
            assert (w.count("seen"), w.count("unmarked")) == (2, 1)
        assert w.report is not None
        report = w.report
    counts = (report.seen, report.done_before, report.dead_before, report.unmarked)
    assert counts == (2, 1, 1, 1), str(report)


@pytest.mark.parametrize("mode", MODES)
async def test_a_file_finished_before_the_rules_changed_is_counted_by_shared_runners(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    """Runners sharing a job count its listing: the finished files that fail rules given since
    are counted there as a run of its own counts them, done (dead) before, by every runner
    (their counts left them out: "1 seen: 1 done; 1 file not ready yet")."""
    inbox = tmp_path / "inbox"
    write(inbox / "good.csv")
    write(inbox / "bad.csv")
    settings: dict[str, Any] = {"source": inbox, "state": any_state, "settle": 0, "poll": 0.1}
    first = await Batch(fail_bad, **settings, max_attempts=1, shared=True).run()
    assert (first.done, first.dead) == (1, 1)
    write(inbox / "new.csv")  # never handled: it waits for its marker
    write(inbox / "ready.csv.ok", after=write(inbox / "ready.csv"))  # handled now
    later = {**settings, "ready": ["marker:.ok"], "shared": True}
    if mode == "watch":  # its lister asks the ledger about the waiting files, as a watch does
        async with Watching(Batch(fail_bad, **later)) as w:
            await until(lambda: w.count("done_before") == 1 and w.count("dead_before") == 1)
            await polls_after(w.batch)
            assert (w.count("seen"), w.count("done"), w.count("unmarked")) == (3, 1, 1)
        assert w.report is not None
        counts = (w.report.seen, w.report.done, w.report.done_before, w.report.dead_before)
        assert counts == (3, 1, 1, 1), str(w.report)
        return
    reports: list[Report] = []

    async def one() -> None:
        reports.append(await Batch(fail_bad, **later).run())

    async with anyio.create_task_group() as tg:  # one lists; both go by its listing
        tg.start_soon(one)
        tg.start_soon(one)
    for report in reports:
        finished = (report.seen, report.done + report.done_before, report.dead_before)
        assert finished == (3, 2, 1), str(report)
    assert sum(r.done for r in reports) == 1
    assert max(r.unmarked for r in reports) == 1  # the lister's: the other did not scan


# -- age, explicitly -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_age_given_explicitly_is_the_default_rule(
    tmp_path: Path, any_state: str, mode: str
) -> None:
    job = Job(tmp_path, any_state, ready=["age"], settle=0.3, on_done="keep")
    f = write(job.inbox / "a.csv")
    if mode == "run":
        early = await job.run()
        changed = max(os.stat(f).st_mtime_ns, os.stat(f).st_ctime_ns) / 1e9
        if time.time() < changed + 0.3:  # (a slow machine may be past the window already)
            assert (early.done, early.unsettled) == (0, 1)
        await until(lambda: time.time() > changed + 0.31)
        assert (await job.run()).done + early.done == 1
    else:
        async with Watching(job.batch()):
            await until(lambda: job.handled == ["a.csv"])
    assert job.handled == ["a.csv"]


# -- any combination -------------------------------------------------------------------------------

RULES = ["age", "marker:.done", "dir-marker:_OK", "min-size:50", "max-age:7d", "stable:2"]
#: The count of files not ready yet each rule's kind keeps, in the order files are counted.
COUNTED = [
    ("max-age", "too_old"),
    ("min-size", "too_small"),
    ("age", "unsettled"),
    ("marker", "unmarked"),
    ("dir-marker", "dir_unmarked"),
]
#: A file: its directory, size, whether it is older than max-age, its mtime (seconds into its
#: day), its marker's mtime (``None``: no marker).
FileSpec = tuple[int, int, bool, int, "int | None"]

files_st = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.sampled_from([1, 100]),
        st.booleans(),
        st.sampled_from([0, 10, 20]),
        st.one_of(st.none(), st.sampled_from([5, 15, 25])),
    ),
    min_size=1,
    max_size=6,
)


def make(path: Path, mtime: float, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(st.sampled_from(RULES), min_size=1, max_size=4, unique=True),
    settled=st.booleans(),
    files=files_st,
    dir_markers=st.tuples(
        st.one_of(st.none(), st.sampled_from([5, 15, 25])),
        st.one_of(st.none(), st.sampled_from([5, 15, 25])),
    ),
)
def test_a_file_is_handled_only_when_every_rule_holds(
    rules: list[str],
    settled: bool,
    files: list[FileSpec],
    dir_markers: tuple[int | None, int | None],
) -> None:
    """Random rules, files and markers: the run handles exactly the files for which every
    rule holds (a model of each, with the times set explicitly), counts each other file once,
    by the first rule it fails, and never handles a marker."""
    now = time.time()
    recent, old = now - 3600, now - 8 * 86400
    settle = 0 if settled or "stable:2" in rules else 3600  # ctimes are now: never settled
    expected: set[str] = set()
    counted = dict.fromkeys([name for _, name in COUNTED], 0)
    kinds = {parse_rule(r).kind for r in rules}
    # A marker's name is an input's without its rule: markers are made only with it.
    if "dir-marker" not in kinds:
        dir_markers = (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "inbox"
        for i, (d, size, is_old, offset, marker) in enumerate(files):
            if "marker" not in kinds:
                marker = None
            relpath = f"d{d}/f{i}.csv"
            base = old if is_old else recent
            make(inbox / relpath, base + offset, size)
            if marker is not None:
                make(inbox / f"{relpath}.done", base + marker, 0)
            dir_marker = dir_markers[d]
            holds = {
                "max-age": not is_old,
                "min-size": size >= 50,
                "age": settle == 0,
                "marker": marker is not None and marker >= offset,
                "dir-marker": dir_marker is not None and recent + dir_marker >= base + offset,
            }
            failing = [count for kind, count in COUNTED if kind in kinds and not holds[kind]]
            if failing:
                counted[failing[0]] += 1
            else:
                expected.add(relpath)
        for d, dir_marker in enumerate(dir_markers):
            if dir_marker is not None:
                make(inbox / f"d{d}" / "_OK", recent + dir_marker, 0)
        handled: list[str] = []

        async def handle(ctx: TaskContext) -> None:
            handled.append(ctx.entry.relpath)

        batch = Batch(handle, source=inbox, state=Path(tmp) / "state.db", settle=settle,
                      recursive=True, ready=rules)  # fmt: skip
        report = anyio.run(batch.run)
    assert sorted(handled) == sorted(expected)
    assert (report.seen, report.done) == (len(expected), len(expected))
    assert {name: getattr(report, name) for name in counted} == counted
