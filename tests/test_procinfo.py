"""Process identity where ``/proc`` is another pid namespace's: no foreign start time is
recorded, and no holder is judged dead by another namespace's processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asyncbatch._procinfo import ProcessIdentity, holder_is_dead, proc_is_ours, this_process

ROOT = Path(__file__).parent.parent
HAS_PROC = os.path.exists("/proc/self/stat")


def _can_unshare_pid() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


#: Run in a new pid namespace that keeps the host's /proc: its own identity, the namespace's
#: inode, and how it judges a live and then a dead holder of its namespace (a child it starts,
#: with a start time recorded by a /proc that saw it start: not the one at /proc/<pid> here).
IN_NAMESPACE = """
import json, os, subprocess, sys
from asyncbatch._procinfo import ProcessIdentity, holder_is_dead, this_process
me = this_process()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
holder = ProcessIdentity(me.host, child.pid, "recorded-elsewhere:1")
alive_judged_dead = holder_is_dead(holder, me=me)
child.kill()
child.wait()
print(json.dumps({
    "host": me.host,
    "pid": me.pid,
    "pid_start": me.pid_start,
    "inode": os.stat("/proc/self/ns/pid").st_ino,
    "proc_self": os.readlink("/proc/self"),
    "child": child.pid,
    "alive_judged_dead": alive_judged_dead,
    "gone_judged_dead": holder_is_dead(holder, me=me),
}))
"""


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
@pytest.mark.skipif(not _can_unshare_pid(), reason="needs 'unshare --pid --fork' (root)")
def test_a_pid_namespace_without_its_own_proc_records_no_foreign_start_time() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", IN_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # The setting under test: pid 1 of the new namespace, /proc/self another (host) number.
    assert seen["pid"] == 1
    assert seen["proc_self"] != "1"
    # Old code: the host's /proc/1/stat, the start time of the host's init.
    assert seen["pid_start"] is None
    # The namespace is still told apart from the host's, as every identity names it.
    assert seen["inode"] != os.stat("/proc/self/ns/pid").st_ino
    assert seen["host"] == f"{socket.gethostname()}/pidns:{seen['inode']}"
    # A live holder is not judged dead by the host process that has its number there...
    assert seen["alive_judged_dead"] is False
    # ...and a holder whose pid is gone from the namespace is still known dead.
    assert seen["gone_judged_dead"] is True


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_proc_is_ours_tells_a_proc_of_another_pid_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = this_process()
        assert proc_is_ours()
        assert me.pid_start is not None
        # A live holder recorded with another start time: its pid was reused, it is dead.
        reused = ProcessIdentity(me.host, sleeper.pid, "another-boot:1")
        assert holder_is_dead(reused, me=me)

        real_readlink = os.readlink

        def other_namespace(path: str | os.PathLike[str]) -> str:
            # /proc mounted for the parent namespace numbers this process otherwise.
            return "4194301" if os.fspath(path) == "/proc/self" else real_readlink(path)

        monkeypatch.setattr(os, "readlink", other_namespace)
        assert not proc_is_ours()
        foreign = this_process()
        assert foreign.pid_start is None
        assert (foreign.host, foreign.pid) == (me.host, me.pid)
        # /proc/<pid> is not this namespace's: no start time compared, no zombie read.
        assert not holder_is_dead(reused, me=foreign)
        sleeper.kill()
        sleeper.wait()
        # A pid gone from this namespace is gone (kill asks this namespace, not /proc).
        assert holder_is_dead(reused, me=foreign)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_proc_nothing_is_read_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(path: str | os.PathLike[str]) -> str:
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "readlink", no_proc)
    assert not proc_is_ours()
    assert this_process().pid_start is None
