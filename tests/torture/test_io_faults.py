"""I/O faults: ENOSPC, EIO, EACCES and EROFS on output writes, moves and the ledger file.

Real faults where the machine can make them (a small tmpfs filled up, a read-only remount, a
directory without write permission for a process without CAP_DAC_OVERRIDE), injected ones
(``oserror(ERRNO)`` failpoints) elsewhere. Each time: the item fails cleanly and is retried (its
error stored, no temp file or partial output left), or the run stops with a one-line error;
the ledger passes ``PRAGMA integrity_check``; once the fault is gone the next run finishes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from asyncbatch._effects.files import TEMP_PREFIX

from ..conftest import HANDLERS, cli, kill, make_files, rows, settled_now, state_counts, wait_for
from .harness import FULL, integrity_failures, record_figures, remount, tmpfs

WRITE_COPY = f"{HANDLERS}:write_copy"
RECORD = f"{HANDLERS}:record"
#: A process without root's file access override: permissions apply to it.
NO_DAC_OVERRIDE = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
FILES = 6


def run(*args: str | os.PathLike[str], **kwargs: object) -> tuple[int, str]:
    result = cli(*args, **kwargs)  # type: ignore[arg-type]
    return result.returncode, result.stderr


def write_args(inbox: Path, state: Path, out: Path, *more: str) -> list[str | os.PathLike[str]]:
    return [
        "run",
        WRITE_COPY,
        "--source",
        inbox,
        "--state",
        state,
        "--output-dir",
        out,
        "--max-attempts",
        "3",
        "--backoff",
        "0.05",
        "--no-progress",
        *more,
    ]


def assert_failed_cleanly(state: Path, out: Path, error: str) -> None:
    """Every item dead after its 3 attempts, the error stored, nothing half-written."""
    assert state_counts(state) == {"dead": FILES}
    for attempts, last_error in rows(state, "SELECT attempts, last_error FROM items"):
        assert attempts == 3
        assert error in last_error, last_error
    assert [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)] == []
    assert integrity_failures(state) == 0


def assert_recovers(
    inbox: Path, state: Path, out: Path, args: list[str | os.PathLike[str]]
) -> None:
    assert cli("retry", "--state", state, "--dead").returncode == 0
    code, err = run(*args)
    assert code == 0, err
    assert state_counts(state) == {"done": FILES}
    for source in inbox.iterdir():
        assert (out / source.name).read_bytes() == source.read_bytes()
    assert integrity_failures(state) == 0


def one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("asyncbatch: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], err


def test_a_full_output_filesystem_fails_items_cleanly_and_the_next_run_finishes(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, FILES, size=64 << 10)
    with tmpfs(tmp_path / "out", size="1m") as out:
        filler = out / "filler"
        fill(filler)
        args = write_args(inbox, state, out)
        code, err = run(*args)
        assert code == 1, err
        assert_failed_cleanly(state, out, "No space left on device")
        assert sorted(p.name for p in out.iterdir()) == ["filler"]
        filler.unlink()
        assert_recovers(inbox, state, out, args)
    record_figures("io fault", fault="ENOSPC (full tmpfs) on output writes", held=True)


def faulted_during_the_run(
    inbox: Path, state: Path, out: Path, fault: Callable[[], None], *, prefix: tuple[str, ...] = ()
) -> tuple[int, str]:
    """Start a run whose handlers first wait 0.5 s; apply ``fault`` once all are waiting."""
    args = write_args(inbox, state, out, "-j", str(FILES))
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "asyncbatch", *settled_now(args)],
        env={**os.environ, "ASYNCBATCH_FAILPOINTS": "in-handler=sleep(0.5)"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: state.exists() and running(state) == FILES, timeout=60)
        fault()  # the checks made at start-up are behind it now
    except BaseException:
        kill(proc)
        raise
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def running(state: Path) -> int:
    try:
        return int(rows(state, "SELECT count(*) FROM items WHERE state = 'running'")[0][0])
    except sqlite3.Error:
        return 0


def test_a_read_only_output_filesystem_is_refused_up_front_or_fails_items_cleanly(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, FILES)
    with tmpfs(tmp_path / "out", size="8m") as out:
        remount(out, "ro")
        code, err = run(*write_args(inbox, state, out))
        assert code == 2, err
        one_line_error(err, "output_dir", "not writable")
        remount(out, "rw")
        try:
            code, err = faulted_during_the_run(inbox, state, out, lambda: remount(out, "ro"))
        finally:
            remount(out, "rw")
        assert code == 1, err
        assert_failed_cleanly(state, out, "Read-only file system")
        assert_recovers(inbox, state, out, write_args(inbox, state, out))
    record_figures("io fault", fault="EROFS (read-only remount) on output writes", held=True)


def test_an_output_directory_without_write_permission_fails_items_cleanly(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, FILES)
    out = tmp_path / "out"
    out.mkdir()
    try:
        code, err = faulted_during_the_run(
            inbox, state, out, lambda: out.chmod(0o555), prefix=NO_DAC_OVERRIDE
        )
        assert code == 1, err
        assert_failed_cleanly(state, out, "Permission denied")
    finally:
        out.chmod(0o755)
    assert_recovers(inbox, state, out, write_args(inbox, state, out))
    record_figures("io fault", fault="EACCES on output writes", held=True)


@pytest.mark.parametrize("code", ["EIO", "ENOSPC", "EACCES", "EROFS"] if FULL else ["EIO"])
@pytest.mark.parametrize("point", ["output-temp-written", "before-dir-fsync"])
def test_an_injected_error_on_an_output_write_fails_the_item_and_leaves_no_part(
    code: str, point: str, inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, FILES)
    out = tmp_path / "out"
    out.mkdir()
    args = write_args(inbox, state, out)
    result = cli(*args, env={"ASYNCBATCH_FAILPOINTS": f"{point}=oserror({code})"})
    assert result.returncode == 1, result.stderr
    assert_failed_cleanly(state, out, os.strerror(getattr(errno, code)))
    if point == "output-temp-written":  # before the rename: nothing replaced
        assert list(out.iterdir()) == []
    assert_recovers(inbox, state, out, args)


@pytest.mark.parametrize("code", ["EIO", "ENOSPC", "EROFS"] if FULL else ["ENOSPC"])
@pytest.mark.parametrize("point", ["before-post-action", "mid-copy"])
def test_an_error_in_a_post_commit_move_is_retried_by_the_next_run(
    code: str, point: str, inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, FILES)
    with tmpfs(tmp_path / "archive-fs", size="8m") as archive:  # another filesystem: a copy
        args: list[str | os.PathLike[str]] = [
            "run",
            RECORD,
            "--source",
            inbox,
            "--state",
            state,
            "--on-done",
            f"move:{archive}",
            "--no-progress",
        ]
        result = cli(*args, env={"ASYNCBATCH_FAILPOINTS": f"{point}=oserror({code})"})
        # The items are done, their moves wait for the next run: not a success (exit 1).
        assert result.returncode == 1, result.stderr
        assert state_counts(state) == {"done": FILES}
        assert len(list(inbox.iterdir())) == FILES
        assert list(archive.iterdir()) == []  # no partial copy left behind
        assert "post-commit action 'move' failed" in result.stderr
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        assert list(inbox.iterdir()) == []
        assert len(list(archive.iterdir())) == FILES
        assert integrity_failures(state) == 0


def test_a_ledger_on_a_full_filesystem_stops_the_run_with_one_line_and_recovers(
    inbox: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2000)
    with tmpfs(tmp_path / "state-fs", size="16m") as fs:
        state = fs / "state.db"
        filler = fs / "filler"
        args: list[str | os.PathLike[str]] = [
            "run",
            RECORD,
            "--source",
            inbox,
            "--state",
            state,
            "--no-progress",
        ]
        code, err = run(*args, "--claim-batch", "16")
        assert code == 0, err  # the ledger fits first; now leave it no room to grow
        make_files(inbox, 2000, prefix="g")
        fill(filler)
        code, err = run(*args)
        assert code == 69, err
        one_line_error(err, "full")
        filler.unlink()  # (even reading a WAL ledger needs room for its shared-memory file)
        assert integrity_failures(state) == 0
        code, err = run(*args)
        assert code == 0, err
        assert state_counts(state) == {"done": 4000}
        assert integrity_failures(state) == 0
    record_figures("io fault", fault="ENOSPC (full tmpfs) on the ledger", held=True)


def test_a_ledger_at_rest_on_a_full_filesystem_is_said_to_be_out_of_space(
    inbox: Path, tmp_path: Path
) -> None:
    # Opened with no room for its -shm file (the last run removed it): SQLITE_IOERR_SHMSIZE.
    # The commands said "disk I/O error ... if its -wal file was deleted while its -shm file
    # stayed, stop its runners and remove the -shm file too (the commits in the lost -wal are
    # gone ...)", not that the file system was full.
    make_files(inbox, 5)
    with tmpfs(tmp_path / "state-fs", size="4m") as fs:
        state = fs / "state.db"
        code, err = run("run", RECORD, "--source", inbox, "--state", state, "--no-progress")
        assert code == 0, err
        assert not (fs / "state.db-shm").exists()
        before = state.read_bytes()
        filler = fs / "filler"
        fill(filler)
        for command in ("status", "history"):
            code, err = run(command, "--state", state)
            assert code == 69, err
            one_line_error(err, "no space left")
            assert "-wal file was deleted" not in err
        filler.unlink()
        assert state.read_bytes() == before
        code, err = run("status", "--state", state)
        assert code == 0, err


def test_a_ledger_on_a_read_only_filesystem_stops_the_run_with_one_line_and_recovers(
    inbox: Path, tmp_path: Path
) -> None:
    make_files(inbox, 20)
    with tmpfs(tmp_path / "state-fs", size="8m") as fs:
        state = fs / "state.db"
        args: list[str | os.PathLike[str]] = [
            "run",
            RECORD,
            "--source",
            inbox,
            "--state",
            state,
            "--no-progress",
        ]
        code, err = run(*args)
        assert code == 0, err
        make_files(inbox, 20, prefix="g")
        remount(fs, "ro")
        try:
            code, err = run(*args)
        finally:
            remount(fs, "rw")
        assert code in (2, 69), err
        one_line_error(err)
        assert integrity_failures(state) == 0
        code, err = run(*args)
        assert code == 0, err
        assert state_counts(state) == {"done": 40}
    record_figures("io fault", fault="EROFS (read-only remount) on the ledger", held=True)


def test_a_ledger_with_commits_in_its_wal_on_a_read_only_filesystem_is_read(
    inbox: Path, tmp_path: Path
) -> None:
    # A runner killed before its -wal was checkpointed, its file system remounted read-only:
    # SQLite reads the -wal through the -shm, writing nothing. The reads were refused, told
    # to "run the command as the state's owner" (they were: root).
    make_files(inbox, 5)
    with tmpfs(tmp_path / "state-fs", size="8m") as fs:
        state = fs / "state.db"
        code, err = run("run", RECORD, "--source", inbox, "--state", state, "--no-progress")
        assert code == 0, err
        # A commit left in the -wal by a process that died before its close checkpointed it.
        script = (
            "import os, sqlite3, sys; db = sqlite3.connect(sys.argv[1]);"
            " db.execute('PRAGMA wal_autocheckpoint = 0');"
            " db.execute(\"UPDATE items SET state = 'dead' WHERE key = (SELECT min(key) FROM"
            ' items)"); db.commit(); os._exit(0)'
        )
        subprocess.run([sys.executable, "-c", script, str(state)], check=True)
        wal = fs / "state.db-wal"
        assert wal.stat().st_size > 0
        before = {p.name: p.read_bytes() for p in fs.iterdir()}
        remount(fs, "ro")
        try:
            status = cli("status", "--state", state, "--json")
        finally:
            remount(fs, "rw")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["counts"]["dead"] == 1  # the -wal's commit
        assert {p.name: p.read_bytes() for p in fs.iterdir()} == before


def test_a_ledger_without_write_permission_stops_the_run_with_one_line(
    inbox: Path, tmp_path: Path
) -> None:
    make_files(inbox, 5)
    home = tmp_path / "state-dir"
    home.mkdir()
    state = home / "state.db"
    args: list[str | os.PathLike[str]] = [
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "--no-progress",
    ]
    home.chmod(0o555)
    try:
        result = cli(*args, prefix=NO_DAC_OVERRIDE)
    finally:
        home.chmod(0o755)
    assert result.returncode in (2, 69), result.stderr
    one_line_error(result.stderr)
    code, err = run(*args)
    assert code == 0, err
    assert state_counts(state) == {"done": 5}
    record_figures("io fault", fault="EACCES on the ledger", held=True)


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full, to the last block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    probe = path.parent / "probe"
    with pytest.raises(OSError, match="No space left"):
        probe.write_bytes(b"x" * 4096)
    probe.unlink()
