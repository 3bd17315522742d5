"""What the parts of one run's pipeline share: its settings, its ledger, its leased items, its
counters, and the signals between the parts. Nothing else crosses from one part to another.

Made per run (``Batch.run()`` or ``Batch.watch()``) by :class:`~.runner.Run`; nothing here is
shared between runs or items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio

from .._config import BatchConfig
from .._ledger import Ledger, Listing, Outcome
from .._procinfo import ProcessIdentity
from .._report import Counters
from .._sources.base import SourceHandle
from .._sources.store import ObjectStores
from .queues import LeasedItem
from .recorder import Recorder

__all__ = ["RunState", "reap_gone_runners"]

log = logging.getLogger("asyncbatch")


async def reap_gone_runners(
    ledger: Ledger, job: str, me: ProcessIdentity, counters: Counters, *, orphans: bool = False
) -> int:
    """Put back the items of the job's runners that are gone (with ``orphans``, also those
    leased to owners without a runner record; see ``Ledger.reap_stale_runners``); count and log
    how many."""
    reaped = await ledger.reap_stale_runners(job, me, orphans=orphans)
    if reaped:
        counters.reaped += reaped
        log.warning("%d item%s of runners that are gone put back", reaped, "s" * (reaped != 1))
    return reaped


@dataclass(eq=False, kw_only=True)
class RunState:
    """The shared state of one run's claimer, workers and committer."""

    config: BatchConfig
    ledger: Ledger
    #: This runner's id in the ledger: the owner of its leases.
    owner: str
    me: ProcessIdentity
    clock: Callable[[], float]
    counters: Counters
    #: When this runner started (``clock``'s time), if before the run began (``None``: as
    #: ``counters`` began): the command line's, when its process began importing asyncbatch.
    started_at: float | None = None
    #: Leased and not yet committed, by key: released if the run ends early.
    in_flight: dict[str, LeasedItem] = field(default_factory=dict)
    #: Seen items neither finished nor in flight, by key: ``("held", record)`` when another
    #: runner had it at the last look, ``("waiting", record)`` when it failed and waits for a
    #: retry. The claimer leases them again until each is finished (see ``Claimer.finish``).
    open: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    #: Of the items this run saw open (or gave back) and then found finished, by state
    #: (``done``, ``dead``): other runners finished them since this run began, and it counted
    #: them done (dead) before already (see ``shared._registered_and_finished_by_others``).
    open_finished: dict[str, int] = field(default_factory=dict)
    #: Keys leased from the ledger (left waiting by earlier runs, not found by a scan) and
    #: counted as seen then: a watch's later scan that finds the same file does not count it
    #: again (see ``Claimer._sort``). Bounded by what earlier runs left waiting.
    from_ledger: set[str] = field(default_factory=set)
    #: Keys of items waiting in the ledger that this one-shot run leased and gave back, their
    #: file not settled (or not ready), left waiting for the rest of the run (see
    #: ``Claimer._leave_unsettled``): a shared run's job is finished without them.
    left_waiting: set[str] = field(default_factory=set)
    #: Keys this run counted dead. An operator's ``retry --dead`` during a watch puts one back
    #: in the ledger: when this run leases it again, that count is taken back, and its next
    #: outcome counts instead (the same file, seen once). Bounded by the run's dead count.
    dead_here: set[str] = field(default_factory=set)
    #: Keys of items a worker gave back as vanished because their file was written to after
    #: its scan with the item's key kept (its ctime changed: a ``chmod``, a link, a copier
    #: setting its mtime back; identity ``path``: any change): the same item, to be taken
    #: again once settled. Taken out by the committer (a handful at a time).
    rewritten: set[str] = field(default_factory=set)
    #: Keys of items a worker found vanished because their file changed after its scan (a
    #: new version, a new item: identity ``stat`` or ``content``). Taken out by the committer.
    changed: set[str] = field(default_factory=set)
    #: A one-shot run's (not shared): the ``(key, relpath)`` of the items it counted vanished
    #: because their file changed after the scan (:attr:`rewritten`, :attr:`changed`), whose
    #: paths the claimer looks at again before the run ends (``Claimer.look_again_changed``):
    #: a file there is taken, as a scan would take it, or counted not ready yet, not
    #: vanished. ``None``: not such a run (a watch looks by its own means).
    relook: list[tuple[str, bytes]] | None = None
    #: A shared ``run()``'s: the items a worker found vanished because their file changed
    #: after the listing queued it (:attr:`rewritten`, :attr:`changed`), with their outcome and
    #: whether their key was kept (rewritten), held back by the committer, still leased (the
    #: other runners see them running: their job is not finished), until the claimer looked
    #: at their paths again (``SharedRun.look_again_changed``), and then committed (or, their
    #: key kept and their file ready, given back and claimed again). ``None``: not such a run.
    relook_due: list[tuple[LeasedItem, Outcome, bool]] | None = None
    #: Keys of items held back so and looked at again, by whether their path held a file
    #: then (not counted vanished: its new version was taken, or counted not ready yet).
    relooked: dict[str, bool] = field(default_factory=dict)
    #: Keys this run counted vanished that way (see :attr:`rewritten`). A watch that looks
    #: at such a file again (the ledger's log, see ``Ledger.look_again``) and leases its item
    #: again takes that count back, and its next outcome counts instead (the same file, seen
    #: once). Bounded by the run's vanished count.
    vanished_here: set[str] = field(default_factory=set)
    #: Identity ``content``: the records of files counted done before on the strength of an
    #: attempt of their item (the same bytes under another name, leased with them or in
    #: flight), by the item's key, whoever's file that attempt is. They follow how the item
    #: ends here: done, they are done before; dead, dead before (:meth:`twins_ended`). An
    #: attempt that ends vanished (its file deleted or changed while queued) handled none of
    #: them: the key is noted in :attr:`twins_due`, and the claimer takes one of them in its
    #: place (:meth:`take_twins`), the others following that attempt (or a third copy's,
    #: leased first). What the run leaves of them is looked up in the ledger at its end
    #: (``reconcile``). Bounded by the files of the items in flight or open.
    twins: dict[str, list[bytes]] = field(default_factory=dict)
    twins_due: set[str] = field(default_factory=set)
    #: Scan records the claimer did not get to (the run stopped first), and the keys of the
    #: items given back unfinished at the end: what the final report looks up in the ledger
    #: (another runner may have finished them meanwhile).
    unclaimed: list[bytes] = field(default_factory=list)
    given_back: list[str] = field(default_factory=list)
    #: A watch's files seen and not ready yet (their records, the rule each waits for, and
    #: whether the watch counted it already), as the watch has them
    #: (``Sightings.waiting_files``): the final report asks the ledger which it has finished
    #: (one read at the end, not one a look). ``None``: not a watch.
    waiting_files: Callable[[float], list[tuple[bytes, str, bool]]] | None = None
    #: A watch's files not ready yet by rule, as they stand at a monotonic time
    #: (``Sightings.waiting_by_rule``): what its live counts (metrics, heartbeat) say.
    waiting_now: Callable[[float], Mapping[str, int]] | None = None
    #: Runners sharing the job: the fence of the listing role while this runner holds it
    #: (renewed by the heartbeat, which clears it once another runner took the role over),
    #: whether it ever held it, the role as last looked at (for status and metrics), and the
    #: complete listing the run went by (for its report; see :mod:`.shared`).
    lister_fence: int | None = None
    listed: bool = False
    #: Whether this runner, holding the role, is done with the listing it made (a ``run()``
    #: started since may take the role over to list again: not a loss, see ``SharedRun``).
    lister_idle: bool = False
    listing_role: Listing | None = None
    listing: Listing | None = None
    listing_target: int | None = None
    #: Identity "content": the files of the complete listing numbered ``listing_twins[0]``
    #: not queued for the bytes of one it queued (``Ledger.listing_twins``), as read when the
    #: run took that listing up: the next listing, once complete, replaces them.
    listing_twins: tuple[int, dict[str, int]] | None = None
    #: Files this run counted vanished before the listing it goes by began (one made again,
    #: see ``SharedRun._list_again``, after they were gone): seen, though not in it.
    unlisted: int = 0
    #: The job's counts as the look that found it finished read them, and what other
    #: runners had finished since its listing began (for the report; see ``shared_report``).
    finished_counts: dict[str, int] | None = None
    finished_by_others: dict[str, int] | None = None
    #: Set once a shared run's report counted the job's listing (``shared_report``): its
    #: counters are final then, and what it says of itself is them as they are.
    reported: bool = False
    #: Set once this runner's tenure of the listing role ended (taken over).
    role_lost: anyio.Event = field(default_factory=anyio.Event)
    #: The source, opened for the run: a directory (``SourceDir``: inputs are opened relative
    #: to it) or an object-store prefix (``ObjectSource``).
    source: SourceHandle
    #: The run's object-store clients and their request counts (``None`` until an ``s3://``
    #: source, archive or output needs one: then obstore is loaded).
    objects: ObjectStores | None = None
    #: Set by a stop request (``Batch.stop()``, a signal).
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    #: No new items are started once this is set (a stop, or the end of the grace period).
    stopping: bool = False
    #: What metrics record (``None`` with metrics off: each hook is one ``None`` check).
    metrics: Recorder | None = None
    #: While scanned files wait to be claimed: since when (``time.monotonic()``, the end of
    #: the scan that found them); ``None`` when none waits.
    backlog_since: float | None = None
    _progress: anyio.Event = field(default_factory=anyio.Event)
    _room: anyio.Event = field(default_factory=anyio.Event)
    #: Heartbeats begun and ended, and the signals between the heartbeat and the workers that
    #: wait for one (see :meth:`renew_leases`).
    _beats_begun: int = 0
    _beats_ended: int = 0
    #: When the last beat began (``time.monotonic()``): what it renewed counts from then.
    _beat_began: float | None = None
    _beat_wanted: anyio.Event = field(default_factory=anyio.Event)
    _beat_ended: anyio.Event = field(default_factory=anyio.Event)

    @property
    def dir_fd(self) -> int:
        """The source directory's descriptor (see ``SourceDir``; -1 for objects)."""
        return self.source.fd

    def lose_listing_role(self) -> None:
        """This runner does not hold the listing role any more (another took it over)."""
        self.lister_fence = None
        self.role_lost.set()

    def lease_margin(self) -> float:
        """Seconds from now until a lease taken now must be given up locally (before another
        runner may take it over)."""
        return self.config.lease - min(5.0, self.config.lease * 0.1)

    def lease_deadline(self) -> float:
        """The local monotonic deadline of a lease taken (or renewed) now."""
        return time.monotonic() + self.lease_margin()

    # -- leases renewed on demand ----------------------------------------------------------------

    async def renew_leases(self) -> None:
        """Have the heartbeat renew the leases now, and wait until a heartbeat begun after this
        call has ended (it updated each lease's local deadline, or marked it lost).

        For a worker about to start an item whose local deadline passed (the runner was
        suspended, or its event loop stalled): the ledger, not the clock, says whether the
        lease is still ours. If the runner itself was taken over, the heartbeat stops the run.
        """
        target = self._beats_begun + 1
        self._beat_wanted.set()
        while self._beats_ended < target:
            await self._beat_ended.wait()

    async def until_beat_due(self, interval: float) -> None:
        """For the heartbeat: wait until ``interval`` seconds after the last beat began, or
        less if a worker wants a beat. A beat renews from its start (the lease counts from
        then, and so does health's ``heartbeat`` check): one that took long (the ledger was
        busy) is followed at once, not ``interval`` after it ended, which left the renewal
        stale for up to ``interval`` seconds after the ledger answered again."""
        wait = interval
        if self._beat_began is not None:
            wait = self._beat_began + interval - time.monotonic()
        with anyio.move_on_after(max(wait, 0.0)):
            await self._beat_wanted.wait()
        self._beat_wanted = anyio.Event()
        self._beats_begun += 1
        self._beat_began = time.monotonic()

    def beat_ended(self) -> None:
        """For the heartbeat: the beat begun last has ended (its renewals are applied)."""
        self._beats_ended = self._beats_begun
        self._beat_ended.set()
        self._beat_ended = anyio.Event()

    # -- the claimer waits for the committer ------------------------------------------------------

    @property
    def max_in_flight(self) -> int:
        """How many items may be leased and not yet committed at once."""
        cfg = self.config
        return 3 * cfg.claim_batch + cfg.concurrency + 4 * cfg.commit_batch

    async def wait_for_room(self) -> None:
        """Wait while :attr:`max_in_flight` items are leased and not yet committed."""
        while len(self.in_flight) >= self.max_in_flight and not self.stopping:
            self._room = anyio.Event()
            await self._room.wait()

    def made_room(self) -> None:
        """Called by the committer after it retired items (and on a stop)."""
        self._room.set()

    def wake(self) -> None:
        """Wake the claimer waiting in :meth:`wait_for_progress` (or its next wait)."""
        self._progress.set()

    async def wait_for_progress(self, seconds: float) -> None:
        """Wait until :meth:`wake` is called, the run stops, or ``seconds`` pass.

        A wake-up that came while the claimer was busy elsewhere is not lost: it ends the
        next wait at once.
        """
        if not self.stopping and not self._progress.is_set():
            with anyio.move_on_after(seconds):
                await self._progress.wait()
        self._progress = anyio.Event()

    def reopen(self, key: str, why: str, record: bytes) -> None:
        """Note a seen item as open: ``"held"`` by another runner, or ``"waiting"`` for a retry."""
        self.close(key)
        self.open[key] = (why, record)
        if why == "held":
            self.counters.held += 1
        else:
            self.counters.waiting += 1

    def close(self, key: str) -> bool:
        """The item is no longer open (leased again, or finished); whether it was."""
        found = self.open.pop(key, None)
        if found is None:
            return False
        if found[0] == "held":
            self.counters.held -= 1
        else:
            self.counters.waiting -= 1
        return True

    def open_found_finished(self, state: str, files: int = 1) -> None:
        """Count ``files`` of an item this run saw open (or gave back), found ``state``
        (``done`` or ``dead``): done (dead) before, finished by another runner since this run
        began (:attr:`open_finished`)."""
        name = "dead" if state == "dead" else "done"
        self.counters.add(f"{name}_before", files)
        self.open_finished[name] = self.open_finished.get(name, 0) + 1

    # -- files with the bytes of an item in flight (identity "content") ------------------------

    def add_twin(self, key: str, record: bytes) -> None:
        """A file with the bytes of the item ``key``, in flight or leased with it: counted done
        before on the strength of that attempt, and noted as its twin (see :attr:`twins`)."""
        self.counters.done_before += 1
        self.twins.setdefault(key, []).append(record)

    def twins_ended(self, key: str, state: str) -> None:
        """The item ``key`` is finished, ``done`` or ``dead``: its twins are done before (as
        counted), or dead before."""
        twins = self.twins.pop(key, None)
        self.twins_due.discard(key)
        if twins and state == "dead":
            self.counters.done_before -= len(twins)
            self.counters.dead_before += len(twins)
        if twins:  # (counted done before as they were found; as events, now it is known)
            name = "dead_before" if state == "dead" else "done_before"
            setattr(self.counters.events, name, getattr(self.counters.events, name) + len(twins))

    def take_twins(self) -> list[tuple[str, bytes]]:
        """One twin of each item whose attempt vanished and that has none since (neither in
        flight nor open), its count of done before taken back: to be claimed (it counts by
        how it ends); the others follow its attempt."""
        taken: list[tuple[str, bytes]] = []
        for key in self.twins_due:
            twins = self.twins.get(key)
            if not twins or key in self.in_flight or key in self.open:
                continue  # (another file of the item was leased since: they follow it)
            taken.append((key, twins.pop(0)))
            if not twins:
                del self.twins[key]
            self.counters.done_before -= 1
        self.twins_due.clear()
        return taken

    def stop(self) -> None:
        """Start no new items; wake every part that waits, so it sees the stop."""
        self.stopping = True
        self.wake()
        self.made_room()
