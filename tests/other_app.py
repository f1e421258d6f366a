"""A second application on the database and schema of ``tests.worker_app`` (the same
environment variables), with a job of its own, for tests of applications that share
a database and a queue (``soniq worker tests.other_app:eq``). Its job records each run
in the same ``runs`` table, with the note ``other``."""

from __future__ import annotations

import os

from soniq import Soniq, current_job

URL = os.environ.get("SONIQ_WORKER_APP_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = os.environ.get("SONIQ_WORKER_APP_SCHEMA", "public")

eq = Soniq(URL, schema=SCHEMA)


@eq.job(name="other.record")
async def record(n: int = 0) -> int:
    ctx = current_job()
    async with eq.backend.acquire() as conn:
        await conn.execute(
            f'INSERT INTO "{SCHEMA}".runs VALUES ($1, $2, $3)', ctx.id, ctx.attempt, "other"
        )
    return n
