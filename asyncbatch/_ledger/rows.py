"""Value objects read from the ledger's rows by name: their fields are their columns.

A value object's :meth:`RowValue.columns` is the SELECT list that reads it, made from its
fields; :meth:`RowValue.from_row` builds it from a row read by name (``sqlite3.Row``,
``asyncpg.Record``, a ``dict``), never by position. A field's column is the field's name
unless the field's metadata (:func:`column`) says otherwise (procrastinate's
``Job.from_row``): an SQL expression (``expression AS name``); a time, which a backend
converts with one function (PostgreSQL: from the server's clock into the caller's); another
value object read from the same row (its own columns); or no column at all.

What a backend's driver returns differently (a relpath's bytes, PostgreSQL's signed inodes)
is converted by the backend, naming the field: ``from_row(row, relpath=os.fsdecode)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, Self, TypeVar, cast

__all__ = ["Row", "RowValue", "column"]

V = TypeVar("V", bound="RowValue")


class Row(Protocol):
    """A row whose columns are read by name: ``sqlite3.Row``, ``asyncpg.Record``, a dict."""

    def __getitem__(self, name: str, /) -> Any: ...


def column(
    *,
    sql: str | None = None,
    time: bool = False,
    row: type[RowValue] | None = None,
    read: bool = True,
) -> dict[str, Any]:
    """The metadata of a :class:`RowValue` field whose column is not simply its name:
    ``field(metadata=column(...))``.

    ``sql``: the column is this SQL expression (read ``AS`` the field's name). ``time``: the
    field holds a time (Unix seconds, or ``None``; see :meth:`RowValue.from_row`). ``row``: the
    field holds that value object, read from the same row (its own columns). ``read=False``:
    no column holds the field (a value read from a row has its default there).
    """
    meta: dict[str, Any] = {"time": time, "read": read}
    if sql is not None:
        meta["sql"] = sql
    if row is not None:
        meta["row"] = row
    return meta


class RowValue:
    """A frozen dataclass read from one row of the ledger (see the module's documentation)."""

    __slots__ = ()

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The SELECT list that reads this value, one item per column, in field order:
        ``", ".join(cls.columns())`` is what a statement selects."""
        found: list[str] = []
        for f in dataclasses.fields(cast(Any, cls)):
            meta = f.metadata
            if "row" in meta:
                found.extend(meta["row"].columns())
            elif meta.get("read", True):
                found.append(f"{meta['sql']} AS {f.name}" if "sql" in meta else f.name)
        return tuple(found)

    @classmethod
    def from_row(
        cls,
        row: Row,
        *,
        times: Callable[[float], float] | None = None,
        **convert: Callable[[Any], Any],
    ) -> Self:
        """This value from ``row``, each field from the column of its name.

        ``times`` converts every time field that is not ``NULL``; ``convert`` names a function
        that converts one field's value as the driver returned it. Raises ``KeyError`` (or the
        driver's error) naming a column the row lacks.
        """
        return cls.reader(times=times, **convert)(row)

    @classmethod
    def reader(
        cls: type[V],
        *,
        times: Callable[[float], float] | None = None,
        **convert: Callable[[Any], Any],
    ) -> Callable[[Row], V]:
        """:meth:`from_row` for many rows: a function of the row, the fields' metadata looked
        at once (a listing of a million items reads them at a few microseconds each)."""
        plain: list[str] = []
        timed: list[str] = []
        nested: list[tuple[str, Callable[[Row], RowValue]]] = []
        for f in dataclasses.fields(cast(Any, cls)):
            meta = f.metadata
            if "row" in meta:
                nested.append((f.name, meta["row"].reader()))
            elif not meta.get("read", True) or f.name in convert:
                continue
            elif times is not None and meta.get("time"):
                timed.append(f.name)
            else:
                plain.append(f.name)
        local = times or float
        converted = tuple(convert.items())

        def read(row: Row) -> V:
            values = {name: row[name] for name in plain}
            for name in timed:
                value = row[name]
                values[name] = None if value is None else local(float(value))
            for name, function in converted:
                values[name] = function(row[name])
            for name, value_of in nested:
                values[name] = value_of(row)
            return cls(**values)

        return read
