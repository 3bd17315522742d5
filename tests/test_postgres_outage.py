"""A PostgreSQL state that goes away mid-run: waited out, or a clear exit, never a loss.

The outage is made for one role only (its connections terminated and refused), so nothing
else using the test server notices.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import HANDLERS, cli, invocations, kill, make_files, spawn, wait_for
from .postgres import Server, pg_sync, require

RECORD = f"{HANDLERS}:record"
EXEC_COMMANDS = Path(__file__).parent / "exec_commands.py"


class Outage:
    """A role of its own on the test server, whose connections can be cut and refused."""

    def __init__(self, server: Server) -> None:
        self.admin = server.dsn
        tag = uuid.uuid4().hex[:10]
        self.role, self.schema = f"abtest_role_{tag}", f"abtest_{tag}"
        parts = urllib.parse.urlsplit(server.dsn)
        database = parts.path.strip("/")
        host = parts.netloc.rpartition("@")[2]
        self.dsn = f"postgresql://{self.role}@{host}/{database}?search_path={self.schema}"
        pg_sync(self.admin, f'CREATE ROLE "{self.role}" LOGIN')
        pg_sync(self.admin, f'GRANT CREATE ON DATABASE "{database}" TO "{self.role}"')

    def begin(self) -> None:
        pg_sync(self.admin, f'ALTER ROLE "{self.role}" CONNECTION LIMIT 0')
        pg_sync(
            self.admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            self.role,
        )

    def end(self) -> None:
        pg_sync(self.admin, f'ALTER ROLE "{self.role}" CONNECTION LIMIT -1')

    def counts(self) -> dict[str, int]:
        found = pg_sync(
            self.admin, f'SELECT state, count(*) FROM "{self.schema}".items GROUP BY state'
        )
        return {str(state): int(n) for state, n in found}

    def drop(self) -> None:
        self.end()
        pg_sync(self.admin, f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        pg_sync(self.admin, f'DROP OWNED BY "{self.role}"')
        pg_sync(self.admin, f'DROP ROLE "{self.role}"')


@pytest.fixture
def outage(postgres_server: Server) -> Iterator[Outage]:
    require(postgres_server)
    made = Outage(postgres_server)
    yield made
    made.drop()


def test_an_outage_mid_run_is_waited_out_and_nothing_is_lost(
    inbox: Path, tmp_path: Path, outage: Outage
) -> None:
    make_files(inbox, 300)
    log = tmp_path / "calls.log"
    proc = spawn(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        outage.dsn,
        "-j",
        "8",
        "--no-progress",
        "--ledger-timeout",
        "60",
        env={"AB_LOG": str(log), "AB_SLEEP": "0.05"},
    )
    try:
        wait_for(lambda: len(invocations(log)) >= 50, timeout=60)
        outage.begin()
        time.sleep(3.0)
        outage.end()
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "unreachable" in line]
    assert 1 <= len(warnings) <= 6, err  # about one a second, not one per item
    assert outage.counts() == {"done": 300}
    assert set(invocations(log)) == {p.name for p in inbox.iterdir()}
    assert re.search(r"300 seen: \d+ done", out), out


def test_an_outage_longer_than_the_ledger_timeout_exits_69_and_the_next_run_finishes(
    inbox: Path, tmp_path: Path, outage: Outage
) -> None:
    make_files(inbox, 200)
    log = tmp_path / "calls.log"
    args = ("run", RECORD, "--source", inbox, "--state", outage.dsn, "--no-progress")
    proc = spawn(
        *args,
        "-j",
        "4",
        "--ledger-timeout",
        "2",
        "--lease",
        "5",
        env={"AB_LOG": str(log), "AB_SLEEP": "0.05"},
    )
    try:
        wait_for(lambda: len(invocations(log)) >= 20, timeout=60)
        outage.begin()
        _, err = proc.communicate(timeout=120)
    finally:
        outage.end()
        kill(proc, signal.SIGKILL)
    assert proc.returncode == 69, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("asyncbatch: error: state 'postgresql://"), err
    assert "stayed unreachable" in last
    assert "Traceback" not in err
    # One patience for the whole outage: later calls (the committer's, the clean-up's) do not
    # each start their own --ledger-timeout again.
    left = [int(m) for m in re.findall(r"trying again, for up to (\d+)s more", err)]
    assert left, err
    assert left == sorted(left, reverse=True), err
    # Its leases expire (5 s, the server's clock) and the next run takes them over.
    again = cli(*args, "-j", "8", env={"AB_LOG": str(log), "AB_SLEEP": "0"}, timeout=120)
    assert again.returncode == 0, again.stderr
    assert outage.counts() == {"done": 200}


def test_a_lease_that_cannot_be_renewed_stops_its_command_before_it_could_be_taken_over(
    inbox: Path, tmp_path: Path, outage: Outage
) -> None:
    # The watchdog asks the ledger before it stops an attempt whose local lease deadline
    # passed (the runner may only have been suspended: see test_exec.py); with the ledger
    # unreachable, no renewal comes, and the attempt is stopped as before, while the outage
    # lasts (before another runner could take the lease over), not once the ledger answers.
    make_files(inbox, 1)
    pids = tmp_path / "pids"
    pids.mkdir()
    hang = shlex.join([sys.executable, str(EXEC_COMMANDS), "hang"])
    args = ("run", "--exec", hang, "--source", inbox, "--state", outage.dsn, "--no-progress")
    options = ("--lease", "3", "--max-attempts", "1", "--ledger-timeout", "60")
    proc = spawn(*args, *options, env={"AB_PIDS": str(pids)})
    try:
        wait_for(lambda: list(pids.glob("pid.*")) or proc.poll() is not None, timeout=60)
        (pid,) = (int(p.read_text()) for p in pids.glob("pid.*"))
        outage.begin()
        try:
            wait_for(lambda: not _alive(pid), timeout=30)  # stopped during the outage
        finally:
            outage.end()
        _, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
        for path in pids.glob("pid.*"):
            with contextlib.suppress(OSError):
                os.killpg(int(path.read_text()), signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "attempt 1 failed for good: the lease ran out before the handler finished" in err
    assert outage.counts() == {"dead": 1}


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
