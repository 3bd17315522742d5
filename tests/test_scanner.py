"""The scanner: settled regular files only, skip rules, order, non-UTF-8 names, chunked hops."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch._ready import Readiness, parse_rule
from asyncbatch._scanner import (
    CHUNK,
    NS_MAX,
    Scanner,
    ScanRules,
    pack,
    ready_ns,
    split,
    unpack,
)

from .conftest import cli, make_files


def scanner(
    source: Path,
    *,
    ignore: tuple[str, ...] = (),
    recursive: bool = False,
    follow_symlinks: bool = False,
) -> Scanner:
    return Scanner(
        source, rules=ScanRules(ignore), recursive=recursive, follow_symlinks=follow_symlinks
    )


def names(records: list[bytes]) -> list[bytes]:
    return [unpack(r)[1] for r in records]


def later(seconds: float = 2.0) -> int:
    """A scan's ``now_ns`` ``seconds`` from now: files written by the test (ctime now) are
    settled then, as they would be for a scan that waited."""
    return time.time_ns() + int(seconds * 1e9)


async def test_only_regular_settled_files_are_listed(inbox: Path) -> None:
    make_files(inbox, 3)
    for name in ("a.tmp", "b~", "c.swp", "d.part", "e.crdownload", ".hidden", ".x.csv"):
        (inbox / name).write_text("partial")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "deep.txt").write_text("not scanned without recursive")
    os.symlink(inbox / "f00000.txt", inbox / "link.txt")
    os.mkfifo(inbox / "fifo")

    found = names(await scanner(inbox).scan(settle=1.0, now_ns=later()))

    assert found == [b"f00000.txt", b"f00001.txt", b"f00002.txt"]


async def test_a_file_is_settled_only_once_its_mtime_and_its_ctime_are_old(inbox: Path) -> None:
    # A copier that keeps the source's times sets the mtime back a month while it writes;
    # the ctime, set by the kernel at every write and by the utime itself, says when.
    copying = inbox / "copying.csv"
    copying.write_bytes(b"\0" * 1024)
    month_ago = time.time() - 30 * 86400
    os.utime(copying, (month_ago, month_ago))
    fresh = inbox / "fresh.txt"
    fresh.write_text("just written")
    scan = scanner(inbox)

    assert await scan.scan(settle=1.0) == []
    assert scan.last is not None
    assert (scan.last.unsettled, scan.last.future) == (2, 0)
    assert names(await scan.scan(settle=1.0, now_ns=later())) == [b"copying.csv", b"fresh.txt"]
    assert scan.last.unsettled == 0


async def test_a_file_from_after_2262_is_never_settled_and_crashes_nothing(inbox: Path) -> None:
    far = inbox / "far.csv"
    far.write_text("x")
    year_2300 = 10_413_792_000 * 10**9  # past the signed 64-bit nanoseconds of 2262
    os.utime(far, ns=(year_2300, year_2300))
    make_files(inbox, 1)
    scan = scanner(inbox)

    assert names(await scan.scan(settle=1.0, now_ns=later())) == [b"f00000.txt"]
    assert scan.last is not None
    assert (scan.last.unsettled, scan.last.future) == (1, 1)
    every = await scan.scan(settle=None)  # watch mode lists every file, settled or not
    assert sorted(names(every)) == [b"f00000.txt", b"far.csv"]
    (mtime, _, _, _) = unpack(every[-1])
    assert mtime == NS_MAX
    assert ready_ns(every[-1]) == NS_MAX


#: A job's rules: the default alone (the plain walk), or with one beyond it (the rules' walk).
RULES = pytest.mark.parametrize("rules", [["age"], ["age", "min-size:1"]], ids=["plain", "rules"])


def ruled(source: Path, rules: list[str]) -> Scanner:
    ready = Readiness([parse_rule(r) for r in rules], settle=0)
    return Scanner(source, rules=ScanRules(), recursive=True, ready=ready)


def unsettled_and_future(scan: Scanner) -> tuple[int, int]:
    assert scan.last is not None
    return scan.last.unsettled, scan.last.future


@RULES
async def test_a_file_written_while_the_scan_is_under_way_is_not_ahead_of_the_clock(
    inbox: Path, rules: list[str]
) -> None:
    # A chunk's worth of files first; late/x.txt (a directory listed after them) is written
    # to between the first chunk and its stat: changed after the scan began, before the
    # clock the scan reads after the stat. Not settled (the cutoff is the scan's start), and
    # not "ahead of this host's clock" either: that was a clock-skew hint with a sound clock.
    make_files(inbox, CHUNK)
    late = inbox / "late" / "x.txt"
    late.parent.mkdir()
    late.write_text("before")
    scan = ruled(inbox, rules)
    began = time.time_ns()
    written: list[int] = []

    def write_late(found: int) -> None:
        if not written:  # the first chunk: late/ is not listed yet
            while os.stat(late).st_ctime_ns <= began:  # past the filesystem's clock tick
                late.write_text("while the scan is under way")
            written.append(os.stat(late).st_ctime_ns)

    records = await scan.scan(settle=0, now_ns=began, on_chunk=write_late)

    assert written
    assert written[0] > began
    assert len(records) == CHUNK  # the settle decision: late/x.txt is left out
    assert b"late/x.txt" not in names(records)
    assert unsettled_and_future(scan) == (1, 0)


@RULES
async def test_a_file_ahead_of_the_clock_is_counted_as_such(inbox: Path, rules: list[str]) -> None:
    make_files(inbox, CHUNK + 10)  # more than a chunk: the clock is read at its end, and after
    skewed = inbox / "skewed.csv"
    skewed.write_text("from a host whose clock is an hour ahead")
    hour_ahead = time.time() + 3600
    os.utime(skewed, (hour_ahead, hour_ahead))
    scan = ruled(inbox, rules)

    records = await scan.scan(settle=0)
    assert len(records) == CHUNK + 10
    assert unsettled_and_future(scan) == (1, 1)
    # A scan that began a minute ago (its now_ns): every file changed since (their ctime is
    # now) is not settled, the skewed one alone ahead of the clock.
    assert await scan.scan(settle=0, now_ns=time.time_ns() - 60 * 10**9) == []
    assert unsettled_and_future(scan) == (CHUNK + 11, 1)


async def test_settle_zero_includes_fresh_files_and_none_includes_future(inbox: Path) -> None:
    make_files(inbox, 1)
    future = inbox / "future.txt"
    future.write_text("clock skew")
    later = time.time() + 3600
    os.utime(future, (later, later))
    (inbox / "now.txt").write_text("now")

    assert set(names(await scanner(inbox).scan(settle=0))) == {b"f00000.txt", b"now.txt"}
    assert len(await scanner(inbox).scan(settle=None)) == 3


async def test_order_is_mtime_then_relpath(inbox: Path) -> None:
    base = time.time() - 100
    layout = {"c.txt": 3, "a.txt": 1, "b.txt": 1, "z.txt": 0, "m.txt": 2}
    for name, offset in layout.items():
        (inbox / name).write_text(name)
        os.utime(inbox / name, ns=(int((base + offset) * 1e9),) * 2)

    found = names(await scanner(inbox).scan(settle=1.0, now_ns=later()))

    assert found == [b"z.txt", b"a.txt", b"b.txt", b"m.txt", b"c.txt"]


async def test_recursive_walk_and_ignore_globs(inbox: Path) -> None:
    make_files(inbox / "2024" / "01", 2, prefix="jan")
    make_files(inbox / "2024" / "02", 1, prefix="feb")
    make_files(inbox / "archive", 2, prefix="old")
    make_files(inbox / ".git", 1, prefix="obj")
    make_files(inbox, 1, prefix="top")
    (inbox / "notes.bak").write_text("x")
    old = time.time() - 60
    os.utime(inbox / "notes.bak", (old, old))

    found = await scanner(inbox, ignore=("archive", "*.bak", "2024/02/*"), recursive=True).scan(
        settle=1.0, now_ns=later()
    )

    assert sorted(names(found)) == [
        b"2024/01/jan00000.txt",
        b"2024/01/jan00001.txt",
        b"top00000.txt",
    ]


async def test_a_double_star_in_an_ignore_glob_also_matches_no_directory(inbox: Path) -> None:
    for rel in ("a.bak", "x/b.bak", "old/c.csv", "x/old/d.csv", "logs/e.log", "logs/y/f.log",
                "older/g.csv", "h.csv"):  # fmt: skip
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_text("x")
    ignore = ("**/*.bak", "**/old/**", "logs/**/*.log")
    found = await scanner(inbox, ignore=ignore, recursive=True).scan(settle=1.0, now_ns=later())
    # At the top as at any depth, as in .gitignore and rsync: not only below a directory.
    assert sorted(names(found)) == [b"h.csv", b"older/g.csv"]
    rules = ScanRules(ignore)
    for path in (b"a.bak", b"old/c.csv", b"logs/e.log", b"x/old/d.csv"):
        why = rules.hidden_because(path, recursive=True, is_dir=False)
        assert "matches the ignore pattern" in (why or ""), path
    assert rules.hidden_because(b"older/g.csv", recursive=True, is_dir=False) is None


async def test_an_ignore_glob_ending_with_a_slash_skips_directories_of_that_name_anywhere(
    inbox: Path,
) -> None:
    for rel in ("old/a.csv", "x/old/b.csv", "x/y/old/c.csv", "old2/d.csv", "z/old", "e.csv",
                "cache1/f.csv", "x/cache2/g.csv"):  # fmt: skip
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_text("x")
    ignore = ("old/", "cache*/")
    found = await scanner(inbox, ignore=ignore, recursive=True).scan(settle=1.0, now_ns=later())
    # As in .gitignore: a directory of that name at any depth; a file of that name is kept.
    assert sorted(names(found)) == [b"e.csv", b"old2/d.csv", b"z/old"]
    rules = ScanRules(ignore)
    why = rules.hidden_because(b"x/y/old/c.csv", recursive=True, is_dir=False)
    assert why == "directory 'x/y/old' matches the ignore pattern 'old/'"
    assert rules.hidden_because(b"z/old", recursive=True, is_dir=False) is None
    assert rules.skips(b"cache2", b"x/cache2", is_dir=True)
    assert not rules.skips(b"cache2", b"x/cache2")


async def test_symlinks_followed_only_inside_the_source(tmp_path: Path, inbox: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    make_files(inbox, 1)
    os.symlink(outside, inbox / "escape.txt")
    os.symlink(inbox / "f00000.txt", inbox / "alias.txt")
    old = time.time() - 60
    os.utime(outside, (old, old))

    found = names(await scanner(inbox, follow_symlinks=True).scan(settle=1.0, now_ns=later()))

    assert sorted(found) == [b"alias.txt", b"f00000.txt"]


async def test_non_utf8_names_round_trip(inbox: Path) -> None:
    raw = os.fsencode(inbox) + b"/caf\xe9-\xff.txt"
    with open(raw, "wb") as f:
        f.write(b"latin-1 name")
    old = time.time() - 60
    os.utime(raw, (old, old))

    (record,) = await scanner(inbox).scan(settle=1.0, now_ns=later())

    assert unpack(record)[1] == b"caf\xe9-\xff.txt"
    assert os.fsencode(os.fsdecode(unpack(record)[1])) == b"caf\xe9-\xff.txt"


async def test_many_files_cross_several_thread_hops(inbox: Path) -> None:
    count = CHUNK * 2 + 17
    make_files(inbox, count)
    hops: list[int] = []

    found = await scanner(inbox).scan(settle=1.0, now_ns=later(), on_chunk=hops.append)

    assert len(found) == count
    assert len(hops) >= 3  # one hop per chunk of entries, never one per file
    assert found == sorted(found)


async def test_missing_source_raises() -> None:
    with pytest.raises(FileNotFoundError):
        await scanner(Path("/nonexistent/inbox")).scan(settle=None)


@given(
    st.lists(
        st.tuples(
            st.integers(-(2**62), 2**62),
            st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b and b"/" not in b),
            st.integers(0, 2**40),
            st.integers(0, 2**40),
            st.integers(-(2**62), 2**62),
        ),
        max_size=30,
    )
)
def test_records_sort_by_mtime_then_relpath(
    entries: list[tuple[int, bytes, int, int, int]],
) -> None:
    records = sorted(pack(*e) for e in entries)
    decoded = [unpack(r) for r in records]
    assert [(m, rel) for m, rel, _, _ in decoded] == sorted((m, rel) for m, rel, _, _, _ in entries)
    ctimes = {pack(*e): e[4] for e in entries}
    for record, (mtime, rel, size, inode) in zip(records, decoded, strict=True):
        assert pack(mtime, rel, size, inode, ctimes[record]) == record
        assert split(record)[0] == rel
        assert ready_ns(record) == max(mtime, ctimes[record])


def _deep_directory(root: Path, depth: int, name: bytes) -> int:
    """Make ``root/name/name/...`` ``depth`` levels deep (past PATH_MAX); return the last fd."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    return fd


async def test_a_tree_deeper_than_path_max_is_skipped_with_a_warning(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_files(inbox, 2)
    fd = _deep_directory(inbox, 30, b"d" * 200)  # 30 x 201 bytes: past 4,096
    try:
        file_fd = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.close(file_fd)
    finally:
        os.close(fd)
    make_files(inbox / "d", 1, prefix="shallow")  # a shallow directory beside it is walked

    records = await scanner(inbox, recursive=True).scan(settle=0)

    found = names(records)
    assert sorted(found) == [b"d/shallow00000.txt", b"f00000.txt", b"f00001.txt"]
    assert any("longer than the system allows" in r.getMessage() for r in caplog.records)


async def test_a_scanner_warns_of_a_directory_it_cannot_list_once_while_it_lasts(
    inbox: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A watch walks the tree at every poll with one scanner: a subdirectory that could not
    # be listed was warned about at every poll, 20 lines a second at --poll 0.05.)
    make_files(inbox, 1)
    make_files(inbox / "locked", 1)
    real_scandir = os.scandir
    locked = True

    def scandir(path: bytes) -> os._ScandirIterator[bytes]:
        if locked and os.fsencode(path).endswith(b"/locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scanner(inbox, recursive=True)

    def said() -> int:
        return sum("cannot list directory 'locked'" in r.getMessage() for r in caplog.records)

    for _ in range(3):  # polls: full scans and listings of names
        assert names(await scan.scan(settle=0)) == [b"f00000.txt"]
        assert scan.last is not None
        assert scan.last.unlisted == 1  # counted at every scan
        assert len(await scan.list_names()) == 1
    assert said() == 1
    locked = False  # it can be listed again: the problem is over...
    assert len(names(await scan.scan(settle=0))) == 2
    locked = True  # ...and when it comes back, it is said again, once
    for _ in range(3):
        await scan.scan(settle=0)
    assert said() == 2


async def test_a_path_too_long_is_warned_about_once_by_a_scanner_that_scans_again(
    inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fd = _deep_directory(inbox, 30, b"d" * 200)
    try:
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    scan = scanner(inbox, recursive=True)

    for _ in range(3):
        await scan.scan(settle=0)
        await scan.list_names()

    warned = [r for r in caplog.records if "longer than the system allows" in r.getMessage()]
    assert len(warned) == 1


def test_skip_reason_names_the_rule_skips_applies() -> None:
    rules = ScanRules(["*.bak", "archive/*"])
    cases = [
        (b".env", b".env", False, "hidden name '.env'"),
        (b"a.tmp", b"a.tmp", False, "temporary name 'a.tmp'"),
        (b"a.part", b"a.part", False, "ends with '.part'"),
        (b"old.bak", b"old.bak", False, "ignore pattern '*.bak'"),
        (b"x.csv", b"archive/x.csv", False, "ignore pattern 'archive/*'"),
        (b".git", b".git", True, "hidden directory '.git'"),
        (b"a.tmp", b"a.tmp", True, None),  # suffixes apply to files only
        (b"x.csv", b"x.csv", False, None),
    ]
    for name, relpath, is_dir, why in cases:
        reason = rules.skip_reason(name, relpath, is_dir=is_dir)
        assert rules.skips(name, relpath, is_dir=is_dir) == (reason is not None), name
        if why is None:
            assert reason is None
        else:
            assert reason is not None
            assert why in reason
    assert "not recursive" in (
        rules.hidden_because(b"d/x.csv", recursive=False, is_dir=False) or ""
    )
    assert rules.hidden_because(b"d/x.csv", recursive=True, is_dir=False) is None
    assert "hidden directory" in (
        rules.hidden_because(b".d/x.csv", recursive=True, is_dir=False) or ""
    )


#: Root without the capabilities that let it past permissions: the kernel then checks a
#: directory's search bit for root as for anyone.
WITHOUT_OVERRIDE = (
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--inh-caps",
    "-all",
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_files_of_a_directory_that_cannot_be_searched_are_said_to_be_skipped(
    tmp_path: Path,
) -> None:
    # (A directory that can be listed but not searched, mode r--: its files were left out of
    # every count without a word, exit 0; then with a warning alone, exit 0 still. Its files
    # are not handled: the run is not ok, as for a directory that cannot be listed at all.)
    inbox = tmp_path / "inbox"
    make_files(inbox, 1)
    make_files(inbox / "nox", 2)
    (inbox / "nox").chmod(0o600)
    try:
        ran = cli(
            "run",
            "--exec",
            "true",
            "--source",
            inbox,
            "--state",
            tmp_path / "state.db",
            "--recursive",
            "--no-progress",
            prefix=WITHOUT_OVERRIDE,
        )
    finally:
        (inbox / "nox").chmod(0o755)
    assert ran.returncode == 1, ran.stderr
    assert "1 seen: 1 done; 1 directory could not be listed" in ran.stdout
    warnings = [line for line in ran.stderr.splitlines() if "cannot look at" in line]
    assert len(warnings) == 1, ran.stderr  # once, not once a file
    assert "directory 'nox': Permission denied (they are skipped)" in warnings[0]
