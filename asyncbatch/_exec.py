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
import errno
import itertools
import logging
import os
import re
import select
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.to_thread

from ._context import TaskContext
from ._exceptions import AttemptInterrupted, CommandFailedError, ConfigurationError, describe_status
from ._scanner import Entry

__all__ = [
    "ENVIRONMENT",
    "IDEMPOTENCY_CALL",
    "KILL_AFTER",
    "OUTPUT_TAIL",
    "ExecHandler",
    "StartedCommand",
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
#: Events taken from the watch's epoll set per wake-up at most (the rest: at the next one).
_EVENTS_PER_WAKE = 256
#: Seconds the watch's epoll set stays on the event loop after the last command ended.
_IDLE_AFTER = 1.0
#: A descriptor in a watch's epoll set: reported once, then disarmed until armed again.
_ONCE = select.EPOLLIN | select.EPOLLONESHOT
#: The shell that runs a script without a ``#!`` line (as ``execvp`` does).
_SH = "/bin/sh"
#: Signals a command gets back at their default action (Python ignores them).
_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)


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
        #: Per word: the word itself (no placeholder), its placeholder alone (``[p]``: the
        #: word is nothing else), or its pieces: text, placeholder, text, ... (``re.split``
        #: with a capturing group).
        self._words: list[str | list[str]] = []
        used: set[str] = set()
        for word in words:
            pieces = _PLACEHOLDER.split(word)
            if len(pieces) == 1:
                self._words.append(word)
            elif len(pieces) == 3 and not pieces[0] and not pieces[2]:
                self._words.append([pieces[1]])
            else:
                self._words.append(pieces)
            used.update(pieces[1::2])
        self._append = not used
        self._derived = bool(used - {"{}"})

    def argv(self, path: str) -> list[str]:
        """The arguments for the input at ``path`` (absolute)."""
        values = _values(path) if self._derived else {"{}": path}
        argv = [
            word
            if isinstance(word, str)
            else values[word[0]]
            if len(word) == 1
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
    """The tail of one of a command's output streams: a pipe read as its data comes (so that a
    command that writes a lot never blocks on a full pipe); only the last ``limit`` bytes
    kept."""

    __slots__ = ("cut", "ended", "fd", "limit", "tail")

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.tail = bytearray()
        self.cut = False
        self.ended = False

    def read(self) -> bool:
        """Take what the pipe holds now (never waiting); ``False`` at its end."""
        for _ in range(_READS_PER_WAKE):  # a writer that never stops cannot hold the loop
            try:
                chunk = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                self.ended = True
                return False
            tail = self.tail
            tail += chunk
            if len(tail) > self.limit:
                del tail[: len(tail) - self.limit]
                self.cut = True
            if len(chunk) < _CHUNK:
                return True
        return True


class _Watch:
    """The descriptors of the commands one handler runs (their pidfds and output pipes), in
    an epoll set of their own, which the event loop watches as one reader while any of them
    runs.

    A command's descriptor then costs an ``epoll_ctl`` to add (the loop's ``add_reader``
    and ``remove_reader`` cost ~25 Python calls a descriptor), none to remove (each is
    one-shot: a pipe is armed again after each read but its last, and closing a descriptor
    takes it out of the set), and the loop makes one callback per wake-up for all of them.
    The set is the handler's (one descriptor, opened with its first command, closed with the
    handler); it holds an item's descriptors only while that item's command runs, and is on
    a loop only while commands run there (and ``_IDLE_AFTER`` seconds after).

    It also keeps ``/dev/null`` open, the commands' stdin (and stdout, unless captured): a
    ``dup2`` in the child, where opening it there twice cost each start ~12 us of the
    ``vfork`` during which the event loop waits.
    """

    __slots__ = ("epoll", "idle", "loop", "null", "running", "watched")

    def __init__(self) -> None:
        self.null = -1  # (not open yet: nothing for __del__ to close)
        self.epoll = select.epoll()  # close-on-exec; closed when collected
        self.null = _above_standard(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        #: What each descriptor in the set is: a command's pidfd (the command), or one of its
        #: output pipes (its capture).
        self.watched: dict[int, _Command | _Capture] = {}
        #: Commands started and not yet closed.
        self.running = 0
        #: The loop the set is on, and the timer that takes it off once no command runs.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle: asyncio.TimerHandle | None = None

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # (``os.close`` bound early: at the interpreter's exit, module globals may be gone.)
        if self.null >= 0:
            _close(self.null)

    def enter(self, loop: asyncio.AbstractEventLoop) -> None:
        """A command is about to start on ``loop``: the set goes on the loop if not there."""
        if self.loop is not loop:
            self._off()  # an earlier run's loop, if any
            loop.add_reader(self.epoll.fileno(), self._ready)
            self.loop = loop
        elif self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.running += 1

    def release(self) -> None:
        """A command is closed. When none runs, the set leaves the loop ``_IDLE_AFTER``
        seconds later, unless one starts meanwhile (the next item's, as a rule: not an
        ``add_reader`` and a ``remove_reader`` between two items)."""
        self.running -= 1
        if self.running == 0 and self.loop is not None and self.idle is None:
            self.idle = self.loop.call_later(_IDLE_AFTER, self._off)

    def _off(self) -> None:
        """Take the set off its loop (unless that loop is closed already: nothing to do)."""
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.epoll.fileno())

    def add(self, fd: int, what: _Command | _Capture) -> None:
        """Watch ``fd`` for input, once (a pidfd: its process exited; a pipe: data, or its
        end)."""
        self.epoll.register(fd, _ONCE)
        self.watched[fd] = what

    def closing(self, fd: int) -> None:
        """``fd`` is about to be closed: forget it. Closing it takes it out of the epoll set
        (no other descriptor refers to its open file: pidfds and pipe ends are this
        process's own, close-on-exec), so no ``epoll_ctl`` is spent on it."""
        self.watched.pop(fd, None)

    def _ready(self) -> None:
        watched, epoll = self.watched, self.epoll
        for fd, _ in epoll.poll(0, _EVENTS_PER_WAKE):
            what = watched.get(fd)
            if what is None:
                continue
            if isinstance(what, _Command):  # a pidfd: the process exited
                del watched[fd]
                what.exited()
            elif what.read():  # more may come
                epoll.modify(fd, _ONCE)
            else:  # the end of the pipe
                del watched[fd]


def _pipe() -> tuple[int, int]:
    """A pipe (both ends close-on-exec) whose ends are above the standard descriptors."""
    read, write = os.pipe()
    try:
        read = _above_standard(read)
    except BaseException:
        os.close(write)
        raise
    try:
        return read, _above_standard(write)
    except BaseException:
        os.close(read)
        raise


def _above_standard(fd: int) -> int:
    """``fd`` (close-on-exec), or a copy of it above 0-2 when it is one of them: a process
    started with 0, 1 or 2 closed gets them back from ``open()`` and ``pipe()``, and the
    spawn's ``dup2`` onto 0-2 would then clobber them. Closes ``fd`` if it raises."""
    if fd > 2:
        return fd
    import fcntl  # here: only a process started without its standard descriptors needs it

    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _spawn(
    argv: list[str],
    program: str | None,
    env: dict[bytes, bytes],
    null: int,
    stdout: int,
    stderr: int,
) -> int:
    """Start the program: a new session (its own process group), stdin ``null`` (an open
    ``/dev/null``), stdout ``stdout`` (``-1``: ``null``), stderr ``stderr``, SIGPIPE and
    SIGXFSZ back to their defaults (Python ignores them; ``subprocess`` restores them too).
    Returns its pid.

    ``posix_spawn`` (``vfork`` underneath, as ``subprocess``): no Python runs in the child,
    and of the descriptors asyncbatch or Python opens, only 0-2 reach it (the others are
    close-on-exec; those the runner inherited from its parent reach it, as they reach
    xargs' commands). On the event loop's thread: measured against a worker thread per start
    (benchmarks/RESULTS-exec.md), the hop and the GIL's ping-pong cost more CPU than the
    ``vfork`` wait they spare the loop. An executable file the kernel cannot run (``ENOEXEC``:
    a script without a ``#!`` line) is run by ``/bin/sh``, as ``execvp`` runs it (xargs,
    ``find -exec``, a shell). Raises ``OSError`` (naming the program) when it cannot be
    started.
    """
    actions = [
        (os.POSIX_SPAWN_DUP2, null, 0),
        (os.POSIX_SPAWN_DUP2, null if stdout < 0 else stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    try:
        try:
            if program is None:  # a placeholder names it: looked up on PATH if it has no "/"
                return os.posix_spawnp(
                    argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_SIGDEF
                )
            return os.posix_spawn(
                program, argv, env, file_actions=actions, setsid=True, setsigdef=_SIGDEF
            )
        except OSError as e:
            script = _script(e, program, argv[0])
            if script is None:
                raise
            return os.posix_spawn(
                _SH,
                ["sh", script, *argv[1:]],
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=_SIGDEF,
            )
    except OSError as e:
        e.filename = program or argv[0]
        raise


def _script(error: OSError, program: str | None, word: str) -> str | None:
    """The path of the program that failed to start with ``error``, when ``/bin/sh`` is to
    run it instead (``ENOEXEC``: execvp's rule); else ``None``."""
    if error.errno != errno.ENOEXEC:
        return None
    if program is not None:
        return program
    if os.sep in word:
        return word
    import shutil

    return shutil.which(word)


class _Command:
    """One run of the command: its process (and its exit status, once reaped), its pidfd,
    and the captured tails of its output.

    The pidfd and the pipes are watched in the handler's :class:`_Watch`; without pidfds
    (Linux before 5.3) the exit is waited for in a thread.
    """

    __slots__ = (
        "dead",
        "forwarded",
        "loop",
        "name",
        "pid",
        "pidfd",
        "returncode",
        "stderr",
        "stdout",
        "waiter",
        "watch",
    )

    def __init__(
        self,
        argv: list[str],
        program: str | None,
        env: dict[bytes, bytes],
        watch: _Watch,
        loop: asyncio.AbstractEventLoop,
        *,
        capture_stdout: bool,
        tail: int,
    ) -> None:
        """Start the command (raises ``OSError`` when it cannot be)."""
        self.name = argv[0]
        self.loop = loop
        self.forwarded: int | None = None
        #: As ``subprocess`` gives it (negative: killed by that signal); ``None`` until reaped.
        self.returncode: int | None = None
        #: Whether the process is known to have exited (it may not be reaped yet).
        self.dead = False
        #: What :meth:`wait_exit` awaits while the process runs.
        self.waiter: asyncio.Future[None] | None = None
        self.stdout: _Capture | None = None
        self.watch = watch
        watch.enter(loop)
        try:
            err_r, err_w = _pipe()
            out_r, out_w = _pipe() if capture_stdout else (-1, -1)
        except BaseException:
            watch.release()
            raise
        try:
            self.pid = _spawn(argv, program, env, watch.null, out_w, err_w)
        except BaseException:
            for fd in (err_r, out_r):
                if fd >= 0:
                    os.close(fd)
            watch.release()
            raise
        finally:
            for fd in (err_w, out_w):
                if fd >= 0:
                    os.close(fd)
        # From here on the command runs: nothing may raise before the caller's ``try``.
        self.stderr = _Capture(err_r, tail)
        self._watch_pipe(self.stderr)
        if out_r >= 0:
            self.stdout = _Capture(out_r, tail)
            self._watch_pipe(self.stdout)
        self.pidfd: int | None = None  # without one, the exit is waited for in a thread
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return  # not Linux 5.3+
        try:
            watch.add(pidfd, self)
        except OSError:
            os.close(pidfd)
            return
        self.pidfd = pidfd

    def _watch_pipe(self, capture: _Capture) -> None:
        os.set_blocking(capture.fd, False)
        try:
            self.watch.add(capture.fd, capture)
        except OSError:
            pass  # not watched (out of memory?): read only once the command has exited

    def exited(self) -> None:
        """The watch saw the pidfd readable: the process exited (it is not reaped yet)."""
        self.dead = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def forward(self, signum: int | None) -> None:
        """``ctx.on_stop``'s callback: send the signal that stops the run (none for
        ``Batch.stop()``) to the command's process group."""
        if signum is not None:
            self.forwarded = signum
            self.signal_group(signum)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the process group, while its leader is not reaped (until then
        its pid cannot name another process or group)."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass  # the group is gone

    def reap(self) -> int:
        """Collect the exit status (the caller knows the process has exited)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    async def wait(self, kill_after: float) -> None:
        """Wait for the command to exit (:meth:`reap` collects its status). Cancelled, it
        kills the process group first (SIGTERM and SIGCONT, SIGKILL ``kill_after`` seconds
        later) and reaps the leader, then lets the cancellation go on."""
        try:
            if not self.dead:
                if self.pidfd is None:
                    await self.wait_exit()
                else:  # wait_exit's own path, inline: once per item
                    self.waiter = waiter = self.loop.create_future()
                    try:
                        await waiter
                    finally:
                        self.waiter = None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._kill(kill_after)
            raise

    async def wait_exit(self) -> None:
        """Wait until the leader has exited, without reaping it (its pid keeps naming the
        group): on the pidfd, or on ``waitid(WNOWAIT)`` in a thread without one."""
        if self.pidfd is None:
            flags = os.WEXITED | os.WNOWAIT
            await anyio.to_thread.run_sync(
                os.waitid, os.P_PID, self.pid, flags, abandon_on_cancel=True
            )
            return
        if self.dead:
            return
        self.waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    async def _kill(self, kill_after: float) -> None:
        if self.returncode is not None:
            return
        self.signal_group(signal.SIGTERM)
        self.signal_group(signal.SIGCONT)  # a stopped process acts on SIGTERM only then
        with anyio.move_on_after(kill_after):
            await self.wait_exit()
        self.signal_group(signal.SIGKILL)  # the leader, or what it left of its group
        with anyio.move_on_after(_REAP_AFTER_KILL):
            await self.wait_exit()
            self.reap()
            return
        log.error(
            "command %r (pid %d) did not die %gs after SIGKILL (stuck in the kernel?): left "
            "running",
            self.name,
            self.pid,
            _REAP_AFTER_KILL,
        )

    def close(self) -> None:
        """Release the pidfd and the pipes (what is in them is kept: taken now, without
        waiting for their end, as a process the command left behind may hold them open)."""
        watch = self.watch
        if self.pidfd is not None:
            watch.closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        for capture in (self.stderr, self.stdout):
            if capture is not None:
                if not capture.ended:
                    capture.read()
                watch.closing(capture.fd)
                os.close(capture.fd)
        watch.release()


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

    #: Its input must be a local file (a path for the command): a ``Batch`` refuses it for an
    #: ``s3://`` source before it opens the state.
    needs_local_files: ClassVar[bool] = True

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
        #: The run's job and output_dir (as the last context had them), and the base
        #: environment with their variables.
        self._run_env: tuple[str, object, dict[bytes, bytes]] | None = None
        #: ``os.fsencode``'s codec: ``str.encode`` with it is the same, without a Python call.
        self._fs_encoding = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
        #: The source directory of the last input (a run's), and its text ending in ``/``
        #: (``None``: not absolute, each path is made absolute against the current directory).
        self._base: Path | None = None
        self._prefix: str | None = None
        #: The epoll set of the commands (made with the first one).
        self._watch: _Watch | None = None
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
        started = self.start_attempt(ctx)
        await started.wait()
        started.result()

    def start_attempt(self, ctx: TaskContext) -> StartedCommand:
        """Start the command for ``ctx``'s input now, without waiting for it: what
        ``await handler(ctx)`` is, in two steps (``wait()``, then ``result()`` on what this
        returns). The run's workers use it to start an item's command as soon as the one
        before it exited, before that one's outcome is recorded.

        Raises ``OSError`` when the command cannot be started (its program gone, say).
        """
        path = self._path(ctx.entry)
        argv = self._template.argv(path)
        debug = handler_log.isEnabledFor(logging.DEBUG)
        began = time.monotonic() if debug else 0.0
        loop = asyncio.get_running_loop()
        watch = self._watch
        if watch is None or (watch.running and watch.loop is not loop):
            watch = self._watch = _Watch()  # (the handler used on two loops at once)
        child = _Command(
            argv,
            self.program,
            self._environment(ctx, path),
            watch,
            loop,
            capture_stdout=debug,
            tail=self.output_tail,
        )
        return StartedCommand(ctx, child, self.kill_after, began if debug else None)

    def _path(self, entry: Entry) -> str:
        """The input's absolute path, as ``str(entry.path)`` made absolute against the current
        directory (not normalised: a ``..`` after a symbolic link means what it means to the
        kernel).

        A scanned file's path is its source directory's text, ``/``, its relpath: joined
        here as strings, without building the ``Path`` (~10 us an item)."""
        if type(entry) is Entry and entry._path is None:
            base = entry._base
            if base is not self._base:  # the run's source directory: once a run
                text = os.fspath(base)
                self._base = base
                self._prefix = None
                if os.path.isabs(text):
                    self._prefix = text if text.endswith("/") else text + "/"
            if self._prefix is not None:
                return self._prefix + entry._relpath
        text = os.fspath(entry.path)
        return text if os.path.isabs(text) else os.path.join(os.getcwd(), text)

    def _environment(self, ctx: TaskContext, path: str) -> dict[bytes, bytes]:
        encoding, errors = self._fs_encoding
        job, output_dir = ctx.job, ctx.output_dir
        run = self._run_env
        if run is None or run[0] is not job or run[1] is not output_dir:
            # The variables of the run's settings (the same objects for all its items).
            base = self._base_env.copy()
            base[b"ASYNCBATCH_JOB"] = job.encode(encoding, errors)
            if output_dir is not None:
                base[b"ASYNCBATCH_OUTPUT_DIR"] = str(output_dir).encode(encoding, errors)
            self._run_env = run = (job, output_dir, base)
        env = run[2].copy()
        env[b"ASYNCBATCH_KEY"] = ctx.key.encode()
        env[b"ASYNCBATCH_ATTEMPT"] = b"%d" % ctx.attempt
        env[b"ASYNCBATCH_FENCE"] = b"%d" % ctx.fence
        env[b"ASYNCBATCH_INPUT"] = path.encode(encoding, errors)
        env[b"ASYNCBATCH_INPUT_HASH"] = ctx.input_hash.encode()
        env[b"ASYNCBATCH_RELPATH"] = ctx.entry.relpath.encode(encoding, errors)
        try:
            env[b"ASYNCBATCH_IDEMPOTENCY_KEY"] = ctx.idempotency_key(IDEMPOTENCY_CALL).encode()
        except RuntimeError:
            pass  # a context made by hand, not by a Batch: no ledger secret to derive it from
        return env


class StartedCommand:
    """One attempt's command, started by :meth:`ExecHandler.start_attempt`: wait for its
    exit (:meth:`wait`), then take its result (:meth:`result`).

    From its start until :meth:`result` (or a cancelled :meth:`wait`), the run's stop signal
    is forwarded to its process group (``ctx.on_stop``).
    """

    __slots__ = ("_began", "_child", "_ctx", "_kill_after", "_on_stop")

    def __init__(
        self, ctx: TaskContext, child: _Command, kill_after: float, began: float | None
    ) -> None:
        self._ctx = ctx
        self._child = child
        self._kill_after = kill_after
        #: When it started (``time.monotonic()``), to log its output at DEBUG; else ``None``.
        self._began = began
        self._on_stop = ctx.on_stop(child.forward)
        self._on_stop.__enter__()

    async def wait(self) -> None:
        """Wait until the command exited. Cancelled, it kills the process group (SIGTERM and
        SIGCONT, SIGKILL ``kill_after`` seconds later), reaps the program and releases what
        the command held, then lets the cancellation go on."""
        try:
            await self._child.wait(self._kill_after)
        except BaseException:
            self._release()
            raise

    def result(self) -> None:
        """Once :meth:`wait` returned: reap the program, release its descriptors, and return
        if it exited 0. Raises :class:`CommandFailedError` for another status, and
        :class:`AttemptInterrupted` when it failed after the run's stop signal was forwarded
        to it."""
        child = self._child
        try:
            status = child.reap()
        finally:
            self._release()
        if self._began is not None:
            _log_output(self._ctx, child, status, time.monotonic() - self._began)
        if status == 0:
            return
        if child.forwarded is not None:
            name = signal.Signals(child.forwarded).name
            raise AttemptInterrupted(
                f"{child.name!r} {describe_status(status)} after the run's {name} was "
                "forwarded to it"
            )
        raise CommandFailedError(child.name, status, bytes(child.stderr.tail), cut=child.stderr.cut)

    def _release(self) -> None:
        self._on_stop.__exit__(None, None, None)
        self._child.close()


def _log_output(ctx: TaskContext, child: _Command, status: int, seconds: float) -> None:
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
