"""The PostgreSQL server the benchmarks use: reachability, one fresh schema per measurement,
the server's CPU time, and (when loaded) ``pg_stat_statements`` deltas.

Every PostgreSQL measurement runs in a schema of its own (``bench_<pid>_<n>_<random>``), named
in the DSN's ``search_path``, and drops it afterwards (``DROP SCHEMA ... CASCADE``), so
measurements never see each other's rows, nor the tests' (which use other schemas).

**Server CPU** is read from ``/proc`` when the server runs on this host: the postmaster's own
and reaped children's time (``utime + stime + cutime + cstime``: a backend's CPU moves into
``cutime`` when the postmaster reaps it) plus the live children's. The difference over a
measurement is the server's work for it, plus whatever other clients made it do meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["DEFAULT_DSN", "PgServer", "StatementDelta", "proc_stat", "schema_dsn"]

#: The server ``.ci/run`` starts: trust auth on 127.0.0.1, database ``test``.
DEFAULT_DSN = "postgresql://root@127.0.0.1:5432/test"
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
T = TypeVar("T")


def schema_dsn(base: str, schema: str) -> str:
    """``base`` with ``search_path=schema`` (the form ``asyncbatch --state`` accepts)."""
    parts = urllib.parse.urlsplit(base)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _redacted(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def proc_stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, utime + stime + cutime + cstime in s)`` of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    ticks = sum(int(x) for x in fields[11:15])
    return int(fields[1]), ticks / _TICKS


@dataclass(frozen=True, slots=True)
class StatementDelta:
    """One statement's share of a measurement, from ``pg_stat_statements``."""

    calls: int
    total_ms: float
    rows: int
    wal_records: int
    query: str

    @property
    def short(self) -> str:
        text = " ".join(self.query.split())
        return text if len(text) <= 70 else text[:67] + "..."


@dataclass(slots=True)
class PgServer:
    """A reachable server (see :meth:`probe`) and the schemas made on it."""

    dsn: str
    postmaster: int | None = None
    has_statements: bool = False
    version: str = ""
    made: set[str] = field(default_factory=set)
    #: The schema a one-runner measurement left for the resume measurement.
    resumable: str | None = None
    _counter: int = 0

    # -- connecting --------------------------------------------------------------------------

    @staticmethod
    def _run(work: Callable[[Any], Awaitable[T]], dsn: str, timeout: float = 30.0) -> T:
        async def main() -> T:
            import asyncpg

            conn = await asyncpg.connect(dsn, timeout=min(timeout, 10.0))
            try:
                return await asyncio.wait_for(work(conn), timeout)
            finally:
                await conn.close()

        return asyncio.run(main())

    @classmethod
    def probe(cls, dsn: str) -> PgServer | str:
        """The server at ``dsn``, or why it cannot be used (one line)."""
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            return "asyncpg is not installed (pip install -e '.[test]')"

        async def inspect(conn: Any) -> tuple[str, int | None, bool]:
            version = str(await conn.fetchval("SHOW server_version"))
            backend = proc_stat(int(await conn.fetchval("SELECT pg_backend_pid()")))
            try:
                await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
                statements = True
            except Exception:  # not installed in this database, or not preloaded
                statements = False
            return version, None if backend is None else backend[0], statements

        try:
            version, postmaster, statements = cls._run(inspect, dsn, timeout=10.0)
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            return f"PostgreSQL at {_redacted(dsn)} not reachable: {text[:200]}"
        return cls(dsn, postmaster=postmaster, has_statements=statements, version=version)

    # -- schemas -----------------------------------------------------------------------------

    def fresh_schema(self) -> str:
        """A new schema name (created by the ledger on first use), remembered for cleanup."""
        self._counter += 1
        name = f"bench_{os.getpid()}_{self._counter}_{secrets.token_hex(3)}"
        self.made.add(name)
        return name

    def state(self, schema: str) -> str:
        """The ``--state`` DSN for ``schema``."""
        return schema_dsn(self.dsn, schema)

    def drop(self, schema: str) -> None:
        """``DROP SCHEMA schema CASCADE`` (quiet if it does not exist)."""

        async def drop(conn: Any) -> None:
            await conn.execute("SET client_min_messages = warning")
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        self._run(drop, self.dsn, timeout=120.0)
        self.made.discard(schema)

    def schema_mib(self, schema: str) -> float | None:
        """The size of the schema's tables with their indexes and TOAST (MiB)."""

        async def size(conn: Any) -> Any:
            return await conn.fetchval(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind = 'r'",
                schema,
            )

        try:
            total = self._run(size, self.dsn)
        except Exception:
            return None
        return None if total is None else int(total) / 2**20

    def cleanup(self) -> None:
        """Drop every schema this object made that is still there (best effort)."""
        for schema in sorted(self.made):
            try:
                self.drop(schema)
            except Exception as e:
                print(f"  could not drop schema {schema}: {e}", flush=True)

    # -- what the server spent ---------------------------------------------------------------

    def cpu_seconds(self) -> float | None:
        """The server's CPU seconds so far (see the module docstring), or ``None``."""
        if self.postmaster is None:
            return None
        own = proc_stat(self.postmaster)
        if own is None:
            return None
        total = own[1]
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return None
        for pid in pids:
            stat = proc_stat(pid)
            if stat is not None and stat[0] == self.postmaster:
                total += stat[1]
        return total

    def settled_cpu_seconds(self) -> float | None:
        """:meth:`cpu_seconds` once the backends of exited clients have been reaped."""
        time.sleep(0.1)
        return self.cpu_seconds()

    def statements(self) -> dict[int, StatementDelta]:
        """A ``pg_stat_statements`` snapshot by queryid (empty when not available)."""
        if not self.has_statements:
            return {}

        async def read(conn: Any) -> list[Any]:
            return list(
                await conn.fetch(
                    "SELECT queryid, calls, total_exec_time, rows, wal_records, query "
                    "FROM pg_stat_statements WHERE queryid IS NOT NULL "
                    "AND query NOT LIKE '%pg_stat_statements%'"
                )
            )

        try:
            rows = self._run(read, self.dsn)
        except Exception:
            return {}
        return {
            int(r[0]): StatementDelta(int(r[1]), float(r[2]), int(r[3]), int(r[4]), str(r[5]))
            for r in rows
        }

    @staticmethod
    def delta(
        before: dict[int, StatementDelta], after: dict[int, StatementDelta], top: int = 5
    ) -> list[StatementDelta]:
        """The ``top`` statements by execution time between two snapshots."""
        changed: list[StatementDelta] = []
        for qid, now in after.items():
            then = before.get(qid)
            if then is not None:
                now = StatementDelta(
                    now.calls - then.calls,
                    now.total_ms - then.total_ms,
                    now.rows - then.rows,
                    now.wal_records - then.wal_records,
                    now.query,
                )
            if now.calls > 0:
                changed.append(now)
        changed.sort(key=lambda s: s.total_ms, reverse=True)
        return changed[:top]
