"""A worker that reconciles after a lost claim must not put back the jobs whose
outcomes its completer is writing at that moment (issue 12, defect 6).

Before the fix the reconcile counted only running and pending jobs; a batch in the
completer's hands was neither, so its jobs went back to the queue with the attempt
uncounted and ran a second time as attempt 1, invisibly. The fault (a claim that
fails while a completion is in flight) is injected around the real backend, on the
real database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from soniq import Soniq
from soniq.worker import Worker, WorkerConfig


class _Faults:
    """The real backend, with a completion that waits to be let go and one claim that
    fails while that completion is in flight."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.finish_started = asyncio.Event()
        self.let_finish = asyncio.Event()
        self.reconciled = asyncio.Event()
        self.claim_failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    @contextlib.asynccontextmanager
    async def worker_session(self) -> AsyncIterator[Any]:
        async with self._backend.worker_session() as ops:
            yield _FaultyOps(ops, self)


class _FaultyOps:
    def __init__(self, ops: Any, faults: _Faults) -> None:
        self._ops, self._faults = ops, faults

    async def claim_jobs(
        self, limit: int, worker_id: str, queues: Any, names: Any, limits: Any = None
    ) -> Any:
        if self._faults.finish_started.is_set() and not self._faults.claim_failed:
            self._faults.claim_failed = True
            raise ConnectionResetError("injected: the claim's connection was lost")
        return await self._ops.claim_jobs(limit, worker_id, queues, names, limits)

    async def finish_jobs(self, outcomes: Any, worker_id: str, *, keep: bool) -> None:
        self._faults.finish_started.set()
        await self._faults.let_finish.wait()
        await self._ops.finish_jobs(outcomes, worker_id, keep=keep)

    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        put_back = await self._ops.reconcile(worker_id, held)
        self._faults.reconciled.set()
        return put_back  # type: ignore[no-any-return]

    def abort(self) -> None:
        self._ops.abort()


@pytest.mark.timeout(60)
async def test_reconcile_keeps_jobs_whose_outcome_is_being_written(eq: Soniq) -> None:
    runs: list[int] = []

    @eq.job(name="counted")
    async def counted(n: int) -> None:
        runs.append(n)

    job_id = await eq.enqueue(counted, n=1)
    faults = _Faults(eq.backend)
    config = WorkerConfig(poll_interval=0.05, listen=False, concurrency=2)
    worker = Worker(backend=faults, registry=eq.registry, config=config)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(faults.reconciled.wait(), 30)
        faults.let_finish.set()
        await _until_done(eq, job_id)
        # A job wrongly put back would be claimed before this later one (claim order
        # is by id), so once this one is done, a second run would have started.
        await _until_done(eq, await eq.enqueue(counted, n=2))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    job = await eq.get_job(job_id)
    assert job is not None
    assert runs == [1, 2]
    assert (job.status.value, job.attempts, job.claims) == ("done", 1, 1)


async def _until_done(eq: Soniq, job_id: int) -> None:
    for _ in range(600):
        job = await eq.get_job(job_id)
        assert job is not None
        if job.status.value == "done":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in 30s")
