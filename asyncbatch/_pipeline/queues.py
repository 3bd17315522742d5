"""The hand-offs between the pipeline's tasks, and the leased item that travels through them.

Plain deques and lists plus an ``anyio.Event`` per transition (empty → not empty, full → not
full): an item is handed over with a list operation, not an event-loop round trip. All of it
lives on one event loop; nothing here is shared between runs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque

import anyio

from .._context import ItemLogger
from .._ledger import Outcome
from .._scanner import pack

__all__ = ["ItemQueue", "ItemState", "LeasedItem", "Outbox", "item_logger"]


def item_logger(logger: logging.Logger, job: str, item: LeasedItem) -> ItemLogger:
    """``logger``, its records carrying the item's job, key and input hash."""
    return ItemLogger(logger, {"job": job, "key": item.key, "input_hash": item.ihash})


class ItemState(enum.Enum):
    """Where a leased item is in this runner's hands. Its transitions, all on the event loop::

        QUEUED ──a worker starts it──▶ RUNNING ──its outcome──▶ FINISHED
          │                               │                      ▲
          └──────── its lease taken over by another runner ──▶ LOST ──┘ (the cut-short attempt's
                    (the heartbeat could not renew it)                outcome, to be refused)

    - ``QUEUED``: leased by a claim, waiting for a worker (given back at a stop if never run).
    - ``RUNNING``: a worker opened its input and runs the handler; the watchdog watches it.
    - ``FINISHED``: its outcome is in the outbox, for the committer. A lease the heartbeat
      could not renew is not lost for it any more: the committer reports a refused outcome.
    - ``LOST``: another runner holds its lease now: a queued one is never started, a running
      one is cancelled by the watchdog (its outcome is then refused by the ledger's fence).
      A lease whose local deadline passed is not lost by that alone (the runner may have been
      suspended while nobody took it over): the heartbeat asks the ledger, and renews it.

    Leaving the runner (committed, or released at the end) is leaving ``RunState.in_flight``.
    """

    QUEUED = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()
    LOST = enum.auto()


class LeasedItem:
    """An item leased to this runner, on its way from the claimer to the committer (its
    life: :class:`ItemState`)."""

    __slots__ = (
        "attempt",
        "ctime_ns",
        "fence",
        "ihash",
        "inode",
        "key",
        "lease_deadline",
        "moved_to",
        "mtime_ns",
        "prior_attempts",
        "prior_interrupted",
        "relpath",
        "size",
        "started_at",
        "state",
    )

    def __init__(
        self,
        key: str,
        ihash: str,
        relpath: bytes,
        size: int,
        mtime_ns: int,
        inode: int,
        ctime_ns: int = 0,
    ) -> None:
        self.key = key
        self.ihash = ihash
        self.relpath = relpath
        self.size = size
        self.mtime_ns = mtime_ns
        self.inode = inode
        #: The ctime the scan saw (0: unknown, an item leased from the ledger).
        self.ctime_ns = ctime_ns
        self.fence = 0
        #: Attempts of this item that started before this lease (see MARK_STARTED), and how
        #: many of them the runner's death or stop cut short (the others failed).
        self.prior_attempts = 0
        self.prior_interrupted = 0
        #: This attempt's number once it started (``prior_attempts + 1``), 0 if it never ran.
        self.attempt = 0
        #: When this attempt began (the run's wall clock): the joblog's start.
        self.started_at: float | None = None
        self.state = ItemState.QUEUED
        #: The local monotonic time its lease must be given up by (renewed by heartbeats).
        self.lease_deadline = math.inf
        #: Where ``ctx.move()`` had taken, or was taking, the input when an earlier attempt
        #: ended (the ledger's ``moved`` record): the paths it may be at, earliest first.
        self.moved_to: tuple[str, ...] = ()

    def lose(self) -> None:
        """Its lease was taken over by another runner (see :class:`ItemState`)."""
        self.state = ItemState.LOST
        self.lease_deadline = -math.inf  # past: whatever waits for the deadline sees it now

    def record(self) -> bytes:
        """The item as a scan record (see :func:`asyncbatch._scanner.pack`)."""
        return pack(self.mtime_ns, self.relpath, self.size, self.inode, self.ctime_ns)


class ItemQueue:
    """Leased items waiting for a worker; the claimer tops it up before it runs dry."""

    def __init__(self) -> None:
        self._items: deque[LeasedItem] = deque()
        #: Items ever put, and ``(items put up to the end of a batch, when it was put)`` of the
        #: batches not all taken yet: when the oldest waiting item was queued (a list
        #: operation per batch, nothing per item; see :meth:`oldest_queued`).
        self._put = 0
        self._batches: deque[tuple[int, float]] = deque()
        self.closed = False
        #: Workers waiting in :meth:`get` (idle: no item for them).
        self.waiting = 0
        self._not_empty = anyio.Event()
        self._low = anyio.Event()
        self._low_water = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: list[LeasedItem]) -> None:
        """Add items (the caller waited with :meth:`wait_until_low`)."""
        self._items.extend(items)
        if self._items:
            self._not_empty.set()
            self._put += len(items)
            batches = self._batches
            batches.append((self._put, time.monotonic()))
            self._forget_taken()

    def _forget_taken(self) -> None:
        taken, batches = self._put - len(self._items), self._batches
        while batches and batches[0][0] <= taken:
            batches.popleft()

    def oldest_queued(self) -> float | None:
        """When (``time.monotonic()``) the oldest item waiting for a worker was queued, or
        ``None`` if none waits."""
        self._forget_taken()
        return self._batches[0][1] if self._items and self._batches else None

    async def wait_until_low(self, low_water: int) -> None:
        """Wait until at most ``low_water`` items wait, or the queue is closed."""
        self._low_water = low_water
        while len(self._items) > low_water and not self.closed:
            if self._low.is_set():
                self._low = anyio.Event()
            await self._low.wait()

    def get_nowait(self) -> LeasedItem | None:
        """The next item, or ``None`` if none waits right now."""
        if not self._items:
            return None
        item = self._items.popleft()
        if len(self._items) <= self._low_water:
            self._low.set()
        return item

    async def get(self) -> LeasedItem | None:
        """The next item, waiting for one; ``None`` once the queue is closed and empty."""
        while not self._items:
            if self.closed:
                return None
            if self._not_empty.is_set():
                self._not_empty = anyio.Event()
            self.waiting += 1
            try:
                await self._not_empty.wait()
            finally:
                self.waiting -= 1
        return self.get_nowait()

    def give_back(self, item: LeasedItem) -> None:
        """Put an item taken from the queue back at its head (a worker took it ahead of time,
        and another is idle): the next :meth:`get` has it."""
        self._items.appendleft(item)  # (taken and given back: not taken, for its batch)
        self._not_empty.set()

    def close(self) -> None:
        """No more items: waiting workers see the end once the queue is empty."""
        self.closed = True
        self._not_empty.set()
        self._low.set()


class Outbox:
    """Outcomes (and attempts that started) waiting for the committer, taken a group at a time."""

    def __init__(self, group: int) -> None:
        self._pending: list[tuple[LeasedItem, Outcome]] = []
        self._started: list[LeasedItem] = []
        self.group = group
        self.closed = False
        self._ready = anyio.Event()
        self._full = anyio.Event()

    def __len__(self) -> int:
        return len(self._pending) + len(self._started)

    def put(self, item: LeasedItem, outcome: Outcome) -> None:
        """Hand an outcome over (never waits)."""
        item.state = ItemState.FINISHED
        pending = self._pending
        pending.append((item, outcome))
        if len(pending) == 1:
            self._ready.set()
        if len(pending) >= self.group:
            self._full.set()

    def started(self, item: LeasedItem) -> None:
        """Note that an attempt began: the committer counts it if it is still running."""
        self._started.append(item)
        if len(self._started) == 1:
            self._ready.set()

    async def wait_ready(self) -> bool:
        """Wait until something waits; ``False`` once closed and empty."""
        while not self._pending and not self._started:
            if self.closed:
                return False
            if self._ready.is_set():
                self._ready = anyio.Event()
            await self._ready.wait()
        return True

    async def wait_full(self, seconds: float) -> None:
        """Wait up to ``seconds`` for a full group (or the end).

        The deadline is a timer that sets the event, not a cancel scope: the wait ends at its
        deadline as a rule (a group fills only while items finish faster than it commits), and
        a cancellation delivered to end it costs ~100 Python calls a commit."""
        if len(self._pending) >= self.group or self.closed:
            return
        if self._full.is_set():
            self._full = anyio.Event()
        full = self._full
        timer = asyncio.get_running_loop().call_later(seconds, full.set)
        try:
            await full.wait()
        finally:
            timer.cancel()

    def take(
        self, limit: float = math.inf
    ) -> tuple[list[tuple[LeasedItem, Outcome]], list[tuple[str, int]]]:
        """Remove up to ``limit`` outcomes, oldest first, and the attempts started and still
        running (as ``(key, fence)``)."""
        if limit >= len(self._pending):
            taken, self._pending = self._pending, []
        else:
            cut = int(limit)
            taken, self._pending = self._pending[:cut], self._pending[cut:]
        running = [(i.key, i.fence) for i in self._started if i.state is not ItemState.FINISHED]
        self._started = []
        return taken, running

    def close(self) -> None:
        """No more outcomes will come."""
        self.closed = True
        self._ready.set()
        self._full.set()
