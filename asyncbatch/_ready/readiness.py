"""A job's readiness rules compiled for the scan, the watch and the post-commit actions; the
markers of single files looked at (a watch's look)."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Final

from .rules import Age, DirMarker, Marker, MaxAge, MinSize, ReadyRule, Stable

__all__ = ["NS_NONE", "Readiness", "ancestors", "change_ns", "marker_at"]

#: A change time for "no marker" (below every file's).
NS_NONE: Final = -(1 << 63)


def change_ns(st: os.stat_result) -> int:
    """When a file last changed: the later of its mtime and ctime."""
    return max(st.st_mtime_ns, st.st_ctime_ns)


class Readiness:
    """A job's rules, compiled for the scan, the watch and the post-commit actions.

    ``plain`` is the default rule alone (``age``): the scan then takes its own fast path, and
    nothing here is asked about any file.
    """

    __slots__ = (
        "age",
        "dir_names",
        "looks",
        "markers",
        "max_age_ns",
        "min_size",
        "plain",
        "rules",
        "settle",
        "settle_ns",
        "suffixes",
    )

    def __init__(self, rules: Sequence[ReadyRule], settle: float) -> None:
        self.rules = tuple(rules)
        self.settle = settle
        self.settle_ns = int(settle * 1e9)
        self.plain = self.rules == (Age(),)
        self.age = Age() in self.rules
        self.looks = max((r.looks for r in self.rules if isinstance(r, Stable)), default=1)
        self.suffixes = tuple(os.fsencode(r.suffix) for r in self.rules if isinstance(r, Marker))
        self.dir_names = tuple(os.fsencode(r.name) for r in self.rules if isinstance(r, DirMarker))
        self.markers = bool(self.suffixes or self.dir_names)
        sizes = [r.size for r in self.rules if isinstance(r, MinSize)]
        self.min_size = sizes[0] if sizes else None
        ages = [r.seconds for r in self.rules if isinstance(r, MaxAge)]
        self.max_age_ns = int(ages[0] * 1e9) if ages else None

    def __repr__(self) -> str:
        return f"Readiness({', '.join(map(str, self.rules))}; settle {self.settle:g})"

    def marks(self, name: bytes) -> bool:
        """Whether a file of this name is a marker (never an input)."""
        return name in self.dir_names or (bool(self.suffixes) and name.endswith(self.suffixes))

    def marked(self, name: bytes) -> list[bytes]:
        """The names of the files a file-marker name marks (``a.csv.done``: ``a.csv``)."""
        return [name[: -len(s)] for s in self.suffixes if name.endswith(s) and len(name) > len(s)]

    def with_marked(self, relpaths: Sequence[bytes]) -> list[bytes]:
        """``relpaths``, and after them the files the file markers among them mark (a watch
        that sees a marker arrive looks at its file)."""
        out = list(relpaths)
        seen = set(out)
        for rel in relpaths:
            parent, _, name = rel.rpartition(b"/")
            for marked in self.marked(name):
                path = parent + b"/" + marked if parent else marked
                if path not in seen:
                    seen.add(path)
                    out.append(path)
        return out

    def stat_rule(self, size: int, mtime_ns: int, ctime_ns: int, now_ns: int, *, age: bool) -> str:
        """The first of ``max-age``, ``min-size`` and (``age``) ``age`` that does not hold for
        a file of this stat at ``now_ns``, or ``""``."""
        if self.max_age_ns is not None and mtime_ns < now_ns - self.max_age_ns:
            return "max-age"
        if self.min_size is not None and size < self.min_size:
            return "min-size"
        if age and self.age and max(mtime_ns, ctime_ns) > now_ns - self.settle_ns:
            return "age"
        return ""

    def marker_rule(self, name: bytes, mtime: int, marks: dict[bytes, int], cover: int) -> str:
        """``marker`` or ``dir-marker`` when such a rule does not hold for the file ``name``
        modified at ``mtime`` (``marks``: the mtimes of its directory's file markers; ``cover``:
        the earliest, over the directory-marker names, of the latest such marker above it), or
        ``""``.

        A marker covers the files modified (mtime) before it, or in the same tick: the
        producer's word, in its own times (a copier that keeps times keeps their order). A
        ctime is left out on purpose: a ``chmod``, a hard link (a move cut short between its
        link and its unlink) would otherwise keep a file back for good; that a file is still
        being written is the ``age`` rule's to tell."""
        for suffix in self.suffixes:
            if marks.get(name + suffix, NS_NONE) < mtime:
                return "marker"
        if self.dir_names and cover < mtime:
            return "dir-marker"
        return ""

    # -- looks at single paths (watch mode), in a worker thread ------------------------------------

    def looked_rule(
        self,
        root: bytes,
        rel: bytes,
        st: os.stat_result,
        dirs: dict[bytes, int],
        now_ns: int,
        *,
        follow_symlinks: bool,
    ) -> str:
        """The first rule but age and stable that does not hold at ``now_ns`` for the file
        ``rel`` (its ``st``), looking at its markers (one ``stat`` each, a symlink followed
        only with ``follow_symlinks``; ``dirs``: the directory markers found so far in this
        look), or ``""``."""
        kind = self.stat_rule(st.st_size, st.st_mtime_ns, st.st_ctime_ns, now_ns, age=False)
        if kind or not self.markers:
            return kind
        parent, _, name = rel.rpartition(b"/")
        marks = {}
        for suffix in self.suffixes:
            found = marker_at(os.path.join(root, rel + suffix), follow_symlinks=follow_symlinks)
            if found is not None:
                marks[name + suffix] = found
        cover = self.cover_at(root, parent, dirs, follow_symlinks=follow_symlinks)
        return self.marker_rule(name, st.st_mtime_ns, marks, cover)

    def cover_at(
        self, root: bytes, parent: bytes, dirs: dict[bytes, int], *, follow_symlinks: bool
    ) -> int:
        """The earliest, over the directory-marker names, of the latest such marker in
        ``parent`` or a directory above it (:data:`NS_NONE`: one is missing)."""
        for key, rel in self.dir_marker_paths(parent):
            if key not in dirs:
                found = marker_at(os.path.join(root, rel), follow_symlinks=follow_symlinks)
                dirs[key] = NS_NONE if found is None else found
        return self.cover_from(parent, dirs)

    def dir_marker_paths(self, parent: bytes) -> list[tuple[bytes, bytes]]:
        """The directory markers that may cover a file in ``parent``: ``(key, relpath)``, the
        key as :meth:`cover_from` looks it up in its ``dirs``."""
        return [
            (d + b"\0" + name, d + b"/" + name if d else name)
            for name in self.dir_names
            for d in ancestors(parent)
        ]

    def cover_from(self, parent: bytes, dirs: dict[bytes, int]) -> int:
        """:meth:`cover_at`, from ``dirs`` holding the mtime (or :data:`NS_NONE`) of each of
        :meth:`dir_marker_paths`' markers (0 when the job has no directory markers)."""
        if not self.dir_names:
            return 0
        return min(
            max(dirs[d + b"\0" + name] for d in ancestors(parent)) for name in self.dir_names
        )


def ancestors(parent: bytes) -> list[bytes]:
    """``a/b`` → ``[a/b, a, b""]``: a directory and those above it, the source last."""
    out = []
    while parent:
        out.append(parent)
        parent = parent.rpartition(b"/")[0]
    out.append(b"")
    return out


def marker_at(path: bytes, *, follow_symlinks: bool) -> int | None:
    """The mtime of the marker file at ``path``, or ``None`` (none, or not a file): a symlink
    is one only when the job follows symlinks (``follow_symlinks``), as to its scan."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None
    return st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None
