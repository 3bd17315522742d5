"""The ledger's connection: opening and validating the SQLite file, and running transactions.

Guarantees:

- WAL mode, ``isolation_level=None`` and an explicit ``BEGIN IMMEDIATE`` for every transaction
  that writes. A transaction runs as one function on the connection's own thread (one hop, not
  one per statement): the write lock is held only while SQLite works, and a cancelled caller
  can never leave a transaction open, since the function runs to COMMIT or ROLLBACK regardless.
- A file that is not an asyncbatch ledger, or has a newer schema, is refused before anything is
  written to it. A new state file and its ``-wal``/``-shm`` are created with mode 0600.
- sqlite3 errors leave this module as :class:`LedgerError` with the original as ``__cause__``.

aiosqlite runs every call on one thread per connection, in order; ``Connection._execute(fn)``
is the (long-standing, if underscored) way to run a function there. It is checked for at import.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, Self, TypeVar, cast

import aiosqlite
import anyio

from . import _sql as sql
from ._exceptions import ConfigurationError, LedgerError, NotALedgerError, SchemaVersionError
from ._fsinfo import network_filesystem

__all__ = ["Durability", "LedgerConnection"]

if not callable(getattr(aiosqlite.Connection, "_execute", None)):  # pragma: no cover
    raise ImportError("asyncbatch needs aiosqlite's Connection._execute (aiosqlite 0.17 to 0.22)")

_SQLITE_HEADER = b"SQLite format 3\x00"
#: SQLite's own busy wait (ms) before a statement reports the database locked; waits for the
#: write lock are retried by the transaction runner, in short jittered steps, up to busy_timeout.
_SQLITE_BUSY_MS = 20
Durability = Literal["normal", "full"]
T = TypeVar("T")


def _check_state_path(path: Path, *, create: bool) -> bool:
    """Refuse a state path we must not open; return whether the file exists."""
    if path.is_dir():
        raise ConfigurationError.bad_value("state", str(path), "a file path, not a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigurationError(
            f"state {str(path)!r}: directory {str(parent)!r} does not exist; create it first"
        )
    if fs := network_filesystem(parent):
        raise ConfigurationError(
            f"state {str(path)!r} is on a {fs} network filesystem: SQLite's WAL needs shared "
            "memory on one host; put the state on a local disk"
        )
    if not path.exists():
        if not create:
            raise ConfigurationError(f"state {str(path)!r} does not exist")
        return False
    with path.open("rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head and head != _SQLITE_HEADER:
        raise NotALedgerError(f"state {str(path)!r} is not a SQLite database; it was not touched")
    return bool(head)


class _Busy:
    """What a transaction attempt returns when another process holds the write lock."""


_BUSY: Final = _Busy()


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "locked" in text or "busy" in text


class LedgerConnection:
    """An open ledger file. Use :meth:`open`; close with :meth:`close` or ``async with``."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
    ) -> None:
        self._db = db
        self.path = path
        self.clock = clock
        self._busy_timeout = busy_timeout
        self._lock = anyio.Lock()
        self._random = random.Random()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        create: bool = True,
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (and with ``create``, create or migrate) the ledger at ``path``.

        Raises :class:`ConfigurationError` for an unusable path, :class:`NotALedgerError` for a
        file that is not ours and :class:`SchemaVersionError` for a newer schema; in every such
        case the file is left byte-for-byte as it was.
        """
        path = Path(path)
        existed = _check_state_path(path, create=create)
        if not path.exists():
            # Private from the start; if another runner creates it at the same moment, fine:
            # the migration re-reads the schema version inside its own transaction.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        try:
            db = await aiosqlite.connect(path, isolation_level=None, cached_statements=256)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open state {str(path)!r}: {e}") from e
        ledger = cls(db, path, clock, busy_timeout)
        try:
            await ledger._prepare(existed, durability, migrate=create)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        return ledger

    async def _prepare(self, existed: bool, durability: Durability, *, migrate: bool) -> None:
        db, name = self._db, str(self.path)
        try:
            # While opening, wait as long as it takes (another runner may be switching a new
            # file to WAL or migrating it, which locks it exclusively); short waits afterwards.
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            objects = await self._scalar(sql.SCHEMA_OBJECTS)
            app_id = await self._scalar("PRAGMA application_id")
            version = await self._scalar("PRAGMA user_version")
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
                raise LedgerError(f"state {name!r}: {e}") from e
            raise NotALedgerError(
                f"state {name!r} is not a usable SQLite database ({e}); it was not touched"
            ) from e
        if objects and app_id != sql.APPLICATION_ID:
            raise NotALedgerError(
                f"state {name!r} is a SQLite database of another application; it was not touched"
            )
        if version > sql.SCHEMA_VERSION:
            raise SchemaVersionError(name, version, sql.SCHEMA_VERSION)
        if existed and not objects and not migrate:
            raise NotALedgerError(f"state {name!r} is an empty database, not a ledger")
        with self._errors():
            await self._switch_to_wal()
            sync = "FULL" if durability == "full" else "NORMAL"
            await db.execute(f"PRAGMA synchronous = {sync}")
            # Claims and commits touch the B-tree all over: keep up to 64 MiB of it in SQLite's
            # page cache rather than re-reading pages with pread (allocated as it is used).
            await db.execute("PRAGMA cache_size = -2000")
            if version < sql.SCHEMA_VERSION:
                if not migrate:
                    raise LedgerError(
                        f"state {name!r} has schema version {version}; run 'asyncbatch run' "
                        "once to upgrade it"
                    )
                await self._transact(self._migrate, secrets.token_hex(32), self.clock())
            await db.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")

    async def _switch_to_wal(self) -> None:
        """Put the file in WAL mode, waiting while other runners open it at the same moment.

        Two connections switching a new file at once can deadlock on the exclusive lock the
        switch needs; SQLite then fails one at once instead of calling the busy handler, so the
        switch is retried like a write. Raises :class:`LedgerError` when the file system cannot
        do WAL (SQLite keeps the old journal mode without an error then).
        """

        def switch() -> str | _Busy:  # on the connection's thread
            try:
                mode: str = self._db._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if _is_busy(e):
                    return _BUSY
                raise
            return mode

        mode = await self._until_not_busy(lambda: self._on_thread(switch))
        if mode.lower() != "wal":
            raise LedgerError(
                f"state {str(self.path)!r}: SQLite cannot use WAL mode here (journal mode "
                f"stays {mode!r}); put the state on a local disk"
            )

    @staticmethod
    def _migrate(conn: sqlite3.Connection, secret: str, now: float) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        while version < sql.SCHEMA_VERSION:
            for statement in sql.MIGRATIONS[version].split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            version += 1
        conn.execute(f"PRAGMA application_id = {sql.APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
        conn.execute(sql.PUT_META, ("secret", secret))
        conn.execute(sql.PUT_META, ("created_at", repr(now)))

    async def close(self) -> None:
        """Close the connection (shielded: always completes)."""
        with anyio.CancelScope(shield=True):
            await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transactions ------------------------------------------------------------------------------

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the connection's thread, in order with its other calls."""
        execute = cast(Callable[..., Awaitable[T]], self._db._execute)
        return await execute(fn, *args)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise LedgerError(f"state {str(self.path)!r}: {e}") from e

    @staticmethod
    def _begin_once(conn: sqlite3.Connection) -> bool:
        """``BEGIN IMMEDIATE`` (on the connection's thread); ``False`` if another process holds
        the write lock past SQLite's own short busy wait."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                return False
            raise
        return True

    async def _until_not_busy(self, attempt: Callable[[], Awaitable[T | _Busy]]) -> T:
        """Repeat ``attempt`` every few milliseconds while the write lock is taken.

        SQLite's own busy handler backs off to 100 ms sleeps, so a runner sharing a job with a
        busy one would mostly find the lock taken when it looks; short jittered retries give
        every runner its turn. The pauses are awaited here, on the event loop: the ledger's
        thread is never blocked and a cancelled caller stops waiting at once. Gives up after
        ``busy_timeout`` with a clear error.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.0005
        while True:
            result = await attempt()
            if not isinstance(result, _Busy):
                return result
            if time.monotonic() > deadline:
                raise LedgerError(
                    f"state {str(self.path)!r} stayed locked by another process for "
                    f"{self._busy_timeout:.0f}s; see docs/troubleshooting.md"
                )
            await anyio.sleep(pause * (0.5 + self._random.random()))
            pause = min(pause * 1.5, 0.004)

    def _in_transaction(
        self, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> T | _Busy:  # runs on the connection's thread
        conn = self._db._conn
        if not self._begin_once(conn):
            return _BUSY
        try:
            result = fn(conn, *args)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def _transact(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one ``BEGIN IMMEDIATE`` transaction on the ledger thread.

        ``fn`` is synchronous and uses the plain ``sqlite3.Connection``. The whole transaction
        is one hop: cancelling the caller cannot interrupt it half-way.
        """

        async def attempt() -> T | _Busy:
            async with self._lock:
                with self._errors():
                    return await self._on_thread(self._in_transaction, fn, args)

        return await self._until_not_busy(attempt)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """An awaitable-statement transaction, for callers that must await between statements.

        Prefer :meth:`_transact`. This one holds the write lock across event-loop round trips;
        it is shielded from cancellation once begun, so it is still never left open.
        """
        async with self._lock:
            try:
                with self._errors():
                    await self._until_not_busy(lambda: self._on_thread(self._begin_on_thread))
            except BaseException:
                # Cancelled (or failed) while BEGIN may still run on the thread: calls run in
                # order there, so this undoes it if it happened.
                with anyio.CancelScope(shield=True):
                    await self._on_thread(self._rollback_if_open)
                raise
            with anyio.CancelScope(shield=True), self._errors():
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")

    def _begin_on_thread(self) -> bool | _Busy:
        return True if self._begin_once(self._db._conn) else _BUSY

    def _rollback_if_open(self) -> None:
        if self._db._conn.in_transaction:
            self._db._conn.execute("ROLLBACK")

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            with self._errors():
                yield self._db

    async def _scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        async with self._db.execute(query, params) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def _fetchall(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._db.execute_fetchall(query, params))
