"""The HTTP-bound limit: a bare ``httpx.AsyncClient`` loop, no ledger, no retries.

``python -m benchmarks.systems.http_bare --source DIR --url URL [--concurrency 64]``

Lists the inbox like the other hand-written systems, then ``--concurrency`` tasks each take
the next file, read it (inline: a 128-byte read) and POST it with an ``Idempotency-Key`` (the
sha256 of its relpath, so the server's middleware does the same work as for asyncbatch's
keyed calls). One default ``httpx.AsyncClient``, as ``ctx.http`` has (its pool keeps 20
connections alive; keeping 64 costs more CPU here: httpcore scans every pooled connection for
each request).
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx

from ._scan import ScannedFile, emit, scan, source_args


async def post_all(files: list[ScannedFile], url: str, concurrency: int) -> tuple[int, int]:
    """POST every file; ``(answered 200, other answers or errors)``."""
    ok = errors = 0
    pending = iter(files)
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def worker() -> None:
            nonlocal ok, errors
            for _, relpath, path, _ in pending:
                with open(path, "rb") as f:
                    data = f.read()
                key = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).hexdigest()
                try:
                    response = await client.post(
                        url, content=data, headers={"Idempotency-Key": key}
                    )
                except httpx.HTTPError:
                    errors += 1
                    continue
                if response.status_code == 200:
                    ok += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors


def main() -> None:
    parser = source_args(__doc__ or "http_bare")
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    started = time.perf_counter()
    files = scan(args.source, recursive=args.recursive)
    scanned = time.perf_counter()
    ok, errors = asyncio.run(post_all(files, args.url, args.concurrency))
    emit(
        {
            "handled": ok,
            "errors": errors,
            "seen": len(files),
            "scan_s": scanned - started,
            "post_s": time.perf_counter() - scanned,
        }
    )


if __name__ == "__main__":
    main()
