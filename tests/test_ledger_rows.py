"""The ledger's value objects are read from rows by column name, their SELECT lists made from
their fields (asyncbatch/_ledger/rows.py); the backends' reads of them are in the contract
suite (tests/test_ledger_contract.py)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from asyncbatch._ledger import (
    TOTALS,
    ClaimedRow,
    ItemInfo,
    LockInfo,
    RunInfo,
    RunTotals,
    postgres_sql,
    sqlite_sql,
)


def shuffled(row: dict[str, Any]) -> dict[str, Any]:
    """The same row, its columns in reverse order: nothing may be read by position."""
    return dict(reversed(row.items()))


def test_an_item_is_read_by_column_name_its_times_and_encodings_converted_by_field() -> None:
    expected = ItemInfo(
        key="k1",
        relpath="a/caf\xe9.txt",
        size=3,
        mtime_ns=7,
        state="running",
        attempts=2,
        interrupted=1,
        last_error="boom",
        updated_at=1100.0,
        inode=2**64 - 1,
        owner="o1",
        fence=4,
        lease_until=1160.0,
        next_attempt_at=None,
        post_action="delete",
        created_at=1090.0,
        started_at=1099.0,
        finished_at=None,
        runner="o1",
        runner_pid=42,
        runner_host="h1",
    )
    row: dict[str, Any] = {**asdict(expected), "relpath": os.fsencode(expected.relpath)}
    row |= {"inode": -1, "updated_at": 100.0, "lease_until": 160.0, "created_at": 90.0}
    row |= {"started_at": 99.0}

    item = ItemInfo.from_row(
        shuffled(row), times=lambda t: t + 1000, relpath=os.fsdecode, inode=lambda i: i + 2**64
    )

    assert item == expected


def test_a_select_list_is_made_from_the_fields() -> None:
    """A column whose name differs is read AS the field's name; a nested value brings its own
    columns; a field no column holds is left out, and keeps its default."""
    assert LockInfo.columns() == (
        "job_id AS job",
        *("owner", "pid", "host", "pid_start", "acquired_at", "expires_at"),
    )
    run_columns = RunInfo.columns()
    assert run_columns[-1] == "settings_changed"
    assert run_columns[-1 - len(TOTALS) : -1] == TOTALS
    assert "from_joblog" not in " ".join(run_columns)
    item_columns = ", ".join(ItemInfo.columns())
    assert f"SELECT {item_columns} FROM items" in sqlite_sql.ITEM_BY_KEY
    assert f"SELECT {item_columns} FROM items" in postgres_sql.ITEM_BY_KEY

    row = {"id": 3, "job": "j", "owner": "o", "pid": 1, "host": "h", "mode": "run"}
    row |= {"started_at": 10.0, "finished_at": None, "exit_status": None}
    row |= {name: i for i, name in enumerate(TOTALS)} | {"settings_changed": None}
    run = RunInfo.from_row(shuffled(row), times=lambda t: t * 2)
    assert run.started_at == 20.0
    assert run.finished_at is None
    assert run.totals == RunTotals(**{name: i for i, name in enumerate(TOTALS)})
    assert run.from_joblog is False


def test_a_claimed_row_is_read_by_name_with_or_without_the_handled_file() -> None:
    lease = {"key": "k", "state": "running", "fence": 2, "attempts": 1, "interrupted": 0}
    lease["post_action"] = None
    handled = {"relpath": b"f", "size": 3, "mtime_ns": 9, "inode": -2}

    assert ClaimedRow.from_row(shuffled(lease), lease_only=True) == ClaimedRow("k", "running", 2, 1)
    assert ClaimedRow.from_row(shuffled(lease | handled), inode=abs) == ClaimedRow(
        "k", "running", 2, 1, 0, None, b"f", 3, 9, 2
    )
