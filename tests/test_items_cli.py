"""The operator's answers about single items, through the real CLI: explain, items, forget."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asyncbatch._ledger import sqlite_sql

from .conftest import (
    HANDLERS,
    WARNINGS_FAIL,
    cli,
    invocations,
    kill,
    ledger_rows,
    make_files,
    settled_now,
    spawn,
    start_recording,
    state_counts,
    wait_for,
)

RECORD = f"{HANDLERS}:record"
FAIL = f"{HANDLERS}:fail_always"


def run(inbox: Path, state: Path | str, *extra: str, log: Path | None = None) -> None:
    """One run of the recording handler (or another TARGET given in ``extra``)."""
    target = RECORD
    if extra and extra[0].startswith(str(HANDLERS)):
        target, extra = extra[0], extra[1:]
    env = {"AB_LOG": str(log)} if log else None
    done = cli("run", target, "--source", inbox, "--state", state, "--no-progress", *extra, env=env)
    assert done.returncode in (0, 1), done.stderr


def explain(state: Path | str, path: str | Path, *extra: str) -> dict[str, Any]:
    """``asyncbatch explain --json`` with only the state (the job's source and scan rules are
    the ledger's): exit 0 and its facts."""
    out = cli("explain", path, "--state", state, "--json", *extra)
    assert out.returncode == 0, out.stderr
    facts: dict[str, Any] = json.loads(out.stdout)
    return facts


def no_terminal(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI with stdin not a terminal (``/dev/null``)."""
    return subprocess.run(
        [sys.executable, "-m", "asyncbatch", *settled_now(args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **WARNINGS_FAIL},
    )


def on_terminal(answer: str, *args: str | Path) -> tuple[int, str]:
    """The CLI on a pseudo-terminal, answering its question with ``answer``."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncbatch", *settled_now(args)],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, **WARNINGS_FAIL},
    )
    os.close(terminal)
    output = b""
    answered = False
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
            if not answered and b"[y/N]" in output:
                os.write(controller, answer.encode() + b"\n")
                answered = True
    finally:
        proc.wait(timeout=60)
        os.close(controller)
    return proc.returncode, output.decode(errors="replace")


# -- explain -------------------------------------------------------------------------------------


def test_explain_says_why_each_file_was_or_was_not_handled(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    for name in ("draft.tmp", "notes.txt~", ".hidden", "keep.skip"):
        (inbox / name).write_text("x")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "deep.txt").write_text("x")
    future = inbox / "future.txt"
    future.write_text("still being written")
    later = time.time() + 3600
    os.utime(future, (later, later))
    (inbox / "link.txt").symlink_to(inbox / "f00000.txt")
    (inbox / "loop1").symlink_to("loop2")
    (inbox / "loop2").symlink_to("loop1")
    (inbox / "dangling").symlink_to("nowhere")
    old = time.time() - 60
    for path in inbox.rglob("*"):
        if path not in (future,) and not path.is_symlink():
            os.utime(path, (old, old))
    run(inbox, state, "--ignore", "*.skip")

    done = explain(state, inbox / "f00001.txt")
    assert done["verdict"] == "done"
    assert "done at" in done["message"]
    assert "in attempt 1" in done["message"]
    item = done["item"]
    assert item["state"] == "done"
    assert item["attempts"] == 1
    assert isinstance(item["runner_pid"], int)
    assert item["runner_host"]
    assert f"pid {item['runner_pid']} on {item['runner_host']}" in done["message"]
    assert item["finished_at"] >= item["started_at"]
    assert item["duration"] >= 0
    assert done["key"] == item["key"]
    assert done["identity"] == "stat"
    assert len(done["input_hash"]) == 64

    def verdict(path: str, *extra: str) -> tuple[str, str]:
        facts = explain(state, path, *extra)
        return facts["verdict"], facts["message"]

    draft = verdict("draft.tmp")
    assert draft[0] == "skipped"
    assert "temporary name 'draft.tmp'" in draft[1]
    assert "temporary name" in verdict("notes.txt~")[1]
    assert "hidden name '.hidden'" in verdict(".hidden")[1]
    assert "not recursive" in verdict("sub/deep.txt")[1]
    # The answer uses the job's scan rules, as its runs recorded them; an option given
    # replaces one, as a run with that option would see the file.
    assert "ignore pattern '*.skip'" in verdict("keep.skip")[1]
    assert (done["source"], done["ignore"]) == (os.path.realpath(inbox), ["*.skip"])
    assert (done["recursive"], done["follow_symlinks"]) == (False, False)
    assert verdict("keep.skip", "--ignore", "*.other")[0] == "never-seen"
    assert verdict("sub/deep.txt", "--recursive")[0] == "never-seen"
    assert "not recursive" in verdict("sub/deep.txt", "--no-recursive")[1]
    unsettled = verdict("future.txt")
    assert unsettled[0] == "not-settled"
    assert "in the future by this host's clock" in unsettled[1]
    assert "--settle 0" in unsettled[1]
    assert "symlink" in verdict("link.txt")[1]
    assert verdict("link.txt", "--follow-symlinks")[0] == "never-seen"
    # (A loop was called "a symlink whose target does not exist".)
    assert verdict("loop1", "--follow-symlinks") == (
        "skipped",
        "skipped: a symlink loop (its links lead back to themselves)",
    )
    assert verdict("dangling", "--follow-symlinks") == (
        "skipped",
        "skipped: a symlink whose target does not exist",
    )
    assert verdict("no-such-file.txt") == (
        "never-seen",
        "no such file, and the ledger never saw it",
    )

    # A file changed after it was done is new work under identity stat.
    changed = inbox / "f00002.txt"
    changed.write_text("a longer, different content")
    os.utime(changed, (old, old))
    facts = explain(state, changed)
    assert facts["verdict"] == "never-seen"
    assert "other item(s) under the name" in facts["message"]
    assert [o["state"] for o in facts["other_items"]] == ["done"]

    text = cli("explain", "draft.tmp", "--source", inbox, "--state", state)
    assert text.returncode == 0
    assert "draft.tmp (job 'default'): skipped" in text.stdout
    outside = cli("explain", "/etc/hostname", "--source", inbox, "--state", state)
    assert outside.returncode == 2
    (line,) = outside.stderr.strip().splitlines()
    assert "'/etc/hostname' is not a file under the source" in line
    itself = cli("explain", inbox, "--source", inbox, "--state", state)
    assert itself.returncode == 2
    (line,) = itself.stderr.strip().splitlines()
    assert "is the source directory itself, not a file under it" in line
    other = cli("explain", "f00001.txt", "--source", inbox, "--state", state, "--identity", "path")
    assert other.returncode == 2
    assert "identity='stat'" in other.stderr
    elsewhere = inbox.parent / "elsewhere"
    elsewhere.mkdir()
    refused = cli("explain", "f00001.txt", "--source", elsewhere, "--state", state)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert f"scans {os.path.realpath(inbox)!r}, not {os.path.realpath(elsewhere)!r}" in line


def test_explain_takes_a_relative_path_from_the_current_directory_when_it_names_what_is_there(
    tmp_path: Path, inbox: Path, state: Path
) -> None:
    # (It took a relative PATH from the source whenever, taken from the current directory, it
    # was outside the source: 'q/f2.txt' run where a q/ is, or './b.csv', or an a.csv the
    # current directory has itself, answered for the source's inbox/q/f2.txt, b.csv, a.csv.)
    for name in ("a.csv", "b.csv", "q/f1.txt", "q/f2.txt"):
        (inbox / name).parent.mkdir(exist_ok=True)
        (inbox / name).write_text(name)
    old = time.time() - 30
    for made in inbox.rglob("*"):
        os.utime(made, (old, old))
    run(inbox, state, "--recursive")
    work = tmp_path / "work"
    (work / "q").mkdir(parents=True)
    (work / "q" / "f1.txt").write_text("not the source's")
    (work / "a.csv").write_text("not the source's")

    def answer(path: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return cli("explain", path, "--source", inbox, "--state", state, "--json", cwd=cwd)

    for path in ("q/f2.txt", "q/f1.txt", "a.csv", "./b.csv", "../inbox/../work/q/f2.txt"):
        refused = answer(path, work)
        assert refused.returncode == 2, (path, refused.stdout)
        (line,) = refused.stderr.strip().splitlines()
        assert f"PATH {path!r} is not a file under the source" in line, line
        assert f"it is {os.path.abspath(os.path.join(os.path.realpath(work), path))!r}" in line
        assert "Traceback" not in refused.stderr
    # forget --source takes its PATHs the same way: nothing is forgotten.
    forgot = cli("forget", "q/f2.txt", "--source", inbox, "--state", state, "--yes", cwd=work)
    assert forgot.returncode == 2
    assert "'q/f2.txt' is not a file under the source" in forgot.stderr
    assert state_counts(state)["done"] == 4

    # A name the current directory does not have is the source's relpath, as items shows it;
    # a path landing under the source from the current directory is taken from there.
    for path, cwd, relpath in (
        ("b.csv", work, "b.csv"),
        ("inbox/q/f2.txt", tmp_path, "q/f2.txt"),
        ("work/q/../../inbox/a.csv", tmp_path, "a.csv"),
        ("f2.txt", inbox / "q", "q/f2.txt"),
        ("../b.csv", inbox / "q", "b.csv"),
        ("q/f1.txt", inbox, "q/f1.txt"),
    ):
        found = answer(path, cwd)
        assert found.returncode == 0, (path, found.stderr)
        facts = json.loads(found.stdout)
        assert (facts["relpath"], facts["verdict"]) == (relpath, "done"), path


def test_explain_tells_a_dead_items_error(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    run(inbox, state, FAIL, "--max-attempts", "1")
    facts = explain(state, "f00000.txt")
    assert facts["verdict"] == "dead"
    assert "ValueError: cannot parse f00000.txt" in facts["message"]
    assert "retry --dead" in facts["message"]
    (failure,) = json.loads(cli("failures", "--state", state, "--json").stdout)
    assert failure["finished_at"] >= failure["started_at"]
    assert failure["runner_pid"] == facts["item"]["runner_pid"]
    assert isinstance(failure["runner_pid"], int)
    # When the file is gone, the ledger's record of the name still answers.
    (inbox / "f00000.txt").unlink()
    gone = explain(state, "f00000.txt")
    assert gone["verdict"] == "dead"
    assert gone["message"].startswith("no such file now")


def test_explain_of_a_dead_item_says_where_its_on_dead_move_put_it(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # It said "no such file now" and the error: the file is in the quarantine directory.
    make_files(inbox, 1)
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    run(inbox, state, FAIL, "--max-attempts", "1", "--on-dead", f"move:{quarantine}")
    assert (quarantine / "f00000.txt").exists()

    facts = explain(state, "f00000.txt")

    assert facts["verdict"] == "dead"
    assert f"its post-commit action moved it to {quarantine / 'f00000.txt'}" in facts["message"]
    assert facts["message"].endswith("'asyncbatch retry --dead' puts it back")


def test_explain_tells_whether_the_post_commit_move_was_carried_out(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    archive = tmp_path / "archive"
    archive.mkdir()
    args = ("--source", inbox, "--state", state, "--no-progress", "--on-done", f"move:{archive}")
    cut_short = {"ASYNCBATCH_FAILPOINTS": "before-post-action=kill:1"}
    crashed = cli("run", RECORD, *args, env=cut_short)
    assert crashed.returncode == -9, crashed.stderr
    cut = explain(state, "f00000.txt")
    assert cut["verdict"] == "done"
    assert "is still to be finished" in cut["message"]

    again = cli("run", RECORD, *args)  # finds the done item's file still there: moves it
    assert again.returncode == 0, again.stderr
    assert not (inbox / "f00000.txt").exists()
    moved = explain(state, "f00000.txt")
    assert moved["verdict"] == "done"
    assert "still to be finished" not in moved["message"]
    assert moved["message"].endswith(f"its post-commit action moved it to {archive / 'f00000.txt'}")
    # Told once: the record the verdict answers from, not again as another item of the name.
    text = cli("explain", "f00000.txt", "--state", state)
    assert text.returncode == 0, text.stderr
    assert "other item under the name" not in text.stdout
    assert f"key {moved['other_items'][0]['key']}" in text.stdout

    (archive / "f00000.txt").unlink()
    lost = explain(state, "f00000.txt")["message"]
    assert lost.endswith(f"its file is gone from the source, and {archive} holds no copy of it")


def test_explain_and_forget_while_a_live_runner_holds_the_item(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    log = tmp_path / "calls.log"
    runner = start_recording(inbox, state, log, jobs=1, sleep=30)
    try:
        wait_for(lambda: sum(invocations(log).values()) >= 1)
        facts = explain(state, "f00000.txt")
        assert facts["verdict"] == "leased"
        assert f"leased by pid {runner.pid}" in facts["message"]
        refused = no_terminal("forget", "f00000.txt", "--state", state, "--yes")
        assert refused.returncode == 3, refused.stderr
        assert "forgot 0 item(s)" in refused.stdout
        assert "refused 1 item(s) leased by a runner whose lease has not expired" in refused.stdout
        assert state_counts(state) == {"running": 1}
    finally:
        kill(runner)


def test_explain_of_an_item_whose_runner_was_killed_says_its_lease_is_void(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 1)
    log = tmp_path / "calls.log"
    runner = start_recording(inbox, state, log, jobs=1, sleep=30)
    try:
        wait_for(lambda: sum(invocations(log).values()) >= 1)
    finally:
        kill(runner)  # SIGKILL: its lease is left in the ledger, unexpired
    assert state_counts(state) == {"running": 1}
    assert "STALE" in cli("locks", "--state", state).stdout
    facts = explain(state, "f00000.txt")
    assert facts["verdict"] == "lease-expired"
    assert f"was leased by pid {runner.pid}" in facts["message"]
    assert "that runner is gone (its process is dead)" in facts["message"]
    # As said: the next run takes it over at once (it does not wait for the lease to run out).
    took_over = cli("run", RECORD, "--source", inbox, "--state", state)
    assert took_over.returncode == 0, took_over.stderr
    assert "1 item of runners that are gone put back" in took_over.stderr
    assert state_counts(state) == {"done": 1}


# -- items ---------------------------------------------------------------------------------------


def test_items_lists_the_joblog_filtered_by_state_glob_and_time(inbox: Path, state: Path) -> None:
    make_files(inbox, 4)
    make_files(inbox, 2, prefix="bad")
    run(inbox, state, "--ignore", "bad*")
    run(inbox, state, FAIL, "--max-attempts", "1")

    def listed(*extra: str) -> list[dict[str, Any]]:
        out = cli("items", "--state", state, "--json", *extra)
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    every = listed()
    assert len(every) == 6
    for row in every:
        assert row["finished_at"] >= row["started_at"]
        assert row["duration"] >= 0
        assert isinstance(row["runner_pid"], int)
    dead = listed("--in-state", "dead")
    assert sorted(r["relpath"] for r in dead) == ["bad00000.txt", "bad00001.txt"]
    assert all("ValueError: cannot parse" in r["last_error"] for r in dead)
    assert len(listed("--in-state", "dead", "--in-state", "done")) == 6
    globbed = listed("--glob", "f0000[12]*")
    assert sorted(r["relpath"] for r in globbed) == ["f00001.txt", "f00002.txt"]
    assert len(listed("--since", "1h")) == 6
    assert listed("--until", "1h") == []
    assert len(listed("--time", "finished", "--until", "2999-01-01T00:00")) == 6
    assert len(listed("--limit", "2")) == 2

    table = cli("items", "--state", state, "--in-state", "dead")
    assert table.returncode == 0
    assert "bad00000.txt" in table.stdout
    assert "items of job 'default': 2," in table.stdout
    cut = cli("items", "--state", state, "--limit", "2")
    assert "items of job 'default': 2 of 6 (--limit)," in cut.stdout  # not "2"
    for bad in (
        ("--since", "yesterday-ish"),
        ("--until", "2026-13-45"),
        ("--since", "99999999999999w"),  # no OverflowError traceback
    ):
        refused = cli("items", "--state", state, *bad)
        assert refused.returncode == 2
        (line,) = refused.stderr.strip().splitlines()
        assert repr(bad[1]) in line
        assert bad[0] in line


# -- forget --------------------------------------------------------------------------------------


def test_forget_asks_first_and_never_touches_a_file(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    paths = make_files(inbox, 3)
    log = tmp_path / "calls.log"
    run(inbox, state, log=log)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}

    refused = no_terminal("forget", "f00001.txt", "--state", state)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "--yes" in line
    assert "1 item(s)" in line
    assert state_counts(state) == {"done": 3}

    unknown = no_terminal("forget", "never.txt", "--state", state, "--yes")
    assert unknown.returncode == 2
    (line,) = unknown.stderr.strip().splitlines()
    assert "'never.txt': the ledger holds no item of job 'default' by this name or key" in line
    both = no_terminal("forget", "f00001.txt", "--done-before", "1h", "--state", state)
    assert both.returncode == 2

    code, text = on_terminal("n", "forget", "f00001.txt", "--state", state)
    assert code == 0
    assert "f00001.txt (done" in text
    assert "nothing forgotten" in text
    assert state_counts(state) == {"done": 3}
    code, text = on_terminal(
        "y", "forget", inbox / "f00001.txt", "--source", inbox, "--state", state
    )
    assert code == 0, text
    assert "forgot 1 item(s)" in text
    assert state_counts(state) == {"done": 2}

    forgot = no_terminal("forget", "f00002.txt", "--state", state, "--yes", "--json")
    assert forgot.returncode == 0, forgot.stderr
    result = json.loads(forgot.stdout)
    assert [r["relpath"] for r in result["forgotten"]] == ["f00002.txt"]
    assert result["refused"] == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths} == before

    # The next run handles the forgotten files again, and only them.
    run(inbox, state, log=log)
    handled = invocations(log)
    assert handled == {"f00000.txt": 1, "f00001.txt": 2, "f00002.txt": 2}


def test_forget_done_before_a_time(inbox: Path, state: Path) -> None:
    make_files(inbox, 3)
    run(inbox, state)
    nothing = no_terminal("forget", "--done-before", "1h", "--state", state, "--yes")
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing forgotten" in nothing.stdout
    bad = no_terminal("forget", "--done-before", "soon", "--state", state, "--yes")
    assert bad.returncode == 2
    assert "invalid time 'soon'" in bad.stderr
    asked = no_terminal("forget", "--done-before", "0s", "--state", state)
    assert asked.returncode == 2
    assert "3 item(s)" in asked.stderr
    forgot = no_terminal("forget", "--done-before", "0s", "--state", state, "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert "forgot 3 item(s)" in forgot.stdout
    assert state_counts(state) == {}


def test_status_items_explain_and_forget_take_the_jobs_source_from_the_ledger(
    any_state: str, inbox: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2)
    (inbox / "keep.skip").write_text("x")
    run(inbox, any_state, "--ignore", "*.skip")
    source = os.path.realpath(inbox)
    # Only --state: the job's source (and scan rules) come from the ledger.
    status = json.loads(cli("status", "--state", any_state, "--json").stdout)
    assert status["settings"] == {
        "source": source,
        "recursive": False,
        "follow_symlinks": False,
        "ignore": ["*.skip"],
        "ready": ["age"],
        "settle": 0.0,
    }
    rows = json.loads(cli("items", "--state", any_state, "--json").stdout)
    assert sorted(r["relpath"] for r in rows) == ["f00000.txt", "f00001.txt"]
    assert all(r["runner_pid"] and r["finished_at"] >= r["started_at"] for r in rows)
    assert explain(any_state, "f00000.txt")["verdict"] == "done"
    assert explain(any_state, "keep.skip")["verdict"] == "skipped"
    # The job's own --source, however spelled, is accepted; another is refused, naming both.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (
        ("status",),
        ("items",),
        ("explain", "f00000.txt"),
        ("forget", "f00000.txt", "--yes"),
    ):
        if command[0] != "forget":
            same = cli(*command, "--state", any_state, "--source", f"{inbox}/", "--json")
            assert same.returncode == 0, same.stderr
        refused = no_terminal(*command, "--state", any_state, "--source", elsewhere)
        assert refused.returncode == 2, (command, refused.stderr)
        (line,) = refused.stderr.strip().splitlines()
        assert f"scans {source!r}, not {os.path.realpath(elsewhere)!r} (--source)" in line
    assert len(json.loads(cli("items", "--state", any_state, "--json").stdout)) == 2
    forgot = no_terminal("forget", "f00000.txt", "--state", any_state, "--source", inbox, "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert explain(any_state, "f00000.txt")["verdict"] == "never-seen"


def test_a_state_file_of_an_older_schema_is_upgraded_and_records_each_jobs_source_when_it_runs(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 2)
    db = sqlite3.connect(state)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(sqlite_sql.MIGRATIONS[0])
    db.executescript(sqlite_sql.MIGRATIONS[1])
    db.execute(f"PRAGMA application_id = {sqlite_sql.APPLICATION_ID}")
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO meta VALUES ('secret', ?), ('created_at', '0')", ("ab" * 32,))
    db.execute("INSERT INTO jobs VALUES ('default', 'stat', 0), ('other', 'stat', 0)")
    db.commit()
    db.close()
    old = cli("items", "--state", state)
    assert old.returncode == 2
    (line,) = old.stderr.strip().splitlines()
    assert f"schema version 2, older than the {sqlite_sql.SCHEMA_VERSION}" in line
    assert "the next 'asyncbatch run' with this --state upgrades it" in line
    run(inbox, state)
    db = sqlite3.connect(state)
    assert db.execute("PRAGMA user_version").fetchone() == (sqlite_sql.SCHEMA_VERSION,)
    db.close()
    rows = json.loads(cli("items", "--state", state, "--json").stdout)
    assert sorted(r["relpath"] for r in rows) == ["f00000.txt", "f00001.txt"]
    assert all(r["finished_at"] is not None for r in rows)
    # The job that ran recorded its source; the other records its own on its next run (an
    # upgraded ledger refuses no source), and explain asks for it until then.
    status = json.loads(cli("status", "--state", state, "--json").stdout)
    assert status["settings"]["source"] == os.path.realpath(inbox)
    other = ("--state", state, "--job", "other")
    assert json.loads(cli("status", *other, "--json").stdout)["settings"] is None
    assert "source: not recorded yet" in cli("status", *other).stdout
    asked = cli("explain", "f00000.txt", *other)
    assert asked.returncode == 2
    (line,) = asked.stderr.strip().splitlines()
    assert "job 'other' has no recorded source yet" in line
    assert "give --source" in line
    facts = explain(state, "f00000.txt", "--job", "other", "--source", str(inbox))
    assert facts["verdict"] == "never-seen"
    elsewhere = inbox.parent / "elsewhere"
    make_files(elsewhere, 1)
    run(elsewhere, state, "--job", "other")
    assert explain(state, "f00000.txt", "--job", "other")["source"] == os.path.realpath(elsewhere)


async def test_a_followed_symlinks_post_commit_action_is_carried_out_on_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (With --follow-symlinks the scan records what a link leads to, and the move compared
    # that with the link's own lstat: "left alone: the file was replaced by a newer version",
    # the link left in the source for ever, and explain said "a newer file has its name".)
    from asyncbatch import Batch, TaskContext
    from asyncbatch._pipeline.postactions import PostActions

    inbox, archive, state = tmp_path / "inbox", tmp_path / "archive", tmp_path / "state.db"
    (inbox / "sub").mkdir(parents=True)
    archive.mkdir()
    (inbox / "sub" / "real.csv").write_text("real")
    (inbox / "link.csv").symlink_to("sub/real.csv")
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)

    async def crash(self: PostActions, post: object) -> str:
        raise OSError("simulated crash between the commit and the move")

    batch: dict[str, Any] = {"source": inbox, "state": state, "settle": 0}
    batch.update(follow_symlinks=True, on_done=f"move:{archive}")
    with monkeypatch.context() as m:
        m.setattr(PostActions, "_perform", crash)
        await Batch(handle, **batch).run()
    assert handled == ["link.csv"]
    said = explain(state, inbox / "link.csv")["message"]
    assert "is still to be finished: its file is still there" in said, said

    report = await Batch(handle, **batch).run()  # finishes the move

    assert (report.done, report.done_before, handled) == (0, 1, ["link.csv"])
    assert (archive / "link.csv").is_symlink()  # the link is what moved: its file stays
    assert (inbox / "sub" / "real.csv").read_text() == "real"
    assert not (inbox / "link.csv").is_symlink()


async def test_explain_of_a_duplicate_under_identity_content_names_the_item_it_is(
    tmp_path: Path,
) -> None:
    # (It said "its file is gone from the source" of b.csv, which was right there: the record
    # was a.csv's, the same bytes, deleted after it was done.)
    from asyncbatch import Batch, TaskContext

    inbox, state = tmp_path / "inbox", tmp_path / "state.db"
    inbox.mkdir()
    for name in ("a.csv", "b.csv"):
        (inbox / name).write_text("same")
        os.utime(inbox / name, (time.time() - 10,) * 2)
    os.utime(inbox / "a.csv", (time.time() - 20,) * 2)  # listed first: the item's name

    async def handle(ctx: TaskContext) -> None:
        pass

    report = await Batch(
        handle, source=inbox, state=state, settle=0, identity="content", on_done="delete"
    ).run()
    assert (report.done, sorted(p.name for p in inbox.iterdir())) == (1, ["b.csv"]), report
    said = explain(state, inbox / "b.csv")["message"]
    assert said.startswith(
        "the same item as 'a.csv' (the same file to the job's identity, content)"
    ), said


def _attempts(state: str) -> list[tuple[Any, ...]]:
    """The items' attempts (none before the run made the ledger)."""
    try:
        return ledger_rows(state, "SELECT attempts FROM items")
    except (sqlite3.Error, asyncpg.PostgresError):
        return []


def _finished_by(inbox: Path, state: str, target: str, *extra: str, log: Path | None = None) -> int:
    """One run of ``target`` over ``inbox`` to its end; its pid (the item's runner, if it
    recorded the item's outcome)."""
    env = {"AB_LOG": str(log)} if log else None
    proc = spawn(
        "run", target, "--source", inbox, "--state", state, "--no-progress", *extra, env=env
    )
    proc.communicate(timeout=120)
    assert proc.returncode in (0, 1, -signal.SIGKILL), proc.returncode
    return proc.pid


def _no_attempt_joblog(
    state: str, inbox: Path, relpath: str, runner_pid: int
) -> list[dict[str, Any]]:
    """``items --json``, ``failures --json`` (when it lists it) and ``explain --json``'s records
    of ``relpath``: each says ``runner_pid`` recorded the outcome, and no start or duration."""
    records: list[dict[str, Any]] = json.loads(cli("items", "--state", state, "--json").stdout)
    failures: list[dict[str, Any]] = json.loads(cli("failures", "--state", state, "--json").stdout)
    records += failures
    facts = explain(state, inbox / relpath)  # (a file gone: its latest record is "other")
    records.append(facts["item"] or facts["other_items"][0])
    for record in records:
        assert record["relpath"] == relpath
        assert record["runner_pid"] == runner_pid, record
        assert record["finished_at"] is not None, record
        assert (record["started_at"], record["duration"]) == (None, None), record
    listed = cli("items", "--state", state)
    (line,) = [line for line in listed.stdout.splitlines() if line.endswith(relpath)]
    assert line.split()[2:4] == ["-", "-"], line  # started, took
    assert f"pid {runner_pid} on " in line
    return failures


def test_an_item_given_up_on_has_the_joblog_of_the_run_that_gave_up_without_a_duration(
    any_state: str, inbox: Path, tmp_path: Path
) -> None:
    # Regression: an item given up on (max_interruptions) without an attempt in that run
    # showed that run's pid as the runner of the attempt, and a duration from the start of the
    # killed run's attempt to this run's give-up, across two processes.
    (inbox / "poison.txt").write_text("p")
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log), "AB_SLEEP": "600"}
    handler = f"{HANDLERS}:record_pid"
    for attempt in (1, 2, 3):  # each run killed once its attempt is in the ledger
        proc = spawn("run", handler, "--source", inbox, "--state", any_state, env=env)
        wait_for(lambda: _attempts(any_state) == [(attempt,)])  # noqa: B023
        kill(proc)
    killed = {int(line.split()[0]) for line in log.read_text().splitlines()}
    assert len(killed) == 3
    giver = _finished_by(inbox, any_state, handler, "--max-interruptions", "3", log=log)
    assert giver not in killed
    assert len(log.read_text().splitlines()) == 3  # not called by the run that gave up
    (failure,) = _no_attempt_joblog(any_state, inbox, "poison.txt", giver)
    assert (failure["state"], failure["attempts"]) == ("dead", 3)
    assert failure["error"].startswith("given up on: the runner was killed or stopped")
    said = cli("explain", inbox / "poison.txt", "--state", any_state)
    assert f"by pid {giver} on " in said.stdout, said.stdout
    assert "took" not in said.stdout.split("joblog:")[0]
    assert "took -" in said.stdout


def test_an_item_found_vanished_has_the_runner_that_found_it_gone_without_a_duration(
    any_state: str, inbox: Path
) -> None:
    # Regression: an item tried by one run, then found vanished by another (vanishing is not
    # an attempt), kept the earlier attempt's start: a duration across the two processes.
    (inbox / "gone.txt").write_text("g")
    _finished_by(inbox, any_state, FAIL, "--max-attempts", "1")
    assert cli("retry", "--dead", "--state", any_state).returncode == 0
    (inbox / "gone.txt").unlink()
    finder = _finished_by(inbox, any_state, RECORD)
    assert _no_attempt_joblog(any_state, inbox, "gone.txt", finder) == []
    said = cli("explain", inbox / "gone.txt", "--state", any_state)
    assert "vanished at " in said.stdout
    assert f"found so by pid {finder} on " in said.stdout


def test_forget_of_a_dead_item_retry_cleared_does_not_say_the_ledger_never_saw_it(
    inbox: Path, state: Path
) -> None:
    # Regression: `retry --dead KEY` clears a dead item whose file changed since (its new
    # version is a new item); `forget KEY` then said "the ledger never saw it", which it had.
    (inbox / "a.txt").write_text("a")
    run(inbox, state, FAIL, "--max-attempts", "1")
    (item,) = json.loads(cli("items", "--state", state, "--json").stdout)
    (inbox / "a.txt").write_text("a, fixed")
    cleared = cli("retry", "--dead", item["key"], "--state", state)
    assert cleared.returncode == 0, cleared.stderr
    assert "cleared" in cleared.stdout
    for name in (item["key"], "a.txt"):
        refused = no_terminal("forget", name, "--state", state, "--yes")
        assert refused.returncode == 2
        (line,) = refused.stderr.strip().splitlines()
        assert "never saw" not in line
        assert f"{name!r}: the ledger holds no item of job 'default' by this name or key" in line
        assert "(never seen, or already forgotten)" in line


def _as_before(listing: str) -> str:
    """What ``json.dumps(..., indent=2)`` of the whole list printed: the format kept."""
    return json.dumps(json.loads(listing), indent=2) + "\n"


def test_json_listings_are_read_in_pages_and_written_as_before(inbox: Path, state: Path) -> None:
    make_files(inbox, 5)
    run(inbox, state)
    make_files(inbox, 4, prefix="bad")
    run(inbox, state, FAIL, "--max-attempts", "1")
    whole = cli("items", "--state", state, "--json")
    assert whole.returncode == 0, whole.stderr
    assert len(json.loads(whole.stdout)) == 9
    assert whole.stdout == _as_before(whole.stdout)
    for page in ("1", "2", "4"):  # several pages, a last one full or not
        paged = cli("items", "--state", state, "--json", "--page", page)
        assert paged.stdout == whole.stdout
        cut = cli("items", "--state", state, "--json", "--page", page, "--limit", "3")
        assert cut.stdout == _as_before(json.dumps(json.loads(whole.stdout)[:3]))
        text = cli("items", "--state", state, "--page", page, "--limit", "3")
        assert text.stdout == cli("items", "--state", state, "--limit", "3").stdout
        assert "3 of 9 (--limit)" in text.stdout
        assert len(text.stdout.splitlines()) == 5
        failed = cli("failures", "--state", state, "--json", "--page", page)
        assert failed.returncode == 0, failed.stderr
        assert failed.stdout == _as_before(failed.stdout)
        assert sorted(r["relpath"] for r in json.loads(failed.stdout)) == [
            f"bad{i:05d}.txt" for i in range(4)
        ]
    none = cli("items", "--state", state, "--json", "--in-state", "pending", "--page", "2")
    assert none.stdout == "[]\n"
    assert cli("failures", "--state", state, "--json", "--limit", "2").stdout == _as_before(
        json.dumps(json.loads(cli("failures", "--state", state, "--json").stdout)[:2])
    )


def test_a_json_listing_to_a_closed_pipe_exits_quietly(inbox: Path, state: Path) -> None:
    make_files(inbox, 5)
    run(inbox, state)
    for command in ("items", "failures"):
        reader, writer = os.pipe()
        os.close(reader)  # `| head` gone before the first page is written
        done = subprocess.run(
            [sys.executable, "-m", "asyncbatch", command, "--state", str(state), "--json"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, **WARNINGS_FAIL},
        )
        os.close(writer)
        assert done.returncode == 128 + signal.SIGPIPE
        assert done.stderr == ""


def test_forget_done_before_forgets_a_page_a_transaction_and_lists_all(
    inbox: Path, state: Path
) -> None:
    make_files(inbox, 5)
    run(inbox, state)
    forgot = no_terminal(
        "forget", "--done-before", "0s", "--state", state, "--yes", "--json", "--page", "2"
    )
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout == _as_before(forgot.stdout)
    out = json.loads(forgot.stdout)
    assert sorted(i["relpath"] for i in out["forgotten"]) == [f"f{i:05d}.txt" for i in range(5)]
    assert out["refused"] == []
    assert state_counts(state) == {}
    run(inbox, state)
    forgot = no_terminal("forget", "--done-before", "0s", "--state", state, "--yes", "--page", "2")
    assert forgot.returncode == 0, forgot.stderr
    assert "forgot 5 item(s)" in forgot.stdout
    assert state_counts(state) == {}
