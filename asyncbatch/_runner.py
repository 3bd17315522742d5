"""One run of a batch: scanner → claimer → worker pool → committer → post-commit actions.

Everything here belongs to one :class:`Run` object, created per ``Batch.run()`` or
``Batch.watch()`` call: no module-level mutable state, nothing shared between items.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._config import BatchConfig
from ._context import ItemLogger, TaskContext, _Input
from ._effects import remove_stale_temp_files
from ._exceptions import LockLostError, PermanentError
from ._http import HTTPSettings, ItemHTTP, SharedClient
from ._identity import input_hash, item_key
from ._ledger import ClaimedRow, Ledger, Outcome
from ._postactions import PostActions
from ._procinfo import this_process
from ._report import Counters, Report, Statistics
from ._scanner import Entry, Scanner, content_digest, open_regular, split, unpack

__all__ = ["Handler", "Run", "unwrap_group"]

log = logging.getLogger("asyncbatch")
#: Longest stretch (seconds) a worker runs handlers without letting other tasks in.
_YIELD_EVERY = 0.001
Handler = Callable[[TaskContext], Awaitable[Any]]
Mode = Literal["run", "watch"]


@dataclass(slots=True, eq=False)
class _Item:
    """A leased item on its way through the pipeline (runner-internal)."""

    key: str
    ihash: str
    relpath: bytes
    size: int
    mtime_ns: int
    inode: int
    fence: int = 0
    attempts: int = 0
    started: bool = False
    lease_deadline: float = math.inf
    moved_to: str | None = None


@dataclass(slots=True, eq=False)
class _Slot:
    """A worker's current item, watched by the watchdog (runner-internal)."""

    scope: anyio.CancelScope | None = None
    item: _Item | None = None
    started: float = 0.0
    reason: str = "stopped by the watchdog"


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().replace("\r", " ").replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Run:
    """The machinery of one run. Use through :class:`asyncbatch.Batch`."""

    def __init__(
        self,
        config: BatchConfig,
        handler: Handler,
        *,
        mode: Mode,
        http: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.handler = handler
        self.mode = mode
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.me = this_process()
        self.counters = Counters()
        self.in_flight: dict[str, _Item] = {}
        self.stop_requested = anyio.Event()
        self.stopping = False
        self.holds_lock = False
        self._progress = anyio.Event()
        self._group_full = anyio.Event()
        self._outcomes_waiting = 0
        self._http = SharedClient(http)
        self._random = random.Random()
        self.scanner = Scanner(
            config.source,
            rules=config.rules,
            recursive=config.recursive,
            follow_symlinks=config.follow_symlinks,
        )
        # Set while the run executes.
        self._ledger: Ledger | None = None
        self._dir_fd = -1
        self._http_settings: HTTPSettings | None = None
        self._work_scope = anyio.CancelScope()
        self._posts: PostActions | None = None
        self._slots: list[_Slot] = []
        self._watch_at = math.inf
        self._watch_wake = anyio.Event()
        self._on_done = config.on_done.encode()
        #: The logger behind every ctx.log (ContextHooks).
        self.handler_logger = logging.getLogger("asyncbatch.handler")

    # -- public surface (through Batch) ------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking new items; in-flight ones get ``grace`` seconds to finish."""
        self.stop_requested.set()

    def is_stopping(self) -> bool:
        """Whether a stop was requested (checked between awaits, so never cached)."""
        return self.stopping

    def stop_now(self) -> None:
        """Stop at once: in-flight handlers are cancelled and their items released."""
        self.stop_requested.set()
        self.stopping = True
        self._work_scope.cancel()

    def statistics(self) -> Statistics:
        """A snapshot of the counters."""
        return self.counters.snapshot(len(self.in_flight))

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "the run is not executing"
        return self._ledger

    # -- lifecycle -------------------------------------------------------------------------------

    async def execute(self) -> Report:
        """Open the ledger, take the lock, run the pipeline, release everything, report."""
        cfg = self.config
        ledger = await Ledger.open(cfg.state, durability=cfg.durability, clock=self.clock)
        self._ledger = ledger
        status = "error"
        run_id = 0
        try:
            await ledger.ensure_job(cfg.job, cfg.identity)
            stale = await ledger.acquire_lock(
                cfg.job, self.owner, self.me, cfg.lease, shared=cfg.shared
            )
            self.holds_lock = not cfg.shared
            if stale is not None:
                log.warning(
                    "took over the stale lock of job %r held by pid %s on %s",
                    cfg.job,
                    stale.pid,
                    stale.host,
                )
            try:
                run_id = await ledger.register_runner(
                    cfg.job, self.owner, self.me, cfg.lease, shared=cfg.shared, mode=self.mode
                )
                if released := await ledger.reap_stale_runners(cfg.job, self.me):
                    log.warning("%d items of runners that are gone were put back", released)
                secret = await ledger.meta("secret")
                self._http_settings = HTTPSettings(
                    shared=self._http,
                    secret=bytes.fromhex(secret or ""),
                    job=cfg.job,
                    unsafe_methods=cfg.unsafe_methods,
                    retries=cfg.http_retries,
                    backoff=cfg.http_backoff,
                    backoff_max=cfg.http_backoff_max,
                )
                if cfg.output_dir is not None:
                    await remove_stale_temp_files(cfg.output_dir)
                self._dir_fd = os.open(cfg.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    await self._pipeline()
                finally:
                    os.close(self._dir_fd)
                    await self._http.aclose()
                status = "stopped" if self.stopping else "ok"
            except BaseException as exc:
                status = (
                    "cancelled"
                    if isinstance(exc, anyio.get_cancelled_exc_class())
                    else (f"error: {_error_text(exc)}")
                )
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await self._release(run_id, status)
            counts = await ledger.counts(cfg.job)
            report = self.counters.report(cfg.job, counts, stopped=self.stopping)
            log.info("%s", report)
            return report
        finally:
            await ledger.close()
            self._ledger = None

    async def _release(self, run_id: int, status: str) -> None:
        ledger, cfg = self.ledger, self.config
        leftovers = [(i.key, i.fence, i.started) for i in self.in_flight.values()]
        try:
            await ledger.release_items(cfg.job, self.owner, leftovers)
        finally:
            self.in_flight.clear()
            c = self.counters
            if status == "ok" and not c.report(cfg.job, {}, stopped=False).ok:
                status = "failed"
            await ledger.release_runner(
                cfg.job,
                self.owner,
                holds_lock=self.holds_lock,
                run_id=run_id,
                totals=(c.seen, c.done, c.failed, c.dead, c.vanished),
                exit_status=status,
            )

    async def _pipeline(self) -> None:
        cfg = self.config
        out_send, out_recv = anyio.create_memory_object_stream[tuple[_Item, Outcome]](math.inf)
        item_send, item_recv = anyio.create_memory_object_stream[_Item](
            2 * cfg.claim_batch + cfg.concurrency
        )
        self._posts = PostActions(cfg)
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._heartbeat)
                background.start_soon(self._watchdog)
                background.start_soon(self._stop_after_grace)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._posts.serve)
                    tg.start_soon(self._committer, out_recv)
                    async with out_send:
                        with self._work_scope:
                            async with anyio.create_task_group() as workers:
                                for _ in range(cfg.concurrency):
                                    workers.start_soon(self._worker, item_recv.clone(), out_send)
                                item_recv.close()
                                workers.start_soon(self._claimer, item_send)
                    # the committer drains what is left, then closes the post-action queue
                background.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    # -- heartbeat and stop ----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        cfg = self.config
        margin = min(5.0, cfg.lease * 0.1)
        while True:
            await anyio.sleep(cfg.lease / 4)
            began = time.monotonic()
            leases = [(i.key, i.fence) for i in self.in_flight.values()]
            alive = await self.ledger.heartbeat(
                cfg.job, self.owner, cfg.lease, leases, holds_lock=self.holds_lock
            )
            if not alive:
                raise LockLostError(
                    f"job {cfg.job!r}: this runner's lock or liveness record was taken over "
                    "(was it suspended longer than the lease?); it stopped"
                )
            deadline = began + cfg.lease - margin
            for item in self.in_flight.values():
                item.lease_deadline = deadline

    async def _stop_after_grace(self) -> None:
        await self.stop_requested.wait()
        self.stopping = True
        self._wake()
        log.info("stopping: no new items; in-flight items get %.0fs to finish", self.config.grace)
        await anyio.sleep(self.config.grace)
        self._work_scope.cancel()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def _wait_for_progress(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._progress.wait()

    # -- claiming --------------------------------------------------------------------------------

    async def _claimer(self, send: MemoryObjectSendStream[_Item]) -> None:
        async with send:
            if self.mode == "run":
                records = await self.scanner.scan(
                    settle=self.config.settle, on_chunk=self._on_scan_chunk
                )
                self.counters.seen = len(records)
                self.counters.scanned = True
                await self._claim_records(records, send)
                del records
                await self._claim_waiting(send, until_idle=True)
            else:
                await self._watch(send)

    def _on_scan_chunk(self, found: int) -> None:
        self.counters.seen = found

    async def _watch(self, send: MemoryObjectSendStream[_Item]) -> None:
        """Poll forever: a file is handled once it is settled and unchanged since the last poll."""
        cfg = self.config
        previous: dict[bytes, bytes] = {}
        known: dict[bytes, bytes] = {}
        settle_ns = int(cfg.settle * 1e9)
        while not self.is_stopping():
            now_ns = time.time_ns()
            records = await self.scanner.scan(settle=None, now_ns=now_ns)
            cutoff = now_ns - settle_ns
            candidates: list[bytes] = []
            seen_now: dict[bytes, bytes] = {}
            waiting: dict[bytes, bytes] = {}
            for record in records:
                rel, signature = split(record)
                if known.get(rel) == signature:
                    seen_now[rel] = signature
                elif previous.get(rel) == signature and unpack(record)[0] <= cutoff:
                    candidates.append(record)
                    seen_now[rel] = signature
                else:
                    waiting[rel] = signature
            del records
            previous, known = waiting, seen_now
            self.counters.seen += len(candidates)
            self.counters.scanned = True
            await self._claim_records(candidates, send)
            del candidates
            await self._claim_waiting(send, until_idle=False)
            with anyio.move_on_after(cfg.poll):
                await self.stop_requested.wait()

    def _prepare(self, records: list[bytes]) -> list[_Item]:
        cfg = self.config
        items: list[_Item] = []
        keys: set[str] = set()
        for record in records:
            mtime_ns, rel, size, inode = unpack(record)
            digest = b""
            if cfg.identity == "content":
                found = content_digest(
                    self._dir_fd, rel, size, mtime_ns, follow_symlinks=cfg.follow_symlinks
                )
                if found is None:
                    continue
                digest = found
            ihash = input_hash(cfg.identity, rel, size, mtime_ns, digest)
            key = item_key(cfg.identity, ihash, mtime_ns)
            if key in keys:
                continue  # the same content twice in one chunk: one item
            keys.add(key)
            items.append(_Item(key, ihash, rel, size, mtime_ns, inode))
        return items

    async def _claim_records(
        self, records: list[bytes], send: MemoryObjectSendStream[_Item]
    ) -> None:
        cfg = self.config
        for start in range(0, len(records), cfg.claim_batch):
            if self.is_stopping():
                return
            chunk = records[start : start + cfg.claim_batch]
            if cfg.identity == "content":
                items = await anyio.to_thread.run_sync(self._prepare, chunk)
            else:
                items = self._prepare(chunk)
            rows = await self.ledger.claim_scanned(
                cfg.job,
                self.owner,
                cfg.lease,
                [(i.key, i.relpath, i.size, i.mtime_ns, i.inode) for i in items],
            )
            by_key = {row.key: row for row in rows}
            leased: list[_Item] = []
            for item in items:  # scan order: RETURNING order is unspecified
                row = by_key.get(item.key)
                if row is None:
                    continue
                if row.state == "running":
                    self.counters.claimed_from_scan += 1
                    leased.append(self._lease(item, row))
                    continue
                if row.state == "dead":
                    self.counters.dead_seen += 1
                if row.post_action is not None and self._posts is not None:
                    self._posts.submit(
                        row.post_action,
                        item.key,
                        item.relpath,
                        item.size,
                        item.mtime_ns,
                        item.inode,
                    )
            await self._send_all(leased, send)

    def _lease(self, item: _Item, row: ClaimedRow) -> _Item:
        """Track a freshly leased item (before any await: a cancellation must release it)."""
        item.fence, item.attempts = row.fence, row.attempts
        item.lease_deadline = (
            time.monotonic() + self.config.lease - min(5.0, self.config.lease * 0.1)
        )
        self.in_flight[item.key] = item
        return item

    async def _send_all(self, items: list[_Item], send: MemoryObjectSendStream[_Item]) -> None:
        for item in items:
            if self.is_stopping():
                return  # the rest stay unstarted in in_flight and are released at the end
            try:
                send.send_nowait(item)  # no event-loop round trip while the buffer has room
            except anyio.WouldBlock:
                await send.send(item)

    async def _claim_waiting(
        self, send: MemoryObjectSendStream[_Item], *, until_idle: bool
    ) -> None:
        """Lease items waiting in the ledger: retries, items put back, items not in this scan."""
        cfg = self.config
        while not self.is_stopping():
            rows = await self.ledger.claim_waiting(cfg.job, self.owner, cfg.lease, cfg.claim_batch)
            leased: list[_Item] = []
            for row in sorted(rows, key=lambda r: (r.mtime_ns, r.relpath)):
                ihash = input_hash(cfg.identity, row.relpath, row.size, row.mtime_ns, b"")
                if cfg.identity == "content":
                    ihash = row.key
                item = _Item(row.key, ihash, row.relpath, row.size, row.mtime_ns, row.inode)
                if row.post_action and row.post_action.startswith("moved:"):
                    item.moved_to = row.post_action.removeprefix("moved:")
                leased.append(self._lease(item, row))
            await self._send_all(leased, send)
            if rows:
                continue
            if not until_idle:
                return
            if self.in_flight:
                # Our own items are still out: wait until one fails (it may need a retry) or
                # all are back, not for every commit.
                await self._wait_for_progress(self.config.lease / 4)
                continue
            if cfg.shared and await self.ledger.reap_stale_runners(cfg.job, self.me):
                continue
            due = await self.ledger.next_retry_at(cfg.job)
            if due is None:
                return
            wait = due - self.clock()
            if wait > 0:
                log.info("waiting %.1fs for the next retry", wait)
                await self._wait_for_progress(wait)

    # -- working ---------------------------------------------------------------------------------

    async def _worker(
        self,
        items: MemoryObjectReceiveStream[_Item],
        outcomes: MemoryObjectSendStream[tuple[_Item, Outcome]],
    ) -> None:
        """Handle items one after the other until the stream ends.

        One cancel scope per worker, not per item (a scope with a deadline costs ~14 us): the
        watchdog cancels it when the current item overruns its timeout or lease, and the
        worker records that failure and carries on in a fresh scope.
        """
        slot = _Slot()
        self._slots.append(slot)
        try:
            async with items:
                while True:
                    with anyio.CancelScope() as slot.scope:
                        if not await self._work(items, outcomes, slot):
                            return
                    item, slot.item = slot.item, None
                    if item is not None:  # the watchdog stopped this item
                        self._hand_over(outcomes, item, self._failure(item, slot.reason))
        finally:
            self._slots.remove(slot)

    async def _work(
        self,
        items: MemoryObjectReceiveStream[_Item],
        outcomes: MemoryObjectSendStream[tuple[_Item, Outcome]],
        slot: _Slot,
    ) -> bool:
        timeout = self.config.timeout
        yield_at = time.monotonic() + _YIELD_EVERY
        while True:
            try:
                # No event-loop round trip per item while items are waiting; but yield about
                # once a millisecond, so the ledger's replies (claims, commits) are picked up
                # promptly even when handlers never await anything that suspends.
                item = items.receive_nowait()
                if time.monotonic() >= yield_at:
                    await anyio.lowlevel.checkpoint()
                    yield_at = time.monotonic() + _YIELD_EVERY
            except anyio.WouldBlock:
                try:
                    item = await items.receive()
                except anyio.EndOfStream:
                    return False
            except anyio.EndOfStream:
                return False
            if self.stopping:
                continue  # left unstarted: released when the run ends
            slot.item, slot.started = item, time.monotonic()
            if timeout is not None and slot.started + timeout < self._watch_at:
                self._watch_wake.set()
            outcome = await self._attempt(item)
            slot.item = None
            self._hand_over(outcomes, item, outcome)

    def _hand_over(
        self,
        outcomes: MemoryObjectSendStream[tuple[_Item, Outcome]],
        item: _Item,
        outcome: Outcome,
    ) -> None:
        outcomes.send_nowait((item, outcome))
        self._outcomes_waiting += 1
        if self._outcomes_waiting >= self.config.commit_batch:
            self._group_full.set()

    async def _watchdog(self) -> None:
        """Cancel handlers that overrun their ``timeout`` or their lease (one timer in all)."""
        timeout = self.config.timeout
        idle = min(self.config.lease / 4, timeout if timeout is not None else math.inf)
        while True:
            now = time.monotonic()
            wake_at = now + idle
            for slot in self._slots:
                item = slot.item
                if item is None or slot.scope is None or slot.scope.cancel_called:
                    continue
                ends = slot.started + timeout if timeout is not None else math.inf
                if ends <= now:
                    slot.reason = f"TimeoutError: the handler ran over {timeout}s"
                    slot.scope.cancel()
                elif item.lease_deadline <= now:
                    slot.reason = "the lease ran out before the handler finished"
                    slot.scope.cancel()
                else:
                    wake_at = min(wake_at, ends, item.lease_deadline)
            self._watch_at = wake_at
            with anyio.move_on_after(wake_at - now):
                await self._watch_wake.wait()
            if self._watch_wake.is_set():
                self._watch_wake = anyio.Event()

    async def _attempt(self, item: _Item) -> Outcome:
        cfg = self.config
        item.started = True
        if item.attempts > cfg.max_attempts:
            return self._failure(
                item,
                f"the runner stopped during attempt {item.attempts - 1} of {cfg.max_attempts}",
                permanent=True,
            )
        moved: Path | None = None
        try:
            try:
                fd, st = open_regular(
                    self._dir_fd, item.relpath, follow_symlinks=cfg.follow_symlinks
                )
            except FileNotFoundError:
                if item.moved_to is None:
                    raise
                # The handler moved its input (ctx.move) before the run died: continue there.
                moved = Path(item.moved_to)
                fd, st = open_regular(None, os.fsencode(moved))
        except FileNotFoundError:
            return self._vanished(item, "the file disappeared before it could be handled")
        except OSError as exc:
            return self._failure(item, _error_text(exc), permanent=exc.errno is None)
        try:
            if cfg.identity != "path" and (
                st.st_size != item.size or st.st_mtime_ns != item.mtime_ns
            ):
                return self._vanished(
                    item, "the file changed after it was scanned; the new version is a new item"
                )
            ctx = TaskContext(
                entry=Entry(
                    cfg.source,
                    os.fsdecode(item.relpath),
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                    path=moved,
                ),
                key=item.key,
                input_hash=item.ihash,
                attempt=item.attempts,
                job=cfg.job,
                fence=item.fence,
                output_dir=cfg.output_dir,
                hooks=self,
                input_file=_Input(fd, st.st_size),
            )
            try:
                await self.handler(ctx)
            except PermanentError as exc:
                return self._failure(item, _error_text(exc), permanent=True, exc=exc)
            except Exception as exc:
                return self._failure(item, _error_text(exc), exc=exc)
            return Outcome(item.key, item.fence, "done", None, None, self._on_done)
        finally:
            os.close(fd)

    # -- what a TaskContext asks of its run (ContextHooks) -----------------------------------------

    def http_for(self, key: str) -> ItemHTTP:
        """A fresh HTTP view for one attempt of ``key``."""
        assert self._http_settings is not None
        return ItemHTTP(self._http_settings, key)

    async def record_move(self, ctx: TaskContext, destination: str) -> bool:
        """Record, under the item's lease, where ctx.move() is taking its input."""
        return await self.ledger.record_move(
            self.config.job, self.owner, ctx.key, ctx.fence, destination
        )

    def _item_log(self, item: _Item, logger: logging.Logger) -> ItemLogger:
        return ItemLogger(
            logger, {"job": self.config.job, "key": item.key, "input_hash": item.ihash}
        )

    def _failure(
        self,
        item: _Item,
        error: str,
        *,
        permanent: bool = False,
        exc: BaseException | None = None,
    ) -> Outcome:
        cfg = self.config
        dead = permanent or item.attempts >= cfg.max_attempts
        logger = self._item_log(item, log)
        logger.warning(
            "item %s attempt %d %s: %s",
            item.key,
            item.attempts,
            "failed for good" if dead else "failed",
            error,
            exc_info=exc if exc is not None and logger.isEnabledFor(logging.DEBUG) else None,
        )
        if dead:
            return Outcome(item.key, item.fence, "dead", error, None, cfg.on_dead.encode())
        delay = min(cfg.backoff_max, cfg.backoff * 2 ** (item.attempts - 1))
        delay *= 0.5 + self._random.random() / 2
        return Outcome(item.key, item.fence, "failed", error, self.clock() + delay)

    def _vanished(self, item: _Item, why: str) -> Outcome:
        self._item_log(item, log).info("item %s vanished: %s", item.key, why)
        return Outcome(item.key, item.fence, "vanished", why)

    # -- committing ------------------------------------------------------------------------------

    async def _committer(self, outcomes: MemoryObjectReceiveStream[tuple[_Item, Outcome]]) -> None:
        """Commit outcomes in groups: every ``commit_interval`` or ``commit_batch`` items.

        Workers hand outcomes over without waiting (``send_nowait``); the committer wakes once
        per group, not once per item.
        """
        cfg = self.config
        batch: list[tuple[_Item, Outcome]] = []
        try:
            async with outcomes:
                while True:
                    try:
                        batch.append(await outcomes.receive())
                    except anyio.EndOfStream:
                        break
                    if self._outcomes_waiting < cfg.commit_batch:
                        with anyio.move_on_after(cfg.commit_interval):
                            await self._group_full.wait()
                    closed = _drain(outcomes, batch, cfg.commit_batch)
                    self._outcomes_waiting = max(self._outcomes_waiting - len(batch), 0)
                    self._group_full = anyio.Event()
                    await self._commit(batch)
                    batch = []
                    if closed:
                        break
        finally:
            with anyio.CancelScope(shield=True):
                _drain(outcomes, batch, math.inf)
                if batch:
                    await self._commit(batch)
                if self._posts is not None:
                    self._posts.close()

    async def _commit(self, batch: list[tuple[_Item, Outcome]]) -> None:
        cfg = self.config
        lost = await self.ledger.commit_outcomes(cfg.job, self.owner, [o for _, o in batch])
        c = self.counters
        retry_due = False
        for item, outcome in batch:
            self.in_flight.pop(item.key, None)
            if item.key in lost:
                c.lost += 1
                self._item_log(item, log).warning(
                    "item %s: the lease was taken over by another runner; outcome %r not recorded",
                    item.key,
                    outcome.state,
                )
                continue
            state = outcome.state
            if state == "done":
                c.done += 1
                c.failed_keys.discard(item.key)
            elif state == "failed":
                c.failed += 1
                c.failed_keys.add(item.key)
                retry_due = True
            elif state == "dead":
                c.failed += item.attempts <= cfg.max_attempts
                c.dead += 1
                c.failed_keys.discard(item.key)
            elif state == "vanished":
                c.vanished += 1
                c.failed_keys.discard(item.key)
            if outcome.post_action is not None and self._posts is not None:
                self._posts.submit(
                    outcome.post_action,
                    item.key,
                    item.relpath,
                    item.size,
                    item.mtime_ns,
                    item.inode,
                )
        if retry_due or not self.in_flight:
            self._wake()  # the claimer waits for a retry to schedule or for the last item


def _drain(
    stream: MemoryObjectReceiveStream[tuple[_Item, Outcome]],
    into: list[tuple[_Item, Outcome]],
    limit: float,
) -> bool:
    """Move waiting outcomes into ``into`` (up to ``limit``); return whether the stream ended."""
    while len(into) < limit:
        try:
            into.append(stream.receive_nowait())
        except anyio.WouldBlock:
            return False
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return True
    return False


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful exception of a task group's failure (cancellation aside)."""
    cancelled = anyio.get_cancelled_exc_class()
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    real = [e for e in flat if not isinstance(e, cancelled)]
    if len(real) == 1:
        return real[0]
    if not real:
        return flat[0]
    return group
