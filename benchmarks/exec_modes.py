"""Where a ``run --exec`` at ``-j`` = the core count spends its starts: the two modes of a run
(``python -m benchmarks.exec_modes``; see benchmarks/RESULTS.md, "Two modes of a run").

Runs ``asyncbatch run --exec 'cksum {}'`` over one inbox, ``--runs`` times per variant, each in
a child process whose ``posix_spawn`` calls are timed (the event loop waits through each one's
``vfork`` until the command's ``execve``), and prints per run: the wall time, the median start
and the medians of each fifth of the run's starts. A run whose median start is several times
the others' had its commands placed behind one another (the "serial" mode).

Each run also prints the event loop thread's utilisation estimate (``se.avg.util_est`` of
``/proc/thread-self/sched``, 1024 = a whole CPU; absent on kernels built without
``CONFIG_SCHED_DEBUG``) at its first start and at its 500th: a run whose estimate is still
above ~875 once its commands fill the CPUs keeps it, and places its commands one behind the
other to its end (see ``WorkerPool._before_first_command``).

Variants, each a step just before the run's first command (nothing else differs; all but
``none`` without asyncbatch's own delay):

- ``none``: as asyncbatch runs (with its ``FIRST_COMMAND_DELAY`` where ``-j`` fills the CPUs);
- ``undelayed``: without that delay (as asyncbatch ran before it);
- ``pause``: ``time.sleep(PAUSE)`` (the runner's CPU use of its start-up decays first);
- ``burn``: ``PAUSE`` s asleep, then ``BURN`` s of CPU on the runner's thread;
- ``late-pause``: as ``undelayed``, and ``PAUSE`` s asleep before the 700th command.

Measurement only: it imports asyncbatch in the child, wraps ``asyncbatch._exec._spawn``, and
writes nothing but its lines to the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .inbox import InboxSpec, ensure_inbox, warm_up
from .measure import ROOT, ensure_bytecode

#: The child: times every start, runs the CLI, prints one JSON line to stderr.
_CHILD = r"""
import json, os, statistics, sys, time
import asyncbatch._exec as ex
variant, pause, burn = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
spawn, times, count, estimates = ex._spawn, [], [0], []
if variant != "none":
    import asyncbatch._pipeline.workers as workers
    workers.FIRST_COMMAND_DELAY = 0
def estimate():
    try:
        with open("/proc/thread-self/sched") as f:
            for line in f:
                if line.startswith("se.avg.util_est"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return None
def timed(*args, **kwargs):
    count[0] += 1
    if count[0] in (1, 500):
        estimates.append(estimate())
    if count[0] == 1 and variant in ("pause", "burn"):
        time.sleep(pause)
        if variant == "burn":
            end = time.perf_counter() + burn
            while time.perf_counter() < end:
                pass
    if count[0] == 700 and variant == "late-pause":
        time.sleep(pause)
    began = time.perf_counter()
    try:
        return spawn(*args, **kwargs)
    finally:
        times.append(time.perf_counter() - began)
ex._spawn = timed
from asyncbatch._cli.main import main
sys.argv = ["asyncbatch", *sys.argv[4:]]
began = time.perf_counter()
try:
    code = main()
except SystemExit as e:
    code = e.code
fifth = max(1, len(times) // 5)
print(json.dumps({
    "code": code,
    "wall": time.perf_counter() - began,
    "median_us": statistics.median(times) * 1e6,
    "estimates": estimates,
    "fifths_us": [statistics.median(times[i:i + fifth]) * 1e6
                  for i in range(0, len(times), fifth)][:5],
}), file=sys.stderr)
"""


def _run(inbox: Path, variant: str, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="exec-modes-") as tmp:
        argv = [
            sys.executable,
            "-c",
            _CHILD,
            variant,
            str(args.pause),
            str(args.burn),
            "run",
            "--exec",
            "cksum {}",
            "--source",
            str(inbox),
            "--state",
            str(Path(tmp) / "state.db"),
            "-j",
            str(args.jobs),
            "--settle",
            "0",
            "--no-progress",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    result: dict[str, object] = json.loads(done.stderr.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{variant}: exit {result['code']}: {done.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exec_modes")
    parser.add_argument("--files", type=int, default=2000, help="files in the inbox (2,000)")
    parser.add_argument("--jobs", type=int, default=2, help="-j (2)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant (5)")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds asleep (0.1)")
    parser.add_argument("--burn", type=float, default=0.1, help="seconds of CPU (0.1)")
    parser.add_argument(
        "--variants",
        default="none,undelayed",
        help="comma-separated: none, undelayed, pause, burn, late-pause (none,undelayed)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    args = parser.parse_args()
    ensure_bytecode()
    spec = InboxSpec(args.files)
    inbox, _ = ensure_inbox(args.work, spec)
    warm_up(inbox, spec)
    variants = args.variants.split(",")
    for number in range(1, args.runs + 1):  # interleaved: the machine's load drifts
        for variant in variants:
            r = _run(inbox, variant, args)
            fifths = " ".join(f"{v:.0f}" for v in r["fifths_us"])  # type: ignore[attr-defined]
            estimates = "/".join(str(e) for e in r["estimates"])  # type: ignore[attr-defined]
            print(
                f"run {number} {variant:<10} wall {r['wall']:.2f} s, start median "
                f"{r['median_us']:.0f} us, by fifths {fifths}; loop thread's util_est at "
                f"the 1st/500th start {estimates}",
                flush=True,
            )


if __name__ == "__main__":
    main()
