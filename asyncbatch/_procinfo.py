"""Facts about processes: who we are, and whether a recorded holder is still alive.

A lock or a lease records ``(host, pid, pid_start)``. On the same host, the holder is alive when
that pid exists, is not a zombie, and started at the recorded time: a pid reused by another
process after a crash is not mistaken for the holder. ``pid_start`` combines the boot id with the
process start time in clock ticks (Linux ``/proc``); elsewhere it is ``None`` and only the pid is
compared.

"The same host" means the same hostname *and* the same pid namespace: processes in containers
that share the host's name (host networking) but have pid namespaces of their own number
their processes apart, so a pid seen from one means nothing in another. Outside the initial
pid namespace the host is written ``NAME/pidns:INODE``.

A process can live in a pid namespace whose ``/proc`` is not its own (``unshare --pid --fork``
without ``--mount-proc``, a container given the host's ``/proc``): ``/proc/N`` there is the
process numbered N in another namespace. Such a process records no ``pid_start`` and judges
no holder by ``/proc``: a holder of its namespace is known dead only when its pid is gone
(``kill(pid, 0)`` asks the caller's own namespace); otherwise its heartbeat or lease tells.
The namespace itself is still named rightly: ``/proc/self`` is the calling process in any
``/proc``.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

__all__ = ["ProcessIdentity", "holder_is_dead", "host_name", "this_process"]


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """Who holds a lock or a lease."""

    host: str
    pid: int
    pid_start: str | None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def proc_is_ours() -> bool:
    """Whether ``/proc/N`` is the process numbered N in this process's pid namespace.

    ``/proc/self`` links to the caller's pid as the ``/proc`` mount numbers it: a ``/proc``
    mounted for another pid namespace names it otherwise (``False`` too without ``/proc``).
    """
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str] | None:
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    return text[text.rfind(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """Return ``"<boot_id>:<start ticks>"`` for ``pid``, or ``None`` where it cannot be read."""
    fields = _stat_fields(pid)
    boot = _read("/proc/sys/kernel/random/boot_id")
    if fields is None or boot is None or len(fields) < 20:
        return None
    return f"{boot.strip()}:{fields[19]}"


#: The inode of the initial pid namespace (the kernel's PROC_PID_INIT_INO).
_INIT_PID_NAMESPACE = 0xEFFFFFFC


def host_name() -> str:
    """This host as locks, leases and temp files name it: the hostname, and the pid namespace
    when it is not the initial one (``NAME/pidns:INODE``)."""
    name = socket.gethostname()
    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux, or no /proc: pids are the host's
        return name
    return name if inode == _INIT_PID_NAMESPACE else f"{name}/pidns:{inode}"


def this_process() -> ProcessIdentity:
    """The identity of the calling process."""
    pid = os.getpid()
    start = process_start(pid) if proc_is_ours() else None  # else another process's start
    return ProcessIdentity(host=host_name(), pid=pid, pid_start=start)


def _pid_exists(pid: int, *, own_proc: bool) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    if not own_proc:  # /proc/pid is another namespace's process
        return True
    fields = _stat_fields(pid)
    # A zombie has exited; it only waits for its parent to reap it.
    return not (fields is not None and fields and fields[0] in ("Z", "X"))


def holder_is_dead(holder: ProcessIdentity, *, me: ProcessIdentity | None = None) -> bool:
    """Whether the recorded holder is known to have exited.

    Only a holder on this host (and in this pid namespace) can be known dead: its pid is gone,
    is a zombie, or now belongs to a process that started at another time. A holder on another
    host is never known dead here (only its heartbeat can tell). Where ``/proc`` is another
    pid namespace's (see :func:`proc_is_ours`), only a pid that is gone is known dead.
    """
    me = me or this_process()
    if holder.host != me.host:
        return False
    if holder.pid == me.pid:  # this process recorded the start it records now
        return holder.pid_start is not None and holder.pid_start != me.pid_start
    own_proc = proc_is_ours()
    if not _pid_exists(holder.pid, own_proc=own_proc):
        return True
    if own_proc and holder.pid_start is not None:
        current = process_start(holder.pid)
        if current is not None and current != holder.pid_start:
            return True
    return False
