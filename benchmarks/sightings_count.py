"""The cost of a watch's live count of files not ready yet: ``Run.statistics()`` (and the
``Sightings.waiting_by_rule(now)`` under it) with N files waiting (a micro-benchmark, not a
test: ``python -m benchmarks.sightings_count --files 100000``).

The watch's sightings are made of N records, seen by one full scan: files whose mtime is
older, in steps, than the settle, so that they become ready one after the other while the
counts are asked for (as a busy claim leaves them: settled, their look still to come).
``statistics()`` is asked at times that move forward by ``--step`` (0.1 s by default: the
progress line's rate): each call counts the files that became ready since the last. Also
timed first, with the time still (no file settles in between): ``statistics()``, ``totals()``
(metrics, heartbeat) and ``waiting_by_rule(now)`` alone. Prints the median of each, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio

from asyncbatch._config import BatchConfig
from asyncbatch._pipeline.runner import Run
from asyncbatch._pipeline.sightings import Sightings
from asyncbatch._scanner import pack

S = 1_000_000_000


async def _handler(ctx: Any) -> None:
    return None


def make_sightings(files: int, settle: float, now_ns: int, now: float) -> Sightings:
    """N files waiting: file i settles ``i / files * settle`` seconds after ``now``."""
    sightings = Sightings(settle=settle)
    records = sorted(
        pack(now_ns - int(settle * S) + i * int(settle * S) // files, b"f%07d.txt" % i, 10, i)
        for i in range(files)
    )
    assert sightings.scanned(records, now_ns, now) == []
    assert sightings.waiting == files
    return sightings


def timed(call: Any, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def measure(args: argparse.Namespace) -> None:
    """Make the run and its sightings, time the calls, print the medians."""
    settle = args.step * args.rounds  # the files settle over the rounds
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "src").mkdir()
        config = BatchConfig.from_settings(source=Path(tmp) / "src", state=f"{tmp}/s.db")
        run = Run(config, _handler, mode="watch", http=None)
        now_ns, now = time.time_ns(), 0.0
        sightings = make_sightings(args.files, settle, now_ns, now)
        by_rule = sightings.waiting_by_rule
        clock = [now]  # the monotonic time the counts are asked at
        run._state = SimpleNamespace(  # type: ignore[assignment]
            in_flight={}, waiting_now=lambda _t: by_rule(clock[0])
        )

        def moving(call: Any) -> Any:
            def step() -> Any:
                clock[0] += args.step
                return call()

            return step

        rows = {
            "statistics(), time still": timed(run.statistics, args.rounds),
            "totals(), time still": timed(run.totals, args.rounds),
            "waiting_by_rule(now), time still": timed(lambda: by_rule(clock[0]), args.rounds),
            "statistics(), files settling": timed(moving(run.statistics), args.rounds),
        }
        ready = by_rule(clock[0]).get("ready", 0)
    print(f"{args.files} waiting files ({ready} ready by the last count), {args.rounds} rounds")
    for name, times in rows.items():
        print(f"  {name:36} median {statistics.median(times):9.1f} us  max {max(times):9.1f} us")


def main() -> None:
    """Parse the arguments, measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--step", type=float, default=0.1)
    anyio.run(measure, parser.parse_args())


if __name__ == "__main__":
    main()
