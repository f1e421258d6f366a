"""The app of the periodic benchmark (:mod:`benchmarks.periodic`): ten schedules of
one no-op job, every second, each with its own arguments. Importable by a worker
process: ``SONIQ_BENCH_URL=... soniq worker benchmarks.periodic_jobs:eq``."""

from __future__ import annotations

import os

from soniq import Soniq

SCHEDULES = 10
EVERY = 1.0  # seconds

eq = Soniq(os.environ.get("SONIQ_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))


def beat(n: int) -> None:
    """Does nothing: the benchmark counts the jobs the schedules enqueued."""


for _n in range(SCHEDULES):
    beat = eq.periodic(every=EVERY, kwargs={"n": _n}, name="bench.beat")(beat)
