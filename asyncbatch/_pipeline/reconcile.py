"""A run that ends early says what became of the files it left: from the ledger, not memory.

A run stopped (or ending with ``wait=False``) leaves seen files it did not finish: held by
another runner when it last looked, waiting for a retry, given back from flight, or not even
registered (the claimer had not got to them). Runners sharing the job may have finished them
meanwhile; the report must not call a file unfinished that the ledger has done. So, at the
end, the ledger is asked for the state of each: done or dead ones count as done (dead) before,
registered ones are no longer counted as left unregistered. The files counted done before on
the strength of an attempt of their item that the run did not see end (identity ``content``:
``RunState.twins``) count as that item does now: done (dead) before, or else unfinished.

A watch's files not ready yet (``RunState.waiting_files``: not settled, not seen unchanged
enough, ...) are asked about too, once, here: those whose item the ledger has finished (a
done file whose ctime alone changed, by a ``chmod`` or a ``touch -d``, keeps its key and
waits to settle) count as what they are, seen and done (dead) before, not as files to be
taken once ready. Under identity ``content`` their keys would mean reading them: they stay
counted as not ready yet.

Made per run, at its end, by the runner; nothing here outlives the call.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from .._exceptions import LedgerError
from .._identity import input_hash, item_key
from .._ledger import NOT_READY
from .._scanner import unpack, unpack_item
from .readiness import count_not_ready
from .state import RunState

__all__ = ["reconcile"]

log = logging.getLogger("asyncbatch")


async def reconcile(state: RunState) -> None:
    """Count the files the run left unfinished as the ledger has them now (see the module).

    A ledger that fails here leaves the counts as they were (a warning says so), but for
    the files counted done before on the strength of an attempt the run did not see end
    (``state.twins``), counted unfinished then (less said, never more): the run's release
    must not fail for its report's sake. The unregistered files of identity ``"content"``
    are not looked up (their keys would mean reading them).
    """
    await _count_waiting(state)
    cfg, counters = state.config, state.counters
    unclaimed: set[str] = set()
    if cfg.identity != "content":
        for record in state.unclaimed:
            mtime_ns, rel, size, _ = unpack(record)
            unclaimed.add(
                item_key(cfg.identity, input_hash(cfg.identity, rel, size, mtime_ns, b""), mtime_ns)
            )
    twins = {key: len(records) for key, records in state.twins.items()}
    state.twins.clear()
    state.twins_due.clear()
    counters.done_before -= sum(twins.values())  # unfinished, unless the ledger has it done
    left = {*state.open, *state.given_back, *unclaimed}
    keys = [*left, *(key for key in twins if key not in left)]
    if not keys:
        return
    try:
        found = await state.ledger.states_of(cfg.job, keys)
    except LedgerError as e:
        log.warning("the report counts what this run left as it knew it (the ledger: %s)", e)
        return
    given_back = set(state.given_back)
    for key, item_state in found.items():
        if key in unclaimed:
            counters.unregistered -= 1  # registered by another runner
        if item_state not in ("done", "dead"):
            continue
        files = twins.get(key, 0) + (key in left)
        # A held or waiting one is no longer open; it, or one given back, was finished by
        # another runner since this run began.
        if state.close(key) or key in given_back:
            state.open_found_finished(item_state, files)
        else:
            counters.add("done_before" if item_state == "done" else "dead_before", files)


async def _count_waiting(state: RunState) -> None:
    """Count a watch's files not ready yet as the ledger has them (see the module): one read
    per ``STATES_OF_CHUNK`` files, at the end. A ledger that fails here leaves them counted
    as not ready yet (a warning says so)."""
    waiting_files, state.waiting_files = state.waiting_files, None
    if waiting_files is None:
        return
    cfg, counters = state.config, state.counters
    waiting = waiting_files(time.monotonic())
    # As the watch has them now (its last look may have come after its last count); those
    # settled and seen unchanged long enough whose look had not come (the watch was busy
    # claiming others) are not settled yet no longer: not registered yet.
    by_rule = Counter(rule for _, rule, _ in waiting)
    count_not_ready(counters, by_rule)
    counters.unregistered += by_rule["ready"]
    if not waiting or cfg.identity == "content":
        return
    versioned = cfg.objects is not None  # an object's identity includes its version tag
    rules: dict[str, tuple[str, bool]] = {}
    for record, rule, counted in waiting:
        mtime_ns, rel, size, inode, _ = unpack_item(record)
        ihash = input_hash(cfg.identity, rel, size, mtime_ns, b"", inode if versioned else None)
        rules[item_key(cfg.identity, ihash, mtime_ns)] = (rule, counted)
    try:
        found = await state.ledger.states_of(cfg.job, list(rules))
    except LedgerError as e:
        log.warning("the report counts the files not ready yet as the watch saw them (%s)", e)
        return
    for key, item_state in found.items():
        if item_state not in ("done", "dead"):
            continue
        rule, counted = rules[key]
        name = "unregistered" if rule == "ready" else NOT_READY[rule]
        setattr(counters, name, getattr(counters, name) - 1)  # never to be taken
        if counted or key in state.from_ledger:
            # This watch counted it already, where it ended: identity path; or it leased the
            # item from the ledger (left waiting by an earlier run) before its file, first
            # seen settled, had its second look.
            continue
        counters.add("seen")
        counters.add("done_before" if item_state == "done" else "dead_before")
