"""What is particular to ``memory://``: SQLite in this process's memory, one database
shared by ``eq`` and ``eq.sync`` (and by nobody else), an injectable clock, thread
safety under a running worker, wake-ups across threads, and no connection to lend or
join. Its job semantics are the SQLite backend's, held to PostgreSQL's by the
behaviour suite (test_api.py, test_behaviour.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import threading
import time
from typing import Any

import pytest

from soniq import ConfigurationError, JobStatus, Soniq
from soniq.core.jobs import JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.sql import sqlite as sq
from soniq.drivers.sqlite import SqliteBackend, SqliteMemory, SqliteSyncBackend
from soniq.testing import use_clock

pytestmark = pytest.mark.timeout(60)
UTC = dt.timezone.utc


class Clock:
    """Epoch seconds that move only when told."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(**kwargs: Any) -> JobSpec:
    fields: dict[str, Any] = {"name": "t.job", "queue": "default", "args": ({},)}
    return JobSpec(**{**fields, **kwargs})


async def test_eq_and_eq_sync_share_one_store() -> None:
    eq = Soniq("memory://")

    @eq.job(name="t.job")
    def job(n: int) -> None: ...

    assert isinstance(eq.backend, SqliteBackend)
    assert isinstance(eq.sync.backend, SqliteSyncBackend)
    assert isinstance(eq.backend.database, SqliteMemory)
    assert eq.backend.database is eq.sync.backend.database
    assert await eq.ensure_initialized() is None and eq.sync.ensure_initialized() is None

    first = await eq.enqueue(job, n=1)
    second = eq.sync.enqueue(job, n=2, dedupe_key="k")
    assert [first, second] == [1, 2]
    assert eq.sync.enqueue_many(job, [{"n": 3}, {"n": 4}]) == [3, 4]
    assert await eq.enqueue(job, n=5, dedupe_key="k") == second  # dedupe across twins
    assert eq.sync.get_job(first).args == {"n": 1}
    assert (await eq.get_job(4)).args == {"n": 4}
    assert eq.sync.cancel_job(first) is True
    assert (await eq.get_job(first)).status == JobStatus.CANCELLED
    # Another Soniq on memory:// has a database of its own.
    assert await Soniq("memory://").get_job(second) is None
    await eq.close()
    assert eq.sync.get_job(second) is not None  # closing frees nothing: jobs stay


async def test_an_injected_clock_makes_jobs_due_without_sleeping() -> None:
    clock = Clock()
    backend = SqliteBackend(SqliteMemory(clock=clock))
    start = dt.datetime.fromtimestamp(clock.now, UTC)

    later = (await backend.insert_jobs(spec(delay=60.0)))[0]
    job = await backend.get_job(later)
    assert (job.created_at, job.run_at) == (start, start + dt.timedelta(seconds=60))
    assert await backend.claim_jobs(10, "w", None) == []
    clock.now += 59.999
    assert await backend.claim_jobs(10, "w", None) == []
    clock.now += 0.001
    [claimed] = await backend.claim_jobs(10, "w", None)
    assert (claimed.id, claimed.attempts) == (later, 1)

    # A retry is due after its back-off, by the same clock.
    retry = Outcome(later, 1, JobStatus.QUEUED, retry_in=30.0, error="E: boom")
    await backend.finish_jobs([retry], "w", keep=True)
    assert await backend.claim_jobs(10, "w", None) == []
    clock.now += 30
    assert [c.attempts for c in await backend.claim_jobs(10, "w", None)] == [2]

    # A clock set back: a job due before is not due any more, until time catches up.
    now = (await backend.insert_jobs(spec()))[0]
    clock.now -= 10
    assert await backend.claim_jobs(10, "w", None) == []
    clock.now += 10
    assert [c.id for c in await backend.claim_jobs(10, "w", None)] == [now]


async def test_the_clock_decides_which_workers_are_dead() -> None:
    clock = Clock()
    eq = Soniq("memory://")
    eq.backend.database.clock = clock  # type: ignore[attr-defined]
    backend, session = eq.backend, eq.backend.maintenance()

    ids = await backend.insert_jobs(spec(args=({}, {}), max_retries=0))
    await backend.register_worker(WorkerIdentity("live", "h", 1, None, 1))
    await backend.register_worker(WorkerIdentity("dead", "h", 2, None, 1))
    assert [c.id for c in await backend.claim_jobs(1, "live", None)] == [ids[0]]
    assert [c.id for c in await backend.claim_jobs(1, "dead", None)] == [ids[1]]
    clock.now += 20
    assert session.heartbeat("live") is True
    assert session.rescue_stale(30) == []
    clock.now += 20  # "dead" is 40 s silent, "live" 20 s
    assert session.heartbeat("live") is True
    assert session.rescue_stale(30) == [(ids[1], "failed")]  # no attempt left
    job = await eq.get_job(ids[1])
    assert job.last_error == "WorkerLost: worker dead stopped heartbeating"
    assert job.finished_at == dt.datetime.fromtimestamp(clock.now, UTC)
    assert session.heartbeat("dead") is False  # it was forgotten
    assert (await eq.get_job(ids[0])).status == JobStatus.RUNNING
    session.close()


async def test_a_heartbeat_session_reads_a_clock_replaced_after_it_opened() -> None:
    """``use_clock`` while a worker runs reaches its heartbeat thread's session too."""
    eq = Soniq("memory://")
    session = eq.backend.maintenance()
    clock = Clock()
    use_clock(eq, clock)
    ids = await eq.backend.insert_jobs(spec(max_retries=0))
    await eq.backend.register_worker(WorkerIdentity("gone", "h", 1, None, 1))
    assert [c.id for c in await eq.backend.claim_jobs(1, "gone", None)] == ids
    clock.now += 40
    assert session.rescue_stale(30) == [(ids[0], "failed")]  # 40 s by the new clock
    session.close()


async def test_thread_safety_under_a_running_worker() -> None:
    """Sync jobs enqueue from the worker's threads, four other threads enqueue at the
    same time, the heartbeat thread beats every 10 ms: every job runs exactly once,
    ids are unique and gapless."""
    eq = Soniq("memory://")
    runs: list[int] = []
    runs_lock = threading.Lock()
    # Producers 0 and 3 enqueue 200 fan jobs each (each fans out one leaf), producer 1
    # 200 async leaves, producer 2 200 leaves.
    expected = 2 * 200 * 2 + 200 + 200
    loop = asyncio.get_running_loop()
    all_ran = asyncio.Event()

    def ran(job_id: int) -> None:
        with runs_lock:
            runs.append(job_id)
            if len(runs) == expected:
                loop.call_soon_threadsafe(all_ran.set)

    @eq.job(name="t.leaf")
    def leaf(n: int) -> None:
        from soniq import current_job

        ran(current_job().id)

    @eq.job(name="t.fan")
    def fan(n: int) -> None:
        from soniq import current_job

        eq.sync.enqueue(leaf, n=n)
        ran(current_job().id)

    @eq.job(name="t.async_leaf")
    async def async_leaf(n: int) -> None:
        from soniq import current_job

        ran(current_job().id)

    def producer(kind: int) -> None:
        for n in range(200):
            if kind == 0:
                eq.sync.enqueue(fan, n=n)
            elif kind == 1:
                eq.sync.enqueue_many(async_leaf, [{"n": n}])
            else:
                eq.sync.enqueue(leaf, n=n, priority=n % 3)

    # Switch threads as often as possible, so that an unguarded read-modify-write in
    # the store would be interleaved (with the default 5 ms it almost never is).
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    worker = asyncio.create_task(
        eq.run_worker(concurrency=8, poll_interval=0.05, heartbeat_interval=0.01, stale_after=5)
    )
    producers = [threading.Thread(target=producer, args=(k % 3,)) for k in range(4)]
    for thread in producers:
        thread.start()
    try:
        await asyncio.wait_for(all_ran.wait(), 30)
        for thread in producers:
            thread.join(5)
    finally:
        sys.setswitchinterval(switch_interval)

    def stored() -> list[tuple[int, str, int]]:
        conn = eq.backend.database.connect()  # type: ignore[attr-defined]
        try:
            return conn.execute(
                "SELECT id, status, attempts FROM soniq_jobs ORDER BY id"
            ).fetchall()
        finally:
            conn.close()

    async def settled() -> bool:
        return all(status == "done" for _, status, _ in stored())

    deadline = time.monotonic() + 10
    while not await settled():
        assert time.monotonic() < deadline, "outcomes were not all written"
        await asyncio.sleep(0.01)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    jobs = stored()
    assert sorted(runs) == [job_id for job_id, _, _ in jobs] == list(range(1, expected + 1))
    assert {attempts for _, _, attempts in jobs} == {1}


async def test_enqueue_wakes_listeners_on_their_loop_from_any_thread() -> None:
    eq = Soniq("memory://")
    backend = eq.backend
    loop_thread = threading.get_ident()
    ready = asyncio.Event()
    woken = asyncio.Event()
    payloads: list[tuple[str, int]] = []

    def on_notify(payload: str) -> None:
        payloads.append((payload, threading.get_ident()))
        woken.set()

    listener = asyncio.create_task(backend.listen(on_notify, ready.set))
    await asyncio.wait_for(ready.wait(), 5)

    def from_a_thread() -> None:
        eq.sync.enqueue("t.job", dedupe_key="k")  # due: wakes
        eq.sync.enqueue("t.job", dedupe_key="k")  # a dedupe hit: no new job, no wake
        eq.sync.enqueue("t.job", queue="later", delay=60)  # not due: no wake
        eq.sync.enqueue_many("t.job", [{}, {}], queue="mail")  # one wake per call

    await asyncio.to_thread(from_a_thread)
    while len(payloads) < 2:
        woken.clear()
        await asyncio.wait_for(woken.wait(), 5)
    await asyncio.sleep(0)  # anything else already scheduled would run now
    assert payloads == [("default", loop_thread), ("mail", loop_thread)]

    listener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await listener
    eq.sync.enqueue("t.job")  # no listener left, nothing scheduled
    await asyncio.sleep(0)
    assert len(payloads) == 2


async def test_connection_is_refused_with_a_value_error() -> None:
    eq = Soniq("memory://")
    conn = object()
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        await eq.enqueue("t.job", connection=conn)
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        await eq.enqueue_many("t.job", [{}], connection=conn)
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        eq.sync.enqueue("t.job", connection=conn)
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        await SqliteBackend(SqliteMemory()).insert_jobs(spec(), conn)
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        SqliteSyncBackend(SqliteMemory()).list_jobs(None, None, conn)
    assert await eq.get_job(1) is None  # nothing was written


def test_no_pool_to_lend_and_nothing_to_migrate() -> None:
    database = SqliteMemory()
    for backend in (SqliteBackend(database), SqliteSyncBackend(database)):
        assert (backend.name, backend.accepts_connections) == ("memory", False)
        with pytest.raises(ConfigurationError, match="the memory backend has no connection"):
            backend.acquire()
    # A new database in memory starts current: checking it finds nothing to apply.
    assert SqliteSyncBackend(database).migrate(apply=False) == sq.LATEST_VERSION
    assert asyncio.run(SqliteBackend(database).migrate(apply=True)) == sq.LATEST_VERSION


async def test_stored_jobs_are_copies_of_what_callers_and_jobs_hold() -> None:
    """What PostgreSQL gives for free: a caller mutating its dict after enqueue, or a
    job mutating its arguments, does not change the stored job."""
    eq = Soniq("memory://")
    args = {"items": [1, 2], "meta": {"k": "v"}}
    [job_id] = await eq.enqueue_many("t.job", [args])
    args["items"].append(3)
    args["meta"]["k"] = "changed"
    job = await eq.get_job(job_id)
    assert job.args == {"items": [1, 2], "meta": {"k": "v"}}
    job.args["items"].append(4)  # type: ignore[index]
    [claimed] = await eq.backend.claim_jobs(1, "w", None)
    claimed.args["items"].append(5)
    assert (await eq.get_job(job_id)).args == {"items": [1, 2], "meta": {"k": "v"}}


async def test_times_are_aware_utc_datetimes() -> None:
    eq = Soniq("memory://")
    paris = dt.timezone(dt.timedelta(hours=2))
    run_at = dt.datetime(2031, 5, 6, 9, 30, 0, 123456, tzinfo=paris)
    job = await eq.get_job(await eq.enqueue("t.job", run_at=run_at))
    assert job.run_at == run_at and job.run_at.tzinfo is UTC
    assert job.run_at.hour == 7 and job.created_at.tzinfo is UTC
