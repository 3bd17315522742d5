"""A hypothesis state machine over the ledger contract, on SQLite and on PostgreSQL.

Three runners register and claim items, start, complete, fail, kill and vanish them, crash
(forget their leases), let leases expire, take expired ones over, heartbeat, release, and an
operator retries. A model says what each call must do; after every step the ledger's rows are
compared with it. Invariants: a completion is accepted only from the current holder (owner and
fence), so an item is completed once; fences only grow; a done item never changes again; two
runners never hold one item; the counts add up.

``ASYNCBATCH_TORTURE=full`` runs many more examples (``make torture``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from asyncbatch._ledger import STATES, Heartbeat, Ledger, Outcome, Renewal, open_ledger

from .conftest import run_start
from .postgres import Server, require, with_schema
from .torture.harness import record_figures

T = TypeVar("T")
FULL = os.environ.get("ASYNCBATCH_TORTURE") == "full"
JOB = "j"
OWNERS = ("A", "B", "C")
KEYS = tuple(f"k{i}" for i in range(6))
LEASE = 3600.0
owners = st.sampled_from(OWNERS)
keys = st.sampled_from(KEYS)


def row_of(key: str) -> tuple[str, bytes, int, int, int]:
    i = KEYS.index(key)
    return (key, f"f{i}".encode(), 10, 1_000 + i, 500 + i)


@dataclass
class ModelItem:
    state: str = "running"
    owner: str | None = None
    fence: int = 1
    expired: bool = False
    #: ``failed`` only: whether its retry is due now.
    due: bool = False
    #: Whether its retry time is set (its last outcome failed): released, it waits failed.
    retry: bool = False
    completions: int = 0


@dataclass
class Backend:
    """Where one example's ledger lives, and raw reads of its items."""

    state: str
    read: Callable[[], Coroutine[Any, Any, list[tuple[Any, ...]]]]
    expire: Callable[[str], Coroutine[Any, Any, None]]
    cleanup: Callable[[], Coroutine[Any, Any, None]] = field(default=lambda: _nothing())


async def _nothing() -> None:
    return None


_ITEMS = "SELECT key, state, owner, fence, attempts FROM items WHERE job = 'j' ORDER BY key"


async def sqlite_backend() -> Backend:
    directory = Path(tempfile.mkdtemp(prefix="ab-machine-"))
    path = directory / "state.db"

    async def read() -> list[tuple[Any, ...]]:
        db = sqlite3.connect(path)
        try:
            return list(db.execute(_ITEMS))
        finally:
            db.close()

    async def expire(key: str) -> None:
        db = sqlite3.connect(path, timeout=10)
        try:
            db.execute("UPDATE items SET lease_until = 0 WHERE job = 'j' AND key = ?", (key,))
            db.commit()
        finally:
            db.close()

    async def cleanup() -> None:
        shutil.rmtree(directory, ignore_errors=True)

    return Backend(str(path), read, expire, cleanup)


async def postgres_backend(server: Server) -> Backend:
    schema = f"abmachine_{uuid.uuid4().hex[:12]}"
    dsn = with_schema(server.dsn, schema)
    conn: list[asyncpg.Connection] = []

    async def connection() -> asyncpg.Connection:
        if not conn:
            conn.append(await asyncpg.connect(dsn, timeout=10))
        return conn[0]

    async def read() -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await (await connection()).fetch(_ITEMS)]

    async def expire(key: str) -> None:
        await (await connection()).execute(
            "UPDATE items SET lease_until = 0 WHERE job = 'j' AND key = $1", key
        )

    async def cleanup() -> None:
        c = await connection()
        await c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await c.close()

    return Backend(dsn, read, expire, cleanup)


class LedgerMachine(RuleBasedStateMachine):
    """The ledger against its model; see the module docstring."""

    make_backend: Callable[[], Coroutine[Any, Any, Backend]]
    #: Examples run and invariant checks made, by every instance of the class.
    figures: ClassVar[dict[str, int]]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.Runner()
        self.backend = self.run(self.make_backend())
        self.ledger: Ledger = self.run(open_ledger(self.backend.state))
        self.items: dict[str, ModelItem] = {}
        #: The leases each runner knows it holds (forgotten when it crashes): key -> fence.
        self.known: dict[str, dict[str, int]] = {o: {} for o in OWNERS}
        #: Every (owner, fence) that ever held each key: stale holders come from here.
        self.history: dict[str, list[tuple[str, int]]] = {}
        self.max_fence: dict[str, int] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)

    def teardown(self) -> None:
        try:
            self.run(self.ledger.close())
            self.run(self.backend.cleanup())
        finally:
            self.loop.close()

    @initialize()
    def register_runners(self) -> None:
        self.figures["examples"] += 1
        for owner in OWNERS:
            self.run(self.ledger.start_runner(run_start(owner, job=JOB, ttl=LEASE, shared=True)))

    # -- helpers ----------------------------------------------------------------------------------

    def _leased(self, key: str, owner: str) -> None:
        item = self.items.setdefault(key, ModelItem(fence=0))
        item.state, item.owner, item.expired = "running", owner, False
        item.fence += 1
        self.known[owner][key] = item.fence
        self.history.setdefault(key, []).append((owner, item.fence))

    def _claimable_by_scan(self, item: ModelItem) -> bool:
        return (
            item.state in ("pending", "vanished")
            or (item.state == "failed" and item.due)
            or (item.state == "running" and item.expired)
        )

    def _holder_of(self, key: str) -> str | None:
        item = self.items.get(key)
        if item is None or item.state != "running" or item.owner is None:
            return None
        return item.owner if self.known[item.owner].get(key) == item.fence else None

    def _commit(self, owner: str, key: str, fence: int, outcome: Outcome) -> None:
        lost = self.run(self.ledger.commit_outcomes(JOB, owner, [outcome]))
        item = self.items[key]
        accepted = item.state == "running" and item.owner == owner and item.fence == fence
        assert lost == (set() if accepted else {key}), (owner, key, fence, item)
        self.known[owner].pop(key, None)
        if accepted:
            item.state = outcome.state
            item.due = outcome.next_attempt_at is not None and outcome.next_attempt_at < time.time()
            item.retry = outcome.next_attempt_at is not None
            if outcome.state == "done":
                item.completions += 1

    # -- rules ------------------------------------------------------------------------------------

    @rule(owner=owners, chosen=st.sets(keys, min_size=1))
    def register_and_claim(self, owner: str, chosen: set[str]) -> None:
        rows = [row_of(k) for k in sorted(chosen)]
        got = self.run(self.ledger.claim_scanned(JOB, owner, LEASE, rows))
        expected = {
            k for k in chosen if k not in self.items or self._claimable_by_scan(self.items[k])
        }
        # Its own live leases come back as leased, fences unchanged (a runner that lost the
        # reply to a claim, or forgot what it held, finds them again).
        ours = {
            k
            for k in chosen
            if k in self.items
            and (i := self.items[k]).state == "running"
            and i.owner == owner
            and not i.expired
        }
        leased = {r.key for r in got if r.state == "running"}
        assert leased == expected | ours, (owner, chosen, leased, expected, ours)
        assert all(r.fence == self.items[r.key].fence for r in got if r.key in ours)
        dead = {r.key for r in got if r.state == "dead"}
        assert dead == {k for k in chosen if k in self.items and self.items[k].state == "dead"}
        for key in sorted(expected):
            self._leased(key, owner)
        for key in ours:
            self.known[owner][key] = self.items[key].fence

    @rule(owner=owners)
    def claim_waiting(self, owner: str) -> None:
        got = self.run(self.ledger.claim_waiting(JOB, owner, LEASE, 100))
        expected = {
            k
            for k, i in self.items.items()
            if i.state == "pending" or (i.state == "failed" and i.due)
        }
        assert {r.key for r in got} == expected
        for key in sorted(expected):
            self._leased(key, owner)

    @rule(key=keys)
    def start(self, key: str) -> None:
        holder = self._holder_of(key)
        if holder is not None:
            fence = self.items[key].fence
            assert self.run(self.ledger.commit_outcomes(JOB, holder, [], [(key, fence)])) == set()

    @rule(key=keys, state=st.sampled_from(["done", "done", "failed", "dead", "vanished"]))
    def finish_by_holder(self, key: str, state: str) -> None:
        holder = self._holder_of(key)
        if holder is None:
            return
        fence = self.items[key].fence
        due = time.time() + (-100 if fence % 2 else 3600)
        outcome = Outcome(
            key, fence, state, None if state == "done" else "x", due if state == "failed" else None
        )
        self._commit(holder, key, fence, outcome)

    @precondition(lambda self: any(len(h) > 1 for h in self.history.values()))
    @rule(data=st.data())
    def finish_by_a_stale_holder(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, h in self.history.items() if len(h) > 1)))
        owner, fence = data.draw(st.sampled_from(self.history[key][:-1]))
        self._commit(owner, key, fence, Outcome(key, fence, "done"))

    @rule(owner=owners)
    def crash(self, owner: str) -> None:
        self.known[owner].clear()  # its leases stay in the ledger until they expire

    @rule(key=keys)
    def expire_lease(self, key: str) -> None:
        item = self.items.get(key)
        if item is not None and item.state == "running":
            self.run(self.backend.expire(key))
            item.expired = True

    @rule(owner=owners)
    def heartbeat(self, owner: str) -> None:
        leases = sorted(self.known[owner].items())
        beat = Heartbeat(job=JOB, owner=owner, ttl=LEASE, leases=leases, holds_lock=False)
        renewal = self.run(self.ledger.heartbeat(beat))
        lost = set()
        for key, fence in leases:
            item = self.items[key]
            if item.state == "running" and item.owner == owner and item.fence == fence:
                item.expired = False
            else:
                lost.add(key)  # taken over, or finished: not renewed, and said so
        assert renewal == Renewal(True, frozenset(lost))

    @rule(owner=owners)
    def release(self, owner: str) -> None:
        leases = sorted(self.known[owner].items())
        self.run(self.ledger.release_items(JOB, owner, leases))
        for key, fence in leases:
            item = self.items[key]
            if item.state == "running" and item.owner == owner and item.fence == fence:
                # a retry waits failed again (it was due when leased), any other pending
                item.state, item.owner = ("failed" if item.retry else "pending"), None
        self.known[owner].clear()

    @rule(dead=st.booleans())
    def operator_retry(self, dead: bool) -> None:
        states = ("failed", "dead") if dead else ("failed",)
        expected = sum(i.state in states for i in self.items.values())
        assert self.run(self.ledger.retry(JOB, None, dead=dead)) == expected
        for item in self.items.values():
            if item.state in states:
                item.state, item.owner, item.retry = "pending", None, False

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def the_ledger_matches_the_model(self) -> None:
        self.figures["checks"] += 1
        found = self.run(self.backend.read())
        assert [r[0] for r in found] == sorted(self.items)
        for key, state, owner, fence, attempts in found:
            item = self.items[key]
            assert (state, fence) == (item.state, item.fence), (key, state, fence, item)
            if state == "running":
                assert owner == item.owner
            assert 0 <= attempts <= fence
            assert fence >= self.max_fence.get(key, 0), "a fence went backwards"
            self.max_fence[key] = fence
            assert item.completions <= 1, "an item was completed twice"
            if item.completions:
                assert state == "done", "a done item changed"

    @invariant()
    def the_counts_add_up(self) -> None:
        counts = self.run(self.ledger.counts(JOB))
        assert set(counts) == set(STATES)
        for state in STATES:
            assert counts[state] == sum(i.state == state for i in self.items.values())


def machine_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * (10 if FULL else 1),
        stateful_step_count=40 if FULL else 25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )


def test_the_sqlite_ledger_keeps_the_contract_under_any_sequence_of_steps() -> None:
    class SQLiteMachine(LedgerMachine):
        make_backend = staticmethod(sqlite_backend)
        figures: ClassVar[dict[str, int]] = {"examples": 0, "checks": 0}

    run_state_machine_as_test(SQLiteMachine, settings=machine_settings(40))
    record_figures("state machine", backend="sqlite", **SQLiteMachine.figures)


def test_the_postgres_ledger_keeps_the_contract_under_any_sequence_of_steps(
    postgres_server: Server,
) -> None:
    require(postgres_server)

    class PostgresMachine(LedgerMachine):
        figures: ClassVar[dict[str, int]] = {"examples": 0, "checks": 0}

        @staticmethod
        async def make_backend() -> Backend:
            return await postgres_backend(postgres_server)

    run_state_machine_as_test(PostgresMachine, settings=machine_settings(15))
    record_figures("state machine", backend="postgres", **PostgresMachine.figures)
