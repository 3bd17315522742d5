"""The exceptions asyncbatch raises.

The tree::

    AsyncBatchError
     ├── ConfigurationError       a bad setting, named with its value (CLI exit 2)
     │    └── HandlerImportError  TARGET could not be imported or is not callable
     ├── LedgerError              the state store is unavailable or failing (CLI exit 69)
     │    ├── NotALedgerError     the state is not an asyncbatch ledger (left untouched; exit 2)
     │    ├── DamagedLedgerError  the state is a damaged SQLite file (not written to; exit 2)
     │    ├── LedgerValueError    the state holds a value this asyncbatch does not understand
     │    │                       (a row edited by hand, a bad restore; left as it is; exit 2)
     │    └── SchemaVersionError  the ledger is from a newer asyncbatch, or older and needs a run
     │                            to upgrade it (left untouched; exit 2)
     ├── JobLockedError           another live runner holds the job lock (CLI exit 75)
     ├── LockLostError            this runner's job lock was taken over while it ran
     ├── SourceError              the source cannot be listed: an s3:// bucket missing, its
     │                            credentials refused, its endpoint unreachable (CLI exit 69)
     ├── PermanentError           raised by a handler: fail the item now, no retries
     │    └── IdempotencyKeyMismatchError  the server answered 422 to an idempotent call
     ├── EffectError              an idempotent effect refused to run (move onto a different file)
     ├── InputChangedError        the input file changed while the handler read it (the attempt
     │                            fails and is retried)
     ├── CommandFailedError       an ExecHandler's command exited non-zero or was killed by a
     │                            signal (the attempt fails and is retried)
     └── AttemptInterrupted       raised by a handler that gives its item back because the run
                                  is stopping (an interruption, not a failure)

Every message is one line that names the bad value and, where there is one, what to do.
"""

from __future__ import annotations

__all__ = [
    "AsyncBatchError",
    "AttemptInterrupted",
    "CommandFailedError",
    "ConfigurationError",
    "DamagedLedgerError",
    "EffectError",
    "HandlerImportError",
    "IdempotencyKeyMismatchError",
    "InputChangedError",
    "JobLockedError",
    "LedgerError",
    "LedgerValueError",
    "LockLostError",
    "NotALedgerError",
    "PermanentError",
    "SchemaVersionError",
    "SourceError",
    "SourceKeyError",
]


class AsyncBatchError(Exception):
    """Base class of every error asyncbatch raises on purpose."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())


class ConfigurationError(AsyncBatchError, ValueError):
    """A setting has a value asyncbatch cannot use."""

    @classmethod
    def bad_value(cls, name: str, value: object, expected: str) -> ConfigurationError:
        """Build the standard message: ``setting 'name' has value 'value': expected ...``."""
        return cls(f"setting {name!r} has value {value!r}: {expected}")


class HandlerImportError(ConfigurationError):
    """The handler named by TARGET could not be imported or is not an async callable."""


class LedgerError(AsyncBatchError):
    """The ledger (state store) failed or cannot be used."""


class NotALedgerError(LedgerError):
    """The state file exists but is not an asyncbatch ledger; it was left untouched."""


class DamagedLedgerError(LedgerError):
    """The SQLite state is damaged ("database disk image is malformed"): nothing more is
    written to it. Retrying cannot help: restore it from a backup, or recover what SQLite can
    still read into a new file (``sqlite3 STATE .recover``)."""


class LedgerValueError(LedgerError):
    """The state holds a value this asyncbatch does not understand in one of its rows (edited
    by hand, a bad restore, a bit flip): an item state it does not know, job settings that are
    not its JSON, a secret that is not hex. Nothing is decided on it, and it is never
    overwritten or "repaired": retrying cannot help, the value must be corrected (or the state
    restored from a backup). ``where`` names it as ``table.column``."""

    def __init__(self, where: str, value: object, detail: str = "") -> None:
        self.where = where
        self.value = value
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"the state holds a value this asyncbatch does not understand: {where} {shown}"
            f"{' ' + detail if detail else ''}; it was left as it is (correct that value, or "
            "restore the state from a backup)"
        )


class SchemaVersionError(LedgerError):
    """The ledger's schema is not this asyncbatch's: newer than it understands, or older and
    opened by a command that does not upgrade it (only a run does); it was left untouched."""

    def __init__(self, path: str, found: int, known: int) -> None:
        self.found = found
        self.known = known
        if found < 1:
            message = (
                f"state {path!r} has schema version {found}, which is not one asyncbatch "
                "knows (was it set by hand?); the state was not modified: restore it from a "
                "backup, or set the version its tables are"
            )
        elif found < known:
            message = (
                f"state {path!r} has schema version {found}, older than the {known} this "
                "asyncbatch uses: the next 'asyncbatch run' with this --state upgrades it in "
                "place, keeping its jobs and items (this command does not; the state was not "
                "modified)"
            )
        else:
            message = (
                f"state {path!r} has schema version {found}, newer than the {known} this "
                "asyncbatch knows: upgrade asyncbatch (the state was not modified)"
            )
        super().__init__(message)


class SchemaMismatchError(SchemaVersionError):
    """The ledger's tables are not those of the schema version it records (its version number
    set by hand, its tables changed by something else): its upgrade cannot apply, and nothing
    will change that by itself; it was left untouched."""

    def __init__(self, path: str, found: int, known: int, detail: str) -> None:
        self.found = found
        self.known = known
        if found == known:  # not upgraded: its tables were checked against its version's
            message = (
                f"state {path!r}: its tables are not those of the schema version it records "
                f"({found}): {detail}; the state was not modified (were its tables changed by "
                "hand or by another program? restore it from a backup)"
            )
        else:
            message = (
                f"state {path!r}: its schema does not match its version number ({found}): "
                f"upgrading it to {known} failed ({detail}); the state was not modified (was "
                "its version set by hand? restore it from a backup, or set the version its "
                "tables are)"
            )
        LedgerError.__init__(self, message)


class LedgerAccessError(LedgerError):
    """The state may not be read or written by this user or database role (PostgreSQL's
    ``insufficient_privilege``, a schema this role may not use): retrying cannot help until
    someone grants the privilege; nothing was changed by the statement refused."""


class JobLockedError(AsyncBatchError):
    """Another live runner holds this job's lock, or (for an exclusive runner) live
    ``--shared`` runners work on the job (``shared_runner``)."""

    def __init__(
        self,
        job: str,
        pid: int | None,
        host: str | None,
        since: str,
        *,
        shared_runner: bool = False,
    ) -> None:
        self.job = job
        self.pid = pid
        self.host = host
        self.shared_runner = shared_runner
        if shared_runner:
            message = (
                f"job {job!r} is being run by --shared runners (pid {pid} on host {host!r} "
                f"since {since}); run with --shared to join them, or wait for them "
                "('asyncbatch status' lists the runners)"
            )
        else:
            message = (
                f"job {job!r} is locked by pid {pid} on host {host!r} since {since}; "
                "wait for it, or see 'asyncbatch locks'"
            )
        super().__init__(message)


class LockLostError(AsyncBatchError):
    """This runner's job lock was taken over by another runner; it stopped its work."""


class SourceError(AsyncBatchError):
    """The source cannot be listed: an ``s3://`` bucket that is not there, credentials the
    store refuses, an endpoint that does not answer (after the client's retries)."""


class SourceKeyError(SourceError):
    """An object under an ``s3://`` source has a key the S3 client (obstore) cannot represent:
    an empty segment (``in//a``), a ``.`` or ``..`` segment, a control character. The client
    refuses the listing's whole page that holds it, so the prefix cannot be listed while it is
    there (retrying cannot help: the CLI exits 2); rename the object, or move it out of the
    prefix. The message names the key, its control characters escaped."""


class PermanentError(AsyncBatchError):
    """Raised by a handler to fail its item at once, without further attempts."""


class IdempotencyKeyMismatchError(PermanentError):
    """The server says this idempotency key was used with a different request (HTTP 422)."""


class EffectError(AsyncBatchError):
    """An idempotent effect refused to run because it would destroy data."""


class InputChangedError(AsyncBatchError):
    """The input file changed (was written to, truncated or grew) while the handler was
    reading or handling it: the attempt fails and is retried."""


class CommandFailedError(AsyncBatchError):
    """The command an :class:`~asyncbatch.ExecHandler` ran for an item exited with a non-zero
    status or was killed by a signal: the attempt fails (and is retried, up to
    ``max_attempts``).

    ``command`` is the program as the command line names it, ``returncode`` its status as
    ``subprocess`` gives it (negative: the number of the signal that killed it), ``stderr``
    the last bytes it wrote to its standard error (at most the handler's ``output_tail``).
    The message names the program and the status, then the stderr tail on one line (its
    lines joined with `` | ``; a tail that is not the whole of it starts at its first whole
    line, after ``...``).
    """

    def __init__(
        self, command: str, returncode: int, stderr: bytes = b"", *, cut: bool = False
    ) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        message = f"{command!r} {describe_status(returncode)}"
        if cut and b"\n" in stderr[:-1]:  # start at a line: not in the middle of one
            stderr = stderr[stderr.index(b"\n") + 1 :]
        tail = _one_line(stderr)
        if tail:
            message += f": {'...' if cut else ''}{tail}"
        super().__init__(message)


class AttemptInterrupted(AsyncBatchError):
    """Raised by a handler that stops its work because the run is stopping (see
    ``ctx.on_stop``): its item goes back to the ledger unfinished, and the attempt counts as
    interrupted (against ``max_interruptions``), not as failed. Raised while the run is not
    stopping, it fails the attempt like any other exception."""


def describe_status(returncode: int) -> str:
    """``exited with status N``, or ``was killed by SIGNAME`` for a negative ``returncode``."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    import signal  # here: only a command killed by a signal needs its name

    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def _one_line(data: bytes) -> str:
    """Output bytes as one line: decoded (undecodable bytes as ``\\xNN``), each line stripped,
    empty lines left out, the rest joined with `` | ``."""
    text = data.decode("utf-8", "backslashreplace")
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())
