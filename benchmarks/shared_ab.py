"""Issue 21's CPU targets, A/B: one runner against 2 and 4 ``--shared`` runners, interleaved.

    .venv/bin/python -m benchmarks.shared_ab --files 100000 --repeat 3 \\
        [--base ../checkout-before] [--pg-dsn postgresql://root@127.0.0.1:5499/test]

Over one warm flat inbox of ``--files`` files, each repeat runs, for each checkout (this one,
and ``--base``'s with its own ``.venv``) and each backend (SQLite; PostgreSQL when reachable):
one runner, one ``--shared`` runner alone (``--series`` may leave it out), 2 and 4 ``--shared``
runners started together; the order of the series rotates from repeat to repeat and the
checkouts alternate, so the machine's drift spreads over all of them. Every run is on a fresh
ledger (a new SQLite file, or a new schema) and is verified as the suite verifies a shared run:
every file handled exactly once over all runners' logs (``BENCH_HANDLED_LOG``, set for the one
runner too so that every series pays the same handler), the runs' ``done`` adding up to N and
``status`` counting N done.

CPU is the runners' user + system (``wait4``), plus for PostgreSQL the server's over the run
(its processes' time from ``/proc``: run it on a cluster of its own, or other clients' work is
counted). The figures: per series the median CPU in µs a file, and each shared series' ratio to
the one runner of the same repeat and checkout (paired), with the median of those ratios; with
``pg_stat_statements`` loaded, the server's top statements of each series' last run.
Raw samples go to ``--out`` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from .inbox import InboxSpec, ensure_inbox, warm_up
from .measure import BenchFailure, ensure_bytecode, remove_ledger
from .pg import PgServer
from .suite import (
    CONCURRENCY,
    HANDLER,
    Context,
    _spawn_ledger,
    asyncbatch_command,
    ledger_runs,
    status_done,
)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
X = "\N{MULTIPLICATION SIGN}"
#: Series: name -> (runners, shared).
SERIES = {"1": (1, False), "s1": (1, True), "2": (2, True), "4": (4, True)}


def _ctx(root: Path, work: Path, pg: PgServer | None) -> Context:
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


def one(
    ctx: Context, inbox: Path, n: int, series: str, pg: PgServer | None, rep: int
) -> dict[str, object]:
    """One verified run of ``series``; its CPU (runners, and the server's), wall, profile."""
    runners, shared = SERIES[series]
    backend = "pg" if pg is not None else "sqlite"
    name = ("asyncbatch pg " if pg is not None else "asyncbatch ") + f"ab-{series}"
    schema = None
    if pg is not None:
        schema = pg.fresh_schema()
        state = pg.state(schema)
    else:
        path = ctx.state("ab.db")
        remove_ledger(path)
        state = str(path)
    argv = [
        *ctx.asyncbatch,
        *("run", HANDLER, "--source", str(inbox), "--state", state),
        *("-j", str(CONCURRENCY), "--settle", "0", "--no-progress"),
        *(["--shared"] if shared else []),
    ]
    spec = InboxSpec(n)
    log_base = ctx.work / "logs" / f"ab-{backend}-{series}-{rep}-handled"
    log_base.parent.mkdir(parents=True, exist_ok=True)
    for old in log_base.parent.glob(log_base.name + ".*"):
        old.unlink()
    try:
        spawned, details, profile = _spawn_ledger(
            ctx, name, spec, rep, [argv] * runners, BENCH_HANDLED_LOG=str(log_base)
        )
        for i, child in enumerate(spawned.children):
            child.check(f"{name} runner {i + 1}")
        dones = [done for done, _ in ledger_runs(ctx, state, runners)]
        handled: Counter[str] = Counter()
        for log in log_base.parent.glob(log_base.name + ".*"):
            handled.update(log.read_text(errors="surrogateescape").splitlines())
        twice = sum(c - 1 for c in handled.values() if c > 1)
        counted = status_done(ctx, state)
        if sum(dones) != n or len(handled) != n or twice or counted != n:
            raise BenchFailure(
                f"{name}: runs did {dones}, {len(handled)} distinct handled, {twice} twice, "
                f"status counts {counted} done; expected {n}"
            )
    finally:
        if pg is not None and schema is not None:
            pg.drop(schema)
    runner_cpu = spawned.cpu_s
    server_cpu = details.get("server_cpu_s", 0.0)
    return {
        "backend": backend,
        "series": series,
        "rep": rep,
        "wall": spawned.wall,
        "runner_cpu": runner_cpu,
        "server_cpu": server_cpu,
        "cpu": runner_cpu + server_cpu,
        "dones": sorted(dones),
        "profile": profile,
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(samples: list[dict[str, object]], n: int) -> str:
    """The table: per checkout and backend, median CPU a file per series and paired ratios."""
    by: dict[tuple[str, str], dict[int, dict[str, dict[str, object]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for s in samples:
        by[(str(s["side"]), str(s["backend"]))][int(str(s["rep"]))][str(s["series"])] = s
    lines = [
        "| checkout | backend | series | CPU µs/file (median) | runners / server µs | "
        "wall s (median) | ratio to 1 runner, paired (median) |",
        "|---|---|---|--:|--:|--:|---|",
    ]
    for (side, backend), reps in sorted(by.items()):
        names = [k for k in SERIES if any(k in r for r in reps.values())]
        for series in names:
            got = [r[series] for r in reps.values() if series in r]
            cpu = _median([float(str(g["cpu"])) for g in got]) / n * 1e6
            run_cpu = _median([float(str(g["runner_cpu"])) for g in got]) / n * 1e6
            srv_cpu = _median([float(str(g["server_cpu"])) for g in got]) / n * 1e6
            wall = _median([float(str(g["wall"])) for g in got])
            ratios = [
                float(str(r[series]["cpu"])) / float(str(r["1"]["cpu"]))
                for r in reps.values()
                if series in r and "1" in r
            ]
            paired = (
                ""
                if series == "1"
                else f"{', '.join(f'{x:.2f}' for x in ratios)} ({_median(ratios):.2f}{X})"
            )
            lines.append(
                f"| {side} | {backend} | {series} | {cpu:.1f} | {run_cpu:.1f} / {srv_cpu:.1f} "
                f"| {wall:.2f} | {paired} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_ab", description=__doc__)
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--base", type=Path, default=None, help="a checkout with its own .venv")
    p.add_argument("--pg-dsn", default="postgresql://root@127.0.0.1:5499/test")
    p.add_argument("--backends", default="sqlite,pg")
    p.add_argument("--series", default="1,s1,2,4")
    p.add_argument("--work", type=Path, default=HERE / ".work")
    p.add_argument("--out", type=Path, default=HERE / ".work" / "shared_ab.jsonl")
    args = p.parse_args(argv)
    ensure_bytecode(*([ROOT] if args.base is None else [ROOT, args.base]))
    work = args.work.resolve()
    backends = args.backends.split(",")
    series = args.series.split(",")
    pg: PgServer | None = None
    if "pg" in backends:
        probed = PgServer.probe(args.pg_dsn)
        if isinstance(probed, str):
            print(probed, file=sys.stderr)
            return 1
        pg = probed
    sides = [("head", _ctx(ROOT, work / "ab-head", pg))]
    if args.base is not None:
        sides.append(("base", _ctx(args.base.resolve(), work / "ab-base", pg)))
    spec = InboxSpec(args.files)
    inbox, _ = ensure_inbox(work, spec)
    warm_up(inbox, spec)
    samples: list[dict[str, object]] = []
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for rep in range(args.repeat):
            order = sides if rep % 2 == 0 else sides[::-1]
            turn = rep % len(series)
            rotated = series[turn:] + series[:turn]
            for side, ctx in order:
                for backend in backends:
                    for name in rotated:
                        server = pg if backend == "pg" else None
                        s = one(ctx, inbox, spec.n, name, server, rep)
                        s["side"] = side
                        samples.append(s)
                        out.write(json.dumps(s) + "\n")
                        out.flush()
                        print(
                            f"rep {rep} {side} {backend} {name}: cpu {s['cpu']:.2f} s "
                            f"(runners {s['runner_cpu']:.2f} + server {s['server_cpu']:.2f}), "
                            f"wall {s['wall']:.2f} s, done {s['dones']}",
                            flush=True,
                        )
                        for line in s["profile"]:  # type: ignore[attr-defined]
                            print(f"    {line}", flush=True)
    print(f"\n{args.files:,} files, {args.repeat} repeats, {time.monotonic() - started:.0f} s")
    print(summary(samples, spec.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
