"""huey's ``SqliteHuey`` (WAL), one task per file, a consumer of 4 worker threads.

Its connection runs with ``synchronous=NORMAL`` like recipe's and asyncbatch's (``--synchronous
full`` for huey's default, SQLite's FULL: about 2.5x slower enqueues on this machine).

The producer lists the inbox and enqueues every file (one task each, as ``task(path)`` does),
then the consumer runs in this process until every task has completed. The reported wall time
runs from the start of the listing + enqueue to the last completion (interpreter start-up,
imports and consumer shutdown excluded); enqueue and consume are reported separately too.

``python -m benchmarks.systems.huey_bench --source DIR --state FILE [--recursive]
[--synchronous normal|full]``
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from huey import SqliteHuey
from huey.signals import SIGNAL_CANCELED, SIGNAL_COMPLETE, SIGNAL_ERROR, SIGNAL_EXPIRED

from ._scan import emit, scan, source_args

WORKERS = 4


class Progress:
    """Completions counted from huey's signals (sent in the worker threads)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.completed = 0
        self.errors = 0
        self.last = 0.0
        self.lock = threading.Lock()
        self.finished = threading.Event()
        if expected == 0:
            self.finished.set()

    def record(self, signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            if signal == SIGNAL_COMPLETE:
                self.completed += 1
            else:
                self.errors += 1
            self.last = time.perf_counter()
            if self.completed + self.errors >= self.expected:
                self.finished.set()


def _synchronous_normal(storage: Any) -> None:
    """Make the storage's connections ``synchronous=NORMAL``, as recipe and asyncbatch use.

    ``SqliteHuey`` offers only ``fsync=True`` (FULL, its default through SQLite's) or
    ``fsync=False`` (OFF); this compares the queues at the same durability.
    """
    create = storage._create_connection

    def create_normal() -> Any:
        conn = create()
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    storage._create_connection = create_normal


def read_file(path: str) -> None:
    """The task: read the whole file."""
    with open(path, "rb") as f:
        f.read()


def main() -> None:
    parser = source_args(__doc__ or "huey")
    parser.add_argument("--state", required=True)
    parser.add_argument(
        "--synchronous",
        choices=["normal", "full"],
        default="normal",
        help="PRAGMA synchronous of huey's connection (huey's own default leaves FULL)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    huey = SqliteHuey("bench", filename=args.state)
    if args.synchronous == "normal":
        _synchronous_normal(huey.storage)

    enqueue: Callable[[str], Any] = huey.task()(read_file)

    started = time.perf_counter()
    files = scan(args.source, recursive=args.recursive)
    scanned = time.perf_counter()
    progress = Progress(len(files))
    huey.signal(SIGNAL_COMPLETE, SIGNAL_ERROR, SIGNAL_CANCELED, SIGNAL_EXPIRED)(progress.record)
    for _, _, path, _ in files:
        enqueue(path)
    enqueued = time.perf_counter()

    consumer = huey.create_consumer(workers=WORKERS, worker_type="thread", periodic=False)
    consumer.start()
    progress.finished.wait()
    last = progress.last or time.perf_counter()
    consumer.stop(graceful=True)
    synchronous = huey.storage.conn.execute("PRAGMA synchronous").fetchone()[0]
    huey.storage.close()
    emit(
        {
            "synchronous": synchronous,
            "handled": progress.completed,
            "errors": progress.errors,
            "seen": len(files),
            "scan_s": scanned - started,
            "enqueue_s": enqueued - started,
            "consume_s": last - enqueued,
            "wall_s": last - started,
        }
    )


if __name__ == "__main__":
    main()
