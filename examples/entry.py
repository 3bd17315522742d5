"""The entry script to copy: one batch over a directory, run from ``asyncio.run(main())``.

    python examples/entry.py --source inbox --state state.db --output-dir out

Each text file in ``inbox`` gets ``out/<name>.words`` holding its word count. Run it again
and nothing is redone; kill it and run it again and only the files in flight are redone.
Exit status: 0 every settled file done, 1 some failed for good, 2 bad setting,
75 another runner holds the job, 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from asyncbatch import AsyncBatchError, Batch, JobLockedError, TaskContext


async def count_words(ctx: TaskContext) -> None:
    text = (await ctx.read_bytes()).decode("utf-8")  # not UTF-8: the attempt fails, is retried
    await ctx.write_output(ctx.entry.relpath + ".words", f"{len(text.split())}\n")
    ctx.log.info("counted %d bytes", len(text))  # the record carries job, key, input_hash


async def main(args: argparse.Namespace) -> int:
    batch = Batch(
        count_words,
        source=args.source,
        state=args.state,
        output_dir=args.output_dir,
        concurrency=args.concurrency,
        settle=args.settle,
    )
    report = await batch.run(handle_signals=True)  # a signal: in-flight items finish, then stop
    print(report)
    if batch.received_signal is not None:
        return 128 + batch.received_signal
    return 0 if report.ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Count the words of every file in a directory.")
    parser.add_argument("--source", required=True, help="the directory to scan")
    parser.add_argument("--state", required=True, help="the ledger: a SQLite file")
    parser.add_argument("--output-dir", required=True, help="where the .words files go")
    parser.add_argument("-j", "--concurrency", type=int, default=8)
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds a file must be unchanged (1.0)"
    )
    try:
        sys.exit(asyncio.run(main(parser.parse_args())))
    except JobLockedError as e:  # another live runner holds this job
        print(e, file=sys.stderr)
        sys.exit(75)
    except AsyncBatchError as e:  # a bad setting or an unusable state: one line, no traceback
        print(e, file=sys.stderr)
        sys.exit(2)
