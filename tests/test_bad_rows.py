"""A ledger with one value asyncbatch does not understand in a row (edited by hand, a bad
restore, a bit flip that integrity_check does not see): every command says so in one line
naming the table, column and value, exits 2, and leaves the value as it is.

They used to trace back (settings not JSON, a secret not hex: the run's state modified before),
or worse, decide on it: an item state it does not know was left out of ``status``'s counts,
counted ``done before`` by a run that exited 0 (its file never handled), and called vanished by
``explain``."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import HANDLERS, cli, make_files
from .postgres import pg_sync

RECORD = f"{HANDLERS}:record"

#: The commands run against each bad ledger (``run`` gets its source).
COMMANDS = (("status",), ("status", "--json"), ("items",), ("explain", "f00000.txt"))

BAD_VALUES = {
    "settings not JSON": (
        "UPDATE jobs SET settings = '{not json'",
        "jobs.settings '{not json' of job 'default' (not JSON)",
    ),
    "settings source not text": (
        """UPDATE jobs SET settings = '{"source": 5}'""",
        "jobs.settings '{\"source\": 5}' of job 'default' (source: 5)",
    ),
    "settings not an object": (
        "UPDATE jobs SET settings = '[1, 2]'",
        "jobs.settings '[1, 2]' of job 'default' (not a JSON object)",
    ),
    "item state unknown": (
        "UPDATE items SET state = 'bogus' WHERE relpath = CAST('f00000.txt' AS BLOB)",
        "items.state 'bogus'",
    ),
}


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(
        "asyncbatch: error: the state holds a value this asyncbatch does not understand: "
    ), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def dump(state: Path) -> list[str]:
    db = sqlite3.connect(state)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def edit(state: Path, statement: str) -> None:
    db = sqlite3.connect(state)
    try:
        with db:
            db.execute(statement)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


@pytest.fixture
def done_ledger(inbox: Path, state: Path) -> Path:
    make_files(inbox, 2)
    result = cli("run", RECORD, "--source", inbox, "--state", state)
    assert result.returncode == 0, result.stderr
    return state


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_sqlite_bad_value_is_one_line_exit_2_and_left_as_it_is(
    done_ledger: Path, inbox: Path, case: str
) -> None:
    statement, named = BAD_VALUES[case]
    edit(done_ledger, statement)
    before = dump(done_ledger)
    for command in COMMANDS:
        one_line(cli(*command, "--state", done_ledger, cwd=inbox.parent), named)
        assert dump(done_ledger) == before, command
    result = cli("run", RECORD, "--source", inbox, "--state", done_ledger)
    one_line(result, named)
    after = dump(done_ledger)
    if case == "item state unknown":
        # Met when the run claims that file: the run stops there, exit 2, its leases given
        # back and the value left; its own history row records the error.
        assert [line for line in after if 'INSERT INTO "runs"' not in line] == [
            line for line in before if 'INSERT INTO "runs"' not in line
        ]
    else:
        assert after == before  # refused before the run wrote anything


def test_sqlite_secret_not_hex_refuses_the_run_before_it_writes(
    done_ledger: Path, inbox: Path
) -> None:
    edit(done_ledger, "UPDATE meta SET value = 'zz' WHERE name = 'secret'")
    before = dump(done_ledger)
    one_line(
        cli("run", RECORD, "--source", inbox, "--state", done_ledger), "meta.secret 'zz' (not hex)"
    )
    assert dump(done_ledger) == before


def test_sqlite_unknown_item_state_is_not_counted_done(done_ledger: Path, inbox: Path) -> None:
    """The story of one item state it does not know, before: status left it out of the
    counts, run counted it done before and exited 0 (never handled), explain said vanished."""
    edit(done_ledger, "UPDATE items SET state = 'bogus' WHERE relpath = CAST('f00000.txt' AS BLOB)")
    result = cli("run", RECORD, "--source", inbox, "--state", done_ledger)
    assert result.returncode == 2
    assert "done before" not in result.stdout
    explained = cli("explain", "f00000.txt", "--state", done_ledger)
    assert "vanished" not in explained.stdout
    one_line(explained, "items.state 'bogus' for key")


# -- PostgreSQL ----------------------------------------------------------------------------------


def pg_dump(dsn: str) -> list[tuple[object, ...]]:
    schema = dsn.rsplit("search_path=", 1)[1]
    found: list[tuple[object, ...]] = []
    for table in ("jobs", "items", "meta"):
        found += pg_sync(dsn, f'SELECT * FROM "{schema}".{table} ORDER BY 1, 2')
    return found


@pytest.mark.parametrize(
    "case", ["settings not JSON", "settings source not text", "item state unknown", "secret"]
)
def test_postgres_bad_value_is_one_line_exit_2_and_left_as_it_is(
    pg_dsn: str, inbox: Path, tmp_path: Path, case: str
) -> None:
    make_files(inbox, 2)
    result = cli("run", RECORD, "--source", inbox, "--state", pg_dsn)
    assert result.returncode == 0, result.stderr
    if case == "secret":
        statement, named = "UPDATE meta SET value = 'zz' WHERE name = 'secret'", "meta.secret 'zz'"
    else:
        statement, named = BAD_VALUES[case]
        statement = statement.replace("CAST('f00000.txt' AS BLOB)", "'f00000.txt'::bytea")
    pg_sync(pg_dsn, statement)  # (its search_path: the test's schema)
    before = pg_dump(pg_dsn)
    if case != "secret":
        for command in COMMANDS:
            one_line(cli(*command, "--state", pg_dsn, cwd=tmp_path), named)
            assert pg_dump(pg_dsn) == before, command
    one_line(cli("run", RECORD, "--source", inbox, "--state", pg_dsn), named)
    assert pg_dump(pg_dsn) == before
