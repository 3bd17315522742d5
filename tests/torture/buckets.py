"""The torture's scenario over an ``s3://`` inbox: a corpus of objects in a bucket of the test
S3 server (moto on 127.0.0.1, :mod:`tests.s3`), outputs and the archive in the same bucket.

A :class:`BucketScenario` is a :class:`~tests.torture.harness.Scenario` whose inbox, output
directory and archive are prefixes of one bucket (``in/``, ``out/``, ``archive/``): runners
``--source s3://B/in/ --output-dir s3://B/out/ --on-done move:s3://B/archive/``, reading their
AWS environment from :meth:`tests.s3.MotoServer.env` (the server runs in the pytest process;
the runners are subprocesses). After recovery :meth:`BucketScenario.invariants` measures what
the directory scenario measures, on the bucket's keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..s3 import Bucket
from .handlers import expected_output, output_name
from .harness import (
    HANDLERS,
    MARKER,
    Job,
    Receiver,
    corpus_bytes,
    create_ledger_with_audit,
    digest,
    marker_invariants,
)

INBOX, OUT, ARCHIVE = "in/", "out/", "archive/"


@dataclass
class BucketScenario(Job):
    """One job over a corpus of objects, and everything needed to check it after any number of
    kills (the counterpart of :class:`~tests.torture.harness.Scenario`)."""

    root: Path
    state: str
    bucket: Bucket
    url: str | None = None
    jobs: int = 4
    extra: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    #: Each object comes with a marker (``NAME.done``, put after it), and the job is ready by
    #: ``marker:.done``: markers follow their objects to the archive.
    markers: bool = False
    original: dict[str, str] = field(default_factory=dict)
    generation: int = 0

    def __post_init__(self) -> None:
        self.calls = self.root / "calls.log"
        self.env = {**self.bucket.env, **self.env}
        create_ledger_with_audit(self.state)

    def add_files(self, count: int) -> None:
        """Put ``count`` objects of varied sizes and bytes (a new generation of names)."""
        g = self.generation
        self.generation += 1
        for i in range(count):
            name = f"g{g:03d}-{i:05d}.dat"
            data = corpus_bytes(name, i)
            self.bucket.put(INBOX + name, data)
            self.original[name] = digest(data)
            if self.markers:
                self.bucket.put(INBOX + name + MARKER, b"")

    def args(self) -> list[str]:
        return [
            "run",
            f"{HANDLERS}:transform_and_post",
            "--source",
            self.bucket.url(INBOX),
            "--state",
            self.state,
            "--output-dir",
            self.bucket.url(OUT),
            "--on-done",
            f"move:{self.bucket.url(ARCHIVE)}",
            "-j",
            str(self.jobs),
            "--no-progress",
            "--settle",
            "0",  # LastModified is to the second: the objects were put a moment ago
            "--claim-batch",
            "32",
            "--max-attempts",
            "100",
            "--max-interruptions",
            "1000",
            *(["--ready", f"marker:{MARKER}"] if self.markers else []),
            *self.extra,
        ]

    def objects(self, prefix: str) -> dict[str, bytes]:
        """The objects under ``prefix`` (not below a further ``/``): name -> bytes."""
        found: dict[str, bytes] = {}
        for key in self.bucket.keys(prefix):
            body = self.bucket.get(key)
            if body is not None:
                found[key[len(prefix) :]] = body
        return found

    def invariants(self, receiver: Receiver | None = None) -> dict[str, int]:
        """Everything that must be zero after recovery, measured on the bucket and the ledger."""
        inbox_bytes = self.objects(INBOX)
        inbox = {n: digest(b) for n, b in inbox_bytes.items()}
        archived_bytes = self.objects(ARCHIVE)
        archived = {n: digest(b) for n, b in archived_bytes.items()}
        outputs = self.objects(OUT)
        found: dict[str, int] = {}
        if self.markers:
            found.update(marker_invariants(self.original, inbox, archived))
        kept = {n for n, h in self.original.items() if inbox.get(n) == h or archived.get(n) == h}
        found["files_lost"] = len(self.original) - len(kept)
        found["files_in_both_inbox_and_archive"] = len(set(inbox) & set(archived))
        found["files_not_archived"] = len(set(self.original) - set(archived))
        # An archive copy under a keyed name (``name.<key>.ext``) would be a second copy.
        found["unknown_files"] = len((set(inbox) | set(archived)) - set(self.original))
        found.update(self.ledger_invariants())
        torn = missing = 0
        for name in self.original:
            out = outputs.get(output_name(name))
            source = archived_bytes.get(name, inbox_bytes.get(name))
            if out is None:
                missing += 1
            elif source is None or out != expected_output(source):
                torn += 1
        found["torn_outputs"] = torn
        found["missing_outputs"] = missing
        found["unknown_outputs"] = len(set(outputs) - {output_name(n) for n in self.original})
        found["keys_outside_the_three_prefixes"] = len(
            [k for k in self.bucket.keys("") if not k.startswith((INBOX, OUT, ARCHIVE))]
        )
        found.update(self.receiver_and_integrity(receiver))
        return found
