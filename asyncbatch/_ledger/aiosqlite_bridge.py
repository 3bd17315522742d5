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

aiosqlite's thread is not a daemon thread: a connection left open (an
:class:`~asyncbatch.IdempotencyMiddleware` whose server sends no lifespan events and whose
owner never calls ``aclose()``) kept the process alive after its work was done, in
``threading._shutdown``. :func:`connect` makes it a daemon before it starts; the thread is
``Connection`` itself before aiosqlite 0.22 (a ``Thread`` subclass), ``Connection._thread``
since.

The supported aiosqlite range is pinned in ``pyproject.toml``; :func:`check` runs at import
and ``tests/test_ledger.py`` fails loudly, naming the version, when aiosqlite changes these.
"""

from __future__ import annotations

import inspect
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

__all__ = ["SUPPORTED", "check", "connect", "on_thread", "raw"]

T = TypeVar("T")
#: The aiosqlite versions whose private API this module was checked against.
SUPPORTED = ((0, 20), (0, 23))


def check() -> None:
    """Raise ``ImportError`` naming the installed aiosqlite if it lacks what is used here."""
    version = getattr(aiosqlite, "__version__", "unknown")
    execute = getattr(aiosqlite.Connection, "_execute", None)
    conn = inspect.getattr_static(aiosqlite.Connection, "_conn", None)
    unstarted = aiosqlite.connect(":memory:")  # a Connection whose thread is not started
    if not (
        inspect.iscoroutinefunction(execute)
        and isinstance(conn, property)
        and isinstance(_thread_of(unstarted), threading.Thread)
    ):
        low, high = SUPPORTED
        raise ImportError(
            f"asyncbatch needs aiosqlite's Connection._execute, Connection._conn and the "
            f"connection's thread (aiosqlite {low[0]}.{low[1]} to before {high[0]}.{high[1]}); "
            f"aiosqlite {version} is installed"
        )


def _thread_of(db: aiosqlite.Connection) -> object:
    """The thread that runs the connection's calls (``None`` if aiosqlite hides it)."""
    return db if isinstance(db, threading.Thread) else getattr(db, "_thread", None)


async def connect(database: str | Path, **kwargs: Any) -> aiosqlite.Connection:
    """``aiosqlite.connect(database, **kwargs)``, its thread a daemon: an open connection never
    keeps the process from exiting. Raises what ``sqlite3.connect`` raises.

    A process that ends with the connection open stops that thread where it waits for work (no
    transaction is in flight once the event loop has finished: each one is shielded); closing
    the connection still stops the thread cleanly.
    """
    db = aiosqlite.connect(database, **kwargs)
    thread = _thread_of(db)
    assert isinstance(thread, threading.Thread)  # check() made sure at import
    thread.daemon = True
    return await db


async def on_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on the connection's thread, in order with its other calls."""
    execute = cast(Callable[..., Awaitable[T]], db._execute)
    return await execute(fn, *args)


def raw(db: aiosqlite.Connection) -> sqlite3.Connection:
    """The plain connection: use it only inside a function run by :func:`on_thread`."""
    return db._conn


check()
