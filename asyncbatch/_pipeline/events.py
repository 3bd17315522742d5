"""Change events for watch mode: ``watchfiles`` (inotify on Linux) wakes the claimer at once.

An event only says *where to look*: the claimer stats the paths it names (and scans the
whole source at the poll interval all the same, since events can be lost, coalesced, or
never sent: network filesystems send none for changes made on other hosts). Events for names
the scan skips (hidden, temporary, ``ignore``d; so also a state file, an output or an archive
directory inside the source, which must be hidden from the scan) and deletions are dropped
here: they never cause a look.

``watchfiles`` is an optional extra, imported here when a watch starts and nowhere else.
Anything that keeps events from working (not installed, the inotify limits reached, a
network filesystem) is one warning line; polling goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from types import ModuleType

import anyio

from .._config import BatchConfig
from .._fsinfo import network_filesystem
from .._ready import Readiness
from .._scanner import ScanRules

__all__ = ["DEBOUNCE_MS", "STEP_MS", "Changes", "EventWatcher"]

log = logging.getLogger("asyncbatch")

#: watchfiles hands over a group of changes once none came for STEP_MS, or DEBOUNCE_MS after
#: the group's first one (so a steady stream of arrivals is handed over ten times a second).
#: STEP_MS is also how soon its thread sees a stop.
DEBOUNCE_MS = 100
STEP_MS = 50
#: How long one wait of the watcher thread lasts while nothing changes (then it waits again).
_TIMEOUT_MS = 10_000


class Changes:
    """The paths (relative to the source) that changed since the claimer last took them,
    and the wake-up of the claimer's wait."""

    def __init__(self) -> None:
        self._paths: set[bytes] = set()
        self._rescan = False
        self._wake = anyio.Event()
        #: Whether a watcher is following the source (set by :class:`EventWatcher`).
        self.live = False

    def add(self, relpaths: Iterable[bytes]) -> None:
        """Note changed paths and wake the claimer."""
        self._paths.update(relpaths)
        self._wake.set()

    def rescan(self) -> None:
        """Ask for a full scan (events may have been lost) and wake the claimer."""
        self._rescan = True
        self._wake.set()

    def wake(self) -> None:
        """Wake the claimer (a stop)."""
        self._wake.set()

    def take(self) -> tuple[set[bytes], bool]:
        """The paths noted since the last call, and whether a full scan was asked for."""
        paths, rescan = self._paths, self._rescan
        self._paths, self._rescan = set(), False
        self._wake = anyio.Event()
        return paths, rescan

    async def wait(self, seconds: float | None) -> None:
        """Wait until woken, or ``seconds`` (``None``: no limit) pass."""
        if self._wake.is_set():
            return
        with anyio.move_on_after(float("inf") if seconds is None else max(seconds, 0.0)):
            await self._wake.wait()


class EventWatcher:
    """Follows the change events under a source and hands the paths to :class:`Changes`."""

    def __init__(self, config: BatchConfig, changes: Changes) -> None:
        self.config = config
        self.changes = changes
        self._root = os.path.abspath(config.directory)
        self._rules = config.rules
        self._ready = config.readiness

    async def serve(self) -> None:
        """Hand over changes until cancelled. A problem is one warning line, and the watch
        goes on by polling; nothing of the watcher (thread, inotify descriptor) outlives
        this call."""
        cfg = self.config
        fallback = f"polling every {cfg.poll:g}s finds new files"
        try:
            import watchfiles  # the optional extra: imported here, and only here
        except ImportError:
            log.warning(
                "change events are off: watchfiles is not installed "
                "(pip install 'asyncbatch[watch]', or pass events=False / --no-events); %s",
                fallback,
            )
            return
        fs = network_filesystem(cfg.directory)
        if fs is not None:
            log.warning(
                "change events are off: the source %r is on a network filesystem (%s), which "
                "sends none for changes made on other hosts (pass events=False / --no-events "
                "to say so); %s",
                str(cfg.source),
                fs,
                fallback,
            )
            return
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_when_cancelled, stop)
            self.changes.live = True
            try:
                await self._follow(watchfiles, stop)
            # RuntimeError: WatchfilesRustInternalError; in a group, from awatch's task group
            except* (OSError, RuntimeError) as group:
                log.warning("change events are off: %s; %s", _why(_first(group)), fallback)
            finally:
                self.changes.live = False
                self.changes.rescan()  # what changed since the failure had no event
                tg.cancel_scope.cancel()

    async def _follow(self, watchfiles: ModuleType, stop: anyio.Event) -> None:
        cfg = self.config
        deleted = watchfiles.Change.deleted
        changes = watchfiles.awatch(
            self._root,
            watch_filter=None,
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            stop_event=stop,
            rust_timeout=_TIMEOUT_MS,
            force_polling=False,  # its polling would walk the whole tree every 300 ms
            recursive=cfg.recursive,
            # True would hide every error adding a watch (the inotify limit too), not just
            # an unreadable directory: such an error is a warning, and polling goes on.
            ignore_permission_denied=False,
        )
        async with contextlib.aclosing(changes):
            async for batch in changes:
                paths = self._relevant(path for change, path in batch if change != deleted)
                if paths:
                    self.changes.add(paths)

    def _relevant(self, paths: Iterable[str]) -> list[bytes]:
        """The relative paths among ``paths`` that a scan could list, or that are markers of
        the job's rules (their arrival makes files ready); deletions left out."""
        root, rules, recursive = self._root, self._rules, self.config.recursive
        ready = None if self._ready.plain else self._ready
        out = []
        for path in paths:
            rel = os.fsencode(os.path.relpath(path, root))
            if rel.startswith(b"..") or rel == b".":
                continue
            if not rules.hides(rel, recursive=recursive, is_dir=False) or (
                ready is not None and _marker_in_sight(ready, rules, rel, recursive=recursive)
            ):
                out.append(rel)
        return out


def _marker_in_sight(ready: Readiness, rules: ScanRules, rel: bytes, *, recursive: bool) -> bool:
    """Whether ``rel`` is a marker (a hidden name, say) in a directory the scan walks."""
    parent, _, name = rel.rpartition(b"/")
    if not ready.marks(name):
        return False
    return not parent or not rules.hides(parent, recursive=recursive, is_dir=True)


async def _set_when_cancelled(stop: anyio.Event) -> None:
    """Set ``stop`` when cancelled: the watcher thread sees it within STEP_MS and returns
    (a thread call is not interrupted by a cancellation; this ends it)."""
    try:
        await anyio.sleep_forever()
    finally:
        stop.set()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (nested) group."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


def _why(exc: BaseException) -> str:
    """One line for a watcher error, with what to do about the inotify limits."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = text.split(" (Error {")[0]  # the notify crate's debug form, after its message
    lowered = text.lower()
    if "watch limit" in lowered or getattr(exc, "errno", None) == 28:
        return (
            f"{text} (raise fs.inotify.max_user_watches, e.g. sysctl "
            "fs.inotify.max_user_watches=524288)"
        )
    if "too many open files" in lowered or getattr(exc, "errno", None) == 24:
        return f"{text} (raise fs.inotify.max_user_instances, or the open files limit)"
    return text
