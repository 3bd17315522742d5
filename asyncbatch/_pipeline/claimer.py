"""The claimer: scanned entries registered and leased in chunks, in ``(mtime_ns, relpath)`` order.

``run`` mode scans once, claims the sorted records chunk by chunk (one statement each), then
leases what waits in the ledger (retries, items put back) until nothing is left. ``watch`` mode
polls: a file becomes a candidate once it is settled *and* unchanged since the previous poll;
files already registered are remembered by their stat signature so an idle inbox costs one
``scandir`` per poll and no ledger round trip.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Literal

import anyio
import anyio.to_thread

from .. import _failpoints as failpoints
from .._effects.actions import decode_action
from .._identity import input_hash, item_key
from .._ledger import ClaimedRow
from .._scanner import Scanner, content_digest, split, unpack
from .postactions import PostActions
from .queues import ItemQueue, LeasedItem
from .state import RunState

__all__ = ["Claimer"]

log = logging.getLogger("asyncbatch")


class Claimer:
    """Feeds the item queue with leased items."""

    def __init__(
        self,
        state: RunState,
        queue: ItemQueue,
        *,
        scanner: Scanner,
        posts: PostActions,
        mode: Literal["run", "watch"],
    ) -> None:
        self.run = state
        self.config = state.config
        self.queue = queue
        self.scanner = scanner
        self.posts = posts
        self.mode = mode

    async def serve(self) -> None:
        """Claim everything there is (``run``) or keep polling (``watch``); close the queue."""
        run = self.run
        try:
            if self.mode == "run":
                records = await self.scanner.scan(
                    settle=self.config.settle, on_chunk=self._on_scan_chunk
                )
                run.counters.seen = len(records)
                run.counters.scanned = True
                await self.claim_records(records)
                del records
                await self.claim_waiting(until_idle=True)
            else:
                await self.watch()
        finally:
            self.queue.close()

    def _on_scan_chunk(self, found: int) -> None:
        self.run.counters.seen = found

    async def watch(self) -> None:
        """Poll until stopped; a file is handled once settled and unchanged since the last poll."""
        run, cfg = self.run, self.config
        previous: dict[bytes, bytes] = {}
        known: dict[bytes, bytes] = {}
        settle_ns = int(cfg.settle * 1e9)
        while not run.stopping:
            now_ns = time.time_ns()
            records = await self.scanner.scan(settle=None, now_ns=now_ns)
            cutoff = now_ns - settle_ns
            candidates: list[bytes] = []
            seen_now: dict[bytes, bytes] = {}
            waiting: dict[bytes, bytes] = {}
            for record in records:
                rel, signature = split(record)
                if known.get(rel) == signature:
                    seen_now[rel] = signature
                elif previous.get(rel) == signature and unpack(record)[0] <= cutoff:
                    candidates.append(record)
                    seen_now[rel] = signature
                else:
                    waiting[rel] = signature
            del records
            previous, known = waiting, seen_now
            run.counters.seen += len(candidates)
            run.counters.scanned = True
            await self.claim_records(candidates)
            del candidates
            await self.claim_waiting(until_idle=False)
            with anyio.move_on_after(cfg.poll):
                await run.stop_requested.wait()

    def prepare(self, records: list[bytes]) -> list[LeasedItem]:
        """Items (with key and input hash) for a chunk of scan records, duplicates dropped."""
        cfg = self.config
        identity = cfg.identity
        items: list[LeasedItem] = []
        keys: set[str] = set()
        for record in records:
            mtime_ns, rel, size, inode = unpack(record)
            digest = b""
            if identity == "content":
                found = content_digest(
                    self.run.dir_fd, rel, size, mtime_ns, follow_symlinks=cfg.follow_symlinks
                )
                if found is None:
                    continue  # vanished or changed while being hashed: the next scan sees it
                digest = found
            ihash = input_hash(identity, rel, size, mtime_ns, digest)
            key = item_key(identity, ihash, mtime_ns)
            if identity == "content":
                if key in keys:
                    continue  # the same content twice in one chunk: one item
                keys.add(key)
            items.append(LeasedItem(key, ihash, rel, size, mtime_ns, inode))
        return items

    def chunk_starts(self, count: int) -> list[int]:
        """Where each claim chunk starts, in the order to claim them.

        One runner claims in ``(mtime_ns, relpath)`` order. Runners sharing a job (``shared``)
        start at a random chunk and wrap around: they work on different parts of the inbox
        instead of racing for the same chunk, each still in order within its part.
        """
        starts = list(range(0, count, self.config.claim_batch))
        if self.config.shared and len(starts) > 1:
            turn = random.randrange(len(starts))
            starts = starts[turn:] + starts[:turn]
        return starts

    async def claim_records(self, records: list[bytes]) -> None:
        """Register and lease sorted scan records, a chunk per statement, into the queue."""
        run, cfg = self.run, self.config
        posts = self.posts
        for start in self.chunk_starts(len(records)):
            if run.stopping:
                return
            chunk = records[start : start + cfg.claim_batch]
            if cfg.identity == "content":
                items = await anyio.to_thread.run_sync(self.prepare, chunk)
            else:
                items = self.prepare(chunk)
            rows = await run.ledger.claim_scanned(
                cfg.job,
                run.owner,
                cfg.lease,
                [(i.key, i.relpath, i.size, i.mtime_ns, i.inode) for i in items],
            )
            await failpoints.ahit("after-claim")
            by_key = {row.key: row for row in rows}
            leased: list[LeasedItem] = []
            for item in items:  # keep scan order: the ledger returns rows in any order
                row = by_key.get(item.key)
                if row is None:
                    continue
                if row.state == "running":
                    leased.append(item)
                    continue
                if row.state == "dead":
                    run.counters.dead_seen += 1
                if row.post_action is not None:
                    # The file that was handled, as recorded then: not the one just scanned,
                    # which may be a newer file under the same name (or, identity "content",
                    # another name with the same bytes) that must be left alone.
                    posts.submit(
                        row.post_action, item.key, row.relpath, row.size, row.mtime_ns, row.inode
                    )
            run.counters.claimed_from_scan += len(leased)
            await self._hand_over(leased, by_key)

    async def _hand_over(self, leased: list[LeasedItem], rows: dict[str, ClaimedRow]) -> None:
        """Track freshly leased items, then queue them (waiting for room)."""
        run = self.run
        deadline = run.lease_deadline()
        in_flight = run.in_flight
        for item in leased:  # before any await: a cancellation must release them
            row = rows[item.key]
            item.fence, item.prior_attempts, item.prior_interrupted = (
                row.fence,
                row.attempts,
                row.interrupted,
            )
            item.lease_deadline = deadline
            in_flight[item.key] = item
        if leased:
            await self.queue.wait_for_room()
            if not run.stopping:  # else they stay leased, unstarted, and are released
                self.queue.put(leased)
            # Back-pressure on the whole pipeline, not just the queue: while finished items
            # wait for the committer, lease no more (memory stays bounded at a million files).
            await run.wait_for_room()

    async def claim_waiting(self, *, until_idle: bool) -> None:
        """Lease items waiting in the ledger: retries, items put back, items not in this scan.

        With ``until_idle``, keep at it until nothing is in flight and no failed item waits
        for a retry.
        """
        run, cfg = self.run, self.config
        while not run.stopping:
            rows = await run.ledger.claim_waiting(cfg.job, run.owner, cfg.lease, cfg.claim_batch)
            leased: list[LeasedItem] = []
            for row in sorted(rows, key=lambda r: (r.mtime_ns, r.relpath)):
                ihash = (
                    row.key
                    if cfg.identity == "content"
                    else input_hash(cfg.identity, row.relpath, row.size, row.mtime_ns, b"")
                )
                item = LeasedItem(row.key, ihash, row.relpath, row.size, row.mtime_ns, row.inode)
                if row.post_action:
                    kind, moved_to = decode_action(row.post_action)
                    if kind == "moved":
                        item.moved_to = moved_to
                leased.append(item)
            await self._hand_over(leased, {row.key: row for row in rows})
            if rows:
                continue
            if not until_idle:
                return
            if run.in_flight:
                # Our own items are still out: wait until one fails (it may need a retry) or
                # all are back, not for every commit.
                await run.wait_for_progress(cfg.lease / 4)
                continue
            if cfg.shared and await run.ledger.reap_stale_runners(cfg.job, run.me):
                continue
            due = await run.ledger.next_retry_at(cfg.job)
            if due is None:
                return
            wait = due - run.clock()
            if wait > 0:
                log.info("waiting %.1fs for the next retry", wait)
                await run.wait_for_progress(wait)
