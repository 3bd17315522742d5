"""The ledger: the only state that outlives a run, behind one contract and two backends.

    types.py             the values that cross the boundary (ClaimedRow, Outcome, LockInfo, ...)
    actions.py           how a post-commit action and its path are stored (a text column)
    rows.py              how the values read from rows name their columns (RowValue.from_row)
    base.py              Ledger, the abstract contract (each method documented once), and the
                         backend-neutral logic: the job and lock decisions, retries
    idempotency.py       IdempotencyStore, the part of the contract IdempotencyMiddleware uses
                         (a Ledger is one), and the idempotency decision
    dsn.py               a postgresql:// state: parsed up front, printed without its password
    sqlite.py            SQLiteLedger: one file on a local disk (the default)
    sqlite_open.py       whether a SQLite path may be opened, and what its errors mean
    sqlite_sql.py        every SQLite statement
    aiosqlite_bridge.py  aiosqlite's private API, in one place (one thread hop per transaction)
    postgres.py          PostgresLedger: runners on several hosts
    postgres_session.py  its connection, transactions, and the server's clock
    postgres_sql.py      every PostgreSQL statement

Backends are imported when a ledger is opened: asyncpg is needed only for a PostgreSQL state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .actions import decode_action, decode_move, encode_action, encode_move
from .base import ITEMS_PAGE, Ledger
from .dsn import DEFAULT_SCHEMA, PostgresDSN, is_postgres
from .idempotency import IdempotencyStore
from .types import *  # noqa: F403 (the values that cross the boundary: types.__all__)
from .types import Durability
from .types import __all__ as _types

__all__ = [
    "DEFAULT_SCHEMA",
    "ITEMS_PAGE",
    "IdempotencyStore",
    "Ledger",
    "PostgresDSN",
    "decode_action",
    "decode_move",
    "encode_action",
    "encode_move",
    "is_postgres",
    "open_idempotency_store",
    "open_ledger",
    *_types,
]


async def open_ledger(
    state: str | os.PathLike[str],
    *,
    durability: Durability = "normal",
    create: bool = True,
    busy_timeout: float = 30.0,
    clock: Callable[[], float] = time.time,
    outage_timeout: float = 120.0,
) -> Ledger:
    """Open the ledger ``state`` names: a ``postgresql://`` DSN, else a SQLite file path.

    ``create=False`` opens for reading: nothing is created, migrated or left behind.
    ``busy_timeout`` bounds waits for other writers; ``outage_timeout``, how long a PostgreSQL
    server that went away is waited out before a transaction fails; ``clock`` is the caller's
    wall clock (a test seam). Raises what the backend's ``open`` raises:
    :class:`ConfigurationError`, :class:`LedgerError`, :class:`NotALedgerError`,
    :class:`SchemaVersionError`.
    """
    if is_postgres(state):
        from .postgres import PostgresLedger

        return await PostgresLedger.open(
            str(state),
            durability=durability,
            create=create,
            busy_timeout=busy_timeout,
            clock=clock,
            outage_timeout=outage_timeout,
        )
    from .sqlite import SQLiteLedger

    return await SQLiteLedger.open(
        state, durability=durability, create=create, busy_timeout=busy_timeout, clock=clock
    )


async def open_idempotency_store(
    state: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
) -> IdempotencyStore:
    """Open the idempotency store in the ledger ``state`` names (created or migrated if need
    be): the ledger, as :class:`~asyncbatch.IdempotencyMiddleware` sees it. ``clock`` is the
    caller's wall clock. Raises what :func:`open_ledger` raises."""
    return await open_ledger(state, clock=clock)
