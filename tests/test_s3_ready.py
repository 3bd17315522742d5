"""Readiness rules over an object-store source: markers, ``_SUCCESS`` per prefix, min-size and
max-age, judged from the listing as a directory's walk judges files, one-shot and in watch mode
(against moto on 127.0.0.1); markers follow their objects' post-commit actions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncbatch import Batch, Report, TaskContext
from asyncbatch._ready import Readiness, parse_rule
from asyncbatch._sources.ready import ready_objects
from asyncbatch._sources.store import ObjectInfo

from .conftest import until
from .s3 import Bucket

S = 1_000_000_000
NOW = 1_800_000_000 * S


Listed = tuple[bytes, ObjectInfo, bool]


def obj(rel: str, *, age: float = 60.0, size: int = 10, skipped: bool = False) -> Listed:
    """A listed object ``rel``, LastModified ``age`` seconds before :data:`NOW` (``skipped``:
    its name is one the scan rules skip)."""
    info = ObjectInfo(f"in/{rel}", size, NOW - int(age * S), None, None, 1)
    return rel.encode(), info, skipped


def judged(rules: list[str], objects: list[Listed]) -> tuple[list[str], Any]:
    ready = Readiness([parse_rule(r) for r in rules], settle=1.0)
    records, walk = ready_objects(objects, ready, cutoff_ns=NOW - S, now_ns=NOW)
    return sorted(r[8:-25].decode() for r in records), walk


def test_a_listing_judges_objects_by_every_rule_as_a_walk_judges_files() -> None:
    listed, walk = judged(
        ["age", "marker:.done", "min-size:5", "max-age:1h"],
        [
            obj("a.csv", age=30),
            obj("a.csv.done", age=20),  # written after its object: a.csv is ready
            obj("b.csv", age=30),  # no marker
            obj("c.csv", age=10),
            obj("c.csv.done", age=20),  # older than its object: c.csv waits for a newer one
            obj("tiny.csv", size=2),
            obj("tiny.csv.done"),
            obj("old.csv", age=7200),
            obj("old.csv.done", age=7200),
            obj("new.csv", age=0.2),  # not settled yet
            obj("new.csv.done", age=0.1),
        ],
    )
    assert listed == ["a.csv"]
    assert walk.not_ready == {
        "max-age": 1,
        "min-size": 1,
        "age": 1,
        "stable": 0,
        "marker": 2,
        "dir-marker": 0,
    }


def test_a_listing_counts_ahead_of_the_clock_only_what_is_later_than_the_clock() -> None:
    # The listing began a minute ago (now_ns); one object was uploaded since (later than the
    # listing's start, not than the clock read after it), one is an hour ahead (real skew).
    now = time.time_ns()
    began = now - 60 * S
    ready = Readiness([parse_rule(r) for r in ["age", "min-size:1"]], settle=1.0)
    since = ObjectInfo("in/since.csv", 10, now - 5 * S, None, None, 1)
    ahead = ObjectInfo("in/ahead.csv", 10, now + 3600 * S, None, None, 2)
    old = ObjectInfo("in/old.csv", 10, began - 60 * S, None, None, 3)
    listed = [(o.key[3:].encode(), o, False) for o in (since, ahead, old)]

    records, walk = ready_objects(listed, ready, cutoff_ns=began - S, now_ns=began)

    assert [r[8:-25] for r in records] == [b"old.csv"]
    assert (walk.not_ready["age"], walk.future) == (2, 1)


def test_a_success_marker_covers_its_prefix_and_those_under_it() -> None:
    listed, walk = judged(
        ["dir-marker:_SUCCESS"],
        [
            obj("out/part-0", age=30),
            obj("out/p=1/part-1", age=30),
            obj("out/_SUCCESS", age=20),
            obj("late/part-0", age=10),
            obj("late/_SUCCESS", age=20),  # older than a file under it
            obj("other/x.csv", age=30),
            obj("empty/_SUCCESS", age=20),  # nothing under it: left behind by an action
        ],
    )
    assert listed == ["out/p=1/part-1", "out/part-0"]
    assert walk.not_ready["dir-marker"] == 2
    assert walk.late == {b"late/_SUCCESS": 1}
    assert walk.orphans == [b"empty/_SUCCESS"]


def test_markers_are_told_before_the_scan_rules_and_skipped_names_are_still_seen() -> None:
    listed, walk = judged(
        ["marker:.done", "dir-marker:.complete"],
        [
            obj("x.json", skipped=True),  # --ignore '*.json': another job's input
            obj("x.json.done"),  # its marker: not a leftover of this job
            obj("a.csv"),
            obj("a.csv.done"),
            obj(".complete", skipped=True),  # a hidden directory marker counts as one
        ],
    )
    assert listed == ["a.csv"]
    assert walk.orphans == []


class Job:
    """A job over the bucket's ``in/`` prefix, archiving to its ``done/`` prefix."""

    def __init__(self, bucket: Bucket, state: Path, **settings: Any) -> None:
        self.bucket = bucket
        self.handled: list[str] = []
        self.settings = {
            "source": bucket.url("in/"),
            "state": state,
            "settle": 0,
            "on_done": f"move:{bucket.url('done/')}",
            "poll": 0.1,
            **settings,
        }

    async def handle(self, ctx: TaskContext) -> None:
        await ctx.read_bytes()
        self.handled.append(ctx.entry.relpath)

    def batch(self) -> Batch:
        return Batch(self.handle, **self.settings)

    async def run(self) -> Report:
        return await self.batch().run()

    def left(self) -> list[str]:
        return [k.removeprefix("in/") for k in self.bucket.keys("in/")]

    def archived(self) -> list[str]:
        return [k.removeprefix("done/") for k in self.bucket.keys("done/")]


async def test_marker_objects_are_not_inputs_and_follow_their_object_to_the_archive(
    bucket: Bucket, state: Path
) -> None:
    job = Job(bucket, state, ready=["marker:.done", "min-size:2"])
    bucket.put("in/a.csv", b"aa")
    bucket.put("in/a.csv.done", b"")
    bucket.put("in/b.csv", b"bb")  # no marker yet
    bucket.put("in/c.csv", b"c")  # too small
    bucket.put("in/c.csv.done", b"")
    first = await job.run()
    assert (first.seen, first.done, first.unmarked, first.too_small) == (1, 1, 1, 1)
    assert "1 file not ready yet: marker missing, or older than its file" in str(first)
    bucket.put("in/b.csv.done", b"")
    second = await job.run()
    assert (second.seen, second.done, second.unmarked) == (1, 1, 0)
    assert sorted(job.handled) == ["a.csv", "b.csv"]  # each once; markers never
    await until(lambda: job.left() == ["c.csv", "c.csv.done"])
    assert job.archived() == ["a.csv", "a.csv.done", "b.csv", "b.csv.done"]


async def test_a_success_marker_releases_its_prefix_and_goes_once_it_is_empty(
    bucket: Bucket, state: Path
) -> None:
    job = Job(bucket, state, ready=["dir-marker:_SUCCESS"], recursive=True, on_done="delete")
    bucket.put("in/out/part-0", b"0")
    bucket.put("in/out/part-1", b"1")
    bucket.put("in/other/x.csv", b"x")
    first = await job.run()
    assert (first.seen, first.dir_unmarked) == (0, 3)
    bucket.put("in/out/_SUCCESS", b"")
    second = await job.run()
    assert (second.seen, second.done, second.dir_unmarked) == (2, 2, 1)
    assert sorted(job.handled) == ["out/part-0", "out/part-1"]
    assert job.left() == ["other/x.csv"]  # the marker deleted with the prefix's last object


async def test_a_marker_left_behind_by_a_kill_is_carried_out_by_the_next_run(
    bucket: Bucket, state: Path
) -> None:
    bucket.put("in/a.csv", b"a")
    bucket.put("in/a.csv.ok", b"")
    bucket.put("in/early.csv.ok", b"")  # a marker uploaded before its object
    first = await Job(bucket, state, ready=["marker:.ok"], on_done="keep").run()
    assert first.done == 1
    bucket.put("done/a.csv", b"a")  # its object archived, then the run died
    bucket.client.delete_object(Bucket=bucket.name, Key="in/a.csv")
    job = Job(bucket, state, ready=["marker:.ok"])
    await job.run()
    await until(lambda: job.left() == ["early.csv.ok"])  # not a leftover: its object comes
    assert job.archived() == ["a.csv", "a.csv.ok"]
    bucket.put("in/early.csv", b"e")
    bucket.put("in/early.csv.ok", b"")  # (S3 times are upload times: a marker comes last)
    await job.run()
    await until(lambda: job.left() == [])
    assert job.handled == ["early.csv"]


@pytest.mark.parametrize("rule", ["marker:.done", "dir-marker:_SUCCESS"])
async def test_a_watch_handles_an_object_once_its_marker_arrives(
    bucket: Bucket, state: Path, rule: str
) -> None:
    job = Job(bucket, state, ready=[rule], recursive=True)
    marker = "in/part/a.csv.done" if rule.startswith("marker") else "in/part/_SUCCESS"
    counter = "unmarked" if rule.startswith("marker") else "dir_unmarked"
    bucket.put("in/part/a.csv", b"a")
    batch = job.batch()

    def count() -> int:
        stats = batch.statistics()
        return -1 if stats is None else int(getattr(stats, counter))

    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await until(lambda: count() == 1)
        assert job.handled == []
        bucket.put(marker, b"")
        await until(lambda: job.handled == ["part/a.csv"] and count() == 0)
        await until(lambda: job.left() == [])
        batch.stop()
    assert job.archived() == sorted(["part/a.csv", marker.removeprefix("in/")])


def test_last_modified_is_kept_to_the_second_so_a_listing_and_a_head_agree() -> None:
    import datetime as dt

    listed = dt.datetime(2026, 12, 6, 12, 0, 0, 730_000, tzinfo=dt.UTC)
    headed = listed.replace(microsecond=0)  # an HTTP date has no fraction
    infos = [
        ObjectInfo.of(
            {"path": "in/a", "size": 1, "last_modified": when, "e_tag": '"x"', "version": None}
        )
        for when in (listed, headed)
    ]
    assert infos[0] == infos[1]
    assert infos[0].mtime_ns % S == 0
