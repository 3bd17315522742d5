"""Issue 21's lister figures: ``python -m benchmarks.lister`` writes benchmarks/RESULTS-lister.md.

1. **Listings.** How many times the source directory is read to its end, counted by the kernel's
   side of it: every runner runs under ``strace -ff -ttt -e trace=getdents64 -y``, and a
   listing is a ``getdents64`` on the source directory that returns 0 (the end of the
   directory; a listing of N files takes several calls before it). One-shot: one run of 1
   runner, and of 1, 2 and 4 ``--shared`` runners, over a flat inbox, on SQLite and (when
   reachable) PostgreSQL, and 2 and 4 with ``--baseline``'s checkout (from before issue 21).
   Watch mode: 1 runner, and 2 and 4 ``--shared`` runners (``--watch --no-events --poll P``)
   for D seconds while a file is added every P/2 seconds, so that every poll lists; polls =
   1 + (last listing - first listing) / P (the polls one lister makes over that span), and
   listings per poll = listings by all runners / polls.
2. **One runner's rate, A/B.** ``asyncbatch run`` over the flat 100,000 inbox (fresh SQLite
   ledger each time), this checkout against ``--baseline`` (another checkout with its own
   ``.venv``), interleaved (the order alternating), ``--repeat`` times each.
3. **A million files.** One runner over a flat inbox of 1,000,000, SQLite: peak RSS and rate.

Every run is verified as the suite verifies it (``status --json`` counts N done; a shared run's
runs add up to N). The figures go to ``--out`` (and the terminal); nothing here is a check
that changes the exit status but a measurement that failed (exit 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .inbox import InboxSpec, ensure_inbox, warm_up
from .measure import BenchFailure, ensure_bytecode, remove_ledger
from .pg import DEFAULT_DSN, PgServer
from .report import machine_info
from .suite import (
    CONCURRENCY,
    HANDLER,
    Context,
    Sample,
    asyncbatch_command,
    ledger_runs,
    measure_asyncbatch,
    status_done,
)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
X = "\N{MULTIPLICATION SIGN}"
EN = "\N{EN DASH}"
T = TypeVar("T")
STRACE = ("strace", "-ff", "-qq", "-ttt", "-e", "trace=getdents64", "-y")


@dataclass(slots=True)
class Listings:
    """One measurement of listings: directory reads to the end, per runner."""

    label: str
    runners: int
    per_runner: list[int]
    calls: int
    #: Watch: the times of every listing, all runners together.
    times: list[float] = field(default_factory=list)
    poll: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_runner)

    @property
    def polls(self) -> float | None:
        """Watch: the polls of one lister over the span of the listings (the first one and
        one every ``poll`` seconds after it)."""
        if self.poll is None or not self.times:
            return None
        return 1 + (max(self.times) - min(self.times)) / self.poll

    @property
    def gap(self) -> float | None:
        """Watch: the median time between two listings (any runner's)."""
        times = sorted(self.times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return statistics.median(gaps) if gaps else None


def count_reads(trace_dir: Path, directory: Path) -> tuple[list[float], int]:
    """``(times of the reads to the end, getdents64 calls)`` on ``directory`` in
    ``trace_dir``'s traces (``strace -ttt``: each line begins with its Unix time)."""
    needle = f"<{directory}>"
    ends: list[float] = []
    calls = 0
    for path in trace_dir.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, call = line.partition(" ")
            if call.startswith("getdents64(") and needle in call.partition(",")[0]:
                calls += 1
                if call.rstrip().endswith("= 0"):
                    ends.append(float(stamp))
    return ends, calls


def _ctx(root: Path, work: Path, pg: PgServer | None = None) -> Context:
    python = str(root / ".venv" / "bin" / "python")
    return Context(
        root=root,
        work=work,
        python=python,
        asyncbatch=asyncbatch_command(python),
        timeout_base=300.0,
        timeout_per_file=0.004,
        pg=pg,
    )


def _run_argv(ctx: Context, inbox: Path, state: str) -> list[str]:
    return [
        *ctx.asyncbatch,
        "run",
        HANDLER,
        "--source",
        str(inbox),
        "--state",
        state,
        "-j",
        str(CONCURRENCY),
        "--settle",
        "0",
        "--no-progress",
    ]


def _fresh_state(ctx: Context, pg: PgServer | None, name: str) -> tuple[str, str | None]:
    """A fresh ledger: ``(--state value, schema to drop)``."""
    if pg is not None:
        schema = pg.fresh_schema()
        return pg.state(schema), schema
    path = ctx.state(name)
    remove_ledger(path)
    return str(path), None


def one_shot(
    ctx: Context, label: str, inbox: Path, n: int, runners: int, shared: bool, pg: PgServer | None
) -> Listings:
    """``runners`` runs over ``inbox`` at once under strace; every file done once in all."""
    state, schema = _fresh_state(ctx, pg, "lister.db")
    traces = ctx.work / "traces" / f"{label.replace(' ', '-')}"
    argvs = []
    for i in range(runners):
        tdir = traces / f"r{i}"
        tdir.mkdir(parents=True, exist_ok=True)
        for old in tdir.iterdir():
            old.unlink()
        argv = _run_argv(ctx, inbox, state) + (["--shared"] if shared else [])
        argvs.append([*STRACE, "-o", str(tdir / "t"), *argv])
    try:
        spawned = ctx.run(label, InboxSpec(n), 0, *argvs)
        for i, child in enumerate(spawned.children):
            child.check(f"{label} runner {i + 1}")
        done = status_done(ctx, state)
        dones = [d for d, _ in ledger_runs(ctx, state, runners)]
        if done != n or sum(dones) != n:
            raise BenchFailure(f"{label}: status counts {done} done, the runs did {dones}")
    finally:
        if pg is not None and schema is not None:
            pg.drop(schema)
    per_runner, calls = [], 0
    for i in range(runners):
        ends, c = count_reads(traces / f"r{i}", inbox)
        per_runner.append(len(ends))
        calls += c
    return Listings(label, runners, per_runner, calls)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _add_file(inbox: Path, i: int) -> None:
    tmp = inbox.parent / f".{inbox.name}-new-{i}"
    tmp.write_bytes(f"new,{i}\n".encode())
    past = time.time() - 3600
    os.utime(tmp, (past, past))
    os.rename(tmp, inbox / f"new-{i:06d}.csv")


def watch(
    ctx: Context,
    inbox: Path,
    runners: int,
    seconds: float,
    poll: float,
    pg: PgServer | None,
    shared: bool = True,
) -> Listings:
    """``runners`` watches (``--shared``, or one alone) for ``seconds`` under strace while
    files arrive; every file there at the start done at the end."""
    label = f"watch, {runners} shared" if shared else "watch, 1 runner"
    label += " pg" if pg is not None else ""
    initial = sum(1 for _ in inbox.iterdir())
    state, schema = _fresh_state(ctx, pg, "lister-watch.db")
    traces = ctx.work / "traces" / label.replace(" ", "-")
    logs = ctx.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    added = 0
    try:
        for i in range(runners):
            tdir = traces / f"r{i}"
            tdir.mkdir(parents=True, exist_ok=True)
            for old in tdir.iterdir():
                old.unlink()
            argv = [
                *STRACE,
                "-o",
                str(tdir / "t"),
                *_run_argv(ctx, inbox, state),
                *(["--shared"] if shared else []),
                "--watch",
                "--no-events",
                "--poll",
                str(poll),
            ]
            with open(logs / f"{label.replace(' ', '-')}.{i}.err", "wb") as err:
                procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=ctx.root,
                        env=ctx.env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(poll / 2)
            _add_file(inbox, added)
            added += 1
        for proc in procs:  # the runner is strace's child: it gets SIGINT, strace follows it
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGINT)
        codes = [proc.wait(timeout=120) for proc in procs]
        if any(code not in (0, 130) for code in codes):
            raise BenchFailure(f"{label}: exit statuses {codes}")
        done = status_done(ctx, state)
        if done < initial:
            raise BenchFailure(f"{label}: status counts {done} done, the inbox held {initial}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if pg is not None and schema is not None:
            pg.drop(schema)
    per_runner, calls, times = [], 0, []
    for i in range(runners):
        ends, c = count_reads(traces / f"r{i}", inbox)
        per_runner.append(len(ends))
        times += ends
        calls += c
    result = Listings(label, runners, per_runner, calls, times, poll)
    result.notes.append(f"{added} files added over {seconds:.0f} s, --poll {poll:g}")
    return result


def _watch_inbox(work: Path, name: str, files: int) -> Path:
    inbox = work / "watch-inboxes" / name
    if inbox.exists():
        for p in inbox.iterdir():
            p.unlink()
    inbox.mkdir(parents=True, exist_ok=True)
    past = time.time() - 86400
    for i in range(files):
        p = inbox / f"f-{i:06d}.csv"
        p.write_bytes(f"{i}\n".encode())
        os.utime(p, (past, past))
    return inbox


@dataclass(slots=True)
class AB:
    head: list[Sample] = field(default_factory=list)
    base: list[Sample] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(
    command: str,
    machine: dict[str, str],
    listings: list[Listings],
    ab: AB | None,
    ab_n: int,
    million: Sample | None,
    million_n: int,
    failures: list[str],
    elapsed: float,
) -> str:
    lines = [
        "# One lister per job (issue 21): listings, one runner's rate, a million files",
        "",
        f"Generated {machine['date']} by `{command}` in {elapsed / 60:.1f} min "
        "(`benchmarks/lister.py` says how each figure is measured).",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine.items()),
        "",
    ]
    if listings:
        lines += [
            "## Directory listings",
            "",
            "A listing = a `getdents64` on the source directory that returned 0 (read to its "
            "end), over every runner's threads (`strace -ff -ttt -e trace=getdents64 -y`). "
            "Watch (`--watch --no-events --poll P`, a file added every P/2 s so that every "
            "poll lists): polls = 1 + (last listing - first listing) / P, the polls one "
            "lister makes over that span; gap = the median time between two listings, any "
            "runner's.",
            "",
            "| what | runners | listings | per runner | getdents64 calls | polls "
            "| listings per poll | gap s | notes |",
            "|---|--:|--:|---|--:|--:|--:|--:|---|",
        ]
        for m in listings:
            polls = m.polls
            per_poll = f"{m.total / polls:.2f}" if polls else EN
            shown = f"{polls:.1f}" if polls is not None else EN
            gap = f"{m.gap:.2f}" if m.gap is not None else EN
            lines.append(
                f"| {m.label} | {m.runners} | {m.total} | {' + '.join(map(str, m.per_runner))} "
                f"| {m.calls} | {shown} | {per_poll} | {gap} | {'; '.join(m.notes)} |"
            )
        lines.append("")
    if ab is not None and ab.head and ab.base:
        rate_h = [ab_n / s.wall for s in ab.head]
        rate_b = [ab_n / s.wall for s in ab.base]
        cpu_h = [s.cpu_s or float("nan") for s in ab.head]
        cpu_b = [s.cpu_s or float("nan") for s in ab.base]
        paired = [h / b for h, b in zip(rate_h, rate_b, strict=False)]
        paired_cpu = [h / b for h, b in zip(cpu_h, cpu_b, strict=False)]
        lines += [
            f"## One runner, {ab_n:,} files, SQLite: this checkout against the baseline",
            "",
            f"Interleaved, {len(ab.head)} and {len(ab.base)} repeats (the order alternating), "
            "a fresh ledger each time, the same warm inbox.",
            "",
            "| checkout | wall s (each) | files/s (median) | CPU s (median) | peak RSS MiB |",
            "|---|---|--:|--:|--:|",
            f"| this (head) | {', '.join(f'{s.wall:.2f}' for s in ab.head)} "
            f"| {_median(rate_h):,.0f} | {_median(cpu_h):.2f} "
            f"| {max(s.rss_mib for s in ab.head):.0f} |",
            f"| baseline | {', '.join(f'{s.wall:.2f}' for s in ab.base)} "
            f"| {_median(rate_b):,.0f} | {_median(cpu_b):.2f} "
            f"| {max(s.rss_mib for s in ab.base):.0f} |",
            "",
            f"Rate head / baseline: medians {_median(rate_h) / _median(rate_b):.3f}{X}, "
            f"paired {', '.join(f'{r:.3f}' for r in paired)} (median {_median(paired):.3f}); "
            f"CPU head / baseline: medians {_median(cpu_h) / _median(cpu_b):.3f}{X}, paired "
            f"median {_median(paired_cpu):.3f}.",
            "",
        ]
    if million is not None:
        lines += [
            f"## One runner, {million_n:,} files, SQLite",
            "",
            f"{million.wall:.1f} s ({million_n / million.wall:,.0f} files/s), peak RSS "
            f"{million.rss_mib:.0f} MiB, CPU {million.cpu_s or float('nan'):.1f} s, ledger "
            f"{million.ledger_mib or float('nan'):.0f} MiB.",
            "",
        ]
    if failures:
        lines += ["## Failures", "", *(f"- {f}" for f in failures), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lister", description=__doc__)
    p.add_argument("--baseline", type=Path, default=None, help="a checkout with its own .venv")
    p.add_argument("--list-n", type=int, default=10_000, help="files of the one-shot inbox")
    p.add_argument("--watch-files", type=int, default=1_000)
    p.add_argument("--watch-seconds", type=float, default=12.0)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--ab-n", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--million-n", type=int, default=1_000_000, help="0: not measured")
    p.add_argument("--pg-dsn", default=DEFAULT_DSN)
    p.add_argument("--parts", default="listings,ab,million")
    p.add_argument("--work", type=Path, default=HERE / ".work")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-lister.md")
    args = p.parse_args(argv)
    ensure_bytecode(*([ROOT] if args.baseline is None else [ROOT, args.baseline]))
    parts = set(args.parts.split(","))
    started = time.monotonic()
    command = " ".join(["python -m benchmarks.lister", *(sys.argv[1:] if argv is None else argv)])
    work = args.work.resolve()
    machine = machine_info(work, ROOT)
    probed = PgServer.probe(args.pg_dsn)
    pg = probed if isinstance(probed, PgServer) else None
    head = _ctx(ROOT, work / "lister-head", pg)
    base = _ctx(args.baseline.resolve(), work / "lister-base") if args.baseline else None
    failures: list[str] = []
    listings: list[Listings] = []

    def attempt(fn: Callable[..., T], *a: object) -> T | None:
        try:
            result = fn(*a)
        except BenchFailure as e:
            failures.append(f"{e}: {e.detail[-500:]}" if e.detail else str(e))
            print(f"  FAILED: {failures[-1]}", flush=True)
            return None
        print(f"  {result}", flush=True)
        return result

    if "listings" in parts:
        spec = InboxSpec(args.list_n)
        inbox, _ = ensure_inbox(work, spec)
        warm_up(inbox, spec)
        plans: list[tuple[Context, str, int, bool, PgServer | None]] = [
            (head, "run, 1 runner", 1, False, None),
            (head, "run, 1 shared", 1, True, None),
            (head, "run, 2 shared", 2, True, None),
            (head, "run, 4 shared", 4, True, None),
        ]
        if pg is not None:
            plans += [
                (head, "run, 2 shared pg", 2, True, pg),
                (head, "run, 4 shared pg", 4, True, pg),
            ]
        if base is not None:
            plans += [
                (base, "baseline run, 2 shared", 2, True, None),
                (base, "baseline run, 4 shared", 4, True, None),
            ]
        for ctx, label, runners, shared, server in plans:
            m = attempt(one_shot, ctx, label, inbox, spec.n, runners, shared, server)
            if isinstance(m, Listings):
                listings.append(m)
        watches: list[tuple[int, PgServer | None, bool]] = [(1, None, False), (2, None, True)]
        watches += [(4, None, True), *(((2, pg, True), (4, pg, True)) if pg else ())]
        for runners, server, shared in watches:
            name = f"w{runners}" + ("pg" if server else "") + ("s" if shared else "")
            wbox = _watch_inbox(work, name, args.watch_files)
            m = attempt(watch, head, wbox, runners, args.watch_seconds, args.poll, server, shared)
            if isinstance(m, Listings):
                listings.append(m)
    ab: AB | None = None
    if "ab" in parts and base is not None:
        ab = AB()
        spec = InboxSpec(args.ab_n)
        inbox, _ = ensure_inbox(work, spec)
        warm_up(inbox, spec)
        for rep in range(args.repeat):
            order = [("head", head), ("base", base)]
            for side, ctx in order if rep % 2 == 0 else order[::-1]:
                s = attempt(measure_asyncbatch, ctx, spec, inbox, rep)
                if isinstance(s, Sample):
                    (ab.head if side == "head" else ab.base).append(s)
    million: Sample | None = None
    if "million" in parts and args.million_n:
        spec = InboxSpec(args.million_n)
        inbox, _ = ensure_inbox(work, spec)
        warm_up(inbox, spec)
        s = attempt(measure_asyncbatch, head, spec, inbox, 0)
        million = s if isinstance(s, Sample) else None
    if pg is not None:
        pg.cleanup()
    text = render(
        command,
        machine,
        listings,
        ab,
        args.ab_n,
        million,
        args.million_n,
        failures,
        time.monotonic() - started,
    )
    args.out.write_text(text)
    print(text)
    print(json.dumps({"failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
