"""A job's readiness rules over objects: the directory walk's verdicts, for a prefix's keys.

A directory scan feeds its :class:`~asyncbatch._ready.ReadyWalk` directory by directory, as
it lists them; a bucket's listing comes as one sorted stream of keys instead. Here the keys
are grouped by their "directory" (the key up to its last ``/``), every directory of the
listing entered after its parent (a directory marker, ``_SUCCESS``, covers what is under it),
and each object told to the walk as a file or a marker, with a stat made of what the listing
says of it: its size, its LastModified (an object is complete once visible: its mtime and
ctime are both LastModified), its version tag as its inode.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from .._ready import NS_NONE, Readiness, ReadyWalk, ancestors
from .._scanner import Look, pack
from .store import ObjectInfo

__all__ = ["look_objects", "object_stat", "ready_objects"]


def object_stat(obj: ObjectInfo) -> os.stat_result:
    """An ``os.stat_result`` for an object: a regular file of its size, its LastModified as
    mtime and ctime, its version tag as inode."""
    seconds = obj.mtime_ns / 1e9
    return os.stat_result(
        (
            stat.S_IFREG | 0o644,
            obj.tag,
            0,
            1,
            0,
            0,
            obj.size,
            int(seconds),
            int(seconds),
            int(seconds),
            seconds,
            seconds,
            seconds,
            obj.mtime_ns,
            obj.mtime_ns,
            obj.mtime_ns,
        )
    )


def ready_objects(
    objects: Iterable[tuple[bytes, ObjectInfo, bool]],
    ready: Readiness,
    *,
    cutoff_ns: int | None,
    now_ns: int,
) -> tuple[list[bytes], ReadyWalk]:
    """The records of the objects (``(relpath, object, skipped)``: ``skipped``, a name the scan
    rules skip, hidden or ignored, which is seen but never an input) the rules let through,
    sorted, and the walk that judged them (counts by rule, markers, orphans: as a directory
    scan's: a marker is told by its name before the scan rules are asked).

    ``cutoff_ns`` as for the walk: a one-shot run's listing leaves out (and counts) what is
    not ready; a watch's (``None``) lists every input and notes the rule it fails.
    """
    walk = ReadyWalk(ready, cutoff_ns=cutoff_ns, now_ns=now_ns)
    by_dir: dict[bytes, list[tuple[bytes, bytes, ObjectInfo, bool]]] = {}
    for rel, obj, skipped in objects:
        parent, _, name = rel.rpartition(b"/")
        by_dir.setdefault(parent, []).append((name, rel, obj, skipped))
    every = set(by_dir)
    for parent in list(by_dir):
        every.update(ancestors(parent))  # entered even when empty: their markers cover below
    records: list[bytes] = []
    for prefix in sorted(every, key=lambda p: (p.count(b"/") + bool(p), p)):
        walk.enter(prefix)
        for name, rel, obj, skipped in by_dir.get(prefix, ()):
            walk.saw(name)
            st = object_stat(obj)
            if ready.marks(name):
                walk.marker(name, rel, st)
            elif not skipped:
                record = pack(obj.mtime_ns, rel, obj.size, obj.tag, obj.mtime_ns)
                walk.file(record, name, st)
        records.extend(walk.leave())
    walk.end()
    walk.count_ahead(time.time_ns())  # after the listing: what is later is ahead of the clock
    records.sort()
    return records, walk


Head = Callable[[bytes], Awaitable[ObjectInfo | None]]


async def look_objects(
    relpaths: Sequence[bytes], ready: Readiness, head: Head, now_ns: int
) -> Look:
    """What a look at these relpaths finds under ``ready`` (one ``HEAD`` each, through
    ``head``, which returns ``None`` for a key a listing would not keep): a file marker brings
    its file, each file is judged by the rules but age and stable (its markers looked at), a
    directory marker says its prefix needs a listing. As a directory look (see
    :class:`~asyncbatch._scanner.Look`)."""
    found = Look([], False, {}, [])
    dirs: dict[bytes, int] = {}
    walked_dir = False
    for rel in ready.with_marked(relpaths):
        obj = await head(rel)
        if obj is None:
            continue
        name = rel.rpartition(b"/")[2]
        if ready.marks(name):
            found.marker_keys.append(rel + b"\0" + obj.tag.to_bytes(8, "big"))
            walked_dir = walked_dir or name in ready.dir_names
            continue
        found.records.append(pack(obj.mtime_ns, rel, obj.size, obj.tag, obj.mtime_ns))
        if kind := await _looked_rule(rel, obj, ready, head, dirs, now_ns):
            found.blocked[rel] = kind
    found.records.sort()
    return found._replace(walked_dir=walked_dir)


async def _looked_rule(
    rel: bytes, obj: ObjectInfo, ready: Readiness, head: Head, dirs: dict[bytes, int], now: int
) -> str:
    """The first rule but age and stable that does not hold for the object ``rel`` (as
    :meth:`Readiness.looked_rule` for a file), or ``""``."""
    kind = ready.stat_rule(obj.size, obj.mtime_ns, obj.mtime_ns, now, age=False)
    if kind or not ready.markers:
        return kind
    parent, _, name = rel.rpartition(b"/")
    marks = {}
    for suffix in ready.suffixes:
        if (mark := await head(rel + suffix)) is not None:
            marks[name + suffix] = mark.mtime_ns
    return ready.marker_rule(name, obj.mtime_ns, marks, await _cover(parent, ready, head, dirs))


async def _cover(parent: bytes, ready: Readiness, head: Head, dirs: dict[bytes, int]) -> int:
    """As :meth:`Readiness.cover_at`, by ``HEAD`` (``dirs``: the markers looked at so far)."""
    for key, rel in ready.dir_marker_paths(parent):
        if key not in dirs:
            mark = await head(rel)
            dirs[key] = NS_NONE if mark is None else mark.mtime_ns
    return ready.cover_from(parent, dirs)
