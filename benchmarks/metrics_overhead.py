"""The in-process cost of metrics: ``Batch(metrics=True)`` against metrics off, over N files.

    .venv/bin/python -m benchmarks.metrics_overhead --files 20000 --pairs 4

Makes N small settled files once, then runs ``Batch.run()`` over them in interleaved pairs
(off, on, off, on, ...), each run on a fresh SQLite state, the handler reading its input (the
benchmark's ``handle``). Prints each run's wall time, the medians, and the cost per file of the
hooks themselves (``Recorder.attempt_ended``, timed alone). Interleaving spreads the machine's
drift over both sides; the figures are noisy (±20% on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from asyncbatch import Batch
from asyncbatch._ledger import Outcome
from asyncbatch._pipeline import Recorder

from .bench_handler import handle


def make_inbox(root: Path, count: int) -> Path:
    inbox = root / "inbox"
    inbox.mkdir()
    old = time.time() - 86400
    for i in range(count):
        path = inbox / f"f{i:07d}.txt"
        path.write_bytes(b"x" * 128)
        os.utime(path, (old + i / 1e6, old + i / 1e6))
    return inbox


async def one_run(inbox: Path, state: Path, *, metrics: bool) -> tuple[float, float]:
    """Wall and CPU seconds (this process, its threads included) of one run."""
    batch = Batch(handle, source=inbox, state=state, concurrency=32, metrics=metrics)
    began, cpu = time.perf_counter(), time.process_time()
    report = await batch.run()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    assert report.ok, report
    assert report.done == report.seen
    return elapsed, cpu


def hook_cost(samples: int = 1_000_000) -> float:
    """Seconds per call of the per-item hook with metrics on."""
    recorder = Recorder()
    outcome = Outcome("k", 1, "done")
    began = time.perf_counter()
    for _ in range(samples):
        recorder.attempt_ended(outcome, 0.0012)
    return (time.perf_counter() - began) / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ab-metrics-"))
    try:
        inbox = make_inbox(root, args.files)
        times: dict[bool, list[float]] = {False: [], True: []}
        cpus: dict[bool, list[float]] = {False: [], True: []}
        for pair in range(args.pairs):
            for metrics in (False, True):
                state = root / f"state-{pair}-{metrics}.db"
                elapsed, cpu = asyncio.run(one_run(inbox, state, metrics=metrics))
                times[metrics].append(elapsed)
                cpus[metrics].append(cpu)
                side = "on " if metrics else "off"
                print(f"pair {pair + 1}: metrics {side} {elapsed:.2f}s wall, {cpu:.2f}s CPU")
        for what, runs in (("wall", times), ("CPU", cpus)):
            off, on = statistics.median(runs[False]), statistics.median(runs[True])
            print(
                f"median {what}: off {off:.2f}s, on {on:.2f}s: {100 * (on - off) / off:+.1f}%, "
                f"{1e6 * (on - off) / args.files:+.2f} us per file"
            )
        print(f"the per-item hook alone: {1e9 * hook_cost():.0f} ns a call")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
