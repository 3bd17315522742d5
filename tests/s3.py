"""A real S3 API on 127.0.0.1 for the tests: moto's ``ThreadedMotoServer``, one per session.

Each test gets a bucket of its own (:class:`Bucket`) and the standard AWS environment that
points a client at the server (``AWS_ENDPOINT_URL``, keys, region, ``AWS_ALLOW_HTTP``). The
secret key is a canary: tests check it never shows in a log, a ledger or ``/metrics``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

#: The secret key the tests use: it must never be printed or stored anywhere.
CANARY_SECRET = "canary-SECRET-6f1d2c9a-never-print-me"


@dataclass
class MotoServer:
    """The running server: its endpoint URL."""

    endpoint: str
    server: Any

    def env(self) -> dict[str, str]:
        """The AWS environment that points clients at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "AKIATESTCANARY",
            "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }


def start_server() -> Generator[MotoServer, None, None]:
    """Start moto on a free port of 127.0.0.1; stop it when the generator closes."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(f"http://{host}:{port}", server)
    finally:
        server.stop()


class Bucket:
    """A fresh bucket on the server, and a boto3 client to arrange and inspect it."""

    def __init__(self, server: MotoServer, *, versioned: bool = False) -> None:
        import boto3

        env = server.env()
        self.name = f"ab-{uuid.uuid4().hex[:16]}"
        self.env = env
        self.client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )
        self.client.create_bucket(Bucket=self.name)
        if versioned:
            self.client.put_bucket_versioning(
                Bucket=self.name, VersioningConfiguration={"Status": "Enabled"}
            )

    def url(self, prefix: str = "") -> str:
        """``s3://BUCKET/PREFIX``."""
        return f"s3://{self.name}/{prefix}"

    def put(self, key: str, body: bytes) -> str:
        """Upload ``body`` at ``key``; its ETag."""
        etag: str = self.client.put_object(Bucket=self.name, Key=key, Body=body)["ETag"]
        return etag

    def put_in_parts(self, key: str, parts: list[bytes]) -> str:
        """Upload ``parts`` at ``key`` as a multipart upload (every part but the last at
        least 5 MiB, as S3 wants); its ETag (``"...-N"``)."""
        upload = self.client.create_multipart_upload(Bucket=self.name, Key=key)["UploadId"]
        done = [
            {
                "PartNumber": n,
                "ETag": self.client.upload_part(
                    Bucket=self.name, Key=key, PartNumber=n, UploadId=upload, Body=body
                )["ETag"],
            }
            for n, body in enumerate(parts, 1)
        ]
        etag: str = self.client.complete_multipart_upload(
            Bucket=self.name, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
        )["ETag"]
        return etag

    def get(self, key: str) -> bytes | None:
        """The object's body, or ``None``."""
        try:
            body: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return body

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def versions(self, prefix: str = "") -> list[tuple[str, bytes]]:
        """Every version of every object under ``prefix`` (a versioned bucket: one per
        ``PUT``), as ``(key, body)``, oldest first for each key."""
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.name, Prefix=prefix
        )
        newest_first: dict[str, list[bytes]] = {}  # as S3 lists them: each key's newest first
        for page in pages:
            for v in page.get("Versions", []):
                body = self.client.get_object(
                    Bucket=self.name, Key=v["Key"], VersionId=v["VersionId"]
                )["Body"].read()
                newest_first.setdefault(v["Key"], []).append(body)
        return [(key, body) for key, bodies in newest_first.items() for body in bodies[::-1]]

    def last_modified(self, key: str) -> dt.datetime:
        """The object's LastModified."""
        when: dt.datetime = self.client.head_object(Bucket=self.name, Key=key)["LastModified"]
        return when
