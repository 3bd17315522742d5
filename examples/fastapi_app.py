"""A FastAPI application that watches an inbox while it serves requests, as a service.

    INBOX=inbox OUTBOX=outbox STATE=state.db uvicorn examples.fastapi_app:app

- The application's lifespan starts ``Batch.watch()`` over ``INBOX`` in a background task: each
  file dropped there (once settled) gets ``OUTBOX/<name>.sha256``. On shutdown the lifespan
  calls ``batch.stop()``: no new items, in-flight ones finish (``grace`` seconds at most), and
  ``watch()`` returns, releasing the job lock.
- ``GET /status`` shows the watcher's counters; ``POST /orders`` is an endpoint of the
  application's own API with a side effect (a line appended to ``ORDERS``).
- Operations (``asyncbatch help operations``): the batch keeps Prometheus metrics
  (``metrics=True``) and ``batch.metrics_app()`` is mounted at ``/ops``: ``GET /ops/metrics``
  for Prometheus. ``GET /healthz`` and ``GET /readyz`` are the probes (200 or 503, with the
  reasons as JSON): live while the watcher runs and its heartbeat is fresh; ready while it also
  holds its lock, its ledger answers, its polls go on and it is not stopping.
- The application runs behind ``IdempotencyMiddleware``: a POST carrying an
  ``Idempotency-Key`` runs once; a retry with the same key and the same request gets the stored
  response with ``Idempotent-Replayed: true``, and the order is not placed twice.

Settings come from the environment: ``INBOX`` (default ``inbox``), ``OUTBOX`` (``outbox``),
``STATE`` (``state.db``: the ledger, shared by the batch and the middleware), ``ORDERS``
(``orders.jsonl``), ``SETTLE`` and ``POLL`` (seconds, default 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from asyncbatch import Batch, IdempotencyMiddleware, TaskContext

INBOX = Path(os.environ.get("INBOX", "inbox"))
OUTBOX = Path(os.environ.get("OUTBOX", "outbox"))
STATE = Path(os.environ.get("STATE", "state.db"))
ORDERS = Path(os.environ.get("ORDERS", "orders.jsonl"))
SETTLE = float(os.environ.get("SETTLE", "1"))
POLL = float(os.environ.get("POLL", "1"))

log = logging.getLogger("fastapi_app")


async def checksum(ctx: TaskContext) -> None:
    """The batch's handler: write the sha256 of each inbox file to the outbox."""
    digest = hashlib.sha256(await ctx.read_bytes()).hexdigest()
    await ctx.write_output(ctx.entry.relpath + ".sha256", digest + "\n")


async def watch_inbox(
    api: FastAPI, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run the watcher until ``batch.stop()``; if it fails, the API goes on serving."""
    api.state.watching = True
    task_status.started()
    try:
        report = await api.state.batch.watch(poll=POLL)
    except Exception as e:  # e.g. JobLockedError: another process watches this inbox
        log.error("the inbox watcher stopped: %s", e)
        api.state.watch_error = str(e)
    else:
        log.info("the inbox watcher stopped: %s", report)
    finally:
        api.state.watching = False


for directory in (INBOX, OUTBOX, ORDERS.parent):
    directory.mkdir(parents=True, exist_ok=True)
# Made at import, so that its metrics app can be mounted below; it runs in the lifespan.
batch = Batch(
    checksum,
    source=INBOX,
    state=STATE,
    output_dir=OUTBOX,
    settle=SETTLE,
    grace=10,
    metrics=True,  # its own Prometheus registry (pip install 'asyncbatch[metrics]')
)


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    api.state.batch, api.state.watch_error = batch, None
    async with anyio.create_task_group() as tg:
        # start() returns once watch() is under way, so the stop() below cannot miss it.
        await tg.start(watch_inbox, api)
        try:
            yield
        finally:
            batch.stop()  # no new items; the task group then waits for watch() to return


api = FastAPI(title="asyncbatch example", lifespan=lifespan)
# GET /ops/metrics: the batch's metrics, for Prometheus (and /ops/healthz, /ops/readyz).
api.mount("/ops", batch.metrics_app())


@api.get("/healthz")
async def healthz() -> JSONResponse:
    """Liveness: the watcher runs and its heartbeat is fresh (else 503: restart the pod)."""
    health = batch.health()
    return JSONResponse(health.as_dict(), status_code=200 if health.live else 503)


@api.get("/readyz")
async def readyz() -> JSONResponse:
    """Readiness: live, and the watcher holds its lock, its ledger answers, its polls go on."""
    health = batch.health()
    return JSONResponse(health.as_dict(), status_code=200 if health.ready else 503)


@api.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """The watcher's counters since the application started."""
    stats = request.app.state.batch.statistics()
    return {
        "watching": request.app.state.watching,
        "error": request.app.state.watch_error,
        "statistics": dataclasses.asdict(stats) if stats is not None else None,
    }


class Order(BaseModel):
    item: str = Field(min_length=1, max_length=200)
    quantity: int = Field(gt=0, le=1000)


@api.post("/orders", status_code=201)
async def place_order(order: Order) -> dict[str, Any]:
    """Place an order: one line in ORDERS. Send an Idempotency-Key to make retries safe."""
    placed = {"id": uuid.uuid4().hex, **order.model_dump()}
    line = json.dumps(placed) + "\n"
    async with await anyio.open_file(ORDERS, "a", encoding="utf-8") as f:
        await f.write(line)
    return placed


# Every unsafe request with an Idempotency-Key runs once. Added with add_middleware, it sits
# inside FastAPI's error handling: an endpoint that raises frees its key (a retry runs it
# again), while a response the endpoint returns, whatever its status, is stored and replayed.
api.add_middleware(IdempotencyMiddleware, state=STATE)
app = api  # what uvicorn serves: uvicorn examples.fastapi_app:app
