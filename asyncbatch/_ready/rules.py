"""Readiness rules as values (``Age()``, ``Marker(".done")``, ...) and as the command line's
strings (``age``, ``marker:.done``, ...): each value's check, its canonical string, and the
parsing of both, with errors of one line naming the bad rule."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from .._exceptions import ConfigurationError

__all__ = [
    "KINDS",
    "Age",
    "BadRule",
    "DirMarker",
    "Marker",
    "MaxAge",
    "MinSize",
    "ReadyRule",
    "Stable",
    "parse_duration",
    "parse_rule",
    "parse_size",
    "ready_rules",
    "rule_argument",
    "show_duration",
]

#: The kinds of rules, in the order a file's verdict names the first that does not hold.
KINDS: Final = ("max-age", "min-size", "age", "marker", "dir-marker", "stable")
#: The most looks ``stable:N`` takes.
MOST_LOOKS = 100
#: The longest ``max-age`` (a century: longer is a mistake, and would overflow the clocks).
LONGEST_AGE = 100 * 366 * 86400.0
#: The largest ``min-size`` (1024T, a pebibyte: no file is larger; more is a mistake).
LARGEST_SIZE = 1 << 50
_SIZE_BOUNDS = "a size from 0 to 1024T (1024, 1k, 1KiB, 10M)"
_STABLE_BOUNDS = f"expected stable:N, N a whole number from 2 to {MOST_LOOKS}"
_EXPECTED = (
    "expected age, stable:N, marker:SUFFIX, dir-marker:NAME, min-size:BYTES or max-age:DURATION"
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?")
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"(\d+)\s*(?:([kKmMgGtT])(?:i?B)?|B)?")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``2h``, ``7d``, ``1w`` (or a plain number of seconds).
    Raises ``ValueError``."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(found[1]) * _SECONDS[found[2] or "s"]


def show_duration(seconds: float) -> str:
    """A duration as :func:`parse_duration` reads it: the largest of d, h, m, s that divides
    it (``7d``, ``90m``, ``1.5s``); read back, the same number (no exponent, no rounding)."""
    for unit in ("d", "h", "m"):
        count = seconds / _SECONDS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    import decimal  # rarely needed (a fraction of a second), 1 ms at every start-up

    text = format(decimal.Decimal(repr(float(seconds))), "f")
    return f"{text.removesuffix('.0')}s"


def parse_size(text: str) -> int:
    """Bytes in ``1024``, ``1k``, ``1KiB``, ``10M``, ``2G`` (k, M, G, T: powers of 1024).
    Raises ``ValueError``."""
    found = _SIZE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not a size: {text!r}")
    scale: int = 1 << (10 * _POWERS.get((found[2] or "").lower(), 0))
    return int(found[1]) * scale


class BadRule(ConfigurationError):
    """A readiness rule that does not parse or is out of bounds: ``rule`` as given, and what
    was ``expected`` (the command line words its error from them)."""

    def __init__(self, rule: str, expected: str) -> None:
        super().__init__(f"setting 'ready' has value {rule!r}: {expected}")
        self.rule = rule
        self.expected = expected


def _bad(rule: str, expected: str) -> BadRule:
    return BadRule(rule, expected)


@dataclass(frozen=True, slots=True)
class ReadyRule:
    """A readiness rule: a file is handled once every rule of its job holds. ``str(rule)`` is
    its command-line form (``marker:.done``), which :func:`parse_rule` reads back."""

    kind: ClassVar[str] = ""

    def __str__(self) -> str:
        return self.kind


@dataclass(frozen=True, slots=True)
class Age(ReadyRule):
    """``age``, the default: the file's mtime *and* ctime are at least ``settle`` seconds old
    (a copier can set the mtime back; nothing sets the ctime back). Watching, the file must
    also look the same to two looks."""

    kind: ClassVar[str] = "age"


@dataclass(frozen=True, slots=True)
class Stable(ReadyRule):
    """``stable:N``: size, mtime, ctime and inode unchanged across ``looks`` looks at least
    ``settle`` seconds apart; for filesystems whose clocks or ctimes cannot be trusted. A
    one-shot run looks again itself (and waits for the answer). Raises
    :class:`ConfigurationError` unless ``looks`` is from 2 to 100."""

    looks: int = 2
    kind: ClassVar[str] = "stable"

    def __post_init__(self) -> None:
        n = self.looks
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MOST_LOOKS:
            raise _bad(f"stable:{n}", _STABLE_BOUNDS)

    def __str__(self) -> str:
        return f"stable:{self.looks}"


def _check_name(rule: str, text: Any, what: str) -> None:
    if not isinstance(text, str) or not text or "/" in text or "\0" in text or text in (".", ".."):
        raise _bad(rule, f"expected {what}: a non-empty name part, without '/'")


@dataclass(frozen=True, slots=True)
class Marker(ReadyRule):
    """``marker:SUFFIX``: the file ``NAME`` is ready once ``NAME+SUFFIX`` exists and the file
    was not modified after it (mtimes: ``marker:.done``, ``a.csv`` once ``a.csv.done`` is
    there). Every name ending with ``suffix`` is a marker, never an input."""

    suffix: str
    kind: ClassVar[str] = "marker"

    def __post_init__(self) -> None:
        _check_name(f"marker:{self.suffix}", self.suffix, "marker:SUFFIX")

    def __str__(self) -> str:
        return f"marker:{self.suffix}"


@dataclass(frozen=True, slots=True)
class DirMarker(ReadyRule):
    """``dir-marker:NAME``: a directory's files (in its subdirectories too) are ready once it
    holds ``name`` and they were not modified after it (``dir-marker:_SUCCESS``, as Hadoop
    and Spark jobs write). A file modified after the marker waits for a newer one, and is
    reported. Every file named ``name`` is a marker, never an input."""

    name: str
    kind: ClassVar[str] = "dir-marker"

    def __post_init__(self) -> None:
        _check_name(f"dir-marker:{self.name}", self.name, "dir-marker:NAME")

    def __str__(self) -> str:
        return f"dir-marker:{self.name}"


@dataclass(frozen=True, slots=True)
class MinSize(ReadyRule):
    """``min-size:BYTES``: the file holds at least ``size`` bytes. Raises
    :class:`ConfigurationError` unless ``size`` is from 0 to 1024T (``1 << 50``)."""

    size: int
    kind: ClassVar[str] = "min-size"

    def __post_init__(self) -> None:
        n = self.size
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= LARGEST_SIZE:
            raise _bad(f"min-size:{n}", f"expected min-size:BYTES, {_SIZE_BOUNDS}")

    def __str__(self) -> str:
        return f"min-size:{self.size}"


@dataclass(frozen=True, slots=True)
class MaxAge(ReadyRule):
    """``max-age:DURATION``: the file's mtime is at most ``seconds`` old; older files are left
    alone and counted (as NiFi's maximum file age and Auto Loader's ``maxFileAge``)."""

    seconds: float
    kind: ClassVar[str] = "max-age"

    def __post_init__(self) -> None:
        s = self.seconds
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= LONGEST_AGE:
            raise _bad(
                f"max-age:{s}", "expected max-age:DURATION, more than 0 and at most a century"
            )

    def __str__(self) -> str:
        return f"max-age:{show_duration(self.seconds)}"


def parse_rule(text: str) -> ReadyRule:
    """The rule a command-line string names (``age``, ``stable:3``, ``marker:.done``,
    ``dir-marker:_SUCCESS``, ``min-size:1KiB``, ``max-age:7d``). Raises :class:`BadRule`
    (a :class:`ConfigurationError`) of one line naming the bad rule as given."""
    try:
        return _parse_rule(text)
    except BadRule as e:
        raise BadRule(text, e.expected) from None


def _parse_rule(text: str) -> ReadyRule:
    kind, colon, arg = text.partition(":")
    if kind == "age" and not colon:
        return Age()
    if kind == "stable":
        if not colon:
            return Stable()
        # ASCII digits only ("²" is a digit to isdigit, not to int); a few (int() refuses
        # thousands of them, and more than three are out of bounds anyway).
        if not (arg.isascii() and arg.isdigit()) or len(arg.lstrip("0")) > 3:
            raise _bad(text, _STABLE_BOUNDS)
        return Stable(int(arg))
    if kind == "marker" and colon:
        return Marker(arg)
    if kind == "dir-marker" and colon:
        return DirMarker(arg)
    if kind == "min-size" and colon:
        try:
            size = parse_size(arg)
        except ValueError:  # not a size, or thousands of digits (int() refuses them)
            raise _bad(text, f"expected min-size:BYTES, {_SIZE_BOUNDS}") from None
        return MinSize(size)
    if kind == "max-age" and colon:
        try:
            seconds = parse_duration(arg)
        except ValueError:
            raise _bad(text, "expected max-age:DURATION (90s, 30m, 2h, 7d, 1w)") from None
        return MaxAge(seconds)
    raise _bad(text, _EXPECTED)


def rule_argument(text: str) -> ReadyRule:
    """:func:`parse_rule` as an argparse ``type``: a bad rule is argparse's one-line error
    (``argument --ready: invalid value 'stable:x': expected ...``, exit 2)."""
    try:
        return parse_rule(text)
    except BadRule as e:
        raise argparse.ArgumentTypeError(f"invalid value {e.rule!r}: {e.expected}") from None


def ready_rules(value: Any) -> tuple[ReadyRule, ...]:
    """A job's rules from what ``ready=`` was given: a rule or its string, or several. Exact
    repeats are dropped; two rules of one kind that take one value (``stable``, ``min-size``,
    ``max-age``) with different values are refused, and so is no rule at all. Raises
    :class:`ConfigurationError` naming the bad rule."""
    given: Iterable[Any] = (value,) if isinstance(value, str | ReadyRule) else value
    rules: list[ReadyRule] = []
    try:
        items = list(given)
    except TypeError:
        raise _bad(repr(value), _EXPECTED) from None
    for item in items:
        rule = parse_rule(item) if isinstance(item, str) else item
        if not isinstance(rule, ReadyRule):
            raise _bad(repr(item), _EXPECTED)
        if rule in rules:
            continue
        for other in rules:
            if other.kind == rule.kind and rule.kind in ("stable", "min-size", "max-age"):
                raise ConfigurationError(
                    f"setting 'ready' has {other} and {rule}: give one {rule.kind} rule"
                )
        rules.append(rule)
    if not rules:
        raise ConfigurationError("setting 'ready' has no rule: give at least one (age, ...)")
    return tuple(rules)
