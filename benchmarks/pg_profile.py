"""Profile the PostgreSQL ledger under statement variants: ``python -m benchmarks.pg_profile``.

``python -m benchmarks.pg_profile --variants "base;join_commit;join_commit,skip_live"
--sizes 20000,100000 --runners 1,2 --repeat 3 [--run-args "--durability full"]``

For every variant set (``;``-separated, each a ``,``-separated list from
:data:`benchmarks.pg_variants.VARIANTS`), size, runner count and repeat: a fresh schema, the
runners (``asyncbatch run`` through :mod:`benchmarks.pg_variants`, ``--shared`` when more than
one), verified (``asyncbatch status`` counts N done), for one runner also the resume, then the
schema is dropped. Prints a Markdown table of medians: wall, files/s, runner and server CPU,
and the server's execution time of the claim and completion statements (``pg_stat_statements``,
when loaded). The numbers in benchmarks/PG_PROFILE.md come from here.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .inbox import InboxSpec, ensure_inbox, warm_up
from .measure import BenchFailure
from .pg import DEFAULT_DSN, PgServer, StatementDelta
from .suite import Context, asyncbatch_command, source_argv, status_done

ROOT = Path(__file__).resolve().parent.parent
EN = "\N{EN DASH}"


@dataclass(slots=True)
class Row:
    """The repeats of one (variants, N, runners) cell."""

    variants: str
    n: int
    runners: int
    walls: list[float] = field(default_factory=list)
    runner_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    claim_ms: list[float] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)
    resumes: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _median(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(statistics.median(values)) if values else EN


def _statement_ms(
    before: dict[int, StatementDelta], after: dict[int, StatementDelta]
) -> dict[str, float]:
    """Server execution ms of the claim and completion statements between two snapshots."""
    found: dict[str, float] = {}
    for s in PgServer.delta(before, after, top=20):
        text = " ".join(s.query.split())
        if text.startswith("WITH claimed AS ( INSERT"):
            found["claim"] = found.get("claim", 0.0) + s.total_ms
        elif text.startswith("UPDATE items AS i SET state = coalesce"):
            found["commit"] = found.get("commit", 0.0) + s.total_ms
    return found


def _argv(ctx: Context, variants: str, spec: InboxSpec, inbox: Path, state: str) -> list[str]:
    return [
        ctx.python,
        "-m",
        "benchmarks.pg_variants",
        variants,
        "--",
        "run",
        "benchmarks.bench_handler:handle",
        *source_argv(inbox, spec),
        "--state",
        state,
        "-j",
        "16",
        "--settle",
        "0",
        "--no-progress",
    ]


def measure(
    ctx: Context, pg: PgServer, row: Row, spec: InboxSpec, inbox: Path, rep: int, extra: list[str]
) -> None:
    schema = pg.fresh_schema()
    state = pg.state(schema)
    argv = [*_argv(ctx, row.variants, spec, inbox, state), *extra]
    if row.runners > 1:
        argv.append("--shared")
    name = f"pgprofile {row.variants} {row.runners}"
    try:
        cpu0, st0 = pg.cpu_seconds(), pg.statements()
        spawned = ctx.run(name, spec, rep, *([argv] * row.runners))
        cpu1, st1 = pg.settled_cpu_seconds(), pg.statements()
        for child in spawned.children:
            child.check(name)
        done = status_done(ctx, state)
        if done != spec.n:
            raise BenchFailure(f"{name}: status counts {done} done, expected {spec.n}")
        row.walls.append(spawned.wall)
        row.runner_cpu.append(spawned.cpu_s)
        if cpu0 is not None and cpu1 is not None:
            row.server_cpu.append(cpu1 - cpu0)
        ms = _statement_ms(st0, st1)
        if "claim" in ms:
            row.claim_ms.append(ms["claim"])
        if "commit" in ms:
            row.commit_ms.append(ms["commit"])
        if row.runners == 1:
            resumed = ctx.run(name + " resume", spec, rep, argv)
            resumed.children[0].check(name + " resume")
            row.resumes.append(resumed.wall)
    except BenchFailure as e:
        row.failures.append(str(e))
        print(f"    FAILED: {e}\n{e.detail}", flush=True)
    finally:
        pg.drop(schema)


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| variants | N | runners | wall s | files/s | runner CPU s | server CPU s "
        "| server µs/file | claim ms | commit ms | resume s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if not r.walls:
            lines.append(f"| {r.variants} | {r.n:,} | {r.runners} | failed | | | | | | | |")
            continue
        wall = statistics.median(r.walls)
        span = f" ({min(r.walls):.2f}{EN}{max(r.walls):.2f})" if len(r.walls) > 1 else ""
        per_file = f"{statistics.median(r.server_cpu) / r.n * 1e6:.0f}" if r.server_cpu else EN
        lines.append(
            f"| {r.variants} | {r.n:,} | {r.runners} | {wall:.2f}{span} | {r.n / wall:,.0f} "
            f"| {_median(r.runner_cpu)} | {_median(r.server_cpu)} | {per_file} "
            f"| {_median(r.claim_ms, '{:,.0f}')} | {_median(r.commit_ms, '{:,.0f}')} "
            f"| {_median(r.resumes)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pg_profile", description=__doc__)
    p.add_argument("--variants", default="base;join_commit;join_commit,skip_live")
    p.add_argument("--sizes", default="20000,100000")
    p.add_argument("--runners", default="1,2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--run-args", default="", help="more asyncbatch run arguments")
    p.add_argument("--pg-dsn", default=DEFAULT_DSN)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    pg = PgServer.probe(args.pg_dsn)
    if isinstance(pg, str):
        print(pg, file=sys.stderr)
        return 2
    work = args.work.resolve()
    ctx = Context(
        root=ROOT,
        work=work,
        python=sys.executable,
        asyncbatch=asyncbatch_command(sys.executable),
        timeout_base=300.0,
        timeout_per_file=0.005,
        pg=pg,
    )
    extra = shlex.split(args.run_args)
    rows: list[Row] = []
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            spec = InboxSpec(n)
            inbox, _ = ensure_inbox(work, spec)
            warm_up(inbox, spec)
            cells = [
                Row(v, n, int(r)) for r in args.runners.split(",") for v in args.variants.split(";")
            ]
            rows += cells
            for rep in range(args.repeat):
                for row in cells:  # interleaved: each repeat runs every variant once
                    measure(ctx, pg, row, spec, inbox, rep, extra)
                    print(
                        f"  {row.variants} N={n:,} runners={row.runners} "
                        f"rep {rep + 1}: {row.walls[-1] if row.walls else float('nan'):.2f} s",
                        flush=True,
                    )
    finally:
        pg.cleanup()
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
