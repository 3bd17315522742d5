"""What a handler's context offers besides its input: idempotency keys for any client, the
run's stop (``ctx.on_stop``), and giving an item back (``AttemptInterrupted``)."""

from __future__ import annotations

import hmac
from pathlib import Path

import anyio
import httpx
import pytest

from asyncbatch import AttemptInterrupted, Batch, TaskContext
from asyncbatch._scanner import Entry

from .conftest import make_files, rows, state_counts


async def test_idempotency_key_is_the_key_ctx_http_sends_for_that_call(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    sent: list[tuple[str, str]] = []
    derived: list[tuple[int, str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, request.headers["Idempotency-Key"]))
        return httpx.Response(200)

    async def handle(ctx: TaskContext) -> None:
        await ctx.http.post(f"https://api.example/{ctx.entry.relpath}", idempotency_key="upload")
        derived.append((ctx.attempt, ctx.entry.relpath, ctx.idempotency_key("upload")))
        if ctx.attempt == 1:
            raise ConnectionResetError("a crash after the call")

    batch = Batch(
        handle,
        source=inbox,
        state=state,
        settle=0,
        backoff=0,
        http=httpx.MockTransport(answer),
    )
    report = await batch.run()

    assert report.done == 2
    by_item = {rel: {k for a, r, k in derived if r == rel} for _, rel, _ in derived}
    assert all(len(keys) == 1 for keys in by_item.values()), "the same in every attempt"
    assert len({next(iter(k)) for k in by_item.values()}) == 2, "never shared by two items"
    assert {(f"/{rel}", key) for _, rel, key in derived} == set(sent)
    ((secret,),) = rows(state, "SELECT value FROM meta WHERE name = 'secret'")
    ((item_key,),) = rows(state, "SELECT key FROM items WHERE relpath = ?", (b"f00000.txt",))
    expected = hmac.new(
        bytes.fromhex(secret), b"\0".join([b"default", item_key.encode(), b"upload"]), "sha256"
    ).hexdigest()
    assert by_item["f00000.txt"] == {expected}


def test_a_context_not_made_by_a_batch_has_no_idempotency_key(tmp_path: Path) -> None:
    ctx = TaskContext(
        entry=Entry(tmp_path, "x", 1, 0, 0), key="k", input_hash="h", attempt=1, job="j", fence=1
    )
    with pytest.raises(RuntimeError, match="not made by a Batch"):
        ctx.idempotency_key("step")
    with ctx.on_stop(lambda signum: pytest.fail("nothing stops a context made by hand")):
        pass


async def test_a_handler_hears_the_stop_and_gives_its_item_back(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    heard: list[int | None] = []
    started = anyio.Event()
    batch: Batch

    async def handle(ctx: TaskContext) -> None:
        stopping = anyio.Event()

        def on_stop(signum: int | None) -> None:
            heard.append(signum)
            stopping.set()

        with ctx.on_stop(on_stop):
            if ctx.entry.relpath == "f00000.txt":
                started.set()
                await stopping.wait()
                raise AttemptInterrupted("the run is stopping: put back")
            # The other item never finishes by itself: the run cancels it after its grace.
            await anyio.sleep_forever()

    batch = Batch(handle, source=inbox, state=state, settle=0, concurrency=2, grace=0.5)
    async with anyio.create_task_group() as tg:

        async def stop_once_started() -> None:
            await started.wait()
            batch.stop()

        tg.start_soon(stop_once_started)
        report = await batch.run()

    assert heard == [None, None], "Batch.stop() passes no signal; each handler heard it once"
    assert report.stopped
    assert (report.done, report.dead, report.failed) == (0, 0, 0)
    assert state_counts(state) == {"pending": 2}
    assert rows(state, "SELECT last_error FROM items") == [(None,), (None,)]


async def test_a_callback_registered_after_the_stop_is_called_at_once(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 1)
    heard: list[int | None] = []
    batch: Batch

    async def handle(ctx: TaskContext) -> None:
        batch.stop()
        with ctx.on_stop(heard.append):
            assert heard == [None]

    batch = Batch(handle, source=inbox, state=state, settle=0)
    report = await batch.run()

    assert heard == [None]
    assert report.done == 1, "a handler that finishes anyway is done"


async def test_attempt_interrupted_without_a_stop_is_a_failure(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)

    async def handle(ctx: TaskContext) -> None:
        raise AttemptInterrupted("nothing is stopping")

    report = await Batch(handle, source=inbox, state=state, settle=0, max_attempts=1).run()

    assert report.dead == 1
    assert rows(state, "SELECT last_error FROM items") == [
        ("AttemptInterrupted: nothing is stopping",)
    ]


async def test_a_stop_callback_that_raises_does_not_stop_the_stop(
    inbox: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_files(inbox, 1)
    batch: Batch

    def broken(signum: int | None) -> None:
        raise ValueError("a broken callback")

    async def handle(ctx: TaskContext) -> None:
        with ctx.on_stop(broken):
            batch.stop()

    batch = Batch(handle, source=inbox, state=state, settle=0)
    report = await batch.run()

    assert report.done == 1
    assert "on_stop callback raised" in caplog.text


async def test_a_context_kept_past_its_handler_cannot_read_another_files_bytes(
    inbox: Path, state: Path
) -> None:
    # The input's descriptor is closed when the handler returns; a context kept past it read
    # through that number, which the next item's input had taken: another file's bytes.
    make_files(inbox, 2)
    kept: list[TaskContext] = []
    got: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if not kept:
            kept.append(ctx)
            return
        for read in (TaskContext.read_bytes, _read_through_open):
            try:
                got.append(repr(await read(kept[0])))
            except Exception as e:
                got.append(f"{type(e).__name__}: {e}")
        assert await ctx.read_bytes() == b"f00001\n".ljust(16, b".")

    out = inbox.parent / "out"
    out.mkdir()
    report = await Batch(
        handle, source=inbox, state=state, concurrency=1, settle=0, output_dir=out
    ).run()

    assert report.done == 2
    assert len(got) == 2
    assert all(g.startswith("RuntimeError: this TaskContext's attempt is over") for g in got), got
    with pytest.raises(RuntimeError, match="its input is closed"):
        await kept[0].read_bytes()
    # Nor write or move (it said the lease ran out: "was this runner suspended?").
    with pytest.raises(RuntimeError, match="attempt is over"):
        await kept[0].write_output("late.txt", b"late")
    with pytest.raises(RuntimeError, match="attempt is over"):
        await kept[0].move(inbox.parent / "elsewhere.txt")


async def _read_through_open(ctx: TaskContext) -> bytes:
    async with ctx.open() as f:
        return await f.read()
