"""The PostgreSQL server the tests use: probed once, a fresh schema per test, dropped after.

The server is ``ASYNCBATCH_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Without a reachable server the tests that need it are skipped, with the reason, unless
``ASYNCBATCH_REQUIRE_POSTGRES=1`` (as ``.ci/run`` sets) makes them fail instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from asyncbatch._ledger import PostgresDSN

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Server:
    """The PostgreSQL server the tests may use, or why there is none."""

    dsn: str
    error: str | None


def with_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


async def pg_query(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def pg_sync(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one query from synchronous test code."""
    # In a thread of its own: the caller may be inside a running event loop (a fixture that an
    # async test asked for).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, pg_query(dsn, query, *args)).result()


def probe() -> Server:
    """Probe the test server once per session."""
    dsn = os.environ.get("ASYNCBATCH_TEST_POSTGRES", DEFAULT_POSTGRES)
    try:
        pg_sync(dsn, "SELECT 1")
    except Exception as e:
        return Server(dsn, f"{type(e).__name__}: {e}")
    return Server(dsn, None)


def require(server: Server) -> None:
    if server.error is None:
        return
    reason = (
        f"PostgreSQL not reachable at {PostgresDSN.parse(server.dsn).redacted} "
        f"(set ASYNCBATCH_TEST_POSTGRES to a server): {server.error}"
    )
    if os.environ.get("ASYNCBATCH_REQUIRE_POSTGRES"):
        pytest.fail(reason)
    pytest.skip(reason)
