"""List the settled files of a directory: ``os.scandir`` in a worker thread, a chunk per hop.

A scan yields *records*: one compact ``bytes`` per regular file,

    mtime (8 bytes, big-endian, offset so negatives sort first) | relpath | NUL | size | inode
    | ctime

so that sorting the records sorts by ``(mtime_ns, relpath)`` byte-wise, a million entries take
tens of megabytes rather than the ~900 B of a ``DirEntry``, and no ``DirEntry`` outlives its
chunk. Names stay bytes end to end: a non-UTF-8 name round-trips.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import anyio.to_thread

from ._ready import Readiness, ReadyWalk

__all__ = [
    "DEFAULT_SKIP_SUFFIXES",
    "NS_MAX",
    "NS_MIN",
    "PATH_MAX",
    "Entry",
    "Look",
    "ScanInfo",
    "ScanRules",
    "Scanner",
    "clamp_ns",
    "content_digest",
    "entry_stat",
    "name_key",
    "open_regular",
    "pack",
    "ready_ns",
    "split",
    "unpack",
    "unpack_item",
]

log = logging.getLogger("asyncbatch.scanner")

#: Names ending with these are partial or temporary and are never handled.
DEFAULT_SKIP_SUFFIXES: tuple[bytes, ...] = (b".tmp", b"~", b".swp", b".part", b".crdownload")

_OFFSET = 1 << 63
_HEAD = struct.Struct(">Q")
_TAIL = struct.Struct(">QQQ")
_INODE = struct.Struct(">Q")
#: The signed 64-bit range of nanosecond times (1677 to 2262) that a record, the ledger's
#: integer columns and an item's key hold. A time outside it (``touch -d 2300-01-01``) is
#: clamped to it (see :func:`clamp_ns`): a file from after 2262 is never settled.
NS_MIN = -(1 << 63)
NS_MAX = (1 << 63) - 1
#: Directory entries examined per thread hop.
CHUNK = 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Paths at least this long cannot be opened (Linux PATH_MAX): such entries are skipped.
PATH_MAX = 4096


class Entry:
    """One settled regular file, as the scan saw it (read-only).

    ``relpath`` uses ``/`` separators and is decoded with ``surrogateescape``, so
    ``os.fsencode(relpath)`` gives back the exact bytes of a non-UTF-8 name. ``path`` is the
    file's location: under the source, or where ``ctx.move`` put it (in this attempt, or
    before a crash).
    """

    # Private slots behind read-only properties: plain stores in __init__, once per item.
    __slots__ = ("_base", "_inode", "_moved", "_mtime_ns", "_path", "_relpath", "_size")

    def __init__(
        self,
        base: Path,
        relpath: str,
        size: int,
        mtime_ns: int,
        inode: int,
        *,
        path: Path | None = None,
    ) -> None:
        self._base = base
        self._relpath = relpath
        self._size = size
        self._mtime_ns = mtime_ns
        self._inode = inode
        self._path = path
        #: Whether ``path`` was given: the file is not under the source (``ctx.move``).
        self._moved = path is not None

    @property
    def relpath(self) -> str:
        """The path relative to the source, ``/``-separated."""
        return self._relpath

    @property
    def size(self) -> int:
        """The size in bytes, as the scan (or the open, for identity ``path``) saw it."""
        return self._size

    @property
    def mtime_ns(self) -> int:
        """The modification time in nanoseconds."""
        return self._mtime_ns

    @property
    def inode(self) -> int:
        """The inode number."""
        return self._inode

    @property
    def path(self) -> Path:
        """The file's path (built on first use: most handlers never need a ``Path``)."""
        if self._path is None:
            self._path = self._base / self._relpath
        return self._path

    def moved_to(self, path: Path) -> Entry:
        """This entry, its file moved to ``path`` (by ``ctx.move``)."""
        return Entry(self._base, self._relpath, self._size, self._mtime_ns, self._inode, path=path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.path, self.relpath, self.size, self.mtime_ns, self.inode) == (
            other.path,
            other.relpath,
            other.size,
            other.mtime_ns,
            other.inode,
        )

    def __hash__(self) -> int:
        return hash((self.relpath, self.size, self.mtime_ns, self.inode))

    def __repr__(self) -> str:
        return (
            f"Entry(path={str(self.path)!r}, relpath={self.relpath!r}, size={self.size}, "
            f"mtime_ns={self.mtime_ns}, inode={self.inode})"
        )


def clamp_ns(ns: int) -> int:
    """A file time in nanoseconds, clamped to the range a record and the ledger hold
    (:data:`NS_MIN` to :data:`NS_MAX`). The scan, the open and the post-commit actions compare
    clamped times, so a file from after 2262 is the same file to all of them."""
    return NS_MIN if ns < NS_MIN else NS_MAX if ns > NS_MAX else ns


def entry_stat(path: str | os.PathLike[str], *, follow_symlinks: bool) -> os.stat_result | None:
    """What a scan records of the name ``path`` now: the entry's own stat, or, for a symlink a
    job follows (``follow_symlinks``), the stat of the file it leads to (``None`` when it leads
    to nothing now). Raises ``FileNotFoundError`` when nothing has the name (and what ``lstat``
    raises)."""
    st = os.lstat(path)
    if follow_symlinks and stat.S_ISLNK(st.st_mode):
        try:
            return os.stat(path)
        except OSError:
            return None
    return st


def pack(mtime_ns: int, relpath: bytes, size: int, inode: int, ctime_ns: int = 0) -> bytes:
    """Encode one scanned file as a record that sorts by ``(mtime_ns, relpath)``.

    The times are clamped (:func:`clamp_ns`). ``ctime_ns`` 0 means unknown (an item rebuilt
    from the ledger, which does not keep it)."""
    return (
        _HEAD.pack(clamp_ns(mtime_ns) + _OFFSET)
        + relpath
        + b"\0"
        + _TAIL.pack(size, inode, clamp_ns(ctime_ns) + _OFFSET)
    )


def unpack(record: bytes) -> tuple[int, bytes, int, int]:
    """Decode a record into ``(mtime_ns, relpath, size, inode)``."""
    size, inode, _ = _TAIL.unpack_from(record, len(record) - 24)
    return _HEAD.unpack_from(record)[0] - _OFFSET, record[8:-25], size, inode


def unpack_item(record: bytes) -> tuple[int, bytes, int, int, int]:
    """Decode a record into ``(mtime_ns, relpath, size, inode, ctime_ns)`` (one unpack of its
    tail: the claim does this once per item); ``ctime_ns`` 0: unknown, a record rebuilt from
    the ledger."""
    size, inode, ctime = _TAIL.unpack_from(record, len(record) - 24)
    return _HEAD.unpack_from(record)[0] - _OFFSET, record[8:-25], size, inode, ctime - _OFFSET


def ready_ns(record: bytes) -> int:
    """When the file of a record last changed: the later of its mtime and its ctime.

    A copier that keeps the source's times sets the mtime *back* while it writes, but every
    write (and the ``utime`` itself) sets the ctime to now, and nothing can set it back: a
    file is settled only once both are old."""
    mtime: int = _HEAD.unpack_from(record)[0]
    ctime: int = _INODE.unpack_from(record, len(record) - 8)[0]
    return max(mtime, ctime) - _OFFSET


def name_key(record: bytes) -> bytes:
    """``relpath | NUL | inode`` of a record: what :meth:`Scanner.list_names` lists."""
    return record[8:-24] + record[-16:-8]


def split(record: bytes) -> tuple[bytes, bytes]:
    """``(relpath, signature)``: the signature changes when mtime, ctime, size or inode
    change (a write sets the ctime, even when the writer sets the mtime back)."""
    return record[8:-25], record[:8] + record[-24:]


def _path_regex(pattern: str) -> str:
    """The regular expression of an ``ignore`` glob with a ``/``, matched against a relpath:
    its leading and trailing ``/`` dropped, ``*`` matching ``/`` too, and a ``**/`` (at its
    start, or after a ``/``) matching no directory as well as any (``**/*.bak`` matches
    ``a.bak`` too, ``logs/**/old`` ``logs/old``)."""
    globs = [""]
    parts: list[str] = []
    for part in pattern.strip("/").split("/"):
        if not (part == "**" and parts and parts[-1] == "**"):  # "**/**" is "**": not 2^n
            parts.append(part)
    for i, part in enumerate(parts):
        more = [g + "/" + part if g else part for g in globs]
        # A "**" but the last (which is "*": what is under, at any depth) may be no directory.
        globs = more + globs if part == "**" and i < len(parts) - 1 else more
    return "|".join(fnmatch.translate(g) for g in dict.fromkeys(globs))


def _directory_name(pattern: str) -> str | None:
    """The name glob of an ``ignore`` glob whose only ``/`` ends it (``old/``, ``cache*/``):
    directories of that name anywhere, as in ``.gitignore``; ``None`` for other globs."""
    name = pattern.rstrip("/")
    return name if name and name != pattern and "/" not in name else None


class ScanRules:
    """Which names the scanner skips: temporary and hidden names, plus ``ignore`` globs.

    A glob without ``/`` matches a file or directory *name* anywhere; one whose only ``/``
    ends it (``old/``) matches a *directory* name anywhere (as in ``.gitignore``); a glob with
    another ``/`` matches the path relative to the source. Ignored directories are not
    descended into.
    """

    def __init__(self, ignore: Sequence[str] = ()) -> None:
        self.ignore = tuple(ignore)
        names = [fnmatch.translate(p) for p in ignore if "/" not in p]
        directories = [fnmatch.translate(d) for p in ignore if (d := _directory_name(p))]
        paths = [_path_regex(p) for p in ignore if "/" in p and _directory_name(p) is None]
        self._names = re.compile("|".join(names)) if names else None
        self._directories = re.compile("|".join(directories)) if directories else None
        self._paths = re.compile("|".join(paths)) if paths else None

    def skips(self, name: bytes, relpath: bytes, *, is_dir: bool = False) -> bool:
        """Whether an entry with this name and relative path is never handled."""
        if name.startswith(b"."):
            return True
        if not is_dir and name.endswith(DEFAULT_SKIP_SUFFIXES):
            return True
        if self._names is None and self._paths is None and self._directories is None:
            return False
        if self._names is not None and self._names.match(os.fsdecode(name)):
            return True
        if is_dir and self._directories is not None and self._directories.match(os.fsdecode(name)):
            return True
        return self._paths is not None and bool(self._paths.match(os.fsdecode(relpath)))

    def skip_reason(self, name: bytes, relpath: bytes, *, is_dir: bool = False) -> str | None:
        """Why :meth:`skips` skips this entry (the rule, in words), or ``None`` if it does not.

        The same rules as :meth:`skips`, which stays the scan's fast test; this one is for
        ``asyncbatch explain``, and names the ``ignore`` pattern that matched.
        """
        what = "directory" if is_dir else "name"
        if name.startswith(b"."):
            return f"hidden {what} {os.fsdecode(name)!r} (starts with '.')"
        if not is_dir:
            for suffix in DEFAULT_SKIP_SUFFIXES:
                if name.endswith(suffix):
                    return (
                        f"temporary name {os.fsdecode(name)!r} (ends with "
                        f"{os.fsdecode(suffix)!r}: a partial or temporary file)"
                    )
        for pattern in self.ignore:
            if (directory := _directory_name(pattern)) is not None:
                matched = is_dir and re.match(fnmatch.translate(directory), os.fsdecode(name))
            elif "/" in pattern:
                matched = re.match(_path_regex(pattern), os.fsdecode(relpath))
            else:
                matched = re.match(fnmatch.translate(pattern), os.fsdecode(name))
            if matched:
                return f"{what} {os.fsdecode(relpath)!r} matches the ignore pattern {pattern!r}"
        return None

    def hidden_because(self, relpath: bytes, *, recursive: bool, is_dir: bool) -> str | None:
        """Why a path under the source is out of the scanner's sight, or ``None`` if it is not:
        in a subdirectory of a scan that is not recursive, or a skipped name (see
        :meth:`skip_reason`) for the entry or one of the directories above it."""
        parts = relpath.split(b"/")
        if not recursive and (is_dir or len(parts) > 1):
            where = "a directory" if is_dir else "in a subdirectory"
            return f"{where} of the source, and the scan is not recursive (--recursive)"
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            why = self.skip_reason(part, b"/".join(parts[: i + 1]), is_dir=is_dir or not last)
            if why is not None:
                return why
        return None

    def hides(self, relpath: bytes, *, recursive: bool, is_dir: bool) -> bool:
        """Whether a path under the source is out of the scanner's sight.

        Used to refuse a state file, an output or an archive directory the scan would pick up.
        """
        return self.hidden_because(relpath, recursive=recursive, is_dir=is_dir) is not None


def open_regular(
    dir_fd: int | None, relpath: bytes, *, follow_symlinks: bool = False
) -> tuple[int, os.stat_result]:
    """Open a file for reading without following a final symlink or blocking on a FIFO.

    Returns the fd and its ``fstat``. Raises ``FileNotFoundError`` when it vanished and
    ``OSError`` when it is not a regular file any more (a FIFO is never waited on).
    """
    flags = _OPEN_FLAGS & ~os.O_NOFOLLOW if follow_symlinks else _OPEN_FLAGS
    fd = os.open(relpath, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file any more: {os.fsdecode(relpath)!r}")
        # O_NONBLOCK only mattered for the open (a FIFO); it has no effect on regular files.
    except BaseException:
        os.close(fd)
        raise
    return fd, st


#: What an open of a scanned file fails with when it was replaced by something that is not a
#: regular file (a symlink not followed, a FIFO, a directory): changed since the scan.
_CHANGED_ERRNOS: Final = frozenset({errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK})


def content_digest(
    dir_fd: int, relpath: bytes, size: int, mtime_ns: int, *, follow_symlinks: bool = False
) -> bytes | None:
    """sha256 of a file's bytes, or ``None`` when it vanished or changed since it was scanned
    (gone, not a regular file any more, another size or mtime).

    Raises ``OSError`` when it is there and cannot be read (``EACCES``, ``EIO``, ...): it did
    not vanish, and must not be counted as if it had."""
    try:
        fd, st = open_regular(dir_fd, relpath, follow_symlinks=follow_symlinks)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno is None or e.errno in _CHANGED_ERRNOS:
            return None  # not a regular file any more (open_regular), a symlink now
        raise
    try:
        if st.st_size != size or clamp_ns(st.st_mtime_ns) != mtime_ns:
            return None
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
        return h.digest()
    finally:
        os.close(fd)


class _Warned:
    """The problems of directories and paths that walks warned about, kept by a
    :class:`Scanner` across its walks: a watch walks the same tree at every poll, and says
    each problem once while it lasts (and once more if it ends and comes back), not once a
    poll. A walk that did not look where a problem is (a listing of names stats no file: it
    cannot find a directory that can be listed but not searched) keeps it as it was."""

    __slots__ = ("_said", "_seen")

    #: Problems a listing of names (no ``stat``) cannot find.
    NEEDS_STAT = frozenset({"search"})

    def __init__(self) -> None:
        self._said: set[tuple[str, bytes]] = set()
        self._seen: set[tuple[str, bytes]] = set()

    def first(self, kind: str, rel: bytes) -> bool:
        """Note the problem ``kind`` at ``rel`` in this walk; whether to warn about it (the
        last walks did not)."""
        key = (kind, rel)
        self._seen.add(key)
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def walk_ended(self, *, names_only: bool) -> None:
        """A walk of the whole tree ended: the problems it did not find again are over."""
        kept = {k for k in self._said if k[0] in self.NEEDS_STAT} if names_only else set()
        self._said, self._seen = self._seen | kept, set()


def _entries(
    it: Iterator[os.DirEntry[bytes]], prefix: bytes, warned: _Warned
) -> Iterator[os.DirEntry[bytes]]:
    """The entries of a listing; one that fails half-way ends with a warning, not an error
    (the source itself, ``prefix`` empty, raises)."""
    try:
        yield from it
    except OSError as e:
        if not prefix:
            raise
        if warned.first("end", prefix):
            log.warning("cannot list directory %r to its end: %s", os.fsdecode(prefix), e.strerror)


@dataclass(frozen=True, slots=True)
class _Walk:
    root: bytes
    rules: ScanRules
    recursive: bool
    follow_symlinks: bool
    settled_before_ns: int | None  # None: every regular file, settled or not
    now_ns: int = 0  # when the scan began (the wall clock)
    names_only: bool = False  # name keys (relpath and inode, no stat), symlinks left out
    ready: Readiness | None = None  # rules beyond the default age rule (markers, sizes...)
    #: What the walks of its scanner warned about (a walk of its own when not given).
    warned: _Warned = dataclasses.field(default_factory=_Warned)


@dataclass(slots=True)
class _Tally:
    """What one walk left out, counted by the walking thread (made per scan)."""

    #: Regular files not settled yet: changed (mtime or ctime) after the cutoff.
    unsettled: int = 0
    #: Of those, the ones whose mtime or ctime is later than this host's clock read after
    #: their stat (a clock ahead, a ``touch -d`` into the future): they will not settle
    #: before then. (A file written while the scan is under way is later than its start,
    #: not than the clock: not counted.)
    future: int = 0
    #: The change times later than the scan's start not yet compared with the clock (see
    #: :meth:`count_ahead`: once a chunk, not once a file).
    ahead: list[int] = dataclasses.field(default_factory=list)
    #: Their records: the run asks the ledger which of them it has finished already (a done
    #: file whose ctime alone changed, by a ``chmod`` or a ``touch -d``, keeps its key: it is
    #: done, not waiting to settle). Kept by a one-shot run's scan only (with a cutoff).
    left: list[bytes] = dataclasses.field(default_factory=list)
    #: The directories below the source that could not be listed, or whose entries could not
    #: be looked at (relpaths): the files in them are in no count, and not handled.
    unlisted: set[bytes] = dataclasses.field(default_factory=set)

    def count_ahead(self, now_ns: int) -> None:
        """Count in :attr:`future` the change times noted in :attr:`ahead` that are later
        than ``now_ns`` (the clock, read after their stats)."""
        self.future += sum(changed > now_ns for changed in self.ahead)
        self.ahead.clear()


def _clock_after(tally: _Tally | None, rw: ReadyWalk | None) -> None:
    """Compare the change times later than the scan's start noted since the last call with
    this host's clock, read now (after their stats): one clock read a chunk, only when some
    were noted. A file written while the scan is under way is not ahead of the clock."""
    if (tally is None or not tally.ahead) and (rw is None or not rw.ahead):
        return
    now_ns = time.time_ns()
    if tally is not None:
        tally.count_ahead(now_ns)
    if rw is not None:
        rw.count_ahead(now_ns)


def _walk(
    w: _Walk, tally: _Tally | None = None, rw: ReadyWalk | None = None
) -> Generator[list[bytes], None, None]:
    """Yield chunks of records; runs in a worker thread, one ``next()`` per hop. Files not
    settled are left out and counted in ``tally``; with ``rw``, the job's rules beyond the
    default one decide (see :class:`~asyncbatch._ready.ReadyWalk`)."""
    root_fd = os.open(w.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        root = os.fstat(root_fd)
        walker = _Walker(w, tally, root) if rw is None else _RulesWalker(w, tally, root, rw)
        out: list[bytes] = []
        examined = 0
        while walker.stack:
            prefix = walker.stack.pop()
            it = walker.listing(prefix)
            if it is None:
                continue
            with it:
                for de in _entries(it, prefix, w.warned):
                    examined += 1
                    if examined % CHUNK == 0:
                        _clock_after(tally, rw)
                        yield out
                        out = []
                    record = walker.visit(de, prefix + b"/" + de.name if prefix else de.name)
                    if record is not None:
                        out.append(record)
            out.extend(walker.left(prefix))
        if rw is not None:
            rw.end()
        w.warned.walk_ended(names_only=w.names_only)
        _clock_after(tally, rw)
        yield out
    finally:
        os.close(root_fd)


class _Walker:
    """What one walk of the source keeps: the directories still to list, those listed (a
    symlink loop is walked once), and how it judges each entry (in the walking thread)."""

    __slots__ = ("_real_root", "_tally", "_visited", "_w", "stack")

    def __init__(self, w: _Walk, tally: _Tally | None, root: os.stat_result) -> None:
        self._w = w
        self._tally = tally
        self._real_root = os.path.realpath(w.root)
        self._visited = {(root.st_dev, root.st_ino)}
        #: Directories to list, as relpaths (``b""``: the source itself).
        self.stack: list[bytes] = [b""]

    def listing(self, prefix: bytes) -> os._ScandirIterator[bytes] | None:
        """A ``scandir`` of the directory ``prefix``, or ``None`` when it is gone or cannot
        be listed (a warning; the source itself raises)."""
        w = self._w
        try:
            return os.scandir(os.path.join(w.root, prefix) if prefix else w.root)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if not prefix:
                raise
            if w.warned.first("list", prefix):
                log.warning("cannot list directory %r: %s", os.fsdecode(prefix), e.strerror)
            if self._tally is not None:
                self._tally.unlisted.add(prefix)
            return None

    def left(self, prefix: bytes) -> Sequence[bytes]:
        """The records held back until the listing of ``prefix`` ended (none here)."""
        return ()

    def visit(self, de: os.DirEntry[bytes], rel: bytes) -> bytes | None:
        """The record of one directory entry (``rel``: its relpath), or ``None`` when it is
        not a file a scan lists; a directory to walk goes on :attr:`stack`."""
        w = self._w
        if len(w.root) + len(rel) >= PATH_MAX - 1:
            self._too_long(rel)
            return None
        name = de.name
        try:
            if de.is_symlink():
                st = self._followed(de, name, rel)
            elif de.is_dir(follow_symlinks=False):
                if w.recursive and not w.rules.skips(name, rel, is_dir=True):
                    self.stack.append(rel)
                return None
            elif de.is_file(follow_symlinks=False):
                if w.rules.skips(name, rel):
                    return None
                if w.names_only:  # d_ino comes with the listing: no stat
                    return rel + b"\0" + _INODE.pack(de.inode())
                st = de.stat(follow_symlinks=False)
            else:
                return None  # FIFO, socket, device: never opened
        except PermissionError as e:  # a directory that can be listed but not searched
            if not de.is_symlink():  # (a link's target may be in another one: not this)
                self._cannot_look(rel.rpartition(b"/")[0], e)
            return None
        except OSError:
            return None  # vanished between listing and stat
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return self._record(rel, st)

    def _too_long(self, rel: bytes) -> None:
        """Say once (while it lasts) that ``rel`` is skipped, its path too long to open."""
        if self._w.warned.first("long", rel):
            log.warning(
                "skipped %r: its path is longer than the system allows (%d bytes)",
                os.fsdecode(rel),
                PATH_MAX,
            )

    def _cannot_look(self, directory: bytes, error: OSError) -> None:
        """Say once (not once a file, nor once a walk while it lasts) that the entries of
        ``directory`` (a relpath) cannot be looked at (they are skipped): it was silent, the
        files left out of every count."""
        if self._tally is not None:
            self._tally.unlisted.add(directory)
        if self._w.warned.first("search", directory):
            log.warning(
                "cannot look at the files in directory %r: %s (they are skipped)",
                os.fsdecode(directory) or ".",
                error.strerror,
            )

    def _followed(self, de: os.DirEntry[bytes], name: bytes, rel: bytes) -> os.stat_result | None:
        """What a symlink leads to, when it is followed (``follow_symlinks``), stays inside the
        source, and is a file the rules keep; a directory it leads to is walked once."""
        w = self._w
        if not w.follow_symlinks or w.names_only:
            return None
        target = os.path.realpath(de.path)
        if os.path.commonpath([self._real_root, target]) != self._real_root:
            return None
        st = os.stat(de.path)
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if (
                w.recursive
                and key not in self._visited
                and not w.rules.skips(name, rel, is_dir=True)
            ):
                self._visited.add(key)
                self.stack.append(rel)
            return None
        return None if w.rules.skips(name, rel) else st  # a symlink's name, as a file

    def _record(self, rel: bytes, st: os.stat_result) -> bytes | None:
        """The record of a regular file, or ``None`` (counted) when it is not settled."""
        w = self._w
        mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
        cutoff = w.settled_before_ns
        if cutoff is not None and (mtime > cutoff or ctime > cutoff):
            if self._tally is not None:
                self._tally.unsettled += 1
                # The cutoff is `settle` before the scan began; past the start, the file's
                # time may be ahead of this host's clock, or written since the scan began:
                # the clock read at the chunk's end tells (see _clock_after).
                changed = max(mtime, ctime)
                if changed > w.now_ns:
                    self._tally.ahead.append(changed)
                self._tally.left.append(pack(mtime, rel, st.st_size, st.st_ino, ctime))
            return None
        return pack(mtime, rel, st.st_size, st.st_ino, ctime)


class _RulesWalker(_Walker):
    """A walk that applies a job's rules beyond the default age rule: markers are noted (and
    never listed), each file's verdict is :class:`~asyncbatch._ready.ReadyWalk`'s, given at
    the end of its directory's listing (its markers may come after it)."""

    __slots__ = ("_rw",)

    def __init__(self, w: _Walk, tally: _Tally | None, root: os.stat_result, rw: ReadyWalk):
        super().__init__(w, tally, root)
        self._rw = rw

    def listing(self, prefix: bytes) -> os._ScandirIterator[bytes] | None:
        it = super().listing(prefix)
        if it is None:
            self._rw.unlisted(prefix)
        else:
            self._rw.enter(prefix)
        return it

    def left(self, prefix: bytes) -> Sequence[bytes]:
        return self._rw.leave()

    def visit(self, de: os.DirEntry[bytes], rel: bytes) -> bytes | None:
        name = de.name
        rw = self._rw
        rw.saw(name)
        if rw.ready.marks(name):
            st = self._marker_stat(de)
            if st is not None:
                rw.marker(name, rel, st)
                return None
        return super().visit(de, rel)

    def _marker_stat(self, de: os.DirEntry[bytes]) -> os.stat_result | None:
        """The stat of a marker-named entry when it is a regular file (a symlink to one, only
        when followed); ``None`` otherwise."""
        try:
            if de.is_symlink():
                st = os.stat(de.path) if self._w.follow_symlinks else None
            else:
                st = de.stat(follow_symlinks=False)
        except OSError:
            return None
        return st if st is not None and stat.S_ISREG(st.st_mode) else None

    def _record(self, rel: bytes, st: os.stat_result) -> bytes | None:
        record = pack(st.st_mtime_ns, rel, st.st_size, st.st_ino, st.st_ctime_ns)
        self._rw.file(record, rel.rpartition(b"/")[2], st)
        return None  # its verdict comes with the end of the listing (see left())


def _parent_ok(w: _Walk, real_root: bytes, parent: bytes) -> bool:
    """Whether a scan would descend to the directory ``parent`` (a relpath): no symlink on the
    way unless ``follow_symlinks``, and then never outside the source."""
    real = os.path.realpath(os.path.join(w.root, parent))
    if w.follow_symlinks:
        return os.path.commonpath([real_root, real]) == real_root
    return real == os.path.join(real_root, parent)


class Look(NamedTuple):
    """What a look at some paths found (see :meth:`Scanner.look_at`): the records a scan
    would list for them, sorted; whether one of them is a directory a scan would walk, or a
    directory marker (what is in it needs a scan); for a job with rules beyond ``age``, the
    rule (not age, not stable) each listed file fails (``blocked``, by relpath) and the name
    keys of the markers looked at (a marker's file is looked at with it)."""

    records: list[bytes]
    walked_dir: bool
    blocked: dict[bytes, str]
    marker_keys: list[bytes]


def _look(w: _Walk, relpaths: Sequence[bytes]) -> Look:
    """What a scan would list for ``relpaths`` (see :class:`Look`); runs in a worker thread
    (one ``lstat`` a path, rarely a ``stat``; with markers, one more for each)."""
    looker = _Looker(w)
    for rel in relpaths if w.ready is None else w.ready.with_marked(relpaths):
        name = looker.visible(rel)
        if name is None:
            continue
        st = _stat_in(w, looker.real_root, os.path.join(w.root, rel))
        if st is not None:
            looker.take(rel, name, st)
    return looker.found


class _Looker:
    """One look at some paths (in a worker thread): the directories already checked, the
    directory markers already looked at, and what it found."""

    __slots__ = ("_dirs", "_now_ns", "_parents", "_w", "found", "real_root")

    def __init__(self, w: _Walk) -> None:
        self._w = w
        self.real_root = os.path.realpath(w.root)
        self._parents: dict[bytes, bool] = {}
        self._dirs: dict[bytes, int] = {}
        self._now_ns = time.time_ns()
        self.found = Look([], False, {}, [])

    def visible(self, rel: bytes) -> bytes | None:
        """The name of ``rel`` if a scan would look at it (a directory it walks leads there,
        and the path is not too long), else ``None``."""
        w = self._w
        parent, _, name = rel.rpartition(b"/")
        if not name or (parent and not w.recursive):
            return None
        if parent:
            ok = self._parents.get(parent)
            if ok is None:
                ok = self._parents[parent] = not w.rules.hides(
                    parent, recursive=True, is_dir=True
                ) and _parent_ok(w, self.real_root, parent)
            if not ok:
                return None
        if len(w.root) + len(rel) >= PATH_MAX - 1:  # as the scan: skipped (it warns)
            return None
        return name

    def take(self, rel: bytes, name: bytes, st: os.stat_result) -> None:
        """What a scan would make of the entry ``rel`` whose stat is ``st``."""
        w, ready, found = self._w, self._w.ready, self.found
        if stat.S_ISDIR(st.st_mode):
            if w.recursive and not w.rules.skips(name, rel, is_dir=True):
                self.found = found._replace(walked_dir=True)
        elif not stat.S_ISREG(st.st_mode):
            return
        elif ready is not None and ready.marks(name):
            found.marker_keys.append(rel + b"\0" + _INODE.pack(st.st_ino))
            if name in ready.dir_names:  # a directory marker: its files need a scan
                self.found = found._replace(walked_dir=True)
        elif not w.rules.skips(name, rel):
            found.records.append(pack(st.st_mtime_ns, rel, st.st_size, st.st_ino, st.st_ctime_ns))
            if ready is not None:
                kind = ready.looked_rule(
                    w.root, rel, st, self._dirs, self._now_ns, follow_symlinks=w.follow_symlinks
                )
                if kind:
                    found.blocked[rel] = kind


def _stat_in(w: _Walk, real_root: bytes, path: bytes) -> os.stat_result | None:
    """The stat of ``path`` as a scan sees it: a symlink only when followed and leading
    inside the source; ``None`` when it is gone, dangling, or not to be followed."""
    try:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode):
            return st
        if not w.follow_symlinks:
            return None
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            return None
        return os.stat(path)
    except OSError:
        return None


#: Seconds a directory's mtime must be old for an unchanged one to mean no name changed since.
MARK_AGE = 1.0


@dataclass(frozen=True, slots=True)
class _Mark:
    signature: tuple[int, int, int]  # inode, mtime, ctime
    trusted: bool  # the mtime at least MARK_AGE old when taken


def _mark(source: Path) -> _Mark:
    """The source directory's signature, taken now (before a listing)."""
    taken = time.time_ns()
    st = os.stat(source)
    # A name added or removed since sets the mtime to then: past an old mtime, that shows.
    old = st.st_mtime_ns < taken - MARK_AGE * 1e9
    return _Mark((st.st_ino, st.st_mtime_ns, st.st_ctime_ns), old)


class ScanInfo(NamedTuple):
    """What a finished scan took: when it ended (``time.monotonic()`` and wall clock), how
    long it took (seconds) and how many records it returned.

    In watch mode a poll that lists names only (:meth:`Scanner.list_names`) is a scan too:
    ``full`` is then false (it stat'ed no file). ``unsettled``: the regular files a scan for
    settled files left out because they changed within the settle window (``future`` of
    them: later than this host's clock read after their stat). ``not_ready``: with rules beyond the
    default, the files left out by the first rule each failed (``(kind, count)`` pairs, see
    :data:`~asyncbatch._ready.KINDS`; ``age`` is ``unsettled``).
    """

    ended: float
    ended_wall: float
    seconds: float
    files: int
    full: bool = True
    unsettled: int = 0
    future: int = 0
    not_ready: tuple[tuple[str, int], ...] = ()
    #: Directories below the source that could not be listed (their files not handled).
    unlisted: int = 0

    @classmethod
    def after(
        cls,
        began: float,
        files: int,
        unsettled: int,
        future: int,
        walk: ReadyWalk | None,
        unlisted: int = 0,
    ) -> ScanInfo:
        """A full scan that began at ``began`` (``time.monotonic()``) and ended now, with
        ``files`` records; with ``walk`` (rules beyond ``age``), its counts by rule replace
        ``unsettled`` and ``future``. ``unlisted``: directories it could not list."""
        ended = time.monotonic()
        not_ready: tuple[tuple[str, int], ...] = ()
        if walk is not None:
            unsettled, future = walk.not_ready["age"], walk.future
            not_ready = tuple((k, n) for k, n in walk.not_ready.items() if n and k != "age")
        wall = time.time()
        return cls(ended, wall, ended - began, files, True, unsettled, future, not_ready, unlisted)


class Scanner:
    """Lists a source directory off the event loop, a chunk of entries per thread hop.

    Guarantees: only regular files (no symlinks unless ``follow_symlinks``, and then never
    outside the source), no temporary or hidden names, no ignored names; every record's stat
    comes from the one ``scandir`` pass, never a second ``stat``.
    """

    def __init__(
        self,
        source: Path,
        *,
        rules: ScanRules,
        recursive: bool = False,
        follow_symlinks: bool = False,
        ready: Readiness | None = None,
    ) -> None:
        self.source = source
        self.rules = rules
        self.recursive = recursive
        self.follow_symlinks = follow_symlinks
        #: The job's readiness rules (``None``, or the default alone: the fast path).
        self.ready = ready
        #: What the last scan learnt of rules beyond the default one (markers, verdicts),
        #: ``None`` when the job has none.
        self.walked: ReadyWalk | None = None
        #: The records of the files the last scan left out as not settled yet (``age``,
        #: without rules beyond it: with them, :attr:`walked` ``left_out`` has them).
        self.left_unsettled: list[bytes] = []
        #: The last scan that finished, if any (for metrics and health).
        self.last: ScanInfo | None = None
        #: The source directory as the last scan or listing found it (see :meth:`unchanged`).
        self._mark: _Mark | None = None
        #: The problems its walks warned about (each is said once while it lasts).
        self._warned = _Warned()

    async def scan(
        self,
        *,
        settle: float | None,
        now_ns: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> list[bytes]:
        """Return the records of the files settled ``settle`` seconds before ``now_ns``: both
        their mtime and their ctime at least that old (see :func:`ready_ns`). The others are
        counted in :attr:`last` (``unsettled``).

        With rules beyond the default (:attr:`ready`), those rules decide instead (a file that
        fails one is counted in :attr:`last` by the rule; stable's looks are the caller's),
        markers are never listed, and :attr:`walked` says what the walk learnt of them.

        With ``settle=None`` every regular file is returned (with rules, :attr:`walked`
        ``blocked`` says which fail a rule but age and stable). The list is sorted by
        ``(mtime_ns, relpath)``. Raises ``OSError`` when the source itself cannot be listed.
        Sets :attr:`last`.
        """
        began = time.monotonic()
        self._mark = await anyio.to_thread.run_sync(_mark, self.source)
        if now_ns is None:
            now_ns = time.time_ns()
        cutoff = None if settle is None else now_ns - int(settle * 1e9)
        tally = _Tally()
        walk = dataclasses.replace(self._walk(cutoff), now_ns=now_ns)
        rw = None
        if walk.ready is not None:
            rw = ReadyWalk(walk.ready, cutoff_ns=cutoff, now_ns=now_ns)
        gen = _walk(walk, tally, rw)
        records: list[bytes] = []
        try:
            while (chunk := await anyio.to_thread.run_sync(next, gen, None)) is not None:
                records.extend(chunk)
                if on_chunk is not None:
                    on_chunk(len(records))
        finally:
            gen.close()
        records.sort()
        self.walked = rw
        self.left_unsettled = tally.left
        self.last = ScanInfo.after(
            began, len(records), tally.unsettled, tally.future, rw, len(tally.unlisted)
        )
        return records

    async def list_names(self) -> list[bytes]:
        """The name keys (``relpath | NUL | inode``, see :func:`name_key`) of the files a
        scan would list, from the directory listing alone: no ``stat`` (a quarter of a scan's
        cost), so a file changed in place under the same inode is not told apart.

        Not with ``follow_symlinks`` (a link's target is only known by a ``stat``): raises
        ``ValueError``. Raises ``OSError`` when the source itself cannot be listed. Sets
        :attr:`last` (``full=False``): in watch mode such a listing is a poll.
        """
        if self.follow_symlinks:
            raise ValueError("list_names() cannot follow symlinks: use scan()")
        began = time.monotonic()
        self._mark = await anyio.to_thread.run_sync(_mark, self.source)
        gen = _walk(dataclasses.replace(self._walk(None), names_only=True))
        keys: list[bytes] = []
        try:
            while (chunk := await anyio.to_thread.run_sync(next, gen, None)) is not None:
                keys.extend(chunk)
        finally:
            gen.close()
        ended = time.monotonic()
        self.last = ScanInfo(ended, time.time(), ended - began, len(keys), full=False)
        return keys

    async def unchanged(self) -> bool:
        """Whether the source directory holds the same names as at the last scan or listing,
        as far as one ``stat`` of it can tell: its inode, mtime and ctime are the same, and
        the mtime was at least :data:`MARK_AGE` old when that scan began (a change in the same tick
        of the filesystem's clock as the scan would not show). Only for a flat source (a
        subdirectory's changes do not touch it); a file changed in place never shows. When
        true, sets :attr:`last` (a poll, ``full=False``)."""
        mark = self._mark
        if self.recursive or mark is None or not mark.trusted:
            return False
        began = time.monotonic()
        now = await anyio.to_thread.run_sync(_mark, self.source)
        if now.signature != mark.signature:
            return False
        ended = time.monotonic()
        files = self.last.files if self.last is not None else 0
        self.last = ScanInfo(ended, time.time(), ended - began, files, full=False)
        return True

    async def look(self, relpaths: Sequence[bytes]) -> tuple[list[bytes], bool]:
        """The records a full scan would list for just these paths (relative to the source),
        sorted, and whether one of them is a directory a scan would walk (what is in a
        directory that arrived whole is not named by any change event: scan it).

        Paths that are gone, skipped by the rules, or not regular files give no record. One
        thread hop per :data:`CHUNK` paths.
        """
        found = await self.look_at(relpaths)
        return found.records, found.walked_dir

    async def look_at(self, relpaths: Sequence[bytes]) -> Look:
        """:meth:`look`, with what the job's rules beyond ``age`` find (see :class:`Look`)."""
        walk = self._walk(None)
        found = Look([], False, {}, [])
        for start in range(0, len(relpaths), CHUNK):
            part = await anyio.to_thread.run_sync(_look, walk, relpaths[start : start + CHUNK])
            found.records.extend(part.records)
            found.blocked.update(part.blocked)
            found.marker_keys.extend(part.marker_keys)
            if part.walked_dir:
                found = found._replace(walked_dir=True)
        found.records.sort()
        return found

    def _walk(self, settled_before_ns: int | None) -> _Walk:
        ready = self.ready
        return _Walk(
            root=os.fsencode(self.source),
            rules=self.rules,
            recursive=self.recursive,
            follow_symlinks=self.follow_symlinks,
            settled_before_ns=settled_before_ns,
            ready=None if ready is None or ready.plain else ready,
            warned=self._warned,
        )
