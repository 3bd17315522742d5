"""What the pipeline records for metrics while it runs: a few histograms and running totals.

Plain Python, no ``prometheus_client``: the pipeline holds a :class:`Recorder` only when the
batch has metrics on (``RunState.metrics`` is ``None`` otherwise, and each hook is one ``None``
check). The counts that the run keeps anyway (its counters, the queue, the scanner's last
scan) are read when scraped (a :class:`~.observation.RunObservation`), not recorded twice;
only what nothing else measures is recorded here, each observation a list increment and an
addition.

One :class:`Recorder` per :class:`~asyncbatch.Batch`, kept across its runs: what the runs that
ended counted is folded into :attr:`Recorder.ended` so that the exported counters never go back.
Everything lives on the event loop of the run; nothing here is shared between batches.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._ledger import TOTALS, Outcome, RunTotals
from .._report import EVENTS
from .._scanner import ScanInfo
from .observation import RunObservation

__all__ = [
    "ATTEMPT_BUCKETS",
    "LEDGER_BUCKETS",
    "EndedRuns",
    "Histogram",
    "Recorder",
]

#: Upper bounds (seconds) of the handler-duration buckets.
ATTEMPT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: Upper bounds (seconds) of the claim- and commit-latency buckets: the same, up to 30 s.
LEDGER_BUCKETS = ATTEMPT_BUCKETS[: ATTEMPT_BUCKETS.index(30.0) + 1]
#: The outcomes of an attempt whose handler ran, as the worker saw it.
ATTEMPT_OUTCOMES = ("done", "failed", "dead")


class Histogram:
    """Counts of observations by upper bound (``le``), and their sum: Prometheus' histogram,
    without its lock (everything observes from one event loop)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        #: One count per bound, then the count above the last bound (``+Inf``).
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """How many observations there were."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus exposes them: ``(le, observations <= le)``, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


@dataclass(slots=True, kw_only=True)
class EndedRuns(RunTotals):
    """What the batch's runs that ended counted, added up (see :class:`Recorder`): their
    counts (:class:`RunTotals`; those of :data:`~asyncbatch._report.EVENTS` as events: what
    happened, not how the items ended), and what else the metrics export."""

    leases_lost: int = 0
    reaped: int = 0
    lock_takeovers: int = 0
    ledger_busy: int = 0
    ledger_unreachable: int = 0
    ledger_fatal: int = 0
    runs: int = 0


@dataclass(eq=False, slots=True)
class Recorder:
    """The observations of one batch's runs that no other part of the run keeps."""

    #: Handler attempts by their outcome (done, failed, dead): time from the worker taking the
    #: item to the handler's outcome.
    attempts: dict[str, Histogram] = field(
        default_factory=lambda: {o: Histogram(ATTEMPT_BUCKETS) for o in ATTEMPT_OUTCOMES}
    )
    #: Claim statements (register and lease, or lease waiting items): time to the ledger's
    #: answer, waiting for the connection included.
    claims: Histogram = field(default_factory=lambda: Histogram(LEDGER_BUCKETS))
    #: Commit transactions of a group of outcomes.
    commits: Histogram = field(default_factory=lambda: Histogram(LEDGER_BUCKETS))
    ended: EndedRuns = field(default_factory=EndedRuns)
    #: The last scan of the runs that ended (a run under way has its own).
    last_scan: ScanInfo | None = None
    #: Object-store requests of the runs that ended, by operation.
    object_requests: dict[str, int] = field(default_factory=dict)

    def attempt_ended(self, outcome: Outcome, seconds: float) -> None:
        """An attempt ended with ``outcome``, ``seconds`` after the worker took its item.

        Not counted: a vanished input, and an item given up on without running (no attempt).
        """
        histogram = self.attempts.get(outcome.state)
        if histogram is not None and outcome.attempted:
            histogram.observe(seconds)

    def run_ended(self, seen: RunObservation) -> None:
        """Fold what a run that ended counted (its last observation) into :attr:`ended`
        (exported counters never go back when the next run starts from zero)."""
        e = self.ended
        e.runs += 1
        for name in TOTALS:
            counted = seen.events if name in EVENTS else seen.counts
            setattr(e, name, getattr(e, name) + getattr(counted, name))
        e.leases_lost += seen.leases_lost
        e.reaped += seen.reaped
        e.lock_takeovers += seen.lock_takeovers
        if seen.ledger is not None:
            e.ledger_busy += seen.ledger.busy
            e.ledger_unreachable += seen.ledger.unreachable
        e.ledger_fatal += seen.ledger_failed
        if seen.last_scan is not None:
            self.last_scan = seen.last_scan
        for operation, count in seen.object_requests.items():
            self.object_requests[operation] = self.object_requests.get(operation, 0) + count
