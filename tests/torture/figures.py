"""The figures of a torture run, as Markdown: ``python -m tests.torture.figures FILE [SECONDS]``.

``FILE`` is the JSON-lines file the loops appended to (``ASYNCBATCH_TORTURE_FIGURES``);
``SECONDS`` the wall time of the whole run, if known.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any


def held(invariants: dict[str, int], allowed: dict[str, int] | None = None) -> str:
    allowed = allowed or {}
    broken = {k: v for k, v in invariants.items() if v > allowed.get(k, 0)}
    if broken:
        return "BROKEN: " + ", ".join(f"{k}={v}" for k, v in sorted(broken.items()))
    bounded = {k: v for k, v in invariants.items() if v}
    note = "; ".join(f"{k}={v} (bound {allowed[k]})" for k, v in sorted(bounded.items()))
    return f"all {len(invariants)} held" + (f"; {note}" if note else "")


def render(records: list[dict[str, Any]], seconds: float | None) -> str:
    by_loop: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        by_loop[r["loop"]].append(r)
    out: list[str] = []
    crashes = sum(r["crashes"] for r in by_loop["failpoint"] + by_loop["failpoint s3"])
    kills = sum(r["kills"] for r in by_loop["sigkill"])
    head = f"{crashes} failpoint crashes, {kills} random SIGKILLs"
    if seconds is not None:
        head = f"{seconds / 60:.1f} minutes; " + head
    out.append(f"**make torture**: {head}.\n")
    if by_loop["failpoint"]:
        out.append("| failpoint | backend | crashes | files | handler calls | invariants |")
        out.append("|---|---|---|---|---|---|")
        for r in sorted(by_loop["failpoint"], key=lambda r: (r["point"], r["backend"])):
            allowed = (
                {"duplicate_effects": r["crashes"] * 4}
                if r["point"] == "middleware-executed"
                else {}
            )
            out.append(
                f"| {r['point']} | {r['backend']} | {r['crashes']} | {r['files']} | "
                f"{r['invocations']} | {held(r['invariants'], allowed)} |"
            )
        out.append("")
    if by_loop["failpoint s3"]:
        out.append(
            "| failpoint, s3:// | backend | crashes | objects | handler calls | seconds "
            "| invariants |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in sorted(by_loop["failpoint s3"], key=lambda r: (r["point"], r["backend"])):
            allowed = (
                {"duplicate_effects": r["crashes"] * 4}
                if r["point"] == "middleware-executed"
                else {}
            )
            out.append(
                f"| {r['point']} | {r['backend']} | {r['crashes']} | {r['files']} | "
                f"{r['invocations']} | {r['seconds']} | {held(r['invariants'], allowed)} |"
            )
        out.append("")
    if by_loop["sigkill"]:
        out.append(
            "| random SIGKILL loop | kills | runs of 2 shared runners | files | "
            "handler calls | seconds | invariants |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in by_loop["sigkill"]:
            out.append(
                f"| {r['backend']} | {r['kills']} | {r['runs_with_two_shared_runners']} | "
                f"{r['files']} | {r['invocations']} | {r['seconds']} | {held(r['invariants'])} |"
            )
        out.append("")
    if by_loop["lister kills"]:
        out.append(
            "| lister killed at random (3 shared runners) | kills | longest takeover s | files "
            "| handler calls | seconds | invariants |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in by_loop["lister kills"]:
            out.append(
                f"| {r['backend']} | {r['kills']} | {r['longest_takeover_s']} | {r['files']} | "
                f"{r['invocations']} | {r['seconds']} | {held(r['invariants'])} |"
            )
        out.append("")
    for r in by_loop["hosts"]:
        out.append(
            f"- three hosts sharing a job ({r['backend']}), the lister's host SIGKILLed after "
            f"{r['handled_before_the_kill']} handler calls: {r['files']} objects, "
            f"{r['invocations']} handler calls ({r['killed_host_had_handled']} on the dead "
            f"host), {r['seconds']} s; {held(r['invariants'])}"
        )
    for r in by_loop["pause"]:
        out.append(
            f"- pause past the lease ({r['backend']}): {r['taken_over']} of 6 items taken over, "
            f"{r['late_writes']} late writes by the paused runner, "
            f"{r.get('handlers_started_after_resume', '?')} handlers it started after resuming, "
            f"{r['lease_lost_log_lines']} log lines saying it lost its lease, "
            f"exit {r['paused_exit']}"
        )
    for r in by_loop["cancellation"]:
        out.append(
            f"- cancellation ({r['backend']}): {r['cancelled']} of {r['points']} points "
            f"cancelled at ({r['transactions_per_run']} transactions per run), all invariants "
            "held"
        )
    for r in by_loop["state machine"]:
        out.append(
            f"- ledger state machine ({r['backend']}): {r['examples']} examples, "
            f"{r['checks']} steps checked against the model"
        )
    for r in by_loop["io fault"]:
        out.append(f"- I/O fault: {r['fault']}: {'held' if r['held'] else 'BROKEN'}")
    for r in by_loop["abuse"]:
        extra = ", ".join(
            f"{k}={v}" for k, v in sorted(r.items()) if k not in ("loop", "case", "full")
        )
        out.append(f"- abuse: {r['case']}: {extra}")
    for r in by_loop["failpoint cost"]:
        out.append(
            f"- a disabled failpoint: `hit()` {r['hit_ns']} ns (an empty call: "
            f"{r['empty_call_ns']} ns), `await ahit()` {r['ahit_ns']} ns (an awaited empty "
            f"coroutine: {r['awaited_empty_coroutine_ns']} ns)"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    records = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line]
    seconds = float(argv[2]) if len(argv) > 2 else None
    sys.stdout.write(render(records, seconds))
    broken = "BROKEN" in render(records, seconds)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
