"""Idempotent HTTP effects end to end: ctx.http on one side, IdempotencyMiddleware on the other.

A real uvicorn server on 127.0.0.1 (in a thread with its own event loop) serves a bare ASGI app
that applies one *effect* per request it runs, behind ``IdempotencyMiddleware`` over its own
SQLite file, behind a ``Front`` layer that watches (and sometimes spoils) every exchange. The
client is ``ctx.http`` in a real ``Batch`` run, in a CLI subprocess killed with SIGKILL, or
``ItemHTTP`` directly. Whatever happens on the way, each file's effect is applied once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

import anyio
import httpx
import pytest

from asyncbatch import Batch, IdempotencyMiddleware, TaskContext
from asyncbatch._http.client import HTTPSettings, ItemHTTP, SharedClient
from asyncbatch._http.request import ASGIApp, Message, Receive, Scope, Send

from .conftest import cli, kill, make_files, rows, spawn, state_counts, wait_for
from .servers import RealServer

HANDLERS = Path(__file__).parent / "http_handlers.py"
POST_FILE = f"{HANDLERS}:post_file"
POST_ATTEMPT = f"{HANDLERS}:post_attempt_then_crash"
DONE = "SELECT relpath FROM items WHERE state='done'"
MISMATCH = "the server says this key was used with a different request"

Fault = Literal["drop", "503"]


# -- the server side ------------------------------------------------------------------------------


class Effects:
    """The application: each request it runs applies one effect, counted by ``relpath``.

    uvicorn runs it in another thread: the counts are guarded by a lock. ``hold(key)``, if
    given, is awaited before the effect (the request is then "running" in the middleware).
    The first ``unavailable`` calls for each relpath answer 503 without an effect (a database
    hiccup: try again later).
    """

    def __init__(
        self, hold: Callable[[str], Awaitable[None]] | None = None, *, unavailable: int = 0
    ) -> None:
        self.hold = hold
        self.unavailable = unavailable
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._calls: collections.Counter[str] = collections.Counter()
        self.bodies: list[bytes] = []

    def calls(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: the middleware speaks it for us
        body = b""
        while True:
            message = await receive()
            body += bytes(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if self.hold is not None:
            headers = {bytes(k).lower(): bytes(v) for k, v in scope["headers"]}
            await self.hold(headers.get(b"idempotency-key", b"").decode())
        relpath = _relpath(scope)
        with self._lock:
            self._calls[relpath] += 1
            hiccup = self._calls[relpath] <= self.unavailable
        if hiccup:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        with self._lock:
            self._counts[relpath] += 1
            n = self._counts[relpath]
            self.bodies.append(body)
        payload = json.dumps({"relpath": relpath, "effect": n, "size": len(body)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _relpath(scope: Scope) -> str:
    query = parse_qs(bytes(scope.get("query_string", b"")).decode())
    return query.get("relpath", [""])[0]


@dataclass
class Exchange:
    """One request as the front saw it, and what the middleware answered."""

    key: str
    relpath: str
    fault: Fault | None
    status: int | None = None  # the middleware's answer (before any fault)
    replayed: bool = False


class Front:
    """Outermost layer: records every exchange; with ``fault``, spoils the first one per key.

    ``"drop"``: the inner app (middleware + effect) runs to the end, then the client gets a
    response head and part of the body, and the connection is closed (uvicorn closes it when an
    app returns before completing its response). ``"503"``: the stored answer goes out as 503.
    """

    def __init__(self, inner: ASGIApp, fault: Fault | None = None) -> None:
        self.inner = inner
        self.fault = fault
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._exchanges: list[Exchange] = []
        self._conflicts: dict[str, anyio.Event] = {}  # used in the server's loop only

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def conflict(self, key: str) -> anyio.Event:
        """Set once a request with ``key`` got 409 (call in the server's event loop)."""
        if key not in self._conflicts:
            self._conflicts[key] = anyio.Event()
        return self._conflicts[key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = {bytes(k).lower(): bytes(v) for k, v in scope["headers"]}
        key = headers.get(b"idempotency-key", b"").decode()
        with self._lock:
            fault = self.fault if key and key not in self._keys else None
            self._keys.add(key)
            exchange = Exchange(key, _relpath(scope), fault)
            self._exchanges.append(exchange)

        async def inner_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                pairs = {(bytes(n).lower(), bytes(v)) for n, v in message.get("headers", ())}
                exchange.status = int(message["status"])
                exchange.replayed = (b"idempotent-replayed", b"true") in pairs
                if exchange.status == 409:
                    self.conflict(key).set()
                if fault == "503":
                    message = {**message, "status": 503}
            if fault != "drop":
                await send(message)

        await self.inner(scope, receive, inner_send)
        if fault == "drop":
            await send(
                {
                    "type": "http.response.start",
                    "status": 201,
                    "headers": [(b"content-length", b"1000")],
                }
            )
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            # Returning now, response incomplete: uvicorn closes the connection.


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` (lifespan on, so the middleware closes its store at shutdown; quiet, since
    these tests break connections on purpose); yield the base URL."""
    with RealServer(app, lifespan=True, log_level="critical") as server:
        yield server.url


def stack(tmp_path: Path, fault: Fault | None = None, effects: Effects | None = None) -> Front:
    """Front(fault) -> IdempotencyMiddleware(its own SQLite file) -> Effects."""
    inner = IdempotencyMiddleware(effects or Effects(), state=tmp_path / "idempotency.db")
    return Front(inner, fault)


def by_relpath(exchanges: list[Exchange]) -> dict[str, list[Exchange]]:
    grouped: dict[str, list[Exchange]] = collections.defaultdict(list)
    for e in exchanges:
        grouped[e.relpath].append(e)
    return dict(grouped)


# -- 1. SIGKILL at random moments -----------------------------------------------------------------


def test_sigkill_at_random_moments_still_applies_one_effect_per_file(tmp_path: Path) -> None:
    files, kills = 48, 4
    inbox, state = tmp_path / "inbox", tmp_path / "state.db"
    names = {p.name for p in make_files(inbox, files)}
    effects = Effects()
    front = stack(tmp_path, effects=effects)
    seed = int(os.environ.get("AB_SEED", "20261204"))
    rng = random.Random(seed)
    # --max-attempts 20: the kills are never what ends a file here (the last test of this
    # file checks the default).
    args = (
        "run",
        POST_FILE,
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "4",
        "--max-attempts",
        "20",
        "--no-progress",
    )
    # At each kill: which files were not done yet, and which of them had their effect applied.
    undone_at_kills: list[set[str]] = []
    uncommitted_at_kills: list[set[str]] = []

    with serving(front) as url:
        # The handler lingers after its POST, so a kill shortly after a new effect lands
        # between that POST and the completion commit: the next run POSTs again (a replay).
        env = {"AB_URL": url, "AB_POST_SLEEP": "0.25"}
        for _ in range(kills):
            # Kill once this run has applied some new effects, at a random moment after that.
            goal = effects.total() + rng.randint(3, 10)
            proc = spawn(*args, env=env)
            wait_for(lambda g=goal, p=proc: effects.total() >= g or p.poll() is not None, 60)
            assert proc.poll() is None, f"the run ended before it was killed: {kill(proc)}"
            time.sleep(rng.uniform(0.0, 0.3))
            kill(proc)
            applied = set(effects.counts())  # a request cut off by the kill may land later
            done = {os.fsdecode(r) for (r,) in rows(state, DONE)}
            undone_at_kills.append(names - done)
            uncommitted_at_kills.append(applied - done)
        final = cli(*args, env=env, timeout=120)

    assert final.returncode == 0, final.stderr
    assert effects.counts() == dict.fromkeys(names, 1), f"seed {seed}: one effect per file"
    assert state_counts(state) == {"done": files}
    assert rows(state, "SELECT count(*) FROM items WHERE state='running'") == [(0,)]

    grouped = by_relpath(front.exchanges())
    assert set(grouped) == names
    for relpath, exchanges in grouped.items():
        ran = [e for e in exchanges if e.status == 201 and not e.replayed]
        assert len(ran) == 1, (relpath, exchanges)
        # Every other request for this file was answered without running the app (or never
        # got an answer: a client killed before its request was complete).
        others = [e for e in exchanges if e is not ran[0]]
        assert all(e.replayed or e.status in (409, None) for e in others), (relpath, exchanges)
        assert len({e.key for e in exchanges}) == 1, "every attempt sent the same key"
    replayed = {r for r, ex in grouped.items() if any(e.replayed for e in ex)}
    uncommitted = set().union(*uncommitted_at_kills)
    assert uncommitted, f"seed {seed}: no kill landed between a POST and its commit"
    assert uncommitted <= replayed, "an applied but uncommitted effect is POSTed again: a replay"
    assert replayed <= set().union(*undone_at_kills), "a done file is never POSTed again"


# -- 2. ambiguous outcome: the effect happened, the client does not know --------------------------


class LoseFirstResponse(httpx.AsyncBaseTransport):
    """Forward to the real server, then lose the first response of each key (ReadError)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        key = request.headers.get("Idempotency-Key")
        if key is not None and key not in self.lost:
            self.lost.add(key)
            await response.aread()  # the server applied the effect and answered in full
            await response.aclose()
            raise httpx.ReadError("connection reset before the response arrived", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("fault", ["drop", "503", "lost"])
async def test_ambiguous_outcome_is_retried_with_the_same_key_and_replayed(
    tmp_path: Path, fault: Literal["drop", "503", "lost"]
) -> None:
    files = 12
    inbox, state = tmp_path / "inbox", tmp_path / "state.db"
    names = {p.name for p in make_files(inbox, files)}
    effects = Effects()
    front = stack(tmp_path, None if fault == "lost" else fault, effects)
    transport = LoseFirstResponse() if fault == "lost" else None

    async def handle(ctx: TaskContext) -> None:
        data = await ctx.read_bytes()
        response = await ctx.http.post(
            f"{url}/effects", params={"relpath": ctx.entry.relpath}, content=data
        )
        response.raise_for_status()
        assert response.headers["idempotent-replayed"] == "true"
        assert response.json()["effect"] == 1

    with serving(front) as url:
        report = await Batch(
            handle,
            source=inbox,
            state=state,
            concurrency=4,
            http=transport,
            http_backoff=0.001,
            settle=0,
        ).run()

    assert (report.done, report.failed, report.dead) == (files, 0, 0)
    assert state_counts(state) == {"done": files}
    assert effects.counts() == dict.fromkeys(names, 1)
    grouped = by_relpath(front.exchanges())
    assert set(grouped) == names
    for relpath, exchanges in grouped.items():
        assert len(exchanges) >= 2, (relpath, exchanges)
        assert len({e.key for e in exchanges}) == 1, "the retry reused the key"
        first, *later = exchanges
        assert (first.status, first.replayed) == (201, False), "the first try ran the app"
        assert first.fault == (None if fault == "lost" else fault)
        assert all(e.fault is None and e.replayed for e in later), (relpath, exchanges)
    if transport is not None:
        assert transport.lost == {ex[0].key for ex in grouped.values()}


# -- 3. a concurrent duplicate gets 409, then the replay ------------------------------------------


async def test_a_concurrent_duplicate_gets_409_then_the_replay(tmp_path: Path) -> None:
    front: Front | None = None

    async def hold(key: str) -> None:
        """The first request waits until its duplicate has been answered 409."""
        assert front is not None
        with anyio.fail_after(10):
            await front.conflict(key).wait()

    effects = Effects(hold=hold)
    front = stack(tmp_path, effects=effects)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await anyio.sleep(min(seconds, 0.05))  # real, but shorter than Retry-After asks

    with serving(front) as url:
        async with httpx.AsyncClient(timeout=20) as client:
            settings = HTTPSettings(
                shared=SharedClient(client),
                secret=os.urandom(32),
                job="job",
                unsafe_methods=frozenset({"POST", "PUT", "PATCH", "DELETE"}),
                retries=10,
                backoff=0.01,
                sleep=sleep,
            )
            # Two views of the same item's attempt (as after a lost lease): the same call
            # derives the same key.
            views = [ItemHTTP(settings, "item-1"), ItemHTTP(settings, "item-1")]
            responses: list[httpx.Response] = []

            async def call(view: ItemHTTP) -> None:
                responses.append(
                    await view.post(f"{url}/effects", params={"relpath": "a"}, content=b"pay 10")
                )

            async with anyio.create_task_group() as tg:
                for view in views:
                    tg.start_soon(call, view)

    assert sorted(r.status_code for r in responses) == [201, 201]
    assert sorted(r.headers.get("idempotent-replayed", "") for r in responses) == ["", "true"]
    assert responses[0].content == responses[1].content
    assert (
        responses[0].request.headers["Idempotency-Key"]
        == (responses[1].request.headers["Idempotency-Key"])
    )
    assert effects.counts() == {"a": 1}
    answers = [(e.status, e.replayed) for e in front.exchanges()]
    assert answers.count((201, False)) == 1
    assert answers.count((201, True)) == 1
    assert (409, False) in answers
    assert slept
    assert max(slept) >= 1.0, "the 409's Retry-After: 1 was honoured"


# -- 4. the same key with a different body: 422, the item is dead ---------------------------------


def test_a_changed_body_under_the_same_key_gets_422_and_the_item_dies(tmp_path: Path) -> None:
    files = 3
    inbox, state = tmp_path / "inbox", tmp_path / "state.db"
    names = {p.name for p in make_files(inbox, files)}
    effects = Effects()
    front = stack(tmp_path, effects=effects)

    with serving(front) as url:
        run = cli(
            "run",
            POST_ATTEMPT,
            "--source",
            inbox,
            "--state",
            state,
            "--max-attempts",
            "5",
            "--backoff",
            "0.01",
            "--no-progress",
            env={"AB_URL": url},
        )

    assert run.returncode == 1, run.stderr
    assert state_counts(state) == {"dead": files}
    for relpath, attempts, error in rows(state, "SELECT relpath, attempts, last_error FROM items"):
        assert attempts == 2, relpath
        assert MISMATCH in error, error
    assert effects.counts() == dict.fromkeys(names, 1), "attempt 1 applied its effect once"
    assert sorted(effects.bodies) == sorted(f"{n} attempt 1".encode() for n in names)
    for relpath, exchanges in by_relpath(front.exchanges()).items():
        assert [e.status for e in exchanges] == [201, 422], relpath
        assert len({e.key for e in exchanges}) == 1

    listed = cli("failures", "--state", state, "--json")
    assert listed.returncode == 0, listed.stderr
    failures = json.loads(listed.stdout)
    assert {f["relpath"] for f in failures} == names
    for f in failures:
        assert f["state"] == "dead"
        assert f["attempts"] == 2
        assert MISMATCH in f["error"]


# -- regressions ----------------------------------------------------------------------------------


async def test_a_transient_5xx_behind_the_middleware_is_not_replayed_forever(
    tmp_path: Path,
) -> None:
    """Regression: at 2a6c6ec the middleware stored every response, 5xx included, and ctx.http
    retried a replayed 5xx: one transient 503 was replayed to every retry of the key until the
    TTL (a day) expired, and the item went dead although the server had recovered at once."""
    inbox, state = tmp_path / "inbox", tmp_path / "state.db"
    (name,) = {p.name for p in make_files(inbox, 1)}
    effects = Effects(unavailable=1)  # the first call answers 503, every later one works
    front = stack(tmp_path, effects=effects)

    async def handle(ctx: TaskContext) -> None:
        response = await ctx.http.post(
            f"{url}/effects", params={"relpath": ctx.entry.relpath}, content=b"x"
        )
        response.raise_for_status()

    with serving(front) as url:
        report = await Batch(
            handle,
            source=inbox,
            state=state,
            max_attempts=3,
            backoff=0,
            http_backoff=0.001,
            settle=0,
        ).run()

    answers = [(e.status, e.replayed) for e in front.exchanges()]
    assert answers == [(503, False), (201, False)], "the 503 was not stored; the retry ran"
    assert effects.calls() == {name: 2}
    assert effects.counts() == {name: 1}
    assert (report.done, report.failed, report.dead) == (1, 0, 0)


def test_three_sigkills_with_the_default_max_attempts_do_not_kill_unstarted_files(
    tmp_path: Path,
) -> None:
    """Regression: a claim leases items ahead of the workers; a SIGKILL must not charge them.

    At 2a6c6ec the claim (asyncbatch/_sql.py, ``attempts = attempts + 1`` in the claim) counted
    an attempt per lease and ``WorkerPool.attempt`` (asyncbatch/_workers.py:149) declared an
    item with ``attempts > max_attempts`` dead ("the runner stopped during attempt 3 of 3"):
    with the default --max-attempts 3, three kills made every leased file dead although its
    handler never ran, and ctx.attempt was 4 on its first call.
    """
    files = 8
    inbox, state = tmp_path / "inbox", tmp_path / "state.db"
    names = {p.name for p in make_files(inbox, files)}
    effects = Effects()
    front = stack(tmp_path, effects=effects)
    args = ("run", POST_FILE, "--source", inbox, "--state", state, "-j", "1", "--no-progress")

    with serving(front) as url:
        env = {"AB_URL": url, "AB_POST_SLEEP": "0.25"}
        for _ in range(3):  # each kill lands in a different file's handler
            goal = effects.total() + 1
            proc = spawn(*args, env=env)
            wait_for(lambda g=goal, p=proc: effects.total() >= g or p.poll() is not None, 60)
            assert proc.poll() is None, kill(proc)
            time.sleep(0.1)
            kill(proc)
        started = set(effects.counts())
        final = cli(*args, env=env, timeout=120)

    assert len(started) == 3
    never_started = {
        os.fsdecode(r): a
        for r, a in rows(state, "SELECT relpath, attempts FROM items WHERE state='dead'")
        if os.fsdecode(r) not in started
    }
    assert not never_started, f"dead although their handler never ran: {never_started}"
    assert final.returncode == 0, final.stderr
    assert state_counts(state) == {"done": files}
    assert effects.counts() == dict.fromkeys(names, 1)
