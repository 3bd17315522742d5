"""Cancelling a run at each await of its claim, commit and post-commit paths, in turn.

Not after a sleep: the run is held at one exact point (the ``N``-th ledger transaction of the
run, or the ``N``-th time a named point of those paths is reached), the task awaiting
``Batch.run()`` is cancelled right there, and the point is let go. Every transaction of a run
is one of them, in turn; so are the named points (after a claim, before and after a group
commit, before a post-commit action). Then: no transaction was left open (the run's own
release went through and another writer is not blocked), nothing is left leased, and the next
run completes every file, each exactly once (audit trigger), with its output and its archive.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread
import pytest

from asyncbatch import Batch, TaskContext
from asyncbatch import _failpoints as failpoints

from ..conftest import make_files
from ..test_ledger_contract import PostgresStore, SqliteStore, Store
from .harness import create_ledger_with_audit, query, record_figures

FILES = 24
#: The named points of the claim, commit and post-commit paths, and how many hits of each.
NAMED = {"after-claim": 3, "before-commit": 3, "after-commit": 3, "before-post-action": 3}


def sqlite_transaction_name() -> str:
    """The name of the SQLite transaction function being run on this thread, if any."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_in_transaction":
            return str(getattr(frame.f_locals.get("fn"), "__name__", "?"))
        frame = frame.f_back
    return "?"


class HoldAt:
    """A failpoint action that holds the ``n``-th hit until released; counts every hit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.hits = 0
        self.held = "?"
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.hits += 1
        if self.hits == self.n:
            self.held = sqlite_transaction_name()
            self.reached.set()
            assert self.release.wait(30), "never released"


async def handle(ctx: TaskContext) -> None:
    await ctx.write_output(ctx.entry.relpath + ".out", await ctx.read_bytes())


def batch(root: Path, state: str) -> Batch:
    return Batch(
        handle,
        source=root / "inbox",
        state=state,
        output_dir=root / "out",
        on_done=f"move:{root / 'archive'}",
        concurrency=4,
        claim_batch=8,
        commit_batch=4,
        settle=0,
    )


async def cancelled_at(
    monkeypatch: pytest.MonkeyPatch, root: Path, state: str, point: str, n: int
) -> tuple[bool, str]:
    """Run, cancel at the ``n``-th hit of ``point``; whether the run got that far, and the
    SQLite transaction held there."""
    hold = HoldAt(n)
    monkeypatch.setattr(failpoints, "ACTIVE", {point: failpoints.Call("call", fn=hold)})
    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    if await anyio.to_thread.run_sync(hold.reached.wait, 60):
                        scope.cancel()  # while the run is held at that point
                    hold.release.set()

                tg.start_soon(watch)
                await batch(root, state).run()
                hold.release.set()  # the run ended before the n-th hit
                hold.reached.set()
        return scope.cancelled_caught, hold.held
    finally:
        hold.release.set()
        monkeypatch.setattr(failpoints, "ACTIVE", None)


def new_corpus(root: Path, state_kind: str, pg_dsn: Any) -> tuple[Store, str]:
    for d in ("out", "archive"):
        (root / d).mkdir(parents=True)
    make_files(root / "inbox", FILES)
    store: Store = (
        SqliteStore(root / "state.db") if state_kind == "sqlite" else PostgresStore(pg_dsn)
    )
    create_ledger_with_audit(store.state)
    return store, store.state


async def check_after_cancel(root: Path, store: Store, where: str) -> None:
    await store.assert_writer_not_blocked()
    leftovers = query(
        store.state,
        "SELECT (SELECT count(*) FROM items WHERE state = 'running'),"
        " (SELECT count(*) FROM runners), (SELECT count(*) FROM task_lock)",
    )
    assert leftovers == [(0, 0, 0)], f"cancelled at {where}: left (running, runners, locks)"
    report = await batch(root, store.state).run()
    assert report.ok, report
    done = query(store.state, "SELECT count(*) FROM items WHERE state = 'done'")
    completions = query(store.state, "SELECT key, count(*) FROM torture_completions GROUP BY key")
    assert done == [(FILES,)]
    assert sorted(n for _, n in completions) == [1] * FILES, "an item was done twice"
    assert sorted(p.name for p in (root / "archive").iterdir()) == [
        f"f{i:05d}.txt" for i in range(FILES)
    ]
    assert len(list((root / "out").iterdir())) == FILES
    assert list((root / "inbox").iterdir()) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_cancelling_at_every_await_of_claim_commit_and_post_commit_loses_nothing(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    pg_dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else None
    # How many transactions one whole run takes: each is a point to cancel at.
    store, state = await anyio.to_thread.run_sync(new_corpus, tmp_path / "count", backend, pg_dsn)
    counter = HoldAt(0)
    monkeypatch.setattr(failpoints, "ACTIVE", {"in-transaction": failpoints.Call("c", fn=counter)})
    await batch(tmp_path / "count", state).run()
    monkeypatch.setattr(failpoints, "ACTIVE", None)
    transactions = counter.hits
    points = [("in-transaction", n) for n in range(1, transactions + 1)]
    points += [(p, n) for p, most in NAMED.items() for n in range(1, most + 1)]
    cancelled = 0
    for i, (point, n) in enumerate(points):
        root = tmp_path / f"{i:03d}"
        if backend == "postgres":  # a fresh schema for each (search_path ends the DSN)
            base, _, schema = state.rpartition("search_path=")
            dsn = f"{base}search_path={schema}_{i}"
            store = PostgresStore(dsn)
            for d in ("out", "archive"):
                (root / d).mkdir(parents=True)
            make_files(root / "inbox", FILES)
            await anyio.to_thread.run_sync(create_ledger_with_audit, dsn)
        else:
            store, _ = await anyio.to_thread.run_sync(new_corpus, root, backend, None)
        caught, held = await cancelled_at(monkeypatch, root, store.state, point, n)
        cancelled += caught
        await check_after_cancel(root, store, f"{point} #{n} ({held})")
        if backend == "postgres":
            await store.fetch(f'DROP SCHEMA "{schema}_{i}" CASCADE')
    record_figures(
        "cancellation",
        backend=backend,
        transactions_per_run=transactions,
        points=len(points),
        cancelled=cancelled,
    )
    assert transactions >= 8
    assert cancelled >= len(points) - 3, "most points must be reached before the run ends"


async def test_a_claim_cancelled_during_its_sqlite_transaction_leaves_no_item_leased(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state = await anyio.to_thread.run_sync(new_corpus, tmp_path, "sqlite", None)
    # The third transaction of a run is its first claim (start_runner and the reap come
    # before it).
    caught, held = await cancelled_at(monkeypatch, tmp_path, state, "in-transaction", 3)
    assert caught
    assert held == "_tx_claim_scanned"
    running = query(state, "SELECT count(*) FROM items WHERE state = 'running'")
    assert running == [(0,)], "leases the run never saw were left behind"
