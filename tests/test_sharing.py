"""Runners that share a job share its files, and say only what is true about them (issue 9)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import pytest

from asyncbatch import Batch, LedgerError, Report, TaskContext
from asyncbatch import _failpoints as failpoints
from asyncbatch._config import BatchConfig
from asyncbatch._ledger import Outcome, open_ledger
from asyncbatch._ledger.sqlite import SQLiteLedger
from asyncbatch._pipeline.claimer import Claimer
from asyncbatch._pipeline.queues import ItemQueue, LeasedItem
from asyncbatch._pipeline.shared import (
    SharedRun,
    TwinEnds,
    _registered_and_finished_by_others,
    _take_up_twins,
    finished_twins,
    shared_report,
)
from asyncbatch._pipeline.state import RunState
from asyncbatch._procinfo import this_process
from asyncbatch._report import Counters
from asyncbatch._scanner import split

from .conftest import (
    HANDLERS,
    WARNINGS_FAIL,
    cli,
    invocations,
    kill,
    make_files,
    polls_after,
    rows,
    run_start,
    settled_now,
    spawn,
    state_counts,
    until,
    until_settled,
    wait_for,
)
from .test_service import Samples, samples, serving_address, value

RECORD = f"{HANDLERS}:record"
HERE = Path(__file__).parent
#: "job 'default': 2000 seen: 228 done, 1772 done before; ..." -> the categories and counts.
_CATEGORY = re.compile(
    r"(\d+) (done before|done|held by other runners|waiting for a retry|"
    r"dead before|dead|vanished|unfinished)\b"
)


def report_counts(stdout: str) -> tuple[int, dict[str, int]]:
    """``(seen, {category: count})`` from a run's report line."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("job ")]
    seen = int(re.search(r": (\d+) seen: ", line)[1])  # type: ignore[index]
    head, _, _ = line.partition(";")
    return seen, {what: int(n) for n, what in _CATEGORY.findall(head.split(" seen: ", 1)[1])}


def assert_adds_up(stdout: str) -> dict[str, int]:
    seen, counts = report_counts(stdout)
    assert sum(counts.values()) == seen, stdout
    return counts


def status_json(state: Path | str) -> dict[str, object]:
    result = cli("status", "--state", state, "--json")
    assert result.returncode == 0, result.stderr
    value: dict[str, object] = json.loads(result.stdout)
    return value


def test_a_later_shared_runner_gets_its_share_and_both_exit_0_when_all_are_done(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2000)
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.1"}  # ~160 files/s a runner: 12 s alone
    args = ("run", RECORD, "--source", inbox, "--state", state, "--shared", "--no-progress")
    first = spawn(*args, "-j", "16", env=env)
    # The second starts once the first is well under way (not after a fixed sleep: on a loaded
    # machine the first may not have started by then), with most of the work still ahead.
    deadline = time.monotonic() + 60
    while (not log.exists() or len(log.read_text().splitlines()) < 100) and (
        time.monotonic() < deadline and first.poll() is None
    ):
        time.sleep(0.05)
    second = spawn(*args, "-j", "16", env=env)
    outputs = [p.communicate(timeout=300) for p in (first, second)]

    for proc, (out, err) in zip((first, second), outputs, strict=True):
        assert proc.returncode == 0, err
        counts = assert_adds_up(out)
        assert set(counts) <= {"done", "done before"}, out  # nothing left held or unfinished
    assert state_counts(state) == {"done": 2000}
    calls = invocations(log)
    assert len(calls) == 2000
    assert max(calls.values()) == 1
    dones = [report_counts(out)[1].get("done", 0) for out, _ in outputs]
    assert sum(dones) == 2000
    assert min(dones) >= 500, dones  # the later runner did at least a quarter


def test_a_shared_runner_waits_for_a_killed_runners_items_and_takes_them_over(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 200)
    log = tmp_path / "calls.log"
    args = ("run", RECORD, "--source", inbox, "--state", state, "--shared", "--no-progress")
    victim = spawn(*args, "-j", "8", "--lease", "4", env={"AB_LOG": str(log), "AB_SLEEP": "0.2"})
    wait_for(lambda: len(invocations(log)) >= 16)
    kill(victim)
    held = state_counts(state).get("running", 0)
    assert held > 0
    # The victim's pid is dead on this host: its items are taken over at once.
    survivor = cli(*args, "-j", "8", env={"AB_LOG": str(log), "AB_SLEEP": "0"})
    assert survivor.returncode == 0, survivor.stderr
    assert_adds_up(survivor.stdout)
    assert state_counts(state) == {"done": 200}
    assert set(invocations(log)) == {p.name for p in inbox.iterdir()}
    # The killed run is marked killed in the history, with its counts as of its last beat.
    history = json.loads(cli("history", "--state", state, "--json").stdout)
    assert [r["exit_status"] for r in history] == ["ok", "killed"]


def test_runners_that_go_by_a_listing_begun_after_their_work_count_each_file_once(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    # The lister is killed; a runner started then lists the source again, and finds done the
    # files the other one had finished: they were counted twice ("773 seen: 289 done, 484
    # done before" for 600 files).
    make_files(inbox, 300)
    args = ("run", RECORD, "--source", inbox, "--state", state, "--shared", "--no-progress")
    logs = [tmp_path / f"{name}.log" for name in ("lister", "other", "later")]
    env = [{"AB_LOG": str(log), "AB_SLEEP": "0.05"} for log in logs]
    lister = spawn(*args, "-j", "4", env=env[0])
    wait_for(lambda: len(invocations(logs[0])) >= 8, 60)
    other = spawn(*args, "-j", "4", env=env[1])
    wait_for(lambda: len(invocations(logs[1])) >= 8, 60)
    kill(lister)
    later = spawn(*args, "-j", "4", env=env[2])
    for proc in (other, later):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        counts = assert_adds_up(out)
        assert report_counts(out)[0] == 300, out
        assert set(counts) <= {"done", "done before"}, out
    assert state_counts(state) == {"done": 300}


def test_no_wait_ends_at_once_and_says_how_many_files_others_hold(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 100)
    log = tmp_path / "calls.log"
    args = ("run", RECORD, "--source", inbox, "--state", state, "--shared", "--no-progress")
    holder = spawn(*args, "-j", "100", env={"AB_LOG": str(log), "AB_SLEEP": "30"})
    try:
        wait_for(lambda: len(invocations(log)) >= 100)
        result = cli(*args, "--no-wait")
    finally:
        kill(holder, signal.SIGKILL)
    assert result.returncode == 3, result.stderr
    counts = assert_adds_up(result.stdout)
    assert counts == {"held by other runners": 100, "done": 0}
    ((status,),) = rows(state, "SELECT exit_status FROM runs WHERE exit_status = 'held'")
    assert status == "held"


def test_a_stopped_run_says_stopped_and_counts_what_it_did_not_reach(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 3000)
    log = tmp_path / "calls.log"
    proc = spawn(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "8",
        "--no-progress",
        "--grace",
        "5",
        env={"AB_LOG": str(log), "AB_SLEEP": "0.01"},
    )
    wait_for(lambda: len(invocations(log)) >= 200)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "job 'default' stopped:" in out
    counts = assert_adds_up(out)
    assert "done before" not in counts, out  # a fresh run skips nothing
    assert counts["done"] == state_counts(state)["done"]
    assert counts["unfinished"] == 3000 - counts["done"]


def test_status_during_a_run_shows_its_counts_as_of_its_heartbeat(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 400)
    log = tmp_path / "calls.log"
    proc = spawn(
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "4",
        "--no-progress",
        "--lease",
        "3",
        env={"AB_LOG": str(log), "AB_SLEEP": "0.5"},  # ~50 s of work: stopped long before
    )
    try:
        wait_for(lambda: len(invocations(log)) >= 8)
        # Until a heartbeat (every lease / 4) recorded the run's progress.
        wait_for(lambda: last_run_done(state) > 0, timeout=60, interval=0.3)
        last = status_json(state)["last_run"]
        assert isinstance(last, dict)
        assert last["exit_status"] is None
        assert last["seen"] == 400
        assert 0 < last["done"] < 400
    finally:
        kill(proc, signal.SIGTERM)


def test_shared_runners_export_the_seen_their_reports_count_while_they_run(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    """Each runner's /metrics (and the history row its heartbeat writes, which ``status``
    shows) says ``seen`` as its report counts it, the job's listing, while it runs: the runner
    that did not list said 0 seen beside its done, and ``status`` said its done were all it
    had seen."""
    files = 160
    make_files(inbox, files)
    log = tmp_path / "calls.log"
    env = {"AB_LOG": str(log), "AB_SLEEP": "0.2"}  # 10 files/s a runner: 8 s for both
    args = (
        *("run", RECORD, "--source", inbox, "--state", state, "--shared", "--no-progress"),
        *("-j", "2", "--lease", "4", "--metrics", "127.0.0.1:0", "--log-level", "INFO"),
    )  # a heartbeat a second
    lister = spawn(*args, env=env)
    runners = [lister]
    try:
        addresses = [serving_address(lister)]
        wait_for(lambda: len(invocations(log)) >= 4)  # it listed (and works on the files)
        # Started after that listing began (it may have missed files settled since): it takes
        # the role over, and lists again.
        other = spawn(*args, env=env)
        runners.append(other)
        addresses.append(serving_address(other))
        scraped = []
        for address in addresses:
            with httpx.Client(base_url=f"http://{address}", timeout=10) as client:

                def scrape(client: httpx.Client = client) -> Samples:
                    return samples(client.get("/metrics").text)

                wait_for(lambda: value(scrape(), "asyncbatch_items_total", outcome="done") >= 5)
                found = scrape()
            assert value(found, "asyncbatch_running") == 1, "scraped while it runs"
            assert value(found, "asyncbatch_items_seen_total") == files
            categories = sum(
                value(found, "asyncbatch_items_total", outcome=outcome)
                for outcome in ("done", "done_before", "dead", "dead_before", "vanished")
            ) + sum(value(found, "asyncbatch_items_open", why=why) for why in ("held", "waiting"))
            assert 5 <= categories < files, found
            scraped.append(found)
        assert value(scraped[1], "asyncbatch_lister") == 1  # (the first: 1 or 0, as scraped)

        def other_live() -> dict[str, object] | None:
            last = status_json(state)["last_run"]  # the run started last: the other one's
            assert isinstance(last, dict)
            return last if last["exit_status"] is None and int(last["done"]) > 0 else None

        # Until a heartbeat (every lease / 4) recorded its progress, while it runs.
        wait_for(lambda: (last := other_live()) is not None and last["seen"] == files, 30, 0.2)
        outputs = [proc.communicate(timeout=120) for proc in runners]
    finally:
        for proc in runners:
            if proc.poll() is None:
                kill(proc)
    for proc, found, (out, err) in zip(runners, scraped, outputs, strict=True):
        assert proc.returncode == 0, err
        counts = assert_adds_up(out)
        assert report_counts(out)[0] == value(found, "asyncbatch_items_seen_total"), out
        assert counts["done"] >= value(found, "asyncbatch_items_total", outcome="done"), out
        assert counts.get("done before", 0) >= value(
            found, "asyncbatch_items_total", outcome="done_before"
        ), out
    assert state_counts(state) == {"done": files}


def last_run_done(state: Path) -> int:
    """What ``status --json`` says the last run has done so far."""
    last = status_json(state)["last_run"]
    assert isinstance(last, dict)
    return int(last["done"])


def test_status_whose_reader_went_away_exits_141(inbox: Path, state: Path) -> None:
    """``asyncbatch status | head -1``, made deterministic: the reader is gone before status
    writes (with ``head``, a status that writes all before head exits would see no EPIPE)."""
    make_files(inbox, 3)
    assert cli("run", RECORD, "--source", inbox, "--state", state).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncbatch", "status", "--state", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **WARNINGS_FAIL, "COLUMNS": "40"},
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err


def test_retry_of_a_dead_item_without_dead_says_so(inbox: Path, state: Path) -> None:
    make_files(inbox, 1)
    cli(
        "run", f"{HANDLERS}:fail_always", "--source", inbox, "--state", state, "--max-attempts", "1"
    )
    result = cli("retry", "--state", state, "f00000.txt")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "asyncbatch: error: item 'f00000.txt' of job 'default' is dead, not failed: nothing to "
        "retry; add --dead to retry dead items"
    )
    assert state_counts(state) == {"dead": 1}
    assert cli("retry", "--state", state, "--dead", "f00000.txt").returncode == 0
    assert state_counts(state) == {"pending": 1}


def test_failures_fit_a_120_column_terminal_without_narrow_cells(inbox: Path, state: Path) -> None:
    make_files(inbox, 2, prefix="a-rather-long-file-name-for-a-partner-export-")
    cli(
        "run", f"{HANDLERS}:fail_always", "--source", inbox, "--state", state, "--max-attempts", "1"
    )
    result = cli("failures", "--state", state, env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    # The time, state and attempts stand on one line each; the error is not cut to shreds.
    assert any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .* dead .* 1 ", line) for line in lines)
    assert "ValueError: cannot parse" in result.stdout


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for separate UTS and pid namespaces",
)
def test_a_runner_on_another_host_finishes_a_killed_hosts_items_in_about_one_lease(
    inbox: Path, tmp_path: Path, pg_dsn: str
) -> None:
    make_files(inbox, 400)
    log = tmp_path / "calls.log"

    def host(name: str, sleep: str) -> subprocess.Popen[str]:
        command = (
            f"hostname {name} && exec '{sys.executable}' -m asyncbatch run '{RECORD}' "
            f"--source '{inbox}' --state '{pg_dsn}' --shared -j 16 --lease 5 --no-progress "
            "--settle 0"
        )
        return subprocess.Popen(
            ["unshare", "--uts", "--pid", "--fork", "--kill-child", "sh", "-c", command],
            env={**os.environ, **WARNINGS_FAIL, "AB_LOG": str(log), "AB_SLEEP": sleep},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    a = host("host-a", "1")
    wait_for(lambda: len(invocations(log)) >= 32, timeout=60)
    a.send_signal(signal.SIGKILL)  # unshare dies; --kill-child SIGKILLs the runner with it
    a.communicate(timeout=30)
    started = time.monotonic()
    b = host("host-b", "0")
    out, err = b.communicate(timeout=120)
    took = time.monotonic() - started

    assert b.returncode == 0, err
    counts = assert_adds_up(out)
    assert set(counts) <= {"done", "done before"}, out
    assert took < 5 + 15, "about one lease (5 s), not until a later run"
    calls = invocations(log)
    assert set(calls) == {p.name for p in inbox.iterdir()}
    # Only host A's files that started and were not committed when it died ran twice: at
    # most its 16 handlers in flight, and a wave of 16 finished but not yet committed.
    assert sum(calls.values()) - 400 <= 2 * 16


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for a separate pid namespace",
)
@pytest.mark.parametrize("mount_proc", [False, True])
def test_a_runner_in_another_pid_namespace_of_the_same_hostname_keeps_its_lock(
    inbox: Path, state: Path, tmp_path: Path, mount_proc: bool
) -> None:
    # Containers with host networking share the hostname but not the pids: the holder's pid
    # (1 or 2 in its namespace) means nothing here, so its lock must not be called stale.
    make_files(inbox, 40)
    log = tmp_path / "calls.log"
    args = ("run", RECORD, "--source", inbox, "--state", state, "-j", "2", "--no-progress")
    command = ["unshare", "--pid", "--fork", "--kill-child", *(["--mount-proc"] * mount_proc)]
    holder = subprocess.Popen(
        [*command, sys.executable, "-m", "asyncbatch", *settled_now(args)],
        env={**os.environ, **WARNINGS_FAIL, "AB_LOG": str(log), "AB_SLEEP": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(invocations(log)) >= 2, timeout=60)
        second = cli(*args, env={"AB_LOG": str(log), "AB_SLEEP": "0"})
        assert second.returncode == 75, second.stderr  # locked: not taken over
        assert "pidns:" in second.stderr  # the holder's host names its pid namespace
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert max(invocations(log).values()) == 1


def has_open(proc: subprocess.Popen[str], path: Path) -> bool:
    """Whether the process has ``path`` open (or has exited: nothing to wait for then)."""
    if proc.poll() is not None:
        return True
    try:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
    except FileNotFoundError:
        return True
    for fd in fds:
        try:
            if os.readlink(f"/proc/{proc.pid}/fd/{fd}") == os.path.realpath(path):
                return True
        except OSError:
            continue
    return False


async def create_ledger(state: Path) -> None:
    """Create (and migrate) a ledger, so that a runner's first write is its start."""
    ledger = await open_ledger(state)
    await ledger.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open files")
def test_an_exclusive_and_a_shared_runner_started_together_never_both_handle_files(
    tmp_path: Path,
) -> None:
    # A shared runner checked the job lock and registered itself in two transactions: an
    # exclusive runner starting in between saw no shared runner, and both ran (1 round in 16).
    # Here both wait for the ledger's write lock, held until both have the state open, so
    # they start within moments of each other: one must be refused (exit 75), or find
    # everything done by the other.
    for round_ in range(5):
        inbox, state, log = (tmp_path / f"{name}-{round_}" for name in ("inbox", "state", "log"))
        make_files(inbox, 8)
        asyncio.run(create_ledger(state))
        args = ("run", f"{HANDLERS}:record_pid", "--source", inbox, "--state", state)
        options = ("-j", "1", "--claim-batch", "1", "--no-progress")
        env = {"AB_LOG": str(log), "AB_SLEEP": "0.02"}
        holder = sqlite3.connect(state, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            runners = [spawn(*args, *options, env=env), spawn(*args, *options, "--shared", env=env)]
            wait_for(lambda: all(has_open(p, state) for p in runners), timeout=60)  # noqa: B023
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        ends = [p.communicate(timeout=120) for p in runners]
        codes = [p.returncode for p in runners]
        assert set(codes) <= {0, 75}, ends
        handled = [line.split(" ", 1) for line in log.read_text().splitlines()]
        assert len({pid for pid, _ in handled}) == 1, f"both runners handled files: {handled}"
        assert sorted(name for _, name in handled) == sorted(p.name for p in inbox.iterdir())
        for code, (_, err) in zip(codes, ends, strict=True):
            if code == 75:
                assert "locked by pid" in err or "being run by --shared runners" in err, err


def test_a_shared_run_finishes_the_archive_moves_a_killed_runner_committed(
    inbox: Path, any_state: str, tmp_path: Path
) -> None:
    make_files(inbox, 6)
    archive = tmp_path / "archive"
    archive.mkdir()
    args = (
        "run",
        RECORD,
        "--source",
        inbox,
        "--state",
        any_state,
        "--on-done",
        f"move:{archive}",
        "--shared",
        "--no-progress",
    )
    # Killed once its completions committed, before it moved any input to the archive.
    crashed = cli(*args, env={"ASYNCBATCH_FAILPOINTS": "before-post-action=kill:1"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert sorted(p.name for p in inbox.iterdir()) == [f"f{i:05d}.txt" for i in range(6)]

    result = cli(*args)  # the next run, shared as well

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in archive.iterdir()) == [f"f{i:05d}.txt" for i in range(6)]
    assert list(inbox.iterdir()) == []


async def test_items_says_how_many_listed_files_are_queued_not_taken(tmp_path: Path) -> None:
    # A shared job's listing queues its files; until a runner takes them they have no item
    # row. status counts them pending: items must say so, not list fewer without a word.
    state = tmp_path / "state.db"
    ledger = await open_ledger(state)
    try:
        await ledger.start_runner(run_start("a", job="default", shared=True))
        role = await ledger.take_listing("default", "a", 60)
        assert role is not None
        assert await ledger.begin_listing("default", "a", role.fence)
        files = [(f"k{i}", f"f{i}".encode(), 1, 1_000 + i, i, 1_000 + i, f"h{i}") for i in range(3)]
        await ledger.queue_listed("default", "a", role.fence, files)
        await ledger.take_queued("default", "a", 60, 1)
    finally:
        await ledger.close()
    shown = cli("items", "--state", state, "--in-state", "pending")
    assert shown.returncode == 0, shown.stderr
    assert "and 2 listed files queued for the runners sharing the job" in shown.stdout
    listed = cli("items", "--state", state, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [item["relpath"] for item in json.loads(listed.stdout)] == ["f0"]
    assert "and 2 listed files queued" in listed.stderr
    done_only = cli("items", "--state", state, "--in-state", "done")
    assert "queued" not in done_only.stdout + done_only.stderr


async def test_a_run_goes_by_a_listing_begun_after_the_one_it_went_by_before_it_ends(
    tmp_path: Path,
) -> None:
    # (Four runners started at once: one went by the first listing; the role changed hands and
    # its new holder began a second listing before that runner looked for the job's end: the
    # role's start and counts were the second listing's, and it said "4 seen: 0 done, 4
    # unfinished", exit 1, every file done by the others.)
    state = tmp_path / "state.db"
    ledger = await open_ledger(state)
    try:
        await ledger.start_runner(run_start("c", job="default", shared=True))
        files = await listed_and_finished_by_a(ledger, ["done"] * 4, ttl=-1)  # lease ran out
        run, x = await going_by_as_listing(tmp_path, ledger)
        role = await ledger.take_listing("default", "c", 60)  # c takes the role over
        assert role.owner == "c"
        assert await ledger.begin_listing("default", "c", role.fence)

        assert not await x._finished()  # before: finished, counted by c's listing's row
        assert (x.target, run.listing) == (2, None)
        await ledger.queue_listed("default", "c", role.fence, files)  # finds them done
        assert await ledger.end_listing("default", "c", role.fence, 4)
        assert await x._finished()
        await shared_report(run)
    finally:
        await ledger.close()
    counters = run.counters
    assert (counters.seen, counters.done_before, counters.not_reached()) == (4, 4, 0), counters


async def test_files_another_runner_found_vanished_are_vanished_not_unfinished(
    tmp_path: Path,
) -> None:
    # (Two shared runners, files deleted while they ran: each counted the files the other had
    # found gone as unfinished, "200 seen: 74 done, 76 done before, 41 vanished, 9
    # unfinished", and both exited 1, with every file finished and nothing left to do.)
    state = tmp_path / "state.db"
    ledger = await open_ledger(state)
    try:
        await listed_and_finished_by_a(ledger, ["done", "done", "vanished", "vanished"])
        run, x = await going_by_as_listing(tmp_path, ledger)
        assert await x._finished()
        await shared_report(run)
    finally:
        await ledger.close()
    counters = run.counters
    assert (counters.seen, counters.done_before, counters.vanished, counters.not_reached()) == (
        4,
        2,
        2,
        0,
    ), counters
    report = counters.report("default", {}, stopped=False, mode="run")
    assert report.ok, report


async def test_a_watching_listers_report_counts_what_others_found_gone_as_vanished(
    tmp_path: Path,
) -> None:
    # (A shared watch's lister counted the files others found vanished as done before.)
    state = tmp_path / "state.db"
    ledger = await open_ledger(state)
    try:
        counters = Counters()  # this run began now: what others finish after counts
        counters.seen, counters.done = 4, 1  # it registered 4 files and finished one
        await ledger.start_runner(run_start("x", job="default", shared=True))
        rows = [(f"k{i}", f"f{i}".encode(), 1, 1_000 + i, i) for i in range(3)]
        claimed = await ledger.claim_scanned("default", "x", 60, rows)
        outcomes = dict(zip(("k0", "k1", "k2"), ("done", "vanished", "dead"), strict=True))
        await ledger.commit_outcomes(
            "default", "x", [Outcome(c.key, c.fence, outcomes[c.key], "E") for c in claimed]
        )
        run = bare_run(tmp_path, ledger, "me", counters)
        await _registered_and_finished_by_others(run)
    finally:
        await ledger.close()
    assert (counters.done_before, counters.vanished, counters.dead_before) == (1, 1, 1), counters
    assert counters.not_reached() == 0


async def test_a_watching_listers_report_counts_an_open_item_others_finished_once(
    tmp_path: Path,
) -> None:
    # (A shared watch's lister counted a file it had open (held by another runner, or
    # waiting for a retry) that another runner finished dead as dead before when its claim
    # found it so, and again at its end among what the others finished: "40 seen: 20 done,
    # 14 done before, 1 dead, 5 dead before" with 36 files done and 4 dead in the ledger.)
    ledger = await open_ledger(tmp_path / "state.db")
    try:
        counters = Counters()  # this run began now: what others finish after counts
        counters.seen = 3  # it registered 3 files, which runner a took
        await ledger.start_runner(run_start("me", job="default", shared=True))
        await ledger.start_runner(run_start("a", job="default", shared=True))
        rows = [(f"k{i}", f"f{i}".encode(), 1, 1_000 + i, i) for i in range(3)]
        claimed = await ledger.claim_scanned("default", "a", 60, rows)
        run = bare_run(tmp_path, ledger, "me", counters)
        claimer = Claimer(
            run,
            ItemQueue(),
            scanner=cast("Any", SimpleNamespace(ready=None)),
            posts=cast("Any", None),
            mode="watch",
        )
        k0 = LeasedItem("k0", "h0", b"f0", 1, 1_000, 0)
        await claimer.claim([k0])  # held by a: open
        assert counters.held == 1, counters
        outcomes = dict(zip(("k0", "k1", "k2"), ("dead", "done", "done"), strict=True))
        await ledger.commit_outcomes(
            "default", "a", [Outcome(c.key, c.fence, outcomes[c.key], "E") for c in claimed]
        )
        await claimer.claim([k0])  # the open item claimed again: found dead
        await _registered_and_finished_by_others(run)
    finally:
        await ledger.close()
    assert (counters.done_before, counters.dead_before, counters.held) == (2, 1, 0), counters
    assert counters.not_reached() == 0


def bare_run(tmp_path: Path, ledger: Any, owner: str, counters: Counters | None = None) -> RunState:
    """The state of a shared run of job ``default`` by ``owner`` on ``ledger``, without its
    pipeline (its source, ``tmp_path/inbox``, is never looked at): for the parts of a shared
    run that read the ledger alone."""
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    config = BatchConfig.from_settings(source=inbox, state=tmp_path / "state.db", shared=True)
    return RunState(
        config=config,
        ledger=ledger,
        owner=owner,
        me=this_process(),
        clock=time.time,
        counters=counters or Counters(),
        source=cast("Any", None),
    )


async def listed_and_finished_by_a(
    ledger: Any, states: list[str], ttl: float = 60
) -> list[tuple[str, bytes, int, int, int, int, str]]:
    """Runner ``a`` (its role taken for ``ttl`` seconds) lists one file for each of ``states``
    in job ``default``, takes them and finishes each so; returns the listed rows."""
    await ledger.start_runner(run_start("a", job="default", shared=True))
    role = await ledger.take_listing("default", "a", ttl)
    assert await ledger.begin_listing("default", "a", role.fence)
    files = [
        (f"k{i}", f"f{i}".encode(), 1, 1_000 + i, i, 1_000 + i, f"h{i}") for i in range(len(states))
    ]
    await ledger.queue_listed("default", "a", role.fence, files)
    assert await ledger.end_listing("default", "a", role.fence, len(files))
    _, claimed = await ledger.take_queued("default", "a", 60, len(files))
    outcomes = dict(zip((f[0] for f in files), states, strict=True))
    await ledger.commit_outcomes(
        "default", "a", [Outcome(row.key, row.fence, outcomes[row.key]) for row in claimed]
    )
    return files


async def going_by_as_listing(tmp_path: Path, ledger: Any) -> tuple[RunState, SharedRun]:
    """Runner ``x``'s shared run (no pipeline), going by ``a``'s complete listing (#1)."""
    await ledger.start_runner(run_start("x", job="default", shared=True))
    run = bare_run(tmp_path, ledger, "x")
    x = SharedRun(cast("Claimer", SimpleNamespace(run=run, config=run.config)))
    x.target = run.listing_target = 1
    return run, x


async def watch_until(batch: Batch, done: Callable[[], bool], *, polls: int = 0) -> Report:
    """Watch with ``batch`` until ``done()`` holds (and ``polls`` more polls have ended),
    then stop it; its report."""
    reports: list[Report] = []

    async def watch() -> None:
        reports.append(await batch.watch())

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await until(done)
            if polls:
                await polls_after(batch, polls)
            batch.stop()
    (report,) = reports
    return report


def files_with_bytes(inbox: Path, contents: dict[str, bytes]) -> float:
    """Files ``NAME.txt`` of ``contents`` in its order (by mtime, a second apart, settled);
    returns the first one's mtime."""
    inbox.mkdir(exist_ok=True)
    base = time.time() - 60
    for i, (name, data) in enumerate(contents.items()):
        path = inbox / f"{name}.txt"
        path.write_bytes(data)
        os.utime(path, (base + i, base + i))
    return base


async def test_a_listings_twins_are_counted_as_the_run_took_it_up(any_state: str) -> None:
    # A listing complete after the run took up the one before replaces that one's twins in
    # the ledger: read only at the report, they were counted unfinished (exit 1), their
    # item done.
    async with await open_ledger(any_state) as ledger:
        role = await ledger.take_listing("j", "lister", 60)
        await ledger.begin_listing("j", "lister", role.fence)
        (row,) = await ledger.claim_scanned("j", "r1", 60, [("K", b"x.txt", 1, 1, 1)])
        await ledger.commit_outcomes("j", "r1", [Outcome("K", row.fence, "done")])
        assert await ledger.end_listing("j", "lister", role.fence, 2, twins={"K": 1})
        listing = await ledger.listing("j")
        assert listing is not None
        config = SimpleNamespace(identity="content", job="j")
        run = cast(RunState, SimpleNamespace(config=config, ledger=ledger, listing_twins=None))
        await _take_up_twins(run, listing)  # as the run goes by it (SharedRun._finished)
        await ledger.begin_listing("j", "lister", role.fence)  # the next one
        assert await ledger.end_listing("j", "lister", role.fence, 2)
        assert await finished_twins(run, listing) == TwinEnds(done=1)


async def test_a_shared_watchs_lister_counts_a_twin_of_a_dead_item_dead_before(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content: x and y have the same bytes (one item), registered by a watching
    # lister in one chunk; the item dies. y was counted "done before" (on the strength of an
    # attempt that then died), not "dead before".
    inbox = tmp_path / "inbox"
    files_with_bytes(inbox, {"a": b"a\n", "x": b"same\n", "y": b"same\n"})

    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if ctx.entry.relpath in ("x.txt", "y.txt"):
            raise ValueError("never")

    batch = Batch(
        handle,
        source=inbox,
        state=any_state,
        identity="content",
        settle=0,
        concurrency=1,
        max_attempts=1,
        poll=0.05,
        shared=True,
    )
    # a, and x or y (one item); then full scans: the twin's item looked at.
    report = await watch_until(batch, lambda: len(handled) == 2, polls=3)
    counts = (report.seen, report.done, report.dead, report.dead_before, report.done_before)
    assert counts == (3, 1, 1, 1, 0), report


async def test_a_shared_watchs_lister_registers_a_twin_of_an_item_that_vanished(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content: x and y have the same bytes (one item), registered by a watching
    # lister in one chunk (y counted done before on the strength of x's attempt); x is
    # deleted while queued (vanished). y was never handled by the watch.
    inbox = tmp_path / "inbox"
    files_with_bytes(inbox, {"a": b"a\n", "x": b"same\n", "y": b"same\n"})
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "a.txt":
            (inbox / "x.txt").unlink()
        handled.append(ctx.entry.relpath)

    batch = Batch(
        handle,
        source=inbox,
        state=any_state,
        identity="content",
        settle=0,
        concurrency=1,
        poll=0.05,
        shared=True,
    )
    report = await watch_until(batch, lambda: "y.txt" in handled)
    assert sorted(handled) == ["a.txt", "y.txt"]
    assert (report.done, report.vanished, report.done_before) == (2, 1, 0), report


async def test_a_twin_left_unhandled_once_the_job_was_listed_again_enough_is_unfinished(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content, one shared runner: x1..x5 have the same bytes. Each file queued in
    # their place vanishes (a's handler deletes x1, the first listed again is x2, which b's
    # handler deletes, ...): once the run has listed the job again 3 times, x5 is left
    # unhandled. It was counted nowhere ("8 seen: 4 done, 4 vanished", exit 0): the listing
    # the report went by had begun after x1..x4 were gone.
    inbox = tmp_path / "inbox"
    names = {"a": b"a\n", **{f"x{i}": b"same\n" for i in range(1, 6)}}
    base = files_with_bytes(inbox, names)
    chain = {"a": ("x1", "b"), "b": ("x2", "c"), "c": ("x3", "d"), "d": ("x4", "e")}
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if (step := chain.get(ctx.entry.relpath.removesuffix(".txt"))) is not None:
            gone, new = step
            (inbox / f"{gone}.txt").unlink()
            path = inbox / f"{new}.txt"
            path.write_bytes(f"{new}\n".encode())
            os.utime(path, (base, base))

    report = await Batch(
        handle,
        source=inbox,
        state=any_state,
        identity="content",
        settle=0,
        concurrency=1,
        shared=True,
    ).run()
    # (e.txt came after the last listing: the next run's.)
    assert sorted(handled) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert (inbox / "x5.txt").exists()
    assert (report.done, report.vanished, report.unfinished) == (4, 4, 1), report
    assert report.seen == report.seen_accounted() + report.unfinished, report
    assert not report.ok


@pytest.mark.parametrize("held", [False, True])
async def test_a_twin_of_an_item_not_finished_is_not_listed_again(
    tmp_path: Path, any_state: str, held: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Identity content, --no-wait: y has x's bytes (the listing queued x). x's item waited
    # for a retry, or is held by another runner: listing the job again cannot help (only a
    # vanished item is taken again), and the run listed it again 3 times (reading every
    # file of the source each time), or waited for the runner holding x to end.
    inbox = tmp_path / "inbox"
    files_with_bytes(inbox, {"a": b"a\n", "x": b"same\n", "y": b"same\n"})
    release = anyio.Event()
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(ctx.entry.relpath)
        if ctx.entry.relpath in ("x.txt", "y.txt"):
            if held:
                await release.wait()
            else:
                raise ValueError("later")

    def batch(**settings: Any) -> Batch:
        return Batch(
            handle,
            source=inbox,
            state=any_state,
            identity="content",
            settle=0,
            concurrency=1,
            shared=True,
            backoff=0.2,
            max_attempts=2,
            **settings,
        )

    caplog.set_level(logging.INFO, logger="asyncbatch")
    reports: list[Report] = []
    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            if held:  # another runner holds x (or y), its handler waiting
                tg.start_soon(batch().run)
                await until(lambda: {"a.txt"} < {*handled} and len(handled) == 2)
            reports.append(await batch(wait=False).run())
            release.set()
    assert not [r for r in caplog.records if "listed again" in r.getMessage()]
    (report,) = reports
    assert report.done_before + report.done <= 1, report  # a alone was done
    if held:
        assert report.unfinished + report.held >= 1, report
    else:  # its retry waited for (--no-wait leaves only what others hold), and failed too
        assert (report.dead, report.dead_before, report.waiting) == (1, 1, 0), report


async def test_shared_runners_count_files_with_the_bytes_of_another_done_before(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content: x, y and z have the same bytes (one item), as do p and q. The listing
    # queues one file of each such set: the others were counted nowhere, and every run said
    # "1 unfinished" (exit 1), the first and each one after, with every item done.
    inbox = tmp_path / "inbox"
    contents = {"a": b"a\n", "x": b"same\n", "b": b"b\n", "y": b"same\n", "p": b"pair\n"}
    contents |= {"z": b"same\n", "q": b"pair\n", "c": b"c\n"}
    files_with_bytes(inbox, contents)
    handled: list[bytes] = []

    async def handle(ctx: TaskContext) -> None:
        handled.append(await ctx.read_bytes())

    async def run(reports: list[Report]) -> None:
        batch = Batch(
            handle, source=inbox, state=any_state, identity="content", settle=0, shared=True
        )
        reports.append(await batch.run())

    first: list[Report] = []
    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, first)
            tg.start_soon(run, first)
    assert sorted(handled) == sorted({*contents.values()})  # each item once
    assert sum(r.done for r in first) == 5
    for report in first:
        assert (report.seen, report.unfinished, report.held) == (8, 0, 0), report
        assert report.done + report.done_before == 8, report
        assert report.ok, report
    again: list[Report] = []
    await run(again)
    (report,) = again
    assert (report.seen, report.done_before, report.unfinished, report.ok) == (8, 8, 0, True)


async def test_shared_runners_handle_a_content_twin_whose_file_vanished(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content: y has x's bytes (one item). Two runners share the job; x is deleted
    # once the files are queued (vanished): y must be handled by one of them (the job is
    # listed again: y was never queued), and no report calls a file "done before" on the
    # strength of x, nor "unfinished". Before, y was handled by no runner.
    inbox = tmp_path / "inbox"
    names = ["a", "x", "y", "b", "c", "d"]
    files_with_bytes(inbox, {n: b"same\n" if n in "xy" else f"{n}\n".encode() for n in names})
    handled: list[str] = []

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "a.txt":
            (inbox / "x.txt").unlink(missing_ok=True)
        handled.append(ctx.entry.relpath)

    reports: dict[int, Report] = {}

    async def run(n: int) -> None:
        reports[n] = await Batch(
            handle,
            source=inbox,
            state=any_state,
            identity="content",
            settle=0,
            concurrency=1,
            shared=True,
        ).run()

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 1)
            tg.start_soon(run, 2)
    assert sorted(handled) == ["a.txt", "b.txt", "c.txt", "d.txt", "y.txt"]
    assert sum(r.done for r in reports.values()) == 5
    assert sum(r.vanished for r in reports.values()) == 1  # x, by the runner that leased it
    for report in reports.values():
        # The files of the listing the runner went by: the first (6), or the one made again
        # for y once x vanished (5: x was gone by then).
        assert report.seen in (5, 6), report
        assert (report.unfinished, report.held, report.ok) == (0, 0, True), report
        assert report.done + report.done_before + report.vanished == report.seen, report


async def test_a_shared_run_whose_listing_failed_says_its_files_are_unfinished(
    inbox: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger failed while the listing queued the files (a full disk): nothing was
    # registered, and the report (and the history row) said "3 seen: 0 done, 3 done before",
    # taking every file the ledger did not have for one other runners had finished.
    make_files(inbox, 3)

    async def full(*args: object, **kwargs: object) -> None:
        raise LedgerError(f"state {str(state)!r}: database or disk is full")

    monkeypatch.setattr(SQLiteLedger, "queue_listed", full)

    async def nothing(ctx: TaskContext) -> None:
        pass

    with pytest.raises(LedgerError):
        await Batch(nothing, source=inbox, state=state, settle=0, shared=True).run()
    monkeypatch.undo()
    last = status_json(state)["last_run"]
    assert isinstance(last, dict)
    assert (last["seen"], last["done_before"], last["unfinished"]) == (3, 0, 3), last


def test_a_shared_run_without_wait_still_waits_for_its_retries(inbox: Path, state: Path) -> None:
    # --no-wait ends a run early for the files other runners hold, not for retries: a shared
    # run ended at once, "3 seen: 1 done, 2 waiting for a retry", exit 1 (nothing dead), and
    # nobody was left to retry them.
    make_files(inbox, 3)
    fail_first = shlex.join([sys.executable, str(HERE / "exec_commands.py"), "fail-first"])
    result = cli(
        "run", "--exec", fail_first, "--source", inbox, "--state", state, "--settle", "0",
        "--shared", "--no-wait", "--backoff", "0.2", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 seen: 3 done" in result.stdout, result.stdout


async def test_a_runner_that_saw_a_twin_vanish_before_the_job_was_listed_again_counts_it(
    tmp_path: Path, any_state: str
) -> None:
    # Identity content, two shared runners: d1 and d2 have the same bytes (the listing queues
    # d1); d1's first attempt fails and deletes it, its retry finds it gone (vanished), and
    # the job is listed again for d2. The runner that counted d1 vanished went by the new
    # listing, which d1 is not in: "6 seen: ..., 1 vanished" left one of the 6 files listed
    # uncounted (a file done before said nowhere).
    # And when the other runner took d1's retry (and found it gone), the runner whose first
    # attempt failed claimed d1 again from what it had open (its own record of d1): that put
    # d1 back as the item's file, in place of d2, which the listing made again had just
    # queued (or had yet to revive), and d2 went unhandled ("1 vanished", both runners
    # exit 0, d2 in the inbox): about 1 run in 3 on PostgreSQL, 1 in 10 on SQLite.
    inbox = tmp_path / "inbox"
    contents = {f"f{i}": f"f{i}\n".encode() for i in range(5)}
    files_with_bytes(inbox, {**contents, "d1": b"same\n", "d2": b"same\n"})

    async def handle(ctx: TaskContext) -> None:
        if ctx.entry.relpath == "d1.txt" and ctx.attempt == 1:
            (inbox / "d1.txt").unlink()
            raise ValueError("not yet")

    reports: list[Report] = []

    async def run() -> None:
        batch = Batch(
            handle,
            source=inbox,
            state=any_state,
            identity="content",
            settle=0,
            concurrency=1,
            shared=True,
            backoff=0.2,
        )
        reports.append(await batch.run())

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            tg.start_soon(run)
    assert sum(r.done for r in reports) == 6, reports  # f0-f4, and d2 in d1's place
    assert any(r.vanished for r in reports), reports
    for report in reports:
        # The files of the listing each went by (the first, or the one made again for d2,
        # without d1), and d1 if it counted it vanished itself: each file once.
        assert report.seen == 6 + report.vanished, report
        # (Rarely a runner ends before the job was listed again for d2, and counts d2
        # unfinished: a race between runners' ends and the listing made again, left open.)
        assert report.seen == report.seen_accounted() + report.unfinished, report
        assert report.unfinished <= 1, report


class _AppendsOnce:
    """A handler whose first call appends to ``changed`` (the files are queued by then: its
    new version comes after the listing), recording what each call read; and the wait, for
    the failpoint at the listing's end (in a thread), until that new version is ``settle``
    seconds old."""

    def __init__(self, changed: Path, settle: float) -> None:
        self.changed, self.settle = changed, settle
        self.handled: list[tuple[str, bytes]] = []
        self.appended = threading.Event()

    async def handle(self, ctx: TaskContext) -> None:
        if not self.handled and not self.appended.is_set():
            with self.changed.open("ab") as f:
                f.write(b"v2")
            self.appended.set()
        self.handled.append((ctx.entry.relpath, await ctx.read_bytes()))

    def until_the_new_version_settled(self) -> None:
        assert self.appended.wait(30)
        st = self.changed.stat()
        changed = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
        time.sleep(max(0.0, changed + self.settle - time.time()))


@pytest.mark.parametrize("identity", ["stat", "path"])
@pytest.mark.parametrize("when", ["settled", "settled-later", "not-settled"])
async def test_a_file_changed_while_queued_for_shared_runners_is_looked_at_again(
    tmp_path: Path,
    any_state: str,
    when: str,
    identity: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A file appended to once the listing had queued it, before its turn: the runner that
    # took it said "8 seen: ... 1 vanished", exit 0, and the others counted it vanished too,
    # while its new version sat in the source, unhandled until a later listing. Now the
    # runner that found it changed looks at its path again before the job is finished: a
    # settled new version is handled in the run, by one runner, once; one not settled is
    # counted not settled yet by every runner, not vanished. (Identity path: the same item,
    # written to, taken again once its outcome is committed; settled-later: the look again
    # comes once the listing is complete, which waits until the new version settled.)
    inbox = tmp_path / "inbox"
    files = make_files(inbox, 8, age=3600)
    # The newest: no runner's first file (each runner opens the oldest of its claim first,
    # and its next one after a handler, the first of which appends to it).
    changed = files[-1]
    settled = when != "not-settled"
    settle = {"settled": 0.0, "settled-later": 1.0, "not-settled": 3.0}[when]
    if settle:
        await until_settled(settle, *files)
    appends = _AppendsOnce(changed, settle)
    handle, handled = appends.handle, appends.handled

    if when == "settled-later":
        waits = failpoints.Call("call", fn=appends.until_the_new_version_settled)
        monkeypatch.setattr(failpoints, "ACTIVE", {"listing-registered": waits})

    reports: dict[int, Report] = {}

    async def run(n: int) -> None:
        reports[n] = await Batch(
            handle,
            source=inbox,
            state=any_state,
            settle=settle,
            concurrency=1,
            shared=True,
            identity=identity,
        ).run()

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 1)
            tg.start_soon(run, 2)
    names = sorted(name for name, _ in handled)
    if settled:
        # The new version, handled once, in the run; the old one by nobody.
        assert names == sorted(f.name for f in files), handled
        assert dict(handled)[changed.name].endswith(b"v2")
        assert sum(r.done for r in reports.values()) == 8
    else:
        assert names == sorted(f.name for f in files if f != changed), handled
        assert sum(r.done for r in reports.values()) == 7
    for report in reports.values():
        assert report.vanished == 0, report
        assert report.unsettled == (0 if settled else 1), report
        assert report.seen == (8 if settled else 7), report
        assert report.done + report.done_before == report.seen, report
        assert (report.unfinished, report.held, report.ok) == (0, 0, True), report
    status = " ".join(cli("status", "--state", any_state).stdout.split())
    last_run = status.split("last run: ", 1)[1].split(" left in the source ", 1)[0]
    assert "vanished" not in last_run, status
    left = "1 not settled yet" if not settled else "nothing it found"
    assert f"left in the source by the last run (at its end): {left}" in status, status


async def test_a_file_rewritten_while_queued_is_never_finished_before_it_is_taken_again(
    tmp_path: Path, any_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Identity path: a file written to once the listing had queued it is the same item,
    # taken again once looked at. Its vanished outcome was committed first, then the item
    # claimed again: in between the job looked finished, and a runner that ended then said
    # "1 vanished" of a file handled a moment later. Here the runner that looks again is held
    # just before it claims the item again, until the other runner ended.
    inbox = tmp_path / "inbox"
    files = make_files(inbox, 8, age=3600)
    changed = files[-1]
    await until_settled(1.0, *files)
    appends = _AppendsOnce(changed, 1.0)
    handle, handled, appended = appends.handle, appends.handled, appends.appended
    ended = anyio.Event()
    waits = failpoints.Call("call", fn=appends.until_the_new_version_settled)
    monkeypatch.setattr(failpoints, "ACTIVE", {"listing-registered": waits})
    claim_records = Claimer.claim_records
    held: list[bool] = []

    async def held_before_the_claim_again(self: Claimer, records: list[bytes]) -> None:
        if appended.is_set() and os.fsencode(changed.name) in {split(r)[0] for r in records}:
            held.append(True)
            await ended.wait()  # (the other runner ends: the file is not finished before)
        await claim_records(self, records)

    monkeypatch.setattr(Claimer, "claim_records", held_before_the_claim_again)
    reports: dict[int, Report] = {}

    async def run(n: int) -> None:
        reports[n] = await Batch(
            handle,
            source=inbox,
            state=any_state,
            settle=1.0,
            concurrency=1,
            shared=True,
            identity="path",
        ).run()
        ended.set()

    with anyio.fail_after(60):  # a bound on a hang, not a wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 1)
            tg.start_soon(run, 2)
    assert held == [True]  # the file was taken again, by the runner that looked again
    assert sorted(name for name, _ in handled) == sorted(f.name for f in files), handled
    assert dict(handled)[changed.name].endswith(b"v2")
    for report in reports.values():
        assert report.vanished == 0, report
        assert report.seen == 8, report
        assert report.done + report.done_before == report.seen, report
        assert (report.unfinished, report.held, report.ok) == (0, 0, True), report
