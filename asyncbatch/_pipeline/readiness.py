"""The readiness rules in a run: what is not ready yet, by rule; a one-shot run's looks
(``stable:N``); what a scan found of markers, handed to the post-commit actions.

The rules themselves, and each file's verdict, are :mod:`asyncbatch._ready`'s; the scanner
applies them in its walk, the watch in :class:`~.sightings.Sightings`. What is left for a run
is here, called by the claimer at a few points.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import anyio

from .._ledger import NOT_READY, ItemFilter, ItemInfo, RunTotals
from .._ready import Readiness, ReadyWalk
from .._report import Counters
from .._scanner import ScanInfo, split
from .._sources.base import Lister
from .postactions import PostActions
from .state import RunState

__all__ = [
    "CLOCK_MARGIN",
    "MarkerFollowUp",
    "count_not_ready",
    "count_scan",
    "look_until_stable",
]

#: The states of an item whose file a post-commit action may have moved on.
FINISHED = ("done", "dead")

log = logging.getLogger("asyncbatch")


def count_not_ready(counters: RunTotals, by_rule: Mapping[str, int]) -> None:
    """Set the counts of files not ready yet, by rule (see ``RunTotals``: ``unsettled`` for
    age, ``unmarked`` for marker, ...), to ``by_rule``'s (a rule it lacks: 0)."""
    for rule, name in NOT_READY.items():
        setattr(counters, name, by_rule.get(rule, 0))


def count_scan(counters: Counters, scan: ScanInfo | None) -> None:
    """Set the counts of files not ready yet from a one-shot run's scan."""
    if scan is None:
        return
    count_not_ready(counters, {"age": scan.unsettled, **dict(scan.not_ready)})
    counters.future = scan.future
    counters.unlisted = scan.unlisted


async def look_until_stable(
    scanner: Lister, records: list[bytes], ready: Readiness, run: RunState
) -> tuple[list[bytes], list[bytes]]:
    """The files of a one-shot run's scan (``records``, its first look) that look the same
    to ``ready.looks`` looks in all, each ``settle`` seconds after the last (``stable:N``);
    and the records of those it leaves not ready (as last seen), for the run to ask the
    ledger which it has finished already (a file whose ctime alone changed keeps its key).

    The run waits for the answer: the files are not skipped for want of looks. One that
    changed between two looks is left for the next run, and counted (``unstable``); one that
    vanished is dropped. While it waits, ``unstable`` counts the files still looked at. A stop
    ends the wait: the files left are counted as not ready yet.
    """
    counters = run.counters
    changed: dict[bytes, bytes] = {}  # relpath -> its record at the last look
    counters.unstable = len(records)
    for _ in range(ready.looks - 1):
        if not records:
            break
        with anyio.move_on_after(ready.settle):
            await run.stop_requested.wait()
        if run.stop_requested.is_set() or run.stopping:
            return [], [*records, *changed.values()]
        again, _ = await scanner.look([split(r)[0] for r in records])
        same = set(again)
        there = {split(r)[0]: r for r in again}
        for r in records:
            rel = split(r)[0]
            if r not in same and rel in there:
                changed[rel] = there[rel]
        records = [r for r in records if r in same]
        counters.unstable = len(records) + len(changed)
    counters.unstable = len(changed)
    return records, list(changed.values())


#: Seconds of clock difference allowed between the filesystem's times (a marker's mtime) and
#: the ledger's (an item's finish): a leftover marker's file finished after it was written.
CLOCK_MARGIN = 5.0


class MarkerFollowUp:
    """What a run does with what its scans found of markers: the markers a post-commit action
    left behind (a kill came between a file's action and its marker's) are handed to it again;
    a directory marker older than some of its files is reported, once per run.

    A marker without its file (or a directory marker with no input under it) is a leftover
    only when the ledger says so: its file (an input under its directory) finished *after* the
    marker was written. Otherwise it came before its file (a parallel copy, a multipart upload
    still under way: the marker is small) and stays for the file to find. The ledger is asked
    once per scan that found such markers, for the items finished since the oldest of them.
    """

    def __init__(self, posts: PostActions, run: RunState) -> None:
        self._posts = posts
        self._run = run
        self._warned: set[bytes] = set()
        #: Markers (and their mtimes) found not to be leftovers: not asked about again.
        self._kept: set[tuple[bytes, int]] = set()

    async def after_scan(self, walked: ReadyWalk | None) -> None:
        """Follow up a full scan's findings (``None``: the job has no such rules)."""
        if walked is None:
            return
        found = [(m, walked.marker_mtimes[m]) for m in walked.orphans]
        candidates = [c for c in found if c not in self._kept]
        if candidates:
            for marker in await self._leftovers(walked.ready, candidates):
                self._posts.submit_marker(marker)
        for marker, files in walked.late.items():
            if marker not in self._warned:
                self._warned.add(marker)
                where = os.fsdecode(marker.rpartition(b"/")[0]) or "the source"
                log.warning(
                    "%d file%s in %s changed after its marker %r: they wait for a newer one "
                    "(was the marker written before the files?)",
                    files,
                    "s" * (files != 1),
                    where,
                    os.fsdecode(marker),
                )

    async def _leftovers(
        self, ready: Readiness, candidates: list[tuple[bytes, int]]
    ) -> list[bytes]:
        """The candidates whose file (or an input under whose directory) the ledger has
        finished since the marker was written; the others are kept in :attr:`_kept`."""
        run = self._run
        since = min(mtime for _, mtime in candidates) / 1e9 - CLOCK_MARGIN
        which = ItemFilter(states=FINISHED, time="finished", after=since, limit=None)
        finished = await run.ledger.list_items(run.config.job, which)
        out = []
        for marker, mtime in candidates:
            parent, _, name = marker.rpartition(b"/")
            at = mtime / 1e9 - CLOCK_MARGIN
            if name in ready.dir_names:
                under = os.fsdecode(parent + b"/") if parent else ""
                hit = any(i.relpath.startswith(under) for i in finished if _after(i, at))
            else:
                files = {
                    os.fsdecode(parent + b"/" + f if parent else f) for f in ready.marked(name)
                }
                hit = any(i.relpath in files for i in finished if _after(i, at))
            if hit:
                out.append(marker)
            else:
                self._kept.add((marker, mtime))
        return out


def _after(item: ItemInfo, at: float) -> bool:
    return item.finished_at is not None and item.finished_at >= at
