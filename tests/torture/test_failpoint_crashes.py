"""Every named failpoint crashes a runner (SIGKILL at that point) again and again; nothing is
lost, completed twice, applied twice at the receiver, torn or left behind.

Each point gets a corpus of its own (SQLite, then PostgreSQL), an idempotent receiver, an
archive on another filesystem (a tmpfs: the move copies, so ``mid-copy`` is reached). A runner
is started with ``NAME=kill:N`` (``N`` random, so the crash lands at varied hits) until the
point has killed ``CRASHES`` runners; files are added whenever a run finishes without reaching
it. ``middleware-executed`` is the receiver's: there the receiver is killed, and restarted.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from asyncbatch import _failpoints as failpoints

from .harness import (
    FULL,
    Receiver,
    Scenario,
    assert_all_zero,
    receiving,
    record_figures,
    scale,
    tmpfs,
)

CRASHES = scale(1, 20)
FILES = scale(12, 120)
#: The largest N of ``kill:N`` per point: points reached once a claim chunk get small ones.
MOST_HITS = {"after-claim": 3, "in-transaction": 40}
RECEIVER_POINT = "middleware-executed"
#: The points of a directory inbox; those of an object store (s3://) have their crash tests in
#: tests/test_s3_effects.py and tests/test_s3_crash.py.
POINTS = sorted(set(failpoints.POINTS) - failpoints.OBJECT_POINTS)


def crash_runners_at(point: str, scenario: Scenario, rng: random.Random) -> int:
    """Start runners armed with ``point=kill:N`` until CRASHES of them died there."""
    crashes = runs = 0
    while crashes < CRASHES:
        runs += 1
        assert runs < CRASHES * 4 + 10, f"{point}: reached only {crashes} times in {runs} runs"
        if scenario.done() == len(scenario.original):
            scenario.add_files(FILES // 2)  # no work left to crash in: more of it
        n = rng.randint(1, MOST_HITS.get(point, 12)) if FULL else 1  # short: surely reached
        proc = scenario.spawn(f"{point}=kill:{n}")
        _, err = proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            crashes += 1
        else:
            assert proc.returncode == 0, err[-2000:]
    return crashes


def crash_receiver_at(scenario: Scenario, receiver: Receiver, rng: random.Random) -> None:
    """Run the job while the receiver dies at ``middleware-executed`` CRASHES times."""

    def arm(crashes: int) -> str:
        return f"{RECEIVER_POINT}=kill:{rng.randint(1, 12)}" if crashes < CRASHES else ""

    receiver.stop()
    receiver.arm = arm
    receiver.start()
    runs = 0
    while receiver.crashes < CRASHES:
        runs += 1
        assert runs < CRASHES * 4 + 10, f"the receiver crashed only {receiver.crashes} times"
        if scenario.done() == len(scenario.original):
            scenario.add_files(FILES // 2)
        proc = scenario.spawn()
        while proc.poll() is None:
            receiver.restart_if_dead()
            time.sleep(0.02)
        _, err = proc.communicate()
        assert proc.returncode in (0, 1), err[-2000:]  # 1: an item ran out of HTTP retries
        receiver.restart_if_dead()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_failpoint_loses_nothing_and_repeats_no_effect(
    point: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = str(tmp_path / "state.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    receiver_state = str(tmp_path / "receiver.db") if backend == "sqlite" else state
    seed = int(os.environ.get("AB_SEED", "11")) + POINTS.index(point)
    rng = random.Random(seed)
    started = time.monotonic()
    with (
        tmpfs(tmp_path / "archive-fs") as archive_fs,
        receiving(receiver_state, tmp_path / "effects.log") as receiver,
    ):
        scenario = Scenario(
            tmp_path,
            state,
            archive_fs / "archive",
            url=receiver.url,
            markers=point == "before-marker-action",
        )
        scenario.add_files(FILES)
        if point == RECEIVER_POINT:
            crash_receiver_at(scenario, receiver, rng)
            crashes = receiver.crashes
        else:
            crashes = crash_runners_at(point, scenario, rng)
        scenario.recover()
        found = scenario.invariants(receiver)
    # A receiver killed after its app applied the effect and before the middleware stored the
    # response runs the request again when the client retries: the one window an idempotency
    # key cannot close. At most one repeat per request in flight at each receiver crash.
    allow = {"duplicate_effects": crashes * scenario.jobs} if point == RECEIVER_POINT else {}
    record_figures(
        "failpoint",
        point=point,
        backend=backend,
        crashes=crashes,
        files=len(scenario.original),
        invocations=scenario.invocations(),
        seconds=round(time.monotonic() - started, 1),
        invariants=found,
    )
    assert crashes >= CRASHES
    assert_all_zero(found, allow=allow)
