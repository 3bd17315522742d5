"""One run of a batch: the lifecycle around the pipeline.

:class:`Run` opens the ledger, joins the job (checks it and takes its lock, or joins it as a
shared runner: one ledger transaction), starts the pipeline (claimer, workers, committer,
post-commit actions, heartbeat, watchdog), and releases whatever is left when it ends,
however it ends. The parts share a :class:`~.state.RunState`, nothing
more; everything belongs to one run: no module-level mutable state, nothing shared between runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .._config import BatchConfig
from .._context import TaskContext
from .._effects.files import ABANDONED_AFTER, remove_stale_temp_files
from .._errors import error_text, unwrap_group
from .._exceptions import LedgerError, LockLostError
from .._http.client import HTTPSettings, SharedClient
from .._ledger import (
    Heartbeat,
    Ledger,
    LedgerErrors,
    RunEnd,
    RunStart,
    RunTotals,
    decode_secret,
    open_ledger,
)
from .._procinfo import this_process
from .._report import EVENTS, Counters, Events, Report, Statistics
from .._scanner import ScanInfo, Scanner
from .._sources.base import Lister, SourceHandle
from .._sources.url import ObjectURL
from .claimer import Claimer
from .committer import Committer
from .observation import RunObservation
from .postactions import PostActions
from .queues import ItemQueue, ItemState, Outbox
from .readiness import count_not_ready
from .reconcile import reconcile
from .recorder import Recorder
from .shared import gone_by, live_totals, shared_report
from .source import SourceDir
from .state import RunState, reap_gone_runners
from .workers import HandlerAborted, WorkerPool

if TYPE_CHECKING:
    from .._sources.store import ObjectStores

__all__ = ["Handler", "Mode", "Run"]

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
        metrics: Recorder | None = None,
        started_at: float | None = None,
    ) -> None:
        self.config = config
        self.started_at = started_at
        self.handler = handler
        self.mode = mode
        self.clock = clock
        self.owner = os.urandom(
            16
        ).hex()  # (as uuid4().hex: 32 hex digits; uuid costs 2 ms to import)
        self.me = this_process()
        self.counters = Counters()
        self.holds_lock = False
        self._http = SharedClient(http)
        self._state: RunState | None = None
        self._stop_requested = anyio.Event()
        self._stop_signal: int | None = None
        self._work_scope = anyio.CancelScope()
        #: While the run waits to join the job (see :meth:`_start_unless_stopped`).
        self._joining: anyio.CancelScope | None = None
        self._posts: PostActions | None = None
        self._queue: ItemQueue | None = None
        self._workers: WorkerPool | None = None
        self._scanner: Lister | None = None
        self.metrics = metrics
        #: What health and metrics read (``time.monotonic()`` times): when the run began, when
        #: its lock (or runner record) was last renewed, since when a heartbeat waits for the
        #: ledger, whether the lock was lost; the errors of its ledger once open.
        self.began = time.monotonic()
        self.renewed_at: float | None = None
        self.beat_since: float | None = None
        self.lock_lost = False
        self.ledger_errors: LedgerErrors | None = None
        #: A shared run: the highest of its counts (as :meth:`totals` has them) observed so
        #: far, by name (see :meth:`events`).
        self._highest: dict[str, int] = {}
        self.ledger_failed = False
        self.lock_takeovers = 0

    # -- public surface (through Batch) ------------------------------------------------------------

    def request_stop(self, signum: int | None = None) -> None:
        """Stop taking new items; in-flight ones get ``grace`` seconds to finish, and their
        ``ctx.on_stop`` callbacks are called with ``signum`` (the signal that asked, or
        ``None``). Only the first request counts."""
        if self._stop_requested.is_set():
            return
        self._stop_signal = signum
        self._stop_requested.set()
        if self._joining is not None:  # waiting to join the job: give up
            self._joining.cancel()
        if self._workers is not None:
            self._workers.stop_requested(signum)

    def stop_now(self) -> None:
        """Stop at once: in-flight handlers are cancelled and their items released."""
        self.request_stop()
        if self._state is not None:
            self._state.stop()
        self._work_scope.cancel()

    @property
    def stopping(self) -> bool:
        """Whether the run was stopped before its end."""
        return self._state is not None and self._state.stopping

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for (the run may still be finishing its items)."""
        return self._stop_requested.is_set() or self.stopping

    def statistics(self) -> Statistics:
        """A snapshot of the counters (of a shared run, as its report would count them now:
        see :meth:`totals`)."""
        state = self._state
        stats = self.counters.statistics(0 if state is None else len(state.in_flight))
        self._waiting_now(stats)
        if state is not None and self.config.shared:
            live_totals(state, stats)
            stats.scanned = stats.scanned or gone_by(state) is not None
        return stats

    def totals(self) -> RunTotals:
        """The run's counts now: what metrics and the heartbeat (hence ``status``) say. A
        shared run's count the job's listing as its report would now (see
        :func:`~.shared.live_totals`): ``seen`` is the files the listing it goes by found,
        not what this runner listed (or 0: it did not list)."""
        totals = self.counters.totals()
        self._waiting_now(totals)
        state = self._state
        if state is not None and self.config.shared:
            live_totals(state, totals)
        return totals

    def _waiting_now(self, t: RunTotals) -> None:
        """A watch's files not ready yet in ``t`` (a snapshot of its counts) as they stand
        now, not at its last poll or look: its claim of many files waits for room in the
        queue (seconds), and files settle meanwhile (20 files settled, registered and 8 done
        were "20 files not settled yet"). Those settled and seen unchanged long enough whose
        look has not come yet are not registered yet (nor seen: the look that takes them
        counts them)."""
        state = self._state
        if state is None or state.waiting_now is None:
            return
        by_rule = state.waiting_now(time.monotonic())
        count_not_ready(t, by_rule)
        t.unregistered += by_rule.get("ready", 0)

    def events(self, totals: RunTotals) -> Events:
        """The run's outcomes as the metrics' counters export them: counted as they happened,
        never taken back (see :class:`~asyncbatch._report.Events`). A shared run counts the
        job's listing as its report would (:meth:`totals`, given): its seen, done before and
        dead before are the highest its counts were when observed (a newer listing may find
        fewer); its other outcomes at least that too."""
        events = self.counters.events.copy()
        if not self.config.shared:
            return events
        high = self._highest
        for name in EVENTS:
            high[name] = max(high.get(name, 0), getattr(totals, name))
            own = 0 if name in ("seen", "done_before", "dead_before") else getattr(events, name)
            setattr(events, name, max(own, high[name]))
        return events

    @property
    def in_flight(self) -> int:
        """Items leased to this run and not committed yet."""
        return 0 if self._state is None else len(self._state.in_flight)

    @property
    def queued(self) -> int:
        """Leased items waiting for a worker."""
        return 0 if self._queue is None else len(self._queue)

    @property
    def handlers_running(self) -> int:
        """Workers handling an item right now."""
        return 0 if self._workers is None else self._workers.busy

    @property
    def source_problem(self) -> str | None:
        """Why the source directory cannot be used now (a watch waits for it), or ``None``."""
        return None if self._state is None else self._state.source.problem

    @property
    def last_scan(self) -> ScanInfo | None:
        """The run's last finished scan (or poll)."""
        return None if self._scanner is None else self._scanner.last

    def oldest_waiting(self) -> float | None:
        """When (``time.monotonic()``) the oldest item waiting to be started began waiting:
        scanned files not claimed yet (since their scan ended), and leased items waiting for
        a worker (since they were queued); ``None`` if none waits."""
        times = [
            t
            for t in (
                None if self._state is None else self._state.backlog_since,
                None if self._queue is None else self._queue.oldest_queued(),
            )
            if t is not None
        ]
        return min(times) if times else None

    def observe(self) -> RunObservation:
        """What this run has observed, now (for health and metrics)."""
        cfg, errors, state = self.config, self.ledger_errors, self._state
        totals = self.totals()
        return RunObservation(
            mode=self.mode,
            job=cfg.job,
            shared=cfg.shared,
            source=str(cfg.source),
            lease=cfg.lease,
            poll=cfg.poll,
            began=self.began,
            renewed_at=self.renewed_at,
            beat_since=self.beat_since,
            lock_lost=self.lock_lost,
            lock_takeovers=self.lock_takeovers,
            ledger=None if errors is None else dataclasses.replace(errors),
            ledger_failed=self.ledger_failed,
            source_problem=self.source_problem,
            last_scan=self.last_scan,
            in_flight=self.in_flight,
            queued=self.queued,
            handlers_running=self.handlers_running,
            oldest_waiting=self.oldest_waiting(),
            stop_requested=self.stop_requested,
            counts=totals,
            events=self.events(totals),
            leases_lost=self.counters.leases_lost,
            reaped=self.counters.reaped,
            lister=state is not None and state.lister_fence is not None,
            listing=None if state is None else state.listing_role,
            object_requests=self._object_requests(),
        )

    def _object_requests(self) -> dict[str, int]:
        state = self._state
        return {} if state is None or state.objects is None else dict(state.objects.requests)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def execute(self) -> Report:
        """Open the ledger, join the job, run the pipeline, release everything, report."""
        cfg = self.config
        source = _source_of(cfg, waits=self.mode == "watch")
        objects: ObjectStores | None = source.get("objects")
        if objects is not None:  # before the state is made or joined: nothing made for a typo
            from .._sources.objects import check_places

            await check_places(objects, _object_places(cfg), watching=self.mode == "watch")
        ledger = await open_ledger(
            cfg.state,
            durability=cfg.durability,
            clock=self.clock,
            outage_timeout=cfg.ledger_timeout,
        )
        self.ledger_errors = ledger.errors
        try:
            state = RunState(
                config=cfg,
                ledger=ledger,
                owner=self.owner,
                me=self.me,
                clock=self.clock,
                counters=self.counters,
                started_at=self.started_at,
                stop_requested=self._stop_requested,
                metrics=self.metrics,
                **source,
            )
            self._state = state
            await self._joined(state)
            counts = _settled(state.finished_counts) or await ledger.counts(cfg.job)
            report = self.counters.report(
                cfg.job,
                counts,
                stopped=state.stopping,
                mode=self.mode,
                post_failed=self._posts.failed if self._posts is not None else 0,
            )
            log.info("%s", report)
            return report
        except LedgerError:
            self.ledger_failed = True
            raise
        finally:
            await ledger.close()

    async def _start(self, ledger: Ledger) -> int:
        """Join the job (its check, the lock or a shared runner's record, the history row: one
        ledger transaction); say what it took over or changed; return the history row's id."""
        cfg = self.config
        started = await ledger.start_runner(
            RunStart(
                job=cfg.job,
                owner=self.owner,
                me=self.me,
                ttl=cfg.lease,
                shared=cfg.shared,
                mode=self.mode,
                identity=cfg.identity,
                settings=cfg.job_settings,
                ready_given=cfg.ready is not None,
            )
        )
        self.holds_lock = not cfg.shared
        self.renewed_at = time.monotonic()
        if started.stale is not None:
            self.lock_takeovers += 1
            log.warning(
                "took over the stale lock of job %r held by pid %s on %s",
                cfg.job,
                started.stale.pid,
                started.stale.host,
            )
        if started.changed:
            log.warning(
                "job %r: its scan rules changed since its last run (%s); recorded in its history",
                cfg.job,
                "; ".join(started.changed),
            )
        return started.run_id

    async def _start_unless_stopped(self, ledger: Ledger) -> int | None:
        """:meth:`_start`, given up (``None``) when a stop is requested before it joined the
        job. Joining waits for a ledger another process holds (up to the busy timeout, 30 s;
        a PostgreSQL outage, ``ledger_timeout``): a SIGTERM or ``stop()`` meanwhile waited it
        out, to fail then with the ledger's error (exit 69, not 143). A transaction under way
        is shielded: one that went through returns, and is released as usual."""
        with anyio.CancelScope() as scope:
            self._joining = scope
            try:
                if self._stop_requested.is_set():
                    scope.cancel()
                return await self._start(ledger)
            finally:
                self._joining = None
        return None

    async def _joined(self, state: RunState) -> None:
        """Join the job, run the pipeline, and release everything (a history row)."""
        cfg, ledger = self.config, state.ledger
        # The ledger's secret, read (and checked: a value that is not hex is refused) before
        # the run writes anything.
        secret = decode_secret(await ledger.meta("secret"))
        # Nothing is held if joining raises (one transaction); once it returned, the release
        # below is certain: no await, hence no cancellation, comes between.
        run_id = await self._start_unless_stopped(ledger)
        if run_id is None:  # stopped before it joined the job: nothing to do, nothing held
            state.stop()
            return
        status = "error"
        try:
            await reap_gone_runners(ledger, cfg.job, self.me, self.counters, orphans=True)
            http = HTTPSettings(
                shared=self._http,
                secret=secret,
                job=cfg.job,
                unsafe_methods=cfg.unsafe_methods,
                retries=cfg.http_retries,
                backoff=cfg.http_backoff,
                backoff_max=cfg.http_backoff_max,
            )
            await self._remove_stale_temp_files(ledger)
            state.source.open()
            try:
                await self._pipeline(state, http, run_id)
            finally:
                state.source.close()
                await self._http.aclose()
            status = "ok"
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
                await self._release(state, run_id, status)

    async def _remove_stale_temp_files(self, ledger: Ledger) -> None:
        """Remove temp files that killed runs left where this run writes.

        The output directory always. An archive directory only when it is on another
        filesystem than the source, the one case in which a move writes a temp file there (an
        archive only grows: it is not listed on every run for nothing). And the directories
        ``ctx.move()`` of an unfinished item was moving its input to: a move across
        filesystems that a kill interrupted leaves a partial copy there.
        """
        cfg = self.config
        old = ABANDONED_AFTER  # another host's (or pid namespace's), untouched for a day
        if isinstance(cfg.output_dir, Path):
            await remove_stale_temp_files(cfg.output_dir, older_than=old)
        if isinstance(cfg.source, Path):  # an object store has no temp files: one PUT each
            source_dev = os.stat(cfg.source).st_dev
            for action in (cfg.on_done, cfg.on_dead):
                where = action.directory
                if isinstance(where, Path) and os.stat(where).st_dev != source_dev:
                    await remove_stale_temp_files(where, older_than=old)
        moved_to = {os.path.dirname(p) for p in await ledger.move_destinations(cfg.job)}
        for directory in sorted(moved_to):
            await remove_stale_temp_files(directory, recursive=False, older_than=old)

    async def _release(self, state: RunState, run_id: int, status: str) -> None:
        cfg, ledger = self.config, state.ledger
        leftovers = [(i.key, i.fence) for i in state.in_flight.values()]
        # Given back with the runner's records if releasing them here fails (a full disk, an
        # outage): a runner's leases never outlive its records, nor its lock (if that fails
        # too, both stay, and the next run takes over a dead runner's leases at once).
        unreleased = leftovers
        try:
            await ledger.release_items(cfg.job, self.owner, leftovers)
            unreleased = []
            # What became of the files this run leaves, as the ledger has them now: also when
            # it ends on an error (a lost lease, say: other runners may have finished them).
            state.given_back = [key for key, _ in leftovers]
            state.in_flight.clear()
            await reconcile(state)
            if cfg.shared:
                try:
                    await shared_report(state, watching=self.mode == "watch")
                except LedgerError as e:
                    log.warning("the report counts the job's listing as it knew it (%s)", e)
        finally:
            state.in_flight.clear()
            c = self.counters
            if status == "ok":
                post_failed = self._posts.failed if self._posts is not None else 0
                ended = c.report(
                    cfg.job, {}, stopped=state.stopping, mode=self.mode, post_failed=post_failed
                )
                status = ended.exit_status
                if status == "failed":  # history says what failed
                    status += ended.failed_because()
            end = RunEnd(
                job=cfg.job,
                owner=self.owner,
                holds_lock=self.holds_lock,
                run_id=run_id,
                totals=c.totals(),
                exit_status=status,
                lister=state.listed,
                leases=unreleased,
            )
            await ledger.release_runner(end)

    async def _pipeline(self, state: RunState, http: HTTPSettings, run_id: int) -> None:
        cfg = self.config
        queue = ItemQueue()  # kept short by the claimer (see claimer.Lookahead)
        outbox = Outbox(cfg.commit_batch)
        self._queue = queue
        self._posts = posts = PostActions(cfg, state.objects)
        self._workers = workers = WorkerPool(state, queue, outbox, handler=self.handler, http=http)
        if self._stop_requested.is_set():
            workers.stop_requested(self._stop_signal)
        committer = Committer(state, outbox, posts)
        scanner = self._scanner = _lister_of(state)
        claimer = Claimer(state, queue, scanner=scanner, posts=posts, mode=self.mode, outbox=outbox)
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._heartbeat, state, run_id)
                background.start_soon(workers.watchdog)
                background.start_soon(self._stop_after_grace, state, queue)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(posts.serve)
                    tg.start_soon(committer.serve)
                    await self._work(workers, claimer, outbox)
                background.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    async def _work(self, workers: WorkerPool, claimer: Claimer, outbox: Outbox) -> None:
        """The claimer and the workers, until the claimer is done and the queue empty (or a
        stop past its grace cancels them); then the outbox closes: the committer commits
        what is left, and stops."""
        try:
            with self._work_scope:
                async with anyio.create_task_group() as work:
                    for _ in range(self.config.concurrency):
                        work.start_soon(workers.worker)
                    work.start_soon(claimer.serve)
        finally:
            outbox.close()

    # -- heartbeat and stop ------------------------------------------------------------------------

    async def _heartbeat(self, state: RunState, run_id: int) -> None:
        cfg = self.config
        # The local deadline of this runner's leases as the last heartbeat renewed them: a
        # heartbeat that ends past it came late (the runner was suspended, or its event loop
        # stalled), and what it finds taken over was taken from a lease that ran out.
        renewed_until = state.lease_deadline()
        while True:
            await state.until_beat_due(cfg.lease / 4)
            deadline = state.lease_deadline()  # before the call: the lease starts counting then
            beat = Heartbeat(
                job=cfg.job,
                owner=self.owner,
                ttl=cfg.lease,
                leases=[(i.key, i.fence) for i in state.in_flight.values()],
                holds_lock=self.holds_lock,
                run_id=run_id,
                totals=self.totals(),
                lister=state.lister_fence,
            )
            self.beat_since = began = time.monotonic()
            renewal = await state.ledger.heartbeat(beat)
            self.beat_since = None
            late = time.monotonic() > renewed_until
            if beat.lister is not None and not renewal.lister and renewal.alive:
                state.lose_listing_role()
                # Handed over to a later run (this runner had nothing left to list: see
                # SharedRun), not lost for heartbeats that came late.
                if state.lister_idle and not late:
                    log.info(
                        "the listing role of job %r went to a runner started after the last "
                        "listing began: it lists the source again",
                        cfg.job,
                    )
                else:
                    log.warning(
                        "the listing role of job %r was taken over by another runner (this "
                        "one's heartbeats came late: was it suspended?); it stops listing",
                        cfg.job,
                    )
            if not renewal.alive:
                self.lock_lost = True
                raise LockLostError(
                    f"job {cfg.job!r}: this runner's lock or liveness record is no longer its "
                    "own (taken over by another runner after it was suspended longer than the "
                    "lease, or removed by 'asyncbatch unlock --force'); it stopped"
                )
            # A lease not renewed is lost only for an item whose attempt has not finished: one
            # whose outcome was committed while the heartbeat was on its way is no longer
            # running, and the committer reports a refused outcome itself.
            in_flight, lost = state.in_flight, 0
            for key, fence in beat.leases:
                item = in_flight.get(key)
                if item is None or item.fence != fence:
                    continue
                if key in renewal.lost and item.state is not ItemState.FINISHED:
                    item.lose()
                    lost += 1
                else:
                    item.lease_deadline = deadline
            self.renewed_at = began  # what it renewed counts from before the call
            renewed_until = deadline
            if lost:
                self.counters.leases_lost += lost
                log.warning(
                    "%d leases of this runner were taken over by others (its heartbeats came "
                    "late: was it suspended?); it leaves those items to them",
                    lost,
                )
            state.beat_ended()

    async def _stop_after_grace(self, state: RunState, queue: ItemQueue) -> None:
        await self._stop_requested.wait()
        state.stop()
        queue.close()
        log.info("stopping: no new items; in-flight items get %.0fs to finish", self.config.grace)
        await anyio.sleep(self.config.grace)
        self._work_scope.cancel()


def _source_of(cfg: BatchConfig, *, waits: bool) -> dict[str, Any]:
    """The run's source handle, and its object-store clients when a location is ``s3://``
    (made here only: a run over directories never loads obstore). ``waits``: whether the run
    waits for a source directory that is gone (a watch)."""
    places = _object_places(cfg)
    if not places:
        assert isinstance(cfg.source, Path)
        return {"source": SourceDir(cfg.source, waits=waits)}
    from .._sources.objects import ObjectSource
    from .._sources.store import ObjectStores

    objects = ObjectStores(outage_timeout=cfg.ledger_timeout)
    for _, _, url, _ in places:  # each bucket's client now: a setting it refuses stops the
        objects.bucket(url.bucket)  # run here, not every item that writes an output
    if isinstance(cfg.source, ObjectURL):
        source: SourceHandle = ObjectSource(cfg.source, objects)
    else:
        source = SourceDir(cfg.source, waits=waits)
    return {"source": source, "objects": objects}


def _object_places(cfg: BatchConfig) -> list[tuple[str, str, ObjectURL, bool]]:
    """The run's ``s3://`` places: ``(setting, value as given, url, is_source)``."""
    places: list[tuple[str, str, ObjectURL, bool]] = []
    if isinstance(cfg.source, ObjectURL):
        places.append(("source", str(cfg.source), cfg.source, True))
    if isinstance(cfg.output_dir, ObjectURL):
        places.append(("output_dir", str(cfg.output_dir), cfg.output_dir, False))
    for name, action in (("on_done", cfg.on_done), ("on_dead", cfg.on_dead)):
        if isinstance(action.directory, ObjectURL):
            places.append((name, str(action), action.directory, False))
    return places


def _lister_of(state: RunState) -> Lister:
    """What lists the source: a directory's scanner, or a bucket prefix's lister."""
    cfg = state.config
    if isinstance(cfg.source, ObjectURL):
        from .._sources.objects import ObjectLister

        assert state.objects is not None
        return ObjectLister(
            cfg.source,
            state.objects.bucket(cfg.source.bucket),
            rules=cfg.rules,
            recursive=cfg.recursive,
            ready=cfg.readiness,
        )
    return Scanner(
        cfg.source,
        rules=cfg.rules,
        recursive=cfg.recursive,
        follow_symlinks=cfg.follow_symlinks,
        ready=cfg.readiness,
    )


def _settled(counts: dict[str, int] | None) -> dict[str, int] | None:
    """The counts a shared run found its job finished by, if nothing was left to do then
    (nothing pending, running or failed): its report counts them instead of reading every
    item again (what is settled stays so but for another run's or the operator's doing);
    else ``None``."""
    if counts is None or counts["pending"] + counts["running"] + counts["failed"]:
        return None
    return counts
