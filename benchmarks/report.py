"""RESULTS.md (machine, method, target checks, one table per inbox) and throughput.png."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

from .checks import Check, Results, missing, ok_series, shared_cpu_checks, total_cpu_s, verdict
from .inbox import InboxSpec
from .report_http import http_checks, http_method, http_table
from .report_pg import pg_checks, pg_tables
from .suite import CONCURRENCY, SERIES, SHARED_RUNNERS, WIDE_RUNNERS, Series

__all__ = ["Check", "Results", "evaluate", "machine_info", "plot", "render"]

#: This heading and everything after it are kept from the previous RESULTS.md: the engineers'
#: own notes survive a regenerated file.
NOTES_HEADING = "## What each optimisation bought"
NOTES_PLACEHOLDER = "See the engineering notes below.\n"
REFERENCE_N = 100_000
X = "\N{MULTIPLICATION SIGN}"
EN = "\N{EN DASH}"
LARGE_N = 1_000_000


# -- the machine ---------------------------------------------------------------------------------


def _meminfo() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def filesystem_of(path: Path) -> str:
    """``fstype (source, mounted on M)`` of the mount holding ``path``, from mountinfo."""
    target = os.path.realpath(path)
    best: tuple[int, str] = (-1, "unknown")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mount = _unescape(fields[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best[0]:
            fstype, source = [*right.split(), "?", "?"][:2]
            best = (len(mount), f"{fstype} ({source}, mounted on {mount})")
    return best[1]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(root: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "asyncbatch"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in asyncbatch/" if dirty else "")


def machine_info(work: Path, root: Path) -> dict[str, str]:
    """What the run ran on, as label → text."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": f"{os.cpu_count()} (os.cpu_count())",
        "memory": _meminfo(),
        "work dir": f"{work} on {filesystem_of(work)}",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "asyncbatch": f"{_version('asyncbatch')} (git {_git(root)})",
        "huey": _version("huey"),
        "load average at start": f"{load} (1, 5, 15 min)",
    }


# -- target checks -------------------------------------------------------------------------------


def _flat(results: Results) -> list[InboxSpec]:
    return sorted({spec for spec, _ in results if not spec.subdirs})


def _reference(results: Results) -> InboxSpec | None:
    """The flat 100,000 inbox, else the largest flat one below it (a quick run)."""
    flat = _flat(results)
    exact = [s for s in flat if s.n == REFERENCE_N]
    if exact:
        return exact[0]
    below = [s for s in flat if s.n < REFERENCE_N]
    return below[-1] if below else None


def evaluate(results: Results, http: Results | None = None) -> list[Check]:
    """The issues' targets, each evaluated on the medians measured."""
    checks = _evaluate_sqlite(results)
    ref = _reference(results)
    if ref is not None:
        at = f"{ref.n:,}" + ("" if ref.n == REFERENCE_N else f" (in place of {REFERENCE_N:,})")
        checks += pg_checks(results, ref, at)
    return checks + http_checks(http or {})


def _evaluate_sqlite(results: Results) -> list[Check]:
    checks: list[Check] = []
    ref = _reference(results)
    if ref is None:
        return [Check("NOT RUN", "no flat inbox of at most 100,000 files was measured")]
    at = f"{ref.n:,}" + ("" if ref.n == REFERENCE_N else f" (in place of {REFERENCE_N:,})")

    what = f"asyncbatch at {at} ≤ 4{X} floor (stretch ≤ 3{X})"
    if (miss := missing(what, ref, results, "floor", "asyncbatch")) is not None:
        checks.append(miss)
    else:
        ab, floor = results[(ref, "asyncbatch")], results[(ref, "floor")]
        ratio = ab.wall / floor.wall
        detail = f"{ab.wall:.2f} s vs floor {floor.wall:.2f} s = {ratio:.2f}{X} floor"
        checks.append(Check(verdict(ratio <= 4), f"asyncbatch at {at} ≤ 4{X} floor: {detail}"))
        checks.append(
            Check(verdict(ratio <= 3), f"(stretch) asyncbatch at {at} ≤ 3{X} floor: {ratio:.2f}{X}")
        )

    for peer in ("recipe", "huey"):
        what = f"asyncbatch ≥ 10{X} faster than {peer} at {at}"
        if (miss := missing(what, ref, results, peer, "asyncbatch")) is not None:
            checks.append(miss)
            continue
        ab, other = results[(ref, "asyncbatch")], results[(ref, peer)]
        speedup = other.wall / ab.wall
        checks.append(
            Check(
                verdict(speedup >= 10),
                f"{what}: {other.wall:.2f} s vs {ab.wall:.2f} s = {speedup:.1f}{X}",
            )
        )

    what = f"resume over {at} done ≤ 2{X} floor"
    if (miss := missing(what, ref, results, "floor", "asyncbatch resume")) is not None:
        checks.append(miss)
    else:
        resume, floor = results[(ref, "asyncbatch resume")], results[(ref, "floor")]
        ratio = resume.wall / floor.wall
        checks.append(
            Check(
                verdict(ratio <= 2),
                f"{what}: {resume.wall:.2f} s vs floor {floor.wall:.2f} s = {ratio:.2f}{X}",
            )
        )

    large = sorted({spec for spec, _ in results if spec.n == LARGE_N})
    if not large:
        checks.append(
            Check(
                "NOT RUN",
                f"{LARGE_N:,} files: peak RSS ≤ 300 MiB and files/s ≥ 80% of the "
                f"{REFERENCE_N:,} rate (not measured in this run)",
            )
        )
    base = ok_series(results, ref, "asyncbatch")
    for spec in large:
        what = f"asyncbatch over {spec.label} completes, peak RSS ≤ 300 MiB, files/s ≥ 80% of {at}"
        if (miss := missing(what, spec, results, "asyncbatch")) is not None:
            checks.append(miss)
            continue
        ab = results[(spec, "asyncbatch")]
        share = ab.rate / base.rate if base is not None else float("nan")
        passed = ab.rss_mib <= 300 and base is not None and share >= 0.8
        checks.append(
            Check(
                verdict(passed),
                f"{what}: {ab.rss_mib:.0f} MiB, {ab.rate:,.0f} files/s = {share:.0%} of "
                f"{base.rate if base else float('nan'):,.0f}",
            )
        )

    checks += shared_cpu_checks(results, ref, at, "asyncbatch", "SQLite")
    return checks


# -- the document --------------------------------------------------------------------------------


def _secs(seconds: float) -> str:
    return (
        f"{seconds:.3f}"
        if seconds < 10
        else f"{seconds:.2f}"
        if seconds < 100
        else f"{seconds:.1f}"
    )


def _range(series: Series) -> str:
    if len(series.samples) < 2:
        return EN
    return f"{_secs(series.wall_min)}{EN}{_secs(series.wall_max)}"


def _notes(series: Series) -> str:
    notes: list[str] = []
    if series.name == "huey" and series.ok:
        enq, con, proc = (series.detail(k) for k in ("enqueue_s", "consume_s", "process_s"))
        if enq is not None and con is not None and proc is not None:
            notes.append(f"enqueue {enq:.2f} s + consume {con:.2f} s; whole process {proc:.2f} s")
    if "shared" in series.name and series.ok:
        last = series.samples[-1].details
        done = sorted(k for k in last if k.startswith("runner") and k.endswith("_done"))
        split = " + ".join(f"{int(last[k]):,}" for k in done)
        dups = sum(int(s.details.get("duplicates", 0)) for s in series.samples)
        notes.append(f"{len(done)} runners; {dups} duplicates; done split {split}")
    server = series.detail("server_cpu_s") if series.ok else None
    if server is not None:
        notes.append(f"server CPU {server:.2f} s")
    if series.ok:
        notes.append(f"n={len(series.samples)}")
    if series.failures:
        failed = len(series.failures)
        notes.append(f"{failed} of {failed + len(series.samples)} failed: {series.failures[0]}")
    return "; ".join(notes).replace("|", "/")


def _table(spec: InboxSpec, results: Results) -> list[str]:
    lines = [
        f"### {spec.label}",
        "",
        f"| system | wall s (median) | min{EN}max | files/s | {X} floor | peak RSS MiB "
        "| CPU s | CPU µs/file | ledger MiB | notes |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    floor = ok_series(results, spec, "floor")
    for name in SERIES:
        series = results.get((spec, name))
        if series is None:
            continue
        if series.skipped:
            lines.append(f"| {name} | skipped | | | | | | | | {series.skipped} |")
            continue
        if not series.ok:
            state = "failed" if series.failures else "not run"
            lines.append(f"| {name} | {state} | | | | | | | | {_notes(series)} |")
            continue
        ratio = f"{series.wall / floor.wall:.2f}" if floor is not None else EN
        ledger = f"{series.ledger_mib:.1f}" if series.ledger_mib is not None else EN
        cpu = f"{series.cpu_s:.2f}" if series.cpu_s is not None else EN
        total = total_cpu_s(series)
        per_file = f"{total / spec.n * 1e6:.0f}" if total is not None else EN
        lines.append(
            f"| {name} | {_secs(series.wall)} | {_range(series)} | {series.rate:,.0f} | {ratio} "
            f"| {series.rss_mib:.0f} | {cpu} | {per_file} | {ledger} | {_notes(series)} |"
        )
    return [*lines, ""]


def _method(
    quick: bool, warmups: Mapping[InboxSpec, tuple[int, float]], extra: Sequence[str]
) -> list[str]:
    warm = ", ".join(f"{spec.spec_text}: {sec:.2f} s" for spec, (_, sec) in sorted(warmups.items()))
    lines = [
        "## Method",
        "",
        "- Each inbox holds N files of 128 bytes, mtimes a day in the past (all settled). "
        "Generated inboxes are reused across runs (a marker file beside each).",
        "- Caches cannot be dropped here, so each inbox gets one warm-up pass (listing, stat "
        "and read of every file) before it is measured: every system sees a **warm page "
        f"cache**. Warm-up times: {warm or 'none'}.",
        "- Every system runs as its own **child process**; peak RSS is that child's own, as "
        "`/usr/bin/time -f %M` reports it (for the shared runners, the largest). Not "
        "`ru_maxrss` from `os.wait4`: Linux keeps that mark across `exec`, so every child would "
        "inherit this driver's peak (hundreds of MiB once it has listed a million files).",
        "- **wall** is from spawning the child to its exit (interpreter start-up and imports "
        "included), except huey: from the start of the listing + enqueue to the last task's "
        "completion (start-up and consumer shutdown excluded; the whole process is in the notes).",
        "- **floor**: one plain process, `os.scandir` + `entry.stat()` + sort by "
        "`(mtime_ns, name)` + `open().read()` of every file; no state.",
        "- **recipe**: `ThreadPoolExecutor(8)`; per file, in its thread's own WAL SQLite "
        "connection (`synchronous=NORMAL`, `busy_timeout`, retry on busy): skip if done, take a "
        "`task_lock` row with `INSERT OR IGNORE` (commit), read, `INSERT INTO done` (commit), "
        "delete the lock row (commit).",
        "- **huey**: `SqliteHuey` (WAL), one task per file enqueued by the producer, then a "
        "consumer of 4 worker threads in the same process until every task completed; the task "
        "reads the file. Its connection is set to `synchronous=NORMAL`, the durability recipe "
        "and asyncbatch run with (huey's own default leaves SQLite's FULL, an fsync per "
        "commit: about 2.5x slower enqueues here).",
        f"- **asyncbatch**: the CLI, `asyncbatch run benchmarks.bench_handler:handle --source "
        f"INBOX --state STATE -j {CONCURRENCY} --settle 0 --no-progress` (`--recursive` for "
        "subdirectories), the handler does `await ctx.read_bytes()`. **resume**: the same "
        f"command again over the all-done inbox. **shared** / **shared {WIDE_RUNNERS}**: "
        f"{SHARED_RUNNERS} / {WIDE_RUNNERS} `--shared` runners over a fresh "
        "ledger, started together; wall = until all exit; verified: every file handled exactly "
        "once over the runners' handler logs, their runs' done (`asyncbatch history --json`) "
        "add up to N, `asyncbatch status --json` counts N done. **CPU s** = user + system of "
        "the measured processes together (`/usr/bin/time`); **CPU µs/file** = the median over "
        "repeats of that plus, for PostgreSQL, the server's CPU over the measurement, per file "
        "(issue 21's targets compare it: shared runners against one).",
        "- A fresh ledger (deleted with its -wal and -shm) before every measurement but resume. "
        "**ledger MiB** = state file + `-wal` after the child exited.",
        "- Repeats are interleaved (every system and series once, in table order, then again); "
        f"the table shows the median and the min{EN}max over repeats; **{X} floor** = median wall "
        "over floor's median wall for the same inbox; files/s = N / median wall.",
    ]
    lines += extra
    if quick:
        lines.append(
            "- This was a **--quick** run (N = 2,000 and 20,000, one repeat): the targets stated "
            "at 100,000 are evaluated at 20,000 and the 1,000,000-file target is not run."
        )
    return [*lines, ""]


def _kept_notes(previous: str | None) -> str:
    if previous and NOTES_HEADING in previous:
        return previous[previous.index(NOTES_HEADING) :].rstrip() + "\n"
    return f"{NOTES_HEADING}\n\n{NOTES_PLACEHOLDER}"


def render(
    *,
    command: str,
    machine: Mapping[str, str],
    specs: Sequence[InboxSpec],
    results: Results,
    checks: Iterable[Check],
    warmups: Mapping[InboxSpec, tuple[int, float]],
    failures: Sequence[tuple[str, str]],
    plot_name: str | None,
    quick: bool,
    interrupted: bool,
    elapsed: float,
    previous: str | None,
    http: Results | None = None,
    method: Sequence[str] = (),
) -> str:
    """The whole RESULTS.md."""
    lines = [
        "# asyncbatch benchmarks",
        "",
        f"Generated {machine['date']} by `{command}` in {elapsed / 60:.1f} min. "
        "Regenerated by every run: edit only the last section "
        f'("{NOTES_HEADING[3:]}" and below), which a new run keeps.',
        "",
    ]
    if interrupted:
        lines += ["**The run was interrupted: the tables hold what was measured.**", ""]
    lines += ["## Machine", ""]
    lines += [f"- {label}: {text}" for label, text in machine.items()]
    http_n = max((spec.n for spec, _ in (http or {})), default=None)
    lines += ["", *_method(quick, warmups, [*method, *http_method(http_n)])]
    lines += ["## Target checks", "", *(check.line() for check in checks), ""]
    lines += ["## Results", ""]
    for spec in specs:
        lines += _table(spec, results)
    lines += pg_tables(specs, results)
    lines += http_table(http or {})
    if plot_name:
        lines += [f"![files/s against N]({plot_name})", ""]
    if failures:
        lines += ["## Failures", ""]
        for title, detail in failures:
            lines.append(f"- {title}")
            if detail:
                lines += ["", "  ```text", *(f"  {line}" for line in detail.splitlines()), "  ```"]
        lines.append("")
    return "\n".join(lines) + "\n" + _kept_notes(previous)


# -- the plot ------------------------------------------------------------------------------------

_STYLE = {
    "floor": ("black", "o", "--"),
    "recipe": ("tab:red", "s", "-"),
    "huey": ("tab:orange", "D", "-"),
    "asyncbatch": ("tab:blue", "o", "-"),
    "asyncbatch resume": ("tab:green", "^", "-"),
    "asyncbatch shared": ("tab:purple", "v", "-"),
    "asyncbatch shared 4": ("tab:pink", "<", "-"),
    "asyncbatch pg": ("tab:cyan", "o", ":"),
    "asyncbatch pg resume": ("tab:olive", "^", ":"),
    "asyncbatch pg shared": ("tab:brown", "v", ":"),
    "asyncbatch pg shared 4": ("tab:gray", "<", ":"),
}


def _minor_label(value: float, _: object) -> str:
    """Label the 2, 3 and 5 minor ticks of a log axis only (the others crowd it)."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:,.0f}" if lead in (2, 3, 5) else ""


def plot(results: Results, path: Path, title: str) -> None:
    """files/s against N (log-log), one line per system; subdirectory inboxes as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    any_subdirs = False
    for name in SERIES:
        color, marker, style = _STYLE[name]
        flat = sorted(
            (spec.n, s.rate)
            for (spec, n), s in results.items()
            if n == name and s.ok and not spec.subdirs
        )
        if flat:
            xs, ys = zip(*flat, strict=True)
            ax.plot(xs, ys, marker=marker, linestyle=style, color=color, label=name)
        nested = [
            (spec.n, s.rate)
            for (spec, n), s in results.items()
            if n == name and s.ok and spec.subdirs
        ]
        for x, y in nested:
            any_subdirs = True
            ax.plot([x], [y], marker=marker, markerfacecolor="none", color=color, linestyle="")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({spec.n for spec, _ in results})
    if sizes:
        from matplotlib.ticker import FuncFormatter, NullLocator

        ax.set_xticks(sizes)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    ax.set_xlabel("N files in the inbox (log scale)")
    ax.set_ylabel("files/s (median, log scale)")
    ax.set_title(title + (" — open markers: files in subdirectories" if any_subdirs else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
