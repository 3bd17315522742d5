"""The seed's recipe, HTTP-bound: ``ThreadPoolExecutor(64)`` and a sync ``httpx.Client``.

``python -m benchmarks.systems.http_recipe --source DIR --state FILE --url URL [--workers 64]``

The per-file SQLite bookkeeping of :mod:`benchmarks.systems.recipe` (skip if done, lock row,
done row, delete the lock row: a commit each), with the work being: read the file and POST it
with an ``Idempotency-Key`` (the sha256 of its relpath), through one shared ``httpx.Client``
whose pool keeps a connection per thread alive (``max_keepalive_connections=64``: with the
default 20, connections churn, and now and then a thread reads from one the pool has just
closed: ``ReadError: Bad file descriptor``; a client per thread costs an SSL context each,
~50 MiB and seconds of CPU for 64). A non-200 answer or a transport error raises and stops the
run: the measurement then fails.
"""

from __future__ import annotations

import hashlib

import httpx

from ._scan import emit, source_args
from .recipe import run


def main() -> None:
    parser = source_args(__doc__ or "http_recipe")
    parser.add_argument("--state", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, default=64)
    args = parser.parse_args()
    url: str = args.url
    limits = httpx.Limits(max_connections=args.workers, max_keepalive_connections=args.workers)
    with httpx.Client(timeout=30.0, limits=limits) as client:

        def post(path: str, relpath: str) -> None:
            with open(path, "rb") as f:
                data = f.read()
            key = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).hexdigest()
            client.post(url, content=data, headers={"Idempotency-Key": key}).raise_for_status()

        result = run(
            args.source, args.state, recursive=args.recursive, workers=args.workers, work=post
        )
    emit(result)


if __name__ == "__main__":
    main()
