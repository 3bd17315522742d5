"""The readiness rules on the command line: the job's rules kept (or changed on purpose), a
kill between a file's and its marker's post-commit actions, explain rule by rule, status and
/metrics by rule."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncbatch import Batch, TaskContext
from asyncbatch._ready import parse_rule

from .conftest import HANDLERS, cli, invocations, ledger_rows, until
from .test_ready import write
from .test_sharing import assert_adds_up

RECORD = f"{HANDLERS}:record"


def run(inbox: Path, state: str, *args: str | Path, env: dict[str, str] | None = None) -> str:
    """``asyncbatch run`` with the record handler: exit 0, its report."""
    result = cli("run", RECORD, "--source", inbox, "--state", state, "--no-progress", *args,
                 env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_run_with_other_rules_is_refused_unless_it_gives_them_on_purpose(
    inbox: Path, any_state: str
) -> None:
    a = write(inbox / "a.csv")
    write(inbox / "a.csv.done", after=a)
    write(inbox / "b.csv")
    assert "1 seen: 1 done; 1 file not ready yet: marker missing, or older than its file" in run(
        inbox, any_state, "--ready", "marker:.done"
    )
    # Without --ready a run would take b.csv, whose producer has not said it is complete.
    refused = cli("run", RECORD, "--source", inbox, "--state", any_state)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "is ready by marker:.done, not age: give --ready marker:.done" in line
    # The job's rules, given: no change. Other rules, given: a change, said and kept.
    same = cli("run", RECORD, "--source", inbox, "--state", any_state, "--ready", "marker:.done")
    assert same.returncode == 0
    assert same.stderr == ""
    other = cli("run", RECORD, "--source", inbox, "--state", any_state, "--ready", "age")
    assert other.returncode == 0, other.stderr
    assert "ready: marker:.done -> age" in other.stderr
    # Without the marker rule, a.csv.done is no marker: an input like any other.
    assert "3 seen: 2 done, 1 done before" in other.stdout
    history = json.loads(cli("history", "--state", any_state, "--json").stdout)
    assert [r["settings_changed"] for r in history] == ["ready: marker:.done -> age", None, None]
    status = json.loads(cli("status", "--state", any_state, "--json").stdout)
    assert status["settings"]["ready"] == ["age"]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("min-size:99999999999999999999999", "a size from 0 to 1024T"),
        ("min-size:2048T", "a size from 0 to 1024T"),
        ("stable:" + "9" * 5000, "N a whole number from 2 to 100"),
        ("max-age:" + "9" * 400, "at most a century"),
    ],
)
def test_a_rule_number_out_of_bounds_is_refused_in_one_line_naming_it(
    inbox: Path, tmp_path: Path, rule: str, expected: str
) -> None:
    write(inbox / "a.csv")
    state = tmp_path / "bounds.db"
    refused = cli("run", RECORD, "--source", inbox, "--state", state, "--ready", rule)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert f"argument --ready: invalid value {rule!r}: expected " in line
    assert expected in line
    assert not state.exists()  # nothing recorded


@pytest.mark.parametrize("action", ["move", "delete"])
def test_a_kill_between_a_files_and_its_markers_action_loses_nothing(
    inbox: Path, any_state: str, tmp_path: Path, action: str
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    on_done = f"move:{archive}" if action == "move" else "delete"
    log = tmp_path / "calls.log"
    names = [f"f{i}.csv" for i in range(3)]
    for name in names:
        f = write(inbox / name, name.encode())
        write(inbox / f"{name}.done", after=f)
    args = ("--ready", "marker:.done", "--on-done", on_done, "-j", "1")
    kill = {"AB_LOG": str(log), "ASYNCBATCH_FAILPOINTS": "before-marker-action=kill"}
    killed = cli("run", RECORD, "--source", inbox, "--state", any_state, *args, env=kill)
    assert killed.returncode == -signal.SIGKILL
    # Files' actions were done (up to four run at once), their markers' not: the markers are
    # left without their files.
    left = sorted(p.name for p in inbox.iterdir())
    orphans = [n for n in left if n.endswith(".done") and n[: -len(".done")] not in left]
    assert orphans
    assert len(left) == 3 + (3 - len(orphans))
    run(inbox, any_state, *args, env={"AB_LOG": str(log)})
    assert sorted(p.name for p in inbox.iterdir()) == []
    if action == "move":
        assert sorted(p.name for p in archive.iterdir()) == sorted(
            [*names, *(f"{n}.done" for n in names)]
        )
        assert all((archive / n).read_bytes() == n.encode() for n in names)
    # Each file handled (an item in flight when the kill came is handled again: at least
    # once) and done once; none lost.
    assert set(invocations(log)) == set(names)
    done = ledger_rows(any_state, "SELECT relpath, state FROM items ORDER BY relpath")
    assert [(bytes(r).decode(), s) for r, s in done] == [(n, "done") for n in names]


@pytest.mark.parametrize("action", ["move", "delete"])
def test_a_marker_that_lands_before_its_file_waits_for_it(
    inbox: Path, any_state: str, tmp_path: Path, action: str
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    on_done = f"move:{archive}" if action == "move" else "delete"
    args = ("--ready", "marker:.done", "--on-done", on_done)
    marker = write(inbox / "big.csv.done")  # a parallel copy that keeps times: the small
    mtime = os.stat(marker).st_mtime_ns  # marker first, the file still under a temp name
    run(inbox, any_state, *args)
    run(inbox, any_state, *args)
    assert sorted(p.name for p in inbox.iterdir()) == ["big.csv.done"]  # not a leftover
    big = write(inbox / "big.csv", b"data")
    os.utime(big, ns=(mtime - 10**9, mtime - 10**9))  # its source's time: before the marker
    assert "1 seen: 1 done" in run(inbox, any_state, *args)
    assert sorted(p.name for p in inbox.iterdir()) == []
    if action == "move":
        assert sorted(p.name for p in archive.iterdir()) == ["big.csv", "big.csv.done"]


def test_a_kill_before_a_directory_markers_action_is_finished_by_the_next_run(
    inbox: Path, any_state: str, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    last = write(inbox / "out" / "part-0")
    write(inbox / "out" / "_SUCCESS", after=last)
    args = ("--ready", "dir-marker:_SUCCESS", "--recursive", "--on-done", f"move:{archive}")
    killed = cli("run", RECORD, "--source", inbox, "--state", any_state, *args,
                 env={"ASYNCBATCH_FAILPOINTS": "before-marker-action=kill"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert (archive / "out" / "part-0").exists()
    assert (inbox / "out" / "_SUCCESS").exists()
    assert "0 seen: 0 done" in run(inbox, any_state, *args)
    assert not (inbox / "out" / "_SUCCESS").exists()
    assert (archive / "out" / "_SUCCESS").exists()


# -- explain ----------------------------------------------------------------------------------


def explain_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``asyncbatch explain ARGS`` as given (``cli`` would add ``--settle 0``)."""
    return subprocess.run(
        [sys.executable, "-m", "asyncbatch", "explain", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def explain(state: str, path: Path, *extra: str) -> dict[str, Any]:
    out = explain_cli(path, "--state", state, "--json", *extra)
    assert out.returncode == 0, out.stderr
    facts: dict[str, Any] = json.loads(out.stdout)
    return facts


def test_explain_names_each_rule_and_whether_it_holds_with_only_the_state(
    inbox: Path, any_state: str
) -> None:
    old = write(inbox / "old.csv", b"x" * 2000)
    week = time.time() - 8 * 86400
    os.utime(old, (week, week))
    small = write(inbox / "sub" / "small.csv", b"x")
    write(inbox / "sub" / "small.csv.done", after=small)
    rules = ("marker:.done", "dir-marker:_SUCCESS", "min-size:1k", "max-age:7d", "age")
    args = [a for r in rules for a in ("--ready", r)]
    run(inbox, any_state, "--recursive", "--settle", "30", *args)
    # Only --state: the rules and the settle window are the job's, as its run recorded them.
    facts = explain(any_state, small)
    assert facts["verdict"] == "not-ready"
    recorded = sorted(str(parse_rule(r)) for r in rules)
    assert (facts["ready"], facts["settle"]) == (recorded, 30.0)
    said = {r["rule"]: (r["holds"], r["why"]) for r in facts["rules"]}
    assert said["marker:.done"] == (True, "marker sub/small.csv.done present")
    assert said["dir-marker:_SUCCESS"] == (False, "no _SUCCESS in sub or above it")
    assert said["min-size:1024"] == (False, "size 1 bytes, min-size 1024")
    assert said["max-age:7d"][0] is True
    assert said["age"][0] is False
    assert said["age"][1].endswith("old, settle 30 s")
    assert facts["message"] == (
        f"not ready yet: age: {said['age'][1]}; dir-marker:_SUCCESS: no _SUCCESS in sub or "
        "above it; min-size:1024: size 1 bytes, min-size 1024"
    )
    old_facts = explain(any_state, old)
    assert "; marker:.done: marker old.csv.done missing; " in str(old_facts["message"])
    assert "dir-marker:_SUCCESS: no _SUCCESS in the source;" in str(old_facts["message"])
    text = explain_cli(old, "--state", any_state).stdout
    assert "rule max-age:7d: does not hold (mtime 8.0 d old, max-age 7d: left alone)" in text
    assert "rule age: does not hold (ctime " in text  # copied: its mtime set back
    marker = explain(any_state, inbox / "sub" / "small.csv.done")
    assert marker["verdict"] == "marker"
    assert "a marker of sub/small.csv: markers are never inputs" in str(marker["message"])
    # What if: other rules, another settle window.
    assert explain(any_state, old, "--ready", "age", "--settle", "0")["verdict"] == "never-seen"
    bad = explain_cli(old, "--state", any_state, "--ready", "stable:1")
    assert bad.returncode == 2
    assert "argument --ready: invalid value 'stable:1'" in bad.stderr


def test_explain_says_the_age_of_mtime_and_ctime_each_as_it_is(inbox: Path, any_state: str) -> None:
    copied = write(inbox / "copied.csv")
    past = time.time() - 10 * 86400
    os.utime(copied, (past, past))  # an mtime set back 10 days; the ctime is now
    fresh = write(inbox / "fresh.csv")
    os.utime(fresh, ns=(os.stat(fresh).st_ctime_ns,) * 2)  # mtime = ctime
    run(inbox, any_state, "--ready", "age", "--settle", "3600")
    text = explain_cli(copied, "--state", any_state, "--settle", "0").stdout
    (line,) = [x for x in text.splitlines() if x.startswith("rule age:")]
    assert re.fullmatch(
        r"rule age: holds \(ctime \d+\.\d s old \(mtime 10\.0 d old: the younger decides\), "
        r"settle 0 s\)",
        line,
    ), line
    waits = explain(any_state, copied)["rules"][0]
    assert waits["holds"] is False
    assert re.fullmatch(
        r"ctime \d+\.\d s old \(mtime 10\.0 d old: the younger decides\), settle 3600 s",
        waits["why"],
    ), waits
    both = explain(any_state, fresh, "--settle", "0")["rules"][0]
    assert re.fullmatch(r"mtime and ctime \d+\.\d s old, settle 0 s", both["why"]), both


def test_explain_takes_stable_n_looks_as_a_run_does(inbox: Path, any_state: str) -> None:
    f = write(inbox / "a.csv")
    run(inbox, any_state, "--ready", "stable:2", "--ready", "min-size:5", "--settle", "0.1")
    facts = explain(any_state, f)
    said = {r["rule"]: (r["holds"], r["why"]) for r in facts["rules"]}
    assert said["stable:2"] == (True, "seen unchanged 2 of 2 looks, 0.1 s apart")
    assert said["min-size:5"] == (False, "size 1 bytes, min-size 5")


def test_explain_takes_a_symlink_for_a_marker_only_where_the_job_follows_symlinks(
    inbox: Path, any_state: str
) -> None:
    a = write(inbox / "a.csv")
    write(inbox / "real", after=a)
    os.symlink("real", inbox / "a.csv.done")  # the scan does not follow it: no marker
    b = write(inbox / "out" / "b.csv")
    write(inbox / "out" / "real", after=b)
    os.symlink("real", inbox / "out" / "_SUCCESS")
    rules = ("--ready", "marker:.done", "--ready", "dir-marker:_SUCCESS", "--recursive")
    assert "0 seen: 0 done" in run(inbox, any_state, *rules)
    facts = explain(any_state, a)
    assert facts["verdict"] == "not-ready"
    said = {r["rule"]: (r["holds"], r["why"]) for r in facts["rules"]}
    assert said["marker:.done"] == (False, "marker a.csv.done missing")
    facts = explain(any_state, b)
    said = {r["rule"]: (r["holds"], r["why"]) for r in facts["rules"]}
    assert facts["verdict"] == "not-ready"
    assert said["dir-marker:_SUCCESS"] == (False, "no _SUCCESS in out or above it")
    # What if the job followed them: they are markers, as to such a run.
    followed = explain(any_state, b, "--follow-symlinks")
    said = {r["rule"]: (r["holds"], r["why"]) for r in followed["rules"]}
    assert said["dir-marker:_SUCCESS"] == (True, "out/_SUCCESS present")


# -- status and metrics -------------------------------------------------------------------------


def test_status_says_what_the_last_run_left_by_rule(inbox: Path, any_state: str) -> None:
    write(inbox / "a.csv")
    write(inbox / "b.csv", b"x" * 100)
    run(inbox, any_state, "--ready", "marker:.done", "--ready", "min-size:10")
    text = cli("status", "--state", any_state, env={"COLUMNS": "300"}).stdout
    assert (
        "left in the source by the last run (at its end): "
        "1 not ready yet: marker missing, or older than its file "
        "(waits for its marker, or a newer one), "
        "1 not ready yet: smaller than min-size (waits until it grows to min-size)\n"
    ) in text
    assert "the next run takes" not in text
    last = json.loads(cli("status", "--state", any_state, "--json").stdout)["last_run"]
    assert (last["unmarked"], last["too_small"], last["seen"]) == (1, 1, 0)


@pytest.mark.parametrize(
    ("rule", "marker", "words", "why"),
    [
        (
            "marker:.done",
            "a.csv.done",
            "marker missing, or older than its file (waits for its marker, or a newer one)",
            "marker a.csv.done older than the file (modified after its marker)",
        ),
        (
            "dir-marker:_SUCCESS",
            "_SUCCESS",
            "directory marker missing, or older than its file "
            "(waits for its directory's marker, or a newer one)",
            "_SUCCESS older than the file (modified after its marker)",
        ),
    ],
)
def test_run_status_and_explain_agree_on_a_file_modified_after_its_marker(
    inbox: Path, any_state: str, rule: str, marker: str, words: str, why: str
) -> None:
    a = write(inbox / "a.csv")
    done = write(inbox / "b.csv")
    write(inbox / marker)
    now = time.time_ns()
    os.utime(inbox / marker, ns=(now - 60 * 10**9, now - 60 * 10**9))
    os.utime(done, ns=(now - 90 * 10**9, now - 90 * 10**9))  # before its marker: ready
    os.utime(a, ns=(now - 30 * 10**9, now - 30 * 10**9))  # after its marker: waits
    if rule.startswith("marker"):
        write(inbox / "b.csv.done")
    out = run(inbox, any_state, "--ready", rule)
    assert assert_adds_up(out) == {"done": 1}
    label = words.partition(" (")[0]
    assert f"1 seen: 1 done; 1 file not ready yet: {label};" in out
    text = cli("status", "--state", any_state, env={"COLUMNS": "300"}).stdout
    assert f"left in the source by the last run (at its end): 1 not ready yet: {words}\n" in text
    said = {r["rule"]: (r["holds"], r["why"]) for r in explain(any_state, a)["rules"]}
    assert said[rule] == (False, why)


def test_status_says_files_left_alone_by_max_age_are_never_taken(
    inbox: Path, any_state: str
) -> None:
    write(inbox / "new.csv")
    for name in ("old.csv", "older.csv"):
        write(inbox / name)
        past = time.time() - 10 * 86400
        os.utime(inbox / name, (past, past))
    write(inbox / "late.csv")
    os.utime(inbox / "late.csv", (time.time() + 3600, time.time() + 3600))  # not settled yet
    run(inbox, any_state, "--ready", "max-age:7d", "--ready", "age", "--settle", "0")
    text = cli("status", "--state", any_state, env={"COLUMNS": "300"}).stdout
    assert (
        "left in the source by the last run (at its end): 1 not settled yet (taken once it "
        "settles), 2 left alone: older than max-age (never taken unless modified again or the "
        "rules change)\n"
    ) in text
    assert "the next run takes" not in text


@pytest.mark.parametrize("sharing", [(), ("--shared",)], ids=["alone", "shared"])
def test_a_file_done_before_the_rules_changed_is_counted_done_before_not_waiting(
    inbox: Path, any_state: str, sharing: tuple[str, ...]
) -> None:
    """A done file that fails rules given later (no marker, older than max-age) is done: the
    next run would not take it, so no report or status says it waits. A shared run counts
    the job's listing: the same (it said "0 seen: 0 done")."""
    two_days = time.time() - 2 * 86400
    for name in ("a.csv", "b.csv"):
        write(inbox / name)
        os.utime(inbox / name, (two_days, two_days))
    assert "2 seen: 2 done;" in run(inbox, any_state, *sharing)
    write(inbox / "new.csv")  # never done: it waits for its marker
    out = run(inbox, any_state, "--ready", "marker:.ok", *sharing)
    assert (
        "2 seen: 0 done, 2 done before; 1 file not ready yet: marker missing, or older than its "
        "file;"
    ) in out
    text = cli("status", "--state", any_state, env={"COLUMNS": "300"}).stdout
    assert (
        "left in the source by the last run (at its end): 1 not ready yet: marker missing, or "
        "older than its file (waits for its marker, or a newer one)\n"
    ) in text
    last = json.loads(cli("status", "--state", any_state, "--json").stdout)["last_run"]
    assert (last["seen"], last["done_before"], last["unmarked"]) == (2, 2, 1)
    facts = explain(any_state, inbox / "a.csv")
    assert facts["verdict"] == "done", facts
    # A backlog bound given later: the done files older than it are done, not left alone.
    write(inbox / "old.csv")
    os.utime(inbox / "old.csv", (two_days, two_days))
    out = run(inbox, any_state, "--ready", "max-age:1d", *sharing)
    assert "3 seen: 1 done, 2 done before; 1 file left alone: older than max-age;" in out
    last = json.loads(cli("status", "--state", any_state, "--json").stdout)["last_run"]
    assert (last["seen"], last["done"], last["done_before"], last["too_old"]) == (3, 1, 2, 1)


async def test_metrics_count_the_files_not_ready_by_rule(inbox: Path, state: Path) -> None:
    write(inbox / "a.csv", b"x" * 100)
    write(inbox / "small.csv")
    done = anyio.Event()

    async def handle(ctx: TaskContext) -> None:
        done.set()

    batch = Batch(handle, source=inbox, state=state, settle=0, poll=0.05, metrics=True,
                  ready=["min-size:10", "max-age:7d"])  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(batch.watch)
        with anyio.fail_after(30):
            await done.wait()
            await until(lambda: (s := batch.statistics()) is not None and s.too_small == 1)
        transport = httpx.ASGITransport(app=batch.metrics_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://batch") as client:
            text = (await client.get("/metrics")).text
        batch.stop()
    found = {
        s.labels["rule"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "asyncbatch_files_not_ready"
    }
    assert found == {
        "age": 0.0,
        "stable": 0.0,
        "marker": 0.0,
        "dir-marker": 0.0,
        "min-size": 1.0,
        "max-age": 0.0,
    }


def test_explain_answers_from_the_ledger_for_a_version_it_holds(
    inbox: Path, any_state: str
) -> None:
    f = write(inbox / "a.csv")
    run(inbox, any_state)
    os.chmod(f, 0o600)  # its ctime is now: a run with a long --settle would wait for it
    facts = explain(any_state, f, "--settle", "60")
    assert facts["verdict"] == "done"  # this version is done: no run handles it again
    (rule,) = facts["rules"]
    assert rule["rule"] == "age"
    assert rule["holds"] is False
    assert rule["why"].startswith("ctime ")
