"""Errors in words: the one line an item's failure is stored and logged as (never a secret in
a URL), and the exception a task group's failure stands for."""

from __future__ import annotations

import re

import anyio

__all__ = ["error_text", "printable", "redact_urls", "unwrap_group"]


#: A URL: scheme, credentials (``user:password@``), the rest, then query string and fragment.
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/\s@'\"]*@)?([^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def redact_urls(text: str) -> str:
    """``text`` with every URL's credentials, query string and fragment left out."""
    return _URL.sub(r"\1\2", text) if "://" in text else text


#: Control characters (C0, DEL, C1): a terminal acts on them (``\x1b[2J`` clears the screen,
#: ``\x1b]0;...`` sets its title, ``\r`` overwrites the line) instead of showing them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: Those a one-line error keeps: a tab only spaces it.
_CONTROL_IN_ERROR = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def printable(text: str) -> str:
    """``text`` as an operator's terminal may show it: control characters (a file name's, a
    command's stderr's) as escapes (``\\n``, ``\\x1b``), and the undecodable bytes of a name that
    is not UTF-8 as its surrogate escapes (``\\udcff``, as :func:`error_text` shows them), so
    that a name never drives the terminal, breaks a line, or looks like another."""
    text = _CONTROL.sub(_escape, text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line: what the ledger stores as an item's last error.

    Undecodable bytes of a non-UTF-8 file name in the message show as ``\\xe9`` escapes, and
    control characters (a command's colored stderr, say) as ``\\x1b``; URLs
    lose their credentials and query strings (httpx puts the whole URL in its messages). An
    HTTP client's error whose message does not name its request (a connection reset or
    refused) is followed by the request's method and URL.
    """
    text = str(exc).strip().replace("\r", " ").replace("\n", " ")
    request = _request_of(exc)
    if request and request.split("?", 1)[0].split(" ", 1)[1] not in text:
        text = f"{text}; {request}" if text else request
    text = _CONTROL_IN_ERROR.sub(_escape, text)
    text = redact_urls(text.encode("utf-8", "backslashreplace").decode("utf-8"))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _request_of(exc: BaseException) -> str:
    """``METHOD URL`` of the request an HTTP client's error is about (httpx's ``request``),
    or ``""``: a connection reset says only ``ReadError``, a refused one no URL."""
    try:
        request = getattr(exc, "request", None)
    except RuntimeError:  # (httpx: an error made without its request)
        return ""
    method, url = getattr(request, "method", None), getattr(request, "url", None)
    return f"{method} {url}" if isinstance(method, str) and url is not None else ""


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first meaningful exception of a task group's failure (cancellation aside).

    Several tasks may fail at once for one cause (every worker's handler raising the same
    error): the first is raised, with the others named in a note.
    """
    cancelled = anyio.get_cancelled_exc_class()
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    real = [e for e in flat if not isinstance(e, cancelled)]
    if not real:
        return flat[0]
    first, others = real[0], real[1:]
    if others:
        first.add_note(f"{len(others)} more at the same time: {error_text(others[0])}")
    return first
