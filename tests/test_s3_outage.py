"""The S3 store checked before a run makes its state, and waited out when it goes away.

- A bucket that does not exist (``--source``, ``--output-dir``, an ``s3://`` archive): exit 2,
  one line naming the value, no state made, nothing handled or moved.
- An endpoint that cannot be reached at the start: exit 69, no state made.
- The endpoint gone mid-run (moto's server stopped): no attempt is spent; the run waits for it
  (``--ledger-timeout``), goes on when it is back, or ends with exit 69, its items pending.
  Its listing too: waited for, and gone on with after the last key it had.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from .conftest import cli, rows, spawn, state_counts, wait_for
from .s3 import Bucket, MotoServer, start_server

#: A handler that says it started (AB_LOG), then (AB_GATE given) waits until the test holds
#: that FIFO open for writing (opening it for reading waits till then), then reads its input.
HANDLER = """\
import os
import anyio

async def handle(ctx):
    with open(os.environ["AB_LOG"], "a") as log:
        log.write(ctx.entry.relpath + "\\n")
    gate = os.environ.get("AB_GATE")
    if gate:
        os.close(await anyio.to_thread.run_sync(os.open, gate, os.O_RDONLY))
    await ctx.read_bytes()
"""

WRITES = """\
async def handle(ctx):
    await ctx.write_output(ctx.entry.relpath + ".out", await ctx.read_bytes())
"""


class Restartable:
    """A moto server of this test's own, which can be stopped and started again on its port
    (moto keeps its buckets in this process: they are there again)."""

    def __init__(self) -> None:
        self._gen = start_server()
        self.moto: MotoServer = next(self._gen)
        self.port = int(self.moto.endpoint.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.moto.server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.moto.server = server


@pytest.fixture
def own_server() -> Iterator[Restartable]:
    server = Restartable()
    try:
        yield server
    finally:
        try:
            server.stop()
        except Exception:  # stopped already
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _job(tmp_path: Path, code: str) -> Path:
    (tmp_path / "jobs.py").write_text(code)
    return tmp_path


def test_a_missing_output_bucket_is_refused_before_anything_is_handled(
    bucket: Bucket, tmp_path: Path
) -> None:
    for i in range(3):
        bucket.put(f"in/f{i}.txt", b"x")
    state = tmp_path / "s.db"
    typo = f"s3://{bucket.name}-typo/out/"
    out = cli(
        "run", "jobs:handle", "--source", bucket.url("in/"), "--state", state,
        "--output-dir", typo, "--on-dead", f"move:{bucket.url('quarantine/')}",
        "--backoff", "0", "--no-progress",
        cwd=_job(tmp_path, WRITES), env=bucket.env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"asyncbatch: error: setting 'output_dir' has value '{typo}': the bucket "
        f"'{bucket.name}-typo' does not exist (a mistyped one?)"
    ]
    assert not state.exists()
    assert bucket.keys() == ["in/f0.txt", "in/f1.txt", "in/f2.txt"]


def test_a_missing_archive_bucket_is_refused_before_anything_is_handled(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put("in/a.txt", b"x")
    state = tmp_path / "s.db"
    out = cli(
        "run", "jobs:handle", "--source", bucket.url("in/"), "--state", state,
        "--on-done", "move:s3://no-such-bucket-h87/done/", "--no-progress",
        cwd=_job(tmp_path, WRITES), env=bucket.env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "asyncbatch: error: setting 'on_done' has value 'move:s3://no-such-bucket-h87/done/': "
        "the bucket 'no-such-bucket-h87' does not exist (a mistyped one?)"
    ]
    assert not state.exists()
    assert bucket.keys() == ["in/a.txt"]


def test_a_missing_source_bucket_does_not_bind_the_job(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("in/a.txt", b"x")
    state = tmp_path / "s.db"
    typo = f"s3://{bucket.name}-typo/in/"
    cwd = _job(tmp_path, "async def handle(ctx):\n    await ctx.read_bytes()\n")
    out = cli("run", "jobs:handle", "--source", typo, "--state", state, cwd=cwd, env=bucket.env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"asyncbatch: error: setting 'source' has value '{typo}': the bucket "
        f"'{bucket.name}-typo' does not exist (a mistyped one?)"
    ]
    assert not state.exists()
    fixed = cli(
        "run", "jobs:handle", "--source", bucket.url("in/"), "--state", state,
        cwd=cwd, env=bucket.env,
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert state_counts(state) == {"done": 1}


def test_an_unreachable_endpoint_at_the_start_makes_no_state(
    bucket: Bucket, tmp_path: Path
) -> None:
    state = tmp_path / "s.db"
    env = {**bucket.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    out = cli(
        "run", "jobs:handle", "--source", bucket.url("in/"), "--state", state,
        cwd=_job(tmp_path, WRITES), env=env,
    )  # fmt: skip
    assert out.returncode == 69, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"asyncbatch: error: cannot list the source: list {bucket.url('in/')} failed:"
    )
    assert not state.exists()


def _items(state: Path) -> dict[str, tuple[str, int]]:
    return {
        str(rel): (str(st), int(n))
        for rel, st, n in rows(state, "SELECT relpath, state, attempts FROM items")
    }


def _outage_run(
    own_server: Restartable, tmp_path: Path, timeout: str, request: pytest.FixtureRequest
) -> tuple[subprocess.Popen[str], Bucket, Path]:
    """Start a run over 6 objects (one at a time); once its first handler started, the
    server is stopped (and the handlers let go: the gate held open until the test ends)."""
    bucket = Bucket(own_server.moto)
    for i in range(6):
        bucket.put(f"in/f{i}.txt", b"x" * 10)
    log, gate = tmp_path / "log", tmp_path / "gate"
    os.mkfifo(gate)
    state = tmp_path / "s.db"
    proc = spawn(
        "run", "jobs:handle", "--source", bucket.url("in/"), "--state", state, "-j", "1",
        "--backoff", "0", "--ledger-timeout", timeout, "--no-progress",
        cwd=_job(tmp_path, HANDLER), env={**bucket.env, "AB_LOG": str(log), "AB_GATE": str(gate)},
    )  # fmt: skip
    wait_for(log.exists)
    own_server.stop()
    held = os.open(gate, os.O_RDWR)  # the handlers go on (the gate held open to the end)
    request.addfinalizer(lambda: os.close(held))
    return proc, bucket, state


def test_an_outage_past_the_ledger_timeout_leaves_items_pending_not_dead(
    own_server: Restartable, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    proc, bucket, state = _outage_run(own_server, tmp_path, "1", request)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 69, err
    assert "the S3 store stayed unreachable for 1s (ledger_timeout)" in err.splitlines()[-1]
    items = _items(state)
    assert not [k for k, (st, _) in items.items() if st in ("dead", "failed")], items
    # The store back: a plain rerun handles every object (nothing "dead before").
    own_server.start()
    again = cli(
        "run", "jobs:handle", "--source", bucket.url("in/"), "--state", state, "--no-progress",
        cwd=tmp_path, env={**bucket.env, "AB_LOG": str(tmp_path / "log")},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert state_counts(state) == {"done": 6}


def test_an_outage_is_waited_out_without_spending_attempts(
    own_server: Restartable, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    proc, _, state = _outage_run(own_server, tmp_path, "120", request)
    assert proc.stderr is not None
    said = proc.stderr.readline()  # the first thing it says: that it waits for the store
    assert "the S3 store cannot be reached" in said, said
    own_server.start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, said + err
    assert "6 done" in out, out
    assert "the S3 store answers again" in err
    assert "failed" not in err
    assert all(n == 1 for _, n in _items(state).values()), _items(state)
    assert state_counts(state) == {"done": 6}


async def test_a_listing_met_by_an_outage_waits_for_the_store_and_goes_on(
    own_server: Restartable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store went down once the run had looked at it, before its listing: the run ended
    # (exit 69, "cannot list the source"), while a request of a handler is waited out. Now
    # the listing is waited out too (--ledger-timeout): each object handled once.
    from asyncbatch import Batch, TaskContext
    from asyncbatch._sources import objects

    bucket = Bucket(own_server.moto)
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    names = [f"f{i}.txt" for i in range(3)]
    for name in names:
        bucket.put(f"in/{name}", b"x" * 10)
    check_places = objects.check_places

    async def store_down_once_looked_at(*args: Any, **kwargs: Any) -> None:
        await check_places(*args, **kwargs)
        own_server.stop()

    monkeypatch.setattr(objects, "check_places", store_down_once_looked_at)

    class BackWhenWaitedFor(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("the S3 store cannot be reached"):
                own_server.start()

    back = BackWhenWaitedFor()
    logging.getLogger("asyncbatch").addHandler(back)
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        await ctx.read_bytes()

    try:
        with anyio.fail_after(60):  # a bound on a hang, not a wait
            report = await Batch(
                handle, source=bucket.url("in/"), state=tmp_path / "s.db", settle=0,
                ledger_timeout=60,
            ).run()  # fmt: skip
    finally:
        logging.getLogger("asyncbatch").removeHandler(back)
    assert sorted(handled) == names
    assert (report.seen, report.done, report.ok) == (3, 3, True), report


async def test_a_listing_cut_between_two_pages_goes_on_after_its_last_key(
    own_server: Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # obstore fetches a listing's pages ahead of its reader, so a stopped server cannot cut
    # one between two pages on cue: here its listing stream fails after its first page as an
    # unreachable store's does. The listing waits, then asks for the keys after the last one
    # it had (start-after), not the whole prefix again: each object listed once.
    import datetime as dt

    import obstore

    from asyncbatch._sources.store import ObjectStores

    bucket = Bucket(own_server.moto)
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    keys = [f"in/f{i}" for i in range(5)]
    metas: list[dict[str, Any]] = [
        {"path": k, "size": 1, "last_modified": when, "e_tag": f'"{i}"', "version": None}
        for i, k in enumerate(keys)
    ]
    offsets: list[str | None] = []

    async def cut_after_a_page(
        store: Any, prefix: str | None, *, offset: str | None = None, chunk_size: int = 0
    ) -> Any:
        offsets.append(offset)
        rest = [m for m in metas if offset is None or m["path"] > offset]
        yield rest[:2]
        if len(offsets) == 1:
            raise OSError("Error performing list request: HTTP error: error sending request")
        yield rest[2:]

    monkeypatch.setattr(obstore, "list", cut_after_a_page)
    store = ObjectStores(outage_timeout=60).bucket(bucket.name)
    with anyio.fail_after(60):  # a bound on a hang, not a wait
        listed = [o.key async for page in store.list_pages("in/") for o in page]
    assert offsets == [None, "in/f1"]
    assert listed == keys
