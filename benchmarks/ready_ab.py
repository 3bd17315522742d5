"""The default readiness rule's cost, A/B: the same ``asyncbatch run`` with the code of a base
commit (A) and of this checkout (B), interleaved.

    .venv/bin/python -m benchmarks.ready_ab --base ef74ae2 --files 100000 --pairs 5

Makes N small settled files once (a temp directory), exports the base commit's ``asyncbatch``
package (``git archive``) beside it, then runs ``python -m asyncbatch run
benchmarks/bench_handler.py:handle --source INBOX --state FRESH --settle 0 --no-progress`` in
pairs (A then B, then B then A: the machine's drift spreads over both sides), each a child
process on a fresh SQLite state, ``PYTHONPATH`` choosing the code. Each run's exit status and
report are checked (every file done); its CPU (user + system, from ``wait4``: steadier than
the wall on a shared machine) and wall are printed, then the medians and B/A.

``--scan`` measures the one part of a run the rules changed, the scan, alone: each side's
``Scanner(...).scan(settle=0)`` over the inbox, in a child process of its own, CPU of the scan
only (``time.process_time``, the walking thread included), the best of 3 per child.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import ensure_bytecode

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "benchmarks" / "bench_handler.py"


def make_inbox(root: Path, count: int) -> Path:
    inbox = root / "inbox"
    inbox.mkdir()
    old = time.time() - 86400
    for i in range(count):
        path = inbox / f"f{i:07d}.txt"
        path.write_bytes(b"x" * 128)
        os.utime(path, (old + i / 1e6, old + i / 1e6))
    return inbox


def export_base(base: str, into: Path) -> Path:
    """The base commit's package, as ``into/asyncbatch`` (its docs and all)."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", base, "asyncbatch"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def one_run(code: Path, inbox: Path, state: Path, cwd: Path, files: int) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of the code under ``code``."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "asyncbatch", "run", f"{HANDLER}:handle", "--source",
            str(inbox), "--state", str(state), "--settle", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code)}
    began = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or f"{files} seen: {files} done" not in out:
        raise SystemExit(f"run failed ({proc.returncode}): {out}{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


_SCAN = """
import asyncio, sys, time
from pathlib import Path
from asyncbatch._scanner import Scanner, ScanRules
kw = {}
if "ready" in Scanner.__init__.__code__.co_varnames:  # the rules' code: as a run makes it
    from asyncbatch._ready import Readiness, Age
    kw["ready"] = Readiness((Age(),), 0.0)
scanner = Scanner(Path(sys.argv[1]), rules=ScanRules(), **kw)
best = None
for _ in range(3):
    began = time.process_time()
    records = asyncio.run(scanner.scan(settle=0))
    cpu = time.process_time() - began
    best = cpu if best is None else min(best, cpu)
assert len(records) == int(sys.argv[2]), len(records)
print(best)
"""


def one_scan(code: Path, inbox: Path, cwd: Path, files: int) -> float:
    """CPU seconds of the best of 3 scans of ``inbox`` by the code under ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, "-c", _SCAN, str(inbox), str(files)],
        cwd=cwd, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare with (A)")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--scan", action="store_true", help="the scan alone (see above)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ab-ready-"))
    try:
        inbox = make_inbox(root, args.files)
        sides = {"A": export_base(args.base, root / "base"), "B": ROOT}
        ensure_bytecode(*sides.values())
        cwd = root / "cwd"
        cwd.mkdir()
        one_run(sides["B"], inbox, root / "warm.db", cwd, args.files)  # the page cache, warm
        if args.scan:
            scans: dict[str, list[float]] = {"A": [], "B": []}
            for pair in range(args.pairs):
                for side in "AB" if pair % 2 == 0 else "BA":
                    scans[side].append(one_scan(sides[side], inbox, cwd, args.files))
                    print(f"pair {pair + 1} {side}: scan {scans[side][-1]:.3f} s CPU", flush=True)
            a, b = statistics.median(scans["A"]), statistics.median(scans["B"])
            print(f"median scan CPU: A {a:.3f} s, B {b:.3f} s, B/A {b / a:.3f}")
            return
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        wall: dict[str, list[float]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for side in "AB" if pair % 2 == 0 else "BA":
                w, c = one_run(sides[side], inbox, root / "state.db", cwd, args.files)
                wall[side].append(w)
                cpu[side].append(c)
                print(f"pair {pair + 1} {side}: {c:6.2f} s CPU {w:6.2f} s wall", flush=True)
        for what, runs in (("CPU", cpu), ("wall", wall)):
            a, b = statistics.median(runs["A"]), statistics.median(runs["B"])
            print(f"median {what}: A {a:.2f} s, B {b:.2f} s, B/A {b / a:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
