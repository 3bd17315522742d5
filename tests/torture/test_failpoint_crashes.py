"""Every named failpoint crashes a runner (SIGKILL at that point) again and again; nothing is
lost, completed twice, applied twice at the receiver, torn or left behind: over a directory
inbox, and over an ``s3://`` inbox (the points a run over a bucket reaches).

Each point gets a corpus of its own (SQLite, then PostgreSQL), an idempotent receiver, an
archive on another filesystem (a tmpfs: the move copies, so ``mid-copy`` is reached). A runner
is started with ``NAME=kill:N`` (``N`` random, so the crash lands at varied hits) until the
point has killed ``CRASHES`` runners; files are added whenever a run finishes without reaching
it. ``middleware-executed`` is the receiver's: there the receiver is killed, and restarted.

Over a bucket (:class:`~tests.torture.buckets.BucketScenario`: objects under ``in/`` of a moto
bucket, outputs under ``out/``, the archive under ``archive/``) the same loop runs for every
point such a run reaches: the object store's two (``between-copy-and-delete``, ``output-put``)
and those of the claim, the handler, the commit, the ledger's transactions, the post-commit
actions (``before-marker-action`` with a marker object beside each object), HTTP and the
receiver. The points of a file output and of a move between filesystems (``output-temp-written``,
``output-replaced``, ``before-dir-fsync``, ``mid-copy``) are not reached there.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from asyncbatch import _failpoints as failpoints

from .buckets import BucketScenario
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
#: The points only a handler's ``ctx.move`` reaches, which this loop's handler does not call:
#: tests/test_crash.py crashes them in chains of moves.
CTX_MOVE_POINTS = frozenset({"move-recorded"})
#: The points only runners sharing a job reach (this loop's runners do not share it):
#: tests/test_lister.py holds a lister there (a lister killed mid-listing is its role taken
#: over, which tests/test_lister.py and tests/test_sharing.py kill listers for).
SHARED_POINTS = frozenset({"listing-registered"})
#: The points of a directory inbox; those of an object store (s3://) are crashed over a bucket
#: below (and once each by tests/test_s3_effects.py).
POINTS = sorted(set(failpoints.POINTS) - failpoints.OBJECT_POINTS - CTX_MOVE_POINTS - SHARED_POINTS)
#: The points a run over a bucket reaches (``s3://`` source, outputs and archive, a receiver).
S3_ALL_POINTS = sorted(
    failpoints.OBJECT_POINTS
    | {
        "after-claim",
        "in-handler",
        "before-commit",
        "after-commit",
        "in-transaction",
        "before-post-action",
        "before-marker-action",
        "http-sent",
        RECEIVER_POINT,
    }
)
#: ``make torture`` crashes each point over a corpus of its own; ``make test`` the object
#: store's points and the post-commit action's, twice each in turn, over one small corpus (each
#: object costs a few requests to moto, each scenario a receiver and a recovery run).
S3_GROUPS = (
    [[point] for point in S3_ALL_POINTS]
    if FULL
    else [["before-post-action", *sorted(failpoints.OBJECT_POINTS)]]
)
S3_CRASHES = scale(2, 20)
S3_FILES = scale(8, 120)


def crash_runners_at(
    point: str,
    scenario: Scenario | BucketScenario,
    rng: random.Random,
    most: int = CRASHES,
    files: int = FILES,
) -> int:
    """Start runners armed with ``point=kill:N`` until ``most`` of them died there."""
    crashes = runs = 0
    while crashes < most:
        runs += 1
        assert runs < most * 4 + 10, f"{point}: reached only {crashes} times in {runs} runs"
        if scenario.done() == len(scenario.original):
            scenario.add_files(files // 2)  # no work left to crash in: more of it
        n = rng.randint(1, MOST_HITS.get(point, 12)) if FULL else 1  # short: surely reached
        proc = scenario.spawn(f"{point}=kill:{n}")
        _, err = proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:
            crashes += 1
        else:
            assert proc.returncode == 0, err[-2000:]
    return crashes


def crash_receiver_at(
    scenario: Scenario | BucketScenario,
    receiver: Receiver,
    rng: random.Random,
    most: int = CRASHES,
    files: int = FILES,
) -> None:
    """Run the job while the receiver dies at ``middleware-executed`` ``most`` times."""

    def arm(crashes: int) -> str:
        return f"{RECEIVER_POINT}=kill:{rng.randint(1, 12)}" if crashes < most else ""

    receiver.stop()
    receiver.arm = arm
    receiver.start()
    runs = 0
    while receiver.crashes < most:
        runs += 1
        assert runs < most * 4 + 10, f"the receiver crashed only {receiver.crashes} times"
        if scenario.done() == len(scenario.original):
            scenario.add_files(files // 2)
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


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("points", S3_GROUPS, ids="+".join)
def test_a_crash_at_each_failpoint_over_a_bucket_loses_nothing_and_repeats_no_effect(
    points: list[str], backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = str(tmp_path / "state.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    receiver_state = str(tmp_path / "receiver.db") if backend == "sqlite" else state
    seed = int(os.environ.get("AB_SEED", "11")) + S3_ALL_POINTS.index(points[0])
    rng = random.Random(seed)
    started = time.monotonic()
    crashes: dict[str, int] = {}
    with receiving(receiver_state, tmp_path / "effects.log") as receiver:
        bucket = request.getfixturevalue("bucket")
        markers = "before-marker-action" in points
        scenario = BucketScenario(tmp_path, state, bucket, url=receiver.url, markers=markers)
        scenario.add_files(S3_FILES)
        for point in points:
            if point == RECEIVER_POINT:
                crash_receiver_at(scenario, receiver, rng, S3_CRASHES, S3_FILES)
                crashes[point] = receiver.crashes
            else:
                crashes[point] = crash_runners_at(point, scenario, rng, S3_CRASHES, S3_FILES)
        scenario.recover()
        found = scenario.invariants(receiver)
    allow = (
        {"duplicate_effects": crashes[RECEIVER_POINT] * scenario.jobs}
        if RECEIVER_POINT in crashes
        else {}
    )
    record_figures(
        "failpoint s3",
        point=" + ".join(points),
        backend=backend,
        crashes=sum(crashes.values()),
        files=len(scenario.original),
        invocations=scenario.invocations(),
        seconds=round(time.monotonic() - started, 1),
        invariants=found,
    )
    assert min(crashes.values()) >= S3_CRASHES, crashes
    assert_all_zero(found, allow=allow)
