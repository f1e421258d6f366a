"""A run that may have happened twice is visible (issue 12, defect 6): ``claims``
counts the runs a worker started, apart from the counted ``attempts``.

A put-back at shutdown does not count the attempt, but the run it interrupted may have
done its work; the next run shows ``claims > attempts`` on the job, in
``current_job().claims`` and in a WARNING of the worker. A claim whose reply was lost
(reconcile) never started, so it counts neither.
"""

from __future__ import annotations

import pytest

from soniq import Soniq
from soniq.core import outcomes


async def test_a_run_put_back_uncounted_shows_as_a_second_claim(any_eq: Soniq) -> None:
    job_id = await any_eq.enqueue("claims.job", n=1)
    fresh = await any_eq.get_job(job_id)
    assert fresh is not None and (fresh.attempts, fresh.claims) == (0, 0)

    [first] = await any_eq.backend.claim_jobs(1, "w1", None)
    assert (first.attempts, first.claims) == (1, 1)
    await any_eq.backend.finish_jobs([outcomes.released(job_id, 1)], "w1", keep=True)
    put_back = await any_eq.get_job(job_id)
    assert put_back is not None
    assert (put_back.status.value, put_back.attempts, put_back.claims) == ("queued", 0, 1)

    [second] = await any_eq.backend.claim_jobs(1, "w2", None)
    assert (second.attempts, second.claims) == (1, 2)
    await any_eq.backend.finish_jobs([outcomes.succeeded(job_id, 1, None)], "w2", keep=True)
    done = await any_eq.get_job(job_id)
    assert done is not None and (done.status.value, done.attempts, done.claims) == ("done", 1, 2)


async def test_a_claim_whose_reply_was_lost_counts_no_run(any_eq: Soniq) -> None:
    job_id = await any_eq.enqueue("claims.job", n=1)
    await any_eq.backend.claim_jobs(1, "w1", None)
    assert await any_eq.backend.reconcile("w1", []) == 1
    job = await any_eq.get_job(job_id)
    assert job is not None and (job.status.value, job.attempts, job.claims) == ("queued", 0, 0)


async def test_the_second_run_knows_it_and_the_worker_says_so(
    any_eq: Soniq, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[int, int]] = []

    @any_eq.job(name="claims.observed")
    def observed() -> None:
        from soniq import current_job

        seen.append((current_job().attempt, current_job().claims))

    job_id = await any_eq.enqueue(observed)
    await any_eq.backend.claim_jobs(1, "gone", None)
    await any_eq.backend.finish_jobs([outcomes.released(job_id, 1)], "gone", keep=True)

    await any_eq.run_worker(burst=True)

    assert seen == [(1, 2)]
    assert any(
        f"job {job_id} claims.observed: started again (run 2, attempt 1)" in r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING"
    )
