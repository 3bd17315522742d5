"""Runners sharing a job (``shared=True``): one lists the source, every one claims.

Listing is a role, held under a lease in the ledger (:class:`~asyncbatch._ledger.Listing`),
fenced like an item's lease and renewed by the heartbeat. Its holder lists the source and
queues the files in the ledger, in batches (``Ledger.queue_listed``); every runner, the
holder too, takes queued files and registers them leased to itself in one transaction
(``Claimer.take_queued``: ``SKIP LOCKED`` on PostgreSQL; a shared item is written as often
as an unshared one), then leases waiting items (``Claimer.claim_waiting``: retries, items
given back). When the holder dies or stalls past the lease, another runner takes the role
over and lists again from scratch (dropping what the last listing left queued): nothing is
lost. A watching holder registers what it finds as waiting items (``register_listed``).

A ``run()`` goes by a listing that began when it started or later: one that began before
cannot have found the files settled since. A run started after the current listing began
goes by the next one, which it makes itself (or a runner as new does), taking the role over
from a holder done with the old one (``Ledger.take_listing``'s ``fresh_since``; a holder
still listing is waited for). It lists once and ends when the job is finished: the listing
it goes by is complete (``Listing.complete``), and no item of the job is pending, leased or
waiting for a retry (``wait=False``: none it could lease now). A ``watch()``'s holder
watches the source (events and polls) and registers what turns up; the others wait for new
waiting items (the role's ``registered`` count grows), their retries, or the role. Each full
scan of a watching holder is a listing too (without a start: it counts no files of the job),
which a ``run()`` beside it goes by: the first to begin after the run looked at the role.

The report of a shared run counts the job's listing: ``seen`` is the files it found; this
runner's own outcomes count as usual, and ``done_before`` (``dead_before``) the rest of those
the ledger had finished when they were listed and those other runners finished since, each
file once; its files not ready yet (not settled yet, ...) are those the listing left out,
whichever runner made it (``Listing.not_ready``; see :func:`shared_report`), those a runner
found changed after the listing queued them and not ready on a look again among them (see
:meth:`SharedRun.look_again_changed`). A run under way
counts it the same way in what it says of itself (statistics, metrics, its heartbeat's
counts), from what it last read of the role and without counting the job's items (see
:func:`live_totals`).

Made per run by the claimer; nothing here outlives it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

import anyio

from .. import _failpoints as failpoints
from .._exceptions import LedgerError
from .._ledger import Listing
from .._ledger.types import NOT_READY, NOT_READY_KEPT, RunTotals
from .._report import Counters
from .._scanner import ready_ns, split
from .state import RunState, reap_gone_runners

if TYPE_CHECKING:
    from .claimer import Claimer
    from .queues import LeasedItem

__all__ = [
    "NO_TWINS",
    "REGISTER_BATCH",
    "RELISTS",
    "SHARED_POLL",
    "SharedRun",
    "TwinEnds",
    "count_listing",
    "finished_twins",
    "gone_by",
    "live_totals",
    "shared_report",
]

log = logging.getLogger("asyncbatch")

#: How many times a ``run()`` asks for the job to be listed again, at most, for files left
#: unhandled by a twin's attempt that vanished (see ``SharedRun._list_again``).
RELISTS = 3
#: Listed files registered per statement.
REGISTER_BATCH = 2048
#: Seconds between looks at the ledger for new waiting items while a runner has none (and
#: the ledger does not announce them: SQLite).
SHARED_POLL = 0.1
#: Seconds between looks at the held items, a retry and the role, while waiting for them.
HELD_POLL = 1.0


class TwinEnds(NamedTuple):
    """How the items of a listing's twins (files not queued for the bytes of one it queued)
    ended, in files: ``done``, ``dead``, and ``unfinished`` (``vanished`` among them: the file
    queued in their place vanished, and none of them was handled)."""

    done: int = 0
    dead: int = 0
    unfinished: int = 0
    vanished: int = 0


#: No twins (or none known).
NO_TWINS = TwinEnds()


class SharedRun:
    """The claimer's work when runners share a job: the listing role, and claiming."""

    def __init__(self, claimer: Claimer) -> None:
        self.claimer = claimer
        self.run: RunState = claimer.run
        self.config = claimer.config
        #: The listing this run goes by: it ends once that one is complete (and the job
        #: finished); ``None`` until the role was first looked at.
        self.target: int | None = None
        self._role_seen = anyio.Event()
        #: Whether the ledger wakes this run when waiting items are registered (``None``:
        #: not asked yet; ``False``: it cannot, and is not asked again).
        self._notified: bool | None = None
        #: Set when a look at the ledger found the listing role free.
        self._role_free = anyio.Event()
        #: The keys a listing under way queued, with identity "content" (see :meth:`_register`),
        #: and the files it did not queue for having the bytes of one it did, by key.
        self._queued_keys: set[str] | None = None
        self._twins: dict[str, int] = {}
        #: How many times this run asked for the job to be listed again (see _list_again).
        self._relisted = 0
        #: When this run started (the ledger's clock, as ``Run`` began): a ``run()`` goes by a
        #: listing that began then or later, none older (see :meth:`_listing_duty`).
        began = self.run.clock() - (time.monotonic() - self.run.counters.started)
        given = self.run.started_at
        self.started = began if given is None else min(given, began)
        #: Whether this is a ``watch()``'s (it never takes the role over from a live holder).
        self._watching = False

    # -- the two modes ---------------------------------------------------------------------------

    async def until_finished(self) -> None:
        """``run()``: list (if this runner holds the role) and claim until the job is
        finished (or stopped)."""
        self.run.relook_due = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listing_duty, False)
                await self._role_seen.wait()
                await self._claim_until(self._finished)
                tg.cancel_scope.cancel()
        finally:
            # Stopped before it looked at them again: committed as they are (vanished).
            due, self.run.relook_due = self.run.relook_due or [], None
            if due and self.claimer.outbox is not None:
                for item, outcome, _ in due:
                    self.claimer.outbox.put(item, outcome)

    async def until_stopped(self) -> None:
        """``watch()``: watch (if this runner holds the role) and claim until stopped."""
        run = self.run

        async def stopped() -> bool:
            return run.stop_requested.is_set()

        self._watching = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listing_duty, True)
            await self._claim_until(stopped)
            tg.cancel_scope.cancel()

    # -- the listing role ------------------------------------------------------------------------

    async def _listing_duty(self, watching: bool) -> None:
        """Take the role whenever it is free, and while holding it list (once, for a run) or
        watch; look again every quarter lease (a holder that died is taken over within
        about one lease)."""
        run, cfg = self.run, self.config
        # A run() takes the role over from a holder done with a listing older than this run
        # (see Ledger.take_listing): it lists again. A watch lists (scans) all the time.
        fresh = None if watching else self.started
        while not run.stopping:
            prior = await run.ledger.listing(cfg.job)
            role = await run.ledger.take_listing(cfg.job, run.owner, cfg.lease, fresh_since=fresh)
            mine = role.held_by(run.owner, run.clock())
            # Taken from a holder whose lease ran out (it died, or stalled): it may have left
            # the post-commit actions of its last items undone, which a listing finishes.
            lapsed = (
                mine
                and prior is not None
                and prior.owner not in (None, run.owner)
                and prior.lease_until is not None
            )
            if mine and run.lister_fence != role.fence:
                run.role_lost = anyio.Event()  # a new tenure of the role
                run.listed = True
                run.lister_idle = False
            run.lister_fence = role.fence if mine else None
            run.listing_role = role
            if self.target is None and not mine:
                # Another runner lists: this run goes by its listing if that one began when
                # this run started or later (under way, or complete already), else by the
                # next to begin: a listing that began before this run started cannot have
                # found the files that settled since (the holder lists it, or this run once
                # the holder is done with the old one: see Ledger.take_listing). A watch
                # lists at each full scan (its listings have no start): the next one to
                # begin, which finds what is in the source now.
                started = role.started_at
                if role.generation and started is not None and started >= self.started:
                    self.target = role.generation
                else:
                    self.target = role.generation + 1
                run.listing_target = self.target
            if mine and watching:
                await self._watch()
            elif mine and (self.target is None or role.complete < self.target or lapsed):
                if not await self._list(role) and self.target is None:
                    continue  # the role was taken over before the listing began: look again
            elif mine:
                # Taken (free) with nothing to list: this run goes by a listing complete
                # already. A run() started after that one began may take the role over
                # (LISTING_GRACE after the take: see Listing.stale_for), not a loss.
                run.lister_idle = True
            self._role_seen.set()
            # The heartbeat renews the role meanwhile; a runner without work looks at it too,
            # and says when it is free (its holder ended, or stalled past its lease).
            await self._until_next_look(cfg.lease / 4, watching)
            self._role_free = anyio.Event()

    async def _until_next_look(self, seconds: float, watching: bool) -> None:
        """Wait ``seconds`` for the next look at the role, or less when it is found free.
        Meanwhile, for a ``run()`` whose listing is under way (another runner lists it), read
        the role every :data:`HELD_POLL` seconds: what the run says of itself (statistics,
        metrics, its heartbeat's counts) counts that listing as soon as it is complete, as
        its report would (one row read; see :func:`live_totals`)."""
        run = self.run
        until = time.monotonic() + seconds
        while not self._role_free.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            awaited = not watching and run.listing_target is not None and gone_by(run) is None
            with anyio.move_on_after(min(left, HELD_POLL) if awaited else left):
                await self._role_free.wait()
            if awaited and not self._role_free.is_set():
                run.listing_role = role = await run.ledger.listing(self.config.job)
                if role is not None and self._to_take_over(role):
                    return

    def _to_take_over(self, role: Listing) -> bool:
        """Whether this ``run()`` waits for a listing newer than ``role``'s last, which it may
        take the role over to make now (see ``Ledger.take_listing``'s ``fresh_since``)."""
        target = self.target
        return (
            not self._watching
            and target is not None
            and role.complete < target
            and role.owner != self.run.owner
            and role.stale_for(self.started, self.run.clock())
        )

    async def _list(self, role: Listing) -> bool:
        """List the source once and register every file found (a new listing, which this
        run then goes by); give up quietly when the role is lost meanwhile. ``False`` when
        the role was lost before the listing began."""
        run, cfg, claimer = self.run, self.config, self.claimer
        run.lister_idle = False
        begun = await run.ledger.begin_listing(cfg.job, run.owner, role.fence)
        if begun is None:
            return False
        self.target = run.listing_target = begun.generation
        self._role_seen.set()
        records = await claimer.list_ready()
        self._queued_keys = set() if cfg.identity == "content" else None
        twins: dict[str, int] = {}
        self._twins = twins
        for start in range(0, len(records), REGISTER_BATCH):
            chunk = records[start : start + REGISTER_BATCH]
            if run.stopping or not await self._register(chunk, queue=True):
                return True
        self._queued_keys, self._twins = None, {}
        await failpoints.ahit("listing-registered")
        # The files the ledger had finished that fail rules given since: not queued (never
        # taken again), but found, and finished, as a run of its own counts them.
        finished = claimer.finished_unready
        done, dead = finished.get("done", 0), finished.get("dead", 0)
        files = len(records) + done + dead
        # What it left out as not ready yet goes with the listing: every runner that goes by
        # it reports those files (see count_listing), not this one alone.
        counters = run.counters
        not_ready = {name: getattr(counters, name) for name in NOT_READY_KEPT}
        if await run.ledger.end_listing(
            cfg.job,
            run.owner,
            role.fence,
            files,
            done=done,
            dead=dead,
            twins=twins,
            not_ready=not_ready,
        ):
            log.info("listed %d files for the runners of job %r", len(records), cfg.job)
            run.lister_idle = True  # a run() started from now on may take the role over
            run.listing_role = await run.ledger.listing(cfg.job)  # complete now
            run.wake()
        return True

    async def _register(self, records: list[bytes], *, queue: bool = False) -> bool:
        """Register listed files as waiting items (``queue``: queue them, see
        ``Ledger.queue_listed``); ``False`` when the role was lost."""
        run, cfg = self.run, self.config
        fence = run.lister_fence
        if fence is None:
            return False
        twins: list[tuple[str, bytes]] = []
        if cfg.identity == "content":
            items = await anyio.to_thread.run_sync(self.claimer.prepare, records, twins)
        else:
            items = self.claimer.prepare(records)
        rows: list[tuple[str, bytes, int, int, int]]
        if queue:
            items = self._queue_once(items, twins)
            queued = [
                (i.key, i.relpath, i.size, i.mtime_ns, i.inode, i.ctime_ns, i.ihash) for i in items
            ]
            found = await run.ledger.queue_listed(cfg.job, run.owner, fence, queued)
            rows = [q[:5] for q in queued]
        else:
            # A watch's: files with the bytes of another in the chunk, counted done before on
            # the strength of its item's attempt, follow how it ends (see _settle_twins).
            for key, record in twins:
                run.add_twin(key, record)
            rows = [(i.key, i.relpath, i.size, i.mtime_ns, i.inode) for i in items]
            found = await run.ledger.register_listed(cfg.job, run.owner, fence, rows)
        if found is None:
            self._role_taken_over()
            return False
        if found.done or found.dead:
            await self._finish_actions([key for key, *_ in rows])
        run.wake()  # waiting items for this runner's own claims too
        return True

    def _queue_once(
        self, items: list[LeasedItem], twins: list[tuple[str, bytes]]
    ) -> list[LeasedItem]:
        """Of a listing's items, those to queue: with identity ``content``, one file of each
        set with the same bytes (one item); the others, and ``twins`` (those ``prepare`` found
        in the chunk), are the listing's twins, done (dead) when the item is: each runner's
        report counts them so (see :func:`shared_report`)."""
        seen = self._queued_keys
        if seen is None:
            return items
        counts = self._twins
        for key, _ in twins:
            counts[key] = counts.get(key, 0) + 1
        kept = []
        for item in items:
            if item.key in seen:
                counts[item.key] = counts.get(item.key, 0) + 1
            else:
                kept.append(item)
        seen.update(item.key for item in kept)
        return kept

    def _role_taken_over(self) -> None:
        self.run.lose_listing_role()
        log.warning(
            "the listing role of job %r was taken over; this runner stops listing",
            self.config.job,
        )

    async def scan_begins(self) -> bool:
        """A full scan of this watching lister begins: begin a listing of the job (see
        ``Ledger.begin_listing``'s ``watching``). ``False`` when the role was lost.

        A ``run()`` beside the watch goes by the first full scan to begin after its own first
        look at the role (see :meth:`_listing_duty`): then every file in the source when it
        started has been registered (or is not ready yet: as a run's own listing leaves it)."""
        run = self.run
        fence = run.lister_fence
        if fence is None:
            return False
        if await run.ledger.begin_listing(self.config.job, run.owner, fence, watching=True):
            return True
        self._role_taken_over()
        return False

    async def scan_ends(self, files: int) -> None:
        """The full scan :meth:`scan_begins` began registered what it found ready (``files``,
        those registered before among them): its listing is complete."""
        run = self.run
        fence = run.lister_fence
        if fence is not None and not await run.ledger.end_listing(
            self.config.job, run.owner, fence, files
        ):
            self._role_taken_over()
            return
        await self._settle_twins()

    async def _settle_twins(self) -> None:
        """A watching lister's twins (identity ``content``: files it registered with the
        bytes of another, counted done before on the strength of that item's attempt, see
        ``RunState.twins``) whose item ended since, wherever it was handled: done, as
        counted; dead, dead before; vanished (its file deleted or changed while queued), one
        of them registered in its place (the item waits again as that file), the others
        following it. One read a full scan, while there are any; the rest at the end
        (``reconcile``)."""
        run = self.run
        keys = [key for key in run.twins if key not in run.in_flight and key not in run.open]
        if not keys:
            return
        states = await run.ledger.states_of(self.config.job, keys)
        for key in keys:
            state = states.get(key)
            if state in ("done", "dead"):
                run.twins_ended(key, state)
            elif state == "vanished":
                run.twins_due.add(key)
        taken = [record for _, record in run.take_twins()]
        if taken:  # seen already: counted by how their item ends now
            await self._register(taken)

    async def _finish_actions(self, keys: list[str]) -> None:
        """Carry out again the post-commit actions of the listed files the ledger has finished
        (a runner killed between a commit and its action left the file in the source): as an
        exclusive run's claim does. The recorded file, not the listed one, is acted on: a
        newer file under the name is left alone."""
        posts = self.claimer.posts
        for item in await self.run.ledger.actions_due(self.config.job, keys):
            assert item.post_action is not None
            posts.submit(
                item.post_action,
                item.key,
                os.fsencode(item.relpath),
                item.size,
                item.mtime_ns,
                item.inode,
            )

    async def _watch(self) -> None:
        """Watch the source as its lister until the role is lost (or the run stops): the
        watch registers what it finds instead of leasing it."""
        claimer = self.claimer

        async def register(records: list[bytes]) -> None:
            for start in range(0, len(records), REGISTER_BATCH):
                if not await self._register(records[start : start + REGISTER_BATCH]):
                    return

        claimer.registrar, claimer.listings = register, self
        log.info("this runner lists job %r for its runners (watching)", self.config.job)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cancel_when_role_lost, tg.cancel_scope)
                await claimer.watch()
                tg.cancel_scope.cancel()
        finally:
            claimer.registrar = claimer.listings = None

    async def _cancel_when_role_lost(self, scope: anyio.CancelScope) -> None:
        await self.run.role_lost.wait()  # the heartbeat could not renew it
        scope.cancel()

    # -- claiming --------------------------------------------------------------------------------

    async def _claim_until(self, done: Callable[[], Awaitable[bool]]) -> None:
        """Lease waiting items (and this run's own open ones) until ``done()`` says so once
        nothing is in flight."""
        run, cfg, claimer = self.run, self.config, self.claimer
        registered = -1
        while not run.stopping:
            if run.relook_due and await self._listing_complete():
                await self.look_again_changed()
                continue
            if await claimer.take_queued() or await claimer.claim_waiting():
                continue
            if run.twins_due:
                await claimer.claim_twins()
            if run.in_flight:
                # (Items held back for a look again wait for the listing to be complete.)
                await run.wait_for_progress(HELD_POLL if run.relook_due else cfg.lease / 4)
                continue
            if run.open:
                await reap_gone_runners(run.ledger, cfg.job, run.me, run.counters)
                await claimer.claim_open()
                if run.in_flight:
                    continue
            if await done():
                return
            registered = await self._wait_for_work(registered)

    async def _listing_complete(self) -> bool:
        """Whether the listing this run goes by is complete (as last read, else read now)."""
        run, target = self.run, self.target
        role = run.listing_role
        if target is not None and (role is None or role.complete < target):
            role = run.listing_role = await run.ledger.listing(self.config.job)
        return target is not None and role is not None and role.complete >= target

    async def look_again_changed(self) -> None:
        """Look again at the paths of the items the committer held back (``RunState
        .relook_due``): a worker found their file changed after the listing queued it. As
        a one-shot run of its own does (``Claimer.look_again_changed``), once the listing
        this run goes by is complete: a file there that is settled and ready (its new version,
        or, its key kept, the same item written to) is claimed, a new item before the old
        one's outcome is committed (the other runners see one of them leased all along:
        their job is not finished, and the ledger's lease gives the new version to one
        runner), the same item given back (``pending``, not vanished: the job stays unfinished
        for every runner) and claimed again; one that is not ready is moved, in
        the listing, from its found files to those it left out not ready yet
        (``Ledger.listing_changed``), before that commit too: every runner that goes by the
        listing counts it so. Either way the old version is not counted vanished (by this
        runner: ``RunState.relooked``; by the others, within what the listing found). Only a
        path with no file keeps that count."""
        run, cfg, claimer = self.run, self.config, self.claimer
        due, run.relook_due = run.relook_due or [], []
        by_path = {item.relpath: item for item, _, _ in due}
        kept = {item.key for item, _, rewritten in due if rewritten}
        # As Claimer.look_again_changed: settled by a clock read before the look, and a path
        # looked at again once a run (a file written to without end is not taken for ever).
        now_ns = time.time_ns()
        found = await claimer.scanner.look_at(sorted(by_path))
        after_ns = time.time_ns()
        looked_before = claimer.looked_again(by_path)
        there: set[str] = set()
        new: list[bytes] = []
        again: list[bytes] = []
        not_ready = dict.fromkeys(NOT_READY_KEPT, 0)
        for record in found.records:
            item = by_path.get(split(record)[0])
            if item is None:
                continue  # (a marker looked at with its file)
            there.add(item.key)
            rule = claimer.not_ready_rule(record, found.blocked, now_ns, looked_before)
            if rule:
                not_ready[NOT_READY[rule]] += 1
                if rule == "age" and ready_ns(record) > after_ns:
                    not_ready["future"] += 1
            else:
                (again if item.key in kept else new).append(record)
        log.info(
            "%d files changed after they were listed, looked at again: %d ready, %d not ready",
            len(due),
            len(new) + len(again),
            sum(not_ready[name] for name in NOT_READY.values()),
        )
        if any(not_ready.values()) and self.target is not None:
            # False: a newer listing is complete, which found these files as they are.
            await run.ledger.listing_changed(cfg.job, self.target, not_ready)
        if new:
            await claimer.claim_records(new)
        keys = {by_path[split(record)[0]].key for record in again}
        outbox = claimer.outbox
        assert outbox is not None
        for item, outcome, _ in due:
            if item.key not in keys:
                run.relooked[item.key] = item.key in there
                outbox.put(item, outcome)
        if again:  # the same item, ready: given back and taken again, never finished between
            await self._give_back([item for item, _, _ in due if item.key in keys])
            await claimer.claim_records(again)

    async def _give_back(self, items: list[LeasedItem]) -> None:
        """Give held-back items whose file is ready again back to be claimed (``pending``),
        leased until then: committed vanished, another runner could find the job finished
        before they were claimed again and call their file vanished."""
        run = self.run
        await run.ledger.release_items(
            self.config.job, run.owner, [(i.key, i.fence) for i in items]
        )
        for item in items:
            run.in_flight.pop(item.key, None)
        run.made_room()

    async def _wait_for_work(self, registered: int) -> int:
        """Wait until more items were registered than ``registered`` says (the role's count;
        -1: not known yet, so at once), a retry of this run may be due, or
        :data:`HELD_POLL` passed; return the count last seen (the next claim's baseline)."""
        run, cfg = self.run, self.config
        if self._notified is not False:  # PostgreSQL announces registrations: no polling
            # then. Asked at every wait: its listening connection, if lost, is made again.
            self._notified = await run.ledger.on_registered(cfg.job, run.wake)
        until = time.monotonic() + HELD_POLL
        while not run.stopping:
            listing = await run.ledger.listing(cfg.job)
            run.listing_role = listing
            if listing is not None and run.lister_fence is None and _free(listing, run.clock()):
                self._role_free.set()  # the listing duty takes it at once
            elif listing is not None and self._to_take_over(listing):
                self._role_free.set()  # ... as it takes over one done with an old listing
            now = 0 if listing is None else listing.registered
            if now != registered:
                return now
            if time.monotonic() >= until:
                break
            await run.wait_for_progress(until - time.monotonic() if self._notified else SHARED_POLL)
        await reap_gone_runners(run.ledger, cfg.job, run.me, run.counters)
        return registered

    async def _finished(self) -> bool:
        """Whether the job is finished for a ``run()``: its listing complete, and no item
        pending, leased or failed (``wait=False``: leased ones aside).

        While the other runners end their work, a cheap look finds it (``work_left``); the
        job's items are counted (a read of every one) only when that finds none, and that
        count is the report's (see :func:`shared_report`)."""
        run, cfg = self.run, self.config
        listing = run.listing_role = await run.ledger.listing(cfg.job)
        if listing is None or self.target is None or listing.complete < self.target:
            return False
        if _moved_on(listing):
            # The role changed hands and its new holder began a listing since: the row's
            # start and counts are that one's now (it said "4 seen: 4 unfinished", all done
            # by others before it began). Go by it: it finds what is done.
            self.target = run.listing_target = listing.generation
            return False
        run.listing = listing
        if listing.started_at is not None:  # (a watch's scan: not the files of this run)
            run.counters.seen = max(run.counters.seen, listing.listed_files)
            await _take_up_twins(run, listing)
        left = sorted(run.left_waiting)
        if cfg.wait and not left and await run.ledger.work_left(cfg.job):
            return False
        others: dict[str, int] | None = None
        if listing.started_at is None:
            counts = await run.ledger.counts(cfg.job)
        else:
            counts, others = await run.ledger.finish_counts(cfg.job, run.owner, listing.started_at)
        # wait=False: not for the files other runners hold; for the retries, as a run of its
        # own (a due retry is this runner's to take: it ended at once, "waiting for a retry",
        # exit 1 with nothing dead and nobody left to retry them).
        held = counts["running"] if cfg.wait else 0
        # Not the items this run left waiting, their file not settled (the listing counted
        # them so: see Claimer._leave_unsettled), while they still wait.
        left_waiting = 0
        if left:
            found = await run.ledger.states_of(cfg.job, left)
            left_waiting = sum(state in ("pending", "failed") for state in found.values())
        finished = counts["pending"] + held + counts["failed"] - left_waiting == 0
        if finished and listing.started_at is not None and await self._list_again(listing):
            return False
        if finished:  # what the report counts (a read of every item: once)
            run.finished_counts, run.finished_by_others = counts, others
        return finished

    async def _list_again(self, listing: Listing) -> bool:
        """Identity ``content``, the job otherwise finished: whether files ``listing`` did not
        queue, for having the bytes of one it did, are left unhandled by every runner (that
        one's attempt ended neither done nor dead: its file vanished, deleted or changed
        while queued). Then this run goes by the next listing, which queues them (a vanished
        item whose file is listed again waits again), and the role's holder is asked to list
        now: :data:`RELISTS` times a run at most (each needs a file to vanish meanwhile);
        after that such files are counted unfinished, left to the next run."""
        run, cfg = self.run, self.config
        if cfg.identity != "content" or self._relisted >= RELISTS:
            return False
        if not (await _twins_by_end(run, listing)).vanished:
            return False  # (held by another runner, or waiting for a retry: not listed again)
        self._relisted += 1
        run.unlisted = run.counters.vanished  # gone: not in the next listing
        self.target = run.listing_target = listing.complete + 1
        self._role_free.set()  # the listing duty looks at the role at once
        log.info(
            "files of job %r with the bytes of one that vanished while queued: listed again",
            cfg.job,
        )
        return True


def _free(listing: Listing, now: float) -> bool:
    """Whether nobody holds the listing role at ``now`` (its holder gave it up, or its lease
    ran out)."""
    return listing.lease_until is None or listing.lease_until < now


def _moved_on(listing: Listing) -> bool:
    """Whether a listing (with a start: not a watch's scan) began after the last complete one:
    the row's start and counts (``started_at``, ``found_done``, ``found_dead``) are the new
    one's, not those of the complete listing."""
    return listing.started_at is not None and listing.generation > listing.complete


def gone_by(run: RunState) -> Listing | None:
    """The complete listing a shared run goes by, as the run last looked at the role (the
    listing duty every quarter lease, every second while that listing is under way, and the
    claimer's looks); ``None`` while there is none yet, or while a newer one is under way
    (the row's counts are not the complete one's then)."""
    if run.listing is not None:
        return run.listing
    role, target = run.listing_role, run.listing_target
    if role is None or target is None or role.complete < target or _moved_on(role):
        return None
    return role


def count_listing(
    t: RunTotals,
    listing: Listing | None,
    others: dict[str, int],
    running: int | None,
    twins: TwinEnds = NO_TWINS,
    unlisted: int = 0,
) -> None:
    """Count the job's listing in a shared run's counts ``t`` (changed in place; ``unfinished``
    is left to the caller): ``seen`` the files ``listing`` found, at least what the run's own
    categories add up to; ``dead_before`` and ``done_before`` what the listing found finished
    and what other runners finished since it began (``others``, by state), and ``held`` the
    items leased to other runners (``running``; ``None``: not counted, ``held`` is left as
    the claimer counted it), each within what is left of ``seen``; ``twins``, the listing's
    files not queued for the bytes of one it queued (identity ``content``, see
    :func:`finished_twins`): done (dead) before when their item is, else unfinished (``seen``
    has room for them); ``unlisted``, files this run counted vanished before the listing
    began (``RunState.unlisted``), are seen too. The counts of files not ready yet (and
    ``future``, of a run's counters) are what ``listing`` left out (``Listing.not_ready``),
    not what this run's own scan did when it listed before. Without a listing
    (``None``: none complete yet, or a watch's lister), ``seen`` is at least what the
    categories add up to, and the files not ready yet are the run's own.

    The run's own categories first; what the listing found finished and what the others
    finished since it began next, within what is left of ``seen``: a file is counted by both
    when the listing began after this run finished it (the role was taken over: the new
    listing finds it done) or when another runner finished it after the listing began and
    before the listing reached it. Counted twice, a run of 600 files said "773 seen: 289 done,
    484 done before". (When files this run moved away are not in a listing that began after,
    the room left is smaller than what others finished: less said, never more.)
    """
    if listing is None or listing.started_at is None:
        t.seen = max(t.seen, t.seen_accounted())
        return
    # The files not ready yet are the listing's too (whoever made it): what this run's own
    # scan left out, when it listed before, a later listing may have found ready and counted
    # among the seen (an 8-file inbox read "8 seen; 3 files not settled yet").
    not_ready = listing.not_ready_counts()
    for name in NOT_READY.values():
        setattr(t, name, not_ready[name])
    if isinstance(t, Counters):  # (the report's: of the unsettled, those ahead of the clock)
        t.future = not_ready["future"]
    t.done_before = t.dead_before = 0
    if running is not None:
        t.held = 0
    t.seen = max(listing.listed_files + unlisted, t.seen_accounted() + twins.unfinished)
    room = t.seen - t.seen_accounted() - twins.unfinished
    t.dead_before = min(listing.found_dead + others.get("dead", 0) + twins.dead, room)
    room -= t.dead_before
    t.done_before = min(listing.found_done + others.get("done", 0) + twins.done, room)
    room -= t.done_before
    # Files another runner found gone (or changed) are vanished for this run too, not
    # unfinished: they were "200 seen: 74 done, 76 done before, 41 vanished, 9 unfinished",
    # exit 1, on both runners, every file finished. Counted on top of the run's own.
    gone = min(others.get("vanished", 0), room)
    t.vanished += gone
    room -= gone
    if running is not None:
        t.held = min(running, room)


def live_totals(run: RunState, t: RunTotals) -> None:
    """A shared run's counts ``t`` (a snapshot of its counters, changed in place) as its report
    would count them now: the listing it goes by as last looked at (see :func:`gone_by`), and
    what other runners finished since it began as last counted (the look that found the job
    finished: a count reads every item, so none is made for this). Until then the files
    others finish are among the seen ones in no other category: ``unfinished``. Once the run
    counted its report (:func:`shared_report`), its counts are final: left as they are.

    What statistics, metrics and the heartbeat (``status``) say of a shared run under way."""
    if run.reported:
        return
    listing = gone_by(run)
    counts, others = run.finished_counts, run.finished_by_others
    if counts is None or others is None or listing is not run.listing:
        count_listing(t, listing, {}, None, unlisted=run.unlisted)
    else:
        count_listing(t, listing, others, counts["running"], unlisted=run.unlisted)
    t.unfinished = max(t.seen - t.seen_accounted(), 0)


async def _registered_and_finished_by_others(run: RunState) -> None:
    """A watch that held the listing role registered files that other runners handled: count
    those the ledger has finished as done (dead) before, not unfinished (they were, 200 seen:
    102 done, 98 unfinished, with every file done).

    Its registrations are not kept by key (a watch runs for months): a file of this run's
    that is not finished is one of the job's open items, so at least what this run's own
    categories leave of ``seen`` less those were finished by others; the split between done
    and dead (and vanished) is by what the others finished since this run began. Never more
    than that."""
    counters, job = run.counters, run.config.job
    since = run.clock() - (time.monotonic() - counters.started)
    counts, others = await run.ledger.finish_counts(job, run.owner, since)
    left = counters.seen - counters.seen_accounted()
    finished = max(left - counts["pending"] - counts["running"] - counts["failed"], 0)
    # Of what the others finished, those this run had open were counted where they ended.
    dead = min(max(others.get("dead", 0) - run.open_finished.get("dead", 0), 0), finished)
    vanished = min(others.get("vanished", 0), finished - dead)  # found gone: not done
    counters.add("dead_before", dead)
    counters.add("vanished", vanished)
    counters.add("done_before", finished - dead - vanished)


async def shared_report(run: RunState, *, watching: bool = False) -> None:
    """Count the job's listing in a shared run's report (see the module and
    :func:`count_listing`): what the listing found, what other runners finished since it
    began; ``seen`` at least what this run's categories add up to. Without a complete listing
    to go by, a watch that listed counts the files it registered that others finished (see
    :func:`_registered_and_finished_by_others`); a ``run()`` whose listing did not complete
    (a ledger error while it queued the files, say) leaves them unfinished: it cannot tell
    which were queued."""
    counters, job = run.counters, run.config.job
    listing = run.listing
    if listing is None and run.listing_target is not None:  # it ended before it looked
        latest = await run.ledger.listing(job)
        if latest is not None and latest.complete >= run.listing_target:
            listing = latest
    if listing is None or listing.started_at is None:
        count_listing(counters, None, {}, None)
        if watching and run.listed and counters.seen > counters.seen_accounted():
            await _registered_and_finished_by_others(run)
        run.reported = True
        return
    # As the look that found the job finished counted them (else now: this run's leases
    # are given back by now).
    counts, others = run.finished_counts, run.finished_by_others
    if counts is None or others is None or listing is not run.listing:
        counts, others = await run.ledger.finish_counts(job, run.owner, listing.started_at)
    twins = await finished_twins(run, listing)
    count_listing(counters, listing, others, counts["running"], twins, run.unlisted)
    run.reported = True


async def finished_twins(run: RunState, listing: Listing) -> TwinEnds:
    """Of the files ``listing`` did not queue because one with their bytes was (identity
    ``content``: the same item), how many have their item done, dead, or neither, now: those
    are left unfinished (this run did not handle them, nor did another). A ledger that fails
    here counts none done nor dead (less said, never more)."""
    if run.config.identity != "content":
        return NO_TWINS
    try:
        return await _twins_by_end(run, listing)
    except LedgerError as e:
        log.warning("the report counts no file with the bytes of another (the ledger: %s)", e)
        return NO_TWINS


async def _take_up_twins(run: RunState, listing: Listing) -> None:
    """Read the twins of ``listing`` (identity ``content``; see ``RunState.listing_twins``),
    once, as the run takes it up: the next listing, once complete, replaces them."""
    if run.config.identity != "content":
        return
    if run.listing_twins is None or run.listing_twins[0] != listing.complete:
        twins = await run.ledger.listing_twins(run.config.job, listing.complete)
        run.listing_twins = (listing.complete, twins)


async def _twins_by_end(run: RunState, listing: Listing) -> TwinEnds:
    """The files ``listing`` did not queue for the bytes of one it queued (see
    ``Ledger.listing_twins``), by how their item ended, now."""
    await _take_up_twins(run, listing)
    assert run.listing_twins is not None
    twins = run.listing_twins[1]
    states = await run.ledger.states_of(run.config.job, list(twins)) if twins else {}
    by_state = {"done": 0, "dead": 0, "vanished": 0, "": 0}
    for key, files in twins.items():
        state = states.get(key, "")
        by_state[state if state in by_state else ""] += files
    vanished = by_state["vanished"]
    return TwinEnds(by_state["done"], by_state["dead"], vanished + by_state[""], vanished)
