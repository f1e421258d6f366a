"""The operator's questions on a big table: ``soniq check`` (``check_backlog``) on a
backlog of queued jobs, and ``list_jobs`` pages, ``queue_stats`` and ``stats`` on a
table of finished ones.

``python -m benchmarks.admin [QUEUED] [TOTAL]`` (default 1,000,000 queued jobs, in a
table of 10,000,000 rows): on a fresh database, the queued jobs are inserted in SQL
(ten kinds of argument set over five names), analyzed, and ``check_backlog`` timed
three times; then finished jobs (1 % failed) fill the table up to TOTAL rows,
analyzed, and pages of 50 are timed: the newest, the newest failed, one queue and
name, and a page deep down (``before_id`` in the middle); then ``queue_stats`` (which
counts the queued, failed, ... jobs) and ``stats`` over 15 and 60 minutes. The
finished jobs ended one every 10 ms over the last day (a steady 100 jobs/s: 90,000
in 15 minutes). Each figure is the median
of five calls after one to warm up, through ``eq.sync`` (psycopg), as an operator's
script or the CLI calls them.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

from benchmarks._common import admin_url, fresh_databases
from soniq import Soniq

NAMES = 5


def _timed(call: Callable[[], Any], repeats: int = 5) -> tuple[float, Any]:
    call()  # warm-up (plans, caches)
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, value


def run(url: str, queued: int, total: int) -> dict[str, Any]:
    eq = Soniq(url)
    eq.sync.ensure_initialized()
    for n in range(NAMES):
        eq.job(name=f"bench.job{n}")(lambda a=None, b=None, c=None: None)
    figures: dict[str, Any] = {"queued": queued, "total": total}
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(
            "INSERT INTO soniq_jobs (name, queue, args) "
            f"SELECT 'bench.job' || (n % {NAMES}), 'q' || (n % 3), "
            'CASE n % 10 WHEN 0 THEN \'{"a": 1}\' WHEN 1 THEN \'{"a": 1, "b": 2}\' '
            'WHEN 2 THEN \'{"z": 1}\' ELSE \'{"a": 1, "b": 2, "c": 3}\' END::jsonb '
            f"FROM generate_series(1, {queued}) AS n"
        )
        conn.execute("VACUUM ANALYZE soniq_jobs")
        figures["insert_queued_s"] = round(time.perf_counter() - started, 1)
        ms, problems = _timed(eq.sync.check_backlog, repeats=3)
        figures["check_ms"] = round(ms, 1)
        figures["check_problems"] = len(problems)
        started = time.perf_counter()
        conn.execute(
            "INSERT INTO soniq_jobs (name, queue, args, status, finished_at) "
            f"SELECT 'bench.job' || (n % {NAMES}), 'q' || (n % 3), '{{}}', "
            "CASE WHEN n % 100 = 0 THEN 'failed' ELSE 'done' END, "
            "now() - n * interval '10 milliseconds' "
            f"FROM generate_series(1, {total - queued}) AS n"
        )
        conn.execute("VACUUM ANALYZE soniq_jobs")
        figures["insert_finished_s"] = round(time.perf_counter() - started, 1)
        middle = int(conn.execute("SELECT max(id) / 2 FROM soniq_jobs").fetchone()[0])
    pages = {
        "newest": {},
        "failed": {"status": "failed"},
        "queue_and_name": {"queue": "q1", "name": "bench.job3"},
        "deep": {"before_id": middle},
    }
    for label, options in pages.items():
        ms, page = _timed(lambda o=options: eq.sync.list_jobs(limit=50, **o))
        assert len(page) == 50, (label, len(page))
        figures[f"list_{label}_ms"] = round(ms, 2)
    ms, stats = _timed(eq.sync.queue_stats)
    figures["queue_stats_ms"] = round(ms, 1)
    figures["queue_stats_queued"] = sum(q.queued for q in stats)
    for minutes in (15, 60):
        ms, window = _timed(lambda m=minutes: eq.sync.stats(minutes=m))
        figures[f"stats_{minutes}_ms"] = round(ms, 1)
        figures[f"stats_{minutes}_ended"] = window.done + window.failed
    eq.sync.close()
    return figures


def main() -> None:
    queued = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000_000
    with fresh_databases(admin_url(), ["admin"], statement_timeout=600) as urls:
        figures = run(urls["admin"], queued, total)
    print(
        f"soniq check on {queued:,} queued jobs: {figures['check_ms']:,.0f} ms "
        f"({figures['check_problems']} kinds that would fail)"
    )
    for label in ("newest", "failed", "queue_and_name", "deep"):
        print(
            f"list_jobs page of 50, {label}, table of {total:,} rows: "
            f"{figures[f'list_{label}_ms']:.2f} ms"
        )
    print(
        f"queue_stats, table of {total:,} rows ({figures['queue_stats_queued']:,} queued): "
        f"{figures['queue_stats_ms']:,.1f} ms"
    )
    for minutes in (15, 60):
        print(
            f"stats(minutes={minutes}), table of {total:,} rows "
            f"({figures[f'stats_{minutes}_ended']:,} ended in the window): "
            f"{figures[f'stats_{minutes}_ms']:,.1f} ms"
        )
    print(f"(setup: {figures['insert_queued_s']} s + {figures['insert_finished_s']} s)")


if __name__ == "__main__":
    main()
