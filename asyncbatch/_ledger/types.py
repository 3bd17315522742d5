"""The values that cross the ledger's boundary, the same for every backend."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, NamedTuple

from .._exceptions import LedgerValueError
from .._procinfo import ProcessIdentity, holder_is_dead
from .rows import Row, RowValue, column

__all__ = [
    "CATEGORIES",
    "IN_FLIGHT",
    "JOBLOG_COUNTS",
    "LABELS",
    "LEASE_FIELDS",
    "LISTING_GRACE",
    "NOT_READY",
    "NOT_READY_KEPT",
    "SAVED_CATEGORIES",
    "STATES",
    "TOTALS",
    "ClaimedRow",
    "Durability",
    "Forgotten",
    "Heartbeat",
    "IdempotencyClaim",
    "IdempotencyDecision",
    "IdempotencyRequest",
    "ItemFilter",
    "ItemInfo",
    "JobSettings",
    "Leases",
    "LedgerErrors",
    "Listing",
    "LockInfo",
    "Outcome",
    "QueuedRow",
    "Registered",
    "Renewal",
    "RunEnd",
    "RunInfo",
    "RunStart",
    "RunTotals",
    "RunnerInfo",
    "ScannedRow",
    "Started",
    "StoredResponse",
    "TimeField",
    "UnstoredReason",
    "changed_counts",
    "checked_state",
    "decode_not_ready",
    "decode_secret",
    "encode_not_ready",
    "iso_time",
    "pack_queued",
    "totals_since",
    "unpack_queued",
]

#: ``"normal"``: commits survive a crash of any process; ``"full"``: a power loss too.
Durability = Literal["normal", "full"]
#: Every state an item can be in.
STATES: Final = ("pending", "running", "done", "failed", "dead", "vanished")


def checked_state(
    state: Any, key: str | None = None, job: str | None = None, *, known: tuple[str, ...] = STATES
) -> str:
    """An item's state as a row holds it, checked: one of ``known`` (:data:`STATES`), else
    :class:`LedgerValueError` naming it (``key``, ``job``: the item, when known). Every read
    that decides on an item's state goes through here: a state it does not know would
    otherwise be left out of the counts, taken for done, or for vanished."""
    if state in known:
        return str(state)
    whose = f" for key {key!r}" if key is not None else ""
    if job is not None:
        whose += f" of job {job!r}"
    raise LedgerValueError("items.state", state, whose.strip())


def decode_secret(value: str | None) -> bytes:
    """The ledger's secret (``meta.secret``: hex, made when the ledger was created; ``None``:
    none), as bytes; :class:`LedgerValueError` when it is not hex."""
    if value is None:
        return b""
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise LedgerValueError("meta.secret", value, "(not hex)") from None


#: A scanned file as a claim registers it: ``(key, relpath, size, mtime_ns, inode)``.
ScannedRow = tuple[str, bytes, int, int, int]
#: Leases as ``(key, fence)`` pairs.
Leases = Sequence[tuple[str, int]]
#: A listed file queued for the runners sharing a job (see ``Ledger.queue_listed``): a
#: :data:`ScannedRow` and what the runner that takes it needs besides, ``(key, relpath, size,
#: mtime_ns, inode, ctime_ns, input_hash)``.
QueuedRow = tuple[str, bytes, int, int, int, int, str]
#: Files a row of the ``queued`` table holds at most (see ``Ledger.queue_listed``).
QUEUED_BATCH: Final = 512
#: Seconds a runner that took the listing role is taken to be about to list (between its
#: take and its ``begin_listing``, one transaction apart): until then, a later ``run()``
#: does not take the role from it (see :meth:`Listing.stale_for`).
LISTING_GRACE: Final = 5.0


def known_range_limit(keys: int) -> int:
    """How many items a listing's look for the ones the ledger holds of a chunk of ``keys``
    keys reads between the chunk's least and greatest key before it looks each key up
    instead (see ``Ledger.queue_listed``).

    The range is one walk of the primary key where a lookup per key is a descent each (3.6
    us a key on PostgreSQL, 0.36 s for 100,000 listed files): a chunk is listed in
    modification-time order and a key begins with it, so the range holds little more than
    the chunk's own items, and none for a new inbox. Items of other files can fall in it
    (files no longer listed, same times); past twice the chunk, the lookups are cheaper."""
    return 2 * keys + 64


#: A queued row's numbers and the lengths of its key, input hash and relpath.
_QUEUED_HEAD: Final = struct.Struct("<qqQqHHI")


def pack_queued(rows: Sequence[QueuedRow]) -> bytes:
    """Queued rows as one value (a batch of the ``queued`` table): each row's numbers and
    lengths, then its key, input hash and relpath."""
    head = _QUEUED_HEAD.pack
    parts: list[bytes] = []
    for key, relpath, size, mtime_ns, inode, ctime_ns, ihash in rows:
        k, h = key.encode(), ihash.encode()
        parts += (head(size, mtime_ns, inode, ctime_ns, len(k), len(h), len(relpath)), k, h)
        parts.append(relpath)
    return b"".join(parts)


def unpack_queued(data: bytes, limit: int = -1) -> tuple[list[QueuedRow], bytes]:
    """The first ``limit`` rows of :func:`pack_queued`'s value (``-1``: all), in order, and
    the rest of the value as it is (a batch taken in part keeps the rest unparsed)."""
    rows: list[QueuedRow] = []
    head, step = _QUEUED_HEAD.unpack_from, _QUEUED_HEAD.size
    at, end = 0, len(data)
    while at < end and len(rows) != limit:
        size, mtime_ns, inode, ctime_ns, k, h, r = head(data, at)
        at += step
        key = data[at : at + k].decode()
        ihash = data[at + k : at + k + h].decode()
        at += k + h
        rows.append((key, data[at : at + r], size, mtime_ns, inode, ctime_ns, ihash))
        at += r
    return rows, data[at:]


def iso_time(ts: float) -> str:
    """A Unix time as local ISO 8601, for messages."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


class ClaimedRow(NamedTuple):
    """What a claim returned for one item.

    ``attempts`` counts the attempts that started, ``interrupted`` those of them that the
    runner's death or stop cut short. ``relpath``, ``size``, ``mtime_ns`` and ``inode`` are the
    row's: for a finished row, the file that was handled. A tuple (a claim makes one per item):
    its columns are its fields, as for the value objects of :mod:`.rows`.
    """

    key: str
    state: str
    fence: int
    attempts: int
    interrupted: int = 0
    post_action: str | None = None
    relpath: bytes = b""
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The SELECT list that reads a claimed row: its fields, in order."""
        return cls._fields

    @classmethod
    def from_row(
        cls, row: Row, *, lease_only: bool = False, **convert: Callable[[Any], Any]
    ) -> ClaimedRow:
        """A claimed row from ``row``, each field from the column of its name (with
        ``lease_only``, the :data:`LEASE_FIELDS` only: the handled file's keep their defaults).
        ``convert`` names a function that converts one field's value as the driver returned it.
        """
        names = LEASE_FIELDS if lease_only else cls._fields
        claimed = cls(*[convert[n](row[n]) if n in convert else row[n] for n in names])
        checked_state(claimed.state, claimed.key, known=_CLAIMED_STATES)
        return claimed


#: The states a claim returns: an item's, and ``held`` (leased to another runner).
_CLAIMED_STATES: Final = (*STATES, "held")
#: The fields of a :class:`ClaimedRow` that every claim returns; the handled file's follow.
LEASE_FIELDS: Final = ClaimedRow._fields[: ClaimedRow._fields.index("relpath")]


@dataclass(slots=True, eq=False)
class LedgerErrors:
    """What one open ledger met and outlasted so far (exported as metrics).

    ``busy``: transactions tried again because another writer held the lock (SQLite) or a
    deadlock or serialization failure (PostgreSQL); ``unreachable``: tries that found a
    PostgreSQL server unreachable, waited out (see ``ledger_timeout``). ``busy_since``: when
    (``time.monotonic()``) a transaction began finding the ledger busy, while one still does.
    """

    busy: int = 0
    unreachable: int = 0
    busy_since: float | None = None


class Outcome(NamedTuple):
    """A finished attempt, to be committed: ``state`` is done, failed, dead or vanished.

    ``stat`` is ``(size, mtime_ns, inode)`` of the file handled when it is not the scanned one
    (identity ``"path"``: the name was rewritten between the scan and the open), so that a
    post-commit action later recognises the file that was handled. ``attempted`` is ``False``
    for an item given up on without running: no attempt is counted for it.
    ``next_attempt_at`` is in the caller's clock, as is ``started_at``: when the attempt
    began (the joblog's start; ``None``: the ledger keeps the time it noted the start, at the
    latest when this outcome commits).
    """

    key: str
    fence: int
    state: str
    error: str | None = None
    next_attempt_at: float | None = None
    post_action: str | None = None
    stat: tuple[int, int, int] | None = None
    attempted: bool = True
    started_at: float | None = None


@dataclass(frozen=True, slots=True)
class LockInfo(RowValue):
    """A job lock as recorded in the ledger (times in the caller's clock)."""

    job: str = field(metadata=column(sql="job_id"))
    owner: str
    pid: int | None
    host: str | None
    pid_start: str | None
    acquired_at: float = field(metadata=column(time=True))
    expires_at: float = field(metadata=column(time=True))

    @property
    def holder(self) -> ProcessIdentity:
        """The process that holds the lock."""
        return ProcessIdentity(self.host or "", self.pid or 0, self.pid_start)


@dataclass(frozen=True, slots=True)
class RunnerInfo(RowValue):
    """A runner registered for a job: whose leases its liveness vouches for."""

    owner: str
    pid: int | None
    host: str | None
    pid_start: str | None
    shared: bool
    started_at: float = field(metadata=column(time=True))
    heartbeat_at: float = field(metadata=column(time=True))
    expires_at: float = field(metadata=column(time=True))

    @property
    def holder(self) -> ProcessIdentity:
        """The runner's process."""
        return ProcessIdentity(self.host or "", self.pid or 0, self.pid_start)

    def alive(self, now: float, me: ProcessIdentity) -> bool:
        """Heartbeat current (``now`` in the same clock as the row) and process not known dead."""
        return self.expires_at >= now and not holder_is_dead(self.holder, me=me)


@dataclass(frozen=True, slots=True)
class Listing(RowValue):
    """A job's listing role, and its listings (runners sharing a job: one of them lists the
    source and registers its files; every one claims them from the ledger).

    The role is a lease like an item's: ``owner`` holds it until ``lease_until`` (renewed by
    its heartbeats), ``fence`` grows with every holder. ``generation`` numbers the listings
    begun, ``complete`` the last one that registered every file it found (0: none yet):
    ``started_at`` is when listing ``generation`` began (``None`` for a watch's scan: see
    ``Ledger.begin_listing``), ``found_done`` and ``found_dead`` how many of the files it
    found so far the ledger had done or dead already; ``listed_at`` is when listing
    ``complete`` ended and ``listed_files`` how many files that one found (what ``status``
    says of the last listing while the next is under way). ``registered`` counts the waiting
    items listings registered (it grows: a runner that waits for work watches it).
    ``not_ready`` is what listing ``complete`` left out as not ready yet, as
    :func:`encode_not_ready` stored it (``None``: nothing, or a watch's scan): read it with
    :meth:`not_ready_counts`; every runner that goes by that listing reports those files.
    """

    job: str
    owner: str | None
    fence: int
    lease_until: float | None = field(metadata=column(time=True))
    since: float | None = field(metadata=column(time=True))
    generation: int
    complete: int
    started_at: float | None = field(metadata=column(time=True))
    listed_at: float | None = field(metadata=column(time=True))
    listed_files: int
    found_done: int
    found_dead: int
    registered: int
    not_ready: str | None = None

    def not_ready_counts(self) -> dict[str, int]:
        """The files listing ``complete`` left out as not ready yet, by count of
        :class:`RunTotals` (``unsettled``, ``unmarked``, ...; ``future``: of the unsettled,
        those changed at a time ahead of the clock): see :func:`decode_not_ready`."""
        return decode_not_ready(self.not_ready)

    def held_by(self, owner: str, now: float) -> bool:
        """Whether ``owner`` holds the role at ``now`` (the row's clock)."""
        return self.owner == owner and self.lease_until is not None and self.lease_until >= now

    def stale_for(self, started: float, now: float) -> bool:
        """Whether a ``run()`` that started at ``started`` cannot go by this role's listings,
        and may take the role over to list again at ``now`` (both in the row's clock; see
        ``Ledger.take_listing``'s ``fresh_since``). The last listing is a ``run()``'s (it has
        a start) and began before ``started`` (it cannot have found what settled since), and
        its holder is not listing nor about to:

        - it began that listing itself (its tenure began no later) and is done with it (it is
          complete, none under way); or
        - it took the role after that listing began (the one under way, if any, is not its
          own: its holder ended mid-way) and has begun none since, more than
          :data:`LISTING_GRACE` ago: a holder about to list begins at once, one that has not
          by then has nothing to list (it goes by that listing), and a later run must not
          wait for it to end.
        """
        if self.started_at is None or self.started_at >= started or self.since is None:
            return False
        if self.since <= self.started_at:
            return self.complete > 0 and self.generation == self.complete
        return self.since < now - LISTING_GRACE


@dataclass(frozen=True, slots=True)
class Registered:
    """What registering a chunk of listed files found: ``new`` items registered (waiting),
    and how many the ledger had ``done`` or ``dead`` already."""

    new: int = 0
    done: int = 0
    dead: int = 0


#: The item's runner's pid or host, from its latest history row (index runs_owner).
_RUNNER = "(SELECT {} FROM runs WHERE runs.owner = items.runner ORDER BY id DESC LIMIT 1)"


@dataclass(frozen=True, slots=True)
class ItemInfo(RowValue):
    """One item as the operator commands show it: its file, its state, and its joblog.

    The joblog is the latest attempt's: ``started_at`` (when it began; ``None`` before the
    first), ``finished_at`` (when its outcome committed; ``None`` while it runs, or when its
    runner died or stopped during it) and ``runner`` (the owner id of the runner that made
    it, with that runner's ``runner_pid`` and ``runner_host`` when the run history has them).
    An outcome that was not an attempt (an item given up on without running, or found
    vanished) has the runner that recorded it, its ``finished_at``, and no ``started_at``.
    ``owner`` and ``lease_until`` are the lease (a ``running`` item's holder). Times are in
    the caller's clock.
    """

    key: str
    relpath: str
    size: int
    mtime_ns: int
    state: str
    #: Attempts that started, and how many of them the runner's death or stop cut short.
    attempts: int
    interrupted: int
    last_error: str | None
    updated_at: float = field(metadata=column(time=True))
    inode: int = 0
    owner: str | None = None
    fence: int = 0
    lease_until: float | None = field(default=None, metadata=column(time=True))
    next_attempt_at: float | None = field(default=None, metadata=column(time=True))
    post_action: str | None = None
    created_at: float | None = field(default=None, metadata=column(time=True))
    started_at: float | None = field(default=None, metadata=column(time=True))
    finished_at: float | None = field(default=None, metadata=column(time=True))
    runner: str | None = None
    runner_pid: int | None = field(default=None, metadata=column(sql=_RUNNER.format("pid")))
    runner_host: str | None = field(default=None, metadata=column(sql=_RUNNER.format("host")))

    def __post_init__(self) -> None:
        checked_state(self.state, self.key)

    @property
    def duration(self) -> float | None:
        """Seconds from the latest attempt's start to its committed outcome, if it has both."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(self.finished_at - self.started_at, 0.0)


#: The times :class:`ItemFilter` can bound: the last change of an item, or its last outcome.
TimeField = Literal["updated", "finished"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemFilter:
    """Which items :meth:`~asyncbatch._ledger.base.Ledger.list_items` returns.

    ``states``: any of these (empty: every state). ``glob``: a shell pattern matched against
    the whole relpath (``*`` crosses ``/``; ``?`` and ``[...]`` match one byte of the name).
    ``after``/``before``: bounds (caller's clock; ``after`` inclusive, ``before`` exclusive)
    on the item's ``time``: ``"updated"`` (its last change) or ``"finished"`` (its latest
    outcome; items without one are left out). ``limit``: at most this many (``None``: all).
    """

    states: tuple[str, ...] = ()
    glob: str | None = None
    time: TimeField = "updated"
    after: float | None = None
    before: float | None = None
    limit: int | None = 100


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What :meth:`~asyncbatch._ledger.base.Ledger.forget` did: the items whose rows it
    deleted, and those it refused because a live lease holds them (left as they were)."""

    forgotten: tuple[ItemInfo, ...] = ()
    refused: tuple[ItemInfo, ...] = ()


def _count(label: str, since: int, *, category: bool = False, rule: str = "") -> Any:
    """A count of :class:`RunTotals`: how the report names it, the schema version whose
    history rows first kept it, whether it is a category of the seen files, and the readiness
    rule (``age``, ``marker``, ...) whose files not ready yet it counts, if it does."""
    return field(
        default=0, metadata={"label": label, "since": since, "category": category, "rule": rule}
    )


@dataclass(slots=True, kw_only=True)
class RunTotals(RowValue):
    """The counts of a run (see :mod:`asyncbatch._report`): the one place their names live.

    Every settled file a run sees ends in exactly one *category*; the categories add up to
    ``seen``. The other counts say more (attempts that failed, outcomes refused, files left
    for later). The live counters (``Counters``), the report (``Report``), the progress
    snapshot (``Statistics``), the history rows (their columns), the metrics and the report's
    words all iterate these fields: a count is added here, and nowhere else.
    """

    seen: int = _count("seen", 0)
    done: int = _count("done", 0, category=True)
    done_before: int = _count("done before", 1, category=True)
    held: int = _count("held by other runners", 1, category=True)
    waiting: int = _count("waiting for a retry", 1, category=True)
    dead: int = _count("dead", 0, category=True)
    dead_before: int = _count("dead before", 1, category=True)
    vanished: int = _count("vanished", 0, category=True)
    unfinished: int = _count("unfinished", 1, category=True)
    #: Failed attempts (each retried, or made dead).
    failed: int = _count("failed attempt{s}", 0)
    #: Outcomes refused because another runner had taken the lease over.
    lost: int = _count("outcome{s} refused (lease taken over)", 1)
    #: Of the seen, those left waiting in the ledger by earlier runs (not found by a scan).
    earlier: int = _count("of the seen left waiting by earlier runs", 1)
    #: Files the last scan found that are not settled yet (not among the seen): the ``age``
    #: rule does not hold for them. The counts of files not ready yet by the other rules
    #: follow (each file counted once, by the first rule it fails: see ``_ready.KINDS``).
    unsettled: int = _count("file{s} not settled yet", 4, rule="age")
    #: Files the scan found settled and the run did not register in the ledger (it was
    #: stopped or killed first): what it left in the source.
    unregistered: int = _count("file{s} not registered yet", 4)
    #: ``stable:N``: files still being looked at (a run), or changed between looks.
    unstable: int = _count("file{s} not ready yet: not seen unchanged enough", 6, rule="stable")
    #: ``marker:SUFFIX``: files whose marker is missing, or older than the file (modified
    #: after it): the label says both, as both are counted here.
    unmarked: int = _count(
        "file{s} not ready yet: marker missing, or older than its file", 6, rule="marker"
    )
    #: ``dir-marker:NAME``: files whose directory's marker is missing, or older than the file.
    dir_unmarked: int = _count(
        "file{s} not ready yet: directory marker missing, or older than its file",
        6,
        rule="dir-marker",
    )
    #: ``min-size:BYTES``: files smaller than that.
    too_small: int = _count("file{s} not ready yet: smaller than min-size", 6, rule="min-size")
    #: ``max-age:DURATION``: files older than that, left alone.
    too_old: int = _count("file{s} left alone: older than max-age", 6, rule="max-age")

    def snapshot(self) -> RunTotals:
        """A copy of just the counts."""
        return RunTotals(**{name: getattr(self, name) for name in TOTALS})

    def seen_accounted(self) -> int:
        """Seen items in a category other than unfinished."""
        return sum(getattr(self, name) for name in CATEGORIES if name != "unfinished")


#: The counts, in their order: the history row's columns.
TOTALS: Final = tuple(f.name for f in fields(RunTotals))
#: The categories of the seen files (they add up to ``seen``).
CATEGORIES: Final = tuple(f.name for f in fields(RunTotals) if f.metadata["category"])
#: How the report names each count (``{s}``: where a plural takes an ``s``).
LABELS: Final = {f.name: str(f.metadata["label"]) for f in fields(RunTotals)}
#: The counts of files not ready yet, by the readiness rule they count (``age``: unsettled).
NOT_READY: Final = {
    str(f.metadata["rule"]): f.name for f in fields(RunTotals) if f.metadata["rule"]
}


#: What :attr:`Listing.not_ready` counts: the counts of files not ready yet, and ``future``.
NOT_READY_KEPT: Final = (*NOT_READY.values(), "future")


def encode_not_ready(counts: Mapping[str, int] | None) -> str | None:
    """A listing's files not ready yet (by count of :data:`NOT_READY_KEPT`) as stored: a JSON
    object of the counts that are not 0, or ``None`` for none."""
    kept = {name: n for name, n in (counts or {}).items() if name in NOT_READY_KEPT and n > 0}
    return json.dumps(kept, separators=(",", ":")) if kept else None


def changed_counts(
    files: int, stored: str | None, not_ready: Mapping[str, int]
) -> tuple[int, str | None]:
    """A complete listing's found files and not ready yet ones as stored (``files``,
    ``stored``), less and more the files a runner found changed since and not ready yet
    (``not_ready``, see ``Ledger.listing_changed``): ``(files, stored)`` to store."""
    counts = decode_not_ready(stored)
    moved = 0
    for name, n in not_ready.items():
        if name in counts and n > 0:
            counts[name] += n
            moved += n if name != "future" else 0
    return max(files - moved, 0), encode_not_ready(counts)


def decode_not_ready(text: str | None) -> dict[str, int]:
    """A listing's files not ready yet as :func:`encode_not_ready` stored them, every count of
    :data:`NOT_READY_KEPT` (0 when it is not there). A value it did not write (``NULL``, not
    an object of counts) counts none: less said, never more."""
    counts = dict.fromkeys(NOT_READY_KEPT, 0)
    if not text:
        return counts
    try:
        found = json.loads(text)
    except ValueError:
        return counts
    if not isinstance(found, dict):
        return counts
    for name, n in found.items():
        if name in counts and isinstance(n, int) and not isinstance(n, bool) and n > 0:
            counts[name] = n
    counts["future"] = min(counts["future"], counts["unsettled"])
    return counts


def totals_since(version: int) -> tuple[str, ...]:
    """The counts a history row first kept at schema version ``version`` + 1 (what the
    migration from ``version`` adds as columns)."""
    return tuple(f.name for f in fields(RunTotals) if f.metadata["since"] == version)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """One heartbeat of a runner: what it renews for ``ttl`` more seconds (its lock, when it
    ``holds_lock``; its liveness; its item ``leases``, ``(key, fence)``), and its run's counts
    so far (``totals``, kept in the history row ``run_id``)."""

    job: str
    owner: str
    ttl: float
    leases: Leases = ()
    holds_lock: bool = False
    run_id: int = 0
    totals: RunTotals = field(default_factory=lambda: RunTotals())
    #: The fence of the job's listing role, when this runner holds it (renewed too).
    lister: int | None = None


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a :class:`Heartbeat` renewed: whether the runner is still ``alive`` (its liveness
    record, and its lock when it holds one, were still its own), and the keys of the leases it
    sent that were ``lost`` (taken over by another runner since; not renewed)."""

    alive: bool
    lost: frozenset[str] = frozenset()
    #: Whether the job's listing role, sent as ``Heartbeat.lister``, is still this runner's.
    lister: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEnd:
    """How a runner leaves: its records removed (its lock too, when it ``holds_lock``), its
    history row ``run_id`` finished with ``totals`` and ``exit_status``.

    ``leases`` are leases it still holds (its release of them failed): given back first, in
    the same transaction, so that a runner's leases never outlive its records (if that fails
    too, nothing is removed: the next runner finds a dead runner and takes them over at once).
    """

    job: str
    owner: str
    holds_lock: bool
    run_id: int
    totals: RunTotals
    exit_status: str
    #: Whether it holds the job's listing role (given up: another runner may take it at once).
    lister: bool = False
    #: Leases still held, ``(key, fence)``: given back with the records.
    leases: Leases = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSettings:
    """What decides which files are a job's items, as the ledger records it for the job.

    ``source`` is the directory (absolute, its symlinks resolved): a job's for good, another
    is refused. The scan rules (``recursive``, ``follow_symlinks``, ``ignore``: the globs,
    sorted and without repeats) may change from run to run; a run that changes them records
    the change in its history row. The identity mode is the job's too, kept in its own column
    (see :meth:`~asyncbatch._ledger.base.Ledger.job_identity`).

    ``ready`` is the job's readiness rules (their command-line forms, sorted): a run with
    other rules is refused unless it gives them explicitly (``RunStart.ready_given``), and
    then records the change in its history row. ``settle`` is the settle window of the
    job's latest run (recorded so that ``explain`` needs no flag; a change is no rule change).

    Stored as one JSON object, a key per field: a setting added later is one more field
    here, with a default that an older record then takes (``ready``: ``age``, the rule of
    every run before rules existed).
    """

    source: str
    recursive: bool = False
    follow_symlinks: bool = False
    ignore: tuple[str, ...] = ()
    ready: tuple[str, ...] = ("age",)
    settle: float = 1.0

    def to_json(self) -> str:
        """The record as stored: a JSON object (ASCII; a name that is not UTF-8 round-trips)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: Any, job: str | None = None) -> JobSettings:
        """A stored record; keys it lacks take their defaults, keys it does not know are left.
        :class:`LedgerValueError` (``jobs.settings``, of ``job``) when it is not a JSON object
        or a value of a known key is not of that setting's type: never taken as settings."""
        of = "" if job is None else f"of job {job!r}"
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            raise LedgerValueError("jobs.settings", text, f"{of} (not JSON)".strip()) from None
        if not isinstance(data, dict):
            raise LedgerValueError("jobs.settings", text, f"{of} (not a JSON object)".strip())
        known: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if not _SETTING_TYPES[f.name](value):
                raise LedgerValueError("jobs.settings", text, f"{of} ({f.name}: {value!r})".strip())
            known[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**known)

    def rule_changes(self, recorded: JobSettings) -> tuple[str, ...]:
        """The scan and readiness rules that differ from ``recorded``, one phrase each
        (``"recursive: off -> on"``, ``"ready: age -> marker:.done"``); the source and the
        settle window aside."""
        return tuple(
            f"{f.name.replace('_', ' ')}: {_shown(f.name, getattr(recorded, f.name))} -> "
            f"{_shown(f.name, getattr(self, f.name))}"
            for f in fields(self)
            if f.name not in ("source", "settle")
            and getattr(self, f.name) != getattr(recorded, f.name)
        )

    def rules(self) -> str:
        """The scan and readiness rules in words (``"recursive: on, follow symlinks: off,
        ignore: none, ready: age, settle: 1s"``)."""
        return ", ".join(
            f"{f.name.replace('_', ' ')}: {_shown(f.name, getattr(self, f.name))}"
            for f in fields(self)
            if f.name != "source"
        )


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: What each setting of a stored :class:`JobSettings` must be (see ``from_json``).
_SETTING_TYPES: Final[dict[str, Callable[[Any], bool]]] = {
    "source": lambda v: isinstance(v, str) and bool(v),
    "recursive": lambda v: isinstance(v, bool),
    "follow_symlinks": lambda v: isinstance(v, bool),
    "ignore": _is_texts,
    "ready": _is_texts,
    "settle": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0,
}


def _shown(name: str, value: object) -> str:
    """A setting's value in a message: on/off, a list of quoted globs or of rules, seconds,
    or ``none``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if name == "ready" and isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, tuple):
        return ", ".join(repr(v) for v in value) or "none"
    if name == "settle" and isinstance(value, float):
        return f"{value:g}s"
    return repr(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStart:
    """How a runner joins a job (see :meth:`~asyncbatch._ledger.base.Ledger.start_runner`):
    who it is (``owner``, ``me``), whether it shares the job (``shared``) or takes its lock,
    its liveness ``ttl``, its ``mode`` (``"run"`` or ``"watch"``), and the job's ``identity``
    and ``settings`` as this runner would use them; ``ready_given``: whether its readiness
    rules were given explicitly (then they may change the job's; else they must be the job's).
    """

    job: str
    owner: str
    me: ProcessIdentity
    ttl: float
    shared: bool
    mode: str
    identity: str
    settings: JobSettings
    ready_given: bool = False


@dataclass(frozen=True, slots=True)
class Started:
    """What :meth:`~asyncbatch._ledger.base.Ledger.start_runner` did: the run history row it
    opened, the ``stale`` lock it took over (or, for a shared runner, cleared), if any, and
    the scan rules this run ``changed`` (one phrase each; recorded in its history row)."""

    run_id: int
    stale: LockInfo | None = None
    changed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunInfo(RowValue):
    """One row of the run history: who ran, when, how it ended, and its counts.

    ``exit_status`` is ``None`` while the run is alive; ``"killed"`` once a later runner found
    its process gone, ``"lost"`` once one found its heartbeat stopped without seeing its
    process gone (another host, or it stalled: if it resumes, it records its own end). The
    counts of a run that ended are its report's. Those of a live, killed or lost run
    are as of its last heartbeat, but for what the ledger itself knows (``from_joblog``): the
    items it finished (done, dead, vanished), from the joblog, and the items it still holds
    leased (``running``, in flight: unfinished), so that ``seen`` is at least what the ledger
    shows it touched (a later runner that finds it gone keeps that ``seen`` in its row before
    it puts those items back: see ``RUN_KILLED``). ``settings_changed``: the scan rules this
    run changed, in words (``None``: none).
    """

    id: int
    job: str
    owner: str
    pid: int | None
    host: str | None
    mode: str
    started_at: float = field(metadata=column(time=True))
    finished_at: float | None = field(metadata=column(time=True))
    exit_status: str | None
    totals: RunTotals = field(metadata=column(row=RunTotals))
    settings_changed: str | None = None
    from_joblog: bool = field(default=False, metadata=column(read=False))

    def with_joblog(self, finished: dict[str, int]) -> RunInfo:
        """This run, its done, dead and vanished counts those of the joblog (``finished``:
        the items it finished, by state, and under :data:`IN_FLIGHT` those it holds leased);
        ``seen`` at least what its categories and its leases add up to, and ``unfinished``
        the rest of it (its leases among them: in flight, as its report would count them)."""
        counts = self.totals.snapshot()
        for state in JOBLOG_COUNTS:
            setattr(counts, state, finished.get(state, 0))
        counts.unfinished = 0
        accounted = sum(getattr(counts, name) for name in CATEGORIES)
        counts.seen = max(counts.seen, accounted + finished.get(IN_FLIGHT, 0))
        counts.unfinished = counts.seen - accounted
        return dataclasses.replace(self, totals=counts, from_joblog=True)


#: The counts of a run that the joblog keeps (see :meth:`RunInfo.with_joblog`).
JOBLOG_COUNTS: Final = ("done", "dead", "vanished")
#: The state of the items a runner holds leased (the ledger's ``owner``): in flight, counted
#: among its run's unfinished (see :meth:`RunInfo.with_joblog`).
IN_FLIGHT: Final = "running"
#: The categories of a history row that neither the joblog nor the leases give: a killed run's
#: ``seen`` is at least these, as of its last heartbeat, plus what the ledger shows it touched.
SAVED_CATEGORIES: Final = tuple(
    name for name in CATEGORIES if name not in JOBLOG_COUNTS and name != "unfinished"
)


# -- the idempotency store (IdempotencyMiddleware) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response stored for an idempotency key: status, headers (latin-1 bytes), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


IdempotencyDecision = Literal["run", "replay", "conflict", "mismatch", "unstored"]

#: Why a key's response was not stored, though its request ran and answered (so the key must
#: not run again): ``"incomplete"``, the response was cut short (the client left, the app
#: stopped mid-response) or the store failed to take it; ``"too_large"``, it was larger than
#: the middleware stores; ``"unfinished"``, it started more than its lock's time ago and has
#: not completed (its server stopped while sending it, or still sends it).
UnstoredReason = Literal["incomplete", "too_large", "unfinished"]


@dataclass(frozen=True, slots=True)
class IdempotencyRequest:
    """A keyed request as the store knows it: its key in its scope, the fingerprint of the
    request, and the random token of the request that may own the key."""

    scope: str
    key: str
    fingerprint: str
    token: str


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """What a keyed request gets: run it (and own the key), replay, 409 or 422; or, for a key
    whose request ran but whose response could not be stored, ``"unstored"``.

    ``why`` says, for ``"run"``, whether the key was ``"new"``, ``"expired"`` or taken over
    from an ``"abandoned"`` request, and for ``"unstored"`` the :data:`UnstoredReason`;
    ``stored`` is the response to replay.
    """

    decision: IdempotencyDecision
    why: str = ""
    stored: StoredResponse | None = None
