"""Target checks: a verdict and what was compared, shared by the report's sections."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .inbox import InboxSpec
from .suite import Series

__all__ = [
    "Check",
    "Results",
    "missing",
    "ok_series",
    "shared_cpu_checks",
    "total_cpu_s",
    "total_cpus",
    "verdict",
]

Results = Mapping[tuple[InboxSpec, str], Series]


@dataclass(frozen=True, slots=True)
class Check:
    """One target from the issue: ``PASS``, ``FAIL`` or ``NOT RUN``, and what was compared."""

    verdict: str
    text: str
    #: Lines shown under the check: for a target not met, the profile that shows why.
    detail: tuple[str, ...] = ()

    def line(self) -> str:
        return "\n".join([f"- **{self.verdict}** {self.text}", *(f"  - {d}" for d in self.detail)])


def ok_series(results: Results, spec: InboxSpec, name: str) -> Series | None:
    series = results.get((spec, name))
    return series if series is not None and series.ok else None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def missing(what: str, spec: InboxSpec, results: Results, *names: str) -> Check | None:
    for name in names:
        series = results.get((spec, name))
        if series is None or not series.ok:
            failed = series is not None and bool(series.failures) and not series.skipped
            why = "failed" if failed else "not measured"
            if series is not None and series.skipped:
                why = f"skipped ({series.skipped})"
            return Check("FAIL" if failed else "NOT RUN", f"{what}: {name} at {spec.n:,} {why}")
    return None


X = "\N{MULTIPLICATION SIGN}"
#: Issue 21: the total CPU per file of N shared runners over one runner's, at most.
SHARED_CPU_TARGETS = ((2, "shared", 1.15), (4, "shared 4", 1.3))


def total_cpus(series: Series) -> list[float]:
    """Each repeat's total CPU seconds: the measured processes' user + system and, for a
    PostgreSQL series, the server's CPU over the measurement (a repeat without it is left out).
    """
    server_needed = series.name.startswith("asyncbatch pg")
    values: list[float] = []
    for sample in series.samples:
        server = sample.details.get("server_cpu_s")
        if sample.cpu_s is None or (server_needed and server is None):
            continue
        values.append(sample.cpu_s + (server or 0.0))
    return values


def total_cpu_s(series: Series) -> float | None:
    """The median of :func:`total_cpus`, or ``None`` when no repeat has it."""
    values = total_cpus(series)
    return statistics.median(values) if values else None


def shared_cpu_checks(
    results: Results,
    ref: InboxSpec,
    at: str,
    one: str,
    backend: str,
    why: Callable[[Series], tuple[str, ...]] | None = None,
) -> list[Check]:
    """Issue 21: 2 shared runners' total CPU per file ≤ 1.15x one runner's, 4 ≤ 1.3x.

    ``one`` is the one-runner series (``asyncbatch`` or ``asyncbatch pg``); the shared series
    are ``one + " shared"`` and ``one + " shared 4"``. The ratio is of the medians over the
    interleaved repeats; the per-repeat ratios (repeat i of each) are shown beside it. A
    target not met shows ``why(shared series)`` under it.
    """
    checks: list[Check] = []
    server = " + server" if backend == "PostgreSQL" else ""
    for runners, suffix, limit in SHARED_CPU_TARGETS:
        name = f"{one} {suffix}"
        what = (
            f"{backend}, {runners} shared runners' CPU{server} per file ≤ {limit}{X} one "
            f"runner's at {at}, 0 duplicates"
        )
        if (miss := missing(what, ref, results, one, name)) is not None:
            checks.append(miss)
            continue
        lone, shared = results[(ref, one)], results[(ref, name)]
        base, many = total_cpu_s(lone), total_cpu_s(shared)
        if base is None or many is None or base <= 0:
            checks.append(Check("NOT RUN", f"{what}: no CPU figure (server CPU not readable?)"))
            continue
        ratio = many / base
        # Repeat i of each was measured at about the same time: paired only when none failed.
        ones, manys = total_cpus(lone), total_cpus(shared)
        paired = (
            [b / a for a, b in zip(ones, manys, strict=True)] if len(ones) == len(manys) else []
        )
        dups = sum(int(s.details.get("duplicates", 0)) for s in shared.samples)
        ok = ratio <= limit and dups == 0
        per_file = f"{many / ref.n * 1e6:.0f} vs {base / ref.n * 1e6:.0f} µs/file"
        checks.append(
            Check(
                verdict(ok),
                f"{what}: {per_file} = {ratio:.2f}{X} (per repeat "
                f"{', '.join(f'{r:.2f}' for r in paired) or 'not paired'}); throughput "
                f"{shared.rate:,.0f} vs "
                f"{lone.rate:,.0f} files/s; {dups} duplicates over {len(shared.samples)} run(s)",
                () if ok or why is None else why(shared),
            )
        )
    return checks
