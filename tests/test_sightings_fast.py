"""A watch's poll over files that wait unchanged (``Sightings.scanned``): a file seen as it was,
whose look has not come, costs a lookup, not a new sight; and the sightings end as a sight of
every file would leave them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch._pipeline import sightings as sightings_module
from asyncbatch._pipeline.sightings import Sightings
from asyncbatch._scanner import pack

S = 1_000_000_000  # ns a second
NOW = 1_700_000_000 * S  # the wall clock at monotonic 0

NAMES = [b"a", b"b", b"c", b"d", b"sub/e"]


def fresh_files(count: int) -> list[bytes]:
    """``count`` files written at 0 (whole seconds: the clocks' sums are exact)."""
    return sorted(pack(NOW, b"f%06d" % i, 10, i, ctime_ns=NOW) for i in range(count))


def test_a_poll_over_unchanged_waiting_files_sights_none_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (Every poll sighted every file again: a new waiting file each, its counts taken out and
    # put back; 100,000 files settling for an hour cost a core at --poll 1 --no-events.)
    s = Sightings(settle=3600.0)
    recs = fresh_files(1_000)
    assert s.scanned(recs, NOW, 0.0) == []
    made: list[Any] = []
    real = sightings_module._Waiting

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(sightings_module, "_Waiting", counted)
    sights = 0
    sight = s._sight

    def counting_sight(*args: Any) -> bool:
        nonlocal sights
        sights += 1
        return sight(*args)

    monkeypatch.setattr(s, "_sight", counting_sight)
    for t in range(1, 30):  # polls a second apart, the files an hour from settled
        assert s.scanned(recs, NOW + t * S, float(t)) == []
    assert (sights, len(made)) == (0, 0)
    assert s.waiting_by_rule() == {"age": 1_000}
    # One file changed, one gone: those alone are sighted, or forgotten.
    changed = pack(NOW + 40 * S, b"f000007", 11, 7, ctime_ns=NOW + 40 * S)
    recs2 = sorted([r for r in recs if r[8:-25] not in (b"f000007", b"f000008")] + [changed])
    assert s.scanned(recs2, NOW + 40 * S, 40.0) == []
    assert (sights, made) == (1, [changed])
    assert s.waiting == 999
    assert not s.is_waiting(b"f000008")
    # Their time come, they are candidates at the poll that finds them settled.
    assert s.scanned(recs2, NOW + 3601 * S, 3601.0) == [r for r in recs2 if r != changed]
    assert s.waiting == 1


def _state(s: Sightings) -> tuple[Any, ...]:
    files = {
        rel: (w.record, w.ready_at, w.look_at, w.why, w.looks, w.ticket, w.passed, w.settled_ns)
        for rel, w in s._waiting.items()
    }
    return files, s._known, s._known_names, s._names, s._relook, s._waiting.by_rule()


@st.composite
def records(draw: st.DrawFn, t: float) -> list[bytes]:
    """Some of the files, each in one of a few versions (mtimes around ``t``, sizes)."""
    out = []
    for rel in draw(st.lists(st.sampled_from(NAMES), unique=True)):
        age = draw(st.sampled_from([-100.0, -2.0, -1.0, 0.0, 0.3, 50.0]))
        mtime = NOW + int((round(t) + age) * S)
        out.append(pack(mtime, rel, draw(st.integers(1, 2)), 7, ctime_ns=mtime))
    return sorted(out)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([0.0, 0.5, 1.0, 5.0]), st.booleans(), st.booleans(), st.data())
def test_a_poll_leaves_the_sightings_as_a_sight_of_every_file_would(
    settle: float, immutable: bool, by_path: bool, data: st.DataObject
) -> None:
    fast = Sightings(settle, immutable=immutable, by_path=by_path)
    slow = Sightings(settle, immutable=immutable, by_path=by_path)
    slow._unchanged_waiting = lambda records, now_ns, now: records  # type: ignore[method-assign]
    t = 0.0
    draw = data.draw
    recs = draw(records(t))
    for _ in range(draw(st.integers(1, 40))):
        t += draw(st.sampled_from([0.0, 0.001, 0.1, 0.5, 1.0, 1.015, 3.0]))
        # the wall clock against the monotonic one (and the scan's own time): ready_at moves
        now_ns = NOW + int((t + draw(st.sampled_from([0.0, 0.0, 0.002, -0.003]))) * S)
        event = draw(st.sampled_from(["scan", "scan", "same", "look", "due", "again"]))
        if event in ("scan", "same"):
            if event == "scan":
                recs = draw(records(t))
            out = []
            for s in (fast, slow):
                again: set[bytes] = set()
                out.append((s.scanned(recs, now_ns, t, again=again), again))
            assert out[0] == out[1]
        elif event == "look":
            looked = draw(records(t))
            paths = {r[8:-25] for r in looked} | set(draw(st.lists(st.sampled_from(NAMES))))
            assert fast.looked(paths, looked, now_ns, t) == slow.looked(paths, looked, now_ns, t)
        elif event == "due":
            assert fast.due(t) == slow.due(t)
            assert fast.next_look() == slow.next_look()
        else:
            gone = draw(st.lists(st.sampled_from(NAMES)))
            fast.look_again(gone)
            slow.look_again(gone)
        assert _state(fast) == _state(slow)
        assert fast.waiting_by_rule(t) == slow.waiting_by_rule(t)
