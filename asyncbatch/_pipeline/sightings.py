"""What watch mode has seen of the source, and when to look at a file again.

A file becomes a *candidate* (registered and leased) once a look finds it settled (its mtime
*and* its ctime at least ``settle`` seconds old: a copier that keeps the source's times sets
the mtime back while it writes, but no writer can set the ctime back) with the same size,
mtime, ctime and inode as an earlier look. When it was already settled at the first look
(moved in, or written by a host whose clock lags), the two looks must be ``settle`` seconds
apart: a file is never taken before it has been seen unchanged for ``settle`` seconds one way
or the other.

A file seen but not ready is *waiting*: its next look is scheduled for the moment it will be
ready (plus :data:`LOOK_MARGIN`), so the claimer stats just that file then instead of waiting
for the next full scan. Registered files are remembered by their scan record (which holds the
signature), so a full scan of an idle inbox is one set lookup per file and no ledger access.

A registered file seen changed is a candidate again. Under identity ``path`` it is the same
item: made ``by_path``, the sightings also remember the names they registered, while those
stay listed, and say which candidates are such files again (``again``), which the claimer
does not count as seen a second time.

That is the default rule, ``age``. A job with other readiness rules (see :mod:`asyncbatch._ready`)
is judged by all of them: the scan or look says which rule but age and stable a file fails
(its marker missing or older than it, too small, too old: the file waits without a scheduled
look, until a change event, or a poll, brings it back: a marker's arrival does), ``age`` is as
above (when it is one of the rules), and ``stable:N`` wants N looks of the same record, each
at least ``settle`` seconds after the last one counted.

The waiting files are counted by the rule they wait for as they change, and those waiting for
``age`` are ordered by the moment they are ready (:class:`_Waitlist`): the watch's live counts
(``Sightings.waiting_by_rule(now)``: the progress line, metrics, the heartbeat) cost the files
that became ready since the last count, not a walk over all the waiting ones.

Made per watch by the claimer; nothing here outlives it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from .._ready import LASTING, Readiness
from .._scanner import name_key, ready_ns, split

__all__ = ["LOOK_MARGIN", "Sightings"]

#: Seconds after the moment a file will be ready that it is looked at again: the mtime's
#: granularity (the kernel's coarse clock) and the wake-up's own delay fit in it.
LOOK_MARGIN = 0.015


@dataclass(slots=True)
class _Waiting:
    record: bytes
    #: Monotonic time from which the file is ready (if it still looks the same).
    ready_at: float
    #: Monotonic time of its next look (a heap entry with another time is stale; ``inf``: none
    #: scheduled, an event or a poll brings it back).
    look_at: float
    #: The rule it waits for, and (``stable:N``) its looks of this record so far, the last
    #: counted at ``counted_at`` (monotonic).
    why: str = "age"
    looks: int = 1
    counted_at: float = 0.0
    #: Waiting for ``age``: its entry in :class:`_Waitlist`'s heaps (0: none), and whether it
    #: is counted ready (its ``ready_at`` by the time the counts were last asked at).
    ticket: int = 0
    passed: bool = False
    #: Waiting for ``age`` alone (the default rules): the wall-clock time (ns) from which its
    #: record is settled (:func:`ready_ns` plus ``settle``), for a poll's fast path.
    settled_ns: int = 0


#: A :class:`_Waitlist` heap entry: (``ready_at``, negated in the heap of those ready), ticket,
#: relpath.
_Entry = tuple[float, int, bytes]


class _Waitlist:
    """The waiting files by relpath, with their counts by rule kept up to date as they
    change; and those waiting for ``age`` by the moment they are ready, so that how many are
    ready by a time is told without walking them all (a watch's live counts ask it for the
    progress line ten times a second, for metrics, for the heartbeat).

    Those ready after the time last asked about are in a min-heap of their ``ready_at``,
    those ready by then in a max-heap, counted: asked about a later time, the entries it
    passed move from one to the other, an earlier time moves them back. An entry whose
    ticket is no longer its file's (the file is gone, ready, or waits anew) is stale: skipped
    when reached, and dropped once the stale ones outnumber the others (each file waiting
    for ``age`` has one entry that is not stale)."""

    def __init__(self) -> None:
        self._files: dict[bytes, _Waiting] = {}
        #: The same files by their record (a record holds its relpath: one a file), so that a
        #: scan's record is matched with the file waiting as it is without slicing it.
        self.by_record: dict[bytes, _Waiting] = {}
        self._rules: dict[str, int] = {}  # files by the rule they wait for (none at 0)
        self._aging = 0  # files waiting for age: those with an entry
        self._coming: list[_Entry] = []  # (ready_at, ...): ready after _clock
        self._passed: list[_Entry] = []  # (-ready_at, ...): ready by _clock
        self._ready = 0  # files with an entry in _passed
        self._clock = -math.inf  # the time the counts were last asked at
        self._tickets = 0
        #: Heap entries reached by :meth:`ready_by`: the tests read its cost in it.
        self.visits = 0

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, rel: object) -> bool:
        return rel in self._files

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._files)

    def get(self, rel: bytes) -> _Waiting | None:
        """The file waiting under ``rel``, if any."""
        return self._files.get(rel)

    def items(self) -> Iterable[tuple[bytes, _Waiting]]:
        """The waiting files, by relpath."""
        return self._files.items()

    def put(self, rel: bytes, waiting: _Waiting) -> None:
        """Make ``rel`` wait (anew, or again: its entry stands if it waits for age still,
        ready at the same time)."""
        old = self._files.get(rel)
        if old is not None:
            self._uncount(old)
            del self.by_record[old.record]
        self._files[rel] = waiting
        self.by_record[waiting.record] = waiting
        self._rules[waiting.why] = self._rules.get(waiting.why, 0) + 1
        if waiting.why != "age":
            return
        self._aging += 1
        if old is not None and old.why == "age" and old.ready_at == waiting.ready_at:
            waiting.ticket, waiting.passed = old.ticket, old.passed
        else:
            self._tickets += 1
            waiting.ticket = self._tickets
            waiting.passed = waiting.ready_at <= self._clock
            if waiting.passed:
                heapq.heappush(self._passed, (-waiting.ready_at, waiting.ticket, rel))
            else:
                heapq.heappush(self._coming, (waiting.ready_at, waiting.ticket, rel))
            self._tidy()
        self._ready += waiting.passed

    def drop(self, rel: bytes) -> None:
        """``rel`` waits no more (ready, registered, or gone), if it did."""
        old = self._files.pop(rel, None)
        if old is not None:
            self._uncount(old)
            del self.by_record[old.record]

    def keep_only(self, rels: set[bytes]) -> None:
        """Drop the waiting files but those of ``rels``."""
        for rel in [rel for rel in self._files if rel not in rels]:
            self.drop(rel)

    def by_rule(self) -> dict[str, int]:
        """The files by the rule they wait for (none at 0)."""
        return dict(self._rules)

    def by_rule_at(self, now: float) -> dict[str, int]:
        """:meth:`by_rule`, with those waiting for age and ready by ``now`` under ``ready``."""
        out = dict(self._rules)
        ready = self.ready_by(now)
        if ready:
            out["age"] -= ready
            if not out["age"]:
                del out["age"]
            out["ready"] = ready
        return out

    def ready_by(self, now: float) -> int:
        """How many files waiting for age are ready by ``now``: the entries ``now`` passes
        since the last time asked about are reached, no others."""
        if now >= self._clock:
            coming = self._coming
            while coming and coming[0][0] <= now:
                ready_at, ticket, rel = heapq.heappop(coming)
                self._move((-ready_at, ticket, rel), self._passed, True)
        else:
            passed = self._passed
            while passed and -passed[0][0] > now:
                ready_at, ticket, rel = heapq.heappop(passed)
                self._move((-ready_at, ticket, rel), self._coming, False)
        self._clock = now
        return self._ready

    def _move(self, entry: _Entry, heap: list[_Entry], passed: bool) -> None:
        """Put an entry taken from one heap into the other (``passed``: the heap of those
        ready), unless it is stale."""
        self.visits += 1
        waiting = self._files.get(entry[2])
        if waiting is None or waiting.ticket != entry[1]:
            return
        waiting.passed = passed
        self._ready += 1 if passed else -1
        heapq.heappush(heap, entry)

    def _uncount(self, old: _Waiting) -> None:
        """Take a file that waited out of the counts (its entry is stale from now on)."""
        left = self._rules[old.why] - 1
        if left:
            self._rules[old.why] = left
        else:
            del self._rules[old.why]
        if old.why == "age":
            self._aging -= 1
            self._ready -= old.passed

    def _tidy(self) -> None:
        """Drop the stale entries once they outnumber the others (a rebuild of the heaps
        costs as many steps as the entries pushed since the last one, at least)."""
        if len(self._coming) + len(self._passed) <= 2 * self._aging + 64:
            return
        files = self._files
        for heap in (self._coming, self._passed):
            heap[:] = [e for e in heap if (w := files.get(e[2])) is not None and w.ticket == e[1]]
            heapq.heapify(heap)


def _registered(record: bytes) -> bytes:
    """A registered file as it is remembered: its record without the ctime, which a
    ``chmod``, a link or a rename sets too. Registered, a file is a new candidate only when
    its key could have changed (mtime, size) or another file took its name (inode); while it
    waits to settle, its ctime counts (see :meth:`Sightings._sight`)."""
    return record[:-8]


class Sightings:
    """Registered files and waiting ones, for one watch; the look-again schedule."""

    def __init__(
        self,
        settle: float,
        ready: Readiness | None = None,
        *,
        immutable: bool = False,
        by_path: bool = False,
    ) -> None:
        self._settle = settle
        self._settle_ns = int(settle * 1e9)
        #: The job's rules, unless they are the default alone (``age``: the fast path).
        self._ready = None if ready is None or ready.plain else ready
        #: Inputs that are complete once visible and never change in place (objects): one
        #: that is settled when first seen is a candidate at once, not after a second look.
        self._immutable = immutable
        #: The files registered (candidates handed to the claim), as last seen: their records
        #: without the ctime (see :func:`_registered`).
        self._known: set[bytes] = set()
        #: Their name keys (relpath and inode), for a listing without stat.
        self._known_names: set[bytes] = set()
        #: ``by_path`` (identity ``path``: a file changed is the same item): the relpaths
        #: registered, as long as they stay listed (a file gone is forgotten, so a long watch
        #: keeps at most one per file in the source); ``None`` otherwise.
        self._names: set[bytes] | None = set() if by_path else None
        #: Not ``by_path``: the relpaths the ledger's log named (see :meth:`look_again`) that
        #: are not registered again yet, while they stay listed.
        self._relook: set[bytes] = set()
        self._waiting = _Waitlist()
        #: Files waiting for a rule that lasts (a marker, ...: see ``LASTING``) whose item the
        #: ledger may have finished before (the rules changed since): not asked about yet, by
        #: relpath; and those asked about and found unfinished (as :attr:`_known`).
        self._unasked: dict[bytes, bytes] = {}
        self._asked: set[bytes] = set()
        self._schedule: list[tuple[float, bytes]] = []  # (look_at, relpath), a heap

    @property
    def waiting(self) -> int:
        """Files seen and not yet ready."""
        return len(self._waiting)

    def is_waiting(self, relpath: bytes) -> bool:
        """Whether this file was seen and is not ready yet."""
        return relpath in self._waiting

    def waiting_by_rule(self, now: float | None = None) -> Mapping[str, int]:
        """Files seen and not yet ready, by the rule they wait for (``age``, ``marker``...).

        Given ``now`` (monotonic), those waiting for ``age`` that are ready by now (settled,
        and seen unchanged ``settle`` seconds: their look has not come yet, the watch was
        busy claiming) are counted under ``"ready"`` instead: not settled yet is no longer
        true of them.

        Kept as the files change (see :class:`_Waitlist`): a count does not walk the files."""
        if now is not None:
            return self._waiting.by_rule_at(now)
        if self._ready is None:
            return {"age": len(self._waiting)}
        return self._waiting.by_rule()

    def waiting_files(self, now: float) -> list[tuple[bytes, str, bool]]:
        """The records of the files seen and not yet ready, with the rule each waits for
        (``"ready"``: waiting for ``age`` and ready by ``now``, monotonic, as in
        :meth:`waiting_by_rule`), and whether this watch counted the file already, under
        another version (``by_path``: a name it registered; or one the ledger's log named,
        see :meth:`look_again`)."""
        counted = self._relook if self._names is None else self._names | self._relook
        return [
            (w.record, "ready" if w.why == "age" and w.ready_at <= now else w.why, rel in counted)
            for rel, w in self._waiting.items()
        ]

    def scanned(
        self,
        records: list[bytes],
        now_ns: int,
        now: float,
        blocked: Mapping[bytes, str] | None = None,
        marker_keys: Iterable[bytes] = (),
        again: set[bytes] | None = None,
    ) -> list[bytes]:
        """Take a full scan's sorted records (wall clock ``now_ns``, monotonic ``now``);
        return the candidates among them, in order. Files no longer listed are forgotten.

        ``blocked``: the rule but age and stable each file fails, if any (see
        :class:`~asyncbatch._ready.ReadyWalk`); ``marker_keys``: the name keys of the markers
        the scan found (a listing then does not take them for new names); ``again`` (with
        ``by_path``): gets the relpaths of the candidates registered before, and listed ever
        since."""
        blocked = blocked or {}
        names = self._names
        if names:  # the names still listed (a file gone and back is registered anew);
            # r[8:-25] is a record's relpath (as split() has it, without its signature)
            names = self._names = {rel for r in records if (rel := r[8:-25]) in names}
        if self._relook:
            relook = self._relook
            self._relook = {rel for r in records if (rel := r[8:-25]) in relook}
        # Waiting files seen as they were, whose look has not come: nothing to do for them
        # (a sight would make the same waiting file again), nor are they registered.
        rest = records if self._ready is not None else self._unchanged_waiting(records, now_ns, now)
        known = self._known
        listed = [_registered(r) for r in rest]
        fresh = [r for r, k in zip(rest, listed, strict=True) if k not in known]
        self._known = set(listed)
        candidates: list[bytes] = []
        for record in fresh:
            rel = split(record)[0]
            if self._sight(rel, record, now_ns, now, blocked.get(rel, "")):
                candidates.append(record)
                self._registering(rel, again)
            else:
                self._known.discard(_registered(record))
        self._forget_unlisted(records, len(records) - len(rest), fresh)
        if self._asked:
            self._asked.intersection_update(listed)
        known = self._known
        self._known_names = {name_key(r) for r, k in zip(rest, listed, strict=True) if k in known}
        self._known_names.update(marker_keys)
        return candidates

    def _unchanged_waiting(self, records: list[bytes], now_ns: int, now: float) -> list[bytes]:
        """A scan's records but those of files waiting for age (the default rules) seen
        exactly as they were, not ready, that a sight would leave as they are: the same time
        they are ready at, their look still to come and kept (see :meth:`_sight`). One dict
        lookup and a few comparisons a file; no slice, no new waiting file, no heap entry."""
        by_record = self._waiting.by_record
        if not by_record:
            return records
        rest: list[bytes] = []
        keep = rest.append
        margin = LOOK_MARGIN
        for record in records:
            w = by_record.get(record)
            if w is not None:
                until_settled = (w.settled_ns - now_ns) / 1e9
                ready_at = w.ready_at
                if (
                    now + until_settled <= ready_at
                    and (now < ready_at or until_settled > 0)
                    and now < w.look_at <= ready_at + margin
                ):
                    continue
            keep(record)
        return rest

    def _forget_unlisted(self, records: list[bytes], unchanged: int, fresh: list[bytes]) -> None:
        """After a scan: forget the waiting files it did not list as a file not registered
        (gone, or registered as it is now). ``unchanged``: how many of ``records`` were left
        waiting as they were; ``fresh``: those sighted. Each waiting file left holds the record
        the scan listed (a sight puts it): counted, none other waits when the numbers agree,
        and the scan's records are walked only when some do (gone without a look)."""
        waiting = self._waiting
        by_record = waiting.by_record
        if len(waiting) == unchanged + sum(1 for r in fresh if r in by_record):
            return
        waiting.keep_only({r[8:-25] for r in records if r in by_record})

    def unasked(self) -> list[bytes]:
        """The records of the files waiting for a rule that lasts (see ``LASTING``) that the
        ledger was not asked about yet: their items may be finished already (the rules
        changed since). Pass them to :meth:`asked` with the answer."""
        out = [
            w.record
            for rel, record in self._unasked.items()
            if (w := self._waiting.get(rel)) is not None and w.record == record
        ]
        self._unasked.clear()
        return out

    def asked(self, records: list[bytes], finished: Iterable[bytes]) -> None:
        """The ledger's answer for :meth:`unasked`'s ``records``: those ``finished`` (done or
        dead) wait for nothing; they are known as registered ones are (a change makes them new
        again). The others are not asked about again while they look the same."""
        done = set(finished)
        for record in records:
            kept = _registered(record)
            if record in done:
                rel = split(record)[0]
                self._waiting.drop(rel)
                self._known.add(kept)
                self._known_names.add(name_key(record))
                self._registering(rel, None)  # by_path: counted once, as a registered one
            else:
                self._asked.add(kept)

    def look_again(self, relpaths: Iterable[bytes]) -> None:
        """Forget what is known of these files, named by the ledger's log (their items deleted
        by ``asyncbatch forget``, or given back to be taken again: ``Ledger.look_again``), as
        files registered before: the next look at them takes them as candidates, and one that
        is goes into that look's ``again`` (its item is the one this watch counted, or a new
        one: the claim tells, see ``Claimer._counted_again``)."""
        gone = set(relpaths)
        if not gone:
            return
        if self._names is None:
            self._relook |= gone
        self._known = {k for k in self._known if k[8:-17] not in gone}
        self._known_names = {n for n in self._known_names if n[:-9] not in gone}
        self._asked = {k for k in self._asked if k[8:-17] not in gone}
        for rel in gone:
            self._waiting.drop(rel)

    def unknown(self, names: list[bytes]) -> list[bytes]:
        """The relpaths of a listing's name keys (:meth:`Scanner.list_names`) that are not
        registered under that name and inode: new names, and names replaced by another file;
        and the waiting files the listing no longer has (deleted or moved away: the look
        forgets them). Waiting files still listed are looked at on their own schedule, or
        never (a marker missing or older, too small, too old: a change brings them back), so
        without that look one deleted would be counted not ready until the next full scan."""
        known, waiting = self._known_names, self._waiting
        out = []
        if not waiting:
            for key in names:
                if key not in known:
                    out.append(key[:-9])
            return out
        still = 0
        for key in names:
            rel = key[:-9]
            if rel in waiting:
                still += 1
            elif key not in known:
                out.append(rel)
        if still < len(waiting):  # some are not listed any more (rare: no copy of them a poll)
            listed = {key[:-9] for key in names}
            out.extend(rel for rel in waiting if rel not in listed)
        return out

    def looked(
        self,
        relpaths: Iterable[bytes],
        records: list[bytes],
        now_ns: int,
        now: float,
        blocked: Mapping[bytes, str] | None = None,
        marker_keys: Iterable[bytes] = (),
        again: set[bytes] | None = None,
    ) -> list[bytes]:
        """Take a look at some paths: ``records`` are those of them that are regular files
        now (sorted); return the candidates among them. Paths without a record are forgotten
        (gone, or not a file any more). ``blocked``, ``marker_keys`` and ``again``: as for
        :meth:`scanned` (the look's)."""
        blocked = blocked or {}
        self._known_names.update(marker_keys)
        candidates = []
        listed = set()
        for record in records:
            rel = split(record)[0]
            listed.add(rel)
            if _registered(record) not in self._known and self._sight(
                rel, record, now_ns, now, blocked.get(rel, "")
            ):
                self._known.add(_registered(record))
                self._known_names.add(name_key(record))
                candidates.append(record)
                self._registering(rel, again)
        names = self._names
        for rel in relpaths:
            if rel not in listed:
                self._waiting.drop(rel)
                self._relook.discard(rel)
                if names is not None:
                    names.discard(rel)
        return candidates

    def _registering(self, rel: bytes, again: set[bytes] | None) -> None:
        """``by_path``: remember that a candidate's name is registered; a name registered
        before (and listed ever since) goes into ``again``; so does one named by the ledger's
        log (see :meth:`look_again`)."""
        names = self._names
        if names is None:
            if rel in self._relook:
                self._relook.discard(rel)
                if again is not None:
                    again.add(rel)
            return
        if rel in names:
            if again is not None:
                again.add(rel)
        else:
            names.add(rel)

    def due(self, now: float) -> set[bytes]:
        """The waiting paths whose next look has come."""
        found: set[bytes] = set()
        schedule = self._schedule
        while schedule and schedule[0][0] <= now:
            look_at, rel = heapq.heappop(schedule)
            waiting = self._waiting.get(rel)
            if waiting is not None and waiting.look_at == look_at:
                found.add(rel)
        return found

    def next_look(self) -> float | None:
        """Monotonic time of the next scheduled look, or ``None``."""
        schedule = self._schedule
        while schedule:
            look_at, rel = schedule[0]
            waiting = self._waiting.get(rel)
            if waiting is not None and waiting.look_at == look_at:
                return look_at
            heapq.heappop(schedule)  # stale: the file changed or went since
        return None

    def _sight(self, rel: bytes, record: bytes, now_ns: int, now: float, blocked: str) -> bool:
        """One look at a file not registered as it is: whether it is a candidate now
        (``blocked``: the rule but age and stable it fails, if any)."""
        if self._ready is not None:
            return self._sight_rules(rel, record, now_ns, now, blocked)
        settled_ns = ready_ns(record) + self._settle_ns
        until_settled = (settled_ns - now_ns) / 1e9
        waiting = self._waiting.get(rel)
        if waiting is not None and waiting.record == record:
            if now >= waiting.ready_at and until_settled <= 0:
                self._waiting.drop(rel)
                return True
            # Not ready yet (an event about an unchanged file, or the clock): look again then.
            ready_at = max(waiting.ready_at, now + until_settled)
        elif self._immutable and until_settled <= 0:
            self._waiting.drop(rel)
            return True
        else:  # first seen like this: ready once settled, and at least `settle` after now if
            # it is settled already (it must then be seen unchanged for `settle` seconds)
            ready_at = now + (until_settled if until_settled > 0 else self._settle)
        look_at = self._schedule_look(rel, waiting, record, max(ready_at, now) + LOOK_MARGIN, now)
        self._waiting.put(rel, _Waiting(record, ready_at, look_at, settled_ns=settled_ns))
        return False

    def _schedule_look(
        self, rel: bytes, waiting: _Waiting | None, record: bytes, look_at: float, now: float
    ) -> float:
        """Schedule a look at ``rel`` at ``look_at``; return when its next look is. A look
        already scheduled for the same record that is still to come, and not later, is kept
        (at most one look too early, which schedules the next): a file that waits long (a
        long ``settle``, a time in the future) is seen again at every poll, and each sight
        pushed one more heap entry, that stayed until its time (year 2300: for good)."""
        if waiting is not None and waiting.record == record and now < waiting.look_at <= look_at:
            return waiting.look_at
        heapq.heappush(self._schedule, (look_at, rel))
        return look_at

    def _sight_rules(
        self, rel: bytes, record: bytes, now_ns: int, now: float, blocked: str
    ) -> bool:
        """:meth:`_sight` for a job with rules beyond the default: every rule must hold."""
        ready = self._ready
        assert ready is not None
        settle = self._settle
        until_settled = (ready_ns(record) + self._settle_ns - now_ns) / 1e9
        waiting = self._waiting.get(rel)
        if waiting is not None and waiting.record == record:
            looks, counted_at, ready_at = waiting.looks, waiting.counted_at, waiting.ready_at
            if now - counted_at >= settle:  # a look that counts (stable:N)
                looks, counted_at = looks + 1, now
            ready_at = max(ready_at, now + until_settled)
        else:  # first seen like this (see _sight)
            looks, counted_at = 1, now
            ready_at = now + (until_settled if until_settled > 0 else settle)
        aged = not ready.age or (now >= ready_at and until_settled <= 0)
        why = blocked or ("age" if not aged else "stable" if looks < ready.looks else "")
        if not why:
            self._waiting.drop(rel)
            return True
        look_at = float("inf")
        if not blocked:  # age and stable come with time: look again then
            due = [now, ready_at if ready.age else now]
            if looks < ready.looks:
                due.append(counted_at + settle)
            look_at = self._schedule_look(rel, waiting, record, max(due) + LOOK_MARGIN, now)
        self._waiting.put(rel, _Waiting(record, ready_at, look_at, why, looks, counted_at))
        if blocked in LASTING and _registered(record) not in self._asked:
            self._unasked[rel] = record
        return False
