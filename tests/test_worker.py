"""The worker on PostgreSQL, with real processes, real signals and the real database.

Every job records its runs in a ``runs`` table (``tests/worker_app.py``), so "exactly
once" is checked against what actually ran, not against a status column. Waits poll a
condition with a deadline; none sleeps and hopes.

The worker's semantics on every backend (claim order, retries, timeouts, cancel,
retention, rescue) are in test_behaviour.py; the ``soniq`` command's flags and
signals in test_cli.py.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import signal
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from soniq import JobStatus, Soniq
from soniq.worker.heartbeat import ANALYZE_ROWS
from tests.conftest import Process, async_wait_until, listening_sessions, wait_until

Spawn = Callable[..., Process]


@pytest.fixture
def app(worker_app: Any) -> Any:
    return worker_app


def runs_per_job(pg: psycopg.Connection, schema: str) -> collections.Counter[int]:
    rows = pg.execute(f'SELECT job_id FROM "{schema}".runs').fetchall()
    return collections.Counter(row[0] for row in rows)


def statuses(pg: psycopg.Connection, schema: str) -> collections.Counter[str]:
    rows = pg.execute(f'SELECT status FROM "{schema}".soniq_jobs').fetchall()
    return collections.Counter(row[0] for row in rows)


def worker(spawn: Spawn, *args: str) -> Process:
    return spawn("worker", "tests.worker_app:eq", *args)


# -- real processes --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_burst_worker_runs_sync_and_async_jobs_exactly_once(
    app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    ids = app.eq.sync.enqueue_many(app.record, [{"n": n} for n in range(300)])
    ids += app.eq.sync.enqueue_many(app.record_sync, [{"n": n} for n in range(300)])
    code, out = worker(soniq_processes, "--burst", "--concurrency", "20").finish()
    assert code == 0, out
    assert runs_per_job(pg, schema) == {job_id: 1 for job_id in ids}
    assert statuses(pg, schema) == {"done": 600}
    assert app.eq.sync.get_job(ids[-1]).result == 299  # the return value is kept


@pytest.mark.timeout(90)
def test_two_apps_sharing_a_database_and_a_queue_each_run_only_their_own_jobs(
    app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    # The other app's jobs come first in claim order: each worker steps over them.
    theirs = app.eq.sync.enqueue_many("other.record", [{"n": n} for n in range(300)])
    mine = app.eq.sync.enqueue_many(app.record, [{"n": n} for n in range(300)])
    workers = [
        worker(soniq_processes, "--burst", "--concurrency", "20"),
        soniq_processes("worker", "tests.other_app:eq", "--burst", "--concurrency", "20"),
    ]
    results = [w.finish(timeout=60) for w in workers]
    assert [code for code, _ in results] == [0, 0], results
    rows = pg.execute(f'SELECT job_id, note FROM "{schema}".runs').fetchall()
    assert sorted(rows) == sorted([(i, "") for i in mine] + [(i, "other") for i in theirs])
    assert statuses(pg, schema) == {"done": 600}  # none failed as unknown


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_four_worker_processes_enqueue_each_periodic_tick_once(
    app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    workers = [
        soniq_processes("worker", "tests.periodic_app:eq", "--poll-interval", "0.2")
        for _ in range(4)
    ]
    wait_until(lambda: len(runs_per_job(pg, schema)) >= 10, 60, "ten periodic runs")
    for w in workers:
        w.send_signal(signal.SIGTERM)
    assert [w.finish(timeout=30)[0] for w in workers] == [0] * 4
    ticks = [
        row[0]
        for row in pg.execute(
            f'SELECT run_at FROM "{schema}".soniq_jobs WHERE name = %s ORDER BY run_at',
            ("beat.record",),
        )
    ]
    assert len(ticks) == len(set(ticks)) >= 10  # no tick enqueued twice
    gaps = {b - a for a, b in itertools.pairwise(ticks)}
    assert gaps == {dt.timedelta(seconds=0.5)}, ticks  # none skipped while workers ran
    assert max(runs_per_job(pg, schema).values()) == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_processes_share_20000_jobs_without_running_any_twice(
    app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    ids = app.eq.sync.enqueue_many(app.record, [{"n": n} for n in range(20_000)])
    workers = [worker(soniq_processes, "--burst", "--concurrency", "50") for _ in range(4)]
    results = [w.finish(timeout=200) for w in workers]
    assert [code for code, _ in results] == [0] * 4, results
    counts = runs_per_job(pg, schema)
    assert len(counts) == 20_000 and set(counts) == set(ids)
    assert max(counts.values()) == 1
    assert statuses(pg, schema) == {"done": 20_000}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigkilled_workers_job_is_finished_by_another(
    app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    fast = ["--stale-after", "2", "--heartbeat-interval", "0.3", "--poll-interval", "0.2"]
    job_id = app.eq.sync.enqueue(app.slow_first_attempt, seconds=3600)
    victim = worker(soniq_processes, *fast)
    wait_until(lambda: runs_per_job(pg, schema)[job_id] == 1, 30, "the job to start")
    victim.kill()
    assert app.eq.sync.get_job(job_id).status == JobStatus.RUNNING  # nobody put it back
    rescuer = worker(soniq_processes, *fast)
    job = wait_until(
        lambda: (j := app.eq.sync.get_job(job_id)).status == JobStatus.DONE and j,
        30,
        "another worker to rescue and finish the job",
    )
    # Rescued as a dead worker's job (the stale timeout), the attempt counted.
    assert job.attempts == 2
    assert job.last_error is not None and "WorkerLost" in job.last_error
    notes = pg.execute(
        f'SELECT attempt, note FROM "{schema}".runs ORDER BY attempt, note DESC'
    ).fetchall()
    assert notes == [(1, "started"), (2, "started"), (2, "finished")]
    rescuer.send_signal(signal.SIGTERM)
    code, out = rescuer.finish()
    assert code == 0, out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killed_connections_are_reopened_and_no_job_is_lost(
    app: Any, pg: psycopg.Connection, schema: str, database_url: str, soniq_processes: Spawn
) -> None:
    proc = worker(soniq_processes, "--poll-interval", "0.2", "--concurrency", "20")
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
        raise AssertionError(f"{statuses(pg, schema)}\n{proc.output[-6000:]}") from None
    counts = runs_per_job(pg, schema)
    assert set(counts) == set(first + second)
    # At-least-once: a job whose completion was lost with its connection may run
    # again, but none is lost, and none runs more than twice.
    assert max(counts.values()) <= 2
    proc.wait_for_output("LISTEN connection restored")
    proc.send_signal(signal.SIGTERM)
    code, out = proc.finish()
    assert code == 0, out
    assert "LISTEN connection lost" in out


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_job_blocking_the_loop_does_not_get_its_worker_declared_dead(
    app: Any, pg: psycopg.Connection, schema: str, soniq_processes: Spawn
) -> None:
    """The heartbeat runs on its own thread: blocking the loop for longer than
    stale_after must not let a second worker rescue and rerun the job."""
    eq = app.eq
    job_id = await eq.enqueue(app.blocks_the_loop, seconds=3.0)
    other = worker(soniq_processes, "--stale-after", "1.5", "--heartbeat-interval", "0.3")
    try:
        await eq.run_worker(burst=True, stale_after=1.5, heartbeat_interval=0.3)
    finally:
        other.send_signal(signal.SIGTERM)
        await asyncio.to_thread(other.finish)
    assert runs_per_job(pg, schema)[job_id] == 2  # started, finished: one run
    assert (await eq.get_job(job_id)).attempts == 1
    await eq.close()


# -- in process ---------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_poll_only_worker_never_listens(
    eq: Soniq, pg: psycopg.Connection, schema: str
) -> None:
    """listen=False (PgBouncer in transaction pooling mode): no session of the worker
    LISTENs, and jobs are found by polling all the same. The control: the same
    worker with listen=True is seen listening, so the check can see a listener."""
    ran: list[int] = []

    @eq.job
    async def ping(n: int) -> None:
        ran.append(n)

    def listeners() -> int:
        return listening_sessions(pg, schema)

    await eq.enqueue(ping, n=1)
    poller = asyncio.create_task(eq.run_worker(listen=False, poll_interval=0.1))
    try:
        await async_wait_until(lambda: ran == [1], 30, "the first poll to run job 1")
        assert await asyncio.to_thread(listeners) == 0
        # Due later, so no NOTIFY is sent at all: only a poll can find it.
        await eq.enqueue(ping, n=2, delay=0.2)
        await async_wait_until(lambda: ran == [1, 2], 30, "a later poll to run job 2")
        assert await asyncio.to_thread(listeners) == 0
    finally:
        poller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poller

    listener = asyncio.create_task(eq.run_worker(listen=True, poll_interval=30))
    try:

        async def seen_listening() -> bool:
            return await asyncio.to_thread(listeners) == 1

        await async_wait_until(seen_listening, 30, "the listening worker's LISTEN session")
        await eq.enqueue(ping, n=3)  # woken by its NOTIFY, long before a 30 s poll
        await async_wait_until(lambda: ran == [1, 2, 3], 20, "the NOTIFY to wake the worker")
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener


@pytest.mark.timeout(60)
async def test_a_failure_keeps_its_traceback(app: Any, pg: psycopg.Connection, schema: str) -> None:
    eq = app.eq
    job_id = await eq.enqueue(app.refuses_retry)
    await eq.run_worker(burst=True)
    job = await eq.get_job(job_id)
    assert (job.status, job.last_error) == (JobStatus.FAILED, "PermanentError: do not retry this")
    trace = pg.execute(
        f'SELECT last_traceback FROM "{schema}".soniq_jobs WHERE id = %s', (job_id,)
    ).fetchone()
    assert trace and "Traceback" in trace[0] and "refuses_retry" in trace[0]
    await eq.close()


def test_sync_run_worker_blocks_until_done(app: Any, pg: psycopg.Connection, schema: str) -> None:
    ids = app.eq.sync.enqueue_many(app.record_sync, [{"n": n} for n in range(20)])
    app.eq.sync.run_worker(burst=True, concurrency=4)
    assert runs_per_job(pg, schema) == {job_id: 1 for job_id in ids}


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


async def test_the_first_claim_of_a_table_loaded_in_bulk_is_planned_with_statistics(
    eq: Soniq, pg: psycopg.Connection, schema: str
) -> None:
    """A fresh table loaded in bulk has no statistics until autovacuum's first pass, and
    a claim planned without them scans and sorts every queued row: the worker's first
    beat analyzes the table before its first claim (see heartbeat.ANALYZE_ROWS)."""

    def reltuples() -> float:
        row = pg.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (f'"{schema}".soniq_jobs',)
        ).fetchone()
        assert row is not None
        return float(row[0])

    seen: list[float] = []

    @eq.job(name="stats.probe")
    def probe() -> None:
        if not seen:
            seen.append(reltuples())

    await eq.enqueue_many(probe, [{} for _ in range(ANALYZE_ROWS)])
    assert reltuples() < 0  # never analyzed
    await eq.run_worker(burst=True, concurrency=20)
    assert seen and seen[0] >= ANALYZE_ROWS
