"""Three hosts share a job over an ``s3://`` inbox with a PostgreSQL ledger, and one dies.

Each runner is a host of its own (its hostname and pid namespace: ``unshare --uts --pid``, as
tests/test_sharing.py and tests/test_lister.py make them), ``--shared`` with a 3 s lease, over
a corpus of objects in a bucket of moto on 127.0.0.1 (outputs and the archive in the bucket),
with the idempotent receiver. Once they are well under way, the host that lists the bucket is
SIGKILLed (its runner with it: ``--kill-child``); the two others must take the listing and the
dead host's items over and finish the job with no further run: every object done once in the
ledger, its output whole, its effect applied once, and no object handled twice but those the
dead host had in flight, and every object archived once (the archive moves the dead host
had committed and not made yet are made by the survivor that lists the bucket again).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import WARNINGS_FAIL, cli, wait_for
from ..s3 import Bucket
from .buckets import BucketScenario
from .harness import ROOT, Runner, assert_all_zero, host_of, query, receiving, record_figures, scale

OBJECTS = scale(90, 3000)
HOSTS = ("host-a", "host-b", "host-c")


def on_host(name: str, scenario: BucketScenario) -> subprocess.Popen[str]:
    """A runner of the scenario's job, ``--shared``, on a "host" of its own."""
    command = f"hostname {name} && exec {shlex.join([sys.executable, '-m', 'asyncbatch'])} " + (
        shlex.join([*scenario.args(), "--shared", "--lease", "3"])
    )
    return subprocess.Popen(
        ["unshare", "--uts", "--pid", "--fork", "--kill-child", "sh", "-c", command],
        cwd=ROOT,
        env={**os.environ, **WARNINGS_FAIL, **scenario.environment()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lister_host(state: str) -> str | None:
    """The hostname of the runner that lists the source now, if any."""
    result = cli("status", "--state", state, "--json", cwd=ROOT)
    if result.returncode != 0:  # no ledger yet
        return None
    listing: dict[str, Any] | None = json.loads(result.stdout)["listing"]
    host = None if listing is None else listing["host"]
    return None if host is None else host_of(str(host))


def holding_hosts(state: str) -> set[str]:
    """The hosts whose runners hold leased items now."""
    rows = query(
        state,
        "SELECT DISTINCT r.host FROM items i JOIN runs r ON r.owner = i.owner"
        " WHERE i.state = 'running'",
    )
    return {host_of(str(host)) for (host,) in rows}


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for separate UTS and pid namespaces",
)
def test_three_hosts_share_a_bucket_and_the_listers_host_dies(
    tmp_path: Path, pg_dsn: str, bucket: Bucket
) -> None:
    started = time.monotonic()
    gate = tmp_path / "gate"
    with receiving(pg_dsn, tmp_path / "effects.log") as receiver:
        scenario = BucketScenario(
            tmp_path,
            pg_dsn,
            bucket,
            url=receiver.url,
            env={"AB_SLEEP": "0.05", "AB_GATE": str(gate)},
        )
        scenario.add_files(OBJECTS)
        hosts = {name: on_host(name, scenario) for name in HOSTS}

        def handled() -> dict[str, int]:
            calls = scenario.handler_calls().items()
            return {h: sum(n for (r, _), n in calls if r[0] == h) for h in HOSTS}

        try:
            wait_for(lambda: lister_host(pg_dsn) in hosts, timeout=60)
            # The handlers wait at the gate until every host holds items, however slow one
            # was to start: then each takes part.
            wait_for(lambda: holding_hosts(pg_dsn) == set(HOSTS), timeout=120)
            gate.touch()
            wait_for(lambda: all(handled().values()), timeout=120)
            wait_for(lambda: scenario.invocations() >= OBJECTS // 5, timeout=120)
            dead = str(lister_host(pg_dsn))
            handled_at_kill = scenario.invocations()
            hosts[dead].send_signal(signal.SIGKILL)  # --kill-child SIGKILLs its runner too
            hosts[dead].communicate(timeout=30)
            results = {n: p.communicate(timeout=600) for n, p in hosts.items() if n != dead}
        finally:
            for proc in hosts.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate(timeout=30)
        killed: set[Runner] = {
            (host_of(str(host)), int(pid))
            for host, pid in query(pg_dsn, "SELECT host, pid FROM runs")
            if host_of(str(host)) == dead
        }
        found = scenario.invariants(receiver)
        found["handler_calls_not_in_flight_at_a_kill"] = scenario.calls_not_in_flight_at_a_kill(
            killed
        )
    by_host = handled()
    record_figures(
        "hosts",
        backend="postgres, s3://",
        files=len(scenario.original),
        killed_host_had_handled=by_host[dead],
        handled_before_the_kill=handled_at_kill,
        invocations=scenario.invocations(),
        seconds=round(time.monotonic() - started, 1),
        invariants=found,
    )
    for name, (_, err) in results.items():
        assert hosts[name].returncode == 0, (name, err[-3000:])
    assert len(killed) == 1, killed
    assert all(by_host[h] > 0 for h in HOSTS), by_host  # each host took part
    assert_all_zero(found)  # the survivors alone, with no further run
