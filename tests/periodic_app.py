"""A Soniq app with a periodic job, for tests of the scheduler across worker
processes (``soniq worker tests.periodic_app:eq``), on the database and schema of
``tests.worker_app`` (the same environment variables). The job records each run in
the ``runs`` table."""

from __future__ import annotations

import os

from soniq import Soniq, current_job

URL = os.environ.get("SONIQ_WORKER_APP_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = os.environ.get("SONIQ_WORKER_APP_SCHEMA", "public")
#: Seconds between ticks.
EVERY = 0.5

eq = Soniq(URL, schema=SCHEMA)


@eq.periodic(every=EVERY, name="beat.record")
async def record() -> None:
    ctx = current_job()
    async with eq.backend.acquire() as conn:
        await conn.execute(
            f'INSERT INTO "{SCHEMA}".runs VALUES ($1, $2, $3)', ctx.id, ctx.attempt, "beat"
        )
