"""Choosing a ledger backend: a SQLite file path or a ``postgresql://`` DSN.

:func:`open_ledger` opens either; :class:`LedgerLike` is the surface the runner and the operator
commands use, which both :class:`~asyncbatch._ledger.Ledger` (SQLite) and
:class:`~asyncbatch._pg_ledger.PostgresLedger` provide (mypy checks both against it, below).
Nothing here imports a backend until it is opened: asyncpg is needed only for a PostgreSQL state.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Self

from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._ledger import ClaimedRow, ItemInfo, Ledger, LockInfo, Outcome, RunInfo
    from ._pg_ledger import PostgresLedger
    from ._procinfo import ProcessIdentity

__all__ = ["DEFAULT_SCHEMA", "LedgerLike", "PostgresDSN", "is_postgres", "open_ledger"]

#: The PostgreSQL schema the ledger's tables live in when the DSN names none.
DEFAULT_SCHEMA = "asyncbatch"
_SCHEMES = ("postgresql://", "postgres://")
_EXAMPLE = "a PostgreSQL URL like postgresql://user@host:5432/dbname[?search_path=schema]"


def is_postgres(state: str | os.PathLike[str]) -> bool:
    """Whether ``state`` names a PostgreSQL ledger (a ``postgresql://`` DSN), not a file."""
    return isinstance(state, str) and state.startswith(_SCHEMES)


def _redact(parts: urllib.parse.SplitResult) -> str:
    """The DSN without its password (in the user info and in the query)."""
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, hosts = netloc.rpartition("@")
        user = auth.partition(":")[0]
        netloc = f"{user}@{hosts}" if user else hosts
    query = "&".join(
        part
        for part in parts.query.split("&")
        if part and part.partition("=")[0].lower() != "password"
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _schema_from(query: dict[str, list[str]]) -> str | None:
    """The first schema of a ``search_path`` given as a parameter or in ``options=-c ...``."""
    paths = list(query.get("search_path", []))
    for options in query.get("options", []):
        words = options.replace("-c ", "-c").split()
        paths += [w.split("=", 1)[1] for w in words if w.startswith("-csearch_path=")]
    if not paths:
        return None
    return paths[-1].split(",")[0].strip()


@dataclass(frozen=True, slots=True)
class PostgresDSN:
    """A checked ``postgresql://`` state: the DSN, its printable form, and the ledger's schema."""

    dsn: str
    #: The DSN without its password: the form every message and log line uses.
    redacted: str
    #: The schema holding the ledger's tables: the DSN's ``search_path`` (first entry), else
    #: :data:`DEFAULT_SCHEMA`.
    schema: str
    #: Whether the DSN sets ``application_name`` itself.
    names_application: bool

    @classmethod
    def parse(cls, dsn: str) -> Self:
        """Check that ``dsn`` parses; raise a one-line :class:`ConfigurationError` otherwise.

        The error names the DSN without its password.
        """
        try:
            parts = urllib.parse.urlsplit(dsn)
            redacted = _redact(parts)
        except ValueError:
            raise ConfigurationError.bad_value("state", "postgresql://...", _EXAMPLE) from None

        def bad(why: str) -> ConfigurationError:
            return ConfigurationError.bad_value("state", redacted, f"{_EXAMPLE} ({why})")

        if parts.scheme not in ("postgresql", "postgres") or not dsn.startswith(_SCHEMES):
            raise bad("the scheme must be postgresql://")
        if parts.fragment:
            raise bad("a URL fragment '#...' is not allowed")
        hosts = parts.netloc.rpartition("@")[2]
        for host in hosts.split(","):
            _, sep, port = host.rpartition(":") if not host.endswith("]") else ("", "", "")
            if sep and port and not (port.isdigit() and 0 < int(port) < 65536):
                raise bad(f"bad port {port!r}")
        try:
            query = (
                urllib.parse.parse_qs(parts.query, strict_parsing=True, keep_blank_values=True)
                if parts.query
                else {}
            )
        except ValueError:
            raise bad("the query string does not parse") from None
        if parts.path.strip("/") and "/" in parts.path.strip("/"):
            raise bad("the path must be just the database name")
        schema = _schema_from(query)
        if schema is not None:
            schema = schema.strip('"')
            if not schema or schema.startswith("$") or len(schema.encode()) > 63:
                raise bad(f"search_path must start with a schema name, not {schema!r}")
        return cls(
            dsn=dsn,
            redacted=redacted,
            schema=schema or DEFAULT_SCHEMA,
            names_application="application_name" in query,
        )


class LedgerLike(Protocol):
    """What the runner and the operator commands need from a ledger, whatever its backend."""

    async def close(self) -> None:
        """Close the connection (shielded: always completes)."""

    async def __aenter__(self) -> Self:
        """The ledger itself; it is closed on exit."""

    async def __aexit__(self, *exc: object) -> None:
        """Close the ledger."""

    # -- reads ---------------------------------------------------------------------------------

    async def meta(self, name: str) -> str | None:
        """A value from the ledger's ``meta`` table (``secret``, ``created_at``)."""

    async def jobs(self) -> list[str]:
        """Every job this ledger knows."""

    async def job_identity(self, job: str) -> str | None:
        """The identity mode recorded for ``job``, or ``None`` for an unknown job."""

    async def job_exists(self, job: str) -> bool:
        """Whether this ledger knows ``job``."""

    async def locks(self) -> list[LockInfo]:
        """Every job lock in the ledger."""

    async def runners(self, job: str) -> list[tuple[str, int | None, str | None, bool, float]]:
        """``(owner, pid, host, shared, heartbeat_at)`` of the job's registered runners."""

    async def counts(self, job: str) -> dict[str, int]:
        """Items of the job by state; every state is present."""

    async def oldest_waiting(self, job: str) -> float | None:
        """When the oldest pending or failed item was first registered."""

    async def next_retry_at(self, job: str) -> float | None:
        """When the earliest failed item of the job becomes due (the caller's clock), or None."""

    async def failures(self, job: str, limit: int) -> list[ItemInfo]:
        """Failed and dead items, the most recent first."""

    async def find_items(self, job: str, key_or_relpath: str) -> list[ItemInfo]:
        """Items whose key is, or whose relpath is, ``key_or_relpath``."""

    async def runs(self, job: str, limit: int = 50) -> list[RunInfo]:
        """The job's run history, the most recent first."""

    async def retry(self, job: str, keys: Sequence[str] | None, *, dead: bool) -> int:
        """Put failed (and with ``dead``, dead) items back to pending; return how many."""

    # -- the job lock and runners --------------------------------------------------------------

    async def ensure_job(self, job: str, identity: str) -> None:
        """Record the job's identity mode; refuse a different one for an existing job."""

    async def acquire_lock(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool
    ) -> LockInfo | None:
        """Take the job lock (or, ``shared``, check no exclusive runner holds it)."""

    async def register_runner(
        self, job: str, owner: str, me: ProcessIdentity, ttl: float, *, shared: bool, mode: str
    ) -> int:
        """Record this runner and open a run history row; return the row's id."""

    async def reap_stale_runners(self, job: str, me: ProcessIdentity) -> int:
        """Hand the leased items of runners that are gone back; return how many."""

    async def heartbeat(
        self,
        job: str,
        owner: str,
        ttl: float,
        leases: Sequence[tuple[str, int]],
        *,
        holds_lock: bool,
    ) -> bool:
        """Extend lock, liveness and item leases; ``False`` when the lock was taken from us."""

    async def release_runner(
        self,
        job: str,
        owner: str,
        *,
        holds_lock: bool,
        run_id: int,
        totals: tuple[int, int, int, int, int],
        exit_status: str,
    ) -> None:
        """Remove this runner's records and finish its run history row."""

    async def force_unlock(self, job: str, owner: str) -> bool:
        """Delete a job lock held by ``owner``; ``False`` when it was not held by it."""

    # -- claims and outcomes -------------------------------------------------------------------

    async def claim_scanned(
        self,
        job: str,
        owner: str,
        lease: float,
        rows: Sequence[tuple[str, bytes, int, int, int]],
    ) -> list[ClaimedRow]:
        """Register scanned entries and lease the claimable ones, in one transaction."""

    async def claim_waiting(
        self, job: str, owner: str, lease: float, limit: int
    ) -> list[ClaimedRow]:
        """Lease up to ``limit`` items waiting in the ledger: pending, or failed and due."""

    async def commit_outcomes(
        self,
        job: str,
        owner: str,
        outcomes: Sequence[Outcome],
        started: Sequence[tuple[str, int]] = (),
    ) -> set[str]:
        """Record finished attempts (and count ``started`` running ones) in one transaction.

        Returns the keys of ``outcomes`` whose lease was lost.
        """

    async def release_items(
        self, job: str, owner: str, items: Sequence[tuple[str, int, bool]]
    ) -> None:
        """Give leased items back (``(key, fence, started)``) to be claimed again."""

    async def record_move(self, job: str, owner: str, key: str, fence: int, dst: str) -> bool:
        """Note, under our lease, that the item's input is being moved to ``dst``."""

    async def move_destinations(self, job: str) -> list[str]:
        """Where ``ctx.move()`` took or was taking the inputs of the job's unfinished items."""


async def open_ledger(
    state: str | os.PathLike[str],
    *,
    durability: Literal["normal", "full"] = "normal",
    create: bool = True,
    busy_timeout: float = 30.0,
    clock: Callable[[], float] = time.time,
) -> Ledger | PostgresLedger:
    """Open the ledger ``state`` names: a ``postgresql://`` DSN, else a SQLite file path.

    The keyword arguments mean the same for both backends (see ``Ledger.open`` and
    ``PostgresLedger.open``).
    """
    if is_postgres(state):
        from ._pg_ledger import PostgresLedger

        return await PostgresLedger.open(
            str(state),
            durability=durability,
            create=create,
            busy_timeout=busy_timeout,
            clock=clock,
        )
    from ._ledger import Ledger

    return await Ledger.open(
        state, durability=durability, create=create, busy_timeout=busy_timeout, clock=clock
    )


if TYPE_CHECKING:

    def _both_backends_conform(sqlite: Ledger, postgres: PostgresLedger) -> list[LedgerLike]:
        """Never called: makes mypy check both backends against :class:`LedgerLike`."""
        return [sqlite, postgres]
