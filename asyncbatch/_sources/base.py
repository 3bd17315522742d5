"""What the pipeline needs of a source: the seams between a run and where its inputs are.

A source is a directory (:class:`~asyncbatch._scanner.Scanner`,
:class:`~asyncbatch._pipeline.source.SourceDir`, inputs opened relative to its descriptor,
:mod:`asyncbatch._effects.files`) or an object-store prefix (:mod:`.objects`, :mod:`.effects`).
Both give the pipeline the same things, with the same guarantees:

1. **Listing** (:class:`Lister`): sorted compact records (``mtime | relpath | NUL | size |
   inode | ctime``, :func:`asyncbatch._scanner.pack`) of the settled inputs; what was left
   out for not being settled, counted. The claimer, the ledger and the item key see records
   only: an object's ``inode`` is its version tag (a hash of ETag and VersionId), so that a
   re-uploaded object under the same key is a new item, like a file replaced under its name.
2. **Handle** (:class:`SourceHandle`): opened for the run, refreshed at each poll; says what
   is wrong with the source (gone, replaced) while it is.
3. **Reading**: the worker opens the version that was claimed, and fails the attempt of a
   replaced one as vanished (the new version is a new item): a file relative to the source's
   descriptor, checked by ``fstat``; an object by one ``GET`` checked against its tag.
4. **Post-commit actions**: delete or archive, repeatable after a crash at any point, never
   touching a newer version.
5. **Outputs**: ``ctx.write_output`` is an atomic write (rename, or one ``PUT``) fenced by
   the item's lease.

Where the pipeline chooses between the two (each a small ``if`` on the source's kind):
``Run._pipeline`` (which lister and handle: ``_source_of``, ``_lister_of``),
``WorkerPool.attempt`` (the reading), ``PostActions._perform`` (the actions),
``TaskContext.write_output`` / ``read_bytes`` / ``open`` (outputs and reading),
``Claimer`` (an object's version tag in its identity; S3 event notifications in watch
mode, :mod:`.sqs`), and ``BatchConfig`` (which locations are checked how).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .._ready import Readiness, ReadyWalk
from .._scanner import Look, ScanInfo

__all__ = ["Lister", "SourceHandle"]


class Lister(Protocol):
    """Lists a source: ``Scanner`` for a directory, ``ObjectLister`` for a prefix."""

    #: The job's readiness rules (``None``, or ``age`` alone: the plain path).
    ready: Readiness | None
    #: What the last listing learnt of the rules beyond ``age`` (``None``: none).
    walked: ReadyWalk | None
    #: The records of the inputs the last listing for settled ones left out as not settled
    #: yet, without rules beyond ``age`` (with them, ``walked.left_out`` has them).
    left_unsettled: list[bytes]

    @property
    def last(self) -> ScanInfo | None:
        """The last listing that finished."""
        ...

    async def scan(
        self,
        *,
        settle: float | None,
        now_ns: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> list[bytes]:
        """The records of the inputs settled ``settle`` seconds before ``now_ns``, sorted."""
        ...

    async def list_names(self) -> list[bytes]:
        """Name keys only, where that is cheaper than a scan (raises ``ValueError`` else)."""
        ...

    async def unchanged(self) -> bool:
        """Whether the source surely holds the same names as at the last listing."""
        ...

    async def look(self, relpaths: Sequence[bytes]) -> tuple[list[bytes], bool]:
        """The records a scan would give for just these relpaths."""
        ...

    async def look_at(self, relpaths: Sequence[bytes]) -> Look:
        """:meth:`look`, with what the rules beyond ``age`` find (markers, verdicts)."""
        ...


class SourceHandle(Protocol):
    """A run's handle on its source: ``SourceDir`` or ``ObjectSource``."""

    problem: str | None
    watchable: bool
    #: How many times it was found replaced and reopened (by whichever part looked).
    reopened: int

    @property
    def usable(self) -> bool:
        """Whether the source was there at the last refresh."""
        ...

    @property
    def fd(self) -> int:
        """A directory's descriptor (-1 for an object store)."""
        ...

    def open(self) -> None:
        """Open it for the run."""
        ...

    def close(self) -> None:
        """Close it (once)."""
        ...

    def refresh(self) -> bool:
        """Look again; whether it was reopened (replaced)."""
        ...
