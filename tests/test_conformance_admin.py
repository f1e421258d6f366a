"""The conformance suite, continued: the operator's calls (pages of jobs, retries),
the same test on every backend and face (see tests/test_conformance.py)."""

from __future__ import annotations

import datetime as dt
import itertools
import time
from typing import Any

import pytest

from soniq import Job, JobStatus
from soniq.core import outcomes
from soniq.core.jobs import WorkerIdentity
from tests.test_conformance import Face, face

__all__ = ["face"]  # a fixture, used by name


async def _call(face: Face, method: str, *args: Any, **kwargs: Any) -> Any:
    if face.sync:
        return getattr(face.eq.sync, method)(*args, **kwargs)
    return await getattr(face.eq, method)(*args, **kwargs)


async def _fail(face: Face, job_id: int, worker: str = "w") -> None:
    """Claim ``job_id`` (first in line) and fail it for good."""
    backend = face.eq.backend
    [claimed] = await backend.claim_jobs(1, worker, None)
    assert claimed.id == job_id
    failure = outcomes.failed(job_id, claimed.attempts, 0, ValueError("bad"), lambda: 0.5)
    await backend.finish_jobs([failure], worker, keep=True)


def _ids(jobs: list[Job]) -> list[int]:
    return [job.id for job in jobs]


async def test_list_jobs_pages_newest_first_by_status_queue_and_name(face: Face) -> None:
    ids = [await face.enqueue("a.x" if n % 2 else "a.y", n=n, queue=f"q{n % 3}") for n in range(7)]
    await face.cancel(ids[4])
    assert _ids(await _call(face, "list_jobs")) == ids[::-1]
    first = await _call(face, "list_jobs", limit=3)
    second = await _call(face, "list_jobs", limit=3, before_id=first[-1].id)
    last = await _call(face, "list_jobs", limit=3, before_id=second[-1].id)
    assert [_ids(first), _ids(second), _ids(last)] == [ids[6:3:-1], ids[3:0:-1], ids[:1]]
    assert await _call(face, "list_jobs", before_id=ids[0]) == []
    assert _ids(await _call(face, "list_jobs", status="cancelled")) == [ids[4]]
    assert _ids(await _call(face, "list_jobs", status=JobStatus.QUEUED, name="a.x")) == [
        ids[5],
        ids[3],
        ids[1],
    ]
    assert _ids(await _call(face, "list_jobs", queue="q0")) == [ids[6], ids[3], ids[0]]
    page = await _call(face, "list_jobs", queue="q1", name="a.x", limit=1)
    assert [(j.id, j.args, j.status) for j in page] == [(ids[1], {"n": 1}, JobStatus.QUEUED)]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"status": "stuck"}, ValueError, "status must be one of waiting, queued, running"),
        ({"limit": 0}, ValueError, "limit must be an int from 1 to 1,000, got 0"),
        ({"limit": 1001}, ValueError, "limit must be an int from 1 to 1,000"),
        ({"before_id": "9"}, TypeError, "before_id must be a job id"),
        ({"queue": "a,b"}, ValueError, "queue must not contain a comma"),
        ({"name": ""}, TypeError, "name must be a job's name"),
    ],
)
async def test_list_jobs_refuses_a_bad_argument(
    face: Face, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await _call(face, "list_jobs", **options)


async def test_retry_job_puts_a_failed_or_cancelled_job_back_with_every_attempt(
    face: Face,
) -> None:
    failed = await face.enqueue("a.x", n=1, delay=0)
    await _fail(face, failed)
    cancelled = await face.enqueue("a.x", n=2)
    await face.cancel(cancelled)
    queued = await face.enqueue("a.x", n=3)
    for job_id in (failed, cancelled):
        assert await _call(face, "retry_job", job_id) is True
        job = await face.get(job_id)
        assert (job.status, job.attempts, job.finished_at, job.worker_id) == (
            JobStatus.QUEUED,
            0,
            None,
            None,
        )
    assert (await face.get(failed)).claims == 1  # its runs still counted
    assert (await face.get(failed)).last_error == "ValueError: bad"  # until it runs
    assert await _call(face, "retry_job", failed) is False  # queued now
    assert await _call(face, "retry_job", queued) is False
    assert await _call(face, "retry_job", 987654321) is False
    assert await face.queued() == [failed, cancelled, queued]


async def test_retry_job_leaves_a_job_whose_dedupe_key_is_held(face: Face) -> None:
    old = await face.enqueue("a.x", dedupe_key="k")
    await face.cancel(old)
    new = await face.enqueue("a.x", dedupe_key="k")
    assert new != old
    assert await _call(face, "retry_job", old) is False
    assert (await face.get(old)).status is JobStatus.CANCELLED


async def test_retry_failed_puts_back_every_failed_job_of_the_queue_and_name(face: Face) -> None:
    jobs = [
        await face.enqueue(name, queue=queue, dedupe_key=key)
        for name, queue, key in (
            ("a.x", "mail", None),
            ("a.y", "mail", None),
            ("a.x", "other", None),
            ("a.x", "mail", "k"),
        )
    ]
    for job_id in jobs:
        await _fail(face, job_id)
    held = await face.enqueue("a.x", queue="mail", dedupe_key="k")  # holds jobs[3]'s key
    assert await _call(face, "retry_failed", queue="mail", name="a.x") == 1
    assert [(await face.get(i)).status for i in jobs] == [
        JobStatus.QUEUED,
        JobStatus.FAILED,
        JobStatus.FAILED,
        JobStatus.FAILED,
    ]
    assert await _call(face, "retry_failed") == 2  # the rest but the held key's
    assert (await face.get(jobs[3])).status is JobStatus.FAILED
    assert await _call(face, "retry_failed") == 0
    assert sorted(await face.queued()) == sorted([*jobs[:3], held])


async def test_retry_failed_puts_back_one_job_per_dedupe_key(face: Face) -> None:
    first = await face.enqueue("a.x", n=1, dedupe_key="d")
    await _fail(face, first)
    second = await face.enqueue("a.x", n=2, dedupe_key="d")  # the key was free again
    await _fail(face, second)
    assert await _call(face, "retry_failed") == 1
    statuses = [(await face.get(i)).status for i in (first, second)]
    assert statuses == [JobStatus.QUEUED, JobStatus.FAILED]  # the oldest first


async def test_retry_failed_goes_on_past_a_batch_it_could_not_fill(
    face: Face, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch can put back fewer than it read (the second job of a dedupe key
    waits), with more failed jobs after it: they are retried too."""
    monkeypatch.setattr("soniq.app.RETRY_BATCH", 2)
    keyed = []
    for n in range(2):
        keyed.append(await face.enqueue("a.x", n=n, dedupe_key="d"))
        await _fail(face, keyed[-1])
    others = []
    for n in range(3):
        others.append(await face.enqueue("a.x", n=10 + n))
        await _fail(face, others[-1])
    assert await _call(face, "retry_failed") == 4
    statuses = [(await face.get(i)).status for i in (*keyed, *others)]
    assert statuses == [JobStatus.QUEUED, JobStatus.FAILED, *[JobStatus.QUEUED] * 3]


async def _ended(face: Face, outcome: str, **options: Any) -> int:
    """A job enqueued, claimed and ended as ``outcome`` (done or failed)."""
    job_id = await face.enqueue("a.x", **options)
    backend = face.eq.backend
    [claimed] = await backend.claim_jobs(1, "w", None)
    assert claimed.id == job_id
    if outcome == "done":
        ended = outcomes.succeeded(job_id, 1, None)
    else:
        ended = outcomes.failed(job_id, 1, 0, ValueError("bad"), lambda: 0.5)
    await backend.finish_jobs([ended], "w", keep=True)
    return job_id


async def test_purge_jobs_deletes_finished_jobs_older_than_asked(face: Face) -> None:
    done = await _ended(face, "done")
    failed = await _ended(face, "failed", max_retries=0)
    cancelled = await face.enqueue("a.x")
    await face.cancel(cancelled)
    queued = await face.enqueue("a.x")
    assert await _call(face, "purge_jobs", older_than=3600) == 0  # all ended just now
    assert await _call(face, "purge_jobs", older_than=0, status="failed") == 1
    assert await face.missing(failed) and not await face.missing(done)
    assert await _call(face, "purge_jobs", older_than=dt.timedelta(0)) == 2
    assert await face.missing(done) and await face.missing(cancelled)
    assert (await face.get(queued)).status is JobStatus.QUEUED  # never an active job


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"older_than": -1}, "older_than must be seconds >= 0 or a timedelta"),
        ({"older_than": "7d"}, "older_than must be seconds >= 0 or a timedelta"),
        ({"older_than": 1, "status": "queued"}, "purge_jobs deletes finished jobs only"),
        ({"older_than": 1, "status": ["done", "running"]}, "got 'running'"),
    ],
)
async def test_purge_jobs_refuses_a_bad_argument(
    face: Face, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await _call(face, "purge_jobs", **options)


async def test_list_workers_shows_each_worker_and_the_jobs_it_runs(face: Face) -> None:
    backend = face.eq.backend
    await backend.register_worker(WorkerIdentity("w-mail", "host-a", 41, ("mail",), 4))
    await backend.register_worker(WorkerIdentity("w-all", "host-b", 42, None, 8))
    jobs = [await face.enqueue("a.x", queue="mail") for _ in range(3)]
    assert [c.id for c in await backend.claim_jobs(2, "w-mail", ["mail"])] == jobs[:2]
    workers = await _call(face, "list_workers")
    assert [(w.id, w.hostname, w.pid, w.queues, w.concurrency, w.running) for w in workers] == [
        ("w-mail", "host-a", 41, ("mail",), 4, tuple(jobs[:2])),
        ("w-all", "host-b", 42, None, 8, ()),
    ]
    for worker in workers:
        assert 0 <= worker.heartbeat_age < 60
        assert worker.started_at <= worker.heartbeat_at
    await backend.unregister_worker("w-all")
    assert [w.id for w in await _call(face, "list_workers")] == ["w-mail"]


async def test_queue_stats_counts_each_queues_jobs_by_status_but_not_done_history(
    face: Face,
) -> None:
    failed = await face.enqueue("a.x", queue="mail")
    await _fail(face, failed)
    await _ended(face, "done")  # in the default queue: history, not listed
    running = await face.enqueue("a.x", queue="mail")
    [claimed] = await face.eq.backend.claim_jobs(1, "w", None)
    assert claimed.id == running
    for n in range(2):
        await face.enqueue("a.x", n=n, queue="mail")
    await face.enqueue("a.x", queue="mail", delay=3600)
    parent = await face.enqueue("a.x", queue="sms")
    await face.enqueue("a.x", queue="mail", depends_on=[parent])
    await face.cancel(await face.enqueue("a.x", queue="sms"))
    await _call(face, "set_queue_limits", "idle", concurrency=2, rate_limit="10/s")
    await _call(face, "pause_queue", "idle")

    stats = await _call(face, "queue_stats")
    counts = {
        q.queue: (q.queued, q.scheduled, q.running, q.waiting, q.failed, q.cancelled) for q in stats
    }
    assert counts == {
        "idle": (0, 0, 0, 0, 0, 0),
        "mail": (2, 1, 1, 1, 1, 0),
        "sms": (1, 0, 0, 0, 0, 1),
    }
    assert [q.queue for q in stats] == ["idle", "mail", "sms"]
    idle, mail, sms = stats
    assert (idle.paused, idle.concurrency, idle.rate_limit) == (True, 2, "10/s")
    assert (mail.paused, mail.concurrency, mail.rate_limit) == (False, None, None)
    assert idle.oldest_queued_age is None
    assert mail.oldest_queued_age is not None and 0 <= mail.oldest_queued_age < 60
    assert sms.oldest_queued_age is not None and sms.oldest_queued_age <= mail.oldest_queued_age


def _mid_minute() -> None:
    """Wait (at most 3 s) for a minute to start if this one is about to end, so that
    jobs ended now and the stats read next fall in one minute."""
    left = 60 - time.time() % 60
    if left < 3:
        time.sleep(left + 0.05)


async def test_stats_counts_the_jobs_ended_per_minute_by_status(face: Face) -> None:
    _mid_minute()
    await _ended(face, "done")
    await _ended(face, "done", queue="mail")
    await _ended(face, "failed", max_retries=0, queue="mail")
    await face.cancel(await face.enqueue("a.x"))
    await face.enqueue("a.x")  # queued: not ended

    stats = await _call(face, "stats", minutes=3)
    assert (stats.minutes, stats.done, stats.failed, stats.cancelled) == (3, 2, 1, 1)
    assert len(stats.buckets) == 3
    starts = [b.start for b in stats.buckets]
    assert all(b - a == dt.timedelta(minutes=1) for a, b in itertools.pairwise(starts))
    assert all(s.second == 0 and s.microsecond == 0 and s.tzinfo is not None for s in starts)
    # Just ended: all in the current minute, the last bucket.
    last = stats.buckets[-1]
    assert (last.done, last.failed, last.cancelled) == (2, 1, 1)
    assert last.start <= dt.datetime.now(dt.timezone.utc) < last.start + dt.timedelta(minutes=1)
    # 4 jobs over two whole minutes and this one so far.
    elapsed = 120 + (dt.datetime.now(dt.timezone.utc) - last.start).total_seconds()
    assert 4 / (elapsed + 1) < stats.per_second <= 4 / 120

    mail = await _call(face, "stats", minutes=1, queue="mail")
    assert (mail.done, mail.failed, mail.cancelled) == (1, 1, 0)
    assert (await _call(face, "stats", queue="nowhere")).buckets[-1].done == 0
    assert len((await _call(face, "stats")).buckets) == 15


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"minutes": 0}, ValueError, "minutes must be an int from 1 to 1,440"),
        ({"minutes": 1441}, ValueError, "minutes must be an int from 1 to 1,440"),
        ({"minutes": "5"}, ValueError, "minutes must be an int"),
        ({"minutes": True}, ValueError, "minutes must be an int"),
        ({"queue": "a,b"}, ValueError, "queue must not contain a comma"),
    ],
)
async def test_stats_refuses_a_bad_argument(
    face: Face, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await _call(face, "stats", **options)
