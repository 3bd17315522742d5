"""Effects on files that can be interrupted at any instant and simply done again.

- :func:`atomic_write`: temp file in the target's directory, write, ``fsync``, ``os.replace``,
  ``fsync`` the directory. A reader sees the old file or the new one, never a part.
- :func:`idempotent_move`: never ``shutil.move``. Same filesystem: ``os.link`` (which refuses to
  replace an existing file) then ``unlink`` of the source; across filesystems: copy to a temp
  file beside the destination, ``fsync``, link into place, ``fsync`` the directory, then unlink
  the source. Whatever step an interruption hits, calling it again finishes the move.

Temp files are named ``.asyncbatch-tmp-<pid>-<start>-<random>-<name>``: hidden (the scanner
never picks them up) and traceable to their writer, so :func:`remove_stale_temp_files` removes
only those whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio.to_thread

from .. import _failpoints as failpoints
from .._exceptions import EffectError
from .._procinfo import ProcessIdentity, holder_is_dead, this_process

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "fsync_dir",
    "idempotent_move",
    "make_parents_under",
    "remove_stale_temp_files",
    "same_content",
    "write_under",
]

TEMP_PREFIX = ".asyncbatch-tmp-"
_COPY_BLOCK = 1 << 20


def _host_tag(host: str) -> str:
    """Eight hex digits naming ``host`` in temp names (see :func:`_temp_owner`)."""
    return hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _temp_name(target: Path, me: ProcessIdentity) -> Path:
    """A hidden temp name beside ``target``, at most 200 bytes long (a name may have 255
    bytes, as many as 127 characters of two bytes each: the cut is made in bytes):
    ``.asyncbatch-tmp-PID-START-hHOSTTAG.RANDOM-NAME``. The writer's host is in it because an
    output directory may be shared by runners on several hosts, whose pids mean nothing here."""
    start = (me.pid_start or "0").rpartition(":")[2]
    stem = f"{TEMP_PREFIX}{me.pid}-{start}-h{_host_tag(me.host)}.{secrets.token_hex(4)}-"
    tail = os.fsencode(target.name)[: 200 - len(stem)]
    return target.with_name(stem + os.fsdecode(tail))


def fsync_dir(directory: Path) -> None:
    """``fsync`` a directory: the entries made or removed in it are on disk once it returns."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, fill: Callable[[int], None], mode: int = 0o666) -> None:
    """Create ``path`` (must not exist), let ``fill`` write it, ``fsync`` it; unlink on error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _write_all(data: bytes) -> Callable[[int], None]:
    def fill(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return fill


def _atomic_write(path: Path, data: bytes, make_parents: bool) -> None:
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace_at(fd, path.name, data, shown=str(path))
    finally:
        os.close(fd)


def _no_fence() -> None:
    pass


#: A check called just before an effect becomes visible; it raises to stop the effect (the
#: context's lease check: :class:`~asyncbatch.LockLostError` once the lease may be lost).
Fence = Callable[[], None]


def _replace_at(
    dir_fd: int, name: str, data: bytes, fence: Fence = _no_fence, *, shown: str | None = None
) -> None:
    """Atomically replace ``name`` in the open directory ``dir_fd`` with ``data``.

    ``fence()`` is called just before the rename that makes the new content visible (in this
    thread: no event-loop turn in between); if it raises, nothing is replaced. An ``OSError``
    names the file written (``shown``, else ``name``), not the hidden temp file it went
    through (a full disk said ``'.asyncbatch-tmp-...'``, or named no file at all).
    """
    tmp = _temp_name(Path(name), this_process()).name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)
    except OSError as exc:  # (never unlinked here: O_EXCL, it may be another's)
        _name_output(exc, tmp, shown or name)
        raise
    try:
        _write_all(data)(fd)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        failpoints.hit("output-temp-written")
        fence()
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            _name_output(exc, tmp, shown or name)
        raise
    failpoints.hit("output-replaced")
    failpoints.hit("before-dir-fsync")
    os.fsync(dir_fd)


def _name_output(exc: OSError, tmp: str, shown: str) -> None:
    """Have ``exc`` name the output ``shown`` where it named the temp file ``tmp`` (or no file:
    ``os.write`` on a full disk), so that its message says which output failed."""
    if exc.filename in (tmp, None):
        exc.filename, exc.filename2 = shown, None


def _open_subdir(dir_fd: int, name: str, *, shown: str) -> int:
    """Open (making it if missing) the directory ``name`` inside ``dir_fd``; never a symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)
        return _open_subdir(dir_fd, name, shown=shown)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise EffectError(
                f"{shown}: {name!r} in its path is a symbolic link or not a directory; "
                "asyncbatch writes only inside the directory it was given"
            ) from None
        raise


def _open_parent_under(root: Path, relpath: Path, *, shown: str) -> int:
    """Open (making what is missing) the directory of ``root/relpath``, following no symlink
    below ``root``; the caller closes it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in relpath.parts[:-1]:
            inner = _open_subdir(fd, part, shown=shown)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_under(root: Path, relpath: Path, data: bytes, fence: Fence = _no_fence) -> None:
    """Write ``root/relpath`` atomically, following no symlink below ``root``."""
    fence()
    fd = _open_parent_under(root, relpath, shown=f"cannot write {str(relpath)!r}")
    try:
        _replace_at(fd, relpath.name, data, fence, shown=str(root / relpath))
    finally:
        os.close(fd)


def make_parents_under(root: Path, relpath: Path) -> None:
    """Make the missing directories of ``root/relpath`` (for an archive move), following no
    symbolic link below ``root``: raises :class:`EffectError` if one is in the way (a move
    never leaves the archive it was given)."""
    os.close(_open_parent_under(root, relpath, shown=f"cannot move into {str(root / relpath)!r}"))


async def write_under(
    root: Path, relpath: Path, data: bytes | str, *, fence: Fence = _no_fence
) -> None:
    """:func:`atomic_write` of ``root / relpath``, missing directories made, never leaving
    ``root``: no component below it may be a symbolic link (:class:`EffectError`).

    ``relpath`` must be relative, without ``..`` (the caller checks). ``fence()`` is called in
    the writing thread before anything is written and again just before the rename; if it
    raises, the target is left as it was.
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    await anyio.to_thread.run_sync(_write_under, root, relpath, payload, fence)


async def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, make_parents: bool = False
) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) all at once.

    Guarantees: a concurrent reader sees the previous content or ``data``, never a part; after
    it returns, the content and the directory entry are on disk (``fsync``). If interrupted,
    ``path`` is unchanged and at most a hidden temp file is left, which
    :func:`remove_stale_temp_files` (run by every batch on its output directory) removes.
    Raises ``OSError`` when the directory is missing or not writable.
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    await anyio.to_thread.run_sync(_atomic_write, Path(path), payload, make_parents)


def same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (sizes first, then block by block)."""
    if os.stat(a).st_size != os.stat(b).st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block_a, block_b = fa.read(_COPY_BLOCK), fb.read(_COPY_BLOCK)
            if block_a != block_b:
                return False
            if not block_a:
                return True


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _unlink_source(src: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src)
    fsync_dir(src.parent)


def _copy_across(src: Path, dst: Path, fence: Fence = _no_fence) -> None:
    tmp = _temp_name(dst, this_process())
    st = os.stat(src)

    def fill(fd: int) -> None:
        half = st.st_size // 2
        written = 0
        with open(src, "rb") as f:
            while block := f.read(_COPY_BLOCK):
                _write_all(block)(fd)
                if written <= half < written + len(block):
                    failpoints.hit("mid-copy")
                written += len(block)

    _write_new(tmp, fill, stat.S_IMODE(st.st_mode))
    try:
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        fence()
        os.link(tmp, dst)  # refuses to replace a file that appeared meanwhile
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(dst.parent)


def _same_entry(src: Path, dst: Path) -> bool:
    """Whether two paths name the same directory entry (not merely the same inode)."""
    if src.name != dst.name:
        return False
    try:
        a, b = os.stat(src.parent), os.stat(dst.parent)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _move(src: Path, dst: Path, fence: Fence = _no_fence) -> bool:
    fence()
    if _moved_before(src, dst):
        return False
    try:
        os.link(src, dst)
    except FileExistsError:
        return _move(src, dst, fence)  # appeared meanwhile: decide again
    except OSError as e:
        if e.errno == errno.EXDEV:
            _copy_across(src, dst, fence)
        elif e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            _rename_into(src, dst)  # no hard links here; dst was checked absent just above
            return True
        else:
            raise
    else:
        fsync_dir(dst.parent)
    failpoints.hit("before-source-unlink")
    _unlink_source(src)
    return True


def _moved_before(src: Path, dst: Path) -> bool:
    """Whether an earlier move of ``src`` to ``dst`` got through (finishing it: a source left
    beside its copy is removed). Raises ``FileNotFoundError`` when neither is there, and
    :class:`EffectError` when ``dst`` holds a different file."""
    if _same_entry(src, dst):
        if _lstat(src) is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(src))
        return True  # already where it should be
    s = _lstat(src)
    d = _lstat(dst)
    if s is None:
        if d is not None:
            return True  # done before: the source is gone and the destination is there
        raise FileNotFoundError(errno.ENOENT, "neither source nor destination exists", str(src))
    if d is None:
        return False
    if (d.st_dev, d.st_ino) == (s.st_dev, s.st_ino) or same_content(src, dst):
        _unlink_source(src)  # interrupted after the link or the copy: finish
        return True
    raise EffectError(
        f"cannot move {str(src)!r} to {str(dst)!r}: a different file is already there"
    )


def _rename_into(src: Path, dst: Path) -> None:
    """``os.replace`` ``src`` to ``dst`` (checked absent), durably: both directories synced."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


async def idempotent_move(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, fence: Fence = _no_fence
) -> bool:
    """Move ``src`` to ``dst`` so that repeating the call after any interruption finishes it.

    Returns ``True`` when this call moved the file, ``False`` when it found the move already
    done (``src`` gone and ``dst`` present, or both present with the same inode or content, in
    which case ``src`` is removed). Raises :class:`EffectError` when ``dst`` holds a different
    file (never overwritten) and ``FileNotFoundError`` when neither exists. The destination's
    directory must exist. ``fence()`` is called in the moving thread before the move starts
    and, across filesystems, again before the copy is linked into place; if it raises, the
    source stays where it is.
    """
    return await anyio.to_thread.run_sync(_move, Path(src), Path(dst), fence)


def _temp_owner(name: str, me: ProcessIdentity) -> ProcessIdentity | None:
    """The writer of a temp file, as far as this process can judge it: ``None`` when the name
    is not one of ours (then the file is stale); a writer on another host is returned with
    that host's tag for a host, so that it is never judged dead here."""
    parts = name[len(TEMP_PREFIX) :].split("-", 2)
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    rest = parts[2]
    if rest.startswith("h") and rest[9:10] == "." and rest[1:9] != _host_tag(me.host):
        return ProcessIdentity(f"tag:{rest[1:9]}", int(parts[0]), None)
    start = None if parts[1] == "0" or me.pid_start is None else me.pid_start
    if start is not None:
        start = f"{start.rpartition(':')[0]}:{parts[1]}"
    return ProcessIdentity(me.host, int(parts[0]), start)


def _iter_temp_files(directory: Path, recursive: bool) -> Iterator[Path]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for de in entries:
        if de.name.startswith(TEMP_PREFIX) and de.is_file(follow_symlinks=False):
            yield Path(de.path)
        elif recursive and de.is_dir(follow_symlinks=False):
            yield from _iter_temp_files(Path(de.path), recursive)


#: Seconds after which a run removes a temp file whose writer it cannot check (another host,
#: or another pid namespace: a container started again has a new one), unless the file was
#: written to meanwhile: a day. A writer of a run that stalls that long has lost its lease, and
#: its output's rename is refused anyway (the lease is checked just before it).
ABANDONED_AFTER = 24 * 3600.0


def _remove_stale(directory: Path, recursive: bool, older_than: float | None) -> int:
    me = this_process()
    removed = 0
    before = None if older_than is None else time.time() - older_than
    for path in _iter_temp_files(directory, recursive):
        owner = _temp_owner(path.name, me)
        if owner is not None and not holder_is_dead(owner, me=me):
            if before is None or owner.host == me.host:
                continue  # alive, or on another host: kept (unless abandoned)
            try:
                if os.lstat(path).st_mtime >= before:
                    continue
            except FileNotFoundError:
                continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


async def remove_stale_temp_files(
    directory: str | os.PathLike[str], *, recursive: bool = True, older_than: float | None = None
) -> int:
    """Remove temp files left in ``directory`` by writers that are no longer running.

    Temp files of live processes (another runner writing right now) are left alone, and so
    are those written on another host (or in another pid namespace), whose writers cannot be
    checked from here: the next run on that host removes them. With ``older_than`` (seconds),
    those are removed too once nothing has written to them for that long (a container whose
    runner was killed while it wrote starts again with another host name or pid namespace:
    no run is ever on "that host" again). Returns how many were removed. Raises
    ``ValueError`` for a negative ``older_than``.
    """
    if older_than is not None and not older_than >= 0:
        raise ValueError(f"older_than must be seconds >= 0, not {older_than!r}")
    return await anyio.to_thread.run_sync(_remove_stale, Path(directory), recursive, older_than)
