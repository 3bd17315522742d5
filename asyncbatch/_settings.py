"""How one setting is given, checked and shown: its kind, its help text, its CLI flag.

A :class:`~asyncbatch._config.BatchConfig` field carries a :class:`Setting` in its metadata
(:func:`setting`); :meth:`BatchConfig.from_settings` converts and checks a value given to
``Batch(...)`` through it, and the command line derives its option (flag, parser, help,
default shown) from it. So a setting's name, type, default, bounds, help and flag live in one
place: adding one means adding a field.

Every check raises :class:`ConfigurationError` with the standard one line (``setting 'x' has
value 'y': expected ...``); a flag's text that does not parse is argparse's error, naming the
same expectation.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import ConfigurationError
from ._sources.url import ObjectURL, is_object_url

__all__ = [
    "MAX_SECONDS",
    "Choice",
    "Count",
    "Globs",
    "Kind",
    "Methods",
    "Name",
    "PathSetting",
    "Seconds",
    "Setting",
    "Switch",
    "setting",
]

#: The longest duration any setting accepts (a year): longer ones are mistakes, and would
#: overflow clocks and timers.
MAX_SECONDS = 366 * 86400.0
#: A URL's start (``scheme://``): a location given as one that is not ``s3://``.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class Kind:
    """What values a setting takes: how a given value is converted and checked, and the
    argparse keywords of its option."""

    def convert(self, name: str, value: Any) -> Any:
        """The stored form of a value given for setting ``name`` (checked)."""
        self.check(name, value)
        return value

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`ConfigurationError` unless ``value`` is a stored value of the kind."""

    def option(self) -> dict[str, Any]:
        """The ``add_argument`` keywords of the setting's command-line option."""
        return {}


def _parser(convert: Callable[[str], Any], expected: str, check: Callable[[Any], bool]) -> Any:
    """An argparse ``type``: ``convert`` a flag's text, refusing what ``check`` refuses."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value

    return parse


@dataclass(frozen=True, slots=True)
class Count(Kind):
    """An integer from ``low`` to ``high``."""

    low: int = 1
    high: int = 1_000_000

    def _ok(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
        )

    def check(self, name: str, value: Any) -> None:
        if not self._ok(value):
            raise ConfigurationError.bad_value(name, value, self.expected)

    @property
    def expected(self) -> str:
        return f"an integer from {self.low} to {self.high:,}"

    def option(self) -> dict[str, Any]:
        return {"type": _parser(int, self.expected, self._ok), "metavar": "N"}


@dataclass(frozen=True, slots=True)
class Seconds(Kind):
    """A number of seconds, more than 0 (``zero``: or 0), at most :data:`MAX_SECONDS`;
    ``optional``: or ``None`` (no limit)."""

    zero: bool = False
    optional: bool = False

    def _ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return False
        return (value >= 0 if self.zero else value > 0) and value <= MAX_SECONDS

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if not self._ok(value):
            raise ConfigurationError.bad_value(name, value, self.expected)

    @property
    def expected(self) -> str:
        low = ">= 0" if self.zero else "> 0"
        return f"a number of seconds {low} and <= {MAX_SECONDS:.0f} (a year)"

    def option(self) -> dict[str, Any]:
        return {"type": _parser(float, self.expected, self._ok), "metavar": "SECONDS"}


@dataclass(frozen=True, slots=True)
class Choice(Kind):
    """One of ``values``."""

    values: tuple[str, ...]

    def check(self, name: str, value: Any) -> None:
        if value not in self.values:
            raise ConfigurationError.bad_value(name, value, f"one of {self.values}")

    def option(self) -> dict[str, Any]:
        return {"choices": self.values}


@dataclass(frozen=True, slots=True)
class Name(Kind):
    """A non-empty name of at most 200 characters."""

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not value or len(value) > 200:
            raise ConfigurationError.bad_value(name, value, "a non-empty name")


def _non_empty_path(text: str) -> str:
    """A path option's text; an empty one is refused (``Path("")`` is the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("invalid value '': expected a path, not an empty string")
    return text


@dataclass(frozen=True, slots=True)
class PathSetting(Kind):
    """A path, never empty (``Path("")`` would be the current directory), given as a ``str``
    or an ``os.PathLike`` of one: a ``Path`` (``absolute``: made absolute, ``~`` expanded), or
    the text as given (``text``: a state, which may be a ``postgresql://`` DSN); with
    ``urls``, an ``s3://BUCKET/PREFIX/`` location too (an
    :class:`~asyncbatch._sources.url.ObjectURL`); ``optional``: or ``None`` (not given)."""

    text: bool = False
    absolute: bool = False
    urls: bool = False
    optional: bool = False

    def convert(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if self.urls and isinstance(value, ObjectURL):
            return value
        # A str or a path (os.PathLike of str): str() of anything else (None, 123, b"s.db",
        # a list) made a file of that name.
        text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
        if not isinstance(text, str):
            raise ConfigurationError.bad_value(name, value, "a path (str or pathlib.Path)")
        if not text:
            raise ConfigurationError.bad_value(name, "", "a path, not an empty string")
        if self.text:
            return text
        if self.urls and is_object_url(text):
            return ObjectURL.parse(name, text)
        if self.urls and _URL.match(text):  # (a path would lose its "//": S3://b/in is S3:/b/in)
            raise ConfigurationError.bad_value(
                name, text, "a directory, or an s3://BUCKET/PREFIX/ location (s3:// in lower case)"
            )
        path = Path(text).expanduser()
        return path.absolute() if self.absolute else path

    def option(self) -> dict[str, Any]:
        return {"type": _non_empty_path}


@dataclass(frozen=True, slots=True)
class Switch(Kind):
    """``True`` or ``False``; on the command line a flag that sets it to the other value
    than its default (``--recursive``; ``--no-wait`` for ``wait``, true by default)."""

    negated: bool = False

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ConfigurationError.bad_value(name, value, "True or False")

    def option(self) -> dict[str, Any]:
        return {"action": "store_false" if self.negated else "store_true"}


def _strings(value: Any) -> tuple[Any, ...] | None:
    """A repeatable setting's values: one string is one value; ``None`` for a value that is
    neither a string nor an iterable of them (checked by the caller)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        return None
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Globs(Kind):
    """Shell patterns, a tuple (one string is one pattern); the flag is repeatable."""

    def convert(self, name: str, value: Any) -> Any:
        patterns = _strings(value)
        if patterns is None or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigurationError.bad_value(name, value, "non-empty glob patterns")
        return patterns

    def option(self) -> dict[str, Any]:
        return {"action": "append", "metavar": "GLOB"}


@dataclass(frozen=True, slots=True)
class Methods(Kind):
    """HTTP method names, upper-cased, a frozenset; the flag is repeatable."""

    def convert(self, name: str, value: Any) -> Any:
        methods = _strings(value)
        found = frozenset(str(m).upper() for m in methods or ())
        if methods is None or not all(m.isalpha() for m in found):
            raise ConfigurationError.bad_value(name, value, "HTTP method names (POST, PUT, ...)")
        return found

    def option(self) -> dict[str, Any]:
        return {"action": "append", "type": str.upper, "metavar": "METHOD"}


@dataclass(frozen=True, slots=True)
class Setting:
    """A setting's kind, its help text, and its command-line flags (``()``: ``--name`` with
    dashes; ``None``: none, the setting is the library's alone)."""

    kind: Kind
    help: str
    flags: tuple[str, ...] | None = ()

    def flag_names(self, name: str) -> tuple[str, ...]:
        """The option strings of setting ``name`` (empty: not on the command line)."""
        if self.flags is None:
            return ()
        if self.flags:
            return self.flags
        return ("--" + name.replace("_", "-"),)


def setting(
    kind: Kind,
    help: str,
    *,
    default: Any = None,
    factory: Callable[[], Any] | None = None,
    required: bool = False,
    flags: tuple[str, ...] | None = (),
) -> Any:
    """A :class:`~asyncbatch._config.BatchConfig` field and its :class:`Setting`: its
    ``default`` (or ``factory``; ``required``: none), its kind, help text and flags."""
    metadata = {"setting": Setting(kind, help, flags)}
    if required:
        return field(metadata=metadata)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
