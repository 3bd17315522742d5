"""One connection to a PostgreSQL ledger, and the transactions run on it.

- One connection per ledger; an :class:`anyio.Lock` runs one transaction at a time on it. A
  transaction runs inside ``anyio.CancelScope(shield=True)`` once it has the lock, so
  cancelling the caller never leaves one open; if one is nevertheless interrupted with the
  connection still inside it, the connection is terminated (the server rolls back) and a new
  one is made for the next call.
- Deadlocks and serialization failures re-run the transaction, with jittered pauses, for up to
  ``busy_timeout``; row-lock waits give up after ``busy_timeout`` (``lock_timeout``); a
  statement gets ``2 * busy_timeout`` (at least 60 s) before the client gives up on the
  connection. A session idle inside a transaction for ``busy_timeout / 2`` (a runner frozen
  mid-transaction) is ended by the server, before the runners waiting for its rows give up;
  resumed, its runner runs the transaction again on a new connection.
- No statement is prepared inside a transaction (see :class:`GuardedConnection`): asyncpg
  prepares a statement new to the connection with Parse and Describe but no Sync, and until
  the client sends the rest the server counts the session as *active*, not idle: a runner
  frozen (or its event loop blocked) just then would keep the transaction's row locks
  forever. Such a statement ends the transaction (rolled back), is prepared on its own, and
  the transaction runs again: only the first time on a connection.
- Times: leases, locks and heartbeats are stored and compared in the server's clock. The
  offset between it and the caller's ``clock`` is measured on connecting and every minute (to
  within half a round trip): :meth:`PostgresSession.local` expresses a server time in the
  caller's clock.
- Outages: when the server cannot be reached or drops the connection (a restart, a failover,
  ``pg_terminate_backend``), a transaction that may be run again (every one but the
  idempotency store's claim) is retried on a new connection, with growing pauses, for up to
  ``outage_timeout`` seconds, saying so in one warning a second at most; the wait between
  tries can be cancelled. After that, or for any other error, the error leaves as a one-line
  :class:`~asyncbatch.LedgerError`, naming the DSN without its password.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import anyio
import asyncpg
import asyncpg.exceptions as pg_errors

from .. import _failpoints as failpoints
from .._exceptions import (
    ConfigurationError,
    LedgerAccessError,
    LedgerError,
    NotALedgerError,
    SchemaMismatchError,
    SchemaVersionError,
)
from .._procinfo import this_process
from . import postgres_sql as sql
from .base import (
    BUSY,
    Busy,
    ledger_error,
    live_user,
    retrying,
    schema_difference,
    upgrade_refused,
)
from .dsn import PostgresDSN
from .types import Durability, LedgerErrors

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]
    _AsyncpgConnection: TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    _AsyncpgConnection = asyncpg.Connection

__all__ = ["CONNECTION_LOST", "GuardedConnection", "PostgresSession"]

T = TypeVar("T")

#: Errors after which the whole transaction is simply run again.
_RETRYABLE = (pg_errors.DeadlockDetectedError, pg_errors.SerializationError)
#: Errors that mean the connection itself is gone or unusable.
CONNECTION_LOST = (OSError, TimeoutError, asyncpg.InterfaceError, pg_errors.InternalClientError)
#: Errors the server sends when it goes away or turns connections away for a while.
_SERVER_GONE = (
    pg_errors.IdleInTransactionSessionTimeoutError,  # this runner stalled inside a transaction
    pg_errors.AdminShutdownError,
    pg_errors.CrashShutdownError,
    pg_errors.CannotConnectNowError,
    pg_errors.TooManyConnectionsError,
    pg_errors.PostgresConnectionError,
)
#: What the server refuses of a connection's own settings (the DSN's database, role,
#: password or parameters): not an outage to wait out, a bad value.
#: Errors of a migration's statements that say the tables are not those of the version the
#: ledger records: a table, column or index there already, or missing.
_MISMATCHED = (
    pg_errors.DuplicateTableError,
    pg_errors.DuplicateColumnError,
    pg_errors.DuplicateObjectError,
    pg_errors.UndefinedTableError,
    pg_errors.UndefinedColumnError,
    pg_errors.UndefinedObjectError,
)
_REFUSED = (
    pg_errors.InvalidCatalogNameError,  # no such database
    pg_errors.InvalidAuthorizationSpecificationError,  # no such role, a wrong password
    pg_errors.UndefinedObjectError,  # a parameter PostgreSQL does not know
    pg_errors.InvalidParameterValueError,  # a bad value for one
    pg_errors.ClientConfigurationError,  # asyncpg's own check of the DSN (an InterfaceError)
)
#: How often (seconds) the offset between the server's clock and ours is measured again.
_OFFSET_TTL = 60.0
#: Statements a connection keeps prepared: all of asyncbatch's, for as long as it lives (see
#: :class:`GuardedConnection`: a statement dropped from the cache is prepared again).
_STATEMENT_CACHE_SIZE = 1000

log = logging.getLogger("asyncbatch.ledger")


def _denied(name: str, error: Exception) -> LedgerAccessError:
    """The one line for PostgreSQL's ``insufficient_privilege`` (SQLSTATE 42501): this role
    may not do what the command needs (retrying cannot help)."""
    return LedgerAccessError(
        f"state {name!r}: {_one_line(error)} (this role lacks a privilege this command needs: "
        "grant it, or connect as a role that has it)"
    )


class _Unreachable(Exception):
    """The server could not be reached, or dropped the connection (the message says why)."""


class _Unprepared(Exception):
    """A statement not prepared on the connection yet was about to be, inside a transaction."""

    def __init__(self, query: str, options: dict[str, Any]) -> None:
        super().__init__(f"statement not prepared yet: {query[:60]!r}")
        self.query = query
        self.options = options


class GuardedConnection(_AsyncpgConnection):
    """A connection that refuses to prepare a statement inside a guarded transaction.

    asyncpg prepares a statement it has not cached with Parse, Describe and Flush, and sends
    Bind, Execute and Sync once the description is back. In between the server's session is
    *active* (waiting for the client: ``ClientRead``), not idle in a transaction, so
    ``idle_in_transaction_session_timeout`` never ends it, and no other timeout does
    (``statement_timeout`` is ignored while waiting for the client): a runner frozen there
    (SIGSTOP, a suspended VM, a handler blocking the event loop) would hold its transaction's
    row locks until it runs again, and every runner that needs them would give up
    (``lock_timeout``). So while :attr:`guarded` (set by :meth:`PostgresSession.transact`),
    inside a transaction, a statement not in the cache raises :class:`_Unprepared` before a
    byte is sent; the session rolls back, prepares it outside any transaction (which holds no
    row lock) and runs the transaction again. Once prepared outside, a statement is never
    refused again on this connection (were the cache to drop it, it is prepared inside again,
    rather than rolled back forever).

    This overrides asyncpg's private ``_get_statement`` (every statement with parameters goes
    through it; those without use the simple protocol, one message): the test
    ``test_postgres_a_runner_frozen_as_it_sends_a_new_statement_holds_its_rows_for_short``
    (tests/test_ledger_contract.py) fails if that changes.
    """

    guarded = False
    #: The cache keys of the statements prepared outside a transaction after a refusal.
    _refused: set[tuple[str, Any, Any]] | None = None

    async def _get_statement(self, query: str, *args: Any, **options: Any) -> Any:
        if self.guarded and self.is_in_transaction():
            record_class = options.get("record_class")
            if record_class is None:
                record_class = self._protocol.get_record_class()  # type: ignore[attr-defined]
            key = (query, record_class, options.get("ignore_custom_codec", False))
            if self._refused is None:
                self._refused = set()
            if key not in self._refused and not self._stmt_cache.has(key):  # type: ignore[attr-defined]
                self._refused.add(key)
                raise _Unprepared(query, options)
        return await super()._get_statement(query, *args, **options)  # type: ignore[misc]

    async def prepare_outside(self, unprepared: _Unprepared) -> None:
        """Prepare (and cache) a refused statement, outside any transaction."""
        assert not self.is_in_transaction()
        await self._get_statement(unprepared.query, None, **unprepared.options)


@dataclass(slots=True)
class _Outage:
    """Waiting out an outage: since when, how long more, one warning a second at most.

    One per outage, shared by every call of a session and its twin: the patience counts from
    the first failed try since the last success, so calls made later in the outage (the
    claimer's, the committer's, the clean-up's after a give-up) do not each wait it again.
    """

    name: str
    patience: float
    began: float = field(default_factory=time.monotonic)
    pause: float = 0.1
    told: float = -math.inf

    def wait(self, error: _Unreachable) -> float:
        """How long to pause before the next try; raises :class:`LedgerError` past patience."""
        waited = time.monotonic() - self.began
        if waited >= self.patience:
            raise LedgerError(
                f"state {self.name!r} stayed unreachable for {waited:.0f}s ({error}); gave up "
                f"(--ledger-timeout {self.patience:g}); its leases are taken over by the next run"
            )
        if time.monotonic() - self.told >= 1.0:
            self.told = time.monotonic()
            log.warning(
                "state %r unreachable (%s); trying again, for up to %.0fs more",
                self.name,
                error,
                self.patience - waited,
            )
        pause, self.pause = self.pause, min(self.pause * 2, 2.0)
        return min(pause, max(self.patience - waited, 0.0))


@dataclass(slots=True)
class _Outages:
    """The outage under way, if any: one per server, shared by a session and its twin."""

    current: _Outage | None = None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresSession:
    """The connection of one :class:`~asyncbatch._ledger.postgres.PostgresLedger`."""

    def __init__(
        self,
        target: PostgresDSN,
        *,
        durability: Durability,
        busy_timeout: float,
        clock: Callable[[], float],
        outage_timeout: float = 120.0,
        errors: LedgerErrors | None = None,
    ) -> None:
        self.target = target
        #: Shared with the twin sessions of the same ledger.
        self.errors = LedgerErrors() if errors is None else errors
        self.name = target.redacted
        self.clock = clock
        self.busy_timeout = busy_timeout
        self.outage_timeout = outage_timeout
        self._durability = durability
        self._conn: GuardedConnection | None = None
        #: Add to a server time to express it in ``clock``'s time (measured, see _connection).
        self._shift = 0.0
        self._shift_measured = -math.inf
        self._lock = anyio.Lock()
        self._outages = _Outages()  # shared with the twin (see :class:`_Outage`)
        #: The connection that listens for notifications, once one is asked for.
        self._listener: GuardedConnection | None = None

    def twin(self) -> PostgresSession:
        """Another session to the same ledger, with the same settings (connected on first use)
        and the same outage: both are the same server's."""
        twin = PostgresSession(
            self.target,
            durability=self._durability,
            busy_timeout=self.busy_timeout,
            clock=self.clock,
            outage_timeout=self.outage_timeout,
            errors=self.errors,
        )
        twin._outages = self._outages
        return twin

    # -- connecting and the schema -----------------------------------------------------------------

    @property
    def _statement_timeout(self) -> float:
        return max(60.0, 2 * self.busy_timeout)

    @property
    def _idle_timeout_ms(self) -> int:
        """``idle_in_transaction_session_timeout``: half of ``busy_timeout`` (1 s at least)."""
        return max(1000, round(self.busy_timeout * 500))

    async def _connect(self) -> GuardedConnection:
        target = self.target
        settings = {
            "search_path": _quote_ident(target.schema),
            "synchronous_commit": "off" if self._durability == "normal" else "on",
            "lock_timeout": f"{max(1, round(self.busy_timeout * 1000))}ms",
            # A runner frozen inside a transaction (SIGSTOP, a suspended VM) holds its rows'
            # locks until the server ends its session: before another runner's wait for them
            # gives up (lock_timeout), so that one goes on. Resumed, the frozen one finds its
            # connection gone and runs the transaction again on a new one (fenced: a lease
            # taken over meanwhile is not its any more). Transactions never wait on anything
            # but the server, so a session idle inside one this long is a stalled runner.
            # (Idle, not active: see GuardedConnection for why none is left active.)
            "idle_in_transaction_session_timeout": f"{self._idle_timeout_ms}ms",
            "jit": "off",  # claims are many small statements: compiling them only costs
        }
        if not target.names_application:
            settings["application_name"] = "asyncbatch"
        try:
            conn = await asyncpg.connect(
                target.dsn,
                timeout=target.connect_timeout or min(self.busy_timeout, 60.0),
                command_timeout=self._statement_timeout,
                server_settings=settings,
                connection_class=GuardedConnection,
                # Every statement stays prepared (however long, however old): each one
                # dropped would be prepared again, its transaction run again.
                statement_cache_size=_STATEMENT_CACHE_SIZE,
                max_cached_statement_lifetime=0,
                max_cacheable_statement_size=0,
            )
        except _REFUSED as e:
            raise ConfigurationError.bad_value(
                "state", self.name, f"a connection PostgreSQL accepts ({_one_line(e)})"
            ) from None
        except (*_SERVER_GONE, *CONNECTION_LOST) as e:
            raise _Unreachable(_one_line(e)) from None
        except pg_errors.InsufficientPrivilegeError as e:  # no CONNECT on the database, say
            raise _denied(self.name, e) from None
        except (asyncpg.PostgresError, ValueError) as e:
            raise ledger_error(self.name, e, f"cannot connect to state {self.name!r}") from None
        return conn

    async def prepare(self, *, create: bool) -> None:
        """Check the schema (and with ``create``, create or migrate it); see ``open``.

        An unreachable server fails at once here (a run that cannot start has nothing to lose).
        """
        version = await self.read(self._inspect, again=False)
        if version == sql.SCHEMA_VERSION:
            return
        if not create:
            if version == 0:
                raise ConfigurationError(
                    f"state {self.name!r} does not exist (no asyncbatch ledger in schema "
                    f"{self.target.schema!r}); run 'asyncbatch run' once to create it"
                )
            raise SchemaVersionError(
                f"{self.name} (schema {self.target.schema})", version, sql.SCHEMA_VERSION
            )
        await self.transact(self._migrate, again=False, prepared=False)

    async def _inspect(self, conn: Connection) -> int:
        """The ledger's schema version (0: none yet); refuse what is not ours or too new."""
        schema = self.target.schema
        row = await conn.fetchrow(sql.INSPECT_SCHEMA, schema)
        assert row is not None
        _, relations, has_meta, meta_is_ours, usable = row
        where = f"state {self.name!r}: schema {schema!r}"
        if not usable:  # (its tables would read as missing: "relation does not exist")
            raise LedgerAccessError(
                f"{where} cannot be used by this role (no USAGE privilege on it); grant it "
                "(GRANT USAGE ON SCHEMA ...) or connect as a role that has it"
            )
        foreign = NotALedgerError(
            f"{where} holds tables of another application; it was not touched "
            "(choose another schema with ?search_path=NAME)"
        )
        if not has_meta:
            if relations:
                raise foreign
            return 0
        if not meta_is_ours:  # a 'meta' table with other columns (or types): not read at all
            raise foreign
        application, version = await conn.fetchrow(sql.READ_VERSION) or (None, None)
        if application != sql.APPLICATION:  # the ledger's columns, another application's rows
            raise foreign
        try:
            found = int(version or "")
        except ValueError:
            raise NotALedgerError(
                f"{where} has no valid schema_version; it was not touched"
            ) from None
        if not 0 < found <= sql.SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.name} (schema {schema})", found, sql.SCHEMA_VERSION)
        if found == sql.SCHEMA_VERSION:
            await self._check_tables(conn, found)
        return found

    async def _check_tables(self, conn: Connection, found: int) -> None:
        """Refuse (:class:`SchemaMismatchError`) a ledger whose tables are not those of this
        schema version: a table or column missing, renamed or added by something else."""
        schema = self.target.schema
        tables = {row[0]: tuple(row[1]) for row in await conn.fetch(sql.TABLE_COLUMNS, schema)}
        difference = schema_difference(sql.TABLES, tables)
        if difference is not None:
            raise SchemaMismatchError(
                f"{self.name} (schema {schema})", found, sql.SCHEMA_VERSION, difference
            )

    async def _migrate(self, conn: Connection) -> None:
        """Create the schema or bring it up to date (one transaction, one client at a time)."""
        schema = self.target.schema
        await conn.execute(sql.MIGRATION_LOCK, schema)
        version = await self._inspect(conn)  # again: another client may have done it meanwhile
        if version == sql.SCHEMA_VERSION:
            return
        if version:  # an older asyncbatch's ledger: none of its runners may be using it
            users = [tuple(row) for row in await conn.fetch(sql.LEDGER_USERS)]
            now = await conn.fetchval(sql.SERVER_NOW)
            user = live_user(users, now, this_process())
            if user is not None:
                raise upgrade_refused(
                    f"{self.name} (schema {schema})", version, sql.SCHEMA_VERSION, user
                )
        exists = (await conn.fetchrow(sql.INSPECT_SCHEMA, schema) or (False,))[0]
        if not exists:
            await conn.execute(sql.CREATE_SCHEMA.format(schema=_quote_ident(schema)))
        found = version
        while version < sql.SCHEMA_VERSION:
            try:
                await conn.execute(sql.MIGRATIONS[version])
            except _MISMATCHED as e:  # (rolled back: nothing of it stays)
                raise SchemaMismatchError(
                    f"{self.name} (schema {schema})", found, sql.SCHEMA_VERSION, _one_line(e)
                ) from None
            version += 1
        if found:  # (rolled back with the rest: an upgrade that leaves other tables is refused)
            await self._check_tables(conn, found)
        now = await conn.fetchval(sql.SERVER_NOW)
        await conn.execute(sql.SET_META, "application", sql.APPLICATION)
        await conn.execute(sql.SET_META, "schema_version", str(sql.SCHEMA_VERSION))
        await conn.execute(sql.PUT_META, "secret", secrets.token_hex(32))
        await conn.execute(sql.PUT_META, "created_at", repr(float(now)))

    async def listen(self, channel: str, callback: Callable[[str], None]) -> bool:
        """Call ``callback(payload)`` for every notification on ``channel``, on a connection
        of its own (made once; a session listens on one channel). ``False`` when it cannot
        be made (the caller polls instead)."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        try:
            self._listener = await self._connect()
            await self._listener.add_listener(
                channel, lambda _conn, _pid, _channel, payload: callback(payload)
            )
        except (_Unreachable, LedgerError, *CONNECTION_LOST, asyncpg.PostgresError):
            self._listener = None
            return False
        return True

    async def close(self) -> None:
        """Close the connection, after the transaction in flight (shielded: always completes)."""
        with anyio.CancelScope(shield=True):
            listener, self._listener = self._listener, None
            if listener is not None and not listener.is_closed():
                listener.terminate()
            async with self._lock:
                conn, self._conn = self._conn, None
                if conn is None or conn.is_closed():
                    return
                try:
                    await conn.close(timeout=5)
                except Exception:
                    conn.terminate()

    # -- transactions ------------------------------------------------------------------------------

    async def _connection(self) -> GuardedConnection:
        """The open connection (a new one if it was lost), with a fresh enough clock offset."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
            self._shift_measured = -math.inf
        if time.monotonic() - self._shift_measured > _OFFSET_TTL:
            before = self.clock()
            try:
                server = await self._conn.fetchval(sql.SERVER_CLOCK)
            except (*_SERVER_GONE, *CONNECTION_LOST) as e:
                self._discard(self._conn)
                raise _Unreachable(_one_line(e)) from e
            after = self.clock()
            self._shift = (before + after) / 2 - float(server)
            self._shift_measured = time.monotonic()
        return self._conn

    def _discard(self, conn: GuardedConnection) -> None:
        """Drop a connection that may be inside a transaction: the server rolls it back."""
        if self._conn is conn:
            self._conn = None
        if not conn.is_closed():
            conn.terminate()

    def _error(self, error: Exception) -> LedgerError:
        """The one-line :class:`LedgerError` for an asyncpg or PostgreSQL error."""
        if isinstance(error, pg_errors.LockNotAvailableError):
            return ledger_error(
                self.name,
                error,
                f"state {self.name!r}: rows stayed locked by another runner for "
                f"{self.busy_timeout:.0f}s",
            )
        if isinstance(error, pg_errors.InsufficientPrivilegeError):
            return _denied(self.name, error)
        if isinstance(error, asyncpg.PostgresError):
            return ledger_error(self.name, error)
        return ledger_error(self.name, error, f"state {self.name!r}: connection lost")

    async def transact(
        self,
        body: Callable[[Connection], Awaitable[T]],
        *,
        one: bool = False,
        again: bool = True,
        prepared: bool = True,
    ) -> T:
        """Run ``body(conn)`` as one transaction, to its end even if the caller is cancelled.

        With ``one``, the body is a single statement and runs as its own (implicit)
        transaction: one round trip instead of three. Deadlocks and serialization failures
        re-run the body (for up to ``busy_timeout``); with ``again`` (the body may run twice:
        after a lost connection it may have committed), an outage is waited out (see the
        module); any other error rolls it back. A statement the connection has not prepared
        yet rolls the transaction back and runs the body again once it is (see
        :class:`GuardedConnection`), unless ``prepared`` is false (a migration: its
        statements name the tables it creates).
        """

        async def attempt() -> T:
            try:
                return await retrying(
                    lambda: self._attempt(body, one=one, prepared=prepared),
                    patience=self.busy_timeout,
                    first_pause=0.002,
                    longest_pause=0.25,
                    on_timeout=lambda: LedgerError(
                        f"state {self.name!r}: transactions kept deadlocking with other "
                        f"runners for {self.busy_timeout:.0f}s"
                    ),
                    errors=self.errors,
                )
            except (*_SERVER_GONE, *CONNECTION_LOST) as e:
                raise _Unreachable(_one_line(e)) from e
            except asyncpg.PostgresError as e:
                raise self._error(e) from e

        return await self._outlasting(attempt, again=again)

    async def _attempt(
        self, body: Callable[[Connection], Awaitable[T]], *, one: bool, prepared: bool
    ) -> T | Busy:
        conn = await self._connection()
        try:
            if one:
                await failpoints.ahit("in-transaction")
                return await body(conn)
            while True:
                try:
                    conn.guarded = prepared
                    async with conn.transaction():
                        await failpoints.ahit("in-transaction")
                        return await body(conn)
                except _Unprepared as e:  # rolled back: prepare it on its own, run it again
                    await conn.prepare_outside(e)
                finally:
                    conn.guarded = False
        except _RETRYABLE:
            return BUSY
        except (*_SERVER_GONE, *CONNECTION_LOST):
            self._discard(conn)
            raise
        finally:
            if not conn.is_closed() and conn.is_in_transaction():
                self._discard(conn)  # interrupted inside: never leave it open

    async def read(self, body: Callable[[Connection], Awaitable[T]], *, again: bool = True) -> T:
        """Run read statements (each its own snapshot), shielded like a transaction, and (with
        ``again``) waiting out an outage like one."""

        async def attempt() -> T:
            conn = await self._connection()
            try:
                return await body(conn)
            except (*_SERVER_GONE, *CONNECTION_LOST) as e:
                self._discard(conn)
                raise _Unreachable(_one_line(e)) from e
            except asyncpg.PostgresError as e:
                raise self._error(e) from e

        return await self._outlasting(attempt, again=again)

    async def _outlasting(self, attempt: Callable[[], Awaitable[T]], *, again: bool) -> T:
        """``attempt()`` under the lock and shielded, tried again through an outage; the pauses
        between tries are not shielded (a cancelled caller stops waiting)."""
        outages = self._outages
        while True:
            try:
                async with self._lock:
                    with anyio.CancelScope(shield=True):
                        result = await attempt()
                outages.current = None
                return result
            except _Unreachable as e:
                self.errors.unreachable += 1
                if not again:
                    raise LedgerError(f"cannot connect to state {self.name!r}: {e}") from None
                if outages.current is None:
                    outages.current = _Outage(self.name, self.outage_timeout)
                await anyio.sleep(outages.current.wait(e))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """The rows of one read statement."""

        async def read(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(query, *args)

        return await self.read(read)

    async def fetchval(self, query: str, *args: Any) -> Any:
        """The first value of one read statement (``None`` without a row)."""

        async def read(conn: Connection) -> Any:
            return await conn.fetchval(query, *args)

        return await self.read(read)

    def local(self, server_time: float) -> float:
        """A server time expressed in the caller's clock."""
        return server_time + self._shift

    def server(self, local_time: float) -> float:
        """A time of the caller's clock expressed in the server's (the inverse of :meth:`local`,
        as of the last measured offset)."""
        return local_time - self._shift
