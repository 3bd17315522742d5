"""RESULTS.md's HTTP-bound section: files/s and CPU per 1,000 files of three clients."""

from __future__ import annotations

from .checks import Check, Results, missing, verdict
from .http_suite import HTTP_CONCURRENCY, HTTP_DELAY, HTTP_SERIES
from .inbox import InboxSpec
from .suite import Series

__all__ = ["http_checks", "http_method", "http_table"]

EN = "\N{EN DASH}"
X = "\N{MULTIPLICATION SIGN}"


def _spec(results: Results) -> InboxSpec | None:
    specs = sorted({spec for spec, _ in results})
    return specs[-1] if specs else None


def _per_1k(series: Series, seconds: float | None) -> str:
    return f"{seconds / series.spec.n * 1000:.2f}" if seconds is not None else EN


def _cpu_text(series: Series) -> str:
    client = series.cpu_s
    server = series.detail("server_cpu_s")
    text = f"{series.name} {_per_1k(series, client)} s"
    return text + (f" (server {_per_1k(series, server)} s)" if server is not None else "")


def http_checks(results: Results) -> list[Check]:
    """asyncbatch ≥ 80% of the bare client's rate and ahead of the recipe; CPU of each."""
    spec = _spec(results)
    if spec is None:
        return [Check("NOT RUN", "HTTP-bound benchmark (not measured in this run)")]
    checks: list[Check] = []
    cpu = "; CPU per 1,000 files: " + ", ".join(
        _cpu_text(results[(spec, name)])
        for name in HTTP_SERIES
        if (spec, name) in results and results[(spec, name)].ok
    )
    what = f"HTTP-bound at {spec.n:,}: asyncbatch ≥ 80% of the bare async client's rate"
    if (miss := missing(what, spec, results, "http asyncbatch", "http bare")) is not None:
        checks.append(miss)
    else:
        ab, bare = results[(spec, "http asyncbatch")], results[(spec, "http bare")]
        share = ab.rate / bare.rate
        checks.append(
            Check(
                verdict(share >= 0.8),
                f"{what}: {ab.rate:,.0f} vs {bare.rate:,.0f} files/s = {share:.0%}{cpu}",
            )
        )
    what = f"HTTP-bound at {spec.n:,}: asyncbatch ahead of the thread-pool recipe"
    if (miss := missing(what, spec, results, "http asyncbatch", "http recipe")) is not None:
        checks.append(miss)
    else:
        ab, recipe = results[(spec, "http asyncbatch")], results[(spec, "http recipe")]
        checks.append(
            Check(
                verdict(ab.rate > recipe.rate),
                f"{what}: {ab.rate:,.0f} vs {recipe.rate:,.0f} files/s "
                f"= {ab.rate / recipe.rate:.2f}{X}",
            )
        )
    return checks


def http_table(results: Results) -> list[str]:
    """The HTTP-bound table (one inbox)."""
    spec = _spec(results)
    if spec is None:
        return []
    lines = [
        f"### HTTP-bound, {spec.label}",
        "",
        f"| client | wall s (median) | min{EN}max | files/s | % of bare | client CPU s / 1k files "
        "| server CPU s / 1k files | peak RSS MiB | connections | notes |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    bare = results.get((spec, "http bare"))
    for name in HTTP_SERIES:
        series = results.get((spec, name))
        if series is None:
            continue
        if not series.ok:
            state = "failed" if series.failures else "not run"
            why = series.failures[0] if series.failures else ""
            lines.append(f"| {name} | {state} | | | | | | | | {why.replace('|', '/')} |")
            continue
        span = f"{series.wall_min:.2f}{EN}{series.wall_max:.2f}" if len(series.samples) > 1 else EN
        share = f"{series.rate / bare.rate:.0%}" if bare is not None and bare.ok else EN
        conns = series.detail("connections")
        lines.append(
            f"| {name} | {series.wall:.2f} | {span} | {series.rate:,.0f} | {share} "
            f"| {_per_1k(series, series.cpu_s)} | {_per_1k(series, series.detail('server_cpu_s'))} "
            f"| {series.rss_mib:.0f} | {f'{conns:,.0f}' if conns is not None else EN} "
            f"| each file run once by the server; n={len(series.samples)} |"
        )
    return [*lines, ""]


def http_method(n: int | None) -> list[str]:
    """The method bullets for the HTTP-bound benchmark."""
    if n is None:
        return []
    ms = HTTP_DELAY * 1000
    return [
        f"- **HTTP-bound** (N = {n:,}): each file POSTed to a local API that sleeps {ms:.0f} ms "
        "and answers 200 with a small JSON body: a bare ASGI app behind "
        "`asyncbatch.IdempotencyMiddleware` (its own SQLite state), served by **uvicorn with "
        "one worker in its own process** (h11, asyncio loop: no httptools or uvloop installed); "
        "a fresh server and state for every measurement. Clients, each "
        f"{HTTP_CONCURRENCY} at once: **http bare** a bare `httpx.AsyncClient` loop (default "
        "client, no ledger, no retries); **http asyncbatch** `asyncbatch run "
        f"benchmarks.bench_handler:post -j {HTTP_CONCURRENCY}` (SQLite state, "
        "`await ctx.http.post(URL, content=await ctx.read_bytes())`); **http recipe** "
        f"`ThreadPoolExecutor({HTTP_CONCURRENCY})` + one sync `httpx.Client` (pool of "
        f"{HTTP_CONCURRENCY} kept alive) + the recipe's per-file SQLite bookkeeping. bare and "
        "recipe send an `Idempotency-Key` too (sha256 of the relpath), so the server does the "
        "same work for every client. **client CPU** = user + system of the client process "
        "(`/usr/bin/time`), **server CPU** = the server process's user + system over the "
        "client's run (from /proc), per 1,000 files. Verified: the server's app ran each "
        "file's body exactly once (no body, no key twice); asyncbatch's run did N and "
        "`status` counts N done. **connections** = distinct client ports the server saw.",
    ]
