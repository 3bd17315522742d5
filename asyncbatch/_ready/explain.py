"""Each readiness rule of a job, and whether it holds for one file, in words (for
``asyncbatch explain``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .readiness import Readiness, ancestors, change_ns
from .readiness import marker_at as _marker_at
from .rules import Age, DirMarker, Marker, MaxAge, MinSize, show_duration

__all__ = ["MarkerAt", "RuleVerdict", "explain_rules", "marker_paths"]


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    """Whether one rule holds for a file, and why, in words."""

    rule: str
    holds: bool
    why: str


#: A marker's mtime (ns) by its relpath under the source, or ``None`` when it is not there.
MarkerAt = Callable[[bytes], int | None]


def marker_paths(ready: Readiness, rel: bytes) -> list[bytes]:
    """The relpaths of the markers :func:`explain_rules` looks at for the file ``rel``: its
    file markers, and each directory marker in its directory or above it."""
    parent = rel.rpartition(b"/")[0]
    return [rel + suffix for suffix in ready.suffixes] + [
        path for _, path in ready.dir_marker_paths(parent)
    ]


def explain_rules(
    ready: Readiness,
    source: str,
    rel: bytes,
    st: os.stat_result,
    now_ns: int,
    *,
    follow_symlinks: bool,
    marker_at: MarkerAt | None = None,
) -> list[RuleVerdict]:
    """Each rule of ``ready`` but ``stable`` (whose looks take time: the caller's), and
    whether it holds for the file ``rel`` under ``source`` whose stat is ``st``, at
    ``now_ns``: ``"marker a.csv.done missing"``, ``"mtime and ctime 0.4 s old, settle 1 s"``.
    A symlink is a marker only with ``follow_symlinks`` (the job's), as to its scan.

    ``marker_at``: where the markers' times come from instead of the directory ``source``
    (an object-store source's: each of :func:`marker_paths` looked at beforehand)."""
    if marker_at is None:
        root = os.fsencode(source)

        def marker_at(path: bytes) -> int | None:
            return _marker_at(os.path.join(root, path), follow_symlinks=follow_symlinks)

    out = []
    for rule in ready.rules:
        if isinstance(rule, Age):
            out.append(_explain_age(ready, st, now_ns))
        elif isinstance(rule, Marker):
            out.append(_explain_marker(rule, rel, st, marker_at))
        elif isinstance(rule, DirMarker):
            out.append(_explain_dir_marker(rule, rel, st, marker_at))
        elif isinstance(rule, MinSize):
            holds = st.st_size >= rule.size
            out.append(
                RuleVerdict(str(rule), holds, f"size {st.st_size} bytes, min-size {rule.size}")
            )
        elif isinstance(rule, MaxAge):
            age = (now_ns - st.st_mtime_ns) / 1e9
            holds = age <= rule.seconds
            mtime = _age("mtime", st.st_mtime_ns, now_ns)
            why = f"{mtime}, max-age {show_duration(rule.seconds)}"
            out.append(RuleVerdict(str(rule), holds, why + ("" if holds else ": left alone")))
    return out


def _seconds(s: float) -> str:
    """A time span in words: ``0.4 s``, ``12 min``, ``5.2 h``, ``8.0 d``."""
    if abs(s) < 100:
        return f"{s:.1f} s"
    if abs(s) < 7200:
        return f"{s / 60:.0f} min"
    if abs(s) < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _explain_age(ready: Readiness, st: os.stat_result, now_ns: int) -> RuleVerdict:
    """The younger of mtime and ctime decides; each time's age is said as it is (``mtime and
    ctime 12.3 s old``, or ``ctime 5.6 s old (mtime 10.0 d old: the younger decides)``)."""
    old = (now_ns - change_ns(st)) / 1e9
    settle = f"settle {ready.settle:g} s"
    mtime, ctime = _age("mtime", st.st_mtime_ns, now_ns), _age("ctime", st.st_ctime_ns, now_ns)
    if mtime.partition(" ")[2] == ctime.partition(" ")[2]:
        times = "mtime and ctime " + mtime.partition(" ")[2]
    elif st.st_mtime_ns >= st.st_ctime_ns:
        times = f"{mtime} ({ctime}: the younger decides)"
    else:
        times = f"{ctime} ({mtime}: the younger decides)"
    return RuleVerdict("age", old >= 0 and old >= ready.settle, f"{times}, {settle}")


def _age(name: str, ns: int, now_ns: int) -> str:
    """``mtime 5.6 s old``, ``ctime 2.0 s in the future``."""
    old = (now_ns - ns) / 1e9
    return f"{name} {_seconds(-old)} in the future" if old < 0 else f"{name} {_seconds(old)} old"


def _explain_marker(
    rule: Marker, rel: bytes, st: os.stat_result, marker_at: MarkerAt
) -> RuleVerdict:
    marker = rel + os.fsencode(rule.suffix)
    shown = os.fsdecode(marker)
    found = marker_at(marker)
    if found is None:
        return RuleVerdict(str(rule), False, f"marker {shown} missing")
    if found < st.st_mtime_ns:
        return RuleVerdict(
            str(rule), False, f"marker {shown} older than the file (modified after its marker)"
        )
    return RuleVerdict(str(rule), True, f"marker {shown} present")


def _explain_dir_marker(
    rule: DirMarker, rel: bytes, st: os.stat_result, marker_at: MarkerAt
) -> RuleVerdict:
    name = os.fsencode(rule.name)
    best: tuple[int, bytes] | None = None
    for d in ancestors(rel.rpartition(b"/")[0]):
        path = d + b"/" + name if d else name
        found = marker_at(path)
        if found is not None and (best is None or found > best[0]):
            best = (found, path)
    if best is None:
        parent = os.fsdecode(rel.rpartition(b"/")[0])
        where = f"{parent} or above it" if parent else "the source"
        return RuleVerdict(str(rule), False, f"no {rule.name} in {where}")
    shown = os.fsdecode(best[1])
    if best[0] < st.st_mtime_ns:
        return RuleVerdict(
            str(rule), False, f"{shown} older than the file (modified after its marker)"
        )
    return RuleVerdict(str(rule), True, f"{shown} present")
