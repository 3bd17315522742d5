"""How a post-commit action and its path are written into the ledger (a text column).

``delete``, ``move:/archive`` and ``moved:/dest/file`` (set by ``ctx.move``) are stored as they
read. A path that is not valid UTF-8 (a non-UTF-8 file name) cannot be stored as text, so it is
written ``move;b64:<urlsafe base64 of its bytes>``: every name round-trips exactly.

A second ``ctx.move`` of an attempt (the input already moved once) records where the input is
as well as where it goes: ``moved;chain:["/staging/file", "/archive/file"]`` (a JSON list,
earliest first; ``\\udcxx`` escapes for the bytes of a non-UTF-8 name), so that a run killed
before that move's rename finds the input where it still is. :func:`decode_action` reads it as
``("moved", <the last path>)``; :func:`decode_move` gives every path.
"""

from __future__ import annotations

import base64
import json
import os

__all__ = ["decode_action", "decode_move", "encode_action", "encode_move"]

_B64 = ";b64:"
_CHAIN = "moved;chain:"


def encode_action(kind: str, path: str | os.PathLike[str] | None = None) -> str:
    """The stored form of an action (``kind`` alone, or ``kind`` with a path)."""
    if path is None:
        return kind
    raw = os.fsencode(path)
    try:
        return f"{kind}:{raw.decode('utf-8')}"
    except UnicodeDecodeError:
        return f"{kind}{_B64}{base64.urlsafe_b64encode(raw).decode('ascii')}"


def encode_move(dst: str | os.PathLike[str], src: str | os.PathLike[str] | None = None) -> str:
    """The stored form of ``ctx.move``'s record: the input goes to ``dst`` from ``src`` (where
    an earlier move put it; ``None``: from where the scan found it, which a retry looks at
    first anyway)."""
    if src is None or os.fsencode(src) == os.fsencode(dst):
        return encode_action("moved", dst)
    paths = [os.fsdecode(src), os.fsdecode(dst)]
    text = json.dumps(paths, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 name (surrogate escapes): escaped in ASCII
        text = json.dumps(paths)
    return _CHAIN + text


def decode_move(value: str | None) -> tuple[str, ...]:
    """Where ``ctx.move`` took or was taking the input, earliest first, from a stored action
    (nothing for another action, or none)."""
    if value is None:
        return ()
    if value.startswith(_CHAIN):
        return tuple(json.loads(value[len(_CHAIN) :]))
    kind, path = decode_action(value)
    return (path,) if kind == "moved" and path else ()


def decode_action(value: str) -> tuple[str, str | None]:
    """``(kind, path)`` from the stored form; the path as :func:`os.fsdecode` gives it (of a
    chain of moves, the last destination)."""
    if value.startswith(_CHAIN):
        return "moved", json.loads(value[len(_CHAIN) :])[-1]
    head, sep, encoded = value.partition(_B64)
    if sep and ":" not in head:
        return head, os.fsdecode(base64.urlsafe_b64decode(encoded))
    kind, sep, path = value.partition(":")
    return kind, path if sep else None
