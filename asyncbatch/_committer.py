"""The committer: outcomes recorded in groups, and what follows from each commit.

An item is done when, and only when, the transaction holding its completion commits. Outcomes
are committed every ``commit_interval`` seconds or ``commit_batch`` outcomes, whichever comes
first; commits are shielded from cancellation (by the ledger), and the last group is committed
even when the run is cancelled.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from ._queues import LeasedItem, Outbox

if TYPE_CHECKING:
    from ._ledger import Outcome
    from ._runner import Run

__all__ = ["Committer"]

log = logging.getLogger("asyncbatch")
#: How many times ``commit_batch`` one transaction may take when outcomes are waiting.
GROUP_CATCH_UP = 8


class Committer:
    """Takes outcomes from the outbox a group at a time and commits them."""

    def __init__(self, run: Run, outbox: Outbox) -> None:
        self.run = run
        self.outbox = outbox

    async def serve(self) -> None:
        """Commit until the outbox is closed and empty (and the rest, if cancelled)."""
        cfg = self.run.config
        outbox = self.outbox
        try:
            while await outbox.wait_ready():
                await outbox.wait_full(cfg.commit_interval)
                # Behind? Take a bigger group: one transaction costs about the same for 256
                # rows or 2,048, and a backlog of finished items must not grow.
                await self.commit(*outbox.take(cfg.commit_batch * GROUP_CATCH_UP))
        finally:
            with anyio.CancelScope(shield=True):
                if len(outbox):
                    await self.commit(*outbox.take())
                self.run.posts.close()

    async def commit(
        self, batch: list[tuple[LeasedItem, Outcome]], started: list[tuple[str, int]]
    ) -> None:
        """Record one group of outcomes (and attempts started since the last group); then count
        them and queue their post-commit actions."""
        run = self.run
        cfg = run.config
        lost = await run.ledger.commit_outcomes(cfg.job, run.owner, [o for _, o in batch], started)
        counters, in_flight, posts = run.counters, run.in_flight, run.posts
        retry_due = False
        for item, outcome in batch:
            in_flight.pop(item.key, None)
            if lost and item.key in lost:
                counters.lost += 1
                run.workers.item_logger(item).warning(
                    "item %s: the lease was taken over by another runner; outcome %r not recorded",
                    item.key,
                    outcome.state,
                )
                continue
            state = outcome.state
            if state == "done":
                counters.done += 1
                if counters.failed_keys:
                    counters.failed_keys.discard(item.key)
            elif state == "failed":
                counters.failed += 1
                counters.failed_keys.add(item.key)
                retry_due = True
            elif state == "dead":
                counters.failed += item.attempt > 0  # 0: given up on without running
                counters.dead += 1
                counters.failed_keys.discard(item.key)
            else:
                counters.vanished += 1
                counters.failed_keys.discard(item.key)
            if outcome.post_action is not None:
                posts.submit(
                    outcome.post_action,
                    item.key,
                    item.relpath,
                    item.size,
                    item.mtime_ns,
                    item.inode,
                )
        run.made_room()  # leased-and-unfinished items went down: the claimer may lease more
        if retry_due or not in_flight:
            run.wake()  # the claimer waits for a retry to schedule or for the last item
