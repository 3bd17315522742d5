"""Object-store sources (s3://BUCKET/PREFIX/) against a real S3 API on 127.0.0.1 (moto):
listing, identity, reading the version claimed, and what stays a directory's only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from asyncbatch import (
    Batch,
    ConfigurationError,
    ExecHandler,
    InputChangedError,
    Report,
    TaskContext,
)
from asyncbatch._sources.objects import ObjectEntry

from .conftest import cli, rows, state_counts, until
from .s3 import CANARY_SECRET, Bucket, MotoServer


async def test_every_object_under_the_prefix_is_handled_once(bucket: Bucket, state: Path) -> None:
    for i in range(5):
        bucket.put(f"in/f{i}.txt", b"x%d" % i)
    bucket.put("elsewhere/g.txt", b"not listed")
    seen: dict[str, bytes] = {}

    async def handler(ctx: TaskContext) -> None:
        assert isinstance(ctx.entry, ObjectEntry)
        seen[ctx.entry.url] = await ctx.read_bytes()

    report = await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    assert (report.done, report.seen, report.ok) == (5, 5, True)
    assert seen == {f"s3://{bucket.name}/in/f{i}.txt": b"x%d" % i for i in range(5)}
    recorded = rows(state, "SELECT relpath, size FROM items ORDER BY relpath")
    assert recorded == [(f"f{i}.txt".encode(), 2) for i in range(5)]
    again = await Batch(handler, source=bucket.url("in"), state=state, settle=0).run()
    assert (again.done, again.done_before) == (0, 5)


async def test_a_reuploaded_object_is_a_new_item(bucket: Bucket, state: Path) -> None:
    bucket.put("in/a.txt", b"first")
    handled: list[bytes] = []

    async def handler(ctx: TaskContext) -> None:
        handled.append(await ctx.read_bytes())

    await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    bucket.put("in/a.txt", b"other")  # same size, and likely the same second
    report = await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    assert report.done == 1
    assert handled == [b"first", b"other"]
    assert state_counts(state) == {"done": 2}


async def test_an_object_replaced_after_the_listing_is_not_read(
    bucket: Bucket, state: Path
) -> None:
    bucket.put("in/a.txt", b"a")
    bucket.put("in/b.txt", b"old")
    read: list[bytes] = []

    async def handler(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "a.txt":
            bucket.put("in/b.txt", b"new")  # b is listed, claimed, not opened yet
        read.append(await ctx.read_bytes())

    report = await Batch(
        handler, source=bucket.url("in/"), state=state, settle=0, concurrency=1, claim_batch=1
    ).run()
    assert b"old" not in read
    assert report.vanished + report.done == 2
    final = await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    assert b"new" in read
    assert final.ok


async def test_a_second_read_asks_for_the_same_version(bucket: Bucket, state: Path) -> None:
    bucket.put("in/a.txt", b"one")
    errors: list[BaseException] = []

    async def handler(ctx: TaskContext) -> None:
        assert await ctx.read_bytes() == b"one"
        bucket.put("in/a.txt", b"two!")
        try:
            await ctx.read_bytes()
        except InputChangedError as exc:
            errors.append(exc)
            raise

    report = await Batch(
        handler, source=bucket.url("in/"), state=state, settle=0, max_attempts=1
    ).run()
    assert len(errors) == 1
    assert "replaced" in str(errors[0])
    assert report.dead == 1


async def test_open_streams_a_large_object_in_bounded_chunks(bucket: Bucket, state: Path) -> None:
    body = b"".join(b"line %07d\n" % i for i in range(400_000))  # ~5 MiB
    bucket.put("in/big.log", body)
    got: list[int] = []
    lines = 0

    async def handler(ctx: TaskContext) -> None:
        nonlocal lines
        async with ctx.open() as f:
            assert await f.readline() == b"line 0000000\n"
            lines += 1
            while chunk := await f.read(64 * 1024):
                got.append(len(chunk))
        async with ctx.open() as f:  # a second open: from the start, the same version
            async for _ in f:
                lines += 1

    report = await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    assert report.done == 1
    assert sum(got) == len(body) - len(b"line 0000000\n")
    assert max(got) <= 64 * 1024
    assert lines == 400_001


async def test_objects_newer_than_settle_wait(bucket: Bucket, state: Path) -> None:
    bucket.put("in/fresh.txt", b"x")

    async def handler(ctx: TaskContext) -> None:
        pass

    report = await Batch(handler, source=bucket.url("in/"), state=state, settle=3600).run()
    assert (report.seen, report.unsettled) == (0, 1)


async def test_an_object_uploaded_after_the_listing_began_is_not_ahead_of_the_clock(
    bucket: Bucket,
) -> None:
    from asyncbatch._scanner import ScanRules
    from asyncbatch._sources.objects import ObjectLister
    from asyncbatch._sources.store import ObjectStores
    from asyncbatch._sources.url import ObjectURL

    bucket.put("in/a.txt", b"x")
    url = ObjectURL.parse("source", bucket.url("in/"))
    lister = ObjectLister(url, ObjectStores().bucket(url.bucket), rules=ScanRules())
    # A listing that began a minute ago (its now_ns): the object, uploaded since, is not
    # settled, and not ahead of this host's clock (read once its page came) either.
    assert await lister.scan(settle=0, now_ns=time.time_ns() - 60 * 10**9) == []
    assert lister.last is not None
    assert (lister.last.unsettled, lister.last.future) == (1, 0)


@pytest.mark.parametrize("mode", ["run", "watch"])
async def test_objects_done_before_are_not_said_to_wait_to_settle(
    bucket: Bucket, state: Path, mode: str
) -> None:
    """Objects a run with a shorter ``settle`` did are done, newer than the settle window
    or not: counted done before, never as not settled yet (taken once they settle)."""
    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"x%d" % i)

    async def handler(ctx: TaskContext) -> None:
        pass

    first = await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()
    assert first.done == 3
    batch = Batch(handler, source=bucket.url("in/"), state=state, settle=3600, poll=0.1)
    if mode == "run":
        report = await batch.run()
    else:
        found: list[Report] = []

        async def watch() -> None:
            found.append(await batch.watch())

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await until(lambda: getattr(batch.statistics(), "unsettled", 0) == 3)
            batch.stop()
        (report,) = found
    counts = (report.seen, report.done_before, report.unsettled)
    assert counts == (3, 3, 0), str(report)


async def test_the_scan_rules_apply_to_keys(bucket: Bucket, state: Path) -> None:
    for key in ("in/a.txt", "in/.hidden", "in/b.part", "in/sub/c.txt", "in/skip.csv", "in/d/"):
        bucket.put(key, b"x")
    handled: list[str] = []

    async def handler(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

    await Batch(handler, source=bucket.url("in/"), state=state, settle=0, ignore=["*.csv"]).run()
    assert handled == ["a.txt"]
    await Batch(
        handler, source=bucket.url("in/"), state=state, job="deep", settle=0, recursive=True
    ).run()
    assert sorted(handled[1:]) == ["a.txt", "skip.csv", "sub/c.txt"]


async def test_an_object_has_no_local_path(bucket: Bucket, state: Path) -> None:
    bucket.put("in/a.txt", b"x")

    async def handler(ctx: TaskContext) -> None:
        ctx.entry.path  # noqa: B018

    with pytest.raises(ConfigurationError, match="has no local path"):
        await Batch(handler, source=bucket.url("in/"), state=state, settle=0).run()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"source": "s3://Bad_Bucket/x/"}, "valid bucket name"),
        ({"source": "s3://bkt/../x/"}, "plain key prefix"),
        ({"identity": "content"}, "'stat' or 'path' for an s3:// source"),
        ({"on_done": "move:s3://bkt/in/done/"}, "overlaps the listed source prefix"),
        ({"output_dir": "s3://bkt/"}, "overlaps the listed source prefix"),
    ],
)
def test_bad_object_settings_are_refused_in_one_line(
    state: Path, settings: dict[str, str], message: str
) -> None:
    async def handler(ctx: TaskContext) -> None:
        pass

    given = {"source": "s3://bkt/in/", **settings}
    with pytest.raises(ConfigurationError, match=message):
        Batch(handler, state=state, **given)  # type: ignore[arg-type]


def test_an_archive_must_be_of_the_sources_kind(inbox: Path, state: Path) -> None:
    async def handler(ctx: TaskContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match="an s3:// archive is for an s3:// source"):
        Batch(handler, source=inbox, state=state, on_done="move:s3://bkt/done/")


def test_the_cli_lists_a_bucket_and_keeps_the_secret(bucket: Bucket, tmp_path: Path) -> None:
    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"hello")
    state = tmp_path / "state.db"
    result = cli(
        "run",
        "tests.cli_handlers:record",
        "--source",
        bucket.url("in/"),
        "--state",
        state,
        "--no-progress",
        "--log-level",
        "DEBUG",
        env={**bucket.env, "AB_LOG": str(tmp_path / "log")},
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "3 done" in result.stderr + result.stdout
    assert CANARY_SECRET not in result.stderr + result.stdout
    assert CANARY_SECRET.encode() not in state.read_bytes()
    assert sorted((tmp_path / "log").read_text().split()) == ["f0.txt", "f1.txt", "f2.txt"]


def test_a_bad_url_is_a_one_line_usage_error(state: Path) -> None:
    result = cli("run", "tests.cli_handlers:record", "--source", "s3://x", "--state", state)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asyncbatch: error: setting 'source' has value 's3://x': expected s3://BUCKET/PREFIX/ "
        "with a valid bucket name"
    ]


def test_a_run_over_a_directory_never_imports_obstore_nor_aiobotocore(
    inbox: Path, state: Path
) -> None:
    (inbox / "a.txt").write_bytes(b"x")
    code = f"""
import sys, anyio
from asyncbatch import Batch
async def handler(ctx):
    await ctx.read_bytes()
async def main():
    report = await Batch(handler, source={str(inbox)!r}, state={str(state)!r}, settle=0).run()
    assert report.done == 1
anyio.run(main)
assert "obstore" not in sys.modules, "obstore was imported"
assert "aiobotocore" not in sys.modules, "aiobotocore was imported"
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


async def test_an_object_deleted_after_the_listing_vanished(bucket: Bucket, state: Path) -> None:
    bucket.put("in/a.txt", b"a")
    bucket.put("in/b.txt", b"b")

    async def handler(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "a.txt":
            bucket.client.delete_object(Bucket=bucket.name, Key="in/b.txt")

    report = await Batch(
        handler, source=bucket.url("in/"), state=state, settle=0, concurrency=1, claim_batch=1
    ).run()
    assert (report.done, report.vanished, report.failed) == (1, 1, 0)


async def test_metrics_count_object_requests_by_operation_and_keep_the_secret(
    bucket: Bucket, state: Path
) -> None:
    import prometheus_client

    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"x")

    async def handler(ctx: TaskContext) -> None:
        await ctx.read_bytes()

    batch = Batch(
        handler,
        source=bucket.url("in/"),
        state=state,
        settle=0,
        metrics=True,
        on_done="delete",
        output_dir=bucket.url("out/"),
    )
    await batch.run()
    text = prometheus_client.generate_latest(batch.metrics_registry).decode()
    found = {
        line.split('operation="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("asyncbatch_object_requests_total{")
    }
    # The checks of the source and of the outputs' place at the start, and a listing (one page
    # each), a GET per object, and a HEAD and a DELETE per delete.
    assert found == {"list": 3, "get": 3, "head": 3, "delete": 3, "put": 0, "copy": 0}
    assert CANARY_SECRET not in text


def test_a_bucket_that_is_not_there_is_a_one_line_error(s3_server: MotoServer, state: Path) -> None:
    result = cli(
        "run",
        "tests.cli_handlers:record",
        "--source",
        "s3://no-such-bucket-here/in/",
        "--state",
        state,
        env=s3_server.env(),
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 2  # a mistyped bucket: refused before the state is made
    assert result.stderr.strip().splitlines() == [
        "asyncbatch: error: setting 'source' has value 's3://no-such-bucket-here/in/': the "
        "bucket 'no-such-bucket-here' does not exist (a mistyped one?)"
    ]
    assert not state.exists()


async def test_identity_path_handles_each_key_once(bucket: Bucket, state: Path) -> None:
    bucket.put("in/a.txt", b"first")
    handled: list[bytes] = []

    async def handler(ctx: TaskContext) -> None:
        handled.append(await ctx.read_bytes())

    settings = {"source": bucket.url("in/"), "state": state, "settle": 0, "identity": "path"}
    await Batch(handler, **settings).run()  # type: ignore[arg-type]
    bucket.put("in/a.txt", b"second, longer")
    again = await Batch(handler, **settings).run()  # type: ignore[arg-type]
    assert (again.done, again.done_before) == (0, 1)
    assert handled == [b"first"]


async def test_a_watch_waits_out_a_bucket_that_cannot_be_listed(
    bucket: Bucket, state: Path
) -> None:
    import anyio

    bucket.put("in/a.txt", b"x")
    handled: list[str] = []
    first, second = anyio.Event(), anyio.Event()

    async def handler(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        (second if first.is_set() else first).set()

    batch = Batch(handler, source=bucket.url("in/"), state=state, settle=0, poll=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(60):
            await first.wait()
            bucket.client.delete_object(Bucket=bucket.name, Key="in/a.txt")
            bucket.client.delete_bucket(Bucket=bucket.name)  # every listing fails now
            await until(lambda: not batch.health().check("source").ok)  # a run's view
            assert "NoSuchBucket" in batch.health().check("source").detail
            bucket.client.create_bucket(Bucket=bucket.name)
            bucket.put("in/b.txt", b"y")
            await second.wait()
            await until(lambda: batch.health().check("source").ok)
        batch.stop()
    assert handled == ["a.txt", "b.txt"]


def test_a_command_is_refused_for_an_s3_source_before_the_state_is_touched(
    bucket: Bucket, state: Path
) -> None:
    bucket.put("in/a.txt", b"a")
    out = cli(
        "run", "--exec", "cat {}", "--source", bucket.url("in/"), "--state", str(state),
        env=bucket.env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"asyncbatch: error: setting 'source' has value '{bucket.url('in/')}': a directory for "
        "a command (--exec): an object has no local path to give it (a Python handler reads it "
        "with ctx.read_bytes())"
    ]
    assert not state.exists()  # no job recorded with this source, no item registered
    with pytest.raises(ConfigurationError, match="a directory for a command"):
        Batch(ExecHandler("cat {}"), source=bucket.url("in/"), state=state)
