"""What a run did: live counters while it runs, a frozen :class:`Report` when it ends.

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
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

from ._ledger.types import RunTotals

__all__ = ["Counters", "Report", "Statistics", "describe", "not_settled"]


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of a running batch (``batch.statistics()``), for progress displays.

    The categories are those of :class:`Report` as they stand now; ``in_flight`` items are
    leased to this run and not committed yet; ``scanned`` says whether ``seen`` is final.
    """

    seen: int
    scanned: bool
    done: int
    done_before: int
    held: int
    waiting: int
    dead: int
    dead_before: int
    vanished: int
    in_flight: int
    failed: int
    elapsed: float

    @property
    def finished(self) -> int:
        """Seen files that are done with, one way or another (never decreases)."""
        return self.done + self.done_before + self.dead + self.dead_before + self.vanished


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of ``Batch.run()`` (or of a stopped ``Batch.watch()``).

    The categories of the seen files (see the module) add up to ``seen``. Besides them:
    ``failed`` counts failed attempts (each retried, or made dead); ``lost``, outcomes refused
    because another runner had taken the lease (those files are counted where they ended:
    done before, held, ...); ``earlier``, how many of the seen were left waiting in the ledger
    by earlier runs (not found by the scan);
    ``post_failed``, post-commit actions (archive, delete) that failed (the next run finishes
    them); ``counts``, the job's items by state when the run ended; ``stopped``, whether it
    was stopped before the end (``stop()`` or a signal).
    """

    job: str
    seen: int
    done: int
    done_before: int
    held: int
    waiting: int
    dead: int
    dead_before: int
    vanished: int
    unfinished: int
    failed: int
    lost: int
    earlier: int
    elapsed: float
    counts: dict[str, int]
    stopped: bool = False
    mode: str = "run"
    post_failed: int = 0
    #: Regular files the last scan found that are not settled yet (not among the seen: the
    #: next run, or the watch, takes them once they are), and how many of them changed at a
    #: time ahead of this host's clock (they wait until then).
    unsettled: int = 0
    future: int = 0

    @property
    def ok(self) -> bool:
        """Whether every settled file seen is done: none dead, held, waiting or unfinished, no
        post-commit action (archive, delete) failed, and (for ``run()``) not stopped. A stopped
        ``watch()`` is ok: stopping is how a watch ends, and what it gave back unfinished is
        handled by the next one."""
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
        )

    @property
    def exit_status(self) -> str:
        """How the run ended, as its history row says: ``ok``, ``stopped``, ``failed`` (dead
        items, or post-commit actions that failed), ``held`` (files other runners hold),
        ``waiting`` or ``unfinished``."""
        if self.stopped:
            return "stopped"
        if self.ok:
            return "ok"
        if self.dead or self.dead_before or self.post_failed:
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
        return RunTotals(
            seen=self.seen,
            done=self.done,
            done_before=self.done_before,
            held=self.held,
            waiting=self.waiting,
            dead=self.dead,
            dead_before=self.dead_before,
            vanished=self.vanished,
            unfinished=self.unfinished,
            failed=self.failed,
            lost=self.lost,
            earlier=self.earlier,
        )

    def __str__(self) -> str:
        head = f"job {self.job!r}{' stopped' if self.stopped else ''}"
        extras = [describe(self.totals)]
        if self.unsettled:
            extras.append(not_settled(self.unsettled, self.future))
        if self.post_failed:
            extras.append(f"{self.post_failed} post-commit actions failed (the next run retries)")
        extras.append(f"{self.elapsed:.2f}s ({self.rate:.0f}/s)")
        return f"{head}: {'; '.join(extras)}"


def not_settled(count: int, future: int) -> str:
    """``3 files not settled yet (1 changed in the future)``: what a scan left for later."""
    text = f"{count} file{'s' * (count != 1)} not settled yet"
    if future:
        text += f" ({future} changed at a time ahead of this host's clock)"
    return text


def describe(t: RunTotals) -> str:
    """The counts in words, the zero ones left out but ``done``: ``3000 seen: 2 done, 2998
    done before; 1 failed attempt``."""
    parts = [f"{t.done} done"]
    for count, what in (
        (t.done_before, "done before"),
        (t.held, "held by other runners"),
        (t.waiting, "waiting for a retry"),
        (t.dead, "dead"),
        (t.dead_before, "dead before"),
        (t.vanished, "vanished"),
        (t.unfinished, "unfinished"),
    ):
        if count:
            parts.append(f"{count} {what}")
    text = f"{t.seen} seen: {', '.join(parts)}"
    if t.failed:
        text += f"; {t.failed} failed attempt{'s' * (t.failed != 1)}"
    if t.lost:
        outcomes = "outcome" if t.lost == 1 else "outcomes"
        text += f"; {t.lost} {outcomes} refused (lease taken over)"
    if t.earlier:
        text += f"; {t.earlier} of the seen left waiting by earlier runs"
    return text


@dataclass(slots=True)
class Counters:
    """The mutable counters of one run (owned by that run only).

    The items that are neither finished nor in flight, with what is known of them, live in
    the claimer's ``open`` table; :meth:`report` takes their counts.
    """

    started: float = field(default_factory=time.monotonic)
    seen: int = 0
    scanned: bool = False
    done: int = 0
    done_before: int = 0
    dead: int = 0
    dead_before: int = 0
    vanished: int = 0
    failed: int = 0
    lost: int = 0
    earlier: int = 0
    #: Seen items not finished and not in flight: held by another runner, or waiting for a retry.
    held: int = 0
    waiting: int = 0
    #: Not a category of the report (for metrics): leases of this runner that its heartbeat
    #: found taken over by others, and items of runners found gone that it put back.
    leases_lost: int = 0
    reaped: int = 0
    #: Not a category either: files the last scan found not settled yet (see Report).
    unsettled: int = 0
    future: int = 0

    def record(self, state: str, *, attempted: bool) -> None:
        """Count one committed outcome: a failed attempt (``attempted``: the handler ran), and
        the category the item ends in (a failed one is open again, waiting for its retry)."""
        self.failed += state == "failed" or (state == "dead" and attempted)
        if state == "failed":
            return
        if state == "done":
            self.done += 1
        elif state == "dead":
            self.dead += 1
        else:
            self.vanished += 1

    def snapshot(self, in_flight: int) -> Statistics:
        """A frozen view for progress displays."""
        return Statistics(
            seen=self.seen,
            scanned=self.scanned,
            done=self.done,
            done_before=self.done_before,
            held=self.held,
            waiting=self.waiting,
            dead=self.dead,
            dead_before=self.dead_before,
            vanished=self.vanished,
            in_flight=in_flight,
            failed=self.failed,
            elapsed=time.monotonic() - self.started,
        )

    def totals(self) -> RunTotals:
        """The counts as the run's history row keeps them."""
        return RunTotals(
            seen=self.seen,
            done=self.done,
            done_before=self.done_before,
            held=self.held,
            waiting=self.waiting,
            dead=self.dead,
            dead_before=self.dead_before,
            vanished=self.vanished,
            unfinished=self.unfinished(),
            failed=self.failed,
            lost=self.lost,
            earlier=self.earlier,
        )

    def finished_attempts(self) -> int:
        """Attempts that reached an outcome so far (done, failed, dead, vanished)."""
        return self.done + self.failed + self.dead + self.vanished + self.lost

    def seen_accounted(self) -> int:
        """Seen items in a category other than unfinished."""
        return (
            self.done
            + self.done_before
            + self.held
            + self.waiting
            + self.dead
            + self.dead_before
            + self.vanished
        )

    def unfinished(self) -> int:
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
            job=job,
            **asdict(self.totals()),
            elapsed=time.monotonic() - self.started,
            counts=counts,
            stopped=stopped,
            mode=mode,
            post_failed=post_failed,
            unsettled=self.unsettled,
            future=self.future,
        )
