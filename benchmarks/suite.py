"""One measurement of each system over one inbox, verified, as a :class:`Sample`.

Every function raises :class:`~benchmarks.measure.BenchFailure` when its system did not handle
every file exactly as expected; the driver records that and goes on with the others.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .inbox import InboxSpec
from .measure import BenchFailure, Spawned, ledger_mib, remove_ledger, spawn
from .pg import PgServer

__all__ = [
    "SERIES",
    "SYSTEMS",
    "Context",
    "Sample",
    "Series",
    "asyncbatch_command",
    "measure_asyncbatch",
    "measure_floor",
    "measure_huey",
    "measure_pg",
    "measure_pg_resume",
    "measure_pg_shared",
    "measure_pg_shared4",
    "measure_recipe",
    "measure_resume",
    "measure_shared",
    "measure_shared4",
]

#: What ``--systems`` accepts. ``asyncbatch``: its run, resume and shared measurements over a
#: SQLite state; ``postgres``: the same over a PostgreSQL state; ``http``: the HTTP-bound
#: comparison (:mod:`benchmarks.http_suite`).
SYSTEMS = ("floor", "recipe", "huey", "asyncbatch", "postgres", "http")
SQLITE_SERIES = ("asyncbatch", "asyncbatch resume", "asyncbatch shared", "asyncbatch shared 4")
PG_SERIES = (
    "asyncbatch pg",
    "asyncbatch pg resume",
    "asyncbatch pg shared",
    "asyncbatch pg shared 4",
)
#: The rows of each table, in order.
SERIES = ("floor", "recipe", "huey", *SQLITE_SERIES, *PG_SERIES)
#: Runners of the "shared" and "shared 4" series.
SHARED_RUNNERS = 2
WIDE_RUNNERS = 4
CONCURRENCY = 16
HANDLER = "benchmarks.bench_handler:handle"


@dataclass(slots=True)
class Sample:
    """One measurement: wall seconds, peak RSS of the (largest) child, ledger size, details."""

    wall: float
    rss_mib: float
    ledger_mib: float | None = None
    details: dict[str, float] = field(default_factory=dict)
    #: CPU seconds (user + system) of the measured children together.
    cpu_s: float | None = None
    #: For PostgreSQL: the statements that took the server's time (``pg_stat_statements``).
    profile: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Series:
    """The repeated measurements of one system over one inbox."""

    name: str
    spec: InboxSpec
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def wall_min(self) -> float:
        return min(s.wall for s in self.samples)

    @property
    def wall_max(self) -> float:
        return max(s.wall for s in self.samples)

    @property
    def rate(self) -> float:
        return self.spec.n / self.wall if self.wall > 0 else float("inf")

    @property
    def rss_mib(self) -> float:
        return max(s.rss_mib for s in self.samples)

    @property
    def ledger_mib(self) -> float | None:
        sizes = [s.ledger_mib for s in self.samples if s.ledger_mib is not None]
        return statistics.median(sizes) if sizes else None

    @property
    def cpu_s(self) -> float | None:
        values = [s.cpu_s for s in self.samples if s.cpu_s is not None]
        return statistics.median(values) if values else None

    def detail(self, key: str) -> float | None:
        values = [s.details[key] for s in self.samples if key in s.details]
        return statistics.median(values) if values else None


@dataclass(frozen=True, slots=True)
class Context:
    """Where and how children run."""

    root: Path
    work: Path
    python: str
    asyncbatch: tuple[str, ...]
    timeout_base: float
    timeout_per_file: float
    #: The PostgreSQL server, when reachable (see ``pg_skip`` otherwise).
    pg: PgServer | None = None
    pg_skip: str | None = None

    def timeout(self, spec: InboxSpec) -> float:
        return self.timeout_base + self.timeout_per_file * spec.n

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "BENCH_HANDLED_LOG"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.root), env.get("PYTHONPATH", "")) if p
        )
        env.update(extra)
        return env

    def state(self, name: str) -> Path:
        directory = self.work / "state"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    def log_stem(self, system: str, spec: InboxSpec, rep: int) -> Path:
        return self.work / "logs" / f"{spec.name}-{system.replace(' ', '-')}-{rep}"

    def run(self, system: str, spec: InboxSpec, rep: int, *argvs: list[str], **env: str) -> Spawned:
        return spawn(
            argvs,
            cwd=self.root,
            env=self.env(**env),
            timeout=self.timeout(spec),
            log_stem=self.log_stem(system, spec, rep),
        )


def source_argv(inbox: Path, spec: InboxSpec) -> list[str]:
    return ["--source", str(inbox), *(["--recursive"] if spec.recursive else [])]


def _expect_handled(result: dict[str, object], key: str, n: int, what: str, tail: str) -> None:
    if result.get(key) != n:
        raise BenchFailure(f"{what}: {key} = {result.get(key)!r}, expected {n}", tail)


def measure_floor(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """scandir + stat + sort + read every file in one plain process."""
    argv = [ctx.python, "-m", "benchmarks.systems.floor", *source_argv(inbox, spec)]
    spawned = ctx.run("floor", spec, rep, argv)
    child = spawned.children[0]
    child.check("floor")
    result = child.last_json()
    _expect_handled(result, "handled", spec.n, "floor", child.stderr_tail())
    return Sample(spawned.wall, child.maxrss_mib, cpu_s=child.cpu_s)


def measure_recipe(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """The hand-written thread pool + SQLite lock row + completion row, a commit each."""
    state = ctx.state("recipe.db")
    remove_ledger(state)
    argv = [ctx.python, "-m", "benchmarks.systems.recipe", *source_argv(inbox, spec)]
    spawned = ctx.run("recipe", spec, rep, [*argv, "--state", str(state)])
    child = spawned.children[0]
    child.check("recipe")
    result = child.last_json()
    _expect_handled(result, "handled", spec.n, "recipe", child.stderr_tail())
    _expect_handled(result, "done_rows", spec.n, "recipe", child.stderr_tail())
    return Sample(spawned.wall, child.maxrss_mib, ledger_mib(state), cpu_s=child.cpu_s)


def measure_huey(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """SqliteHuey: enqueue a task per file, consume with 4 threads; wall = enqueue → last done."""
    state = ctx.state("huey.db")
    remove_ledger(state)
    argv = [ctx.python, "-m", "benchmarks.systems.huey_bench", *source_argv(inbox, spec)]
    spawned = ctx.run("huey", spec, rep, [*argv, "--state", str(state)])
    child = spawned.children[0]
    child.check("huey")
    result = child.last_json()
    _expect_handled(result, "handled", spec.n, "huey", child.stderr_tail())
    _expect_handled(result, "synchronous", 1, "huey (PRAGMA synchronous=NORMAL)", "")
    try:
        wall = float(result["wall_s"])
        details = {k: float(result[k]) for k in ("scan_s", "enqueue_s", "consume_s")}
    except (KeyError, TypeError, ValueError) as e:
        raise BenchFailure(f"huey: bad result {result!r}: {e}") from None
    details["process_s"] = spawned.wall
    return Sample(wall, child.maxrss_mib, ledger_mib(state), details, cpu_s=child.cpu_s)


def _run_argv(ctx: Context, spec: InboxSpec, inbox: Path, state: str) -> list[str]:
    return [
        *ctx.asyncbatch,
        "run",
        HANDLER,
        *source_argv(inbox, spec),
        "--state",
        state,
        "-j",
        str(CONCURRENCY),
        "--settle",
        "0",
        "--no-progress",
    ]


# -- what the ledger says ------------------------------------------------------------------------
#
# Counts come from the ledger through the operator commands' JSON (``asyncbatch status --json``
# and ``asyncbatch history --json``), never from the wording of the report line ``run`` prints.


def _operator_json(ctx: Context, state: str, *command: str) -> Any:
    proc = subprocess.run(
        [*ctx.asyncbatch, *command, "--state", state, "--json"],
        cwd=ctx.root,
        env=ctx.env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchFailure(f"asyncbatch {command[0]}: exit {proc.returncode}", proc.stderr[-2000:])
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise BenchFailure(
            f"asyncbatch {command[0]}: no JSON on stdout", proc.stderr[-2000:]
        ) from None


def status_done(ctx: Context, state: str) -> int:
    """How many items ``asyncbatch status --json`` counts done."""
    counts = _operator_json(ctx, state, "status").get("counts", {})
    done = counts.get("done", 0)
    if not isinstance(done, int):
        raise BenchFailure(f"asyncbatch status: bad counts {counts!r}")
    return done


def ledger_runs(ctx: Context, state: str, limit: int) -> list[tuple[int, int]]:
    """``(done, seen)`` of the last ``limit`` runs (``asyncbatch history --json``)."""
    runs = _operator_json(ctx, state, "history", "--limit", str(limit))
    try:
        return [(int(r["done"]), int(r["seen"])) for r in runs]
    except (KeyError, TypeError, ValueError):
        raise BenchFailure(f"asyncbatch history: unexpected JSON {str(runs)[:300]}") from None


def _check_single(ctx: Context, what: str, state: str, n: int, *, resume: bool, tail: str) -> None:
    """The last run handled ``n`` files (resume: none of them, all seen) and N are done."""
    done, seen = (ledger_runs(ctx, state, 1) or [(-1, -1)])[0]
    status = status_done(ctx, state)
    expected = 0 if resume else n
    if done != expected or seen != n or status != n:
        raise BenchFailure(
            f"{what}: the run did {done} of {seen} seen, status counts {status} done; "
            f"expected {expected} of {n}, and {n} done",
            tail,
        )


# -- one runner, resume, shared runners: over a SQLite state or a PostgreSQL schema ---------------


def _pg_server(ctx: Context) -> PgServer:
    if ctx.pg is None:
        raise BenchFailure(ctx.pg_skip or "PostgreSQL is not configured")
    return ctx.pg


def _spawn_ledger(
    ctx: Context, name: str, spec: InboxSpec, rep: int, argvs: list[list[str]], **env: str
) -> tuple[Spawned, dict[str, float], list[str]]:
    """Spawn runners; for PostgreSQL also the server's CPU and statements over that time."""
    pg = ctx.pg if name.startswith("asyncbatch pg") else None
    cpu0 = pg.cpu_seconds() if pg is not None else None
    stmts0 = pg.statements() if pg is not None else {}
    spawned = ctx.run(name, spec, rep, *argvs, **env)
    details: dict[str, float] = {}
    profile: list[str] = []
    if pg is not None:
        cpu1 = pg.settled_cpu_seconds()
        if cpu0 is not None and cpu1 is not None:
            details["server_cpu_s"] = cpu1 - cpu0
        for s in PgServer.delta(stmts0, pg.statements()):
            per_row = f"{s.total_ms * 1000 / s.rows:,.1f} µs/row" if s.rows else "no rows"
            profile.append(
                f"{s.calls} calls, {s.total_ms:,.0f} ms ({per_row}), "
                f"{s.wal_records:,} WAL records: {s.short}"
            )
    details["runner_cpu_s"] = spawned.cpu_s
    return spawned, details, profile


def _fresh_run(
    ctx: Context, name: str, spec: InboxSpec, inbox: Path, rep: int, state: str
) -> Sample:
    spawned, details, profile = _spawn_ledger(
        ctx, name, spec, rep, [_run_argv(ctx, spec, inbox, state)]
    )
    child = spawned.children[0]
    child.check(name)
    _check_single(ctx, name, state, spec.n, resume=False, tail=child.stderr_tail())
    return Sample(spawned.wall, child.maxrss_mib, None, details, spawned.cpu_s, profile)


def _resume_run(
    ctx: Context, name: str, spec: InboxSpec, inbox: Path, rep: int, state: str
) -> Sample:
    spawned, details, profile = _spawn_ledger(
        ctx, name, spec, rep, [_run_argv(ctx, spec, inbox, state)]
    )
    child = spawned.children[0]
    child.check(name)
    _check_single(ctx, name, state, spec.n, resume=True, tail=child.stderr_tail())
    return Sample(spawned.wall, child.maxrss_mib, None, details, spawned.cpu_s, profile)


def _shared_run(
    ctx: Context, name: str, spec: InboxSpec, inbox: Path, rep: int, state: str, runners: int
) -> Sample:
    """``runners`` ``--shared`` runners started together; checked for duplicates.

    Each runner's handler records the relpaths it handled (``BENCH_HANDLED_LOG``); every file
    must appear exactly once over all logs, the runs' ``done`` (``asyncbatch history``) must add
    up to N, and ``asyncbatch status`` must count N done.
    """
    log_base = ctx.work / "logs" / f"{spec.name}-{name.replace(' ', '-')}-{rep}-handled"
    for old in log_base.parent.glob(log_base.name + ".*"):
        old.unlink()
    argv = [*_run_argv(ctx, spec, inbox, state), "--shared"]
    spawned, details, profile = _spawn_ledger(
        ctx, name, spec, rep, [argv] * runners, BENCH_HANDLED_LOG=str(log_base)
    )
    for i, child in enumerate(spawned.children):
        child.check(f"{name} runner {i + 1}")
    dones = [done for done, _ in ledger_runs(ctx, state, runners)]
    handled: Counter[str] = Counter()
    logs = sorted(log_base.parent.glob(log_base.name + ".*"))
    for log in logs:
        handled.update(log.read_text(errors="surrogateescape").splitlines())
    duplicates = sum(count - 1 for count in handled.values() if count > 1)
    counted = status_done(ctx, state)
    problems = []
    if len(dones) != runners or sum(dones) != spec.n:
        problems.append(f"the runs' done add up to {sum(dones)} ({' + '.join(map(str, dones))})")
    if len(handled) != spec.n:
        problems.append(f"{len(handled)} distinct files handled in {len(logs)} logs")
    if duplicates:
        problems.append(f"{duplicates} files handled twice")
    if counted != spec.n:
        problems.append(f"status counts {counted} done")
    if problems:
        raise BenchFailure(f"{name}: {'; '.join(problems)}, expected {spec.n}")
    details["duplicates"] = float(duplicates)
    details.update({f"runner{i + 1}_done": float(d) for i, d in enumerate(sorted(dones))})
    return Sample(spawned.wall, spawned.maxrss_mib, None, details, spawned.cpu_s, profile)


def measure_asyncbatch(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """``asyncbatch run`` (the CLI, start-up included) over a fresh SQLite ledger."""
    state = ctx.state("asyncbatch.db")
    remove_ledger(state)
    sample = _fresh_run(ctx, "asyncbatch", spec, inbox, rep, str(state))
    sample.ledger_mib = ledger_mib(state)
    return sample


def measure_resume(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """The same command again over the all-done inbox (the ledger the last run left)."""
    state = ctx.state("asyncbatch.db")
    if not state.exists():
        raise BenchFailure("asyncbatch resume: no ledger from a completed run")
    sample = _resume_run(ctx, "asyncbatch resume", spec, inbox, rep, str(state))
    sample.ledger_mib = ledger_mib(state)
    return sample


def _sqlite_shared(ctx: Context, spec: InboxSpec, inbox: Path, rep: int, runners: int) -> Sample:
    name = "asyncbatch shared" + ("" if runners == SHARED_RUNNERS else f" {runners}")
    state = ctx.state("shared.db")
    remove_ledger(state)
    sample = _shared_run(ctx, name, spec, inbox, rep, str(state), runners)
    sample.ledger_mib = ledger_mib(state)
    return sample


def measure_shared(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """Two ``--shared`` runners over a fresh SQLite ledger (see :func:`_shared_run`)."""
    return _sqlite_shared(ctx, spec, inbox, rep, SHARED_RUNNERS)


def measure_shared4(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """Four ``--shared`` runners over a fresh SQLite ledger."""
    return _sqlite_shared(ctx, spec, inbox, rep, WIDE_RUNNERS)


def measure_pg(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """``asyncbatch run`` over a fresh PostgreSQL schema, kept for :func:`measure_pg_resume`."""
    pg = _pg_server(ctx)
    schema = pg.fresh_schema()
    try:
        sample = _fresh_run(ctx, "asyncbatch pg", spec, inbox, rep, pg.state(schema))
    except BaseException:
        pg.drop(schema)
        raise
    sample.ledger_mib = pg.schema_mib(schema)
    pg.resumable = schema
    return sample


def measure_pg_resume(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """The same command again over the schema the last PostgreSQL run left; then dropped."""
    pg = _pg_server(ctx)
    schema, pg.resumable = pg.resumable, None
    if schema is None:
        raise BenchFailure("asyncbatch pg resume: no schema from a completed run")
    try:
        sample = _resume_run(ctx, "asyncbatch pg resume", spec, inbox, rep, pg.state(schema))
        sample.ledger_mib = pg.schema_mib(schema)
    finally:
        pg.drop(schema)
    return sample


def _pg_shared(ctx: Context, spec: InboxSpec, inbox: Path, rep: int, runners: int) -> Sample:
    pg = _pg_server(ctx)
    name = "asyncbatch pg shared" + ("" if runners == SHARED_RUNNERS else f" {runners}")
    schema = pg.fresh_schema()
    try:
        sample = _shared_run(ctx, name, spec, inbox, rep, pg.state(schema), runners)
        sample.ledger_mib = pg.schema_mib(schema)
    finally:
        pg.drop(schema)
    return sample


def measure_pg_shared(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """Two ``--shared`` runners over a fresh PostgreSQL schema."""
    return _pg_shared(ctx, spec, inbox, rep, SHARED_RUNNERS)


def measure_pg_shared4(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """Four ``--shared`` runners over a fresh PostgreSQL schema."""
    return _pg_shared(ctx, spec, inbox, rep, WIDE_RUNNERS)


def asyncbatch_command(python: str) -> tuple[str, ...]:
    """The ``asyncbatch`` console script next to ``python``, else ``python -m asyncbatch``."""
    script = Path(python).parent / "asyncbatch"
    if script.exists():
        return (str(script),)
    return (python or sys.executable, "-m", "asyncbatch")
