"""``asyncbatch explain`` for a job whose source is an ``s3://`` prefix: what the ledger
knows of one object, and what the object store says of it now.

The counterpart of a file's answer (:mod:`.items`), with the source's own parts: its client
(:class:`~asyncbatch._sources.store.ObjectStore`: a ``HEAD`` of the object, of each marker
the job's rules look for, and one listing request when the object is not there, to tell a
missing object from a missing bucket or a "folder" of keys), its lister's name rules
(:func:`~asyncbatch._sources.objects.unlisted_because`) and markers
(:meth:`~asyncbatch._sources.objects.ObjectLister.object_at`), and its settle rule
(LastModified ``--settle`` seconds old). It only reads: ``HEAD`` and ``LIST`` requests, and
the ledger.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import Any

from .._exceptions import AsyncBatchError, ConfigurationError, SourceError
from .._identity import Identity, input_hash, item_key
from .._ledger import ItemInfo, JobSettings, Ledger, decode_action
from .._ready import RuleVerdict, marker_paths
from .._scanner import ScanRules
from .._sources.effects import keyed_name
from .._sources.objects import ObjectLister, unlisted_because
from .._sources.ready import object_stat
from .._sources.store import ObjectInfo, ObjectKeyRefused, ObjectStore, ObjectStores
from .._sources.url import SCHEME, ObjectURL, is_object_url
from .common import show_time
from .items import (
    answer_fields,
    item_json,
    marker_of,
    not_ready,
    readiness,
    records_of,
    rule_verdicts,
    verdict_of,
)

__all__ = ["object_facts", "object_relpath"]

#: A reply that refuses the request (4xx): retrying cannot help.
_REFUSED = re.compile(r"\b4\d\d [A-Z]")


def object_relpath(url: ObjectURL, path: str) -> str:
    """The relpath under the prefix of ``url`` of the object ``path`` names:
    ``s3://BUCKET/KEY`` (a key under the prefix), or a key relative to the prefix (as
    ``items`` shows it). Raises :class:`ConfigurationError` naming ``path`` for anything else
    (another bucket, a key outside the prefix, the prefix itself, a local path)."""
    outside = f"PATH {path!r} is not an object under the source {str(url)!r}"
    if is_object_url(path):
        bucket, _, key = path[len(SCHEME) :].partition("/")
        if bucket == url.bucket and key in (url.prefix, url.prefix.rstrip("/")):
            raise ConfigurationError(f"PATH {path!r} is the source's prefix itself, not an object")
        if bucket != url.bucket or not key.startswith(url.prefix):
            raise ConfigurationError(outside)
        return key[len(url.prefix) :]
    if not path or path.startswith("/"):
        raise ConfigurationError(
            f"{outside}: give s3://{url.bucket}/{url.prefix}KEY, or KEY relative to the prefix"
        )
    return path


def _unusable(url: ObjectURL, exc: OSError) -> AsyncBatchError:
    """The error a request that failed with ``exc`` ends ``explain`` with: a refusal (the
    bucket missing, the credentials missing or refused: exit 2), or the source unavailable
    (no reply, a server error: exit 69)."""
    said = f"cannot look at the source {str(url)!r}: {exc}"
    text = str(exc)
    if "403" in text:
        said += (
            " (the credentials are missing or refused: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or the AWS profile)"
        )
    if "does not exist" in text or _REFUSED.search(text):
        return ConfigurationError(said)
    return SourceError(said)


async def _look(lister: ObjectLister, rel: str) -> tuple[ObjectInfo | None, str | None]:
    """The object at ``rel`` now (``None``: none), and why a listing leaves it out, if it
    does (see :func:`unlisted_because`). When there is no object there, one listing request
    tells a missing bucket (an error) and a "folder" of keys from a missing object."""
    store: ObjectStore = lister.store
    key = lister.url.key(rel)
    skipped = unlisted_because(rel, lister.rules, recursive=lister.recursive)
    if skipped is not None:
        skipped = f"skipped by a rule: {skipped}"
    try:
        found = None if rel.endswith("/") else await store.head(key)
        if found is None and await store.first_page(key.rstrip("/") + "/"):
            skipped = "skipped: a key prefix (a 'folder' of keys), not an object"
    except ObjectKeyRefused as exc:
        return None, f"skipped: {exc}"
    return found, skipped


def _in_object_words(verdict: RuleVerdict) -> RuleVerdict:
    """A rule's words for an object: its one time is its LastModified (its mtime and ctime
    both)."""
    if verdict.rule == "age":
        return RuleVerdict(
            "age", verdict.holds, verdict.why.replace("mtime and ctime", "LastModified")
        )
    if verdict.rule.startswith("max-age"):
        why = verdict.why.replace("mtime", "LastModified", 1)
        return RuleVerdict(verdict.rule, verdict.holds, why)
    return verdict


def _unsettled(obj: ObjectInfo, settle: float, now: float, clock: float) -> str | None:
    """Why the object is not settled yet (its LastModified is less than ``settle`` seconds
    before ``now``, or in the future), and from when it will be; ``None`` if it is settled.
    In the future: later than ``clock``, this host's clock read after the object was looked
    at (one uploaded since ``now`` was read is not ahead of the clock)."""
    changed = obj.mtime_ns / 1e9
    settles_at = changed + settle
    if settles_at <= now:
        return None
    if changed > clock:
        return (
            f"not settled yet: uploaded (LastModified) at {show_time(changed)}, in the future "
            f"by this host's clock; settled from {show_time(settles_at)} (--settle {settle:g})"
        )
    return (
        f"not settled yet: uploaded (LastModified) at {show_time(changed)}, "
        f"{clock - changed:.1f}s ago; settled from {show_time(settles_at)} (--settle {settle:g})"
    )


async def _post_action_said(item: ItemInfo, now: ObjectInfo | None, stores: ObjectStores) -> str:
    """What became of a finished item's post-commit action (see the directory's
    ``items._post_action_said``): the object it handled still there (same size, ETag and
    LastModified), another version under its key, or gone (where a move put its copy: the
    archive's key, or the keyed name a clash gives it)."""
    assert item.post_action is not None
    kind, place = decode_action(item.post_action)
    what = f"move to {place}" if kind == "move" else kind
    if now is not None and (now.size, now.mtime_ns, now.tag) == (
        item.size,
        item.mtime_ns,
        item.inode,
    ):
        return (
            f"; its post-commit action ({what}) is still to be finished: its object is still there"
        )
    if now is not None:
        return (
            f"; another object has its key now (a newer version), which its post-commit action "
            f"({what}) leaves alone"
        )
    if kind != "move" or place is None or not is_object_url(place):
        return f"; its object is gone from the source (its post-commit action: {what})"
    archive = ObjectURL.parse("archive", place)
    store = stores.bucket(archive.bucket)
    plain = archive.key(item.relpath)
    head, _, name = plain.rpartition("/")
    keyed = f"{head}/{keyed_name(name, item.key)}" if head else keyed_name(name, item.key)
    alike = None  # an object of its size under another ETag
    try:
        for key in (keyed, plain):
            there = await store.head(key)
            if there is None or there.size != item.size:
                continue
            if there.tag == item.inode:  # its ETag: the object it handled
                return f"; its post-commit action moved it to s3://{archive.bucket}/{key}"
            alike = alike or key
    except OSError as exc:
        return f"; whether its post-commit action ({what}) is finished cannot be told: {exc}"
    if alike is not None:
        # A copy of an object uploaded in parts has another ETag (see effects._SameContent): its
        # bytes are gone from the source, so which this is cannot be told.
        return (
            f"; its object is gone from the source, and s3://{archive.bucket}/{alike} has its "
            "size but another ETag (its copy, if it was uploaded in parts; or another object)"
        )
    return f"; its object is gone from the source, and {place} holds no copy of it"


async def object_facts(
    args: argparse.Namespace, ledger: Ledger, settings: JobSettings, identity: Identity
) -> dict[str, Any]:
    """Everything ``explain`` says about the object ``args.path`` of the job whose source
    is the ``s3://`` prefix of ``settings``, as a dictionary (``--json``): the keys a file's
    answer has, and ``object`` (what the object store says of it now)."""
    url = ObjectURL.parse("source", settings.source)
    rel_text = object_relpath(url, args.path)
    rel = rel_text.encode(errors="surrogateescape")
    ready = readiness(settings)
    stores = ObjectStores()
    lister = ObjectLister(
        url,
        stores.bucket(url.bucket),
        rules=ScanRules(settings.ignore),
        recursive=settings.recursive,
        ready=ready,
    )
    now = time.time()
    try:
        obj, skipped = await _look(lister, rel_text)
    except OSError as exc:
        raise _unusable(url, exc) from None
    marker = marker_of(ready, rel) if obj is not None else None
    if marker is not None:
        skipped = None  # a marker, even where its name is one the scan skips
    st = None if obj is None or skipped is not None or marker is not None else object_stat(obj)
    key = ihash = None
    if st is not None and obj is not None:
        ihash = input_hash(identity, rel, obj.size, obj.mtime_ns, b"", obj.tag)
        key = item_key(identity, ihash, obj.mtime_ns)
    current, others, runners = await records_of(ledger, args.job, rel_text, key)
    verdicts: list[RuleVerdict] = []
    said: dict[str, str] = {}
    try:
        if st is not None:
            marks: dict[bytes, int | None] = {}
            for path in marker_paths(ready, rel):
                found = await lister.object_at(path)
                marks[path] = None if found is None else found.mtime_ns

            async def again() -> os.stat_result | None:
                found = await lister.store.head(url.key(rel_text))
                return None if found is None else object_stat(found)

            verdicts = await rule_verdicts(
                ready,
                settings,
                rel,
                st,
                known=current is not None,
                again=again,
                marker_at=marks.get,
            )
            verdicts = [_in_object_words(v) for v in verdicts]
        for item in [current, *others[:1]]:
            if item is not None and item.post_action is not None:
                said[item.key] = await _post_action_said(item, obj, stores)
    except OSError as exc:
        raise _unusable(url, exc) from None
    facts: dict[str, Any] = {
        "what": "object",
        "source": settings.source,
        "relpath": rel_text,
        "identity": identity,
        "follow_symlinks": False,
        "skipped": skipped,
        "marker": marker,
        "exists": obj is not None,
        "key": key,
        "not_ready": None
        if st is None or obj is None
        else not_ready(verdicts, _unsettled(obj, settings.settle, now, time.time())),
    }
    verdict, message = verdict_of(
        facts, current, others, runners, now, post_said=lambda item: said.get(item.key, "")
    )
    return {
        "path": f"{SCHEME}{url.bucket}/{url.key(rel_text)}",
        "relpath": rel_text,
        **answer_fields(args, settings, verdict, message, verdicts),
        "exists": obj is not None,
        "file": None
        if obj is None
        else {"size": obj.size, "mtime_ns": obj.mtime_ns, "inode": obj.tag},
        "object": None
        if obj is None
        else {
            "url": f"{SCHEME}{url.bucket}/{obj.key}",
            "key": obj.key,
            "size": obj.size,
            "mtime_ns": obj.mtime_ns,
            "etag": obj.etag,
            "version": obj.version,
            "tag": obj.tag,
        },
        "identity": identity,
        "key": key,
        "input_hash": ihash,
        "item": None if current is None else item_json(current),
        "other_items": [item_json(item) for item in others],
    }
