"""Errors in words: the one line an item's failure is stored and logged as (never a secret in
a URL), and the exception a task group's failure stands for."""

from __future__ import annotations

import re

import anyio

__all__ = ["error_text", "redact_urls", "unwrap_group"]


#: A URL: scheme, credentials (``user:password@``), the rest, then query string and fragment.
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/\s@'\"]*@)?([^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def redact_urls(text: str) -> str:
    """``text`` with every URL's credentials, query string and fragment left out."""
    return _URL.sub(r"\1\2", text) if "://" in text else text


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line: what the ledger stores as an item's last error.

    Undecodable bytes of a non-UTF-8 file name in the message show as ``\\xe9`` escapes; URLs
    lose their credentials and query strings (httpx puts the whole URL in its messages).
    """
    text = str(exc).strip().replace("\r", " ").replace("\n", " ")
    text = redact_urls(text.encode("utf-8", "backslashreplace").decode("utf-8"))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
