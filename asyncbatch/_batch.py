"""``Batch``: the public entry point of the library."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import sniffio

from . import _failpoints as failpoints
from ._config import BatchConfig
from ._errors import error_text, unwrap_group
from ._exceptions import AsyncBatchError, ConfigurationError
from ._pipeline import Handler, Mode, Recorder, Run, RunObservation
from ._pipeline.workers import HandlerAborted
from ._report import Report, Statistics
from ._service import endpoints, server
from ._service.checks import health_of
from ._service.health import Health, not_running

if TYPE_CHECKING:
    import httpx
    from prometheus_client import CollectorRegistry

    from ._service.endpoints import ASGIApp

__all__ = ["Batch"]

log = logging.getLogger("asyncbatch")


def _takes_one_argument(obj: Any) -> str | None:
    """Why ``obj`` cannot be called with one positional argument (the task context), when
    ``inspect.signature`` can tell; ``None`` when it can, or when that cannot be told (a
    builtin without a signature, ``*args``)."""
    try:
        # Not the function a decorator wraps (functools.wraps): the wrapper is what is called,
        # and may supply the wrapped one's other arguments itself.
        sig = inspect.signature(obj, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(object())
    except TypeError as e:
        return f"its signature {sig} cannot take the task context alone ({e})"
    return None


def _is_async_callable(obj: Any) -> bool:
    while hasattr(obj, "func"):  # functools.partial
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004
    )


class Batch:
    """A reentrant batch job over the settled files of ``source``, recorded in ``state``.

    ``handler`` is an ``async def handler(ctx: TaskContext)``; it is called once per item per
    attempt. ``await batch.run()`` handles every settled file that is not done yet and returns a
    :class:`Report`; ``await batch.watch()`` keeps polling until stopped or cancelled.

    Guarantees: a file's completion is recorded exactly once (an item is done when its ledger row
    commits, and only then); a run killed at any instant loses nothing and the next run redoes
    only the items that were in flight; several runners (``shared=True``) never complete the same
    item twice. The handler itself runs *at least once* per item: make its effects idempotent
    (``ctx.write_output``, ``ctx.move``, ``ctx.http``).

    ``handler`` aside, every argument is keyword-only: the settings below (each one's type,
    default, bounds and command-line flag live in :class:`~asyncbatch._config.BatchConfig`),
    and three that are not settings:

    - ``http``: an ``httpx.AsyncClient`` or transport for ``ctx.http`` (one is made otherwise).
    - ``clock``: the wall clock (a test seam).
    - ``metrics`` [--metrics]: ``True`` keeps Prometheus metrics in this batch's own registry
      (:attr:`metrics_registry`; mount :meth:`metrics_app` into an ASGI app); ``"HOST:PORT"``
      also serves ``/metrics``, ``/healthz`` and ``/readyz`` there while ``run()``/``watch()``
      runs (port 0: a free one, see :attr:`metrics_address`). Needs ``prometheus-client``
      (``pip install 'asyncbatch[metrics]'``). :meth:`health` works either way.

    Raises :class:`ConfigurationError` for a bad or unknown setting (here, before anything is
    touched).

    Settings (the command-line flag in brackets):
    """

    def __init__(
        self,
        handler: Handler,
        *,
        http: httpx.AsyncClient | httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        metrics: bool | str = False,
        **settings: Any,
    ) -> None:
        if failpoints.PROBLEM is not None:
            raise ConfigurationError(failpoints.PROBLEM)
        if not _is_async_callable(handler):
            raise ConfigurationError.bad_value(
                "handler", getattr(handler, "__name__", handler), "an async function (async def)"
            )
        if (why := _takes_one_argument(handler)) is not None:
            raise ConfigurationError.bad_value(
                "handler",
                getattr(handler, "__name__", handler),
                f"an async function called with one argument, the task context: {why}",
            )
        self.handler = handler
        self.config = BatchConfig.from_settings(**settings)
        if getattr(handler, "needs_local_files", False) and self.config.objects is not None:
            # (an ExecHandler) refused here, before the ledger is opened: at the first item the
            # job would already be recorded with its source, and its items registered
            raise ConfigurationError.bad_value(
                "source",
                str(self.config.objects),
                "a directory for a command (--exec): an object has no local path to give it "
                "(a Python handler reads it with ctx.read_bytes())",
            )
        self._http = http
        self._clock = clock
        #: When this batch's runs start, in ``clock``'s time, if earlier than ``run()`` is
        #: called (the command line: when its process began; see ``RunState.started_at``).
        self._started_at: float | None = None
        self._run: Run | None = None
        self._last_statistics: Statistics | None = None
        self._stop_pending = False
        self._ended = "no run() or watch() has started yet"
        #: The signal that stopped the last run (``handle_signals=True``), if any.
        self.received_signal: int | None = None
        self._serve_at: str | None = None
        self._address: tuple[str, int] | None = None
        self._recorder: Recorder | None = None
        self._registry: CollectorRegistry | None = None
        self._endpoints = endpoints.Endpoints(self.health, None)
        if metrics is not False:
            self._enable_metrics(metrics)

    def _enable_metrics(self, metrics: bool | str) -> None:
        if isinstance(metrics, str):
            endpoints.parse_address(metrics)  # a one-line ConfigurationError if it is not one
            self._serve_at = metrics
        elif metrics is not True:
            raise ConfigurationError.bad_value(
                "metrics", metrics, "True, False or 'HOST:PORT' (e.g. '127.0.0.1:9108')"
            )
        try:
            from ._service import metrics as prometheus  # only with metrics on
        except ImportError as e:
            raise ConfigurationError(
                f"metrics need the prometheus-client package ({e}): "
                "pip install 'asyncbatch[metrics]'"
            ) from None
        self._recorder = Recorder()
        collector = prometheus.BatchCollector(
            self.config.job, self._recorder, self._observe, self.health
        )
        registry = self._registry = prometheus.make_registry(collector)
        self._endpoints.metrics = lambda: (prometheus.exposition(registry), prometheus.CONTENT_TYPE)

    async def run(self, *, handle_signals: bool = False) -> Report:
        """Handle every settled file that is not done yet (every file its readiness rules,
        ``ready``, hold for); return what happened (and what is not ready yet, by rule).

        Failed items are retried with backoff within the run, up to ``max_attempts``. With
        ``handle_signals``, SIGINT/SIGTERM stop the run gracefully (in-flight items get
        ``grace`` seconds; a second signal cancels them at once); the report says ``stopped``.
        So does SIGHUP (a terminal or an ssh session that hung up), unless it is ignored
        (``nohup``) or handled by the application. The handlers the signals had before (the
        application's own) are theirs again once the run is over. On cancellation the
        in-flight items go back to the ledger and the lock is released.

        Raises :class:`JobLockedError` if another live runner holds the job (not ``shared``),
        :class:`ConfigurationError` if the job records another source or identity (or other
        readiness rules, and ``ready`` was not given), or if the source, ``output_dir`` or an
        archive directory is no longer there (or usable) when it starts,
        :class:`LedgerError` if the state cannot be used, :class:`LockLostError` if the lock
        was taken over while running. An ``event_queue`` is for :meth:`watch`: a run lists
        the source once and reads no queue (:class:`ConfigurationError`, before the state is
        opened).
        """
        if self.config.event_queue is not None:
            raise ConfigurationError.bad_value(
                "event_queue",
                str(self.config.event_queue),
                "nothing for run(): a queue of S3 event notifications is read by watch() (a "
                "run lists the source once)",
            )
        return await self._execute("run", handle_signals)

    async def watch(self, *, poll: float | None = None, handle_signals: bool = False) -> Report:
        """Keep watching ``source`` until :meth:`stop` (or a signal) ends it, or cancellation.

        The source is polled every ``poll`` seconds; with ``events`` (the default, when
        ``watchfiles`` is installed) a change wakes the watch at once, and a file seen but not
        settled is looked at again the moment it will be. A file is handled once it is settled
        and two looks found it unchanged (``settle`` seconds apart if its mtime was already
        old when first seen), and every other readiness rule of the job holds (``ready``: a
        marker's arrival makes its file ready). Events that cannot be had (``watchfiles``
        missing, the inotify limits reached, a network filesystem) are one warning; polling
        goes on.
        """
        if poll is not None:
            self.config = _replace_poll(self.config, poll)
        return await self._execute("watch", handle_signals)

    def stop(self) -> None:
        """Ask the running ``run()``/``watch()`` to stop: no new items, in-flight ones finish.

        Called while no run is under way (before the first has begun, an application shutting
        down at once, or between two), it makes the next ``run()``/``watch()`` stop as soon as
        it starts, so nothing waits for a watch that had not started yet.
        """
        if self._run is not None:
            self._run.request_stop()
        else:
            self._stop_pending = True

    def health(self) -> Health:
        """Whether this batch is live and ready now, with the reasons (see :class:`Health`).

        Live: a ``run()``/``watch()`` is under way and its heartbeat renewed its lock and
        leases recently. Ready: live, and it holds its job lock (or shared, its runner record),
        its ledger answers, its first scan is done (watching: its polls go on), and it is not
        stopping. Never waits and probes nothing: it reads what the run observed.
        """
        if self._run is not None:
            return health_of(self._run.observe(), time.monotonic())
        return not_running(self._ended)

    def _observe(self) -> RunObservation | None:
        """What the run under way observed (``None``: none is)."""
        return None if self._run is None else self._run.observe()

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """This batch's own ``prometheus_client.CollectorRegistry`` (its metrics, and nothing
        else): for ``prometheus_client.make_asgi_app(registry)``, ``generate_latest`` or a
        push gateway. Raises :class:`ConfigurationError` when the batch has metrics off."""
        if self._registry is None:
            raise ConfigurationError(
                "this Batch has metrics off: create it with metrics=True (or 'HOST:PORT')"
            )
        return self._registry

    def metrics_app(self) -> ASGIApp:
        """An ASGI application answering ``GET /metrics`` (and ``/``) with this batch's
        metrics, ``/healthz`` and ``/readyz`` with its health (200 or 503, a JSON body of the
        reasons), relative to where it is mounted: ``app.mount("/ops", batch.metrics_app())``.

        Raises :class:`ConfigurationError` when the batch has metrics off.
        """
        self.metrics_registry  # noqa: B018 (raises when metrics are off)
        return endpoints.EndpointsApp(self._endpoints)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` where ``metrics="HOST:PORT"`` serves while a run is under way
        (the port chosen, for port 0), else ``None``."""
        return self._address

    def statistics(self) -> Statistics | None:
        """A snapshot of the current run's counters (or the last run's final ones; ``None``
        before the first run)."""
        if self._run is not None:
            return self._run.statistics()
        return self._last_statistics

    async def _execute(self, mode: Mode, handle_signals: bool) -> Report:
        if self._run is not None:
            raise AsyncBatchError(
                "this Batch is already running; create another Batch to run it concurrently"
            )
        try:
            # The directories were there when this Batch was made; an application's Batch
            # can outlive them (an inbox deleted or unmounted): one line, before anything.
            self.config.check_places()
        except ConfigurationError as e:
            self._ended = f"the last {mode}() did not start: {e}"
            raise
        listener = None
        if self._serve_at is not None:
            # Before anything is touched: a metrics address in use stops the run here.
            try:
                listener = await endpoints.listen(self._serve_at)
            except ConfigurationError as e:
                self._ended = f"the last {mode}() did not start: {e}"
                raise
        run = Run(
            self.config,
            self.handler,
            mode=mode,
            http=self._http,
            clock=self._clock,
            metrics=self._recorder,
            started_at=self._started_at,
        )
        self._run = run
        if self._stop_pending:
            self._stop_pending = False
            run.request_stop()
        self.received_signal = None
        try:
            report = await self._execute_with(run, handle_signals, listener)
            self._ended = f"the last {mode}() ended: {report.exit_status} ({report})"
            return report
        except HandlerAborted as abort:
            self._ended = f"the last {mode}() stopped: {abort}"
            # Everything is released: now the handler's SystemExit, KeyboardInterrupt or other
            # BaseException goes on to the caller, as it would without asyncbatch.
            original = abort.original
            original.add_note(
                f"raised by the handler for {abort.relpath!r}; the run stopped and put its "
                "in-flight items back"
            )
            raise original from original.__cause__
        except anyio.get_cancelled_exc_class():
            # (as its history row says: "cancelled", not a failure)
            self._ended = f"the last {mode}() was cancelled: its in-flight items went back"
            raise
        except BaseException as exc:
            self._ended = f"the last {mode}() failed: {error_text(exc)}"
            raise
        finally:
            self._last_statistics = run.statistics()
            if self._recorder is not None:
                self._recorder.run_ended(run.observe())
            self._run = None

    async def _execute_with(
        self,
        run: Run,
        handle_signals: bool,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None,
    ) -> Report:
        """``run.execute()``, beside the signal handler and the metrics server if wanted."""
        if not handle_signals and listener is None:
            return await run.execute()
        report: Report | None = None
        try:
            async with anyio.create_task_group() as tg:
                if handle_signals:
                    tg.start_soon(self._on_signals, run)
                if listener is not None:
                    self._address = endpoints.bound_address(listener)
                    log.info("serving /metrics, /healthz, /readyz on %s:%d", *self._address)
                    tg.start_soon(self._serve, listener)
                    listener = None  # closed by _serve()
                try:
                    report = await run.execute()
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        finally:
            self._address = None
            if listener is not None:
                await listener.aclose()
        assert report is not None
        return report

    async def _serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """The endpoints on ``listener`` until cancelled. Never raises but that cancellation:
        a server that stops on its own (logged: its listening socket broke) leaves the run
        going on, and ``metrics_address`` ``None``."""
        await server.serve(listener, self._endpoints)
        self._address = None

    async def _on_signals(self, run: Run) -> None:
        heard = _SIGNALS
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            # A hang-up ended the process at once (an ssh session that dropped): its commands
            # ran on orphaned, its items stayed leased. Not when it is ignored (nohup) or the
            # application handles it.
            heard = (*heard, signal.SIGHUP)
        with (
            _handlers_restored(heard),
            anyio.open_signal_receiver(*heard) as signals,
        ):
            async for signum in signals:
                if self.received_signal is None:
                    self.received_signal = signum
                    run.request_stop(signum)
                else:
                    run.stop_now()


Batch.__doc__ = f"{Batch.__doc__}\n{textwrap.indent(BatchConfig.described(), '    ')}\n"


_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _handlers_restored(signums: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Give ``signums`` back the handlers they had before, on the way out.

    anyio's asyncio backend leaves a signal it received with no handler at all (the default
    action: SIGTERM then kills the process, SIGINT raises ``KeyboardInterrupt`` anywhere), not
    with the one the application had: a handler set with ``signal.signal`` (``asyncio.run``'s
    own for SIGINT) or with ``loop.add_signal_handler``.
    """
    before = {signum: signal.getsignal(signum) for signum in signums}
    loop: asyncio.AbstractEventLoop | None = None
    on_loop: dict[signal.Signals, Any] = {}
    if sniffio.current_async_library() == "asyncio":
        loop = asyncio.get_running_loop()
        handles = getattr(loop, "_signal_handlers", None)  # the loop's add_signal_handler()s
        if isinstance(handles, dict):
            on_loop = {signum: handles[signum] for signum in signums if signum in handles}
    try:
        yield
    finally:
        for signum in signums:
            handle = on_loop.get(signum)
            callback = getattr(handle, "_callback", None)
            if loop is not None and handle is not None and callback is not None:
                loop.add_signal_handler(signum, callback, *getattr(handle, "_args", ()))
            elif before[signum] is not None and signal.getsignal(signum) != before[signum]:
                signal.signal(signum, before[signum])


def _replace_poll(config: BatchConfig, poll: float) -> BatchConfig:
    return dataclasses.replace(config, poll=poll)
