"""Workflows as a user meets them: wait_for (woken by NOTIFY, one listening connection
for many waiters, from threads too, every way a job can end), progress written at
most once a second, and a graph run by a worker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import soniq
from soniq import JobCancelled, JobFailed, JobNotFound, JobStatus, Soniq, waiting
from soniq.cli import main
from soniq.core import outcomes
from soniq.testing import clear_jobs, drain
from soniq.worker import progress
from tests.conftest import BACKENDS, migrated_soniq, new_soniq

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["asyncpg", "psycopg"])
async def pg_eq(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with migrated_soniq(request.param, request, tmp_path) as app:
        yield app


@pytest.fixture(params=BACKENDS)
async def any_eq(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with migrated_soniq(request.param, request, tmp_path) as app:
        yield app


def _jobs(eq: Soniq) -> dict[str, Any]:
    @eq.job(name="w.double")
    async def double(n: int) -> int:
        return 2 * n

    @eq.job(name="w.fail", max_retries=0)
    def fail() -> None:
        raise KeyError("gone")

    @eq.job(name="w.slow")
    async def slow() -> None:
        await asyncio.sleep(30)

    return {"double": double, "fail": fail, "slow": slow}


async def _until(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def test_a_waiter_is_woken_by_the_notify_of_the_end(
    pg_eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No poll for two minutes: only the NOTIFY sent at the job's end can wake it.
    monkeypatch.setattr(waiting, "POLL_LISTENING", 120.0)
    jobs = _jobs(pg_eq)
    job_id = await pg_eq.enqueue(jobs["double"], n=21)
    waiter = asyncio.ensure_future(pg_eq.wait_for(job_id))
    await _until(lambda: _awaited(pg_eq, job_id))
    await pg_eq.run_worker(burst=True)
    assert await asyncio.wait_for(waiter, 10) == 42


async def _awaited(eq: Soniq, job_id: int) -> bool:
    async with eq.backend.acquire() as conn:
        schema = eq.backend.queries.schema
        query = f'SELECT awaited FROM "{schema}".soniq_jobs WHERE id = {job_id}'
        if eq.backend.name == "asyncpg":
            return bool(await conn.fetchval(query))
        cur = await conn.execute(query)
        return bool((await cur.fetchone())[0])


async def test_a_thousand_waiters_share_one_listening_connection(
    pg_eq: Soniq, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiting, "POLL_LISTENING", 120.0)
    jobs = _jobs(pg_eq)
    ids = await pg_eq.enqueue_many(jobs["double"], [{"n": n} for n in range(1000)])
    waiters = [asyncio.ensure_future(pg_eq.wait_for(i, timeout=50)) for i in ids]
    await _until(lambda: _all_awaited(pg_eq, ids))
    with psycopg.connect(database_url, autocommit=True) as conn:
        listening = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert listening == (1,)
    await pg_eq.run_worker(concurrency=50, burst=True)
    assert await asyncio.gather(*waiters) == [2 * n for n in range(1000)]


async def _all_awaited(eq: Soniq, ids: list[int]) -> bool:
    async with eq.backend.acquire() as conn:
        query = (
            f'SELECT count(*) FROM "{eq.backend.queries.schema}".soniq_jobs '
            f"WHERE awaited AND id BETWEEN {min(ids)} AND {max(ids)}"
        )
        if eq.backend.name == "asyncpg":
            return int(await conn.fetchval(query)) == len(ids)
        cur = await conn.execute(query)
        return int((await cur.fetchone())[0]) == len(ids)


async def test_wait_for_says_how_each_job_ended(any_eq: Soniq) -> None:
    jobs = _jobs(any_eq)
    done = await any_eq.enqueue(jobs["double"], n=4)
    failed = await any_eq.enqueue(jobs["fail"])
    parent = await any_eq.enqueue(jobs["fail"])
    child = await any_eq.enqueue(jobs["double"], n=1, depends_on=[parent])
    pending = [asyncio.ensure_future(any_eq.wait_for(i, timeout=30)) for i in (failed, child)]
    await any_eq.run_worker(burst=True)
    assert await any_eq.wait_for(done) == 8
    with pytest.raises(JobFailed) as caught:
        await pending[0]
    error = caught.value
    assert (error.job_id, error.error_type, error.message) == (failed, "KeyError", "'gone'")
    assert error.traceback is not None and error.traceback.endswith("KeyError: 'gone'\n")
    with pytest.raises(JobCancelled) as cancelled:
        await pending[1]
    assert (cancelled.value.job_id, cancelled.value.reason) == (
        child,
        f"parent job {parent} failed",
    )
    with pytest.raises(JobNotFound) as missing:
        await any_eq.wait_for(10**12)
    assert missing.value.job_id == 10**12


async def test_a_cancel_while_waiting_wakes_the_waiter(any_eq: Soniq) -> None:
    jobs = _jobs(any_eq)
    job_id = await any_eq.enqueue(jobs["double"], n=1, delay=3600)
    waiter = asyncio.ensure_future(any_eq.wait_for(job_id, timeout=30))
    await asyncio.sleep(0.2)
    assert await any_eq.cancel_job(job_id) is True
    with pytest.raises(JobCancelled, match=f"job {job_id} was cancelled"):
        await asyncio.wait_for(waiter, 10)


async def test_a_timeout_leaves_the_job_as_it_was(any_eq: Soniq) -> None:
    jobs = _jobs(any_eq)
    job_id = await any_eq.enqueue(jobs["double"], n=1, delay=3600)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"job {job_id} has not finished after 0.3 s"):
        await any_eq.wait_for(job_id, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    job = await any_eq.get_job(job_id)
    assert job is not None and job.status is JobStatus.QUEUED
    with pytest.raises(TimeoutError):
        await any_eq.wait_for(job_id, timeout=0)


@pytest.mark.parametrize("kind", ["sqlite", "asyncpg"])
def test_threads_wait_through_the_blocking_face(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    eq = new_soniq(kind, request, tmp_path)
    eq.sync.ensure_initialized()
    jobs = _jobs(eq)
    ids = eq.sync.enqueue_many(jobs["double"], [{"n": n} for n in range(8)])
    results: dict[int, Any] = {}

    def wait(job_id: int) -> None:
        results[job_id] = eq.sync.wait_for(job_id, timeout=30)

    threads = [threading.Thread(target=wait, args=(i,)) for i in ids]
    try:
        for thread in threads:
            thread.start()
        eq.sync.run_worker(burst=True)
        for thread in threads:
            thread.join(30)
        assert [results.get(i) for i in ids] == [2 * n for n in range(8)]
        with pytest.raises(TimeoutError):
            eq.sync.wait_for(eq.sync.enqueue(jobs["double"], n=0, delay=60), timeout=0.1)
    finally:
        eq.sync.close()


async def test_progress_is_written_at_most_once_a_second_and_last_at_the_end(
    any_eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[int, float, str | None]] = []
    store = any_eq.backend.set_progress

    async def counted(job_id: int, claims: int, fraction: float, message: str | None) -> None:
        writes.append((job_id, fraction, message))
        await store(job_id, claims, fraction, message)

    monkeypatch.setattr(any_eq.backend, "set_progress", counted)

    @any_eq.job(name="w.steps")
    async def steps(n: int) -> None:
        job = soniq.current_job()
        for i in range(1, n + 1):
            job.set_progress(i / n, f"step {i}")
            if i % 1000 == 0:
                await asyncio.sleep(0.3)  # 1.5 s in all: room for one write a second

    job_id = await any_eq.enqueue(steps, n=5000)
    await any_eq.run_worker(burst=True)
    assert 2 <= len(writes) <= 4, writes  # at once, about a second later, at the end
    # The first write starts as soon as the loop is free (the job's first await), with
    # the latest value by then.
    assert writes[0] == (job_id, 0.2, "step 1000")
    assert writes[-1] == (job_id, 1.0, "step 5000")
    job = await any_eq.get_job(job_id)
    assert job is not None and (job.progress, job.progress_message) == (1.0, "step 5000")
    assert progress.INTERVAL == 1.0


async def test_a_graph_runs_in_order_under_a_worker(any_eq: Soniq) -> None:
    order: list[str] = []

    @any_eq.job(name="w.step")
    def step(label: str) -> str:
        seen = sorted(soniq.current_job().parent_results.values())
        order.append(label)
        return label + "".join(seen)

    a, b = await any_eq.enqueue_group([(step, {"label": "a"}), (step, {"label": "b"})])
    c = await any_eq.enqueue(step, label="c", depends_on=[a, b])
    _, e = await any_eq.enqueue_chain([(step, {"label": "d"}), (step, {"label": "e"})])
    f = await any_eq.enqueue(step, label="f", depends_on=[c, e])
    await any_eq.run_worker(concurrency=4, burst=True)
    assert await any_eq.wait_for(f) == "fcab" + "e" + "d"
    assert order.index("c") > max(order.index("a"), order.index("b"))
    assert order.index("e") > order.index("d")
    assert order.index("f") == 5


@pytest.mark.parametrize("kind", ["sqlite", "asyncpg"])
def test_soniq_job_shows_a_job_and_waits_for_its_end(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eq = new_soniq(kind, request, tmp_path)
    eq.sync.ensure_initialized()
    jobs = _jobs(eq)
    try:
        failed = eq.sync.enqueue(jobs["fail"])
        done = eq.sync.enqueue(
            jobs["double"], n=5, depends_on=[eq.sync.enqueue(jobs["double"], n=1)]
        )
        later = eq.sync.enqueue(jobs["double"], n=1, delay=3600)
        eq.sync.run_worker(burst=True)
        url, schema = _url_and_schema(eq)
        where = ["--database-url", url, "--schema", schema]

        assert main(["job", str(failed), *where]) == 0
        out = capsys.readouterr().out
        lines = dict(line.split(None, 1) for line in out.split("\n\n")[0].splitlines())
        assert (lines["status"], lines["last_error"]) == ("failed", "KeyError: 'gone'")
        assert out.rstrip().endswith("KeyError: 'gone'")  # the traceback, last

        assert main(["job", str(done), *where, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["status"], shown["result"], shown["args"]) == ("done", 10, {"n": 5})
        assert shown["parents"] == [done - 1] and shown["waiting_for"] == 0

        assert main(["job", str(done), *where, "--wait", "5"]) == 0
        assert main(["job", str(failed), *where, "--wait", "5"]) == 1
        assert main(["job", str(later), *where, "--wait", "0.2"]) == 124
        capsys.readouterr()
        assert main(["job", "987654", *where]) == 1
        assert capsys.readouterr().err == "soniq job: no job has id 987654\n"
    finally:
        eq.sync.close()


def _url_and_schema(eq: Soniq) -> tuple[str, str]:
    config = eq._config
    if config.kind == "postgres":
        return config.dsn, config.schema
    return f"sqlite:///{config.location}", "public"


async def test_thousands_of_awaited_jobs_ending_at_once_are_all_told(
    pg_eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A notification holds 8,000 bytes: ids go 500 to one. Both ways a statement ends
    # many awaited jobs at once: a completion batch, and a parent's end cancelling
    # its children.
    monkeypatch.setattr(waiting, "POLL_LISTENING", 120.0)
    ids = await pg_eq.enqueue_many("w.big", [{"n": n} for n in range(1200)])
    parent = await pg_eq.enqueue("w.big", n=-1, delay=3600)
    children = await pg_eq.enqueue_many(
        "w.big", [{"n": n} for n in range(1200)], depends_on=[parent]
    )
    waiters = [asyncio.ensure_future(pg_eq.wait_for(i, timeout=50)) for i in (*ids, *children)]
    await _until(lambda: _all_awaited(pg_eq, [*ids, *children]))
    claimed = await pg_eq.backend.claim_jobs(2000, "w", None)
    assert sorted(c.id for c in claimed) == ids
    await pg_eq.backend.finish_jobs([outcomes.succeeded(i, 1, i) for i in ids], "w", keep=True)
    assert await pg_eq.cancel_job(parent) is True
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert results[: len(ids)] == ids
    assert all(isinstance(r, JobCancelled) for r in results[len(ids) :])


def test_clear_jobs_forgets_the_edges_too() -> None:
    eq = Soniq("memory://")
    ran: list[int] = []

    @eq.job(name="w.link")
    def link(n: int) -> None:
        ran.append(n)

    try:
        a, b = eq.sync.enqueue(link, n=0), eq.sync.enqueue(link, n=0)
        eq.sync.enqueue(link, n=0, depends_on=[a, b])
        clear_jobs(eq)
        # The same ids again: a chain whose second link waits an hour.
        chain = [(link, {"n": 1}), (link, {"n": 2, "delay": 3600}), (link, {"n": 3})]
        assert eq.sync.enqueue_chain(chain) == [1, 2, 3]
        drain(eq.sync)
        assert ran == [1]  # link 3 waits for link 2, not for an edge of before
    finally:
        eq.sync.close()
