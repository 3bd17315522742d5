"""The examples in examples/ run as a user runs them: real processes, real servers, real SQLite.

- ``entry.py`` as a subprocess over an inbox: outputs, ledger, a re-run that redoes nothing,
  exit 1 for a file that fails for good, exit 2 for a bad setting.
- ``fastapi_app.py`` under ``uvicorn examples.fastapi_app:app`` (a subprocess): files dropped
  into its inbox are handled while it serves ``GET /status``; its metrics (``/ops/metrics``)
  count them, its probes (``/healthz``, ``/readyz``) say live and ready; a POST repeated with
  one ``Idempotency-Key`` is applied once and replayed; SIGTERM stops the watcher cleanly.
- ``archive_and_post.py`` as a subprocess against a real server behind
  ``IdempotencyMiddleware``: one effect per file, every file archived, and the same after the
  poster is killed in the middle of an upload and run again.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asyncbatch import IdempotencyMiddleware

from .conftest import make_files, rows, state_counts, wait_for
from .servers import RealServer, Receive, Scope, Send, read_body, respond

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str | Path, env: dict[str, str] | None = None) -> Any:
    """Run ``python examples/SCRIPT ARGS`` to completion; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- entry.py --------------------------------------------------------------------------------------


def test_entry_script_handles_every_file_once_and_exits_by_the_report(tmp_path: Path) -> None:
    inbox, out, state = tmp_path / "inbox", tmp_path / "out", tmp_path / "state.db"
    out.mkdir()
    files = make_files(inbox, 12)
    # --settle 0: the files were written a moment ago (their ctime is now).
    args = ("--source", inbox, "--state", state, "--output-dir", out, "-j", "4", "--settle", "0")

    first = run_example("entry.py", *args)
    assert first.returncode == 0, first.stderr
    assert "12 done" in first.stdout
    for path in files:
        words = len(path.read_text().split())
        assert (out / f"{path.name}.words").read_text() == f"{words}\n"
    assert state_counts(state) == {"done": 12}

    again = run_example("entry.py", *args)
    assert again.returncode == 0, again.stderr
    assert "12 seen: 0 done, 12 done before;" in again.stdout
    ((attempts,),) = rows(state, "SELECT sum(attempts) FROM items")
    assert attempts == 12, "nothing was handled twice"

    # A file that is not UTF-8 fails every attempt: it ends dead and the exit status is 1.
    bad = inbox / "binary.dat"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    os.utime(bad, (time.time() - 30, time.time() - 30))
    failed = run_example("entry.py", *args)
    assert failed.returncode == 1, failed.stderr
    assert "1 dead" in failed.stdout
    assert state_counts(state) == {"done": 12, "dead": 1}

    missing = run_example("entry.py", "--source", tmp_path / "nope", *args[2:])
    assert missing.returncode == 2
    assert "source" in missing.stderr
    assert "Traceback" not in missing.stderr


# -- fastapi_app.py --------------------------------------------------------------------------------


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def test_fastapi_app_watches_its_inbox_and_serves_idempotent_endpoints(tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    state, orders = tmp_path / "state.db", tmp_path / "orders.jsonl"
    env = {
        "INBOX": str(inbox),
        "OUTBOX": str(outbox),
        "STATE": str(state),
        "ORDERS": str(orders),
        "SETTLE": "0.2",
        "POLL": "0.1",
    }
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--fd", str(sock.fileno())],
        cwd=ROOT,
        env={**os.environ, **env},
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sock.close()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def up() -> bool:
                assert server.poll() is None, "uvicorn exited"
                try:
                    return client.get("/status").json()["watching"] is True
                except httpx.TransportError:
                    return False

            wait_for(up, timeout=20, interval=0.1)

            # Files dropped while the application runs are handled by its watcher.
            dropped = make_files(inbox, 5, age=0)

            def handled() -> bool:
                done: int = client.get("/status").json()["statistics"]["done"]
                return done == len(dropped)

            wait_for(handled, timeout=20, interval=0.1)
            assert sorted(p.name for p in outbox.iterdir()) == [f"{p.name}.sha256" for p in dropped]
            assert state_counts(state) == {"done": 5}

            # Operations: the metrics mounted at /ops, the probes as the app's own routes.
            scraped = client.get("/ops/metrics")
            assert scraped.status_code == 200
            assert 'asyncbatch_items_total{batch_job="default",outcome="done"} 5.0' in (
                scraped.text.splitlines()
            )
            assert 'asyncbatch_attempts_total{batch_job="default",outcome="done"} 5.0' in (
                scraped.text.splitlines()
            )
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=20)
            ready = client.get("/readyz").json()
            assert ready["live"] is True
            assert ready["checks"]["lock"]["ok"] is True
            assert client.get("/healthz").status_code == 200
            assert client.get("/ops/readyz").json()["ready"] is True

            # Its own endpoint honours Idempotency-Key: the retry is a replay, not a new order.
            key = {"Idempotency-Key": "order-7f3a"}
            order = {"item": "pencil", "quantity": 3}
            first = client.post("/orders", json=order, headers=key)
            retry = client.post("/orders", json=order, headers=key)
            assert first.status_code == retry.status_code == 201
            assert "idempotent-replayed" not in first.headers
            assert retry.headers["idempotent-replayed"] == "true"
            assert retry.json() == first.json()
            misuse = client.post("/orders", json={**order, "quantity": 4}, headers=key)
            assert misuse.status_code == 422
            unkeyed = client.post("/orders", json=order)
            assert unkeyed.status_code == 201
            placed = [json.loads(line) for line in orders.read_text().splitlines()]
            assert [p["id"] for p in placed] == [first.json()["id"], unkeyed.json()["id"]]

        # SIGTERM: the lifespan stops the watcher, which releases the job lock on its way out.
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        # (uvicorn re-raises the signal once its shutdown completed: -15 is a clean exit too)
        assert server.returncode in (0, -signal.SIGTERM), output
        assert "Application shutdown complete" in output
        assert "Traceback" not in output
        assert rows(state, "SELECT job_id FROM task_lock") == []
        assert rows(state, "SELECT mode, done, exit_status FROM runs") == [("watch", 5, "stopped")]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=30)


# -- archive_and_post.py ---------------------------------------------------------------------------


class DocumentStore:
    """The receiving API: stores each posted document (the effect) and counts raw requests.

    ``slow`` names a document whose request holds for ``hold`` seconds after its effect.
    """

    def __init__(self, state: Path, slow: str = "", hold: float = 0.0) -> None:
        self.effects: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.bodies: dict[str, bytes] = {}
        self.slow, self.hold = slow, hold
        self.middleware = IdempotencyMiddleware(self.apply, state=state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests[scope["query_string"].decode()] += 1
        await self.middleware(scope, receive, send)

    async def apply(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        name = scope["query_string"].decode().removeprefix("name=")
        self.effects[name] += 1
        self.bodies[name] = body
        if name == self.slow:
            await anyio.sleep(self.hold)
        await respond(send, 201, json.dumps({"stored": name}).encode())


def test_archive_and_post_applies_each_file_once_and_archives_it(tmp_path: Path) -> None:
    inbox, archive, state = tmp_path / "inbox", tmp_path / "archive", tmp_path / "state.db"
    files = make_files(inbox, 8)
    contents = {p.name: p.read_bytes() for p in files}
    store = DocumentStore(tmp_path / "api.db")
    with RealServer(store) as server:
        env = {"API_URL": f"{server.url}/documents", "STATE": str(state)}
        args = ("--source", inbox, "--archive", archive, "--settle", "0")
        done = run_example("archive_and_post.py", *args, env=env)
        assert done.returncode == 0, done.stderr
        again = run_example("archive_and_post.py", *args, env=env)
        assert again.returncode == 0, again.stderr
    asyncio.run(store.middleware.aclose())

    assert store.effects == dict.fromkeys(contents, 1)
    assert store.bodies == contents
    assert sorted(p.name for p in archive.iterdir()) == sorted(contents)
    assert list(inbox.iterdir()) == []
    assert state_counts(state, "post") == {"done": 8}
    assert "0 done" in again.stdout, "the second run found nothing to do"


@pytest.mark.slow
def test_archive_and_post_killed_mid_upload_applies_nothing_twice(tmp_path: Path) -> None:
    inbox, archive, state = tmp_path / "inbox", tmp_path / "archive", tmp_path / "state.db"
    files = make_files(inbox, 6)
    slow = files[2].name
    store = DocumentStore(tmp_path / "api.db", slow=slow, hold=1.5)
    args = ("--source", inbox, "--archive", archive, "--state", state, "-j", "2", "--settle", "0")
    with RealServer(store) as server:
        api = ("--api", f"{server.url}/documents")
        poster = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "archive_and_post.py"), *map(str, args), *api],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The server has applied the slow upload but not answered yet: kill the poster.
            wait_for(lambda: store.effects[slow] == 1, timeout=30, interval=0.005)
        finally:
            poster.kill()
            poster.communicate(timeout=30)
        assert state_counts(state, "post").get("running", 0) >= 1

        # The next run takes over the dead runner's lock and items; the slow upload is sent
        # again with the same key (409 while the first still runs, then its stored reply).
        rerun = run_example("archive_and_post.py", *args, *api)
        assert rerun.returncode == 0, rerun.stderr
    asyncio.run(store.middleware.aclose())

    names = {p.name for p in files}
    assert store.effects == dict.fromkeys(names, 1), "every document applied exactly once"
    assert store.requests[f"name={slow}"] >= 2, "the slow upload was sent again, and replayed"
    assert {p.name for p in archive.iterdir()} == names
    assert list(inbox.iterdir()) == []
    assert state_counts(state, "post") == {"done": 6}
