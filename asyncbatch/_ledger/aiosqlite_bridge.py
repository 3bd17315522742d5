"""aiosqlite's private API, in one place: one thread hop per transaction.

aiosqlite runs each connection's calls in order on the connection's own thread. Its public
API hops to that thread once per statement (``execute``, ``fetchone``, ``commit``: ~60 us
each). A ledger transaction is several statements, and must hold SQLite's write lock only
while SQLite works, so the whole transaction runs as one function on that thread:
``Connection._execute(fn, *args)`` (underscored, but unchanged from aiosqlite 0.17 to 0.22),
which gets the plain ``sqlite3.Connection`` from ``Connection._conn``.

Measured (benchmarks/RESULTS.md): a claim of 512 items is one hop (~100 us) this way, against
one per statement otherwise; with per-statement hops the write lock is held across event-loop
round trips and shared runners wait on each other (0.9 s against 0.05 s in the run that chose
this). No public aiosqlite call runs a function on the connection's thread.

The supported aiosqlite range is pinned in ``pyproject.toml``; :func:`check` runs at import
and ``tests/test_ledger.py`` fails loudly, naming the version, when aiosqlite changes these.
"""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import aiosqlite

__all__ = ["SUPPORTED", "check", "on_thread", "raw"]

T = TypeVar("T")
#: The aiosqlite versions whose private API this module was checked against.
SUPPORTED = ((0, 20), (0, 23))


def check() -> None:
    """Raise ``ImportError`` naming the installed aiosqlite if it lacks what is used here."""
    version = getattr(aiosqlite, "__version__", "unknown")
    execute = getattr(aiosqlite.Connection, "_execute", None)
    conn = inspect.getattr_static(aiosqlite.Connection, "_conn", None)
    if not (inspect.iscoroutinefunction(execute) and isinstance(conn, property)):
        low, high = SUPPORTED
        raise ImportError(
            f"asyncbatch needs aiosqlite's Connection._execute and Connection._conn "
            f"(aiosqlite {low[0]}.{low[1]} to before {high[0]}.{high[1]}); aiosqlite {version} "
            "is installed"
        )


async def on_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on the connection's thread, in order with its other calls."""
    execute = cast(Callable[..., Awaitable[T]], db._execute)
    return await execute(fn, *args)


def raw(db: aiosqlite.Connection) -> sqlite3.Connection:
    """The plain connection: use it only inside a function run by :func:`on_thread`."""
    return db._conn


check()
