"""``asyncbatch run --exec`` and ``ExecHandler``: real commands in real process groups."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import anyio
import pytest

from asyncbatch import Batch, ConfigurationError, ExecHandler, Report, TaskContext
from asyncbatch._pipeline import workers

from .conftest import (
    cli,
    kill,
    ledger_rows,
    make_files,
    rows,
    spawn,
    state_counts,
    take_over_lease,
    until,
    until_settled,
    wait_for,
)
from .test_cli import assert_one_line_error

COMMANDS = Path(__file__).parent / "exec_commands.py"
#: Runs started in the background, with the directory where their commands note their pids.
Leftovers = list[tuple[subprocess.Popen[str], Path]]


def command(mode: str, *args: str) -> str:
    """The command line running ``tests/exec_commands.py MODE ARGS`` (see its docstring)."""
    return shlex.join([sys.executable, str(COMMANDS), mode, *args])


def records(path: Path) -> list[dict[str, Any]]:
    """What the commands recorded: argv and ASYNCBATCH_* values as bytes, and their pid."""
    if not path.exists():
        return []
    found = []
    # Complete lines only: a command may be writing its line while the test reads (a reader
    # can see part of a write to a regular file: "Unterminated string" once under load).
    for line in path.read_text().split("\n")[:-1]:
        raw = json.loads(line)
        found.append(
            {
                "argv": [bytes.fromhex(a) for a in raw["argv"]],
                "env": {k: bytes.fromhex(v) for k, v in raw["env"].items()},
                "pid": raw["pid"],
            }
        )
    return found


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: only its exit status is left)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def live_members(pgid: int) -> list[int]:
    """The live processes of the process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        fields = _stat_fields(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def noted_pids(pids: Path) -> list[int]:
    """Every pid the commands noted in ``pids`` (commands and their grandchildren)."""
    return [int(p) for f in pids.glob("pid.*") for p in f.read_text().split()]


@pytest.fixture
def no_leftovers() -> Iterator[Leftovers]:
    """Runs started in the background, with where their commands note their pids: whatever a
    failed test left running (the run, its commands' process groups) is killed at the end."""
    started: Leftovers = []
    yield started
    for proc, pids in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in noted_pids(pids):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def pids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the commands of this test note their pids (``$AB_PIDS``, set for the handlers
    this test makes)."""
    found = tmp_path / "pids"
    found.mkdir()
    monkeypatch.setenv("AB_PIDS", str(found))
    return found


def run_exec(inbox: Path, state: Path, exec_line: str, *extra: str | Path, **kw: Any) -> Any:
    return cli(
        "run",
        "--exec",
        exec_line,
        "--source",
        inbox,
        "--state",
        state,
        "--no-progress",
        *extra,
        **kw,
    )


# -- placeholders and arguments --------------------------------------------------------------------


def test_each_placeholder_is_replaced_inside_its_word(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    names = ["report.csv", "archive.tar.gz", "noext"]
    for name in names:
        (inbox / name).write_bytes(b"x")
    log = tmp_path / "calls.jsonl"
    line = command("record", "{}", "{/}", "{//}", "{.}", "{/.}", "out/{/.}.png", "x{/}y")

    result = run_exec(inbox, state, line, env={"AB_RECORD": str(log)})

    assert result.returncode == 0, result.stderr
    source = inbox.absolute()
    got = {r["argv"][1]: r["argv"] for r in records(log)}
    expected = {
        "report.csv": ["report.csv", "report", "report"],
        "archive.tar.gz": ["archive.tar.gz", "archive.tar", "archive.tar"],
        "noext": ["noext", "noext", "noext"],
    }
    assert set(got) == {n.encode() for n in names}
    for name, (base, stem, _) in expected.items():
        path = f"{source}/{name}"
        assert got[name.encode()] == [
            os.fsencode(a)
            for a in [
                path,
                base,
                str(source),
                f"{source}/{stem}",
                stem,
                f"out/{stem}.png",
                f"x{base}y",
            ]
        ]


def test_without_a_placeholder_the_path_is_the_last_argument(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2)
    log = tmp_path / "calls.jsonl"

    result = run_exec(inbox, state, command("record", "--flag"), env={"AB_RECORD": str(log)})

    assert result.returncode == 0, result.stderr
    assert sorted(r["argv"] for r in records(log)) == [
        [b"--flag", os.fsencode(inbox.absolute() / f"f0000{i}.txt")] for i in range(2)
    ]


HOSTILE = [
    b"sp ace.txt",
    b'quote\'d"twice".txt',
    b"$HOME$(id)`id`.txt",
    b"-rf",
    b"--help",
    b"semi;colon&amp|pipe.txt",
    b"star*?[x].txt",
    b"back\\slash.txt",
    b"tab\tand\nnewline.txt",
    b"caf\xe9-latin1.txt",  # not UTF-8
    b"{}.txt",  # a placeholder in the name is not substituted again
]


def test_hostile_names_are_one_argument_each_unchanged(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    for name in HOSTILE:
        fd = os.open(os.fsencode(inbox) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
    log = tmp_path / "calls.jsonl"
    line = command("record", "{}", "{/}", "{/.}", "--", "{.}")

    result = run_exec(inbox, state, line, env={"AB_RECORD": str(log)})

    assert result.returncode == 0, result.stderr
    assert state_counts(state) == {"done": len(HOSTILE)}
    source = os.fsencode(inbox.absolute())
    seen = {}
    for r in records(log):
        path, base, stem, dashes, without = r["argv"]
        seen[base] = r
        assert path == source + b"/" + base
        assert stem == os.path.splitext(base)[0]  # no name here starts with a dot
        assert dashes == b"--"
        assert without == source + b"/" + stem
        assert r["env"]["ASYNCBATCH_RELPATH"] == base
        assert r["env"]["ASYNCBATCH_INPUT"] == path
    assert set(seen) == set(HOSTILE)


def test_the_program_may_be_the_input_itself(inbox: Path, state: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = inbox / "job.sh"
    script.write_text(f'#!/bin/sh\necho "$0" > {shlex.quote(str(marker))}\n')
    script.chmod(0o755)

    result = run_exec(inbox, state, "{}")

    assert result.returncode == 0, result.stderr
    assert marker.read_text().strip() == str(script.absolute())


@pytest.mark.parametrize("named", ["program", "placeholder"])
def test_a_script_without_a_shebang_is_run_by_sh_as_xargs_runs_it(
    inbox: Path, state: Path, tmp_path: Path, named: str
) -> None:
    # execvp's rule (xargs, find -exec, a shell): an executable file the kernel cannot run
    # (ENOEXEC: no "#!" line) is a script for /bin/sh.
    log = tmp_path / "ran"
    body = f'printf "%s %s\\n" "$0" "$1" >> {shlex.quote(str(log))}\n'
    script = tmp_path / "no shebang.sh"
    script.write_text(body)
    script.chmod(0o755)
    if named == "program":
        make_files(inbox, 2)
        line = f"{shlex.quote(str(script))} {{}}"
    else:  # each input is the program
        (inbox / "job.sh").write_text(body)
        (inbox / "job.sh").chmod(0o755)
        line = "{} arg"

    result = run_exec(inbox, state, line, "--max-attempts", "1")

    assert result.returncode == 0, result.stderr
    ran = sorted(log.read_text().splitlines())
    if named == "program":
        assert state_counts(state) == {"done": 2}
        assert ran == [f"{script} {inbox.absolute()}/f0000{i}.txt" for i in range(2)]
    else:
        assert ran == [f"{inbox.absolute()}/job.sh arg"]


def test_a_program_that_cannot_be_run_fails_its_attempt_with_its_reason(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # A broken binary is run by sh too (as by execvp), whose error is the attempt's.
    make_files(inbox, 1)
    binary = tmp_path / "garbage"
    binary.write_bytes(b"\x7fELF\x00\x00garbage")
    binary.chmod(0o755)

    result = run_exec(inbox, state, f"{binary} {{}}", "--max-attempts", "1")

    assert result.returncode == 1, result.stderr
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error.startswith(f"CommandFailedError: {str(binary)!r} exited with status "), error


# -- exit status, failures, output -----------------------------------------------------------------


def test_exit_0_is_done_other_statuses_fail_then_die_with_the_stderr_tail(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 1, prefix="ok")
    make_files(inbox, 1, prefix="bad")
    make_files(inbox, 1, prefix="loud")
    # A command per name: exit 0, exit 3 after two stderr lines, or 10 KB of stderr then exit 4.
    line = shlex.join(
        [
            "sh",
            "-c",
            'case "$1" in *ok*) exit 0;; *bad*) printf "first\\nsecond\\n" >&2; exit 3;; esac; '
            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(COMMANDS))} fail 4 10000",
            "sh",
            "{}",
        ]
    )

    result = run_exec(inbox, state, line, "--max-attempts", "2", "--backoff", "0")

    assert result.returncode == 1, result.stderr
    assert state_counts(state) == {"done": 1, "dead": 2}
    failures = cli("failures", "--state", state, "--json")
    errors = {f["relpath"]: (f["attempts"], f["error"]) for f in json.loads(failures.stdout)}
    assert errors["bad00000.txt"] == (
        2,
        "CommandFailedError: 'sh' exited with status 3: first | second",
    )
    attempts, loud = errors["loud00000.txt"]
    assert attempts == 2
    assert loud.startswith("CommandFailedError: 'sh' exited with status 4: ...line 0060 ")
    assert "line 0099" in loud, "the last 4 KiB"
    assert "line 0000" not in loud, "not the first"
    assert len(loud) < 4096 + 400
    human = cli("failures", "--state", state, env={"COLUMNS": "200"})
    assert "exited with status 3: first | second" in human.stdout
    # The 4 KiB tail is one line: the table shows its start (it took ~100 lines of the table).
    assert "line 0099" not in human.stdout
    assert "(whole in --json)" in human.stdout
    assert len(human.stdout.splitlines()) < 30, human.stdout


def test_a_command_killed_by_a_signal_fails_its_attempt(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)

    result = run_exec(inbox, state, "sh -c 'kill -SEGV $$' sh", "--max-attempts", "1")

    assert result.returncode == 1, result.stderr
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error == "CommandFailedError: 'sh' was killed by SIGSEGV"


def test_stdout_and_stderr_are_logged_at_debug_only(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)

    quiet = run_exec(inbox, state, command("echo"))
    (inbox / "second.txt").write_text("x")
    loud = run_exec(inbox, state, command("echo"), "--log-level", "DEBUG")

    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "out:" not in quiet.stdout + quiet.stderr
    assert "err:" not in quiet.stderr
    assert "stdout: out:second.txt; stderr: err:second.txt" in loud.stderr
    assert "out:second.txt" not in loud.stdout, "stdout carries the report only"


async def test_a_command_that_writes_more_than_a_pipe_holds_is_never_blocked(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 1)
    # 1 MB of stderr: far more than a pipe holds (64 KiB), read as it comes, the tail kept.
    handler = ExecHandler(command("fail", "5", "1000000"))
    batch = Batch(handler, source=inbox, state=state, settle=0, timeout=60, max_attempts=1)

    report = await batch.run()

    assert report.dead == 1
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error.startswith("CommandFailedError:"), error
    assert "exited with status 5: ...line " in error, "not the timeout's cancellation"
    assert "line 9999" in error, "the last lines are kept"
    assert len(error) < 4096 + 400


async def test_the_attempt_ends_when_the_command_exits_though_its_child_holds_stderr(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    noted = tmp_path / "background.pid"
    # The leader exits at once; the sleep it leaves behind keeps the stderr pipe open.
    script = f"sleep 1000 & echo $! > {shlex.quote(str(noted))}; echo bye >&2; exit 0"
    handler = ExecHandler(["sh", "-c", script, "sh", "{}"])
    batch = Batch(handler, source=inbox, state=state, settle=0, timeout=60, max_attempts=1)
    try:
        report = await batch.run()

        assert report.done == 1, "done when the leader exited, not when the pipe ended"
        assert alive(int(noted.read_text()))
    finally:
        if noted.exists():
            with contextlib.suppress(OSError):
                os.kill(int(noted.read_text()), signal.SIGKILL)


def _descriptors() -> list[str]:
    """What this process has open: the targets of /proc/self/fd (pipes, pidfds, epoll sets)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_one_handler_serves_run_after_run_and_keeps_no_item_descriptor(
    inbox: Path, state: Path
) -> None:
    import asyncio
    import gc

    def count(kind: str) -> int:
        return sum(kind in target for target in _descriptors())

    gc.collect()  # the handlers of earlier tests, and their sets
    handler = ExecHandler("true", output_tail=100)
    pipes, epolls = count("pipe:"), count("eventpoll")
    for run in range(3):  # each in an event loop of its own
        make_files(inbox, 4, prefix=f"r{run}-")
        batch = Batch(handler, source=inbox, state=state, settle=0, concurrency=3)
        report = asyncio.run(batch.run())
        assert report.done == 4
        assert count("pidfd") == 0, "every pidfd closed"
        assert count("pipe:") <= pipes, "every output pipe closed"
        # The handler's one epoll set is all it keeps between runs (empty).
        assert count("eventpoll") == epolls + 1
    del handler, batch
    gc.collect()
    assert count("eventpoll") == epolls, "the set goes with the handler"


# -- the environment -------------------------------------------------------------------------------


def test_each_command_gets_the_items_variables_stable_across_its_attempts(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2)
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "calls.jsonl"

    result = run_exec(
        inbox,
        state,
        command("fail-first"),
        "--backoff",
        "0",
        "--output-dir",
        out,
        "--job",
        "nightly",
        env={"AB_RECORD": str(log), "ASYNCBATCH_OUTPUT_DIR": "/inherited"},
    )

    assert result.returncode == 0, result.stderr
    keys = {os.fsdecode(r[1]): r[0] for r in rows(state, "SELECT key, relpath FROM items")}
    by_item: dict[bytes, list[dict[str, bytes]]] = {}
    for r in records(log):
        by_item.setdefault(r["env"]["ASYNCBATCH_RELPATH"], []).append(r["env"])
    assert sorted(by_item) == [b"f00000.txt", b"f00001.txt"]
    idempotency = set()
    for relpath, envs in by_item.items():
        first, second = sorted(envs, key=lambda e: int(e["ASYNCBATCH_ATTEMPT"]))
        assert (first["ASYNCBATCH_ATTEMPT"], second["ASYNCBATCH_ATTEMPT"]) == (b"1", b"2")
        assert int(second["ASYNCBATCH_FENCE"]) > int(first["ASYNCBATCH_FENCE"])
        for name in ("KEY", "INPUT_HASH", "IDEMPOTENCY_KEY", "JOB", "INPUT", "OUTPUT_DIR"):
            assert first[f"ASYNCBATCH_{name}"] == second[f"ASYNCBATCH_{name}"], name
        assert first["ASYNCBATCH_KEY"].decode() == keys[relpath.decode()]
        assert first["ASYNCBATCH_JOB"] == b"nightly"
        assert first["ASYNCBATCH_INPUT"] == os.fsencode(inbox.absolute() / relpath.decode())
        assert first["ASYNCBATCH_OUTPUT_DIR"] == os.fsencode(out.absolute())
        assert len(first["ASYNCBATCH_INPUT_HASH"]) == 64
        assert len(first["ASYNCBATCH_IDEMPOTENCY_KEY"]) == 64
        idempotency.add(first["ASYNCBATCH_IDEMPOTENCY_KEY"])
    assert len(idempotency) == 2, "two items never share a key"


def test_without_an_output_dir_an_inherited_one_is_not_passed_on(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    log = tmp_path / "calls.jsonl"

    result = run_exec(
        inbox,
        state,
        command("record"),
        env={"AB_RECORD": str(log), "ASYNCBATCH_OUTPUT_DIR": "/somewhere/else"},
    )

    assert result.returncode == 0, result.stderr
    (only,) = records(log)
    assert "ASYNCBATCH_OUTPUT_DIR" not in only["env"]


# -- the command line ------------------------------------------------------------------------------


def test_exec_with_a_target_or_neither_is_exit_2(inbox: Path, state: Path) -> None:
    both = cli("run", "mod:fn", "--exec", "true", "--source", inbox, "--state", state)
    neither = cli("run", "--source", inbox, "--state", state)

    assert_one_line_error(both, "TARGET or --exec, not both", "'mod:fn'", "'true'")
    assert_one_line_error(neither, "give a TARGET", "--exec COMMAND")
    assert not state.exists()


@pytest.mark.parametrize(
    "flag", [("--poll", "5"), ("--no-events",), ("--backfill-interval", "60")], ids=str
)
def test_a_watch_setting_without_watch_is_exit_2(
    inbox: Path, state: Path, flag: tuple[str, ...]
) -> None:
    # (It was ignored: a run lists the source once.)
    given = cli("run", "--exec", "true", "--source", inbox, "--state", state, *flag)

    assert_one_line_error(given, f"{flag[0]} is for a watch: give --watch too")
    assert not state.exists()


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("", ["'exec'", "a command"]),
        ("   ", ["'exec'", "a command"]),
        ("echo 'unbalanced {}", ["'exec'", "No closing quotation"]),
        ("no-such-program-anywhere {}", ["command not found: 'no-such-program-anywhere'"]),
        ("./missing.sh {}", ["command not found: './missing.sh'"]),
    ],
)
def test_a_command_line_that_cannot_run_is_exit_2_before_anything(
    inbox: Path, state: Path, line: str, needles: list[str]
) -> None:
    make_files(inbox, 1)

    result = run_exec(inbox, state, line)

    assert_one_line_error(result, *needles)
    assert not state.exists()


def test_shell_syntax_in_a_command_line_is_warned_about(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)

    redirect = run_exec(inbox, state, "true {} > /dev/null")
    script = run_exec(inbox, state, "sh -c 'cat {}'", "--job", "other")

    assert redirect.returncode == script.returncode == 0, redirect.stderr + script.stderr
    assert "run without a shell: '>' is passed to 'true' as an argument" in redirect.stderr
    assert "placeholder inside the sh -c script" in script.stderr


def test_on_done_move_archives_each_input_after_its_command_succeeded(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 3)
    archive = tmp_path / "archive"
    archive.mkdir()

    result = run_exec(inbox, state, "cksum", "--on-done", f"move:{archive}")

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in archive.iterdir()) == [f"f0000{i}.txt" for i in range(3)]
    assert list(inbox.iterdir()) == []


def test_a_command_that_moves_or_removes_its_input_finishes_it(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # xargs' own idioms: `mv {} dest/`, `gzip {}` (the input replaced by a.gz), `rm`. The
    # rename or unlink sets the input's ctime, which is no sign of a write: the item is done
    # at its first attempt, not failed as written to (then vanished, or dead).
    make_files(inbox, 1, prefix="mv")
    make_files(inbox, 1, prefix="gz")
    make_files(inbox, 1, prefix="rm")
    dest = tmp_path / "dest"
    dest.mkdir()
    line = shlex.join(
        [
            "sh",
            "-c",
            'case "$1" in *mv*) mv "$1" "$2";; *gz*) gzip "$1";; *rm*) rm "$1";; esac',
            "sh",
            "{}",
            str(dest),
        ]
    )

    result = run_exec(inbox, state, line, "--max-attempts", "1")

    assert result.returncode == 0, result.stderr
    assert state_counts(state) == {"done": 3}
    assert rows(state, "SELECT attempts, last_error FROM items") == [(1, None)] * 3
    assert "3 seen: 3 done;" in result.stdout, result.stdout
    assert [p.name for p in dest.iterdir()] == ["mv00000.txt"]
    assert [p.name for p in inbox.iterdir()] == ["gz00000.txt.gz"]


def test_a_command_that_writes_its_input_in_place_still_fails_its_attempt(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # A write that keeps the size and sets the mtime back (a preallocating copier) shows in
    # the ctime only: the file still at its path, the attempt fails.
    (path,) = make_files(inbox, 1)
    mtime = path.stat().st_mtime_ns
    times = tmp_path / "times"
    times.touch()
    os.utime(times, ns=(mtime, mtime))
    script = 'printf x | dd of="$1" conv=notrunc status=none && touch -r "$2" "$1"'
    line = shlex.join(["sh", "-c", script, "sh", "{}", str(times)])

    result = run_exec(inbox, state, line, "--max-attempts", "1")

    assert result.returncode == 1, result.stderr
    assert path.stat().st_mtime_ns == mtime
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error.startswith(
        "InputChangedError: the input changed while it was handled: its ctime changed (written"
    )


# -- timeouts and signals --------------------------------------------------------------------------


def test_a_timeout_kills_the_commands_whole_process_group(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    pids = tmp_path / "pids"
    pids.mkdir()

    result = run_exec(
        inbox,
        state,
        command("hang", "grandchild"),
        "--timeout",
        "3",
        "--max-attempts",
        "1",
        env={"AB_PIDS": str(pids)},
    )

    assert result.returncode == 1, result.stderr
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error.startswith("TimeoutError")
    (noted,) = pids.glob("pid.*")
    leader, grandchild = map(int, noted.read_text().split())
    assert not alive(leader)
    assert not alive(grandchild)
    assert live_members(leader) == []


async def test_a_group_that_ignores_sigterm_is_killed_after_kill_after(
    inbox: Path, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_files(inbox, 1)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("AB_PIDS", str(pids))  # the handler takes the environment when made
    handler = ExecHandler(command("deaf"), kill_after=0.5)
    batch = Batch(handler, source=inbox, state=state, settle=0, timeout=2, max_attempts=1)

    report = await batch.run()

    assert report.dead == 1
    (pid,) = noted_pids(pids)
    assert (pids / f"signal.{pid}.{signal.SIGTERM}").exists()
    assert not alive(pid)
    assert live_members(pid) == []


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_reaches_the_commands_and_gives_their_items_back(
    inbox: Path,
    state: Path,
    tmp_path: Path,
    no_leftovers: Leftovers,
    sig: int,
    code: int,
) -> None:
    make_files(inbox, 2)
    pids = tmp_path / "pids"
    pids.mkdir()
    args: list[str | Path] = ["run", "--exec", command("hang", "grandchild"), "--source", inbox]
    args += ["--state", state]
    # A grace far longer than the test's deadline: the run ends because the commands died of
    # the forwarded signal, not because the grace ran out.
    proc = spawn(*args, "-j", "2", "--grace", "600", "--no-progress", env={"AB_PIDS": str(pids)})
    no_leftovers.append((proc, pids))
    wait_for(lambda: len(list(pids.glob("pid.*"))) == 2 or proc.poll() is not None)

    err = kill(proc, sig)

    assert proc.returncode == code, err
    assert state_counts(state) == {"pending": 2}, "given back, not done and not failed"
    # Interrupted, and counted so as they were given back (not only when leased again).
    assert rows(state, "SELECT attempts, interrupted FROM items") == [(1, 1), (1, 1)]
    for pid in noted_pids(pids):
        assert not alive(pid), f"pid {pid} outlived the run"
    final = run_exec(inbox, state, "true")
    assert final.returncode == 0, final.stderr
    assert state_counts(state) == {"done": 2}
    assert rows(state, "SELECT attempts, interrupted FROM items") == [(2, 1), (2, 1)]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_command_that_handles_the_stop_signal_may_finish_its_item(
    inbox: Path,
    state: Path,
    tmp_path: Path,
    no_leftovers: Leftovers,
    sig: int,
    code: int,
) -> None:
    make_files(inbox, 1)
    pids = tmp_path / "pids"
    pids.mkdir()
    args: list[str | Path] = ["run", "--exec", command("trap"), "--source", inbox, "--state", state]
    proc = spawn(*args, "--grace", "600", "--no-progress", env={"AB_PIDS": str(pids)})
    no_leftovers.append((proc, pids))
    wait_for(lambda: any(pids.glob("pid.*")) or proc.poll() is not None)

    err = kill(proc, sig)

    assert proc.returncode == code, err
    (seen,) = pids.glob("signal.*")
    assert int(seen.read_text()) == sig
    assert state_counts(state) == {"done": 1}


def test_a_second_signal_kills_commands_that_ignore_the_first(
    inbox: Path, state: Path, tmp_path: Path, no_leftovers: Leftovers
) -> None:
    make_files(inbox, 1)
    pids = tmp_path / "pids"
    pids.mkdir()
    args: list[str | Path] = ["run", "--exec", command("deaf"), "--source", inbox, "--state", state]
    proc = spawn(*args, "--grace", "600", "--no-progress", env={"AB_PIDS": str(pids)})
    no_leftovers.append((proc, pids))
    wait_for(lambda: any(pids.glob("pid.*")) or proc.poll() is not None)
    (pid,) = noted_pids(pids)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: (pids / f"signal.{pid}.{signal.SIGINT}").exists() or proc.poll() is not None)

    err = kill(proc, signal.SIGINT)  # the second: in-flight items are cancelled at once

    assert proc.returncode == 130, err
    assert (pids / f"signal.{pid}.{signal.SIGTERM}").exists(), "SIGTERM first, then SIGKILL"
    assert not alive(pid)
    assert live_members(pid) == []
    assert state_counts(state) == {"pending": 1}


# -- from Python -----------------------------------------------------------------------------------


async def test_exec_handler_from_python_takes_words_too(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2)
    out = tmp_path / "out"
    out.mkdir()
    handler = ExecHandler(["cp", "{}", f"{out}/{{/.}}.copy"])

    report = await Batch(handler, source=inbox, state=state, settle=0).run()

    assert report.done == 2
    assert sorted(p.name for p in out.iterdir()) == ["f00000.copy", "f00001.copy"]
    assert repr(handler) == f"ExecHandler({shlex.join(['cp', '{}', f'{out}/{{/.}}.copy'])!r})"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"command": []}, "a command"),
        ({"command": "true", "kill_after": -1}, "'kill_after'"),
        ({"command": "true", "output_tail": -1}, "'output_tail'"),
    ],
)
def test_exec_handler_refuses_bad_settings_with_the_value(
    kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        ExecHandler(**kwargs)


async def test_a_program_gone_mid_run_fails_its_attempts(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    program = tmp_path / "tool.sh"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    handler = ExecHandler(f"{program} {{}}")
    program.unlink()

    report = await Batch(handler, source=inbox, state=state, settle=0, max_attempts=1).run()

    assert report.dead == 1
    ((error,),) = rows(state, "SELECT last_error FROM items")
    assert error == f"FileNotFoundError: [Errno 2] No such file or directory: '{program}'"


# -- a worker's next item, prepared while its command runs --------------------------------------


class _Gated:
    """A handler that starts its attempts without awaiting them, as ``ExecHandler`` does
    (``start_attempt``), each running until the test opens its gate."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, anyio.Event] = {}
        self._start = anyio.Event()

    def start_attempt(self, ctx: TaskContext) -> _GatedAttempt:
        self.started.append(ctx.entry.relpath)
        gate = self.gates[ctx.entry.relpath] = anyio.Event()
        self._start.set()
        return _GatedAttempt(gate)

    async def __call__(self, ctx: TaskContext) -> None:
        attempt = self.start_attempt(ctx)
        await attempt.wait()
        attempt.result()

    async def next_start(self) -> None:
        """Wait for the next attempt to start."""
        self._start = anyio.Event()
        await self._start.wait()


class _GatedAttempt:
    def __init__(self, gate: anyio.Event) -> None:
        self._gate = gate

    async def wait(self) -> None:
        await self._gate.wait()

    def result(self) -> None:
        return None


async def test_a_worker_never_holds_an_item_ready_while_another_has_none(
    inbox: Path, state: Path
) -> None:
    # Two workers. The one that starts the second attempt finds the other busy, so it takes
    # its next file ahead of time; its attempt then never ends (until the test says so). The
    # other worker, once out of files, must take that file from it, not leave it behind.
    make_files(inbox, 4)
    handler = _Gated()
    reports: list[Report] = []

    async def run() -> None:
        batch = Batch(handler, source=inbox, state=state, settle=0, concurrency=2)
        reports.append(await batch.run())

    with anyio.fail_after(60):  # a bound on a hang, not a wait: the steps below are events
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while len(handler.started) < 2:
                await handler.next_start()
            held = handler.started[1]
            while len(handler.started) < 4:  # every other attempt ends as soon as it starts
                for name, gate in handler.gates.items():
                    if name != held:
                        gate.set()
                await handler.next_start()
            for gate in handler.gates.values():
                gate.set()

    assert sorted(handler.started) == [f"f{i:05d}.txt" for i in range(4)]
    assert reports[0].done == 4


class _StallsOn(_Gated):
    """:class:`_Gated`, its attempts ending at once, but for the start of ``name``'s attempt:
    it stalls the whole event loop (a blocking sleep) past the lease, as a runner suspended
    (SIGSTOP) the moment its worker started a command would; then calls ``meanwhile`` (what
    happened while the runner was stalled), still stalled. That attempt ends when the test
    sets its gate (``ctx``: its context)."""

    def __init__(
        self, name: str, seconds: float, meanwhile: Callable[[], object] = lambda: None
    ) -> None:
        super().__init__()
        self._name, self._seconds, self._meanwhile = name, seconds, meanwhile
        self.stalled = False
        self.ctx: TaskContext | None = None

    def start_attempt(self, ctx: TaskContext) -> _GatedAttempt:
        attempt = super().start_attempt(ctx)
        if ctx.entry.relpath == self._name and not self.stalled:
            self.stalled = True
            self.ctx = ctx
            time.sleep(self._seconds)  # the event loop stalls: no heartbeat, no watchdog
            self._meanwhile()
        else:
            self.gates[ctx.entry.relpath].set()
        return attempt


def _item_row(state: str, relpath: str, columns: str) -> tuple[Any, ...]:
    """``columns`` of ``relpath``'s item, in a SQLite or PostgreSQL ledger."""
    postgres = state.startswith("postgresql://")
    name = f"'{relpath}'::bytea" if postgres else f"CAST('{relpath}' AS BLOB)"
    (row,) = ledger_rows(state, f"SELECT {columns} FROM items WHERE relpath = {name}")
    return tuple(row)


def _lease_renewed(ctx: TaskContext) -> bool:
    """Whether the lease of ``ctx``'s item is this runner's again (renewed) after a stall."""
    hooks = ctx._hooks
    assert hooks is not None
    return not hooks.lease_lost(ctx)


class _AwaitsRenewal:
    """A handler (awaited: no ``start_attempt``) whose attempt of ``name`` stalls the event
    loop (a blocking sleep) past the lease, as a runner suspended (SIGSTOP) in the middle of
    it; then goes on until the heartbeat renewed its lease, and succeeds."""

    def __init__(self, name: str, seconds: float) -> None:
        self._name, self._seconds = name, seconds
        self.started: list[str] = []
        self.stalled = False

    async def __call__(self, ctx: TaskContext) -> None:
        self.started.append(ctx.entry.relpath)
        if ctx.entry.relpath == self._name and not self.stalled:
            self.stalled = True
            time.sleep(self._seconds)  # noqa: ASYNC251 - the event loop stalls on purpose
            assert not _lease_renewed(ctx)
            await until(lambda: _lease_renewed(ctx))


@pytest.mark.parametrize("kind", ["started", "awaited"])
async def test_an_attempt_stalled_past_its_lease_that_nobody_took_over_goes_on(
    inbox: Path, any_state: str, kind: str
) -> None:
    # Regression: the watchdog cancelled a running attempt as soon as its local lease
    # deadline had passed, before the heartbeat (which had not run during the stall) could
    # renew the lease: an attempt that nothing took over failed ("the lease ran out before
    # the handler finished"), and with max_attempts=1 its file was dead, though its handler
    # (or its command) succeeded. The ledger must be asked first: the lease is renewed, and
    # the attempt goes on. "started": an attempt started without being awaited (a command of
    # --exec); "awaited": a Python handler.
    make_files(inbox, 4)
    stalled = "f00001.txt"
    handler: _StallsOn | _AwaitsRenewal
    handler = _StallsOn(stalled, 3.5) if kind == "started" else _AwaitsRenewal(stalled, 3.5)
    batch = Batch(
        handler, source=inbox, state=any_state, settle=0, concurrency=1, lease=3, max_attempts=1
    )
    reports: list[Report] = []

    async def run() -> None:
        reports.append(await batch.run())

    with anyio.fail_after(60):  # a bound on a hang, not a wait: the steps below are polls
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            if isinstance(handler, _StallsOn):
                await until(lambda: handler.ctx is not None)
                ctx = handler.ctx
                assert ctx is not None
                await until(lambda: _lease_renewed(ctx))  # (the watchdog stopped it before)
                handler.gates[stalled].set()  # its command exits 0

    (report,) = reports
    assert handler.stalled
    assert (report.done, report.dead, report.failed, report.lost) == (4, 0, 0, 0), report
    assert handler.started.count(stalled) == 1
    assert _item_row(any_state, stalled, "state, attempts, interrupted") == ("done", 1, 0)


async def test_an_item_taken_while_the_watchdog_stops_the_command_is_not_left_behind(
    inbox: Path, any_state: str, caplog: pytest.LogCaptureFixture
) -> None:
    # -j 1, the attempts ending at once (claims lease well ahead of the worker by then). As
    # f00020's attempt starts, the runner stalls past its lease (as if SIGSTOPped), and
    # another runner takes f00020's lease over meanwhile: the worker goes on to take its next
    # file, f00021, whose lease passed too, and waits for a heartbeat to say whether it is
    # still ours; meanwhile the watchdog stops f00020's attempt (its lease lost). f00021,
    # taken from the queue but not yet the worker's ready item, must go back to the queue:
    # not stay leased (renewed by every heartbeat) with no worker on it, the run waiting for
    # it for ever. f00020's attempt was cut short by the runner's stall, not failed: its
    # outcome is refused (the fence), and no failed attempt is counted.
    make_files(inbox, 40)
    handler = _StallsOn(
        "f00020.txt", 3.5, meanwhile=lambda: take_over_lease(any_state, "f00020.txt")
    )
    batch = Batch(
        handler, source=inbox, state=any_state, settle=0, concurrency=1, lease=3, backoff=0.1
    )

    with anyio.fail_after(30), caplog.at_level(logging.INFO, "asyncbatch"):  # (~5 s)
        report = await batch.run()

    assert handler.stalled
    assert (report.done, report.dead, report.failed, report.lost) == (40, 0, 0, 1), report
    cut = [r.getMessage() for r in caplog.records if "'f00020.txt': attempt 1" in r.getMessage()]
    assert cut == ["'f00020.txt': attempt 1 cut short: " + workers.TAKEN_OVER], cut
    assert _item_row(any_state, "f00020.txt", "state, last_error") == ("done", None)
    assert sorted(set(handler.started)) == [f"f{i:05d}.txt" for i in range(40)]
    assert handler.started.count("f00020.txt") == 2  # its attempt stopped, then retried
    assert handler.started.count("f00021.txt") == 1


def _leases_ran_out(state: str) -> bool:
    """Whether the ledger has items leased (running), and all their leases ran out."""
    now = time.time()
    found = ledger_rows(
        state,
        f"SELECT count(*), count(CASE WHEN lease_until > {now} THEN 1 END) FROM items "
        "WHERE state = 'running'",
    )
    running, live = found[0]
    return bool(running) and not live


def test_a_run_stopped_past_its_lease_while_its_command_ran_counts_that_command_done(
    inbox: Path, any_state: str, tmp_path: Path, no_leftovers: Leftovers
) -> None:
    # Regression (a lone run, SIGSTOPped past --lease while a command ran, then SIGCONTed):
    # the command exited 0 during the stop, nothing took the leases over, yet the watchdog
    # cancelled the attempt on its local deadline before the heartbeat could renew it: "1
    # failed attempts" (dead with --max-attempts 1, exit 1), "the lease ran out before the
    # handler finished". The ledger is asked first now: the lease is renewed, the file done.
    make_files(inbox, 3)
    pids = tmp_path / "pids"
    pids.mkdir()
    os.mkfifo(pids / "gate")
    args: list[str | Path] = ["run", "--exec", command("gate", "f00001.txt", "{}")]
    options = ("-j", "1", "--lease", "3", "--max-attempts", "1", "--no-progress")
    proc = spawn(
        *args, "--source", inbox, "--state", any_state, *options, env={"AB_PIDS": str(pids)}
    )
    no_leftovers.append((proc, pids))
    wait_for(lambda: noted_pids(pids) or proc.poll() is not None, 60)
    (pid,) = noted_pids(pids)
    proc.send_signal(signal.SIGSTOP)
    try:
        os.close(os.open(pids / "gate", os.O_WRONLY))  # its command exits 0 (the run stopped)
        wait_for(lambda: not alive(pid))
        wait_for(lambda: _leases_ran_out(any_state))  # past the lease in the ledger too
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err
    assert "3 seen: 3 done;" in out, out
    assert "failed" not in out, out
    assert "ran out" not in err, err
    assert "taken over" not in err, err
    assert (
        sorted(ledger_rows(any_state, "SELECT state, attempts, interrupted FROM items"))
        == [("done", 1, 0)] * 3
    )


async def test_a_timeout_with_the_next_item_ready_handles_that_item_next(
    inbox: Path, state: Path, pids: Path
) -> None:
    make_files(inbox, 3)
    handler = ExecHandler(command("hang-for", "f00000.txt", "{}"), kill_after=0.5)
    batch = Batch(handler, source=inbox, state=state, settle=0, timeout=2, max_attempts=1)

    report = await batch.run()

    assert (report.done, report.dead) == (2, 1)
    assert rows(state, "SELECT relpath, state FROM items ORDER BY relpath") == [
        (b"f00000.txt", "dead"),
        (b"f00001.txt", "done"),
        (b"f00002.txt", "done"),
    ]
    (pid,) = noted_pids(pids)
    assert not alive(pid)
    assert [t for t in _descriptors() if str(inbox) in t] == [], "an input was left open"


@pytest.mark.parametrize("change", ["deleted", "replaced", "written", "source replaced"])
async def test_a_file_changed_while_its_command_waited_is_not_run_on(
    inbox: Path, state: Path, pids: Path, change: str
) -> None:
    # -j 1: while f00000's command runs, the worker prepares f00001 (its lease checked, its
    # file opened). A file deleted, replaced or written to meanwhile: its command ran on
    # what was at the path when its turn came (nothing, or a new version, under the old
    # version's item), and its item was recorded done (or failed: the file missing).
    files = make_files(inbox, 2)
    # Written to in place (size and mtime kept): within the settle window, not settled.
    settle = 1.0 if change == "written" else 0.0
    await until_settled(settle, *files)
    os.mkfifo(pids / "gate")
    handler = ExecHandler(command("gate", "f00000.txt", "{}"))
    batch = Batch(handler, source=inbox, state=state, settle=settle, concurrency=1, max_attempts=1)
    reports: list[Report] = []

    async def run() -> None:
        reports.append(await batch.run())

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await until(lambda: bool(noted_pids(pids)))  # f00000's command runs
            await until(lambda: _prepared_next(inbox / "f00001.txt"))
            target = inbox / "f00001.txt"
            if change == "deleted":
                target.unlink()
            elif change == "replaced":
                (inbox / "new").write_bytes(b"f00001\nversion 2\n")  # (its command: exit 0)
                os.replace(inbox / "new", target)
            elif change == "source replaced":  # the command gets the path: nothing there
                os.rename(inbox, inbox.with_name("inbox.old"))
                inbox.mkdir()
            else:  # the same file, written to in place (its size and mtime kept)
                st = target.stat()
                with target.open("r+b") as f:
                    f.write(b"X")
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.close(os.open(pids / "gate", os.O_WRONLY))  # the gate's reader waits: opens it
    (report,) = reports
    # Its command never ran on the old version's item: not an attempt (it was counted one,
    # with a start and a time). A file at the path when the run ends is not counted vanished:
    # a new version, settled, is taken in the run as the new item it is; the same file
    # written to (its key kept) is not settled yet.
    expected = {"replaced": (2, 0, 0, 0), "written": (1, 0, 0, 1)}.get(change, (1, 1, 0, 0))
    assert (report.done, report.vanished, report.dead, report.unsettled) == expected, report
    query = "SELECT relpath, state, attempts, started_at FROM items ORDER BY 1, 2"
    assert rows(state, query) == [
        (b"f00000.txt", "done", 1, ANY),
        *([(b"f00001.txt", "done", 1, ANY)] if change == "replaced" else []),
        (b"f00001.txt", "vanished", 0, None),
    ]


def _prepared_next(path: Path) -> bool:
    """Whether this process holds ``path`` open (the worker prepared its item)."""
    return any(t == str(path) for t in _descriptors())


def test_a_stop_leaves_the_item_prepared_next_unstarted_and_pending(
    inbox: Path, state: Path, tmp_path: Path, no_leftovers: Leftovers
) -> None:
    make_files(inbox, 2)
    pids = tmp_path / "pids"
    pids.mkdir()
    args: list[str | Path] = ["run", "--exec", command("hang"), "--source", inbox]
    proc = spawn(*args, "--state", state, "-j", "1", "--no-progress", env={"AB_PIDS": str(pids)})
    no_leftovers.append((proc, pids))
    wait_for(lambda: len(list(pids.glob("pid.*"))) == 1 or proc.poll() is not None)

    err = kill(proc, signal.SIGINT)

    assert proc.returncode == 130, err
    assert len(noted_pids(pids)) == 1, "the item prepared next was started"
    assert state_counts(state) == {"pending": 2}
    assert rows(state, "SELECT relpath, attempts, interrupted FROM items ORDER BY relpath") == [
        (b"f00000.txt", 1, 1),
        (b"f00001.txt", 0, 0),
    ]


def test_runs_killed_while_commands_start_lose_no_file(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # SIGKILL while workers start commands and prepare the next files: what a run left
    # unfinished (started, opened ahead, queued) is done by the next runs, none lost; every
    # file's command ran (at least once: a command that ran before a kill may run again).
    files = make_files(inbox, 60)
    log = tmp_path / "calls.jsonl"
    env = {"AB_RECORD": str(log)}
    args: list[str | Path] = ["run", "--exec", command("record"), "--source", inbox]
    for kills in range(1, 4):
        proc = spawn(*args, "--state", state, "-j", "4", "--no-progress", env=env)
        wait_for(lambda n=12 * kills, p=proc: len(records(log)) >= n or p.poll() is not None)
        kill(proc)

    final = run_exec(inbox, state, command("record"), "-j", "4", env=env)

    assert final.returncode == 0, final.stderr
    assert state_counts(state) == {"done": 60}
    ran = {os.path.basename(r["argv"][-1]) for r in records(log)}
    assert ran == {os.fsencode(f.name) for f in files}


async def test_a_cancelled_run_leaves_no_command_behind(
    inbox: Path, state: Path, pids: Path
) -> None:
    make_files(inbox, 3)
    handler = ExecHandler(command("hang", "grandchild"))
    batch = Batch(handler, source=inbox, state=state, settle=0, concurrency=3)

    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.run)
        await anyio.to_thread.run_sync(wait_for, lambda: len(list(pids.glob("pid.*"))) == 3)
        tg.cancel_scope.cancel()

    for pid in noted_pids(pids):
        assert not alive(pid)
    assert state_counts(state) == {"pending": 3}


@pytest.mark.parametrize(("concurrency", "delayed"), [(4, True), (8, True), (3, False)])
async def test_commands_that_fill_every_cpu_wait_before_the_first(
    inbox: Path,
    state: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
    delayed: bool,
) -> None:
    # Four usable CPUs (whatever this machine has): -j 4 or more fills them, -j 3 does not.
    # The delay is made long enough that a run that should not wait would hang past the
    # bound below, and one that should is seen to start no command before it.
    monkeypatch.setattr(workers, "usable_cpus", lambda: 4)
    monkeypatch.setattr(workers, "FIRST_COMMAND_DELAY", 1.0 if delayed else 120.0)
    make_files(inbox, 6)
    starts = tmp_path / "starts"
    handler = ExecHandler(["sh", "-c", f'date +%s.%N >> "{starts}"'])
    began = time.time()
    with anyio.fail_after(60):
        report = await Batch(
            handler, source=inbox, state=state, settle=0, concurrency=concurrency
        ).run()
    assert report.done == 6
    first = min(float(line) for line in starts.read_text().split())
    if delayed:
        assert first - began >= 1.0


async def test_a_python_handler_never_waits_before_its_first_item(
    inbox: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "usable_cpus", lambda: 1)
    monkeypatch.setattr(workers, "FIRST_COMMAND_DELAY", 120.0)
    make_files(inbox, 3)

    async def handle(ctx: TaskContext) -> None:
        pass

    with anyio.fail_after(60):  # the delay would hang it past this
        report = await Batch(handle, source=inbox, state=state, settle=0, concurrency=4).run()
    assert report.done == 3


def test_the_first_command_waits_only_where_the_commands_fill_the_cpus() -> None:
    assert workers.delays_first_command(2, 2)
    assert workers.delays_first_command(8, 2)
    assert not workers.delays_first_command(1, 2)
    assert workers.usable_cpus() >= 1
