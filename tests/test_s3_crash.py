"""An s3:// inbox under kills and several runners: the guarantees of a directory inbox hold
(every object done once in the ledger, archived once, a newer version never lost)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .conftest import HANDLERS, cli, invocations, ledger_rows, spawn, wait_for
from .s3 import Bucket

ROOT = Path(__file__).parent.parent
RECORD = f"{HANDLERS}:record"


def _run_args(bucket: Bucket, state: str, *more: str) -> list[str]:
    return [
        "run",
        RECORD,
        "--source",
        bucket.url("in/"),
        "--state",
        state,
        "--on-done",
        f"move:{bucket.url('done/')}",
        "--no-progress",
        *more,
    ]


@pytest.mark.slow
def test_killed_runners_over_a_bucket_leave_every_object_done_and_archived_once(
    bucket: Bucket, tmp_path: Path
) -> None:
    count = 60
    for i in range(count):
        bucket.put(f"in/f{i:03d}.txt", b"%d" % i)
    state, log = str(tmp_path / "state.db"), tmp_path / "calls.log"
    env = {**bucket.env, "AB_LOG": str(log), "AB_SLEEP": "0.05"}
    for kills in range(1, 4):  # three runners SIGKILLed part-way
        proc = spawn(*_run_args(bucket, state, "-j", "4"), env=env, cwd=ROOT)
        wait_for(lambda k=kills: sum(invocations(log).values()) >= 10 * k, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    result = cli(*_run_args(bucket, state), env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert bucket.keys("in/") == []
    assert bucket.keys("done/") == [f"done/f{i:03d}.txt" for i in range(count)]
    assert bucket.get("done/f007.txt") == b"7"
    states = ledger_rows(state, "SELECT state, count(*) FROM items GROUP BY state")
    assert states == [("done", count)]
    calls = invocations(log)
    assert set(calls) == {f"f{i:03d}.txt" for i in range(count)}
    # Only what was in flight at a kill ran again: at most -j 4 handlers and a commit group.
    assert sum(calls.values()) - count <= 3 * 2 * 4


@pytest.mark.slow
def test_shared_runners_with_a_postgres_ledger_share_a_bucket(
    bucket: Bucket, tmp_path: Path, pg_dsn: str
) -> None:
    count = 80
    for i in range(count):
        bucket.put(f"in/f{i:03d}.txt", b"x")
    log = tmp_path / "calls.log"
    env = {**bucket.env, "AB_LOG": str(log), "AB_SLEEP": "0.02"}
    runners = [
        spawn(*_run_args(bucket, pg_dsn, "--shared", "-j", "4"), env=env, cwd=ROOT)
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=120) for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    calls = invocations(log)
    assert sorted(calls) == [f"f{i:03d}.txt" for i in range(count)]
    assert set(calls.values()) == {1}, "each object handled by one runner, once"
    assert bucket.keys("in/") == []
    assert len(bucket.keys("done/")) == count
