"""An item's identity: its ledger key and the input hash its log records carry.

- ``identity="stat"`` (default): relpath + size + mtime_ns. A changed file is new work. For
  an object, its version tag too (ETag and VersionId: a re-upload is new work even with the
  same size within the same second of LastModified).
  The key starts with the zero-padded mtime, so keys are inserted in nearly ascending order
  (new files are newer): B-tree appends, several times cheaper than random keys.
- ``identity="path"``: the relpath alone; each name is handled once, whatever its content.
- ``identity="content"``: sha256 of the bytes; the same content is handled once, under any name.

``input_hash`` is the sha256 (hex) over the identity, so logs can say which input an item was
without saying what it contained.
"""

from __future__ import annotations

import hashlib
from typing import Literal

__all__ = ["IDENTITIES", "Identity", "input_hash", "item_key"]

Identity = Literal["stat", "path", "content"]
IDENTITIES: tuple[Identity, ...] = ("stat", "path", "content")


def input_hash(
    identity: Identity,
    relpath: bytes,
    size: int,
    mtime_ns: int,
    digest: bytes,
    version: int | None = None,
) -> str:
    """The sha256 hex digest over an item's identity (over its bytes for ``"content"``);
    ``version``: an object's version tag (``None`` for a file)."""
    if identity == "content":
        return digest.hex()
    if identity == "path":
        return hashlib.sha256(b"path\0" + relpath).hexdigest()
    tail = b"\0%d\0%d" % (size, mtime_ns)
    if version is not None:
        tail += b"\0v%d" % version
    return hashlib.sha256(b"".join((b"stat\0", relpath, tail))).hexdigest()


def item_key(identity: Identity, ihash: str, mtime_ns: int) -> str:
    """The ledger key of an item, derived from its input hash."""
    if identity == "stat":
        return str(max(mtime_ns, 0)).zfill(19) + "-" + ihash[:24]
    if identity == "path":
        return ihash[:32]
    return ihash
