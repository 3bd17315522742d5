"""The lister killed at random, with other runners sharing the job alive, on both backends.

Three ``--shared`` runners work on a corpus; the one holding the job's listing role is
SIGKILLed at a random moment (while it lists and registers, or after a random number of files
went through the handlers), and a fresh runner takes its place. The role must move to a
survivor within about one lease, the listing resume from scratch, and nothing be lost or
done twice: then one run finishes the job and every invariant of the corpus is measured.
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
from .harness import Scenario, assert_all_zero, query, receiving, record_figures, scale

KILLS = scale(3, 50)
FILES = scale(150, 1500)
RUNNERS = 3
LEASE = 3.0


def lister_pid(state: str) -> int | None:
    """The pid of the runner holding the listing role now, if any holds it."""
    found = query(
        state,
        "SELECT r.pid FROM listers l JOIN runners r ON r.owner = l.owner "
        "WHERE l.job = 'default' AND l.lease_until IS NOT NULL",
    )
    return int(found[0][0]) if found else None


def wait_for_lister(state: str, alive: dict[int, subprocess.Popen[str]]) -> int | None:
    """The pid of the lister among ``alive`` (waiting up to two leases for one)."""
    deadline = time.monotonic() + 2 * LEASE + 10
    while time.monotonic() < deadline:
        pid = lister_pid(state)
        if pid in alive and alive[pid].poll() is None:
            return pid
        if all(p.poll() is not None for p in alive.values()):
            return None
        time.sleep(0.01)
    return None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_lister_killed_at_random_loses_nothing_and_its_role_moves_on(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = str(tmp_path / "state.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    receiver_state = str(tmp_path / "receiver.db") if backend == "sqlite" else state
    rng = random.Random(int(os.environ.get("AB_SEED", "2026")))
    started = time.monotonic()
    kills = 0
    takeovers: list[float] = []
    with receiving(receiver_state, tmp_path / "effects.log") as receiver:
        scenario = Scenario(
            tmp_path,
            state,
            tmp_path / "archive",
            url=receiver.url,
            env={"AB_SLEEP": "0.1"},
            extra=["--lease", str(LEASE)],
            jobs=2,
        )
        scenario.add_files(FILES)
        alive: dict[int, subprocess.Popen[str]] = {}
        try:
            while kills < KILLS and scenario.done() < FILES:
                while len(alive) < RUNNERS:
                    proc = scenario.spawn(shared=True)
                    alive[proc.pid] = proc
                pid = wait_for_lister(state, alive)
                if pid is None:
                    break  # every runner finished: the corpus is done
                if rng.random() < 0.4:  # while it lists and registers
                    time.sleep(rng.uniform(0, 0.3))
                else:  # after some files went through the handlers
                    target = scenario.invocations() + rng.randint(1, max(2, FILES // (2 * KILLS)))
                    deadline = time.monotonic() + 60
                    while scenario.invocations() < target and alive[pid].poll() is None:
                        assert time.monotonic() < deadline, "no progress in 60 s"
                        time.sleep(0.005)
                victim = alive.pop(pid)
                if victim.poll() is not None:
                    victim.communicate()
                    continue
                kill(victim)
                kills += 1
                moved_at = time.monotonic()
                if wait_for_lister(state, alive) is not None:
                    takeovers.append(time.monotonic() - moved_at)
                for pid_, proc in list(alive.items()):
                    if proc.poll() is not None:
                        alive.pop(pid_).communicate()
        finally:
            for proc in alive.values():
                kill(proc, signal.SIGKILL)
        scenario.recover()
        found = scenario.invariants(receiver)
    record_figures(
        "lister kills",
        backend=backend,
        kills=kills,
        files=FILES,
        invocations=scenario.invocations(),
        longest_takeover_s=round(max(takeovers, default=0.0), 2),
        seconds=round(time.monotonic() - started, 1),
        invariants=found,
    )
    assert kills >= 1
    # A survivor takes the role within about one lease (its next look, a quarter lease on).
    assert max(takeovers, default=0.0) < 2 * LEASE + 5, takeovers
    assert_all_zero(found)
