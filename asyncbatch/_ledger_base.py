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
import stat
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
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LedgerError(f"state {str(path)!r} cannot be created: {_unwritable(parent)}")
        return False
    with path.open("rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head and head != _SQLITE_HEADER:
        raise NotALedgerError(f"state {str(path)!r} is not a SQLite database; it was not touched")
    if create:
        for name in (path, parent, *_companions(path)):
            if name.exists() and not os.access(name, os.W_OK):
                raise LedgerError(
                    f"state {str(path)!r} cannot be written ({str(name)!r}: "
                    f"{_unwritable(name)}); a run records its work in it"
                )
    return bool(head)


def _companions(path: Path) -> tuple[Path, Path]:
    """The ``-wal`` and ``-shm`` files SQLite keeps beside a WAL database."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be written: a read-only file system, or its permissions."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return "it is on a read-only file system"
    return f"this user may not write it (mode {stat.filemode(path.stat().st_mode)})"


def _read_only_view(path: Path) -> str | None:
    """For a reader that cannot write beside the state: the URI to read it without writing.

    SQLite would otherwise create ``-wal``/``-shm`` files with this reader's permissions (or
    fail to), and a later run could not use them. With no ``-wal`` content there is nothing
    outside the main file, so it is read as ``immutable``; otherwise the reader is refused.
    Returns ``None`` when the reader may open the state normally.
    """
    wal, shm = _companions(path)
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)
    if writable and all(not p.exists() or os.access(p, os.W_OK) for p in (wal, shm)):
        return None
    if wal.exists() and wal.stat().st_size > 0:
        raise LedgerError(
            f"state {str(path)!r} has commits in its -wal file that this user cannot read "
            f"without writing beside it ({_unwritable(path if not writable else wal)}); run the "
            "command as the state's owner"
        )
    return f"{path.absolute().as_uri()}?mode=ro&immutable=1"


def _open_error(path: Path, error: sqlite3.Error) -> LedgerError:
    """What an error while first reading the state means, in words (nothing was changed)."""
    name = str(path)
    code = getattr(error, "sqlite_errorname", "")
    if code == "SQLITE_NOTADB":
        return NotALedgerError(f"state {name!r} is not a SQLite database; it was not touched")
    if code.startswith("SQLITE_CORRUPT"):
        return LedgerError(
            f"state {name!r} is a damaged SQLite database ({error}); it was not touched"
        )
    if code.startswith("SQLITE_IOERR"):
        return LedgerError(
            f"state {name!r}: disk I/O error while reading it ({code}); if its -wal file was "
            "deleted while its -shm file stayed, stop its runners and remove the -shm file too "
            "(the commits in the lost -wal are gone: their files will be handled again); see "
            "docs/troubleshooting.md"
        )
    if code.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")):
        return LedgerError(
            f"state {name!r} cannot be opened for writing ({error}): {_unwritable(path)}"
        )
    return LedgerError(f"state {name!r}: {error}")


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
        st = os.stat(path)
        #: The file this connection has open: a write checks it is still the one at ``path``.
        self._file_id = (st.st_dev, st.st_ino)

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
        view = None if create else _read_only_view(path)
        try:
            db = await aiosqlite.connect(
                view or path, isolation_level=None, cached_statements=256, uri=view is not None
            )
        except sqlite3.Error as e:
            raise _open_error(path, e) from e
        ledger = cls(db, path, clock, busy_timeout)
        try:
            await ledger._prepare(existed, durability, migrate=create, read_only=view is not None)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        return ledger

    async def _prepare(
        self, existed: bool, durability: Durability, *, migrate: bool, read_only: bool
    ) -> None:
        db, name = self._db, str(self.path)
        try:
            # While opening, wait as long as it takes (another runner may be switching a new
            # file to WAL or migrating it, which locks it exclusively); short waits afterwards.
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            objects = await self._scalar(sql.SCHEMA_OBJECTS)
            app_id = await self._scalar("PRAGMA application_id")
            version = await self._scalar("PRAGMA user_version")
        except sqlite3.Error as e:
            if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
                raise LedgerError(f"state {name!r}: {e}") from e
            raise _open_error(self.path, e) from e
        if objects and app_id != sql.APPLICATION_ID:
            raise NotALedgerError(
                f"state {name!r} is a SQLite database of another application; it was not touched"
            )
        if version > sql.SCHEMA_VERSION:
            raise SchemaVersionError(name, version, sql.SCHEMA_VERSION)
        if existed and not objects and not migrate:
            wal, shm = _companions(self.path)
            if shm.exists() and not wal.exists():
                raise LedgerError(
                    f"state {name!r} holds no ledger, and its -shm file says a -wal file "
                    "existed: was the -wal deleted? Its commits are gone; see "
                    "docs/troubleshooting.md"
                )
            raise NotALedgerError(f"state {name!r} is an empty database, not a ledger")
        if read_only:
            if version < sql.SCHEMA_VERSION:
                raise LedgerError(
                    f"state {name!r} has schema version {version}; run 'asyncbatch run' "
                    "once (as a user who may write it) to upgrade it"
                )
            return
        with self._errors():
            await self._switch_to_wal()
            sync = "FULL" if durability == "full" else "NORMAL"
            await db.execute(f"PRAGMA synchronous = {sync}")
            if version < sql.SCHEMA_VERSION:
                if not migrate:
                    raise LedgerError(
                        f"state {name!r} has schema version {version}; run 'asyncbatch run' "
                        "once to upgrade it"
                    )
                # The secret is made on the ledger's thread, never passed as an argument:
                # aiosqlite logs every call's arguments at DEBUG.
                await self._transact(self._migrate, self.clock())
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
    def _migrate(conn: sqlite3.Connection, now: float) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        while version < sql.SCHEMA_VERSION:
            for statement in sql.MIGRATIONS[version].split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            version += 1
        conn.execute(f"PRAGMA application_id = {sql.APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {sql.SCHEMA_VERSION}")
        conn.execute(sql.PUT_META, ("secret", secrets.token_hex(32)))
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

    def _check_file(self) -> None:
        """Refuse to write when the state file was deleted or replaced since it was opened.

        SQLite would go on writing the unlinked file, and a runner starting meanwhile would
        make a fresh state and redo everything (one ``stat``, about a microsecond).
        """
        try:
            st = os.stat(self.path)
            found: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            found = None
        if found != self._file_id:
            raise LedgerError(
                f"state {str(self.path)!r} was {'deleted' if found is None else 'replaced'} "
                "while this runner was using it; it stopped (a runner on a new file would "
                "redo every item): put the state back, or start again on purpose"
            )

    async def _transact(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one ``BEGIN IMMEDIATE`` transaction on the ledger thread.

        ``fn`` is synchronous and uses the plain ``sqlite3.Connection``. The whole transaction
        is one hop: cancelling the caller cannot interrupt it half-way. Raises
        :class:`LedgerError` if the state file was deleted or replaced since it was opened.
        """
        self._check_file()

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
