"""The claimer: scanned entries registered and leased in chunks, in ``(mtime_ns, relpath)`` order.

``run`` mode scans once, then claims the sorted records chunk by chunk (one statement each),
never far ahead of the workers (see :class:`Lookahead`): about a quarter second of their work
at the rate they go, at least ``-j`` and at most ``claim_batch`` items, leased when the queue
runs low. Fast handlers get full chunks (one statement per ``claim_batch`` files); slow ones
small ones, so that runners sharing a job share its files.
It then *finishes*: the seen files that are neither done nor in flight (held by another runner,
or waiting for a retry) are claimed again until each is done or dead; another runner's expired
lease is taken over by the same claim (the database's clock decides on PostgreSQL). Only then
does it lease what earlier runs left waiting in the ledger, and end.

``watch`` mode polls the source every ``poll`` seconds (a full scan; while change events are
followed, nine times in ten a listing of names and inode numbers) and, in between, looks at
just the paths that change events name (:mod:`.events`) and at the files waiting to settle,
the moment each will be ready (:mod:`.sightings`: settled, and unchanged between two looks).
Files already registered are remembered by their scan record, so an idle inbox costs one
``scandir`` per poll and one ledger round trip (what earlier runs left waiting).
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import anyio
import anyio.to_thread

from .. import _failpoints as failpoints
from .._exceptions import SourceError
from .._identity import input_hash, item_key
from .._ledger import NOT_READY, ClaimedRow, QueuedRow, decode_move
from .._report import Counters
from .._scanner import clamp_ns, content_digest, ready_ns, split, unpack_item
from .._sources.base import Lister
from .._sources.sqs import EventQueue, HeldMessages, QueueURL
from .events import Changes, EventWatcher
from .postactions import PostActions
from .queues import ItemQueue, LeasedItem, Outbox
from .readiness import MarkerFollowUp, count_not_ready, count_scan, look_until_stable
from .shared import SharedRun
from .sightings import Sightings
from .source import SourceDir
from .state import RunState, reap_gone_runners

#: The errors of a poll that say the source directory cannot be listed (it is there): no
#: permission any more, an I/O error, a network filesystem's stale handle or lost server. A
#: watch waits for it; any other error of the poll ends the watch as before.
_UNLISTABLE = frozenset(
    {
        *(errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT),
        *(errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENODEV, errno.ENXIO),
    }
)

__all__ = ["FULL_SCAN_EVERY", "HELD_POLL", "LOOKAHEAD_SECONDS", "Claimer", "Lookahead"]

log = logging.getLogger("asyncbatch")
#: Seconds between looks at items other runners hold (at most a quarter of the lease).
HELD_POLL = 1.0
#: How much of the workers' work (in seconds, at their recent rate) one claim leases.
LOOKAHEAD_SECONDS = 0.25
#: While change events are followed, one poll in this many is a full scan (a ``stat`` of every
#: file: a file changed in place whose events were lost is found then); the others list names
#: and inode numbers only (a quarter of the cost), which finds every new or replaced file.
FULL_SCAN_EVERY = 10


class Lookahead:
    """How many items to lease next, and when: from the rate the workers finish them.

    A claim leases ``LOOKAHEAD_SECONDS`` of work at the measured rate, between ``-j`` and
    ``claim_batch`` items (``2 * -j`` before anything has finished), once the queue is down to
    ``-j`` plus a quarter of that: the workers never run dry while a claim is under way, and
    this runner never holds much more than it can start soon.
    """

    def __init__(self, concurrency: int, claim_batch: int, counters: Counters) -> None:
        self._concurrency = concurrency
        self._most = claim_batch
        self._counters = counters
        self._since = time.monotonic()
        self._finished = 0
        self._rate = 0.0
        self._sparse = False

    def next_chunk(self) -> int:
        """Items the next claim should lease."""
        now = time.monotonic()
        finished = self._counters.finished_attempts()
        if now - self._since >= 0.05:  # a rate over at least 50 ms, smoothed
            rate = (finished - self._finished) / (now - self._since)
            self._rate = rate if self._rate == 0.0 else 0.5 * self._rate + 0.5 * rate
            self._since, self._finished = now, finished
        if self._sparse:
            return self._most
        if self._rate == 0.0:
            return min(self._most, 2 * self._concurrency)
        wanted = int(self._rate * LOOKAHEAD_SECONDS)
        return max(self._concurrency, min(self._most, wanted))

    def claimed(self, rows: int, leased: int) -> None:
        """Feedback of a claim: when most rows were finished already (a resume), the next one
        takes a whole ``claim_batch`` of rows, since few of them will be leased."""
        self._sparse = leased * 2 < rows

    def low_water(self, chunk: int) -> int:
        """Queue length at or under which the next claim starts."""
        return self._concurrency + chunk // 4


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class Claimer:
    """Feeds the item queue with leased items."""

    def __init__(
        self,
        state: RunState,
        queue: ItemQueue,
        *,
        scanner: Lister,
        posts: PostActions,
        mode: Literal["run", "watch"],
        outbox: Outbox | None = None,
    ) -> None:
        self.run = state
        #: Where the outcomes the committer held back for a look again go back to (a shared
        #: ``run()``: see ``SharedRun.look_again_changed``).
        self.outbox = outbox
        self.config = state.config
        self.queue = queue
        self.scanner = scanner
        self.posts = posts
        self.mode = mode
        #: The job's readiness rules (the scanner applies them; a run's looks are ours).
        self.ready = scanner.ready if scanner.ready is not None else state.config.readiness
        self.markers = MarkerFollowUp(posts, state)
        self.lookahead = Lookahead(
            state.config.concurrency, state.config.claim_batch, state.counters
        )
        #: Set to follow change events afresh (the source directory was replaced).
        self._restart_events = anyio.Event()
        #: The source's reopenings this watch knows of (see :meth:`_source_replaced`).
        self._reopened = 0
        #: The last entry of the ledger's log of forgotten items that the watch has seen.
        self._forgotten_seq = 0
        #: Set while this runner lists for runners sharing the job (see :mod:`.shared`): the
        #: watch registers the files it finds with it (all runners claim them from the
        #: ledger) instead of leasing them itself, and leaves retries to the claiming loop.
        self.registrar: Callable[[list[bytes]], Awaitable[None]] | None = None
        #: Set with it: each full scan of the watch is a listing of the job, which a ``run()``
        #: beside the watch can go by (see :meth:`.SharedRun.scan_begins`).
        self.listings: SharedRun | None = None
        #: Of the files the last one-shot scan left out (not ready by the rules), how many
        #: the ledger had finished, by state (``done``, ``dead``): a shared run's listing
        #: counts them among its files (see :meth:`.SharedRun._list`).
        self.finished_unready: dict[str, int] = {}
        #: Whether an item's identity includes its version tag (an object's ``inode``).
        self._versioned = state.config.objects is not None
        #: The S3 event notifications followed (``--events sqs://QUEUE``), once open, and the
        #: messages held until what they name is registered.
        self._events: EventQueue | None = None
        self._held = HeldMessages()
        #: The relpaths of the files counted ``unreadable`` (identity ``content``).
        self._unreadable_seen: set[bytes] = set()
        #: A one-shot run's: the relpaths of the files its scan left out as not ready yet
        #: (and of those it found so since, see :meth:`_leave_unsettled`), counted so.
        self._not_ready: set[bytes] = set()
        #: The keys of items waiting in the ledger whose file was found not settled: left
        #: waiting (see :meth:`_leave_unsettled`), until the monotonic time each settles (a
        #: one-shot run: for the rest of the run, whose report counts them not settled yet).
        self._left_waiting: dict[str, float] = {}
        #: The place in claim order ``(mtime_ns, relpath, key)`` of each of those, sorted; and
        #: where the last claim of waiting items ended while some were left waiting: the next
        #: goes on from there (see :meth:`claim_waiting`).
        self._left_order: list[tuple[int, bytes, str]] = []
        self._waiting_after: tuple[int, bytes] | None = None
        #: The relpaths :meth:`look_again_changed` looked at again in this run: a file found
        #: changed once more after that is still being written (not looked at again).
        self._looked_again: set[bytes] = set()

    async def serve(self) -> None:
        """Claim everything there is (``run``) or keep polling (``watch``); close the queue."""
        try:
            if self.config.shared:
                shared = SharedRun(self)
                await (shared.until_finished() if self.mode == "run" else shared.until_stopped())
            elif self.mode == "run":
                self.run.relook = []
                records = await self.list_ready()
                await self.claim_records(records)
                del records
                await self.finish()
            else:
                await self.watch()
        finally:
            self.queue.close()

    def _on_scan_chunk(self, found: int) -> None:
        self.run.counters.seen = found

    async def list_ready(self) -> list[bytes]:
        """A one-shot run's listing: the records of the files ready by every rule (for
        ``stable:N``, after the looks it waits for), the files not ready yet counted by rule,
        and the markers the scan found left behind handed to the post-commit actions. Sets
        ``seen`` (and ``scanned``)."""
        run = self.run
        records = await self.scanner.scan(settle=self.config.settle, on_chunk=self._on_scan_chunk)
        count_scan(run.counters, self.scanner.last)
        walked = self.scanner.walked
        self.finished_unready = {"done": 0, "dead": 0}
        left_out = (
            walked.left_out
            if walked is not None
            else [(r, "age") for r in self.scanner.left_unsettled]
        )
        finished = await self._count_finished(left_out) if left_out else 0
        self._not_ready = {split(r)[0] for r, _ in left_out}
        await self.markers.after_scan(walked)
        if self.ready.looks > 1:  # stable:N: look again, and wait for the answer
            records, unstable = await look_until_stable(self.scanner, records, self.ready, run)
            if unstable:
                finished += await self._count_finished([(r, "stable") for r in unstable])
                self._not_ready.update(split(r)[0] for r in unstable)
        run.counters.seen = 0  # (the scan's progress: counted now, once final)
        run.counters.add("seen", len(records) + finished)
        run.counters.scanned = True
        return records

    async def _finished_states(self, records: list[bytes]) -> dict[bytes, str]:
        """Of these scan records (files not ready by the rules), those whose item the ledger
        has finished (``done`` or ``dead``), by record: one read per
        :data:`~asyncbatch._ledger.base.STATES_OF_CHUNK` files, never one per file. Files of
        identity ``"content"`` are not looked up (their keys would mean reading them)."""
        if not records or self.config.identity == "content":
            return {}
        identity = self.config.identity
        keys: dict[str, bytes] = {}
        for record in records:
            mtime_ns, rel, size, inode, _ = unpack_item(record)
            key = item_key(identity, self._input_hash(rel, size, mtime_ns, inode), mtime_ns)
            keys[key] = record
        found = await self.run.ledger.states_of(self.config.job, list(keys))
        return {keys[k]: s for k, s in found.items() if s in ("done", "dead")}

    async def _count_finished(self, left_out: list[tuple[bytes, str]]) -> int:
        """A one-shot run's scan left ``left_out`` (records, and the rule each fails) out:
        those whose item is finished already (done or dead: the rules changed since, or the
        file kept its key while its ctime changed, a ``chmod`` or a ``touch -d`` that left it
        not settled yet; a finished file is never taken again) are counted as a ready one
        would be (done or dead before), not as not ready yet. Returns how many (seen, too).
        Under identity ``content`` none is looked up (their keys would mean reading them):
        they stay counted as not ready yet.

        A shared run counts the job's listing (see :func:`.shared.count_listing`): its lister
        records them with the listing's files (:attr:`finished_unready`), and every runner
        counts them from there (this one too: its own counts leave them out meanwhile)."""
        counters = self.run.counters
        finished = await self._finished_states([r for r, _ in left_out])
        by_state = {"done": 0, "dead": 0}
        for record, rule in left_out:
            state = finished.get(record)
            if state is None:
                continue
            name = NOT_READY[rule]
            setattr(counters, name, getattr(counters, name) - 1)
            by_state[state] += 1
        # Of the unsettled, those ahead of the clock: which of them were finished is not
        # known here; never more of them than are left.
        counters.future = min(counters.future, counters.unsettled)
        for state, files in by_state.items():
            self.finished_unready[state] = self.finished_unready.get(state, 0) + files
        if self.config.shared:
            return 0
        counters.add("done_before", by_state["done"])
        counters.add("dead_before", by_state["dead"])
        return len(finished)

    async def watch(self) -> None:
        """Watch until stopped: a poll every ``poll`` seconds and, in between, looks at the
        paths change events name and at the waiting files whose moment has come (see
        :class:`~.sightings.Sightings` for when a file is ready). A poll is a full scan, or
        while events are followed, nine times in ten, a listing of names (see
        :data:`FULL_SCAN_EVERY`)."""
        run, cfg = self.run, self.config
        sightings = Sightings(
            cfg.settle,
            self.ready,
            immutable=cfg.objects is not None,
            by_path=cfg.identity == "path",
        )
        run.waiting_files = sightings.waiting_files  # the report asks about them at the end
        run.waiting_now = sightings.waiting_by_rule  # live counts: as they stand when read
        changes = Changes()
        self._forgotten_seq = (await run.ledger.forgotten_since(cfg.job, None))[0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._wake_on_stop, changes)
            tg.start_soon(self._wake_on_progress, changes)
            if cfg.events and run.source.watchable:
                tg.start_soon(self._follow_events, changes)
            if cfg.event_queue is not None and cfg.objects is not None:
                tg.start_soon(self._follow_queue, changes)
            began: float | None = None  # when the last poll began
            lists = 0  # polls since the last full scan
            retry_at: float | None = None  # when a failed item of this run comes due
            waiting = 0  # run.counters.waiting when retry_at was reckoned
            while not (run.stopping or run.stop_requested.is_set()):
                paths, rescan = changes.take()
                # The interval is read afresh each time: once S3 event notifications are
                # received (the queue may open after the first poll), the next poll is a
                # backfill listing's interval after the last, not ``poll`` seconds.
                next_scan = -math.inf if began is None else began + self._poll_interval()
                if rescan or time.monotonic() >= next_scan:
                    began = time.monotonic()
                    next_scan = began + self._poll_interval()
                    full = rescan or lists + 1 >= FULL_SCAN_EVERY or not self._may_list(changes)
                    lists = 0 if full else lists + 1
                    saw_dir = await self._poll_source(sightings, paths, full=full)
                    if saw_dir is None:  # the source is gone: its first poll back is a full one
                        lists, saw_dir = FULL_SCAN_EVERY, False
                else:
                    saw_dir = await self._watch_look(sightings, paths)
                count_not_ready(run.counters, sightings.waiting_by_rule())
                if saw_dir:
                    changes.rescan()  # a directory arrived: what is in it has no events
                if run.twins_due and self.registrar is None:
                    await self.claim_twins()
                if retry_at is not None and time.monotonic() >= retry_at:
                    retry_at, waiting = None, -1  # and reckon the next one after this claim
                    await self.claim_open()
                if run.counters.waiting != waiting and self.registrar is None:
                    waiting = run.counters.waiting  # failures recorded, or retries leased
                    retry_at = await self._next_retry()
                wake_at = min(
                    t for t in (next_scan, sightings.next_look(), retry_at) if t is not None
                )
                await changes.wait(wake_at - time.monotonic())
            tg.cancel_scope.cancel()

    async def _poll_source(
        self, sightings: Sightings, paths: set[bytes], *, full: bool
    ) -> bool | None:
        """A poll, if the source directory is there: see :meth:`_watch_poll`. ``None`` while
        the source is gone (health says so; the poll is retried at the next interval).

        The source is looked at first (one ``stat``): a directory replaced since the last poll
        (deleted and made again, remounted) is reopened, its change events followed afresh,
        and scanned whole.
        """
        source = self.run.source
        if self._source_replaced():
            full = True
        if not source.usable:
            return None
        try:
            saw_dir = await self._watch_poll(sightings, paths, full=full)
        except SourceError as exc:  # an s3:// source's listing failed: the next poll retries
            if source.problem != str(exc):
                log.warning("%s; trying again at the next poll", exc)
            source.problem = str(exc)
            return None
        except (FileNotFoundError, NotADirectoryError):
            # Replaced during the poll: the next one is a full scan.
            if not self._source_replaced() and source.usable:
                raise
            return None
        except OSError as exc:  # there, but it cannot be listed: waited for, as when gone
            if not isinstance(source, SourceDir) or exc.errno not in _UNLISTABLE:
                raise  # (too many open files, no memory, ...: this process's trouble)
            source.cannot_list(exc)
            return None
        if isinstance(source, SourceDir):
            source.listed()
        if source.problem is not None and not source.watchable:  # an s3:// source, back
            log.warning("the source %s can be listed again", self.config.source)
            source.problem = None
        return saw_dir

    def _source_replaced(self) -> bool:
        """Look at the source again (one ``stat``): whether it was replaced and reopened since
        this watch last knew, by this look or another part's (a worker that found an input
        gone looks too): its change events are then followed afresh."""
        source = self.run.source
        source.refresh()
        if source.reopened == self._reopened:
            return False
        self._reopened = source.reopened
        self._restart_events.set()
        return True

    async def _follow_events(self, changes: Changes) -> None:
        """Follow change events (:class:`EventWatcher`), afresh each time the source directory
        is replaced: the events of the old directory stop with it."""
        while True:
            restart = self._restart_events = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_when_set, restart, tg.cancel_scope)
                await EventWatcher(self.config, changes).serve()
                await restart.wait()  # it gave up (it said why): polling goes on until then

    def _poll_interval(self) -> float:
        """Seconds to the next poll: ``poll``, or while S3 events are followed the backfill
        listing's interval (``backfill_interval``)."""
        return self.config.poll if self._events is None else self.config.backfill_interval

    async def _follow_queue(self, changes: Changes) -> None:
        """Receive S3 event notifications; the objects they name are looked at at once (see
        :mod:`asyncbatch._sources.sqs`). A message that names nothing under the source's
        prefix is deleted at once; the others once what they name is resolved."""
        source, objects = self.config.objects, self.run.objects
        if source is None or objects is None or self.config.event_queue is None:
            return
        queue = QueueURL.parse("event_queue", self.config.event_queue)
        async with EventQueue(queue, source.bucket, objects.requests) as events:
            self._events = events
            changes.wake()  # the next poll is a backfill listing's interval away now
            failures = 0
            while True:
                paths: list[bytes] = []
                unrelated: list[str] = []
                try:
                    notes = await events.receive()
                except OSError as exc:  # the backfill listing goes on meanwhile
                    failures += 1
                    log.warning("%s; receiving again in %ds", exc, min(60, 2**failures))
                    await anyio.sleep(min(60, 2**failures))
                    continue
                failures = 0
                for note in notes:
                    prefix = source.prefix
                    rels = [k[len(prefix) :].encode() for k in note.keys if k.startswith(prefix)]
                    if rels:
                        self._held.hold(note.receipt, rels)
                        paths.extend(rels)
                    else:
                        unrelated.append(note.receipt)
                if unrelated:
                    await events.delete(unrelated)
                if paths:
                    changes.add(paths)

    async def _resolved(self, relpaths: Iterable[bytes]) -> None:
        """These relpaths are registered, or no inputs: delete the messages done with."""
        if self._events is not None and self._held:
            receipts = self._held.resolve(relpaths)
            if receipts:
                await self._events.delete(receipts)

    async def _wake_on_stop(self, changes: Changes) -> None:
        await self.run.stop_requested.wait()
        changes.wake()

    async def _wake_on_progress(self, changes: Changes) -> None:
        """Wake the watch when the committer recorded a failure (its retry is scheduled)."""
        run = self.run
        while not run.stopping:
            await run.wait_for_progress(math.inf)
            changes.wake()

    async def _next_retry(self) -> float | None:
        """Monotonic time at which to claim this run's failed items again, if some wait.

        The ledger's earliest due retry of the job (which may be another runner's: then, or
        if it is due already, the next look is :data:`HELD_POLL` away, never at once again).
        """
        run = self.run
        if not run.counters.waiting:
            return None
        due = await run.ledger.next_retry_at(self.config.job)
        if due is None:
            return None
        wait = due - run.clock()
        return time.monotonic() + (wait if wait > 0 else HELD_POLL)

    def _may_list(self, changes: Changes) -> bool:
        """Whether a poll may list names instead of a full scan: events are being followed
        (they tell of files changed in place), and no symlink needs a ``stat`` to follow."""
        return changes.live and not self.config.follow_symlinks

    async def _watch_poll(self, sightings: Sightings, paths: set[bytes], *, full: bool) -> bool:
        """A poll: a full scan, or a listing whose new names (and changed paths) are looked
        at; claim the ready files, then whatever else is open or waiting. Returns whether a
        directory a scan walks turned up (a listing does not look into new directories)."""
        run = self.run
        saw_dir = False
        # Items deleted from the ledger since the last poll (asyncbatch forget), or given back
        # to be taken again (written to while queued): their files are looked at now.
        self._forgotten_seq, forgotten = await run.ledger.forgotten_since(
            self.config.job, self._forgotten_seq
        )
        if forgotten:
            sightings.look_again(forgotten)
            paths.update(forgotten)
        if full:
            listings = self.listings
            listed = listings is not None and await listings.scan_begins()
            now_ns = time.time_ns()
            records = await self.scanner.scan(settle=None, now_ns=now_ns)
            found = len(records)
            walked = self.scanner.walked
            again: set[bytes] = set()
            if walked is None:
                candidates = sightings.scanned(records, now_ns, time.monotonic(), again=again)
            else:
                candidates = sightings.scanned(
                    records,
                    now_ns,
                    time.monotonic(),
                    walked.blocked,
                    walked.marker_keys,
                    again=again,
                )
                await self.markers.after_scan(walked)
            del records
            await self._ask_waiting(sightings)
            self._count_waiting(sightings)
            await self._claim_candidates(candidates, again)
            if listed and listings is not None:  # every file found is registered or waiting
                await listings.scan_ends(max(found - sightings.waiting, 0))
        else:  # events are followed: a listing (or one stat: no name changed) will do
            if not await self.scanner.unchanged():
                paths.update(sightings.unknown(await self.scanner.list_names()))
            saw_dir = await self._watch_look(sightings, paths)
        if self.registrar is not None:
            return saw_dir  # the claiming loop claims what is open or waiting
        if run.open:
            await self.claim_open()
        await self.claim_waiting()
        return saw_dir

    async def _watch_look(self, sightings: Sightings, paths: set[bytes]) -> bool:
        """Look at the changed paths and the waiting files now due; claim the ready ones.
        Returns whether a directory a scan walks was among them (its files need a scan)."""
        paths |= sightings.due(time.monotonic())
        if not paths:
            return False
        looked = sorted(paths)
        now_ns = time.time_ns()
        found = await self.scanner.look_at(looked)
        again: set[bytes] = set()
        candidates = sightings.looked(
            looked,
            found.records,
            now_ns,
            time.monotonic(),
            found.blocked,
            found.marker_keys,
            again=again,
        )
        await self._ask_waiting(sightings)
        self._count_waiting(sightings)
        await self._claim_candidates(candidates, again)
        if self._held and not self.run.stopping:
            # Claimed (registered), registered before, or no input (gone, skipped): the
            # messages that named them are done with; those of files still settling wait.
            await self._resolved(p for p in looked if not sightings.is_waiting(p))
        return found.walked_dir

    def _count_waiting(self, sightings: Sightings) -> None:
        """Count the files not ready yet as this poll or look left them, before its
        candidates are claimed: a claim waits for room in the queue (seconds, for many
        files), and meanwhile metrics and the heartbeat (``status``, ``history`` of a watch
        killed then) said the files that had settled since were not settled yet (20 files
        settled, registered and 8 done: "20 files not settled yet"). The candidates are
        counted as not registered yet until their claim (``claim_records``)."""
        count_not_ready(self.run.counters, sightings.waiting_by_rule())

    async def _ask_waiting(self, sightings: Sightings) -> None:
        """The files the watch found waiting for a rule that lasts (a marker, ...) and had not
        asked the ledger about: those it has finished (the rules changed since) wait for
        nothing, and are counted as a ready one would be (seen, done or dead before). One
        read per poll or look that found such files, not one per file."""
        records = sightings.unasked()
        if not records:
            return
        finished = await self._finished_states(records)
        sightings.asked(records, finished)
        counters = self.run.counters
        counters.add("seen", len(finished))
        for state in finished.values():
            counters.add("done_before" if state == "done" else "dead_before")

    async def _claim_candidates(self, candidates: list[bytes], again: set[bytes]) -> None:
        """Count the watch's candidates as seen, and claim (or register) them. ``again``:
        the relpaths among them of files this watch registered before (identity ``path``:
        the same item, counted when it was first seen), which are claimed as before but
        counted only where their claim finds them somewhere new (see :meth:`_sort`)."""
        counters = self.run.counters
        counters.add("seen", len(candidates) - len(again))
        counters.scanned = True
        if self.registrar is not None:
            await self.registrar(candidates)
        elif not again:
            await self.claim_records(candidates)
        else:
            await self.claim_records([r for r in candidates if split(r)[0] not in again])
            await self._claim_again([r for r in candidates if split(r)[0] in again])

    async def _claim_again(self, records: list[bytes]) -> None:
        """Claim the records of files this watch registered before, seen changed (identity
        ``path``): the items it counted already. Left unclaimed by a stop, they stay counted
        where they were."""
        twins: list[tuple[str, bytes]] = []
        items = self.prepare(records, twins)
        self._add_twins(twins)
        while items:
            size = await self._room()
            if self.run.stopping:
                return
            chunk, items = items[:size], items[size:]
            await self.claim(chunk, again=True)

    # -- claiming -----------------------------------------------------------------------------

    def prepare(
        self, records: Iterable[bytes], twins: list[tuple[str, bytes]] | None = None
    ) -> list[LeasedItem]:
        """Items (with key and input hash) for a chunk of scan records.

        With identity ``"content"`` a file that vanished or changed while hashed is counted
        vanished; one that is there but cannot be read (``EACCES``, ``EIO``) has no key: it is
        no item, not counted seen but ``unreadable`` (once a relpath), named in a warning, and
        the run is not ok (the next one tries it again); and a second file with the same bytes
        in the chunk done before (it is the same item), on the strength of the first one's
        attempt: given ``twins``, its key and record go there, for the caller to note
        (``RunState.add_twin``: on the event loop, not in
        the thread that hashes; a shared run's listing counts its files).
        """
        cfg = self.config
        identity = cfg.identity
        versioned = self._versioned
        counters = self.run.counters
        items: list[LeasedItem] = []
        keys: set[str] = set()
        for record in records:
            mtime_ns, rel, size, inode, ctime = unpack_item(record)
            digest = b""
            if identity == "content":
                try:
                    found = content_digest(
                        self.run.dir_fd, rel, size, mtime_ns, follow_symlinks=cfg.follow_symlinks
                    )
                except OSError as e:
                    self._unreadable(rel, e)
                    continue
                if found is None:
                    counters.add("vanished")
                    continue
                digest = found
            # (input_hash inline, not through _input_hash: once per item)
            version = inode if versioned else None
            ihash = input_hash(identity, rel, size, mtime_ns, digest, version)
            key = item_key(identity, ihash, mtime_ns)
            if identity == "content":
                if key in keys:
                    if twins is None:
                        counters.add("done_before")
                    else:
                        twins.append((key, record))
                    continue
                keys.add(key)
            items.append(LeasedItem(key, ihash, rel, size, mtime_ns, inode, ctime))
        return items

    def _unreadable(self, rel: bytes, error: OSError) -> None:
        """Count a file that could not be read to key it (identity ``content``) out of the
        seen, and in ``unreadable`` with a warning naming it, once a relpath (a watch finds
        it at every poll)."""
        counters = self.run.counters
        counters.seen -= 1
        if rel in self._unreadable_seen:
            return
        self._unreadable_seen.add(rel)
        counters.unreadable += 1
        log.warning(
            "cannot read %r to key it (identity content): %s; it is not handled",
            os.fsdecode(rel),
            error.strerror or error,
        )

    def _add_twins(self, twins: list[tuple[str, bytes]]) -> None:
        """Note the files :meth:`prepare` found with the bytes of another in their chunk as
        that one's twins (counted done before on the strength of its attempt)."""
        for key, record in twins:
            self.run.add_twin(key, record)

    def _input_hash(
        self, rel: bytes, size: int, mtime_ns: int, inode: int, digest: bytes = b""
    ) -> str:
        """An item's input hash; an object's includes its version tag (its ``inode``)."""
        version = inode if self._versioned else None
        return input_hash(self.config.identity, rel, size, mtime_ns, digest, version)

    def chunk_starts(self, count: int) -> list[int]:
        """Where each claim chunk starts, in the order to claim them.

        One runner claims in ``(mtime_ns, relpath)`` order. Runners sharing a job (``shared``)
        start at a random chunk and wrap around: they work on different parts of the inbox
        instead of racing for the same chunk, each still in order within its part.
        """
        starts = list(range(0, count, self.config.claim_batch))
        if self.config.shared and len(starts) > 1:
            turn = random.randrange(len(starts))
            starts = starts[turn:] + starts[:turn]
        return starts

    async def claim_records(self, records: list[bytes]) -> None:
        """Register and lease sorted scan records, a chunk per statement, into the queue."""
        run, cfg = self.run, self.config
        starts = self.chunk_starts(len(records))
        run.backlog_since = time.monotonic() if records else None  # (for metrics)
        run.counters.unregistered += len(records)
        for turn, start in enumerate(starts):
            block = records[start : start + cfg.claim_batch]
            while block:
                # Look-ahead bounded by the work in hand: lease the next chunk only once the
                # workers are about to need it (other runners sharing the job get the rest).
                size = await self._room()
                if run.stopping:
                    run.backlog_since = None
                    run.unclaimed.extend(block)  # what it leaves: the report looks them up
                    for later in starts[turn + 1 :]:
                        run.unclaimed.extend(records[later : later + cfg.claim_batch])
                    return
                chunk, block = block[:size], block[size:]
                run.counters.unregistered -= len(chunk)
                if not block and start == starts[-1]:
                    run.backlog_since = None  # the last of them are being claimed
                if cfg.identity == "content":
                    twins: list[tuple[str, bytes]] = []
                    items = await anyio.to_thread.run_sync(self.prepare, chunk, twins)
                    self._add_twins(twins)
                else:
                    items = self.prepare(chunk)
                await self.claim(items)

    async def _room(self) -> int:
        """Wait until the queue runs low; return how many items to lease then."""
        size = self.lookahead.next_chunk()
        await self.queue.wait_until_low(self.lookahead.low_water(size))
        return size

    async def claim(self, items: list[LeasedItem], *, again: bool = False) -> None:
        """Register and lease ``items`` (seen ones); count or note what the others are.
        ``again``: items this run counted already (see :meth:`_claim_again`)."""
        if not items:
            return
        run, cfg = self.run, self.config
        # Shielded from the claim to the tracking of what it leased: a cancellation that came
        # while the claim committed would otherwise leave those leases untracked (unreleased).
        with anyio.CancelScope(shield=True):
            began = time.monotonic()
            rows = await run.ledger.claim_scanned(
                cfg.job,
                run.owner,
                cfg.lease,
                [(i.key, i.relpath, i.size, i.mtime_ns, i.inode) for i in items],
            )
            if run.metrics is not None:
                run.metrics.claims.observe(time.monotonic() - began)
            leased = self._sort(items, rows, again=again)
            if run.twins:
                self._twins_found(items, {row.key: row for row in rows})
        self.lookahead.claimed(len(items), len(leased))
        await failpoints.ahit("after-claim")
        if self._held:
            await self._resolved(i.relpath for i in items)  # registered: the ledger has them
        await self._queue(leased)

    def _sort(
        self, items: list[LeasedItem], rows: list[ClaimedRow], *, again: bool = False
    ) -> list[LeasedItem]:
        """Count or note what a claim found of each item; track and return those it leased.
        ``again``: items this run counted already (see :meth:`_counted_again`)."""
        run = self.run
        by_key = {row.key: row for row in rows}
        leased: list[LeasedItem] = []
        for item in items:  # keep scan order: the ledger returns rows in any order
            row = by_key.get(item.key)
            if item.key in run.from_ledger and self._counted_before(item.key, row):
                continue
            if again and self._counted_again(item, row):
                if row is not None and row.post_action is not None:
                    self.posts.submit(
                        row.post_action, item.key, row.relpath, row.size, row.mtime_ns, row.inode
                    )
                continue
            if self._follows_another(item, row):  # the same bytes as another file's item
                continue
            # What the claim found replaces what was known. Found finished, an item this
            # run had open was finished by another runner since it began (noted so).
            was_open = run.close(item.key)
            if row is None:  # done: finished before, by this or another runner
                self._found_finished("done", was_open)
            elif row.state == "running":
                leased.append(item)
            elif row.state == "held":
                run.reopen(item.key, "held", item.record())
            elif row.state == "failed":
                run.reopen(item.key, "waiting", item.record())
            else:
                self._found_finished(row.state, was_open)
                if row.post_action is not None:
                    # The file that was handled, as recorded then: not the one just scanned,
                    # which may be a newer file under the same name (or, identity "content",
                    # another name with the same bytes) that must be left alone.
                    self.posts.submit(
                        row.post_action, item.key, row.relpath, row.size, row.mtime_ns, row.inode
                    )
        self._track(leased, by_key)
        return leased

    def _found_finished(self, state: str, was_open: bool) -> None:
        """Count an item a claim found finished (``state``: done or dead) done (dead) before;
        ``was_open``: this run had it open (see :meth:`.RunState.open_found_finished`)."""
        if was_open:
            self.run.open_found_finished(state)
        else:
            self.run.counters.add("dead_before" if state == "dead" else "done_before")

    def _follows_another(self, item: LeasedItem, row: ClaimedRow | None) -> bool:
        """Whether a claimed file counts by how an attempt of its item under way ends (one in
        flight, or, identity ``content``, one open with another file's record): nothing more
        to note of it."""
        if item.key in self.run.in_flight:
            self._with_in_flight(item)
            return True
        return item.key in self.run.open and self._twin_of_open(item, row)

    def _with_in_flight(self, item: LeasedItem) -> None:
        """Count a claimed file whose item is in flight done before, on the strength of that
        attempt. Identity ``content`` (another file with its bytes): noted as its twin
        (``RunState.add_twin``), to follow how it ends."""
        if self.config.identity == "content":
            self.run.add_twin(item.key, item.record())
        else:
            self.run.counters.add("done_before")

    def _twin_of_open(self, item: LeasedItem, row: ClaimedRow | None) -> bool:
        """Identity ``content``: a claimed file whose item this run counted open (held by
        another runner, or waiting for a retry) as another file with its bytes. Still open
        (``row``: held, failed), the claimed file is noted as its twin, to follow how it ends
        (``True``: nothing more to note of it). Else (leased now, or finished) the open file
        follows the claimed one's item instead (``False``: note the claim as any other's).
        Either way each of the two files is counted once."""
        run = self.run
        found = run.open.get(item.key)
        if self.config.identity != "content" or found is None:
            return False
        _, rel, *_ = unpack_item(found[1])
        if rel == item.relpath:
            return False  # the same file
        if row is not None and row.state in ("held", "failed"):
            run.add_twin(item.key, item.record())
            return True
        run.close(item.key)
        run.add_twin(item.key, found[1])
        return False

    def _twins_found(self, items: list[LeasedItem], rows: dict[str, ClaimedRow]) -> None:
        """Identity ``content``: of the items of a claim, those with twins (files counted
        done before on the strength of their attempt, see ``RunState.twins``) that the claim
        found finished, done or dead: their twins are too."""
        run = self.run
        for item in items:
            key = item.key
            if key not in run.twins or key in run.in_flight or key in run.open:
                continue
            row = rows.get(key)
            if row is None or row.state == "done":
                run.twins_ended(key, "done")
            elif row.state == "dead":
                run.twins_ended(key, "dead")

    def _counted_before(self, key: str, row: ClaimedRow | None) -> bool:
        """A scanned file that this run leased from the ledger before (left waiting by an
        earlier run) was counted as seen then (and in ``earlier``): it is the same file, not a
        second one. Returns whether there is nothing more to note of it: it is in flight, or
        ended (done or dead) and counted where it ended."""
        run, counters = self.run, self.run.counters
        run.from_ledger.discard(key)
        counters.seen -= 1
        counters.earlier -= 1
        return key in run.in_flight or row is None or row.state in ("done", "dead")

    def _counted_again(self, item: LeasedItem, row: ClaimedRow | None) -> bool:
        """An item this watch counted already, its file seen changed (identity ``path``):
        whether there is nothing more to note of it (it is in flight, or it ended, done or
        dead, and was counted where it ended). Else its claim is noted as any other's, the
        item counted once: an open one (held, waiting) moves on from where it was counted;
        one this run counted dead, put back by ``retry --dead``, is taken back from ``dead``,
        and one it counted vanished (written to while queued, given back) from ``vanished``;
        one that ended otherwise (registered anew after ``asyncbatch forget``) is seen again.

        Identity ``content``: one it counted vanished whose item another file with its bytes
        took up since (see ``RunState.twins``: in flight, or finished) is counted as that
        file's twin, done (dead) before, not vanished."""
        run, key = self.run, item.key
        if (
            self.config.identity == "content"
            and key in run.vanished_here
            and (key in run.in_flight or row is None or row.state in ("done", "dead"))
        ):
            run.vanished_here.discard(key)
            run.counters.vanished -= 1
            if key in run.in_flight:
                run.add_twin(key, item.record())
            elif row is not None and row.state == "dead":
                run.counters.add("dead_before")
            else:
                run.counters.add("done_before")
            return True
        if key in run.in_flight:
            return True
        if key in run.open:
            return False
        if row is None or row.state in ("done", "dead"):
            return True
        if key in run.dead_here:
            run.dead_here.discard(key)
            run.counters.dead -= 1
        elif key in run.vanished_here:
            run.vanished_here.discard(key)
            run.counters.vanished -= 1
        else:
            run.counters.add("seen")
        return False

    def _track(self, leased: list[LeasedItem], rows: dict[str, ClaimedRow]) -> None:
        """Note freshly leased items as in flight (released if the run ends early)."""
        run = self.run
        deadline = run.lease_deadline()
        in_flight = run.in_flight
        for item in leased:
            row = rows[item.key]
            item.fence, item.prior_attempts, item.prior_interrupted = (
                row.fence,
                row.attempts,
                row.interrupted,
            )
            # ctx.move() took the input somewhere before a crash?
            item.moved_to = decode_move(row.post_action)
            item.lease_deadline = deadline
            in_flight[item.key] = item

    async def _queue(self, leased: list[LeasedItem]) -> None:
        """Queue tracked items for the workers."""
        run = self.run
        if leased:
            if not run.stopping:  # else they stay leased, unstarted, and are released
                self.queue.put(leased)
            # Back-pressure on the whole pipeline, not just the queue: while finished items
            # wait for the committer, lease no more (memory stays bounded at a million files).
            await run.wait_for_room()

    async def claim_open(self) -> None:
        """Claim the open items again: due retries, and items other runners held."""
        run = self.run
        keys = list(run.open)
        if self.config.shared and self.config.identity == "content":
            keys = await self._open_to_claim(keys)
        items: list[LeasedItem] = []
        for key in keys:
            _, record = run.open[key]
            mtime_ns, rel, size, inode, ctime = unpack_item(record)
            ihash = (
                key
                if self.config.identity == "content"
                else self._input_hash(rel, size, mtime_ns, inode)
            )
            items.append(LeasedItem(key, ihash, rel, size, mtime_ns, inode, ctime))
        while items:
            size = await self._room()
            if run.stopping:
                return
            chunk, items = items[:size], items[size:]
            await self.claim(chunk)

    async def _open_to_claim(self, keys: list[str]) -> list[str]:
        """Runners sharing a job, identity ``content``: of this run's open items, those to
        claim again with the file this run has of each (see :meth:`claim_open`).

        The ledger's row says which file an item is, and another runner may have moved it to
        another file with its bytes since this run opened it (a listing made again queues one
        in place of a file that vanished: see ``SharedRun._list_again``). A claim with this
        run's file would put that one back in its place: a file another runner found gone
        was leased again to be found gone again, and when the listing had just queued its
        twin in its place, that twin was never handled (both runners ended, "1 vanished",
        the file still in the source, the run's exit 0). So only what the ledger has finished
        (done, dead: a claim leaves those rows as they are, and counts them), or does not hold,
        is claimed; pending, failed and held items are left to ``claim_waiting``, which leases
        them as the ledger has them (their file) when due, or once their holder is gone (see
        ``reap_gone_runners``), not claimed here: a held one may end vanished between this
        read and a claim, which would put this run's file back in its place. A vanished one
        whose file is this run's is closed (gone: the listing made again, or the others'
        counts, say what became of it); one whose file is another (a twin of the one that
        vanished) is claimed, and waits again as that file."""
        run, job = self.run, self.config.job
        states = await run.ledger.states_of(job, keys)
        kept: list[str] = []
        for key in keys:
            state = states.get(key)
            if state in ("pending", "failed", "running"):
                continue
            if state == "vanished":
                _, rel, *_ = unpack_item(run.open[key][1])
                found = [i for i in await run.ledger.find_items(job, key) if i.key == key]
                if not found or os.fsencode(found[0].relpath) == rel:
                    run.close(key)
                    continue
            kept.append(key)
        return kept

    async def claim_twins(self) -> None:
        """Claim, in place of each attempt that vanished (identity ``content``), one of the
        files with its bytes that were counted done before on its strength (see
        ``RunState.twins``): it is handled in this run, the others follow it."""
        run = self.run
        items: list[LeasedItem] = []
        for key, record in run.take_twins():
            mtime_ns, rel, size, inode, ctime = unpack_item(record)
            items.append(LeasedItem(key, key, rel, size, mtime_ns, inode, ctime))
        while items:
            size = await self._room()
            if run.stopping:
                for item in items:  # left: counted done before, looked up at the end
                    run.add_twin(item.key, item.record())
                return
            chunk, items = items[:size], items[size:]
            await self.claim(chunk)

    async def claim_waiting(self) -> int:
        """Lease what earlier runs left waiting in the ledger (pending, or failed and due),
        a claim's worth; return how many."""
        run = self.run
        size = await self._room()
        if run.stopping:
            return 0
        now = time.monotonic()
        if self.mode == "watch" and self._left_waiting:  # settled since: taken as any other
            self._left_waiting = {k: t for k, t in self._left_waiting.items() if t > now}
            self._left_order = [p for p in self._left_order if p[2] in self._left_waiting]
        with anyio.CancelScope(shield=True):  # as in claim(): what is leased is tracked
            began = time.monotonic()
            rows = await self._claim_waiting_rows(size)
            if run.metrics is not None:
                run.metrics.claims.observe(time.monotonic() - began)
            taken, ctimes = await self._leave_unsettled(rows)
            leased = self._waiting_items(taken, ctimes)
        # Rows left waiting (not settled) are skipped by every later claim: a claim of a few
        # rows at a time would walk past all of them each time (O(n²) for a run whose waiting
        # items are mostly not settled); most rows left, the next claim takes a whole batch.
        self.lookahead.claimed(len(rows), len(taken))
        await self._queue(leased)
        return len(rows)

    async def _claim_waiting_rows(self, size: int) -> list[ClaimedRow]:
        """Lease up to ``size`` waiting items, past those left waiting (``_left_waiting``).

        Those are the first in claim order: a claim from the first waiting item walks past
        every one of them, which made a run whose waiting items were mostly not settled
        O(n²). So while some are left waiting, a claim that leased ``size`` rows is followed
        by one from where it ended (skipping only those left waiting after that place); one
        that leased fewer ended the pass, and a claim that found nothing from there looks
        again from the first (a retry come due, an item released before that place)."""
        run, cfg = self.run, self.config
        after = self._waiting_after
        order = self._left_order
        start = 0 if after is None else bisect.bisect_right(order, after, key=lambda p: p[:2])
        rows = await run.ledger.claim_waiting(
            cfg.job, run.owner, cfg.lease, size, [p[2] for p in order[start:]], after
        )
        if after is not None and not rows:
            self._waiting_after = None
            return await self._claim_waiting_rows(size)
        ends = max(((r.mtime_ns, r.relpath) for r in rows), default=None)
        self._waiting_after = ends if self._left_waiting and len(rows) >= size else None
        return rows

    async def _leave_unsettled(
        self, rows: list[ClaimedRow]
    ) -> tuple[list[ClaimedRow], dict[str, int]]:
        """Of the items ``claim_waiting`` leased, those to handle now, and the ctime of each
        one's file as looked at now (by key: the worker checks it did not change since, as it
        does for a scanned file's). The others are released at once, left waiting: items that
        earlier runs left waiting (a run stopped, ``retry --dead``) whose file is not settled
        (a ``chmod``, a ``mv`` back into the source: its ctime is new), or that a one-shot
        run's scan left out as not ready yet (by any rule: a marker missing, say). A file not
        settled (or not ready) is never handled, whether its item comes from a scan or from the
        ledger; a one-shot run counts it once, not
        settled yet (its scan's count, or one more: it changed since), and leaves it to the
        run that finds it settled; a watch leases it again once it settled (its sightings
        count it meanwhile). Runners sharing a job leave it too; their counts are the job's
        listing's, which left the file out (its change came before the listing began, or the
        listing would have found it settled): counted there, once. Not for this run's own
        items (retries), inputs ``ctx.move()`` took elsewhere (they go on where they are),
        or objects (immutable once visible: an object waiting in the ledger was settled
        when registered, and settled it stays; a new version is a new item)."""
        run, cfg = self.run, self.config
        if not rows or cfg.objects is not None:
            return rows, {}
        if not self.ready.age and not (self.mode == "run" and self._not_ready):
            return rows, {}  # (no settle rule, and no file the scan left out by another)
        looked = [
            r
            for r in rows
            if r.key not in run.open
            and r.key not in run.in_flight
            and not decode_move(r.post_action)
        ]
        if not looked:
            return rows, {}
        found = await anyio.to_thread.run_sync(self._stat_all, looked)
        now_ns = time.time_ns()
        left: dict[str, int] = {}  # key -> fence
        ctimes: dict[str, int] = {}
        for row, st in zip(looked, found, strict=True):
            if self._not_settled(row, st, now_ns):
                left[row.key] = row.fence
            elif st is not None and (st.st_size, clamp_ns(st.st_mtime_ns), st.st_ino) == (
                row.size,
                row.mtime_ns,
                row.inode,
            ):
                ctimes[row.key] = st.st_ctime_ns
        if not left:
            return rows, ctimes
        await run.ledger.release_items(cfg.job, run.owner, list(left.items()))
        return [r for r in rows if r.key not in left], ctimes

    def _not_settled(self, row: ClaimedRow, st: os.stat_result | None, now_ns: int) -> bool:
        """For :meth:`_leave_unsettled`: whether the file of an item leased from the ledger
        (``st``: as it is now, ``None``: gone) is not settled, or was left out as not ready
        by a one-shot run's scan; such an item is noted as left waiting, and counted."""
        run_mode = self.mode == "run"
        if run_mode and row.relpath in self._not_ready:
            self._leave(row, math.inf)  # the scan counted it not ready yet
            self.run.left_waiting.add(row.key)
            return True
        if st is None or not self.ready.age:
            return False
        changed = max(st.st_mtime_ns, st.st_ctime_ns)
        settle_ns = int(self.config.settle * 1e9)
        if changed + settle_ns <= now_ns:
            return False
        if run_mode:  # changed since the scan: one more not settled yet, for the whole run
            self._leave(row, math.inf)
            self.run.left_waiting.add(row.key)
            self._not_ready.add(row.relpath)
            if not self.config.shared:  # (shared: counted by the listing, see above)
                self.run.counters.unsettled += 1
                if changed > now_ns:
                    self.run.counters.future += 1
        else:  # a watch: until it settled
            self._leave(row, time.monotonic() + (changed + settle_ns - now_ns) / 1e9)
        log.info(
            "%r: left waiting: not settled (changed %.1fs ago, settle %gs)",
            os.fsdecode(row.relpath),
            max(now_ns - changed, 0) / 1e9,
            self.config.settle,
        )
        return True

    def _leave(self, row: ClaimedRow, until: float) -> None:
        """Note ``row``'s item left waiting until the monotonic time ``until``."""
        if row.key not in self._left_waiting:
            bisect.insort(self._left_order, (row.mtime_ns, row.relpath, row.key))
        self._left_waiting[row.key] = until

    def _stat_all(self, rows: list[ClaimedRow]) -> list[os.stat_result | None]:
        """The files of ``rows`` as they are now (``None``: gone, or unreadable: the worker
        says which); in a worker thread."""
        follow, dir_fd = self.config.follow_symlinks, self.run.dir_fd
        out: list[os.stat_result | None] = []
        for row in rows:
            try:
                out.append(os.stat(row.relpath, dir_fd=dir_fd, follow_symlinks=follow))
            except OSError:
                out.append(None)
        return out

    async def take_queued(self) -> int:
        """Take what the listing of runners sharing the job queued (see
        ``Ledger.take_queued``), a claim's worth, leased; return how many files were taken."""
        run, cfg = self.run, self.config
        size = await self._room()
        if run.stopping:
            return 0
        with anyio.CancelScope(shield=True):  # as in claim(): what is leased is tracked
            began = time.monotonic()
            taken, rows = await run.ledger.take_queued(cfg.job, run.owner, cfg.lease, size)
            if run.metrics is not None and taken:
                run.metrics.claims.observe(time.monotonic() - began)
            leased = self._queued_items(taken, rows)
        self.lookahead.claimed(len(taken), len(leased))
        await self._queue(leased)
        return len(taken)

    def _queued_items(self, taken: list[QueuedRow], rows: list[ClaimedRow]) -> list[LeasedItem]:
        """Items for the queued files a take leased, tracked. The others the ledger holds
        already: held by another runner, or waiting for a retry (claimed when due), or
        finished, whose post-commit action is carried out again if one is recorded (as a
        listing does: see ``SharedRun._finish_actions``)."""
        run = self.run
        by_key = {row.key: row for row in rows}
        leased: list[LeasedItem] = []
        for key, relpath, size, mtime_ns, inode, ctime, ihash in taken:
            row = by_key.get(key)
            if row is None:
                continue
            if row.state == "running":
                if key not in run.in_flight:  # (else the same bytes as one in flight)
                    leased.append(LeasedItem(key, ihash, relpath, size, mtime_ns, inode, ctime))
            elif row.state in ("done", "dead") and row.post_action is not None:
                self.posts.submit(
                    row.post_action, key, row.relpath, row.size, row.mtime_ns, row.inode
                )
        self._track(leased, by_key)
        return leased

    def _waiting_items(
        self, rows: list[ClaimedRow], ctimes: dict[str, int] | None = None
    ) -> list[LeasedItem]:
        """Items for rows claim_waiting leased (ours, or earlier runs'), tracked; ``ctimes``:
        the ctime of the file of some of them, as looked at when leased."""
        ctimes = ctimes or {}
        run, cfg = self.run, self.config
        leased: list[LeasedItem] = []
        for row in sorted(rows, key=lambda r: (r.mtime_ns, r.relpath)):
            ihash = (
                row.key
                if cfg.identity == "content"
                else self._input_hash(row.relpath, row.size, row.mtime_ns, row.inode)
            )
            item = LeasedItem(
                row.key,
                ihash,
                row.relpath,
                row.size,
                row.mtime_ns,
                row.inode,
                ctimes.get(row.key, 0),
            )
            if row.key in run.open:  # one of ours (its retry came due)
                run.close(row.key)
            elif row.key in run.dead_here:  # ours, dead, and put back by `retry --dead` since
                run.dead_here.discard(row.key)
                run.counters.dead -= 1
            elif not cfg.shared:  # left waiting by an earlier run: seen now, counted like any
                run.counters.add("seen")  # other (shared: registered by the job's listing, which
                run.counters.earlier += 1  # the report counts at the end: see .shared)
                run.from_ledger.add(row.key)
            leased.append(item)
        self._track(leased, {row.key: row for row in rows})
        return leased

    # -- finishing a run ----------------------------------------------------------------------

    async def finish(self) -> None:
        """Keep at it until every seen file is done or dead (or held, with ``wait=False``).

        Waits for its own items in flight; claims open items again (a retry due, a lease
        released or expired, a runner found dead on this host); waits for the rest, looking
        again every :data:`HELD_POLL` seconds or when a retry comes due. Then leases what
        earlier runs left waiting in the ledger.
        """
        run, cfg = self.run, self.config
        told = -1
        while not run.stopping:
            if run.twins_due:
                await self.claim_twins()
            if run.in_flight:
                # Our own items are still out: wait until one fails (it may need a retry) or
                # all are back, not for every commit.
                await run.wait_for_progress(cfg.lease / 4)
                continue
            if run.open:
                await reap_gone_runners(run.ledger, cfg.job, run.me, run.counters)
                await self.claim_open()
                if run.in_flight or not run.open:
                    continue
                held = run.counters.held
                if held and not cfg.wait and not run.counters.waiting:
                    return  # wait=False: the report says what others hold
                if held != told:
                    told = held
                    if held:
                        log.info("waiting for %d items other runners hold", held)
                await self._wait_for_open(held > 0 and cfg.wait)
                continue
            if run.relook:
                await self.look_again_changed()
                continue
            if await self.claim_waiting():
                continue
            return

    async def look_again_changed(self) -> None:
        """Look again at the paths of the items this run found vanished because their file
        changed after the scan (see ``RunState.relook``): the path holds a file still, its new
        version (or, its key kept, the same item written to), which a scan now would find.
        Such a file is not counted vanished: settled (and ready by the other rules), it is
        claimed, as a scan would claim it (a new item, or the same one again), counted where
        it ends; else it is counted not ready yet (taken by the run that finds it ready), not
        seen. A path with no file any more keeps its count: vanished."""
        run, counters = self.run, self.run.counters
        changed, run.relook = run.relook or [], []
        keys = {rel: key for key, rel in changed}
        # The scan's rule: settled by a clock read before the look (a file written during it
        # is not), and one look again a path a run: changed again since, it is still being
        # written (a file appended to without end would be taken, and found changed, for ever).
        now_ns = time.time_ns()
        found = await self.scanner.look_at(sorted(keys))
        after_ns = time.time_ns()  # (ahead of the clock: of this one, read after the stats)
        again = self.looked_again(keys)
        take: list[bytes] = []
        for record in found.records:
            rel = split(record)[0]
            key = keys.get(rel)
            if key is None:
                continue  # (a marker looked at with its file)
            counters.vanished -= 1
            run.vanished_here.discard(key)
            rule = self.not_ready_rule(record, found.blocked, now_ns, again)
            if not rule:
                run.from_ledger.discard(key)  # (counted seen once: here)
                take.append(record)
                continue
            counters.seen -= 1
            name = NOT_READY[rule]
            setattr(counters, name, getattr(counters, name) + 1)
            if rule == "age" and ready_ns(record) > after_ns:
                counters.future += 1
            self._not_ready.add(rel)
            if key in run.from_ledger:
                run.from_ledger.discard(key)
                counters.earlier -= 1
        if take:
            await self.claim_records(take)

    def looked_again(self, paths: Iterable[bytes]) -> set[bytes]:
        """The paths looked at again before in this run (see :meth:`not_ready_rule`); these
        ``paths`` are noted as looked at again from now."""
        before = self._looked_again
        self._looked_again = before | set(paths)
        return before

    def not_ready_rule(
        self, record: bytes, blocked: dict[bytes, str], now_ns: int, again: set[bytes]
    ) -> str:
        """For a look again at a path (see :meth:`look_again_changed`): the readiness rule
        the file ``record`` found there fails now (``blocked``: what the job's rules beyond
        ``age`` found, by relpath), ``""`` when it is ready: as a scan would find it, settled
        by ``now_ns`` (read before the look). A path in ``again`` was looked at again before
        in this run, and changed since: still being written, it is not settled."""
        ready = self.ready
        rel = split(record)[0]
        rule = blocked.get(rel, "")
        if not rule and (
            rel in again or (ready.age and ready_ns(record) + ready.settle_ns > now_ns)
        ):
            rule = "age"
        if not rule and ready.looks > 1:
            rule = "stable"  # one look: the looks it waits for are the next run's
        return rule

    async def _wait_for_open(self, held: bool) -> None:
        """Wait for a retry to come due, or (``held``) for another look at held items."""
        run, cfg = self.run, self.config
        wait = min(HELD_POLL, cfg.lease / 4) if held else cfg.lease / 4
        if run.counters.waiting:
            due = await run.ledger.next_retry_at(cfg.job)
            until = 0.0 if due is None else due - run.clock()  # None: taken by another runner
            if until > wait and not held:
                log.info("waiting %.1fs for the next retry", until)
            wait = min(wait, until) if held else until
        if wait > 0:
            await run.wait_for_progress(wait)
