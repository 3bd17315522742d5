"""What a run did: live counters while it runs, a :class:`Report` when it ends.

Every settled file a run sees ends in exactly one category, and the categories add up::

    done + done_before + held + waiting + dead + dead_before + vanished + unfinished == seen

- ``done``: completed by this run (its completion committed).
- ``done_before``: found done, by an earlier run or by another runner meanwhile.
- ``held``: leased to another runner when this run ended (only with ``wait=False``, or when
  stopped; a waiting run takes them over or sees them done).
- ``waiting``: failed, waiting for a retry when this run ended (it was stopped).
- ``dead``: given up on by this run; ``dead_before``: found dead.
- ``vanished``: gone, or changed, before it could be handled.
- ``unfinished``: not reached, or given back unfinished, because the run stopped.

``seen`` counts the settled files the scan found and the items earlier runs left waiting in the
ledger that this run took on (a crashed run's item whose input ``ctx.move()`` had moved, say);
``earlier`` says how many of the seen were of the second kind.

The counts' names live in one place, :class:`~asyncbatch._ledger.types.RunTotals`; the
classes here extend it, and everything that lists the counts iterates its fields.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

from ._ledger.types import CATEGORIES, LABELS, TOTALS, RunTotals

__all__ = ["EVENTS", "Counters", "Events", "Report", "Statistics", "describe"]

#: The categories a seen file is finished in, one way or another (never goes back).
_FINISHED = ("done", "done_before", "dead", "dead_before", "vanished")


@dataclass(slots=True, kw_only=True)
class Statistics(RunTotals):
    """A snapshot of a running batch (``batch.statistics()``), for progress displays.

    The counts are those of :class:`Report` as they stand now; ``in_flight`` items are leased
    to this run and not committed yet; ``scanned`` says whether ``seen`` is final.
    """

    scanned: bool = False
    in_flight: int = 0
    elapsed: float = 0.0

    @property
    def finished(self) -> int:
        """Seen files that are done with, one way or another (never decreases)."""
        return sum(getattr(self, name) for name in _FINISHED)


@dataclass(slots=True, kw_only=True)
class Report(RunTotals):
    """The outcome of ``Batch.run()`` (or of a stopped ``Batch.watch()``).

    The categories of the seen files (see the module) add up to ``seen``. Besides them:
    ``failed`` counts failed attempts (each retried, or made dead); ``lost``, outcomes refused
    because another runner had taken the lease (those files are counted where they ended:
    done before, held, ...); ``earlier``, how many of the seen were left waiting in the ledger
    by earlier runs (not found by the scan); ``unsettled``, the files the last scan found not
    settled yet (``future`` of them changed at a time ahead of this host's clock);
    ``unregistered``, files the scan found and the run did not register (it was stopped);
    ``post_failed``, post-commit actions (archive, delete) that failed (the next run finishes
    them); ``unreadable``, files found that could not be read to key them (identity
    ``content``: an item's key is its bytes' hash), not items and not counted seen, never
    handled (each was named in a warning); ``unlisted``, directories below the source that a
    run's scan could not list (no permission, an I/O error: named in a warning), whose files
    are in no count and not handled; ``counts``, the job's items by state when the run
    ended; ``stopped``, whether it was stopped before the end (``stop()`` or a signal).
    """

    job: str
    elapsed: float
    counts: dict[str, int] = field(default_factory=dict)
    stopped: bool = False
    mode: str = "run"
    post_failed: int = 0
    future: int = 0
    unreadable: int = 0
    unlisted: int = 0

    @property
    def ok(self) -> bool:
        """Whether every settled file seen is done: none dead, held, waiting or unfinished, no
        post-commit action (archive, delete) failed, no file found that could not be read to
        key it (identity ``content``), no directory that could not be listed, and (for
        ``run()``) not stopped. A stopped ``watch()`` is ok: stopping is how a watch ends,
        and what it gave back unfinished is handled by the next one."""
        if self.stopped and self.mode == "run":
            return False
        unfinished = self.unfinished if self.mode == "run" else 0
        return not (
            self.dead
            or self.dead_before
            or self.held
            or self.waiting
            or unfinished
            or self.post_failed
            or self.unreadable
            or self.unlisted
        )

    @property
    def exit_status(self) -> str:
        """How the run ended, as its history row says: ``ok``, ``stopped``, ``failed`` (dead
        items, post-commit actions that failed, or files that could not be read), ``held``
        (files other runners hold), ``waiting`` or ``unfinished``."""
        if self.stopped:
            return "stopped"
        if self.ok:
            return "ok"
        if self.dead or self.dead_before or self.post_failed or self.unreadable or self.unlisted:
            return "failed"
        if self.held:
            return "held"
        return "waiting" if self.waiting else "unfinished"

    @property
    def skipped(self) -> int:
        """Seen files this run did not handle because they were done already."""
        return self.done_before

    @property
    def rate(self) -> float:
        """Items completed per second."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def totals(self) -> RunTotals:
        """The counts, as the run's history row keeps them."""
        return self.snapshot()

    def __str__(self) -> str:
        head = f"job {self.job!r}{' stopped' if self.stopped else ''}"
        extras = [describe(self, future=self.future)]
        if self.post_failed:
            extras.append(f"{self.post_failed} post-commit actions failed (the next run retries)")
        if self.unreadable:
            extras.append(unreadable_text(self.unreadable))
        if self.unlisted:
            extras.append(unlisted_text(self.unlisted))
        extras.append(f"{self.elapsed:.2f}s ({self.rate:.0f}/s)")
        return f"{head}: {'; '.join(extras)}"

    def failed_because(self) -> str:
        """What a failed run's history adds to ``failed`` when no item being dead says it
        (`` (1 post-commit action failed)``, `` (2 files could not be read)``, `` (1 directory
        could not be listed)``), or ``""``."""
        if self.post_failed:
            actions = "action" if self.post_failed == 1 else "actions"
            return f" ({self.post_failed} post-commit {actions} failed)"
        if self.dead or self.dead_before:
            return ""
        if self.unreadable:
            files = "file" if self.unreadable == 1 else "files"
            return f" ({self.unreadable} {files} could not be read)"
        if self.unlisted:
            dirs = "directory" if self.unlisted == 1 else "directories"
            return f" ({self.unlisted} {dirs} could not be listed)"
        return ""


def unlisted_text(count: int) -> str:
    """The report's words for ``count`` directories the scan could not list."""
    dirs = "directory" if count == 1 else "directories"
    them = "it" if count == 1 else "them"
    return f"{count} {dirs} could not be listed (the files in {them} not handled)"


def unreadable_text(count: int) -> str:
    """The report's words for ``count`` files that could not be read to key them."""
    files = "file" if count == 1 else "files"
    why = "not handled: identity content keys a file by its bytes"
    return f"{count} {files} could not be read ({why})"


def _counted(count: int, name: str) -> str:
    return f"{count} {LABELS[name].format(s='s' * (count != 1))}"


def describe(t: RunTotals, *, future: int = 0) -> str:
    """The counts in words, the zero ones left out but ``done``: ``3000 seen: 2 done, 2998
    done before; 1 failed attempt; 3 files not settled yet``. ``future``: how many of the
    files not settled yet changed at a time ahead of this host's clock."""
    parts = [_counted(t.done, "done")]
    parts += [_counted(getattr(t, n), n) for n in CATEGORIES if n != "done" and getattr(t, n)]
    text = f"{t.seen} seen: {', '.join(parts)}"
    for name in TOTALS:
        count = getattr(t, name)
        if name in CATEGORIES or name == "seen" or not count:
            continue
        text += f"; {_counted(count, name)}"
        if name == "unsettled" and future:
            text += f" ({future} changed at a time ahead of this host's clock)"
    return text


#: The counts that :class:`Events` keeps (the metrics' ``_total`` counters of items).
EVENTS = ("seen", "done", "dead", "vanished", "done_before", "dead_before", "lost")


@dataclass(slots=True, kw_only=True)
class Events:
    """What happened to a run's items, each counted when it happened and never taken back:
    what the metrics' counters (``asyncbatch_items_total``, ``asyncbatch_items_seen_total``)
    export. The report's counts are of items by how they *ended* (an item that went dead
    and was then put back by ``asyncbatch retry --dead`` and done is done, not dead); a
    Prometheus counter must never go down, so here it is one dead outcome and one done one.
    A count only a later look confirms (a file counted done before on the strength of an
    attempt under way, identity ``content``) is counted once confirmed."""

    seen: int = 0
    done: int = 0
    dead: int = 0
    vanished: int = 0
    done_before: int = 0
    dead_before: int = 0
    lost: int = 0

    def copy(self) -> Events:
        """A snapshot."""
        return Events(**{name: getattr(self, name) for name in EVENTS})


@dataclass(slots=True, kw_only=True)
class Counters(RunTotals):
    """The mutable counters of one run (owned by that run only).

    The items that are neither finished nor in flight, with what is known of them, live in
    the claimer's ``open`` table (``held`` and ``waiting`` count them). ``unfinished`` is not
    counted: it is what the other categories leave of ``seen`` (see :meth:`not_reached`).
    """

    started: float = field(default_factory=time.monotonic)
    scanned: bool = False
    #: Not counts of the report (for metrics): leases of this runner that its heartbeat found
    #: taken over by others, and items of runners found gone that it put back.
    leases_lost: int = 0
    reaped: int = 0
    #: Of ``unsettled``, the files changed at a time ahead of this host's clock.
    future: int = 0
    #: Files found that could not be read to key them (identity ``content``): not items, not
    #: counted seen; each counted once.
    unreadable: int = 0
    #: Directories below the source a one-shot run's scan could not list (their files in
    #: no count, not handled).
    unlisted: int = 0
    #: The same outcomes counted as events, never taken back (for the metrics).
    events: Events = field(default_factory=Events)

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` items in ``name`` (one of :data:`EVENTS`) as they happen: in the
        report's count and in :attr:`events`. (A count corrected, taken back or moved to
        another category changes the report's count alone.)"""
        setattr(self, name, getattr(self, name) + n)
        setattr(self.events, name, getattr(self.events, name) + n)

    def record(self, state: str, *, attempted: bool) -> None:
        """Count one committed outcome: a failed attempt (``attempted``: the handler ran), and
        the category the item ends in (a failed one is open again, waiting for its retry)."""
        self.failed += state == "failed" or (state == "dead" and attempted)
        if state == "failed":
            return
        self.add(state if state in ("done", "dead") else "vanished")

    def statistics(self, in_flight: int) -> Statistics:
        """A snapshot for progress displays."""
        return Statistics(
            **self._counts(),
            scanned=self.scanned,
            in_flight=in_flight,
            elapsed=time.monotonic() - self.started,
        )

    def totals(self) -> RunTotals:
        """The counts as the run's history row keeps them."""
        return RunTotals(**self._counts())

    def _counts(self) -> dict[str, int]:
        counts = {name: getattr(self, name) for name in TOTALS}
        counts["unfinished"] = self.not_reached()
        return counts

    def finished_attempts(self) -> int:
        """Attempts that reached an outcome so far (done, failed, dead, vanished)."""
        return self.done + self.failed + self.dead + self.vanished + self.lost

    def not_reached(self) -> int:
        """Seen items in no other category: not reached, or in flight (given back at a stop)."""
        return max(self.seen - self.seen_accounted(), 0)

    def report(
        self,
        job: str,
        counts: dict[str, int],
        *,
        stopped: bool,
        mode: str = "run",
        post_failed: int = 0,
    ) -> Report:
        """The final :class:`Report`.

        Its categories add up to ``seen`` by construction (``unfinished`` takes the rest); a
        run whose items ended in more categories than it saw (a bug) warns with
        ``RuntimeWarning`` rather than print counts that claim more than happened.
        """
        if self.seen_accounted() > self.seen:
            warnings.warn(
                f"asyncbatch: the counts of job {job!r} add up to {self.seen_accounted()}, "
                f"more than the {self.seen} seen",
                RuntimeWarning,
                stacklevel=2,
            )
        return Report(
            **self._counts(),
            job=job,
            elapsed=time.monotonic() - self.started,
            counts=counts,
            stopped=stopped,
            mode=mode,
            post_failed=post_failed,
            future=self.future,
            unreadable=self.unreadable,
            unlisted=self.unlisted,
        )
