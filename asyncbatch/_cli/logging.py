"""Log formatting for the command line: plain text or one JSON object per line.

Item records carry ``job``, ``key`` and ``input_hash`` (set by ``ctx.log`` and by the
framework); both formats show them. The library itself only emits records through stdlib
``logging`` and never configures handlers: that is the application's (or the CLI's) job.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO

__all__ = [
    "ITEM_FIELDS",
    "QUIET_LIBRARIES",
    "JSONFormatter",
    "TextFormatter",
    "configure_logging",
]

ITEM_FIELDS = ("job", "key", "input_hash")
LogFormat = Literal["text", "json"]


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the item fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ITEM_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message [job=… key=… input_hash=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as text, the item fields appended."""
        text = super().format(record)
        fields = [
            f"{name}={getattr(record, name)}"
            for name in ITEM_FIELDS
            if getattr(record, name, None) is not None
        ]
        if fields:
            first, nl, rest = text.partition("\n")
            text = f"{first} [{' '.join(fields)}]{nl}{rest}"
        return text


#: Libraries whose records below WARNING can carry secrets: httpx and httpcore log every URL
#: with its credentials and query string at INFO and DEBUG; aiosqlite logs every call with its
#: arguments at DEBUG; asyncpg likewise; watchfiles logs a line per group of changes at INFO
#: (with every path at DEBUG). The CLI keeps them at WARNING whatever --log-level is.
QUIET_LIBRARIES = (
    "httpx",
    "httpcore",
    "hpack",
    "h11",
    "aiosqlite",
    "asyncpg",
    "watchfiles",
    "botocore",
    "aiobotocore",
    "aiohttp",
)


def configure_logging(
    level: str = "WARNING", fmt: LogFormat = "text", stream: TextIO | None = None
) -> logging.StreamHandler[TextIO]:
    """Send the root logger's records to ``stream`` (stderr) in ``fmt``; return the handler.

    ``level`` applies to asyncbatch's loggers and the handler's own; the libraries named in
    :data:`QUIET_LIBRARIES` stay at WARNING, since below it their records carry URLs with
    credentials or statement arguments.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler
