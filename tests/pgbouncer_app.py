"""The app a worker behind PgBouncer runs (tests/test_pgbouncer.py): its database,
schema and driver come from the environment the test gives the process."""

from __future__ import annotations

import os

from soniq import Soniq

eq = Soniq(
    os.environ["SONIQ_PGB_URL"],
    schema=os.environ["SONIQ_PGB_SCHEMA"],
    driver=os.environ.get("SONIQ_PGB_DRIVER") or None,
    prepared_statements=False,
)


@eq.job(name="pgb.add")
async def add(n: int) -> int:
    return n + 1


@eq.job(name="pgb.add_sync")
def add_sync(n: int) -> int:
    return n + 1
