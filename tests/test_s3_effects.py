"""Effects on objects, repeatable after a crash at any point: archive (copy, then delete),
delete, outputs written with one PUT (fenced by the lease); local and object places mixed."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from asyncbatch import Batch, LockLostError, TaskContext
from asyncbatch._sources.effects import delete_object, move_object
from asyncbatch._sources.store import ObjectStores, version_tag
from asyncbatch._sources.url import ObjectURL

from .conftest import cli, invocations, make_files, take_over_lease
from .s3 import Bucket, MotoServer

ROOT = Path(__file__).parent.parent


async def copy_out(ctx: TaskContext) -> None:
    await ctx.write_output(ctx.entry.relpath + ".out", (await ctx.read_bytes()).upper())


async def test_on_done_move_archives_each_object(bucket: Bucket, state: Path) -> None:
    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"x%d" % i)
    bucket.put("in/sub/deep.txt", b"deep")

    async def handler(ctx: TaskContext) -> None:
        await ctx.read_bytes()

    archive = bucket.url("done/")
    report = await Batch(
        handler,
        source=bucket.url("in/"),
        state=state,
        settle=0,
        recursive=True,
        on_done=f"move:{archive}",
    ).run()
    assert (report.done, report.post_failed) == (4, 0)
    assert bucket.keys("in/") == []
    assert bucket.keys("done/") == [
        "done/f0.txt",
        "done/f1.txt",
        "done/f2.txt",
        "done/sub/deep.txt",
    ]
    assert bucket.get("done/f1.txt") == b"x1"


async def test_on_done_delete_removes_each_object(bucket: Bucket, state: Path) -> None:
    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"x")

    async def handler(ctx: TaskContext) -> None:
        pass

    report = await Batch(
        handler, source=bucket.url("in/"), state=state, settle=0, on_done="delete"
    ).run()
    assert report.done == 3
    assert bucket.keys() == []


async def test_a_newer_version_is_never_deleted_nor_archived(bucket: Bucket) -> None:
    old = bucket.put("in/a.txt", b"old")
    bucket.put("in/b.txt", b"old")
    bucket.put("in/a.txt", b"new")
    bucket.put("in/b.txt", b"new")
    stores = ObjectStores()
    source = ObjectURL.parse("source", bucket.url("in/"))
    said = await delete_object(stores, source, "a.txt", 3, version_tag(old), mtime_ns=None)
    assert said == "left alone: the object was replaced by a newer version"
    archive = ObjectURL.parse("on_done", bucket.url("done/"))
    said = await move_object(
        stores, source, archive, "b.txt", ("k" * 40, 3, version_tag(old)), mtime_ns=None
    )
    assert said == "left alone: the object was replaced by a newer version"
    assert bucket.keys() == ["in/a.txt", "in/b.txt"]
    assert stores.requests["delete"] == 0


@pytest.mark.parametrize("on_done", ["delete", "move"])
async def test_the_same_bytes_uploaded_again_while_handled_are_a_new_item_left_in_place(
    bucket: Bucket, state: Path, on_done: str
) -> None:
    bucket.put("in/a.txt", b"same")
    first = bucket.last_modified("in/a.txt")
    handled: list[int] = []

    async def handler(ctx: TaskContext) -> None:
        handled.append(ctx.entry.mtime_ns)
        if len(handled) == 1:
            # The producer sends the file again, the same bytes: the same ETag, a later
            # LastModified (S3 keeps it to the second: uploaded again until it is later).
            while bucket.last_modified("in/a.txt") == first:
                bucket.put("in/a.txt", b"same")
                await anyio.sleep(0.1)

    action = "delete" if on_done == "delete" else f"move:{bucket.url('done/')}"
    batch = Batch(handler, source=bucket.url("in/"), state=state, settle=0, on_done=action)
    report = await batch.run()
    assert report.done == 1
    assert bucket.keys("in/") == ["in/a.txt"]  # a new item: not deleted nor archived unhandled
    report = await batch.run()
    assert report.done == 1
    assert len(handled) == 2
    assert handled[0] < handled[1]
    assert bucket.keys("in/") == []


async def test_a_repeated_move_finds_its_own_copy(bucket: Bucket) -> None:
    etag = bucket.put("in/a.txt", b"abc")
    stores = ObjectStores()
    source = ObjectURL.parse("source", bucket.url("in/"))
    archive = ObjectURL.parse("on_done", bucket.url("done/"))
    item = ("k" * 40, 3, version_tag(etag))
    bucket.client.copy_object(  # a crash between the copy and the delete left both
        Bucket=bucket.name, Key="done/a.txt", CopySource={"Bucket": bucket.name, "Key": "in/a.txt"}
    )
    assert await move_object(stores, source, archive, "a.txt", item, mtime_ns=None) == (
        f"moved to s3://{bucket.name}/done/a.txt"
    )
    assert stores.requests["copy"] == 0  # its copy was there already
    said = await move_object(stores, source, archive, "a.txt", item, mtime_ns=None)
    assert said == "already moved"
    assert bucket.keys() == ["done/a.txt"]


async def test_an_archive_holding_another_object_gets_a_keyed_name(bucket: Bucket) -> None:
    etag = bucket.put("in/a.txt", b"mine")
    bucket.put("done/a.txt", b"someone else's")
    stores = ObjectStores()
    source = ObjectURL.parse("source", bucket.url("in/"))
    archive = ObjectURL.parse("on_done", bucket.url("done/"))
    key = "0" * 24 + "abcdef0123456789"
    said = await move_object(
        stores, source, archive, "a.txt", (key, 4, version_tag(etag)), mtime_ns=None
    )
    assert said == f"moved to s3://{bucket.name}/done/a.abcdef0123456789.txt"
    assert bucket.get("done/a.txt") == b"someone else's"
    assert bucket.get("done/a.abcdef0123456789.txt") == b"mine"


def test_a_crash_between_copy_and_delete_is_finished_by_the_next_run(
    bucket: Bucket, tmp_path: Path
) -> None:
    for i in range(4):
        bucket.put(f"in/f{i}.txt", b"x%d" % i)
    state, log = tmp_path / "state.db", tmp_path / "log"
    args = [
        "run",
        "tests.cli_handlers:record",
        "--source",
        bucket.url("in/"),
        "--state",
        str(state),
        "--on-done",
        f"move:{bucket.url('done/')}",
        "--no-progress",
    ]
    env = {**bucket.env, "AB_LOG": str(log)}
    crashed = cli(
        *args, env={**env, "ASYNCBATCH_FAILPOINTS": "between-copy-and-delete=kill:2"}, cwd=ROOT
    )
    assert crashed.returncode == -9
    assert len(bucket.keys("done/")) >= 2  # copied, and for the second one not deleted
    assert len(bucket.keys("in/")) >= 3
    result = cli(*args, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert bucket.keys("in/") == []
    assert bucket.keys("done/") == [f"done/f{i}.txt" for i in range(4)]
    assert all(n == 1 for n in invocations(log).values())  # none handled twice


@pytest.mark.parametrize("across", [False, True], ids=["same-bucket", "across-buckets"])
def test_a_crash_after_copying_an_object_uploaded_in_parts_archives_it_once(
    bucket: Bucket, s3_server: MotoServer, tmp_path: Path, across: bool
) -> None:
    # The copy of a multipart object (ETag "...-2") is one part (ETag: its bytes' MD5), so
    # the archive's ETag is not the source's: the next run must still know it for its copy.
    parts = [b"a" * (5 * 1024 * 1024), b"b" * 10]
    etag = bucket.put_in_parts("in/big.bin", parts)
    assert etag.rstrip('"').endswith("-2")
    archive = Bucket(s3_server) if across else bucket
    state, log = tmp_path / "state.db", tmp_path / "log"
    args = [
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"),
        "--state", str(state), "--on-done", f"move:{archive.url('done/')}", "--no-progress",
    ]  # fmt: skip
    env = {**bucket.env, "AB_LOG": str(log)}
    crashed = cli(
        *args, env={**env, "ASYNCBATCH_FAILPOINTS": "between-copy-and-delete=kill"}, cwd=ROOT
    )
    assert crashed.returncode == -9
    assert archive.keys("done/") == ["done/big.bin"]
    assert bucket.keys("in/") == ["in/big.bin"]
    result = cli(*args, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert bucket.keys("in/") == []
    assert archive.keys("done/") == ["done/big.bin"]  # no second copy under a keyed name
    assert archive.get("done/big.bin") == b"".join(parts)
    assert invocations(log) == {"big.bin": 1}


def test_an_archive_in_a_missing_bucket_says_the_bucket_is_missing(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put("in/a.txt", b"x")
    missing = f"{bucket.name}-nosuch"
    result = cli(
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"),
        "--state", str(tmp_path / "state.db"), "--on-done", f"move:s3://{missing}/arch/",
        "--no-progress", env=bucket.env, cwd=ROOT,
    )  # fmt: skip
    # Refused before the state is made or any item handled (a mistyped bucket).
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"asyncbatch: error: setting 'on_done' has value 'move:s3://{missing}/arch/': the "
        f"bucket {missing!r} does not exist (a mistyped one?)"
    ]
    assert not (tmp_path / "state.db").exists()
    assert bucket.keys("in/") == ["in/a.txt"]  # left in place


def test_a_crash_between_put_and_commit_rewrites_the_same_output(
    bucket: Bucket, tmp_path: Path
) -> None:
    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"x%d" % i)
    state = tmp_path / "state.db"
    args = [
        "run",
        "tests.test_s3_effects:copy_out",
        "--source",
        bucket.url("in/"),
        "--state",
        str(state),
        "--output-dir",
        bucket.url("out/"),
        "--no-progress",
    ]
    crashed = cli(*args, env={**bucket.env, "ASYNCBATCH_FAILPOINTS": "output-put=kill:2"}, cwd=ROOT)
    assert crashed.returncode == -9
    result = cli(*args, env=bucket.env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert bucket.keys("out/") == [f"out/f{i}.txt.out" for i in range(3)]
    assert [bucket.get(f"out/f{i}.txt.out") for i in range(3)] == [b"X0", b"X1", b"X2"]


async def test_a_local_source_writes_its_outputs_to_a_bucket(
    bucket: Bucket, inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    written: list[object] = []

    async def handler(ctx: TaskContext) -> None:
        written.append(await ctx.write_output(f"o/{ctx.entry.relpath}", await ctx.read_bytes()))

    report = await Batch(
        handler, source=inbox, state=state, settle=0, output_dir=bucket.url("res/")
    ).run()
    assert report.done == 2
    assert bucket.keys() == ["res/o/f00000.txt", "res/o/f00001.txt"]
    # What write_output returned: each handler its own object's URL (in whatever order the
    # two concurrent handlers finished).
    assert sorted(map(str, written)) == [
        f"s3://{bucket.name}/res/o/f00000.txt",
        f"s3://{bucket.name}/res/o/f00001.txt",
    ]


async def test_a_bucket_source_writes_its_outputs_to_a_directory(
    bucket: Bucket, state: Path, tmp_path: Path
) -> None:
    bucket.put("in/a.txt", b"abc")
    out = tmp_path / "out"
    out.mkdir()
    report = await Batch(
        copy_out, source=bucket.url("in/"), state=state, settle=0, output_dir=out
    ).run()
    assert report.done == 1
    assert (out / "a.txt.out").read_bytes() == b"ABC"


@pytest.mark.slow
async def test_an_output_after_the_lease_was_taken_over_is_not_put(
    bucket: Bucket, state: Path
) -> None:
    # The event loop blocked past the lease, and another runner took it over meanwhile: the
    # late PUT is refused (the ledger asked first says so). Nobody took it over, it would be
    # made: see tests/test_effects.py.
    bucket.put("in/a.txt", b"abc")
    refused: list[BaseException] = []
    lease = 3.0
    calls: list[int] = []

    async def handler(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            time.sleep(lease)  # noqa: ASYNC251 - the event loop blocked past the lease
            take_over_lease(str(state), ctx.entry.relpath)
            try:
                await ctx.write_output("late.txt", b"call 1")
            except LockLostError as e:
                refused.append(e)
                raise
        await ctx.write_output("late.txt", f"call {len(calls)}")

    report = await Batch(
        handler,
        source=bucket.url("in/"),
        state=state,
        settle=0,
        lease=lease,
        backoff=0.01,
        output_dir=bucket.url("out/"),
    ).run()
    assert report.done == 1
    assert len(refused) == 1
    assert bucket.get("out/late.txt") == b"call 2"
