"""One measurement of each system over one inbox, verified, as a :class:`Sample`.

Every function raises :class:`~benchmarks.measure.BenchFailure` when its system did not handle
every file exactly as expected; the driver records that and goes on with the others.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .inbox import InboxSpec
from .measure import BenchFailure, Spawned, ledger_mib, remove_ledger, spawn

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
    "measure_recipe",
    "measure_resume",
    "measure_shared",
]

#: What ``--systems`` accepts; ``asyncbatch`` covers its run, resume and shared measurements.
SYSTEMS = ("floor", "recipe", "huey", "asyncbatch")
#: The rows of each table, in order.
SERIES = ("floor", "recipe", "huey", "asyncbatch", "asyncbatch resume", "asyncbatch shared")
SHARED_RUNNERS = 2
CONCURRENCY = 16
HANDLER = "benchmarks.bench_handler:handle"
_REPORT = re.compile(r"(\d+) done, (\d+) skipped .* of (\d+) seen")


@dataclass(slots=True)
class Sample:
    """One measurement: wall seconds, peak RSS of the (largest) child, ledger size, details."""

    wall: float
    rss_mib: float
    ledger_mib: float | None = None
    details: dict[str, float] = field(default_factory=dict)


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


def _source(inbox: Path, spec: InboxSpec) -> list[str]:
    return ["--source", str(inbox), *(["--recursive"] if spec.recursive else [])]


def _expect_handled(result: dict[str, object], key: str, n: int, what: str, tail: str) -> None:
    if result.get(key) != n:
        raise BenchFailure(f"{what}: {key} = {result.get(key)!r}, expected {n}", tail)


def measure_floor(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """scandir + stat + sort + read every file in one plain process."""
    argv = [ctx.python, "-m", "benchmarks.systems.floor", *_source(inbox, spec)]
    spawned = ctx.run("floor", spec, rep, argv)
    child = spawned.children[0]
    child.check("floor")
    result = child.last_json()
    _expect_handled(result, "handled", spec.n, "floor", child.stderr_tail())
    return Sample(spawned.wall, child.maxrss_mib)


def measure_recipe(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """The hand-written thread pool + SQLite lock row + completion row, a commit each."""
    state = ctx.state("recipe.db")
    remove_ledger(state)
    argv = [ctx.python, "-m", "benchmarks.systems.recipe", *_source(inbox, spec)]
    spawned = ctx.run("recipe", spec, rep, [*argv, "--state", str(state)])
    child = spawned.children[0]
    child.check("recipe")
    result = child.last_json()
    _expect_handled(result, "handled", spec.n, "recipe", child.stderr_tail())
    _expect_handled(result, "done_rows", spec.n, "recipe", child.stderr_tail())
    return Sample(spawned.wall, child.maxrss_mib, ledger_mib(state))


def measure_huey(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """SqliteHuey: enqueue a task per file, consume with 4 threads; wall = enqueue → last done."""
    state = ctx.state("huey.db")
    remove_ledger(state)
    argv = [ctx.python, "-m", "benchmarks.systems.huey_bench", *_source(inbox, spec)]
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
    return Sample(wall, child.maxrss_mib, ledger_mib(state), details)


def _run_argv(ctx: Context, spec: InboxSpec, inbox: Path, state: Path) -> list[str]:
    return [
        *ctx.asyncbatch,
        "run",
        HANDLER,
        *_source(inbox, spec),
        "--state",
        str(state),
        "-j",
        str(CONCURRENCY),
        "--settle",
        "0",
        "--no-progress",
    ]


def _report(stdout: str, what: str, tail: str) -> tuple[int, int, int]:
    """``(done, skipped, seen)`` from the report line ``asyncbatch run`` prints."""
    for line in reversed(stdout.splitlines()):
        if match := _REPORT.search(line):
            done, skipped, seen = (int(g) for g in match.groups())
            return done, skipped, seen
    raise BenchFailure(f"{what}: no report line on stdout", tail)


def measure_asyncbatch(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """``asyncbatch run`` (the CLI, start-up included) over a fresh ledger."""
    state = ctx.state("asyncbatch.db")
    remove_ledger(state)
    spawned = ctx.run("asyncbatch", spec, rep, _run_argv(ctx, spec, inbox, state))
    child = spawned.children[0]
    child.check("asyncbatch")
    done, _, seen = _report(child.stdout(), "asyncbatch", child.stderr_tail())
    if done != spec.n or seen != spec.n:
        raise BenchFailure(
            f"asyncbatch: {done} done of {seen} seen, expected {spec.n}", child.stderr_tail()
        )
    return Sample(spawned.wall, child.maxrss_mib, ledger_mib(state))


def measure_resume(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """The same command again over the all-done inbox (the ledger the last run left)."""
    state = ctx.state("asyncbatch.db")
    if not state.exists():
        raise BenchFailure("asyncbatch resume: no ledger from a completed run")
    spawned = ctx.run("asyncbatch resume", spec, rep, _run_argv(ctx, spec, inbox, state))
    child = spawned.children[0]
    child.check("asyncbatch resume")
    done, skipped, seen = _report(child.stdout(), "asyncbatch resume", child.stderr_tail())
    if done != 0 or seen != spec.n or skipped != spec.n:
        raise BenchFailure(
            f"asyncbatch resume: {done} done, {skipped} skipped of {seen} seen, "
            f"expected 0 done and {spec.n} skipped",
            child.stderr_tail(),
        )
    return Sample(spawned.wall, child.maxrss_mib, ledger_mib(state))


def _status_done(ctx: Context, state: Path) -> int:
    proc = subprocess.run(
        [*ctx.asyncbatch, "status", "--state", str(state), "--json"],
        cwd=ctx.root,
        env=ctx.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchFailure(f"asyncbatch status: exit {proc.returncode}", proc.stderr[-2000:])
    counts = json.loads(proc.stdout).get("counts", {})
    done = counts.get("done", 0)
    if not isinstance(done, int):
        raise BenchFailure(f"asyncbatch status: bad counts {counts!r}")
    return done


def measure_shared(ctx: Context, spec: InboxSpec, inbox: Path, rep: int) -> Sample:
    """Two ``--shared`` runners started together over a fresh ledger; checked for duplicates.

    Each runner's handler records the relpaths it handled (``BENCH_HANDLED_LOG``); every file
    must appear exactly once over both logs, both reports' ``done`` must add up to N, and
    ``asyncbatch status`` must count N done.
    """
    state = ctx.state("shared.db")
    remove_ledger(state)
    log_base = ctx.work / "logs" / f"{spec.name}-shared-{rep}-handled"
    for old in log_base.parent.glob(log_base.name + ".*"):
        old.unlink()
    argv = [*_run_argv(ctx, spec, inbox, state), "--shared"]
    spawned = ctx.run(
        "asyncbatch shared", spec, rep, *([argv] * SHARED_RUNNERS), BENCH_HANDLED_LOG=str(log_base)
    )
    dones: list[int] = []
    for i, child in enumerate(spawned.children):
        child.check(f"asyncbatch shared runner {i + 1}")
        dones.append(_report(child.stdout(), "asyncbatch shared", child.stderr_tail())[0])
    handled: Counter[str] = Counter()
    logs = sorted(log_base.parent.glob(log_base.name + ".*"))
    for log in logs:
        handled.update(log.read_text(errors="surrogateescape").splitlines())
    duplicates = sum(count - 1 for count in handled.values() if count > 1)
    status_done = _status_done(ctx, state)
    problems = []
    if sum(dones) != spec.n:
        problems.append(f"reports' done add up to {sum(dones)} ({' + '.join(map(str, dones))})")
    if len(handled) != spec.n:
        problems.append(f"{len(handled)} distinct files handled in {len(logs)} logs")
    if duplicates:
        problems.append(f"{duplicates} files handled twice")
    if status_done != spec.n:
        problems.append(f"status counts {status_done} done")
    if problems:
        raise BenchFailure(f"asyncbatch shared: {'; '.join(problems)}, expected {spec.n}")
    details = {"duplicates": float(duplicates)}
    details.update({f"runner{i + 1}_done": float(d) for i, d in enumerate(dones)})
    return Sample(spawned.wall, spawned.maxrss_mib, ledger_mib(state), details)


def asyncbatch_command(python: str) -> tuple[str, ...]:
    """The ``asyncbatch`` console script next to ``python``, else ``python -m asyncbatch``."""
    script = Path(python).parent / "asyncbatch"
    if script.exists():
        return (str(script),)
    return (python or sys.executable, "-m", "asyncbatch")
