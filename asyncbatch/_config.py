"""A batch's settings: one frozen, keyword-only object, validated once, up front; each
setting's name, type, default, bounds, help and flag in one place (see :mod:`._settings`)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ._exceptions import ConfigurationError
from ._identity import IDENTITIES, Identity
from ._ledger import JobSettings, PostgresDSN, encode_action
from ._ready import Age, Readiness, ReadyRule, ready_rules, rule_argument
from ._scanner import ScanRules
from ._settings import (
    Choice,
    Count,
    Globs,
    Kind,
    Methods,
    Name,
    PathSetting,
    Seconds,
    Setting,
    Switch,
    setting,
)
from ._sources.sqs import QueueURL
from ._sources.store import require_obstore
from ._sources.url import ObjectURL, is_object_url

__all__ = ["MAX_CONCURRENCY", "BatchConfig", "PostAction"]

Durability = Literal["normal", "full"]
DEFAULT_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The most handlers that may run at once (each is a task; a run starts them all up front).
MAX_CONCURRENCY = 10_000
#: Items per claim statement at most: SQLite binds 5 parameters per item, 32,766 in all.
MAX_CLAIM_BATCH = 5_000


@dataclass(frozen=True, slots=True)
class PostAction:
    """What to do with an input file after its outcome committed: keep, delete or move (to
    a directory, or for an object-store source to an ``s3://`` prefix)."""

    kind: Literal["keep", "delete", "move"]
    directory: Path | ObjectURL | None = None

    @classmethod
    def parse(cls, setting: str, value: object, *, allow_delete: bool = True) -> PostAction:
        """Parse ``"keep"``, ``"delete"`` or ``"move:DIR"``; raise a one-line error otherwise
        (for anything but a string too)."""
        text = value if isinstance(value, str) else ""
        if text == "keep":
            return cls("keep")
        if text == "delete" and allow_delete:
            return cls("delete")
        if text.startswith("move:") and is_object_url(text[5:]):
            return cls("move", ObjectURL.parse(setting, text[5:]))
        if text.startswith("move:") and text[5:]:
            return cls("move", Path(text[5:]).expanduser().absolute())
        choices = "'keep', 'delete' or 'move:DIR'" if allow_delete else "'keep' or 'move:DIR'"
        raise ConfigurationError.bad_value(setting, value, f"expected {choices}")

    def __str__(self) -> str:
        return self.kind if self.directory is None else f"move:{self.directory}"

    def encode(self) -> str | None:
        """The form stored in the ledger with a finished item (``None`` for keep)."""
        if self.kind == "keep":
            return None
        if self.kind == "delete":
            return "delete"
        if isinstance(self.directory, ObjectURL):
            return encode_action("move", str(self.directory))
        return encode_action("move", self.directory)


@dataclass(frozen=True, slots=True)
class ActionSetting(Kind):
    """A post-commit action: ``keep``, ``delete`` (``allow_delete``) or ``move:DIR``."""

    allow_delete: bool = True

    def convert(self, name: str, value: Any) -> Any:
        if isinstance(value, PostAction):
            self.check(name, value)
            return value
        return PostAction.parse(name, value, allow_delete=self.allow_delete)

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, PostAction) or (value.kind == "delete" and not self.allow_delete):
            raise ConfigurationError.bad_value(name, value, "'keep' or 'move:DIR'")

    def option(self) -> dict[str, Any]:
        return {"metavar": "keep|delete|move:DIR" if self.allow_delete else "keep|move:DIR"}


@dataclass(frozen=True, slots=True)
class QueueSetting(Kind):
    """An ``sqs://QUEUE`` of S3 event notifications, or ``None``."""

    def convert(self, name: str, value: Any) -> Any:
        if value is None:
            return None
        return str(QueueURL.parse(name, str(value)))

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            QueueURL.parse(name, str(value))

    def option(self) -> dict[str, Any]:
        return {"metavar": "sqs://QUEUE"}


@dataclass(frozen=True, slots=True)
class ReadySetting(Kind):
    """Readiness rules: values (:class:`~asyncbatch._ready.ReadyRule`) or their command-line
    strings, one or several (see :func:`~asyncbatch._ready.ready_rules`); ``None``: not
    given (the job's rules must then be the default, ``age``). The flag is repeatable."""

    def convert(self, name: str, value: Any) -> Any:
        return None if value is None else ready_rules(value)

    def check(self, name: str, value: Any) -> None:
        if value is not None and (
            not isinstance(value, tuple) or not all(isinstance(r, ReadyRule) for r in value)
        ):
            raise ConfigurationError.bad_value(name, value, "readiness rules (age, ...)")

    def option(self) -> dict[str, Any]:
        return {"action": "append", "type": rule_argument, "metavar": "RULE"}


def _default_of(f: Field[Any]) -> str:
    """`` (default: X)`` for a field with a plain default (none for a required one)."""
    if f.default is MISSING:
        return "" if f.default_factory is MISSING else f" (default: {f.default_factory()})"
    value = f.default
    if isinstance(value, frozenset):
        value = ", ".join(sorted(value))
    return f" (default: {value})"


_SECONDS = Seconds()
_SECONDS_OR_ZERO = Seconds(zero=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchConfig:
    """Every setting of a :class:`~asyncbatch.Batch`: the one place where each one's name,
    type, default, bounds, help text and command-line flag live (each field's
    :class:`~asyncbatch._settings.Setting`); checked when it is built.

    Build one with :meth:`from_settings` (what ``Batch(handler, **settings)`` does). Raises
    :class:`ConfigurationError` naming the first bad setting and its value.
    """

    # -- what is scanned, and where the ledger is --
    source: Path | ObjectURL = setting(
        PathSetting(urls=True),
        "the directory to scan, or an s3://BUCKET/PREFIX/ to list (recorded by the job's "
        "first run)",
        required=True,
    )
    state: str = setting(
        PathSetting(text=True),
        "the ledger: a SQLite file path or a postgresql:// DSN",
        required=True,
    )
    job: str = setting(Name(), "job name: jobs in one state are independent", default="default")
    settle: float = setting(
        _SECONDS_OR_ZERO,
        "seconds a file's mtime and ctime must be old before it is handled (the age rule; "
        "stable:N's looks are this far apart)",
        default=1.0,
    )
    ready: tuple[ReadyRule, ...] | None = setting(
        ReadySetting(),
        "when a file is ready to be handled (all rules given must hold): age, stable:N, "
        "marker:SUFFIX, dir-marker:NAME, min-size:BYTES, max-age:DURATION; repeatable "
        "(default: age; other rules than the job's must be given to change them)",
    )
    ignore: tuple[str, ...] = setting(
        Globs(),
        "glob of names (NAME/: directories; with another /, paths) to skip; repeatable",
        default=(),
    )
    recursive: bool = setting(Switch(), "walk subdirectories too", default=False)
    follow_symlinks: bool = setting(
        Switch(), "follow symlinks that stay inside the source", default=False
    )
    identity: Identity = setting(
        Choice(IDENTITIES),
        "what makes a file new work: path+size+mtime (stat), the name, or the bytes",
        default="stat",
    )
    # -- how items are handled --
    concurrency: int = setting(
        Count(high=MAX_CONCURRENCY),
        "handlers running at once",
        default=8,
        flags=("-j", "--concurrency"),
    )
    max_attempts: int = setting(Count(), "failed attempts before an item is dead", default=3)
    max_interruptions: int = setting(
        Count(),
        "attempts cut short by the runner's death or stop before an item is dead",
        default=10,
    )
    timeout: float | None = setting(
        Seconds(optional=True), "seconds an attempt may take (none by default)", default=None
    )
    backoff: float = setting(_SECONDS_OR_ZERO, "seconds before the first retry", default=1.0)
    backoff_max: float = setting(
        _SECONDS_OR_ZERO, "longest wait between retries, in seconds", default=300.0
    )
    # -- sharing, leases and stopping --
    shared: bool = setting(Switch(), "share the job with other runners", default=False)
    wait: bool = setting(
        Switch(negated=True),
        "end when nothing is left for this runner, even if others still hold files (exit 3 "
        "then); by default a run waits for them and takes over expired leases",
        default=True,
        flags=("--no-wait",),
    )
    lease: float = setting(
        _SECONDS, "seconds a lease (or the job lock) lasts unrenewed (at least 3)", default=60.0
    )
    grace: float = setting(
        _SECONDS_OR_ZERO,
        "seconds in-flight items get to finish after a stop (SIGINT, SIGTERM)",
        default=30.0,
    )
    ledger_timeout: float = setting(
        _SECONDS_OR_ZERO,
        "seconds a PostgreSQL state or an S3 store that went away is waited out (then exit 69)",
        default=120.0,
    )
    durability: Durability = setting(
        Choice(("normal", "full")),
        "full: every commit survives a power loss (slower); normal: a process crash",
        default="normal",
    )
    # -- effects --
    on_done: PostAction = setting(
        ActionSetting(),
        "what to do with an input once it is done",
        factory=lambda: PostAction("keep"),
    )
    on_dead: PostAction = setting(
        ActionSetting(allow_delete=False),
        "what to do with an input once it is dead",
        factory=lambda: PostAction("keep"),
    )
    output_dir: Path | ObjectURL | None = setting(
        PathSetting(absolute=True, urls=True, optional=True),
        "where ctx.write_output writes (an existing directory, or an s3://BUCKET/PREFIX/)",
    )
    # -- watch mode --
    poll: float = setting(
        _SECONDS, "seconds between polls of the source in watch mode", default=1.0
    )
    events: bool = setting(
        Switch(negated=True),
        "watch by polling only, without change events (for a network filesystem)",
        default=True,
        flags=("--no-events",),
    )
    event_queue: str | None = setting(
        QueueSetting(),
        "watch an s3:// source by its S3 event notifications, from this SQS queue (listing "
        "it every --backfill-interval too)",
        flags=("--events",),
    )
    backfill_interval: float = setting(
        _SECONDS,
        "seconds between listings of an s3:// source whose events are followed (--events)",
        default=300.0,
    )
    # -- outbound HTTP (ctx.http) --
    unsafe_methods: frozenset[str] = setting(
        Methods(),
        "HTTP methods that get an Idempotency-Key; repeatable",
        default=DEFAULT_UNSAFE_METHODS,
    )
    http_retries: int = setting(
        Count(low=0, high=100), "retries of a call that failed transiently", default=4
    )
    http_backoff: float = setting(
        _SECONDS_OR_ZERO, "seconds before the first retry of a call", default=0.25
    )
    http_backoff_max: float = setting(
        _SECONDS_OR_ZERO,
        "longest wait between retries of a call, a server's Retry-After included",
        default=10.0,
    )
    # -- throughput --
    claim_batch: int = setting(
        Count(high=MAX_CLAIM_BATCH), "items leased per claim statement at most", default=512
    )
    commit_batch: int = setting(
        Count(high=100_000), "outcomes committed per transaction at most", default=256
    )
    commit_interval: float = setting(
        _SECONDS_OR_ZERO, "seconds an outcome may wait for its commit group", default=0.005
    )

    @classmethod
    def from_settings(cls, **settings: Any) -> BatchConfig:
        """A config of the settings given (the others at their defaults), each converted and
        checked by its kind. Raises :class:`ConfigurationError` for an unknown setting (with
        the nearest known name) or a bad value."""
        known = {f.name: f.metadata["setting"] for f in fields(cls)}
        for name in settings:
            if name not in known:
                import difflib  # only for this message (1 ms at every start-up)

                near = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigurationError(f"unknown setting {name!r}{hint}")
        for name in ("source", "state"):
            if name not in settings:
                raise ConfigurationError(f"setting {name!r} is required")
        return cls(**{name: known[name].kind.convert(name, v) for name, v in settings.items()})

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["setting"].kind.check(f.name, getattr(self, f.name))
        if self.lease < 3:
            raise ConfigurationError.bad_value("lease", self.lease, "at least 3 seconds")
        self._check_paths()

    @classmethod
    def described(cls) -> str:
        """Every setting, a line each (``- ``name`` [--flag]: help (default: X)``), for
        ``Batch``'s docstring."""
        lines = []
        for f in fields(cls):
            spec: Setting = f.metadata["setting"]
            flags = "/".join(spec.flag_names(f.name)) or "library only"
            lines.append(f"- ``{f.name}`` [{flags}]: {spec.help}{_default_of(f)}.")
        return "\n".join(lines)

    @property
    def objects(self) -> ObjectURL | None:
        """The source's ``s3://`` location when it is an object-store prefix, else ``None``."""
        return self.source if isinstance(self.source, ObjectURL) else None

    @property
    def directory(self) -> Path:
        """The source directory. Raises :class:`ConfigurationError` for an object-store
        source (a caller that needs a directory says so)."""
        if isinstance(self.source, ObjectURL):
            raise ConfigurationError.bad_value(
                "source", str(self.source), "a directory here, not an object-store prefix"
            )
        return self.source

    @property
    def rules(self) -> ScanRules:
        """The scanner's skip rules."""
        return ScanRules(self.ignore)

    @property
    def ready_rules(self) -> tuple[ReadyRule, ...]:
        """The readiness rules this batch uses: those given, or the default (``age``)."""
        return self.ready if self.ready is not None else (Age(),)

    @property
    def readiness(self) -> Readiness:
        """The readiness rules compiled for the scan (a new object each time: keep it)."""
        return Readiness(self.ready_rules, self.settle)

    @property
    def job_settings(self) -> JobSettings:
        """What the ledger records of the job (see :class:`JobSettings`): the source as an
        absolute path with its symlinks resolved (``inbox`` and ``./inbox`` are one source),
        the scan rules (the ignore globs sorted, without repeats: their order means
        nothing), the readiness rules (sorted, for the same reason) and the settle window."""
        return JobSettings(
            source=str(self.source)
            if isinstance(self.source, ObjectURL)
            else os.path.realpath(self.source),
            recursive=self.recursive,
            follow_symlinks=self.follow_symlinks,
            ignore=tuple(sorted(set(self.ignore))),
            ready=tuple(sorted(str(rule) for rule in self.ready_rules)),
            settle=float(self.settle),
        )

    def check_places(self) -> None:
        """Check again that the source, the output and archive directories are there and
        usable (as when the settings were made): a run checks at its start, since they may
        have gone since (an inbox deleted, unmounted). Raises :class:`ConfigurationError`."""
        self._check_paths()

    def _check_paths(self) -> None:
        if isinstance(self.source, ObjectURL):
            self._check_objects(self.source)
        else:
            self._check_directory(self.source)
        for name, action in (("on_done", self.on_done), ("on_dead", self.on_dead)):
            if isinstance(action.directory, ObjectURL):
                self._check_object_place(name, action.directory)
                if self.objects is None:
                    raise ConfigurationError.bad_value(
                        name, str(action), "an s3:// archive is for an s3:// source"
                    )
            elif action.directory is not None:
                if self.objects is not None:
                    raise ConfigurationError.bad_value(
                        name, str(action), "an s3:// source is archived under an s3:// prefix"
                    )
                self._check_writable_dir(name, action.directory)
                self._refuse_visible(name, action.directory, is_dir=True)
        if isinstance(self.output_dir, ObjectURL):
            self._check_object_place("output_dir", self.output_dir)
        elif self.output_dir is not None:
            self._check_writable_dir("output_dir", self.output_dir)
            self._refuse_visible("output_dir", self.output_dir, is_dir=True)

    def _check_objects(self, source: ObjectURL) -> None:
        """An object-store source: obstore installed; what only a directory has is off."""
        require_obstore("source", source)
        if self.event_queue is not None and importlib.util.find_spec("aiobotocore") is None:
            raise ConfigurationError.bad_value(
                "event_queue",
                self.event_queue,
                "following SQS needs aiobotocore: pip install 'asyncbatch[sqs]'",
            )
        if self.identity == "content":
            raise ConfigurationError.bad_value(
                "identity", "content", "'stat' or 'path' for an s3:// source"
            )
        if self.follow_symlinks:
            raise ConfigurationError.bad_value(
                "follow_symlinks", True, "an s3:// source has no symlinks"
            )
        self._check_state_dsn()

    def _check_object_place(self, name: str, place: ObjectURL) -> None:
        """An ``s3://`` archive or output: obstore installed, and not under the source."""
        require_obstore(name, place)
        source = self.objects
        if source is not None and (source.contains(place) or place.contains(source)):
            raise ConfigurationError.bad_value(
                name, str(place), "overlaps the listed source prefix; use another prefix"
            )

    def _check_state_dsn(self) -> None:
        if self.state.startswith(("postgresql://", "postgres://")):
            PostgresDSN.parse(self.state)  # a one-line ConfigurationError if it does not parse

    def _check_directory(self, source: Path) -> None:
        if self.event_queue is not None:
            raise ConfigurationError.bad_value(
                "event_queue", self.event_queue, "S3 event notifications are for an s3:// source"
            )
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

    def _refuse_visible(self, name: str, path: Path, *, is_dir: bool) -> None:
        """Refuse a path the scan of the source would pick up as input."""
        why = self.visible_to_scan(path, is_dir=is_dir)
        if why is not None:
            raise ConfigurationError.bad_value(name, str(path), why)

    def visible_to_scan(self, path: Path, *, is_dir: bool) -> str | None:
        """Why the scan of the source would pick ``path`` (or what is in it) up as input, or
        ``None`` if it would not (never, for an object-store source)."""
        if isinstance(self.source, ObjectURL):
            return None
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
