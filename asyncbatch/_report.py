"""What a run did: live counters while it runs, a frozen :class:`Report` when it ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Counters", "Report", "Statistics"]


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of a running batch (``batch.statistics()``), for progress displays."""

    seen: int
    scanned: bool
    done: int
    failed: int
    dead: int
    vanished: int
    skipped: int
    in_flight: int
    elapsed: float


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of ``Batch.run()``.

    ``seen``: settled files the scan found. ``done``: items this run completed (committed).
    ``skipped``: seen files this run did not process (done before, dead, or held by another
    runner). ``failed``: failed attempts (each retried, or made dead). ``dead``: items this run
    gave up on. ``dead_seen``: seen files already dead before this run. ``vanished``: items whose
    file disappeared or changed before it could be handled. ``retry_pending``: items left failed
    and waiting for a retry (the run was stopped). ``lost``: outcomes refused because another
    runner had taken the lease. ``counts``: the job's items by state when the run ended.
    ``stopped``: stopped before the end (``stop()`` or a signal). ``post_failed``: post-commit
    actions (archive, delete) that failed; their files stay in the source and the next run
    finishes them.
    """

    job: str
    seen: int
    done: int
    skipped: int
    failed: int
    dead: int
    dead_seen: int
    vanished: int
    retry_pending: int
    lost: int
    elapsed: float
    counts: dict[str, int]
    stopped: bool = False
    mode: str = "run"
    post_failed: int = 0

    @property
    def ok(self) -> bool:
        """Whether every settled file seen is done: nothing dead, nothing left failed, and
        (for ``run()``) not stopped before the end. A stopped ``watch()`` is ok: stopping is
        how a watch ends."""
        finished = not (self.stopped and self.mode == "run")
        return finished and self.dead == 0 and self.dead_seen == 0 and self.retry_pending == 0

    @property
    def rate(self) -> float:
        """Items completed per second."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def __str__(self) -> str:
        text = (
            f"job {self.job!r}: {self.done} done, {self.skipped} skipped (already done), "
            f"{self.failed} failed attempts, {self.dead} dead, {self.vanished} vanished "
            f"of {self.seen} seen in {self.elapsed:.2f}s ({self.rate:.0f}/s)"
        )
        if self.dead_seen:
            text += f"; {self.dead_seen} seen were dead already"
        if self.retry_pending:
            text += f"; {self.retry_pending} wait for a retry"
        if self.lost:
            text += f"; {self.lost} lost their lease"
        if self.post_failed:
            text += f"; {self.post_failed} post-commit actions failed (the next run retries them)"
        return text


@dataclass(slots=True)
class Counters:
    """The mutable counters of one run (owned by that run only)."""

    started: float = field(default_factory=time.monotonic)
    seen: int = 0
    scanned: bool = False
    claimed_from_scan: int = 0
    done: int = 0
    failed: int = 0
    dead: int = 0
    dead_seen: int = 0
    vanished: int = 0
    lost: int = 0
    failed_keys: set[str] = field(default_factory=set)

    def record(self, key: str, state: str, *, attempted: bool) -> None:
        """Count one committed outcome of this run (``attempted``: the handler ran)."""
        if state == "done":
            self.done += 1
        elif state == "failed":
            self.failed += 1
            self.failed_keys.add(key)
            return
        elif state == "dead":
            self.failed += attempted  # not attempted: given up on without running
            self.dead += 1
        else:
            self.vanished += 1
        if self.failed_keys:
            self.failed_keys.discard(key)

    def snapshot(self, in_flight: int) -> Statistics:
        """A frozen view for progress displays."""
        return Statistics(
            seen=self.seen,
            scanned=self.scanned,
            done=self.done,
            failed=self.failed,
            dead=self.dead,
            vanished=self.vanished,
            skipped=max(self.seen - self.claimed_from_scan, 0),
            in_flight=in_flight,
            elapsed=time.monotonic() - self.started,
        )

    def report(
        self,
        job: str,
        counts: dict[str, int],
        *,
        stopped: bool,
        mode: str = "run",
        post_failed: int = 0,
    ) -> Report:
        """The final :class:`Report`."""
        return Report(
            job=job,
            seen=self.seen,
            done=self.done,
            skipped=max(self.seen - self.claimed_from_scan - self.dead_seen, 0),
            failed=self.failed,
            dead=self.dead,
            dead_seen=self.dead_seen,
            vanished=self.vanished,
            retry_pending=len(self.failed_keys),
            lost=self.lost,
            elapsed=time.monotonic() - self.started,
            counts=counts,
            stopped=stopped,
            mode=mode,
            post_failed=post_failed,
        )
