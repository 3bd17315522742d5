"""Shared helpers: real inboxes in tmp_path, real SQLite ledgers, the CLI as a subprocess."""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncbatch import Batch
from asyncbatch._ledger import JobSettings, RunStart
from asyncbatch._procinfo import ProcessIdentity, this_process

from .postgres import Server, pg_sync, probe, require, with_schema
from .s3 import Bucket, MotoServer, start_server

HERE = Path(__file__).parent
#: The CLI under test fails on a RuntimeWarning, as tests in this process do (filterwarnings):
#: a report whose counts do not add up warns.
WARNINGS_FAIL = {"PYTHONWARNINGS": "error::RuntimeWarning"}
HANDLERS = HERE / "cli_handlers.py"


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Collect with bytecode writes allowed: pytest keeps each test module with its asserts
    rewritten in ``__pycache__`` only then, and rewriting them all again costs each xdist worker
    ~4 s at every start under PYTHONDONTWRITEBYTECODE (set on the machines this runs on). The
    tests themselves, and the processes they start, run under the setting as it was."""
    writes = sys.dont_write_bytecode
    sys.dont_write_bytecode = False
    try:
        return (yield)
    finally:
        sys.dont_write_bytecode = writes


def make_files(
    directory: Path, count: int, *, age: float = 30.0, prefix: str = "f", size: int = 16
) -> list[Path]:
    """Create ``count`` files (mtime ``age`` seconds ago, 1 ms apart). Their ctime is now:
    they are settled for a run with ``settle=0`` (or once ``settle`` seconds passed)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = time.time() - age
    paths = []
    for i in range(count):
        path = directory / f"{prefix}{i:05d}.txt"
        path.write_bytes(f"{prefix}{i:05d}\n".encode().ljust(size, b"."))
        os.utime(path, (base + i / 1000, base + i / 1000))
        paths.append(path)
    return paths


async def until_settled(settle: float, *paths: Path) -> None:
    """Wait until the files' mtime and ctime are ``settle`` seconds old: a wait computed from
    the files' own times, which a slow machine only makes longer, never too short."""
    changed = max(max(st.st_mtime_ns, st.st_ctime_ns) for st in map(os.stat, paths)) / 1e9
    await anyio.sleep(max(0.0, changed + settle - time.time()) + 0.01)


async def polls_after(batch: Batch, count: int = 3, within: float = 60.0) -> None:
    """Wait until the watching ``batch`` has finished ``count`` polls (scans) since this call:
    the last ``count - 1`` of them began after it, and a poll's claims are made before the
    next one begins. What a test asserts did not happen after some event (a file handled
    twice), it asserts once this proved that the watch looked again since."""
    since = time.monotonic()
    with anyio.fail_after(within):
        for _ in range(count):
            while True:
                seen = batch._observe()
                scan = None if seen is None else seen.last_scan
                if scan is not None and scan.ended > since:
                    break
                await anyio.sleep(0.01)
            since = scan.ended


#: The source a ledger test records for its jobs (never scanned: the ledger only stores it).
SOURCE = "/srv/asyncbatch-test/inbox"


def run_start(
    owner: str = "a",
    *,
    job: str = "j",
    me: ProcessIdentity | None = None,
    ttl: float = 60.0,
    shared: bool = False,
    mode: str = "run",
    identity: str = "stat",
    source: str = SOURCE,
    ready_given: bool = False,
    **rules: Any,
) -> RunStart:
    """What a runner hands ``Ledger.start_runner`` (this process, job ``j``, exclusive;
    ``rules``: the settings' scan and readiness rules)."""
    return RunStart(
        job=job,
        owner=owner,
        me=me or this_process(),
        ttl=ttl,
        shared=shared,
        mode=mode,
        identity=identity,
        settings=JobSettings(source=source, **rules),
        ready_given=ready_given,
    )


def rows(state: Path, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run a read query against a ledger with plain sqlite3."""
    db = sqlite3.connect(state)
    try:
        return list(db.execute(query, params))
    finally:
        db.close()


def ledger_rows(state: str, query: str) -> list[tuple[Any, ...]]:
    """Run a read query (no parameters) against a SQLite or PostgreSQL ledger."""
    if state.startswith("postgresql://"):
        return pg_sync(state, query)
    return rows(Path(state), query)


def take_over_lease(state: str, relpath: str) -> None:
    """Do to ``relpath``'s item what another runner's claim of its lease (run out) does: a
    new owner and fence (its lease already run out again, so that the runner that lost it
    takes it back later: the run can end), its started attempt counted as interrupted."""
    if state.startswith("postgresql://"):
        pg_sync(
            state,
            "UPDATE items SET owner = 'another runner', fence = fence + 1, lease_until = 0, "
            "interrupted = interrupted + (started_fence IS NOT DISTINCT FROM fence)::int "
            f"WHERE relpath = '{relpath}'::bytea",
        )
        return
    db = sqlite3.connect(state, timeout=30)
    try:
        with db:
            db.execute(
                "UPDATE items SET owner = 'another runner', fence = fence + 1, lease_until = 0,"
                " interrupted = interrupted + (started_fence IS fence) WHERE relpath = ?",
                (relpath.encode(),),
            )
    finally:
        db.close()


def state_counts(state: Path, job: str = "default") -> dict[str, int]:
    """Items by state."""
    found = rows(state, "SELECT state, count(*) FROM items WHERE job=? GROUP BY state", (job,))
    return {str(s): int(n) for s, n in found}


def settled_now(args: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The arguments of a CLI call, ``run`` and ``explain`` given ``--settle 0`` unless they
    have a ``--settle``.

    A file is settled once its mtime *and* its ctime are ``--settle`` seconds old, and a test's
    files were all written a moment ago (``make_files`` can set their mtime back, but nothing
    sets a ctime back): every test but those of settling itself runs without the wait.
    """
    words = [str(a) for a in args]
    if words[:1] in (["run"], ["explain"]) and not any(w.startswith("--settle") for w in words):
        words[1:1] = ["--settle", "0"]
    return words


def cli(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m asyncbatch ARGS`` and capture its output (``run`` without a
    ``--settle`` gets ``--settle 0``: see :func:`settled_now`)."""
    full_env = {**os.environ, **WARNINGS_FAIL, **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "asyncbatch", *settled_now(args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.Popen[str]:
    """Start ``python -m asyncbatch ARGS`` in the background (``run``: see
    :func:`settled_now`; ``preexec_fn`` runs in the child before it starts: to lower a
    resource limit, say)."""
    return subprocess.Popen(
        [sys.executable, "-m", "asyncbatch", *settled_now(args)],
        cwd=cwd,
        env={**os.environ, **WARNINGS_FAIL, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def kill(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> str:
    """Send ``sig`` to a spawned CLI, reap it, and return its stderr."""
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return err


def invocations(log: Path) -> collections.Counter[str]:
    """How often the ``record`` handler ran for each file (its AB_LOG lines)."""
    if not log.exists():
        return collections.Counter()
    return collections.Counter(log.read_text().splitlines())


def start_recording(
    inbox: Path,
    state: Path | str,
    log: Path,
    *options: str,
    jobs: int,
    sleep: float,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.Popen[str]:
    """Start ``asyncbatch run`` with the ``record`` handler, each item taking ``sleep`` s
    (``options``: more of the command line, ``--shared`` say; ``preexec_fn``: as
    :func:`spawn`'s)."""
    return spawn(
        "run",
        f"{HANDLERS}:record",
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        str(jobs),
        "--no-progress",
        *options,
        env={"AB_LOG": str(log), "AB_SLEEP": str(sleep)},
        preexec_fn=preexec_fn,
    )


async def until(predicate: Callable[[], bool | Awaitable[bool]], within: float = 30.0) -> None:
    """Wait on the event loop until ``predicate()`` holds (a coroutine function's: its
    result, awaited), for what the code sets no event for (a count, a server's state); fail
    the test after ``within`` seconds."""
    with anyio.fail_after(within):
        while True:
            holds = predicate()
            if holds if isinstance(holds, bool) else await holds:
                return
            await anyio.sleep(0.02)


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """An empty source directory."""
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Where the ledger goes (not created yet)."""
    return tmp_path / "state.db"


@pytest.fixture(scope="session")
def postgres_server() -> Server:
    """The test PostgreSQL server, probed once per session (see tests/postgres.py)."""
    return probe()


@pytest.fixture(params=["sqlite", "postgres"])
def any_state(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger for a CLI test: once a SQLite file (not created yet), once a PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
def pg_dsn(postgres_server: Server) -> Iterator[str]:
    """A DSN whose ledger lives in a fresh schema, dropped after the test."""
    require(postgres_server)
    schema = f"abtest_{uuid.uuid4().hex[:12]}"
    yield with_schema(postgres_server.dsn, schema)
    pg_sync(postgres_server.dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A real S3 API on 127.0.0.1 (moto), started once per session (see tests/s3.py)."""
    yield from start_server()


@pytest.fixture
def bucket(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket, and this process's AWS environment pointing at the test server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return Bucket(s3_server)
