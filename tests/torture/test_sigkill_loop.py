"""Random SIGKILLs over a corpus with an idempotent receiver, on SQLite and on PostgreSQL,
over a directory and over an ``s3://`` prefix (objects in a bucket of moto on 127.0.0.1,
outputs and the archive in the same bucket).

Runners (one exclusive, or two ``--shared`` at once) are killed at random moments: during
start-up, the scan and the first claims, or after a random number of files went through their
handler (spread so the corpus lasts for every kill). Then one run finishes the job and every
invariant is measured: nothing lost, nothing completed twice, no effect applied twice at the
receiver, no torn output, no orphan temp file, ``PRAGMA integrity_check`` ok, and no input
handled twice but by a runner killed while it was in flight.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import kill
from .buckets import BucketScenario
from .harness import (
    Job,
    Runner,
    Scenario,
    assert_all_zero,
    receiving,
    record_figures,
    scale,
    this_host,
)

KILLS = scale(5, 200)
FILES = scale(60, 1000)
#: The short version over a bucket is smaller: each object costs a few requests to moto.
S3_KILLS = scale(2, 200)
S3_FILES = scale(20, 1000)


def kill_later(
    proc: subprocess.Popen[str], scenario: Job, rng: random.Random, budget: float
) -> bool:
    """Kill ``proc`` at a random moment; ``False`` if it finished first."""
    if rng.random() < 0.3:  # in start-up, the scan, the lock take-over, the first claims
        deadline = time.monotonic() + rng.uniform(0.05, 0.5)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
    else:  # after a random number of handler calls, then a little more
        target = scenario.invocations() + rng.randint(0, max(1, round(2 * budget)))
        deadline = time.monotonic() + 60
        while scenario.invocations() < target and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress in 60 s"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))
    if proc.poll() is not None:
        return False
    kill(proc)
    return proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("source", ["dir", "s3"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_random_sigkills_over_a_corpus_lose_nothing_and_repeat_no_effect(
    backend: str, source: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = str(tmp_path / "state.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    receiver_state = str(tmp_path / "receiver.db") if backend == "sqlite" else state
    rng = random.Random(int(os.environ.get("AB_SEED", "2026")))
    most, files = (KILLS, FILES) if source == "dir" else (S3_KILLS, S3_FILES)
    started = time.monotonic()
    kills = shared_runs = 0
    killed: set[Runner] = set()
    with receiving(receiver_state, tmp_path / "effects.log") as receiver:
        env = {"AB_SLEEP": "0.02"}
        scenario: Scenario | BucketScenario
        if source == "dir":
            scenario = Scenario(tmp_path, state, tmp_path / "archive", url=receiver.url, env=env)
        else:
            bucket = request.getfixturevalue("bucket")
            scenario = BucketScenario(tmp_path, state, bucket, url=receiver.url, env=env)
        scenario.add_files(files)
        while kills < most:
            left = len(scenario.original) - scenario.done()
            if left == 0:
                break
            budget = 0.5 * left / (most - kills)
            if rng.random() < 0.3:
                shared_runs += 1
                runners = [scenario.spawn(shared=True) for _ in range(2)]
            else:
                runners = [scenario.spawn()]
            for proc in runners:
                if kill_later(proc, scenario, rng, budget):
                    kills += 1
                    killed.add(this_host(proc))
                _, err = proc.communicate(timeout=120)
                assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
        scenario.recover()
        found = scenario.invariants(receiver)
        found["handler_calls_not_in_flight_at_a_kill"] = scenario.calls_not_in_flight_at_a_kill(
            killed
        )
    record_figures(
        "sigkill",
        backend=backend if source == "dir" else f"{backend}, s3://",
        kills=kills,
        runs_with_two_shared_runners=shared_runs,
        files=len(scenario.original),
        invocations=scenario.invocations(),
        seconds=round(time.monotonic() - started, 1),
        invariants=found,
    )
    assert kills >= most, f"the corpus was done after {kills} kills"
    assert_all_zero(found)
