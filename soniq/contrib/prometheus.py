"""Prometheus metrics of a Soniq application (``pip install soniq[prometheus]``).

::

    from soniq.contrib.prometheus import instrument

    instrument(eq)  # before the worker starts (and in the web process, for enqueues)

and serve them: ``soniq worker app:eq --metrics-port 9100`` (instruments ``eq`` if it
is not yet, and serves ``/metrics`` from the worker process), or
``prometheus_client.start_http_server(9100)`` in a process of your own.

What it measures (labels: ``queue``, ``name``, ``outcome``):

- ``soniq_jobs_enqueued_total{queue,name}``: jobs inserted by this process's enqueue
  calls (counted once the insert returned; a caller's transaction may still roll
  them back);
- ``soniq_jobs_started_total{queue,name}`` and ``soniq_jobs_finished_total{queue,
  name,outcome}`` (``done``, ``failed``, ``retried``, ``snoozed``, ``cancelled``,
  ``released``): runs of this worker process;
- ``soniq_job_duration_seconds{queue,name}``: a histogram of run times (runs in
  progress: ``started - finished``);
- ``soniq_queue_jobs{queue,status}``: jobs in the database by queue and status
  (``queued``, ``scheduled``, ``running``, ``waiting``, ``failed``, ``cancelled``),
  and ``soniq_queue_oldest_queued_age_seconds{queue}``, read with
  :meth:`soniq.SyncSoniq.queue_stats` when Prometheus scrapes (one query a scrape;
  every worker reports the same values: aggregate with ``max``);
- ``soniq_enqueue_group_size``: a histogram of how many enqueues each merged
  ``INSERT`` of group commit carried (PostgreSQL, this process's ``eq``).

The run metrics cost a few microseconds a job (a dictionary lookup and three metric
updates); an uninstrumented Soniq pays nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

try:
    import prometheus_client
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "soniq.contrib.prometheus needs prometheus-client: pip install soniq[prometheus]"
    ) from exc

from soniq import EnqueueContext, RunContext, Soniq

log = logging.getLogger("soniq")

__all__ = ["SoniqMetrics", "instrument", "start_http_server"]

#: Buckets of ``soniq_job_duration_seconds`` (from 5 ms to 10 minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
#: Buckets of ``soniq_enqueue_group_size`` (a merged statement carries up to 500).
GROUP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
#: The statuses ``soniq_queue_jobs`` reports, as :class:`soniq.QueueStats` fields.
QUEUE_STATUSES = ("queued", "scheduled", "running", "waiting", "failed", "cancelled")


class SoniqMetrics:
    """The metrics of one Soniq (see the module's docstring), registered in
    ``registry`` (prometheus_client's default one unless given). Made and wired by
    :func:`instrument`; its :meth:`run` and :meth:`enqueue` are the middleware."""

    def __init__(self, eq: Soniq, registry: CollectorRegistry = REGISTRY) -> None:
        self.eq = eq
        self.registry = registry
        self.enqueued = Counter(
            "soniq_jobs_enqueued",
            "Jobs inserted by this process's enqueue calls.",
            ["queue", "name"],
            registry=registry,
        )
        self.started = Counter(
            "soniq_jobs_started",
            "Runs started by this worker process.",
            ["queue", "name"],
            registry=registry,
        )
        self.finished = Counter(
            "soniq_jobs_finished",
            "Runs ended in this worker process, by outcome (done, failed, retried, "
            "snoozed, cancelled, released).",
            ["queue", "name", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "soniq_job_duration_seconds",
            "How long runs took, in seconds.",
            ["queue", "name"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        registry.register(_DatabaseCollector(eq))
        # The children of (queue, name), made once: .labels() costs a lock and a lookup
        # (a microsecond, a third of what a run's metrics cost).
        self._children: dict[tuple[str, str], _Children] = {}
        self._lock = threading.Lock()

    def run(self, ctx: RunContext) -> _Run:
        """The run middleware: counts the start, the end by outcome, and the time."""
        return _Run(ctx, self.children(ctx.job.queue, ctx.job.name))

    def children(self, queue: str, name: str) -> _Children:
        """The metrics of (``queue``, ``name``), labelled once."""
        key = (queue, name)
        children = self._children.get(key)
        return children if children is not None else self._labelled(key)

    def enqueue(self, ctx: EnqueueContext) -> _Enqueue:
        """The enqueue middleware: counts the jobs inserted, by queue and name."""
        return _Enqueue(self, ctx)

    def _labelled(self, key: tuple[str, str]) -> _Children:
        with self._lock:
            children = self._children.get(key)
            if children is None:
                children = _Children(self, *key)
                self._children[key] = children
            return children


class _Children:
    """The metrics of one (queue, name)."""

    __slots__ = ("_finished", "_key", "duration", "enqueued", "finished", "started")

    def __init__(self, metrics: SoniqMetrics, queue: str, name: str) -> None:
        self.enqueued = metrics.enqueued.labels(queue, name)
        self.started = metrics.started.labels(queue, name)
        self.duration = metrics.duration.labels(queue, name)
        self._finished, self._key = metrics.finished, (queue, name)
        #: By outcome, each made when first seen (a dict's lookup, not .labels()).
        self.finished: dict[str, Any] = {}

    def finished_of(self, outcome: str) -> Any:
        """The counter of runs that ended with ``outcome`` (made now)."""
        counter = self.finished[outcome] = self._finished.labels(*self._key, outcome)
        return counter


class _Run:
    """A run being measured (a plain class: cheaper than a generator's manager)."""

    __slots__ = ("_children", "_ctx", "_started")

    def __init__(self, ctx: RunContext, children: _Children) -> None:
        self._ctx, self._children = ctx, children
        self._started = 0.0

    def __enter__(self) -> None:
        self._children.started.inc()
        self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self._started
        children = self._children
        children.duration.observe(elapsed)
        outcome = self._ctx.outcome or "failed"
        finished = children.finished.get(outcome)
        if finished is None:
            finished = children.finished_of(outcome)
        finished.inc()


class _Enqueue:
    __slots__ = ("_ctx", "_metrics")

    def __init__(self, metrics: SoniqMetrics, ctx: EnqueueContext) -> None:
        self._metrics, self._ctx = metrics, ctx

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            return
        for queue, name, count in self._ctx.counts:
            self._metrics.children(queue, name).enqueued.inc(count)


class _DatabaseCollector(Collector):
    """Reads the queues' counts when Prometheus scrapes, and the sizes of group
    commit's merged statements."""

    def __init__(self, eq: Soniq) -> None:
        self._eq = eq

    def describe(self) -> Iterator[Metric]:
        """Nothing: so that registering does not read the database (a registry with
        ``auto_describe`` would otherwise collect once, at ``instrument``)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        yield from self._queues()
        yield from self._groups()

    def _queues(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "soniq_queue_jobs",
            "Jobs in the database, by queue and status.",
            labels=["queue", "status"],
        )
        age = GaugeMetricFamily(
            "soniq_queue_oldest_queued_age_seconds",
            "Seconds since the oldest ready job of the queue became due.",
            labels=["queue"],
        )
        try:
            stats = self._eq.sync.queue_stats()
        except Exception as exc:  # a scrape must not fail with the database
            log.warning("metrics: could not read the queues' counts: %s", exc)
            return
        for queue in stats:
            for status in QUEUE_STATUSES:
                jobs.add_metric([queue.queue, status], getattr(queue, status))
            if queue.oldest_queued_age is not None:
                age.add_metric([queue.queue], queue.oldest_queued_age)
        yield jobs
        yield age

    def _groups(self) -> Iterator[Metric]:
        sizes: Tally[int] = Tally()
        for backend in (self._eq.backend, getattr(self._eq._sync, "backend", None)):
            # The enqueue line of the PostgreSQL drivers keeps the sizes it sent (see
            # soniq.drivers.insert_lines); other backends have none.
            bound = getattr(backend, "_line", None)
            if bound is not None:
                sizes.update(_copied(bound[1]))
        buckets, below, total = [], 0, 0
        for bound_size in GROUP_BUCKETS:
            below = sum(n for size, n in sizes.items() if size <= bound_size)
            buckets.append((str(bound_size), below))
        total = sum(sizes.values())
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily(
            "soniq_enqueue_group_size",
            "Enqueues carried by each merged INSERT of group commit.",
            buckets=buckets,
            sum_value=sum(size * n for size, n in sizes.items()),
        )


def _copied(line: Any) -> dict[int, int]:
    """The batch sizes of an enqueue line, copied while enqueues go on: under the
    sync line's lock; the async line's change on its loop, so a copy that met a
    change is taken again."""
    lock = getattr(line, "_lock", None)
    if lock is not None:
        with lock:
            return dict(line.batches)
    for _ in range(10):
        try:
            return dict(line.batches)
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return {}


def instrument(eq: Soniq, registry: CollectorRegistry = REGISTRY) -> SoniqMetrics:
    """Measure ``eq``: register the run and enqueue middleware and the database's
    collector in ``registry``; once per Soniq (a second call returns the first's
    metrics)."""
    found: SoniqMetrics | None = getattr(eq, "_prometheus", None)
    if found is not None:
        return found
    metrics = SoniqMetrics(eq, registry)
    eq.middleware(metrics.run)
    eq.middleware(on="enqueue")(metrics.enqueue)
    eq._prometheus = metrics  # type: ignore[attr-defined]
    return metrics


def start_http_server(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> Any:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread (what
    ``soniq worker --metrics-port`` does); returns prometheus_client's server."""
    return prometheus_client.start_http_server(port, addr, registry=registry)
