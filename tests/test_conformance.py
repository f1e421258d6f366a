"""The conformance suite: every backend operation, the same test on every backend
(River's ``riverdrivertest`` is the model). A new operation without a test here is
incomplete.

The faces: the async backends (asyncpg, psycopg async, SQLite file, ``memory://``)
run every operation; the blocking twins (psycopg sync, SQLite sync, memory sync) run
those ``eq.sync`` has (insert, get, list, cancel). Each test states the rows it
expects once, and every face must produce exactly them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest

from soniq import Job, QueueLimits, Rate, Soniq
from soniq.core import outcomes
from soniq.core.flow import ClaimLimits, JobLimits
from soniq.core.jobs import JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.drivers._common import is_connection_error
from tests.conftest import BACKENDS, migrated_soniq

UTC = dt.timezone.utc
SYNC_FACES = ("psycopg-sync", "sqlite-sync", "memory-sync")


@attrs.define
class Face:
    """One backend seen through one face: enqueue, get, list and cancel as its users
    call them (awaited here either way)."""

    eq: Soniq
    sync: bool

    async def enqueue(self, job: str, **kwargs: Any) -> int:
        if self.sync:
            return self.eq.sync.enqueue(job, **kwargs)
        return await self.eq.enqueue(job, **kwargs)

    async def enqueue_many(self, job: str, args: list[dict[str, Any]], **kw: Any) -> list[int]:
        if self.sync:
            return self.eq.sync.enqueue_many(job, args, **kw)
        return await self.eq.enqueue_many(job, args, **kw)

    async def get(self, job_id: int) -> Job:
        job = self.eq.sync.get_job(job_id) if self.sync else await self.eq.get_job(job_id)
        assert job is not None, f"job {job_id} is gone"
        return job

    async def missing(self, job_id: int) -> bool:
        job = self.eq.sync.get_job(job_id) if self.sync else await self.eq.get_job(job_id)
        return job is None

    async def cancel(self, job_id: int) -> bool:
        if self.sync:
            return self.eq.sync.cancel_job(job_id)
        return await self.eq.cancel_job(job_id)

    async def queued(self, name: str | None = None, queue: str | None = None) -> list[int]:
        backend: Any = self.eq.sync.backend if self.sync else self.eq.backend
        jobs = backend.list_jobs(name, queue)
        if not self.sync:
            jobs = await jobs
        return [job.id for job in jobs]


def _backend(face: str) -> str:
    return "asyncpg" if face == "psycopg-sync" else face.removesuffix("-sync")


@pytest.fixture(params=BACKENDS + SYNC_FACES)
async def face(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Face]:
    async with migrated_soniq(_backend(request.param), request, tmp_path) as eq:
        yield Face(eq, request.param.endswith("-sync"))


def row(job: Job) -> tuple[Any, ...]:
    """What every backend must agree on about a job."""
    return (
        job.name,
        job.queue,
        dict(job.args),
        job.status.value,
        job.priority,
        job.attempts,
        job.claims,
        job.max_retries,
        job.timeout,
        job.dedupe_key,
        job.cancel_requested,
        job.result,
    )


# -- insert -------------------------------------------------------------------------------


async def test_insert_one(face: Face) -> None:
    before = dt.datetime.now(UTC)
    job_id = await face.enqueue(
        "c.job", n=1, queue="q", priority=5, max_retries=2, timeout=9.5, delay=60
    )
    job = await face.get(job_id)
    assert row(job) == ("c.job", "q", {"n": 1}, "queued", 5, 0, 0, 2, 9.5, None, False, None)
    assert job.worker_id is None and job.last_error is None
    assert job.started_at is None and job.finished_at is None
    assert job.created_at.tzinfo is not None and job.run_at.tzinfo is not None
    assert before - dt.timedelta(seconds=5) <= job.created_at <= dt.datetime.now(UTC)
    assert abs((job.run_at - job.created_at).total_seconds() - 60) < 1

    at = dt.datetime(2031, 5, 6, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert (await face.get(await face.enqueue("c.job", run_at=at))).run_at == at


async def test_insert_many_in_input_order(face: Face) -> None:
    ids = await face.enqueue_many("c.job", [{"n": n} for n in range(5)], queue="bulk")
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [(await face.get(i)).args for i in ids] == [{"n": n} for n in range(5)]
    assert {(await face.get(i)).queue for i in ids} == {"bulk"}
    assert await face.enqueue_many("c.job", []) == []


async def test_dedupe_returns_the_holder_until_it_finishes(face: Face) -> None:
    first = await face.enqueue("c.job", n=1, dedupe_key="k")
    assert await face.enqueue("c.job", n=2, dedupe_key="k") == first
    assert (await face.get(first)).args == {"n": 1}  # the duplicate's arguments dropped
    assert await face.cancel(first) is True  # finished: the key is free again
    second = await face.enqueue("c.job", n=3, dedupe_key="k")
    assert second != first
    assert row(await face.get(second))[2:4] == ({"n": 3}, "queued")


async def test_list_queued_by_name_and_queue(face: Face) -> None:
    a = await face.enqueue("c.a", queue="q1")
    b = await face.enqueue("c.b", queue="q1", delay=3600)  # scheduled jobs are queued too
    c = await face.enqueue("c.a", queue="q2")
    done = await face.enqueue("c.a", queue="q1")
    await face.cancel(done)
    assert await face.queued() == [a, b, c]
    assert await face.queued(name="c.a") == [a, c]
    assert await face.queued(queue="q1") == [a, b]
    assert await face.queued(name="c.a", queue="q2") == [c]


async def test_cancel_queued_finished_and_unknown(face: Face) -> None:
    job_id = await face.enqueue("c.job")
    assert await face.cancel(job_id) is True
    job = await face.get(job_id)
    assert job.status.value == "cancelled" and job.finished_at is not None
    assert await face.cancel(job_id) is False  # finished already
    assert await face.cancel(10**12) is False  # no such job
    assert await face.missing(10**12)


# -- in a caller's transaction (PostgreSQL's faces) ------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
async def embedded_eq(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Soniq]:
    async with migrated_soniq(request.param, request, tmp_path) as app:
        yield app


async def test_the_embedded_backends_refuse_a_callers_connection(embedded_eq: Soniq) -> None:
    """No caller's transaction to join: every face refuses ``connection=`` before
    writing anything."""
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        await embedded_eq.enqueue("c.job", connection=object())
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        await embedded_eq.enqueue_many("c.job", [{}], connection=object())
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        embedded_eq.sync.enqueue("c.job", connection=object())
    assert await embedded_eq.backend.list_jobs(None, None) == []


@pytest.fixture(params=["asyncpg", "psycopg"])
async def server_eq(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Soniq]:
    async with migrated_soniq(request.param, request, tmp_path) as app:
        yield app


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_insert_in_a_callers_transaction(
    server_eq: Soniq, database_url: str, commit: bool
) -> None:
    any_eq = server_eq
    async with caller_transaction(any_eq.backend.name, database_url, commit) as conn:
        ids = [
            await any_eq.enqueue("c.job", connection=conn, n=1),
            *await any_eq.enqueue_many("c.job", [{"n": 2}, {"n": 3}], connection=conn),
        ]
        assert await any_eq.get_job(ids[0]) is None  # not committed: invisible outside
    found = [await any_eq.get_job(i) for i in ids]
    if commit:
        assert [j.args if j else None for j in found] == [{"n": 1}, {"n": 2}, {"n": 3}]
    else:
        assert found == [None, None, None]

    with psycopg.connect(database_url) as sync_conn:  # the sync twin's face
        sync_id = any_eq.sync.enqueue("c.job", connection=sync_conn, n=4)
        if not commit:
            sync_conn.rollback()
    assert (any_eq.sync.get_job(sync_id) is None) is not commit


@contextlib.asynccontextmanager
async def caller_transaction(driver: str, url: str, commit: bool) -> AsyncIterator[Any]:
    """A connection of ``driver`` (a caller's own), in a transaction that is committed,
    or rolled back, when the block ends."""
    if driver == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(url)
    else:
        conn = await psycopg.AsyncConnection.connect(url)
    try:
        tx = conn.transaction()
        await tx.start() if driver == "asyncpg" else await tx.__aenter__()
        yield conn
        if driver == "asyncpg":
            await (tx.commit() if commit else tx.rollback())
        elif commit:
            await tx.__aexit__(None, None, None)
        else:
            await tx.__aexit__(RuntimeError, RuntimeError("roll back"), None)
    finally:
        await conn.close()


# -- claim ----------------------------------------------------------------------------------


async def test_claim_by_priority_then_run_at_then_id_skipping_future_jobs(any_eq: Soniq) -> None:
    now = dt.datetime.now(UTC)
    low = await any_eq.enqueue("c.job", priority=0, run_at=now - dt.timedelta(seconds=10))
    high_late = await any_eq.enqueue("c.job", priority=9, run_at=now - dt.timedelta(seconds=1))
    high_early = await any_eq.enqueue("c.job", priority=9, run_at=now - dt.timedelta(seconds=5))
    low_same = await any_eq.enqueue("c.job", priority=0, run_at=now - dt.timedelta(seconds=10))
    await any_eq.enqueue("c.job", priority=99, delay=3600)  # not due

    first = await any_eq.backend.claim_jobs(2, "w", None)
    rest = await any_eq.backend.claim_jobs(10, "w", None)
    assert [c.id for c in first] == [high_early, high_late]
    assert [c.id for c in rest] == [low, low_same]
    assert {(c.attempts, c.claims) for c in first + rest} == {(1, 1)}
    job = await any_eq.get_job(low)
    assert job is not None and job.status.value == "running" and job.worker_id == "w"
    assert job.started_at is not None
    assert await any_eq.backend.claim_jobs(10, "w", None) == []


async def test_claim_only_the_queues_asked_for(any_eq: Soniq) -> None:
    a = await any_eq.enqueue("c.job", queue="a")
    b = await any_eq.enqueue("c.job", queue="b")
    c = await any_eq.enqueue("c.job", queue="c")
    assert [j.id for j in await any_eq.backend.claim_jobs(10, "w", ["b"])] == [b]
    assert [j.id for j in await any_eq.backend.claim_jobs(10, "w", ["c", "a"])] == [a, c]
    assert await any_eq.backend.claim_jobs(10, "w", []) == []


async def test_claim_only_the_names_asked_for(any_eq: Soniq) -> None:
    a = await any_eq.enqueue("c.a")
    b = await any_eq.enqueue("c.b", queue="q2")
    c = await any_eq.enqueue("c.c", priority=5)
    a2 = await any_eq.enqueue("c.a", queue="q2")
    claim = any_eq.backend.claim_jobs
    assert await claim(10, "w", None, []) == []
    assert await claim(10, "w", None, ["c.nobody"]) == []
    assert [j.id for j in await claim(10, "w", ["q2"], ["c.a"])] == [a2]  # one queue
    assert [j.id for j in await claim(10, "w", ["default", "q2"], ["c.b"])] == [b]  # several
    assert [(j.id, j.name) for j in await claim(10, "w", None, ["c.a", "c.c"])] == [
        (c, "c.c"),  # still in claim order: priority first
        (a, "c.a"),
    ]
    statuses = {i: (await any_eq.get_job(i)).status.value for i in (a, b, c, a2)}
    assert set(statuses.values()) == {"running"}


async def test_claimed_job_carries_what_the_worker_needs(any_eq: Soniq) -> None:
    job_id = await any_eq.enqueue("c.job", n=1, queue="q", max_retries=4, timeout=2.5)
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert (claimed.id, claimed.name, claimed.queue, claimed.args) == (
        job_id,
        "c.job",
        "q",
        {"n": 1},
    )
    assert (claimed.attempts, claimed.max_retries, claimed.timeout) == (1, 4, 2.5)


# -- finish: fenced by worker and attempt --------------------------------------------------


async def _claimed(any_eq: Soniq, **options: Any) -> int:
    job_id = await any_eq.enqueue("c.job", **options)
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == job_id
    return job_id


async def _finish(any_eq: Soniq, outcome: Outcome, worker: str = "w", keep: bool = True) -> None:
    await any_eq.backend.finish_jobs([outcome], worker, keep=keep)


async def test_finish_is_fenced_by_worker_and_attempt(any_eq: Soniq) -> None:
    job_id = await _claimed(any_eq)
    await _finish(any_eq, outcomes.succeeded(job_id, 1, None), worker="other")
    await _finish(any_eq, outcomes.succeeded(job_id, 2, None))
    job = await any_eq.get_job(job_id)
    assert job is not None and job.status.value == "running"  # neither write applied
    await _finish(any_eq, outcomes.succeeded(job_id, 1, {"ok": True}))
    job = await any_eq.get_job(job_id)
    assert job is not None
    assert row(job)[3:] == ("done", 0, 1, 1, 3, None, None, False, {"ok": True})
    assert job.finished_at is not None and job.worker_id == "w"


async def test_fail_retry_and_give_up(any_eq: Soniq) -> None:
    job_id = await _claimed(any_eq, max_retries=1)
    error = RuntimeError("boom")
    retry = outcomes.failed(job_id, 1, 1, error, lambda: 0.5)
    assert retry.retry_in is not None
    await _finish(any_eq, retry)
    job = await any_eq.get_job(job_id)
    assert job is not None
    assert (job.status.value, job.attempts, job.last_error) == ("queued", 1, "RuntimeError: boom")
    assert job.worker_id is None and job.finished_at is None
    assert job.run_at > dt.datetime.now(UTC)  # backed off
    assert await any_eq.backend.claim_jobs(1, "w", None) == []

    await _finish(any_eq, attrs.evolve(retry, retry_in=0.0))  # no longer this run: ignored
    fresh = await any_eq.enqueue("c.job", max_retries=0)
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == fresh
    await _finish(any_eq, outcomes.failed(fresh, 1, 0, error, lambda: 0.5))
    job = await any_eq.get_job(fresh)
    assert job is not None and (job.status.value, job.attempts) == ("failed", 1)
    assert job.finished_at is not None


async def test_finished_jobs_are_deleted_without_retention(any_eq: Soniq) -> None:
    done = await _claimed(any_eq)
    await _finish(any_eq, outcomes.succeeded(done, 1, None), keep=False)
    assert await any_eq.get_job(done) is None
    retried = await _claimed(any_eq)
    await _finish(any_eq, outcomes.failed(retried, 1, 3, ValueError("x"), lambda: 0.5), keep=False)
    job = await any_eq.get_job(retried)
    assert job is not None and job.status.value == "queued"  # a retry is not finished


async def test_cancel_a_running_job_records_the_request(any_eq: Soniq) -> None:
    job_id = await _claimed(any_eq)
    assert await any_eq.cancel_job(job_id) is True
    job = await any_eq.get_job(job_id)
    assert job is not None and (job.status.value, job.cancel_requested) == ("running", True)
    ops = any_eq.backend.maintenance()
    try:
        assert ops.cancel_requests("w") == [job_id]
        assert ops.cancel_requests("other") == []
    finally:
        ops.close()
    await _finish(any_eq, outcomes.cancelled(job_id, 1))
    job = await any_eq.get_job(job_id)
    assert job is not None and job.status.value == "cancelled"


async def test_a_snooze_puts_the_job_back_later_its_run_not_counted(any_eq: Soniq) -> None:
    job_id = await _claimed(any_eq, max_retries=0)
    before = dt.datetime.now(dt.timezone.utc)
    await _finish(any_eq, outcomes.snoozed(job_id, 1, 3600.0), worker="other")  # fenced
    assert (await any_eq.get_job(job_id)).status.value == "running"
    await _finish(any_eq, outcomes.snoozed(job_id, 1, 3600.0))
    job = await any_eq.get_job(job_id)
    assert (job.status.value, job.attempts, job.claims, job.snoozes) == ("queued", 0, 0, 1)
    assert job.worker_id is None and job.finished_at is None and job.last_error is None
    hour = dt.timedelta(hours=1)
    assert before + hour - dt.timedelta(seconds=5) <= job.run_at <= before + hour * 1.01
    assert await any_eq.backend.claim_jobs(1, "w", None) == []  # not due


# -- put back: release, rescue, reconcile ------------------------------------------------------


async def test_release_puts_back_without_counting(any_eq: Soniq) -> None:
    job_id = await _claimed(any_eq)
    await _finish(any_eq, outcomes.released(job_id, 1))
    job = await any_eq.get_job(job_id)
    assert job is not None
    assert (job.status.value, job.attempts, job.claims, job.worker_id) == ("queued", 0, 1, None)


async def test_rescue_puts_back_the_jobs_of_unknown_workers_counting_the_attempt(
    any_eq: Soniq,
) -> None:
    await any_eq.backend.register_worker(WorkerIdentity("alive", "h", 1, None, 1))
    mine = await any_eq.enqueue("c.job")
    theirs = await any_eq.enqueue("c.job")
    last_try = await any_eq.enqueue("c.job", max_retries=0)
    assert [c.id for c in await any_eq.backend.claim_jobs(1, "alive", None)] == [mine]
    assert [c.id for c in await any_eq.backend.claim_jobs(2, "ghost", None)] == [theirs, last_try]
    ops = any_eq.backend.maintenance()
    try:
        assert sorted(ops.rescue_stale(30)) == [(theirs, "queued"), (last_try, "failed")]
    finally:
        ops.close()
    rows = {i: await any_eq.get_job(i) for i in (mine, theirs, last_try)}
    assert rows[mine] is not None and rows[mine].status.value == "running"
    lost = "WorkerLost: worker ghost stopped heartbeating"
    for job_id, status in ((theirs, "queued"), (last_try, "failed")):
        job = rows[job_id]
        assert job is not None
        assert (job.status.value, job.attempts, job.last_error) == (status, 1, lost)


async def test_reconcile_puts_back_what_the_worker_does_not_hold(any_eq: Soniq) -> None:
    held = await any_eq.enqueue("c.job")
    lost = await any_eq.enqueue("c.job")
    await any_eq.backend.claim_jobs(2, "w", None)
    assert await any_eq.backend.reconcile("w", [held]) == 1
    kept, put_back = await any_eq.get_job(held), await any_eq.get_job(lost)
    assert kept is not None and kept.status.value == "running"
    assert put_back is not None
    assert (put_back.status.value, put_back.attempts, put_back.claims) == ("queued", 0, 0)
    assert await any_eq.backend.reconcile("w", [held]) == 0


async def test_a_worker_session_claims_finishes_and_reconciles_as_the_backend_does(
    any_eq: Soniq,
) -> None:
    """The worker's loops use a session held throughout: its operations write the
    same rows as the backend's own."""
    first, second, third = [await any_eq.enqueue("c.job", n=n) for n in range(3)]
    async with any_eq.backend.worker_session() as ops:
        claimed = await ops.claim_jobs(2, "w", None)
        assert [c.id for c in claimed] == [first, second]
        await ops.finish_jobs([outcomes.succeeded(first, 1, "ok")], "w", keep=True)
        assert await ops.reconcile("w", []) == 1  # second: claimed, not held
        assert [c.id for c in await ops.claim_jobs(5, "w", None)] == [second, third]
    done, again = await any_eq.get_job(first), await any_eq.get_job(second)
    assert done is not None and (done.status.value, done.result) == ("done", "ok")
    assert again is not None and (again.status.value, again.attempts) == ("running", 1)


async def test_an_aborted_session_fails_as_a_lost_connection_or_has_no_link_to_lose(
    any_eq: Soniq,
) -> None:
    """``abort()`` (the worker's command_timeout): on a server the session's next
    statement fails as on a lost connection; an embedded database has no link, and
    the session goes on. Either way a new session works."""
    job_id = await any_eq.enqueue("c.job")
    served = any_eq.backend.name in ("asyncpg", "psycopg")
    session = any_eq.backend.worker_session()
    ops = await session.__aenter__()
    ops.abort()
    if served:
        try:
            await ops.claim_jobs(1, "w", None)
        except Exception as exc:
            assert is_connection_error(exc), repr(exc)
            # As the worker drops a session after an error: the connection abandoned.
            with contextlib.suppress(Exception):
                await session.__aexit__(type(exc), exc, exc.__traceback__)
        else:
            pytest.fail("a statement on an aborted session got an answer")
    else:
        assert [c.id for c in await ops.claim_jobs(1, "w", None)] == [job_id]
        await session.__aexit__(None, None, None)
    async with any_eq.backend.worker_session() as ops:
        await ops.reconcile("w", [])
    maintenance = any_eq.backend.maintenance()
    try:
        maintenance.abort()  # only ever called while a call waits: here, none does
    finally:
        maintenance.close()
    fresh = any_eq.backend.maintenance()
    try:
        await any_eq.backend.register_worker(WorkerIdentity("w2", "h", 1, None, 1))
        assert fresh.heartbeat("w2") is True
    finally:
        fresh.close()


# -- workers and pruning ----------------------------------------------------------------------


async def test_heartbeat_register_and_unregister(any_eq: Soniq) -> None:
    await any_eq.backend.register_worker(WorkerIdentity("w1", "host", 42, ("a", "b"), 3))
    ops = any_eq.backend.maintenance()
    try:
        assert ops.heartbeat("w1") is True
        assert ops.heartbeat("nobody") is False
        await any_eq.backend.unregister_worker("w1")
        assert ops.heartbeat("w1") is False
        ops.register_worker(WorkerIdentity("w1", "host", 42, None, 3))  # the heartbeat re-registers
        assert ops.heartbeat("w1") is True
    finally:
        ops.close()


async def test_prune_deletes_finished_jobs_in_batches(any_eq: Soniq) -> None:
    finished = [await _claimed(any_eq) for _ in range(3)]
    for job_id in finished:
        await _finish(any_eq, outcomes.succeeded(job_id, 1, None))
    cancelled = await any_eq.enqueue("c.job")
    await any_eq.cancel_job(cancelled)
    waiting = await any_eq.enqueue("c.job")
    ops = any_eq.backend.maintenance()
    try:
        assert ops.prune_finished(3600, 10) == 0  # none is an hour old
        assert ops.prune_finished(-1, 2) == 2
        assert ops.prune_finished(-1, 10) == 2
        assert ops.prune_finished(-1, 10) == 0
    finally:
        ops.close()
    assert [await any_eq.get_job(i) for i in [*finished, cancelled]] == [None] * 4
    assert await any_eq.get_job(waiting) is not None


async def test_a_job_table_without_statistics_is_analyzed_once(any_eq: Soniq) -> None:
    """PostgreSQL plans the claim badly on a table with no statistics: the heartbeat's
    session analyzes it once it holds enough rows, and then never again. SQLite plans
    from its partial indexes and needs none (False: nothing to do)."""
    server = any_eq.backend.name in ("asyncpg", "psycopg")
    await any_eq.enqueue_many("c.job", [{} for _ in range(5)])
    ops = any_eq.backend.maintenance()
    try:
        assert ops.analyze_if_never(1000) is (None if server else False)  # too few rows
        assert ops.analyze_if_never(5) is server
        assert ops.analyze_if_never(5) is False
    finally:
        ops.close()


# -- pause and resume ---------------------------------------------------------------------------


async def test_a_paused_queue_is_not_claimed_until_resumed(face: Face) -> None:
    eq, sync = face.eq, face.sync

    async def call(method: str, *args: Any) -> Any:
        if sync:
            return getattr(eq.sync, method)(*args)
        return await getattr(eq, method)(*args)

    mail = await face.enqueue("c.job", queue="mail")
    other = await face.enqueue("c.job", queue="other")
    assert await call("paused_queues") == []
    assert await call("pause_queue", "mail") is True
    assert await call("pause_queue", "mail") is False  # already paused
    assert await call("pause_queue", "reports") is True  # a queue with no job yet
    assert await call("paused_queues") == ["mail", "reports"]
    late = await face.enqueue("c.job", queue="mail")  # enqueues are still accepted
    claim = eq.backend.claim_jobs
    assert [j.id for j in await claim(10, "w", None)] == [other]
    assert await claim(10, "w", ["mail"]) == []
    assert await claim(10, "w", ["mail", "reports"], ["c.job"]) == []
    assert await call("resume_queue", "mail") is True
    assert await call("resume_queue", "mail") is False  # not paused
    assert await call("resume_queue", "never.paused") is False
    assert await call("paused_queues") == ["reports"]
    assert [j.id for j in await claim(10, "w", ["mail"])] == [mail, late]


async def test_next_due_of_the_queues_and_names_asked_for(any_eq: Soniq) -> None:
    due = any_eq.backend.next_due
    assert await due(None, ["c.job"]) is None  # nothing queued
    await any_eq.enqueue("c.job", queue="a", delay=600)
    await any_eq.enqueue("c.job", queue="b", delay=60)
    await any_eq.enqueue("c.other", queue="b", delay=5)
    running = await any_eq.enqueue("c.job", queue="a")
    [claimed] = await any_eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == running  # running: not queued, not counted
    assert 50 < await due(None, ["c.job"]) <= 60
    assert 590 < await due(["a"], ["c.job"]) <= 600
    assert 0 < await due(["a", "b"], ["c.job", "c.other"]) <= 5
    assert await due(["c"], ["c.job"]) is None
    assert await due(None, []) is None
    await any_eq.pause_queue("b")  # a paused queue's jobs are not coming
    assert 590 < await due(None, ["c.job", "c.other"]) <= 600
    await any_eq.enqueue("c.job", queue="a", run_at=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))
    assert await due(["a"], ["c.job"]) < -1e6  # overdue


# -- periodic ticks ---------------------------------------------------------------------------


async def test_a_tick_is_enqueued_once_and_only_forward(any_eq: Soniq) -> None:
    backend = any_eq.backend
    spec = JobSpec("p.job", "beat", ({"region": "eu"},), priority=3, max_retries=1, timeout=9.0)
    t0 = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.timezone.utc)
    t1, t2 = t0 + dt.timedelta(seconds=30), t0 + dt.timedelta(seconds=60)
    assert await backend.last_ticks(["k", "other"]) == {}
    # Recorded without a job (a new schedule), then the next tick with its job.
    assert await backend.enqueue_tick("k", t0, spec, enqueue=False) is None
    job_id = await backend.enqueue_tick("k", t1, spec, enqueue=True)
    assert job_id is not None
    job = await any_eq.get_job(job_id)
    assert (job.name, job.queue, job.args, job.status.value) == (
        "p.job",
        "beat",
        {"region": "eu"},
        "queued",
    )
    assert (job.priority, job.max_retries, job.timeout, job.run_at) == (3, 1, 9.0, t1)
    # The same tick again, or an older one (another worker, late): nothing.
    assert await backend.enqueue_tick("k", t1, spec, enqueue=True) is None
    assert await backend.enqueue_tick("k", t0, spec, enqueue=True) is None
    assert [j.id for j in await backend.list_jobs("p.job", None)] == [job_id]
    # Skipped (missed, catch_up=False): moves forward, no job.
    assert await backend.enqueue_tick("k", t2, spec, enqueue=False) is None
    assert await backend.last_ticks(["k", "other"]) == {"k": t2}
    assert [j.id for j in await backend.list_jobs("p.job", None)] == [job_id]
    # A schedule of its own: its own last tick.
    assert await backend.enqueue_tick("other", t0, spec, enqueue=True) is not None
    assert await backend.last_ticks(["k", "other"]) == {"k": t2, "other": t0}


# -- concurrency and rate limits ----------------------------------------------------------------


def _limits(name: str, **options: Any) -> ClaimLimits:
    return ClaimLimits.of([(name, JobLimits(**options))])


async def _claim_ids(
    eq: Soniq, limits: ClaimLimits | None, names: list[str], n: int = 10
) -> list[int]:
    return [c.id for c in await eq.backend.claim_jobs(n, "w", None, names, limits)]


async def test_a_job_concurrency_limit_leaves_the_rest_queued_without_holding_up_others(
    any_eq: Soniq,
) -> None:
    limited = [await any_eq.enqueue("c.lim", n=i) for i in range(4)]
    free = [await any_eq.enqueue("c.free", n=i) for i in range(2)]
    limits = _limits("c.lim", concurrency=2)
    names = ["c.free", "c.lim"]
    first = await any_eq.backend.claim_jobs(10, "w", None, names, limits)
    assert sorted(c.id for c in first) == sorted([*free, *limited[:2]])
    assert {c.id: c.limited for c in first} == {
        **{i: False for i in free},
        **{i: True for i in limited[:2]},
    }
    assert await _claim_ids(any_eq, limits, names) == []  # two running: full
    await _finish(any_eq, outcomes.succeeded(limited[0], 1, None))
    assert await _claim_ids(any_eq, limits, names) == [limited[2]]  # in claim order
    # A claim told of no limits (soniq.testing's, one job at a time) obeys none.
    assert await _claim_ids(any_eq, None, names) == [limited[3]]


async def test_a_concurrency_limit_per_key_counts_each_value_of_the_argument(
    any_eq: Soniq,
) -> None:
    a1 = await any_eq.enqueue("c.lim", account=1)
    a1_again = await any_eq.enqueue("c.lim", account=1)
    a2 = await any_eq.enqueue("c.lim", account=2)
    a_text = await any_eq.enqueue("c.lim", account="1")  # another JSON value
    a_none = await any_eq.enqueue("c.lim")  # no argument: the group of null
    a_null = await any_eq.enqueue("c.lim", account=None)
    urgent = await any_eq.enqueue("c.lim", account=2, priority=5)
    limits = _limits("c.lim", concurrency=1, concurrency_key="account")
    claimed = await _claim_ids(any_eq, limits, ["c.lim"])
    assert claimed == [urgent, a1, a_text, a_none]  # claim order, one per value
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == []
    await _finish(any_eq, outcomes.failed(a_none, 1, 0, ValueError("x"), lambda: 0.5))
    await _finish(any_eq, outcomes.succeeded(a1, 1, None))
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [a1_again, a_null]
    await _finish(any_eq, outcomes.succeeded(urgent, 1, None))
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [a2]


async def test_a_running_job_put_back_frees_its_place_under_the_limit(any_eq: Soniq) -> None:
    job = await any_eq.enqueue("c.lim")
    limits = _limits("c.lim", concurrency=1)
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [job]
    retry = outcomes.failed(job, 1, 3, ValueError("x"), lambda: 0.5)
    await _finish(any_eq, attrs.evolve(retry, retry_in=0.0))  # a retry, due at once
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [job]
    await _finish(any_eq, outcomes.released(job, 2))  # shutdown
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [job]
    assert await any_eq.backend.reconcile("w", []) == 1  # a claim nobody received
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [job]
    later = await any_eq.enqueue("c.lim")
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == []
    assert await any_eq.cancel_job(job) is True  # cancelled while running, acked
    await _finish(any_eq, outcomes.cancelled(job, 2))
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == [later]


async def test_a_queue_concurrency_limit_is_stored_and_obeyed(face: Face) -> None:
    eq = face.eq

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if face.sync:
            return getattr(eq.sync, method)(*args, **kwargs)
        return await getattr(eq, method)(*args, **kwargs)

    mail = [await face.enqueue("c.job", queue="mail", n=i) for i in range(3)]
    other = await face.enqueue("c.job", queue="other")
    assert await call("queue_limits") == {}
    await call("set_queue_limits", "mail", concurrency=2)
    await call("set_queue_limits", "reports", rate_limit="100/m")
    assert await call("queue_limits") == {
        "mail": QueueLimits(concurrency=2),
        "reports": QueueLimits(rate=Rate(100, 60.0)),
    }
    assert (await call("queue_limits"))["reports"].rate_limit == "100/m"
    limits = ClaimLimits()  # a worker with no limited job still obeys its queues'
    claimed = await _claim_ids(eq, limits, ["c.job"])
    assert sorted(claimed) == sorted([*mail[:2], other])
    assert await _claim_ids(eq, limits, ["c.job"]) == []
    for worker_queues in (["mail"], ["mail", "other"]):
        assert await eq.backend.claim_jobs(10, "w", worker_queues, ["c.job"], limits) == []
    await call("pause_queue", "mail")  # a pause holds a limited queue too
    await _finish(eq, outcomes.succeeded(mail[0], 1, None))
    assert await _claim_ids(eq, limits, ["c.job"]) == []
    await call("resume_queue", "mail")
    assert await _claim_ids(eq, limits, ["c.job"]) == [mail[2]]
    await call("set_queue_limits", "mail")  # no limits: removed
    assert await call("queue_limits") == {"reports": QueueLimits(rate=Rate(100, 60.0))}


async def test_a_queue_limit_and_a_job_limit_both_hold(any_eq: Soniq) -> None:
    await any_eq.set_queue_limits("mail", concurrency=3)
    jobs = [await any_eq.enqueue("c.lim", queue="mail", account=i % 2) for i in range(6)]
    limits = _limits("c.lim", concurrency=1, concurrency_key="account")
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == jobs[:2]  # one per account
    await any_eq.set_queue_limits("mail", concurrency=1)
    await _finish(any_eq, outcomes.succeeded(jobs[0], 1, None))
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == []  # the queue is full


async def test_a_rate_limit_counts_starts_in_a_sliding_window(any_eq: Soniq) -> None:
    jobs = [await any_eq.enqueue("c.lim", account=i % 2) for i in range(6)]
    per_account = _limits("c.lim", rate=Rate(2, 3600.0), rate_key="account")
    assert await _claim_ids(any_eq, per_account, ["c.lim"]) == jobs[:4]
    for job_id in jobs[:4]:  # ended: the starts still count in their window
        await _finish(any_eq, outcomes.succeeded(job_id, 1, None))
    assert await _claim_ids(any_eq, per_account, ["c.lim"]) == []
    await any_eq.enqueue("c.other", queue="slow")
    await any_eq.enqueue("c.other", queue="slow")
    await any_eq.set_queue_limits("slow", rate_limit="1/h")
    [started] = await any_eq.backend.claim_jobs(10, "w", None, ["c.other"], ClaimLimits())
    assert started.queue == "slow"
    assert await _claim_ids(any_eq, ClaimLimits(), ["c.other"]) == []


async def test_a_rate_limit_window_moves(any_eq: Soniq) -> None:
    jobs = [await any_eq.enqueue("c.lim", n=i) for i in range(3)]
    limits = _limits("c.lim", rate=Rate(1, 0.3))
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == jobs[:1]
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == []
    await asyncio.sleep(0.35)  # the window's length: the first start has left it
    assert await _claim_ids(any_eq, limits, ["c.lim"]) == jobs[1:2]


async def test_a_limited_claim_refuses_to_count_under_repeatable_read(
    server_eq: Soniq, database_url: str
) -> None:
    # The count must see the claim before it (a new snapshot after the lock); under
    # REPEATABLE READ it could not, so the claim fails instead of overrunning a limit.
    await server_eq.enqueue("c.lim")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET default_transaction_isolation = 'repeatable read'")
        schema = server_eq.backend.queries.schema
        with pytest.raises(psycopg.errors.RaiseException, match="need READ COMMITTED"):
            conn.execute(
                f'SELECT * FROM "{schema}".soniq_limit_usage(1, %s::jsonb)',
                ['{"jobs": [], "ended": []}'],
            )


async def test_a_limited_claim_skips_a_row_a_caller_holds(
    server_eq: Soniq, database_url: str
) -> None:
    # A caller's transaction holding a queued job's row (e.g. a dedupe hit) must not
    # hold up limited claims: the claim steps over the locked row.
    held = await server_eq.enqueue("c.lim", n=0)
    free = await server_eq.enqueue("c.lim", n=1)
    limits = _limits("c.lim", concurrency=5)
    schema = server_eq.backend.queries.schema
    with psycopg.connect(database_url) as conn:
        conn.execute(f'SELECT 1 FROM "{schema}".soniq_jobs WHERE id = %s FOR UPDATE', [held])
        claimed = await asyncio.wait_for(_claim_ids(server_eq, limits, ["c.lim"]), 5)
        assert claimed == [free]
        conn.rollback()
    assert await _claim_ids(server_eq, limits, ["c.lim"]) == [held]


async def test_an_ended_run_is_uncounted_only_while_it_is_this_workers_run(
    any_eq: Soniq,
) -> None:
    first = await any_eq.enqueue("c.lim", n=0)
    second = await any_eq.enqueue("c.lim", n=1)
    limits = _limits("c.lim", concurrency=1)
    [run] = await any_eq.backend.claim_jobs(1, "w2", None, ["c.lim"], limits)
    assert run.id == first
    # Worker w1 says it ended run 1 of the first job: not its run (w2 holds it), so
    # the job still counts; nor does a run number that is not the row's.
    for worker, ended in (("w1", ((first, 1),)), ("w2", ((first, 2),))):
        told = ClaimLimits(limits.jobs, ended)
        assert await any_eq.backend.claim_jobs(1, worker, None, ["c.lim"], told) == []
    told = ClaimLimits(limits.jobs, ((first, 1),))  # w2's own ended run: uncounted
    assert [c.id for c in await any_eq.backend.claim_jobs(1, "w2", None, ["c.lim"], told)] == [
        second
    ]


async def test_a_rate_window_starts_when_the_claims_turn_comes(
    server_eq: Soniq, database_url: str
) -> None:
    # A claim that waited for its turn stamps its starts (and their windows) from
    # when it could count, not from when its statement began.
    jobs = [await server_eq.enqueue("c.lim", n=i) for i in range(2)]
    limits = _limits("c.lim", rate=Rate(1, 0.5))
    assert await _claim_ids(server_eq, limits, ["c.lim"]) == jobs[:1]
    turn = server_eq.backend.queries.limit_turn
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [turn])
        waiting = asyncio.ensure_future(_claim_ids(server_eq, limits, ["c.lim"]))
        await asyncio.sleep(0.6)  # the claim waits for its turn past the window
        assert not waiting.done()
        conn.rollback()
    assert await asyncio.wait_for(waiting, 5) == jobs[1:]
    first, second = [await server_eq.get_job(i) for i in jobs]
    assert first is not None and second is not None
    assert first.started_at is not None and second.started_at is not None
    assert (second.started_at - first.started_at).total_seconds() >= 0.5
