"""A Soniq app with limited jobs, for tests of the limits across worker processes
(``python -m soniq worker tests.limits_app:eq``; see tests/test_limits_processes.py).

The database is ``$SONIQ_LIMITS_APP_URL`` (``postgresql+asyncpg://...``,
``postgresql+psycopg://...`` or ``sqlite:///file``), in schema
``$SONIQ_LIMITS_APP_SCHEMA`` on PostgreSQL. Every run appends two lines to the file
``$SONIQ_LIMITS_APP_LOG``: ``start`` when it begins and ``end`` when it ends, each with
the job's id, attempt, name, limit key, the worker's pid and the time (``time.time()``,
the machine's clock, which every worker process shares). The file is opened with
``O_APPEND`` and each line is one ``write``, so lines of several processes never
interleave; it works the same whatever the backend, and adds no load to the database
whose claims are under test.

The start time is read first thing, before any I/O, and the end time last, so each
recorded run lies within the time its job was ``running`` in the database (claimed
before it starts; its outcome written after it ends): runs that overlap in the log
overlapped in the database too.
"""

from __future__ import annotations

import asyncio
import os
import time

from soniq import Soniq, current_job

URL = os.environ.get("SONIQ_LIMITS_APP_URL", "sqlite:///limits-app.db")
SCHEMA = os.environ.get("SONIQ_LIMITS_APP_SCHEMA", "public")
LOG = os.environ.get("SONIQ_LIMITS_APP_LOG", "limits-app.log")

#: The queue whose limits the test stores (``set_queue_limits``).
CAPPED_QUEUE = "capped"

eq = Soniq(URL, schema=SCHEMA)


def _log(event: str, key: object, at: float) -> None:
    ctx = current_job()
    line = f"{event} {ctx.id} {ctx.attempt} {ctx.name} {key} {os.getpid()} {at!r}\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def _run(key: object, seconds: float) -> None:
    start = time.time()
    _log("start", key, start)
    await asyncio.sleep(seconds)
    _log("end", key, time.time())


@eq.job(concurrency=2)
async def two_at_a_time(seconds: float) -> None:
    """At most two of these run at once, whichever worker runs them."""
    await _run("-", seconds)


@eq.job(concurrency=1, concurrency_key="account")
async def one_per_account(account: str, seconds: float) -> None:
    """At most one of these runs at once per ``account``."""
    await _run(account, seconds)


@eq.job(queue=CAPPED_QUEUE)
async def in_capped_queue(seconds: float) -> None:
    """No limit of its own: its queue's stored limits apply."""
    await _run("-", seconds)


@eq.job(rate_limit="4/s")
async def four_per_second(n: int) -> None:
    """At most four of these start in any second."""
    await _run(n, 0.0)


def read_log(path: str) -> list[tuple[str, int, int, str, str, int, float]]:
    """The recorded lines: (event, job id, attempt, job name, key, pid, time)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.split() for line in f if line.endswith("\n")]
    return [(e, int(i), int(a), n, k, int(p), float(t)) for e, i, a, n, k, p, t in rows]
