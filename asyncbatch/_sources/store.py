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
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from .._errors import redact_urls, unwrap_group
from .._exceptions import ConfigurationError, SourceError
from .profile import aws_profile

if TYPE_CHECKING:
    from obstore import GetOptions, GetResult, ObjectMeta
    from obstore.store import S3Config, S3Store

__all__ = [
    "OPERATIONS",
    "BucketMissing",
    "ObjectInfo",
    "ObjectKeyRefused",
    "ObjectMissing",
    "ObjectPreconditionFailed",
    "ObjectStore",
    "ObjectStoreDown",
    "ObjectStores",
    "StoreUnreachable",
    "require_obstore",
    "version_tag",
]

T = TypeVar("T")
log = logging.getLogger("asyncbatch")

#: The operations counted (``/metrics``: ``asyncbatch_object_requests_total{operation}``).
#: ``list`` counts pages (up to 1,000 keys each).
OPERATIONS = ("list", "head", "get", "put", "copy", "delete")
#: Keys asked for per listing page (S3's most).
LIST_PAGE = 1000
#: ``HEAD`` requests a listing sends at once to tell "folder" markers from empty objects.
FOLDER_HEADS = 16
#: How old (seconds) an empty object's LastModified must be when it is looked at for the
#: verdict (marker or object) to be kept for the next listings of the run: an object put
#: under the same key after the look has a later LastModified (a server clock up to this far
#: behind this host's included), so the same listing entry cannot stand for it.
FOLDER_SURE_AFTER = 60
#: Verdicts kept at most (then forgotten at once, and looked at again).
FOLDER_VERDICTS = 100_000
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


class ObjectKeyRefused(OSError):
    """A listing met a key that obstore cannot represent (an empty segment ``a//b``, a ``.``
    or ``..`` segment, a control character): obstore refuses the whole page that holds it
    (up to 1,000 keys, those before it too) and ends the listing, so no key of that page can
    be reached, nor, from a listing that starts before it, any key after it."""

    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        #: The key, when obstore's message names it.
        self.key = key


def _verdict_key(obj: ObjectInfo) -> tuple[str, int, str | None]:
    """What a "folder" verdict is kept by: the listing entry's name, LastModified and ETag."""
    return (obj.key, obj.mtime_ns, obj.etag)


class ObjectMissing(FileNotFoundError):
    """The object is not there (``404``)."""


class ObjectPreconditionFailed(OSError):
    """A conditional request found another version of the object (``412``), or an object
    where the request wanted none."""


class BucketMissing(OSError):
    """The bucket does not exist (S3's ``NoSuchBucket``)."""


class StoreUnreachable(OSError):
    """The store could not be reached or could not serve the request, after the client's own
    retries: connection refused or reset, a timeout, a name that does not resolve, a ``5xx``
    reply. Nothing is known about the object: the store is down, not the object wrong."""


class ObjectStoreDown(SourceError):
    """The store stayed unreachable past the run's bound (``ledger_timeout``): the run ends
    (exit 69), its items in flight left pending."""


#: What obstore says of a request that never got a usable reply: its HTTP error's kind (a
#: connection that failed or broke, a timeout), or a server error status after its retries.
_UNREACHABLE = re.compile(
    r"\bkind: (?:Connect|Request|Timeout|Interrupted)\b|status code: 5\d\d|error sending request"
)
#: Longest wait between two tries of a request while the store is unreachable (seconds).
OUTAGE_RETRY_MAX = 5.0


def unreachable(exc: BaseException) -> bool:
    """Whether obstore's ``exc`` says the store, not the request, failed (see
    :class:`StoreUnreachable`)."""
    return _UNREACHABLE.search(str(exc)) is not None


@dataclass(slots=True)
class ObjectStores:
    """The run's clients, one per bucket, made on first use, and the requests they sent
    (:attr:`requests`, by operation).

    A request the store cannot serve (:class:`StoreUnreachable`) is tried again, the run's
    requests waiting together, until it succeeds or the store has been unreachable for
    ``outage_timeout`` seconds (a run's; without one, it fails at once); then every request
    raises :class:`ObjectStoreDown`."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0))
    #: Seconds an unreachable store is waited out (a run's ``ledger_timeout``); ``None``: not
    #: waited out, the request fails at once (a command that only looks: ``explain``).
    outage_timeout: float | None = None
    #: When (monotonic) the store was found unreachable, while it is.
    down_since: float | None = None
    #: Why the run gave up waiting for the store, once it did.
    gave_up: ObjectStoreDown | None = None
    _stores: dict[str, ObjectStore] = field(default_factory=dict)

    def bucket(self, name: str) -> ObjectStore:
        """The client of bucket ``name``."""
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = ObjectStore(name, self.requests, self)
        return store

    async def wait_out(self, failure: StoreUnreachable, tries: int) -> None:
        """After a request failed with ``failure`` (its ``tries``-th try): wait before the next
        try, or raise :class:`ObjectStoreDown` once the store has been unreachable for
        ``outage_timeout`` seconds."""
        import anyio

        if self.outage_timeout is None:
            raise failure
        if self.gave_up is not None:
            raise self.gave_up
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "the S3 store cannot be reached (%s): waiting up to %gs (ledger_timeout) for it; "
                "the items' attempts are not spent meanwhile",
                failure,
                self.outage_timeout,
            )
        left = self.down_since + self.outage_timeout - now
        if left <= 0:
            self.gave_up = ObjectStoreDown(
                f"the S3 store stayed unreachable for {self.outage_timeout:g}s (ledger_timeout): "
                f"{failure}; the items in flight are left pending"
            )
            raise self.gave_up
        await anyio.sleep(min(OUTAGE_RETRY_MAX, 0.25 * 2 ** min(tries, 8), left))

    def reached(self) -> None:
        """A request went through: the store is back, if it was down."""
        self.gave_up = None
        if self.down_since is not None:
            log.warning(
                "the S3 store answers again after %.0fs", time.monotonic() - self.down_since
            )
            self.down_since = None


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


#: The key in obstore's ``InvalidPathError`` (its ``Debug source``: Rust's escapes, unlike
#: the message's first line, which has the key raw, quotes and control characters included).
_DEBUG_PATH = re.compile(r'\bpath: "((?:[^"\\]|\\.)*)"')
_RUST_ESCAPE = re.compile(r"\\(?:u\{([0-9a-fA-F]{1,6})\}|(.))")
_RUST_NAMED = {"n": "\n", "r": "\r", "t": "\t", "0": "\0"}


def _unescape_rust(match: re.Match[str]) -> str:
    code, char = match.groups()
    if code is not None:
        return chr(int(code, 16))
    return _RUST_NAMED.get(char, char)


def refused_key(exc: Exception) -> str | None:
    """The key obstore's ``InvalidPathError`` names, or ``None`` if its message does not."""
    found = _DEBUG_PATH.search(str(exc).partition("Debug source:")[2])  # not the raw line
    if found is None:
        return None
    try:
        return _RUST_ESCAPE.sub(_unescape_rust, found.group(1))
    except ValueError:  # a code point that is none
        return None


def _why_refused(key: str) -> str:
    """What in ``key`` obstore refuses (its ``Path`` rules), in a few words."""
    parts = key.removeprefix("/").removesuffix("/").split("/")
    if "" in parts:
        return "an empty segment ('//')"
    for bad in (".", ".."):
        if bad in parts:
            return f"a {bad!r} segment"
    if any(ord(c) < 0x20 or c == "\x7f" for c in key):
        return "a control character"
    return "a part the client refuses"


def _refused(key: str) -> str:
    """Why obstore refuses ``key``, the key named (its control characters escaped)."""
    return f"key {key!r} has {_why_refused(key)}, which the S3 client (obstore) cannot represent"


def _errors() -> Any:
    import obstore.exceptions

    return obstore.exceptions


class ObjectStore:
    """A bucket's client: each method is one request (``list_pages`` one per page), counted in
    ``requests``. Keys are full keys (prefix included). Raises :class:`ObjectMissing`,
    :class:`ObjectPreconditionFailed`, or ``OSError`` naming the operation and key for any
    other failure (after obstore's own retries of transient ones)."""

    def __init__(
        self, bucket: str, requests: dict[str, int], stores: ObjectStores | None = None
    ) -> None:
        from obstore.store import S3Store  # only here: see the module's docstring

        self.bucket = bucket
        self._requests = requests
        #: The run's clients (their outage state); ``None``: an unreachable store fails a
        #: request at once.
        self._stores = stores
        #: Whether an empty object listed is a "folder" marker, by entry (see :meth:`_folders`).
        self._folder_verdicts: dict[tuple[str, int, str | None], bool] = {}
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
        if isinstance(exc, ValueError) and str(exc).startswith("Could not parse path"):
            return ObjectKeyRefused(_refused(key), key)  # no request was sent
        where = f"s3://{self.bucket}/{key}"
        code = _CODE.search(str(exc))
        if code is not None and code.group(1) == "NoSuchBucket":
            # obstore says NotFound for the object; the bucket is what is missing (a HEAD's
            # reply has no body, so no code: there a missing bucket is a missing object).
            return BucketMissing(
                f"{operation} {where} failed: bucket {self.bucket!r} does not exist "
                f"({_reason(exc)})"
            )
        if isinstance(exc, errors.NotFoundError | FileNotFoundError):
            return ObjectMissing(f"{operation} {where}: no such object")
        if isinstance(exc, errors.PreconditionError | errors.AlreadyExistsError):
            return ObjectPreconditionFailed(f"{operation} {where}: another version is there")
        if unreachable(exc):
            return StoreUnreachable(f"{operation} {where} failed: {_reason(exc)}")
        return OSError(f"{operation} {where} failed: {_reason(exc)}")

    async def wait_out(self, failure: StoreUnreachable, tries: int) -> None:
        """Wait before trying again what failed with ``failure`` (see
        :meth:`ObjectStores.wait_out`); raise ``failure`` without the run's clients."""
        if self._stores is None:
            raise failure
        await self._stores.wait_out(failure, tries)

    async def _request(
        self, operation: str, key: str, call: Callable[[], Awaitable[T]], *, fail_key: str = ""
    ) -> T:
        """One request (``call``), counted; tried again while the store is unreachable (see
        :class:`ObjectStores`). Raises what :meth:`_fail` makes of any other failure."""
        tries = 0
        while True:
            self._count(operation)
            try:
                done = await call()
            except Exception as exc:
                failure = self._fail(operation, fail_key or key, exc)
                if not isinstance(failure, StoreUnreachable) or self._stores is None:
                    raise failure from None
                tries += 1
                await self._stores.wait_out(failure, tries)
                continue
            if self._stores is not None:
                self._stores.reached()
            return done

    def _list_fail(self, prefix: str, exc: Exception) -> OSError:
        """:meth:`_fail` for a listing; :class:`ObjectKeyRefused` for a key obstore refuses."""
        if not isinstance(exc, _errors().InvalidPathError):
            return self._fail("list", prefix, exc)
        key = refused_key(exc)
        where = f"s3://{self.bucket}/{prefix}"
        if key is None:
            return ObjectKeyRefused(
                f"a key under {where} cannot be listed by the S3 client (obstore): "
                f"{_reason(exc)!r}; rename that object or move it out of the prefix",
                None,
            )
        return ObjectKeyRefused(
            f"{_refused(key)}: {where} cannot be listed while it is there; rename the object "
            "or move it out of the prefix",
            key,
        )

    async def list_pages(self, prefix: str) -> AsyncIterator[Sequence[ObjectInfo]]:
        """The objects under ``prefix``, a page at a time (bounded memory at any size), each
        with its key as the bucket has it: a "folder" marker's ends with ``/`` (see
        :meth:`_folders`). Raises :class:`ObjectKeyRefused` at a key obstore refuses.

        A page the store cannot serve (:class:`StoreUnreachable`) is waited for as any
        request is (see :class:`ObjectStores`: the run's clients), and the listing goes on
        after the last key it gave (S3's start-after): a short outage does not end it."""
        import obstore

        stream = obstore.list(self._store, prefix or None, chunk_size=LIST_PAGE)
        pages = tries = 0
        after: str | None = None  # the last key listed, as obstore gave it
        kept_empty: set[str] = set()
        while True:
            try:
                page = await stream.__anext__()
            except StopAsyncIteration:
                if not pages:
                    self._count("list")  # an empty listing is a request too
                return
            except Exception as exc:
                self._count("list")
                failure = self._list_fail(prefix, exc)
                if not isinstance(failure, StoreUnreachable) or self._stores is None:
                    raise failure from None
                tries += 1
                await self._stores.wait_out(failure, tries)
                stream = obstore.list(
                    self._store, prefix or None, offset=after, chunk_size=LIST_PAGE
                )
                continue
            if self._stores is not None:
                self._stores.reached()
            pages, tries = pages + 1, 0
            self._count("list")
            if page:
                after = page[-1]["path"]
            yield await self._folders([ObjectInfo.of(meta) for meta in page], kept_empty)

    async def first_page(self, prefix: str, *, offset: str | None = None) -> list[ObjectInfo]:
        """The first page of the listing under ``prefix`` (``""``: the bucket) after ``offset``
        (S3's start-after), as obstore gives it: each key without a leading or ending ``/``
        (no "folder" verdicts: see :meth:`_folders`). One request."""
        import obstore

        self._count("list")
        try:
            stream = obstore.list(self._store, prefix or None, offset=offset, chunk_size=LIST_PAGE)
            async for page in stream:
                return [ObjectInfo.of(meta) for meta in page]
        except Exception as exc:
            raise self._list_fail(prefix, exc) from None
        return []

    async def _folders(self, page: list[ObjectInfo], kept_empty: set[str]) -> list[ObjectInfo]:
        """``page`` with each "folder" marker's key given back its ending ``/``.

        obstore lists the key ``in/folder/`` (an empty object, as the S3 console's "Create
        folder" makes) as ``in/folder``, as it would an empty object ``in/folder``; the two are
        told apart by a ``HEAD`` of ``in/folder`` (only for empty objects; a listing's order
        puts ``in/folder`` before ``in/folder/``):

        - the second entry of the same name in a listing is the marker (both are there);
        - else no object there (``404``), or one that is not empty: the entry is the marker;
        - else (an empty object): the entry is that object.

        A verdict is kept for the run's next listings while its entry (name, LastModified,
        ETag) stays, once the entry was :data:`FOLDER_SURE_AFTER` seconds old when looked at
        (a younger one is looked at again by each listing). ``kept_empty``: the names of the
        empty objects this listing kept so far."""
        verdicts = self._folder_verdicts
        if len(verdicts) > FOLDER_VERDICTS:
            verdicts.clear()
        asked: dict[str, ObjectInfo | None] = {}
        ask = {
            o.key
            for o in page
            if not o.size and o.key not in kept_empty and _verdict_key(o) not in verdicts
        }
        asked_at = time.time()
        if ask:
            asked = await self._heads(sorted(ask))
        sure_before = int((asked_at - FOLDER_SURE_AFTER) * 1e9)
        found: list[ObjectInfo] = []
        for obj in page:
            if obj.size:
                found.append(obj)
                continue
            marker = True if obj.key in kept_empty else verdicts.get(_verdict_key(obj))
            if marker is None:
                now = asked[obj.key]
                marker = now is None or now.size != 0
                if obj.mtime_ns < sure_before:
                    verdicts[_verdict_key(obj)] = marker
            if marker:
                found.append(replace(obj, key=obj.key + "/"))
            else:
                kept_empty.add(obj.key)
                found.append(obj)
        return found

    async def _heads(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        """:meth:`head` of each of ``keys``, :data:`FOLDER_HEADS` at a time."""
        import anyio

        found: dict[str, ObjectInfo | None] = {}
        limit = anyio.CapacityLimiter(FOLDER_HEADS)

        async def one(key: str) -> None:
            async with limit:
                found[key] = await self.head(key)

        try:
            async with anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(one, key)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        return found

    async def head(self, key: str) -> ObjectInfo | None:
        """The object at ``key`` now, or ``None`` when there is none. Raises
        :class:`ObjectKeyRefused` for a key obstore cannot represent (no request sent)."""
        import obstore

        try:
            meta = await self._request("head", key, lambda: obstore.head_async(self._store, key))
        except ObjectMissing:
            return None
        return ObjectInfo.of(meta)

    async def get(self, key: str, *, etag: str | None = None) -> GetResult:
        """Start reading ``key`` (the body streams from the result); with ``etag``, only that
        version (``If-Match``: :class:`ObjectPreconditionFailed` for another)."""
        import obstore

        options: GetOptions | None = {"if_match": etag} if etag else None
        return await self._request(
            "get", key, lambda: obstore.get_async(self._store, key, options=options)
        )

    async def put(
        self, key: str, data: bytes, *, mode: Literal["create", "overwrite"] = "overwrite"
    ) -> ObjectInfo:
        """Write ``data`` at ``key`` in one request (a reader sees the old object or the new
        one). ``mode="create"``: only where there is none (:class:`ObjectPreconditionFailed`
        otherwise). Returns what was written (its LastModified is not known: 0)."""
        import obstore

        done = await self._request(
            "put",
            key,
            lambda: obstore.put_async(self._store, key, data, mode=mode, use_multipart=False),
        )
        etag = done["e_tag"]
        return ObjectInfo(key, len(data), 0, etag, done["version"], version_tag(etag))

    async def copy(self, source: str, destination: str) -> None:
        """Server-side copy of ``source`` to ``destination`` in this bucket (overwrites)."""
        import obstore

        await self._request(
            "copy", source, lambda: obstore.copy_async(self._store, source, destination)
        )

    async def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it is gone already)."""
        import obstore

        try:
            await self._request("delete", key, lambda: obstore.delete_async(self._store, key))
        except ObjectMissing:
            pass
