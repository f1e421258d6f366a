"""One behaviour suite for every backend: the worker's semantics, run in-process on
PostgreSQL (asyncpg and psycopg), SQLite and memory, so they cannot drift apart.

Crash and signal tests with real processes live in test_worker.py (PostgreSQL) and
test_sqlite.py; here each job records its runs in a list.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from soniq import Backoff, ConfigurationError, JobStatus, PermanentError, Snooze, Soniq, current_job
from soniq.core.jobs import WorkerIdentity
from tests.conftest import async_wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def eq(any_eq: Soniq) -> Soniq:
    """Every test here runs on every backend."""
    return any_eq


class Runs:
    """What ran: (job id, attempt, note) per run, from any thread."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, str]] = []

    def record(self, note: str = "") -> None:
        ctx = current_job()
        self.log.append((ctx.id, ctx.attempt, note))

    def per_job(self) -> collections.Counter[int]:
        return collections.Counter(job_id for job_id, _, _ in self.log)


async def run_until(
    eq: Soniq, condition: Callable[[], Any], timeout: float = 30, **kw: Any
) -> None:
    """Run a worker until ``await condition()`` is true, then cancel it."""
    task = asyncio.create_task(eq.run_worker(poll_interval=0.05, **kw))

    async def reached() -> bool:
        if task.done():
            task.result()  # the worker ended early: its error, or this one
            raise AssertionError("the worker stopped before the condition held")
        return bool(await condition())

    try:
        await async_wait_until(reached, timeout, "the condition")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def status_of(eq: Soniq, job_id: int) -> JobStatus | None:
    job = await eq.get_job(job_id)
    return None if job is None else job.status


async def test_burst_runs_every_job_exactly_once(eq: Soniq) -> None:
    runs = Runs()

    @eq.job
    async def async_job(n: int) -> int:
        runs.record()
        return n * 2

    @eq.job
    def sync_job(n: int) -> int:
        runs.record()
        return n * 3

    ids = await eq.enqueue_many(async_job, [{"n": n} for n in range(50)])
    ids += await eq.enqueue_many(sync_job, [{"n": n} for n in range(50)])
    await eq.run_worker(burst=True, concurrency=8)
    assert runs.per_job() == {job_id: 1 for job_id in ids}
    first, last = await eq.get_job(ids[1]), await eq.get_job(ids[-1])
    assert (first.status, first.result, first.attempts) == (JobStatus.DONE, 2, 1)
    assert (last.status, last.result) == (JobStatus.DONE, 147)


async def test_claim_order_is_priority_then_run_at_then_id(eq: Soniq) -> None:
    order: list[int] = []

    @eq.job
    async def job(n: int) -> None:
        order.append(n)

    await eq.enqueue(job, n=1, priority=-1)
    await eq.enqueue(job, n=2, priority=10)
    await eq.enqueue(job, n=3)
    await eq.enqueue(job, n=4)
    later = await eq.enqueue(job, n=5, priority=100, delay=3600)
    await eq.run_worker(burst=True, concurrency=1)
    assert order == [2, 3, 4, 1]
    assert await status_of(eq, later) == JobStatus.QUEUED  # not due: not run


async def test_queues_are_honoured(eq: Soniq) -> None:
    seen: list[str] = []

    @eq.job(queue="mail")
    async def mail() -> None:
        seen.append("mail")

    @eq.job
    async def other() -> None:
        seen.append("other")

    await eq.enqueue(mail)
    other_id = await eq.enqueue(other)
    await eq.run_worker(burst=True, queues=["mail"])
    assert seen == ["mail"]
    assert await status_of(eq, other_id) == JobStatus.QUEUED


async def test_a_scheduled_job_runs_once_due(eq: Soniq) -> None:
    runs = Runs()

    @eq.job
    async def later() -> None:
        runs.record()

    job_id = await eq.enqueue(later, delay=0.3)
    started = time.monotonic()

    async def done() -> bool:
        return await status_of(eq, job_id) == JobStatus.DONE

    await run_until(eq, done)
    assert time.monotonic() - started >= 0.25
    assert runs.per_job() == {job_id: 1}


async def test_retries_then_failed_with_the_error_kept(eq: Soniq) -> None:
    runs = Runs()

    @eq.job(max_retries=2, backoff=Backoff(base=0.01, jitter=0))
    async def flaky() -> None:
        runs.record()
        raise RuntimeError("broken on purpose")

    @eq.job(max_retries=5)
    def refuses() -> None:
        runs.record()
        raise PermanentError("no point retrying")

    ids = [await eq.enqueue(flaky), await eq.enqueue(refuses)]

    async def both_failed() -> bool:
        return all([await status_of(eq, i) == JobStatus.FAILED for i in ids])

    await run_until(eq, both_failed)
    flaky_job, refused_job = await eq.get_job(ids[0]), await eq.get_job(ids[1])
    assert runs.per_job() == {ids[0]: 3, ids[1]: 1}  # max_retries=2 allows 3 runs
    assert (flaky_job.attempts, flaky_job.last_error) == (3, "RuntimeError: broken on purpose")
    assert refused_job.attempts == 1 and "no point retrying" in refused_job.last_error


async def test_a_job_that_fails_once_then_succeeds(eq: Soniq) -> None:
    @eq.job(backoff=Backoff(base=0.01, jitter=0))
    async def once() -> str:
        if current_job().attempt == 1:
            raise ValueError("first time")
        return "second time"

    job_id = await eq.enqueue(once)

    async def done() -> bool:
        return await status_of(eq, job_id) == JobStatus.DONE

    await run_until(eq, done)
    job = await eq.get_job(job_id)
    assert (job.attempts, job.result, job.last_error) == (
        2,
        "second time",
        "ValueError: first time",
    )


async def test_timeouts_fail_async_and_sync_jobs(eq: Soniq) -> None:
    @eq.job(timeout=0.2, max_retries=0)
    async def slow_async() -> None:
        await asyncio.sleep(10)

    @eq.job(timeout=0.2, max_retries=0)
    def slow_sync() -> None:
        time.sleep(0.6)

    ids = [await eq.enqueue(slow_async), await eq.enqueue(slow_sync)]

    async def both_failed() -> bool:
        return all([await status_of(eq, i) == JobStatus.FAILED for i in ids])

    await run_until(eq, both_failed)
    for job_id in ids:
        assert "JobTimeout" in (await eq.get_job(job_id)).last_error


async def test_cancel_queued_and_running_jobs(eq: Soniq) -> None:
    runs = Runs()
    started = asyncio.Event()

    @eq.job
    async def forever() -> None:
        runs.record("started")
        started.set()
        await asyncio.sleep(3600)

    @eq.job
    def sync_forever() -> None:
        runs.record("started")
        deadline = time.monotonic() + 30
        while not current_job().cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        runs.record("saw cancel" if current_job().cancelled else "timed out")

    never = await eq.enqueue(forever, delay=3600)
    assert await eq.cancel_job(never) is True
    assert await status_of(eq, never) == JobStatus.CANCELLED
    ids = [await eq.enqueue(forever), await eq.enqueue(sync_forever)]

    async def cancel_when_running() -> bool:
        if len(runs.log) >= 2:
            for job_id in ids:
                await eq.cancel_job(job_id)
        return all([await status_of(eq, i) == JobStatus.CANCELLED for i in ids])

    await run_until(eq, cancel_when_running, heartbeat_interval=0.1, stale_after=5)
    assert (ids[1], 1, "saw cancel") in runs.log
    assert never not in runs.per_job()


async def test_a_worker_leaves_jobs_it_does_not_know_queued(eq: Soniq) -> None:
    @eq.job(name="known.here")
    async def known() -> None: ...

    theirs = await eq.enqueue("nobody.knows.this", x=1, max_retries=5)
    mine = await eq.enqueue(known)
    await eq.run_worker(burst=True)
    assert await status_of(eq, mine) == JobStatus.DONE
    job = await eq.get_job(theirs)
    assert (job.status, job.attempts, job.last_error) == (JobStatus.QUEUED, 0, None)


async def test_a_worker_with_no_job_registered_says_it_will_take_none(
    eq: Soniq, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await eq.enqueue("defined.elsewhere")
    with caplog.at_level("WARNING", logger="soniq"):
        await eq.run_worker(burst=True)
    assert "no job is registered with this Soniq" in caplog.text
    assert await status_of(eq, job_id) == JobStatus.QUEUED


async def test_a_worker_enqueues_periodic_jobs_at_their_ticks(eq: Soniq) -> None:
    runs = Runs()

    @eq.periodic(every=0.2, kwargs={"region": "eu"}, name="beat.pull")
    async def pull(region: str) -> None:
        runs.record(region)

    async def ran_four() -> bool:
        return len(runs.log) >= 4

    await run_until(eq, ran_four, timeout=20)
    jobs = [await eq.get_job(job_id) for job_id, _, _ in runs.log]
    ticks = sorted(job.run_at for job in jobs)  # a periodic job is due at its tick
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    # Each tick once, on the 0.2 s grid (a tick the loop wakes too late for is missed,
    # not doubled: see test_schedules.py).
    tick = dt.timedelta(seconds=0.2)
    assert all(gap >= tick and gap % tick == dt.timedelta(0) for gap in gaps), ticks
    assert {note for _, _, note in runs.log} == {"eu"}


async def test_a_worker_started_without_periodic_enqueues_none(eq: Soniq) -> None:
    @eq.job(name="beat.other")
    async def other() -> None: ...

    @eq.periodic(every=0.05, name="beat.never")
    async def never() -> None: ...

    job_id = await eq.enqueue(other, delay=0.3)

    async def other_done() -> bool:
        return await status_of(eq, job_id) == JobStatus.DONE

    await run_until(eq, other_done, periodic=False)
    assert await eq.backend.list_jobs("beat.never", None) == []
    assert await eq.backend.last_ticks([s.key for s in eq.registry.schedules]) == {}


async def test_a_paused_queue_waits_and_its_resume_wakes_the_worker(eq: Soniq) -> None:
    @eq.job(name="pq.job")
    async def job() -> None: ...

    assert await eq.pause_queue("mail") is True
    held = await eq.enqueue(job, queue="mail")
    free = await eq.enqueue(job, queue="other")
    # A poll interval longer than the test: only the resume's wake-up can start `held`.
    worker = asyncio.create_task(eq.run_worker(poll_interval=60))
    try:

        async def done(job_id: int) -> bool:
            return await status_of(eq, job_id) == JobStatus.DONE

        await async_wait_until(lambda: done(free), 20, "the other queue's job")
        # The claim that took `free` saw `held` too, and left it.
        assert await status_of(eq, held) == JobStatus.QUEUED
        assert await eq.resume_queue("mail") is True
        await async_wait_until(lambda: done(held), 20, "the resumed queue's job")
    finally:
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker


async def test_a_snoozing_job_runs_again_without_using_its_retries(eq: Soniq) -> None:
    runs = Runs()

    @eq.job(name="snooze.poll", max_retries=0)
    def poll() -> str:
        runs.record()
        if len(runs.log) == 1:
            raise Snooze(0)
        if len(runs.log) == 2:
            raise Snooze(dt.timedelta(milliseconds=50))
        return "ready"

    job_id = await eq.enqueue(poll)

    async def done() -> bool:
        return await status_of(eq, job_id) == JobStatus.DONE

    await run_until(eq, done)
    job = await eq.get_job(job_id)
    assert (job.result, job.attempts, job.claims, job.snoozes) == ("ready", 1, 1, 2)
    assert [attempt for _, attempt, _ in runs.log] == [1, 1, 1]  # never a retry
    assert job.last_error is None


@pytest.mark.parametrize(
    "delay", [-1, float("nan"), float("inf"), 1e12, dt.timedelta(days=400), "5", True, None]
)
def test_a_snooze_of_a_bad_delay_is_refused(delay: Any) -> None:
    with pytest.raises(ValueError, match=r"Snooze\(delay\): seconds from 0 to a year"):
        Snooze(delay)


async def test_a_burst_worker_waits_for_a_retry_or_snooze_due_soon(eq: Soniq) -> None:
    runs = Runs()

    @eq.job(name="burst.flaky", max_retries=1, backoff=Backoff(base=0.3, jitter=0))
    async def flaky() -> None:
        runs.record()
        if current_job().attempt == 1:
            raise RuntimeError("setup not ready yet")

    @eq.job(name="burst.sleepy")
    async def sleepy() -> None:
        runs.record()
        if current_job().id not in {i for i, _, note in runs.log if note == "snoozed"}:
            runs.record("snoozed")
            raise Snooze(0.3)

    ids = [await eq.enqueue(flaky), await eq.enqueue(sleepy)]
    await asyncio.wait_for(eq.run_worker(burst=True, poll_interval=60), 20)
    assert [await status_of(eq, i) for i in ids] == [JobStatus.DONE, JobStatus.DONE]
    assert (await eq.get_job(ids[0])).attempts == 2
    assert (await eq.get_job(ids[1])).snoozes == 1


async def test_a_job_snoozing_forever_does_not_keep_a_burst_worker_alive(eq: Soniq) -> None:
    @eq.job(name="burst.forever")
    async def forever() -> None:
        raise Snooze(0.1)

    job_id = await eq.enqueue(forever)
    started = time.monotonic()
    await asyncio.wait_for(eq.run_worker(burst=True, burst_wait=0.5), 20)
    assert time.monotonic() - started < 5  # burst_wait counts from the first idle moment
    job = await eq.get_job(job_id)
    assert job.status == JobStatus.QUEUED and job.snoozes >= 2


async def test_a_burst_worker_does_not_wait_beyond_burst_wait(eq: Soniq) -> None:
    @eq.job(name="burst.failing", max_retries=1, backoff=Backoff(base=0.3, jitter=0))
    async def failing() -> None:
        raise RuntimeError("down")

    later = await eq.enqueue(failing, delay=3600)  # far beyond burst_wait: not waited for
    retried = await eq.enqueue(failing)
    started = time.monotonic()
    await asyncio.wait_for(eq.run_worker(burst=True, burst_wait=0), 20)
    assert time.monotonic() - started < 5
    assert (await eq.get_job(retried)).status == JobStatus.QUEUED  # the retry left pending
    assert (await eq.get_job(later)).attempts == 0
    with pytest.raises(ConfigurationError, match="burst_wait must be seconds >= 0"):
        await eq.run_worker(burst=True, burst_wait=-1)


async def test_retention_zero_deletes_finished_jobs(eq: Soniq) -> None:
    @eq.job
    async def quick() -> None: ...

    ids = await eq.enqueue_many(quick, [{} for _ in range(10)])
    await eq.run_worker(burst=True, retention=0)
    assert [await eq.get_job(i) for i in ids] == [None] * 10


async def test_dedupe_key_is_free_again_once_the_job_is_done(eq: Soniq) -> None:
    @eq.job
    async def once(n: int) -> None: ...

    first = await eq.enqueue(once, n=1, dedupe_key="k")
    assert await eq.enqueue(once, n=2, dedupe_key="k") == first
    await eq.run_worker(burst=True)
    again = await eq.enqueue(once, n=3, dedupe_key="k")
    assert again != first and (await eq.get_job(again)).args == {"n": 3}


async def test_a_dead_workers_job_is_rescued(eq: Soniq) -> None:
    """A worker that claimed a job and stopped heartbeating: a live worker puts the
    job back (attempt counted) and runs it."""
    runs = Runs()

    @eq.job
    async def work() -> None:
        runs.record()

    job_id = await eq.enqueue(work)
    backend = eq.backend
    await backend.register_worker(WorkerIdentity("dead-worker", "host", 1, None, 1))
    assert [c.id for c in await backend.claim_jobs(1, "dead-worker", None)] == [job_id]

    async def done() -> bool:
        return await status_of(eq, job_id) == JobStatus.DONE

    await run_until(eq, done, heartbeat_interval=0.1, stale_after=0.5)
    assert runs.log == [(job_id, 2, "")]  # the dead worker's claim was attempt 1


WORKER_DOC = Path(__file__).resolve().parent.parent / "docs" / "worker.md"


@pytest.mark.parametrize("index", range(2))
def test_the_worker_docs_examples_run(index: int) -> None:
    """Each example of docs/worker.md runs (the two applications' on memory://)."""
    examples = re.findall(r"```python\n(.*?)```", WORKER_DOC.read_text(), re.S)
    assert len(examples) == 2
    namespace: dict[str, object] = {"__name__": "docs_worker", "DATABASE_URL": "memory://"}
    exec(compile(examples[index], str(WORKER_DOC), "exec"), namespace)
    if "billing" in namespace:
        billing, mail = namespace["billing"], namespace["mail"]
        assert [d.name for d in billing.registry] == ["billing.charge"]  # type: ignore[attr-defined]
        assert [d.name for d in mail.registry] == ["mail.send"]  # type: ignore[attr-defined]
