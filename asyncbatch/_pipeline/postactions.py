"""Post-commit actions: delete or archive an input once its outcome is committed.

The ledger row of a finished item keeps the action it asked for (``delete`` or ``move:DIR``).
The action runs after the commit, with the idempotent unlink and move; if a crash cuts it off,
the input is still in the source, the next scan meets its finished row, and the action is
carried out then, without running the handler again.

A file is deleted or archived only while it is still the file that was handled (same size,
mtime and inode): a newer version dropped under the same name is new work, never thrown away.
An archive that already holds a different file of that name gets the item's copy under
``name.<key>.ext`` instead: deterministic, so a repeated move finds its own earlier result.

Markers (``marker:SUFFIX``, ``dir-marker:NAME``: see :mod:`asyncbatch._ready`) follow their
files: a file's marker right after the file (while no newer file took the name), a
directory's (``on_done``'s action) right after the action that left no input under it.
A kill between a file's action and its marker's leaves the marker without its file: the next
scan finds it (an *orphan*) and hands it here again. Moving or deleting a marker is repeatable
as a file's action is; a marker is never read.
"""

from __future__ import annotations

import contextlib
import functools
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
from .._ready import Readiness, ancestors
from .._scanner import ScanRules, clamp_ns, entry_stat
from .._sources.store import ObjectInfo, ObjectStores
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
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    #: A marker alone (``relpath`` is the marker's; no key: its file's action was carried out
    #: before, or it is a directory's).
    marker: bool = False


def _matches(st: os.stat_result, post: _Post) -> bool:
    return (st.st_size, clamp_ns(st.st_mtime_ns), st.st_ino) == (
        post.size,
        post.mtime_ns,
        post.inode,
    )


def _left_alone(st: os.stat_result | None, post: _Post) -> str | None:
    """Why the name's entry now (see ``entry_stat``) is not the file handled, if it is not:
    the action leaves it alone (a newer version, or a copy, is new work)."""
    if st is None:
        return "left alone: its symlink leads to no file now"
    if not _matches(st, post):
        return "left alone: another file has its name now (a newer version, or a copy)"
    return None


def _delete(source: Path, post: _Post, follow_symlinks: bool) -> str:
    """Delete the name (a symlink the job follows: the link, not the file it leads to) if it
    is still the file handled."""
    path = source / os.fsdecode(post.relpath)
    try:
        st = entry_stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return "already gone"
    if (why := _left_alone(st, post)) is not None:
        return why
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)
    return "deleted"


def _delete_marker(path: Path) -> str:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return "already gone"
    fsync_dir(path.parent)
    return "deleted"


def holds_inputs(
    source: Path,
    prefix: bytes,
    rules: ScanRules,
    ready: Readiness,
    *,
    recursive: bool,
    follow_symlinks: bool = False,
) -> bool:
    """Whether the directory ``prefix`` (a relpath; ``b""``: the source) holds an input
    (under it too, when ``recursive``): a file the scan would list, a marker aside. Stops at
    the first one found. Errs towards ``True``: a directory that cannot be listed, or (with
    ``follow_symlinks``) a symlink the scan would follow, may hold one."""
    try:
        it = os.scandir(os.path.join(os.fsencode(source), prefix))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    with it:
        for de in it:
            rel = prefix + b"/" + de.name if prefix else de.name
            if de.is_symlink():
                if follow_symlinks and not rules.skips(de.name, rel) and not ready.marks(de.name):
                    return True
            elif de.is_dir(follow_symlinks=False):
                if (
                    recursive
                    and not rules.skips(de.name, rel, is_dir=True)
                    and holds_inputs(source, rel, rules, ready, recursive=True)
                ):
                    return True
            elif (
                de.is_file(follow_symlinks=False)
                and not rules.skips(de.name, rel)
                and not ready.marks(de.name)
            ):
                return True
    return False


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
        self._ready = config.readiness
        self._send, self._recv = anyio.create_memory_object_stream[_Post](math.inf)
        self.failed = 0
        self.done = 0

    def submit(
        self, action: str, key: str, relpath: bytes, size: int, mtime_ns: int, inode: int
    ) -> None:
        """Queue an action (dropped if the queue is closed: the next run will find it)."""
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(_Post(action, key, relpath, size, mtime_ns, inode))

    def submit_marker(self, relpath: bytes) -> None:
        """Queue ``on_done``'s action for a marker alone: one whose file is gone (its action
        was carried out before a kill), or a directory's with no input left (no action with
        ``on_done="keep"``)."""
        action = self._config.on_done.encode()
        if action is not None:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._send.send_nowait(_Post(action, "", relpath, marker=True))

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
        if post.marker:
            await failpoints.ahit("before-marker-action")
            return f"marker {await self._marker(post.action, post.relpath, post.key)}"
        await failpoints.ahit("before-post-action")
        source = self._config.source
        kind, directory = decode_action(post.action)
        if isinstance(source, ObjectURL):
            outcome = await self._perform_on_object(source, kind, directory, post)
        elif kind == "delete":
            follow = self._config.follow_symlinks
            outcome = await anyio.to_thread.run_sync(_delete, source, post, follow)
        elif kind != "move" or not directory:
            raise EffectError(f"unknown post-commit action {post.action!r}")
        else:
            outcome = await self._move(source / os.fsdecode(post.relpath), Path(directory), post)
        if self._ready.markers and not outcome.startswith("left alone"):
            if self._ready.suffixes:
                outcome += await self._file_markers(post)
            if self._ready.dir_names:
                outcome += await self._dir_markers(post.relpath.rpartition(b"/")[0])
        return outcome

    async def _dir_markers(self, parent: bytes) -> str:
        """``on_done``'s action on the directory markers in ``parent`` and above it whose
        directory holds no input any more."""
        action = self._config.on_done.encode()
        if action is None:
            return ""
        said = []
        for d in ancestors(parent):
            for name in self._ready.dir_names:
                marker = d + b"/" + name if d else name
                if not await self._exists(marker) or await self._holds_inputs(d):
                    continue
                await failpoints.ahit("before-marker-action")
                said.append(f"{os.fsdecode(marker)} {await self._marker(action, marker, '')}")
        return f"; directory markers: {', '.join(said)}" if said else ""

    async def _exists(self, relpath: bytes) -> bool:
        """Whether the source holds ``relpath`` now (a file, or an object)."""
        source = self._config.source
        if isinstance(source, ObjectURL):
            return await self._head(source, relpath) is not None
        return os.path.lexists(source / os.fsdecode(relpath))

    async def _head(self, source: ObjectURL, relpath: bytes) -> ObjectInfo | None:
        if self._objects is None:  # a run over an s3:// source always has them
            raise EffectError("no object-store client for an s3:// source")
        return await self._objects.bucket(source.bucket).head(source.key(os.fsdecode(relpath)))

    async def _holds_inputs(self, prefix: bytes) -> bool:
        cfg = self._config
        source, rules, ready, recursive = cfg.source, cfg.rules, self._ready, cfg.recursive
        if isinstance(source, ObjectURL):
            from .._sources.objects import holds_objects

            assert self._objects is not None
            store = self._objects.bucket(source.bucket)
            return await holds_objects(store, source, prefix, rules, ready, recursive=recursive)
        return await anyio.to_thread.run_sync(
            functools.partial(
                holds_inputs,
                source,
                prefix,
                rules,
                ready,
                recursive=recursive,
                follow_symlinks=cfg.follow_symlinks,
            )
        )

    async def _file_markers(self, post: _Post) -> str:
        """Carry the file's action out on its markers, unless a newer file took its name."""
        if await self._exists(post.relpath):
            return "; its markers left alone: a newer file took its name"
        said = []
        for suffix in self._ready.suffixes:
            await failpoints.ahit("before-marker-action")
            said.append(await self._marker(post.action, post.relpath + suffix, post.key))
        return f"; its markers: {', '.join(said)}"

    async def _marker(self, action: str, relpath: bytes, key: str) -> str:
        """Move or delete the marker ``relpath`` as ``action`` says (repeatable); ``key``: its
        file's item key, for the archive's name of a clash (none: from its mtime)."""
        kind, directory = decode_action(action)
        source = self._config.source
        if kind not in ("delete", "move") or (kind == "move" and not directory):
            raise EffectError(f"unknown post-commit action {action!r}")
        if isinstance(source, ObjectURL):
            return await self._object_marker(source, directory, relpath, key)
        src = source / os.fsdecode(relpath)
        if kind == "delete":
            return await anyio.to_thread.run_sync(_delete_marker, src)
        assert directory is not None
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return "already gone"
        rel = os.fsdecode(relpath)
        archive = Path(directory)
        dst = archive / rel
        await anyio.to_thread.run_sync(make_parents_under, archive, Path(rel))
        try:
            try:
                await idempotent_move(src, dst)
            except EffectError:
                dst = dst.with_name(keyed_name(dst.name, key or f"{st.st_mtime_ns:016x}"))
                await idempotent_move(src, dst)
        except FileNotFoundError:
            return "already gone"
        return f"moved to {dst}"

    async def _object_marker(
        self, source: ObjectURL, directory: str | None, relpath: bytes, key: str
    ) -> str:
        """Delete (``directory`` ``None``) or archive the marker object ``relpath``: the
        version there now (a marker is never read, so any version of it is its file's)."""
        from .._sources.effects import delete_object, move_object

        assert self._objects is not None
        now = await self._head(source, relpath)
        if now is None:
            return "already gone"
        rel = os.fsdecode(relpath)
        if directory is None:
            return await delete_object(self._objects, source, rel, now.size, now.tag, mtime_ns=None)
        archive = ObjectURL.parse("on_done", directory)
        item = (key or f"{now.mtime_ns:016x}", now.size, now.tag)
        return await move_object(self._objects, source, archive, rel, item, mtime_ns=None)

    async def _perform_on_object(
        self, source: ObjectURL, kind: str, directory: str | None, post: _Post
    ) -> str:
        """The action on an object (see :mod:`asyncbatch._sources.effects`)."""
        from .._sources.effects import delete_object, move_object

        if self._objects is None:  # a run over an s3:// source always has them
            raise EffectError("no object-store client for an s3:// source")
        rel = os.fsdecode(post.relpath)
        if kind == "delete":
            return await delete_object(
                self._objects, source, rel, post.size, post.inode, mtime_ns=post.mtime_ns
            )
        if kind != "move" or not directory:
            raise EffectError(f"unknown post-commit action {post.action!r}")
        archive = ObjectURL.parse("on_done", directory)
        item = (post.key, post.size, post.inode)
        return await move_object(self._objects, source, archive, rel, item, mtime_ns=post.mtime_ns)

    async def _move(self, src: Path, archive: Path, post: _Post) -> str:
        rel = os.fsdecode(post.relpath)
        dst = archive / rel
        try:
            st = entry_stat(src, follow_symlinks=self._config.follow_symlinks)
        except FileNotFoundError:
            return "already moved" if dst.exists() else "already gone"
        if (why := _left_alone(st, post)) is not None:
            return why
        await anyio.to_thread.run_sync(make_parents_under, archive, Path(rel))
        try:
            await idempotent_move(src, dst)
        except EffectError:
            dst = dst.with_name(keyed_name(dst.name, post.key))
            await idempotent_move(src, dst)
        return f"moved to {dst}"
