"""Named failpoints: each one is in the code, the environment arms them, bad rules are refused."""

from __future__ import annotations

import errno
import re
import signal
from pathlib import Path

import pytest

from asyncbatch import _failpoints as failpoints

from .conftest import HANDLERS, cli, make_files, state_counts

PACKAGE = Path(failpoints.__file__).parent


def test_every_failpoint_is_reached_somewhere_in_the_code() -> None:
    code = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    placed = set(re.findall(r"""failpoints\.a?hit\("([\w-]+)"\)""", code))
    assert placed == set(failpoints.POINTS)


def test_rules_parse_into_actions_and_bad_ones_are_refused() -> None:
    actions = failpoints.parse(
        "after-claim=kill:3; output-replaced=oserror(ENOSPC); in-handler=sleep(0.5)"
    )
    assert actions["after-claim"] == failpoints.Action("kill", 0.0, 3)
    assert actions["output-replaced"] == failpoints.Action("oserror", float(errno.ENOSPC), 1)
    assert actions["in-handler"] == failpoints.Action("sleep", 0.5, 1)
    for bad in ("nowhere=kill", "after-claim=explode", "in-handler=oserror(EWHAT)"):
        with pytest.raises(failpoints.FailpointError):
            failpoints.parse(bad)


def test_a_kill_failpoint_sigkills_the_runner_at_its_nth_hit(inbox: Path, state: Path) -> None:
    make_files(inbox, 5)
    result = cli(
        "run",
        f"{HANDLERS}:record",
        "--source",
        inbox,
        "--state",
        state,
        "-j",
        "1",
        env={"ASYNCBATCH_FAILPOINTS": "in-handler=kill:3"},
    )
    assert result.returncode == -signal.SIGKILL
    counts = state_counts(state)
    assert counts.get("done", 0) <= 2
    assert cli("run", f"{HANDLERS}:record", "--source", inbox, "--state", state).returncode == 0
    assert state_counts(state) == {"done": 5}


def test_an_oserror_failpoint_fails_the_attempt_with_that_errno(
    inbox: Path, state: Path, tmp_path: Path
) -> None:
    make_files(inbox, 2)
    out = tmp_path / "out"
    out.mkdir()
    result = cli(
        "run",
        f"{HANDLERS}:write_copy",
        "--source",
        inbox,
        "--state",
        state,
        "--output-dir",
        out,
        "--max-attempts",
        "1",
        env={"ASYNCBATCH_FAILPOINTS": "output-temp-written=oserror(ENOSPC)"},
    )
    assert result.returncode == 1, result.stderr
    assert state_counts(state) == {"dead": 2}
    assert list(out.iterdir()) == []  # the temp files were removed, nothing replaced


def test_bad_failpoint_rules_are_a_one_line_error(inbox: Path, state: Path) -> None:
    result = cli("status", "--state", state, env={"ASYNCBATCH_FAILPOINTS": "nowhere=kill"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "asyncbatch: error: ASYNCBATCH_FAILPOINTS: no failpoint named 'nowhere'"
    )
