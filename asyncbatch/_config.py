"""A batch's settings: one frozen, keyword-only object, validated once, up front."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ._exceptions import ConfigurationError
from ._identity import IDENTITIES, Identity
from ._ledger import JobSettings, PostgresDSN, encode_action
from ._scanner import ScanRules

__all__ = ["MAX_CONCURRENCY", "MAX_SECONDS", "BatchConfig", "PostAction"]

Durability = Literal["normal", "full"]
DEFAULT_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The longest duration any setting accepts (a year): longer ones are mistakes, and would
#: overflow clocks and timers.
MAX_SECONDS = 366 * 86400.0
#: The most handlers that may run at once (each is a task; a run starts them all up front).
MAX_CONCURRENCY = 10_000
#: Items per claim statement at most: SQLite binds 5 parameters per item, 32,766 in all.
MAX_CLAIM_BATCH = 5_000
_MAX_COUNT = 1_000_000


@dataclass(frozen=True, slots=True)
class PostAction:
    """What to do with an input file after its outcome committed: keep, delete or move."""

    kind: Literal["keep", "delete", "move"]
    directory: Path | None = None

    @classmethod
    def parse(cls, setting: str, value: str, *, allow_delete: bool = True) -> PostAction:
        """Parse ``"keep"``, ``"delete"`` or ``"move:DIR"``; raise a one-line error otherwise."""
        if value == "keep":
            return cls("keep")
        if value == "delete" and allow_delete:
            return cls("delete")
        if value.startswith("move:") and value[5:]:
            return cls("move", Path(value[5:]).expanduser().absolute())
        choices = "'keep', 'delete' or 'move:DIR'" if allow_delete else "'keep' or 'move:DIR'"
        raise ConfigurationError.bad_value(setting, value, f"expected {choices}")

    def encode(self) -> str | None:
        """The form stored in the ledger with a finished item (``None`` for keep)."""
        if self.kind == "keep":
            return None
        if self.kind == "delete":
            return "delete"
        return encode_action("move", self.directory)


def _seconds(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigurationError.bad_value(name, value, "expected a number")
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_SECONDS:
        low = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError.bad_value(
            name, value, f"expected a number of seconds {low} and <= {MAX_SECONDS:.0f} (a year)"
        )


def _count(name: str, value: int, *, low: int = 1, high: int = _MAX_COUNT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError.bad_value(
            name, value, f"expected an integer from {low} to {high:,}"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchConfig:
    """Everything a :class:`~asyncbatch.Batch` needs to know, checked when it is built.

    Raises :class:`ConfigurationError` naming the first bad setting and its value.
    """

    source: Path
    state: str
    job: str = "default"
    concurrency: int = 8
    settle: float = 1.0
    ignore: tuple[str, ...] = ()
    recursive: bool = False
    follow_symlinks: bool = False
    identity: Identity = "stat"
    max_attempts: int = 3
    max_interruptions: int = 10
    timeout: float | None = None
    backoff: float = 1.0
    backoff_max: float = 300.0
    shared: bool = False
    wait: bool = True
    lease: float = 60.0
    grace: float = 30.0
    ledger_timeout: float = 120.0
    durability: Durability = "normal"
    on_done: PostAction = field(default_factory=lambda: PostAction("keep"))
    on_dead: PostAction = field(default_factory=lambda: PostAction("keep"))
    output_dir: Path | None = None
    poll: float = 1.0
    events: bool = True
    unsafe_methods: frozenset[str] = DEFAULT_UNSAFE_METHODS
    http_retries: int = 4
    http_backoff: float = 0.25
    http_backoff_max: float = 10.0
    claim_batch: int = 512
    commit_batch: int = 256
    commit_interval: float = 0.005

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not self.job or len(self.job) > 200:
            raise ConfigurationError.bad_value("job", self.job, "a non-empty name")
        _count("concurrency", self.concurrency, high=MAX_CONCURRENCY)
        _count("max_attempts", self.max_attempts)
        _count("max_interruptions", self.max_interruptions)
        _count("claim_batch", self.claim_batch, high=MAX_CLAIM_BATCH)
        _count("commit_batch", self.commit_batch, high=100_000)
        _count("http_retries", self.http_retries, low=0, high=100)
        _seconds("settle", self.settle, allow_zero=True)
        _seconds("backoff", self.backoff, allow_zero=True)
        _seconds("backoff_max", self.backoff_max, allow_zero=True)
        _seconds("lease", self.lease)
        _seconds("grace", self.grace, allow_zero=True)
        _seconds("ledger_timeout", self.ledger_timeout, allow_zero=True)
        _seconds("poll", self.poll)
        if not isinstance(self.events, bool):
            raise ConfigurationError.bad_value("events", self.events, "True or False")
        _seconds("commit_interval", self.commit_interval, allow_zero=True)
        _seconds("http_backoff", self.http_backoff, allow_zero=True)
        _seconds("http_backoff_max", self.http_backoff_max, allow_zero=True)
        if self.timeout is not None:
            _seconds("timeout", self.timeout)
        if self.lease < 3:
            raise ConfigurationError.bad_value("lease", self.lease, "at least 3 seconds")
        if self.identity not in IDENTITIES:
            raise ConfigurationError.bad_value("identity", self.identity, f"one of {IDENTITIES}")
        if self.durability not in ("normal", "full"):
            raise ConfigurationError.bad_value("durability", self.durability, "'normal' or 'full'")
        if self.on_dead.kind == "delete":
            raise ConfigurationError.bad_value("on_dead", "delete", "'keep' or 'move:DIR'")
        self._check_paths()

    @property
    def rules(self) -> ScanRules:
        """The scanner's skip rules."""
        return ScanRules(self.ignore)

    @property
    def job_settings(self) -> JobSettings:
        """What the ledger records of the job (see :class:`JobSettings`): the source as an
        absolute path with its symlinks resolved (``inbox`` and ``./inbox`` are one source),
        and the scan rules (the ignore globs sorted, without repeats: their order means
        nothing)."""
        return JobSettings(
            source=os.path.realpath(self.source),
            recursive=self.recursive,
            follow_symlinks=self.follow_symlinks,
            ignore=tuple(sorted(set(self.ignore))),
        )

    def _check_paths(self) -> None:
        source = self.source
        if not source.exists():
            raise ConfigurationError.bad_value("source", str(source), "no such directory")
        if not source.is_dir():
            raise ConfigurationError.bad_value("source", str(source), "not a directory")
        if not os.access(source, os.R_OK | os.X_OK):
            raise ConfigurationError.bad_value("source", str(source), "directory is not readable")
        if not self.state.startswith(("postgresql://", "postgres://")):
            # SQLite keeps its -wal, -shm and -journal files beside the state: an --ignore
            # that hides the state alone leaves them to the scan (and to --on-done delete).
            for suffix in ("", "-wal", "-shm", "-journal"):
                self._refuse_visible("state", Path(self.state + suffix), is_dir=False)
        else:
            PostgresDSN.parse(self.state)  # a one-line ConfigurationError if it does not parse
        for name, action in (("on_done", self.on_done), ("on_dead", self.on_dead)):
            if action.directory is not None:
                self._check_writable_dir(name, action.directory)
                self._refuse_visible(name, action.directory, is_dir=True)
        if self.output_dir is not None:
            self._check_writable_dir("output_dir", self.output_dir)
            self._refuse_visible("output_dir", self.output_dir, is_dir=True)

    def _refuse_visible(self, name: str, path: Path, *, is_dir: bool) -> None:
        """Refuse a path the scan of the source would pick up as input."""
        why = self.visible_to_scan(path, is_dir=is_dir)
        if why is not None:
            raise ConfigurationError.bad_value(name, str(path), why)

    def visible_to_scan(self, path: Path, *, is_dir: bool) -> str | None:
        """Why the scan of the source would pick ``path`` (or what is in it) up as input, or
        ``None`` if it would not."""
        root = os.path.realpath(self.source)
        real = os.path.realpath(path)
        if real == root:
            return "is the source directory itself"
        if os.path.commonpath([root, real]) != root:
            return None
        rel = os.fsencode(os.path.relpath(real, root))
        if self.rules.hides(rel, recursive=self.recursive, is_dir=is_dir):
            return None
        return "is inside the scanned source; move it out, or --ignore it"

    @staticmethod
    def _check_writable_dir(name: str, path: Path) -> None:
        if not path.exists():
            raise ConfigurationError.bad_value(name, str(path), "no such directory")
        if not path.is_dir():
            raise ConfigurationError.bad_value(name, str(path), "not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigurationError.bad_value(name, str(path), "directory is not writable")
