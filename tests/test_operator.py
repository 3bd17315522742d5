"""The operator's view: status while a runner works, locks, unlock, logs, progress, demo."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from .conftest import (
    HANDLERS,
    cli,
    invocations,
    kill,
    make_files,
    rows,
    start_recording,
    state_counts,
    wait_for,
)

RECORD = f"{HANDLERS}:record"


def test_status_and_locks_while_a_runner_holds_the_job(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 30)
    log = tmp_path / "calls.log"
    runner = start_recording(inbox, state, log, jobs=1, sleep=0.3)
    try:
        wait_for(lambda: sum(invocations(log).values()) >= 1)
        status = json.loads(cli("status", "--state", state, "--json").stdout)
        (lock,) = status["locks"]
        assert lock["pid"] == runner.pid
        assert lock["alive"] is True
        assert status["counts"]["running"] >= 1
        assert status["last_run"]["exit_status"] is None

        text = cli("status", "--state", state).stdout
        assert f"lock: held by pid {runner.pid}" in text
        assert "heartbeat" in text

        locks = cli("locks", "--state", state)
        assert f"default: pid {runner.pid}" in locks.stdout
        assert "alive" in locks.stdout

        refused = cli("unlock", "default", "--state", state)
        assert refused.returncode == 2
        assert "is alive" in refused.stderr
        assert "--force" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        kill(runner)

    # The holder is dead now: unlock removes the stale lock without --force.
    text = cli("status", "--state", state).stdout
    assert "STALE" in text
    removed = cli("unlock", "default", "--state", state)
    assert removed.returncode == 0, removed.stderr
    assert "removed the stale lock" in removed.stdout
    assert rows(state, "SELECT count(*) FROM task_lock") == [(0,)]


def test_status_says_a_killed_shared_runner_is_stale(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # A shared runner SIGKILLed keeps its record until another runner finds it gone: status
    # showed it as a live shared runner, heartbeat and all, while a killed lock holder was
    # shown STALE.
    make_files(inbox, 30)
    log = tmp_path / "calls.log"
    runner = start_recording(inbox, state, log, "--shared", jobs=1, sleep=0.3)
    try:
        wait_for(lambda: sum(invocations(log).values()) >= 1)
        (live,) = json.loads(cli("status", "--state", state, "--json").stdout)["shared_runners"]
        assert (live["pid"], live["alive"]) == (runner.pid, True)
        assert "STALE" not in cli("status", "--state", state).stdout
    finally:
        kill(runner)

    # It was the lister too: a dead process lists no more.
    shown = json.loads(cli("status", "--state", state, "--json").stdout)
    (dead,) = shown["shared_runners"]
    assert (dead["pid"], dead["alive"]) == (runner.pid, False)
    assert shown["listing"]["pid"] is None
    text = " ".join(cli("status", "--state", state).stdout.split())
    assert f"shared runner: pid {runner.pid} on " in text
    assert "(STALE: runner gone or heartbeat expired)" in text
    assert "lister: none now" in text


def test_unlock_force_removes_a_live_lock(inbox: Path, state: Path, tmp_path: Path) -> None:
    make_files(inbox, 10)
    log = tmp_path / "calls.log"
    runner = start_recording(inbox, state, log, jobs=1, sleep=0.5)
    try:
        wait_for(lambda: log.exists())
        forced = cli("unlock", "default", "--state", state, "--force")
        assert forced.returncode == 0, forced.stderr
        assert "removed the live lock" in forced.stdout
    finally:
        # The runner notices at its next heartbeat that its lock is gone and stops.
        kill(runner)


def test_json_logs_carry_the_item_fields_and_never_the_content(inbox: Path, state: Path) -> None:
    secret = b"card-number-4111111111111111"
    (inbox / "payload.csv").write_bytes(secret)
    os.utime(inbox / "payload.csv", (time.time() - 10,) * 2)
    result = cli(
        "run",
        f"{HANDLERS}:fail_always",
        "--source",
        inbox,
        "--state",
        state,
        "--max-attempts",
        "1",
        "--log-format",
        "json",
        "--log-level",
        "INFO",
        "--no-progress",
    )
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    item_records = [r for r in records if "key" in r]
    assert item_records, result.stderr
    for record in item_records:
        assert record["job"] == "default"
        assert len(record["input_hash"]) == 64
        assert {"ts", "level", "logger", "message"} <= set(record)
    assert secret.decode() not in result.stderr


def test_plain_progress_lines_when_not_a_terminal(inbox: Path, state: Path, tmp_path: Path) -> None:
    make_files(inbox, 20)
    result = cli(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "1",
        "--progress-interval",
        "0.1",
        env={"AB_SLEEP": "0.05"},
    )
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    assert len(lines) >= 3
    assert "/20 files" in lines[-1]
    silent = cli(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        tmp_path / "other.db",
        "--no-progress",
        "--progress-interval",
        "0.01",
        env={"AB_SLEEP": "0.01"},
    )
    assert "progress:" not in silent.stderr


def test_a_progress_bar_on_a_terminal(inbox: Path, state: Path) -> None:
    make_files(inbox, 30)
    make_files(inbox, 10, prefix="g", age=60)  # done before the run that shows the bar
    assert cli("run", RECORD, "--source", inbox, "--state", state, "--ignore", "f*").returncode == 0
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncbatch",
            "run",
            f"{HANDLERS}:warn_midway",
            "--source",
            str(inbox),
            "--state",
            str(state),
            "-j",
            "2",
            "--settle",
            "0",
        ],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, "AB_SLEEP": "0.05", "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(terminal)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        proc.wait(timeout=60)
        os.close(controller)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "40/40" in text
    assert "━" in text  # rich's bar
    assert "30 done" in text
    positions = [int(n) for n in re.findall(r"(\d+)/40\b", text)]
    assert positions == sorted(positions), "the bar never goes backwards"
    # The warning is printed above the bar, on a line of its own, not spliced into it.
    (line,) = [ln for ln in re.split(r"[\r\n]+", text) if "careful with" in ln]
    assert "━" not in line
    assert re.search(r"WARNING +asyncbatch.handler: careful with f00015.txt", line)


def test_demo_runs_twice_and_shows_status(tmp_path: Path) -> None:
    result = cli("demo", "--dir", tmp_path / "demo", "--files", "40", "--no-progress")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "40 done" in out
    assert "40 seen: 0 done, 40 done before;" in out
    assert "last run:" in out
    assert len(list((tmp_path / "demo" / "out").iterdir())) == 40


def test_a_second_demo_in_the_same_dir_starts_afresh_and_spares_other_files(
    tmp_path: Path,
) -> None:
    base = tmp_path / "demo"
    first = cli("demo", "--dir", base, "--files", "40", "--no-progress")
    assert first.returncode == 0, first.stderr
    notes, mine = base / "notes.txt", base / "out" / "mine.txt"
    notes.write_text("mine")
    mine.write_text("mine too")

    second = cli("demo", "--dir", base, "--files", "25", "--no-progress")
    assert second.returncode == 0, second.stderr
    out = second.stdout
    removed = re.search(r"removed the earlier demo's (\d+) files", out)
    assert removed, out
    assert 81 <= int(removed[1]) <= 83  # 40 inputs, 40 summaries, state.db (and -wal, -shm)
    run1 = out.split("== run 1: handle every file ==")[1].split("== run 2")[0]
    assert "25 seen: 25 done;" in run1
    assert "25 seen: 0 done, 25 done before;" in out.split("== run 2")[1]
    assert state_counts(base / "state.db") == {"done": 25}
    assert len(list((base / "inbox").iterdir())) == 25
    assert sorted(p.name for p in (base / "out").iterdir()) == sorted(
        [f"partner-{i:06d}.csv.summary" for i in range(25)] + ["mine.txt"]
    )
    assert notes.read_text() == "mine"
    assert mine.read_text() == "mine too"


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    base = tmp_path / "work"
    (base / "inbox").mkdir(parents=True)
    precious = base / "inbox" / "partner-000000.csv"
    precious.write_text("not the demo's")
    result = cli("demo", "--dir", base, "--files", "5", "--no-progress")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(base) in line
    assert ".asyncbatch-demo" in line
    assert precious.read_text() == "not the demo's"
    assert sorted(p.name for p in base.rglob("*")) == ["inbox", "partner-000000.csv"]


def test_names_and_errors_are_shown_as_they_are_never_as_markup_or_terminal_codes(
    inbox: Path, state: Path
) -> None:
    # A file's name and a command's stderr are the partner's: brackets are not rich markup
    # (an error naming "[/data/in]" made `failures` die of a MarkupError, "[red]a.csv" showed
    # as "a.csv"), and control characters (ESC, CR, a newline) are shown, not sent to the
    # operator's terminal.
    inbox.mkdir(parents=True, exist_ok=True)
    for name in ("[red]a.csv", "\x1b[2Jb.csv", "c\nd.csv"):
        (inbox / name).write_bytes(b"x")
    script = "printf 'cannot open [/data/in] \\033[31mred\\r\\n' >&2; exit 1"
    result = cli(
        "run", "--exec", f"sh -c \"{script}\" sh {{}}", "--job", "[/a]",
        "--source", inbox, "--state", state, "--max-attempts", "1",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stderr  # the logged error too

    wide = {"COLUMNS": "300"}
    failures = cli("failures", "--state", state, "--job", "[/a]", env=wide)
    assert failures.returncode == 0, failures.stderr
    assert "[red]a.csv" in failures.stdout
    assert "\\x1b[2Jb.csv" in failures.stdout
    assert "c\\nd.csv" in failures.stdout
    assert "cannot open [/data/in] \\x1b[31mred" in failures.stdout
    assert "\x1b" not in failures.stdout
    assert "\r" not in failures.stdout

    listed = cli("items", "--state", state, "--job", "[/a]")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 + 3  # one line an item, whatever its name
    assert {line.rsplit(None, 1)[-1] for line in lines[2:]} == {
        "[red]a.csv",
        "\\x1b[2Jb.csv",
        "c\\nd.csv",
    }
    explained = cli("explain", inbox / "\x1b[2Jb.csv", "--state", state, "--job", "[/a]")
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("\\x1b[2Jb.csv (job '[/a]'): dead")

    status = cli("status", "--state", state, "--job", "[/a]", env=wide)
    assert status.returncode == 0, status.stderr
    assert "job '[/a]' in" in status.stdout


async def test_the_bars_last_frame_shows_the_final_counts() -> None:
    """The bar left on the screen says what the run ended with, not what its last poll saw
    (it read '60/60 ... 56 done, 4 in flight' once the run had done all 60)."""
    from typing import cast

    import anyio

    from asyncbatch import Batch
    from asyncbatch._cli.progress import show_progress
    from asyncbatch._report import Statistics

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Snapshots:
        def __init__(self) -> None:
            self.stats = Statistics(seen=60, done=56, scanned=True, in_flight=4, elapsed=3.0)

        def statistics(self) -> Statistics:
            return self.stats

    batch = Snapshots()
    out = Terminal()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: show_progress(cast(Batch, batch), stream=out))
        with anyio.fail_after(30):  # a frame of the run under way (a bound on a hang)
            while "56 done" not in out.getvalue():  # noqa: ASYNC110 (no event for a frame)
                await anyio.sleep(0.02)
        batch.stats = Statistics(seen=60, done=60, scanned=True, in_flight=0, elapsed=3.2)
        tg.cancel_scope.cancel()  # the run ended: the CLI cancels the progress task
    last = out.getvalue().split("\x1b[2K")[-1]  # rich clears the line before each frame
    assert "60/60" in last, out.getvalue()
    assert "60 done" in last, last
    assert "in flight" not in last, last
