"""The benchmark driver: ``python -m benchmarks.run [--quick] [--sizes ...] [--repeat N] ...``.

Generates (or reuses) inboxes under the work dir, measures floor, recipe, huey and asyncbatch
(run, resume, 2 and 4 shared runners) over a SQLite state and over PostgreSQL (the server
``.ci/run`` starts; reported as skipped, with the reason, when it cannot be reached) side by
side as child processes, then the HTTP-bound comparison, and writes RESULTS.md and
throughput.png. A system that fails or times out is reported and the others go on; the exit
status is 1 if any measurement failed, else 0 (target checks never change it).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .http_suite import HTTP_SERIES, measure_http
from .inbox import InboxSpec, discard_inbox, ensure_inbox, parse_spec, warm_up
from .measure import BenchFailure, ensure_bytecode
from .pg import DEFAULT_DSN, PgServer
from .report import evaluate, machine_info, plot, render
from .report_pg import pg_method
from .suite import (
    PG_SERIES,
    SERIES,
    SQLITE_SERIES,
    SYSTEMS,
    Context,
    Sample,
    Series,
    asyncbatch_command,
    measure_asyncbatch,
    measure_floor,
    measure_huey,
    measure_pg,
    measure_pg_resume,
    measure_pg_shared,
    measure_pg_shared4,
    measure_recipe,
    measure_resume,
    measure_shared,
    measure_shared4,
)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = "10000,100000,1000000,1000000/1000"
QUICK_SIZES = "2000,20000"
#: recipe and huey take ~0.3-0.5 ms a file: above this N they are skipped unless asked for.
DEFAULT_SLOW_MAX = 100_000
SLOW = ("recipe", "huey")
#: PostgreSQL series above this N only when asked for (``--pg-max``): at a million files they
#: take longer than the rest of ``make bench`` together.
DEFAULT_PG_MAX = 100_000
#: Files of the HTTP-bound benchmark (its own inbox).
DEFAULT_HTTP_N = 5_000
QUICK_HTTP_N = 1_000

Measure = Callable[[Context, InboxSpec, Path, int], Sample]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=(__doc__ or "").replace("``", "`")
    )
    p.add_argument(
        "--quick", action="store_true", help=f"N = {QUICK_SIZES}, one repeat (about 2 minutes)"
    )
    p.add_argument(
        "--sizes", default=None, help=f"comma-separated N or N/SUBDIRS (default {DEFAULT_SIZES})"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repeats per measurement (default 3 for N <= 100,000, else 1)",
    )
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument(
        "--plot", type=Path, default=None, help="the plot (default: throughput.png beside --out)"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=HERE / ".work",
        help="inboxes, ledgers and logs (default benchmarks/.work)",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    p.add_argument(
        "--slow-max",
        type=int,
        default=None,
        help=f"largest N for recipe and huey (default {DEFAULT_SLOW_MAX:,}; quick: 20,000)",
    )
    p.add_argument(
        "--pg-dsn",
        default=DEFAULT_DSN,
        help=f"the PostgreSQL server and database, without search_path (default {DEFAULT_DSN})",
    )
    p.add_argument(
        "--pg-max",
        type=int,
        default=None,
        help=f"largest N for the PostgreSQL series (default {DEFAULT_PG_MAX:,}; quick: 20,000)",
    )
    p.add_argument(
        "--http-n",
        type=int,
        default=None,
        help=f"files of the HTTP-bound benchmark (default {DEFAULT_HTTP_N:,}; "
        f"quick: {QUICK_HTTP_N:,})",
    )
    p.add_argument(
        "--timeout-base",
        type=float,
        default=120.0,
        help="seconds allowed per measurement, plus --timeout-per-file * N",
    )
    p.add_argument("--timeout-per-file", type=float, default=0.002)
    args = p.parse_args(argv)
    try:
        args.specs = [
            parse_spec(s)
            for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")
            if s.strip()
        ]
    except ValueError as e:
        p.error(str(e))
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.system_list) - set(SYSTEMS))
    if unknown or not args.system_list:
        p.error(
            f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(SYSTEMS)}"
        )
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.slow_max is None:
        args.slow_max = 20_000 if args.quick else DEFAULT_SLOW_MAX
    if args.pg_max is None:
        args.pg_max = 20_000 if args.quick else DEFAULT_PG_MAX
    if args.http_n is None:
        args.http_n = QUICK_HTTP_N if args.quick else DEFAULT_HTTP_N
    if args.http_n < 1:
        p.error("--http-n must be at least 1")
    return args


def repeats(args: argparse.Namespace, spec: InboxSpec) -> int:
    if args.repeat is not None:
        return int(args.repeat)
    if args.quick:
        return 1
    return 3 if spec.n <= 100_000 else 1


def ensure_packages(systems: Sequence[str]) -> None:
    """Install the ``bench`` extra into this interpreter if huey or matplotlib is missing."""
    wanted = ["matplotlib"] + (["huey"] if "huey" in systems else [])
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if not missing:
        return
    print(
        f"{' and '.join(missing)} not installed: running pip install -e '.[test,bench]'", flush=True
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "-e", ".[test,bench]"],
        cwd=ROOT,
        check=False,
    )
    importlib.invalidate_caches()


def _fmt(sample: Sample, n: int) -> str:
    rate = n / sample.wall if sample.wall > 0 else float("inf")
    text = f"{sample.wall:.3f} s ({rate:,.0f} files/s), {sample.rss_mib:.0f} MiB"
    if sample.ledger_mib is not None:
        text += f", ledger {sample.ledger_mib:.1f} MiB"
    return text


class Driver:
    """Runs every measurement, keeping what succeeded and what failed."""

    def __init__(self, args: argparse.Namespace, ctx: Context) -> None:
        self.args = args
        self.ctx = ctx
        self.results: dict[tuple[InboxSpec, str], Series] = {}
        self.http: dict[tuple[InboxSpec, str], Series] = {}
        self.failures: list[tuple[str, str]] = []
        self.warmups: dict[InboxSpec, tuple[int, float]] = {}

    def series(self, spec: InboxSpec, name: str) -> Series:
        into = self.http if name in HTTP_SERIES else self.results
        return into.setdefault((spec, name), Series(name, spec))

    def measure(self, name: str, fn: Measure, spec: InboxSpec, inbox: Path, rep: int) -> bool:
        series = self.series(spec, name)
        label = f"  [{spec.spec_text}] {name:<18} {rep + 1}/{repeats(self.args, spec)}"
        try:
            sample = fn(self.ctx, spec, inbox, rep)
        except BenchFailure as e:
            message, detail = str(e), e.detail
        except Exception as e:  # a bug in a measurement must not lose the other results
            message, detail = f"{name}: {type(e).__name__}: {e}", ""
        else:
            series.samples.append(sample)
            print(f"{label}: {_fmt(sample, spec.n)}", flush=True)
            return True
        series.failures.append(message)
        title = f"{name} at {spec.label}, repeat {rep + 1}: {message}"
        self.failures.append((title, detail))
        print(f"{label}: FAILED: {message}", flush=True)
        if detail:
            print(
                "    stderr tail:\n" + "\n".join(f"    | {x}" for x in detail.splitlines()),
                flush=True,
            )
        return False

    def prepare(self, spec: InboxSpec, names: Sequence[str] | None = None) -> Path | None:
        for attempt in range(2):
            started = time.monotonic()
            try:
                inbox, reused = ensure_inbox(self.ctx.work, spec)
            except OSError as e:
                self.fail_all(spec, f"cannot generate the inbox: {e}", names)
                return None
            how = "reused" if reused else f"generated in {time.monotonic() - started:.1f} s"
            count, seconds = warm_up(inbox, spec)
            print(f"  inbox {inbox} ({how}); warm-up pass {seconds:.2f} s", flush=True)
            if count == spec.n:
                self.warmups[spec] = (count, seconds)
                return inbox
            print(f"  inbox holds {count:,} files, expected {spec.n:,}: regenerating", flush=True)
            if attempt == 0:
                discard_inbox(self.ctx.work, spec)
        self.fail_all(spec, "the generated inbox does not hold N files", names)
        return None

    def fail_all(self, spec: InboxSpec, message: str, names: Sequence[str] | None = None) -> None:
        self.failures.append((f"{spec.label}: {message}", ""))
        print(f"  FAILED: {message}", flush=True)
        for name in self.planned_series() if names is None else names:
            self.series(spec, name).failures.append(message)

    def planned_series(self) -> list[str]:
        chosen = self.args.system_list
        return [
            name
            for name in SERIES
            if name in chosen
            or (name in SQLITE_SERIES and "asyncbatch" in chosen)
            or (name in PG_SERIES and "postgres" in chosen)
        ]

    def run_spec(self, spec: InboxSpec) -> None:
        print(f"{spec.label}", flush=True)
        inbox = self.prepare(spec)
        if inbox is None:
            return
        chosen = self.args.system_list
        for name in self.planned_series():
            self.series(spec, name)
        slow_skipped = spec.n > self.args.slow_max
        for name in SLOW:
            if name in chosen and slow_skipped:
                self.series(spec, name).skipped = (
                    f"not run above N = {self.args.slow_max:,} (--slow-max): "
                    "about 0.3-0.5 ms a file"
                )
        pg_reason = self.pg_skip(spec) if "postgres" in chosen else None
        if pg_reason is not None:
            for name in PG_SERIES:
                self.series(spec, name).skipped = pg_reason
        for rep in range(repeats(self.args, spec)):
            if "floor" in chosen:
                self.measure("floor", measure_floor, spec, inbox, rep)
            if "recipe" in chosen and not slow_skipped:
                self.measure("recipe", measure_recipe, spec, inbox, rep)
            if "huey" in chosen and not slow_skipped:
                self.measure("huey", measure_huey, spec, inbox, rep)
            if "asyncbatch" in chosen:
                if self.measure("asyncbatch", measure_asyncbatch, spec, inbox, rep):
                    self.measure("asyncbatch resume", measure_resume, spec, inbox, rep)
                else:
                    self.series(spec, "asyncbatch resume").failures.append("the run failed")
                self.measure("asyncbatch shared", measure_shared, spec, inbox, rep)
                self.measure("asyncbatch shared 4", measure_shared4, spec, inbox, rep)
            if "postgres" in chosen and pg_reason is None:
                self.run_pg(spec, inbox, rep)

    def pg_skip(self, spec: InboxSpec) -> str | None:
        """Why the PostgreSQL series are not run at ``spec``, or ``None``."""
        if self.ctx.pg is None:
            return self.ctx.pg_skip or "PostgreSQL not configured"
        if spec.n > self.args.pg_max:
            return (
                f"not run above N = {self.args.pg_max:,} (--pg-max; `make bench-pg-1m` runs "
                "1,000,000 once): longer than the rest of the run"
            )
        return None

    def run_pg(self, spec: InboxSpec, inbox: Path, rep: int) -> None:
        if self.measure("asyncbatch pg", measure_pg, spec, inbox, rep):
            self.measure("asyncbatch pg resume", measure_pg_resume, spec, inbox, rep)
        else:
            self.series(spec, "asyncbatch pg resume").failures.append("the run failed")
        self.measure("asyncbatch pg shared", measure_pg_shared, spec, inbox, rep)
        self.measure("asyncbatch pg shared 4", measure_pg_shared4, spec, inbox, rep)

    def run_http(self) -> None:
        """The HTTP-bound comparison over its own flat inbox of ``--http-n`` files."""
        spec = InboxSpec(self.args.http_n)
        print(f"HTTP-bound, {spec.label}", flush=True)
        inbox = self.prepare(spec, HTTP_SERIES)
        if inbox is None:
            return
        for name in HTTP_SERIES:
            self.series(spec, name)
        for rep in range(repeats(self.args, spec)):
            for name in HTTP_SERIES:
                client = functools.partial(measure_http, client=name)
                self.measure(name, client, spec, inbox, rep)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_bytecode()
    started = time.monotonic()
    command = shlex.join(
        ["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
    )
    ensure_packages(args.system_list)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    pg: PgServer | str | None = None
    if "postgres" in args.system_list:
        pg = PgServer.probe(args.pg_dsn)
        print(f"  PostgreSQL: {pg if isinstance(pg, str) else 'reachable'}", flush=True)
    ctx = Context(
        root=ROOT,
        work=work,
        python=sys.executable,
        asyncbatch=asyncbatch_command(sys.executable),
        timeout_base=args.timeout_base,
        timeout_per_file=args.timeout_per_file,
        pg=pg if isinstance(pg, PgServer) else None,
        pg_skip=pg if isinstance(pg, str) else None,
    )
    machine = machine_info(work, ROOT)
    if ctx.pg is not None:
        statements = "loaded" if ctx.pg.has_statements else "not loaded"
        machine["PostgreSQL"] = f"{ctx.pg.version} (pg_stat_statements {statements})"
    print(f"{command}\n" + "".join(f"  {k}: {v}\n" for k, v in machine.items()), flush=True)
    driver = Driver(args, ctx)
    interrupted = False
    try:
        for spec in args.specs:
            driver.run_spec(spec)
        if "http" in args.system_list:
            driver.run_http()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing what was measured", flush=True)
    finally:
        if ctx.pg is not None:
            ctx.pg.cleanup()

    out: Path = args.out.resolve()
    plot_path: Path = (args.plot or out.with_name("throughput.png")).resolve()
    plot_name: str | None = None
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        plot(driver.results, plot_path, "asyncbatch benchmark: files/s against N")
        plot_name = plot_path.name if plot_path.parent == out.parent else str(plot_path)
        print(f"wrote {plot_path}", flush=True)
    except Exception as e:  # matplotlib missing or broken: the tables still count
        print(f"no plot: {type(e).__name__}: {e}", flush=True)
    checks = evaluate(driver.results, driver.http)
    method: list[str] = []
    if "postgres" in args.system_list:
        version = ctx.pg.version if ctx.pg is not None else ""
        has_statements = ctx.pg.has_statements if ctx.pg is not None else False
        method = pg_method(args.pg_dsn, ctx.pg_skip, has_statements, version)
    previous = out.read_text() if out.exists() else None
    out.write_text(
        render(
            command=command,
            machine=machine,
            specs=args.specs,
            results=driver.results,
            checks=checks,
            warmups=driver.warmups,
            failures=driver.failures,
            plot_name=plot_name,
            quick=args.quick,
            interrupted=interrupted,
            elapsed=time.monotonic() - started,
            previous=previous,
            http=driver.http,
            method=method,
        )
    )
    print("\n".join(check.line() for check in checks))
    print(f"wrote {out} ({(time.monotonic() - started) / 60:.1f} min)", flush=True)
    if interrupted:
        return 130
    return 1 if driver.failures else 0


if __name__ == "__main__":
    sys.exit(main())
