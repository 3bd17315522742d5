"""How a post-commit action and its path are written into the ledger (a text column).

``delete``, ``move:/archive`` and ``moved:/dest/file`` (set by ``ctx.move``) are stored as they
read. A path that is not valid UTF-8 (a non-UTF-8 file name) cannot be stored as text, so it is
written ``move;b64:<urlsafe base64 of its bytes>``: every name round-trips exactly.
"""

from __future__ import annotations

import base64
import os

__all__ = ["decode_action", "encode_action"]

_B64 = ";b64:"


def encode_action(kind: str, path: str | os.PathLike[str] | None = None) -> str:
    """The stored form of an action (``kind`` alone, or ``kind`` with a path)."""
    if path is None:
        return kind
    raw = os.fsencode(path)
    try:
        return f"{kind}:{raw.decode('utf-8')}"
    except UnicodeDecodeError:
        return f"{kind}{_B64}{base64.urlsafe_b64encode(raw).decode('ascii')}"


def decode_action(value: str) -> tuple[str, str | None]:
    """``(kind, path)`` from the stored form; the path as :func:`os.fsdecode` gives it."""
    head, sep, encoded = value.partition(_B64)
    if sep and ":" not in head:
        return head, os.fsdecode(base64.urlsafe_b64decode(encoded))
    kind, sep, path = value.partition(":")
    return kind, path if sep else None
