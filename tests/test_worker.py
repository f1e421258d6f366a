"""The worker, with real processes, real signals and the real database.

Every job records its runs in a ``runs`` table (``tests/worker_app.py``), so "exactly
once" is checked against what actually ran, not against a status column. Waits poll a
condition with a deadline; none sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from soniq import JobStatus, Soniq

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def app(database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``tests.worker_app`` bound to this test's schema, migrated, with its runs table."""
    monkeypatch.setenv("SONIQ_WORKER_APP_URL", database_url)
    monkeypatch.setenv("SONIQ_WORKER_APP_SCHEMA", schema)
    sys.modules.pop("tests.worker_app", None)
    module = importlib.import_module("tests.worker_app")
    module.eq.sync.ensure_initialized()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(module.RUNS_DDL)
    yield module
    module.eq.sync.close()
    sys.modules.pop("tests.worker_app", None)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "soniq", "worker", "tests.worker_app:eq", *args],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def runs_per_job(pg: psycopg.Connection, schema: str) -> collections.Counter[int]:
    rows = pg.execute(f'SELECT job_id FROM "{schema}".runs').fetchall()
    return collections.Counter(row[0] for row in rows)


def statuses(pg: psycopg.Connection, schema: str) -> collections.Counter[str]:
    rows = pg.execute(f'SELECT status FROM "{schema}".soniq_jobs').fetchall()
    return collections.Counter(row[0] for row in rows)


# -- real processes --------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_burst_worker_runs_sync_and_async_jobs_exactly_once(
    app: Any, pg: psycopg.Connection, schema: str
) -> None:
    ids = app.eq.sync.enqueue_many(app.record, [{"n": n} for n in range(300)])
    ids += app.eq.sync.enqueue_many(app.record_sync, [{"n": n} for n in range(300)])
    code, out = finish(start_worker("--burst", "--concurrency", "20"))
    assert code == 0, out
    assert runs_per_job(pg, schema) == {job_id: 1 for job_id in ids}
    assert statuses(pg, schema) == {"done": 600}
    assert app.eq.sync.get_job(ids[-1]).result == 299  # the return value is kept


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_processes_share_20000_jobs_without_running_any_twice(
    app: Any, pg: psycopg.Connection, schema: str
) -> None:
    ids = app.eq.sync.enqueue_many(app.record, [{"n": n} for n in range(20_000)])
    workers = [start_worker("--burst", "--concurrency", "50") for _ in range(4)]
    results = [finish(w, timeout=200) for w in workers]
    assert [code for code, _ in results] == [0] * 4, results
    counts = runs_per_job(pg, schema)
    assert len(counts) == 20_000 and set(counts) == set(ids)
    assert max(counts.values()) == 1
    assert statuses(pg, schema) == {"done": 20_000}


@pytest.mark.timeout(90)
def test_sigkilled_workers_job_is_finished_by_another(
    app: Any, pg: psycopg.Connection, schema: str
) -> None:
    fast = ["--stale-after", "2", "--heartbeat-interval", "0.3", "--poll-interval", "0.2"]
    job_id = app.eq.sync.enqueue(app.slow_first_attempt, seconds=3600)
    victim = start_worker(*fast)
    wait_until(lambda: runs_per_job(pg, schema)[job_id] == 1, 30, "the job to start")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    killed_at = time.monotonic()
    rescuer = start_worker(*fast)
    try:
        job = wait_until(
            lambda: (j := app.eq.sync.get_job(job_id)).status == JobStatus.DONE and j,
            30,
            "another worker to finish the job",
        )
        # Rescued within the stale timeout (plus a beat or two), attempt counted.
        assert time.monotonic() - killed_at < 2 + 5
        assert job.attempts == 2
        notes = pg.execute(
            f'SELECT attempt, note FROM "{schema}".runs ORDER BY attempt, note DESC'
        ).fetchall()
        assert notes == [(1, "started"), (2, "started"), (2, "finished")]
    finally:
        rescuer.send_signal(signal.SIGTERM)
        finish(rescuer)


@pytest.mark.timeout(90)
def test_sigterm_lets_a_running_job_finish(app: Any, pg: psycopg.Connection, schema: str) -> None:
    job_id = app.eq.sync.enqueue(app.sleep_then_record, seconds=1.0)
    worker = start_worker("--poll-interval", "0.2")
    wait_until(lambda: runs_per_job(pg, schema)[job_id] == 1, 30, "the job to start")
    worker.send_signal(signal.SIGTERM)
    code, out = finish(worker)
    assert code == 0, out
    assert app.eq.sync.get_job(job_id).status == JobStatus.DONE
    assert runs_per_job(pg, schema)[job_id] == 2  # started and finished


@pytest.mark.timeout(90)
@pytest.mark.parametrize("job_name", ["sleep_then_record", "sync_sleep_then_record"])
def test_sigterm_puts_back_what_does_not_finish_in_time(
    app: Any, pg: psycopg.Connection, schema: str, job_name: str
) -> None:
    job_id = app.eq.sync.enqueue(getattr(app, job_name), seconds=60)
    worker = start_worker("--shutdown-timeout", "0.5", "--poll-interval", "0.2")
    wait_until(lambda: runs_per_job(pg, schema)[job_id] == 1, 30, "the job to start")
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code, out = finish(worker, timeout=30)
    # Exit 0 even with a sync job's thread stuck; put back with the attempt uncounted.
    assert code == 0, out
    assert time.monotonic() - started < 15
    job = app.eq.sync.get_job(job_id)
    assert (job.status, job.attempts, job.worker_id) == (JobStatus.QUEUED, 0, None)


@pytest.mark.timeout(90)
def test_second_signal_exits_at_once(app: Any, pg: psycopg.Connection, schema: str) -> None:
    job_id = app.eq.sync.enqueue(app.sleep_then_record, seconds=60)
    worker = start_worker("--poll-interval", "0.2")
    wait_until(lambda: runs_per_job(pg, schema)[job_id] == 1, 30, "the job to start")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # let the first signal be handled before the second
    worker.send_signal(signal.SIGTERM)
    code, _ = finish(worker, timeout=10)
    assert code == 1


@pytest.mark.timeout(120)
def test_killed_connections_are_reopened_and_no_job_is_lost(
    app: Any, pg: psycopg.Connection, schema: str, database_url: str
) -> None:
    worker = start_worker("--poll-interval", "0.2", "--concurrency", "20")
    try:
        first = app.eq.sync.enqueue_many(app.record, [{"n": n} for n in range(500)])
        wait_until(lambda: statuses(pg, schema)["done"] >= 100, 30, "some jobs to finish")
        dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
        killed = pg.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchone()
        assert killed and killed[0] >= 2  # the worker's pool, LISTEN and heartbeat
        # The app side enqueues on a connection of its own (this test's pool was just
        # killed too, and a web app would retry its request on a new connection).
        with psycopg.connect(database_url) as conn:
            second = app.eq.sync.enqueue_many(
                app.record, [{"n": n} for n in range(500)], connection=conn
            )
        try:
            wait_until(lambda: statuses(pg, schema) == {"done": 1000}, 60, "all jobs to end")
        except AssertionError:
            worker.send_signal(signal.SIGTERM)
            _, out = finish(worker)
            raise AssertionError(f"{statuses(pg, schema)}\n{out[-6000:]}") from None
        counts = runs_per_job(pg, schema)
        assert set(counts) == set(first + second)
        # At-least-once: a job whose completion was lost with its connection may run
        # again, but none is lost, and none runs more than twice.
        assert max(counts.values()) <= 2
    finally:
        worker.send_signal(signal.SIGTERM)
        code, out = finish(worker)
    assert code == 0, out
    assert "LISTEN connection lost" in out and "LISTEN connection restored" in out


# -- in-process: semantics ---------------------------------------------------------------


async def run_until(
    eq: Soniq, condition: Callable[[], Any], timeout: float = 30, **kw: Any
) -> None:
    """Run a worker in this loop until ``condition()`` holds, then cancel it."""
    task = asyncio.create_task(eq.run_worker(poll_interval=0.1, **kw))
    try:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(condition):
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # run_worker re-raises the cancellation after shutting down


@pytest.mark.timeout(60)
async def test_priority_then_run_at_then_id(app: Any, pg: psycopg.Connection, schema: str) -> None:
    eq = app.eq
    low = await eq.enqueue(app.record, n=1, priority=-1)
    high = await eq.enqueue(app.record, n=2, priority=10)
    mid_a = await eq.enqueue(app.record, n=3)
    mid_b = await eq.enqueue(app.record, n=4)
    later = await eq.enqueue(app.record, n=5, priority=100, delay=3600)
    await eq.run_worker(concurrency=1, burst=True)
    order = [r[0] for r in pg.execute(f'SELECT job_id FROM "{schema}".runs ORDER BY ctid')]
    assert order == [high, mid_a, mid_b, low]
    assert (await eq.get_job(later)).status == JobStatus.QUEUED  # not due: not run
    await eq.close()


@pytest.mark.timeout(60)
async def test_retries_end_in_failed_with_the_error_kept(
    app: Any, pg: psycopg.Connection, schema: str
) -> None:
    eq = app.eq
    job_id = await eq.enqueue(app.always_fails)
    refused = await eq.enqueue(app.refuses_retry)

    def both_failed() -> bool:
        return {app.eq.sync.get_job(i).status for i in (job_id, refused)} == {JobStatus.FAILED}

    await run_until(eq, both_failed)
    job = await eq.get_job(job_id)
    assert job.attempts == 3 and runs_per_job(pg, schema)[job_id] == 3  # max_retries=2
    assert job.last_error == "RuntimeError: broken on purpose"
    trace = pg.execute(
        f'SELECT last_traceback FROM "{schema}".soniq_jobs WHERE id = %s', (job_id,)
    ).fetchone()
    assert trace and "Traceback" in trace[0] and "always_fails" in trace[0]
    assert (await eq.get_job(refused)).attempts == 1  # PermanentError: no retry
    await eq.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("job_name", ["wait_for_cancel", "sync_wait_for_cancel"])
async def test_cancelling_a_running_job(
    app: Any, pg: psycopg.Connection, schema: str, job_name: str
) -> None:
    eq = app.eq
    job_id = await eq.enqueue(getattr(app, job_name))

    def started() -> bool:
        return runs_per_job(pg, schema)[job_id] >= 1

    def cancelled() -> bool:
        return app.eq.sync.get_job(job_id).status == JobStatus.CANCELLED

    async def cancel_when_started() -> None:
        # Polls the database (another process's view), bounded by the test's timeout.
        while not await asyncio.to_thread(started):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert await eq.cancel_job(job_id) is True

    canceller = asyncio.create_task(cancel_when_started())
    await run_until(eq, cancelled, heartbeat_interval=0.2, stale_after=5)
    await canceller
    if job_name == "sync_wait_for_cancel":  # it saw the flag on its context
        notes = [r[2] for r in app.runs(pg)]
        assert notes == ["started", "saw cancel"]
    await eq.close()


@pytest.mark.timeout(60)
async def test_timeouts_fail_async_and_sync_jobs(app: Any) -> None:
    eq = app.eq
    ids = [await eq.enqueue(app.too_slow), await eq.enqueue(app.sync_too_slow)]

    def both_failed() -> bool:
        return all(app.eq.sync.get_job(i).status == JobStatus.FAILED for i in ids)

    await run_until(eq, both_failed)
    for job_id in ids:
        assert "JobTimeout" in (await eq.get_job(job_id)).last_error
    await eq.close()


@pytest.mark.timeout(60)
async def test_unknown_job_name_fails_without_retry(app: Any) -> None:
    eq = app.eq
    job_id = await eq.enqueue("nobody.knows.this", x=1, max_retries=5)
    await eq.run_worker(burst=True)
    job = await eq.get_job(job_id)
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert "no job named 'nobody.knows.this'" in job.last_error
    await eq.close()


@pytest.mark.timeout(60)
async def test_retention_zero_deletes_finished_jobs(
    app: Any, pg: psycopg.Connection, schema: str
) -> None:
    eq = app.eq
    await eq.enqueue_many(app.record, [{"n": n} for n in range(50)])
    await eq.run_worker(burst=True, retention=0)
    assert statuses(pg, schema) == {}
    assert sum(runs_per_job(pg, schema).values()) == 50
    await eq.close()


@pytest.mark.timeout(60)
async def test_a_job_blocking_the_loop_does_not_get_its_worker_declared_dead(
    app: Any, pg: psycopg.Connection, schema: str
) -> None:
    """The heartbeat runs on its own thread: blocking the loop for longer than
    stale_after must not let a second worker rescue and rerun the job."""
    eq = app.eq
    job_id = await eq.enqueue(app.blocks_the_loop, seconds=3.0)
    other = start_worker("--stale-after", "1.5", "--heartbeat-interval", "0.3")
    try:
        await eq.run_worker(burst=True, stale_after=1.5, heartbeat_interval=0.3)
    finally:
        other.send_signal(signal.SIGTERM)
        finish(other)
    assert runs_per_job(pg, schema)[job_id] == 2  # started, finished: one run
    assert (await eq.get_job(job_id)).attempts == 1
    await eq.close()


def test_sync_run_worker_blocks_until_done(app: Any, pg: psycopg.Connection, schema: str) -> None:
    ids = app.eq.sync.enqueue_many(app.record_sync, [{"n": n} for n in range(20)])
    app.eq.sync.run_worker(burst=True, concurrency=4)
    assert runs_per_job(pg, schema) == {job_id: 1 for job_id in ids}


def test_bad_worker_settings_are_named(app: Any) -> None:
    from soniq import ConfigurationError

    for kwargs, match in [
        ({"concurrency": 0}, "concurrency"),
        ({"poll_interval": -1}, "poll_interval"),
        ({"stale_after": 1, "heartbeat_interval": 1}, "stale_after"),
        ({"retention": -5}, "retention"),
        ({"queues": []}, "queues"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            app.eq.sync.run_worker(**kwargs)


@pytest.mark.timeout(60)
async def test_sync_jobs_close_stale_django_connections(
    django_connection: Any, database_url: str, schema: str
) -> None:
    """In a Django project, a sync job's thread starts and ends with Django's
    close_old_connections(), so connections past CONN_MAX_AGE (0 here) do not linger
    or go stale between jobs (procrastinate #1134/#1335)."""
    from django.db import connections

    eq = Soniq(database_url, schema=schema)
    seen: list[Any] = []

    @eq.job
    def uses_django() -> None:
        wrapper = connections["default"]  # this thread's own wrapper, not the proxy
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
        seen.append(wrapper)

    await eq.ensure_initialized()
    await eq.enqueue_many(uses_django, [{}, {}, {}])
    await eq.run_worker(burst=True, concurrency=1)
    await eq.close()
    assert len(seen) == 3
    assert all(wrapper.connection is None for wrapper in seen)  # closed after each job
