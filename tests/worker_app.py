"""A Soniq app for worker tests, importable by worker subprocesses
(``python -m soniq worker tests.worker_app:eq``).

Every job records each run in the ``runs`` table of the same schema, with its job id
and attempt, so a test can prove that each job ran exactly once.

``behind_gate`` jobs wait for the test to open a gate (an advisory lock the test
holds: :func:`close_gate`, :func:`open_gate`), so a test decides when a running job
ends instead of guessing how long it takes.
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
#: The gate's advisory lock: one key per schema, so tests of other schemas never share it.
GATE_KEY = f"hashtext('soniq-gate:{SCHEMA}')"


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
async def behind_gate() -> None:
    """Runs until the gate opens: "started", wait, "finished"."""
    await _record_async("started")
    async with eq.backend.acquire() as conn, conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock_shared({GATE_KEY})")
    await _record_async("finished")


def close_gate(conn: psycopg.Connection[Any]) -> None:
    """Hold the gate shut on ``conn`` (an autocommit connection of the test's)."""
    conn.execute(f"SELECT pg_advisory_lock({GATE_KEY})")


def open_gate(conn: psycopg.Connection[Any]) -> None:
    """Let every ``behind_gate`` job through (closing ``conn`` opens it too)."""
    conn.execute(f"SELECT pg_advisory_unlock({GATE_KEY})")


@eq.job
async def blocks_the_loop(seconds: float) -> None:
    """Blocks the event loop itself (a badly written async job)."""
    await _record_async("started")
    time.sleep(seconds)  # noqa: ASYNC251  (the point of this job)
    await _record_async("finished")
