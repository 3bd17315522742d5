"""One client per bucket (obstore's ``S3Store``), and the count of requests it sends.

obstore is imported here only, and only when an ``s3://`` location is used (the optional
extra ``asyncbatch[s3]``): a run over a directory never loads it. The client is configured as
every S3 tool is: the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ALLOW_HTTP=true`` for a
plain-HTTP endpoint), then the shared files' profile (:mod:`.profile`). Credentials are handed to
obstore and stay there: nothing here keeps or prints them, and an error is said with its
operation, key and obstore's kind of failure, never with the request's headers.

Made per run (:class:`ObjectStores`); nothing here outlives it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

from .._errors import redact_urls
from .._exceptions import ConfigurationError
from .profile import aws_profile

if TYPE_CHECKING:
    from obstore import GetResult, ObjectMeta
    from obstore.store import S3Config, S3Store

__all__ = [
    "OPERATIONS",
    "ObjectInfo",
    "ObjectMissing",
    "ObjectPreconditionFailed",
    "ObjectStore",
    "ObjectStores",
    "require_obstore",
    "version_tag",
]

#: The operations counted (``/metrics``: ``asyncbatch_object_requests_total{operation}``).
#: ``list`` counts pages (up to 1,000 keys each).
OPERATIONS = ("list", "head", "get", "put", "copy", "delete")
#: Keys asked for per listing page (S3's most).
LIST_PAGE = 1000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def require_obstore(name: str, value: object) -> None:
    """Raise :class:`ConfigurationError` for setting ``name`` when obstore is not installed."""
    if importlib.util.find_spec("obstore") is None:
        raise ConfigurationError.bad_value(
            name, str(value), "an s3:// location needs obstore: pip install 'asyncbatch[s3]'"
        )
    aws_profile()  # a profile that cannot be used: said now, in one line


def version_tag(etag: str | None) -> int:
    """A 63-bit number naming one version of an object, from its ETag: what the ledger's
    ``inode`` column holds for an object, and what tells a re-uploaded object from the one
    that was claimed (with its LastModified, part of the item's key).

    Not the VersionId: a listing (``ListObjectsV2``) does not carry it, and an upload of other
    bytes has another ETag anyway; the same bytes uploaded again within the same second are
    the same input."""
    return int.from_bytes(hashlib.sha256((etag or "").encode()).digest()[:8], "big") >> 1


def _ns(when: dt.datetime) -> int:
    """LastModified in nanoseconds, cut to the whole second: a ``HEAD`` gives no more (the
    HTTP date), some listings give milliseconds, and both must make the same record (an
    object's LastModified is part of its item's key)."""
    return (when - _EPOCH) // dt.timedelta(seconds=1) * 1_000_000_000


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing or a ``HEAD`` saw it."""

    key: str
    size: int
    #: LastModified, in nanoseconds since the epoch, to the whole second (see :func:`_ns`).
    mtime_ns: int
    etag: str | None
    version: str | None
    #: Its :func:`version_tag` (what the ledger's ``inode`` holds).
    tag: int

    @classmethod
    def of(cls, meta: ObjectMeta) -> ObjectInfo:
        """From obstore's ``ObjectMeta``."""
        etag = meta["e_tag"]
        return cls(
            meta["path"],
            meta["size"],
            _ns(meta["last_modified"]),
            etag,
            meta["version"],
            version_tag(etag),
        )


class ObjectMissing(FileNotFoundError):
    """The object is not there (``404``)."""


class ObjectPreconditionFailed(OSError):
    """A conditional request found another version of the object (``412``), or an object
    where the request wanted none."""


@dataclass(slots=True)
class ObjectStores:
    """The run's clients, one per bucket, made on first use, and the requests they sent
    (:attr:`requests`, by operation)."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0))
    _stores: dict[str, ObjectStore] = field(default_factory=dict)

    def bucket(self, name: str) -> ObjectStore:
        """The client of bucket ``name``."""
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = ObjectStore(name, self.requests)
        return store


_STATUS = re.compile(r"status code: (\d{3}[A-Za-z ]*)")
_CODE = re.compile(r"<Code>([A-Za-z]{1,64})</Code>")


def _reason(exc: Exception) -> str:
    """Why a request failed, in a few words: the HTTP status and S3's error code when the
    server answered (``404 Not Found, NoSuchBucket``), else obstore's first line without URLs'
    query strings. obstore's message carries the server's whole reply, never credentials."""
    text = str(exc)
    status, code = _STATUS.search(text), _CODE.search(text)
    said = [m.group(1).strip() for m in (status, code) if m is not None]
    if said:
        return ", ".join(said)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {redact_urls(first)[:300]}"


#: The environment variables obstore takes an S3 endpoint from.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


def _endpoint_ok(value: str) -> bool:
    """Whether ``value`` is an ``http://`` or ``https://`` URL with a host, as the client
    needs (it panics on a URL it cannot parse, at its first request)."""
    if not value.isprintable() or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host)


def _check_endpoints(profile: dict[str, str]) -> None:
    """Refuse an S3 endpoint the client could not use, naming where it was set: the
    environment's variables, or the profile's ``endpoint_url``."""
    env = os.environ
    given = [(name, env[name]) for name in ENDPOINT_VARIABLES if env.get(name)]
    if "endpoint" in profile:
        given.append(("the AWS profile's endpoint_url", profile["endpoint"]))
    for name, value in given:
        if not _endpoint_ok(value):
            raise ConfigurationError(
                f"{name} has value {redact_urls(value)!r}: expected an http:// or https:// "
                "URL with a host (http://127.0.0.1:9000)"
            )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return redact_urls(text.splitlines()[0] if text else type(exc).__name__)


_QUOTED = re.compile(r'"([^"]{1,200})"')


def _named(exc: Exception) -> str:
    """The AWS_* variables whose value obstore's message quotes (``failed to parse "maybe" as
    boolean``), named (never a credential's: its value is not quoted back)."""
    quoted = set(_QUOTED.findall(str(exc)))
    secret = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
    names = sorted(
        name
        for name, value in os.environ.items()
        if name.startswith("AWS_") and name not in secret and value in quoted
    )
    return f" (set by {', '.join(names)})" if names else ""


def _errors() -> Any:
    import obstore.exceptions

    return obstore.exceptions


class ObjectStore:
    """A bucket's client: each method is one request (``list_pages`` one per page), counted in
    ``requests``. Keys are full keys (prefix included). Raises :class:`ObjectMissing`,
    :class:`ObjectPreconditionFailed`, or ``OSError`` naming the operation and key for any
    other failure (after obstore's own retries of transient ones)."""

    def __init__(self, bucket: str, requests: dict[str, int]) -> None:
        from obstore.store import S3Store  # only here: see the module's docstring

        self.bucket = bucket
        self._requests = requests
        profile = aws_profile()
        _check_endpoints(profile)
        config = cast("S3Config", profile)
        try:
            self._store: S3Store = S3Store(bucket, config=config, retry_config={"max_retries": 5})
        except Exception as exc:  # obstore refuses a setting: a bad AWS_* value (a boolean...)
            raise ConfigurationError(
                f"the S3 client's settings (the AWS_* environment, the AWS profile) are "
                f"refused: {_first_line(exc)}{_named(exc)}"
            ) from None

    def _count(self, operation: str) -> None:
        self._requests[operation] += 1

    def _fail(self, operation: str, key: str, exc: Exception) -> OSError:
        errors = _errors()
        where = f"s3://{self.bucket}/{key}"
        code = _CODE.search(str(exc))
        if code is not None and code.group(1) == "NoSuchBucket":
            # obstore says NotFound for the object; the bucket is what is missing (a HEAD's
            # reply has no body, so no code: there a missing bucket is a missing object).
            return OSError(
                f"{operation} {where} failed: bucket {self.bucket!r} does not exist "
                f"({_reason(exc)})"
            )
        if isinstance(exc, errors.NotFoundError | FileNotFoundError):
            return ObjectMissing(f"{operation} {where}: no such object")
        if isinstance(exc, errors.PreconditionError | errors.AlreadyExistsError):
            return ObjectPreconditionFailed(f"{operation} {where}: another version is there")
        return OSError(f"{operation} {where} failed: {_reason(exc)}")

    async def list_pages(self, prefix: str) -> AsyncIterator[Sequence[ObjectInfo]]:
        """The objects under ``prefix``, a page at a time (bounded memory at any size)."""
        import obstore

        stream = obstore.list(self._store, prefix or None, chunk_size=LIST_PAGE)
        pages = 0
        while True:
            try:
                page = await stream.__anext__()
            except StopAsyncIteration:
                if not pages:
                    self._count("list")  # an empty listing is a request too
                return
            except Exception as exc:
                self._count("list")
                raise self._fail("list", prefix, exc) from None
            pages += 1
            self._count("list")
            yield [ObjectInfo.of(meta) for meta in page]

    async def head(self, key: str) -> ObjectInfo | None:
        """The object at ``key`` now, or ``None`` when there is none."""
        import obstore

        self._count("head")
        try:
            return ObjectInfo.of(await obstore.head_async(self._store, key))
        except Exception as exc:
            failure = self._fail("head", key, exc)
            if isinstance(failure, ObjectMissing):
                return None
            raise failure from None

    async def get(self, key: str, *, etag: str | None = None) -> GetResult:
        """Start reading ``key`` (the body streams from the result); with ``etag``, only that
        version (``If-Match``: :class:`ObjectPreconditionFailed` for another)."""
        import obstore

        self._count("get")
        try:
            return await obstore.get_async(
                self._store, key, options={"if_match": etag} if etag else None
            )
        except Exception as exc:
            raise self._fail("get", key, exc) from None

    async def put(
        self, key: str, data: bytes, *, mode: Literal["create", "overwrite"] = "overwrite"
    ) -> ObjectInfo:
        """Write ``data`` at ``key`` in one request (a reader sees the old object or the new
        one). ``mode="create"``: only where there is none (:class:`ObjectPreconditionFailed`
        otherwise). Returns what was written (its LastModified is not known: 0)."""
        import obstore

        self._count("put")
        try:
            done = await obstore.put_async(self._store, key, data, mode=mode, use_multipart=False)
        except Exception as exc:
            raise self._fail("put", key, exc) from None
        etag = done["e_tag"]
        return ObjectInfo(key, len(data), 0, etag, done["version"], version_tag(etag))

    async def copy(self, source: str, destination: str) -> None:
        """Server-side copy of ``source`` to ``destination`` in this bucket (overwrites)."""
        import obstore

        self._count("copy")
        try:
            await obstore.copy_async(self._store, source, destination)
        except Exception as exc:
            raise self._fail("copy", source, exc) from None

    async def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it is gone already)."""
        import obstore

        self._count("delete")
        try:
            await obstore.delete_async(self._store, key)
        except Exception as exc:
            failure = self._fail("delete", key, exc)
            if not isinstance(failure, ObjectMissing):
                raise failure from None
