"""The Prometheus metrics of one batch: a collector read at scrape time, in its own registry.

The only module that imports ``prometheus_client``; a :class:`~asyncbatch.Batch` imports it
when it is made with ``metrics=...``, never otherwise. Each batch has its own
``CollectorRegistry`` (never the process-wide default one): two batches in one process do not
mix or collide. Every value is read when scraped from what the run keeps anyway (its counters,
queue, scanner, ledger, heartbeat) or from the batch's :class:`~.recorder.Recorder` (the
histograms); the names, types and labels are listed in ``asyncbatch help operations``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from .._ledger import NOT_READY
from .._pipeline import Recorder, RunObservation
from .._pipeline.recorder import ATTEMPT_OUTCOMES, Histogram
from .health import Health

__all__ = ["CONTENT_TYPE", "ITEM_OUTCOMES", "BatchCollector", "exposition", "make_registry"]

#: The content type of the text exposition (format 0.0.4: what every Prometheus reads).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: The outcomes ``asyncbatch_items_total`` counts, as the report names them.
ITEM_OUTCOMES = ("done", "dead", "vanished", "done_before", "dead_before", "lost")


class BatchCollector:
    """Yields a batch's metrics when its registry is scraped.

    ``current`` returns what the batch's run under way observed (or ``None``), ``health`` its
    health now.
    """

    def __init__(
        self,
        job: str,
        recorder: Recorder,
        current: Callable[[], RunObservation | None],
        health: Callable[[], Health],
    ) -> None:
        self.job = job
        self.recorder = recorder
        self.current = current
        self.health = health

    def collect(self) -> Iterator[Metric]:
        """The metric families, as they stand now."""
        run = self.current()
        yield from self._counters(run)
        yield self._ledger_errors(run)
        yield from self._histograms()
        yield from self._gauges(run)
        yield from self._scan(run)
        yield from self._listing(run)
        yield from self._object_requests(run)

    def _counters(self, run: RunObservation | None) -> Iterator[Metric]:
        job, ended = self.job, self.recorder.ended
        c = None if run is None else run.events
        items = CounterMetricFamily(
            "asyncbatch_items",
            "Outcomes of items in this runner's runs, each counted when it happened (an item "
            "dead, put back and done counts in dead and in done): done, dead, vanished by "
            "them; done_before, dead_before found so; lost: outcomes refused (lease taken over)",
            labels=("batch_job", "outcome"),
        )
        for outcome in ITEM_OUTCOMES:
            value = getattr(ended, outcome) + (0 if c is None else getattr(c, outcome))
            items.add_metric((job, outcome), value)
        yield items
        yield _counter(
            "asyncbatch_items_seen",
            "Settled files seen (and items earlier runs left waiting that the runs took on), "
            "each counted when seen; runners sharing a job: the files of the job's listing, as "
            "their reports count them (the highest so far)",
            job,
            ended.seen + (0 if c is None else c.seen),
        )
        attempts = CounterMetricFamily(
            "asyncbatch_attempts",
            "Handler attempts by the outcome the worker gave them (done, failed: retried "
            "later, dead: failed for good)",
            labels=("batch_job", "outcome"),
        )
        for outcome in ATTEMPT_OUTCOMES:
            attempts.add_metric((job, outcome), self.recorder.attempts[outcome].count)
        yield attempts
        yield _counter(
            "asyncbatch_leases_lost",
            "Leases of this runner that its heartbeat found taken over by other runners",
            job,
            ended.leases_lost + (0 if run is None else run.leases_lost),
        )
        yield _counter(
            "asyncbatch_reaped_items",
            "Items of runners found gone (dead process, expired heartbeat) that were put back",
            job,
            ended.reaped + (0 if run is None else run.reaped),
        )
        yield _counter(
            "asyncbatch_lock_takeovers",
            "Stale job locks (of runners that died) taken over when a run started",
            job,
            ended.lock_takeovers + (0 if run is None else run.lock_takeovers),
        )

    def _object_requests(self, run: RunObservation | None) -> Iterator[Metric]:
        """Requests to object stores by operation (only for a batch that sent some)."""
        ended = self.recorder.object_requests
        live = {} if run is None else run.object_requests
        if not ended and not live:
            return
        family = CounterMetricFamily(
            "asyncbatch_object_requests",
            "Requests sent to object stores (s3://), by operation: list (a page of up to "
            "1,000 keys), head, get, put, copy, delete",
            labels=("batch_job", "operation"),
        )
        for operation in sorted(set(ended) | set(live)):
            value = ended.get(operation, 0) + live.get(operation, 0)
            family.add_metric((self.job, operation), value)
        yield family

    def _ledger_errors(self, run: RunObservation | None) -> Metric:
        job, ended = self.job, self.recorder.ended
        errors = CounterMetricFamily(
            "asyncbatch_ledger_errors",
            "Ledger errors: busy (a transaction retried: another writer held the lock, or a "
            "deadlock), unreachable (a PostgreSQL try that found the server gone, waited out), "
            "fatal (a run ended by a ledger error)",
            labels=("batch_job", "kind"),
        )
        live = None if run is None else run.ledger
        errors.add_metric((job, "busy"), ended.ledger_busy + (0 if live is None else live.busy))
        errors.add_metric(
            (job, "unreachable"),
            ended.ledger_unreachable + (0 if live is None else live.unreachable),
        )
        errors.add_metric(
            (job, "fatal"), ended.ledger_fatal + (0 if run is None else int(run.ledger_failed))
        )
        return errors

    def _histograms(self) -> Iterator[Metric]:
        job, rec = self.job, self.recorder
        handler = HistogramMetricFamily(
            "asyncbatch_handler_duration_seconds",
            "Handler attempts: seconds from the worker taking the item (opening its input "
            "included) to the handler's outcome, by outcome",
            labels=("batch_job", "outcome"),
        )
        for outcome in ATTEMPT_OUTCOMES:
            _add(handler, (job, outcome), rec.attempts[outcome])
        yield handler
        for name, what, histogram in (
            (
                "asyncbatch_claim_duration_seconds",
                "Claim statements (register and lease a chunk, or lease waiting items): seconds "
                "to the ledger's answer",
                rec.claims,
            ),
            (
                "asyncbatch_commit_duration_seconds",
                "Commit transactions of a group of outcomes: seconds to the commit",
                rec.commits,
            ),
        ):
            family = HistogramMetricFamily(name, what, labels=("batch_job",))
            _add(family, (job,), histogram)
            yield family

    def _gauges(self, run: RunObservation | None) -> Iterator[Metric]:
        job = self.job
        now = time.monotonic()
        health = self.health()
        yield _gauge(
            "asyncbatch_running",
            "1 while a run() or watch() is under way",
            job,
            0.0 if run is None else 1.0,
        )
        yield _gauge("asyncbatch_live", "1 when Batch.health() says live", job, health.live)
        yield _gauge("asyncbatch_ready", "1 when Batch.health() says ready", job, health.ready)
        yield _gauge(
            "asyncbatch_queue_depth",
            "Leased items waiting for a worker",
            job,
            0 if run is None else run.queued,
        )
        yield _gauge(
            "asyncbatch_items_in_flight",
            "Items leased to this runner and not committed yet (queued, running, or waiting "
            "for their commit)",
            job,
            0 if run is None else run.in_flight,
        )
        yield _gauge(
            "asyncbatch_handlers_running",
            "Handlers running now",
            job,
            0 if run is None else run.handlers_running,
        )
        held = GaugeMetricFamily(
            "asyncbatch_items_open",
            "Seen items neither finished nor in flight: held by another runner, or waiting "
            "for a retry",
            labels=("batch_job", "why"),
        )
        held.add_metric((job, "held"), 0 if run is None else run.counts.held)
        held.add_metric((job, "waiting"), 0 if run is None else run.counts.waiting)
        yield held
        yield _gauge(
            "asyncbatch_files_unsettled",
            "Files the last scan (or look) found and that are not settled yet: changed less "
            "than --settle ago (or in the future); watching, also those waiting for their "
            "second look, as they stand now (settled since: no longer counted)",
            job,
            0 if run is None else run.counts.unsettled,
        )
        not_ready = GaugeMetricFamily(
            "asyncbatch_files_not_ready",
            "Files the last scan (or look) found and that are not ready yet, by the first "
            "readiness rule that does not hold for each (age: not settled, as "
            "asyncbatch_files_unsettled; stable, marker, dir-marker, min-size; max-age: left "
            "alone)",
            labels=("batch_job", "rule"),
        )
        for rule, name in NOT_READY.items():
            not_ready.add_metric((job, rule), 0 if run is None else getattr(run.counts, name))
        yield not_ready
        oldest = None if run is None else run.oldest_waiting
        yield _gauge(
            "asyncbatch_oldest_waiting_seconds",
            "Age of the oldest item waiting to start: scanned and not claimed yet (since its "
            "scan ended), or leased and queued (since it was queued); 0 when none waits",
            job,
            0.0 if oldest is None else now - oldest,
        )

    def _listing(self, run: RunObservation | None) -> Iterator[Metric]:
        """Runners sharing a job: whether this one lists, and the last complete listing."""
        job = self.job
        yield _gauge(
            "asyncbatch_lister",
            "1 while this runner holds the listing role of its shared job (it lists the "
            "source for every runner), else 0",
            job,
            1.0 if run is not None and run.lister else 0.0,
        )
        listing = None if run is None else run.listing
        if listing is not None and listing.listed_at is not None:
            yield _gauge(
                "asyncbatch_last_listing_timestamp_seconds",
                "When the shared job's last complete listing ended (Unix time)",
                job,
                listing.listed_at,
            )
            yield _gauge(
                "asyncbatch_last_listing_files",
                "Files the shared job's last complete listing found",
                job,
                listing.listed_files,
            )

    def _scan(self, run: RunObservation | None) -> Iterator[Metric]:
        job = self.job
        scan = None if run is None else run.last_scan
        if scan is None:
            scan = self.recorder.last_scan
        if scan is not None:
            yield _gauge(
                "asyncbatch_last_scan_duration_seconds",
                "Seconds the last scan (or poll) of the source took",
                job,
                scan.seconds,
            )
            yield _gauge(
                "asyncbatch_last_scan_files",
                "Files the last scan listed (settled ones in run mode; every file in watch mode)",
                job,
                scan.files,
            )
            yield _gauge(
                "asyncbatch_last_scan_timestamp_seconds",
                "When the last scan ended (Unix time)",
                job,
                scan.ended_wall,
            )
            yield _gauge(
                "asyncbatch_last_scan_full",
                "1 if the last scan stat'ed every file, 0 if it was a watch poll that listed "
                "names only (or found the directory unchanged)",
                job,
                1.0 if scan.full else 0.0,
            )


def _counter(name: str, documentation: str, job: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=("batch_job",))
    family.add_metric((job,), value)
    return family


def _gauge(name: str, documentation: str, job: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=("batch_job",))
    family.add_metric((job,), float(value))
    return family


def _add(family: HistogramMetricFamily, labels: tuple[str, ...], histogram: Histogram) -> None:
    family.add_metric(list(labels), histogram.cumulative(), histogram.total)


def make_registry(collector: BatchCollector) -> CollectorRegistry:
    """A new registry holding only ``collector`` (never the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (see :data:`CONTENT_TYPE`)."""
    return generate_latest(registry)
