"""A Soniq app on SQLite for worker-process tests
(``python -m soniq worker tests.sqlite_app:eq``).

The database file is ``$SONIQ_SQLITE_APP_DB``. Every job appends one line per run to
``$SONIQ_SQLITE_APP_LOG``: ``job_id attempt pid note``. The file is opened with
``O_APPEND`` and each line is one ``write``, so lines from several processes never
interleave, and "exactly once" is checked against what actually ran.
"""

from __future__ import annotations

import asyncio
import os
import time

from soniq import Soniq, current_job

DB = os.environ.get("SONIQ_SQLITE_APP_DB", "sqlite-app.db")
LOG = os.environ.get("SONIQ_SQLITE_APP_LOG", "sqlite-app.log")

eq = Soniq(f"sqlite:///{DB}")


def _record(note: str) -> None:
    ctx = current_job()
    line = f"{ctx.id} {ctx.attempt} {os.getpid()} {note}\n".encode()
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@eq.job
async def record(pause: float = 0.0) -> None:
    _record("ran")
    await asyncio.sleep(pause)


@eq.job
def record_sync(pause: float = 0.0) -> None:
    _record("ran")
    time.sleep(pause)


@eq.job
async def slow_first_attempt(seconds: float) -> None:
    _record("started")
    if current_job().attempt == 1:
        await asyncio.sleep(seconds)
    _record("finished")


def read_log(path: str) -> list[tuple[int, int, int, str]]:
    """The recorded runs: (job id, attempt, pid, note) per line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return [(int(a), int(b), int(c), d) for a, b, c, d in rows]
