"""Effects on objects that can be repeated after any interruption: archive (copy, then
delete), delete, and an output written with one ``PUT``.

Each reads like :mod:`asyncbatch._effects.files`: one request concern per function, the
state found first, so that a repeat after a crash at any point finishes the job:

- **delete**: ``HEAD`` the key; gone: done; another version there (a newer upload under the
  same key, its bytes the same or not: another ETag or LastModified): left alone; else
  ``DELETE``.
- **move** (``--on-done move:s3://BUCKET/PREFIX/``): ``HEAD`` the source; gone and the
  archive copy there: done before. Else copy it (server-side in one bucket; through this host
  between two) unless its copy is there already, ``HEAD`` the source again and delete it only
  while it is still the version handled (five requests: three ``HEAD``, a copy, a
  ``DELETE``). A crash between the copy and the delete leaves both: the next run finds the
  copy (by its size and ETag, or for an object uploaded in parts, whose copy is one part,
  by its MD5) and deletes. An archive that holds another object under that name
  gets this one under ``name.<key>.ext`` (as a directory archive does).
- **write** (``ctx.write_output`` under ``--output-dir s3://...``): the lease is checked just
  before the ``PUT``; the object appears whole or not at all.

A newer version is never deleted: the source is looked at (``HEAD``) just before its
``DELETE``. S3 offers no conditional ``DELETE`` through obstore, so an upload landing between
that ``HEAD`` and the ``DELETE`` (a window of one request) would be lost in a bucket without
versioning; with versioning on it stays as a noncurrent version.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from .. import _failpoints as failpoints
from .objects import READ_CHUNK
from .store import ObjectInfo, ObjectStore, ObjectStores
from .url import ObjectURL

__all__ = ["delete_object", "keyed_name", "move_object", "put_object"]


def _handled(now: ObjectInfo, size: int, tag: int, mtime_ns: int | None) -> bool:
    """Whether the object found is the version that was handled: its size, ETag and
    LastModified (both kept to the second, whether a listing or a ``HEAD`` saw them), as an
    item's identity has them: the same bytes uploaded again a second later are a new item,
    to be handled, not deleted. ``mtime_ns`` ``None``: any LastModified (a marker's)."""
    if mtime_ns is not None and now.mtime_ns != mtime_ns:
        return False
    return (now.size, now.tag) == (size, tag)


def keyed_name(name: str, key: str) -> str:
    """``report.csv`` → ``report.<key suffix>.csv``: where a clashing archive copy goes."""
    stem, dot, ext = name.rpartition(".")
    tag = key[-16:]
    return f"{stem}.{tag}.{ext}" if dot and stem else f"{name}.{tag}"


async def delete_object(
    stores: ObjectStores,
    source: ObjectURL,
    relpath: str,
    size: int,
    tag: int,
    *,
    mtime_ns: int | None,
) -> str:
    """Delete the object ``relpath`` under ``source`` if it is still the version handled
    (``size``, ``tag``, and LastModified ``mtime_ns``: see :func:`_handled`); say what was
    done."""
    store = stores.bucket(source.bucket)
    key = source.key(relpath)
    now = await store.head(key)
    if now is None:
        return "already gone"
    if not _handled(now, size, tag, mtime_ns):
        return "left alone: the object was replaced by a newer version"
    await store.delete(key)
    return "deleted"


_MD5_ETAG = re.compile(r'"?([0-9a-f]{32})"?')
_MULTIPART_ETAG = re.compile(r'"?[0-9a-f]{32}-[0-9]+"?')


class _SameContent:
    """Whether an archive object is the source's copy (``now``, the source as found).

    The same size and ETag is. But a copy of an object uploaded in parts (its ETag
    ``"<md5 of the parts' md5s>-N"``) has another ETag: a server-side ``CopyObject`` makes it
    one part, and so does this host's ``PUT`` between buckets; its ETag is then the MD5 of
    its bytes. For such a pair of the same size, the source is read once (``If-Match``, in
    chunks) and its MD5 compared: without it, the repeat of a move cut short after its copy
    would archive the object a second time, under a keyed name."""

    def __init__(self, src: ObjectStore, key: str, now: ObjectInfo) -> None:
        self._src, self._key, self._now = src, key, now
        self._md5: str | None = None

    async def as_(self, there: ObjectInfo) -> bool:
        now = self._now
        if there.size != now.size:
            return False
        if there.etag == now.etag:
            return True
        md5 = _MD5_ETAG.fullmatch(there.etag or "")
        if md5 is None or not _MULTIPART_ETAG.fullmatch(now.etag or ""):
            return False
        if self._md5 is None:
            digest = hashlib.md5(usedforsecurity=False)
            result = await self._src.get(self._key, etag=now.etag)
            async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                digest.update(chunk)
            self._md5 = digest.hexdigest()
        return self._md5 == md5.group(1)


async def _copy(
    src: ObjectStore, key: str, dst: ObjectStore, dst_key: str, etag: str | None
) -> None:
    """Copy ``key`` to ``dst_key``: server-side within a bucket, else a ``GET`` of that
    version (``If-Match``) and a ``PUT``."""
    if src is dst:
        await src.copy(key, dst_key)
        return
    result = await src.get(key, etag=etag)
    await dst.put(dst_key, bytes(await result.bytes_async()))


async def move_object(
    stores: ObjectStores,
    source: ObjectURL,
    archive: ObjectURL,
    relpath: str,
    item: tuple[str, int, int],
    *,
    mtime_ns: int | None,
) -> str:
    """Archive the object ``relpath`` under ``source`` to the same relpath under ``archive``
    (``item``: its ledger key, size and version tag; ``mtime_ns``: its LastModified, see
    :func:`_handled`), repeatably; say what was done."""
    key, size, tag = item
    src, dst = stores.bucket(source.bucket), stores.bucket(archive.bucket)
    src_key, dst_key = source.key(relpath), archive.key(relpath)
    now = await src.head(src_key)
    if now is None:
        return "already moved" if await dst.head(dst_key) is not None else "already gone"
    if not _handled(now, size, tag, mtime_ns):
        return "left alone: the object was replaced by a newer version"
    same = _SameContent(src, src_key, now)
    there = await dst.head(dst_key)
    if there is not None and not await same.as_(there):
        head, _, name = dst_key.rpartition("/")
        dst_key = f"{head}/{keyed_name(name, key)}" if head else keyed_name(name, key)
        there = await dst.head(dst_key)
    if there is None or not await same.as_(there):
        await _copy(src, src_key, dst, dst_key, now.etag)  # a copy is whole once it returned
    await failpoints.ahit("between-copy-and-delete")
    again = await src.head(src_key)
    if again is not None and _handled(again, size, tag, mtime_ns):
        await src.delete(src_key)
    return f"moved to s3://{dst.bucket}/{dst_key}"


async def put_object(
    stores: ObjectStores, root: ObjectURL, relpath: str, data: bytes, fence: Callable[[], None]
) -> str:
    """Write ``data`` at ``relpath`` under ``root`` with one ``PUT`` (overwriting an earlier
    attempt's), ``fence()`` called just before it (it raises to stop the write). Returns the
    object's ``s3://`` URL."""
    store = stores.bucket(root.bucket)
    key = root.key(relpath)
    fence()
    await store.put(key, data)
    await failpoints.ahit("output-put")
    return f"s3://{root.bucket}/{key}"
