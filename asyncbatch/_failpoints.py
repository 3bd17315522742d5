"""Named failpoints: crash, fail or stall the process at the points that matter, on purpose.

Off unless ``ASYNCBATCH_FAILPOINTS`` is set when asyncbatch is imported; then a disabled
failpoint costs one check of a module constant. The variable holds ``;``-separated rules::

    ASYNCBATCH_FAILPOINTS="after-claim=kill:3; output-written=oserror(ENOSPC); in-handler=sleep(2)"

``NAME=ACTION[:N]``: at the ``N``-th time the point is reached (default: the first), and every
time after it unless the action ends the process:

- ``kill``: SIGKILL this process (no clean-up of any kind, never ``sys.exit``);
- ``oserror(ERRNO)``: raise ``OSError`` with that errno (``ENOSPC``, ``EIO``, ``EACCES``, ...);
- ``sleep(SECONDS)``: stall (the event loop too, where a synchronous point is reached on it).

The points (see :data:`POINTS`) are named in the code as ``hit("name")`` (synchronous code,
threads included) or ``await ahit("name")``. Tests in this process may replace :data:`ACTIVE`
(``monkeypatch.setattr``) with actions of their own, such as :class:`Call`.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import anyio
import anyio.to_thread

__all__ = [
    "ACTIVE",
    "OBJECT_POINTS",
    "POINTS",
    "PROBLEM",
    "Action",
    "Call",
    "FailpointError",
    "ahit",
    "hit",
    "parse",
]

#: Every failpoint, and where it is.
POINTS: Final = {
    "after-claim": "a claim's transaction committed, its items not yet queued",
    "listing-registered": "a shared run's listing registered its files, not ended yet",
    "in-handler": "a handler is about to be called",
    "output-temp-written": "ctx.write_output: the temp file is written and fsynced",
    "output-replaced": "ctx.write_output: the temp file replaced the target",
    "before-dir-fsync": "ctx.write_output: before the directory is fsynced",
    "before-commit": "a group of outcomes is about to be committed",
    "after-commit": "a group of outcomes committed",
    "in-transaction": "inside a ledger transaction, before its statements",
    "move-recorded": "ctx.move: the destination is recorded in the ledger, nothing moved yet",
    "before-source-unlink": "a move: the file is at its destination, its old name not removed",
    "before-post-action": "a post-commit move or delete is about to start",
    "before-marker-action": "a marker's move or delete is about to start (its file's is done)",
    "mid-copy": "a move across filesystems: half of the copy is written",
    "between-copy-and-delete": "an object's archive move: copied, the source not deleted yet",
    "output-put": "ctx.write_output under s3://: the PUT is done, the outcome not committed",
    "http-sent": "ctx.http: a request was sent, its answer not read yet",
    "middleware-executed": "IdempotencyMiddleware: the app answered, nothing stored yet",
}


#: The points only an object-store (``s3://``) source or output reaches.
OBJECT_POINTS: Final = frozenset({"between-copy-and-delete", "output-put"})


class FailpointError(ValueError):
    """``ASYNCBATCH_FAILPOINTS`` does not parse, or names an unknown failpoint."""


@dataclass(slots=True)
class Action:
    """What a failpoint does once reached ``after`` times."""

    kind: str
    arg: float = 0.0
    after: int = 1
    hits: int = field(default=0, compare=False)

    def due(self) -> bool:
        """Count a hit; whether the action fires on it."""
        self.hits += 1
        return self.hits >= self.after

    def fire(self, name: str) -> None:
        """Do it (synchronous code)."""
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # the signal is delivered before this returns
        elif self.kind == "oserror":
            code = int(self.arg)
            raise OSError(code, f"{os.strerror(code)} (failpoint {name})")
        elif self.kind == "sleep":
            time.sleep(self.arg)

    async def afire(self, name: str) -> None:
        """Do it (on the event loop: a sleep lets the other tasks run)."""
        if self.kind == "sleep":
            await anyio.sleep(self.arg)
        else:
            self.fire(name)


@dataclass(slots=True)
class Call(Action):
    """A test's own action: call ``fn`` (in a worker thread when reached on the event loop)."""

    fn: Callable[[], None] = field(default=lambda: None)

    def fire(self, name: str) -> None:
        self.fn()

    async def afire(self, name: str) -> None:
        await anyio.to_thread.run_sync(self.fn)


_RULE = re.compile(
    r"^\s*(?P<name>[\w-]+)\s*=\s*(?P<kind>kill|oserror|sleep)"
    r"(?:\((?P<arg>[\w.]+)\))?(?::(?P<after>\d+))?\s*$"
)


def parse(text: str) -> dict[str, Action]:
    """The rules of an ``ASYNCBATCH_FAILPOINTS`` value; raises :class:`FailpointError`."""
    actions: dict[str, Action] = {}
    for rule in filter(str.strip, text.split(";")):
        m = _RULE.match(rule)
        if m is None:
            raise FailpointError(f"ASYNCBATCH_FAILPOINTS: cannot parse {rule.strip()!r}")
        name, kind, arg = m["name"], m["kind"], m["arg"]
        if name not in POINTS:
            raise FailpointError(f"ASYNCBATCH_FAILPOINTS: no failpoint named {name!r}")
        if kind == "oserror":
            code = getattr(errno, arg or "", None)
            if not isinstance(code, int):
                raise FailpointError(f"ASYNCBATCH_FAILPOINTS: {rule.strip()!r}: unknown errno")
            value = float(code)
        elif kind == "sleep":
            value = float(arg or 0)
        else:
            value = 0.0
        actions[name] = Action(kind, value, int(m["after"] or 1))
    return actions


def _from_environment() -> tuple[Mapping[str, Action] | None, str | None]:
    text = os.environ.get("ASYNCBATCH_FAILPOINTS", "")
    if not text.strip():
        return None, None
    try:
        return parse(text), None
    except FailpointError as e:
        return None, str(e)


#: The armed failpoints of this process (``None``: none, the fast path), and why the
#: environment's rules were refused, if they were (``Batch`` and the CLI raise it).
ACTIVE, PROBLEM = _from_environment()


def hit(name: str) -> None:
    """Reach the failpoint ``name`` in synchronous code."""
    if ACTIVE is None:
        return
    action = ACTIVE.get(name)
    if action is not None and action.due():
        action.fire(name)


async def ahit(name: str) -> None:
    """Reach the failpoint ``name`` on the event loop."""
    if ACTIVE is None:
        return
    action = ACTIVE.get(name)
    if action is not None and action.due():
        await action.afire(name)
