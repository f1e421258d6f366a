"""The Soniq app of the fault matrix's worker processes
(``soniq worker tests.reliability.app:eq``), bound by ``SONIQ_RELIABILITY_URL`` and
``SONIQ_RELIABILITY_SCHEMA``.

``record`` inserts a row (job id, attempt) into the schema's ``runs`` table before it
returns, on a connection of its own per process (not Soniq's pool, so the figures
measure the queue, and a pooled connection's reset cannot fail the job), to
``SONIQ_RELIABILITY_RECORD_URL`` (default: the app's URL; the proxy tests point it
past the proxy, so that only Soniq's own connections meet the faults). A job whose
outcome is lost after its run (a killed worker, a cut connection) shows two rows.
"""

from __future__ import annotations

import os

import asyncpg

from soniq import Soniq, current_job

URL = os.environ.get("SONIQ_RELIABILITY_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = os.environ.get("SONIQ_RELIABILITY_SCHEMA", "public")
RECORD_URL = os.environ.get("SONIQ_RELIABILITY_RECORD_URL", URL)

eq = Soniq(URL, schema=SCHEMA)
_pool: asyncpg.Pool | None = None


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The jobs leave no session state behind: skip asyncpg's reset round trip."""


@eq.job(name="reliability.record")
async def record(n: int = 0) -> None:
    global _pool
    ctx = current_job()
    if _pool is None:
        _pool = await asyncpg.create_pool(
            RECORD_URL, min_size=1, max_size=4, timeout=10, reset=_no_reset
        )
    # A cut connection fails this run (retried, as any job whose own database call
    # failed); the pool replaces the connection.
    await _pool.execute(
        f'INSERT INTO "{SCHEMA}".runs (job_id, attempt) VALUES ($1, $2)', ctx.id, ctx.attempt
    )


@eq.job(name="reliability.noop")
async def noop(n: int = 0) -> None:
    return None
