"""The committer: outcomes recorded in groups, and what follows from each commit.

An item is done when, and only when, the transaction holding its completion commits. Outcomes
are committed every ``commit_interval`` seconds or ``commit_batch`` outcomes, whichever comes
first; commits are shielded from cancellation (by the ledger), and the last group is committed
even when the run is cancelled.
"""

from __future__ import annotations

import logging
import os
import time

import anyio

from .. import _failpoints as failpoints
from .._ledger import Outcome
from .postactions import PostActions
from .queues import LeasedItem, Outbox, item_logger
from .state import RunState

__all__ = ["Committer"]

log = logging.getLogger("asyncbatch")
#: How many times ``commit_batch`` one transaction may take when outcomes are waiting.
GROUP_CATCH_UP = 8


class Committer:
    """Takes outcomes from the outbox a group at a time and commits them."""

    def __init__(self, state: RunState, outbox: Outbox, posts: PostActions) -> None:
        self.state = state
        self.outbox = outbox
        self.posts = posts

    async def serve(self) -> None:
        """Commit until the outbox is closed and empty (and the rest, if cancelled)."""
        cfg = self.state.config
        outbox = self.outbox
        try:
            while await outbox.wait_ready():
                await outbox.wait_full(cfg.commit_interval)
                # Behind? Take a bigger group: one transaction costs about the same for 256
                # rows or 2,048, and a backlog of finished items must not grow.
                group = outbox.take(cfg.commit_batch * GROUP_CATCH_UP)
                # Out of the outbox, the group is committed even if the run is cancelled
                # meanwhile: a cancellation at the ledger's lock lost it (handlers that had
                # succeeded ran again; attempts that had started went uncounted, so a handler
                # that raises SystemExit at once stopped every later run).
                with anyio.CancelScope(shield=True):
                    await self.commit(*group)
        finally:
            with anyio.CancelScope(shield=True):
                if len(outbox):
                    await self.commit(*outbox.take())
                self.posts.close()

    def _end_twins(self, key: str, outcome: str) -> bool:
        """The attempt of the item ``key``, whose twins (files with its bytes, counted done
        before on its strength: see ``RunState.twins``) wait on it, ended ``outcome``: done
        or dead, they are finished with it; vanished, they are not (it handled none of
        them): returns ``True``, and the claimer takes one of them in its place. Failed, they
        wait on its retry."""
        state = self.state
        if outcome in ("done", "dead"):
            state.twins_ended(key, outcome)
        elif outcome == "vanished":
            state.twins_due.add(key)
            return True
        return False

    def _why_vanished(self, key: str) -> tuple[bool, bool]:
        """Whether the worker gave ``key`` back vanished because its file was written to
        with its key kept (``RunState.rewritten``), or changed into a new version
        (``RunState.changed``); both are taken out."""
        state = self.state
        rewritten, changed = key in state.rewritten, key in state.changed
        if rewritten:
            state.rewritten.discard(key)
        if changed:
            state.changed.discard(key)
        return rewritten, changed

    def _changed_file(self, item: LeasedItem, rewritten: bool, vanished: list[bytes]) -> None:
        """Note an item committed vanished because its file changed after its scan: its path
        holds a file still. Written to with its key kept (``rewritten``), a watch looks at it
        again by the ledger's log (``vanished``, see ``Ledger.look_again``); a one-shot run
        looks at every such path again before it ends (``RunState.relook``)."""
        state = self.state
        if rewritten:
            state.vanished_here.add(item.key)
            vanished.append(item.relpath)
        if state.relook is not None:
            state.relook.append((item.key, item.relpath))

    def _hold_back_changed(
        self, batch: list[tuple[LeasedItem, Outcome]]
    ) -> list[tuple[LeasedItem, Outcome]]:
        """A shared ``run()``: of ``batch``, the outcomes to commit now. Those of items given
        back vanished because their file changed after the listing queued it (and not looked
        at again yet) are held back, their items still leased, in ``RunState.relook_due``:
        the claimer looks at their paths again (``SharedRun.look_again_changed``) and then
        hands them back. Leased meanwhile, they keep the job unfinished for every runner: none
        says "vanished" of a file whose new version is being taken (or counted not ready)."""
        state = self.state
        due = state.relook_due
        if due is None:
            return batch
        kept: list[tuple[LeasedItem, Outcome]] = []
        for item, outcome in batch:
            key = item.key
            if (
                outcome.state == "vanished"
                and key not in state.relooked
                and (key in state.rewritten or key in state.changed)
            ):
                rewritten, _ = self._why_vanished(key)
                due.append((item, outcome, rewritten))
            else:
                kept.append((item, outcome))
        if len(kept) < len(batch):
            state.wake()  # the claimer looks at them
        return kept

    def _count(self, item: LeasedItem, outcome: Outcome, looked: bool) -> None:
        """Count a committed outcome; not the vanished one of an item whose path held a file
        when looked at again (``looked``, see :meth:`_hold_back_changed`): its new version is
        counted where it ends, or not ready yet."""
        if not looked:
            self.state.counters.record(outcome.state, attempted=item.attempt > 0)

    async def commit(
        self, batch: list[tuple[LeasedItem, Outcome]], started: list[tuple[str, int]]
    ) -> None:
        """Record one group of outcomes (and attempts started since the last group); then count
        them and queue their post-commit actions."""
        state = self.state
        job = state.config.job
        batch = self._hold_back_changed(batch)
        if not batch and not started:
            return
        await failpoints.ahit("before-commit")
        began = time.monotonic()
        lost = await state.ledger.commit_outcomes(job, state.owner, [o for _, o in batch], started)
        if state.metrics is not None:
            state.metrics.commits.observe(time.monotonic() - began)
        await failpoints.ahit("after-commit")
        counters, in_flight, posts = state.counters, state.in_flight, self.posts
        retry_due = twins_due = False
        vanished: list[bytes] = []
        for item, outcome in batch:
            in_flight.pop(item.key, None)
            rewritten, changed = self._why_vanished(item.key)
            looked = state.relooked.pop(item.key, False)
            if lost and item.key in lost:
                counters.add("lost")
                # A completion refused matters (the work is redone by the new holder); a failed
                # attempt refused was already logged as failed, most often for that very reason.
                item_logger(log, job, item).log(
                    logging.WARNING if outcome.state == "done" else logging.INFO,
                    "%r: the lease was taken over by another runner; outcome %r not recorded",
                    os.fsdecode(item.relpath),
                    outcome.state,
                )
                state.reopen(item.key, "held", item.record())
                continue
            self._count(item, outcome, looked)
            if state.twins and item.key in state.twins:
                twins_due = self._end_twins(item.key, outcome.state) or twins_due
            if outcome.state == "dead":
                state.dead_here.add(item.key)
            elif outcome.state == "vanished" and (rewritten or changed):
                self._changed_file(item, rewritten, vanished)
            if outcome.state == "failed":
                retry_due = True
                state.reopen(item.key, "waiting", item.record())
            if outcome.post_action is not None:
                posts.submit(
                    outcome.post_action,
                    item.key,
                    item.relpath,
                    item.size,
                    item.mtime_ns,
                    item.inode,
                )
        if vanished:
            # Files written to after their scan, their items given back to be handled once
            # settled: a watch under way (this runner's, or a shared one's) remembers them as
            # registered, and looks at them again by this log. (A crash before it loses only
            # that: the next run scans afresh.)
            await state.ledger.look_again(job, vanished)
        state.made_room()  # leased-and-unfinished items went down: the claimer may lease more
        if retry_due or twins_due or not in_flight:
            # The claimer waits for a retry to schedule, a twin to take, or the last item.
            state.wake()
