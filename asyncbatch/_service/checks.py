"""The health of a run under way: its checks, from what the run observed (a
:class:`~asyncbatch._pipeline.RunObservation`; see :mod:`.health` for what each means)."""

from __future__ import annotations

from .._pipeline import RunObservation
from .health import Health, HealthCheck

__all__ = ["health_of", "ledger_patience", "poll_limit"]


def ledger_patience(lease: float) -> float:
    """Seconds a heartbeat may wait for the ledger before the ledger counts as not answering."""
    return min(5.0, lease / 8)


def poll_limit(poll: float, last_scan_seconds: float) -> float:
    """Seconds without a finished poll after which an idle watch counts as stuck."""
    return max(10.0, 3 * poll + 2 * last_scan_seconds)


def health_of(run: RunObservation, now: float) -> Health:
    """The checks of a run, as it observed itself, at ``now`` (``time.monotonic()``)."""
    return Health.of(
        (
            HealthCheck("running", True, f"{run.mode} under way for {now - run.began:.1f}s"),
            _heartbeat(run, now),
            _lock(run),
            _ledger(run, now),
            _source(run),
            _scan(run, now),
            _stopping(run),
        )
    )


def _heartbeat(run: RunObservation, now: float) -> HealthCheck:
    lease = run.lease
    if run.renewed_at is None:
        return HealthCheck("heartbeat", True, "no lock or lease to renew yet (starting)")
    age, limit = now - run.renewed_at, lease / 2
    if age <= limit:
        return HealthCheck(
            "heartbeat",
            True,
            f"renewed {age:.1f}s ago (every {lease / 4:g}s; stale after {limit:g}s)",
        )
    return HealthCheck(
        "heartbeat",
        False,
        f"not renewed for {age:.1f}s (stale after {limit:g}s; the lease is {lease:g}s): is the "
        "event loop blocked, or the ledger not answering?",
    )


def _lock(run: RunObservation) -> HealthCheck:
    job = run.job
    if run.lock_lost:
        return HealthCheck(
            "lock", False, f"job {job!r}: taken over by another runner; this run stops"
        )
    if run.renewed_at is None:
        return HealthCheck("lock", False, f"job {job!r}: not taken yet")
    if run.shared:
        return HealthCheck("lock", True, f"job {job!r} is shared: this runner's record is held")
    return HealthCheck("lock", True, f"job {job!r}: the job lock is held (at its last renewal)")


def _ledger(run: RunObservation, now: float) -> HealthCheck:
    errors = run.ledger
    if errors is None:
        return HealthCheck("ledger", False, f"not open yet ({now - run.began:.1f}s)")
    seen = f" ({errors.busy} busy retries, {errors.unreachable} unreachable tries so far)"
    patience = ledger_patience(run.lease)
    if run.beat_since is not None and now - run.beat_since > patience:
        return HealthCheck(
            "ledger",
            False,
            f"a heartbeat has waited {now - run.beat_since:.1f}s for it (more than "
            f"{patience:g}s){seen}",
        )
    if run.renewed_at is None and now - run.began > patience:
        return HealthCheck(
            "ledger",
            False,
            f"the run has waited {now - run.began:.1f}s for it to take the job's lock (more "
            f"than {patience:g}s){seen}",
        )
    if errors.busy_since is not None and now - errors.busy_since > patience:
        return HealthCheck(
            "ledger",
            False,
            f"a transaction has waited {now - errors.busy_since:.1f}s for it, busy (more than "
            f"{patience:g}s){seen}",
        )
    return HealthCheck("ledger", True, "answering: no heartbeat or transaction waits for it" + seen)


def _source(run: RunObservation) -> HealthCheck:
    problem = run.source_problem
    if problem is not None:
        return HealthCheck("source", False, problem)
    return HealthCheck("source", True, f"{run.source!r} is there (at the last poll)")


def _scan(run: RunObservation, now: float) -> HealthCheck:
    if run.shared and not run.lister:
        # Another runner lists for the job (or will): this one takes its files from the
        # ledger, and has no scan of its own to wait for (it was never ready before).
        if run.listing is None:
            return HealthCheck("scan", False, "has not looked at the job's listing role yet")
        return HealthCheck(
            "scan", True, "another runner lists the source for the job; this one claims from it"
        )
    last = run.last_scan
    if last is None:
        return HealthCheck("scan", False, "the first scan has not finished yet")
    done = (
        f"the last scan ({last.files} files, {last.seconds:.2f}s) ended {now - last.ended:.1f}s ago"
    )
    if run.mode == "run":
        return HealthCheck("scan", True, done)
    limit = poll_limit(run.poll, last.seconds)
    if now - last.ended <= limit:
        return HealthCheck("scan", True, done)
    if run.in_flight or run.oldest_waiting is not None:
        return HealthCheck("scan", True, f"{done}; busy with {run.in_flight} items meanwhile")
    return HealthCheck(
        "scan",
        False,
        f"{done}, with nothing in flight: polls are every {run.poll:g}s (stuck after "
        f"{limit:g}s); is the source's filesystem or the ledger hanging?",
    )


def _stopping(run: RunObservation) -> HealthCheck:
    if run.stop_requested:
        return HealthCheck("stopping", False, "a stop was requested: no new items start")
    return HealthCheck("stopping", True, "no stop requested")
