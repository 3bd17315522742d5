"""When watch mode takes a file: the settle rule over looks, with the times given (no clock)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from asyncbatch._pipeline.sightings import LOOK_MARGIN, Sightings
from asyncbatch._ready import Readiness, ready_rules
from asyncbatch._scanner import Scanner, ScanRules, name_key, pack

from .conftest import make_files

S = 1_000_000_000  # ns a second
NOW = 1_700_000_000 * S  # the wall clock at monotonic 0


def rec(rel: bytes, mtime_s: float, size: int = 10, inode: int = 7) -> bytes:
    return pack(NOW + int(mtime_s * S), rel, size, inode)


def at(t: float) -> tuple[int, float]:
    """(wall ns, monotonic) at ``t`` seconds."""
    return NOW + int(t * S), t


def test_a_fresh_file_is_taken_at_the_look_after_it_settled() -> None:
    s = Sightings(settle=1.0)
    f = rec(b"a.csv", mtime_s=0.0)
    assert s.looked([b"a.csv"], [f], *at(0.05)) == []
    look = s.next_look()
    assert look is not None
    assert abs(look - (1.0 + LOOK_MARGIN)) < 1e-6  # mtime + settle
    assert s.due(0.9) == set()
    assert s.due(look) == {b"a.csv"}
    assert s.looked([b"a.csv"], [f], *at(look)) == [f]
    assert s.next_look() is None
    assert s.looked([b"a.csv"], [f], *at(look + 5)) == []  # registered: never again


def test_a_file_that_changes_starts_over() -> None:
    s = Sightings(settle=1.0)
    assert s.looked([b"a"], [rec(b"a", 0.0, size=1)], *at(0.0)) == []
    grown = rec(b"a", 0.5, size=2)
    assert s.looked([b"a"], [grown], *at(1.1)) == []  # mtime 0.5: settled at 1.5
    assert s.looked([b"a"], [grown], *at(1.6)) == [grown]


def test_an_old_mtime_must_be_seen_unchanged_for_settle_seconds() -> None:
    s = Sightings(settle=1.0)
    old = rec(b"moved.csv", mtime_s=-3600)
    assert s.looked([b"moved.csv"], [old], *at(10.0)) == []
    assert s.looked([b"moved.csv"], [old], *at(10.5)) == []  # an event: too soon
    assert s.looked([b"moved.csv"], [old], *at(11.0)) == [old]


def test_a_file_seen_at_every_poll_while_it_waits_keeps_one_scheduled_look() -> None:
    # (Every full scan of a file that waits long pushed one more entry to the schedule, kept
    # until its time: 2,000 files dated in the future grew a watch by 5 MB a second at
    # --no-events --poll 0.05, for good.)
    s = Sightings(settle=1.0)
    future = rec(b"future.csv", mtime_s=1e9)  # touch -d 2050: settles then
    later = rec(b"later.csv", mtime_s=4.0)  # settles at 5 s
    for i in range(1000):  # scans, and events naming them
        t = i * 0.004
        assert s.scanned([later, future], *at(t)) == []
        assert s.looked([b"later.csv", b"future.csv"], [later, future], *at(t)) == []
    assert len(s._schedule) <= 4
    assert s.due(4.9) == set()
    look = s.next_look()
    assert look is not None
    assert abs(look - (5.0 + LOOK_MARGIN)) < 1e-6  # still taken at its time
    assert s.due(look) == {b"later.csv"}
    assert s.looked([b"later.csv"], [later], *at(look)) == [later]
    assert s.waiting == 1


def test_settle_zero_still_needs_two_looks() -> None:
    s = Sightings(settle=0.0)
    f = rec(b"a", 0.0)
    assert s.looked([b"a"], [f], *at(0.0)) == []
    assert s.looked([b"a"], [f], *at(0.001)) == [f]


def test_an_object_settled_when_first_seen_is_taken_at_once() -> None:
    s = Sightings(settle=1.0, immutable=True)  # objects: complete once visible
    old = rec(b"o", mtime_s=-5.0)
    assert s.looked([b"o"], [old], *at(0.0)) == [old]
    assert s.next_look() is None
    fresh = rec(b"p", mtime_s=0.0)  # LastModified within settle: waits for it, as a file
    assert s.looked([b"p"], [fresh], *at(0.1)) == []
    assert s.looked([b"p"], [fresh], *at(1.1)) == [fresh]


def test_a_scan_forgets_what_is_gone_and_takes_what_is_ready() -> None:
    s = Sightings(settle=1.0)
    a, b = rec(b"a", -10), rec(b"b", -10)
    assert s.scanned([a, b], *at(0.0)) == []
    assert s.waiting == 2
    assert s.scanned([a], *at(1.0)) == [a]  # b is gone
    assert s.waiting == 0
    assert s.scanned([a], *at(2.0)) == []


def test_a_listing_names_new_and_replaced_files_only() -> None:
    s = Sightings(settle=0.0)
    a = rec(b"a", -10, inode=1)
    s.scanned([a], *at(0.0))
    s.scanned([a], *at(0.1))  # registered
    same = name_key(a)
    replaced = b"a\0" + (2).to_bytes(8, "big")
    new = b"n\0" + (3).to_bytes(8, "big")
    assert s.unknown([same]) == []
    assert s.unknown([same, replaced, new]) == [b"a", b"n"]


async def test_a_listing_names_what_a_scan_lists(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_files(src, 3)
    make_files(src / "sub", 2, prefix="s")
    (src / ".hidden").write_bytes(b"h")
    (src / "x.tmp").write_bytes(b"t")
    os.symlink(src / "f00000.txt", src / "link.txt")
    for recursive in (False, True):
        scanner = Scanner(src, rules=ScanRules(), recursive=recursive)
        records = await scanner.scan(settle=None)
        assert scanner.last is not None
        assert scanner.last.full
        names = await scanner.list_names()
        assert sorted(names) == sorted(name_key(r) for r in records)
        assert len(records) == (5 if recursive else 3)
        # a listing is a poll too (health: "the last poll ended ... ago")
        assert scanner.last is not None
        assert (scanner.last.full, scanner.last.files) == (False, len(names))


async def test_a_look_lists_what_a_scan_would(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_files(src, 2)
    make_files(src / "sub", 1, prefix="s")
    (src / ".hidden").write_bytes(b"h")
    os.symlink(src / "sub", src / "linked")
    scanner = Scanner(src, rules=ScanRules(), recursive=True)
    by_scan = await scanner.scan(settle=None)
    asked = [b"f00000.txt", b"f00001.txt", b"sub/s00000.txt", b".hidden", b"gone.txt"]
    asked += [b"linked/s00000.txt", b"sub"]
    records, saw_dir = await scanner.look(asked)
    assert records == by_scan
    assert saw_dir  # "sub": a directory the scan walks


async def test_an_unchanged_flat_source_is_told_by_one_stat(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_files(src, 3)
    scanner = Scanner(src, rules=ScanRules())
    await scanner.scan(settle=None)
    assert not await scanner.unchanged()  # its mtime is fresh: a change could hide in its tick
    old = time.time() - 10
    os.utime(src, (old, old))
    await scanner.list_names()
    assert await scanner.unchanged()
    assert scanner.last is not None
    assert (scanner.last.full, scanner.last.files) == (False, 3)
    (src / "new.csv").write_bytes(b"new")  # a new name: the directory's mtime moves
    assert not await scanner.unchanged()
    recursive = Scanner(src, rules=ScanRules(), recursive=True)
    os.utime(src, (old, old))
    await recursive.list_names()
    assert not await recursive.unchanged()  # a subdirectory's changes would not show


def test_by_path_a_name_registered_and_still_listed_is_a_candidate_again() -> None:
    s = Sightings(settle=1.0, by_path=True)
    a, b = rec(b"a", -10), rec(b"b", -10)
    assert s.scanned([a, b], *at(0.0)) == []
    again: set[bytes] = set()
    assert s.scanned([a, b], *at(1.0), again=again) == [a, b]
    assert again == set()  # first registered now
    touched = rec(b"a", 1.5)  # a new mtime: under identity "path" the same item
    assert s.looked([b"a"], [touched], *at(1.6), again=again) == []  # it settles first
    assert s.looked([b"a"], [touched], *at(2.6), again=again) == [touched]
    assert again == {b"a"}
    again.clear()
    assert s.scanned([touched, b], *at(3.0), again=again) == []  # registered as it is
    # A name that left the listing is forgotten: back, it is registered anew.
    assert s.scanned([touched], *at(4.0)) == []
    back = rec(b"b", 3.5)
    assert s.scanned([touched, back], *at(5.0), again=again) == []
    assert s.scanned([touched, back], *at(6.0), again=again) == [back]
    assert again == set()
    # So is one a look finds gone.
    assert s.looked([b"b"], [], *at(7.0)) == []
    made = rec(b"b", 6.5)
    assert s.looked([b"b"], [made], *at(7.6)) == []
    assert s.looked([b"b"], [made], *at(8.6), again=again) == [made]
    assert again == set()
    # One the ledger's log names (asyncbatch forget; given back to be taken again) is a
    # candidate again, registered before: the claim tells what its item is now.
    s.look_again([b"a"])
    assert s.scanned([touched, made], *at(9.0), again=again) == []
    assert s.scanned([touched, made], *at(10.0), again=again) == [touched]
    assert again == {b"a"}


def test_without_by_path_a_name_the_ledger_names_again_is_again_once() -> None:
    s = Sightings(settle=0.5)
    a, b = rec(b"a", -10), rec(b"b", -10)
    again: set[bytes] = set()
    s.scanned([a, b], *at(0.0))
    assert s.scanned([a, b], *at(1.0), again=again) == [a, b]
    assert again == set()
    s.look_again([b"a", b"gone"])
    assert s.scanned([a, b], *at(2.0), again=again) == []  # looked at as a new file:
    assert s.scanned([a, b], *at(2.6), again=again) == [a]  # unchanged a settle later
    assert again == {b"a"}
    again.clear()
    s.look_again([b"b"])
    assert s.scanned([a], *at(3.0), again=again) == []  # b left the listing: forgotten
    back = rec(b"b", 2.5)
    assert s.scanned([a, back], *at(3.2), again=again) == []
    assert s.scanned([a, back], *at(4.0), again=again) == [back]
    assert again == set()  # a file gone and back is new


def test_without_by_path_no_candidate_is_again() -> None:
    s = Sightings(settle=0.0)
    a = rec(b"a", -10)
    again: set[bytes] = set()
    s.scanned([a], *at(0.0))
    assert s.scanned([a], *at(0.1), again=again) == [a]
    touched = rec(b"a", -5)
    s.scanned([touched], *at(0.2), again=again)
    assert s.scanned([touched], *at(0.3), again=again) == [touched]  # a new item (stat)
    assert again == set()


def test_by_path_a_waiting_file_the_ledger_finished_is_not_seen_again_when_touched() -> None:
    # Identity "path": a file done before a marker rule was given waits for its marker; the
    # ledger says it is done (counted then as seen and done before). Touched later, with its
    # marker there, it is a registered name again, not a new one to count.
    s = Sightings(1.0, Readiness(ready_rules(["age", "marker:.ok"]), 1.0), by_path=True)
    a = rec(b"a", -10)
    assert s.scanned([a], *at(0.0), {b"a": "marker"}) == []
    assert s.unasked() == [a]
    s.asked([a], [a])
    touched = rec(b"a", 1.5)
    again: set[bytes] = set()
    assert s.looked([b"a"], [touched], *at(1.6), again=again) == []
    assert s.looked([b"a"], [touched], *at(2.6), again=again) == [touched]
    assert again == {b"a"}
