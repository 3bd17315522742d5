"""The torture harness: a corpus, an idempotent receiver, runners to kill, and the invariants.

A :class:`Scenario` is one job over one corpus: an inbox of files whose names and bytes are
remembered, an output directory, an archive (``on_done="move:DIR"``), a ledger (SQLite or
PostgreSQL) with audit triggers that record every transition of an item to ``done``, and
optionally a :class:`Receiver` (a uvicorn process serving :mod:`tests.torture.receiver`).
Runners are real CLI subprocesses; they are killed with SIGKILL, by the test or by a failpoint.
After recovery, :meth:`Scenario.invariants` measures what must be zero.

``ASYNCBATCH_TORTURE=full`` (``make torture``) selects the full loops; without it each loop runs
its short version (``make test``). ``ASYNCBATCH_TORTURE_FIGURES`` names a JSON-lines file each
loop appends its figures to (see :mod:`tests.torture.figures`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from asyncbatch._effects.files import TEMP_PREFIX
from asyncbatch._ledger import open_ledger

from ..conftest import cli, spawn
from ..postgres import pg_sync
from .handlers import expected_output, output_name

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
HANDLERS = HERE / "handlers.py"
FULL = os.environ.get("ASYNCBATCH_TORTURE") == "full"
#: The suffix of the markers of a scenario with markers (``--ready marker:.done``).
MARKER = ".done"


def scale(short: int, full: int) -> int:
    """``full`` under ``make torture``, ``short`` in ``make test``."""
    return full if FULL else short


def record_figures(loop: str, **figures: Any) -> None:
    """Append one loop's figures to ``ASYNCBATCH_TORTURE_FIGURES`` (if set)."""
    path = os.environ.get("ASYNCBATCH_TORTURE_FIGURES")
    line = json.dumps({"loop": loop, "full": FULL, **figures}, sort_keys=True)
    print(f"torture figures: {line}")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_postgres(state: str) -> bool:
    return state.startswith(("postgresql://", "postgres://"))


def query(state: str, sql: str) -> list[tuple[Any, ...]]:
    """Run a read query (no parameters) on a ledger, SQLite or PostgreSQL."""
    if is_postgres(state):
        return pg_sync(state, sql)
    db = sqlite3.connect(state, timeout=30)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


def execute_script(state: str, script: str) -> None:
    """Run several statements on a ledger."""
    if is_postgres(state):

        async def run() -> None:
            conn = await asyncpg.connect(state, timeout=10)
            try:
                await conn.execute(script)
            finally:
                await conn.close()

        asyncio.run(run())
        return
    db = sqlite3.connect(state, timeout=30)
    try:
        db.executescript(script)
    finally:
        db.close()


_SQLITE_AUDIT = """
CREATE TABLE IF NOT EXISTS torture_completions (job TEXT, key TEXT, owner TEXT, fence INTEGER);
CREATE TABLE IF NOT EXISTS torture_done_touched (job TEXT, key TEXT, state TEXT, fence INTEGER);
CREATE TRIGGER IF NOT EXISTS torture_done AFTER UPDATE OF state ON items
WHEN NEW.state = 'done' AND OLD.state <> 'done'
BEGIN INSERT INTO torture_completions VALUES (NEW.job, NEW.key, NEW.owner, NEW.fence); END;
CREATE TRIGGER IF NOT EXISTS torture_touched AFTER UPDATE ON items
WHEN OLD.state = 'done' AND (NEW.state <> 'done' OR NEW.fence <> OLD.fence
                             OR NEW.owner IS NOT OLD.owner)
BEGIN INSERT INTO torture_done_touched VALUES (NEW.job, NEW.key, NEW.state, NEW.fence); END;
"""
_PG_AUDIT = """
CREATE TABLE torture_completions (job text, key text, owner text, fence bigint);
CREATE TABLE torture_done_touched (job text, key text, state text, fence bigint);
CREATE FUNCTION torture_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO torture_completions VALUES (NEW.job, NEW.key, NEW.owner, NEW.fence);
RETURN NEW; END $$;
CREATE FUNCTION torture_touched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO torture_done_touched VALUES (NEW.job, NEW.key, NEW.state, NEW.fence);
RETURN NEW; END $$;
CREATE TRIGGER torture_done AFTER UPDATE OF state ON items FOR EACH ROW
WHEN (NEW.state = 'done' AND OLD.state <> 'done') EXECUTE FUNCTION torture_done();
CREATE TRIGGER torture_touched AFTER UPDATE ON items FOR EACH ROW
WHEN (OLD.state = 'done' AND (NEW.state <> 'done' OR NEW.fence <> OLD.fence
                              OR NEW.owner IS DISTINCT FROM OLD.owner))
EXECUTE FUNCTION torture_touched();
"""


def create_ledger_with_audit(state: str) -> None:
    """Create the ledger (as a run would) and add the audit tables and triggers to it."""

    async def create() -> None:
        ledger = await open_ledger(state)
        await ledger.close()

    asyncio.run(create())
    execute_script(state, _PG_AUDIT if is_postgres(state) else _SQLITE_AUDIT)


class Receiver:
    """The idempotent receiver, a uvicorn process of its own (restarted after a crash)."""

    def __init__(self, state: str, effects: Path) -> None:
        self.state = state
        self.effects = effects
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.crashes = 0
        #: The failpoints of the next start, given the crashes so far.
        self.arm: Callable[[int], str] = lambda crashes: ""

    def start(self) -> None:
        """Start the receiver, armed with ``self.arm(crashes so far)``; wait until it answers.

        A receiver armed to die may die before it answers (a client's retry came first): that
        is a crash too, and it is started again.
        """
        while True:
            env = {
                **os.environ,
                "AB_STATE": self.state,
                "AB_EFFECTS": str(self.effects),
                "ASYNCBATCH_FAILPOINTS": self.arm(self.crashes),
            }
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "tests.torture.receiver:app",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "critical",
                    "--lifespan",
                    "on",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if self._ready():
                return

    def _ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while True:
            code = self.proc.poll()
            if code is not None:
                err = self.proc.communicate()[1]
                assert code == -signal.SIGKILL, f"the receiver exited with {code}: {err}"
                self.crashes += 1
                return False
            try:
                httpx.get(self.url + "/", timeout=1)
                return True
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the receiver did not start"
                time.sleep(0.05)

    def restart_if_dead(self) -> bool:
        """Start the receiver again if it died (SIGKILL by a failpoint); whether it had."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            return False
        err = self.proc.communicate()[1]
        assert code == -signal.SIGKILL, f"the receiver exited with {code}: {err}"
        self.crashes += 1
        self.start()
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc is not None:
            self.proc.communicate(timeout=30)

    def executions(self) -> collections.Counter[str]:
        """How many times the receiver applied its effect, by relpath."""
        if not self.effects.exists():
            return collections.Counter()
        text = self.effects.read_bytes().decode("utf-8", "surrogateescape")
        return collections.Counter(text.splitlines())


@contextlib.contextmanager
def receiving(state: str, effects: Path) -> Iterator[Receiver]:
    receiver = Receiver(state, effects)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def corpus_bytes(name: str, i: int) -> bytes:
    """The bytes of the ``i``-th file (or object) of a generation named ``name``: varied sizes
    and contents, a function of the name alone."""
    return (f"{name}:" * (1 + (i * 7919) % 23)).encode() + bytes([i % 251]) * (i % 97)


class Job:
    """What every scenario has, whatever its source (a directory: :class:`Scenario`; a bucket:
    :class:`tests.torture.buckets.BucketScenario`): runners of one job with one ledger, the
    handler's log, and the measures of the ledger, the receiver and the handler calls."""

    state: str
    url: str | None
    jobs: int
    env: Mapping[str, str]
    calls: Path
    #: Every input ever put in the inbox: name -> sha256 of its bytes.
    original: dict[str, str]

    def args(self) -> list[str]:
        raise NotImplementedError

    def environment(self, failpoints: str = "", **more: str) -> dict[str, str]:
        env = {"AB_LOG": str(self.calls), "ASYNCBATCH_FAILPOINTS": failpoints, **self.env}
        if self.url:
            env["AB_URL"] = self.url
        return {**env, **more}

    def spawn(
        self, failpoints: str = "", *, shared: bool = False, **more: str
    ) -> subprocess.Popen[str]:
        args = [*self.args(), *(["--shared"] if shared else [])]
        return spawn(*args, env=self.environment(failpoints, **more))

    def done(self) -> int:
        return int(query(self.state, "SELECT count(*) FROM items WHERE state = 'done'")[0][0])

    def invocations(self) -> int:
        if not self.calls.exists():
            return 0
        return self.calls.read_bytes().count(b"\n")

    def recover(self, attempts: int = 3) -> subprocess.CompletedProcess[str]:
        """Run to the end without failpoints (a second run if the first left a retry)."""
        result = cli(*self.args(), env=self.environment(), timeout=300)
        for _ in range(attempts - 1):
            if result.returncode == 0:
                break
            result = cli(*self.args(), env=self.environment(), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def ledger_invariants(self) -> dict[str, int]:
        """What must be zero of the ledger: every input one row, ``done``, completed once and
        never changed after; no runner record or job lock left."""
        found: dict[str, int] = {}
        states = dict(query(self.state, "SELECT state, count(*) FROM items GROUP BY state"))
        found["items_not_done"] = sum(n for s, n in states.items() if s != "done")
        found["items_missing"] = len(self.original) - int(states.get("done", 0))
        found["rows_per_file_beyond_one"] = int(
            query(
                self.state,
                "SELECT count(*) - count(DISTINCT relpath) FROM items",
            )[0][0]
        )
        completions = query(
            self.state, "SELECT key, count(*) FROM torture_completions GROUP BY key"
        )
        found["duplicate_completions"] = sum(int(n) - 1 for _, n in completions)
        found["items_done_without_a_recorded_completion"] = len(self.original) - len(completions)
        found["done_rows_changed_after_done"] = int(
            query(self.state, "SELECT count(*) FROM torture_done_touched")[0][0]
        )
        found["leftover_runners_and_locks"] = int(
            query(
                self.state,
                "SELECT (SELECT count(*) FROM runners) + (SELECT count(*) FROM task_lock)",
            )[0][0]
        )
        return found

    def receiver_and_integrity(self, receiver: Receiver | None) -> dict[str, int]:
        """What must be zero of the receiver (one effect per input) and of the SQLite files."""
        found: dict[str, int] = {}
        if receiver is not None:
            executed = receiver.executions()
            found["duplicate_effects"] = sum(n - 1 for n in executed.values())
            found["files_without_effect"] = len(set(self.original) - set(executed))
        if not is_postgres(self.state):
            found["integrity_check_failures"] = integrity_failures(Path(self.state))
            if receiver is not None and not is_postgres(receiver.state):
                found["integrity_check_failures"] += integrity_failures(Path(receiver.state))
        return found

    def handler_calls(self) -> collections.Counter[tuple[Runner, str]]:
        """How many times each runner (its host and pid) called the handler for each input."""
        if not self.calls.exists():
            return collections.Counter()
        text = self.calls.read_bytes().decode("utf-8", "surrogateescape")
        found: collections.Counter[tuple[Runner, str]] = collections.Counter()
        for line in text.splitlines():
            host, pid, name = line.split(" ", 2)
            found[(host, int(pid)), name] += 1
        return found

    def calls_not_in_flight_at_a_kill(self, killed: set[Runner]) -> int:
        """Handler calls beyond those a run may repeat: each input is handled once by the
        runner that recorded its completion, plus at most once by each runner SIGKILLed
        (``killed``: their host and pid) while it was in flight; any other call counts."""
        completer = {
            bytes(relpath).decode("utf-8", "surrogateescape"): (host_of(str(host)), int(pid))
            for relpath, host, pid in query(
                self.state,
                "SELECT i.relpath, r.host, r.pid FROM items i JOIN runs r ON r.owner = i.owner "
                "WHERE i.state = 'done'",
            )
        }
        beyond = 0
        for (runner, name), n in self.handler_calls().items():
            if runner in killed or runner == completer.get(name):
                beyond += n - 1  # the completing call, or one lost with its runner
            else:
                beyond += n  # a runner that lived and did not complete it: a repeat
        return beyond


#: A runner as its handler calls name it: its hostname and its pid (in its pid namespace).
Runner = tuple[str, int]


def host_of(recorded: str) -> str:
    """The hostname of a runner's recorded host (``NAME/pidns:INODE`` in a pid namespace)."""
    return recorded.split("/", 1)[0]


def this_host(proc: subprocess.Popen[str]) -> Runner:
    """A runner started on this host, as its handler calls name it."""
    return (socket.gethostname(), proc.pid)


@dataclass
class Scenario(Job):
    """One job over one corpus, and everything needed to check it after any number of kills."""

    root: Path
    state: str
    archive: Path
    url: str | None = None
    jobs: int = 4
    extra: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    #: Each file comes with a marker (``NAME.done``, written after it), and the job is ready
    #: by ``marker:.done``: markers follow their files to the archive.
    markers: bool = False
    #: Every file ever put in the inbox: name -> sha256 of its bytes.
    original: dict[str, str] = field(default_factory=dict)
    generation: int = 0

    def __post_init__(self) -> None:
        self.inbox = self.root / "inbox"
        self.out = self.root / "out"
        self.calls = self.root / "calls.log"
        for d in (self.inbox, self.out, self.archive):
            d.mkdir(parents=True, exist_ok=True)
        create_ledger_with_audit(self.state)

    def add_files(self, count: int) -> None:
        """Add ``count`` settled files of varied sizes and bytes (a new generation of names)."""
        base = time.time() - 30
        g = self.generation
        self.generation += 1
        for i in range(count):
            name = f"g{g:03d}-{i:05d}.dat"
            data = corpus_bytes(name, i)
            path = self.inbox / name
            path.write_bytes(data)
            os.utime(path, (base + i / 1000, base + i / 1000))
            self.original[name] = digest(data)
            if self.markers:
                marker = self.inbox / f"{name}{MARKER}"
                marker.touch()
                os.utime(marker, (base + i / 1000 + 1, base + i / 1000 + 1))

    def args(self) -> list[str]:
        return [
            "run",
            f"{HANDLERS}:transform_and_post",
            "--source",
            str(self.inbox),
            "--state",
            self.state,
            "--output-dir",
            str(self.out),
            "--on-done",
            f"move:{self.archive}",
            "-j",
            str(self.jobs),
            "--no-progress",
            "--settle",
            "0",  # the files were written a moment ago (ctime): see conftest.settled_now
            "--claim-batch",
            "32",
            "--max-attempts",
            "100",
            "--max-interruptions",
            "1000",
            *(["--ready", f"marker:{MARKER}"] if self.markers else []),
            *self.extra,
        ]

    def invariants(self, receiver: Receiver | None = None) -> dict[str, int]:
        """Everything that must be zero (or true) after recovery, measured."""
        found: dict[str, int] = {}
        inbox = _files(self.inbox)
        archived = _files(self.archive)
        if self.markers:
            found.update(marker_invariants(self.original, inbox, archived))
        kept = {n for n, h in self.original.items() if inbox.get(n) == h or archived.get(n) == h}
        found["files_lost"] = len(self.original) - len(kept)
        found["files_in_both_inbox_and_archive"] = len(set(inbox) & set(archived))
        found["files_not_archived"] = len(set(self.original) - set(archived))
        found["unknown_files"] = len((set(inbox) | set(archived)) - set(self.original))
        found.update(self.ledger_invariants())
        torn = missing = 0
        for name in self.original:
            out = self.out / output_name(name)
            source = self.archive / name if (self.archive / name).exists() else self.inbox / name
            if not out.exists():
                missing += 1
            elif out.read_bytes() != expected_output(source.read_bytes()):
                torn += 1
        found["torn_outputs"] = torn
        found["missing_outputs"] = missing
        found["orphan_temp_files"] = sum(
            1
            for d in (self.inbox, self.out, self.archive)
            for p in d.rglob("*")
            if p.name.startswith(TEMP_PREFIX)
        )
        found.update(self.receiver_and_integrity(receiver))
        return found


def marker_invariants(
    original: Mapping[str, str], inbox: dict[str, str], archived: dict[str, str]
) -> dict[str, int]:
    """What must be zero of the markers (taken out of ``inbox`` and ``archived``): each
    followed its file to the archive, once, and none is left behind."""
    markers = {f"{name}{MARKER}" for name in original}
    in_inbox = {n for n in inbox if n.endswith(MARKER)}
    in_archive = {n for n in archived if n.endswith(MARKER)}
    for name in in_inbox:
        del inbox[name]
    for name in in_archive:
        del archived[name]
    return {
        "markers_lost": len(markers - in_inbox - in_archive),
        "markers_left_in_the_inbox": len(in_inbox),
        "markers_unknown": len((in_inbox | in_archive) - markers),
    }


def _files(directory: Path) -> dict[str, str]:
    """The files of a directory (not below it): name -> sha256 of the bytes."""
    return {p.name: digest(p.read_bytes()) for p in directory.iterdir() if p.is_file()}


def integrity_failures(path: Path) -> int:
    """0 when ``PRAGMA integrity_check`` says ok."""
    result = query(str(path), "PRAGMA integrity_check")
    return 0 if result == [("ok",)] else len(result)


def assert_all_zero(found: Mapping[str, int], *, allow: Mapping[str, int] | None = None) -> None:
    """Every invariant is 0 (or, for those in ``allow``, at most the given bound)."""
    allow = allow or {}
    broken = {k: v for k, v in found.items() if v > allow.get(k, 0)}
    assert not broken, f"invariants broken: {broken} (all: {found})"


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the ``with`` block (root only), unmounted after."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at ``path`` ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)
