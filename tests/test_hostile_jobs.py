"""Whatever a job body does ends in one recorded outcome, frees its slot and never
ends the worker (issue 12, defects 1 and 5).

Each case here failed before its fix: an exception whose ``str()`` raises left its row
``running`` (async) or killed the job's thread and its slot (sync); ``SystemExit`` in
an async job ended the worker process; an unstorable result was dropped without a
word; timed-out sync threads held every slot in silence and kept shutdown waiting.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from soniq import JobStatus, Soniq
from soniq.core import limits, outcomes
from tests import hostile_app
from tests.conftest import Process, wait_until


@pytest.fixture(params=["sqlite", "asyncpg"])
async def hostile_eq(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, schema: str
) -> Any:
    url = f"sqlite:///{tmp_path}/jobs.db" if request.param == "sqlite" else database_url
    eq = Soniq(url) if request.param == "sqlite" else Soniq(url, schema=schema)
    hostile_app.register(eq)
    await eq.ensure_initialized()
    yield eq
    await eq.close()


@pytest.mark.timeout(60)
async def test_every_hostile_body_ends_in_one_recorded_outcome(
    hostile_eq: Soniq, caplog: pytest.LogCaptureFixture
) -> None:
    ids = {name: await hostile_eq.enqueue(f"hostile.{name}") for name in hostile_app.EXPECTED}
    after = [await hostile_eq.enqueue("hostile.ok", n=n) for n in range(5)]

    # burst: returns once nothing is ready and nothing is running, so a slot that a
    # body broke, or a worker it ended, fails this test (by hanging into the timeout,
    # or by raising here).
    await hostile_eq.run_worker(concurrency=2, burst=True, shutdown_timeout=5)

    for name, (status, error_start) in hostile_app.EXPECTED.items():
        job = await hostile_eq.get_job(ids[name])
        assert job is not None
        assert (job.status.value, job.attempts) == (status, 1), name
        assert job.last_error is not None and job.last_error.startswith(error_start), (
            name,
            job.last_error[:200] if job.last_error else None,
        )
        assert len(job.last_error) <= limits.MAX_ERROR_CHARS + 100, name
        assert job.result is None, name
    for n, job_id in enumerate(after):
        job = await hostile_eq.get_job(job_id)
        assert job is not None and (job.status, job.result) == (JobStatus.DONE, n)
    # An unstorable result is logged at WARNING, naming the job.
    warned = {r.getMessage() for r in caplog.records if r.levelname == "WARNING"}
    for name in ("returns_object", "sync_returns_set", "returns_deep", "returns_nan"):
        assert any(f"hostile.{name}: done; ResultNotStored" in m for m in warned), name


def test_outcome_of_an_unprintable_or_enormous_error_is_readable() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise SystemExit("even str() exits")

    error = outcomes.failed(1, 1, 0, Broken(), lambda: 0.5)
    assert error.error is not None and error.error.endswith("Broken: <str() failed: SystemExit>")
    assert error.traceback is not None and "Broken" in error.traceback

    try:
        raise ValueError("z" * 1_000_000)
    except ValueError as exc:
        huge = outcomes.failed(1, 1, 0, exc, lambda: 0.5)
    assert huge.error is not None and huge.traceback is not None
    assert huge.error.startswith("ValueError: zzz") and huge.error.endswith("characters cut)")
    assert len(huge.error) < limits.MAX_ERROR_CHARS + 100
    assert len(huge.traceback) < limits.MAX_TRACEBACK_CHARS + 100
    # The start (where it was raised) and the end are kept.
    assert huge.traceback.startswith("Traceback (most recent call last):")
    assert "characters cut" in huge.traceback


def test_a_result_too_large_to_keep_is_reported_not_stored() -> None:
    kept = outcomes.succeeded(1, 1, "a" * 1000)
    assert (kept.result, kept.error) == ('"' + "a" * 1000 + '"', None)
    dropped = outcomes.succeeded(1, 1, "a" * (limits.MAX_RESULT_CHARS + 1))
    assert dropped.result is None
    assert dropped.error is not None and "over the 1,000,000 kept" in dropped.error


# -- real worker processes -------------------------------------------------------------


@pytest.fixture
def hostile_env(database_url: str, schema: str) -> Iterator[dict[str, str]]:
    env = dict(os.environ, SONIQ_HOSTILE_APP_URL=database_url, SONIQ_HOSTILE_APP_SCHEMA=schema)
    eq = Soniq(database_url, schema=schema)
    eq.sync.ensure_initialized()
    eq.sync.close()
    yield env


def _worker(env: dict[str, str], *args: str) -> Process:
    return Process(["worker", "tests.hostile_app:eq", *args], env=env)


def _status(pg: psycopg.Connection[Any], schema: str, job_id: int) -> tuple[str, str | None]:
    row = pg.execute(
        f'SELECT status, last_error FROM "{schema}".soniq_jobs WHERE id = %s', (job_id,)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_system_exit_in_a_job_does_not_end_the_worker_process(
    hostile_env: dict[str, str], pg: psycopg.Connection[Any], schema: str
) -> None:
    eq = hostile_app.eq.__class__(hostile_env["SONIQ_HOSTILE_APP_URL"], schema=schema)
    hostile_app.register(eq)
    try:
        exits = [eq.sync.enqueue("hostile.async_exit"), eq.sync.enqueue("hostile.sync_exit")]
        later = eq.sync.enqueue("hostile.ok", n=7, delay=1.5)  # due after the exits ran
    finally:
        eq.sync.close()
    proc = _worker(hostile_env, "--concurrency", "2", "--poll-interval", "0.2")
    try:

        def later_done() -> bool:
            assert proc.proc.poll() is None, f"the worker exited: {proc.output}"
            return _status(pg, schema, later)[0] == "done"

        wait_until(later_done, 30, "the job after the exits")
        for job_id in exits:
            assert _status(pg, schema, job_id) == ("failed", "SystemExit: 3")
        proc.send_signal(signal.SIGTERM)
        code, out = proc.finish(30)
    finally:
        proc.kill()
    assert code == 0, out


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stuck_sync_jobs_are_reported_and_do_not_hold_up_shutdown(
    hostile_env: dict[str, str], pg: psycopg.Connection[Any], schema: str
) -> None:
    eq = Soniq(hostile_env["SONIQ_HOSTILE_APP_URL"], schema=schema)
    hostile_app.register(eq)
    try:
        stuck = [eq.sync.enqueue("hostile.sync_stuck") for _ in range(2)]
    finally:
        eq.sync.close()
    # A grace period far longer than the test may wait: shutdown must not use it.
    proc = _worker(hostile_env, "--concurrency", "2", "--shutdown-timeout", "600")
    try:
        proc.wait_for_output("2 of 2 slots held by timed-out jobs", 30)
        timed_out = ("failed", "JobTimeout: job ran past its timeout of 0.2s")
        wait_until(
            lambda: all(_status(pg, schema, job_id) == timed_out for job_id in stuck),
            30,
            "both stuck jobs recorded as timed out",
        )
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, out = proc.finish(30)
        took = time.monotonic() - stopped_at
    finally:
        proc.kill()
    assert code == 0, out
    assert "waiting up to" not in out, out  # nothing left whose outcome is to come
    assert took < 30, f"shutdown took {took:.1f}s"
