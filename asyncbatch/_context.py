"""The per-item context handed to a handler: everything item-scoped lives here and nowhere else."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.to_thread

from . import _failpoints as failpoints
from ._effects.files import Fence, idempotent_move, write_under
from ._exceptions import ConfigurationError, InputChangedError, LockLostError
from ._scanner import Entry
from ._sources.url import ObjectURL

if TYPE_CHECKING:
    from ._sources.objects import ObjectInput, ObjectReader
    from ._sources.store import ObjectStores

if TYPE_CHECKING:
    from aiofiles.base import AiofilesContextManager
    from aiofiles.threadpool.binary import AsyncBufferedReader

    from ._http.client import ItemHTTP

__all__ = [
    "INLINE_READ_MAX",
    "ContextHooks",
    "InputFile",
    "ItemLogger",
    "StopCallback",
    "TaskContext",
]

#: What ``ctx.on_stop`` calls: with the number of the signal that asked the run to stop
#: (``signal.SIGINT``, ``signal.SIGTERM``), or ``None`` when ``Batch.stop()`` did.
StopCallback = Callable[[int | None], object]

_T = TypeVar("_T")

#: How many times an effect whose local lease deadline passed while it was under way (after
#: the check before it began) is done again once the ledger renewed the lease; past that, it
#: is refused (:class:`LockLostError`). The deadline passes only while the event loop is held
#: up (the heartbeat renews it otherwise): an effect caught by it time after time is refused
#: rather than tried for ever.
_RENEWALS = 3


class _LeaseLapsed(LockLostError):
    """Raised by an effect's fence when the item's local lease deadline passed while the
    effect was under way: nothing was made visible, and the effect is done again once the
    ledger renewed the lease (see :meth:`TaskContext._fenced`); never reaches a handler."""


#: Inputs up to this size are read on the event loop thread by ``ctx.read_bytes()``: from the
#: page cache 256 KiB take ~8 us inline against ~90 us through a thread hop, and no read
#: stalls the loop much longer; larger ones go to a thread (benchmarks/RESULTS.md, "Reading
#: an input: inline or in a thread").
INLINE_READ_MAX = 256 * 1024


class ItemLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger adapter whose records carry the item's ``job``, ``key`` and ``input_hash``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


@dataclass(slots=True)
class InputFile:
    """The input file opened for this item (closed by the runner after the handler), with
    what its ``fstat`` said when it was opened.

    A write to the file changes its ctime, even when the writer sets its size and mtime back
    (a copier that preallocates the file and keeps the source's times): comparing the ctime
    too tells that the bytes read may not be the bytes that were scanned.
    """

    fd: int
    size: int
    mtime_ns: int = 0
    ctime_ns: int = 0
    #: Set once ``ctx.move()`` moved the input: a rename sets the ctime, which is then no
    #: sign of a write.
    moved: bool = False

    def close(self) -> None:
        """Close the file (once): its attempt ended. A context kept past its handler (a task
        the handler left running) then gets a clear error from ``read_bytes`` and ``open``,
        never the bytes of whatever file took the descriptor's number next."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def descriptor(self) -> int:
        """The open file's descriptor; ``RuntimeError`` once its attempt ended."""
        if self.fd < 0:
            raise RuntimeError(
                "this TaskContext's attempt is over (its handler returned, or it was "
                "stopped): its input is closed; read the input inside the handler"
            )
        return self.fd

    @classmethod
    def opened(cls, fd: int, st: os.stat_result) -> InputFile:
        """The input opened as ``fd``, whose ``fstat`` is ``st``."""
        return cls(fd, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def changed(self, taken_away: Callable[[os.stat_result], bool] | None = None) -> str | None:
        """Why the file is not as it was when it was opened (written to, truncated, grown),
        or ``None`` if its size, mtime and ctime are the same (one ``fstat``).

        ``taken_away(st)``, asked only when nothing but the ctime changed (``st``: the
        file's ``fstat`` now), says whether the file was renamed or removed from where it
        was opened: a rename or an unlink sets the ctime too (a command's ``mv {} dest/``,
        ``gzip {}``), and is then no sign of a write."""
        st = os.fstat(self.fd)
        if st.st_size != self.size:
            return f"its size went from {self.size} to {st.st_size} bytes"
        if st.st_mtime_ns != self.mtime_ns:
            return "its mtime changed"
        if (
            st.st_ctime_ns != self.ctime_ns
            and not self.moved
            and (taken_away is None or not taken_away(st))
        ):
            return "its ctime changed (written to in place, or its mode or owner changed)"
        return None


def _unlinked(st: os.stat_result) -> bool:
    """Whether no name leads to the file any more (removed, or renamed over): its ctime changed
    for that, not for a write."""
    return st.st_nlink == 0


#: The most one ``pread`` hands back on Linux (0x7ffff000): a larger file takes several reads.
_MAX_READ = 0x7FFFF000


def _read_all(fd: int, size: int) -> bytes:
    """Read a whole file of ``size`` bytes (its ``fstat`` when opened) from its fd.

    One ``pread`` for a file of up to 2 GiB; larger ones are read until ``size`` bytes or end of
    file, since one ``pread`` returns at most :data:`_MAX_READ` bytes. Raises
    :class:`InputChangedError` when the file did not hold exactly ``size`` bytes while it was
    read (it was truncated or grew): the attempt fails rather than handling a part.
    """
    data = os.pread(fd, size + 1, 0)
    if len(data) != size and len(data) == min(size + 1, _MAX_READ):
        chunks, offset = [data], len(data)  # a file over 2 GiB: read on, up to one byte past
        while offset <= size and (chunk := os.pread(fd, min(size + 1 - offset, _MAX_READ), offset)):
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
    if len(data) != size:
        raise InputChangedError(
            f"the input changed size while it was read: {size} bytes when opened, "
            f"{'more' if len(data) > size else len(data)} read"
        )
    return data


class ContextHooks(Protocol):
    """What a context needs from the run that made it (implemented by the runner)."""

    handler_logger: logging.Logger

    @property
    def objects(self) -> ObjectStores | None:
        """The run's object-store clients (``None`` when it uses no ``s3://`` location)."""
        ...

    def http_for(self, key: str) -> ItemHTTP:
        """A fresh HTTP view for one attempt of the item ``key``."""
        ...

    async def record_move(self, ctx: TaskContext, destination: str, origin: str | None) -> bool:
        """Record, under the item's lease, where its input is being moved, and from where
        (``origin``: where an earlier move put it; ``None``: the source) (``False``: the lease
        is lost); raise :class:`EffectError` for a destination the scan would pick up."""
        ...

    def lease_lost(self, ctx: TaskContext) -> bool:
        """Whether the item's lease may be another runner's by now: its local deadline (a
        monotonic clock, which runs on while the process is suspended) has passed, or the item
        is no longer this runner's."""
        ...

    async def lease_renewed(self, ctx: TaskContext) -> bool:
        """Once :meth:`lease_lost` said so: ask the ledger (a heartbeat, awaited for a bounded
        time) whether the lease is still this runner's; ``True`` once it was renewed (the same
        fence, not taken over), ``False`` when it was taken over or no renewal came in time."""
        ...

    def idempotency_key(self, key: str, call: str) -> str:
        """The ``Idempotency-Key`` of the call named ``call`` of the item ``key``."""
        ...

    def on_stop(self, callback: StopCallback) -> Callable[[], None]:
        """Call ``callback`` once when the run is asked to stop (at once if it was already);
        return what unregisters it."""
        ...


class _OnStop:
    """The context manager of :meth:`TaskContext.on_stop`: registered on entry, unregistered
    on exit."""

    __slots__ = ("_callback", "_hooks", "_unregister")

    def __init__(self, hooks: ContextHooks | None, callback: StopCallback) -> None:
        self._hooks = hooks
        self._callback = callback
        self._unregister: Callable[[], None] | None = None

    def __enter__(self) -> None:
        if self._hooks is not None:
            self._unregister = self._hooks.on_stop(self._callback)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None


class TaskContext:
    """What a handler gets for one item; built fresh for every attempt, shared with nothing.

    Attributes (read-only): ``entry`` (the file as scanned), ``key`` (its ledger identity),
    ``input_hash`` (sha256 over its identity: log this, never the content), ``attempt``
    (1 for the first), ``job``, ``fence`` (the lease's fencing token), ``log`` (records carry
    job, key and input_hash), ``data`` (a dict for the handler's own use, this item's only),
    and ``http`` (an ``httpx.AsyncClient``-like view that adds ``Idempotency-Key`` headers).
    ``log``, ``http`` and ``data`` are made on first use.
    """

    # Private slots behind read-only properties: plain stores in __init__ (a __setattr__ that
    # refuses, with object.__setattr__ to get past it, cost ~2 us per item; these ~0.3 us).
    __slots__ = (
        "_attempt",
        "_data",
        "_entry",
        "_fence",
        "_hooks",
        "_http",
        "_input",
        "_input_hash",
        "_job",
        "_key",
        "_log",
        "_output_dir",
    )

    def __init__(
        self,
        *,
        entry: Entry,
        key: str,
        input_hash: str,
        attempt: int,
        job: str,
        fence: int,
        output_dir: Path | ObjectURL | None = None,
        hooks: ContextHooks | None = None,
        input_file: InputFile | ObjectInput | None = None,
    ) -> None:
        self._entry = entry
        self._key = key
        self._input_hash = input_hash
        self._attempt = attempt
        self._job = job
        self._fence = fence
        self._output_dir = output_dir
        self._hooks = hooks
        self._input = input_file
        self._log: ItemLogger | None = None
        self._http: ItemHTTP | None = None
        self._data: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"TaskContext(key={self._key!r}, attempt={self._attempt}, job={self._job!r})"

    @property
    def entry(self) -> Entry:
        """The file as the scan saw it (relpath, size, mtime_ns, inode, path)."""
        return self._entry

    @property
    def key(self) -> str:
        """The item's identity in the ledger."""
        return self._key

    @property
    def input_hash(self) -> str:
        """The sha256 (hex) over the item's identity: log this, never the content."""
        return self._input_hash

    @property
    def attempt(self) -> int:
        """This attempt's number: 1 for the first."""
        return self._attempt

    @property
    def job(self) -> str:
        """The job the item belongs to."""
        return self._job

    @property
    def fence(self) -> int:
        """The fencing token of this attempt's lease (it grows with every new lease)."""
        return self._fence

    @property
    def output_dir(self) -> Path | ObjectURL | None:
        """The batch's ``output_dir`` (where :meth:`write_output` writes), if it has one: a
        directory, or an ``s3://`` prefix."""
        return self._output_dir

    @property
    def log(self) -> ItemLogger:
        """A logger adapter whose records carry this item's job, key and input_hash."""
        if self._log is None:
            logger = (
                self._hooks.handler_logger
                if self._hooks is not None
                else logging.getLogger("asyncbatch.handler")
            )
            extra = {"job": self.job, "key": self.key, "input_hash": self.input_hash}
            self._log = ItemLogger(logger, extra)
        return self._log

    @property
    def http(self) -> ItemHTTP:
        """This attempt's HTTP view (``Idempotency-Key`` on unsafe calls, retries)."""
        if self._http is None:
            if self._hooks is None:
                raise RuntimeError("this TaskContext was not made by a Batch: no ctx.http")
            self._http = self._hooks.http_for(self._key)
        return self._http

    def idempotency_key(self, call: str) -> str:
        """The ``Idempotency-Key`` that ``ctx.http`` sends for a call named ``call``
        (``idempotency_key=call``): 64 hex characters, the same in every attempt of this item
        (in any process: it is derived from a secret kept in the ledger, the job, the item's
        key and ``call``), different for every other item or ``call``.

        For a client other than ``ctx.http`` (another HTTP library, an SDK with a request-id
        parameter), or to hand to a program. Raises ``RuntimeError`` for a context not made
        by a :class:`~asyncbatch.Batch` (there is no ledger secret to derive it from).
        """
        if self._hooks is None:
            raise RuntimeError("this TaskContext was not made by a Batch: no idempotency key")
        return self._hooks.idempotency_key(self._key, call)

    def on_stop(self, callback: StopCallback) -> _OnStop:
        """A context manager: while its block runs, ``callback(signum)`` is called (once, on
        the event loop's thread) if the run is asked to stop, or at entry if it already was.

        ``signum`` is the signal that asked (``signal.SIGINT``, ``signal.SIGTERM``: with
        ``handle_signals=True``, as the CLI runs), or ``None`` for ``Batch.stop()``. The run
        then gives the handlers in flight ``grace`` seconds before it cancels them; a handler
        that cannot finish its item sooner may give it back at once by raising
        :class:`~asyncbatch.AttemptInterrupted`. The callback must not block; what it raises
        is logged and ignored. ``ExecHandler`` forwards the signal to its command this way.
        For a context not made by a ``Batch``, nothing ever calls it.
        """
        return _OnStop(self._hooks, callback)

    @property
    def data(self) -> dict[str, Any]:
        """A dict for the handler's own values, private to this item's attempt."""
        if self._data is None:
            self._data = {}
        return self._data

    async def read_bytes(self) -> bytes:
        """The input's content, read from the file opened safely for this item.

        Small inputs are read inline (cheaper than a thread hop), large ones in a worker thread.
        Raises ``OSError`` when the file cannot be read, and :class:`InputChangedError` when
        it changed while it was read (its size, mtime or ctime differ from the open's): the
        attempt fails rather than handle bytes that were being written. An object is the
        version that was claimed (a replaced one: :class:`InputChangedError`). Raises
        ``RuntimeError`` once the attempt is over (the input is closed when the handler
        returns: a task it left running cannot read it).
        """
        source = self._input
        if source is None:
            return await anyio.Path(self.entry.path).read_bytes()
        if not isinstance(source, InputFile):
            return await source.read_all()
        fd = source.descriptor()
        if source.size <= INLINE_READ_MAX:
            data = _read_all(fd, source.size)
        else:
            data = await anyio.to_thread.run_sync(_read_all, fd, source.size)
        # A file removed (or renamed over) meanwhile was not written to: its bytes are read.
        if (why := source.changed(_unlinked)) is not None:
            raise InputChangedError(f"the input changed while it was read: {why}")
        return data

    def open(self) -> AiofilesContextManager[AsyncBufferedReader] | _ObjectOpening:
        """Open the input for streaming reads (``async with ctx.open() as f``), via aiofiles.

        The file is the one opened when the item started (no symlink followed, never a FIFO),
        positioned at its start. If the file is written to while the handler runs (its size,
        mtime or ctime change), the attempt fails once the handler returns, with
        :class:`InputChangedError`, and is retried. An object streams in with bounded memory
        (``await f.read(n)``, ``await f.readline()``, ``async for line in f``), the version
        that was claimed. Raises ``RuntimeError`` once the attempt is over, as
        :meth:`read_bytes` does.
        """
        import aiofiles  # here, not at import time: it costs ~50 ms to import

        if self._input is not None and not isinstance(self._input, InputFile):
            return _ObjectOpening(self._input)
        if self._input is None:
            return aiofiles.open(self.entry.path, "rb")
        fd = os.dup(self._input.descriptor())
        os.lseek(fd, 0, os.SEEK_SET)
        return aiofiles.open(fd, "rb", closefd=True)

    async def write_output(self, relpath: str | os.PathLike[str], data: bytes | str) -> Path | str:
        """Atomically write ``data`` to ``relpath`` under the batch's ``output_dir``.

        Readers see the old file or the new one, never a part. Missing directories are made;
        no symbolic link below ``output_dir`` is followed. Returns the path written (for an
        ``s3://`` output, the object's URL: one ``PUT``, the lease checked just before it).
        Raises
        :class:`ConfigurationError` without an ``output_dir`` (the run stops: no item can
        succeed) or for an absolute path or one with ``..``, :class:`EffectError` when a
        directory in the path is a symbolic link (or not a directory), and
        :class:`LockLostError` (nothing written) when the item's lease was taken over: a
        runner that was suspended or blocked past its lease does not overwrite the result of
        the runner that took the item over. Once the lease's local deadline has passed, the
        ledger is asked first (a heartbeat, awaited a bounded time): the write goes ahead if
        the lease was renewed (nobody took it over), and is refused when it was taken over or
        no renewal came in time. ``RuntimeError`` once the attempt is over (a context kept
        past its handler).
        """
        if self.output_dir is None:
            raise ConfigurationError(
                "ctx.write_output needs an output directory: --output-dir DIR "
                "(Batch(output_dir=...))"
            )
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ConfigurationError.bad_value(
                "write_output relpath", str(relpath), "a relative path inside output_dir"
            )
        root = self.output_dir
        if isinstance(root, ObjectURL):
            return await self._fenced(
                "the output was not written", lambda fence: self._put_output(root, rel, data, fence)
            )
        await self._fenced(
            "the output was not written",
            lambda fence: write_under(root, rel, data, fence=fence),
        )
        return root / rel

    async def _put_output(self, root: ObjectURL, rel: Path, data: bytes | str, fence: Fence) -> str:
        """:meth:`write_output` under an ``s3://`` prefix: one fenced ``PUT``."""
        from ._sources.effects import put_object

        stores = self._hooks.objects if self._hooks is not None else None
        if stores is None:
            raise ConfigurationError("ctx.write_output to s3:// needs a context made by a Batch")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        return await put_object(stores, root, rel.as_posix(), payload, fence)

    async def move(self, destination: str | os.PathLike[str]) -> Path:
        """Move the input to ``destination`` (an existing directory, or a file path), repeatably.

        The destination is recorded in the ledger (under this item's lease) before the move, so
        if the run dies before the item's completion commits, the retry finds the input where
        it went (``ctx.entry.path`` is then the destination) instead of calling it vanished.
        Prefer ``on_done="move:DIR"``, which moves only after the completion committed.
        The destination is the handler's to choose (any directory, as with ``shutil.move``),
        but never one the scan would pick up again (the source directory itself, or a part of
        it the scan lists): the moved file would be a new input. Raises :class:`EffectError`
        for such a destination, or if a different file is already at the destination, and
        :class:`LockLostError` (nothing moved) if another runner has taken the item's lease
        over, or its local deadline passed and the ledger did not renew it in time (asked
        first, as for :meth:`write_output`); ``RuntimeError`` once the attempt is over. Once moved,
        ``ctx.entry.path`` is the destination (a second move takes the input on from there:
        the ledger then keeps where the input is as well as where it goes, so a retry after a
        crash at any point of the chain finds it wherever it got to).
        """
        dst = Path(destination)
        if dst.is_dir():
            dst = dst / self.entry.path.name
        dst = dst.absolute()
        await self._hold_lease("the input stays put")
        # Where the input is now, when an earlier move (of this attempt, or of one a crash cut
        # short) took it out of the source: recorded with the destination, since until the
        # rename below is done the input is still there.
        origin = str(self.entry.path) if self._entry._moved else None
        if self._hooks is not None and not await self._hooks.record_move(self, str(dst), origin):
            raise LockLostError(f"item {self.key}: its lease was taken over; the input stays put")
        await failpoints.ahit("move-recorded")
        if isinstance(self._input, InputFile):
            self._input.moved = True  # before the rename: it sets the ctime
        src = self.entry.path
        await self._fenced(
            "the input stays put", lambda fence: idempotent_move(src, dst, fence=fence)
        )
        # The input is there now (as the ledger has it): a second move takes it on from there.
        self._entry = self._entry.moved_to(dst)
        return dst

    async def _fenced(self, consequence: str, effect: Callable[[Fence], Awaitable[_T]]) -> _T:
        """Run ``effect(fence)`` under this item's lease (see :meth:`_hold_lease`).

        ``fence`` is the check the effect makes in its own thread (or just before its
        ``PUT``) right before it becomes visible: if the local deadline passed meanwhile (the
        runner was suspended, or its event loop blocked, while it wrote), it raises, nothing
        is made visible, and the effect is done again from the start once the ledger renewed
        the lease (an effect is repeatable: a temp file removed, a move finished or begun
        again), up to :data:`_RENEWALS` times; :class:`LockLostError` when the lease was
        taken over or not renewed in time (nothing made visible)."""
        await self._hold_lease(consequence)
        fence, lapses = self._fence_check(consequence), 0
        while True:
            try:
                return await effect(fence)
            except _LeaseLapsed:
                lapses += 1
                if lapses > _RENEWALS:
                    raise LockLostError(
                        f"item {self.key}: its local lease deadline passed {lapses} times while "
                        "the effect was under way (was this runner suspended, or its event loop "
                        f"blocked, again and again?); {consequence}"
                    ) from None
                await self._hold_lease(consequence)

    def _fence_check(self, consequence: str) -> Fence:
        """The check an effect makes just before it becomes visible: raises
        :class:`_LeaseLapsed` once the item's local lease deadline passed, or it is no longer
        this runner's."""

        def fence() -> None:
            if self._hooks is not None and self._hooks.lease_lost(self):
                raise _LeaseLapsed(self._lost(consequence))

        return fence

    async def _hold_lease(self, consequence: str) -> None:
        """Make sure this item's lease is still this runner's before an effect starts: the
        fence of effects. Checked in this process's monotonic clock; once its local deadline
        has passed (the runner was suspended, or its event loop blocked, and its heartbeat did
        not run), the ledger is asked (a heartbeat, awaited for a bounded time, as the
        watchdog does): the effect goes ahead only if the lease was renewed and is still this
        attempt's; :class:`LockLostError` (nothing done) when another runner took it over or
        no renewal came in time."""
        if isinstance(self._input, InputFile):
            self._input.descriptor()  # RuntimeError once the attempt is over (not a lost lease)
        hooks = self._hooks
        if hooks is not None and hooks.lease_lost(self) and not await hooks.lease_renewed(self):
            raise LockLostError(self._lost(consequence))

    def _lost(self, consequence: str) -> str:
        return (
            f"item {self.key}: its lease ran out or was taken over (was this runner suspended "
            f"or its event loop blocked?): another runner holds it, or the ledger did not renew "
            f"it in time; {consequence}"
        )


class _ObjectOpening:
    """What :meth:`TaskContext.open` returns for an object: ``async with`` gives a streaming
    reader (:class:`~asyncbatch._sources.objects.ObjectReader`)."""

    __slots__ = ("_input", "_reader")

    def __init__(self, source: ObjectInput) -> None:
        self._input = source
        self._reader: ObjectReader | None = None

    async def __aenter__(self) -> ObjectReader:
        self._reader = await self._input.reader()
        return self._reader

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            await self._reader.__aexit__()
