"""ctx.http: stable, unguessable Idempotency-Keys and retries that reuse them (real server)."""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch import Batch, IdempotencyMiddleware, TaskContext
from asyncbatch._http.client import (
    HTTPSettings,
    IdempotencyKeys,
    ItemHTTP,
    SharedClient,
    derive_idempotency_key,
)

from .conftest import make_files, rows, state_counts
from .servers import RealServer, Receive, Scope, Send, read_body, respond


class Recorder:
    """An ASGI app that records every request and answers from a per-key script."""

    def __init__(self, script: list[int] | None = None, headers: Any = ()) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script = script or []
        self.headers = headers
        self.by_key: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        key = headers.get("idempotency-key", "")
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "key": key,
                "body": body,
                "query": scope["query_string"],
            }
        )
        n = self.by_key[key]
        self.by_key[key] += 1
        status = self.script[n] if n < len(self.script) else 200
        await respond(send, status, b"{}", self.headers if status == 429 else ())


def secret_of(state: Path) -> bytes:
    ((value,),) = rows(state, "SELECT value FROM meta WHERE name = 'secret'")
    return bytes.fromhex(value)


async def test_keys_are_stable_across_attempts_and_distinct_between_items_and_calls(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    app = Recorder()

    async def handle(ctx: TaskContext) -> None:
        data = await ctx.read_bytes()
        await ctx.http.post(f"{url}/upload", content=data)
        await ctx.http.post(f"{url}/notify", json={"file": ctx.entry.relpath})
        await ctx.http.put(f"{url}/meta", json={}, idempotency_key="meta-step")
        await ctx.http.post(f"{url}/own", headers={"Idempotency-Key": "caller-chosen"})
        await ctx.http.get(f"{url}/lookup")
        if ctx.attempt == 1:
            raise ConnectionResetError("the handler crashed after its calls")

    with RealServer(app) as server:
        url = server.url
        async with httpx.AsyncClient() as client:
            report = await Batch(
                handle, source=inbox, state=state, http=client, backoff=0, settle=0
            ).run()

    assert report.done == 2
    calls = [r for r in app.requests if r["path"] != "/own"]
    by_item: dict[bytes, list[dict[str, Any]]] = collections.defaultdict(list)
    # Requests come in attempt order per item: 4 keyed calls per attempt, 2 attempts each.
    posts = [r for r in calls if r["method"] != "GET"]
    assert len(posts) == 2 * 2 * 3
    for r in posts:
        by_item[r["key"].encode()].append(r)
    assert all(len(v) == 2 for v in by_item.values()), "each call's key repeats across attempts"
    assert len(by_item) == 6, "3 calls x 2 items, all keys distinct"
    assert all(r["key"] == "" for r in calls if r["method"] == "GET")
    assert {r["key"] for r in app.requests if r["path"] == "/own"} == {"caller-chosen"}

    # The key is HMAC(secret stored in the ledger, job, item key, call identity): stable in
    # any process that reads the same ledger, unguessable without it.
    secret = secret_of(state)
    item_keys = [k for (k,) in rows(state, "SELECT key FROM items ORDER BY key")]
    expected = {
        hmac.new(
            secret, b"\0".join([b"default", k.encode(), b"meta-step"]), hashlib.sha256
        ).hexdigest()
        for k in item_keys
    }
    assert expected == {r["key"] for r in posts if r["path"] == "/meta"}


async def test_transient_answers_are_retried_with_the_same_key(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    app = Recorder(script=[503, 502])

    async def handle(ctx: TaskContext) -> None:
        response = await ctx.http.post(f"{url}/effects", content=await ctx.read_bytes())
        response.raise_for_status()

    with RealServer(app) as server:
        url = server.url
        report = await Batch(handle, source=inbox, state=state, http_backoff=0.001, settle=0).run()

    assert report.done == 3
    assert sorted(app.by_key.values()) == [3, 3, 3]
    assert report.failed == 0


async def test_a_cookie_an_answer_sets_does_not_make_the_retry_run_again(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # The server behind IdempotencyMiddleware (or the load balancer in front of it) sets a
    # cookie. The run's client must not send it back: the middleware names the caller by its
    # Cookie header, and the retry would be another caller's new request, run a second time.
    make_files(inbox, 2)
    ran: collections.Counter[bytes] = collections.Counter()
    cookies: list[str] = []

    async def api(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        ran[body] += 1
        cookies.extend(v.decode() for k, v in scope["headers"] if k.lower() == b"cookie")
        await respond(send, 201, b"{}", [(b"set-cookie", b"AWSALB=" + body)])

    async def handle(ctx: TaskContext) -> None:
        response = await ctx.http.post(f"{url}/effects", content=ctx.entry.relpath.encode())
        response.raise_for_status()
        if ctx.attempt == 1:
            raise ValueError("a later step fails the first attempt")

    app = IdempotencyMiddleware(api, state=tmp_path / "api.db")
    with RealServer(app) as server:
        url = server.url
        report = await Batch(handle, source=inbox, state=state, backoff=0.001, settle=0).run()
    await app.aclose()

    assert (report.done, report.failed) == (2, 2)
    assert cookies == []
    assert sorted(ran.values()) == [1, 1]  # each item's POST ran once; its retry got a replay


async def test_connection_errors_are_retried_with_the_same_key(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    app = Recorder()
    failed_once: set[str] = set()

    class Flaky(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            key = request.headers.get("Idempotency-Key", "")
            if key not in failed_once:
                failed_once.add(key)
                raise httpx.ConnectError("connection refused", request=request)
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def handle(ctx: TaskContext) -> None:
        (await ctx.http.post(f"{url}/x", content=b"1")).raise_for_status()

    with RealServer(app) as server:
        url = server.url
        report = await Batch(
            handle, source=inbox, state=state, http=Flaky(), http_backoff=0.001, settle=0
        ).run()

    assert report.done == 2
    assert len(failed_once) == 2
    assert sorted(app.by_key.values()) == [1, 1]
    assert set(app.by_key) == failed_once


async def test_422_fails_the_item_for_good_with_a_clear_reason(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    app = Recorder(script=[422])

    async def handle(ctx: TaskContext) -> None:
        await ctx.http.post(f"{url}/x", content=b"changed body")

    with RealServer(app) as server:
        url = server.url
        report = await Batch(handle, source=inbox, state=state, max_attempts=5, settle=0).run()

    assert report.dead == 1
    assert len(app.requests) == 1, "422 is never retried"
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert "the server says this key was used with a different request" in error
    assert state_counts(state) == {"dead": 1}


async def test_retry_after_is_honoured_and_logs_have_no_query_string(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = Recorder(script=[429], headers=[(b"retry-after", b"2")])
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    with RealServer(app) as server:
        async with httpx.AsyncClient() as client:
            http = ItemHTTP(
                HTTPSettings(
                    shared=SharedClient(client),
                    secret=b"s" * 32,
                    job="j",
                    unsafe_methods=frozenset({"POST"}),
                    backoff=0.01,
                    sleep=fake_sleep,
                ),
                "item-1",
            )
            with caplog.at_level(logging.INFO, logger="asyncbatch.http"):
                response = await http.post(f"{server.url}/p?token=secret123", content=b"x")

    assert response.status_code == 200
    assert slept
    assert slept[0] >= 2.0
    assert len({r["key"] for r in app.requests}) == 1
    assert "retrying POST" in caplog.text
    assert "secret123" not in caplog.text


async def test_a_retry_after_longer_than_the_backoff_cap_is_capped(tmp_path: Path) -> None:
    app = Recorder(script=[429], headers=[(b"retry-after", b"12")])
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    with RealServer(app) as server:
        async with httpx.AsyncClient() as client:
            http = ItemHTTP(
                HTTPSettings(
                    shared=SharedClient(client),
                    secret=b"s" * 32,
                    job="j",
                    unsafe_methods=frozenset({"POST"}),
                    backoff_max=10.0,
                    sleep=fake_sleep,
                ),
                "item-1",
            )
            response = await http.post(f"{server.url}/p", content=b"x")

    assert response.status_code == 200
    assert slept == [10.0]


async def test_exhausted_retries_return_the_last_answer(tmp_path: Path) -> None:
    app = Recorder(script=[503] * 10)

    async def no_sleep(seconds: float) -> None:
        pass

    with RealServer(app) as server:
        async with httpx.AsyncClient() as client:
            http = ItemHTTP(
                HTTPSettings(
                    shared=SharedClient(client),
                    secret=b"k",
                    job="j",
                    unsafe_methods=frozenset({"POST"}),
                    retries=2,
                    sleep=no_sleep,
                ),
                "item",
            )
            response = await http.post(f"{server.url}/p")
            streamed = []
            async with http.stream("GET", f"{server.url}/g") as r:
                streamed.append(r.status_code)

    assert response.status_code == 503
    assert app.by_key[response.request.headers["Idempotency-Key"]] == 3
    assert streamed == [503]


async def test_a_post_without_a_key_is_not_retried(tmp_path: Path) -> None:
    app = Recorder(script=[503])

    with RealServer(app) as server:
        async with httpx.AsyncClient() as client:
            http = ItemHTTP(
                HTTPSettings(
                    shared=SharedClient(client),
                    secret=b"k",
                    job="j",
                    unsafe_methods=frozenset({"PUT"}),
                ),
                "item",
            )
            response = await http.post(f"{server.url}/p")

    assert response.status_code == 503
    assert len(app.requests) == 1, "an unkeyed POST is not safe to repeat"


#: Text as file names decode to: any character, and the surrogates that stand for bytes that
#: are not UTF-8 (surrogateescape).
_ANY_TEXT = st.text(
    st.characters(codec="utf-8") | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    max_size=40,
)


@given(secret=st.binary(max_size=200), job=_ANY_TEXT, key=_ANY_TEXT, call=_ANY_TEXT)
def test_a_runs_keys_are_the_hmac_of_job_key_and_call(
    secret: bytes, job: str, key: str, call: str
) -> None:
    # Secrets shorter than, equal to and longer than SHA-256's 64-byte block (hashed first).
    message = f"{job}\0{key}\0{call}".encode("utf-8", "surrogateescape")
    expected = hmac.new(secret, message, hashlib.sha256).hexdigest()
    assert IdempotencyKeys(secret, job).derive(key, call) == expected
    assert derive_idempotency_key(secret, job, key, call) == expected


async def test_a_followed_redirect_gets_a_key_of_its_own_and_runs_once(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # POST /old answers 307 (the request again, at /new), behind IdempotencyMiddleware. httpx
    # sent the first request's key on with the redirected one: the middleware, which had stored
    # the 307 under it, answered 422 and every item died.
    make_files(inbox, 2)
    effects: collections.Counter[bytes] = collections.Counter()
    keys: list[str] = []

    async def api(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"] == "/old":
            await respond(send, 307, b"", [(b"location", b"/new")])
        elif scope["path"] == "/moved":
            await respond(send, 303, b"", [(b"location", b"/old-done")])
        else:
            if scope["path"] == "/new":
                effects[body] += 1
            await respond(send, 201, body)

    async def handle(ctx: TaskContext) -> None:
        data = await ctx.read_bytes()
        created = await ctx.http.post(f"{url}/old", content=data, follow_redirects=True)
        created.raise_for_status()
        assert (created.url.path, created.content) == ("/new", data)
        assert [r.status_code for r in created.history] == [307]
        assert created.headers.get("idempotent-replayed") == ("true" if ctx.attempt > 1 else None)
        seen = await ctx.http.post(f"{url}/moved", content=data, follow_redirects=True)
        assert (seen.request.method, seen.url.path) == ("GET", "/old-done")
        if ctx.attempt == 1:
            raise ConnectionResetError("the handler failed after its calls")

    middleware = IdempotencyMiddleware(api, state=tmp_path / "api.db")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":  # what reaches the server, replays included
            keys.append(dict(scope["headers"]).get(b"idempotency-key", b"").decode())
        await middleware(scope, receive, send)

    with RealServer(app, lifespan=True) as server:
        url = server.url
        report = await Batch(handle, source=inbox, state=state, backoff=0, settle=0).run()

    assert (report.done, report.failed, report.dead) == (2, 2, 0)
    assert sorted(effects.values()) == [1, 1], "each file's POST to /new ran once"
    # Per item: the POST to /old, its hop to /new, the POST to /moved (keyed, each its own
    # key) and the GET that follows the 303 (none); the same keys in both attempts.
    keyed = [k for k in keys if k]
    assert len(keys) == 2 * 2 * 4
    assert len(keyed) == 2 * 2 * 3
    assert len(set(keyed)) == 2 * 3


class _ResettingServer:
    """A TCP server on 127.0.0.1 that reads each request's first bytes and resets the
    connection (``SO_LINGER`` 0): the client sees a reset, no response."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.resets = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            self.resets += 1

    def __enter__(self) -> _ResettingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept: close alone does not)
        self.sock.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


async def test_a_reset_connections_failure_names_its_request_without_the_query(
    inbox: Path, state: Path
) -> None:
    # Regression (QA): a connection reset by the server was recorded as "ReadError" alone (or
    # "[Errno 104] ..."): which call of the handler failed, to which endpoint, went unsaid.
    make_files(inbox, 1)

    async def handle(ctx: TaskContext) -> None:
        await ctx.http.post(f"{server.url}/orders?token=secret", content=b"x")

    with _ResettingServer() as server:
        report = await Batch(
            handle,
            source=inbox,
            state=state,
            max_attempts=1,
            settle=0,
            http_retries=1,
            http_backoff=0.001,
        ).run()

    assert report.dead == 1
    assert server.resets >= 1
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert f"POST {server.url}/orders" in error, error
    assert "secret" not in error
