"""The command line as users meet it: a subprocess, exit codes, one-line errors, nothing lost."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import asyncbatch
from asyncbatch._ledger.sqlite_sql import SCHEMA_VERSION

from .conftest import (
    HANDLERS,
    cli,
    invocations,
    kill,
    ledger_rows,
    make_files,
    rows,
    spawn,
    start_recording,
    state_counts,
    wait_for,
)
from .postgres import pg_sync

RECORD = f"{HANDLERS}:record"


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *needles: str, code: int = 2
) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_run_then_status_json(inbox: Path, state: Path, tmp_path: Path) -> None:
    make_files(inbox, 25)
    log = tmp_path / "calls.log"

    result = cli(
        "run", RECORD, "--source", inbox, "--state", state, "-j", "4", env={"AB_LOG": str(log)}
    )

    assert result.returncode == 0, result.stderr
    assert "25 done" in result.stdout
    status = cli("status", "--state", state, "--json")
    assert status.returncode == 0
    out = json.loads(status.stdout)
    assert out["job"] == "default"
    assert out["counts"] == {
        "pending": 0,
        "running": 0,
        "done": 25,
        "failed": 0,
        "dead": 0,
        "vanished": 0,
    }
    assert out["locks"] == []
    assert len(log.read_text().splitlines()) == 25


def test_status_human_readable(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    result = cli("status", "--state", state)
    assert result.returncode == 0
    assert "done" in result.stdout
    assert "last run:" in result.stdout
    assert "lock: none" in result.stdout


def test_failed_items_give_exit_1(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    result = cli(
        "run",
        f"{HANDLERS}:fail_always",
        "--source",
        inbox,
        "--state",
        state,
        "--max-attempts",
        "2",
        "--backoff",
        "0",
    )
    assert result.returncode == 1, result.stderr
    assert state_counts(state) == {"dead": 2}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-j", "0"], ["-j/--concurrency", "'0'"]),
        (["--settle", "-1"], ["--settle", "'-1'"]),
        (["--timeout", "-3"], ["--timeout", "'-3'"]),
        (["--timeout", "abc"], ["--timeout", "'abc'"]),
        (["--on-done", "archive"], ["on_done", "'archive'"]),
        (["--identity", "inode"], ["--identity", "'inode'"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    inbox: Path, state: Path, args: list[str], needles: list[str]
) -> None:
    result = cli("run", RECORD, "--source", inbox, "--state", state, *args)
    assert_one_line_error(result, *needles)
    assert not state.exists()


def test_bare_command_prints_the_usage_and_every_command(tmp_path: Path) -> None:
    result = cli(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: asyncbatch [-h] [--version] COMMAND ...")
    commands = (
        *("run", "status", "failures", "retry", "locks", "unlock", "history"),
        *("explain", "items", "forget", "demo", "help"),
    )
    listed = {line.split()[0] for line in result.stderr.splitlines() if line.startswith("    ")}
    assert listed == set(commands)
    assert "Traceback" not in result.stderr


def test_version_flag_prints_the_package_version_and_exits_0(tmp_path: Path) -> None:
    result = cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"asyncbatch {asyncbatch.__version__}\n",
        "",
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+", asyncbatch.__version__)
    script = Path(sys.executable).with_name("asyncbatch")  # the console script beside python
    installed = subprocess.run(
        [script, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (installed.returncode, installed.stdout) == (0, result.stdout)


def test_missing_and_non_directory_source(tmp_path: Path, state: Path) -> None:
    result = cli("run", RECORD, "--source", tmp_path / "nope", "--state", state)
    assert_one_line_error(result, "source", "nope", "no such directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = cli("run", RECORD, "--source", afile, "--state", state)
    assert_one_line_error(result, "source", "not a directory")


def test_a_source_url_of_another_scheme_is_named_as_given(tmp_path: Path, state: Path) -> None:
    # As a path it lost its "//" ('S3:/bucket/in': no such directory).
    for given in ("S3://bucket/in/", "gs://bucket/in/"):
        result = cli("run", RECORD, "--source", given, "--state", state, cwd=tmp_path)
        assert_one_line_error(result, "source", f"'{given}'", "s3:// in lower case")
    assert not state.exists()


def test_unimportable_target_and_missing_function(inbox: Path, state: Path, tmp_path: Path) -> None:
    assert_one_line_error(
        cli("run", "no_such_module_xyz:handle", "--source", inbox, "--state", state, cwd=tmp_path),
        "no_such_module_xyz",
    )
    assert_one_line_error(
        cli("run", f"{HANDLERS}:nope", "--source", inbox, "--state", state),
        "has no attribute 'nope'",
    )
    (tmp_path / "broken.py").write_text("def handle(:\n")
    assert_one_line_error(
        cli("run", "broken:handle", "--source", inbox, "--state", state, cwd=tmp_path),
        "SyntaxError",
    )
    assert_one_line_error(
        cli("run", f"{HANDLERS}:not_async", "--source", inbox, "--state", state),
        "async function",
    )


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("import sys; sys.exit(0)", "SystemExit (sys.exit(0) when imported)"),
        ("import sys; sys.exit(5)", "SystemExit (sys.exit(5) when imported)"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ],
)
def test_target_whose_import_exits_is_refused_not_obeyed(
    inbox: Path, state: Path, tmp_path: Path, body: str, what: str
) -> None:
    """A TARGET module that calls sys.exit() (or raises KeyboardInterrupt) when imported
    ended the CLI with its code (exit 0 having handled nothing, and said nothing)."""
    (tmp_path / "quits.py").write_text(body + "\n")
    for target in ("quits:handle", f"{tmp_path / 'quits.py'}:handle"):
        result = cli("run", target, "--source", inbox, "--state", state, cwd=tmp_path)
        assert_one_line_error(result, f"TARGET {target!r}: cannot import", what)
    assert not state.exists()


def test_handler_that_cannot_take_the_context_alone_is_refused(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    """A handler of two required arguments failed every file (TypeError), then made it dead;
    one whose signature cannot tell (``*args``) is taken, as a keyword-only extra is."""
    make_files(inbox, 2)
    (tmp_path / "sigs.py").write_text(
        "async def two(a, b):\n    pass\n"
        "async def none():\n    pass\n"
        "async def star(*args):\n    pass\n"
        "async def extra(ctx, *, flag=1):\n    pass\n"
        # A decorator (functools.wraps) that supplies the wrapped function's other argument:
        # the wrapper is what is called (it was refused, by the wrapped one's signature).
        "import functools\n"
        "def tagged(fn):\n"
        "    @functools.wraps(fn)\n"
        "    async def wrapper(ctx):\n"
        "        return await fn(ctx, 'tag')\n"
        "    return wrapper\n"
        "@tagged\n"
        "async def decorated(ctx, tag):\n    pass\n"
    )
    for name, why in (("two", "(a, b)"), ("none", "()")):
        result = cli("run", f"sigs:{name}", "--source", inbox, "--state", state, cwd=tmp_path)
        assert_one_line_error(result, f"handler' has value {name!r}", "task context", why)
        assert not state.exists()
    for name in ("star", "extra", "decorated"):
        result = cli("run", f"sigs:{name}", "--source", inbox, "--state", state, cwd=tmp_path)
        assert result.returncode == 0, result.stderr


def test_state_in_missing_directory(inbox: Path, tmp_path: Path) -> None:
    result = cli("run", RECORD, "--source", inbox, "--state", tmp_path / "nodir" / "s.db")
    assert_one_line_error(result, "nodir", "does not exist")
    # A file where the directory should be was "does not exist; create it first".
    (tmp_path / "afile").write_text("data\n")
    for args in (["run", RECORD, "--source", inbox], ["status"]):
        result = cli(*args, "--state", tmp_path / "afile" / "s.db")
        assert_one_line_error(result, f"{str(tmp_path / 'afile')!r} is not a directory")
    assert (tmp_path / "afile").read_text() == "data\n"


def test_state_that_is_not_a_ledger_is_left_untouched(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    state.write_bytes(b"important,csv\n1,2\n" * 100)
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    result = cli("run", RECORD, "--source", inbox, "--state", state)
    assert_one_line_error(result, "not a SQLite database")
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before
    assert_one_line_error(cli("status", "--state", state), "not a SQLite database")


def test_state_with_newer_schema_is_left_untouched(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    db = sqlite3.connect(state)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.commit()
    db.close()
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    result = cli("run", RECORD, "--source", inbox, "--state", state)
    assert_one_line_error(result, f"schema version {SCHEMA_VERSION + 5}", "upgrade asyncbatch")
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before


def test_read_only_commands_never_create_the_state(state: Path) -> None:
    for command in (["status"], ["failures"], ["locks"], ["history"]):
        assert_one_line_error(cli(*command, "--state", state), "does not exist")
    assert not state.exists()


def test_unknown_job(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    assert_one_line_error(
        cli("status", "--state", state, "--job", "nightly"), "unknown job 'nightly'", "'default'"
    )


@pytest.mark.skipif(
    shutil.which("setpriv") is None and os.geteuid() == 0,
    reason="needs setpriv to drop root's file access override",
)
def test_unreadable_file_fails_its_item_and_the_run_goes_on(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    secret = inbox / "f00001.txt"
    secret.chmod(0)
    prefix = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    result = cli(
        "run", RECORD, "--source", inbox, "--state", state, "--backoff", "0", prefix=prefix
    )
    assert result.returncode == 1, result.stderr
    assert state_counts(state) == {"done": 2, "dead": 1}
    (error,) = rows(state, "SELECT last_error FROM items WHERE state = 'dead'")
    assert "Permission denied" in error[0]


@pytest.mark.skipif(
    shutil.which("setpriv") is None and os.geteuid() == 0,
    reason="needs setpriv to drop root's file access override",
)
def test_a_directory_that_cannot_be_listed_fails_the_run(inbox: Path, state: Path) -> None:
    """Regression: a subdirectory the scan could not list was a warning alone: its files
    were never handled, and the run exited 0 ("every settled file done"), its history "ok".
    The report counts it, the run exits 1 and says why; ``--ignore`` it to mean it."""
    make_files(inbox, 1)
    locked = inbox / "sub"
    make_files(locked, 1)
    locked.chmod(0)
    prefix = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    args = ("run", RECORD, "--source", inbox, "--state", state, "--recursive")
    try:
        result = cli(*args, prefix=prefix)
        assert result.returncode == 1, result.stderr
        assert "cannot list directory 'sub': Permission denied" in result.stderr
        assert "1 seen: 1 done; 1 directory could not be listed" in result.stdout
        (status,) = rows(state, "SELECT exit_status FROM runs")
        assert status[0] == "failed (1 directory could not be listed)"
        assert cli(*args, "--ignore", "sub", prefix=prefix).returncode == 0
    finally:
        locked.chmod(0o755)
    assert cli(*args, prefix=prefix).returncode == 0
    assert state_counts(state) == {"done": 2}


@pytest.mark.skipif(
    shutil.which("setpriv") is None and os.geteuid() == 0,
    reason="needs setpriv to drop root's file access override",
)
def test_unreadable_file_with_identity_content_is_named_and_fails_the_run(
    inbox: Path, state: Path
) -> None:
    """Identity content keys a file by its bytes: one that cannot be read has no key. It is
    not "vanished" (it is there), and not skipped silently: a warning names it, the report
    counts it, the run exits 1 and its history says why; the next run tries it again."""
    make_files(inbox, 3)
    secret = inbox / "f00001.txt"
    secret.chmod(0)
    prefix = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    args = ("run", RECORD, "--source", inbox, "--state", state, "--identity", "content")
    result = cli(*args, prefix=prefix)
    assert result.returncode == 1, result.stderr
    assert "cannot read 'f00001.txt' to key it (identity content): Permission denied" in (
        result.stderr
    )
    assert "vanished" not in result.stdout
    assert "2 seen: 2 done; 1 file could not be read" in result.stdout
    assert state_counts(state) == {"done": 2}
    (status,) = rows(state, "SELECT exit_status FROM runs")
    assert status[0] == "failed (1 file could not be read)"
    again = cli(*args, prefix=prefix)  # not remembered as handled: tried (and said) again
    assert again.returncode == 1, again.stderr
    assert "cannot read 'f00001.txt'" in again.stderr
    secret.chmod(0o644)
    assert cli(*args, prefix=prefix).returncode == 0
    assert state_counts(state) == {"done": 3}


def test_a_fifo_in_the_inbox_never_hangs_the_cli(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    os.mkfifo(inbox / "named.pipe")
    os.utime(inbox / "named.pipe", (time.time() - 30,) * 2)
    result = cli("run", RECORD, "--source", inbox, "--state", state, timeout=60)
    assert result.returncode == 0, result.stderr
    assert state_counts(state) == {"done": 2}


def test_second_runner_gets_75_while_the_first_lives_and_runs_after_it_dies(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 40)
    log = tmp_path / "calls.log"
    first = start_recording(inbox, state, log, jobs=2, sleep=0.5)
    try:
        wait_for(lambda: sum(invocations(log).values()) >= 2)
        second = cli("run", RECORD, "--source", inbox, "--state", state)
        assert second.returncode == 75, second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        kill(first)
    started = time.monotonic()
    third = cli("run", RECORD, "--source", inbox, "--state", state, "-j", "8")
    assert third.returncode == 0, third.stderr
    assert time.monotonic() - started < 30  # the dead holder's lock is taken over at once
    assert state_counts(state) == {"done": 40}


def test_failures_retry_locks_unlock_and_history(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    result = cli(
        "run", f"{HANDLERS}:fail_always", "--source", inbox, "--state", state, "--max-attempts", "1"
    )
    assert result.returncode == 1
    failures = json.loads(cli("failures", "--state", state, "--json").stdout)
    assert {f["state"] for f in failures} == {"dead"}
    assert failures[0]["error"].startswith("ValueError: cannot parse f0000")
    assert len(failures[0]["input_hash"]) == 64

    assert cli("retry", "--state", state).stdout.strip() == (
        "0 failed items put back to pending; 3 dead items left as they are: add --dead to "
        "retry dead items too"
    )
    retried = cli("retry", "--state", state, "--dead", "f00001.txt")
    assert retried.returncode == 0
    assert "1 failed or dead item put back" in retried.stdout
    assert state_counts(state) == {"dead": 2, "pending": 1}
    assert_one_line_error(cli("retry", "--state", state, "no-such-key"), "unknown item")

    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 1
    assert state_counts(state) == {"dead": 2, "done": 1}

    assert cli("locks", "--state", state).stdout.strip() == "no job locks"
    assert_one_line_error(cli("unlock", "default", "--state", state), "has no lock")
    history = cli("history", "--state", state).stdout.strip().splitlines()
    assert len(history) == 2
    assert "exit failed" in history[0]


def test_archive_inside_the_source_and_unwritable_output_exit_2_before_anything(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2)
    (inbox / "done").mkdir()
    result = cli(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "--recursive",
        "--on-done",
        f"move:{inbox / 'done'}",
    )
    assert_one_line_error(result, "on_done", "inside the scanned source")
    assert not state.exists()
    assert sorted(p.name for p in inbox.iterdir()) == ["done", "f00000.txt", "f00001.txt"]

    locked = tmp_path / "readonly-out"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        if (os.geteuid() == 0)
        else []
    )
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's file access override")
    result = cli(
        "run", RECORD, "--source", inbox, "--state", state, "--output-dir", locked, prefix=prefix
    )
    assert_one_line_error(result, "output_dir", "not writable")
    assert not state.exists()


def test_write_output_without_output_dir_names_the_cli_flag(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    result = cli("run", f"{HANDLERS}:write_copy", "--source", inbox, "--state", state)
    assert_one_line_error(result, "--output-dir DIR", "Batch(output_dir=...)")


def test_a_reader_that_goes_away_is_not_a_traceback(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncbatch", "history", "--state", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # like `asyncbatch history | head -0`
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141
    assert b"Traceback" not in err


@pytest.mark.parametrize("closed", ["<&- >&- 2>&-", "2>&-"])
@pytest.mark.parametrize("handler", [[RECORD], ["--exec", "cat {}"]], ids=["python", "exec"])
def test_a_run_started_without_its_standard_descriptors_does_its_work(
    inbox: Path, state: Path, closed: str, handler: list[str]
) -> None:
    # (A cron line's `2>&-`: the run stopped at its first message, exit 1, nothing done.)
    make_files(inbox, 3)
    prefix = ["sh", "-c", f'exec "$@" {closed}', "sh"]
    result = cli("run", *handler, "--source", inbox, "--state", state, prefix=prefix)
    assert result.returncode == 0
    assert json.loads(cli("status", "--state", state, "--json").stdout)["counts"]["done"] == 3


def test_retry_by_a_name_that_is_not_utf8(inbox: Path, state: Path) -> None:
    raw = os.fsencode(inbox) + b"/r\xe9sum\xe9.csv"
    with open(raw, "wb") as f:
        f.write(b"bad")
    os.utime(raw, (time.time() - 30,) * 2)
    result = cli(
        "run", f"{HANDLERS}:fail_always", "--source", inbox, "--state", state, "--max-attempts", "1"
    )
    assert result.returncode == 1
    retried = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncbatch",
            "retry",
            "--state",
            os.fsencode(state),
            "--dead",
            b"r\xe9sum\xe9.csv",
        ],
        capture_output=True,
        timeout=60,
    )
    assert retried.returncode == 0, retried.stderr
    assert b"1 failed or dead item put back" in retried.stdout


# -- regressions of issue 14 ---------------------------------------------------------------------

NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


def test_a_handler_raising_system_exit_exits_70_promptly(inbox: Path, state: Path) -> None:
    make_files(inbox, 6)
    started = time.monotonic()
    result = cli(
        "run",
        f"{HANDLERS}:system_exit",
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "2",
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 70, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "SystemExit: 3" in line
    assert "raised by the handler for 'f00001.txt'" in line
    assert rows(state, "SELECT count(*) FROM items WHERE state = 'running'") == [(0,)]
    ((status,),) = rows(state, "SELECT exit_status FROM runs")
    assert status == "error: the handler raised SystemExit: 3 for 'f00001.txt'"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--settle", "1e308"), ("-j", "1000000"), ("--lease", "1e20"), ("--claim-batch", "99999")],
)
def test_number_options_beyond_their_bounds_exit_2(
    inbox: Path, state: Path, flag: str, value: str
) -> None:
    make_files(inbox, 1)
    result = cli("run", RECORD, "--source", inbox, "--state", state, flag, value)
    assert_one_line_error(result, value)
    assert not state.exists()


def test_logs_never_show_credentials_query_strings_or_the_ledger_secret(
    inbox: Path, state: Path
) -> None:
    from .servers import RealServer, respond

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await respond(send, 404, b"{}")

    make_files(inbox, 1)
    with RealServer(failing) as server:
        url = server.url.replace("http://", "http://user:PASSWD123@") + "/fail?token=SECRETQ"
        result = cli(
            "run",
            f"{HANDLERS}:post_to",
            "--source",
            inbox,
            "--state",
            state,
            "--max-attempts",
            "1",
            "--log-level",
            "DEBUG",
            env={"AB_URL": url},
        )
    assert result.returncode == 1, result.stderr
    ((secret,),) = rows(state, "SELECT value FROM meta WHERE name = 'secret'")
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert "404" in error
    assert "/fail" in error
    shown = [result.stderr, result.stdout, error, cli("failures", "--state", state).stdout]
    for text in shown:
        for leak in ("PASSWD123", "SECRETQ", secret):
            assert leak not in text


def test_a_state_deleted_under_a_running_runner_stops_it(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 120)
    log = tmp_path / "calls.log"
    proc = start_recording(inbox, state, log, jobs=2, sleep=0.05)
    try:
        wait_for(lambda: sum(invocations(log).values()) >= 4)
        state.unlink()
        _, err = proc.communicate(timeout=30)
    finally:
        kill(proc)
    assert proc.returncode == 69, err
    assert "was deleted while this runner was using it" in err
    assert "Traceback" not in err
    assert sum(invocations(log).values()) < 120


@needs_root
def test_a_state_on_a_read_only_mount_says_so_and_can_still_be_read(
    inbox: Path, tmp_path: Path
) -> None:
    make_files(inbox, 3)
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)
    try:
        state = mount / "state.db"
        assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        result = cli("run", RECORD, "--source", inbox, "--state", state)
        assert_one_line_error(result, "cannot be written", "read-only file system")
        status = cli("status", "--state", state, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["counts"]["done"] == 3
        assert sorted(p.name for p in mount.iterdir()) == ["state.db"]
    finally:
        subprocess.run(["umount", mount], check=False)


def test_a_deleted_wal_is_named_as_such_not_as_a_foreign_file(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 300)
    log = tmp_path / "calls.log"
    proc = start_recording(inbox, state, log, jobs=2, sleep=0.05)
    wal = state.with_name(state.name + "-wal")
    try:
        wait_for(lambda: wal.exists() and sum(invocations(log).values()) > 10)
        wal.unlink()  # while its runner lives
        result = cli("status", "--state", state)
    finally:
        kill(proc)
    assert_one_line_error(result, "disk I/O error", "-wal file was deleted", "-shm", code=69)
    assert "not a usable" not in result.stderr


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="needs setpriv to drop root's file access override",
)
def test_status_of_a_read_only_state_leaves_no_file_behind(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    state.chmod(0o444)
    prefix = NO_DAC if os.geteuid() == 0 else []
    status = cli("status", "--state", state, "--json", prefix=prefix)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["done"] == 3
    assert sorted(p.name for p in state.parent.iterdir() if p.name.startswith("state")) == [
        "state.db"
    ]
    refused = cli("run", RECORD, "--source", inbox, "--state", state, prefix=prefix)
    assert_one_line_error(refused, "cannot be written", "may not write it")
    state.chmod(0o644)
    again = cli("run", RECORD, "--source", inbox, "--state", state, prefix=prefix)
    assert again.returncode == 0, again.stderr


def test_an_interrupted_move_across_filesystems_leaves_no_partial_copy(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    target = shm / f"asyncbatch-test-{os.getpid()}-{time.monotonic_ns()}"
    target.mkdir()
    data = os.urandom(1 << 20) * 300  # 300 MiB: the copy takes a while

    def copying() -> bool:
        return any(p.name.startswith(".asyncbatch-tmp-") for p in target.iterdir())

    try:
        for _ in range(5):  # until a kill lands during the copy
            (inbox / "big.bin").write_bytes(data)
            os.utime(inbox / "big.bin", (time.time() - 30,) * 2)
            proc = spawn(
                "run",
                f"{HANDLERS}:move_to",
                "--source",
                inbox,
                "--state",
                state,
                "--no-progress",
                env={"AB_MOVE_TO": str(target)},
            )

            wait_for(lambda p=proc: copying() or p.poll() is not None, interval=0.002)
            kill(proc)
            if copying():
                break
            for p in target.iterdir():
                p.unlink()
            state.unlink()
        else:
            pytest.skip("no kill landed during the copy in 5 tries")
        result = cli(
            "run",
            f"{HANDLERS}:move_to",
            "--source",
            inbox,
            "--state",
            state,
            env={"AB_MOVE_TO": str(target)},
        )
        assert result.returncode == 0, result.stderr
        assert [p.name for p in target.iterdir()] == ["big.bin"]
        assert (target / "big.bin").read_bytes() == data
        assert list(inbox.iterdir()) == []
    finally:
        for p in target.iterdir():
            p.unlink()
        target.rmdir()


# -- state paths that cannot be used: one line, exit 2, nothing touched -------------------------

needs_no_dac = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="needs setpriv to drop root's file access override",
)


def every_command(inbox: Path, state: Path | str) -> list[list[str | os.PathLike[str]]]:
    """Each command that opens a state, with ``--state STATE``."""
    return [
        [*command, "--state", state]
        for command in (
            ["status"],
            ["failures"],
            ["history"],
            ["locks"],
            ["retry"],
            ["unlock", "default"],
            ["run", RECORD, "--source", inbox, "--no-progress"],
        )
    ]


def untouched(state: Path) -> tuple[str, list[str]]:
    """The state's bytes and the names of what lies beside it: must not change."""
    names = sorted(p.name for p in state.parent.iterdir() if p.name.startswith(state.name))
    return hashlib.sha256(state.read_bytes()).hexdigest(), names


@needs_no_dac
@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_state_this_user_may_not_read_is_one_line_naming_it(
    inbox: Path, tmp_path: Path, where: str
) -> None:
    make_files(inbox, 2)
    state = tmp_path / "locked" / "state.db"
    state.parent.mkdir()
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    before = untouched(state)
    if where == "file":  # mode 0600, owned by someone else
        if os.geteuid() == 0:
            os.chown(state, 65534, 65534)
        mode = 0o600 if os.geteuid() == 0 else 0
        state.chmod(mode)
        shown = stat.filemode(stat.S_IFREG | mode)
        needles = [f"state {str(state)!r} cannot be read", f"may not read it (mode {shown}"]
    else:  # a directory on the way that this user may not enter
        state.parent.chmod(0o600)
        needles = [f"state {str(state)!r} cannot be read", f"enter directory {str(state.parent)!r}"]
    try:
        for args in every_command(inbox, state):
            result = cli(*args, prefix=NO_DAC if os.geteuid() == 0 else [])
            assert_one_line_error(result, *needles)
    finally:
        state.parent.chmod(0o755)
        state.chmod(0o644)
    assert untouched(state) == before


@needs_no_dac
def test_commands_that_write_refuse_a_read_only_state_as_run_does(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    assert cli("run", f"{HANDLERS}:fail_always", "--source", inbox, "--state", state).returncode
    state.chmod(0o444)
    before = untouched(state)
    prefix = NO_DAC if os.geteuid() == 0 else []
    for args in (["retry", "--dead"], ["unlock", "default"], ["run", RECORD, "--source", inbox]):
        result = cli(*args, "--state", state, prefix=prefix)
        assert_one_line_error(
            result, f"state {str(state)!r} cannot be written", "this user may not write it"
        )
    assert untouched(state) == before
    assert cli("failures", "--state", state, prefix=prefix).returncode == 0
    assert state_counts(state) == {"dead": 2}


def test_an_empty_state_file_holds_no_ledger_yet(inbox: Path, tmp_path: Path) -> None:
    make_files(inbox, 2)
    missing, empty = tmp_path / "missing.db", tmp_path / "empty.db"
    empty.touch()
    # Like a state that does not exist (exit 2), not one to upgrade (it has no schema at all).
    for args, like_missing in zip(
        every_command(inbox, empty)[:-1], every_command(inbox, missing)[:-1], strict=True
    ):  # every command but run
        assert_one_line_error(cli(*args), f"state {str(empty)!r} is an empty file", "no ledger")
        assert_one_line_error(cli(*like_missing), f"state {str(missing)!r} does not exist")
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "inbox"]
    # A run may make its ledger in it: there was nothing to lose.
    assert cli("run", RECORD, "--source", inbox, "--state", empty).returncode == 0
    assert state_counts(empty) == {"done": 2}


def damage_items(state: Path, pages: int = 8) -> None:
    """Overwrite ``pages`` leaf pages in the middle of the items table with bytes that are no
    b-tree page (as a bad disk or a stray write would): a damaged SQLite file whose header and
    schema still read."""
    db = sqlite3.connect(f"{state.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        leaves = [
            n
            for (n,) in db.execute(
                "SELECT pageno FROM dbstat WHERE name = 'items' AND pagetype = 'leaf' "
                "ORDER BY pageno"
            )
        ]
    finally:
        db.close()
    assert len(leaves) > 4 * pages
    middle = len(leaves) // 2
    with state.open("r+b") as f:
        for page in leaves[middle : middle + pages]:
            f.seek((page - 1) * size)
            f.write(b"\xa5" * size)


def test_a_damaged_state_is_one_line_exit_2_and_never_written(inbox: Path, state: Path) -> None:
    make_files(inbox, 3000)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    assert sorted(p.name for p in state.parent.iterdir() if p.name.startswith(state.name)) == [
        state.name
    ]  # no -wal or -shm: everything is in the file
    damage_items(state)
    before = untouched(state)
    needles = [
        f"state {str(state)!r} is a damaged SQLite database",
        "it was not modified",
        "Retrying cannot help",
        "restore it from a backup",
        ".recover",
    ]
    commands: list[list[str | os.PathLike[str]]] = [
        ["status", "--state", state],
        ["run", RECORD, "--source", inbox, "--state", state, "--no-progress"],
        ["retry", "--dead", "--state", state],
    ]
    for args in commands:
        # A run used to record its failure ("error: ... malformed") in the damaged file, and
        # every command exited 69: as if trying again later could help.
        assert_one_line_error(cli(*args), *needles)
        assert untouched(state) == before, args


def wal_left_by(database: Path, *statements: str) -> bytes:
    """The ``-wal`` file of ``database`` (in WAL mode) after ``statements``, read before the
    close checkpoints it."""
    db = sqlite3.connect(database, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        for statement in statements:
            db.execute(statement)
        return Path(f"{database}-wal").read_bytes()
    finally:
        db.close()


def test_a_wal_that_is_not_the_states_own_is_refused_and_both_left_as_they_were(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # A -wal beside the state that another database left (or that stayed beside a copy
    # restored over the state): SQLite reads the state through it, every command refused
    # what it read ("another application", "damaged ... it was not modified"), and its
    # close checkpointed that -wal into the file and deleted it: the ledger was gone.
    make_files(inbox, 3)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    ledger = state.read_bytes()
    other = wal_left_by(
        tmp_path / "other.db", "CREATE TABLE customers (id)", "INSERT INTO customers VALUES (1)"
    )
    bigger = tmp_path / "bigger.db"
    make_files(tmp_path / "inbox-2", 60)
    assert cli("run", RECORD, "--source", tmp_path / "inbox-2", "--state", bigger).returncode == 0
    stale = wal_left_by(bigger, "UPDATE items SET attempts = attempts + 1", "DELETE FROM runs")
    wal = Path(f"{state}-wal")
    commands: list[list[str | os.PathLike[str]]] = [
        ["status", "--state", state],
        ["items", "--state", state],
        ["retry", "--dead", "--state", state],
        ["run", RECORD, "--source", inbox, "--state", state, "--no-progress"],
    ]
    for leftover, needle in [
        (other, f"its -wal file {str(wal)!r} is another application's database"),
        (stale, "is a damaged SQLite database"),
    ]:
        for args in commands:
            wal.write_bytes(leftover)
            assert_one_line_error(cli(*args), needle)
            assert state.read_bytes() == ledger, args
            assert wal.read_bytes() == leftover, args
    wal.unlink()
    Path(f"{state}-shm").unlink()
    status = cli("status", "--state", state, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["done"] == 3


@pytest.mark.parametrize(
    "tables",
    [
        # Another application's 'meta' (its own columns): every command failed with exit 69
        # ("unavailable, retry later") and a raw SQL error (column "value" does not exist).
        ["CREATE TABLE meta (k text, v text)", "INSERT INTO meta VALUES ('a', 'b')"],
        ["CREATE TABLE meta (key text, value text)", "INSERT INTO meta VALUES ('a', 'b')"],
        ["CREATE TABLE meta (name integer, value integer)", "INSERT INTO meta VALUES (1, 2)"],
        # The ledger's columns, another application's rows.
        ["CREATE TABLE meta (name text, value text)", "INSERT INTO meta VALUES ('a', 'b')"],
        # ... and rows under the ledger's names, more than one each (not a key of its).
        [
            "CREATE TABLE meta (name text, value text)",
            "INSERT INTO meta VALUES ('application', 'x'), ('application', 'y')",
        ],
        # Tables named like the ledger's, without a meta table.
        ["CREATE TABLE items (id integer)", "CREATE TABLE t (x integer)"],
    ],
)
def test_a_postgres_schema_of_another_application_is_refused_untouched_by_every_command(
    inbox: Path, pg_dsn: str, tables: list[str]
) -> None:
    schema = pg_dsn.rsplit("search_path=", 1)[1]
    pg_sync(pg_dsn, f'CREATE SCHEMA "{schema}"')
    for statement in tables:
        pg_sync(
            pg_dsn,
            statement.replace("TABLE ", f'TABLE "{schema}".', 1).replace(
                "INTO ", f'INTO "{schema}".', 1
            ),
        )
    make_files(inbox, 1)

    def contents() -> list[Any]:
        columns = pg_sync(
            pg_dsn,
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 ORDER BY 1, 2",
            schema,
        )
        return [
            columns,
            *(
                pg_sync(pg_dsn, f'SELECT * FROM "{schema}"."{name}" ORDER BY 1')
                for name in sorted({c[0] for c in columns})
            ),
        ]

    before = contents()
    commands: list[list[str | os.PathLike[str]]] = [
        ["status", "--state", pg_dsn],
        ["status", "--state", pg_dsn, "--json"],
        ["items", "--state", pg_dsn],
        ["retry", "--dead", "--state", pg_dsn],
        ["forget", "--yes", "somekey", "--state", pg_dsn],
        ["run", RECORD, "--source", inbox, "--state", pg_dsn, "--no-progress"],
    ]
    for args in commands:
        assert_one_line_error(
            cli(*args), f"schema {schema!r} holds tables of another application; it was not touched"
        )
        assert contents() == before, args


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_a_state_that_is_not_a_regular_file_is_refused_without_blocking(
    inbox: Path, tmp_path: Path, kind: str
) -> None:
    import socket

    make_files(inbox, 1)
    state = tmp_path / f"{kind}.db"
    listener = None
    if kind == "fifo":
        os.mkfifo(state)
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(state))
    else:
        state = Path("/dev/null")
    name = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device"}[kind]
    try:
        commands = every_command(inbox, state)
        for args in commands if kind == "fifo" else [commands[0], commands[-1]]:
            result = cli(*args, timeout=30)  # a FIFO opened for reading would block forever
            assert_one_line_error(result, f"state {str(state)!r} is {name}, not a regular file")
    finally:
        if listener is not None:
            listener.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "inbox") == (
        [] if kind == "device" else [state.name]
    )


def first_schema_ledger(path: Path) -> None:
    """Write an empty ledger as asyncbatch 0.1 did (schema version 1)."""
    from asyncbatch._ledger import sqlite_sql

    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(sqlite_sql.MIGRATIONS[0])
    db.execute(f"PRAGMA application_id = {sqlite_sql.APPLICATION_ID}")
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO meta VALUES ('secret', ?), ('created_at', '0')", ("ab" * 32,))
    db.execute("INSERT INTO jobs VALUES ('default', 'stat', 0)")
    db.commit()
    db.close()


def test_a_state_whose_tables_are_not_those_of_its_version_number_is_refused_exit_2(
    inbox: Path, any_state: str
) -> None:
    # Its version number set back by hand (3), its tables those of this version: the upgrade
    # failed on a column already there, and the run exited 69 ("duplicate column name:
    # settings"), which says: unavailable, try again later. Nothing will change that.
    make_files(inbox, 2)
    assert cli("run", RECORD, "--source", inbox, "--state", any_state).returncode == 0
    postgres = any_state.startswith("postgresql://")
    if postgres:
        ledger_rows(any_state, "UPDATE meta SET value = '3' WHERE name = 'schema_version'")
    else:
        with contextlib.closing(sqlite3.connect(any_state)) as db:
            db.execute("PRAGMA user_version = 3")
            db.commit()

    def looks() -> object:
        if not postgres:
            return untouched(Path(any_state))
        return ledger_rows(
            any_state,
            "SELECT (SELECT value FROM meta WHERE name = 'schema_version'),"
            " (SELECT count(*) FROM runs), (SELECT count(*) FROM information_schema.columns"
            "  WHERE table_schema = current_schema())",
        )

    before = looks()
    for _ in range(2):
        assert_one_line_error(
            cli("run", RECORD, "--source", inbox, "--state", any_state),
            any_state,
            "its schema does not match its version number (3)",
            "was not modified",
        )
    assert looks() == before


def test_an_older_schema_asks_for_a_run_and_exits_2(inbox: Path, state: Path) -> None:
    make_files(inbox, 2)
    first_schema_ledger(state)
    before = untouched(state)
    for args in every_command(inbox, state)[:-1]:
        assert_one_line_error(
            cli(*args),
            f"state {str(state)!r} has schema version 1, older than the {SCHEMA_VERSION}",
            "the next 'asyncbatch run' with this --state upgrades it",
        )
    assert untouched(state) == before
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    status = cli("status", "--state", state, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["done"] == 2


def test_the_network_filesystem_check_follows_symlinks(inbox: Path, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    from asyncbatch._fsinfo import filesystem_type

    if filesystem_type(shm) != "tmpfs" or filesystem_type(tmp_path) == "tmpfs":
        pytest.skip("needs /dev/shm on tmpfs and tmp_path elsewhere")
    make_files(inbox, 1)
    remote = shm / f"asyncbatch-test-{os.getpid()}-{time.monotonic_ns()}"
    remote.mkdir()
    # The CLI in a subprocess, with tmpfs counted as a network filesystem.
    as_if_tmpfs_were_nfs = (
        "import sys, asyncbatch._fsinfo as f\n"
        "f.NETWORK_FILESYSTEMS = f.NETWORK_FILESYSTEMS | {'tmpfs'}\n"
        "from asyncbatch._cli.main import main\n"
        "main(sys.argv[1:])\n"
    )

    def run(state: Path) -> subprocess.CompletedProcess[str]:
        args = ["run", RECORD, "--source", str(inbox), "--state", str(state), "--no-progress"]
        return subprocess.run(
            [sys.executable, "-c", as_if_tmpfs_were_nfs, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        (remote / "state.db").touch()
        (tmp_path / "link.db").symlink_to(remote / "state.db")
        (tmp_path / "dangling.db").symlink_to(remote / "new.db")
        (tmp_path / "remote").symlink_to(remote)
        for state in (tmp_path / "link.db", tmp_path / "dangling.db", tmp_path / "remote/x.db"):
            result = run(state)
            assert_one_line_error(result, f"state {str(state)!r} is on a tmpfs network filesystem")
        assert sorted(p.name for p in remote.iterdir()) == ["state.db"]
        assert (remote / "state.db").stat().st_size == 0
        assert run(tmp_path / "local.db").returncode == 0  # the check itself still passes ext4
    finally:
        shutil.rmtree(remote)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["run", RECORD, "--source", "", "--state", "s.db"], "--source"),
        (["run", RECORD, "--source", "inbox", "--state", ""], "--state"),
        (
            ["run", RECORD, "--source", "inbox", "--state", "s.db", "--output-dir", ""],
            "--output-dir",
        ),
        (["status", "--state", ""], "--state"),
        (["retry", "--state", ""], "--state"),
        (["demo", "--dir", "", "--files", "3"], "--dir"),
    ],
)
def test_an_empty_path_option_is_refused_not_taken_for_the_current_directory(
    tmp_path: Path, args: list[str], option: str
) -> None:
    work = tmp_path / "work"  # the current directory: settled files a scan of '.' would take
    make_files(work, 3)
    make_files(work / "inbox", 1)
    before = sorted(p.name for p in work.iterdir())
    result = cli(*args, cwd=work)
    assert_one_line_error(result, f"argument {option}: invalid value ''", "not an empty string")
    assert sorted(p.name for p in work.iterdir()) == before


# -- a job and its source --------------------------------------------------------------------------


def everything(state: str) -> list[list[tuple[Any, ...]]]:
    """Every row a run may write: jobs, items, runs, runners, locks."""
    return [
        ledger_rows(state, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("jobs", "items", "runs", "runners", "task_lock")
    ]


def test_the_same_job_pointed_at_another_source_is_refused_and_handles_nothing(
    any_state: str, inbox: Path, tmp_path: Path
) -> None:
    # The same names in another directory (copied with cp -p: same sizes and mtimes) were
    # reported "done before" and left unhandled: under --identity path, and under the default
    # identity too. A job keeps its source: another is refused (exit 2), naming both.
    make_files(inbox, 3)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in inbox.iterdir():
        shutil.copy2(path, copy / path.name)
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log)}
    for job, identity in (("default", "path"), ("by-stat", "stat")):
        options = ("--state", any_state, "--job", job, "--identity", identity, "--no-progress")
        first = cli("run", RECORD, "--source", inbox, *options, env=env)
        assert first.returncode == 0, first.stderr
        assert "3 done" in first.stdout
        before = everything(any_state)
        refused = cli("run", RECORD, "--source", copy, *options, env=env)
        assert_one_line_error(
            refused,
            f"job {job!r}",
            f"scans {os.path.realpath(inbox)!r}, not {os.path.realpath(copy)!r}",
            "--job NAME",
        )
        assert refused.stdout == ""
        assert everything(any_state) == before, "the refused run changed the ledger"
    assert sum(invocations(log).values()) == 6, "the refused runs handled nothing"
    # The way out: another job, whose files are its own.
    other = cli("run", RECORD, "--source", copy, "--state", any_state, "--job", "copy", env=env)
    assert other.returncode == 0, other.stderr
    assert "3 done" in other.stdout
    assert sum(invocations(log).values()) == 9


def test_a_source_is_one_however_it_is_spelled(inbox: Path, state: Path, tmp_path: Path) -> None:
    make_files(inbox, 2)
    (tmp_path / "link").symlink_to(inbox)
    for spelling in ("inbox", "./inbox/", str(inbox), "link", "../" + tmp_path.name + "/inbox"):
        result = cli("run", RECORD, "--source", spelling, "--state", state, cwd=tmp_path)
        assert result.returncode == 0, (spelling, result.stderr)
    status = json.loads(cli("status", "--state", state, "--json").stdout)
    assert status["settings"]["source"] == os.path.realpath(inbox)
    assert len(rows(state, "SELECT id FROM runs")) == 5


def test_changed_scan_rules_are_warned_recorded_in_the_history_and_shown_by_status(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    make_files(inbox, 1, prefix="x")
    make_files(inbox / "sub", 1)
    (inbox / "x00000.txt").rename(inbox / "x.skip")
    first = cli("run", RECORD, "--source", inbox, "--state", state, "--ignore", "*.skip")
    assert first.returncode == 0, first.stderr
    assert "2 done" in first.stdout
    assert first.stderr == ""
    # Changing a rule on purpose works: the run says so once, and the history keeps it.
    second = cli("run", RECORD, "--source", inbox, "--state", state, "--recursive")
    assert second.returncode == 0, second.stderr
    assert "2 done, 2 done before" in second.stdout
    (warning,) = second.stderr.strip().splitlines()
    changed = "recursive: off -> on; ignore: '*.skip' -> none"
    assert (
        f"WARNING asyncbatch: job 'default': its scan rules changed since its last run ({changed})"
        in warning
    )
    third = cli("run", RECORD, "--source", inbox, "--state", state, "--recursive")
    assert third.returncode == 0, third.stderr
    assert third.stderr == ""
    history = cli("history", "--state", state).stdout.strip().splitlines()
    assert [line.endswith(f"; changed the scan rules: {changed}") for line in history] == [
        False,
        True,
        False,
    ]
    runs = json.loads(cli("history", "--state", state, "--json").stdout)
    assert [r["settings_changed"] for r in runs] == [None, changed, None]
    status = json.loads(cli("status", "--state", state, "--json").stdout)
    assert status["settings"] == {
        "source": os.path.realpath(inbox),
        "recursive": True,
        "follow_symlinks": False,
        "ignore": [],
        "ready": ["age"],
        "settle": 0.0,
    }
    assert status["identity"] == "stat"
    text = cli("status", "--state", state, env={"COLUMNS": "200"}).stdout
    assert (
        f"source: {os.path.realpath(inbox)} (recursive: on, follow symlinks: off, ignore: none, "
        "ready: age, settle: 0s; identity: stat)"
    ) in text


def test_the_cli_leaves_without_finalizing_once_obstore_was_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # obstore's runtime threads can still be handing a reply to the event loop when the
    # program is done: one that takes the GIL back from a finalizing interpreter aborts the
    # process (SIGABRT after a complete `explain` of an object, 13 in 60 on a loaded machine).
    # The module (the package's `main` is the function).
    cli_main = importlib.import_module("asyncbatch._cli.main")

    class Left(Exception):
        pass

    done: list[str] = []

    def exit_now(code: int) -> None:
        done.append(f"_exit {code}")
        raise Left

    monkeypatch.setattr(cli_main.os, "_exit", exit_now)
    monkeypatch.setattr(cli_main.logging, "shutdown", lambda: done.append("logs flushed"))
    monkeypatch.setitem(sys.modules, "obstore", type(sys)("obstore"))
    with pytest.raises(Left):
        cli_main.leave(3)
    assert done == ["logs flushed", "_exit 3"]
    monkeypatch.delitem(sys.modules, "obstore")
    with pytest.raises(SystemExit) as left:
        cli_main.leave(4)  # no object-store request made: the interpreter ends as usual
    assert left.value.code == 4
    assert done == ["logs flushed", "_exit 3"]


# -- a state that is not understood is refused untouched (exit 2), never made or "repaired" ----


@pytest.mark.parametrize(
    ("pragmas", "needle"),
    [
        # Another application's schema version, no tables (yet): not blank.
        ("PRAGMA user_version = 3", "no tables whose user_version is 3"),
        ("PRAGMA user_version = 10", "no tables whose user_version is 10"),
        # Declared as another application's file.
        ("PRAGMA application_id = 1234", "of another application (application_id 1234"),
        # asyncbatch's, its version recorded, its tables gone.
        (
            "PRAGMA application_id = 1094861640; PRAGMA user_version = 11",
            "its tables are not those of the schema version it records (11): it holds no tables",
        ),
    ],
)
def test_a_database_with_no_tables_that_is_not_blank_is_refused_untouched(
    inbox: Path, tmp_path: Path, pragmas: str, needle: str
) -> None:
    # A run used to take it: switch it to WAL and fail on a missing table (exit 69), or
    # rewrite another application's application_id and make its tables in it (exit 0).
    make_files(inbox, 1)
    state = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(f"{pragmas}; CREATE TABLE t (x); DROP TABLE t;")
    before = untouched(state)
    for args in every_command(inbox, state):
        assert_one_line_error(cli(*args), f"state {str(state)!r}", needle)
        assert untouched(state) == before, args
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_a_blank_database_is_still_made_a_ledger(inbox: Path, tmp_path: Path) -> None:
    make_files(inbox, 1)
    state = tmp_path / "blank.db"
    with contextlib.closing(sqlite3.connect(state)) as db:  # a header, nothing declared in it
        db.executescript("CREATE TABLE t (x); DROP TABLE t;")
    assert state.stat().st_size > 0
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    assert state_counts(state) == {"done": 1}


def rename_column(state: str, table: str, column: str) -> None:
    statement = f"ALTER TABLE {table} RENAME COLUMN {column} TO {column}_renamed"
    if state.startswith("postgresql://"):
        pg_sync(state, statement.replace("TABLE ", f'TABLE "{schema_of(state)}".', 1))
    else:
        with contextlib.closing(sqlite3.connect(state)) as db:
            db.execute(statement)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.commit()


def schema_of(dsn: str) -> str:
    return dsn.rsplit("search_path=", 1)[1]


def ledger_look(state: str) -> object:
    """What must not change: a SQLite state's bytes, a PostgreSQL schema's columns and rows."""
    if not state.startswith("postgresql://"):
        return untouched(Path(state))
    schema = schema_of(state)
    columns = pg_sync(
        state,
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = $1 ORDER BY 1, 2",
        schema,
    )
    tables = sorted({c[0] for c in columns})
    return columns, [pg_sync(state, f'SELECT * FROM "{schema}"."{t}" ORDER BY 1') for t in tables]


def test_a_state_whose_columns_are_not_those_of_its_version_is_refused_exit_2(
    inbox: Path, any_state: str
) -> None:
    # items.relpath renamed: a run exited 69 ("table items has no column named relpath",
    # retrying cannot help) after writing its history row; items and failures too.
    make_files(inbox, 2)
    assert cli("run", RECORD, "--source", inbox, "--state", any_state).returncode == 0
    rename_column(any_state, "items", "relpath")
    before = ledger_look(any_state)
    commands: list[list[str | os.PathLike[str]]] = [
        *every_command(inbox, any_state),
        ["items", "--state", any_state],
        ["forget", "--yes", "a", "--state", any_state],
    ]
    for args in commands:
        assert_one_line_error(
            cli(*args),
            "its tables are not those of the schema version it records",
            "table items has no column relpath",
            "relpath_renamed",
            "was not modified",
        )
        assert ledger_look(any_state) == before, args


def test_an_upgrade_that_would_leave_tables_not_those_of_this_version_is_refused(
    inbox: Path, state: Path
) -> None:
    # A version-1 ledger whose jobs.created_at was renamed: every migration statement
    # applies, and the result would not be this version's tables. Rolled back, exit 2.
    make_files(inbox, 1)
    first_schema_ledger(state)
    rename_column(str(state), "jobs", "created_at")
    before = untouched(state)
    assert_one_line_error(
        cli("run", RECORD, "--source", inbox, "--state", state),
        "its schema does not match its version number (1)",
        "table jobs has no column created_at",
    )
    assert untouched(state) == before


@pytest.mark.parametrize("version", [-1, 0])
def test_a_schema_version_asyncbatch_never_wrote_is_refused_exit_2(
    inbox: Path, any_state: str, version: int
) -> None:
    # -1 made a run die with a traceback (KeyError), and status said a run would upgrade it.
    make_files(inbox, 1)
    assert cli("run", RECORD, "--source", inbox, "--state", any_state).returncode == 0
    if any_state.startswith("postgresql://"):
        pg_sync(
            any_state,
            f"UPDATE \"{schema_of(any_state)}\".meta SET value = '{version}' "
            "WHERE name = 'schema_version'",
        )
    else:
        with contextlib.closing(sqlite3.connect(any_state)) as db:
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.commit()
    before = ledger_look(any_state)
    for args in every_command(inbox, any_state):
        assert_one_line_error(
            cli(*args), f"has schema version {version}, which is not one asyncbatch knows"
        )
        assert ledger_look(any_state) == before, args


@pytest.mark.parametrize("target", ["missing", "file", "read-only"])
def test_a_state_symlinked_to_a_path_that_cannot_be_made_is_one_line(
    inbox: Path, tmp_path: Path, target: str
) -> None:
    # The error message itself used to fail (stat of the missing target): a traceback.
    make_files(inbox, 1)
    (tmp_path / "afile").touch()
    (tmp_path / "ro").mkdir(mode=0o555)
    where = {"missing": "nowhere/x.db", "file": "afile/x.db", "read-only": "ro/x.db"}[target]
    state = tmp_path / "link.db"
    state.symlink_to(where)
    needle = {
        "missing": f"directory {str(tmp_path / 'nowhere')!r} does not exist",
        "file": f"{str(tmp_path / 'afile')!r} is not a directory",
        "read-only": "cannot be created: this user may not write it",
    }[target]
    if target == "read-only" and os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's file access override")
    prefix = NO_DAC if os.geteuid() == 0 else []
    result = cli("run", RECORD, "--source", inbox, "--state", state, prefix=prefix)
    assert_one_line_error(result, f"state {str(state)!r} (a symlink to {where!r})", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "inbox", "link.db", "ro"]
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.fixture
def pg_role(pg_dsn: str) -> Iterator[str]:
    """A login role with no privileges (dropped after, with whatever was granted to it)."""
    role = f"abtest_role_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    pg_sync(pg_dsn, f"CREATE ROLE {role} LOGIN")
    yield role
    pg_sync(pg_dsn, f"DROP OWNED BY {role}")
    pg_sync(pg_dsn, f"DROP ROLE {role}")


def as_role(dsn: str, role: str, schema: str | None = None) -> str:
    parts = urllib.parse.urlsplit(dsn)
    netloc = f"{role}@{parts.hostname}:{parts.port}"
    query = parts.query if schema is None else f"search_path={schema}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def test_a_postgres_role_without_the_privileges_a_command_needs_exits_2(
    inbox: Path, pg_dsn: str, pg_role: str
) -> None:
    # These exited 69 ("the ledger is unavailable"): retrying cannot help, someone must grant
    # the privilege. Without USAGE on the schema, its tables read as missing: untrue.
    make_files(inbox, 1)
    assert cli("run", RECORD, "--source", inbox, "--state", pg_dsn).returncode == 0
    schema = schema_of(pg_dsn)
    role_dsn = as_role(pg_dsn, pg_role)
    before = ledger_look(pg_dsn)
    assert_one_line_error(
        cli("status", "--state", role_dsn),
        f"schema {schema!r} cannot be used by this role (no USAGE privilege on it)",
    )
    pg_sync(pg_dsn, f'GRANT USAGE ON SCHEMA "{schema}" TO {pg_role}')
    assert_one_line_error(
        cli("status", "--state", role_dsn), "permission denied for table", "lacks a privilege"
    )
    pg_sync(pg_dsn, f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {pg_role}')
    assert cli("status", "--state", role_dsn).returncode == 0  # reading is all it may do
    for args in (
        ["run", RECORD, "--source", inbox, "--no-progress"],
        ["retry", "--dead"],
        ["forget", "--yes", "f00000.txt"],
    ):
        assert_one_line_error(
            cli(*args, "--state", role_dsn), "permission denied for table", "lacks a privilege"
        )
    assert ledger_look(pg_dsn) == before
    # A new schema in a database where this role may create none.
    new = f"{schema}_new"
    try:
        assert_one_line_error(
            cli("run", RECORD, "--source", inbox, "--state", as_role(pg_dsn, pg_role, new)),
            "permission denied for database",
            "lacks a privilege",
        )
        assert pg_sync(pg_dsn, "SELECT 1 FROM pg_namespace WHERE nspname = $1", new) == []
    finally:
        pg_sync(pg_dsn, f'DROP SCHEMA IF EXISTS "{new}" CASCADE')
