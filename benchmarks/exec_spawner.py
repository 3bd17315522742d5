"""Where a command per file should start: on the event loop, or in a spawner process.

``python -m benchmarks.exec_spawner INBOX [--files N] [--jobs J] [--work US] [--rounds R]``

A bare asyncio loop (no ledger, no pipeline) runs ``cksum`` over the first N files of INBOX,
J at a time, with US microseconds of Python work on the loop per file (half before the
start, half after the exit: what asyncbatch's pipeline does there), in two ways:

- **loop**: ``os.posix_spawn`` on the loop (as ``run --exec`` starts its commands), which
  holds the loop through the command's ``vfork`` until its ``execve``; the exit is awaited
  on a pidfd;
- **spawner**: the starts handed to a small Python process of their own over a socket pair
  (the stderr pipe's end passed with ``SCM_RIGHTS``), which starts each command with
  ``posix_spawn``, reaps it on ``SIGCHLD`` and sends its status back: the loop never waits
  in a ``vfork``, and the spawner has a GIL of its own.

against ``find | xargs -0 -P J -n 1 cksum``, interleaved, R rounds: the wall and the CPU of
each (its own, and its children's: the commands, and the spawner). The question it answers
(benchmarks/RESULTS.md, "A spawner process"): whether the loop's ``vfork`` waits are what
keeps ``run --exec -j 2`` behind ``xargs -P 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

CKSUM = "/usr/bin/cksum"
SIGDEF = {signal.SIGPIPE, signal.SIGXFSZ}

#: The spawner: requests ``(id, len) + path`` with the stderr pipe's write end; replies
#: ``(0, id, pid)`` once started and ``(1, id, wait status)`` once reaped.
SPAWNER = r"""
import os, select, signal, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
env = dict(os.environb)
sigdef = {signal.SIGPIPE, signal.SIGXFSZ}
r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
signal.set_wakeup_fd(w)
signal.signal(signal.SIGCHLD, lambda *a: None)
ids = {}
ep = select.epoll()
ep.register(sock.fileno(), select.EPOLLIN)
ep.register(r, select.EPOLLIN)
out = []
while True:
    for fd, _ in ep.poll():
        if fd == r:
            try:
                os.read(r, 512)
            except BlockingIOError:
                pass
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                out.append(struct.pack("=iii", 1, ids.pop(pid), status))
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 65536, 64)
        except BlockingIOError:
            continue
        if not msg:
            sys.exit(0)
        off = 0
        while off < len(msg):
            ident, n = struct.unpack_from("=ii", msg, off)
            path = msg[off + 8 : off + 8 + n]
            off += 8 + n
            err = fds.pop(0)
            acts = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                    (os.POSIX_SPAWN_DUP2, err, 2)]
            pid = os.posix_spawn("/usr/bin/cksum", [b"cksum", path], env, file_actions=acts,
                                 setsid=True, setsigdef=sigdef)
            os.close(err)
            ids[pid] = ident
            out.append(struct.pack("=iii", 0, ident, pid))
    if out:
        sock.sendall(b"".join(out))
        out.clear()
"""


def burn(us: float) -> None:
    """Python work on the loop's thread for ``us`` microseconds."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def on_loop(files: list[str], jobs: int, work: float) -> None:
    """Each command started with ``posix_spawn`` on the loop, its exit awaited on a pidfd."""
    loop = asyncio.get_running_loop()
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    env = dict(os.environb)
    it = iter(files)

    async def worker() -> None:
        for f in it:
            burn(work / 2)
            r, w = os.pipe()
            acts = [
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, null, 1),
                (os.POSIX_SPAWN_DUP2, w, 2),
            ]
            pid = os.posix_spawn(  # noqa: ASYNC221  (on the loop: what is measured)
                CKSUM, ["cksum", f], env, file_actions=acts, setsid=True, setsigdef=SIGDEF
            )
            os.close(w)
            pidfd = os.pidfd_open(pid)
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, exited.set_result, None)
            await exited
            loop.remove_reader(pidfd)
            os.waitpid(pid, 0)  # noqa: ASYNC222  (it exited: the pidfd said so)
            os.close(pidfd)
            os.close(r)
            burn(work / 2)

    try:
        await asyncio.gather(*(worker() for _ in range(jobs)))
    finally:
        os.close(null)


async def by_spawner(files: list[str], jobs: int, work: float) -> None:
    """Each command started by the spawner process, its status sent back."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spawner = subprocess.Popen(  # noqa: ASYNC220  (once, before the clock matters)
        [sys.executable, "-c", SPAWNER, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    ours.setblocking(False)
    waiting: dict[int, asyncio.Future[int]] = {}
    buffer = bytearray()

    def readable() -> None:
        try:
            buffer.extend(ours.recv(65536))
        except BlockingIOError:
            return
        whole = len(buffer) // 12 * 12
        for kind, ident, value in struct.iter_unpack("=iii", bytes(buffer[:whole])):
            if kind == 1:
                waiting.pop(ident).set_result(value)
        del buffer[:whole]

    loop.add_reader(ours.fileno(), readable)
    it: Iterator[tuple[int, str]] = iter(enumerate(files))

    async def worker() -> None:
        for ident, f in it:
            burn(work / 2)
            r, w = os.pipe()
            path = os.fsencode(f)
            ended = waiting[ident] = loop.create_future()
            socket.send_fds(ours, [struct.pack("=ii", ident, len(path)) + path], [w])
            os.close(w)
            await ended
            os.close(r)
            burn(work / 2)

    try:
        await asyncio.gather(*(worker() for _ in range(jobs)))
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        spawner.wait()


def xargs(inbox: str, n: int, jobs: int) -> None:
    """The same files through ``xargs -P``."""
    script = (
        f"find {inbox} -type f | sort | head -n {n} | tr '\\n' '\\0' | "
        f"xargs -0 -P {jobs} -n 1 {CKSUM} > /dev/null"
    )
    subprocess.run(["sh", "-c", script], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exec_spawner")
    p.add_argument("inbox")
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", type=float, default=200.0, help="µs of Python a file on the loop")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    files = sorted(os.path.join(args.inbox, f) for f in os.listdir(args.inbox))[: args.files]
    variants: dict[str, Callable[[list[str], int, float], Coroutine[Any, Any, None]]] = {
        "loop": on_loop,
        "spawner": by_spawner,
    }
    print(f"{len(files)} files, -j {args.jobs}, {args.work:g} µs of Python a file on the loop")
    for round_ in range(args.rounds):
        for name in ("xargs", *variants):
            before, began = os.times(), time.perf_counter()
            if name == "xargs":
                xargs(args.inbox, len(files), args.jobs)
            else:
                asyncio.run(variants[name](files, args.jobs, args.work))
            wall, after = time.perf_counter() - began, os.times()
            own = after.user - before.user + after.system - before.system
            kids = (
                after.children_user
                - before.children_user
                + after.children_system
                - before.children_system
            )
            print(
                f"round {round_} {name:8s} wall {wall:6.2f} s  own CPU {own:5.2f} s  "
                f"children's CPU {kids:5.2f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
