"""Watching an s3:// source by its S3 event notifications (--events sqs://QUEUE), against
moto on 127.0.0.1 (which delivers S3 notifications to SQS): objects are handled as their
notifications come, each message deleted once what it names is registered, and a backfill
listing finds what no notification named."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from asyncbatch import Batch, ConfigurationError, TaskContext
from asyncbatch._sources.sqs import HeldMessages, object_keys

from .conftest import until
from .s3 import Bucket


def notify(bucket: Bucket, prefix: str = "in/") -> tuple[str, str]:
    """A queue that gets the bucket's ObjectCreated notifications under ``prefix``: its
    ``sqs://`` name and URL."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=bucket.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    name = f"q-{uuid.uuid4().hex[:12]}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    rules = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    bucket.client.put_bucket_notification_configuration(
        Bucket=bucket.name,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"], "Filter": rules}
            ]
        },
    )
    return f"sqs://{name}", url


def messages_left(bucket: Bucket, url: str) -> int:
    import boto3

    sqs = boto3.client("sqs", endpoint_url=bucket.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


async def test_objects_are_handled_as_their_notifications_come(bucket: Bucket, state: Path) -> None:
    queue, url = notify(bucket)
    bucket.put("in/first.txt", b"found by the first listing")
    handled: list[str] = []
    first, three = anyio.Event(), anyio.Event()

    async def handler(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        first.set()
        if len(handled) == 3:
            three.set()

    batch = Batch(
        handler,
        source=bucket.url("in/"),
        state=state,
        settle=0,
        event_queue=queue,
        backfill_interval=3600,  # after the first listing, only the notifications tell
        poll=3600,  # nor a poll while the queue is being opened (slowly, on a busy machine)
        metrics=True,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(60):
            await first.wait()
            for name in ("a.txt", "sub/b.txt", "c d.txt"):  # sub/: not --recursive
                bucket.put(f"in/{name}", b"x")
            bucket.put("elsewhere/e.txt", b"not ours")
            await three.wait()
            await until(lambda: not messages_left(bucket, url))  # polled: the server is moto
        batch.stop()
    assert sorted(handled) == ["a.txt", "c d.txt", "first.txt"]
    import prometheus_client

    text = prometheus_client.generate_latest(batch.metrics_registry).decode()
    assert 'operation="sqs_delete"' in text
    lists = [line for line in text.splitlines() if 'operation="list"' in line]
    # The check of the source at the start (one page), and the first listing.
    assert lists == ['asyncbatch_object_requests_total{batch_job="default",operation="list"} 2.0']


def test_a_queue_is_for_an_s3_source(inbox: Path, state: Path) -> None:
    async def handler(ctx: TaskContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match="for an s3:// source"):
        Batch(handler, source=inbox, state=state, event_queue="sqs://q")
    with pytest.raises(ConfigurationError, match="expected sqs://QUEUE"):
        Batch(handler, source="s3://bkt/in/", state=state, event_queue="https://x/y")


def test_a_message_is_released_once_all_it_names_is_resolved() -> None:
    held = HeldMessages()
    held.hold("m1", [b"a", b"b"])
    held.hold("m2", [b"b"])
    assert held.resolve([b"b"]) == ["m2"]
    assert len(held) == 1
    assert held.resolve([b"x", b"a"]) == ["m1"]
    assert not held


def test_notification_bodies_name_the_created_keys_of_the_bucket() -> None:
    body = (
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, '
        '"object": {"key": "in/a+b%2Bc.txt"}}}, {"eventName": "ObjectRemoved:Delete", "s3": '
        '{"bucket": {"name": "b"}, "object": {"key": "in/gone"}}}, {"eventName": '
        '"ObjectCreated:Copy", "s3": {"bucket": {"name": "other"}, "object": {"key": "x"}}}]}'
    )
    assert object_keys(body, "b") == ["in/a b+c.txt"]
    assert object_keys('{"Event": "s3:TestEvent"}', "b") == []
    assert object_keys("not json", "b") == []


async def test_the_backfill_listing_finds_what_no_notification_named(
    bucket: Bucket, state: Path
) -> None:
    queue, _ = notify(bucket, prefix="in/n")  # only keys starting in/n are notified
    handled: list[str] = []
    started, done = anyio.Event(), anyio.Event()

    async def handler(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        started.set()
        if {"n1.txt", "quiet.txt"} <= set(handled):
            done.set()

    bucket.put("in/n0.txt", b"x")
    batch = Batch(
        handler,
        source=bucket.url("in/"),
        state=state,
        settle=0,
        event_queue=queue,
        backfill_interval=0.2,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(60):
            await started.wait()
            bucket.put("in/n1.txt", b"x")
            bucket.put("in/quiet.txt", b"no notification for this one")
            await done.wait()
        batch.stop()
    assert sorted(handled) == ["n0.txt", "n1.txt", "quiet.txt"]


def test_a_queue_that_is_not_there_is_one_line_and_exit_69(bucket: Bucket, state: Path) -> None:
    from .conftest import cli

    out = cli(
        "run", "tests.cli_handlers:record", "--watch", "--source", bucket.url("in/"),
        "--state", str(state), "--events", "sqs://no-such-queue", "--poll", "3600",
        env=bucket.env,
    )  # fmt: skip
    assert out.returncode == 69, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("asyncbatch: error: cannot open sqs://no-such-queue: ")
    assert "QueueDoesNotExist" in lines[0]


def test_events_without_watch_is_refused_in_one_line(bucket: Bucket, state: Path) -> None:
    from .conftest import cli

    queue, _ = notify(bucket)
    bucket.put("in/a.txt", b"x")
    out = cli(
        "run", "tests.cli_handlers:record", "--source", bucket.url("in/"),
        "--state", str(state), "--events", queue, env=bucket.env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line == (
        f"asyncbatch run: error: --events {queue!r} is for a watch: give --watch too "
        "(a run without it lists the source once and reads no queue)"
    )
    assert out.stdout == ""
    assert not state.exists()  # nothing ran


async def test_a_batch_run_with_an_event_queue_is_refused_before_the_state(
    bucket: Bucket, state: Path
) -> None:
    # (The CLI refused --events without --watch; Batch(event_queue=...).run() ignored it.)
    queue, _ = notify(bucket)

    async def handle(ctx: TaskContext) -> None:
        raise AssertionError("nothing is handled")

    batch = Batch(handle, source=bucket.url("in/"), state=state, event_queue=queue)
    with pytest.raises(ConfigurationError, match="nothing for run\\(\\): a queue of S3 event"):
        await batch.run()
    assert not state.exists()
