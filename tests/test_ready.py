"""Readiness rules as values and as strings; what the scan and the watch make of them.

The runs themselves (each rule, one-shot and watch, on both backends) are in
``test_ready_runs.py``; explain, status and the metrics in ``test_ready_cli.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from asyncbatch import Age, Batch, ConfigurationError, DirMarker, Marker, MaxAge, MinSize, Stable
from asyncbatch._pipeline.postactions import holds_inputs
from asyncbatch._pipeline.sightings import LOOK_MARGIN, Sightings
from asyncbatch._ready import (
    Readiness,
    RuleVerdict,
    explain_rules,
    parse_duration,
    parse_rule,
    parse_size,
    ready_rules,
)
from asyncbatch._scanner import Scanner, ScanRules, pack, split

from .conftest import HANDLERS, cli

S = 1_000_000_000


async def noop(ctx: object) -> None:
    pass


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("age", Age()),
        ("stable", Stable(2)),
        ("stable:3", Stable(3)),
        ("marker:.done", Marker(".done")),
        ("marker:.ok", Marker(".ok")),
        ("dir-marker:_SUCCESS", DirMarker("_SUCCESS")),
        ("min-size:1024", MinSize(1024)),
        ("min-size:1k", MinSize(1024)),
        ("min-size:1KiB", MinSize(1024)),
        ("min-size:10M", MinSize(10 << 20)),
        ("min-size:0", MinSize(0)),
        ("max-age:7d", MaxAge(7 * 86400)),
        ("max-age:1w", MaxAge(7 * 86400)),
        ("max-age:90s", MaxAge(90)),
        ("max-age:30m", MaxAge(1800)),
        ("max-age:2h", MaxAge(7200)),
        ("max-age:45", MaxAge(45)),
    ],
)
def test_a_rule_string_is_its_value_and_back(text: str, rule: object) -> None:
    assert parse_rule(text) == rule
    assert parse_rule(str(rule)) == rule


def test_the_canonical_forms() -> None:
    assert [str(r) for r in ready_rules(["max-age:1w", "min-size:1k", "stable"])] == [
        "max-age:7d",
        "min-size:1024",
        "stable:2",
    ]
    assert parse_duration("1.5s") == 1.5
    assert parse_size("2G") == 2 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stable:1", "from 2 to 100"),
        ("stable:x", "from 2 to 100"),
        ("stable:101", "from 2 to 100"),
        ("marker:", "marker:SUFFIX"),
        ("marker:a/b", "without '/'"),
        ("dir-marker:..", "dir-marker:NAME"),
        ("min-size:lots", "min-size:BYTES"),
        ("min-size:-1", "min-size:BYTES"),
        ("min-size:99999999999999999999999", "from 0 to 1024T"),
        ("min-size:1025T", "from 0 to 1024T"),
        ("min-size:" + "9" * 5000, "from 0 to 1024T"),
        ("stable:" + "9" * 5000, "from 2 to 100"),
        ("stable:\u00b2", "from 2 to 100"),
        ("max-age:soon", "max-age:DURATION"),
        ("max-age:0", "more than 0"),
        ("age:3", "expected age, stable:N"),
        ("bogus", "expected age, stable:N"),
        ("", "expected age, stable:N"),
    ],
)
def test_a_bad_rule_is_one_line_naming_it(text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_rule(text)
    (line,) = str(caught.value).splitlines()
    assert line.startswith(f"setting 'ready' has value {text!r}") or text in line
    assert expected in line


def test_bad_rule_values_are_refused_when_made() -> None:
    with pytest.raises(ConfigurationError, match="'stable:1'"):
        Stable(1)
    with pytest.raises(ConfigurationError, match="marker:SUFFIX"):
        Marker("")
    with pytest.raises(ConfigurationError, match="min-size"):
        MinSize(-5)
    with pytest.raises(ConfigurationError, match="from 0 to 1024T"):
        MinSize((1 << 50) + 1)
    assert str(MinSize(1 << 50)) == f"min-size:{1 << 50}"
    with pytest.raises(ConfigurationError, match="max-age"):
        MaxAge(0)


def test_rules_may_be_values_or_strings_repeats_dropped_conflicts_refused() -> None:
    assert ready_rules("age") == (Age(),)
    assert ready_rules(Marker(".done")) == (Marker(".done"),)
    assert ready_rules(["age", Age(), "marker:.ok", Marker(".done")]) == (
        Age(),
        Marker(".ok"),
        Marker(".done"),
    )
    with pytest.raises(ConfigurationError, match="stable:2 and stable:3: give one stable"):
        ready_rules(["stable:2", "stable:3"])
    with pytest.raises(ConfigurationError, match="no rule"):
        ready_rules([])
    with pytest.raises(ConfigurationError, match="expected age"):
        ready_rules([42])


def test_batch_takes_the_rules_and_refuses_a_bad_one_before_anything_is_touched(
    inbox: Path, state: Path
) -> None:
    batch = Batch(noop, source=inbox, state=state, ready=["age", Marker(".done")])
    assert batch.config.ready == (Age(), Marker(".done"))
    assert batch.config.job_settings.ready == ("age", "marker:.done")
    assert Batch(noop, source=inbox, state=state).config.ready_rules == (Age(),)
    with pytest.raises(ConfigurationError, match="'stable:x'"):
        Batch(noop, source=inbox, state=state, ready="stable:x")
    assert not state.exists()


def test_a_bad_rule_on_the_command_line_is_exit_2_naming_it(inbox: Path, state: Path) -> None:
    result = cli("run", f"{HANDLERS}:record", "--source", inbox, "--state", state,
                 "--ready", "age", "--ready", "dir-marker:a/b")  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "argument --ready: invalid value 'dir-marker:a/b': expected dir-marker:NAME" in line
    assert not state.exists()


def test_markers_are_told_by_name() -> None:
    ready = Readiness(ready_rules(["marker:.done", "marker:.ok", "dir-marker:_SUCCESS"]), 1.0)
    assert ready.marks(b"a.csv.done")
    assert ready.marks(b"b.ok")
    assert ready.marks(b"_SUCCESS")
    assert not ready.marks(b"a.csv")
    assert not ready.marks(b"_SUCCESS.csv")
    assert ready.marked(b"a.csv.done") == [b"a.csv"]
    assert ready.marked(b".done") == []
    assert Readiness((Age(),), 1.0).plain
    assert not ready.plain
    assert ready.looks == 1
    assert not ready.age


# -- the scan ------------------------------------------------------------------------------------


def scanner(source: Path, *rules: str, settle: float = 0.0, recursive: bool = False) -> Scanner:
    return Scanner(
        source,
        rules=ScanRules(),
        recursive=recursive,
        ready=Readiness(ready_rules(list(rules)), settle),
    )


def names(records: list[bytes]) -> list[str]:
    return sorted(os.fsdecode(split(r)[0]) for r in records)


def write(path: Path, data: bytes = b"x", *, after: Path | None = None) -> Path:
    """Write ``path``; with ``after``, until its mtime is later than that file's (a
    condition, not a sleep: a coarse clock can give both the same tick)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if after is not None:
        mark = os.stat(after).st_mtime_ns
        while os.stat(path).st_mtime_ns <= mark:
            os.utime(path)
    return path


async def test_markers_are_never_listed_and_a_file_needs_its_own(inbox: Path) -> None:
    write(inbox / "a.csv")
    write(inbox / "a.csv.done", after=inbox / "a.csv")
    write(inbox / "b.csv")
    marker = write(inbox / "c.csv.done")
    write(inbox / "c.csv", after=marker)  # changed after its marker: waits for a newer one
    write(inbox / "orphan.csv.done")
    write(inbox / ".done")  # the suffix alone: a marker of no file, nobody's leftover
    s = scanner(inbox, "marker:.done")
    assert names(await s.scan(settle=0)) == ["a.csv"]
    assert s.last is not None
    assert dict(s.last.not_ready) == {"marker": 2}
    assert s.last.files == 1
    assert s.walked is not None
    assert s.walked.orphans == [b"orphan.csv.done"]  # its file is gone: a leftover
    # A watch's scan lists every file and says which rule each fails.
    listed = await s.scan(settle=None)
    assert names(listed) == ["a.csv", "b.csv", "c.csv"]
    assert s.walked.blocked == {b"b.csv": "marker", b"c.csv": "marker"}


async def test_a_chmod_or_a_link_after_the_marker_does_not_keep_a_file_back(
    inbox: Path, tmp_path: Path
) -> None:
    # Both set the file's ctime, not its content: a move cut short between its link and its
    # unlink leaves the file so, and the next run must still finish its post-commit action.
    a = write(inbox / "a.csv")
    marker = write(inbox / "a.csv.done", after=a)
    while os.stat(a).st_ctime_ns <= os.stat(marker).st_mtime_ns:
        os.chmod(a, 0o600)
        os.link(a, tmp_path / "a-link")
        os.unlink(tmp_path / "a-link")
    s = scanner(inbox, "marker:.done")
    assert names(await s.scan(settle=0)) == ["a.csv"]


async def test_a_directory_marker_covers_the_files_below_it_written_before_it(
    inbox: Path,
) -> None:
    write(inbox / "out" / "p=1" / "part-0")
    write(inbox / "out" / "part-1")
    write(inbox / "loose.csv")
    ok = write(inbox / "out" / "_SUCCESS", after=inbox / "out" / "part-1")
    s = scanner(inbox, "dir-marker:_SUCCESS", recursive=True)
    assert names(await s.scan(settle=0)) == ["out/p=1/part-0", "out/part-1"]
    assert s.last is not None
    assert dict(s.last.not_ready) == {"dir-marker": 1}
    assert s.walked is not None
    assert s.walked.late == {}
    write(inbox / "out" / "late.csv", after=ok)
    assert names(await s.scan(settle=0)) == ["out/p=1/part-0", "out/part-1"]
    assert s.walked.late == {b"out/_SUCCESS": 1}  # reported: written after its marker


async def test_each_file_is_counted_once_by_the_first_rule_it_fails(inbox: Path) -> None:
    old = time.time() - 10 * 86400
    write(inbox / "old.csv", b"x" * 100)
    os.utime(inbox / "old.csv", (old, old))
    write(inbox / "small.csv", b"x")
    write(inbox / "fine.csv", b"x" * 100)
    write(inbox / "fine.csv.ok", after=inbox / "fine.csv")
    write(inbox / "unmarked.csv", b"x" * 100)
    s = scanner(inbox, "max-age:7d", "min-size:10", "marker:.ok", "age", settle=0)
    assert names(await s.scan(settle=0)) == ["fine.csv"]
    assert s.last is not None
    assert dict(s.last.not_ready) == {"max-age": 1, "min-size": 1, "marker": 1}
    # Not settled comes before a missing marker (it is still being written, maybe).
    await s.scan(settle=3600)
    assert (s.last.unsettled, dict(s.last.not_ready)) == (2, {"max-age": 1, "min-size": 1})


async def test_a_look_at_a_marker_looks_at_its_file(inbox: Path) -> None:
    write(inbox / "a.csv")
    marker = write(inbox / "a.csv.done", after=inbox / "a.csv")
    write(inbox / "b.csv")
    s = scanner(inbox, "marker:.done")
    found = await s.look_at([b"a.csv.done", b"b.csv"])
    assert names(found.records) == ["a.csv", "b.csv"]
    assert found.blocked == {b"b.csv": "marker"}
    assert found.marker_keys == [b"a.csv.done\0" + os.stat(marker).st_ino.to_bytes(8, "big")]
    assert not found.walked_dir
    d = scanner(inbox, "dir-marker:_OK")
    write(inbox / "_OK")
    assert (await d.look_at([b"_OK"])).walked_dir  # a directory's marker: scan it


# -- the watch -----------------------------------------------------------------------------------

NOW = 1_700_000_000 * S


def rec(rel: bytes, mtime_s: float, size: int = 10) -> bytes:
    return pack(NOW + int(mtime_s * S), rel, size, 7, NOW + int(mtime_s * S))


def at(t: float) -> tuple[int, float]:
    return NOW + int(t * S), t


def test_watch_stable_wants_n_looks_settle_apart() -> None:
    s = Sightings(1.0, Readiness((Stable(3),), 1.0))
    f = rec(b"a", -3600)
    assert s.looked([b"a"], [f], *at(0.0)) == []
    assert s.waiting_by_rule() == {"stable": 1}
    look = s.next_look()
    assert look is not None
    assert abs(look - (1.0 + LOOK_MARGIN)) < 1e-6
    assert s.looked([b"a"], [f], *at(0.5)) == []  # an event: too soon to count
    assert s.looked([b"a"], [f], *at(look)) == []  # the second look
    second = s.next_look()
    assert second is not None
    assert abs(second - (look + 1.0 + LOOK_MARGIN)) < 1e-6
    assert s.looked([b"a"], [f], *at(second)) == [f]
    assert s.waiting_by_rule() == {}


def test_watch_a_file_changed_between_looks_starts_over() -> None:
    s = Sightings(1.0, Readiness((Stable(2),), 1.0))
    assert s.looked([b"a"], [rec(b"a", -10, size=1)], *at(0.0)) == []
    grown = rec(b"a", -10, size=2)
    assert s.looked([b"a"], [grown], *at(1.1)) == []  # a new record: look 1 of 2
    assert s.looked([b"a"], [grown], *at(2.2)) == [grown]


def test_watch_a_file_waiting_for_its_marker_has_no_scheduled_look() -> None:
    s = Sightings(1.0, Readiness((Marker(".done"), Age()), 1.0))
    f = rec(b"a.csv", -3600)
    assert s.looked([b"a.csv"], [f], *at(0.0), {b"a.csv": "marker"}) == []
    assert s.next_look() is None
    assert s.waiting_by_rule() == {"marker": 1}
    # The marker arrives (its look names the file): age still wants `settle` unchanged.
    assert s.looked([b"a.csv"], [f], *at(0.4)) == []
    assert s.waiting_by_rule() == {"age": 1}
    assert s.looked([b"a.csv"], [f], *at(1.1)) == [f]


def test_watch_with_a_marker_only_takes_the_file_at_once() -> None:
    s = Sightings(1.0, Readiness((Marker(".done"),), 1.0))
    f = rec(b"a.csv", 0.0)
    assert s.looked([b"a.csv"], [f], *at(0.0)) == [f]


@pytest.mark.parametrize("seconds", [1_000_000, 1_000_001, 1.5, 0.1, 1e-7, 7 * 86400, 5400])
def test_a_duration_is_recorded_in_a_form_that_reads_back_the_same(seconds: float) -> None:
    rule = MaxAge(seconds)
    assert parse_rule(str(rule)) == rule


async def test_a_directory_that_cannot_be_listed_keeps_the_markers_above_it(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(inbox / "d" / "sub" / "f.csv")
    write(inbox / "d" / "_SUCCESS", after=inbox / "d" / "sub" / "f.csv")
    write(inbox / "empty" / "_SUCCESS")
    real = os.scandir

    def scandir(path: bytes | str) -> os._ScandirIterator:  # type: ignore[type-arg]
        if os.fsdecode(path).endswith("/d/sub"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    s = scanner(inbox, "dir-marker:_SUCCESS", recursive=True)
    assert names(await s.scan(settle=0)) == []
    assert s.walked is not None
    assert s.walked.orphans == [b"empty/_SUCCESS"]  # d/sub may hold inputs: d's marker stays
    rules, ready = ScanRules(), Readiness(ready_rules(["dir-marker:_SUCCESS"]), 0)
    assert holds_inputs(inbox, b"d", rules, ready, recursive=True)  # errs towards "holds"


def test_a_symlinked_input_that_a_scan_follows_keeps_its_directorys_marker(inbox: Path) -> None:
    target = write(inbox.parent / "blobs" / "x")
    write(inbox / "d" / "_SUCCESS")
    (inbox / "d" / "f2").symlink_to(target)
    rules, ready = ScanRules(), Readiness(ready_rules(["dir-marker:_SUCCESS"]), 0)
    assert holds_inputs(inbox, b"d", rules, ready, recursive=True, follow_symlinks=True)
    assert not holds_inputs(inbox, b"d", rules, ready, recursive=True)


def test_explain_says_a_future_mtime_is_in_the_future_for_max_age(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv")
    now = time.time_ns()
    os.utime(f, ns=(now + 86400 * 10**9,) * 2)  # a writer whose clock is a day ahead
    ready = Readiness([parse_rule("max-age:1h")], 1.0)
    (verdict,) = explain_rules(
        ready, str(tmp_path), b"a.csv", os.stat(f), now, follow_symlinks=False
    )
    assert verdict == RuleVerdict("max-age:1h", True, "mtime 24.0 h in the future, max-age 1h")
