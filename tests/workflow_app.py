"""A Soniq app for the crash test of workflows (tests/test_workflow_crash.py), run by
``soniq worker tests.workflow_app:eq``.

The database is ``$SONIQ_WORKFLOW_APP_URL`` (``postgresql://...`` or
``sqlite:///file``), in schema ``$SONIQ_WORKFLOW_APP_SCHEMA`` on PostgreSQL.

Every node of the test's graph is a ``node`` (async) or ``node_sync`` (on a thread)
job: it sleeps ``ms`` milliseconds and returns ``{"v": v, "seen": seen}`` where
``seen`` maps each parent id (as a str) to the ``v`` that
``current_job().parent_results`` gave for it, and ``v`` is ``base`` plus the sum of
those, modulo :data:`MODULUS`. The test recomputes every ``v`` from the graph, so a
job that ran before a parent was done, or was given a wrong or missing parent result,
shows.

Each run appends ``start`` and ``end`` lines (job id, claims, attempt, pid,
``time.time()``) to ``$SONIQ_WORKFLOW_APP_LOG`` (one ``write`` per line with
``O_APPEND``: lines of several processes never interleave). ``start`` is logged
first thing and ``end`` just before the job returns, so each logged run lies within
the time its job was ``running`` in the database.

The freeze: once the test has created the file ``$SONIQ_WORKFLOW_APP_ARM`` (it does
so when a good part of the graph is done), the first async job allowed to
(``freeze=True``: the test gives it to jobs that have children), in a worker started
with ``SONIQ_WORKFLOW_APP_FREEZE=1``, blocks its worker's event loop as it returns,
for :data:`FREEZE_SECONDS`, and logs ``frozen`` then: its run has ended but the
worker cannot write its completion. The test then SIGKILLs that worker: a parent that
finished while its worker died, deterministically.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import Any

from soniq import Soniq, current_job

URL = os.environ.get("SONIQ_WORKFLOW_APP_URL", "sqlite:///workflow-app.db")
SCHEMA = os.environ.get("SONIQ_WORKFLOW_APP_SCHEMA", "public")
LOG = os.environ.get("SONIQ_WORKFLOW_APP_LOG", "workflow-app.log")
ARM = os.environ.get("SONIQ_WORKFLOW_APP_ARM", "workflow-app.arm")
MAY_FREEZE = os.environ.get("SONIQ_WORKFLOW_APP_FREEZE") == "1"

MODULUS = 1_000_003
#: Long enough for the test to see ``frozen`` and kill the worker; the worker goes on
#: after it if nobody does.
FREEZE_SECONDS = 20.0

eq = Soniq(URL, schema=SCHEMA)


def _write(line: str) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _line(event: str) -> str:
    ctx = current_job()
    return f"{event} {ctx.id} {ctx.claims} {ctx.attempt} {os.getpid()} {time.time()!r}\n"


def _log(event: str) -> None:
    _write(_line(event))


def _freeze(line: str) -> None:
    """Block the event loop (a callback of it): log ``frozen`` first."""
    _write(line)
    time.sleep(FREEZE_SECONDS)


def _value(base: int) -> dict[str, Any]:
    results: Mapping[int, Any] = current_job().parent_results
    seen = {str(parent): result["v"] for parent, result in results.items()}
    return {"v": (base + sum(seen.values())) % MODULUS, "seen": seen}


def _take_the_freeze() -> bool:
    """True for the one job (of all processes) that freezes its worker."""
    if not MAY_FREEZE or not os.path.exists(ARM):
        return False
    try:
        os.close(os.open(f"{ARM}.taken", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


@eq.job
async def node(base: int, ms: float, freeze: bool = False) -> dict[str, Any]:
    _log("start")
    value = _value(base)
    await asyncio.sleep(ms / 1000)
    _log("end")
    if freeze and _take_the_freeze():
        # Runs before anything the worker does with this job's outcome (everything
        # it schedules comes after this callback), so the outcome is never written;
        # ``frozen`` is logged once the job has returned and the loop is blocked.
        asyncio.get_running_loop().call_soon(_freeze, _line("frozen"))
    return value


@eq.job
def node_sync(base: int, ms: float, freeze: bool = False) -> dict[str, Any]:
    _log("start")
    value = _value(base)
    time.sleep(ms / 1000)
    _log("end")
    return value


def read_log(path: str) -> list[tuple[str, int, int, int, int, float]]:
    """The logged lines: (event, job id, claims, attempt, pid, time)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.split() for line in f if line.endswith("\n")]
    return [(e, int(i), int(c), int(a), int(p), float(t)) for e, i, c, a, p, t in rows]
