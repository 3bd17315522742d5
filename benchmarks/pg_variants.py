"""``asyncbatch`` with candidate PostgreSQL statement rewrites patched in, for profiling only.

``python -m benchmarks.pg_variants VARIANT[,VARIANT...] -- asyncbatch-arguments...``

Each variant replaces statements of the PostgreSQL ledger's SQL module (the constants its
methods read at call time) in this process, then runs the CLI. Nothing is written to the
package. A variant whose text no longer matches the statement it rewrites fails loudly: the
statement changed (perhaps the rewrite was applied), so the variant is obsolete. Written for
the ledger as of issue 10 (``asyncbatch._pg_sql``); ``base`` runs the code unchanged.
See benchmarks/PG_PROFILE.md for what each one measured.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["VARIANTS", "apply", "main"]

#: Where the PostgreSQL SQL may live (before and after the ledger becomes a package).
_MODULES = ("asyncbatch._ledger.postgres_sql", "asyncbatch._pg_sql")


def _sql() -> ModuleType:
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise SystemExit(f"pg_variants: none of {', '.join(_MODULES)} found (the ledger moved?)")


def _replace(sql: ModuleType, attr: str, old: str, new: str) -> None:
    text = getattr(sql, attr)
    if old not in text:
        raise SystemExit(f"pg_variants: {attr} no longer contains {old!r}: variant obsolete")
    setattr(sql, attr, text.replace(old, new))


def _join_commit(sql: ModuleType) -> None:
    """Join the outcomes to ``items`` on the key alone (drop ``i.key = ANY($3)``)."""
    _replace(sql, "COMMIT_OUTCOMES", "i.key = ANY($3::text[]) AND ", "")
    _replace(sql, "RELEASE_ITEMS", "i.key = ANY($3::text[]) AND ", "")
    _replace(sql, "EXTEND_LEASES", "i.key = ANY($4::text[]) AND ", "")


_ROWS = "AS r(key, relpath, size, mtime_ns, inode)\n"


def _skip_done(sql: ModuleType) -> None:
    """Register only keys not already done or dead (no row lock on finished rows)."""
    cond = "d.state IN ('done', 'dead')"
    _replace(sql, "CLAIM_SCANNED", _ROWS, _ROWS + _not_exists(cond))


def _skip_live(sql: ModuleType) -> None:
    """Also skip keys leased to another runner whose lease is still live."""
    cond = f"(d.state IN ('done', 'dead') OR (d.state = 'running' AND d.lease_until >= {sql.NOW}))"
    _replace(sql, "CLAIM_SCANNED", _ROWS, _ROWS + _not_exists(cond))


def _not_exists(cond: str) -> str:
    return (
        "    WHERE NOT EXISTS (SELECT 1 FROM items d\n"
        f"                      WHERE d.job = $1 AND d.key = r.key AND {cond})\n"
    )


def _fillfactor(percent: int) -> Callable[[ModuleType], None]:
    def apply(sql: ModuleType) -> None:
        migrations = dict(sql.MIGRATIONS)
        migrations[0] += f"\nALTER TABLE items SET (fillfactor = {percent});\n"
        sql.MIGRATIONS = migrations  # type: ignore[attr-defined]

    apply.__doc__ = f"``items`` with fillfactor {percent} (room on the page for the update)."
    return apply


def _no_analyze(sql: ModuleType) -> None:
    """Never refresh the planner's statistics (the ledger's ``ANALYZE items`` calls)."""
    sql.ANALYZE_ITEMS = "SELECT 1"  # type: ignore[attr-defined]


VARIANTS: dict[str, Callable[[ModuleType], None]] = {
    "base": lambda sql: None,
    "join_commit": _join_commit,
    "skip_done": _skip_done,
    "skip_live": _skip_live,
    "ff70": _fillfactor(70),
    "ff50": _fillfactor(50),
    "no_analyze": _no_analyze,
}


def apply(names: str) -> None:
    """Patch the comma-separated variants into the SQL module."""
    sql = _sql()
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in VARIANTS:
            raise SystemExit(f"pg_variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        VARIANTS[name](sql)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[1] != "--":
        raise SystemExit(__doc__)
    apply(args[0])
    from asyncbatch._cli import main as cli

    cli(args[2:])


if __name__ == "__main__":
    main()
