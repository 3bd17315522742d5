"""The ``asyncbatch`` command line.

Exit codes: 0 every settled file done; 1 some items dead; 2 usage or configuration error (one
line naming the bad value, no traceback); 3 other runners still hold some files (``--no-wait``);
69 the ledger is unavailable or failing; 70 a handler raised ``SystemExit``,
``KeyboardInterrupt`` or another ``BaseException`` (the run stopped); 75 the job is locked by a
live runner; 130 / 143 stopped by SIGINT / SIGTERM; 141 the output's reader went away.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TextIO

import anyio

from .. import __version__
from .. import _failpoints as failpoints
from .._batch import Batch
from .._config import MAX_CLAIM_BATCH, MAX_CONCURRENCY, MAX_SECONDS
from .._exceptions import (
    AsyncBatchError,
    JobLockedError,
    LedgerError,
    LockLostError,
    NotALedgerError,
    SchemaVersionError,
)
from .._exec import ExecHandler
from .._pipeline.runner import unwrap_group
from .._pipeline.workers import error_text
from .._report import Report
from .items import COMMANDS as INSPECT_COMMANDS
from .items import add_inspect_commands
from .logging import configure_logging
from .operator import COMMANDS as OPERATOR_COMMANDS
from .operator import add_operator_commands
from .progress import show_progress
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
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(Exception):
    """A command line that cannot be used; the message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def _number(
    kind: type[int] | type[float], low: float, high: float, *, strict: bool
) -> Callable[[str], Any]:
    expected = (
        f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {low:g} "
        f"and <= {high:,.0f}"
    )

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected {expected}"
            ) from None
        if math.isnan(value) or not low <= value <= high or (strict and value == low):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value

    return parse


def non_empty_path(text: str) -> str:
    """An option's path; an empty one is refused (``Path("")`` would be the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("invalid value '': expected a path, not an empty string")
    return text


positive_int = _number(int, 1, 1_000_000, strict=False)
concurrency = _number(int, 1, MAX_CONCURRENCY, strict=False)
claim_batch = _number(int, 1, MAX_CLAIM_BATCH, strict=False)
positive_float = _number(float, 0, MAX_SECONDS, strict=True)
non_negative_float = _number(float, 0, MAX_SECONDS, strict=False)


def _add_state(p: argparse.ArgumentParser, *, job: bool = True) -> None:
    p.add_argument(
        "--state",
        required=True,
        type=non_empty_path,
        help="the ledger: a SQLite file path or a postgresql:// DSN",
    )
    if job:
        p.add_argument("--job", default="default", help="job name (default: %(default)s)")


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
        epilog="Run 'asyncbatch COMMAND --help' for a command's options.",
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
    run.add_argument("--source", required=True, type=non_empty_path, help="the directory to scan")
    _add_state(run)
    run.add_argument(
        "-j", "--concurrency", type=concurrency, default=8, help="items handled at once (8)"
    )
    run.add_argument("--settle", type=non_negative_float, default=1.0, help="seconds (1.0)")
    run.add_argument("--ignore", action="append", default=[], help="glob to skip (repeatable)")
    run.add_argument("--recursive", action="store_true", help="walk subdirectories too")
    run.add_argument(
        "--follow-symlinks", action="store_true", help="follow symlinks that stay inside SOURCE"
    )
    run.add_argument(
        "--identity",
        choices=["stat", "path", "content"],
        default="stat",
        help="what makes a file new work: path+size+mtime (stat), the name, or the bytes",
    )
    run.add_argument(
        "--max-attempts",
        type=positive_int,
        default=3,
        help="failed attempts before an item is dead (3)",
    )
    run.add_argument(
        "--max-interruptions",
        type=positive_int,
        default=10,
        help="attempts cut short by the runner's death or stop before an item is dead (10)",
    )
    run.add_argument(
        "--timeout", type=positive_float, default=None, help="seconds per attempt of an item"
    )
    run.add_argument("--backoff", type=non_negative_float, default=1.0, help="first retry delay")
    run.add_argument("--shared", action="store_true", help="share the job with other runners")
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="end when nothing is left for this runner, even if others still hold files "
        "(exit 3 then); by default a run waits for them and takes over expired leases",
    )
    run.add_argument(
        "--lease", type=positive_float, default=60.0, help="seconds a lease lasts unrenewed (60)"
    )
    run.add_argument(
        "--grace",
        type=non_negative_float,
        default=30.0,
        help="seconds in-flight items get to finish after SIGINT/SIGTERM (30)",
    )
    run.add_argument(
        "--ledger-timeout",
        type=non_negative_float,
        default=120.0,
        help="seconds a PostgreSQL state that went away is waited out, then exit 69 (120)",
    )
    run.add_argument(
        "--durability",
        choices=["normal", "full"],
        default="normal",
        help="full: every commit survives power loss (slower); normal: process crashes",
    )
    run.add_argument("--on-done", default="keep", help="keep | delete | move:DIR")
    run.add_argument("--on-dead", default="keep", help="keep | move:DIR")
    run.add_argument(
        "--output-dir", default=None, type=non_empty_path, help="where ctx.write_output writes"
    )
    run.add_argument(
        "--watch", action="store_true", help="keep watching for new files until stopped"
    )
    run.add_argument(
        "--poll",
        type=positive_float,
        default=1.0,
        help="seconds between polls of the source in watch mode (1.0)",
    )
    run.add_argument(
        "--no-events",
        action="store_true",
        help="watch by polling only, without change events (for a network filesystem)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    run.add_argument(
        "--progress-interval",
        type=positive_float,
        default=10.0,
        help="seconds between progress lines when not on a terminal (10)",
    )
    run.add_argument(
        "--claim-batch", type=claim_batch, default=512, help="items leased per statement"
    )
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus /metrics and the /healthz, /readyz probes there while running "
        "(needs prometheus-client: pip install 'asyncbatch[metrics]')",
    )
    _add_logging(run)

    add_operator_commands(sub, _add_state, positive_int)
    add_inspect_commands(sub, _add_state, positive_int, non_negative_float)

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
    return parser


def _check_run(args: argparse.Namespace) -> None:
    """Refuse a ``run`` with both a TARGET and ``--exec``, or neither."""
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
        source=args.source,
        state=args.state,
        job=args.job,
        concurrency=args.concurrency,
        settle=args.settle,
        ignore=args.ignore,
        recursive=args.recursive,
        follow_symlinks=args.follow_symlinks,
        identity=args.identity,
        max_attempts=args.max_attempts,
        max_interruptions=args.max_interruptions,
        timeout=args.timeout,
        backoff=args.backoff,
        shared=args.shared,
        wait=not args.no_wait,
        lease=args.lease,
        grace=args.grace,
        ledger_timeout=args.ledger_timeout,
        durability=args.durability,
        on_done=args.on_done,
        on_dead=args.on_dead,
        output_dir=args.output_dir,
        poll=args.poll,
        events=not args.no_events,
        claim_batch=args.claim_batch,
        metrics=False if args.metrics is None else args.metrics,
    )
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
    if report.held and not (report.dead or report.dead_before or report.post_failed):
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
        command = {"demo": _demo_command, **OPERATOR_COMMANDS, **INSPECT_COMMANDS}[args.command]
    try:
        return anyio.run(_call, command, args)
    except BaseException as e:
        error = e
    if isinstance(error, JobLockedError):
        return _fail(str(error), EXIT_LOCKED)
    if isinstance(error, LockLostError):
        return _fail(str(error), EXIT_FAILED)
    if isinstance(error, LedgerError) and not isinstance(
        error, NotALedgerError | SchemaVersionError
    ):
        return _fail(str(error), EXIT_LEDGER)
    if isinstance(error, AsyncBatchError):
        return _fail(str(error), EXIT_CONFIG)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGNAL[signal.SIGINT]
    raise error


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: ``asyncbatch ...``."""
    try:
        code = run_cli(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``asyncbatch status | head``): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    sys.exit(code)
