"""The ledger's contract: one abstract class, each method documented once, and the logic that
does not depend on the backend.

A backend (:mod:`.sqlite`, :mod:`.postgres`) implements the abstract methods, each as one
transaction, and inherits the rest: the job's decision (:func:`decide_job`: its identity,
source and scan rules), the job-lock decision (:func:`decide_lock`), :meth:`Ledger.job_exists`,
the zero-filled :meth:`Ledger.counts` and the key-or-relpath lookup of
:meth:`Ledger.find_items`. A ledger is also an
:class:`~asyncbatch._ledger.idempotency.IdempotencyStore` (its methods and its decision are
documented there). Every backend passes the one contract suite
(``tests/test_ledger_contract.py``).

Guarantees every backend gives:

- Every write is one transaction; cancelling the caller never leaves one open or half-done.
- An item write is fenced: it changes the row only while the row is ``running``, leased to the
  writer (``owner``) under the same ``fence``. A completion that changes nothing lost its
  lease and is reported, never counted.
- Errors of the database leave as :class:`~asyncbatch.LedgerError`, one line, naming the state
  (a DSN without its password).
"""

from __future__ import annotations

import abc
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Final, TypeVar

import anyio

from .._exceptions import ConfigurationError, JobLockedError, LedgerError
from .._procinfo import ProcessIdentity, holder_is_dead
from .idempotency import IdempotencyStore
from .types import (
    STATES,
    ClaimedRow,
    Forgotten,
    Heartbeat,
    ItemFilter,
    ItemInfo,
    JobSettings,
    Leases,
    LedgerErrors,
    Listing,
    LockInfo,
    Outcome,
    QueuedRow,
    Registered,
    Renewal,
    RunEnd,
    RunInfo,
    RunnerInfo,
    RunStart,
    ScannedRow,
    Started,
    checked_state,
    iso_time,
)

__all__ = [
    "BUSY",
    "Busy",
    "Ledger",
    "decide_job",
    "decide_lock",
    "decode_twins",
    "encode_twins",
    "end_of_gone",
    "glob_regex",
    "ledger_error",
    "live_user",
    "looks_like_key",
    "retrying",
    "schema_difference",
    "upgrade_refused",
]

T = TypeVar("T")


# -- backend-neutral decisions -------------------------------------------------------------------


def encode_twins(twins: Mapping[str, int] | None) -> str | None:
    """A listing's twins (files by key, see :meth:`Ledger.listing_twins`) as stored: a JSON
    object, or ``None`` for none."""
    return json.dumps(dict(twins), separators=(",", ":")) if twins else None


def decode_twins(text: str | None) -> dict[str, int]:
    """A listing's twins as :func:`encode_twins` stored them; a value it did not write (not
    an object of counts) reads as none: a report then counts those files unfinished, less
    than may be true, never more."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        key: files
        for key, files in found.items()
        if isinstance(files, int) and not isinstance(files, bool) and files > 0
    }


def decide_job(
    state: str, start: RunStart, identity: str, recorded: JobSettings | None
) -> tuple[bool, tuple[str, ...]]:
    """Decide whether ``start`` may run its job as the ledger ``state`` records it.

    ``identity`` and ``recorded`` (``None``: not recorded yet, a job of an older ledger) were
    read inside the deciding transaction. Returns whether to record ``start.settings``, and
    the scan rules it changes (phrases, see :meth:`JobSettings.rule_changes`). The identity
    mode and the source are the job's for good: another is refused, with
    :class:`ConfigurationError` naming both and the way out (another ``--job``). Other
    readiness rules are refused the same way unless they were given explicitly
    (``start.ready_given``): then they are the change recorded.
    """
    job = start.job
    if identity != start.identity:
        raise ConfigurationError(
            f"job {job!r} uses identity={identity!r} in state {state!r}, not "
            f"{start.identity!r}: keep the identity or use another --job"
        )
    wanted = start.settings
    if recorded is None:
        return True, ()
    if recorded.source != wanted.source:
        raise ConfigurationError(
            f"job {job!r} in state {state!r} scans {recorded.source!r}, not "
            f"{wanted.source!r}: a job keeps its source; use --job NAME for another one"
        )
    if recorded.ready != wanted.ready and not start.ready_given:
        rules = " ".join(f"--ready {rule}" for rule in recorded.ready)
        raise ConfigurationError(
            f"job {job!r} in state {state!r} is ready by {', '.join(recorded.ready)}, not "
            f"{', '.join(wanted.ready)}: give {rules} (or other --ready rules, to change them "
            "on purpose)"
        )
    if recorded == wanted:
        return False, ()
    return True, wanted.rule_changes(recorded)


def decide_lock(
    job: str,
    held: LockInfo | None,
    runners: Sequence[RunnerInfo],
    *,
    me: ProcessIdentity,
    shared: bool,
    now: float,
    shown: Callable[[float], float] = float,
) -> LockInfo | None:
    """Decide whether ``me`` may run ``job``; return the stale lock to take over (or clear).

    ``held`` and ``runners`` were read inside the deciding transaction, their times in the same
    clock as ``now``; ``shown`` turns such a time into the caller's clock for the message. A
    lock is stale once its heartbeat expired or its holder (on this host) is dead. An exclusive
    runner (not ``shared``) is also refused while a live shared runner works on the job.
    Raises :class:`JobLockedError` naming the live holder.
    """
    if held is not None and held.expires_at >= now and not holder_is_dead(held.holder, me=me):
        raise JobLockedError(job, held.pid, held.host, iso_time(shown(held.acquired_at)))
    if not shared:
        for runner in runners:
            if runner.shared and runner.alive(now, me):
                raise JobLockedError(
                    job,
                    runner.pid,
                    runner.host,
                    iso_time(shown(runner.started_at)),
                    shared_runner=True,
                )
    return held


def live_user(
    rows: Sequence[tuple[int | None, str | None, str | None, float]],
    now: float,
    me: ProcessIdentity,
) -> ProcessIdentity | None:
    """A process that uses a ledger now, among ``rows`` of its runners and lock holders
    (``pid, host, pid_start, expires_at``; see ``LEDGER_USERS``): heartbeat current at ``now``
    and process not known dead. This process itself is no such user (it runs this asyncbatch).

    An upgrade of the schema is refused while one is found: a runner of an older asyncbatch
    would go on writing the rows of its own schema into the new one (a joblog without its
    attempts' times and runners, counts the runners of this version would get wrong)."""
    for pid, host, pid_start, expires_at in rows:
        holder = ProcessIdentity(host or "", pid or 0, pid_start)
        if holder == me:
            continue
        if expires_at >= now and not holder_is_dead(holder, me=me):
            return holder
    return None


def upgrade_refused(state: str, found: int, known: int, user: ProcessIdentity) -> LedgerError:
    """The one line refusing to upgrade a ledger that a runner of an older asyncbatch uses."""
    return LedgerError(
        f"state {state!r} has schema version {found}, older than the {known} this asyncbatch "
        f"uses, and pid {user.pid} on host {user.host!r} (an asyncbatch of that version) is "
        "using it: stop it, or wait for it to end; the next 'asyncbatch run' after that "
        "upgrades it in place (it was not modified)"
    )


def end_of_gone(holder: ProcessIdentity, *, me: ProcessIdentity) -> str:
    """The ``exit_status`` recorded for the run of a runner found gone: ``"killed"`` when its
    process is known dead (on this host: its pid gone, or another process's now), ``"lost"``
    when only its heartbeat stopped (another host, or a process that stalled: suspended past
    its lease, it may resume, and then records its own end)."""
    return "killed" if holder_is_dead(holder, me=me) else "lost"


def looks_like_key(text: str) -> bool:
    """Whether ``text`` may be an item key: keys are ASCII (hex digits, digits and ``-``).

    A file name that is not valid UTF-8 (surrogate-escaped) is never ASCII: only a relpath.
    """
    return text.isascii()


def glob_regex(pattern: str) -> str:
    """A shell pattern as a regular expression that Python's ``re`` and PostgreSQL read alike.

    It is matched (whole, with ``.`` matching a newline) against a relpath's bytes decoded as
    latin-1, so that every name matches the same way on both backends, UTF-8 or not: ``*`` is
    any bytes (``/`` too), ``?`` one byte, ``[...]`` / ``[!...]`` one byte of (not of) a set;
    a ``[`` without its ``]`` is itself. Other ASCII characters but letters and digits are escaped.
    """
    text = os.fsencode(pattern).decode("latin-1")
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := _bracket_end(text, i)) > 0:
            body = text[i:end]
            i = end + 1
            negate = body.startswith("!")
            chars = [_in_bracket(ch) for ch in (body[1:] if negate else body)]
            out.append("[" + ("^" if negate else "") + "".join(chars) + "]")
        else:
            out.append(_literal(c))
    return "".join(out)


def _bracket_end(text: str, start: int) -> int:
    """Where the ``]`` closing a bracket opened before ``start`` is, or -1."""
    j = start
    if j < len(text) and text[j] == "!":
        j += 1
    if j < len(text) and text[j] == "]":
        j += 1  # a ']' first in the set is a member
    return text.find("]", j)


def _in_bracket(c: str) -> str:
    """One member of a bracket set: a ``-`` between members stays a range."""
    if c == "-" or not c.isascii() or c.isalnum():
        return c
    return _literal(c)


def _literal(c: str) -> str:
    if not c.isascii() or c.isalnum():
        return c  # never special, in either dialect
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"[\\x{ord(c):02x}]"
    return "\\" + c


class Busy:
    """What an attempt returns when the database was busy (another writer, a deadlock)."""


#: The one :class:`Busy` value.
BUSY: Final = Busy()


#: Keys per read of :meth:`Ledger.states_of`.
STATES_OF_CHUNK = 10_000
#: How many items a streamed listing (:meth:`Ledger.iter_items`) reads at a time, and how many
#: a chunked forget (:meth:`Ledger.forget_chunks`) deletes in one transaction: what such a
#: command holds in memory, whatever the number of items.
ITEMS_PAGE = 5000
#: Where a keyset page of a listing ended: the last item's ``updated_at`` (the ledger's own
#: value, its clock) and key.
PageEnd = tuple[float, str]
#: How many of a job's newest items :meth:`Ledger.work_left` looks at for one running.
WORK_LEFT_NEWEST = 2048
#: Seconds the log of forgotten items keeps an entry (see :meth:`Ledger.forgotten_since`).
FORGOTTEN_KEPT = 86400.0
#: Seconds a transaction waits for a busy ledger before it says so (and again as often).
BUSY_TELL_AFTER = 3.0


async def retrying(
    attempt: Callable[[], Awaitable[T | Busy]],
    *,
    patience: float,
    first_pause: float,
    longest_pause: float,
    on_timeout: Callable[[], Exception],
    errors: LedgerErrors | None = None,
    on_wait: Callable[[float, float], None] | None = None,
) -> T:
    """Await ``attempt()`` until it returns something other than :data:`BUSY`.

    Between tries: jittered pauses growing by half from ``first_pause`` to ``longest_pause``,
    awaited on the event loop (a cancelled caller stops waiting at once). Raises
    ``on_timeout()`` once ``patience`` seconds have passed. Each try that found the ledger
    busy is counted in ``errors.busy``. ``on_wait(waited, left)`` is called once the ledger
    has been busy for :data:`BUSY_TELL_AFTER` seconds, and again every as many seconds: a
    warning, so that a wait for a ledger locked by another process is never silent.
    """
    began = time.monotonic()
    deadline = began + patience
    told = began
    pause = first_pause
    jitter: random.Random | None = None  # made on the first pause: most transactions need none
    try:
        while True:
            result = await attempt()
            if not isinstance(result, Busy):
                return result
            if errors is not None:
                errors.busy += 1
                if errors.busy_since is None:
                    errors.busy_since = began
            now = time.monotonic()
            if now > deadline:
                raise on_timeout()
            if on_wait is not None and now - told >= BUSY_TELL_AFTER:
                told = now
                on_wait(now - began, deadline - now)
            if jitter is None:
                jitter = random.Random()
            await anyio.sleep(pause * (0.5 + jitter.random()))
            pause = min(pause * 1.5, longest_pause)
    finally:
        if errors is not None and errors.busy_since == began:
            errors.busy_since = None


# -- the contract --------------------------------------------------------------------------------


class Ledger(IdempotencyStore):
    """An open ledger: the job lock, runner liveness, claims, outcomes, the operator's reads,
    and (the :class:`~asyncbatch._ledger.idempotency.IdempotencyStore` it implements) the
    records of :class:`~asyncbatch.IdempotencyMiddleware`.

    Open one with :func:`asyncbatch._ledger.open_ledger`; close it with :meth:`close` or
    ``async with``. One instance runs one transaction at a time (a runner is one connection).
    """

    #: The state as it may be printed: a path, or a DSN without its password.
    name: str
    #: The caller's wall clock; every time handed in or out is in it.
    clock: Callable[[], float]
    #: The errors this open ledger met and outlasted (busy retries, outages waited out).
    errors: LedgerErrors

    # -- jobs --------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def meta(self, name: str) -> str | None:
        """A value from the ledger's ``meta`` table (``secret``, ``created_at``), or ``None``."""

    @abc.abstractmethod
    async def jobs(self) -> list[str]:
        """Every job this ledger knows, by name."""

    @abc.abstractmethod
    async def job_identity(self, job: str) -> str | None:
        """The identity mode recorded for ``job``, or ``None`` for an unknown job."""

    async def job_exists(self, job: str) -> bool:
        """Whether this ledger knows ``job``."""
        return await self.job_identity(job) is not None

    @abc.abstractmethod
    async def job_settings(self, job: str) -> JobSettings | None:
        """The source and scan rules recorded for ``job``; ``None`` for an unknown job, or one
        whose settings are not recorded yet (an older ledger's, until its next run)."""

    # -- the job lock and runners ------------------------------------------------------------------

    @abc.abstractmethod
    async def start_runner(self, start: RunStart) -> Started:
        """Join the job as a runner: record or check the job, take the job lock (or, for a
        ``shared`` runner, check that no exclusive runner holds it), register the runner (the
        liveness of its leases) and open its run history row, all in one transaction.

        That transaction is serialised with every other runner's start on the job (SQLite:
        ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock on the job), so an
        exclusive runner and a shared one starting at the same moment never both run: the one
        that starts second sees the other's lock row or runner record, and is refused.

        The job: a new one is recorded with ``start.identity`` and ``start.settings``; an
        existing one must have that identity and source, its scan rules may change (recorded,
        and named in :attr:`Started.changed` and the history row; see :func:`decide_job`);
        a job whose settings were never recorded (an older ledger's) gets them now.

        The lock: its row is taken with an insert that does nothing on conflict and released
        with ``DELETE ... WHERE job_id AND owner``. A lock whose holder is gone is taken over at
        once: same host and a dead pid (or a pid now used by another process), or an expired
        heartbeat (see :func:`decide_lock`); its run history rows are marked ``killed``. An
        exclusive runner is also refused while a live shared runner is registered.

        Raises :class:`ConfigurationError` (another identity mode or source) or
        :class:`JobLockedError` (a live runner holds the job); nothing is written then.
        """

    @abc.abstractmethod
    async def reap_stale_runners(
        self, job: str, me: ProcessIdentity, *, orphans: bool = False
    ) -> int:
        """Hand the leased items of the job's runners that are gone back; return how many.

        A runner is gone when its heartbeat expired or its process (on this host) is dead; its
        run history rows are marked ``killed`` (as are those of a stale lock's holder when the
        lock is taken over). A scan of the job's items, done only when a runner is found gone.

        With ``orphans`` (a run joining the job), the leases of owners that have no runner
        record are handed back too (counted with the others): a live runner has its record
        from before its first lease to after its last, so their owner is gone (a runner
        whose release of its leases failed, by an older asyncbatch that removed its record
        anyway). A read of the job's leased items.
        """

    @abc.abstractmethod
    async def runners(self, job: str) -> list[RunnerInfo]:
        """The job's registered runners."""

    @abc.abstractmethod
    async def heartbeat(self, beat: Heartbeat) -> Renewal:
        """Extend a runner's lock, liveness and item leases, and record its run's counts so
        far (what ``status`` shows of a live run, and what remains of a killed one); see
        :class:`Heartbeat`.

        The :class:`Renewal` is not ``alive`` when the lock or the runner record was taken
        from us (the caller must stop; no lease is renewed then); its ``lost`` keys are the
        leases another runner took over (the caller must not start, or go on with, those
        items).
        """

    @abc.abstractmethod
    async def release_runner(self, end: RunEnd) -> None:
        """Give back the leases it still holds (``end.leases``), remove a runner's records (and
        its lock) and finish its run history row: one transaction (leases never outlive the
        records of their owner)."""

    @abc.abstractmethod
    async def locks(self) -> list[LockInfo]:
        """Every job lock in the ledger."""

    @abc.abstractmethod
    async def force_unlock(self, job: str, owner: str) -> bool:
        """Delete a job lock held by ``owner``; ``False`` when it was not held by it."""

    # -- claims ------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_scanned(
        self, job: str, owner: str, lease: float, rows: Sequence[ScannedRow]
    ) -> list[ClaimedRow]:
        """Register scanned entries and lease the claimable ones, in one statement.

        New entries are inserted leased to ``owner`` for ``lease`` seconds; pending, vanished,
        failed (and due) and expired running entries are leased with ``fence`` incremented; an
        attempt is counted when it starts (see :meth:`commit_outcomes`), and a lease replacing
        one whose attempt started and never finished counts it as interrupted. Finished entries
        cost an index probe. Two runners never lease the same item.

        Returns a row for every entry but the plainly done ones: ``'running'``, leased to
        ``owner`` (by this claim, or already before it: a claim repeated after its reply was
        lost finds its leases, with their fences); ``'held'``, another runner's; ``'failed'``,
        a retry not due yet; ``'dead'``; and ``'done'`` with a post-commit action. Dead and done
        rows carry the file that was handled, so the caller can count or finish them.
        """

    @abc.abstractmethod
    async def claim_waiting(
        self,
        job: str,
        owner: str,
        lease: float,
        limit: int,
        skip: Sequence[str] = (),
        after: tuple[int, bytes] | None = None,
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` items waiting in the ledger: pending, or failed and due.

        The oldest ``(mtime_ns, relpath)`` first; concurrent runners get disjoint sets. The
        items whose key is in ``skip`` are left as they are (files the run found not settled
        yet: it leaves them waiting). Given ``after`` (an ``(mtime_ns, relpath)``), only the
        items after it in that order: a claim that goes on where the last one ended does not
        walk past the items left waiting before it again.
        """

    @abc.abstractmethod
    async def next_retry_at(self, job: str) -> float | None:
        """When the earliest failed item of the job becomes due, or ``None``."""

    # -- the listing role (runners sharing a job) ----------------------------------------------

    @abc.abstractmethod
    async def take_listing(
        self, job: str, owner: str, ttl: float, *, fresh_since: float | None = None
    ) -> Listing:
        """Take the job's listing role for ``owner`` for ``ttl`` seconds if it is free, or
        renew it if ``owner`` holds it; return the role as it is now (held by ``owner``, or by
        another runner: see :meth:`Listing.held_by`).

        It is free when nobody held it, its lease expired (its holder stalled or died past
        it), or its holder has no runner record any more (found gone, or it ended). Taking it
        over grows its fence. One transaction: concurrent runners never both take it.

        ``fresh_since`` (a ``run()`` that started then, in the caller's clock): the role is
        handed over to ``owner`` too when the last listing is too old for ``owner`` (a
        ``run()``'s, with a start, begun before ``fresh_since``) and its holder is neither
        listing nor about to: it began that listing itself and is done with it (complete, none
        under way), or it took the role after that listing began and has begun none in the
        :data:`~asyncbatch._ledger.types.LISTING_GRACE` seconds since (a runner about to list
        begins at once; one that took the role with nothing to list must not keep a later
        run waiting until it ends). See :meth:`Listing.stale_for`, evaluated in the ledger's
        clock. That listing cannot have found the files that settled after it began;
        ``owner`` lists again (see :class:`~asyncbatch._pipeline.shared.SharedRun`).
        """

    @abc.abstractmethod
    async def listing(self, job: str) -> Listing | None:
        """The job's listing role and listings (``None``: no runner ever listed for it)."""

    @abc.abstractmethod
    async def begin_listing(
        self, job: str, owner: str, fence: int, *, watching: bool = False
    ) -> Listing | None:
        """Begin a listing: a new generation, its start now, its counts at zero, and what
        earlier listings left queued dropped (this one lists every file again). ``None``
        when ``owner`` no longer holds the role under ``fence`` (nothing is changed).

        ``watching``: a watch's full scan, which registers only the files it sees first (the
        others it registered before): a listing that says the source was looked at whole,
        without a start (``started_at`` ``None``), so that no report counts its files as the
        job's (see :func:`~asyncbatch._pipeline.shared.count_listing`)."""

    @abc.abstractmethod
    async def register_listed(
        self, job: str, owner: str, fence: int, rows: Sequence[ScannedRow]
    ) -> Registered | None:
        """Register listed files as waiting items (``pending``; an item the ledger holds is
        left as it is), count the new ones into the role's ``registered`` and those found done
        or dead into the listing's; in one transaction. ``None`` when ``owner`` no longer
        holds the role under ``fence`` (nothing is registered)."""

    @abc.abstractmethod
    async def queue_listed(
        self, job: str, owner: str, fence: int, rows: Sequence[QueuedRow]
    ) -> Registered | None:
        """Queue listed files for the job's runners, as :meth:`register_listed` registers them
        but without an item row each: the files the ledger holds no item of are kept as one
        batch (``queued``), in order, until a runner takes them (:meth:`take_queued`), which
        registers them leased to it; an item the ledger holds is left as it is (a vanished one
        waits again). The queued files count as ``pending`` in :meth:`counts`, and into the
        role's ``registered``; those found done or dead into the listing's. One transaction;
        ``None`` when ``owner`` no longer holds the role under ``fence`` (nothing is queued).
        A new listing (:meth:`begin_listing`) drops what the previous one left queued."""

    @abc.abstractmethod
    async def take_queued(
        self, job: str, owner: str, lease: float, limit: int
    ) -> tuple[list[QueuedRow], list[ClaimedRow]]:
        """Take up to ``limit`` queued files of the job, the oldest batch first (on PostgreSQL
        a batch another runner is taking is skipped, not waited for), and register and lease
        them as :meth:`claim_scanned` does, in one transaction: a runner that dies after it
        holds their leases, never files nobody holds. Returns the files taken, in order, and
        what the claim found of them (as :meth:`claim_scanned` returns it).

        The first batch is taken whole, or in part when it holds more than ``limit`` files
        (its rest written back); later batches only whole, while they fit: takes of a
        runner's ``limit`` that straddled two batches wrote one back each time (on SQLite
        1.3 times the ledger's writes of a shared job, and its statement journals)."""

    @abc.abstractmethod
    async def actions_due(self, job: str, keys: Sequence[str]) -> list[ItemInfo]:
        """Of these keys, the job's items that are finished (done, dead) with a post-commit
        action recorded (``post_action``): the files a listing found still in the source
        although their action may have been cut short (a runner killed after the commit).
        One read."""

    @abc.abstractmethod
    async def end_listing(
        self,
        job: str,
        owner: str,
        fence: int,
        files: int,
        *,
        done: int = 0,
        dead: int = 0,
        twins: Mapping[str, int] | None = None,
        not_ready: Mapping[str, int] | None = None,
    ) -> bool:
        """Mark the listing begun last complete (``files`` found, every one registered but
        ``done`` and ``dead`` ones, counted into its ``found_done`` and ``found_dead``: files
        the ledger had finished that rules given since do not hold for, never taken again;
        and ``twins``, by key, the files not queued for having the bytes of one that was: see
        :meth:`listing_twins`; ``not_ready``, the files it left out as not ready yet, by
        count of :class:`RunTotals`, and ``future``: kept as :attr:`Listing.not_ready` until
        the next listing is complete); ``False`` when ``owner`` no longer holds the role under
        ``fence``."""

    @abc.abstractmethod
    async def listing_changed(self, job: str, complete: int, not_ready: Mapping[str, int]) -> bool:
        """Files the job's complete listing numbered ``complete`` found (and queued) that a
        runner found changed after, and not ready yet when it looked at them again before its
        run ended (``not_ready``: by count of :class:`RunTotals`, and ``future``): moved from
        the listing's found files (``listed_files``) to those it left out as not ready yet
        (:attr:`Listing.not_ready`), which every runner that goes by it reports. ``False``
        (nothing changed) when ``complete`` is not the last complete listing any more (the
        next one found the files as they are). One transaction."""

    @abc.abstractmethod
    async def listing_twins(self, job: str, complete: int) -> dict[str, int]:
        """Of the job's complete listing numbered ``complete`` (identity ``content``), the
        files it did not queue because one with the same bytes was (the same item): how many,
        by the item's key. They are done (dead) when their item is. Kept while the next
        listing is under way; empty once that one is complete (``complete`` is not the last
        complete one then). One read."""

    async def on_registered(self, job: str, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` (on the event loop) whenever listings register waiting items of
        the job, and say whether that will happen: ``False`` (this default; SQLite) means
        the caller watches :attr:`Listing.registered` itself, a cheap read. PostgreSQL
        delivers them with ``LISTEN``/``NOTIFY`` (``True`` while it listens). Asking again
        with the same callback adds no second call, and listens again if the connection
        that listened was lost (a ``False`` meanwhile: poll). Callbacks are dropped when the
        ledger closes."""
        del job, callback
        return False

    async def finish_counts(
        self, job: str, owner: str, since: float
    ) -> tuple[dict[str, int], dict[str, int]]:
        """The job's items by state (as :meth:`counts` has them), and how many of its items
        runners other than ``owner`` finished (done, dead, vanished) at or after ``since``
        (the caller's clock), by state: what a shared runner counts as done (dead) before, and
        vanished, in its report. One read of the job's items."""
        found, others = await self._finish_counts(job, owner, since)
        return {state: found.get(state, 0) for state in STATES}, others

    @abc.abstractmethod
    async def _finish_counts(
        self, job: str, owner: str, since: float
    ) -> tuple[dict[str, int], dict[str, int]]:
        """:meth:`finish_counts`, the first for the states that have any (``pending`` with
        the queued files), the second for ``done``, ``dead`` and ``vanished`` when they have
        any."""

    @abc.abstractmethod
    async def work_left(self, job: str) -> bool:
        """Whether a cheap look finds work left in the job: files queued, an item pending
        or failed, or one running among the job's newest :data:`WORK_LEFT_NEWEST` items (by
        key). ``False`` says nothing: :meth:`counts` knows.

        For runners sharing a job, which look whether it is finished while the others end
        their work: a count reads every item of the job, this a few (an index of the
        waiting items; the work in flight is among the newest items, as files are queued
        and taken in listing order, by modification time, and a key begins with it)."""

    # -- outcomes ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def commit_outcomes(
        self, job: str, owner: str, outcomes: Sequence[Outcome], started: Leases = ()
    ) -> set[str]:
        """Record finished attempts in one transaction; return the keys whose lease was lost.

        ``started`` lists ``(key, fence)`` of attempts that began and still run: their attempt
        is counted now (a finished one is counted with its outcome), so a runner that dies
        during an attempt has used it. An item is done when, and only when, this transaction
        commits. A row whose owner or fence changed (another runner took the lease) is not
        touched, and its key is returned. A failed attempt keeps the row's post action (the
        ``moved`` record of ``ctx.move``).

        The joblog, in the same statements: an outcome sets ``finished_at`` (this commit) and
        ``runner`` (``owner``), and ``started_at`` to its ``started_at`` (SQLite: to the
        millisecond, never later), else to the start noted when the attempt was seen running,
        else this commit; an attempt in ``started`` seen for the first time gets ``started_at``
        now, ``runner``, and no ``finished_at`` (that was the previous attempt's).
        """

    @abc.abstractmethod
    async def release_items(self, job: str, owner: str, items: Leases) -> None:
        """Give leased items ``(key, fence)`` back to be claimed again: as they were leased, a
        retry (its retry time set by a failed outcome: leased ``failed``, and due) ``failed``,
        its attempts, last error and retry time kept (what ``failures`` and ``status`` show of
        it), any other ``pending``.

        Attempts are counted when they start, so nothing is undone; an attempt that had
        started is counted as interrupted when the item is leased again.
        """

    @abc.abstractmethod
    async def record_move(
        self, job: str, owner: str, key: str, fence: int, dst: str, src: str | None = None
    ) -> bool:
        """Note, under our lease, that the item's input is being moved to ``dst`` from ``src``
        (where an earlier move of the attempt put it; ``None``: from the source). Both are
        kept (:func:`~asyncbatch._ledger.actions.encode_move`): until the move is done, the
        input is at one of them (or both), and a retry after a crash looks there.

        Returns ``False`` when the lease is no longer ours (the caller must not move).
        """

    @abc.abstractmethod
    async def move_destinations(self, job: str) -> list[str]:
        """Where ``ctx.move()`` took or was taking the inputs of the job's unfinished items."""

    # -- the operator's reads, and retry ----------------------------------------------------------

    async def counts(self, job: str) -> dict[str, int]:
        """Items of the job by state; every state is present, zero or not. ``pending``
        includes the listed files queued for runners sharing the job (see
        :meth:`queue_listed`), which have no item row yet."""
        found = await self._state_counts(job)
        for state in found:
            checked_state(state, job=job)
        return {state: found.get(state, 0) for state in STATES}

    @abc.abstractmethod
    async def queued_files(self, job: str) -> int:
        """How many listed files of the job are queued for the runners sharing it (see
        :meth:`queue_listed`): counted as ``pending`` by :meth:`counts`, but with no item row,
        so not in :meth:`list_items` until a runner takes them."""

    @abc.abstractmethod
    async def _state_counts(self, job: str) -> dict[str, int]:
        """Items of the job by state, for the states that have any (``pending`` with the
        queued files)."""

    async def states_of(self, job: str, keys: Sequence[str]) -> dict[str, str]:
        """The state of each of these items that the ledger holds (a key it does not hold is
        left out): what a run that stopped early finds of the files it did not finish. One
        read per :data:`STATES_OF_CHUNK` keys."""
        found: dict[str, str] = {}
        for start in range(0, len(keys), STATES_OF_CHUNK):
            found.update(await self._states_of(job, keys[start : start + STATES_OF_CHUNK]))
        for key, state in found.items():
            checked_state(state, key, job)
        return found

    @abc.abstractmethod
    async def _states_of(self, job: str, keys: Sequence[str]) -> dict[str, str]:
        """:meth:`states_of`, for one chunk of keys."""

    @abc.abstractmethod
    async def oldest_waiting(self, job: str) -> float | None:
        """When the oldest pending or failed item was first registered, or ``None``."""

    @abc.abstractmethod
    async def failures(self, job: str, limit: int) -> list[ItemInfo]:
        """Failed and dead items, the most recently changed first."""

    async def find_items(self, job: str, key_or_relpath: str) -> list[ItemInfo]:
        """Items whose key is, or whose relpath is, ``key_or_relpath``, with their full record
        (lease, joblog, runner): several for one relpath when versions of a file differ
        (identity ``"stat"``)."""
        found = (
            await self._items_by_key(job, key_or_relpath) if looks_like_key(key_or_relpath) else []
        )
        by_name = await self._items_by_relpath(job, os.fsencode(key_or_relpath))
        return found + [item for item in by_name if item.key != key_or_relpath]

    @abc.abstractmethod
    async def _items_by_key(self, job: str, key: str) -> list[ItemInfo]:
        """The item with this key, if any."""

    @abc.abstractmethod
    async def _items_by_relpath(self, job: str, relpath: bytes) -> list[ItemInfo]:
        """The items with this relpath."""

    @abc.abstractmethod
    async def list_items(self, job: str, which: ItemFilter) -> list[ItemInfo]:
        """The job's items that ``which`` selects, the most recently changed first (then by
        key), with their full record.

        One read; the time and glob filters scan the job's items (no index serves them: the
        hot path would pay for one), about a microsecond an item.
        """

    async def iter_items(
        self, job: str, which: ItemFilter, *, page: int = ITEMS_PAGE
    ) -> AsyncIterator[ItemInfo]:
        """:meth:`list_items`, in the same order, read ``page`` items at a time (keyset
        pagination on ``(updated_at, key)``: each page starts after the last item of the one
        before, never with an ``OFFSET``), so that a caller writing them out as they come holds
        one page, whatever the number of items.

        Each page is its own read, not one snapshot: an item that changes while the listing is
        under way moves ahead of where it is (its ``updated_at`` is newer), so it is listed at
        most once, and left out if the listing had not reached it yet.
        """
        left = which.limit
        after: PageEnd | None = None
        while left is None or left > 0:
            size = page if left is None else min(page, left)
            found, after = await self._items_page(job, replace(which, limit=size), after)
            for item in found:
                yield item
            if left is not None:
                left -= len(found)
            if len(found) < size or after is None:
                return

    @abc.abstractmethod
    async def _items_page(
        self, job: str, which: ItemFilter, after: PageEnd | None
    ) -> tuple[list[ItemInfo], PageEnd | None]:
        """One page of :meth:`iter_items`: up to ``which.limit`` items after ``after`` (``None``:
        from the first), and where the page ended (``None``: it was empty)."""

    async def forget_chunks(
        self, job: str, *, done_before: float | None = None, chunk: int = ITEMS_PAGE
    ) -> AsyncIterator[Forgotten]:
        """Forget the job's items done before ``done_before`` (as :meth:`forget` does), or,
        with ``done_before=None``, every vanished item: ``chunk`` items a transaction, in the
        order of their keys, each transaction's result yielded once it committed (so that a
        caller holds one chunk, whatever the number of items).

        Each transaction deletes its items and logs their names for watches under way (see
        :meth:`forgotten_since`) together. A crash (or a broken connection) mid-way leaves the
        chunks committed before it forgotten and the rest as they were: forgetting again with
        the same choice finishes the work (what was forgotten is not chosen again). Done and
        vanished items hold no lease: none is refused."""
        after = ""
        while True:
            found = await self._forget_page(job, done_before, after, chunk)
            if found.forgotten:
                yield found
            if len(found.forgotten) < chunk:
                return
            after = max(item.key for item in found.forgotten)

    @abc.abstractmethod
    async def _forget_page(
        self, job: str, done_before: float | None, after: str, limit: int
    ) -> Forgotten:
        """One transaction of :meth:`forget_chunks`: up to ``limit`` of the chosen items whose
        key sorts after ``after``, the first by key, read and deleted, their names logged."""

    @abc.abstractmethod
    async def count_items(self, job: str, which: ItemFilter) -> int:
        """How many of the job's items ``which`` selects (its ``limit`` aside)."""

    async def forget(
        self, job: str, *, keys: Sequence[str] | None = None, done_before: float | None = None
    ) -> Forgotten:
        """Delete the rows of chosen items, so that the next run (and a watch under way, see
        :meth:`forgotten_since`) handles their files again.

        Either ``keys`` (any state) or ``done_before`` (done items whose outcome committed
        before that time, caller's clock). One transaction, which reads and deletes (``BEGIN
        IMMEDIATE`` on SQLite): an item leased under a live lease (``running``, its lease not
        expired) is refused, not deleted. Keys the ledger does not hold are neither. No file is
        touched. Raises :class:`ConfigurationError` unless exactly one of the two is given.
        """
        if (keys is None) == (done_before is None):
            raise ConfigurationError("forget: give either keys or done_before")
        if keys is not None:
            return await self._forget_keys(job, list(dict.fromkeys(keys)))
        assert done_before is not None
        return await self._forget_done_before(job, done_before)

    @abc.abstractmethod
    async def forgotten_since(self, job: str, seq: int | None) -> tuple[int, list[bytes]]:
        """The relpaths of the job's items :meth:`forget` deleted (or :meth:`look_again`
        named) after the entry ``seq`` of its log, oldest first, and the newest entry's
        number: a watch under way looks at those files again (it remembers the files it
        registered). ``seq=None``: just the newest entry's number (where a watch starts
        following the log). Entries are kept :data:`FORGOTTEN_KEPT` seconds.

        A caller may remember the number returned and pass it next time: the job's entries
        become visible in the order of their numbers (whatever order their transactions
        ran in), so none numbered before it can turn up later."""

    @abc.abstractmethod
    async def look_again(self, job: str, relpaths: Sequence[bytes]) -> None:
        """Log ``relpaths`` as :meth:`forget` logs the names it deleted (one transaction;
        nothing for none): files whose items a runner gave back as vanished, most often
        because the file changed after its scan (a ``chmod``, a link, a copier setting its
        mtime back: its key kept, so its item). A watch under way remembers such a file as
        registered, and without this would not take it again until it restarts."""

    @abc.abstractmethod
    async def _forget_keys(self, job: str, keys: list[str]) -> Forgotten:
        """:meth:`forget` by key (distinct keys)."""

    @abc.abstractmethod
    async def _forget_done_before(self, job: str, before: float) -> Forgotten:
        """:meth:`forget` of the items done before ``before`` (caller's clock)."""

    async def runs(self, job: str, limit: int = 50) -> list[RunInfo]:
        """The job's run history, the most recent first. The counts of live and killed runs
        are as of their last heartbeat, but for the items they finished, which come from the
        joblog, and those they still hold leased, unfinished (see :meth:`RunInfo.with_joblog`;
        one read of the job's items)."""
        found = await self._runs(job, limit)
        open_runs = [r.owner for r in found if r.exit_status in (None, "killed", "lost")]
        if not open_runs:
            return found
        finished = await self._finished_by(job, open_runs)
        return [
            r.with_joblog(finished.get(r.owner, {})) if r.owner in open_runs else r for r in found
        ]

    @abc.abstractmethod
    async def _runs(self, job: str, limit: int) -> list[RunInfo]:
        """The job's history rows, the most recent first, as written."""

    @abc.abstractmethod
    async def _finished_by(self, job: str, owners: Sequence[str]) -> dict[str, dict[str, int]]:
        """The items these runners finished last (the joblog's ``runner``), by runner and by
        state (of :data:`JOBLOG_COUNTS`); and under :data:`IN_FLIGHT`, the items each holds
        leased (``running``, its ``owner``). One read of the job's items."""

    @abc.abstractmethod
    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        """Put failed (and with ``dead``, dead) items back to pending with fresh attempts and
        interruptions; ``keys=None`` retries every such item of the job. Returns how many."""


def ledger_error(state: str, error: BaseException, prefix: str | None = None) -> LedgerError:
    """The one-line :class:`LedgerError` for a database error: ``prefix`` (default ``state
    'NAME'``), then the error's text on one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return LedgerError(f"{prefix or f'state {state!r}'}: {text}")


def schema_difference(
    expected: Mapping[str, Sequence[str]], found: Mapping[str, Sequence[str]]
) -> str | None:
    """How the ledger's tables (``found``: table -> its columns) differ from those of its
    schema version (``expected``), in words; ``None`` when every table is there with exactly
    its columns (tables of others beside them are not the ledger's business)."""
    problems = []
    for table, columns in sorted(expected.items()):
        if table not in found:
            problems.append(f"table {table} is missing")
            continue
        missing = [c for c in columns if c not in found[table]]
        extra = [c for c in found[table] if c not in columns]
        if missing:
            problems.append(f"table {table} has no column {', '.join(missing)}")
        if extra:
            problems.append(f"table {table} has a column {', '.join(extra)} it should not")
    if not problems:
        return None
    if len(problems) > 3:
        problems[3:] = [f"{len(problems) - 3} more difference(s)"]
    return "; ".join(problems)
