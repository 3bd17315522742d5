"""One run of a batch: the lifecycle around the pipeline, and the state its parts share.

    scanner → Claimer → ItemQueue → WorkerPool → Outbox → Committer → PostActions

Everything here belongs to one :class:`Run`, made per ``Batch.run()`` or ``Batch.watch()``
call: no module-level mutable state, nothing shared between runs or items.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio

from ._claimer import Claimer
from ._committer import Committer
from ._config import BatchConfig
from ._context import TaskContext
from ._effects import remove_stale_temp_files
from ._exceptions import LockLostError
from ._http import HTTPSettings, SharedClient
from ._ledgers import LedgerLike, open_ledger
from ._postactions import PostActions
from ._procinfo import this_process
from ._queues import ItemQueue, LeasedItem, Outbox
from ._report import Counters, Report, Statistics
from ._scanner import Scanner
from ._workers import HandlerAborted, WorkerPool, error_text

__all__ = ["Handler", "Mode", "Run", "unwrap_group"]

log = logging.getLogger("asyncbatch")
Handler = Callable[[TaskContext], Awaitable[Any]]
Mode = Literal["run", "watch"]


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
        #: Leased and not yet committed, by key: released if the run ends early.
        self.in_flight: dict[str, LeasedItem] = {}
        self.stop_requested = anyio.Event()
        self.stopping = False
        self.holds_lock = False
        self.scanner = Scanner(
            config.source,
            rules=config.rules,
            recursive=config.recursive,
            follow_symlinks=config.follow_symlinks,
        )
        self.dir_fd = -1
        self._progress = anyio.Event()
        self._room = anyio.Event()
        self._http = SharedClient(http)
        self._http_settings: HTTPSettings | None = None
        self._ledger: LedgerLike | None = None
        self._work_scope = anyio.CancelScope()
        self._queue: ItemQueue | None = None
        self._workers: WorkerPool | None = None
        self._posts: PostActions | None = None

    # -- public surface (through Batch) ------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking new items; in-flight ones get ``grace`` seconds to finish."""
        self.stop_requested.set()

    def stop_now(self) -> None:
        """Stop at once: in-flight handlers are cancelled and their items released."""
        self.stop_requested.set()
        self.stopping = True
        self._work_scope.cancel()

    def statistics(self) -> Statistics:
        """A snapshot of the counters."""
        return self.counters.snapshot(len(self.in_flight))

    @property
    def ledger(self) -> LedgerLike:
        """The open ledger (only while executing)."""
        assert self._ledger is not None, "the run is not executing"
        return self._ledger

    @property
    def http_settings(self) -> HTTPSettings:
        """The HTTP settings shared by the run's items (only while executing)."""
        assert self._http_settings is not None, "the run is not executing"
        return self._http_settings

    @property
    def workers(self) -> WorkerPool:
        """The worker pool (only while executing)."""
        assert self._workers is not None, "the run is not executing"
        return self._workers

    @property
    def posts(self) -> PostActions:
        """The post-commit action queue (only while executing)."""
        assert self._posts is not None, "the run is not executing"
        return self._posts

    # -- lifecycle ---------------------------------------------------------------------------------

    async def execute(self) -> Report:
        """Open the ledger, take the lock, run the pipeline, release everything, report."""
        cfg = self.config
        ledger = await open_ledger(cfg.state, durability=cfg.durability, clock=self.clock)
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
                await self._remove_stale_temp_files()
                self.dir_fd = os.open(cfg.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    await self._pipeline()
                finally:
                    os.close(self.dir_fd)
                    await self._http.aclose()
                status = "stopped" if self.stopping else "ok"
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    status = "cancelled"
                elif isinstance(exc, HandlerAborted):
                    status = f"error: {exc}"
                else:
                    status = f"error: {error_text(exc)}"
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await self._release(run_id, status)
            counts = await ledger.counts(cfg.job)
            report = self.counters.report(
                cfg.job,
                counts,
                stopped=self.stopping,
                mode=self.mode,
                post_failed=self._posts.failed if self._posts is not None else 0,
            )
            log.info("%s", report)
            return report
        finally:
            await ledger.close()
            self._ledger = None

    async def _remove_stale_temp_files(self) -> None:
        """Remove temp files that killed runs left where this run writes.

        The output directory always. An archive directory only when it is on another
        filesystem than the source, the one case in which a move writes a temp file there (an
        archive only grows: it is not listed on every run for nothing). And the directories
        ``ctx.move()`` of an unfinished item was moving its input to: a move across
        filesystems that a kill interrupted leaves a partial copy there.
        """
        cfg = self.config
        if cfg.output_dir is not None:
            await remove_stale_temp_files(cfg.output_dir)
        source_dev = os.stat(cfg.source).st_dev
        for action in (cfg.on_done, cfg.on_dead):
            if action.directory is not None and os.stat(action.directory).st_dev != source_dev:
                await remove_stale_temp_files(action.directory)
        moved_to = {os.path.dirname(p) for p in await self.ledger.move_destinations(cfg.job)}
        for directory in sorted(moved_to):
            await remove_stale_temp_files(directory, recursive=False)

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
        queue = ItemQueue(2 * cfg.claim_batch + cfg.concurrency)
        outbox = Outbox(cfg.commit_batch)
        self._posts = PostActions(cfg)
        self._workers = WorkerPool(self, queue, outbox)
        committer = Committer(self, outbox)
        claimer = Claimer(self, queue)
        self._queue = queue
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._heartbeat)
                background.start_soon(self.workers.watchdog)
                background.start_soon(self._stop_after_grace)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.posts.serve)
                    tg.start_soon(committer.serve)
                    try:
                        with self._work_scope:
                            async with anyio.create_task_group() as workers:
                                for _ in range(cfg.concurrency):
                                    workers.start_soon(self.workers.worker)
                                workers.start_soon(claimer.serve)
                    finally:
                        outbox.close()  # the committer commits what is left, then stops
                background.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    # -- heartbeat and stop ------------------------------------------------------------------------

    def lease_margin_deadline(self) -> float:
        """Seconds from now until a lease taken now must be given up locally."""
        return self.config.lease - min(5.0, self.config.lease * 0.1)

    async def _heartbeat(self) -> None:
        cfg = self.config
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
            deadline = began + self.lease_margin_deadline()
            for item in self.in_flight.values():
                item.lease_deadline = deadline

    async def _stop_after_grace(self) -> None:
        await self.stop_requested.wait()
        self.stopping = True
        self.wake()
        self.made_room()
        if self._queue is not None:
            self._queue.close()
        log.info("stopping: no new items; in-flight items get %.0fs to finish", self.config.grace)
        await anyio.sleep(self.config.grace)
        self._work_scope.cancel()

    @property
    def max_in_flight(self) -> int:
        """How many items may be leased and not yet committed at once."""
        cfg = self.config
        return 3 * cfg.claim_batch + cfg.concurrency + 4 * cfg.commit_batch

    async def wait_for_room(self) -> None:
        """Wait while :attr:`max_in_flight` items are leased and not yet committed."""
        while len(self.in_flight) >= self.max_in_flight and not self.stopping:
            if self._room.is_set():
                self._room = anyio.Event()
            await self._room.wait()

    def made_room(self) -> None:
        """Called by the committer after it retired items."""
        self._room.set()

    def wake(self) -> None:
        """Wake the claimer waiting in :meth:`wait_for_progress`."""
        self._progress.set()
        self._progress = anyio.Event()

    async def wait_for_progress(self, seconds: float) -> None:
        """Wait until :meth:`wake` or ``seconds`` pass."""
        with anyio.move_on_after(seconds):
            await self._progress.wait()


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first meaningful exception of a task group's failure (cancellation aside).

    Several tasks may fail at once for one cause (every worker's handler raising the same
    error): the first is raised, with the others named in a note.
    """
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
    if not real:
        return flat[0]
    first, others = real[0], real[1:]
    if others:
        first.add_note(f"{len(others)} more at the same time: {error_text(others[0])}")
    return first
