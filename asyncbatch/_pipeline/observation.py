"""What a run under way has observed, as one frozen snapshot: what health and metrics read.

As trio's ``statistics()``: an observer asks the run for a :class:`RunObservation` and reads
that, never the run's live parts; so the service layer (health, metrics, endpoints) depends on
the pipeline and the pipeline on nothing of it. Taking one costs a few attribute reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._ledger import LedgerErrors, Listing, RunTotals
from .._report import Events
from .._scanner import ScanInfo

__all__ = ["RunObservation"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunObservation:
    """A run's observations at one moment (times are ``time.monotonic()``)."""

    #: ``"run"`` or ``"watch"``; the job; whether it is shared; its source directory; its
    #: lease and poll interval (seconds).
    mode: str
    job: str
    shared: bool
    source: str
    lease: float
    poll: float
    #: When the run began; when its lock (or runner record) was last renewed; since when a
    #: heartbeat waits for the ledger (``None``: none waits).
    began: float
    renewed_at: float | None
    beat_since: float | None
    #: Whether its lock was taken over (it stops); how many stale locks it took over.
    lock_lost: bool
    lock_takeovers: int
    #: Its ledger's errors so far (``None``: not open yet), and whether one ended the run.
    ledger: LedgerErrors | None
    ledger_failed: bool
    #: Why its source directory cannot be used now (``None``: it can).
    source_problem: str | None
    #: Its last finished scan or poll.
    last_scan: ScanInfo | None
    #: Items leased and not committed; leased and waiting for a worker; handlers running.
    in_flight: int
    queued: int
    handlers_running: int
    #: When the oldest item waiting to be started began waiting (``None``: none waits).
    oldest_waiting: float | None
    #: Whether a stop was asked for.
    stop_requested: bool
    #: Its counts so far (of its items, by how they ended: the report's); what happened to
    #: them, counted when it happened (never going down: the metrics' counters); its leases
    #: taken over by others; items of gone runners it put back.
    counts: RunTotals
    events: Events
    leases_lost: int
    reaped: int
    #: Runners sharing the job: whether this one holds the listing role now, and the role
    #: as it last looked at it (``None``: not shared, or not looked at yet).
    lister: bool = False
    listing: Listing | None = None
    #: Requests sent to object stores, by operation (``list`` pages, ``get``, ``head``,
    #: ``put``, ``copy``, ``delete``); empty when the run uses none.
    object_requests: dict[str, int] = field(default_factory=dict)
