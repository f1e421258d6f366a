"""PostgreSQL restarted under a multi-process drain, down for 20 s under an idle
worker, and down under an enqueue: on the run's own cluster (``pg_cluster``), never the
shared server."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import soniq
from soniq import Soniq
from tests.conftest import wait_until
from tests.reliability.conftest import report
from tests.reliability.harness import (
    FAST_WORKER,
    RECORD,
    Workers,
    check_none_lost,
    enqueue_records,
    prepare,
    query_retrying,
    rerun_errors,
    rerun_patterns,
    reruns,
    statuses,
    wait_until_done,
)
from tests.reliability.pgcluster import Cluster

JOBS = 6000
SCHEMA = "rel"

# What the issue promises for a database that cannot be reached: a bounded wait,
# configurable, with a few seconds by default.
BOUND = 10.0
PROMISED_OPTIONS = {"connect_timeout": 2.0, "acquire_timeout": 3.0}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_two_restarts_during_a_three_worker_drain(
    mode: str, pg_cluster: Cluster, cluster_url: str, tmp_path: Path
) -> None:
    """Restarted at a third and at two thirds of the drain: every job ends done,
    none is lost; reruns are counted (allowed after a crash, at-least-once)."""
    prepare(cluster_url, SCHEMA)
    ids = enqueue_records(cluster_url, SCHEMA, JOBS)
    workers = Workers(cluster_url, SCHEMA, tmp_path / "logs", "--concurrency", "10", *FAST_WORKER)
    restarts: list[float] = []
    workers.start(3)

    def restart_on_progress(elapsed: float) -> None:
        if len(restarts) == 2:
            return
        done = query_retrying(cluster_url, lambda c: statuses(c, SCHEMA)).get("done", 0)
        if done >= JOBS * (len(restarts) + 1) // 3:
            started = time.monotonic()
            pg_cluster.restart(mode)
            restarts.append(time.monotonic() - started)

    try:
        took = wait_until_done(
            cluster_url, SCHEMA, JOBS, 180, during=restart_on_progress, workers=workers
        )
        alive = len(workers.alive())
    finally:
        codes = workers.stop()
    assert len(restarts) == 2, f"the drain ended before two restarts ({len(restarts)})"
    per_job = check_none_lost(cluster_url, SCHEMA, ids)
    report(
        f"restart_{mode}",
        jobs=JOBS,
        workers=3,
        restarts=2,
        lost=0,
        reruns=reruns(per_job),
        jobs_run_twice=sum(1 for c in per_job.values() if c > 1),
        attempts_of_reruns=rerun_patterns(cluster_url, SCHEMA),
        errors_of_reruns=rerun_errors(cluster_url, SCHEMA),
        seconds=round(took, 1),
    )
    assert alive == 3, f"a worker died across the restarts:\n{workers.output()}"
    assert codes == [0, 0, 0], f"exit codes {codes}:\n{workers.output()}"


@pytest.mark.timeout(120)
def test_an_idle_worker_survives_the_database_down_for_20_seconds(
    pg_cluster: Cluster, cluster_url: str, tmp_path: Path
) -> None:
    prepare(cluster_url, SCHEMA)
    workers = Workers(cluster_url, SCHEMA, tmp_path / "logs", "--concurrency", "5", *FAST_WORKER)
    workers.start(1)
    try:
        first = enqueue_records(cluster_url, SCHEMA, 20)
        wait_until_done(cluster_url, SCHEMA, 20, 30, workers=workers)
        pg_cluster.stop("fast")
        time.sleep(20)
        assert workers.alive(), (
            f"the worker exited while the database was down:\n{workers.output()}"
        )
        pg_cluster.start()
        later = enqueue_records(cluster_url, SCHEMA, 50)
        took = wait_until_done(cluster_url, SCHEMA, 70, 60, workers=workers)
        alive = len(workers.alive())
    finally:
        codes = workers.stop()
    per_job = check_none_lost(cluster_url, SCHEMA, first + later)
    report(
        "down_20s_idle_worker",
        jobs=70,
        lost=0,
        reruns=reruns(per_job),
        seconds_after_return=round(took, 1),
    )
    assert alive == 1 and codes == [0], f"{codes}:\n{workers.output()}"
    assert reruns(per_job) == 0


@pytest.mark.timeout(120)
def test_a_worker_started_while_the_database_is_down_waits_for_it(
    pg_cluster: Cluster, cluster_url: str, tmp_path: Path
) -> None:
    """``soniq worker --wait-for-database 60`` started with the server stopped retries,
    logs why, and runs jobs once the server is back (after its first retry warning)."""
    prepare(cluster_url, SCHEMA)
    workers = Workers(
        cluster_url, SCHEMA, tmp_path / "logs", "--wait-for-database", "60", *FAST_WORKER
    )
    pg_cluster.stop("fast")
    stopped = time.monotonic()
    try:
        workers.start(1)
        wait_until(
            lambda: any(
                "WARNING" in line and "retrying" in line for line in workers.output().splitlines()
            ),
            30,
            "the worker's retry warning",
        )
    finally:
        down = time.monotonic() - stopped
        pg_cluster.start()
    try:
        assert workers.alive(), f"the worker gave up:\n{workers.output()}"
        ids = enqueue_records(cluster_url, SCHEMA, 20)
        took = wait_until_done(cluster_url, SCHEMA, 20, 60, workers=workers)
    finally:
        codes = workers.stop()
    check_none_lost(cluster_url, SCHEMA, ids)
    report(
        "worker_started_while_down",
        down_seconds=round(down, 1),
        jobs=20,
        seconds_after_return=round(took, 1),
    )
    assert codes == [0], f"{codes}:\n{workers.output()}"
    assert "WARNING" in workers.output(), "the worker waited without saying why"


def _faces(url: str, **options: Any) -> dict[str, Any]:
    """One enqueue per public face, each on a Soniq of its own: name -> callable."""
    apps = {
        "asyncpg": Soniq(url, driver="asyncpg", schema=SCHEMA, **options),
        "psycopg": Soniq(url, driver="psycopg", schema=SCHEMA, **options),
        "sync": Soniq(url, schema=SCHEMA, **options),
    }

    def run_async(app: Soniq) -> Any:
        def call() -> int:
            async def go() -> int:
                try:
                    return await app.enqueue(RECORD, n=1)
                finally:
                    await app.close()

            return asyncio.run(go())

        return call

    return {
        "asyncpg": run_async(apps["asyncpg"]),
        "psycopg": run_async(apps["psycopg"]),
        "sync": lambda: apps["sync"].sync.enqueue(RECORD, n=1),
        "_close": lambda: apps["sync"].sync.close(),
    }


def _timed_calls(calls: dict[str, Any], cap: float) -> dict[str, tuple[float, Any]]:
    """Run the calls at once, each in a thread; (seconds, result or exception) each,
    ``TimeoutError`` for one still blocked after ``cap`` seconds."""
    results: dict[str, tuple[float, Any]] = {}

    def run(name: str, call: Any) -> None:
        started = time.monotonic()
        try:
            value: Any = call()
        except BaseException as exc:
            value = exc
        results[name] = (time.monotonic() - started, value)

    threads = {
        name: threading.Thread(target=run, args=(name, call), daemon=True)
        for name, call in calls.items()
        if not name.startswith("_")
    }
    for thread in threads.values():
        thread.start()
    for name, thread in threads.items():
        thread.join(cap)
        if thread.is_alive():
            results[name] = (cap, TimeoutError(f"still blocked after {cap}s"))
    return results


@pytest.mark.timeout(90)
def test_enqueue_succeeds_after_the_database_returns(pg_cluster: Cluster, cluster_url: str) -> None:
    """A Soniq whose pool saw the server go away enqueues again once it is back, on
    every face."""
    prepare(cluster_url, SCHEMA)
    app = Soniq(cluster_url, schema=SCHEMA)

    async def enqueue_twice(driver: str) -> list[int]:
        own = Soniq(cluster_url, driver=driver, schema=SCHEMA)
        try:
            ids = [await own.enqueue(RECORD, n=1)]
            pg_cluster.restart("immediate")
            deadline = time.monotonic() + 30
            while True:  # the first call after a crash may see a dead pooled connection
                try:
                    ids.append(await own.enqueue(RECORD, n=2))
                    break
                except (OSError, soniq.SoniqError, Exception):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            return ids
        finally:
            await own.close()

    try:
        ids = asyncio.run(enqueue_twice("asyncpg")) + asyncio.run(enqueue_twice("psycopg"))
        ids.append(app.sync.enqueue(RECORD, n=1))
        pg_cluster.restart("immediate")
        deadline = time.monotonic() + 30
        while True:
            try:
                ids.append(app.sync.enqueue(RECORD, n=2))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert all(app.sync.get_job(i).status == soniq.JobStatus.QUEUED for i in ids)
    finally:
        app.sync.close()
    assert len(set(ids)) == 6


@pytest.mark.timeout(120)
def test_enqueue_while_the_database_is_down_fails_within_the_bound(
    pg_cluster: Cluster, cluster_url: str
) -> None:
    """Server stopped: each face's enqueue raises soniq.DatabaseUnavailable naming host,
    port and database within the configured bound; after the server returns, the same
    instances enqueue."""
    prepare(cluster_url, SCHEMA)
    info = psycopg.conninfo.conninfo_to_dict(cluster_url)
    pg_cluster.stop("fast")
    try:
        calls = _faces(cluster_url, **PROMISED_OPTIONS)
        results = _timed_calls(calls, cap=40)
    finally:
        pg_cluster.start()
    report(
        "enqueue_while_down",
        **{f"{name}_seconds": round(took, 1) for name, (took, _) in results.items()},
        **{f"{name}_raised": type(value).__name__ for name, (_, value) in results.items()},
    )
    for name, (took, value) in results.items():
        assert isinstance(value, soniq.DatabaseUnavailable), (name, value)
        assert took < BOUND, (name, took)
        message = str(value)
        assert info["host"] in message and str(info["port"]) in message, message
        assert info["dbname"] in message, message
    after = _timed_calls(calls, cap=40)
    calls["_close"]()
    assert all(isinstance(v, int) for _, v in after.values()), after
