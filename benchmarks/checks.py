"""Target checks: a verdict and what was compared, shared by the report's sections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .inbox import InboxSpec
from .suite import Series

__all__ = ["Check", "Results", "missing", "ok_series", "verdict"]

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
