"""The ``asyncbatch`` command line.

Exit codes: 0 every settled file done; 1 some items dead; 2 usage or configuration error (one
line naming the bad value, no traceback), a damaged SQLite state, or an s3:// key the S3 client
cannot list; 3 other runners still hold some files (``--no-wait``); 69 the ledger (or an s3://
source) is unavailable or failing; 70 a handler raised ``SystemExit``, ``KeyboardInterrupt`` or
another ``BaseException`` (the run stopped); 75 the job is locked by a live runner; 129 / 130 / 143
stopped by SIGHUP / SIGINT / SIGTERM; 141 the output's reader went away.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TextIO

import anyio

from .. import __version__
from .. import _failpoints as failpoints
from .._batch import Batch
from .._errors import error_text, unwrap_group
from .._exceptions import (
    AsyncBatchError,
    DamagedLedgerError,
    JobLockedError,
    LedgerAccessError,
    LedgerError,
    LedgerValueError,
    LockLostError,
    NotALedgerError,
    SchemaVersionError,
    SourceError,
    SourceKeyError,
)
from .._exec import ExecHandler
from .._report import Report
from .._settings import Count, Seconds
from .._started import imported_at
from .help import COMMANDS as HELP_COMMANDS
from .help import add_help_command
from .items import COMMANDS as INSPECT_COMMANDS
from .items import add_inspect_commands
from .logging import configure_logging
from .operator import COMMANDS as OPERATOR_COMMANDS
from .operator import add_operator_commands
from .progress import show_progress
from .settings import add_settings, given_settings
from .target import load_handler

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_HANDLER_ABORT",
    "EXIT_LEDGER",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_UNFINISHED",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
#: Some seen files are not finished: other runners hold them (``--no-wait``).
EXIT_UNFINISHED = 3
#: A handler raised a BaseException that is not an Exception (``EX_SOFTWARE``).
#: The ledger is unavailable or failing: its server is down, it stayed locked past the busy
#: timeout, a disk I/O error, the state file deleted under the runner (``EX_UNAVAILABLE``).
EXIT_LEDGER = 69
EXIT_HANDLER_ABORT = 70
EXIT_LOCKED = 75
EXIT_SIGNAL = {signal.SIGHUP: 129, signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(Exception):
    """A command line that cannot be used; the message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def non_empty_path(text: str) -> str:
    """An option's path; an empty one is refused (``Path("")`` would be the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("invalid value '': expected a path, not an empty string")
    return text


#: Parsers of the other commands' numbers: those of the settings' kinds.
positive_int = Count().option()["type"]
positive_float = Seconds().option()["type"]
non_negative_float = Seconds(zero=True).option()["type"]


def _add_state(p: argparse.ArgumentParser, *, job: bool = True) -> None:
    p.add_argument(
        "--state",
        required=True,
        type=non_empty_path,
        help="the ledger: a SQLite file path or a postgresql:// DSN",
    )
    if job:
        p.add_argument("--job", default="default", help="job name (default: %(default)s)")


def _add_source_check(p: argparse.ArgumentParser) -> None:
    """An optional ``--source``: the job's recorded one is used without it; another is refused."""
    p.add_argument(
        "--source",
        default=None,
        type=non_empty_path,
        help="the directory (or s3:// prefix) the job scans (default: the job's, as its runs "
        "recorded it; another is refused)",
    )


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    p.add_argument("--log-format", default="text", choices=["text", "json"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="asyncbatch",
        description="Reentrant batch jobs over the files of a directory.",
        epilog="Run 'asyncbatch COMMAND --help' for a command's options, 'asyncbatch help' for "
        "the documentation.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(
        dest="command", title="commands", metavar="COMMAND", parser_class=_Parser
    )

    run = sub.add_parser("run", help="handle every settled file once")
    run.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="the handler: module:function or path/file.py:function (or --exec)",
    )
    run.add_argument(
        "--exec",
        metavar="COMMAND",
        default=None,
        help="run COMMAND for each file instead of a TARGET: {} the path, {/} the name, "
        "{//} the directory, {.} the path and {/.} the name without extension (the path "
        "is appended if none is used); split like a shell would, run without one",
    )
    add_settings(run)
    run.add_argument(
        "--watch", action="store_true", help="keep watching for new files until stopped"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    run.add_argument(
        "--progress-interval",
        type=positive_float,
        default=10.0,
        help="seconds between progress lines when not on a terminal (10)",
    )
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus /metrics and the /healthz, /readyz probes there while running "
        "(needs prometheus-client: pip install 'asyncbatch[metrics]')",
    )
    _add_logging(run)

    add_operator_commands(sub, _add_state, _add_source_check, positive_int)
    add_inspect_commands(sub, _add_state, _add_source_check, positive_int, non_negative_float)

    p = sub.add_parser("demo", help="make an inbox, run, run again, show the status")
    p.add_argument(
        "--dir",
        default="demo",
        type=non_empty_path,
        help="where to put the demo: a new or empty directory, or an earlier demo's, which "
        "is replaced (default: %(default)s)",
    )
    p.add_argument("--files", type=positive_int, default=1000, help="inputs to make (1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    _add_logging(p)
    add_help_command(sub)
    return parser


#: The settings only a watch uses, by their flag: refused without ``--watch``.
_WATCH_ONLY = {
    "poll": "--poll",
    "events": "--no-events",
    "backfill_interval": "--backfill-interval",
}


def _check_run(args: argparse.Namespace) -> None:
    """Refuse a ``run`` with both a TARGET and ``--exec``, or neither; and ``--events``,
    ``--poll``, ``--no-events`` or ``--backfill-interval`` without ``--watch`` (a one-shot run
    lists the source once and reads no queue)."""
    queue = getattr(args, "event_queue", None)
    if queue is not None and not args.watch:
        raise UsageError(
            f"asyncbatch run: error: --events {queue!r} is for a watch: give --watch too "
            "(a run without it lists the source once and reads no queue)"
        )
    watching = [flag for name, flag in _WATCH_ONLY.items() if hasattr(args, name)]
    if watching and not args.watch:  # (given: settings are in args only when given)
        raise UsageError(
            f"asyncbatch run: error: {watching[0]} is for a watch: give --watch too (a run "
            "without it lists the source once, and it would be ignored)"
        )
    if args.target is not None and args.exec is not None:
        raise UsageError(
            f"asyncbatch run: error: give a TARGET or --exec, not both (TARGET {args.target!r}, "
            f"--exec {args.exec!r})"
        )
    if args.target is None and args.exec is None:
        raise UsageError(
            "asyncbatch run: error: the handler is missing: give a TARGET "
            "(module:function or path/file.py:function) or --exec COMMAND"
        )


async def _run_command(args: argparse.Namespace, log: logging.StreamHandler[TextIO]) -> int:
    handler = load_handler(args.target) if args.exec is None else ExecHandler(args.exec)
    batch = Batch(
        handler,
        metrics=False if args.metrics is None else args.metrics,
        **given_settings(args),
    )
    batch._started_at = imported_at  # its runner started with the process (see RunState)
    report: Report | None = None
    aborted: BaseException | None = None
    async with anyio.create_task_group() as tg:
        if not args.no_progress:
            tg.start_soon(
                functools.partial(
                    show_progress, batch, interval=args.progress_interval, log_handler=log
                )
            )
        try:
            if args.watch:
                report = await batch.watch(handle_signals=True)
            else:
                report = await batch.run(handle_signals=True)
        except BaseException as exc:
            # Not an Exception and not a cancellation: raised by the handler (see _workers).
            if isinstance(exc, Exception | anyio.get_cancelled_exc_class()):
                raise
            aborted = exc
        finally:
            tg.cancel_scope.cancel()
    if aborted is not None:
        notes = "; ".join(getattr(aborted, "__notes__", ()))
        return _fail(f"{error_text(aborted)} ({notes})", EXIT_HANDLER_ABORT)
    assert report is not None
    print(report, flush=True)
    if batch.received_signal is not None:
        return EXIT_SIGNAL.get(signal.Signals(batch.received_signal), 128 + batch.received_signal)
    if report.ok:
        return EXIT_OK
    if report.held and not (
        report.dead
        or report.dead_before
        or report.post_failed
        or report.unreadable
        or report.unlisted
    ):
        return EXIT_UNFINISHED
    return EXIT_FAILED


async def _demo_command(args: argparse.Namespace) -> int:
    from .demo import demo  # here: the demo's own imports only when it runs

    return await demo(args)


def _fail(message: str, code: int) -> int:
    print(f"asyncbatch: error: {message}", file=sys.stderr, flush=True)
    return code


async def _call(command: Callable[[argparse.Namespace], Awaitable[int]], args: Any) -> int:
    try:
        return await command(args)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


def _unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the ledger or the source cannot be used now (exit 69)."""
    if isinstance(error, SourceError):
        return not isinstance(error, SourceKeyError)  # a key to rename: retrying cannot help
    return isinstance(error, LedgerError) and not isinstance(
        error,
        NotALedgerError
        | SchemaVersionError
        | DamagedLedgerError
        | LedgerAccessError
        | LedgerValueError,
    )


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, return the exit code (never raises for bad input)."""
    if failpoints.PROBLEM is not None:
        return _fail(failpoints.PROBLEM, EXIT_CONFIG)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            _check_run(args)
    except UsageError as e:
        print(e, file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if args.command is None:  # a bare ``asyncbatch``: what it can do, not one terse line
        print(parser.format_help(), end="", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    log = configure_logging(
        getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text")
    )
    command: Callable[[argparse.Namespace], Awaitable[int]]
    if args.command == "run":
        command = functools.partial(_run_command, log=log)
    else:
        command = {
            "demo": _demo_command,
            **OPERATOR_COMMANDS,
            **INSPECT_COMMANDS,
            **HELP_COMMANDS,
        }[args.command]
    try:
        return anyio.run(_call, command, args)
    except BaseException as e:
        error = e
    if isinstance(error, JobLockedError):
        return _fail(str(error), EXIT_LOCKED)
    if isinstance(error, LockLostError):
        return _fail(str(error), EXIT_FAILED)
    if _unavailable(error):
        return _fail(str(error), EXIT_LEDGER)
    if isinstance(error, AsyncBatchError):
        return _fail(str(error), EXIT_CONFIG)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGNAL[signal.SIGINT]
    raise error


def _standard_descriptors() -> None:
    """Open ``/dev/null`` on each of the descriptors 0, 1 and 2 the process was started
    without (``asyncbatch run ... 2>&-``, a daemon's supervisor), and give Python its
    stream on it.

    Without this, Python has no ``sys.stderr`` (the run would stop at its first message,
    exit 1, having done nothing), and the next files opened would take these numbers: an
    input, an output being written or the state, which anything meant for the terminal
    would then be written into.
    """
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: ``fd``, as a rule
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)  # as a standard descriptor is
        mode = "r" if fd == 0 else "w"
        setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False))  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: ``asyncbatch ...``."""
    _standard_descriptors()
    try:
        code = run_cli(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``asyncbatch status | head``): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    leave(code)


def leave(code: int) -> NoReturn:
    """Exit with ``code``: ``sys.exit``, or, once obstore was loaded (object-store requests
    were made), ``os._exit`` after flushing the logs, stdout and stderr, without the
    interpreter's finalization. obstore's runtime threads hand each reply to the event loop
    (``call_soon_threadsafe``) and can still be in that call, the GIL released for its
    ``send``, when the program is done; one that then takes the GIL back from a finalizing
    interpreter is made to exit through Rust frames, which aborts the process (SIGABRT after
    a complete ``explain`` of an object: 1 in 5 on a loaded machine). Everything asyncbatch
    opened is closed by then."""
    if "obstore" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed, or its reader gone: nothing more to say there
    os._exit(code)
