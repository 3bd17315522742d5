"""The request side of idempotency: reading an ``Idempotency-Key`` header, naming the caller
whose keys it is, fingerprinting a request, and the problem responses the middleware answers
with."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

__all__ = [
    "MAX_KEY_LENGTH",
    "ASGIApp",
    "BodyTooLarge",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "caller_scope",
    "key_tag",
    "parse_key",
    "problem",
    "read_body",
    "respond",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The longest key accepted, in characters (after unquoting).
MAX_KEY_LENGTH: Final = 255


def parse_key(value: bytes) -> str:
    """The key carried by one ``Idempotency-Key`` header value.

    Accepts a structured-field string (RFC 8941 sf-string: ``"abc"``, with ``\\"`` and ``\\\\``
    escapes) or, leniently, a bare token of visible ASCII characters (``abc``); both spell the
    same key. Surrounding spaces and tabs are ignored. Raises :class:`ValueError` with a
    one-line message for an empty, malformed or too long (over 255 characters) value.
    """
    text = value.strip(b" \t")
    if text.startswith(b'"'):
        key = _parse_sf_string(text)
    elif any(c < 0x21 or c > 0x7E or c in b'"\\,' for c in text):
        raise ValueError(
            "Idempotency-Key must be a quoted string or a token of visible ASCII characters "
            "(no spaces, quotes, backslashes or commas)"
        )
    else:
        key = text.decode("ascii")
    if not key:
        raise ValueError("Idempotency-Key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"Idempotency-Key is longer than {MAX_KEY_LENGTH} characters")
    return key


def _parse_sf_string(text: bytes) -> str:
    """Unquote an RFC 8941 sf-string that makes up all of ``text`` (which starts with ``"``)."""
    out = bytearray()
    i, end = 1, len(text)
    while i < end:
        c = text[i]
        if c == 0x5C:  # backslash: only \" and \\ are escapes
            if i + 1 >= end or text[i + 1] not in b'"\\':
                raise ValueError(
                    'Idempotency-Key has an invalid escape: only \\" and \\\\ are allowed'
                )
            out.append(text[i + 1])
            i += 2
        elif c == 0x22:  # the closing quote must end the value
            if i != end - 1:
                raise ValueError("Idempotency-Key has characters after its closing quote")
            return out.decode("ascii")
        elif c < 0x20 or c > 0x7E:
            raise ValueError("Idempotency-Key may only hold printable ASCII characters")
        else:
            out.append(c)
            i += 1
    raise ValueError("Idempotency-Key has no closing quote")


def caller_scope(scope: Scope) -> str:
    """The default namespace of a request's keys: the caller, named by a hash of its credentials.

    ``authorization:`` plus the sha256 of the ``Authorization`` header when the request has one,
    else ``cookie:`` plus the sha256 of its ``Cookie`` header, else ``""``: requests without
    credentials share one namespace. Headers given more than once are hashed together, in order.
    The credentials themselves are never stored, only their hash.
    """
    for name in (b"authorization", b"cookie"):
        values = [bytes(v) for k, v in scope.get("headers", ()) if bytes(k).lower() == name]
        if values:
            digest = hashlib.sha256(b"\0".join(values)).hexdigest()
            return f"{name.decode()}:{digest}"
    return ""


def _fingerprint_head(scope: Scope) -> Any:
    """A sha256 of the request line (method, path, query string), to be fed the body next.

    The request fingerprint is this digest once every body chunk went in: computed while the
    body arrives, not in a second pass over it.
    """
    digest = hashlib.sha256()
    path = str(scope.get("path", "")).encode("utf-8", "surrogatepass")
    for part in (str(scope["method"]).encode("ascii"), path, bytes(scope.get("query_string", b""))):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest


def key_tag(namespace: str, key: str) -> str:
    """What the logs show instead of a key: a short hash of scope and key."""
    data = f"{namespace}\0{key}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:16]


class BodyTooLarge(Exception):
    """A request body longer than the middleware buffers; the message says how long may be."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the request body is larger than {limit} bytes, the most this server reads for a "
            "request with an Idempotency-Key"
        )


def _declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, if it has one that is a number."""
    for name, value in scope.get("headers", ()):
        if bytes(name).lower() == b"content-length":
            text = bytes(value).strip()
            return int(text) if text.isdigit() else None
    return None


async def read_body(scope: Scope, receive: Receive, *, limit: int) -> tuple[bytes, str] | None:
    """The whole request body and the request's fingerprint (sha256 over method, path, query
    string and body), or ``None`` when the client disconnected first.

    Raises :class:`BodyTooLarge` as soon as the body is known to be longer than ``limit``
    bytes (from its ``Content-Length``, or once that much has arrived): no more is read.
    """
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    digest = _fingerprint_head(scope)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            digest.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), digest.hexdigest()


async def respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Send a complete response, in one body message."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    retry_after: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> None:
    """An RFC 9457 problem response (``application/problem+json``): ``title``, ``status``,
    ``detail``, and the ``extra`` members."""
    document = {"title": title, "status": status, "detail": detail, **(extra or {})}
    body = json.dumps(document).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await respond(send, status, headers, body)
