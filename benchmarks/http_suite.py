"""The HTTP-bound benchmark: every file POSTed to a local API that answers after 5 ms.

Three clients over the same inbox, each against a fresh server (its own process, its own
middleware state, so no key is ever replayed from an earlier measurement):

- ``http bare``: :mod:`benchmarks.systems.http_bare`, a bare ``httpx.AsyncClient`` loop of 64
  tasks, no ledger (the limit);
- ``http asyncbatch``: ``asyncbatch run benchmarks.bench_handler:post -j 64`` over a fresh
  SQLite state (``ctx.http.post``: keyed, retried);
- ``http recipe``: :mod:`benchmarks.systems.http_recipe`, ``ThreadPoolExecutor(64)`` with a
  sync ``httpx.Client`` and the recipe's per-file SQLite bookkeeping.

Verified: the server's application ran every file's body exactly once (N distinct bodies, none
twice, no key twice), and each client says it handled N files (asyncbatch: its run did N and
``asyncbatch status`` counts N done, and its handler log names every file once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx

from .inbox import InboxSpec
from .measure import BenchFailure, ledger_mib, remove_ledger
from .pg import proc_stat
from .suite import Context, Sample, ledger_runs, source_argv, status_done

__all__ = ["HTTP_CONCURRENCY", "HTTP_DELAY", "HTTP_SERIES", "measure_http"]

HTTP_SERIES = ("http bare", "http asyncbatch", "http recipe")
HTTP_CONCURRENCY = 64
HTTP_DELAY = 0.005
HTTP_HANDLER = "benchmarks.bench_handler:post"
_READY_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """One server process: started, probed until it answers, stopped with SIGTERM."""

    def __init__(self, ctx: Context, log_stem: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/items"
        self.state = ctx.state("http-server.db")
        self.counts_path = log_stem.with_name(log_stem.name + ".server-counts.json")
        remove_ledger(self.state)
        self.counts_path.unlink(missing_ok=True)
        log_stem.parent.mkdir(parents=True, exist_ok=True)
        self.err_path = log_stem.with_name(log_stem.name + ".server.err")
        argv = [
            ctx.python,
            "-m",
            "benchmarks.systems.http_server",
            "--port",
            str(self.port),
            "--state",
            str(self.state),
            "--counts",
            str(self.counts_path),
            "--delay",
            str(HTTP_DELAY),
        ]
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=ctx.root,
                env=ctx.env(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        self._wait_ready()

    def _tail(self) -> str:
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchFailure(f"http server exited with {self.proc.returncode}", self._tail())
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise BenchFailure(f"http server not ready after {_READY_TIMEOUT:.0f} s", self._tail())

    def cpu_seconds(self) -> float | None:
        stat = proc_stat(self.proc.pid)
        return None if stat is None else stat[1]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> dict[str, int]:
        """SIGTERM (uvicorn shuts down gracefully and writes the counts); what it saw."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        try:
            counts = json.loads(self.counts_path.read_text())
        except (OSError, ValueError):
            raise BenchFailure("http server wrote no counts at shutdown", self._tail()) from None
        remove_ledger(self.state)
        return {str(k): int(v) for k, v in counts.items()}


def _argv(ctx: Context, spec: InboxSpec, inbox: Path, client: str, url: str) -> list[str]:
    if client == "http bare":
        module = "benchmarks.systems.http_bare"
        extra = ["--concurrency", str(HTTP_CONCURRENCY)]
        return [ctx.python, "-m", module, *source_argv(inbox, spec), "--url", url, *extra]
    if client == "http recipe":
        state = ctx.state("http-recipe.db")
        remove_ledger(state)
        module = "benchmarks.systems.http_recipe"
        extra = ["--state", str(state), "--workers", str(HTTP_CONCURRENCY)]
        return [ctx.python, "-m", module, *source_argv(inbox, spec), "--url", url, *extra]
    state = ctx.state("http-asyncbatch.db")
    remove_ledger(state)
    return [
        *ctx.asyncbatch,
        "run",
        HTTP_HANDLER,
        *source_argv(inbox, spec),
        "--state",
        str(state),
        "-j",
        str(HTTP_CONCURRENCY),
        "--settle",
        "0",
        "--no-progress",
    ]


def _check_client(ctx: Context, client: str, spec: InboxSpec, log_base: Path, out: str) -> None:
    n = spec.n
    if client != "http asyncbatch":
        result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        if result.get("handled") != n:
            raise BenchFailure(f"{client}: handled {result.get('handled')!r} of {n}")
        if client == "http recipe" and result.get("done_rows") != n:
            raise BenchFailure(f"{client}: {result.get('done_rows')!r} done rows of {n}")
        return
    state = str(ctx.state("http-asyncbatch.db"))
    done, seen = (ledger_runs(ctx, state, 1) or [(-1, -1)])[0]
    status = status_done(ctx, state)
    handled: Counter[str] = Counter()
    for log in log_base.parent.glob(log_base.name + ".*"):
        handled.update(log.read_text(errors="surrogateescape").splitlines())
    twice = sum(1 for count in handled.values() if count > 1)
    if done != n or seen != n or status != n or len(handled) != n or twice:
        raise BenchFailure(
            f"{client}: the run did {done} of {seen} seen, status counts {status} done, the "
            f"handler ran {len(handled)} distinct files ({twice} more than once); expected {n}"
        )


def measure_http(ctx: Context, spec: InboxSpec, inbox: Path, rep: int, client: str) -> Sample:
    """One client over the inbox against a fresh server; verified exactly once."""
    stem = ctx.log_stem(client, spec, rep)
    log_base = stem.with_name(stem.name + "-handled")
    for old in log_base.parent.glob(log_base.name + ".*"):
        old.unlink()
    server = Server(ctx, stem)
    try:
        cpu0 = server.cpu_seconds()
        spawned = ctx.run(
            client,
            spec,
            rep,
            _argv(ctx, spec, inbox, client, server.url),
            BENCH_HTTP_URL=server.url,
            BENCH_HANDLED_LOG=str(log_base),
        )
        cpu1 = server.cpu_seconds()
    except BaseException:
        server.kill()
        raise
    counts = server.stop()
    child = spawned.children[0]
    child.check(client)
    _check_client(ctx, client, spec, log_base, child.stdout())
    problems = []
    if counts["executed"] != spec.n or counts["bodies"] != spec.n:
        problems.append(f"the server ran {counts['executed']} requests, {counts['bodies']} bodies")
    if counts["repeated_bodies"] or counts["repeated_keys"]:
        problems.append(
            f"{counts['repeated_bodies']} bodies and {counts['repeated_keys']} keys ran twice"
        )
    if problems:
        raise BenchFailure(f"{client}: {'; '.join(problems)}; expected each of {spec.n} once")
    details = {key: float(counts.get(key, 0)) for key in ("received", "executed", "connections")}
    if cpu0 is not None and cpu1 is not None:
        details["server_cpu_s"] = cpu1 - cpu0
    state = {
        "http asyncbatch": ctx.state("http-asyncbatch.db"),
        "http recipe": ctx.state("http-recipe.db"),
    }.get(client)
    ledger = ledger_mib(state) if state is not None else None
    return Sample(spawned.wall, child.maxrss_mib, ledger, details, cpu_s=child.cpu_s)
