"""The jobs the worker benchmarks run, for every system, and the counters they bump.

Importable by a worker process (not ``__main__``), so a Soniq worker started by hand
finds them too::

    SONIQ_BENCH_URL=postgresql://postgres@127.0.0.1:5432/mydb \\
        soniq worker benchmarks.jobs:eq --burst --concurrency 100

Each job does nothing but count itself; the latency job also records how long after
its enqueue call it started (``time.time()`` on one machine, so one clock).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

from soniq import Soniq

NOOP = "bench.noop"
NOOP_SYNC = "bench.noop_sync"
LATENCY = "bench.latency"


class _State:
    """What the jobs of this process have done since :func:`reset`."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)  # next() is atomic under the GIL: thread-safe
        self.latencies: list[float] = []
        self.expected = 0
        self.all_started: asyncio.Event | None = None

    def ran(self) -> int:
        """Jobs run since the reset (reading consumes one tick; it is reset anyway)."""
        return next(self.counter) - 1


STATE = _State()


def reset(expected_latencies: int = 0) -> None:
    """Zero the counters; the next ``expected_latencies`` latency jobs set
    ``STATE.all_started`` (call from the worker's event loop)."""
    STATE.counter = itertools.count(1)
    STATE.latencies = []
    STATE.expected = expected_latencies
    STATE.all_started = asyncio.Event() if expected_latencies else None


def _record_latency(enqueued_at: float) -> None:
    started = time.time()
    STATE.latencies.append(started - enqueued_at)
    if len(STATE.latencies) >= STATE.expected and STATE.all_started is not None:
        STATE.all_started.set()


# --- the job functions (every system calls these) ---------------------------------


async def noop(n: int) -> None:
    next(STATE.counter)


def noop_sync(n: int) -> None:
    next(STATE.counter)


async def latency(t: float) -> None:
    _record_latency(t)


# --- registration, per system -------------------------------------------------------


def register_soniq(app: Soniq) -> Soniq:
    """Register the three jobs on ``app`` under fixed names."""
    app.job(name=NOOP)(noop)
    app.job(name=NOOP_SYNC)(noop_sync)
    app.job(name=LATENCY)(latency)
    return app


def register_pgqueuer(qm: Any) -> None:
    """pgqueuer entrypoints (async only: pgqueuer has no sync handlers). The payload
    is bytes: the latency job's is the enqueue time as text."""

    @qm.entrypoint(NOOP)
    async def _noop(job: Any) -> None:
        next(STATE.counter)

    @qm.entrypoint(LATENCY)
    async def _latency(job: Any) -> None:
        _record_latency(float(job.payload))


def register_procrastinate(app: Any) -> None:
    """procrastinate tasks: async, sync (procrastinate runs them in threads), latency."""
    app.task(name=NOOP)(noop)
    app.task(name=NOOP_SYNC)(noop_sync)
    app.task(name=LATENCY)(latency)


_eq: Soniq | None = None


def __getattr__(name: str) -> Any:
    """``eq``, for ``soniq worker benchmarks.jobs:eq``: a Soniq on ``SONIQ_BENCH_URL``
    (required: never a database you did not name) with the driver of
    ``SONIQ_BENCH_DRIVER`` (default asyncpg), built on first access."""
    global _eq
    if name != "eq":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _eq is None:
        url = os.environ.get("SONIQ_BENCH_URL")
        if not url:
            raise RuntimeError("benchmarks.jobs:eq needs SONIQ_BENCH_URL (a postgresql:// URL)")
        _eq = register_soniq(Soniq(url, driver=os.environ.get("SONIQ_BENCH_DRIVER") or None))
    return _eq
