"""The source directory of a run, opened once and reopened when it is replaced.

Inputs are opened relative to a descriptor of the source directory (no path is looked up
twice), but scans go by its path. When the directory at that path is replaced (deleted and
made again, a remount, a moved inbox, a symlink switched to another directory), the old
descriptor points at a directory nobody writes to any more: every new file would look
vanished. :meth:`SourceDir.refresh` compares the path's identity (device, inode) with the
descriptor's, reopens it when they differ (saying so once), and says what is wrong while the
path is gone, so that readiness can fail meanwhile.

Made per run by the runner; nothing here outlives it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["SourceDir"]

log = logging.getLogger("asyncbatch")

_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class SourceDir:
    """A run's source directory: its descriptor, and what is wrong with it, if anything."""

    #: Whether change events can be followed (see :class:`asyncbatch._sources.base.SourceHandle`).
    watchable = True

    def __init__(self, path: Path, *, waits: bool = True) -> None:
        self.path = path
        #: Whether the run waits for the directory when it is gone (a watch does; a run ends
        #: with what it found, the files of the directory gone with it).
        self.waits = waits
        #: Why the source cannot be used now (gone, not a directory), or ``None``.
        self.problem: str | None = None
        #: How many times it was found replaced and reopened.
        self.reopened = 0
        #: Whether :attr:`problem` is that a poll could not list it (it is there).
        self._unlisted = False
        self._fd = -1
        self._identity = (0, 0)

    @property
    def usable(self) -> bool:
        """Whether the source was there at the last :meth:`refresh` (no :attr:`problem`, or
        only that the last poll could not list it: the next one tries again)."""
        return self.problem is None or self._unlisted

    @property
    def fd(self) -> int:
        """The open descriptor of the source directory (as of the last :meth:`refresh`)."""
        return self._fd

    def open(self) -> None:
        """Open the source directory. Raises ``OSError`` when it cannot be opened."""
        fd = os.open(self.path, _FLAGS)
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def refresh(self) -> bool:
        """Look at the path again (one ``stat``); reopen it if another directory is there now.

        Returns whether it was reopened. While the path is gone or not a directory,
        :attr:`problem` says so (and the old descriptor stays, harmless: its files are gone
        for the scans too); once it is back, the problem is cleared.
        """
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._trouble(f"the source directory {str(self.path)!r} is gone ({e.strerror})")
            return False
        if (st.st_dev, st.st_ino) == self._identity:
            self._recovered()
            return False
        try:
            fd = os.open(self.path, _FLAGS)
        except OSError as e:
            self._trouble(f"the source {str(self.path)!r} cannot be opened ({e.strerror})")
            return False
        fresh = os.fstat(fd)
        old, self._fd, self._identity = self._fd, fd, (fresh.st_dev, fresh.st_ino)
        if old >= 0:
            os.close(old)
        self.reopened += 1
        self.problem, self._unlisted = None, False
        log.warning(
            "the source directory %r was replaced (deleted and made again, remounted, or a "
            "symlink switched): reopened it, and its files are scanned afresh",
            str(self.path),
        )
        return True

    def cannot_list(self, error: OSError) -> None:
        """A poll could not list the directory, though it is there (no permission any more,
        an I/O error, a stale network handle): a watch waits for it, as for one gone, trying
        again at each poll until :meth:`listed`."""
        why = error.strerror or type(error).__name__
        self._trouble(f"the source directory {str(self.path)!r} cannot be listed ({why})")
        self._unlisted = True

    def listed(self) -> None:
        """A poll listed the directory: a listing problem is over."""
        if self._unlisted:
            log.warning("the source directory %r can be listed again", str(self.path))
            self.problem, self._unlisted = None, False

    def _trouble(self, problem: str) -> None:
        self._unlisted = False
        if self.problem != problem:
            if self.waits:
                log.warning("%s; waiting for it to be back", problem)
            else:
                log.warning(
                    "%s: its files not handled yet are left (a run that finds them takes them)",
                    problem,
                )
        self.problem = problem

    def _recovered(self) -> None:
        if self.problem is not None and not self._unlisted:  # a listing problem: listed()
            log.warning("the source directory %r is back", str(self.path))
            self.problem = None
