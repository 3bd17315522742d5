"""A ``postgresql://`` state: checked up front, printed without its password."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from .._exceptions import ConfigurationError

__all__ = ["DEFAULT_SCHEMA", "PostgresDSN", "is_postgres"]

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
    # (Not urlunsplit: it drops the "//" of a DSN without a host, "postgresql:///db".)
    return f"{parts.scheme}://{netloc}{parts.path}" + _query_without_password(parts.query)


def _query_without_password(query: str) -> str:
    """``?query`` without its ``password=`` parameters (``""`` when nothing is left)."""
    kept = [p for p in query.split("&") if p and p.partition("=")[0].lower() != "password"]
    return f"?{'&'.join(kept)}" if kept else ""


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
    #: Seconds a connection may take, when the DSN says (libpq's ``connect_timeout``, taken
    #: out of :attr:`dsn`: the driver would pass it on to the server as a setting it does not
    #: know); ``None``: the ledger's own bound.
    connect_timeout: float | None = None

    @classmethod
    def parse(cls, dsn: str) -> Self:
        """Check that ``dsn`` parses; raise a one-line :class:`ConfigurationError` otherwise.

        The error names the DSN without its password.
        """
        try:
            parts = urllib.parse.urlsplit(dsn)
            redacted = _redact(parts)
        except ValueError as e:
            why = f"{_EXAMPLE} ({e})"
            raise ConfigurationError.bad_value("state", _redact_text(dsn), why) from None

        def bad(why: str) -> ConfigurationError:
            return ConfigurationError.bad_value("state", redacted, f"{_EXAMPLE} ({why})")

        if parts.scheme not in ("postgresql", "postgres") or not dsn.startswith(_SCHEMES):
            raise bad("the scheme must be postgresql://")
        if parts.fragment:
            raise bad("a URL fragment '#...' is not allowed")
        if "\x00" in urllib.parse.unquote(dsn):
            # (No connection can carry one: the server refused it as a broken startup packet,
            # and that was exit 69, "unavailable, try later".)
            raise bad("a NUL character (%00) is not allowed")
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
        dsn, timeout = _take_connect_timeout(dsn, parts.query, query, bad)
        return cls(
            dsn=dsn,
            redacted=redacted,
            schema=schema or DEFAULT_SCHEMA,
            names_application="application_name" in query,
            connect_timeout=timeout,
        )


def _take_connect_timeout(
    dsn: str, text: str, query: dict[str, list[str]], bad: Callable[[str], ConfigurationError]
) -> tuple[str, float | None]:
    """``dsn`` without libpq's ``connect_timeout`` (``text``: its query string, ``query``: it
    parsed), and that timeout: seconds, an integer (at least 2, as libpq; 0 or less: none
    given, the ledger's own bound then, as the driver always has one)."""
    if "connect_timeout" not in query:
        return dsn, None
    given = query["connect_timeout"][-1]
    try:
        seconds = int(given)
    except ValueError:
        raise bad(f"connect_timeout must be whole seconds, not {given!r}") from None
    kept = [p for p in text.split("&") if p.partition("=")[0] != "connect_timeout"]
    dsn = dsn.replace(f"?{text}", f"?{'&'.join(kept)}" if kept else "", 1)
    return dsn, float(max(seconds, 2)) if seconds > 0 else None


def _redact_text(dsn: str) -> str:
    """A DSN that does not parse, without what may be its password: what stands between the
    user name and the last ``@``, and ``password=`` parameters."""
    scheme, sep, rest = dsn.partition("://")
    auth, at, hosts = rest.rpartition("@")
    if at:
        rest = f"{auth.partition(':')[0]}@{hosts}"
    base, _, query = rest.partition("?")
    return f"{scheme}{sep}{base}{_query_without_password(query)}"
