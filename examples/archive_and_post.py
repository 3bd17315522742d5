"""Post each file of an inbox to an HTTP API; archive the file once its completion is recorded.

    python examples/archive_and_post.py --api http://127.0.0.1:8000/documents \\
        --source inbox --archive archive --state state.db

Every POST made through ``ctx.http`` carries an ``Idempotency-Key`` derived from the job, the
file's identity and the call, the same in every attempt (also after a crash and a restart), so
an API that honours the header (``asyncbatch.IdempotencyMiddleware`` does) applies each file
once even when the upload is repeated. Transient failures (connection errors, timeouts, 5xx,
409, 429) are retried with the same key. A file is moved to the archive only after its
completion committed (``on_done="move:DIR"``); a crash in between is finished by the next run
without posting again.

Every option can also come from the environment: API_URL, SOURCE, ARCHIVE, STATE.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from pathlib import Path

from asyncbatch import AsyncBatchError, Batch, JobLockedError, TaskContext


async def post_file(api_url: str, ctx: TaskContext) -> None:
    data = await ctx.read_bytes()
    response = await ctx.http.post(
        api_url,
        content=data,  # the body must be the same in every attempt: the server compares it
        params={"name": ctx.entry.relpath},
        headers={"Content-Type": "application/octet-stream"},
    )
    response.raise_for_status()  # 4xx (after retries: 5xx) fails the attempt; it is retried
    ctx.log.info("posted %d bytes: HTTP %d", len(data), response.status_code)


async def main(args: argparse.Namespace) -> int:
    Path(args.archive).mkdir(parents=True, exist_ok=True)
    batch = Batch(
        functools.partial(post_file, args.api),
        source=args.source,
        state=args.state,
        job="post",
        on_done=f"move:{args.archive}",
        concurrency=args.concurrency,
        settle=args.settle,
    )
    report = await batch.run(handle_signals=True)
    print(report)
    if batch.received_signal is not None:
        return 128 + batch.received_signal
    return 0 if report.ok else 1


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Post every file to an API, then archive it.")
    parser.add_argument("--api", default=env("API_URL"), required="API_URL" not in os.environ)
    parser.add_argument("--source", default=env("SOURCE", "inbox"), help="(SOURCE, inbox)")
    parser.add_argument("--archive", default=env("ARCHIVE", "archive"), help="(ARCHIVE, archive)")
    parser.add_argument("--state", default=env("STATE", "state.db"), help="(STATE, state.db)")
    parser.add_argument("-j", "--concurrency", type=int, default=4)
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds a file must be unchanged (1.0)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except JobLockedError as e:
        print(e, file=sys.stderr)
        sys.exit(75)
    except AsyncBatchError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
