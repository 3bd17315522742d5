"""The worker pool: ``concurrency`` tasks handling leased items, and the watchdog over them.

Each attempt opens the input safely (no final symlink followed, never blocking on a FIFO,
``fstat`` of the open file), builds a fresh :class:`TaskContext` and calls the handler. An
``Exception`` fails only that item, but for a :class:`ConfigurationError` (a setting the handler
needs is missing: the run stops). A ``CancelledError`` that the handler raises while nothing
cancelled it fails only that attempt too. Any other ``BaseException`` (``SystemExit``,
``KeyboardInterrupt``, ``GeneratorExit``, an application's own) stops the run: it travels
through the task groups as a :class:`HandlerAborted` (asyncio lets a ``SystemExit`` escape the
event loop from any task at once, skipping every clean-up), and ``Batch.run()`` raises the
original once the leases and the lock are released.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import anyio.lowlevel

from .. import _failpoints as failpoints
from .._context import InputFile, ItemLogger, StopCallback, TaskContext
from .._errors import error_text, redact_urls
from .._exceptions import (
    AttemptInterrupted,
    ConfigurationError,
    EffectError,
    InputChangedError,
    LockLostError,
    PermanentError,
)
from .._http.client import HTTPSettings, ItemHTTP
from .._ledger import Outcome
from .._scanner import Entry, clamp_ns, open_regular
from .._sources.objects import ObjectEntry
from .._sources.store import ObjectStoreDown, ObjectStores
from .._sources.url import ObjectURL
from .queues import ItemQueue, ItemState, LeasedItem, Outbox, item_logger
from .state import RunState

if TYPE_CHECKING:
    from .._sources.objects import ObjectInput

__all__ = ["HandlerAborted", "WorkerPool"]

#: ``Outcome._make``: builds the tuple in C, without NamedTuple's generated ``__new__``.
_make_outcome = Outcome._make

log = logging.getLogger("asyncbatch")
#: Longest stretch (seconds) a worker runs handlers without letting other tasks in.
YIELD_EVERY = 0.001
#: How long a run whose commands can fill every usable CPU (``concurrency`` at least their
#: number) waits before its first command: see :meth:`WorkerPool._before_first_command`.
FIRST_COMMAND_DELAY = 0.1
#: Why the watchdog stopped an attempt whose lease another runner took over.
TAKEN_OVER = "its lease was taken over by another runner (was this runner suspended?)"
#: Why the watchdog stopped an attempt whose lease the ledger did not renew in time.
LEASE_RAN_OUT = "the lease ran out before the handler finished"


def _nothing() -> None:
    """What unregisters a stop callback that was called at once."""


class HandlerAborted(Exception):
    """A handler raised a ``BaseException`` that is not a cancellation: the run must stop.

    Carries the original (``original``) and the item's relpath; ``Batch`` raises the original
    again once the run has released everything.
    """

    def __init__(self, original: BaseException, relpath: str) -> None:
        self.original = original
        self.relpath = relpath
        super().__init__(f"the handler raised {error_text(original)} for {relpath!r}")


def _cancelled_by_the_run() -> bool:
    """Whether a cancel scope around the current task (the watchdog's, the run's, the
    application's) was cancelled or is past its deadline.

    Not ``task.cancelling()``: a handler that cancels its own task (``current_task().cancel()``)
    raises the same exception, and must fail only its attempt, not end the run.
    """
    return anyio.current_effective_deadline() <= anyio.current_time()


async def _absorb_own_cancellation() -> None:
    """Take back a cancellation the handler requested of its own task (delivered or not), so
    the worker's next await is not cancelled by it."""
    task = asyncio.current_task()
    if task is None or task.cancelling() == 0:
        return
    try:
        await asyncio.sleep(0)  # a request not yet delivered is delivered here
    except asyncio.CancelledError:
        if _cancelled_by_the_run():
            raise
    while task.cancelling() > 0:
        task.uncancel()


class StartedAttempt(Protocol):
    """What a handler's ``start_attempt(ctx)`` returns: an attempt under way (a command
    started, see :meth:`~asyncbatch.ExecHandler.start_attempt`)."""

    async def wait(self) -> None:
        """Wait for its end (cancelled: stop it, then let the cancellation go on)."""

    def result(self) -> None:
        """Once ``wait()`` returned: return if it succeeded, else raise as a handler would."""


@dataclass(slots=True, eq=False)
class _Prepared:
    """An attempt ready to start: its input open, its context made (:meth:`WorkerPool.prepare`)."""

    item: LeasedItem
    input_file: InputFile
    ctx: TaskContext
    #: What :meth:`WorkerPool._handled_stat` said to record (``None``: the file scanned).
    stat: tuple[int, int, int] | None

    def close(self) -> None:
        """Close the input (once): the attempt ended, or never starts."""
        self.input_file.close()


@dataclass(slots=True, eq=False)
class _Running:
    """A started attempt of a worker that starts attempts (:meth:`WorkerPool._work_started`)."""

    prepared: _Prepared
    attempt: StartedAttempt
    started: float


@dataclass(slots=True, eq=False)
class _Slot:
    """A worker's current item, watched by the watchdog."""

    scope: anyio.CancelScope | None = None
    #: The worker's task (looked up once: a handler may cancel it).
    task: asyncio.Task[Any] | None = None
    item: LeasedItem | None = None
    started: float = 0.0
    reason: str = "stopped by the watchdog"
    #: The next item, prepared while ``item`` runs (a worker that starts attempts); a worker
    #: with nothing to do takes it over.
    ready: _Prepared | None = None
    #: When the worker next lets the other tasks run while items wait (:meth:`_next_item`).
    yield_at: float = 0.0
    #: The watchdog's: the item whose local lease deadline it found passed, a renewal asked
    #: for it, and by when (``time.monotonic()``) that renewal must have come (see
    #: :meth:`WorkerPool.watchdog`).
    overdue: LeasedItem | None = None
    renew_by: float = 0.0


class WorkerPool:
    """Runs the handler over queued items; also the :class:`ContextHooks` of their contexts."""

    def __init__(
        self,
        state: RunState,
        queue: ItemQueue,
        outbox: Outbox,
        *,
        handler: Callable[[TaskContext], Awaitable[Any]],
        http: HTTPSettings,
    ) -> None:
        self.run = state
        self.config = state.config
        self.handler = handler
        self.http = http
        self._keys = http.keys
        self.queue = queue
        self.outbox = outbox
        self.handler_logger = logging.getLogger("asyncbatch.handler")
        self._slots: list[_Slot] = []
        self._watch_at = math.inf
        self._watch_wake = anyio.Event()
        #: Whether the watchdog's request for a heartbeat is under way (see :meth:`_renew`).
        self._renewing = False
        self._on_done = state.config.on_done.encode()
        # Per run, looked up once (not per item): the source, an object-store prefix or a
        # directory, and what every context carries.
        source = state.config.source
        self._object_source = source if isinstance(source, ObjectURL) else None
        self._directory = None if self._object_source is not None else state.config.directory
        self._job = state.config.job
        self._output_dir = state.config.output_dir
        #: A handler that can start an attempt without awaiting it (``ExecHandler``): its
        #: workers prepare their next item while the current one runs (directory sources;
        #: not with failpoints armed: their ``in-handler`` is reached on the event loop, a
        #: ``sleep`` there letting the other tasks run, as for any handler).
        start = getattr(handler, "start_attempt", None)
        self._start_attempt: Callable[[TaskContext], StartedAttempt] | None = (
            start
            if callable(start) and self._directory is not None and failpoints.ACTIVE is None
            else None
        )
        #: Whether the first command waits (see :meth:`_before_first_command`), and what the
        #: other workers' first commands wait on meanwhile.
        self._delay_first = self._start_attempt is not None and delays_first_command(
            state.config.concurrency, usable_cpus()
        )
        self._first_command: anyio.Event | None = None
        self._random = random.Random()
        #: Whether the run was asked to stop, by which signal (``None``: ``Batch.stop()``),
        #: and the ``ctx.on_stop`` callbacks of the handlers running now.
        self._stopped = False
        self._stop_signal: int | None = None
        self._stop_callbacks: dict[int, StopCallback] = {}
        self._next_callback = 0

    @property
    def busy(self) -> int:
        """Workers handling an item right now."""
        return sum(slot.item is not None for slot in self._slots)

    # -- workers -----------------------------------------------------------------------------------

    async def worker(self) -> None:
        """Handle items one after the other until the queue ends (or the run stops).

        One cancel scope per worker, not per item (a scope with a deadline costs ~14 us): the
        watchdog cancels it when the current item overruns its timeout or lease; the worker
        records that failure and carries on in a fresh scope.
        """
        slot = _Slot(task=asyncio.current_task(), yield_at=time.monotonic() + YIELD_EVERY)
        self._slots.append(slot)
        work = self._work if self._start_attempt is None else self._work_started
        try:
            while True:
                with anyio.CancelScope() as slot.scope:
                    if not await work(slot):
                        return
                item, slot.item = slot.item, None
                if item is not None:  # the watchdog stopped this item
                    if slot.reason == LEASE_RAN_OUT:
                        await self._ledger_answer(item)
                    self._record(item, self._stopped_outcome(item, slot.reason), slot.started)
        finally:
            self._slots.remove(slot)
            if slot.ready is not None:  # not started: left in flight, released with the run
                slot.ready.close()
                slot.ready = None

    async def _work(self, slot: _Slot) -> bool:
        # (No other worker holds an item ready: only a worker that starts attempts does.)
        while isinstance(item := await self._next_item(slot, wait=True), LeasedItem):
            started = self._begin_slot(slot, item)
            outcome = await self.attempt(item, slot.task)
            slot.item = None
            if outcome is None:
                continue  # given back (the run is stopping): released with its leases
            self._record(item, outcome, started)
        return False

    async def _next_item(self, slot: _Slot, *, wait: bool) -> LeasedItem | _Prepared | None:
        """The worker's next item: the next queued one whose lease is still this runner's;
        when none is queued and ``wait`` is true, the item another worker holds ready, if one
        does (its command runs: this worker has nothing to do), else the next one queued.

        ``None``: none is queued (and ``wait`` is false), the queue ended, or the run is
        stopping (items not taken stay leased, and are released with the run's other
        leases). No event-loop round trip per item while items wait, but a turn for the
        other tasks (ledger replies, heartbeat) about once a millisecond (``YIELD_EVERY``)."""
        queue, run = self.queue, self.run
        while not run.stopping:
            item = queue.get_nowait()
            if item is None:
                if not wait:
                    return None
                for other in self._slots:
                    ready = other.ready
                    if ready is not None:
                        other.ready = None
                        return ready
                item = await queue.get()
                if item is None:
                    return None
                slot.yield_at = time.monotonic() + YIELD_EVERY
            if item.lease_deadline > time.monotonic() and time.monotonic() < slot.yield_at:
                return item  # (the usual case: no await)
            if await self._taken(slot, item):
                return item
        return None

    async def _taken(self, slot: _Slot, item: LeasedItem) -> bool:
        """For :meth:`_next_item`: the turn due for the other tasks, then whether ``item``,
        taken from the queue, may be started (its lease still ours, see :meth:`still_ours`).

        Cancelled meanwhile, the worker gives the item back (at the queue's head): the
        watchdog stopped the command of a worker that takes its next item while one runs
        (after a suspension, say: that command's lease and the item's both ran out). Nothing
        else would start the item or give it back: it would stay in flight, renewed by every
        heartbeat, and the run would wait for it for ever."""
        try:
            if time.monotonic() >= slot.yield_at:
                await anyio.lowlevel.checkpoint()
                slot.yield_at = time.monotonic() + YIELD_EVERY
            return item.lease_deadline > time.monotonic() or await self.still_ours(item)
        except BaseException:
            if self.run.in_flight.get(item.key) is item:  # (else let go: taken over)
                self.queue.give_back(item)
            raise

    def _begin_slot(self, slot: _Slot, item: LeasedItem) -> float:
        """``item``'s attempt begins in ``slot``: watched by the watchdog from now, its start
        noted for the committer. Returns when (``time.monotonic()``)."""
        slot.item = item
        slot.started = started = time.monotonic()
        item.started_at = self.run.clock()
        timeout = self.config.timeout
        if timeout is not None and started + timeout < self._watch_at:
            self._watch_wake.set()
        self.outbox.started(item)
        return started

    async def _work_started(self, slot: _Slot) -> bool:
        """:meth:`_work` for a handler that starts its attempts without awaiting them
        (``start_attempt``: a command per file). While an item's command runs, the worker
        takes its next item and prepares it (lease checked, input opened, context made: the
        slot's ``ready``); when the command exits, the next one starts at once, and only then
        is the ended attempt's outcome made: a slot's next command waits for its start, not
        for the bookkeeping of two items.

        An item is never held ready while another worker has nothing to do: a worker only
        takes one ahead when none waits for an item, gives it back if one started waiting
        meanwhile, and a worker that runs out of items takes the one another holds ready."""
        start = self._start_attempt
        assert start is not None
        run, queue = self.run, self.queue
        running: _Running | None = None
        try:
            while True:
                if slot.ready is None and not run.stopping and not (running and queue.waiting):
                    ready = await self._prepare_next(slot, wait=running is None)
                    if ready is not None and running is not None and queue.waiting:
                        ready.close()  # a worker became idle meanwhile: it is its item
                        queue.give_back(ready.item)
                        ready = None
                    slot.ready = ready
                if running is None:
                    if self._delay_first and slot.ready is not None:
                        await self._before_first_command()
                    if slot.ready is None or run.stopping:
                        return False  # the queue ended, or the run is stopping (ready: left)
                    ready = await self._take_ready(slot)
                    if ready is not None:
                        running = self._launch(slot, ready, start)
                    continue
                try:
                    await running.attempt.wait()
                except BaseException:  # cancelled: the attempt stopped it, and released it
                    running.prepared.close()
                    running = None
                    raise
                ended, running = running, None
                ready = slot.ready
                if (
                    ready is not None
                    and not run.stopping
                    and ready.item.lease_deadline > time.monotonic()
                ):
                    slot.ready = None
                    running = self._launch(slot, ready, start)
                self._finish(slot, ended)
        except BaseException:
            if running is not None:
                await self._abandon(running)
            raise

    async def _before_first_command(self) -> None:
        """Wait :data:`FIRST_COMMAND_DELAY` before the run's first command, once a run (the
        other workers wait for the same end), when its commands can fill every usable CPU.

        Why (benchmarks/RESULTS.md, "The mode explained"): Linux places a new process by the
        CPUs' utilisation, the parent's own included, and takes the parent's from its
        utilisation *estimate*, which it does not lower while the task waits for a CPU. The
        start-up (the interpreter, the imports, the first scan) leaves the event loop's
        thread's estimate high, and once the commands fill the CPUs it stays where it was
        for the whole run: when it was above ~85 % of a CPU (4 runs in 10 here), every
        command was placed beside a running one, and the loop's own CPU idled through each
        start: the slots ran one behind the other (1.4-1.7x the wall of ``xargs -P``). An
        idle pause first lets the estimate fall: none of 53 runs fell in that mode with it,
        45 of 96 without (2,000 and 10,000 files, -j 2 on 2 CPUs)."""
        gate = self._first_command
        if gate is not None:
            await gate.wait()
            return
        self._first_command = gate = anyio.Event()
        try:
            await anyio.sleep(FIRST_COMMAND_DELAY)
        finally:
            self._delay_first = False
            gate.set()

    async def _take_ready(self, slot: _Slot) -> _Prepared | None:
        """Take the slot's ready item to start it. ``None``: its lease was taken over (the
        ledger was asked: its local deadline had passed), or another worker took it
        meanwhile."""
        ready = slot.ready
        assert ready is not None
        if ready.item.lease_deadline <= time.monotonic():
            ours = await self.still_ours(ready.item)
            if slot.ready is not ready:
                return None  # taken meanwhile by a worker that had nothing to do
            if not ours:
                ready.close()
                slot.ready = None
                return None
        slot.ready = None
        return ready

    async def _prepare_next(self, slot: _Slot, *, wait: bool) -> _Prepared | None:
        """The worker's next item, prepared (:meth:`prepare`); the outcomes of items that end
        before their handler (vanished, given up on) are recorded on the way. ``None``: no
        item is queued (and ``wait`` is false), the queue ended, or the run is stopping. A
        worker that would wait takes the item another worker holds ready, if one does."""
        run = self.run
        slot.yield_at = time.monotonic() + YIELD_EVERY  # (the worker awaited a command since)
        while True:
            item = await self._next_item(slot, wait=wait)
            if not isinstance(item, LeasedItem):
                return item  # another worker's, prepared; or none
            item.started_at = run.clock()
            prepared = self.prepare(item)
            if not isinstance(prepared, Outcome):
                return prepared
            self.outbox.started(item)
            self._record(item, prepared, time.monotonic())

    def _launch(
        self, slot: _Slot, prepared: _Prepared, start: Callable[[TaskContext], StartedAttempt]
    ) -> _Running | None:
        """Start a prepared attempt (it becomes the slot's item); ``None`` when it could not
        be started (its outcome recorded)."""
        current = self._still_current(prepared)
        if current is None:
            return None
        prepared = current
        item = prepared.item
        started = self._begin_slot(slot, item)
        try:
            attempt = start(prepared.ctx)
        except Exception as exc:
            prepared.close()
            slot.item = None
            outcome = self._failed(item, exc)
            if outcome is not None:
                self._record(item, outcome, started)
            return None
        except BaseException:
            prepared.close()
            raise
        return _Running(prepared, attempt, started)

    def _still_current(self, prepared: _Prepared) -> _Prepared | None:
        """A prepared attempt's input, looked at again by the path its command gets (one
        ``stat``), just before that command starts: prepared while the slot's previous command
        ran, the file may have been deleted, replaced or written to since, or the source
        directory replaced. The same file, unchanged: ``prepared``. Otherwise the item is
        prepared again from what is there now (the source looked at again first): its attempt
        as that finds it, or ``None`` with its outcome recorded (vanished, say)."""
        item, entry, opened = prepared.item, prepared.ctx.entry, prepared.input_file
        # The path as a string, without building the entry's ``Path`` (~5 us a file).
        if type(entry) is Entry and entry._path is None:
            path: str | Path = os.path.join(entry._base, entry._relpath)
        else:
            path = entry.path
        try:
            st = os.stat(path, follow_symlinks=self.config.follow_symlinks)
        except OSError:
            pass  # gone (or unreadable): preparing it again says which
        else:
            now = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if now == (entry.inode, opened.size, opened.mtime_ns, opened.ctime_ns):
                return prepared
        prepared.close()
        self.run.source.refresh()  # (another directory at the source's path: opened now)
        again = self.prepare(item)
        if isinstance(again, Outcome):
            self.outbox.started(item)
            self._record(item, again, time.monotonic())
            return None
        return again

    def _finish(self, slot: _Slot, running: _Running) -> None:
        """Record the outcome of a started attempt that ended."""
        prepared = running.prepared
        item = prepared.item
        try:
            running.attempt.result()
            self._check_unchanged(item, prepared.input_file)
        except Exception as exc:
            outcome = self._failed(item, exc)
        else:
            outcome = self._done(prepared)
        finally:
            prepared.close()
        if slot.item is item:
            slot.item = None
        if outcome is not None:
            self._record(item, outcome, running.started)

    @staticmethod
    async def _abandon(running: _Running) -> None:
        """Stop a started attempt its worker leaves (the worker is cancelled, or failed): as
        a cancelled handler's, its command is killed and reaped; its input is closed."""
        try:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await running.attempt.wait()  # stops it, unless it ended already:
                running.attempt.result()  # then reaped and released
        except (Exception, asyncio.CancelledError):
            pass  # the worker records the slot's item as stopped
        finally:
            running.prepared.close()

    def _record(self, item: LeasedItem, outcome: Outcome, started: float) -> None:
        """Hand an attempt's outcome to the committer (and the metrics)."""
        metrics = self.run.metrics
        if metrics is not None and item.state is not ItemState.LOST:  # (LOST: to be refused)
            metrics.attempt_ended(outcome, time.monotonic() - started)
        self.outbox.put(item, outcome)

    async def still_ours(self, item: LeasedItem) -> bool:
        """Whether a queued item whose local lease deadline passed may still be started.

        Its lease may have been taken over while this runner was suspended or stalled: a
        heartbeat is asked for and awaited, and the ledger's answer decides. A lease taken
        over is left to its new holder: the item is not started (and is noted as held, as a
        claim that found it so would have noted it).
        """
        run = self.run
        while item.lease_deadline <= time.monotonic():
            if item.state is ItemState.LOST or run.in_flight.get(item.key) is not item:
                run.in_flight.pop(item.key, None)
                run.reopen(item.key, "held", item.record())
                self.item_logger(item).info(
                    "%r: not started: its lease was taken over by another runner",
                    os.fsdecode(item.relpath),
                )
                return False
            if run.stopping:
                return False  # not started; released with the run's other leases
            await run.renew_leases()
        return True

    async def watchdog(self) -> None:
        """Cancel handlers that overrun their ``timeout`` or lose their lease (one timer in all).

        A running item whose local lease deadline passed is not cancelled on the clock's
        word alone: the runner may have been suspended (SIGSTOP), or its event loop stalled,
        with its heartbeat not run since, while nothing took the lease over. A heartbeat is
        asked for at once (see :meth:`RunState.renew_leases`), and the ledger's answer decides:
        renewed, the handler goes on; taken over by another runner (``ItemState.LOST``), it
        is cancelled (its late outcome is refused by the fence anyway). A renewal that does
        not come within :meth:`renewal_patience` (the ledger cannot be reached, or the
        heartbeat is stuck in a call begun before) cancels it too, as before: the attempt must
        stop before another runner could take the lease over.
        """
        timeout = self.config.timeout
        idle = min(self.config.lease / 4, timeout if timeout is not None else math.inf)
        patience = self.renewal_patience()
        async with anyio.create_task_group() as renewals:
            while True:
                now = time.monotonic()
                wake_at = now + idle
                renew = False
                for slot in self._slots:
                    item = slot.item
                    if item is None or slot.scope is None or slot.scope.cancel_called:
                        continue
                    ends = slot.started + timeout if timeout is not None else math.inf
                    if ends <= now:
                        slot.reason = f"TimeoutError: the handler ran over {timeout}s"
                        slot.scope.cancel()
                    elif item.lease_deadline > now:
                        slot.overdue = None
                        wake_at = min(wake_at, ends, item.lease_deadline)
                    elif item.state is ItemState.LOST:
                        slot.reason = TAKEN_OVER
                        slot.scope.cancel()
                    elif slot.overdue is not item:  # its deadline just passed: ask the ledger
                        slot.overdue, slot.renew_by = item, now + patience
                        renew = True
                        wake_at = min(wake_at, ends, slot.renew_by)
                    elif slot.renew_by <= now:  # no renewal in time: stop before a takeover
                        slot.reason = LEASE_RAN_OUT
                        slot.scope.cancel()
                    else:
                        wake_at = min(wake_at, ends, slot.renew_by)
                if renew and not self._renewing:
                    self._renewing = True
                    renewals.start_soon(self._renew)
                self._watch_at = wake_at
                with anyio.move_on_after(wake_at - now):
                    await self._watch_wake.wait()
                if self._watch_wake.is_set():
                    self._watch_wake = anyio.Event()

    def renewal_patience(self) -> float:
        """How long the watchdog waits for the renewal it asked for a running item whose local
        lease deadline passed: half the margin the local deadline keeps before the ledger's
        (:meth:`RunState.lease_margin`). Without a suspension the deadline is found passed
        as it passes: the attempt is then cancelled at least half that margin before another
        runner could take the lease over (after a suspension, that time may be past already:
        only the ledger knows)."""
        return (self.config.lease - self.run.lease_margin()) / 2

    async def _renew(self) -> None:
        """For the watchdog: have the heartbeat renew the leases, then look again."""
        try:
            await self.run.renew_leases()
        finally:
            self._renewing = False
            self._watch_wake.set()

    async def _ledger_answer(self, item: LeasedItem) -> None:
        """Before the outcome of an attempt stopped, or an effect refused, because no renewal
        of its lease came within :meth:`renewal_patience`: wait (at most a lease's time) for
        the heartbeat asked for meanwhile to answer, so that the outcome says what happened
        (another runner took the lease over: cut short; else failed) and not only that the
        answer was slow (a busy ledger, a loaded machine). Nothing of the attempt runs any
        more: waiting is safe; its outcome is fenced anyway."""
        if item.state is ItemState.LOST or time.monotonic() < item.lease_deadline:
            return
        with anyio.move_on_after(self.config.lease):
            await self.run.renew_leases()

    def _stopped_outcome(self, item: LeasedItem, reason: str) -> Outcome:
        """The outcome of an attempt the watchdog stopped: failed (its timeout, or its lease
        ran out with no renewal to be had), or cut short because another runner took its
        lease over: not a failure of the handler (the ledger refuses the outcome, its fence
        being old, and the new holder's lease counts the attempt as interrupted)."""
        if item.state is not ItemState.LOST:
            return self.failure(item, reason)
        self.item_logger(item).warning(
            "%r: attempt %d cut short: %s",
            os.fsdecode(item.relpath),
            item.attempt,
            TAKEN_OVER,
        )
        began, retry_at = item.started_at, self.run.clock()
        return Outcome(item.key, item.fence, "failed", TAKEN_OVER, retry_at, started_at=began)

    # -- one attempt -------------------------------------------------------------------------------

    async def attempt(
        self, item: LeasedItem, task: asyncio.Task[Any] | None = None
    ) -> Outcome | None:
        """Open the input, call the handler, and say how it went (never raises ``Exception``).

        ``None``: the handler gave the item back (:class:`AttemptInterrupted` while the run is
        stopping); it stays in flight, and is released with the run's other leases.
        ``task`` is the worker's: a cancellation of it that the handler requested and left
        pending is taken back, and fails the attempt."""
        if self._object_source is not None:
            refused = self._begin(item)
            if refused is not None:
                return refused
            return await self._attempt_object(item, self._object_source, task)
        prepared = self.prepare(item)
        if isinstance(prepared, Outcome):
            return prepared
        try:
            failed = await self._call(item, prepared.ctx, prepared.input_file, task)
            if failed is not False:
                return failed
            return self._done(prepared)
        finally:
            prepared.close()

    def _begin(self, item: LeasedItem) -> Outcome | None:
        """Number the attempt; the outcome of an item given up on without running, if it is."""
        item.state = ItemState.RUNNING
        if item.prior_interrupted >= self.config.max_interruptions:
            return self.give_up(item)
        item.attempt = item.prior_attempts + 1
        return None

    def prepare(self, item: LeasedItem) -> _Prepared | Outcome:
        """What an attempt of a directory's item does before its handler: the input opened
        (and checked: the file scanned, settled), the context made. Or the outcome of an
        attempt that ends there (vanished, unreadable, given up on)."""
        refused = self._begin(item)
        if refused is not None:
            return refused
        opened = self._open_input(item)
        if isinstance(opened, Outcome):
            return opened
        fd, st, moved = opened
        try:
            mtime_ns = clamp_ns(st.st_mtime_ns)
            if (
                moved is None
                and st.st_size == item.size
                and mtime_ns == item.mtime_ns
                and st.st_ino == item.inode
                and (item.ctime_ns == 0 or st.st_ctime_ns == item.ctime_ns)
            ):
                stat = None  # the file scanned, unchanged (the usual case, checked inline)
            else:
                checked = self._handled_stat(item, st, mtime_ns, moved)
                if isinstance(checked, Outcome):
                    os.close(fd)
                    return checked
                stat = checked
            input_file = InputFile(fd, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            ctx = self._context(item, st, mtime_ns, moved, input_file)
        except BaseException:
            os.close(fd)
            raise
        return _Prepared(item, input_file, ctx, stat)

    def _done(self, prepared: _Prepared) -> Outcome:
        """The outcome of a prepared attempt whose handler succeeded."""
        item = prepared.item
        return _make_outcome(
            (
                item.key,
                item.fence,
                "done",
                None,
                None,
                self._on_done,
                prepared.stat,
                True,
                item.started_at,
            )
        )

    async def _attempt_object(
        self, item: LeasedItem, source: ObjectURL, task: asyncio.Task[Any] | None
    ) -> Outcome | None:
        """:meth:`attempt` for an object: one ``GET`` of the version claimed (see
        :func:`~asyncbatch._sources.objects.open_object`), then the handler."""
        opened = await self._open_object(item, source)
        if isinstance(opened, Outcome):
            return opened
        info, stat = opened.info, None
        if (info.size, info.tag) != (item.size, item.inode):  # identity "path": as it is now
            stat = item.size, item.mtime_ns, item.inode = info.size, info.mtime_ns, info.tag
        ctx = TaskContext(
            entry=ObjectEntry(
                source, os.fsdecode(item.relpath), item.size, item.mtime_ns, item.inode
            ),
            key=item.key,
            input_hash=item.ihash,
            attempt=item.attempt,
            job=self.config.job,
            fence=item.fence,
            output_dir=self.config.output_dir,
            hooks=self,
            input_file=opened,
        )
        failed = await self._call(item, ctx, opened, task)
        if failed is not False:
            return failed
        return _make_outcome(
            (item.key, item.fence, "done", None, None, self._on_done, stat, True, item.started_at)
        )

    async def _open_object(self, item: LeasedItem, source: ObjectURL) -> ObjectInput | Outcome:
        """The item's object, its ``GET`` under way, or the outcome of one that cannot be."""
        from .._sources.objects import ObjectReplaced, open_object, unreadable_key

        tag = None if self.config.identity == "path" else item.inode
        relpath = os.fsdecode(item.relpath)
        try:
            return await open_object(self.objects_required, source, relpath, tag)
        except ObjectReplaced as exc:
            why = str(exc)
        except FileNotFoundError:
            why = "the object disappeared before it could be handled"
        except OSError as exc:
            return self.failure(item, error_text(exc))
        # A key that ends or starts with '/' is listed without it, and read so: not found, or
        # another object. Its version is not to be handled as gone (it is listed again by every
        # run) nor with the object obstore reads: dead, with no post-commit action.
        unread = await unreadable_key(self.objects_required, source, relpath, item.inode)
        if unread is None:
            return self.vanished(item, why)
        self.item_logger(item).warning("%r: %s", relpath, unread)
        return Outcome(item.key, item.fence, "dead", unread, started_at=item.started_at)

    @property
    def objects(self) -> ObjectStores | None:
        """The run's object-store clients (``None`` when it uses no ``s3://`` location)."""
        return self.run.objects

    @property
    def objects_required(self) -> ObjectStores:
        """The run's object-store clients, made now if the run had none yet."""
        if self.run.objects is None:
            self.run.objects = ObjectStores(outage_timeout=self.config.ledger_timeout)
        return self.run.objects

    def _open_input(self, item: LeasedItem) -> tuple[int, os.stat_result, Path | None] | Outcome:
        """The item's input, opened safely: ``(fd, its fstat, where ctx.move() had taken it
        before the run died (or ``None``))``, or the outcome of an input that cannot be."""
        moved: Path | None = None
        try:
            try:
                fd, st = self._open(item)
            except (FileNotFoundError, NotADirectoryError):
                if not item.moved_to:
                    raise
                # The handler moved its input (ctx.move) before the run died: continue there.
                moved, fd, st = self._open_moved(item)
        except (FileNotFoundError, NotADirectoryError):
            # NotADirectoryError: a directory on its path was replaced by a file of the same
            # name (its files went with it); the scan, which finds the file gone, agrees.
            return self.vanished(item, "the file disappeared before it could be handled")
        except OSError as exc:
            return self.failure(item, error_text(exc), permanent=exc.errno is None)
        return fd, st, moved

    @staticmethod
    def _open_moved(item: LeasedItem) -> tuple[Path, int, os.stat_result]:
        """Open the input where ``ctx.move()`` took it before the run died: ``(its path, fd,
        fstat)``. A chain of moves (a staging directory, then the final one) is recorded with
        where its last move started from: killed before that move's rename, the input is
        still there; after it, at the destination (during it, both). The first of them that
        holds the file scanned (size and mtime) is taken, else the first that holds a file;
        ``FileNotFoundError`` when none does (the file is gone), or the first other error."""
        found: tuple[Path, int, os.stat_result] | None = None
        error: OSError | None = None
        for place in item.moved_to:
            path = Path(place)
            try:
                fd, st = open_regular(None, os.fsencode(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:  # not a regular file there, unreadable: another may be it
                error = error or exc
                continue
            if (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns):
                if found is not None:
                    os.close(found[1])
                return path, fd, st
            if found is None:
                found = path, fd, st
            else:
                os.close(fd)
        if found is not None:
            return found
        if error is not None:
            raise error
        raise FileNotFoundError(errno.ENOENT, "not where ctx.move() took it", item.moved_to[-1])

    def _handled_stat(
        self, item: LeasedItem, st: os.stat_result, mtime_ns: int, moved: Path | None
    ) -> tuple[int, int, int] | Outcome | None:
        """Whether the opened input is the file that was scanned: ``None`` (it is), the
        ``(size, mtime_ns, inode)`` to record (identity ``"path"``: the file under the name
        now), or the outcome of a file changed since (vanished: the new version is a new
        item, or it is still being written). ``mtime_ns``: ``st``'s, clamped."""
        stat: tuple[int, int, int] | None = None
        if (st.st_size, mtime_ns, st.st_ino) != (item.size, item.mtime_ns, item.inode):
            if self.config.identity != "path" and (
                st.st_size != item.size or mtime_ns != item.mtime_ns
            ):
                if moved is None:  # a new version under the name: looked at again (a run)
                    self.run.changed.add(item.key)
                return self.vanished(
                    item, "the file changed after it was scanned; the new version is a new item"
                )
            if moved is None:
                # Identity "path": the file under the name is handled as it is now; what is
                # recorded (and what a post-commit action looks for) is this file.
                stat = item.size, item.mtime_ns, item.inode = st.st_size, mtime_ns, st.st_ino
        if moved is None and (why := self._rewritten(item, st)) is not None:
            self.run.rewritten.add(item.key)  # the same item, to be taken again once settled
            return self.vanished(item, why)
        return stat

    def _context(
        self,
        item: LeasedItem,
        st: os.stat_result,
        mtime_ns: int,
        moved: Path | None,
        input_file: InputFile,
    ) -> TaskContext:
        """A fresh context for this attempt of ``item`` (``mtime_ns``: ``st``'s, clamped)."""
        assert self._directory is not None  # a directory's item
        return TaskContext(
            entry=Entry(
                self._directory,
                os.fsdecode(item.relpath),
                st.st_size,
                mtime_ns,
                st.st_ino,
                path=moved,
            ),
            key=item.key,
            input_hash=item.ihash,
            attempt=item.attempt,
            job=self._job,
            fence=item.fence,
            output_dir=self._output_dir,
            hooks=self,
            input_file=input_file,
        )

    async def _call(
        self,
        item: LeasedItem,
        ctx: TaskContext,
        input_file: InputFile | ObjectInput,
        task: asyncio.Task[Any] | None,
    ) -> Outcome | Literal[False] | None:
        """Call the handler: ``False`` when it succeeded, else the failed attempt's outcome
        (``None``: given back, see :meth:`attempt`). A ``ConfigurationError``, a
        ``BaseException`` that is not a cancellation, and the run's own cancellation go on."""
        try:
            if failpoints.ACTIVE is not None:  # inline: this is once per item
                await failpoints.ahit("in-handler")
            await self.handler(ctx)
            self._check_unchanged(item, input_file)
            if task is not None and task.cancelling() and not _cancelled_by_the_run():
                # It cancelled its own task, and returned before that was delivered.
                await _absorb_own_cancellation()
                return self.failure(
                    item, "the handler cancelled its own task (nothing in the run had)"
                )
        except Exception as exc:
            if isinstance(exc, LockLostError):  # an effect refused: taken over, or not known
                await self._ledger_answer(item)
            return self._failed(item, exc)
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                raise HandlerAborted(exc, os.fsdecode(item.relpath)) from exc
            if _cancelled_by_the_run():
                raise
            # Raised by the handler, or its own task cancelled by itself: its attempt fails.
            await _absorb_own_cancellation()
            why = "CancelledError: the handler raised it, but nothing in the run cancelled it"
            return self.failure(item, why, exc=exc)
        return False

    def _failed(self, item: LeasedItem, exc: Exception) -> Outcome | None:
        """The outcome of an attempt whose handler raised ``exc`` (``None``: given back, see
        :meth:`attempt`). A :class:`ConfigurationError` is raised again (``ctx.write_output``
        without an ``output_dir``, say: no retry can help)."""
        if isinstance(exc, ConfigurationError):
            raise exc
        objects = self.objects
        down = None if objects is None else objects.gave_up
        if down is not None or isinstance(exc, ObjectStoreDown):
            # The store stayed unreachable past the bound (whatever the handler made of its
            # error): the run ends (exit 69), this item left pending, its attempt not failed.
            raise down or exc
        if isinstance(exc, LockLostError) and item.state is ItemState.LOST:
            # An effect refused because another runner took the lease over (the ledger said
            # so): cut short, as the watchdog would have stopped it, not a failure.
            return self._stopped_outcome(item, TAKEN_OVER)
        if isinstance(exc, PermanentError):
            return self.failure(item, error_text(exc), permanent=True, exc=exc)
        if isinstance(exc, AttemptInterrupted):
            return self._interrupted(item, exc)
        return self.failure(item, error_text(exc), exc=exc)

    def _interrupted(self, item: LeasedItem, exc: AttemptInterrupted) -> Outcome | None:
        """A handler gave its item back: ``None`` while the run stops (released with the
        run's leases), else a failed attempt."""
        if not self._stopped:
            return self.failure(item, error_text(exc), exc=exc)
        self.item_logger(item).info(
            "%r: attempt %d given back, the run is stopping: %s",
            os.fsdecode(item.relpath),
            item.attempt,
            error_text(exc),
        )
        return None

    def _check_unchanged(self, item: LeasedItem, input_file: InputFile | ObjectInput) -> None:
        """Raise :class:`InputChangedError` if the input changed while its handler ran: a
        file renamed or removed by its handler (``mv {} dest/``, ``gzip {}``: only its ctime
        changed, and it is no longer where it was opened) was not written to."""

        def taken_away(st: os.stat_result) -> bool:
            if st.st_nlink == 0:
                return True  # removed (or renamed over): no name leads to it any more
            follow = self.config.follow_symlinks
            try:
                here = os.stat(item.relpath, dir_fd=self.run.source.fd, follow_symlinks=follow)
            except (FileNotFoundError, NotADirectoryError):
                return True
            except OSError:
                return False
            return (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino)

        if (why := input_file.changed(taken_away)) is not None:
            raise InputChangedError(f"the input changed while it was handled: {why}")

    def _open(self, item: LeasedItem) -> tuple[int, os.stat_result]:
        """Open an item's input relative to the source directory. If it is not there, and the
        source directory turns out to have been replaced since it was opened (deleted and
        made again, remounted), open it in the directory that is there now."""
        source, follow = self.run.source, self.config.follow_symlinks
        try:
            return open_regular(source.fd, item.relpath, follow_symlinks=follow)
        except FileNotFoundError:
            if not source.refresh():
                raise
            return open_regular(source.fd, item.relpath, follow_symlinks=follow)

    def _rewritten(self, item: LeasedItem, st: os.stat_result) -> str | None:
        """Why an input opened to be handled is not settled any more, or ``None``.

        The scan found it settled; a write since (a copier that preallocated the file and
        sets its mtime back keeps its size and mtime, so its key) shows in its ctime, changed
        since the scan and within the settle window. Such an item is given back as vanished:
        the next scan that finds it settled again leases it (a vanished item is claimable), so
        it is handled whole, later, never half-written now. An item leased from the ledger
        has the claimer's look at its file when it leased it to compare with (it leaves one
        not settled then waiting: see ``Claimer.claim_waiting``); without one (``ctime_ns``
        0: the file was not there, or another version), the reads' own checks guard it.
        """
        if item.ctime_ns == 0 or st.st_ctime_ns == item.ctime_ns:
            return None
        changed = max(st.st_mtime_ns, st.st_ctime_ns)
        age = (time.time_ns() - changed) / 1e9
        if age >= self.config.settle:
            return None
        return (
            f"the file changed {max(age, 0.0):.1f}s ago, after it was scanned (settle "
            f"{self.config.settle:g}s): it is still being written? It is handled once it settled"
        )

    def item_logger(self, item: LeasedItem) -> ItemLogger:
        """The run's logger, its records carrying the item's job, key and input hash."""
        return item_logger(log, self.config.job, item)

    def failure(
        self,
        item: LeasedItem,
        error: str,
        *,
        permanent: bool = False,
        exc: BaseException | None = None,
    ) -> Outcome:
        """The outcome of a failed attempt: failed (retry with backoff) or dead.

        Attempts that the runner's death or stop cut short do not count against
        ``max_attempts`` (they have their own budget, ``max_interruptions``).
        """
        cfg = self.config
        failures = item.prior_attempts - item.prior_interrupted + 1
        dead = permanent or failures >= cfg.max_attempts
        logger = self.item_logger(item)
        trace = ""
        if exc is not None and logger.isEnabledFor(logging.DEBUG):
            # The traceback, redacted like the error itself: exception messages carry URLs.
            trace = "\n" + redact_urls("".join(traceback.format_exception(exc)).rstrip())
        logger.warning(
            "%r: attempt %d %s: %s%s",
            os.fsdecode(item.relpath),
            item.attempt,
            "failed for good" if dead else "failed",
            error,
            trace,
        )
        began = item.started_at
        if dead:
            return Outcome(
                item.key, item.fence, "dead", error, None, cfg.on_dead.encode(), started_at=began
            )
        delay = min(cfg.backoff_max, cfg.backoff * 2 ** max(item.attempt - 1, 0))
        delay *= 0.5 + self._random.random() / 2
        retry_at = self.run.clock() + delay
        return Outcome(item.key, item.fence, "failed", error, retry_at, started_at=began)

    def give_up(self, item: LeasedItem) -> Outcome:
        """Dead without running: its runner died or was stopped during too many attempts."""
        cfg = self.config
        error = (
            f"given up on: the runner was killed or stopped during {item.prior_interrupted} of "
            f"its {item.prior_attempts} attempts (max_interruptions={cfg.max_interruptions}); "
            "does this file crash or stall its runner?"
        )
        self.item_logger(item).warning("%r: %s", os.fsdecode(item.relpath), error)
        return Outcome(item.key, item.fence, "dead", error, None, cfg.on_dead.encode(), None, False)

    def vanished(self, item: LeasedItem, why: str) -> Outcome:
        """The outcome of an item whose file is gone (or changed) before it was handled: not
        an attempt (its handler never ran: no attempt counted, no start noted; a file written
        to while queued, again and again, used up its item's attempts)."""
        self.item_logger(item).info("%r vanished: %s", os.fsdecode(item.relpath), why)
        return Outcome(
            item.key, item.fence, "vanished", why, started_at=item.started_at, attempted=False
        )

    # -- what a TaskContext asks of its run (ContextHooks) -----------------------------------------

    def http_for(self, key: str) -> ItemHTTP:
        """A fresh HTTP view for one attempt of ``key``."""
        return ItemHTTP(self.http, key)

    def idempotency_key(self, key: str, call: str) -> str:
        """The ``Idempotency-Key`` of the call ``call`` of the item ``key`` (as ``ctx.http``
        derives it for ``idempotency_key=call``)."""
        return self._keys.derive(key, call)

    def on_stop(self, callback: StopCallback) -> Callable[[], None]:
        """Call ``callback(signum)`` once when the run is asked to stop, at once if it was;
        return what unregisters it."""
        if self._stopped:
            self._call_stop_callback(callback)
            return _nothing
        token = self._next_callback
        self._next_callback += 1
        callbacks = self._stop_callbacks
        callbacks[token] = callback

        def unregister() -> None:
            callbacks.pop(token, None)

        return unregister

    def stop_requested(self, signum: int | None) -> None:
        """The run was asked to stop (by ``signum``, or ``None`` for ``Batch.stop()``): call
        the ``ctx.on_stop`` callbacks of the handlers running now (the first request only)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_signal = signum
        callbacks, self._stop_callbacks = self._stop_callbacks, {}
        for callback in callbacks.values():
            self._call_stop_callback(callback)

    def _call_stop_callback(self, callback: StopCallback) -> None:
        try:
            callback(self._stop_signal)
        except Exception:
            log.exception("a handler's on_stop callback raised (ignored)")

    def lease_lost(self, ctx: TaskContext) -> bool:
        """Whether the item's local lease deadline passed, or it is no longer ours."""
        item = self.run.in_flight.get(ctx.key)
        return item is None or item.fence != ctx.fence or time.monotonic() >= item.lease_deadline

    async def lease_renewed(self, ctx: TaskContext) -> bool:
        """For an effect (``ctx.write_output``, ``ctx.move``) whose item's local lease deadline
        passed: whether the lease is still this runner's, the ledger asked as the watchdog
        asks it (see :meth:`watchdog`). A heartbeat is asked for and awaited, for at most
        :meth:`renewal_patience` seconds: ``True`` once it renewed the lease (the same
        fence, the item not taken over), ``False`` when another runner took it over
        (``ItemState.LOST``), the item is no longer this attempt's, or no renewal came in
        time (the effect must not start when another runner may be taking the lease over)."""
        run = self.run
        with anyio.move_on_after(self.renewal_patience()):
            while True:
                item = run.in_flight.get(ctx.key)
                if item is None or item.fence != ctx.fence or item.state is ItemState.LOST:
                    return False
                if time.monotonic() < item.lease_deadline:
                    return True
                await run.renew_leases()
        return not self.lease_lost(ctx)

    async def record_move(self, ctx: TaskContext, destination: str, origin: str | None) -> bool:
        """Record, under the item's lease, where ctx.move() is taking its input (and from
        where, after an earlier move); refuse (:class:`EffectError`) a destination the scan
        would take for a new input."""
        why = self.config.visible_to_scan(Path(destination), is_dir=False)
        if why is not None:
            raise EffectError(
                f"cannot move {ctx.entry.relpath!r} to {destination!r}: the destination {why} "
                "(a scan would take the moved file for a new input)"
            )
        return await self.run.ledger.record_move(
            self.config.job, self.run.owner, ctx.key, ctx.fence, destination, origin
        )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; ``os.cpu_count()`` where that is not
    known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def delays_first_command(concurrency: int, cpus: int) -> bool:
    """Whether a run of commands waits before its first (see
    :meth:`WorkerPool._before_first_command`): when ``concurrency`` commands can fill the
    ``cpus`` usable CPUs. With fewer, a CPU stays free for each new command."""
    return concurrency >= cpus
