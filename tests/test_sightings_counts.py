"""A watch's live counts of files not ready yet (``Sightings.waiting_by_rule``), kept as the
files change: the same figures as a walk over every waiting file, at any moment, at a cost
that does not grow with the files waiting."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch._pipeline.sightings import Sightings
from asyncbatch._ready import Readiness, ready_rules
from asyncbatch._scanner import pack

S = 1_000_000_000  # ns a second
NOW = 1_700_000_000 * S  # the wall clock at monotonic 0

NAMES = [b"a", b"b", b"c", b"d", b"e", b"sub/f"]
RULES = [None, ["age", "marker:.ok"], ["stable:2"], ["marker:.ok"], ["age", "stable:3"]]


def walked(s: Sightings, now: float | None) -> dict[str, int]:
    """The figures as they were reckoned before: a walk over every waiting file."""
    if now is None:
        if s._ready is None:
            return {"age": s.waiting}
        now = float("-inf")  # (no file is ready by then: each under its rule)
    return dict(Counter(why for _, why, _ in s.waiting_files(now)))


def same(s: Sightings, now: float | None) -> None:
    counted: Mapping[str, int] = s.waiting_by_rule(now)
    assert dict(counted) == walked(s, now)


@st.composite
def records(draw: st.DrawFn, t: float) -> list[bytes]:
    """Some of the files, each in one of a few versions (mtimes around ``t``, sizes)."""
    chosen = draw(st.lists(st.sampled_from(NAMES), unique=True))
    out = []
    for rel in chosen:
        age = draw(st.sampled_from([-100.0, -2.0, -1.0, -0.5, 0.0, 0.3, 50.0]))
        mtime = NOW + int((round(t) + age) * S)
        out.append(pack(mtime, rel, draw(st.integers(1, 2)), 7, ctime_ns=mtime))
    return sorted(out)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(RULES),
    st.sampled_from([0.0, 0.5, 1.0]),
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_the_counts_kept_are_those_of_a_walk_at_every_moment(
    rules: list[str] | None, settle: float, immutable: bool, by_path: bool, data: st.DataObject
) -> None:
    ready = None if rules is None else Readiness(ready_rules(rules), settle)
    s = Sightings(settle, ready, immutable=immutable, by_path=by_path)
    t = 0.0
    draw = data.draw
    for _ in range(draw(st.integers(1, 40))):
        t += draw(st.sampled_from([0.0, 0.001, 0.1, 0.5, 1.0, 1.015, 3.0]))
        # the wall clock against the monotonic one: a drift moves a file's ready_at
        now_ns = NOW + int((t + draw(st.sampled_from([0.0, 0.0, 0.002, -0.003]))) * S)
        event = draw(st.sampled_from(["scan", "look", "due", "ask", "again"]))
        if event == "scan":
            recs = draw(records(t))
            blocked = {r[8:-25]: "marker" for r in recs if draw(st.booleans())}
            s.scanned(recs, now_ns, t, blocked, again=set())
        elif event == "look":
            recs = draw(records(t))
            paths = {r[8:-25] for r in recs} | set(draw(st.lists(st.sampled_from(NAMES))))
            blocked = {r[8:-25]: "marker" for r in recs if draw(st.booleans())}
            s.looked(paths, recs, now_ns, t, blocked, again=set())
        elif event == "due":
            s.due(t)
            s.next_look()
        elif event == "ask":
            asked = s.unasked()
            s.asked(asked, [r for r in asked if draw(st.booleans())])
        else:
            s.look_again(draw(st.lists(st.sampled_from(NAMES))))
        same(s, None)
        # asked at its events' time, before, or after (the watch's own `now` lags the
        # runner's: its next events may make files wait that are ready by the last count)
        times = st.sampled_from([-5.0, -1.0, -0.01, 0.0, 0.0, 0.5, 1.0, 2.0])
        for ahead in draw(st.lists(times, min_size=1, max_size=4)):
            same(s, t + ahead)


def waiting_files(count: int, settle: float) -> Sightings:
    """``count`` files seen by a scan at 0: file i is ready at ``(i + 1) * settle / count``."""
    s = Sightings(settle=settle)
    step = int(settle * S) // count
    recs = sorted(
        pack(NOW - int(settle * S) + (i + 1) * step, b"f%07d" % i, 10, i) for i in range(count)
    )
    assert s.scanned(recs, NOW, 0.0) == []
    assert s.waiting == count
    return s


def test_a_count_reaches_only_the_files_that_became_ready_since_the_last() -> None:
    # (The walk reached every waiting file at each count: 100,000 files waiting to settle,
    # 6 ms a count, and the progress line counts ten times a second.)
    visits = {}
    for count in (1_000, 100_000):
        s = waiting_files(count, settle=10.0)
        lookups = s._waiting
        assert s.waiting_by_rule(0.0) == {"age": count}  # none ready yet
        assert s.waiting_by_rule(0.0) == {"age": count}
        assert lookups.visits == 0
        ready = s.waiting_by_rule(5.0)["ready"]  # half of them
        assert ready == count // 2
        assert lookups.visits == ready  # those that became ready, no other
        for _ in range(100):  # the progress line, metrics, the heartbeat: nothing changed
            assert s.waiting_by_rule(5.0)["ready"] == ready
        visits[count] = lookups.visits
    assert visits == {1_000: 500, 100_000: 50_000}  # each file reached once, in all


def test_files_seen_again_and_again_keep_their_entries_bounded() -> None:
    # A poll that sees a waiting file again makes it wait anew (its ready_at moved with the
    # clocks' drift): the stale entries are dropped before they outnumber the files.
    s = waiting_files(1_000, settle=10.0)
    recs = sorted(w.record for _, w in s._waiting.items())
    for i in range(50):
        s.scanned(recs, NOW + i * 1_000_000, 0.002 * i)  # a drift of a ms a poll
        entries = len(s._waiting._coming) + len(s._waiting._passed)
        assert entries <= 2 * 1_000 + 64
        assert dict(s.waiting_by_rule(0.05 * i)) == walked(s, 0.05 * i)
