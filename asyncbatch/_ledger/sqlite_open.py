"""Before a SQLite ledger is opened: whether its path may be used, and what errors mean.

Nothing here writes or blocks. A path that must not be opened (a directory, FIFO, socket or
device, one this user may not read, on a network filesystem, not a SQLite file, not writable
for a run) is refused with one line that says why; a reader that cannot write beside the
state gets an ``immutable`` view that creates no ``-wal`` or ``-shm`` file (one made with the
reader's permissions would break later runs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shlex
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from .._exceptions import ConfigurationError, DamagedLedgerError, LedgerError, NotALedgerError
from .._fsinfo import network_filesystem

__all__ = [
    "check_state_path",
    "check_writable",
    "companions",
    "damaged",
    "foreign_wal",
    "is_damage",
    "open_error",
    "read_only_view",
    "wal_kept",
]


def check_state_path(path: Path, *, create: bool) -> bool:
    """Refuse a state path we must not open; return whether the file exists with content.

    Never blocks and never writes: a FIFO, socket, device or directory is refused from its
    ``stat``; a file or directory this user may not read is named with the reason. The
    network filesystem check follows symlinks: it is the real file that SQLite opens.

    Whether a file with content is a SQLite database is asked of SQLite (see
    :func:`_holds_sqlite`), never read through a descriptor of our own: closing one drops
    every POSIX lock this process holds on the file, SQLite's own included, and with another
    ledger on it open in this process (two batches, a service reading its state) another
    process could then checkpoint the WAL under it: a corrupt database (SQLite's "How To
    Corrupt", 2.2). (A FIFO swapped in for the file between its ``stat`` and that read would
    block it: a race this check cannot close.)
    """
    st = _state_stat(path)
    parent = path.parent
    # A symlink to no file: SQLite makes its target, in the target's directory.
    dangling = st is None and path.is_symlink()
    if dangling:
        parent = _real(path).parent
        where = f"state {str(path)!r} (a symlink to {os.readlink(path)!r})"
    else:
        where = f"state {str(path)!r}"
    if parent.exists() and not parent.is_dir():
        raise ConfigurationError(f"{where}: {str(parent)!r} is not a directory")
    if not parent.is_dir():
        raise ConfigurationError(
            f"{where}: directory {str(parent)!r} does not exist; create it first"
        )
    if fs := network_filesystem(_real(path)):
        raise ConfigurationError(
            f"state {str(path)!r} is on a {fs} network filesystem: SQLite's WAL needs shared "
            "memory on one host; put the state on a local disk"
        )
    if st is None:
        if not create:
            raise ConfigurationError(f"state {str(path)!r} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigurationError(f"{where} cannot be created: {_unwritable(parent)}")
        return False
    if not os.access(path, os.R_OK):
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        raise ConfigurationError(f"state {str(path)!r} cannot be read: {_unreadable(path, denied)}")
    if st.st_size and not _holds_sqlite(path):
        raise NotALedgerError(f"state {str(path)!r} is not a SQLite database; it was not touched")
    if not st.st_size and not create and not _has_content(companions(_real(path))[0]):
        raise ConfigurationError(
            f"state {str(path)!r} is an empty file: it holds no ledger yet (no run has used it)"
        )
    if create:
        check_writable(path, "a run records its work in it")
    return st.st_size > 0


def _state_stat(path: Path) -> os.stat_result | None:
    """The stat of a state file (``None``: none there); refuses (:class:`ConfigurationError`)
    one that cannot be read, a directory, and anything but a regular file."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigurationError(
            f"state {str(path)!r} cannot be read: {_unreadable(path, e)}"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigurationError.bad_value("state", str(path), "a file path, not a directory")
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st)
    return st


def check_writable(path: Path, why: str) -> None:
    """Refuse, in the words a run uses, a state that this user may not write.

    SQLite writes the file, its directory (it creates ``-wal`` and ``-shm`` beside it, beside
    the file a symlink points to) and those two files if they exist; ``why`` says who needs to
    write it (``"a run records its work in it"``).
    """
    real = _real(path)
    for name in (path, real.parent, *companions(real)):
        if name.exists() and not os.access(name, os.W_OK):
            raise ConfigurationError(
                f"state {str(path)!r} cannot be written ({str(name)!r}: {_unwritable(name)}); {why}"
            )


def _holds_sqlite(path: Path) -> bool:
    """Whether the file ``path`` itself (not a ``-wal`` beside it) is a SQLite database.

    Asked of SQLite, reading the file as ``immutable``: its ``-wal`` is not read (a leftover
    one beside a file that is not a database would make it look like one, and the first
    writable connection's close would checkpoint that WAL into it), no lock is taken, and
    SQLite closes its descriptor only once no connection of this process holds a lock on
    the file (a descriptor of our own, closed, would drop them all: see
    :func:`check_state_path`)."""
    uri = f"{path.absolute().as_uri()}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorname", "") == "SQLITE_NOTADB":
            return False
        # Damaged, say: the ledger's own open says what it is, and touches nothing.
    return True


@contextlib.contextmanager
def wal_kept(path: Path) -> Iterator[None]:
    """While a connection that refused the state closes: keep its ``-wal`` out of the file.

    The last connection of a WAL database to close checkpoints the ``-wal`` into the file and
    deletes it. One that refused the state (another application's database, a newer schema,
    damage) must leave both as they were: the ``-wal`` may not be the file's own (one left by
    another database, or beside a copy restored over the state), the file alone a sound
    ledger. A read-only connection holds SQLite's shared lock on the file meanwhile (a
    connection keeps it while the database is in WAL mode), so the closing one is not the
    last and does not checkpoint; a read-only connection never checkpoints as it closes.
    """
    wal = companions(_real(path))[0]
    guard = None
    if _has_content(wal):
        with contextlib.suppress(sqlite3.Error):
            guard = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1)
            with contextlib.suppress(sqlite3.Error):
                guard.execute("PRAGMA schema_version").fetchone()
    try:
        yield
    finally:
        if guard is not None:
            guard.close()


def foreign_wal(path: Path, app_id: int) -> bool:
    """Whether the file ``path`` alone (its ``-wal`` unread) is a database of application
    ``app_id``, though with its ``-wal`` it reads as another's: a ``-wal`` not its own."""
    if not _has_content(companions(_real(path))[0]):
        return False
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            return bool(conn.execute("PRAGMA application_id").fetchone()[0] == app_id)
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def _real(path: Path) -> Path:
    """The file SQLite opens for ``path``: symlinks resolved (its ``-wal`` goes beside it)."""
    return Path(os.path.realpath(path))


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _not_regular(path: Path, st: os.stat_result) -> ConfigurationError:
    kinds = {
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }
    kind = kinds.get(stat.S_IFMT(st.st_mode), "not a regular file")
    return ConfigurationError(
        f"state {str(path)!r} is {kind}, not a regular file: give the path of a SQLite file"
    )


def _unreadable(path: Path, error: OSError) -> str:
    """Why ``path`` cannot be read: a directory on the way this user may not enter, or its
    own permissions, else what the system said."""
    if error.errno in (errno.EACCES, errno.EPERM):
        for directory in reversed(path.absolute().parents):
            if not os.access(directory, os.X_OK):
                return f"this user may not enter directory {str(directory)!r}{_mode(directory)}"
        if not os.access(path, os.R_OK):
            return f"this user may not read it{_mode(path)}"
    return error.strerror or str(error)


def _mode(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return ""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f" (mode {stat.filemode(st.st_mode)}, owner {owner})"


def companions(path: Path) -> tuple[Path, Path]:
    """The ``-wal`` and ``-shm`` files SQLite keeps beside a WAL database."""
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _read_only_fs(path: Path) -> bool:
    """Whether ``path`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be written: a read-only file system, or its permissions."""
    if _read_only_fs(path):
        return "it is on a read-only file system"
    try:
        return f"this user may not write it (mode {stat.filemode(path.stat().st_mode)})"
    except OSError as e:  # (gone meanwhile, or a symlink to nothing)
        return e.strerror or str(e)


def read_only_view(path: Path) -> str | None:
    """For a reader that cannot write beside the state: the URI to read it without writing.

    SQLite would otherwise create ``-wal``/``-shm`` files with this reader's permissions (or
    fail to), and a later run could not use them. With no ``-wal`` content there is nothing
    outside the main file, so it is read as ``immutable``; otherwise the reader is refused.
    Returns ``None`` when the reader may open the state normally.
    """
    real = _real(path)
    wal, shm = companions(real)
    writable = os.access(path, os.W_OK) and os.access(real.parent, os.W_OK | os.X_OK)
    if writable and all(not p.exists() or os.access(p, os.W_OK) for p in (wal, shm)):
        return None
    if wal.exists() and wal.stat().st_size > 0:
        if _read_only_fs(real.parent) and shm.exists():
            # Nothing can be written there, by this reader or any other process: SQLite reads
            # the -wal through its -shm without writing either (and creates nothing).
            return f"{path.absolute().as_uri()}?mode=ro"
        if _read_only_fs(real.parent):  # and no -shm: SQLite would have to make one
            advice = "mount it read-write, or copy the state with its -wal file elsewhere"
        else:
            advice = "run the command as the state's owner"
        raise ConfigurationError(
            f"state {str(path)!r} has commits in its -wal file that this user cannot read "
            f"without writing beside it ({_unwritable(path if not writable else wal)}); " + advice
        )
    return f"{path.absolute().as_uri()}?mode=ro&immutable=1"


def open_error(path: Path, error: sqlite3.Error) -> LedgerError | ConfigurationError:
    """What an error while first reading the state means, in words (nothing was changed)."""
    name = str(path)
    code = getattr(error, "sqlite_errorname", "")
    if code == "SQLITE_NOTADB":
        return NotALedgerError(f"state {name!r} is not a SQLite database; it was not touched")
    if code.startswith("SQLITE_CORRUPT"):
        return damaged(path, str(error), modified=False)
    if code.startswith("SQLITE_IOERR") and _no_room(path):
        # (SQLite sizes the -shm file as it opens a WAL database: SQLITE_IOERR_SHMSIZE.)
        return LedgerError(
            f"state {name!r}: no space left on its file system for the files SQLite keeps "
            f"beside it ({code}); free some and run the command again (the state was not "
            "modified)"
        )
    if code.startswith("SQLITE_IOERR"):
        return LedgerError(
            f"state {name!r}: disk I/O error while reading it ({code}); if its -wal file was "
            "deleted while its -shm file stayed, stop its runners and remove the -shm file too "
            "(the commits in the lost -wal are gone: their files will be handled again); see "
            "'asyncbatch help troubleshooting'"
        )
    if code.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")):
        return ConfigurationError(
            f"state {name!r} cannot be opened for writing ({error}): {_unwritable(path)}"
        )
    return LedgerError(f"state {name!r}: {error}")


#: Less free space than this on the state's file system: an I/O error opening it is that.
_ROOM = 1 << 20


def _no_room(path: Path) -> bool:
    """Whether the file system of the state ``path`` is (all but) full."""
    try:
        st = os.statvfs(_real(path).parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _ROOM


def is_damage(error: sqlite3.Error) -> bool:
    """Whether ``error`` says the database file is damaged (``SQLITE_CORRUPT``, or no longer
    has a database header: ``SQLITE_NOTADB`` once it was opened)."""
    code = getattr(error, "sqlite_errorname", "")
    return code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def damaged(path: Path, detail: str, *, modified: bool) -> DamagedLedgerError:
    """The one line for a damaged SQLite state: what SQLite found, whether this process
    wrote to it, and what to do (retrying cannot help: the CLI exits 2)."""
    name = str(path)
    detail = " ".join(detail.split())
    if len(detail) > 160:
        detail = detail[:157] + "..."
    if modified:
        what = "found while this process was using it: it stopped writing to it at once"
    else:
        what = "it was not modified"
    return DamagedLedgerError(
        f"state {name!r} is a damaged SQLite database ({detail}); {what}. Retrying cannot "
        "help: restore it from a backup, or recover what SQLite can still read into a new "
        f"file (sqlite3 {shlex.quote(name)} .recover | sqlite3 NEW.db; see 'asyncbatch help "
        "troubleshooting')"
    )
