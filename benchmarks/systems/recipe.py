"""The recipe: what a careful engineer writes by hand from the usual advice.

A ``ThreadPoolExecutor(8)`` over the sorted listing; per file, in a worker thread with its own
SQLite connection (WAL, ``synchronous=NORMAL``, ``busy_timeout`` set, retry on busy):

1. skip it if a ``done`` row exists;
2. take the per-file ``task_lock`` row with ``INSERT OR IGNORE`` (commit); skip if taken;
3. read the file;
4. ``INSERT INTO done ...`` (commit);
5. ``DELETE FROM task_lock ...`` (commit).

``python -m benchmarks.systems.recipe --source DIR --state FILE [--recursive]``
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._scan import ScannedFile, emit, scan, source_args

WORKERS = 8
BUSY_TIMEOUT_MS = 30_000
RETRIES = 50

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS task_lock ("
    " job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL,"
    " acquired_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS done ("
    " relpath TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
    " owner TEXT NOT NULL, finished_at REAL NOT NULL)",
)


def read_file(path: str, relpath: str) -> None:
    """The recipe's default work: read the whole file."""
    with open(path, "rb") as f:
        f.read()


class Recipe:
    """The state and the per-file procedure of one recipe run.

    ``work(path, relpath)`` is what is done to each file between taking its lock row and
    recording it done (by default: read it).
    """

    def __init__(self, state: str, work: Callable[[str, str], None] = read_file) -> None:
        self.state = state
        self.work = work
        self.owner = uuid.uuid4().hex
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.local = threading.local()
        self.connections: list[sqlite3.Connection] = []
        self.lock = threading.Lock()
        setup = self.connect()
        for statement in SCHEMA:
            self.execute(setup, statement)

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.state,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with self.lock:
            self.connections.append(conn)
        return conn

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = self.connect()
        return conn

    @staticmethod
    def execute(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> int:
        """One autocommitted statement, retried while the database is busy; its row count."""
        for attempt in range(RETRIES):
            try:
                return conn.execute(sql, params).rowcount
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                time.sleep(min(0.001 * 2**attempt, 0.1))
        raise RuntimeError(f"database still busy after {RETRIES} attempts: {sql}")

    def process(self, item: ScannedFile) -> bool:
        mtime_ns, relpath, path, size = item
        conn = self.connection()
        if conn.execute("SELECT 1 FROM done WHERE relpath = ?", (relpath,)).fetchone():
            return False
        taken = self.execute(
            conn,
            "INSERT OR IGNORE INTO task_lock (job_id, owner, pid, host, acquired_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (relpath, self.owner, self.pid, self.host, time.time()),
        )
        if not taken:
            return False
        try:
            self.work(path, relpath)
            self.execute(
                conn,
                "INSERT INTO done (relpath, size, mtime_ns, owner, finished_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (relpath, size, mtime_ns, self.owner, time.time()),
            )
        finally:
            self.execute(
                conn,
                "DELETE FROM task_lock WHERE job_id = ? AND owner = ?",
                (relpath, self.owner),
            )
        return True

    def close(self) -> None:
        for conn in self.connections:
            conn.close()


def run(
    source: str,
    state: str,
    *,
    recursive: bool,
    workers: int = WORKERS,
    work: Callable[[str, str], None] = read_file,
) -> dict[str, Any]:
    """One recipe run over ``source``: what it handled and its timings (the emitted JSON)."""
    started = time.perf_counter()
    recipe = Recipe(state, work)
    files = scan(source, recursive=recursive)
    scanned = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        handled = sum(pool.map(recipe.process, files))
    finished = time.perf_counter()
    done_rows = recipe.connection().execute("SELECT count(*) FROM done").fetchone()[0]
    recipe.close()
    return {
        "handled": handled,
        "done_rows": done_rows,
        "seen": len(files),
        "scan_s": scanned - started,
        "process_s": finished - scanned,
    }


def main() -> None:
    parser = source_args(__doc__ or "recipe")
    parser.add_argument("--state", required=True)
    args = parser.parse_args()
    emit(run(args.source, args.state, recursive=args.recursive))


if __name__ == "__main__":
    main()
