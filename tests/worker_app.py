"""A Soniq app for worker tests, importable by worker subprocesses
(``python -m soniq worker tests.worker_app:eq``).

Every job records each run in the ``runs`` table of the same schema, with its job id
and attempt, so a test can prove that each job ran exactly once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psycopg

from soniq import PermanentError, Soniq, current_job

URL = os.environ.get("SONIQ_WORKER_APP_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = os.environ.get("SONIQ_WORKER_APP_SCHEMA", "public")

eq = Soniq(URL, schema=SCHEMA)
_local = threading.local()

RUNS_DDL = f'CREATE TABLE IF NOT EXISTS "{SCHEMA}".runs (job_id bigint, attempt int, note text)'


async def _record_async(note: str = "") -> None:
    ctx = current_job()
    async with eq.backend.acquire() as conn:
        await conn.execute(
            f'INSERT INTO "{SCHEMA}".runs VALUES ($1, $2, $3)', ctx.id, ctx.attempt, note
        )


def _record_sync(note: str = "") -> None:
    ctx = current_job()
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(URL, autocommit=True)
    conn.execute(f'INSERT INTO "{SCHEMA}".runs VALUES (%s, %s, %s)', (ctx.id, ctx.attempt, note))


@eq.job
async def record(n: int = 0) -> int:
    await _record_async()
    return n


@eq.job
def record_sync(n: int = 0) -> int:
    _record_sync()
    return n


@eq.job
async def sleep_then_record(seconds: float) -> None:
    await _record_async("started")
    await asyncio.sleep(seconds)
    await _record_async("finished")


@eq.job
def sync_sleep_then_record(seconds: float) -> None:
    _record_sync("started")
    time.sleep(seconds)
    _record_sync("finished")


@eq.job(max_retries=2, backoff=__import__("soniq").Backoff(base=0.01, jitter=0))
async def always_fails() -> None:
    await _record_async()
    raise RuntimeError("broken on purpose")


@eq.job(max_retries=5)
async def refuses_retry() -> None:
    await _record_async()
    raise PermanentError("do not retry this")


@eq.job
async def slow_first_attempt(seconds: float) -> None:
    await _record_async("started")
    if current_job().attempt == 1:
        await asyncio.sleep(seconds)
    await _record_async("finished")


@eq.job
async def wait_for_cancel() -> None:
    await _record_async("started")
    await asyncio.sleep(3600)


@eq.job
def sync_wait_for_cancel() -> None:
    _record_sync("started")
    deadline = time.monotonic() + 60
    while not current_job().cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    _record_sync("saw cancel" if current_job().cancelled else "timed out")


@eq.job(timeout=0.2, max_retries=0)
async def too_slow() -> None:
    await asyncio.sleep(10)


@eq.job(timeout=0.2, max_retries=0)
def sync_too_slow() -> None:
    time.sleep(1.0)


@eq.job
def blocks_the_loop_thread(seconds: float) -> None:
    """A sync job is on a thread; this one is for checking the loop stays free."""
    time.sleep(seconds)


@eq.job
async def blocks_the_loop(seconds: float) -> None:
    """Blocks the event loop itself (a badly written async job)."""
    await _record_async("started")
    time.sleep(seconds)  # noqa: ASYNC251  (the point of this job)
    await _record_async("finished")


def runs(conn: psycopg.Connection[Any]) -> list[tuple[int, int, str]]:
    """All recorded runs, for assertions."""
    return conn.execute(
        f'SELECT job_id, attempt, note FROM "{SCHEMA}".runs ORDER BY 1, 2'
    ).fetchall()
