"""Running as a service: metrics scraped over real HTTP, health from real parts.

- ``Batch(metrics="127.0.0.1:0")`` serves /metrics, /healthz and /readyz while it watches real
  files; a scrape with httpx gives the exact counts of what happened.
- Each batch keeps its metrics in its own registry: two in one process do not mix, and the
  process-wide default registry holds none of them; counters add up across runs.
- ``import asyncbatch`` (and a run without metrics) never imports ``prometheus_client``.
- ``metrics_app()`` mounted into a Starlette app answers under its mount point.
- A metrics address in use is refused before anything is touched.
- Health: not ready before the lock and the first scan (a ledger another process holds),
  not live while a paused ledger keeps the heartbeat from renewing (and, watching, its polls
  from ending), not ready while stopping, not live once the lock was taken over (the run ends);
  a PostgreSQL outage waited out: not live meanwhile, counted as unreachable tries.
"""

from __future__ import annotations

import errno
import functools
import logging
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.stapled
import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncbatch import (
    Batch,
    ConfigurationError,
    Health,
    LockLostError,
    PermanentError,
    Report,
    TaskContext,
)
from asyncbatch._service.endpoints import Endpoints, bound_address, listen
from asyncbatch._service.health import not_running
from asyncbatch._service.server import serve

from .conftest import (
    HANDLERS,
    cli,
    kill,
    make_files,
    spawn,
    state_counts,
    until,
    until_settled,
    wait_for,
)
from .postgres import Server, require
from .test_postgres_outage import Outage

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and labels (``batch_job`` left out)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "batch_job"))
            found[(s.name, labels)] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def finished(batch: Batch, count: int) -> Callable[[], bool]:
    def check() -> bool:
        stats = batch.statistics()
        return stats is not None and stats.finished >= count

    return check


class Watching:
    """A batch watching in a background task of the test's task group."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.report: Report | None = None
        self.error: BaseException | None = None

    async def __call__(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            self.report = await self.batch.watch()
        except Exception as e:
            self.error = e


# -- metrics over real HTTP ------------------------------------------------------------------------


async def test_a_scrape_after_a_watch_over_real_files_gives_the_exact_counts(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 10)
    make_files(inbox, 2, prefix="bad")
    make_files(inbox, 1, prefix="flaky")
    tries: dict[str, int] = {}

    async def handle(ctx: TaskContext) -> None:
        tries[ctx.entry.relpath] = tries.get(ctx.entry.relpath, 0) + 1
        if ctx.entry.relpath.startswith("bad"):
            raise PermanentError("refused")
        if ctx.entry.relpath.startswith("flaky") and ctx.attempt == 1:
            raise ValueError("once")

    batch = Batch(
        handle,
        source=inbox,
        state=state,
        metrics="127.0.0.1:0",
        backoff=0,
        poll=0.05,
        settle=0,
        concurrency=4,
    )
    before = batch.metrics_address
    assert before is None, "serving only while a run is under way"
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(finished(batch, 13))
        await until(lambda: batch.health().ready)
        address = batch.metrics_address
        assert address is not None
        host, port = address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            scraped = await client.get("/metrics")
            live = await client.get("/healthz")
            ready = await client.get("/readyz")
            missing = await client.get("/nothing")
        batch.stop()
    assert watching.error is None
    after = batch.metrics_address
    assert after is None, "the server stopped with the run"

    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(scraped.text)
    assert value(found, "asyncbatch_items_total", outcome="done") == 11
    assert value(found, "asyncbatch_items_total", outcome="dead") == 2
    assert value(found, "asyncbatch_items_total", outcome="vanished") == 0
    assert value(found, "asyncbatch_items_total", outcome="done_before") == 0
    assert value(found, "asyncbatch_items_seen_total") == 13
    assert value(found, "asyncbatch_attempts_total", outcome="done") == 11
    assert value(found, "asyncbatch_attempts_total", outcome="failed") == 1
    assert value(found, "asyncbatch_attempts_total", outcome="dead") == 2
    assert sum(tries.values()) == 14
    for outcome, count in (("done", 11), ("failed", 1), ("dead", 2)):
        histogram = ("asyncbatch_handler_duration_seconds_count", (("outcome", outcome),))
        assert found[histogram] == count
        inf = ("asyncbatch_handler_duration_seconds_bucket", (("le", "+Inf"), ("outcome", outcome)))
        assert found[inf] == count
    assert value(found, "asyncbatch_claim_duration_seconds_count") >= 1
    assert value(found, "asyncbatch_commit_duration_seconds_count") >= 1
    assert value(found, "asyncbatch_queue_depth") == 0
    assert value(found, "asyncbatch_items_in_flight") == 0
    assert value(found, "asyncbatch_handlers_running") == 0
    assert value(found, "asyncbatch_oldest_waiting_seconds") == 0
    assert value(found, "asyncbatch_last_scan_files") == 13
    assert value(found, "asyncbatch_leases_lost_total") == 0
    assert value(found, "asyncbatch_ledger_errors_total", kind="fatal") == 0
    assert value(found, "asyncbatch_running") == 1
    assert value(found, "asyncbatch_ready") == 1

    assert live.status_code == ready.status_code == 200
    assert ready.json()["ready"] is True
    assert set(ready.json()["checks"]) == {
        "running",
        "heartbeat",
        "lock",
        "ledger",
        "source",
        "scan",
        "stopping",
    }
    assert missing.status_code == 404
    assert state_counts(state) == {"done": 11, "dead": 2}


async def test_two_batches_in_one_process_keep_their_own_metrics_across_runs(
    tmp_path: Path,
) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    a_in, b_in = tmp_path / "a", tmp_path / "b"
    make_files(a_in, 3)
    make_files(b_in, 5)
    a = Batch(handle, source=a_in, state=tmp_path / "a.db", job="a", metrics=True, settle=0)
    b = Batch(handle, source=b_in, state=tmp_path / "b.db", job="b", metrics=True, settle=0)
    await a.run()
    await b.run()
    make_files(a_in, 2, prefix="later")
    await a.run()  # a second run: the counters go on from the first one's

    def text(batch: Batch) -> str:
        return prometheus_client.generate_latest(batch.metrics_registry).decode()

    in_a, in_b = samples(text(a)), samples(text(b))
    assert value(in_a, "asyncbatch_items_total", outcome="done") == 5
    assert value(in_a, "asyncbatch_items_total", outcome="done_before") == 3
    assert value(in_a, "asyncbatch_items_seen_total") == 8
    assert value(in_b, "asyncbatch_items_total", outcome="done") == 5
    assert value(in_b, "asyncbatch_items_seen_total") == 5
    assert 'batch_job="a"' in text(a)
    assert 'batch_job="b"' not in text(a)
    assert value(in_a, "asyncbatch_running") == 0
    assert value(in_a, "asyncbatch_last_scan_files") == 5, "kept from the last run"
    assert value(in_a, "asyncbatch_last_scan_full") == 1  # a run's scan stats every file
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "asyncbatch_" not in default, "nothing in the process-wide registry"


async def test_an_item_dead_then_retried_and_done_never_takes_a_counter_back(
    inbox: Path, state: Path
) -> None:
    """A Prometheus counter never goes down (a drop reads as a reset: ``increase()`` and
    alerts go wrong). A watch's item that went dead, put back by ``asyncbatch retry --dead``
    and then done: ``asyncbatch_items_total{outcome="dead"}`` read 1 then 0 (the counters
    were the report's counts, of items by how they ended). The counters count outcomes as
    they happen (dead 1, done 2); the report still counts each item by how it ended."""
    make_files(inbox, 1, prefix="ok")
    make_files(inbox, 1, prefix="bad")
    fixed = False

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath.startswith("bad") and not fixed:
            raise PermanentError("refused")

    batch = Batch(handle, source=inbox, state=state, metrics=True, poll=0.05, settle=0)
    seen: list[Samples] = []

    def scrape() -> Samples:
        found = samples(prometheus_client.generate_latest(batch.metrics_registry).decode())
        seen.append(found)
        return found

    def items(outcome: str) -> float:
        return value(scrape(), "asyncbatch_items_total", outcome=outcome)

    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: items("dead") == 1 and items("done") == 1)
        fixed = True
        put_back = await anyio.to_thread.run_sync(
            functools.partial(cli, "retry", "--dead", "--state", state)
        )
        assert put_back.returncode == 0, put_back.stderr
        await until(lambda: items("done") == 2)
        batch.stop()
    assert watching.error is None
    assert watching.report is not None
    assert (watching.report.done, watching.report.dead) == (2, 0), watching.report
    assert state_counts(state) == {"done": 2}
    final = scrape()
    assert value(final, "asyncbatch_items_total", outcome="dead") == 1
    assert value(final, "asyncbatch_items_total", outcome="done") == 2
    names = [k for k in final if k[0].endswith("_total")]
    for name in names:  # every counter, scrape after scrape: never down
        values = [found[name] for found in seen if name in found]
        assert values == sorted(values), (name, values)


def held_watch(inbox: Path, state: Path, settle: float) -> tuple[Batch, anyio.Event, anyio.Event]:
    """A watch with metrics, one file at a time, whose handler holds each file until the
    second event is set (the first: a handler started): its claim of the rest waits for
    room in the queue meanwhile."""
    started, release = anyio.Event(), anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        started.set()
        await release.wait()

    batch = Batch(
        handle, source=inbox, state=state, metrics=True, poll=0.05, settle=settle, concurrency=1
    )
    return batch, started, release


async def test_files_that_settled_are_not_counted_unsettled_while_the_watch_claims_them(
    inbox: Path, state: Path
) -> None:
    """A watch that found 20 files unsettled and, once they settled, claims them (its claim
    waits for room in the queue while the handlers work): metrics and the heartbeat
    (``status``, and ``history`` of a watch killed then) said "20 files not settled yet" with
    all of them settled, registered and some done. The counts of files not ready yet are
    those of the look that found them settled, before its claim."""
    settle = 1.0
    batch, started, release = held_watch(inbox, state, settle)
    watching = Watching(batch)

    def scraped(name: str) -> float:
        found = samples(prometheus_client.generate_latest(batch.metrics_registry).decode())
        return value(found, name)

    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)  # (its first scan ended)
        paths = make_files(inbox, 20)
        await until_settled(settle, *paths)
        with anyio.fail_after(30):
            await started.wait()  # settled, claimed; the claim of the rest waits for room
        try:
            await until(lambda: scraped("asyncbatch_files_unsettled") == 0, within=10)
            stats = batch.statistics()
            assert stats is not None
            assert stats.unsettled == 0
            # Each settled file is seen (a look took it) or not registered yet (the claim
            # waits for room; or the look that takes it has not come, the watch claiming).
            assert stats.unregistered > 0
            assert stats.seen + stats.unregistered >= 20, stats
            assert stats.seen == scraped("asyncbatch_items_seen_total") <= 20
        finally:
            release.set()
        await until(lambda: scraped("asyncbatch_files_unsettled") == 0 and finished(batch, 20)())
        batch.stop()
    assert watching.error is None
    assert watching.report is not None
    assert (watching.report.seen, watching.report.done) == (20, 20), watching.report
    assert watching.report.unsettled == watching.report.unregistered == 0


async def test_a_watch_stopped_while_claiming_counts_files_settled_since_not_registered(
    inbox: Path, state: Path
) -> None:
    """Files that settled while the watch was busy claiming others (its look at them had not
    come) are left in the source not registered yet, not "not settled yet": its report said
    "10 files not settled yet" of 10 files settled a while before the stop."""
    settle = 1.0
    batch, started, release = held_watch(inbox, state, settle)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)  # (its first scan ended)
        first = make_files(inbox, 10)
        await until_settled(0.3, *first)  # (the next ones settle 0.3 s or more after these)
        later = make_files(inbox, 10, prefix="later")
        await until(lambda: (s := batch.statistics()) is not None and s.unsettled == 20)
        with anyio.fail_after(30):
            await started.wait()  # the first ones settled: claimed, the claim waits for room
        await until_settled(settle, *later)
        await until(lambda: (s := batch.statistics()) is not None and s.unsettled == 0)
        batch.stop()
        release.set()
    assert watching.error is None
    report = watching.report
    assert report is not None
    assert report.unsettled == 0, report
    assert report.seen + report.unregistered >= 20, report


def test_importing_and_running_without_metrics_never_imports_prometheus_client(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    script = (
        "import sys, asyncio, asyncbatch\n"
        "assert 'prometheus_client' not in sys.modules, 'imported by import asyncbatch'\n"
        "async def handle(ctx): pass\n"
        f"b = asyncbatch.Batch(handle, source={str(inbox)!r}, state={str(state)!r}, settle=0)\n"
        "print(asyncio.run(b.run()).done, b.health().live)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported by a run without metrics'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False"]


async def test_metrics_app_mounted_in_an_asgi_app_answers_under_its_mount_point(
    inbox: Path, state: Path
) -> None:
    async def handle(ctx: TaskContext) -> None:
        pass

    make_files(inbox, 4)
    batch = Batch(handle, source=inbox, state=state, metrics=True, settle=0)
    await batch.run()
    app = Starlette(routes=[Mount("/ops", app=batch.metrics_app())])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        scraped = await client.get("/ops/metrics")
        live = await client.get("/ops/healthz")
        ready = await client.get("/ops/readyz")
    assert value(samples(scraped.text), "asyncbatch_items_total", outcome="done") == 4
    assert live.status_code == ready.status_code == 503, "no run under way"
    assert live.json()["checks"]["running"]["detail"].startswith("the last run() ended: ok")

    plain = Batch(handle, source=inbox, state=state, settle=0)
    with pytest.raises(ConfigurationError, match="metrics off"):
        plain.metrics_app()


@contextmanager
def port_in_use() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_a_metrics_address_in_use_is_refused_before_anything_is_touched(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    ran: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        ran.append(ctx.entry.relpath)

    with port_in_use() as port:
        batch = Batch(handle, source=inbox, state=state, metrics=f"127.0.0.1:{port}", settle=0)
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}.*in use"):
            await batch.run()
    assert ran == []
    assert not state.exists(), "refused before the ledger was opened"
    with pytest.raises(ConfigurationError, match="'metrics' has value 'localhost'"):
        Batch(handle, source=inbox, state=state, metrics="localhost", settle=0)


# -- health from real parts ------------------------------------------------------------------------


@contextmanager
def ledger_held(state: Path) -> Iterator[None]:
    """Another process's view: a connection holding the ledger's write lock."""
    db = sqlite3.connect(state, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


async def idle(ctx: TaskContext) -> None:
    pass


def checks(health: Health) -> dict[str, bool]:
    return {c.name: c.ok for c in health.checks}


async def test_a_cancelled_watch_is_said_to_be_cancelled_not_failed(
    inbox: Path, state: Path
) -> None:
    # (health() said "the last watch() failed: CancelledError", history "exit cancelled".)
    batch = Batch(idle, source=inbox, state=state, poll=0.05, settle=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        await until(lambda: batch.health().ready)
        tg.cancel_scope.cancel()
    detail = batch.health().check("running").detail
    assert detail == "the last watch() was cancelled: its in-flight items went back", detail


async def test_not_ready_before_the_lock_and_the_first_scan(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    # Create the ledger, then hold its write lock: the next run cannot take its job lock.
    await Batch(idle, source=inbox, state=state, job="warm-up", settle=0).run()
    batch = Batch(idle, source=inbox, state=state, poll=0.05, lease=3, settle=0)
    assert checks(batch.health()) == {"running": False}
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        with ledger_held(state):
            await tg.start(watching)
            await until(lambda: batch.health().check("running").ok)
            health = batch.health()
            assert health.live
            assert not health.ready
            assert health.check("lock").ok is False
            assert health.check("lock").detail.endswith("not taken yet")
            assert health.check("scan").ok is False
            # Opened, then waiting for its write lock: the ledger check says so, in time.
            await until(lambda: "to take the job's lock" in batch.health().check("ledger").detail)
            assert batch.health().check("ledger").ok is False
        await until(lambda: batch.health().ready)
        await until(finished(batch, 3))
        batch.stop()
    assert watching.error is None


async def test_a_stop_while_the_run_waits_to_take_its_lock_stops_it_at_once(
    inbox: Path, state: Path
) -> None:
    # (It waited out the ledger's busy timeout, 30 s, then failed with LedgerError: a SIGTERM
    # to `asyncbatch run --watch` at start-up, with the state held by another process, was
    # exit 69 after 28 s, not 143 at once; a second SIGTERM did not help.)
    make_files(inbox, 3)
    await Batch(idle, source=inbox, state=state, job="warm-up", settle=0).run()
    batch = Batch(idle, source=inbox, state=state, poll=0.05, settle=0)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        with ledger_held(state):
            await tg.start(watching)
            await until(lambda: "to take the job's lock" in batch.health().check("ledger").detail)
            batch.stop()
            with anyio.fail_after(5):
                await until(lambda: not batch.health().check("running").ok)
    assert watching.error is None
    assert watching.report is not None
    assert watching.report.stopped
    assert watching.report.ok
    assert state_counts(state, job="default") == {}  # it took nothing
    again = await Batch(idle, source=inbox, state=state, settle=0).run()  # nothing held
    assert again.done == 3


async def test_a_ledger_that_refuses_claims_makes_the_batch_not_ready_before_a_heartbeat(
    inbox: Path, state: Path
) -> None:
    # A long lease: its heartbeats come every 15 s, so only the claim's waits can tell.
    batch = Batch(idle, source=inbox, state=state, lease=60, poll=0.05, settle=0)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)
        with ledger_held(state):
            make_files(inbox, 1)  # its claim now finds the ledger busy
            await until(lambda: not batch.health().check("ledger").ok)
            assert "a transaction has waited" in batch.health().check("ledger").detail
            assert not batch.health().ready
        await until(lambda: batch.health().ready)
        await until(finished(batch, 1))
        batch.stop()
    assert watching.error is None


async def test_a_paused_ledger_makes_the_heartbeat_stale_and_the_batch_not_live(
    inbox: Path, state: Path
) -> None:
    batch = Batch(idle, source=inbox, state=state, lease=3, poll=0.05, settle=0)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)
        with ledger_held(state):
            await until(lambda: not batch.health().check("ledger").ok)
            assert "waited" in batch.health().check("ledger").detail
            await until(lambda: not batch.health().live)
            health = batch.health()
            assert health.check("heartbeat").ok is False
            assert "not renewed for" in health.check("heartbeat").detail
            assert health.check("running").ok
            # Its polls wait for the ledger too: after 10 s without one, the scan check says so.
            await until(lambda: not batch.health().check("scan").ok)
            assert "with nothing in flight" in batch.health().check("scan").detail
        # The ledger answers again: the next heartbeat renews the lock, nobody took it.
        await until(lambda: batch.health().ready)
        batch.stop()
    assert watching.error is None
    assert watching.report is not None
    assert watching.report.stopped


async def test_a_heartbeat_that_waited_for_the_ledger_is_followed_at_once_and_stays_live(
    inbox: Path, state: Path
) -> None:
    # A beat renews from its start. The next one came a quarter lease after the slow one
    # *ended*: after a ledger busy for more than a quarter lease, /healthz said "not renewed"
    # (not live) for up to a quarter lease more, while the ledger answered.
    batch = Batch(idle, source=inbox, state=state, lease=6, poll=0.05, settle=0)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)
        with ledger_held(state):  # the beat due meanwhile waits for it, 2 to 3.5 s
            await anyio.sleep(3.5)
        answered = anyio.current_time()
        await until(lambda: batch.health().live)  # the slow beat ended, or the next renewed
        dead = []
        while anyio.current_time() < answered + 3.0:
            health = batch.health()
            if not health.live:
                dead.append(health.check("heartbeat").detail)
            await anyio.sleep(0.02)
        batch.stop()
    assert watching.error is None
    assert dead == []


async def test_a_stopping_batch_is_live_but_not_ready(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    release = anyio.Event()
    started = anyio.Event()

    async def hold(ctx: TaskContext) -> None:
        started.set()
        await release.wait()

    batch = Batch(hold, source=inbox, state=state, poll=0.05, settle=0)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await started.wait()
        assert batch.health().ready
        batch.stop()
        health = batch.health()
        assert health.live
        assert not health.ready
        assert [p.split(":")[0] for p in health.problems] == ["stopping"]
        release.set()
    assert watching.report is not None
    assert watching.report.done == 1
    assert batch.health().check("running").detail.startswith("the last watch() ended: stopped")


async def test_a_lock_taken_over_ends_the_run_and_the_batch_is_not_live(
    inbox: Path, state: Path
) -> None:
    batch = Batch(idle, source=inbox, state=state, lease=3, poll=0.05, settle=0)
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)
        db = sqlite3.connect(state, isolation_level=None)
        try:  # another runner took the lock over (as it would after a long pause)
            db.execute("UPDATE task_lock SET owner = 'someone else'")
        finally:
            db.close()
        await until(lambda: not batch.health().check("running").ok)
    assert isinstance(watching.error, LockLostError)
    health = batch.health()
    assert not health.live
    assert not health.ready
    assert "failed: LockLostError" in health.check("running").detail


# -- the command line ------------------------------------------------------------------------------


def test_cli_metrics_address_in_use_exits_2_with_one_line(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    with port_in_use() as port:
        result = cli(
            "run",
            f"{HANDLERS}:record",
            "--source",
            inbox,
            "--state",
            state,
            "--metrics",
            f"127.0.0.1:{port}",
        )
    assert result.returncode == 2
    assert result.stderr == (
        f"asyncbatch: error: metrics address '127.0.0.1:{port}': cannot listen there: "
        "Address already in use\n"
    )
    assert not state.exists(), "nothing claimed, the ledger not even created"
    bad = cli("run", f"{HANDLERS}:record", "--source", inbox, "--state", state, "--metrics", "x")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "'metrics' has value 'x'" in bad.stderr


def serving_address(proc: subprocess.Popen[str]) -> str:
    """``HOST:PORT`` where a CLI started with ``--metrics 127.0.0.1:0 --log-level INFO``
    serves: the chosen port, from the log line saying where it serves."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if " on 127.0.0.1:" in line and "serving /metrics" in line:
            return line.rsplit(" on ", 1)[1].strip()
    pytest.fail("the serving line was not logged")


def test_cli_watch_serves_metrics_and_health_until_it_stops(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    proc = spawn(
        "run",
        f"{HANDLERS}:record",
        "--source",
        inbox,
        "--state",
        state,
        "--watch",
        "--poll",
        "0.05",
        "--settle",
        "0",
        "--no-progress",
        "--metrics",
        "127.0.0.1:0",
        "--log-level",
        "INFO",
        env={"AB_LOG": str(tmp_path / "log")},
    )
    try:
        address = serving_address(proc)
        make_files(inbox, 6)
        with httpx.Client(base_url=f"http://{address}", timeout=10) as client:

            def done() -> float:
                found = samples(client.get("/metrics").text)
                return value(found, "asyncbatch_items_total", outcome="done")

            wait_for(lambda: done() == 6, timeout=30, interval=0.05)
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30)
            assert client.get("/healthz").json()["live"] is True
            head = client.head("/metrics")
            assert head.status_code == 200
            assert head.content == b""
            assert client.post("/metrics").status_code == 405
        err = kill(proc, signal.SIGTERM)
        assert proc.returncode == 143, err
        assert "Traceback" not in err
        with pytest.raises(httpx.TransportError):  # the server stopped with the run
            httpx.get(f"http://{address}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            kill(proc)


# -- the built-in server under abuse ---------------------------------------------------------------


def not_live() -> Endpoints:
    """Endpoints of no batch: ``/healthz`` answers 503."""
    return Endpoints(lambda: not_running("no run: a test of the server alone"), None)


async def answer_of(stream: anyio.abc.SocketStream) -> bytes:
    """Everything ``stream`` receives until the server closes it."""
    data = b""
    with anyio.fail_after(30):
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return data


async def test_a_full_endpoint_drops_its_oldest_idle_connection_to_answer_a_new_one() -> None:
    listener = await listen("127.0.0.1:0")
    host, port = bound_address(listener)
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            functools.partial(serve, listener, not_live(), max_connections=2, head_timeout=600)
        )
        oldest = await anyio.connect_tcp(host, port)
        newer = await anyio.connect_tcp(host, port)
        async with oldest, newer:
            await oldest.send(b"GET /hea")  # half a request line, and then nothing
            await newer.send(b"GET /hea")
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
                assert (await client.get("/healthz")).status_code == 503  # answered
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await oldest.receive()  # dropped, unanswered, to make room
            await newer.send(b"lthz HTTP/1.1\r\n\r\n")  # still held: it gets its answer
            assert (await answer_of(newer)).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        tg.cancel_scope.cancel()


class FailingAccepts(anyio.abc.SocketListener):
    """A real listening socket whose first ``accept()`` calls raise ``errors``, in order."""

    def __init__(self, inner: anyio.abc.SocketListener, errors: list[Exception]) -> None:
        self.inner = inner
        self.errors = errors

    @property
    def _raw_socket(self) -> socket.socket:
        return self.inner.extra(anyio.abc.SocketAttribute.raw_socket)

    async def accept(self) -> anyio.abc.SocketStream:
        await anyio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def failing_accepts(errors: list[Exception]) -> tuple[FailingAccepts, str]:
    listener = await listen("127.0.0.1:0")
    host, port = bound_address(listener)
    assert isinstance(listener, anyio.streams.stapled.MultiListener)
    (inner,) = listener.listeners
    assert isinstance(inner, anyio.abc.SocketListener)
    return FailingAccepts(inner, errors), f"http://{host}:{port}"


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_failing_accepts_are_logged_once_per_burst_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[Exception] = [
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.ENFILE, "Too many open files in system"),
        OSError(errno.ECONNABORTED, "Software caused connection abort"),
    ]
    listener, url = await failing_accepts(errors)
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, listener, not_live())
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.get("/healthz")).status_code == 503
        tg.cancel_scope.cancel()
    assert not errors, "all three failed accepts were retried"
    first, last = messages(caplog, logging.WARNING)  # one when it started, one when it ended
    assert first == (
        "the metrics endpoint cannot accept connections: [Errno 24] Too many open files; "
        "it retries (logged once until it stops)"
    )
    assert last.startswith(
        "the metrics endpoint accepts connections again, after 3 failed accepts in "
    )


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        (
            OSError(errno.EBADF, "Bad file descriptor"),
            "the metrics endpoint stopped: its listening socket is unusable: "
            "[Errno 9] Bad file descriptor; the run goes on without it",
        ),
        (
            RuntimeError("a bug"),
            "the metrics endpoint failed and stopped; the run goes on without it",
        ),
    ],
)
async def test_a_broken_listener_stops_the_server_and_raises_nothing(
    caplog: pytest.LogCaptureFixture, error: Exception, logged: str
) -> None:
    listener, _ = await failing_accepts([error])
    with anyio.fail_after(30):
        await serve(listener, not_live())  # returns: the run it serves would go on
    assert messages(caplog, logging.ERROR) == [logged]
    with pytest.raises(anyio.ClosedResourceError):  # the listener is closed
        await listener.inner.accept()


def limit_open_files_to_256() -> None:
    """In a child process: a low limit of open files (a common default is 1024)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@contextmanager
def open_files_allowed(count: int) -> Iterator[None]:
    """This process may open ``count`` files (its soft limit raised for a while if need be)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= count:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        pytest.skip(f"this process may not open {count} files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def closed_by_peer(conn: socket.socket) -> bool:
    """Whether the other end closed ``conn`` (a non-blocking socket)."""
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_beyond_the_file_limit_of_a_watch_neither_stop_it_nor_its_metrics(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    idle_count = 400  # the runner may open 256 files
    proc = spawn(
        "run",
        f"{HANDLERS}:record",
        "--source",
        inbox,
        "--state",
        state,
        "--watch",
        "--poll",
        "0.05",
        "--settle",
        "0",
        "--no-progress",
        "--metrics",
        "127.0.0.1:0",
        "--log-level",
        "INFO",
        env={"AB_LOG": str(tmp_path / "log")},
        preexec_fn=limit_open_files_to_256,
    )
    idle: list[socket.socket] = []
    try:
        address = serving_address(proc)
        host, port = address.rsplit(":", 1)
        with open_files_allowed(idle_count + 256):
            for _ in range(idle_count):
                conn = socket.create_connection((host, int(port)), timeout=30)
                conn.sendall(b"GET /metr")  # half a request line, and then nothing
                conn.setblocking(False)
                idle.append(conn)
            # The runner took them all in, dropping the oldest to keep at most 64.
            wait_for(
                lambda: (
                    proc.poll() is not None or sum(map(closed_by_peer, idle)) >= idle_count - 64
                ),
                timeout=60,
                interval=0.05,
            )
            assert proc.poll() is None, f"the run ended: {kill(proc)}"
            with httpx.Client(base_url=f"http://{address}", timeout=30) as client:
                wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30)
                make_files(inbox, 3)

                def done() -> float:
                    found = samples(client.get("/metrics").text)
                    return value(found, "asyncbatch_items_total", outcome="done")

                wait_for(lambda: done() == 3, timeout=60, interval=0.05)
        err = kill(proc, signal.SIGINT)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert "Too many open files" not in err  # the bound kept the runner within its limit
    finally:
        for conn in idle:
            conn.close()
        if proc.poll() is None:
            kill(proc)


@pytest.fixture
def pg_outage(postgres_server: Server) -> Iterator[Outage]:
    require(postgres_server)
    made = Outage(postgres_server)
    yield made
    made.drop()


async def test_a_postgresql_outage_shows_in_health_and_in_the_ledger_error_counts(
    inbox: Path, pg_outage: Outage
) -> None:
    batch = Batch(
        idle, source=inbox, state=pg_outage.dsn, lease=3, poll=0.05, metrics=True, settle=0
    )
    watching = Watching(batch)
    async with anyio.create_task_group() as tg:
        await tg.start(watching)
        await until(lambda: batch.health().ready)
        pg_outage.begin()
        try:
            await until(lambda: not batch.health().live)
            health = batch.health()
            assert health.check("ledger").ok is False
            assert health.check("heartbeat").ok is False
        finally:
            pg_outage.end()
        await until(lambda: batch.health().ready)  # waited out: the same run goes on
        found = samples(prometheus_client.generate_latest(batch.metrics_registry).decode())
        batch.stop()
    assert watching.error is None
    assert value(found, "asyncbatch_ledger_errors_total", kind="unreachable") >= 1
    assert value(found, "asyncbatch_ledger_errors_total", kind="fatal") == 0
    assert value(found, "asyncbatch_live") == 1
