"""IdempotencyMiddleware: replays, conflicts, mismatches, expiry, restarts, crashes, frameworks.

End-to-end tests run a real uvicorn server on 127.0.0.1 (in a thread with its own event loop)
over a real SQLite ledger in tmp_path; edge cases go through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from asyncbatch import ConfigurationError, IdempotencyMiddleware, LedgerError
from asyncbatch._http.middleware import PURGE_INTERVAL
from asyncbatch._http.request import ASGIApp, Message, Receive, Scope, Send, parse_key
from asyncbatch._ledger import (
    IdempotencyClaim,
    IdempotencyRequest,
    IdempotencyStore,
    StoredResponse,
    UnstoredReason,
)
from asyncbatch._ledger.idempotency import IdempotencyRecord, decide_idempotency, encode_headers

from .conftest import rows
from .servers import RealServer

KEYS_TABLE = "SELECT scope, key, state, status FROM idempotency_keys ORDER BY scope, key"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A bare ASGI app: counts its calls, echoes the body it got, may hold, fail or 500."""

    def __init__(
        self,
        statuses: Sequence[int] = (201,),
        *,
        hold: Callable[[int], Awaitable[None]] | None = None,
        fail: int = 0,
    ) -> None:
        self.statuses = statuses
        self.hold = hold
        self.fail = fail
        self.calls = 0
        self.bodies: list[bytes] = []
        self.other_scopes: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            self.other_scopes.append(scope["type"])
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.calls += 1
        n = self.calls
        self.bodies.append(body)
        if self.hold is not None:
            await self.hold(n)
        if n <= self.fail:
            raise RuntimeError("boom")
        status = self.statuses[min(n, len(self.statuses)) - 1]
        payload = json.dumps({"n": n, "body": body.decode(), "path": scope["path"]}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"x-call", str(n).encode()),
            (b"x-latin", b"caf\xe9"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def thread_gate(
    gate: threading.Event, entered: threading.Event
) -> Callable[[int], Awaitable[None]]:
    """A hold for apps served by uvicorn in another thread: the first call waits for ``gate``."""

    async def hold(n: int) -> None:
        if n == 1:
            entered.set()
            await anyio.to_thread.run_sync(gate.wait, 10)

    return hold


@contextlib.asynccontextmanager
async def asgi_client(middleware: IdempotencyMiddleware) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls ``middleware`` in this event loop; closes its store after."""
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            yield client
    finally:
        await middleware.aclose()


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def stored_keys(state: Path) -> list[tuple[Any, ...]]:
    return rows(state, KEYS_TABLE)


# -- a real uvicorn server ------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[[ASGIApp], RealServer]]:
    """Start ``app`` under uvicorn (lifespan on) on a free port of 127.0.0.1; every server stops
    at the end."""
    with contextlib.ExitStack() as servers:
        yield lambda app: servers.enter_context(RealServer(app, lifespan=True))


@contextlib.asynccontextmanager
async def http_client(served: RealServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
        yield client


# -- end to end, over uvicorn ---------------------------------------------------------------------


async def test_first_request_runs_once_and_a_repeat_gets_the_stored_response(
    serve: Callable[[ASGIApp], RealServer], state: Path
) -> None:
    app = Recorder()
    served = serve(IdempotencyMiddleware(app, state=state))
    async with http_client(served) as client:
        first = await client.post("/orders?a=1", content=b"hello", headers=key("k-1"))
        again = await client.post("/orders?a=1", content=b"hello", headers=key("k-1"))

    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert first.json() == {"n": 1, "body": "hello", "path": "/orders"}
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["x-call"] == "1"
    assert again.headers["content-type"] == "application/json"
    assert dict(again.headers.raw)[b"x-latin"] == b"caf\xe9"
    assert app.calls == 1
    assert stored_keys(state) == [("", "k-1", "done", 201)]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600


async def test_a_duplicate_while_the_first_runs_gets_409_then_the_replay(
    serve: Callable[[ASGIApp], RealServer], state: Path
) -> None:
    gate, entered = threading.Event(), threading.Event()
    app = Recorder(hold=thread_gate(gate, entered))
    served = serve(IdempotencyMiddleware(app, state=state))
    responses: dict[str, httpx.Response] = {}
    async with http_client(served) as client:

        async def first() -> None:
            responses["first"] = await client.post("/pay", content=b"10", headers=key("dup"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            assert await anyio.to_thread.run_sync(entered.wait, 10)
            try:
                second = await client.post("/pay", content=b"10", headers=key("dup"))
            finally:
                gate.set()
        third = await client.post("/pay", content=b"10", headers=key("dup"))

    assert second.status_code == 409
    assert second.headers["retry-after"] == "1"
    assert second.headers["content-type"] == "application/problem+json"
    assert second.json()["status"] == 409
    assert responses["first"].status_code == 201
    assert third.status_code == 201
    assert third.headers["idempotent-replayed"] == "true"
    assert third.content == responses["first"].content
    assert app.calls == 1


async def test_survives_a_restart_and_closes_its_store_at_shutdown(
    serve: Callable[[ASGIApp], RealServer], state: Path
) -> None:
    before = Recorder()
    first_middleware = IdempotencyMiddleware(before, state=state)
    served = serve(first_middleware)
    async with http_client(served) as client:
        original = await client.put("/doc/1", content=b"v1", headers=key("restart"))
    served.stop()
    assert before.other_scopes == ["lifespan"]  # the bare app saw lifespan and ignored it
    assert first_middleware._opened is None  # closed at lifespan shutdown
    assert not Path(f"{state}-wal").exists()  # the last connection to the ledger is gone

    after = Recorder()
    served = serve(IdempotencyMiddleware(after, state=state))
    async with http_client(served) as client:
        replay = await client.put("/doc/1", content=b"v1", headers=key("restart"))
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert after.calls == 0


async def test_an_app_that_raises_on_lifespan_still_gets_its_store_closed_at_shutdown(
    state: Path,
) -> None:
    # A bare app that asserts its scope is HTTP raises on the lifespan scope: by the ASGI spec,
    # it does not speak lifespan. The middleware, which had opened its store at startup, let
    # the exception through, uvicorn sent no more lifespan events, and the store was never
    # closed: its -wal stayed beside the state (under lifespan="on", the startup failed).
    async def strict(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", "only HTTP here"
        await Recorder()(scope, receive, send)

    for lifespan in ("auto", "on"):
        middleware = IdempotencyMiddleware(strict, state=state)
        with RealServer(middleware, lifespan=lifespan) as served:
            async with http_client(served) as client:
                response = await client.post("/x", content=b"v", headers=key(lifespan))
            assert response.status_code == 201
            assert Path(f"{state}-wal").exists()
        assert middleware._opened is None, lifespan  # closed at lifespan shutdown
        assert not Path(f"{state}-wal").exists(), lifespan


async def test_a_body_sent_in_chunks_is_buffered_and_replayed_to_the_app(
    serve: Callable[[ASGIApp], RealServer], state: Path
) -> None:
    app = Recorder()
    served = serve(IdempotencyMiddleware(app, state=state))

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"ab", b"cd", b"ef"):
            yield part

    async with http_client(served) as client:
        first = await client.post("/upload", content=chunks(), headers=key("chunked"))
        whole = await client.post("/upload", content=b"abcdef", headers=key("chunked"))
        other = await client.post("/upload", content=b"abcdeX", headers=key("chunked"))
    assert app.bodies == [b"abcdef"]
    assert first.json()["body"] == "abcdef"
    assert whole.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422


async def test_a_starlette_app_answers_are_stored_5xx_freed_and_lifespan_passes_through(
    serve: Callable[[ASGIApp], RealServer], state: Path
) -> None:
    calls: list[str] = []
    lifespan_events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lifespan_events.append("startup")
        yield
        lifespan_events.append("shutdown")

    async def create(request: Request) -> Response:
        data = await request.json()
        calls.append(data["name"])
        if data["name"] == "broken":
            return JSONResponse({"error": "database down"}, status_code=500)
        return JSONResponse({"id": len(calls)}, status_code=201, headers={"Location": "/x/1"})

    async def count(request: Request) -> Response:
        return JSONResponse({"calls": len(calls)})

    app = Starlette(
        routes=[Route("/things", create, methods=["POST"]), Route("/things", count)],
        lifespan=lifespan,
    )
    app.add_middleware(IdempotencyMiddleware, state=state, required=True)
    served = serve(app)
    async with http_client(served) as client:
        ok = await client.post("/things", json={"name": "a"}, headers=key("s-1"))
        ok_again = await client.post("/things", json={"name": "a"}, headers=key("s-1"))
        broken = await client.post("/things", json={"name": "broken"}, headers=key("s-2"))
        broken_again = await client.post("/things", json={"name": "broken"}, headers=key("s-2"))
        unkeyed = await client.post("/things", json={"name": "b"})
        listed = await client.get("/things")
    served.stop()

    assert ok.status_code == 201
    assert (ok_again.status_code, ok_again.headers["location"]) == (201, "/x/1")
    assert ok_again.headers["idempotent-replayed"] == "true"
    assert broken.status_code == 500
    assert broken_again.status_code == 500  # ran again: a 5xx is not stored by default
    assert "idempotent-replayed" not in broken_again.headers
    assert unkeyed.status_code == 400
    assert listed.json() == {"calls": 3}
    assert calls == ["a", "broken", "broken"]
    assert lifespan_events == ["startup", "shutdown"]
    assert not Path(f"{state}-wal").exists()  # the store closed after the app's shutdown


async def test_a_stream_the_client_cut_short_never_runs_again(
    serve: Callable[[ASGIApp], RealServer], state: Path
) -> None:
    """Regression: a streamed response cut short by the client freed the key, so the client's
    retry ran the endpoint a second time (its effects twice)."""
    effects: list[bytes] = []
    streaming = threading.Event()  # the first chunk went out: the app awaits the next

    async def export(request: Request) -> Response:
        effects.append(await request.body())  # the side effect, done before the answer
        first = len(effects) == 1

        async def lines() -> AsyncIterator[bytes]:
            yield b"line 1\n"
            if first:
                streaming.set()
                await anyio.sleep_forever()  # the client leaves while this stream is open
            yield b"line 2\n"

        return StreamingResponse(lines(), media_type="text/plain")

    app = Starlette(routes=[Route("/exports", export, methods=["POST"])])
    served = serve(IdempotencyMiddleware(app, state=state))
    async with http_client(served) as client:
        first = functools.partial(
            client.post, "/exports", content=b"report", headers=key("export-1")
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            assert await anyio.to_thread.run_sync(streaming.wait, 10)
            tg.cancel_scope.cancel()  # the client disconnects in the middle of the stream

        async def terminal_answer() -> httpx.Response:
            while True:  # 409 "still running" until the server has seen the disconnect
                retry = await client.post("/exports", content=b"report", headers=key("export-1"))
                if retry.status_code != 409 or "retry-after" not in retry.headers:
                    return retry
                await anyio.sleep(0.02)

        with anyio.fail_after(30):
            retry = await terminal_answer()
        again = await client.post("/exports", content=b"report", headers=key("export-1"))
    assert effects == [b"report"]  # the endpoint ran once
    for answer in (retry, again):
        assert answer.status_code == 409
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["reason"] == "incomplete"
        assert "cut short" in answer.json()["detail"]
    assert stored_keys(state) == [("", "export-1", "unstored", None)]


# -- edge cases, through httpx.ASGITransport ------------------------------------------------------


async def test_client_errors_are_stored_and_replayed_without_calling_the_app(
    state: Path,
) -> None:
    app = Recorder(statuses=(404, 201))
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        first = await client.post("/charge", content=b"x", headers=key("e"))
        replay = await client.post("/charge", content=b"x", headers=key("e"))
    assert first.status_code == 404
    assert replay.status_code == 404
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert app.calls == 1


async def test_server_errors_free_the_key_unless_asked_to_store_them(state: Path) -> None:
    app = Recorder(statuses=(503, 201))
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        first = await client.post("/charge", content=b"x", headers=key("t"))
        retry = await client.post("/charge", content=b"x", headers=key("t"))
        replay = await client.post("/charge", content=b"x", headers=key("t"))
    assert (first.status_code, retry.status_code, replay.status_code) == (503, 201, 201)
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.calls == 2

    stored = Recorder(statuses=(500, 201))
    middleware = IdempotencyMiddleware(stored, state=state, store_server_errors=True)
    async with asgi_client(middleware) as client:
        first = await client.post("/charge", content=b"x", headers=key("s"))
        replay = await client.post("/charge", content=b"x", headers=key("s"))
    assert (first.status_code, replay.status_code) == (500, 500)
    assert replay.headers["idempotent-replayed"] == "true"
    assert stored.calls == 1


class Streamer:
    """A bare ASGI app that streams ``parts`` (after ``hold(n)``, if given), then may raise or
    return before the end; counts its calls."""

    def __init__(
        self,
        parts: Sequence[bytes],
        *,
        status: int = 200,
        end: str = "complete",
        hold: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.parts = parts
        self.status = status
        self.end = end
        self.hold = hold
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        self.calls += 1
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        for i, part in enumerate(self.parts):
            if i == 1 and self.hold is not None:
                await self.hold(self.calls)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        if self.end == "raise":
            raise RuntimeError("boom mid-response")
        if self.end == "complete":
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_an_app_that_raises_mid_response_never_runs_again(state: Path) -> None:
    """Regression: an app that raised after it had started its response freed the key: the
    retry ran it again. (One that returns mid-response, as Starlette's StreamingResponse does
    when the client leaves, is the uvicorn test above.)"""
    app = Streamer([b"part 1", b"part 2"], end="raise")
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        with pytest.raises(RuntimeError, match="mid-response"):
            await client.post("/s", content=b"x", headers=key("cut"))
        retry = await client.post("/s", content=b"x", headers=key("cut"))
        other = await client.post("/s", content=b"y", headers=key("cut"))
    assert app.calls == 1
    assert retry.status_code == 409
    assert "retry-after" not in retry.headers
    assert retry.json()["reason"] == "incomplete"
    assert retry.json()["title"] == "The response to this Idempotency-Key was not stored"
    assert other.status_code == 422
    assert stored_keys(state) == [("", "cut", "unstored", None)]


async def test_a_5xx_cut_short_still_frees_the_key(state: Path) -> None:
    app = Streamer([b"part 1"], status=503, end="raise")
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        with pytest.raises(RuntimeError):
            await client.post("/s", content=b"x", headers=key("busy"))
        assert stored_keys(state) == []
        app.status, app.end = 201, "complete"
        retry = await client.post("/s", content=b"x", headers=key("busy"))
    assert (retry.status_code, retry.content) == (201, b"part 1")
    assert app.calls == 2


@pytest.mark.parametrize("parts", [[b"x" * 2000], [b"x" * 600, b"y" * 600, b"z" * 600]])
async def test_a_response_too_large_to_store_is_sent_whole_and_never_runs_again(
    state: Path, parts: list[bytes]
) -> None:
    app = Streamer(parts)
    middleware = IdempotencyMiddleware(app, state=state, max_stored_body=1024)
    async with asgi_client(middleware) as client:
        first = await client.post("/big", content=b"x", headers=key("big"))
        retry = await client.post("/big", content=b"x", headers=key("big"))
    assert (first.status_code, first.content) == (200, b"".join(parts))
    assert retry.status_code == 409
    assert retry.json()["reason"] == "too_large"
    assert "max_stored_body" in retry.json()["detail"]
    assert app.calls == 1
    assert stored_keys(state) == [("", "big", "unstored", None)]


async def test_a_stream_unfinished_past_lock_timeout_is_not_taken_over(state: Path) -> None:
    clock = Clock()
    gate, streaming = anyio.Event(), anyio.Event()

    async def hold(n: int) -> None:
        if n == 1:
            streaming.set()
            await gate.wait()

    app = Streamer([b"part 1", b"part 2"], hold=hold)
    middleware = IdempotencyMiddleware(app, state=state, lock_timeout=30, clock=clock)
    responses: dict[str, httpx.Response] = {}
    async with asgi_client(middleware) as client:

        async def first() -> None:
            responses["first"] = await client.post("/u", content=b"x", headers=key("slow"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            with anyio.fail_after(10):
                await streaming.wait()
            locked = await client.post("/u", content=b"x", headers=key("slow"))
            clock.now += 31
            unfinished = await client.post("/u", content=b"x", headers=key("slow"))
            gate.set()
        replay = await client.post("/u", content=b"x", headers=key("slow"))
    assert (locked.status_code, locked.headers["retry-after"]) == (409, "1")
    assert unfinished.status_code == 409
    assert unfinished.json()["reason"] == "unfinished"
    assert responses["first"].content == b"part 1part 2"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == b"part 1part 2"
    assert app.calls == 1


async def test_a_request_body_over_max_request_body_gets_413_and_the_app_does_not_run(
    state: Path,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"c" * 400

    app = Recorder()
    middleware = IdempotencyMiddleware(app, state=state, max_request_body=1000)
    async with asgi_client(middleware) as client:
        declared = await client.post("/b", content=b"d" * 1001, headers=key("b"))
        chunked = await client.post("/b", content=chunks(), headers=key("b"))
        fits = await client.post("/b", content=b"d" * 1000, headers=key("b"))
    for answer in (declared, chunked):
        assert answer.status_code == 413
        assert answer.headers["content-type"] == "application/problem+json"
        assert "larger than 1000 bytes" in answer.json()["detail"]
    assert "content-length" not in chunked.request.headers
    assert fits.status_code == 201  # the key was not used by the refused requests
    assert app.calls == 1


async def test_same_key_with_a_different_request_gets_422(state: Path) -> None:
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        first = await client.post("/a?q=1", content=b"one", headers=key("m"))
        other_body = await client.post("/a?q=1", content=b"two", headers=key("m"))
        other_query = await client.post("/a?q=2", content=b"one", headers=key("m"))
        other_path = await client.post("/b?q=1", content=b"one", headers=key("m"))
        other_method = await client.put("/a?q=1", content=b"one", headers=key("m"))
    assert first.status_code == 201
    for response in (other_body, other_query, other_path, other_method):
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert "different request" in response.json()["detail"]
    assert app.calls == 1


async def test_required_key_refuses_unsafe_requests_without_one(state: Path) -> None:
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=state, required=True)) as client:
        missing = await client.post("/orders", content=b"x")
        read = await client.get("/orders")
        keyed = await client.post("/orders", content=b"x", headers=key("r"))
    assert missing.status_code == 400
    assert missing.json()["detail"] == "Idempotency-Key header is required for POST"
    assert read.status_code == 201  # GET passes through without a key
    assert keyed.status_code == 201
    assert app.calls == 2


async def test_without_required_unkeyed_and_safe_requests_pass_through(state: Path) -> None:
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        first = await client.post("/orders", content=b"x")
        second = await client.post("/orders", content=b"x")
        get = await client.get("/orders", headers=key('"not checked'))
    assert [first.status_code, second.status_code, get.status_code] == [201, 201, 201]
    assert app.calls == 3
    assert not state.exists()  # no keyed request: the store was never opened


async def test_quoted_and_bare_keys_are_the_same_key(state: Path) -> None:
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        quoted = await client.post("/q", content=b"x", headers=key('"abc"'))
        bare = await client.post("/q", content=b"x", headers=key("abc"))
        escaped = await client.post("/q", content=b"x", headers=key('"a\\"b\\\\c"'))
    assert quoted.status_code == 201
    assert bare.headers["idempotent-replayed"] == "true"
    assert escaped.status_code == 201
    assert app.calls == 2
    assert [r[1] for r in stored_keys(state)] == ['a"b\\c', "abc"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "empty"),
        ('""', "empty"),
        ('"abc', "no closing quote"),
        ('"ab"c', "after its closing quote"),
        ('"a\\x"', "invalid escape"),
        ("a b", "visible ASCII"),
        ("a,b", "visible ASCII"),
        ('a"b', "visible ASCII"),
        (b"caf\xc3\xa9", "visible ASCII"),
        ("k" * 256, "longer than 255"),
        ('"' + "k" * 256 + '"', "longer than 255"),
    ],
)
async def test_a_malformed_key_gets_400(state: Path, value: str | bytes, problem: str) -> None:
    app = Recorder()
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        response = await client.post("/x", content=b"x", headers=[(b"Idempotency-Key", raw)])
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Idempotency-Key is invalid"
    assert problem in response.json()["detail"]
    assert app.calls == 0


async def test_two_key_headers_get_400(state: Path) -> None:
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        response = await client.post(
            "/x", content=b"x", headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        )
    assert response.status_code == 400
    assert "more than once" in response.json()["detail"]
    assert app.calls == 0


def test_parse_key() -> None:
    assert parse_key(b"abc") == "abc"
    assert parse_key(b'  "abc"\t') == "abc"
    assert parse_key(b'"a\\\\b\\"c"') == 'a\\b"c'
    assert parse_key(b'"with space"') == "with space"
    assert parse_key(b"k" * 255) == "k" * 255
    with pytest.raises(ValueError, match="empty"):
        parse_key(b"   ")


async def test_expired_keys_run_again_and_are_purged_at_most_once_a_minute(state: Path) -> None:
    clock = Clock()
    app = Recorder()
    middleware = IdempotencyMiddleware(app, state=state, ttl=10, clock=clock)
    async with asgi_client(middleware) as client:
        await client.post("/e", content=b"x", headers=key("a"))  # purges (first request)
        clock.now += 9
        replay = await client.post("/e", content=b"x", headers=key("a"))
        clock.now += 2
        await client.post("/e", content=b"x", headers=key("b"))  # no purge: < 1 min since
        expired_row = rows(state, "SELECT expires_at FROM idempotency_keys WHERE key = 'a'")
        rerun = await client.post("/e", content=b"other body is fine now", headers=key("a"))
        clock.now += PURGE_INTERVAL
        await client.post("/e", content=b"x", headers=key("c"))  # purges a and b
        keys_after_purge = [r[1] for r in stored_keys(state)]
        clock.now += 11
        purged = await middleware.purge()

    assert replay.headers["idempotent-replayed"] == "true"
    assert expired_row == [(1_000_010.0,)]  # still there, expired: treated as absent
    assert rerun.status_code == 201
    assert "idempotent-replayed" not in rerun.headers
    assert rerun.headers["x-call"] == "3"
    assert keys_after_purge == ["c"]
    assert purged == 1
    assert stored_keys(state) == []


async def test_an_app_that_raises_frees_the_key_for_a_retry(state: Path) -> None:
    app = Recorder(fail=1)
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        with pytest.raises(RuntimeError, match="boom"):
            await client.post("/r", content=b"x", headers=key("retry-me"))
        assert stored_keys(state) == []
        retry = await client.post("/r", content=b"x", headers=key("retry-me"))
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert app.calls == 2
    assert stored_keys(state) == [("", "retry-me", "done", 201)]


async def test_a_cancelled_request_frees_the_key(state: Path) -> None:
    entered = anyio.Event()

    async def forever(n: int) -> None:
        if n == 1:
            entered.set()
            await anyio.sleep_forever()

    app = Recorder(hold=forever)
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        answered: list[httpx.Response] = []

        async def post() -> None:
            answered.append(await client.post("/c", content=b"x", headers=key("cancelled")))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                await entered.wait()  # the request is in the endpoint: cancelled there
                tg.cancel_scope.cancel()
        assert answered == []
        assert stored_keys(state) == []
        retry = await client.post("/c", content=b"x", headers=key("cancelled"))
    assert retry.status_code == 201
    assert app.calls == 2


async def test_an_abandoned_running_record_is_taken_over_after_lock_timeout(state: Path) -> None:
    clock = Clock()
    gate, entered = anyio.Event(), anyio.Event()

    async def hold_first(n: int) -> None:
        if n == 1:
            entered.set()
            await gate.wait()

    app = Recorder(hold=hold_first)
    middleware = IdempotencyMiddleware(app, state=state, lock_timeout=30, clock=clock)
    responses: dict[str, httpx.Response] = {}
    async with asgi_client(middleware) as client:

        async def first() -> None:
            responses["first"] = await client.post("/t", content=b"x", headers=key("stuck"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            with anyio.fail_after(5):
                await entered.wait()
            clock.now += 29
            still_locked = await client.post("/t", content=b"x", headers=key("stuck"))
            clock.now += 2
            taken_over = await client.post("/t", content=b"x", headers=key("stuck"))
            gate.set()
        replay = await client.post("/t", content=b"x", headers=key("stuck"))

    assert still_locked.status_code == 409
    assert taken_over.status_code == 201
    assert taken_over.headers["x-call"] == "2"
    # the late first request still answers its client, but cannot overwrite the new owner
    assert responses["first"].headers["x-call"] == "1"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["x-call"] == "2"
    assert app.calls == 2


async def test_scope_of_namespaces_keys(state: Path) -> None:
    def client_of(scope: Scope) -> str:
        return str(dict(scope["headers"]).get(b"x-client", b"").decode())

    app = Recorder()
    middleware = IdempotencyMiddleware(app, state=state, scope_of=client_of)
    async with asgi_client(middleware) as client:
        alice = await client.post("/n", content=b"x", headers={**key("k"), "X-Client": "alice"})
        bob = await client.post("/n", content=b"y", headers={**key("k"), "X-Client": "bob"})
        alice_again = await client.post(
            "/n", content=b"x", headers={**key("k"), "X-Client": "alice"}
        )
    assert (alice.status_code, bob.status_code) == (201, 201)
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert app.calls == 2
    assert [r[:2] for r in stored_keys(state)] == [("alice", "k"), ("bob", "k")]


async def test_a_stored_response_is_replayed_only_to_the_caller_who_made_the_request(
    state: Path,
) -> None:
    """Regression: keys were shared between all callers unless ``scope_of`` was set: a second
    client sending the same key and body got the first one's stored response, its
    ``Set-Cookie`` included."""
    app = Recorder()
    alice = {**key("k"), "Authorization": "Bearer alice-token"}
    bob = {**key("k"), "Authorization": "Bearer bob-token"}
    carol = {**key("k"), "Cookie": "session=carol"}
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        for_alice = await client.post("/pay", content=b"10", headers=alice)
        for_bob = await client.post("/pay", content=b"10", headers=bob)
        for_carol = await client.post("/pay", content=b"10", headers=carol)
        alice_again = await client.post("/pay", content=b"10", headers=alice)
        carol_again = await client.post("/pay", content=b"10", headers=carol)
    assert [r.headers["x-call"] for r in (for_alice, for_bob, for_carol)] == ["1", "2", "3"]
    assert all("idempotent-replayed" not in r.headers for r in (for_alice, for_bob, for_carol))
    assert (alice_again.headers["idempotent-replayed"], alice_again.headers["x-call"]) == (
        "true",
        "1",
    )
    assert (carol_again.headers["idempotent-replayed"], carol_again.headers["x-call"]) == (
        "true",
        "3",
    )
    assert app.calls == 3
    scopes = [r[0] for r in stored_keys(state)]
    assert sorted(s.split(":")[0] for s in scopes) == ["authorization", "authorization", "cookie"]
    stored = "\n".join(map(str, rows(state, "SELECT * FROM idempotency_keys")))
    for credential in ("alice-token", "bob-token", "carol"):
        assert credential not in stored  # only a hash of the credentials is kept


async def test_scope_of_can_share_keys_between_callers(state: Path) -> None:
    app = Recorder()
    middleware = IdempotencyMiddleware(app, state=state, scope_of=lambda scope: "")
    async with asgi_client(middleware) as client:
        first = await client.post("/s", content=b"x", headers={**key("k"), "Authorization": "a"})
        other = await client.post("/s", content=b"x", headers={**key("k"), "Authorization": "b"})
        anonymous = await client.post("/s", content=b"x", headers=key("k"))
    assert first.status_code == 201
    assert other.headers["idempotent-replayed"] == "true"
    assert anonymous.headers["idempotent-replayed"] == "true"
    assert app.calls == 1


async def test_set_cookie_goes_to_the_first_client_and_is_never_stored_or_replayed(
    state: Path,
) -> None:
    async def login(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        headers = [
            (b"content-type", b"text/plain"),
            (b"Set-Cookie", b"session=s3cr3t; HttpOnly"),
            (b"set-cookie", b"theme=dark"),
        ]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"welcome"})

    async with asgi_client(IdempotencyMiddleware(login, state=state)) as client:
        first = await client.post("/login", content=b"x", headers=key("c"))
        client.cookies.clear()  # a retry comes from a client that never got the first answer
        replay = await client.post("/login", content=b"x", headers=key("c"))
    assert first.headers.get_list("set-cookie") == ["session=s3cr3t; HttpOnly", "theme=dark"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert (replay.status_code, replay.content) == (201, b"welcome")
    assert "set-cookie" not in replay.headers
    assert replay.headers["content-type"] == "text/plain"
    assert "s3cr3t" not in str(rows(state, "SELECT headers FROM idempotency_keys"))


async def test_a_set_cookie_stored_by_an_older_version_is_not_replayed(state: Path) -> None:
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        await client.post("/o", content=b"x", headers=key("old"))
        db = sqlite3.connect(state)
        with db:
            db.execute(
                "UPDATE idempotency_keys SET headers = ?",
                (json.dumps([["content-type", "text/plain"], ["Set-Cookie", "session=old"]]),),
            )
        db.close()
        replay = await client.post("/o", content=b"x", headers=key("old"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert "set-cookie" not in replay.headers
    assert replay.headers["content-type"] == "text/plain"


async def test_non_http_scopes_and_other_methods_pass_through(state: Path) -> None:
    app = Recorder()
    middleware = IdempotencyMiddleware(app, state=state, methods={"post"})
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    async with asgi_client(middleware) as client:
        put = await client.put("/p", content=b"x", headers=key("not-for-put"))
        put_again = await client.put("/p", content=b"x", headers=key("not-for-put"))
    assert app.other_scopes == ["websocket"]
    assert (put.status_code, put_again.status_code) == (201, 201)
    assert "idempotent-replayed" not in put_again.headers
    assert app.calls == 2
    assert not state.exists()


async def test_logs_carry_a_key_hash_never_the_key_body_or_query(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret_key = "customer-42-secret-key"
    app = Recorder()
    caplog.set_level(logging.DEBUG, logger="asyncbatch.middleware")
    async with asgi_client(IdempotencyMiddleware(app, state=state)) as client:
        await client.post("/l?token=hunter2", content=b"card=4242", headers=key(secret_key))
        await client.post("/l?token=hunter2", content=b"card=4242", headers=key(secret_key))
        await client.post("/l?token=hunter2", content=b"card=0000", headers=key(secret_key))
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncbatch.middleware"]
    assert any("replaying" in m for m in messages)
    assert any("422" in m for m in messages)
    text = "\n".join(messages)
    for secret in (secret_key, "hunter2", "4242", "0000"):
        assert secret not in text


def test_bad_settings_are_refused(state: Path) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        IdempotencyMiddleware(Recorder(), state=state, ttl=0)
    with pytest.raises(ConfigurationError, match="lock_timeout"):
        IdempotencyMiddleware(Recorder(), state=state, lock_timeout=float("nan"))
    with pytest.raises(ConfigurationError, match="methods"):
        IdempotencyMiddleware(Recorder(), state=state, methods="POST")
    with pytest.raises(ConfigurationError, match="'max_request_body' has value 0"):
        IdempotencyMiddleware(Recorder(), state=state, max_request_body=0)
    with pytest.raises(ConfigurationError, match=r"'max_stored_body' has value 1\.5"):
        IdempotencyMiddleware(Recorder(), state=state, max_stored_body=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="postgresql://db@db/x") as info:
        IdempotencyMiddleware(Recorder(), state="postgresql://db:pw@db/x#fragment")
    assert "pw" not in str(info.value)
    IdempotencyMiddleware(Recorder(), state="postgresql://api@db/x")  # checked, not opened


# -- several server processes behind one store, and stores that cannot be used ----------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def api_processes(state: str, log: Path, count: int) -> Iterator[list[str]]:
    """``count`` uvicorn processes serving tests.idempotent_app over ``state``."""
    import subprocess
    import sys
    import time

    root = Path(__file__).parent.parent
    env = {**os.environ, "AB_STATE": state, "AB_LOG": str(log)}
    ports = [_free_port() for _ in range(count)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.idempotent_app:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--lifespan",
                "on",
            ],
            cwd=root,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.communicate()[1]
                try:
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    time.sleep(0.05)
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.communicate(timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_servers_sharing_one_store_execute_each_key_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state = str(tmp_path / "api.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    log = tmp_path / "executions.log"
    answers: dict[str, list[tuple[int, bytes, bool]]] = {}

    async def call(client: httpx.AsyncClient, url: str, name: str) -> None:
        while True:  # a 409 says another server runs the key now: ask again, as a client does
            response = await client.post(url, content=b"x" * 100, headers=key(name))
            if response.status_code != 409:
                break
            await anyio.sleep(0.02)
        replayed = response.headers.get("idempotent-replayed") == "true"
        answers.setdefault(name, []).append((response.status_code, response.content, replayed))

    with api_processes(state, log, 3) as urls:
        async with httpx.AsyncClient(timeout=30) as client, anyio.create_task_group() as tg:
            for i in range(20):
                for url in urls:  # the same key at every server at once
                    tg.start_soon(call, client, f"{url}/orders", f"order-{i}")

    executions = log.read_text().split()
    assert sorted(executions) == sorted(f"order-{i}" for i in range(20))
    for name, got in answers.items():
        assert len(got) == 3
        assert len({(status, body) for status, body, _ in got}) == 1, name  # one answer
        assert sum(replayed for *_, replayed in got) == 2, name


async def _lifespan_startup(middleware: IdempotencyMiddleware) -> Message:
    """Run the ASGI lifespan startup; return what the middleware answered."""
    sent: list[Message] = []
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(30):
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    await middleware.aclose()
    return sent[0]


async def test_a_store_that_cannot_be_used_fails_the_startup_with_one_line(
    tmp_path: Path,
) -> None:
    unreachable = IdempotencyMiddleware(Recorder(), state="postgresql://api:s3cret@127.0.0.1:1/db")
    answer = await _lifespan_startup(unreachable)
    assert answer["type"] == "lifespan.startup.failed"
    assert "postgresql://api@127.0.0.1:1/db" in answer["message"]
    assert "s3cret" not in answer["message"]
    assert "\n" not in answer["message"]

    other = tmp_path / "customers.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    before = other.read_bytes()
    answer = await _lifespan_startup(IdempotencyMiddleware(Recorder(), state=other))
    assert answer["type"] == "lifespan.startup.failed"
    assert "another application" in answer["message"]
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["customers.db"]

    good = await _lifespan_startup(IdempotencyMiddleware(Recorder(), state=tmp_path / "ok.db"))
    assert good["type"] == "lifespan.startup.complete"


# -- the host process ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_process_that_never_closes_the_middleware_still_exits(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: the SQLite store's aiosqlite thread was not a daemon thread, so a process
    that used the middleware without lifespan and without ``aclose()`` (an async test over
    ``httpx.ASGITransport``, ``uvicorn --lifespan off``) printed its result, then hung for
    ever in ``threading._shutdown``."""
    import subprocess
    import sys

    state = str(tmp_path / "api.db") if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    script = Path(__file__).parent / "asgi_no_lifespan.py"
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    try:
        done = subprocess.run(
            [sys.executable, str(script), state],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=root,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process did not exit within 60 s; it printed {e.stdout!r}")
    assert (done.returncode, done.stdout) == (0, "201 created\n"), done.stderr


# -- the store seam --------------------------------------------------------------------------------


class MemoryStore(IdempotencyStore):
    """An idempotency store kept in a dict (one event loop: every operation is atomic), with
    the ledger's decision: all that IdempotencyMiddleware needs of a store."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.records: dict[tuple[str, str], IdempotencyRecord] = {}
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    def _owned(self, request: IdempotencyRequest) -> IdempotencyRecord | None:
        """The running or started record ``request`` owns, if it still does."""
        record = self.records.get((request.scope, request.key))
        if record is None or record.state not in ("running", "started"):
            return None
        return record if record.headers == request.token else None

    def _put(self, request: IdempotencyRequest, record: IdempotencyRecord) -> bool:
        self.records[request.scope, request.key] = record
        return True

    async def idempotency_claim(
        self, request: IdempotencyRequest, *, lock_timeout: float, ttl: float
    ) -> IdempotencyClaim:
        now = self.clock()
        found = self.records.get((request.scope, request.key))
        claim = (
            IdempotencyClaim("run", "new")
            if found is None
            else decide_idempotency(request.fingerprint, found, now)
        )
        if claim.decision == "run":
            expires_at = now + max(ttl, lock_timeout)
            running = (request.fingerprint, "running", None, request.token, None)
            self._put(request, IdempotencyRecord(*running, now + lock_timeout, expires_at))
        return claim

    async def idempotency_start(self, request: IdempotencyRequest) -> bool:
        record = self._owned(request)
        return record is not None and self._put(request, replace(record, state="started"))

    async def idempotency_complete(
        self, request: IdempotencyRequest, response: StoredResponse, *, ttl: float
    ) -> bool:
        record, now = self._owned(request), self.clock()
        stored = ("done", response.status, encode_headers(response.headers), response.body)
        return record is not None and self._put(
            request, IdempotencyRecord(record.fingerprint, *stored, now, now + ttl)
        )

    async def idempotency_unstored(
        self, request: IdempotencyRequest, reason: UnstoredReason, *, ttl: float
    ) -> bool:
        record, now = self._owned(request), self.clock()
        unstored = ("unstored", None, reason, None)
        return record is not None and self._put(
            request, IdempotencyRecord(record.fingerprint, *unstored, now, now + ttl)
        )

    async def idempotency_release(self, request: IdempotencyRequest) -> None:
        record = self._owned(request)
        if record is not None and record.state == "running":
            del self.records[request.scope, request.key]

    async def idempotency_purge(self) -> int:
        expired = [k for k, r in self.records.items() if r.expires_at < self.clock()]
        for k in expired:
            del self.records[k]
        return len(expired)


async def test_the_middleware_needs_only_an_idempotency_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The middleware sees its store through IdempotencyStore alone: one kept in memory gives
    it every decision (run, replay, 422, a new key once expired), no ledger is opened, and the
    store given stays its caller's (aclose leaves it open)."""
    monkeypatch.chdir(tmp_path)
    clock = Clock()
    store = MemoryStore(clock)
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=store, ttl=60)) as client:
        first = await client.post("/orders", content=b"a", headers=key("k-1"))
        again = await client.post("/orders", content=b"a", headers=key("k-1"))
        other = await client.post("/orders", content=b"b", headers=key("k-1"))
        clock.now += 61
        expired = await client.post("/orders", content=b"a", headers=key("k-1"))

    assert [r.status_code for r in (first, again, other, expired)] == [201, 201, 422, 201]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert expired.json()["n"] == 2
    assert app.calls == 2
    assert [(r.state, r.status) for r in store.records.values()] == [("done", 201)]
    assert not store.closed
    assert list(tmp_path.iterdir()) == []


class FullStore(MemoryStore):
    """A store whose disk fills up: it cannot store a response (and, with ``unstored_fails``,
    cannot record one as not stored either)."""

    def __init__(self, clock: Callable[[], float], *, unstored_fails: bool) -> None:
        super().__init__(clock)
        self.unstored_fails = unstored_fails

    async def idempotency_complete(
        self, request: IdempotencyRequest, response: StoredResponse, *, ttl: float
    ) -> bool:
        raise LedgerError("state 'api.db': database or disk is full")

    async def idempotency_unstored(
        self, request: IdempotencyRequest, reason: UnstoredReason, *, ttl: float
    ) -> bool:
        if self.unstored_fails:
            raise LedgerError("state 'api.db': database or disk is full")
        return await super().idempotency_unstored(request, reason, ttl=ttl)


@pytest.mark.parametrize("unstored_fails", [False, True])
async def test_a_response_the_store_cannot_take_still_reaches_its_client(
    unstored_fails: bool,
) -> None:
    """Regression: a store failing once the app had answered (a full disk) raised into the
    app's ``send``: the server answered 500, whose retry (the same key) ran the request again
    once lock_timeout had passed. The answer goes out; the key is recorded as not stored when
    the store still takes that (a repeat gets 409, not a second run)."""
    store = FullStore(Clock(), unstored_fails=unstored_fails)
    app = Recorder()
    async with asgi_client(IdempotencyMiddleware(app, state=store)) as client:
        first = await client.post("/orders", content=b"a", headers=key("full"))
        repeat = await client.post("/orders", content=b"a", headers=key("full"))
    assert (first.status_code, first.json()["n"]) == (201, 1)
    assert app.calls == 1
    assert repeat.status_code == 409
    (record,) = store.records.values()
    if unstored_fails:
        assert record.state == "running"  # taken over after lock_timeout, as after a crash
        assert "retry-after" in repeat.headers
    else:
        assert (record.state, repeat.json()["reason"]) == ("unstored", "incomplete")
        assert "could not be stored" in repeat.json()["detail"]


async def test_a_response_too_large_to_store_reaches_its_client_when_the_store_fails() -> None:
    """Regression: a store failing as it recorded a response too large to store raised into
    the app's ``send`` (a 500 for a request that ran)."""
    store = FullStore(Clock(), unstored_fails=True)
    app = Streamer([b"x" * 2000])
    async with asgi_client(IdempotencyMiddleware(app, state=store, max_stored_body=1024)) as client:
        first = await client.post("/big", content=b"x", headers=key("big"))
    assert (first.status_code, first.content) == (200, b"x" * 2000)
    assert app.calls == 1
