"""A model of the queue, checked against real PostgreSQL (asyncpg, and the sync face
for enqueues in a caller's transaction) and SQLite after every step of random
sequences of: enqueue, enqueue in a caller's transaction that commits or rolls back,
claim, finish (success, failure with and without retries left, a refusal to retry, a
put-back at shutdown, an acknowledged cancel), cancel, a worker's death and the rescue
of its jobs, and the late finish of a job that was rescued meanwhile (fenced: it
changes nothing).

The backend's operations are driven directly (what a worker does, without its loop),
so every interleaving hypothesis draws is a sequence of single statements. Each example
gets a fresh schema (PostgreSQL) or file (SQLite).
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from soniq import Backoff, JobStatus, PermanentError, Soniq
from soniq.core import outcomes
from soniq.core.jobs import WorkerIdentity
from tests.reliability.conftest import report

T = TypeVar("T")
Q, R, D, F, C = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.DONE,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)
FINISHED = {D, F, C}
NO_WAIT = Backoff(base=0, jitter=0)  # a retried job is ready at once
_names = itertools.count()


@attrs.define
class ModelJob:
    status: JobStatus
    max_retries: int
    priority: int
    attempts: int = 0
    claims: int = 0  # runs started, whatever happened to their attempt
    worker: str | None = None
    cancel_requested: bool = False


class QueueMachine(RuleBasedStateMachine):
    """Set ``kind`` ("postgres" or "sqlite") and, for PostgreSQL, ``url`` first."""

    kind: ClassVar[str] = "postgres"
    url: ClassVar[str] = ""
    steps: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.schema = f"sm{next(_names)}"
        if self.kind == "postgres":
            self.eq = Soniq(self.url, driver="asyncpg", schema=self.schema)
        else:
            self.tmp = tempfile.TemporaryDirectory()
            self.eq = Soniq(f"sqlite:///{Path(self.tmp.name) / 'jobs.db'}")

        @self.eq.job(name="sm.work")
        async def work(n: int = 0) -> int:
            return n

        self.run(self.eq.ensure_initialized())
        self.backend = self.eq.backend
        self.jobs: dict[int, ModelJob] = {}
        self.gone: list[int] = []  # enqueued in a transaction that rolled back
        self.alive: list[str] = []
        self.dead: set[str] = set()
        self.workers = itertools.count()
        # (worker, job id, attempts) of each claim not finished yet; a rescued job's
        # claim stays here, and finishing it is a late, fenced finish.
        self.held: list[tuple[str, int, int]] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def count(self, step: str) -> None:
        self.steps[step] = self.steps.get(step, 0) + 1

    def teardown(self) -> None:
        try:
            self.run(self.eq.close())
        finally:
            self.loop.close()
        if self.kind == "postgres":
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
                )
        else:
            self.tmp.cleanup()

    @initialize(jobs=st.integers(1, 4))
    def a_worker_and_some_jobs(self, jobs: int) -> None:
        """Every example starts with material to claim, so that claims, finishes and
        rescues are not left to luck."""
        self.start_worker()
        for _ in range(jobs):
            self.enqueue(priority=0, max_retries=1)

    # -- enqueue ------------------------------------------------------------------

    @rule(priority=st.integers(-1, 1), max_retries=st.integers(0, 2))
    def enqueue(self, priority: int, max_retries: int) -> None:
        job_id = self.run(self.eq.enqueue("sm.work", priority=priority, max_retries=max_retries))
        assert job_id not in self.jobs
        self.jobs[job_id] = ModelJob(Q, max_retries, priority)
        self.count("enqueue")

    @precondition(lambda self: self.kind == "postgres")
    @rule(commit=st.booleans(), face=st.sampled_from(["asyncpg", "sync psycopg"]))
    def enqueue_in_callers_transaction(self, commit: bool, face: str) -> None:
        if face == "asyncpg":

            async def go() -> int:
                async with self.backend.acquire() as conn:
                    tx = conn.transaction()
                    await tx.start()
                    job_id = await self.eq.enqueue("sm.work", connection=conn, n=1)
                    await (tx.commit() if commit else tx.rollback())
                    return job_id

            job_id = self.run(go())
        else:
            with psycopg.connect(self.url) as conn:
                job_id = self.eq.sync.enqueue("sm.work", connection=conn, n=1)
                conn.commit() if commit else conn.rollback()
        if commit:
            self.jobs[job_id] = ModelJob(Q, 3, 0)
        else:
            self.gone.append(job_id)
        self.count(f"enqueue_in_transaction_{'commit' if commit else 'rollback'}")

    # -- workers ------------------------------------------------------------------

    @precondition(lambda self: len(self.alive) < 3)
    @rule()
    def start_worker(self) -> None:
        worker = f"w{next(self.workers)}"
        self.run(self.backend.register_worker(WorkerIdentity(worker, "host", 1, None, 3)))
        self.alive.append(worker)

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), limit=st.integers(1, 3))
    def claim(self, data: st.DataObject, limit: int) -> None:
        worker = data.draw(st.sampled_from(self.alive), label="worker")
        claimed = self.run(self.backend.claim_jobs(limit, worker, None))
        queued = {i for i, j in self.jobs.items() if j.status == Q}
        ids = [c.id for c in claimed]
        assert len(set(ids)) == len(ids)
        assert set(ids) <= queued, (ids, queued)
        assert len(ids) == min(limit, len(queued)), (ids, queued, limit)
        left = queued - set(ids)
        if ids and left:
            assert min(self.jobs[i].priority for i in ids) >= max(
                self.jobs[i].priority for i in left
            ), "a lower priority was claimed before a higher one"
        for c in claimed:
            job = self.jobs[c.id]
            job.attempts += 1
            job.claims += 1
            assert c.attempts == job.attempts, (c, job)
            job.status, job.worker = R, worker
        self.held += [(worker, c.id, c.attempts) for c in claimed]
        self.count("claim" if claimed else "claim_nothing")

    @precondition(lambda self: self.held)
    @rule(
        data=st.data(),
        how=st.sampled_from(["succeed", "error", "permanent", "release", "ack_cancel"]),
    )
    def finish(self, data: st.DataObject, how: str) -> None:
        index = data.draw(st.integers(0, len(self.held) - 1), label="claim")
        worker, job_id, attempts = self.held.pop(index)
        job = self.jobs[job_id]
        current = job.status == R and job.worker == worker and job.attempts == attempts
        if how == "ack_cancel" and not job.cancel_requested:
            how = "succeed"
        if how == "succeed":
            outcome = outcomes.succeeded(job_id, attempts, 7)
        elif how == "error":
            exc: Exception = RuntimeError("boom")
            outcome = outcomes.failed(job_id, attempts, job.max_retries, exc, lambda: 0.5, NO_WAIT)
        elif how == "permanent":
            exc = PermanentError("no")
            outcome = outcomes.failed(job_id, attempts, job.max_retries, exc, lambda: 0.5, NO_WAIT)
        elif how == "release":
            outcome = outcomes.released(job_id, attempts)
        else:
            outcome = outcomes.cancelled(job_id, attempts)
        self.run(self.backend.finish_jobs([outcome], worker, keep=True))
        self.count(f"finish_{how}" if current else "late_finish_fenced")
        if not current:
            return  # a rescued job's late finish: fenced, nothing changes
        job.status = outcome.status
        if outcome.release:
            job.attempts -= 1
        if job.status not in FINISHED:
            job.worker = None
            job.cancel_requested = False

    # Hypothesis picks among the rules alike; these two twins double the weight of
    # claims and finishes against enqueues and cancels, which would otherwise leave
    # little to claim.
    @precondition(lambda self: self.alive)
    @rule(data=st.data(), limit=st.integers(1, 3))
    def claim_again(self, data: st.DataObject, limit: int) -> None:
        self.claim(data, limit)

    @precondition(lambda self: self.held)
    @rule(
        data=st.data(),
        how=st.sampled_from(["succeed", "error", "permanent", "release", "ack_cancel"]),
    )
    def finish_again(self, data: st.DataObject, how: str) -> None:
        self.finish(data, how)

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def worker_dies_and_is_rescued(self, data: st.DataObject) -> None:
        """The worker's row disappears (as a stale one is deleted) and a maintenance
        session rescues its running jobs: back to the queue with the attempt counted,
        or failed when no attempt is left. Its claims stay in ``held``: finishing
        them later is a late, fenced finish."""
        worker = data.draw(st.sampled_from(self.alive), label="worker")
        self.alive.remove(worker)
        self.dead.add(worker)
        self.run(self.backend.unregister_worker(worker))
        session = self.backend.maintenance()
        try:
            rescued = dict(session.rescue_stale(3600.0))
        finally:
            session.close()
        expected = {}
        for job_id, job in self.jobs.items():
            if job.status == R and job.worker == worker:
                job.status = Q if job.attempts <= job.max_retries else F
                if job.status == Q:
                    job.worker = None
                expected[job_id] = job.status.value
        assert {k: str(v) for k, v in rescued.items()} == expected
        self.count("worker_death_and_rescue")

    # -- cancel -------------------------------------------------------------------

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(
            st.sampled_from([*sorted(self.jobs), 10**9]) if self.jobs else st.just(10**9),
            label="job",
        )
        got = self.run(self.eq.cancel_job(job_id))
        job = self.jobs.get(job_id)
        if job is None or job.status in FINISHED:
            assert got is False, (job_id, job)
        elif job.status == Q:
            assert got is True
            job.status = C
        else:
            assert got is True
            job.cancel_requested = True
        self.count("cancel")

    # -- the check ------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        for job_id, job in self.jobs.items():
            stored = self.run(self.eq.get_job(job_id))
            assert stored is not None, job_id
            seen = (stored.status, stored.attempts, stored.claims, stored.cancel_requested)
            expected = (job.status, job.attempts, job.claims, job.cancel_requested)
            assert seen == expected, (job_id, seen, job)
            if job.status == R:
                assert stored.worker_id == job.worker
        for job_id in self.gone:
            assert self.run(self.eq.get_job(job_id)) is None, job_id


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_the_queue_follows_its_model(kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("cluster_url") if kind == "postgres" else ""
    machine = type(
        f"QueueMachine_{kind}",
        (QueueMachine,),
        {"kind": kind, "url": url, "steps": {}},
    )
    run_state_machine_as_test(machine, settings=SETTINGS)
    steps = machine.steps
    report(f"stateful_{kind}", **dict(sorted(steps.items())))
    finished = sum(n for step, n in steps.items() if step.startswith("finish_"))
    assert steps.get("claim") and finished and steps.get("worker_death_and_rescue"), steps
