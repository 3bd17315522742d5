"""``ExecHandler``: a program run for each item, as ``asyncbatch run --exec 'COMMAND'`` runs it.

The command line is split once, as a POSIX shell splits words (``shlex``), and never given to
a shell. Placeholders (GNU parallel's) are replaced inside each word, never re-split: the
input's absolute path ``{}``, its name ``{/}``, its directory ``{//}``, the path without its
extension ``{.}`` and the name without it ``{/.}``; a command without any gets the path as its
last argument. A file name with spaces, quotes, ``$``, a leading ``-`` or bytes that are not
UTF-8 is one argument, unchanged.

Each attempt starts the program in a session (so a process group) of its own, stdin
``/dev/null``, stdout discarded (kept for the log at DEBUG), stderr captured (the last
``output_tail`` bytes kept). Exit 0: the item is done. Any other status, or death by a signal:
:class:`CommandFailedError`, a failed attempt, retried like any handler's exception. A stop of
the run (SIGINT, SIGTERM) is forwarded to the process group at once; a command that then dies
gives its item back (:class:`AttemptInterrupted`), one that still exits 0 is done. A
cancellation (the ``timeout``, a lost lease, the end of the stop's grace, a second signal)
sends the group SIGTERM (and SIGCONT), then SIGKILL after ``kill_after`` seconds, and reaps
the program before it returns: no process of the group outlives the attempt.

The program's environment is asyncbatch's own (as it was when the handler was made), plus the
item's ``ASYNCBATCH_*`` variables (:data:`ENVIRONMENT`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shlex
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from ._context import TaskContext
from ._exceptions import AttemptInterrupted, CommandFailedError, ConfigurationError, describe_status

__all__ = [
    "ENVIRONMENT",
    "IDEMPOTENCY_CALL",
    "KILL_AFTER",
    "OUTPUT_TAIL",
    "ExecHandler",
    "split_command",
]

log = logging.getLogger("asyncbatch")
#: The logger of ``ctx.log`` (handlers' records): at DEBUG, each attempt's output is logged.
handler_log = logging.getLogger("asyncbatch.handler")

#: Bytes of a command's stderr kept for its failure (and of its stdout, for the log at DEBUG).
OUTPUT_TAIL = 4096
#: Seconds a cancelled command's process group has between SIGTERM and SIGKILL.
KILL_AFTER = 5.0
#: Seconds to wait for a process group's leader to die after SIGKILL (it may be stuck in the
#: kernel, on a dead NFS server say): then it is left, and logged.
_REAP_AFTER_KILL = 10.0
#: The call name of ``ASYNCBATCH_IDEMPOTENCY_KEY``: ``ctx.idempotency_key("exec")``.
IDEMPOTENCY_CALL = "exec"
#: The variables each command gets (an inherited one is replaced, or removed when the item has
#: no value for it: ``ASYNCBATCH_OUTPUT_DIR`` without an ``output_dir``).
ENVIRONMENT = (
    "ASYNCBATCH_JOB",
    "ASYNCBATCH_KEY",
    "ASYNCBATCH_ATTEMPT",
    "ASYNCBATCH_FENCE",
    "ASYNCBATCH_INPUT",
    "ASYNCBATCH_INPUT_HASH",
    "ASYNCBATCH_RELPATH",
    "ASYNCBATCH_IDEMPOTENCY_KEY",
    "ASYNCBATCH_OUTPUT_DIR",
)
#: ``{}``, ``{/}``, ``{//}``, ``{.}``, ``{/.}``; the capturing group keeps them in ``re.split``.
_PLACEHOLDER = re.compile(r"(\{(?:/\.|//|/|\.)?\})")
#: Words a shell would take as redirections or control operators: without a shell they are
#: plain arguments, which is worth a warning.
_OPERATORS = frozenset({"|", "||", "&", "&&", ";", "<", ">", ">>", "2>", "2>>", "2>&1", "&>"})
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})
#: Reads of one pipe per wake-up, at most (a writer that never stops cannot hold the loop).
_READS_PER_WAKE = 16
_CHUNK = 65536


def split_command(command: str | Sequence[str]) -> list[str]:
    """The words of ``command``: a string split like a POSIX shell splits it (quotes, escapes;
    no expansion, no operators), or a sequence taken as the words already.

    Raises :class:`ConfigurationError` (naming the command) for a string that does not split
    (an unbalanced quote) or a command without a program.
    """
    if isinstance(command, str):
        try:
            words = shlex.split(command)
        except ValueError as e:
            raise ConfigurationError.bad_value(
                "exec", command, f"a command line that splits like a shell's ({e})"
            ) from None
    else:
        words = [str(word) for word in command]
    if not words or not words[0]:
        raise ConfigurationError.bad_value(
            "exec", command, "a command: a program and its arguments"
        )
    return words


def _find_program(word: str, command: str | Sequence[str]) -> str | None:
    """The program's absolute path (``None`` when a placeholder names it: the input decides);
    raises :class:`ConfigurationError` when there is no such executable."""
    if _PLACEHOLDER.search(word):
        return None
    import shutil  # here: it costs ~3 ms to import, and only a command needs it

    found = shutil.which(word)
    if found is None:
        where = "on PATH" if os.sep not in word else "there"
        raise ConfigurationError.bad_value(
            "exec",
            command,
            f"a program that can be run: command not found: {word!r} "
            f"(no executable file of that name {where})",
        )
    return os.path.abspath(found)


def _warnings(words: list[str]) -> list[str]:
    """What in a command line probably does not do what its author meant."""
    found = []
    operators = sorted({w for w in words[1:] if w in _OPERATORS})
    if operators:
        found.append(
            f"the command is run without a shell: {', '.join(map(repr, operators))} "
            f"{'is' if len(operators) == 1 else 'are'} passed to {words[0]!r} as "
            f"{'an argument' if len(operators) == 1 else 'arguments'} (for redirections or "
            "pipes, run a shell: "
            'sh -c \'cmd "$1" > "$1.out"\' sh {})'
        )
    if os.path.basename(words[0]) in _SHELLS:
        for flag, script in itertools.pairwise(words[1:]):
            if flag.startswith("-") and flag.endswith("c") and _PLACEHOLDER.search(script):
                found.append(
                    f"a placeholder inside the {words[0]} -c script is put there unquoted: "
                    "a file name with a quote or $(...) would run as shell code; pass it as "
                    "an argument instead: sh -c 'cmd \"$1\"' sh {}"
                )
                break
    return found


class _Template:
    """The command's words, each split once around its placeholders."""

    __slots__ = ("_append", "_derived", "_words")

    def __init__(self, words: list[str]) -> None:
        #: Per word: the word itself (no placeholder), or its pieces: text, placeholder,
        #: text, ... (``re.split`` with a capturing group).
        self._words: list[str | list[str]] = []
        used: set[str] = set()
        for word in words:
            pieces = _PLACEHOLDER.split(word)
            self._words.append(word if len(pieces) == 1 else pieces)
            used.update(pieces[1::2])
        self._append = not used
        self._derived = bool(used - {"{}"})

    def argv(self, path: str) -> list[str]:
        """The arguments for the input at ``path`` (absolute)."""
        values = _values(path) if self._derived else {"{}": path}
        argv = [
            word
            if isinstance(word, str)
            else "".join(values[p] if i % 2 else p for i, p in enumerate(word))
            for word in self._words
        ]
        if self._append:
            argv.append(path)
        return argv


def _values(path: str) -> dict[str, str]:
    """What each placeholder stands for, for the input at ``path``."""
    name = os.path.basename(path)
    return {
        "{}": path,
        "{/}": name,
        "{//}": os.path.dirname(path),
        "{.}": _without_extension(path, name),
        "{/.}": _without_extension(name, name),
    }


def _without_extension(text: str, name: str) -> str:
    """``text`` (a path ending in ``name``) without the extension of ``name``: the last
    ``.suffix`` of the name, none for a name that only starts with a dot (GNU parallel's
    ``{.}``)."""
    dot = name.rfind(".")
    if dot <= 0:
        return text
    return text[: len(text) - (len(name) - dot)]


class _Capture:
    """The tail of one of a command's output streams: a pipe read on the event loop, so that a
    command that writes a lot never blocks on a full pipe; only the last ``limit`` bytes kept."""

    __slots__ = ("cut", "fd", "limit", "loop", "tail", "watched")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, limit: int) -> None:
        self.loop = loop
        self.fd = fd
        self.limit = limit
        self.tail = bytearray()
        self.cut = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self.read)
        self.watched = True

    def read(self) -> None:
        """Take what the pipe holds now; stop watching it at its end."""
        for _ in range(_READS_PER_WAKE):
            try:
                chunk = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._unwatch()
                return
            self.tail += chunk
            if len(self.tail) > self.limit:
                del self.tail[: len(self.tail) - self.limit]
                self.cut = True
            if len(chunk) < _CHUNK:
                return

    def _unwatch(self) -> None:
        if self.watched:
            self.watched = False
            self.loop.remove_reader(self.fd)

    def close(self) -> None:
        """Take what is left in the pipe (without waiting for its end: a process the command
        left behind may hold it open), and close it."""
        if self.watched:
            self.read()
        self._unwatch()
        os.close(self.fd)


def _pipe() -> tuple[int, int]:
    """A pipe (both ends close-on-exec) whose ends are above the standard descriptors: a
    process started with 0, 1 or 2 closed gets them back from ``pipe()``, and the spawn's
    ``dup2`` onto 0-2 would then clobber them."""
    ends = os.pipe()
    if min(ends) > 2:
        return ends
    import fcntl  # here: only a process started without its standard descriptors needs it

    high = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in ends)
    for fd in ends:
        os.close(fd)
    return high[0], high[1]


def _spawn(
    argv: list[str], program: str | None, env: dict[bytes, bytes], stdout: int, stderr: int
) -> int:
    """Start the program: a new session (its own process group), stdin ``/dev/null``, stdout
    ``stdout`` (``-1``: ``/dev/null``), stderr ``stderr``, SIGPIPE and SIGXFSZ back to their
    defaults (Python ignores them; ``subprocess`` restores them too). Returns its pid.

    ``posix_spawn`` (``vfork`` underneath, as ``subprocess``): no Python runs in the child,
    and no descriptor but 0-2 reaches it (every other one asyncbatch or Python opens is
    close-on-exec). On the event loop's thread: measured against a worker thread per start
    (benchmarks/RESULTS-exec.md), the hop and the GIL's ping-pong cost more CPU than the
    ``vfork`` wait they spare the loop. Raises ``OSError`` (naming the program) when it cannot
    be started.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)
        if stdout < 0
        else (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    defaults = (signal.SIGPIPE, signal.SIGXFSZ)
    try:
        if program is None:  # a placeholder names it: looked up on PATH if it has no "/"
            return os.posix_spawnp(
                argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=defaults
            )
        return os.posix_spawn(
            program, argv, env, file_actions=actions, setsid=True, setsigdef=defaults
        )
    except OSError as e:
        e.filename = program or argv[0]
        raise


class _Process:
    """A started program: its pid, and its exit status once reaped."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        #: As ``subprocess`` gives it (negative: killed by that signal); ``None`` until reaped.
        self.returncode: int | None = None

    def reap(self) -> int:
        """Collect the exit status (the caller knows the process has exited)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the process group, while its leader is not reaped (until then
        its pid cannot name another process or group)."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass  # the group is gone


class _Child:
    """One run of the command: its process, its exit, its captured output."""

    __slots__ = ("forwarded", "loop", "name", "pidfd", "process", "stderr", "stdout")

    def __init__(
        self,
        argv: list[str],
        program: str | None,
        env: dict[bytes, bytes],
        *,
        capture_stdout: bool,
        tail: int,
    ) -> None:
        """Start the command (raises ``OSError`` when it cannot be)."""
        self.loop = asyncio.get_running_loop()
        self.name = argv[0]
        self.forwarded: int | None = None
        err_r, err_w = _pipe()
        out_r, out_w = _pipe() if capture_stdout else (-1, -1)
        try:
            self.process = _Process(_spawn(argv, program, env, out_w, err_w))
        except BaseException:
            for fd in (err_r, out_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (err_w, out_w):
                if fd >= 0:
                    os.close(fd)
        self.stderr = _Capture(self.loop, err_r, tail)
        self.stdout = _Capture(self.loop, out_r, tail) if out_r >= 0 else None
        try:
            self.pidfd: int | None = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # not Linux 5.3+: the exit is waited for in a thread

    def forward(self, signum: int | None) -> None:
        """``ctx.on_stop``'s callback: send the signal that stops the run (none for
        ``Batch.stop()``) to the command's process group."""
        if signum is not None:
            self.forwarded = signum
            self.process.signal_group(signum)

    async def wait(self, kill_after: float) -> int:
        """Wait for the command to exit and reap it; return its status. Cancelled, it kills
        the process group first (SIGTERM and SIGCONT, SIGKILL ``kill_after`` seconds later)
        and reaps the leader, then lets the cancellation go on."""
        try:
            await self._exited()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._kill(kill_after)
            raise
        return self.process.reap()

    async def _exited(self) -> None:
        """Wait until the leader has exited, without reaping it (its pid keeps naming the
        group): on the pidfd, or on ``waitid(WNOWAIT)`` in a thread without one."""
        if self.pidfd is None:
            pid = self.process.pid
            flags = os.WEXITED | os.WNOWAIT
            await anyio.to_thread.run_sync(os.waitid, os.P_PID, pid, flags, abandon_on_cancel=True)
            return
        exited = self.loop.create_future()
        self.loop.add_reader(self.pidfd, _resolve, exited)
        try:
            await exited
        finally:
            self.loop.remove_reader(self.pidfd)

    async def _kill(self, kill_after: float) -> None:
        process = self.process
        if process.returncode is not None:
            return
        process.signal_group(signal.SIGTERM)
        process.signal_group(signal.SIGCONT)  # a stopped process acts on SIGTERM only then
        with anyio.move_on_after(kill_after):
            await self._exited()
        process.signal_group(signal.SIGKILL)  # the leader, or what it left of its group
        with anyio.move_on_after(_REAP_AFTER_KILL):
            await self._exited()
            process.reap()
            return
        log.error(
            "command %r (pid %d) did not die %gs after SIGKILL (stuck in the kernel?): left "
            "running",
            self.name,
            process.pid,
            _REAP_AFTER_KILL,
        )

    def close(self) -> None:
        """Release the pidfd and the pipes (what is in them is kept)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.stderr.close()
        if self.stdout is not None:
            self.stdout.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _absolute(path: Path) -> str:
    """``path`` made absolute against the current directory, not normalised (a ``..`` after a
    symbolic link means what it means to the kernel)."""
    text = os.fspath(path)
    return text if os.path.isabs(text) else os.path.join(os.getcwd(), text)


class ExecHandler:
    """A handler that runs a program for each item: ``Batch(ExecHandler("cksum {}"), ...)``.

    ``command`` is a command line (split like a POSIX shell splits words, never run by a
    shell) or a sequence of words. In each word ``{}`` is replaced by the input's absolute
    path, ``{/}`` its name, ``{//}`` its directory, ``{.}`` the path without its extension,
    ``{/.}`` the name without it; with no placeholder, the path is the last argument.

    The program runs in its own session and process group, stdin ``/dev/null``, its stdout
    discarded (logged at DEBUG), with asyncbatch's environment (as it was when this handler
    was made) and the item's ``ASYNCBATCH_*`` variables (see :data:`ENVIRONMENT` and
    docs/cli.md). Exit status 0: done. Otherwise :class:`CommandFailedError` carrying the
    last ``output_tail`` bytes of its stderr: a failed attempt, retried up to
    ``max_attempts``. A stop of the run by a signal is forwarded to the process group; a
    command that then fails gives its item back (:class:`AttemptInterrupted`). A cancelled
    attempt (``timeout``, lost lease, end of ``grace``) SIGTERMs the group, SIGKILLs it
    ``kill_after`` seconds later, and reaps the program before the attempt ends.

    Raises :class:`ConfigurationError` (naming the command) at once for a command line that
    does not split, has no program, or whose program is not found (unless a placeholder
    names it), and for a negative ``kill_after`` or ``output_tail``. Suspicious command
    lines (a shell operator as a word, a placeholder inside a ``sh -c`` script) are logged
    as warnings.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        kill_after: float = KILL_AFTER,
        output_tail: int = OUTPUT_TAIL,
    ) -> None:
        words = split_command(command)
        if not 0 <= kill_after < float("inf"):
            raise ConfigurationError.bad_value("kill_after", kill_after, "seconds >= 0")
        if output_tail < 0:
            raise ConfigurationError.bad_value("output_tail", output_tail, "bytes >= 0")
        #: The command's words, as split (placeholders in them).
        self.words = words
        #: The program's absolute path, found once (``None`` when a placeholder names it).
        self.program = _find_program(words[0], command)
        self.kill_after = kill_after
        self.output_tail = output_tail
        self._template = _Template(words)
        base = dict(os.environb)
        for name in ENVIRONMENT:
            base.pop(name.encode(), None)
        self._base_env = base
        for warning in _warnings(words):
            log.warning("command %s: %s", shlex.join(words), warning)

    def __repr__(self) -> str:
        return f"ExecHandler({shlex.join(self.words)!r})"

    async def __call__(self, ctx: TaskContext) -> None:
        """Run the command for ``ctx``'s input; return when it exited 0.

        Raises :class:`CommandFailedError` for another status, :class:`AttemptInterrupted`
        when it failed after the run's stop signal was forwarded to it, and ``OSError`` when
        it cannot be started (its program gone, say).
        """
        path = _absolute(ctx.entry.path)
        argv = self._template.argv(path)
        debug = handler_log.isEnabledFor(logging.DEBUG)
        began = time.monotonic()
        child = _Child(
            argv,
            self.program,
            self._environment(ctx, path),
            capture_stdout=debug,
            tail=self.output_tail,
        )
        try:
            with ctx.on_stop(child.forward):
                status = await child.wait(self.kill_after)
        finally:
            child.close()
        if debug:
            self._log_output(ctx, child, status, time.monotonic() - began)
        if status == 0:
            return
        if child.forwarded is not None:
            name = signal.Signals(child.forwarded).name
            raise AttemptInterrupted(
                f"{argv[0]!r} {describe_status(status)} after the run's {name} was forwarded to it"
            )
        raise CommandFailedError(argv[0], status, bytes(child.stderr.tail), cut=child.stderr.cut)

    def _environment(self, ctx: TaskContext, path: str) -> dict[bytes, bytes]:
        env = self._base_env.copy()
        fsencode = os.fsencode
        env[b"ASYNCBATCH_JOB"] = fsencode(ctx.job)
        env[b"ASYNCBATCH_KEY"] = ctx.key.encode()
        env[b"ASYNCBATCH_ATTEMPT"] = b"%d" % ctx.attempt
        env[b"ASYNCBATCH_FENCE"] = b"%d" % ctx.fence
        env[b"ASYNCBATCH_INPUT"] = fsencode(path)
        env[b"ASYNCBATCH_INPUT_HASH"] = ctx.input_hash.encode()
        env[b"ASYNCBATCH_RELPATH"] = fsencode(ctx.entry.relpath)
        try:
            env[b"ASYNCBATCH_IDEMPOTENCY_KEY"] = ctx.idempotency_key(IDEMPOTENCY_CALL).encode()
        except RuntimeError:
            pass  # a context made by hand, not by a Batch: no ledger secret to derive it from
        if ctx.output_dir is not None:
            env[b"ASYNCBATCH_OUTPUT_DIR"] = fsencode(str(ctx.output_dir))
        return env

    @staticmethod
    def _log_output(ctx: TaskContext, child: _Child, status: int, seconds: float) -> None:
        def shown(capture: _Capture | None) -> str:
            if capture is None or not capture.tail:
                return "(nothing)"
            text = bytes(capture.tail).decode("utf-8", "backslashreplace").rstrip("\n")
            return ("..." if capture.cut else "") + text

        ctx.log.debug(
            "%r %s in %.3fs; stdout: %s; stderr: %s",
            ctx.entry.relpath,
            describe_status(status),
            seconds,
            shown(child.stdout),
            shown(child.stderr),
        )
