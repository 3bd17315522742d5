"""The cost of a disabled failpoint: ``python -m tests.torture.failpoint_cost``.

With ``ASYNCBATCH_FAILPOINTS`` unset, ``hit(name)`` is a call that checks one module constant,
and ``await ahit(name)`` the same in a coroutine that never suspends. Printed: nanoseconds per
call (the best of several rounds), beside an empty function call and an awaited empty
coroutine for scale, and the share of the cheapest per-file path that the points on it take.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import timeit

ROUNDS = 7
CALLS = 1_000_000


def best_ns(stmt: str, setup: str, number: int = CALLS) -> float:
    times = timeit.repeat(stmt, setup, repeat=ROUNDS, number=number)
    return min(times) / number * 1e9


def measure() -> dict[str, float]:
    if os.environ.get("ASYNCBATCH_FAILPOINTS", "").strip():
        raise SystemExit("unset ASYNCBATCH_FAILPOINTS first: this measures disabled failpoints")
    setup = "from asyncbatch._failpoints import hit, ahit\ndef empty(name): pass\n"
    found = {
        "hit_ns": best_ns("hit('in-handler')", setup),
        "empty_call_ns": best_ns("empty('in-handler')", setup),
    }

    async def awaited(n: int) -> float:
        from asyncbatch._failpoints import ahit

        async def nothing(name: str) -> None:
            return None

        loop = asyncio.get_running_loop()
        best_hit = best_nothing = float("inf")
        for _ in range(ROUNDS):
            t = loop.time()
            for _ in range(n):
                await ahit("after-commit")
            best_hit = min(best_hit, (loop.time() - t) / n * 1e9)
            t = loop.time()
            for _ in range(n):
                await nothing("after-commit")
            best_nothing = min(best_nothing, (loop.time() - t) / n * 1e9)
        found["awaited_empty_coroutine_ns"] = best_nothing
        return best_hit

    found["ahit_ns"] = asyncio.run(awaited(CALLS // 4))
    # Per file on the fast path: in-handler, 3 in write_output; per group: before/after-commit
    # and in-transaction; per claim chunk: after-claim and in-transaction.
    found["per_file_with_one_output_ns"] = found["ahit_ns"] + 3 * found["hit_ns"]
    return {k: round(v, 1) for k, v in found.items()}


if __name__ == "__main__":
    figures = measure()
    print(json.dumps(figures, sort_keys=True))
    path = os.environ.get("ASYNCBATCH_TORTURE_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"loop": "failpoint cost", "full": True, **figures}) + "\n")
    sys.exit(0)
