"""Abuse: inputs swapped under the runner, hostile names, hostile handlers, huge inputs,
secrets that must not leak.

(Handlers raising ``BaseException``, ``SystemExit``, ``KeyboardInterrupt`` or a stray
``CancelledError``, FIFOs in the inbox and ``write_output`` paths with ``..``, absolute paths
or symlinked directories are covered in tests/test_batch.py, tests/test_cli.py and
tests/test_effects.py; asyncbatch/docs/RELIABILITY.md lists them.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from asyncbatch import Batch, TaskContext
from asyncbatch import _failpoints as failpoints

from ..conftest import cli, make_files, rows, settled_now, state_counts
from ..servers import RealServer, read_body, respond
from .handlers import CANARY
from .harness import HANDLERS, record_figures

SECRET = b"the target of the symlink: never to be read\n"


async def test_a_symlink_or_fifo_swapped_in_after_the_scan_is_never_read(
    inbox: Path, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_files(inbox, 6)
    target = tmp_path / "target.txt"
    target.write_bytes(SECRET)
    swapped: list[str] = []

    def swap() -> None:  # after the claim: the scan saw regular files
        if swapped:
            return
        for i, path in enumerate(sorted(inbox.iterdir())):
            tmp = path.with_name(".swap")
            if i % 3 == 2:
                os.mkfifo(tmp)
            else:
                tmp.symlink_to(target)
            os.replace(tmp, path)
            swapped.append(path.name)

    monkeypatch.setattr(failpoints, "ACTIVE", {"after-claim": failpoints.Call("call", fn=swap)})
    seen: list[bytes] = []

    async def handle(ctx: TaskContext) -> None:
        seen.append(await ctx.read_bytes())

    with anyio.fail_after(60):  # a FIFO opened for reading would block here
        report = await Batch(handle, source=inbox, state=state, backoff=0.01, settle=0).run()

    assert len(swapped) == 6
    assert seen == []
    assert report.done == 0
    assert report.failed + report.vanished >= 6
    assert state_counts(state).get("done", 0) == 0
    record_figures("abuse", case="symlink/FIFO swapped in after the scan", reads_of_target=0)


HOSTILE = [
    "line\nbreak.txt",
    "\nERROR asyncbatch: forged log line.txt",
    "tab\tand\rreturn.txt",
    "x" * 255,
    "é" * 127 + "x",  # 255 bytes in UTF-8
]


def test_hostile_names_are_handled_and_never_break_a_line_of_output(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    names = [os.fsencode(n) for n in HOSTILE] + [b"latin1-\xe9\xff.txt", b"\xff" * 255]
    for i, name in enumerate(names):
        path = os.path.join(os.fsencode(inbox), name)
        with open(path, "wb") as f:
            f.write(b"content %d\n" % i)
        os.utime(path, (time.time() - 30,) * 2)
    out = tmp_path / "out"
    out.mkdir()
    args = (
        "run",
        f"{Path(__file__).parent.parent / 'cli_handlers.py'}:write_copy",
        "--source",
        inbox,
        "--state",
        state,
        "--output-dir",
        out,
        "--no-progress",
        "--log-level",
        "DEBUG",
    )
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert state_counts(state) == {"done": len(names)}
    for name in names:
        source = os.path.join(os.fsencode(inbox), name)
        with open(source, "rb") as a, open(os.path.join(os.fsencode(out), name), "rb") as b:
            assert a.read() == b.read()
    # No name split a line: every line of the log is a whole record.
    for line in result.stderr.splitlines():
        assert line.startswith(("20", "asyncbatch")), line
    assert "forged log line" not in "\n".join(
        line for line in result.stderr.splitlines() if line.startswith("ERROR")
    )
    for command in ("status", "failures", "history"):
        shown = cli(command, "--state", state)
        assert shown.returncode == 0, shown.stderr
        assert not any(line.startswith("ERROR") for line in shown.stdout.splitlines())
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert sorted(rows(state, "SELECT count(*) FROM items")) == [(len(names),)]
    record_figures("abuse", case="hostile names", names=len(names), done=len(names))


async def test_a_handler_that_never_returns_is_stopped_by_its_timeout_and_the_lease(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)

    async def never(ctx: TaskContext) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(60):
        timed = await Batch(
            never, source=inbox, state=state, timeout=0.2, max_attempts=2, backoff=0.01, settle=0
        ).run()
    assert (timed.done, timed.dead) == (0, 2)
    errors = {e for (e,) in rows(state, "SELECT last_error FROM items")}
    assert errors == {"TimeoutError: the handler ran over 0.2s"}

    # No timeout: the heartbeat keeps renewing its lease (the runner is alive), so only a stop
    # ends it; the item goes back to the ledger, nothing is lost.
    entered: list[str] = []
    both_in = anyio.Event()

    async def never_counted(ctx: TaskContext) -> None:
        entered.append(ctx.key)
        if len(entered) == 2:
            both_in.set()
        await anyio.sleep_forever()

    batch = Batch(never_counted, source=inbox, state=state, job="no-timeout", grace=0.3, settle=0)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch.run)
            await both_in.wait()  # both items are in their handler, leased to this run
            batch.stop()
    assert rows(state, "SELECT state, count(*) FROM items WHERE job='no-timeout'") == [
        ("pending", 2)
    ]


def peak_rss_mib(args: list[str]) -> tuple[int, float, str]:
    """Run the CLI under a fresh parent; its exit status and its peak RSS in MiB."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "asyncbatch", *settled_now(args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    status, kib = done.stdout.split()
    return int(status), int(kib) / 1024, done.stderr


@pytest.mark.parametrize(("handler", "most_mib"), [("stream_in_chunks", 200), ("read_whole", 1300)])
def test_a_1_gib_sparse_input_is_read_in_bounded_memory(
    handler: str, most_mib: int, inbox: Path, state: Path
) -> None:
    big = inbox / "sparse.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    os.utime(big, (time.time() - 30,) * 2)
    status, mib, err = peak_rss_mib(
        ["run", f"{HANDLERS}:{handler}", "--source", str(inbox), "--state", str(state)]
    )
    assert status == 0, err
    assert state_counts(state) == {"done": 1}
    # read_bytes holds the one copy of the file it returns (and nothing more); ctx.open()
    # streams it in a constant amount of memory.
    assert mib < most_mib
    record_figures("abuse", case=f"1 GiB sparse input, {handler}", peak_rss_mib=round(mib))


async def refuse(scope: dict[str, object], receive: object, send: object) -> None:
    if scope["type"] != "http":
        return
    await read_body(receive)  # type: ignore[arg-type]
    await respond(send, 400, b'{"error": "no"}')  # type: ignore[arg-type]


def test_a_canary_secret_in_payloads_headers_and_urls_never_leaks(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    for i in range(3):
        (inbox / f"secret{i}.txt").write_text(f"{CANARY} payload {i}\n")
        os.utime(inbox / f"secret{i}.txt", (time.time() - 30,) * 2)
    with RealServer(refuse, log_level="critical") as server:  # type: ignore[arg-type]
        result = cli(
            "run",
            f"{HANDLERS}:post_secret",
            "--source",
            inbox,
            "--state",
            state,
            "--no-progress",
            "--max-attempts",
            "2",
            "--backoff",
            "0.01",
            "--log-level",
            "DEBUG",
            env={"AB_URL": server.url},
        )
    assert result.returncode == 1, result.stderr
    assert "400" in result.stderr  # the failures were logged, and what they were
    shown = [result.stdout, result.stderr]
    for command in ("status", "failures", "history"):
        out = cli(command, "--state", state)
        shown += [out.stdout, out.stderr]
    for text in shown:
        assert CANARY not in text
    stored = b"".join(p.read_bytes() for p in state.parent.iterdir() if p.name.startswith("state"))
    assert CANARY.encode() not in stored
    digest = hashlib.sha256(CANARY.encode()).hexdigest()
    assert digest not in "".join(shown)
    record_figures("abuse", case="canary secret", leaks=0)
