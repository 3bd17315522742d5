"""``s3://BUCKET/PREFIX/``: where an object-store source, archive or output is.

Parsed without importing any object-store library: a configuration names a bucket long before
(and whether or not) anything talks to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._exceptions import ConfigurationError

__all__ = ["SCHEME", "ObjectURL", "is_object_url"]

SCHEME = "s3://"
# S3's rules for new bucket names (3-63 characters: lower-case letters, digits, dots, hyphens).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_object_url(value: object) -> bool:
    """Whether ``value`` names an object-store location (an :class:`ObjectURL`, or text
    starting with ``s3://``)."""
    return isinstance(value, ObjectURL) or (isinstance(value, str) and value.startswith(SCHEME))


@dataclass(frozen=True, slots=True)
class ObjectURL:
    """A bucket and a key prefix (empty, or ending with ``/``): ``s3://BUCKET/PREFIX/``.

    The prefix is a "directory" of keys: ``s3://b/in`` and ``s3://b/in/`` are the same
    place, whose objects are ``in/...``. ``str()`` gives the canonical form.
    """

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, name: str, text: str) -> ObjectURL:
        """The location named by ``text`` (``s3://BUCKET[/PREFIX]``). Raises
        :class:`ConfigurationError` naming setting ``name`` and the text otherwise (no
        query, fragment, credentials or ``..`` in it)."""
        if not text.startswith(SCHEME):
            raise ConfigurationError.bad_value(name, text, "expected s3://BUCKET/PREFIX/")
        bucket, _, prefix = text[len(SCHEME) :].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ConfigurationError.bad_value(
                name, text, "expected s3://BUCKET/PREFIX/ with a valid bucket name"
            )
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts) or any(c in prefix for c in "?#\\\0"):
            raise ConfigurationError.bad_value(
                name, text, "expected a plain key prefix (no '.', '..', '?', '#')"
            )
        return cls(bucket, "".join(p + "/" for p in parts))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key(self, relpath: str) -> str:
        """The full key of ``relpath`` under this prefix."""
        return self.prefix + relpath

    def contains(self, other: ObjectURL) -> bool:
        """Whether ``other`` is this location or lies under it (same bucket, longer prefix)."""
        return self.bucket == other.bucket and other.prefix.startswith(self.prefix)
