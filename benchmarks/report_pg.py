"""RESULTS.md's PostgreSQL parts: the targets of issues 10 and 21, SQLite beside PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

from .checks import Check, Results, missing, shared_cpu_checks, verdict
from .inbox import InboxSpec
from .suite import Series

__all__ = ["pg_checks", "pg_method", "pg_tables"]

X = "\N{MULTIPLICATION SIGN}"
EN = "\N{EN DASH}"
#: (label, SQLite series, PostgreSQL series) for each row of the side-by-side table.
ROWS = (
    ("1 runner", "asyncbatch", "asyncbatch pg"),
    ("2 shared runners", "asyncbatch shared", "asyncbatch pg shared"),
    ("4 shared runners", "asyncbatch shared 4", "asyncbatch pg shared 4"),
    ("resume (all done)", "asyncbatch resume", "asyncbatch pg resume"),
)


def _cpu(series: Series, key: str) -> float | None:
    return series.detail(key)


def profile(series: Series) -> tuple[str, ...]:
    """Where a PostgreSQL measurement's time went: CPU split, then the top statements."""
    lines: list[str] = []
    runner, server = _cpu(series, "runner_cpu_s"), _cpu(series, "server_cpu_s")
    split = f"{series.name}: {series.wall:.2f} s wall (median)"
    if runner is not None:
        split += f"; runner CPU {runner:.2f} s"
    if server is not None:
        split += (
            f"; PostgreSQL server CPU {server:.2f} s ({server / series.spec.n * 1e6:.0f} µs/file)"
        )
    lines.append(split)
    last = series.samples[-1].profile if series.samples else []
    if last:
        lines.append("pg_stat_statements, last repeat (execution time by statement):")
        lines.extend(f"`{line}`" for line in last)
    else:
        lines.append("pg_stat_statements not loaded on the server: no per-statement profile")
    lines.append("see benchmarks/PG_PROFILE.md for the plans and the statement rewrites")
    return tuple(lines)


def pg_checks(results: Results, ref: InboxSpec, at: str) -> list[Check]:
    """Issues 10 and 21's PostgreSQL targets, at the reference inbox."""
    checks: list[Check] = []
    what = f"PostgreSQL, one runner, at {at}: ≥ 15,000 files/s and ≥ 50% of SQLite's rate"
    if (miss := missing(what, ref, results, "asyncbatch pg", "asyncbatch")) is not None:
        checks.append(miss)
    else:
        pg, lite = results[(ref, "asyncbatch pg")], results[(ref, "asyncbatch")]
        share = pg.rate / lite.rate
        ok = pg.rate >= 15_000 and share >= 0.5
        checks.append(
            Check(
                verdict(ok),
                f"{what}: {pg.rate:,.0f} files/s = {share:.0%} of SQLite's {lite.rate:,.0f}",
                () if ok else profile(pg),
            )
        )
    checks += shared_cpu_checks(results, ref, at, "asyncbatch pg", "PostgreSQL", profile)
    what = f"PostgreSQL resume over {at} done ≤ 1.5{X} SQLite's resume"
    names = ("asyncbatch pg resume", "asyncbatch resume")
    if (miss := missing(what, ref, results, *names)) is not None:
        checks.append(miss)
    else:
        pg, lite = results[(ref, names[0])], results[(ref, names[1])]
        ratio = pg.wall / lite.wall
        checks.append(
            Check(
                verdict(ratio <= 1.5),
                f"{what}: {pg.wall:.2f} s vs {lite.wall:.2f} s = {ratio:.2f}{X}",
                () if ratio <= 1.5 else profile(pg),
            )
        )
    return checks


def _cell(series: Series | None) -> list[str]:
    if series is None:
        return ["", "", "", ""]
    if series.skipped:
        return ["skipped", "", "", ""]
    if not series.ok:
        return ["failed" if series.failures else "not run", "", "", ""]
    cpu = f"{series.cpu_s:.2f}" if series.cpu_s is not None else EN
    return [f"{series.wall:.3f}", f"{series.rate:,.0f}", f"{series.rss_mib:.0f}", cpu]


def pg_tables(specs: Sequence[InboxSpec], results: Results) -> list[str]:
    """One side-by-side table per inbox where PostgreSQL series exist."""
    lines: list[str] = []
    for spec in specs:
        pgs = [results.get((spec, pg)) for _, _, pg in ROWS]
        if not any(s is not None for s in pgs):
            continue
        title = f"### {spec.label}: SQLite and PostgreSQL"
        skipped = next((s.skipped for s in pgs if s is not None and s.skipped), None)
        if not any(s is not None and s.ok for s in pgs) and skipped:
            lines += [title, "", f"PostgreSQL series skipped: {skipped}.", ""]
            continue
        lines += [
            title,
            "",
            "| runners | SQLite wall s | files/s | RSS MiB | CPU s | PostgreSQL wall s | files/s "
            f"| RSS MiB | runner CPU s | server CPU s | PG rate {X} SQLite |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for label, lite_name, pg_name in ROWS:
            lite, pg = results.get((spec, lite_name)), results.get((spec, pg_name))
            server = pg.detail("server_cpu_s") if pg is not None and pg.ok else None
            ratio = (
                f"{pg.rate / lite.rate:.2f}"
                if pg is not None and lite is not None and pg.ok and lite.ok
                else EN
            )
            row = [label, *_cell(lite), *_cell(pg), f"{server:.2f}" if server else EN, ratio]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def pg_method(dsn: str, skipped: str | None, statements: bool, version: str) -> list[str]:
    """The method bullets for the PostgreSQL series."""
    if skipped:
        return [f"- **PostgreSQL series skipped**: {skipped}."]
    return [
        f"- **asyncbatch pg** (PostgreSQL {version} at `{dsn}`, the server `.ci/run` starts, "
        "on the same 2 cores): the same commands with `--state "
        "postgresql://…?search_path=SCHEMA`; **each measurement in a fresh schema, dropped "
        "afterwards** (resume reuses the schema of the run before it, then drops it). "
        "Verified like SQLite's: `asyncbatch history --json` (each run's done and seen) and "
        "`asyncbatch status --json` (N done); shared runners also by their handler logs (every "
        "file exactly once). **runner CPU** = user + system of the runners (`/usr/bin/time`); "
        "**server CPU** = the PostgreSQL processes' CPU over the measurement, from /proc "
        "(the postmaster's reaped children included), so it also counts any other client of "
        "the server at that time.",
        "- pg_stat_statements "
        + (
            "was loaded: a target not met shows the statements that took the server's time."
            if statements
            else "was not loaded on the server: a target not met shows the CPU split only."
        ),
    ]
