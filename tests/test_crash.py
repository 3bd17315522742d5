"""Killed, restarted, run side by side: real CLI subprocesses and SIGKILL."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    HANDLERS,
    cli,
    invocations,
    kill,
    ledger_rows,
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


def runner_count(state: Path) -> int:
    """How many runners the state has registered (0 before it exists: read-only, it is not
    made here)."""
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(db.execute("SELECT count(*) FROM runners").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not made yet, or busy
    finally:
        db.close()


def test_two_shared_runners_handle_every_file_exactly_once(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    files = 1000
    make_files(inbox, files)
    log = tmp_path / "calls.log"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.002", "AB_GATE": str(gate)}
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
    # Handlers wait at the gate until both runners have joined the job (a loaded machine can
    # start the second after the first did all 1,000 files): then both take part.
    wait_for(lambda: runner_count(state) == 2, timeout=60)
    opened = os.open(gate, os.O_RDWR)  # (a FIFO's O_RDWR does not wait for a reader)
    try:
        outputs = [r.communicate(timeout=120) for r in runners]
    finally:
        os.close(opened)

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


#: Where a handler moving its input twice (``move_twice``: to a staging directory, an output
#: written, then on to the archive) is SIGKILLed: ``NAME:N`` is the failpoint's N-th hit.
CONTENT = b"f00000\n".ljust(16, b".")  # make_files' first file
CHAINED_MOVE_KILLS = [
    "move-recorded:1",  # the first destination recorded, the input still in the source
    "before-source-unlink:1",  # the input in the source and in staging
    "output-replaced:1",  # in staging, the output in place but its directory not fsynced
    "before-dir-fsync:1",
    "move-recorded:2",  # the archive recorded, the input still in staging
    "before-source-unlink:2",  # in staging and in the archive
    "before-commit:1",  # in the archive, the item not done yet
]


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than ``tmp_path`` (under /dev/shm, a tmpfs)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no /dev/shm on another filesystem than the test's directory")
    path = Path(tempfile.mkdtemp(prefix="ab-test-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def chained_moves(
    tmp_path: Path, state: str, staging: Path
) -> tuple[tuple[str | Path, ...], dict[str, str]]:
    """A run of ``move_twice`` over one file in ``tmp_path``: its arguments and environment
    (the inbox, archive, out and calls.log are ``tmp_path``'s)."""
    inbox, archive, out, log = (tmp_path / n for n in ("inbox", "archive", "out", "calls.log"))
    make_files(inbox, 1)
    archive.mkdir()
    out.mkdir()
    args = (
        "run",
        f"{HANDLERS}:move_twice",
        "--source",
        inbox,
        "--state",
        state,
        "--output-dir",
        out,
        "--no-progress",
    )
    return args, {"AB_LOG": str(log), "AB_STAGING": str(staging), "AB_MOVE_TO": str(archive)}


def kill_a_chained_move_then_run_again(
    tmp_path: Path, state: str, staging: Path, point: str
) -> subprocess.CompletedProcess[str]:
    """Run ``move_twice`` over one file, SIGKILLed at ``point`` (``NAME:N``), then again
    without it: the second run."""
    args, env = chained_moves(tmp_path, state, staging)
    name, _, n = point.partition(":")
    killed = cli(*args, env={**env, "ASYNCBATCH_FAILPOINTS": f"{name}=kill:{n}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return cli(*args, env=env)


@pytest.mark.parametrize("point", CHAINED_MOVE_KILLS)
def test_a_kill_anywhere_in_a_chain_of_moves_is_finished_by_the_next_run(
    any_state: str, tmp_path: Path, point: str
) -> None:
    # A second ctx.move recorded only its destination: killed before its rename, the next run
    # looked for the input there (not in staging, where it was): "vanished", exit 0, the file
    # stranded in staging for good.
    staging = tmp_path / "staging"
    staging.mkdir()

    final = kill_a_chained_move_then_run_again(tmp_path, any_state, staging, point)

    assert final.returncode == 0, final.stderr
    assert "1 seen: 1 done" in final.stdout + final.stderr
    assert ledger_rows(any_state, "SELECT state FROM items") == [("done",)]
    assert invocations(tmp_path / "calls.log") == {"f00000.txt": 2}
    assert list((tmp_path / "inbox").iterdir()) == list(staging.iterdir()) == []
    assert [p.name for p in (tmp_path / "archive").iterdir()] == ["f00000.txt"]
    assert (tmp_path / "archive" / "f00000.txt").read_bytes() == CONTENT
    assert (tmp_path / "out" / "f00000.txt").read_bytes() == CONTENT


@pytest.mark.parametrize("point", ["mid-copy:1", "mid-copy:2", "before-source-unlink:2"])
def test_a_kill_in_a_chain_of_moves_across_filesystems_is_finished_by_the_next_run(
    state: Path, tmp_path: Path, other_fs: Path, point: str
) -> None:
    # Staging on another filesystem: both moves copy (to a temp file, linked into place).
    final = kill_a_chained_move_then_run_again(tmp_path, str(state), other_fs, point)

    assert final.returncode == 0, final.stderr
    assert state_counts(state) == {"done": 1}
    assert invocations(tmp_path / "calls.log") == {"f00000.txt": 2}
    # Nothing left in the inbox or in staging (no temp file of a cut-off copy either).
    assert list((tmp_path / "inbox").iterdir()) == list(other_fs.iterdir()) == []
    assert [p.name for p in (tmp_path / "archive").iterdir()] == ["f00000.txt"]
    assert (tmp_path / "archive" / "f00000.txt").read_bytes() == CONTENT


def test_an_input_gone_from_every_place_of_its_chain_of_moves_is_vanished(
    any_state: str, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    args, env = chained_moves(tmp_path, any_state, staging)
    killed = cli(*args, env={**env, "ASYNCBATCH_FAILPOINTS": "move-recorded=kill:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (staging / "f00000.txt").unlink()  # really gone: in neither staging nor the archive

    final = cli(*args, env=env)

    assert final.returncode == 0, final.stderr
    assert "1 seen: 0 done, 1 vanished" in final.stdout + final.stderr
    assert ledger_rows(any_state, "SELECT state FROM items") == [("vanished",)]
    assert invocations(tmp_path / "calls.log") == {"f00000.txt": 1}
