"""Concurrency limits and the drain: what a per-key limit costs, and what limits on
another job cost a drain of unlimited jobs.

One process, one database, the asyncpg driver; three Soniq apps on the same schema:

* **unlimited**: today's drain: N no-op jobs, ``run_worker(concurrency=100,
  burst=True, retention=None)``, the worker knowing only the no-op job;
* **limits elsewhere**: the same drain of the same unlimited jobs, by a worker that
  also knows a job with a per-key limit (none of which is queued);
* **per key**: N no-op jobs of a job with ``concurrency=1,
  concurrency_key="account"``, over 100 accounts (enqueued in turn), the same worker
  settings: at most one job per account runs at any moment, so at most 100 at once.

Each repeat runs the three back to back, in an order rotated from one repeat to the
next, on an emptied, vacuumed table; a drain is timed from the call to its return and
its rows are checked. Ratios are per repeat, summarised by their median.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import asyncpg

from soniq import Soniq

ACCOUNTS = 100
CONCURRENCY = 100
CASES = ("unlimited", "limits-elsewhere", "per-key")


def _apps(url: str) -> dict[str, tuple[Soniq, str]]:
    """Each case's app and the job it drains."""
    plain = Soniq(url, driver="asyncpg")
    mixed = Soniq(url, driver="asyncpg")
    for app in (plain, mixed):

        @app.job(name="bench.noop")
        async def noop(n: int) -> None: ...

    @mixed.job(name="bench.per_key", concurrency=1, concurrency_key="account")
    async def per_key(account: int) -> None: ...

    return {
        "unlimited": (plain, "bench.noop"),
        "limits-elsewhere": (mixed, "bench.noop"),
        "per-key": (mixed, "bench.per_key"),
    }


async def _drain(app: Soniq, job: str, n: int, control: asyncpg.Connection) -> float:
    await control.execute("TRUNCATE soniq_jobs, soniq_rate_log")
    await control.execute("VACUUM ANALYZE soniq_jobs")
    if job == "bench.noop":
        args = [{"n": i} for i in range(n)]
    else:
        args = [{"account": i % ACCOUNTS} for i in range(n)]
    await app.enqueue_many(job, args)
    await control.execute("ANALYZE soniq_jobs")
    started = time.perf_counter()
    await app.run_worker(concurrency=CONCURRENCY, burst=True, retention=None)
    elapsed = time.perf_counter() - started
    left = await control.fetchval("SELECT count(*) FROM soniq_jobs WHERE status <> 'done'")
    if left:
        raise RuntimeError(f"{job}: {left} job(s) left after the drain")
    return n / elapsed


async def _run(url: str, n: int, repeats: int) -> dict[str, Any]:
    apps = _apps(url)
    for app, _ in apps.values():
        await app.ensure_initialized()
    control = await asyncpg.connect(url)
    rates: dict[str, list[float]] = {case: [] for case in CASES}
    try:
        await _drain(*apps["per-key"], min(n, 2_000), control)  # warm-up
        for repeat in range(repeats):
            order = CASES[repeat % 3 :] + CASES[: repeat % 3]
            for case in order:
                rates[case].append(await _drain(*apps[case], n, control))
    finally:
        await control.close()
        for app, _ in apps.values():
            await app.close()
    ratios = {
        case: statistics.median(r / u for r, u in zip(rates[case], rates["unlimited"], strict=True))
        for case in CASES[1:]
    }
    return {
        "jobs": n,
        "repeats": repeats,
        "rates": rates,
        "median": {case: statistics.median(rates[case]) for case in CASES},
        "ratios": ratios,
        "measures": [
            {"id": case, "median": statistics.median(rates[case]), "failure": None}
            for case in CASES
        ],
    }


def run(url: str, *, n: int, repeats: int) -> dict[str, Any]:
    """Measure the three drains on ``url`` (a fresh database)."""
    return asyncio.run(_run(url, n, repeats))


def render(result: dict[str, Any]) -> str:
    """The drains in jobs/s and their ratios to the unlimited drain of the same run."""
    lines = [
        f"{result['jobs']:,} no-op jobs, asyncpg, concurrency {CONCURRENCY}, "
        f"median of {result['repeats']} repeat(s)",
        f"  unlimited drain                          {result['median']['unlimited']:>9,.0f}/s",
        f"  unlimited drain, limits on another job   "
        f"{result['median']['limits-elsewhere']:>9,.0f}/s  "
        f"{result['ratios']['limits-elsewhere']:.2f}x  (target: within noise)",
        f"  per key (100 keys, limit 1 each)         {result['median']['per-key']:>9,.0f}/s  "
        f"{result['ratios']['per-key']:.2f}x  (target >= 0.70x)",
    ]
    return "\n".join(lines)


def main() -> None:
    """``python -m benchmarks.limits [N] [REPEATS]`` on a fresh database."""
    import sys

    from benchmarks._common import admin_url, fresh_databases

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with fresh_databases(admin_url(), ["limits"], statement_timeout=120) as urls:
        print(render(run(urls["limits"], n=n, repeats=repeats)))


if __name__ == "__main__":
    main()
