"""Post-commit actions: delete or archive an input once its outcome is committed.

The ledger row of a finished item keeps the action it asked for (``delete`` or ``move:DIR``).
The action runs after the commit, with the idempotent unlink and move; if a crash cuts it off,
the input is still in the source, the next scan meets its finished row, and the action is
carried out then, without running the handler again.

A file is deleted or archived only while it is still the file that was handled (same size,
mtime and inode): a newer version dropped under the same name is new work, never thrown away.
An archive that already holds a different file of that name gets the item's copy under
``name.<key>.ext`` instead: deterministic, so a repeated move finds its own earlier result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from .. import _failpoints as failpoints
from .._config import BatchConfig
from .._effects.files import fsync_dir, idempotent_move, make_parents_under
from .._exceptions import EffectError
from .._ledger import decode_action
from .._scanner import clamp_ns
from .._sources.store import ObjectStores
from .._sources.url import ObjectURL

__all__ = ["PostActions"]

log = logging.getLogger("asyncbatch.post")
#: Post-commit actions carried out at the same time (each waits on fsync).
PARALLEL = 4


@dataclass(frozen=True, slots=True)
class _Post:
    action: str
    key: str
    relpath: bytes
    size: int
    mtime_ns: int
    inode: int


def _matches(st: os.stat_result, post: _Post) -> bool:
    return (st.st_size, clamp_ns(st.st_mtime_ns), st.st_ino) == (
        post.size,
        post.mtime_ns,
        post.inode,
    )


def _delete(source: Path, post: _Post) -> str:
    path = source / os.fsdecode(post.relpath)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "already gone"
    if not _matches(st, post):
        return "left alone: the file was replaced by a newer version"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)
    return "deleted"


def keyed_name(name: str, key: str) -> str:
    """``report.csv`` → ``report.<key suffix>.csv``: where a clashing archive copy goes."""
    stem, dot, ext = name.rpartition(".")
    tag = key[-16:]
    return f"{stem}.{tag}.{ext}" if dot and stem else f"{name}.{tag}"


class PostActions:
    """A queue of post-commit actions and the small pool of tasks that carries them out."""

    def __init__(self, config: BatchConfig, objects: ObjectStores | None = None) -> None:
        self._config = config
        self._objects = objects
        self._send, self._recv = anyio.create_memory_object_stream[_Post](math.inf)
        self.failed = 0
        self.done = 0

    def submit(
        self, action: str, key: str, relpath: bytes, size: int, mtime_ns: int, inode: int
    ) -> None:
        """Queue an action (dropped if the queue is closed: the next run will find it)."""
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(_Post(action, key, relpath, size, mtime_ns, inode))

    def close(self) -> None:
        """No more actions: :meth:`serve` returns once the queued ones are done."""
        self._send.close()

    async def serve(self) -> None:
        """Carry out queued actions until :meth:`close` and the queue is empty."""
        async with self._recv, anyio.create_task_group() as tg:
            for _ in range(PARALLEL):
                tg.start_soon(self._drain)

    async def _drain(self) -> None:
        async with self._recv.clone() as queue:
            async for post in queue:
                await self._carry_out(post)

    async def _carry_out(self, post: _Post) -> None:
        try:
            outcome = await self._perform(post)
        except (OSError, EffectError) as exc:
            self.failed += 1
            log.warning(
                "item %s: post-commit action %r failed (the next run retries it): %s",
                post.key,
                post.action.partition(":")[0],
                exc,
                extra={"job": self._config.job, "key": post.key},
            )
        else:
            self.done += 1
            log.debug("item %s: %s", post.key, outcome, extra={"key": post.key})

    async def _perform(self, post: _Post) -> str:
        await failpoints.ahit("before-post-action")
        source = self._config.source
        kind, directory = decode_action(post.action)
        if isinstance(source, ObjectURL):
            return await self._perform_on_object(source, kind, directory, post)
        if kind == "delete":
            return await anyio.to_thread.run_sync(_delete, source, post)
        if kind != "move" or not directory:
            raise EffectError(f"unknown post-commit action {post.action!r}")
        return await self._move(source / os.fsdecode(post.relpath), Path(directory), post)

    async def _perform_on_object(
        self, source: ObjectURL, kind: str, directory: str | None, post: _Post
    ) -> str:
        """The action on an object (see :mod:`asyncbatch._sources.effects`)."""
        from .._sources.effects import delete_object, move_object

        if self._objects is None:  # a run over an s3:// source always has them
            raise EffectError("no object-store client for an s3:// source")
        rel = os.fsdecode(post.relpath)
        if kind == "delete":
            return await delete_object(self._objects, source, rel, post.size, post.inode)
        if kind != "move" or not directory:
            raise EffectError(f"unknown post-commit action {post.action!r}")
        archive = ObjectURL.parse("on_done", directory)
        item = (post.key, post.size, post.inode)
        return await move_object(self._objects, source, archive, rel, item)

    async def _move(self, src: Path, archive: Path, post: _Post) -> str:
        rel = os.fsdecode(post.relpath)
        dst = archive / rel
        try:
            st: os.stat_result | None = os.lstat(src)
        except FileNotFoundError:
            st = None
        if st is None:
            return "already moved" if dst.exists() else "already gone"
        if not _matches(st, post):
            return "left alone: the file was replaced by a newer version"
        await anyio.to_thread.run_sync(make_parents_under, archive, Path(rel))
        try:
            await idempotent_move(src, dst)
        except EffectError:
            dst = dst.with_name(keyed_name(dst.name, post.key))
            await idempotent_move(src, dst)
        return f"moved to {dst}"
