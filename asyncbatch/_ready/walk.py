"""What one walk of the source learns of a job's readiness rules, entry by entry."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from .readiness import NS_NONE, Readiness, ancestors, change_ns
from .rules import KINDS

__all__ = ["LASTING", "ReadyWalk"]

#: The rules whose failure lasts until the file or its markers change (or the rules do):
#: a file an earlier run finished may fail one of them for good after the rules changed
#: (``marker:.ok`` given to a job of ``age``), and the next run would still not take it.
#: (``age`` and ``stable`` come with time: a watch asks about the files that fail them
#: once, at its end, not at every look; a file finished that fails them changed, or kept its
#: key, its ctime alone changed: a ``chmod``, a ``touch -d``.)
LASTING: Final = ("max-age", "min-size", "marker", "dir-marker")


@dataclass(slots=True)
class _Dir:
    """The directory a walk is listing."""

    prefix: bytes
    #: Every name in it (an orphan marker's file is none of them).
    names: set[bytes] = field(default_factory=set)
    #: Its file markers (name -> mtime).
    marks: dict[bytes, int] = field(default_factory=dict)
    #: Its directory markers (index in ``dir_names`` -> mtime).
    own: dict[int, int] = field(default_factory=dict)
    #: Its markers' change times (name -> the later of mtime and ctime): when they settle.
    changed: dict[bytes, int] = field(default_factory=dict)
    #: Its files waiting for the markers' verdict: (record, name, mtime).
    held: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    inputs: int = 0


class ReadyWalk:
    """What one walk of the source learns of the rules, entry by entry (in the walking thread).

    With ``cutoff_ns`` (a one-shot run's scan: ``now - settle``), a file that fails a rule is
    left out and counted in :attr:`not_ready` by the first rule that fails (see
    :data:`KINDS`); without it (a watch's scan: every file is listed), it is listed and its
    rule noted in :attr:`blocked` (age and stable are the watch's to judge). Records of a
    directory wait for the end of its listing: its markers may come after its files.
    """

    def __init__(self, ready: Readiness, *, cutoff_ns: int | None, now_ns: int) -> None:
        self.ready = ready
        self.cutoff_ns = cutoff_ns
        self.now_ns = now_ns
        #: Files left out by the rule that failed first (a one-shot run's scan).
        self.not_ready: dict[str, int] = dict.fromkeys(KINDS, 0)
        #: Of the age failures, those changed at a time later than this host's clock read
        #: after their stat (see :meth:`count_ahead`), not merely after the scan began (a
        #: file written while the scan is under way).
        self.future = 0
        #: Change times of age failures later than ``now_ns``, not yet compared with the
        #: clock (the walk calls :meth:`count_ahead` once a chunk, and at its end).
        self.ahead: list[int] = []
        #: A one-shot run's scan: the records left out, with the rule each fails (the run
        #: asks the ledger which are finished already: they are not waiting for anything;
        #: a done file whose ctime alone changed fails ``age`` with its key kept).
        self.left_out: list[tuple[bytes, str]] = []
        #: A watch's scan: the rule (not age, not stable) each listed file fails.
        self.blocked: dict[bytes, str] = {}
        #: File markers whose file is not in their directory, and directory markers with no
        #: input under them: what a post-commit action left behind (marker relpaths).
        self.orphans: list[bytes] = []
        #: Directories whose marker is older than some of their files (modified after it):
        #: marker relpath -> how many.
        self.late: dict[bytes, int] = {}
        #: Name keys (relpath NUL inode) of the markers found.
        self.marker_keys: list[bytes] = []
        #: The mtime of each marker found, by relpath.
        self.marker_mtimes: dict[bytes, int] = {}
        #: Directories under which something could not be listed: their markers, and those
        #: of the directories above, are never taken for leftovers.
        self._unlisted: set[bytes] = set()
        self._dir: _Dir | None = None
        #: Per directory listed: the latest marker of each name in it or above (change, path).
        self._cover: dict[bytes, tuple[tuple[int, bytes], ...]] = {}
        self._inputs: dict[bytes, int] = {}
        #: The directories holding markers: prefix -> {index of the name: its change time}.
        self._marked_dirs: dict[bytes, dict[int, int]] = {}

    def enter(self, prefix: bytes) -> None:
        """The listing of the directory ``prefix`` begins."""
        self._dir = _Dir(prefix)

    def unlisted(self, prefix: bytes) -> None:
        """The directory ``prefix`` could not be listed: what it holds is unknown (it may hold
        inputs), so no marker above it is a leftover."""
        self._unlisted.update(ancestors(prefix))

    def saw(self, name: bytes) -> None:
        """An entry of the directory (of any kind)."""
        assert self._dir is not None
        self._dir.names.add(name)

    def marker(self, name: bytes, rel: bytes, st: os.stat_result) -> None:
        """A marker (a regular file whose name :meth:`Readiness.marks`)."""
        d = self._dir
        assert d is not None
        self.marker_keys.append(rel + b"\0" + st.st_ino.to_bytes(8, "big"))
        self.marker_mtimes[rel] = st.st_mtime_ns
        ready = self.ready
        d.changed[name] = change_ns(st)
        if name in ready.dir_names:
            d.own[ready.dir_names.index(name)] = st.st_mtime_ns
        else:
            d.marks[name] = st.st_mtime_ns

    def file(self, record: bytes, name: bytes, st: os.stat_result) -> bool:
        """An input file, ``record`` its scan record. Returns whether it is held for the end of
        the listing (``False``: left out, counted by the rule it fails)."""
        d = self._dir
        assert d is not None
        d.inputs += 1
        cutoff = self.cutoff_ns
        kind = self.ready.stat_rule(
            st.st_size, st.st_mtime_ns, st.st_ctime_ns, self.now_ns, age=False
        )
        changed = change_ns(st)
        if not kind and cutoff is not None and self.ready.age and changed > cutoff:
            kind = "age"
            if changed > self.now_ns:
                self.ahead.append(changed)
        if kind and cutoff is not None:
            self.not_ready[kind] += 1
            self.left_out.append((record, kind))
            return False
        if kind:
            self.blocked[record[8:-25]] = kind
        d.held.append((record, name, st.st_mtime_ns))
        return True

    def count_ahead(self, now_ns: int) -> None:
        """Count in :attr:`future` the change times noted in :attr:`ahead` later than
        ``now_ns`` (this host's clock, read after their stats)."""
        self.future += sum(changed > now_ns for changed in self.ahead)
        self.ahead.clear()

    def leave(self) -> list[bytes]:
        """The listing of the directory ended: its records that are listed (ready ones, or in
        a watch's scan every one), with the markers' verdicts."""
        d = self._dir
        assert d is not None
        self._dir = None
        cover = self._covering(d)
        earliest = min((c for c, _ in cover), default=0)
        out = []
        for record, name, mtime in d.held:
            rel = record[8:-25]
            if self.blocked.get(rel):
                out.append(record)
                continue
            kind = self.ready.marker_rule(name, mtime, d.marks, earliest)
            if kind == "dir-marker" and earliest != NS_NONE:
                late = min(cover)[1]
                self.late[late] = self.late.get(late, 0) + 1
            if not kind:
                out.append(record)
            elif self.cutoff_ns is not None:
                self.not_ready[kind] += 1
                self.left_out.append((record, kind))
            else:
                self.blocked[rel] = kind
                out.append(record)
        self._orphan_marks(d)
        return out

    def end(self) -> None:
        """The walk ended: directory markers with no input under them are orphans."""
        under = dict.fromkeys(self._marked_dirs, 0)
        for prefix, count in self._inputs.items():
            if count:
                for d in ancestors(prefix):
                    if d in under:
                        under[d] += count
        names = self.ready.dir_names
        for prefix, count in under.items():
            own = self._marked_dirs[prefix]
            if count == 0 and prefix not in self._unlisted and self._settled(max(own.values())):
                self.orphans.extend(prefix + b"/" + names[i] if prefix else names[i] for i in own)

    def _covering(self, d: _Dir) -> tuple[tuple[int, bytes], ...]:
        """The latest marker of each directory-marker name in ``d`` or above it."""
        names = self.ready.dir_names
        if not names:
            return ()
        prefix = d.prefix
        parent = prefix.rpartition(b"/")[0] if prefix else None
        above = self._cover.get(parent) if parent is not None else None
        cover = []
        for i, name in enumerate(names):
            best = above[i] if above is not None else (NS_NONE, b"")
            own = d.own.get(i)
            if own is not None and own >= best[0]:
                best = (own, prefix + b"/" + name if prefix else name)
            cover.append(best)
        self._cover[prefix] = found = tuple(cover)
        self._inputs[prefix] = d.inputs
        if d.own:
            self._marked_dirs[prefix] = {i: d.changed[names[i]] for i in d.own}
        return found

    def _orphan_marks(self, d: _Dir) -> None:
        """Note the directory's file markers whose file is not in it (once settled). A name
        that is the suffix alone (``.done``) marks no file: it is nobody's leftover."""
        for name in d.marks:
            files = self.ready.marked(name)
            if files and not any(f in d.names for f in files) and self._settled(d.changed[name]):
                self.orphans.append(d.prefix + b"/" + name if d.prefix else name)

    def _settled(self, changed: int) -> bool:
        return changed <= self.now_ns - self.ready.settle_ns
