"""Killed, restarted, run side by side: real CLI subprocesses and SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from .conftest import (
    HANDLERS,
    cli,
    invocations,
    kill,
    make_files,
    rows,
    spawn,
    start_recording,
    state_counts,
    wait_for,
)

RECORD = f"{HANDLERS}:record"


def running_relpaths(state: Path) -> set[str]:
    if not state.exists():
        return set()
    return {
        os.fsdecode(r[0]) for r in rows(state, "SELECT relpath FROM items WHERE state='running'")
    }


def test_sigkill_mid_batch_repeatedly_then_every_file_is_done_once(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    files = 400
    make_files(inbox, files)
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.01"}
    rng = random.Random(int(os.environ.get("AB_SEED", "20261127")))
    in_flight_at_kills: list[set[str]] = []
    args = (
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "4",
        "--no-progress",
        "--max-attempts",
        "20",
    )

    for _ in range(5):
        before = sum(invocations(log).values())
        proc = spawn(*args, env=env)
        # Kill once this run has handled some files, at a random moment after that.
        wait_for(
            lambda b=before, p=proc: sum(invocations(log).values()) >= b + 5 or p.poll() is not None
        )
        time.sleep(rng.uniform(0.0, 0.3))
        kill(proc)
        in_flight_at_kills.append(running_relpaths(state))

    started = time.monotonic()
    final = cli(*args, env=env)
    took = time.monotonic() - started

    assert final.returncode == 0, final.stderr
    assert took < 30, "the dead runner's lock must be taken over without waiting for its lease"
    assert state_counts(state) == {"done": files}
    calls = invocations(log)
    assert set(calls) == {p.name for p in inbox.iterdir()}
    for relpath, count in calls.items():
        if count > 1:
            kills_in_flight = sum(relpath in s for s in in_flight_at_kills)
            assert count - 1 <= kills_in_flight, (relpath, count, kills_in_flight)
    assert sum(calls.values()) - files <= sum(len(s) for s in in_flight_at_kills)
    assert rows(state, "SELECT count(*) FROM runners") == [(0,)]
    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]


def test_two_shared_runners_handle_every_file_exactly_once(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    files = 1000
    make_files(inbox, files)
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.002"}
    args = (
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "--shared",
        "-j",
        "8",
        "--no-progress",
        "--claim-batch",
        "64",
    )
    runners = [spawn(*args, env=env) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in runners]

    for runner, (_, err) in zip(runners, outputs, strict=True):
        assert runner.returncode == 0, err
    calls = invocations(log)
    assert len(calls) == files
    assert max(calls.values()) == 1
    assert state_counts(state) == {"done": files}
    owners = rows(state, "SELECT owner, count(*) FROM items GROUP BY owner")
    assert len(owners) == 2, "both runners took part"


def test_a_killed_shared_runners_items_are_finished_by_the_other(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 200)
    log = tmp_path / "calls.log"
    args = (
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "--shared",
        "-j",
        "4",
        "--no-progress",
        "--claim-batch",
        "16",
    )
    victim = spawn(*args, env={"AB_LOG": str(log), "AB_SLEEP": "0.05"})
    wait_for(lambda: len(invocations(log)) >= 8)
    survivor = spawn(*args, env={"AB_LOG": str(log), "AB_SLEEP": "0.01"})
    time.sleep(0.3)
    kill(victim)
    err = survivor.communicate(timeout=120)[1]

    assert survivor.returncode == 0, err
    assert state_counts(state) == {"done": 200}
    assert set(invocations(log)) == {p.name for p in inbox.iterdir()}


@pytest.mark.parametrize(
    ("signum", "code"),
    # A hang-up (an ssh session that dropped) ended the runner at once: its items left
    # leased, the run "killed", an --exec command's process left running on.
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
    ids=["SIGTERM", "SIGHUP"],
)
def test_a_stop_signal_finishes_in_flight_items_and_exits_128_plus_it(
    inbox: Path, state: Path, tmp_path: Path, signum: int, code: int
) -> None:
    make_files(inbox, 100)
    log = tmp_path / "calls.log"
    proc = start_recording(inbox, state, log, jobs=4, sleep=0.2)
    wait_for(lambda: len(invocations(log)) >= 4)
    err = kill(proc, signum)

    assert proc.returncode == code, err
    handled = set(invocations(log))
    done = {os.fsdecode(r[0]) for r in rows(state, "SELECT relpath FROM items WHERE state='done'")}
    assert handled == done, "every started item finished and was recorded"
    assert state_counts(state).get("running", 0) == 0
    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]
    assert rows(state, "SELECT exit_status FROM runs") == [("stopped",)]


def test_a_hang_up_is_left_alone_when_ignored_as_under_nohup(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 20)
    log = tmp_path / "calls.log"
    ignored = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731 (as nohup)
    proc = start_recording(inbox, state, log, jobs=2, sleep=0.05, preexec_fn=ignored)
    wait_for(lambda: len(invocations(log)) >= 2)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 0, err
    assert state_counts(state) == {"done": 20}


def test_sigint_exits_130_and_the_next_run_finishes(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 60)
    log = tmp_path / "calls.log"
    args = ("run", RECORD, "--source", inbox, "--state", state, "-j", "2", "--no-progress")
    proc = spawn(*args, env={"AB_LOG": str(log), "AB_SLEEP": "0.1"})
    wait_for(lambda: len(invocations(log)) >= 2)
    err = kill(proc, signal.SIGINT)
    assert proc.returncode == 130, err

    final = cli(*args, env={"AB_LOG": str(log)})
    assert final.returncode == 0, final.stderr
    assert state_counts(state) == {"done": 60}
    assert max(invocations(log).values()) == 1  # graceful: nothing was cut off and redone


def test_kills_during_attempts_never_make_an_item_dead_under_the_default_budgets(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 24, size=3 << 20)  # 3 MiB inputs, as in the report of issue 14
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.4"}
    args = ("run", RECORD, "--source", inbox, "--state", state, "-j", "4", "--no-progress")
    for _ in range(6):  # each kill lands while four items are in their handler
        before = sum(invocations(log).values())
        proc = spawn(*args, env=env)
        wait_for(
            lambda b=before, p=proc: sum(invocations(log).values()) >= b + 4 or p.poll() is not None
        )
        time.sleep(0.1)
        kill(proc)

    final = cli(*args, env=env)

    assert final.returncode == 0, final.stderr
    assert state_counts(state) == {"done": 24}
    # Each item's attempts are its interrupted ones plus the one that finished.
    for relpath, attempts, interrupted in rows(
        state, "SELECT relpath, attempts, interrupted FROM items"
    ):
        assert attempts == interrupted + 1, (relpath, attempts, interrupted)
    assert max(n for (n,) in rows(state, "SELECT interrupted FROM items")) >= 3
