"""S3 event notifications through SQS (``--watch --events sqs://QUEUE``): which objects were
created under the source's prefix, as soon as they were.

aiobotocore is imported here only, and only when a queue is followed (obstore has no SQS).
Its client is configured from the same AWS environment as the object store's; its loggers
stay at WARNING (``asyncbatch._cli.logging``).

A message is deleted once every object it names is registered in the ledger (its claim
committed: from then on the ledger, not the queue, makes sure it is handled, by this runner or
by any later one) or found not to be an input (gone, outside the prefix, skipped by the rules).
It is held for milliseconds, so its visibility timeout never needs extending; a message that
comes back anyway (a runner killed before it deleted it) names objects the ledger knows: no
work is done twice. Notifications are not guaranteed to arrive (S3's own documentation says
so): the watch also lists the prefix every ``--backfill-interval`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote_plus

from .._errors import redact_urls
from .._exceptions import ConfigurationError, SourceError

__all__ = ["EventQueue", "Notification", "QueueURL", "object_keys"]

log = logging.getLogger("asyncbatch")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}(\.fifo)?")
#: Seconds a receive waits for a message (SQS's longest long poll).
LONG_POLL = 20


@dataclass(frozen=True, slots=True)
class QueueURL:
    """``sqs://QUEUE``: a queue of the account the credentials belong to."""

    name: str

    @classmethod
    def parse(cls, setting: str, text: str) -> QueueURL:
        """The queue named by ``text``; :class:`ConfigurationError` naming ``setting`` else."""
        name = text.removeprefix("sqs://") if text.startswith("sqs://") else ""
        if not _NAME.fullmatch(name):
            raise ConfigurationError.bad_value(setting, text, "expected sqs://QUEUE")
        return cls(name)

    def __str__(self) -> str:
        return f"sqs://{self.name}"


def object_keys(body: str, bucket: str) -> list[str]:
    """The keys of the objects created in ``bucket`` that a notification's body names (none
    for a test event, another bucket, a removal, or a body that is not an S3 event)."""
    try:
        event = json.loads(body)
    except ValueError:
        return []
    records = event.get("Records") if isinstance(event, dict) else None
    keys: list[str] = []
    for record in records if isinstance(records, list) else []:
        try:
            created = str(record["eventName"]).startswith("ObjectCreated:")
            s3 = record["s3"]
            if created and s3["bucket"]["name"] == bucket:
                keys.append(unquote_plus(s3["object"]["key"]))
        except (KeyError, TypeError):
            continue
    return keys


@dataclass(frozen=True, slots=True)
class Notification:
    """One message: its receipt handle (to delete it) and the object keys it names."""

    receipt: str
    keys: list[str]


class EventQueue:
    """A queue's client, opened with ``async with``; requests counted in ``requests`` (as
    ``sqs_receive``, ``sqs_delete``)."""

    def __init__(self, queue: QueueURL, bucket: str, requests: dict[str, int]) -> None:
        self.queue = queue
        self.bucket = bucket
        self._requests = requests
        self._client: Any = None
        self._context: Any = None
        self._url = ""

    async def __aenter__(self) -> EventQueue:
        from aiobotocore.session import get_session  # only here: see the module's docstring

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        try:
            context = get_session().create_client("sqs", region_name=region)
            self._client = await context.__aenter__()
            self._context = context  # entered: closed by __aexit__
            answer = await self._client.get_queue_url(QueueName=self.queue.name)
        except Exception as exc:
            await self.__aexit__(None, None, None)
            said = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            why = f"{type(exc).__name__}: {redact_urls(said)}" if said else type(exc).__name__
            raise SourceError(f"cannot open {self.queue}: {why}") from None
        self._url = answer["QueueUrl"]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context, self._context, self._client = self._context, None, None
        if context is not None:
            await context.__aexit__(exc_type, exc, tb)

    def _count(self, operation: str, n: int = 1) -> None:
        self._requests[operation] = self._requests.get(operation, 0) + n

    async def receive(self, wait: float = LONG_POLL) -> list[Notification]:
        """Up to 10 messages, waiting up to ``wait`` seconds (a long poll) for the first."""
        self._count("sqs_receive")
        try:
            answer = await self._client.receive_message(
                QueueUrl=self._url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=max(0, min(LONG_POLL, int(wait))),
            )
        except Exception as exc:
            raise OSError(f"receive from {self.queue} failed: {type(exc).__name__}") from None
        return [
            Notification(m["ReceiptHandle"], object_keys(m.get("Body", ""), self.bucket))
            for m in answer.get("Messages", [])
        ]

    async def delete(self, receipts: Sequence[str]) -> None:
        """Delete these messages (10 a request); a failure is logged: the message comes back
        after its visibility timeout, naming objects the ledger knows by then."""
        for start in range(0, len(receipts), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": r}
                for i, r in enumerate(receipts[start : start + 10])
            ]
            self._count("sqs_delete")
            try:
                answer = await self._client.delete_message_batch(
                    QueueUrl=self._url, Entries=entries
                )
            except Exception as exc:
                log.warning("cannot delete messages of %s: %s", self.queue, type(exc).__name__)
                continue
            if answer.get("Failed"):
                log.debug("%d messages of %s not deleted", len(answer["Failed"]), self.queue)


class HeldMessages:
    """The messages received and not deleted yet, and the relpaths each still waits for."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[bytes]] = {}  # receipt -> relpaths not resolved
        self._by_path: dict[bytes, set[str]] = {}  # relpath -> receipts waiting for it

    def __len__(self) -> int:
        return len(self._waiting)

    def hold(self, receipt: str, relpaths: Sequence[bytes]) -> None:
        """A message naming these relpaths (under the source's prefix) is held."""
        self._waiting.setdefault(receipt, set()).update(relpaths)
        for rel in relpaths:
            self._by_path.setdefault(rel, set()).add(receipt)

    def resolve(self, relpaths: Iterable[bytes]) -> list[str]:
        """These relpaths are registered in the ledger, or are no inputs: the receipts of the
        messages that waited for nothing else (to delete now)."""
        done: list[str] = []
        for rel in relpaths:
            for receipt in self._by_path.pop(rel, ()):
                waiting = self._waiting.get(receipt)
                if waiting is None:
                    continue
                waiting.discard(rel)
                if not waiting:
                    del self._waiting[receipt]
                    done.append(receipt)
        return done
