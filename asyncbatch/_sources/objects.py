"""An object-store prefix as a source: its listing, its handle, an item's input and entry.

The directory source's parts (:class:`~asyncbatch._scanner.Scanner`,
:class:`~asyncbatch._pipeline.source.SourceDir`, the worker's ``open``) have these
counterparts here, with the same contracts (:mod:`.base`):

- :class:`ObjectLister`: the listing, streamed page by page (bounded memory at a million
  keys) into the same compact sorted records a directory scan makes: ``mtime`` is the
  object's LastModified, ``inode`` its :func:`~.store.version_tag` (ETag and VersionId),
  ``ctime`` LastModified again (an object is visible only once its upload completed, and is
  never written in place: settled means LastModified at least ``settle`` old).
- :class:`ObjectSource`: the handle: nothing to open or reopen (a bucket is not replaced).
- :func:`open_object`: one ``GET`` of the version that was claimed (checked against the
  recorded tag before the handler sees a byte); :class:`ObjectInput` reads it whole or
  streams it with bounded memory, and a second read asks for the same ETag (``If-Match``).
- :class:`ObjectEntry`: ``ctx.entry`` of an object (its ``url``; it has no local path).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import redact_urls
from .._exceptions import ConfigurationError, InputChangedError, SourceError, SourceKeyError
from .._ready import Readiness, ReadyWalk
from .._scanner import Entry, Look, ScanInfo, ScanRules, pack
from .store import (
    BucketMissing,
    ObjectInfo,
    ObjectKeyRefused,
    ObjectPreconditionFailed,
    ObjectStore,
    ObjectStores,
    StoreUnreachable,
    unreachable,
)
from .url import ObjectURL

if TYPE_CHECKING:
    import os

    from obstore import BytesStream, GetResult

__all__ = [
    "READ_CHUNK",
    "ObjectEntry",
    "ObjectInput",
    "ObjectLister",
    "ObjectReader",
    "ObjectReplaced",
    "ObjectSource",
    "check_places",
    "holds_objects",
    "open_object",
    "unlisted_because",
    "unreadable_key",
]

log = logging.getLogger("asyncbatch")

#: An object's entry has no local base (its ``path`` refuses); a constant, made once.
_NO_BASE = Path("/")
#: Bytes a streaming read (``ctx.open()``) holds at most per chunk.
READ_CHUNK = 256 * 1024


class ObjectReplaced(InputChangedError):
    """The object under the item's key is another version than the one claimed."""


def _placed(key: str, prefix: str, rules: ScanRules, recursive: bool) -> bytes | None:
    """The relpath of ``key`` under ``prefix`` if a listing looks at it, whatever its name, or
    ``None``: a "folder" marker (a key ending with ``/``), an empty component, a key in a
    "subdirectory" when not ``recursive``, or under a "directory" the rules skip."""
    rel = key[len(prefix) :]
    if not rel or rel.endswith("/") or "\0" in rel:
        return None
    parts = rel.split("/")
    if len(parts) > 1 and (not recursive or "" in parts):
        return None
    for i, part in enumerate(parts[:-1]):
        if rules.skips(part.encode(), "/".join(parts[: i + 1]).encode(), is_dir=True):
            return None
    return rel.encode()


def unlisted_because(rel: str, rules: ScanRules, *, recursive: bool) -> str | None:
    """Why a listing leaves out the object ``rel`` (its key under the prefix) as an input, in
    words (``None``: it keeps it): the rules of :func:`_relpath`, for ``asyncbatch explain``."""
    if rel.endswith("/"):
        return "a key prefix (a 'folder' of keys), not an object"
    if "\0" in rel or "" in rel.split("/"):
        return "its key has an empty segment ('//') or a NUL, which no listing keeps"
    return rules.hidden_because(
        rel.encode(errors="surrogateescape"), recursive=recursive, is_dir=False
    )


def _unlisted(exc: OSError) -> SourceError:
    """The error a listing that failed with ``exc`` ends a run with."""
    if isinstance(exc, ObjectKeyRefused):
        return SourceKeyError(f"cannot list the source: {exc}")
    return SourceError(f"cannot list the source: {exc}")


def _relpath(key: str, prefix: str, rules: ScanRules, recursive: bool) -> bytes | None:
    """The relpath of ``key`` under ``prefix`` that a listing keeps as an input, or ``None``
    (see :func:`_placed`; and a name the rules skip: hidden, temporary, ignored)."""
    rel = _placed(key, prefix, rules, recursive)
    if rel is None or rules.skips(rel.rpartition(b"/")[2], rel):
        return None
    return rel


class ObjectLister:
    """Lists a prefix of a bucket (the counterpart of :class:`~asyncbatch._scanner.Scanner`).

    Guarantees: each key once per listing; only objects (no "folder" markers), no temporary
    or hidden names, no ignored names; records sorted by ``(LastModified, relpath)``. With
    readiness rules beyond ``age`` (``ready``), those rules decide as for a directory
    (:mod:`.ready`): markers are never listed, and :attr:`walked` says what the listing
    learnt of them.
    """

    def __init__(
        self,
        url: ObjectURL,
        store: ObjectStore,
        *,
        rules: ScanRules,
        recursive: bool = False,
        ready: Readiness | None = None,
    ) -> None:
        self.url = url
        self.store = store
        self.rules = rules
        self.recursive = recursive
        #: The job's readiness rules (``None``, or the default alone: the plain path).
        self.ready = ready
        #: What the last listing learnt of rules beyond the default (``None``: none).
        self.walked: ReadyWalk | None = None
        #: The records of the objects the last listing left out as not settled yet (without
        #: rules beyond ``age``: with them, :attr:`walked` ``left_out`` has them).
        self.left_unsettled: list[bytes] = []
        #: The last listing that finished, if any (for metrics and health).
        self.last: ScanInfo | None = None
        #: The keys looked at (notified) that the client cannot represent, said once each.
        self._refused: set[str] = set()

    @property
    def _rules(self) -> Readiness | None:
        """The rules beyond the default one, if any."""
        ready = self.ready
        return None if ready is None or ready.plain else ready

    async def scan(
        self,
        *,
        settle: float | None,
        now_ns: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> list[bytes]:
        """The records of the objects whose LastModified is at least ``settle`` seconds
        before ``now_ns`` (all with ``settle=None``), sorted; the others are counted in
        :attr:`last` (``unsettled``; ``future``: newer than this host's clock, read after
        their page came). One ``LIST``
        request per 1,000 keys. Raises :class:`SourceError` when the bucket cannot be
        listed (after the client's retries), :class:`SourceKeyError` when a key under the
        prefix cannot be represented by the client (see
        :class:`~.store.ObjectKeyRefused`)."""
        began = time.monotonic()
        if now_ns is None:
            now_ns = time.time_ns()
        cutoff = None if settle is None else now_ns - int(settle * 1e9)
        if (ready := self._rules) is not None:
            return await self._scan_ready(ready, began, cutoff, now_ns, on_chunk)
        prefix = self.url.prefix
        records: list[bytes] = []
        left: list[bytes] = []
        self.left_unsettled = left
        unsettled = future = 0
        try:
            async for page in self.store.list_pages(prefix):
                unsettled, future = self._take(
                    page, cutoff, now_ns, records, unsettled, future, left
                )
                if on_chunk is not None:
                    on_chunk(len(records))
        except OSError as exc:
            raise _unlisted(exc) from None
        records.sort()
        self.last = ScanInfo.after(began, len(records), unsettled, future, None)
        return records

    async def _scan_ready(
        self,
        ready: Readiness,
        began: float,
        cutoff: int | None,
        now_ns: int,
        on_chunk: Callable[[int], None] | None,
    ) -> list[bytes]:
        """:meth:`scan` with rules beyond ``age``: the whole listing first (a marker may come
        after its files), then the rules' verdicts (:func:`.ready.ready_objects`)."""
        from .ready import ready_objects

        prefix, rules, recursive = self.url.prefix, self.rules, self.recursive
        kept: list[tuple[bytes, ObjectInfo, bool]] = []
        try:
            async for page in self.store.list_pages(prefix):
                for obj in page:
                    rel = _placed(obj.key, prefix, rules, recursive)
                    if rel is not None:
                        kept.append((rel, obj, rules.skips(rel.rpartition(b"/")[2], rel)))
                    else:
                        self._own_key(obj)
                if on_chunk is not None:
                    on_chunk(len(kept))
        except OSError as exc:
            raise _unlisted(exc) from None
        records, walk = ready_objects(kept, ready, cutoff_ns=cutoff, now_ns=now_ns)
        self.walked = walk
        self.left_unsettled = []
        self.last = ScanInfo.after(began, len(records), 0, 0, walk)
        return records

    def _take(
        self,
        page: Sequence[ObjectInfo],
        cutoff: int | None,
        now_ns: int,
        records: list[bytes],
        unsettled: int,
        future: int,
        left: list[bytes],
    ) -> tuple[int, int]:
        """Add a page's settled objects to ``records``; count the others (returned), their
        records to ``left``."""
        prefix, rules, recursive = self.url.prefix, self.rules, self.recursive
        # Ahead of this host's clock: later than the clock read now, once the page came (an
        # object uploaded while the listing is under way is later than its start only).
        clock_ns = max(now_ns, time.time_ns())
        for obj in page:
            rel = _relpath(obj.key, prefix, rules, recursive)
            if rel is None:
                self._own_key(obj)
                continue
            if cutoff is not None and obj.mtime_ns > cutoff:
                unsettled += 1
                future += obj.mtime_ns > clock_ns
                left.append(pack(obj.mtime_ns, rel, obj.size, obj.tag, obj.mtime_ns))
                continue
            records.append(pack(obj.mtime_ns, rel, obj.size, obj.tag, obj.mtime_ns))
        return unsettled, future

    def _own_key(self, obj: ObjectInfo) -> None:
        """Say (once) an object that holds bytes under the key of the prefix itself
        (``in/``; ``/`` for a bucket): obstore lists it without its ``/`` and cannot read it,
        and it is not an input (as a directory is none of its own files)."""
        own = self.url.prefix or "/"
        if not obj.size or obj.key != own[:-1] or own in self._refused:
            return
        self._refused.add(own)
        log.warning(
            "the object s3://%s/%s (%d bytes) has the key of the source's prefix itself, which "
            "the S3 client (obstore) cannot read: not an input; rename the object to have it "
            "handled",
            self.url.bucket,
            own,
            obj.size,
        )

    async def list_names(self) -> list[bytes]:
        """Not for objects: a listing costs what a scan costs (the claimer lists whole)."""
        raise ValueError("an object-store source has no cheaper listing: use scan()")

    async def unchanged(self) -> bool:
        """Never known without a listing: ``False``."""
        return False

    async def look(self, relpaths: Sequence[bytes]) -> tuple[list[bytes], bool]:
        """The records a listing would give for these relpaths (one ``HEAD`` each), sorted;
        never a directory (``False``)."""
        found = await self.look_at(relpaths)
        return found.records, found.walked_dir

    async def look_at(self, relpaths: Sequence[bytes]) -> Look:
        """:meth:`look`, with what the job's rules beyond ``age`` find (see
        :class:`~asyncbatch._scanner.Look`): a marker looked at brings its file with it, a
        file its markers (one ``HEAD`` each, a directory marker once per look); a directory
        marker's arrival says its prefix needs a listing (``walked_dir``)."""
        from .ready import look_objects

        ready = self._rules
        if ready is None:
            records: list[bytes] = []
            for rel in relpaths:
                obj = await self._head(rel)
                if obj is not None:
                    records.append(pack(obj.mtime_ns, rel, obj.size, obj.tag, obj.mtime_ns))
            records.sort()
            return Look(records, False, {}, [])
        return await look_objects(relpaths, ready, self._head, time.time_ns())

    async def object_at(self, rel: bytes) -> ObjectInfo | None:
        """The object at ``rel`` now if a listing would keep it, as an input or (with rules
        beyond ``age``) as a marker (one ``HEAD``), else ``None``."""
        return await self._head(rel)

    async def _head(self, rel: bytes) -> ObjectInfo | None:
        """The object at ``rel`` if a listing would keep it, as an input or (with rules) as a
        marker (one ``HEAD``), else ``None``."""
        key = self.url.key(rel.decode(errors="surrogateescape"))
        placed = _placed(key, self.url.prefix, self.rules, self.recursive)
        if placed is None:
            return None
        name = placed.rpartition(b"/")[2]
        ready = self._rules
        if self.rules.skips(name, placed) and (ready is None or not ready.marks(name)):
            return None
        try:
            return await self.store.head(key)
        except ObjectKeyRefused as exc:  # a notified key: never an input, said once
            if key not in self._refused:
                self._refused.add(key)
                log.warning("%s; skipped: rename the object or move it out of the prefix", exc)
            return None


async def holds_objects(
    store: ObjectStore,
    url: ObjectURL,
    prefix: bytes,
    rules: ScanRules,
    ready: Readiness,
    *,
    recursive: bool,
) -> bool:
    """Whether the "directory" ``prefix`` (a relpath; ``b""``: the source) holds an input (under
    it too, when ``recursive``): an object a listing would keep, a marker aside. Stops at the
    first page that holds one. Raises ``OSError`` when the prefix cannot be listed."""
    top = url.key(prefix.decode(errors="surrogateescape") + "/") if prefix else url.prefix
    async for page in store.list_pages(top):
        for obj in page:
            rel = _relpath(obj.key, url.prefix, rules, recursive)
            if rel is not None and not ready.marks(rel.rpartition(b"/")[2]):
                return True
    return False


#: S3's error codes of a request whose credentials the store refuses (not a permission).
_CREDENTIALS = re.compile(
    r"\b(?:InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|InvalidToken|"
    r"TokenRefreshRequired|InvalidSecurity)\b"
)


async def check_places(
    stores: ObjectStores, places: Sequence[tuple[str, str, ObjectURL, bool]], *, watching: bool
) -> None:
    """Look at each ``s3://`` place a run uses before it makes or joins its state (one
    listing request each, of at most a page): ``places`` holds ``(setting, value as given,
    url, is_source)``.

    - A bucket that does not exist: :class:`ConfigurationError` naming the setting and value
      (exit 2; a mistyped local directory is refused so too).
    - The store unreachable, or the credentials refused: :class:`SourceError` (exit 69), as
      a source that cannot be listed is; a watch, which waits for its source, goes on.
    - The source's listing refused otherwise (``403``): :class:`SourceError`, as its listing
      would be. An output or archive place's (a principal may write without listing) and a
      key the client cannot represent (the listing says it) go on.
    """
    for name, given, url, is_source in places:
        store = stores.bucket(url.bucket)
        try:
            await store.first_page(url.prefix)
        except BucketMissing:
            raise ConfigurationError.bad_value(
                name, given, f"the bucket {url.bucket!r} does not exist (a mistyped one?)"
            ) from None
        except ObjectKeyRefused:
            continue
        except OSError as exc:
            if watching:
                continue
            what = "the source" if is_source else f"{name} {given}"
            if is_source or isinstance(exc, StoreUnreachable) or _CREDENTIALS.search(str(exc)):
                raise SourceError(f"cannot list {what}: {exc}") from None


class ObjectSource:
    """The run's handle on an object-store source (the counterpart of ``SourceDir``): a
    bucket is never replaced nor reopened, and has no change events to follow."""

    #: Whether change events can be followed (inotify: a directory's only).
    watchable = False

    def __init__(self, url: ObjectURL, stores: ObjectStores) -> None:
        self.url = url
        self.stores = stores
        self.store = stores.bucket(url.bucket)
        #: Why the source cannot be listed now: set by a watch whose listing failed, until
        #: one succeeds (health says so meanwhile); a run's failed listing raises instead.
        self.problem: str | None = None
        #: Never reopened (see ``SourceHandle``).
        self.reopened = 0

    @property
    def usable(self) -> bool:
        """Always: the next listing is the only way to know whether it works again."""
        return True

    @property
    def fd(self) -> int:
        """No descriptor: -1."""
        return -1

    def open(self) -> None:
        """Nothing to open."""

    def close(self) -> None:
        """Nothing to close."""

    def refresh(self) -> bool:
        """A bucket is never replaced: ``False``."""
        return False


class ObjectEntry(Entry):
    """``ctx.entry`` of an object: ``relpath`` (the key under the source's prefix), ``size``,
    ``mtime_ns`` (LastModified), ``inode`` (its version tag) and ``url``. An object has no
    local ``path``: reading it is ``ctx.read_bytes()`` or ``ctx.open()``."""

    __slots__ = ("_url",)

    def __init__(self, url: ObjectURL, relpath: str, size: int, mtime_ns: int, inode: int) -> None:
        super().__init__(_NO_BASE, relpath, size, mtime_ns, inode)
        self._url = url

    @property
    def url(self) -> str:
        """``s3://BUCKET/KEY`` of the object."""
        return f"s3://{self._url.bucket}/{self._url.key(self.relpath)}"

    @property
    def path(self) -> Path:
        """Raises :class:`ConfigurationError`: an object has no local path."""
        raise ConfigurationError(
            f"{self.url} is an object, not a file: it has no local path (read it with "
            "ctx.read_bytes() or ctx.open(); its location is ctx.entry.url)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObjectEntry):
            return NotImplemented
        return (self.url, self.size, self.mtime_ns, self.inode) == (
            other.url,
            other.size,
            other.mtime_ns,
            other.inode,
        )

    def __hash__(self) -> int:
        return hash((self.url, self.size, self.mtime_ns, self.inode))

    def __repr__(self) -> str:
        return (
            f"ObjectEntry(url={self.url!r}, relpath={self.relpath!r}, size={self.size}, "
            f"mtime_ns={self.mtime_ns}, inode={self.inode})"
        )


class ObjectInput:
    """The object an attempt reads: the response of the ``GET`` that opened it (its body
    not read yet), and its ETag, which any further read asks for (``If-Match``)."""

    __slots__ = ("_result", "info", "key", "store")

    def __init__(self, store: ObjectStore, key: str, info: ObjectInfo, result: GetResult) -> None:
        self.store = store
        self.key = key
        self.info = info
        self._result: GetResult | None = result

    @property
    def size(self) -> int:
        """The object's size in bytes."""
        return self.info.size

    def changed(self, taken_away: Callable[[os.stat_result], bool] | None = None) -> str | None:
        """Never: one ``GET`` reads one version, and every further one asks for it."""
        return None

    async def _response(self) -> GetResult:
        """The opening response once; a fresh ``GET`` of the same version after that."""
        result, self._result = self._result, None
        if result is None:
            try:
                result = await self.store.get(self.key, etag=self.info.etag)
            except ObjectPreconditionFailed:
                raise ObjectReplaced(
                    f"the object s3://{self.store.bucket}/{self.key} was replaced while it "
                    "was handled"
                ) from None
        return result

    async def read_all(self) -> bytes:
        """The object's content. Raises :class:`InputChangedError` when the bytes that came
        are not its size. A body cut short by the store's outage is read again (the same
        version) once the store is back (see :class:`~.store.ObjectStores`)."""
        tries = 0
        while True:
            result = await self._response()
            try:
                data = bytes(await result.bytes_async())
                break
            except Exception as exc:
                if not unreachable(exc):
                    raise
                tries += 1
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                await self.store.wait_out(
                    StoreUnreachable(
                        f"get s3://{self.store.bucket}/{self.key} failed while its body was "
                        f"read: {redact_urls(first)[:300]}"
                    ),
                    tries,
                )
        if len(data) != self.info.size:
            raise InputChangedError(
                f"the object's body was {len(data)} bytes, not {self.info.size}"
            )
        return data

    async def reader(self) -> ObjectReader:
        """A streaming reader of the content (``READ_CHUNK`` bytes held at most)."""
        return ObjectReader((await self._response()).stream(min_chunk_size=READ_CHUNK))


class ObjectReader:
    """Reads an object's body as it streams in: ``await read(n)``, ``await readline()``,
    ``async for line in reader``; at most a chunk (and what a caller asked for) in memory."""

    def __init__(self, stream: BytesStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        """One more chunk into the buffer; ``False`` at the end of the body."""
        if self._eof:
            return False
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left with ``-1``); ``b""`` at the end."""
        while (size < 0 or len(self._buffer) < size) and await self._fill():
            pass
        n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def readline(self) -> bytes:
        """The next line, its ``\\n`` included (``b""`` at the end)."""
        while (end := self._buffer.find(b"\n")) < 0 and await self._fill():
            pass
        n = len(self._buffer) if end < 0 else end + 1
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def __aiter__(self) -> ObjectReader:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    async def __aenter__(self) -> ObjectReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._eof = True
        self._buffer.clear()


#: Where a listing of a whole bucket starts to reach its keys that start with ``/`` first
#: (S3's start-after; obstore cannot send a ``/`` of its own there): after every key that
#: starts with ``.``, the greatest character below ``/``.
_BEFORE_SLASHED = ".\U0010ffff"


async def unreadable_key(
    stores: ObjectStores, url: ObjectURL, relpath: str, tag: int
) -> str | None:
    """Why the object listed as ``relpath`` (its version tag ``tag``) cannot be read, when a
    ``GET`` of its key found no object or another one: its key as the bucket has it ends with
    ``/`` (a "folder" key that holds bytes) or starts with ``/``, and obstore, which lists
    such a key without that ``/``, reads (and would copy or delete) the key without it. One
    listing request (two for a whole bucket); ``None`` when the object is not found so
    (gone, replaced) or the listing fails."""
    store = stores.bucket(url.bucket)
    key = url.key(relpath)
    try:
        if any(o.key == key and o.tag == tag for o in await store.first_page(key)):
            said = f"s3://{url.bucket}/{key}/ has a key ending with '/'"
        elif url.prefix or not await _slashed(store, key, tag):
            return None
        else:
            said = f"s3://{url.bucket}//{key} has a key starting with '/'"
    except OSError:
        return None
    return (
        f"the object {said}, which the S3 client (obstore) cannot read: it reads {key!r} "
        "instead; not handled (nothing read, moved or deleted): rename the object to have it "
        "handled"
    )


async def _slashed(store: ObjectStore, key: str, tag: int) -> bool:
    """Whether the bucket holds ``/`` + ``key`` at version ``tag``: the first page of the keys
    that start with ``/`` (they come first after :data:`_BEFORE_SLASHED`, listed without
    their ``/``, in order) holds it before any greater key."""
    for obj in await store.first_page("", offset=_BEFORE_SLASHED):
        if obj.key > key:
            return False
        if obj.key == key and obj.tag == tag:
            return True
    return False


async def open_object(
    stores: ObjectStores, url: ObjectURL, relpath: str, tag: int | None
) -> ObjectInput:
    """Start reading the object ``relpath`` under ``url``: one ``GET``. With ``tag`` (the
    version claimed: its :func:`~.store.version_tag`), a response of another version raises
    :class:`ObjectReplaced` before any of its body is read. Raises
    :class:`~.store.ObjectMissing` when there is no such object."""
    store = stores.bucket(url.bucket)
    key = url.key(relpath)
    result = await store.get(key)
    info = ObjectInfo.of(result.meta)
    if tag is not None and info.tag != tag:
        raise ObjectReplaced(
            "the object was replaced after it was listed; the new version is a new item"
        )
    return ObjectInput(store, key, info, result)
