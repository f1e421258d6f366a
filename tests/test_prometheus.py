"""soniq.contrib.prometheus: the metrics of enqueues and runs on every backend, the
queues' counts read at scrape time, group commit's batch sizes, and
``soniq worker --metrics-port`` serving them (or saying which extra is missing)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from soniq import Soniq
from soniq.contrib.prometheus import instrument
from tests.conftest import Process, wait_until
from tests.throwaway_pg import free_port

pytestmark = pytest.mark.timeout(90)

BURST = {"burst": True, "burst_wait": 0, "concurrency": 4}


def value(registry: CollectorRegistry, metric: str, /, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels)


async def test_runs_and_enqueues_are_counted(any_eq: Soniq) -> None:
    registry = CollectorRegistry()
    metrics = instrument(any_eq, registry)
    assert instrument(any_eq, registry) is metrics  # once per Soniq

    @any_eq.job(name="m.ok", queue="mail")
    async def ok(n: int) -> None: ...

    @any_eq.job(name="m.sync_ok", queue="mail")
    def sync_ok(n: int) -> None: ...

    @any_eq.job(name="m.boom", max_retries=0)
    async def boom() -> None:
        raise RuntimeError("boom")

    await any_eq.enqueue_many(ok, [{"n": 1}, {"n": 2}])
    await any_eq.enqueue(sync_ok, n=3)
    await any_eq.enqueue(boom)
    await any_eq.enqueue("m.nobody_runs_it", queue="mail")
    assert value(registry, "soniq_jobs_enqueued_total", queue="mail", name="m.ok") == 2
    assert value(registry, "soniq_jobs_enqueued_total", queue="default", name="m.boom") == 1
    queued = value(registry, "soniq_queue_jobs", queue="mail", status="queued")
    assert queued == 4

    await any_eq.run_worker(**BURST)
    assert value(registry, "soniq_jobs_started_total", queue="mail", name="m.ok") == 2
    done = {"queue": "mail", "name": "m.ok", "outcome": "done"}
    assert value(registry, "soniq_jobs_finished_total", **done) == 2
    sync_done = {"queue": "mail", "name": "m.sync_ok", "outcome": "done"}
    assert value(registry, "soniq_jobs_finished_total", **sync_done) == 1
    failed = {"queue": "default", "name": "m.boom", "outcome": "failed"}
    assert value(registry, "soniq_jobs_finished_total", **failed) == 1
    count = value(registry, "soniq_job_duration_seconds_count", queue="mail", name="m.ok")
    assert count == 2
    assert value(registry, "soniq_queue_jobs", queue="default", status="failed") == 1
    assert value(registry, "soniq_queue_jobs", queue="mail", status="queued") == 1
    assert value(registry, "soniq_queue_oldest_queued_age_seconds", queue="mail") is not None


async def test_group_commit_batch_sizes(eq: Soniq) -> None:
    registry = CollectorRegistry()
    instrument(eq, registry)
    await asyncio.gather(*(eq.enqueue("m.any", n=n) for n in range(200)))
    merged = value(registry, "soniq_enqueue_group_size_count")
    assert merged is not None and merged > 0
    carried = value(registry, "soniq_enqueue_group_size_sum")
    assert carried is not None and merged <= carried <= 200
    assert value(registry, "soniq_enqueue_group_size_bucket", le="+Inf") == merged


def test_a_scrape_survives_a_database_that_is_down(caplog: pytest.LogCaptureFixture) -> None:
    eq = Soniq("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1)
    registry = CollectorRegistry()
    instrument(eq, registry)
    assert value(registry, "soniq_queue_jobs", queue="default", status="queued") is None
    assert value(registry, "soniq_enqueue_group_size_count") == 0
    assert "could not read the queues' counts" in caplog.text
    eq.sync.close()


@pytest.mark.slow
def test_worker_serves_metrics(
    worker_app: Any, soniq_processes: Callable[..., Process], pg: psycopg.Connection
) -> None:
    ids = [worker_app.eq.sync.enqueue(worker_app.record, n=n) for n in range(3)]
    worker_app.eq.sync.enqueue("tests.nobody_knows_it")  # stays queued
    port = free_port()
    worker = soniq_processes(
        "worker",
        "tests.worker_app:eq",
        "--metrics-port",
        str(port),
        "--metrics-addr",
        "127.0.0.1",
        "--poll-interval",
        "0.2",
    )
    worker.wait_for_output(f"metrics on http://127.0.0.1:{port}/metrics")
    url = f"http://127.0.0.1:{port}/metrics"
    name = "tests.worker_app.record"
    done = f'soniq_jobs_finished_total{{name="{name}",outcome="done",queue="default"}} 3.0'

    def scraped() -> bool:
        with urllib.request.urlopen(url, timeout=5) as response:
            return done in response.read().decode()

    wait_until(scraped, 30, "three runs in the worker's metrics")
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert 'soniq_queue_jobs{queue="default",status="queued"} 1.0' in text
    assert f'soniq_jobs_started_total{{name="{name}",queue="default"}} 3.0' in text
    worker.send_signal(signal.SIGTERM)
    code, output = worker.finish(timeout=30)
    assert code == 0, output
    assert len(ids) == 3


@pytest.mark.slow
def test_metrics_port_without_the_extra_says_what_to_install(
    worker_app: Any, soniq_processes: Callable[..., Process], tmp_path: Path
) -> None:
    hidden = tmp_path / "prometheus_client"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    worker = soniq_processes("worker", "tests.worker_app:eq", "--metrics-port", "1", env=env)
    code, output = worker.finish(timeout=30)
    assert code == 1, output
    assert "pip install 'soniq[prometheus]'" in output


def test_instrumenting_reads_nothing_from_the_database(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A registry that describes its collectors at registration (prometheus_client's
    default one does) must not make instrument() open the database."""
    eq = Soniq(f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout=1)
    instrument(eq, CollectorRegistry(auto_describe=True))
    assert eq._sync is None  # the sync pool, which a collection would open, is not
    assert "could not read" not in caplog.text
