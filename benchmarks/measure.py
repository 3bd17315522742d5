"""Running systems as child processes: wall time, each child's own peak RSS, exit status.

Each child is started with ``subprocess.Popen`` (stdout and stderr to files, its own session)
and reaped with ``os.wait4`` on its pid. Several children (the shared runners) start back to
back and the wall time runs from just before the first start until the last exit. A child
still running at the deadline is killed with its process group.

Peak RSS: a child's own ``ru_maxrss`` is *not* usable here. Linux keeps that high-water mark
across ``exec``, and right after ``fork`` the child counts the parent's resident pages as its
own, so every child would inherit this driver's peak (hundreds of MiB once it has listed a
million files). Each command therefore runs under ``/usr/bin/time -f "%M %U %S"``: ``time`` is
tiny when it forks the command, and reports that command's own peak, which is what we record,
and its CPU time (user + system, the command and the children it waited for).
``os.wait4``'s figures are the fallback when ``/usr/bin/time`` is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BenchFailure", "ChildResult", "Spawned", "ledger_mib", "remove_ledger", "spawn"]


class BenchFailure(Exception):
    """A measurement that did not complete correctly; ``detail`` holds the stderr tail."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(slots=True)
class ChildResult:
    """One child process: its exit, its own peak RSS and where its output went."""

    argv: list[str]
    returncode: int | None
    maxrss_kib: int
    #: CPU seconds, user + system, of the command (``time``'s ``%U + %S``).
    cpu_s: float
    ended: float
    timed_out: bool
    timeout: float
    stdout_path: Path
    stderr_path: Path

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kib / 1024

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def last_json(self) -> dict[str, Any]:
        """The JSON object on the child's last non-empty stdout line."""
        for line in reversed(self.stdout().splitlines()):
            if line.strip():
                try:
                    value = json.loads(line)
                except ValueError:
                    break
                if isinstance(value, dict):
                    return value
                break
        raise BenchFailure("no JSON result on the last stdout line", self.stderr_tail())

    def check(self, what: str) -> None:
        """Raise :class:`BenchFailure` unless the child exited 0 in time."""
        if self.timed_out:
            raise BenchFailure(
                f"{what}: timed out after {self.timeout:.0f} s (killed)", self.stderr_tail()
            )
        if self.returncode != 0:
            raise BenchFailure(f"{what}: exit status {self.returncode}", self.stderr_tail())


@dataclass(slots=True)
class Spawned:
    """Children started together: the wall time until the last one exited, and each child."""

    wall: float
    children: list[ChildResult]

    @property
    def maxrss_mib(self) -> float:
        return max(child.maxrss_mib for child in self.children)

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) of every child together."""
        return sum(child.cpu_s for child in self.children)


#: This checkout (the package under measure).
ROOT = Path(__file__).resolve().parent.parent


def ensure_bytecode(*checkouts: Path) -> None:
    """Compile the ``asyncbatch`` package of each checkout (this one by default) to bytecode
    before anything is measured, as ``pip install`` of the wheel does.

    An editable install is not compiled, and with ``PYTHONDONTWRITEBYTECODE`` set (as on the
    machines these run on) nothing compiled on import is kept: every child would compile the
    whole package again, ~0.11 s of CPU a start (a run over an empty inbox: 0.22 s cached,
    0.33 s not), paid once per runner — it weighed on every ratio of several runners to one.
    ``compileall`` writes the ``.pyc`` files whatever that variable says, and an up-to-date
    ``.pyc`` is read under it."""
    import compileall  # (only the drivers need it)

    for checkout in checkouts or (ROOT,):
        if not compileall.compile_dir(str(checkout / "asyncbatch"), quiet=1, workers=0):
            raise RuntimeError(f"asyncbatch under {checkout} does not compile")


def spawn(
    argvs: Sequence[Sequence[str]],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    log_stem: Path,
) -> Spawned:
    """Start every argv at once, wait for all (at most ``timeout`` s), measure each."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    outs = [log_stem.with_name(f"{log_stem.name}.{i}.out") for i in range(len(argvs))]
    errs = [log_stem.with_name(f"{log_stem.name}.{i}.err") for i in range(len(argvs))]
    rss_files = [log_stem.with_name(f"{log_stem.name}.{i}.rss") for i in range(len(argvs))]
    timer = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    reaped: list[tuple[int, int, float, float] | None] = [None] * len(argvs)
    procs: list[subprocess.Popen[bytes]] = []
    threads: list[threading.Thread] = []

    def reap(index: int, pid: int) -> None:
        _, status, usage = os.wait4(pid, 0)
        cpu = usage.ru_utime + usage.ru_stime
        reaped[index] = (
            os.waitstatus_to_exitcode(status),
            usage.ru_maxrss,
            cpu,
            time.perf_counter(),
        )

    def kill(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    started = time.perf_counter()
    try:
        for i, argv in enumerate(argvs):
            rss_files[i].unlink(missing_ok=True)
            command = list(argv)
            if timer is not None:
                command = [timer, "-f", "%M %U %S", "-o", str(rss_files[i]), *command]
            with open(outs[i], "wb") as out, open(errs[i], "wb") as err:
                proc = subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=dict(env),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            procs.append(proc)
            thread = threading.Thread(target=reap, args=(i, proc.pid), daemon=True)
            thread.start()
            threads.append(thread)
        deadline = started + timeout
        for thread in threads:
            thread.join(max(deadline - time.perf_counter(), 0.0))
    except BaseException:  # Ctrl-C included: children in their own sessions must not outlive us
        kill(procs)
        for thread in threads:
            thread.join()
        raise
    timed_out = [thread.is_alive() for thread in threads]
    kill([proc for proc, late in zip(procs, timed_out, strict=True) if late])
    for thread in threads:
        thread.join()
    children: list[ChildResult] = []
    for i, proc in enumerate(procs):
        result = reaped[i]
        code, rss, cpu, ended = (
            result if result is not None else (None, 0, 0.0, time.perf_counter())
        )
        if timer is not None:
            rss, cpu = _time_usage(rss_files[i], rss, cpu)
        proc.returncode = code  # reaped here: keep Popen from waiting for it again
        children.append(
            ChildResult(
                list(argvs[i]), code, rss, cpu, ended, timed_out[i], timeout, outs[i], errs[i]
            )
        )
    wall = max(child.ended for child in children) - started
    return Spawned(wall, children)


def _time_usage(path: Path, rss: int, cpu: float) -> tuple[int, float]:
    """``(peak RSS KiB, user + system s)`` from ``/usr/bin/time -f "%M %U %S"``'s last line.

    ``time`` writes a "Command exited with non-zero status" line first when the command
    failed; the figures are on the last line. The given values are the fallback.
    """
    try:
        lines = path.read_text().strip().splitlines()
        words = lines[-1].split() if lines else []
        return int(words[0]), float(words[1]) + float(words[2])
    except (OSError, ValueError, IndexError):
        return rss, cpu


def _ledger_files(state: Path) -> list[Path]:
    return [state, state.with_name(state.name + "-wal"), state.with_name(state.name + "-shm")]


def remove_ledger(state: Path) -> None:
    """Delete a SQLite ledger and its WAL and shared-memory files (a fresh ledger)."""
    for path in _ledger_files(state):
        path.unlink(missing_ok=True)


def ledger_mib(state: Path) -> float:
    """The ledger's size on disk: the database file plus its ``-wal`` (MiB)."""
    total = 0
    for path in _ledger_files(state)[:2]:
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total / 2**20
