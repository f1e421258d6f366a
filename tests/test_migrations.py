"""Schema migrations: concurrent starts, the DDL for other tools, version checks,
and the claim's index proven with EXPLAIN."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from soniq import SchemaNotReadyError, Soniq
from soniq.core.admin import job_filter
from soniq.core.sql.migrate import LATEST_VERSION
from soniq.core.sql.postgres import PostgresQueries


def soniq_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "soniq", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(90)
def test_ten_processes_migrating_at_once(
    database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    procs = [
        soniq_cli("migrate", "--database-url", database_url, "--schema", schema) for _ in range(10)
    ]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 10, results
    versions = pg.execute(f'SELECT version FROM "{schema}".soniq_migrations').fetchall()
    assert versions == [(v,) for v in range(1, LATEST_VERSION + 1)]
    tables = pg.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
        (schema,),
    ).fetchall()
    assert tables == [
        ("soniq_job_deps",),
        ("soniq_jobs",),
        ("soniq_migrations",),
        ("soniq_periodic",),
        ("soniq_queues",),
        ("soniq_rate_log",),
        ("soniq_workers",),
    ]


def test_printed_sql_creates_a_usable_schema(
    database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    proc = soniq_cli("migrate", "--sql", "--schema", schema)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "CREATE TABLE" in out and f'"{schema}".soniq_jobs' in out
    pg.execute(out)  # what a user would paste into an Alembic or Django migration
    eq = Soniq(database_url, schema=schema)
    eq.sync.ensure_initialized(migrate=False)  # only checks: passes
    eq.sync.close()


async def test_ensure_initialized_is_idempotent_and_checks(database_url: str, schema: str) -> None:
    eq = Soniq(database_url, schema=schema)
    with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
        await eq.ensure_initialized(migrate=False)
    await eq.ensure_initialized()
    second = Soniq(database_url, schema=schema)
    await second.ensure_initialized()  # already current: no DDL, no error
    await second.ensure_initialized(migrate=False)
    await eq.close()
    await second.close()


def test_migrate_without_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    proc = soniq_cli("migrate")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--database-url" in err


def test_claim_uses_its_index_with_finished_history(
    database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    """100k finished rows and some queued ones: each shape of claim reads its partial
    index, never the heap of history."""
    eq = Soniq(database_url, schema=schema)
    eq.sync.ensure_initialized()
    eq.sync.close()
    jobs = f'"{schema}".soniq_jobs'
    pg.execute(
        f"INSERT INTO {jobs} (name, queue, args, status, finished_at) "
        "SELECT 'j', 'default', '{}', 'done', now() FROM generate_series(1, 100000)"
    )
    pg.execute(
        f"INSERT INTO {jobs} (name, queue, args) SELECT 'j', q, '{{}}' "
        "FROM generate_series(1, 50), unnest(ARRAY['default', 'mail']) AS q"
    )
    pg.execute(f"ANALYZE {jobs}")
    queries = PostgresQueries(schema, "format")
    names = ["j", "other.app.job"]  # a worker claims only the names it knows
    for claim, indexes in [
        (queries.claim_jobs(10, "w1", None), {"soniq_jobs_claim_idx"}),
        (queries.claim_jobs(10, "w1", None, names), {"soniq_jobs_claim_idx"}),
        (queries.claim_jobs(10, "w1", ["mail"]), {"soniq_jobs_claim_queue_idx"}),
        (queries.claim_jobs(10, "w1", ["mail"], names), {"soniq_jobs_claim_queue_idx"}),
        # Several queues: either index serves (in claim order, or per queue).
        (
            queries.claim_jobs(10, "w1", ["mail", "default"]),
            {"soniq_jobs_claim_idx", "soniq_jobs_claim_queue_idx"},
        ),
        (
            queries.claim_jobs(10, "w1", ["mail", "default"], names),
            {"soniq_jobs_claim_idx", "soniq_jobs_claim_queue_idx"},
        ),
    ]:
        plan = pg.execute(f"EXPLAIN (FORMAT JSON) {claim.sql}", claim.params).fetchone()
        assert plan is not None
        text = json.dumps(plan[0])
        assert any(f'"Index Name": "{index}"' in text for index in indexes), text
        # The job table is read through its indexes only (the paused queues, a few
        # rows, are read once per claim).
        scanned = {n.get("Relation Name") for n in _nodes(plan[0]) if n["Node Type"] == "Seq Scan"}
        assert scanned <= {"soniq_queues"}, text
    # And the claim does what it says: highest priority first, only the asked queue.
    pg.execute(
        f"UPDATE {jobs} SET priority = 5 "
        f"WHERE id = (SELECT max(id) FROM {jobs} WHERE queue = 'mail')"
    )
    claim = queries.claim_jobs(3, "w1", ["mail"])
    claimed = pg.execute(claim.sql, claim.params).fetchall()
    assert len(claimed) == 3
    assert {row[2] for row in claimed} == {"mail"}  # queue
    assert max(row[7] for row in claimed) == 5  # priority
    ids = [row[0] for row in claimed]
    statuses = pg.execute(f"SELECT DISTINCT status FROM {jobs} WHERE id = ANY(%s)", (ids,))
    assert statuses.fetchall() == [("running",)]


def _nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every node of an ``EXPLAIN (FORMAT JSON)`` plan."""
    stack = [entry["Plan"] for entry in plan]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", []))


def test_a_page_of_jobs_walks_down_the_primary_key(
    database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    """list_jobs: whatever the filter, a page is read from the primary key backwards
    from before_id, never by sorting the table (one page costs the same on a table
    of millions of rows)."""
    eq = Soniq(database_url, schema=schema)
    try:
        eq.sync.ensure_initialized()
    finally:
        eq.sync.close()
    jobs = f'"{schema}".soniq_jobs'
    pg.execute(
        f"INSERT INTO {jobs} (name, queue, args, status, finished_at) "
        "SELECT 'j' || (n % 7), 'q' || (n % 3), '{}', "
        "CASE WHEN n % 100 = 0 THEN 'failed' ELSE 'done' END, now() "
        "FROM generate_series(1, 100000) AS n"
    )
    pg.execute(f"ANALYZE {jobs}")
    queries = PostgresQueries(schema, "format")
    for selection in (
        job_filter(),
        job_filter(status="failed"),
        job_filter(queue="q1", name="j3", before_id=50_000),
        job_filter(status="done", limit=1000),
    ):
        page = queries.page_jobs(selection)
        plan = pg.execute(f"EXPLAIN (FORMAT JSON) {page.sql}", page.params).fetchone()
        assert plan is not None
        nodes = list(_nodes(plan[0]))
        assert any(
            n["Node Type"] == "Index Scan"
            and n.get("Index Name") == "soniq_jobs_pkey"
            and n.get("Scan Direction") == "Backward"
            for n in nodes
        ), json.dumps(plan[0])
        assert not any(n["Node Type"] in ("Seq Scan", "Sort") for n in nodes), json.dumps(plan[0])


def test_queue_stats_and_stats_read_indexes_not_done_history(
    database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    """queue_stats counts from the partial indexes of its statuses, and stats reads a
    range of the finished index: neither scans the table, so 100k rows of done
    history (or 10M) do not make them slower."""
    eq = Soniq(database_url, schema=schema)
    try:
        eq.sync.ensure_initialized()
        jobs = f'"{schema}".soniq_jobs'
        # Done over the last ~9 days, one every 8 seconds; the last 20 minutes hold 150.
        pg.execute(
            f"INSERT INTO {jobs} (name, queue, args, status, finished_at) "
            "SELECT 'j', 'q' || (n % 3), '{}', 'done', now() - n * interval '8 seconds' "
            "FROM generate_series(1, 100000) AS n"
        )
        pg.execute(
            f"INSERT INTO {jobs} (name, queue, args, status, finished_at, run_at) "
            "SELECT 'j', 'q1', '{}', s, CASE WHEN s = 'failed' THEN now() END, "
            "now() + CASE WHEN n % 2 = 0 THEN interval '1 hour' ELSE interval '0' END "
            "FROM generate_series(1, 40) AS n, unnest(ARRAY['queued', 'failed']) AS s"
        )
        pg.execute(f"ANALYZE {jobs}")
        queries = PostgresQueries(schema, "format")
        for query, indexes in (
            (queries.queue_stats(), {"soniq_jobs_claim_idx", "soniq_jobs_claim_queue_idx"}),
            (queries.stats(15, None), {"soniq_jobs_finished_idx"}),
            (queries.stats(60, "q1"), {"soniq_jobs_finished_idx"}),
        ):
            plan = pg.execute(f"EXPLAIN (FORMAT JSON) {query.sql}", query.params).fetchone()
            assert plan is not None
            nodes = list(_nodes(plan[0]))
            used = {n.get("Index Name") for n in nodes}
            assert used & indexes, json.dumps(plan[0])
            scanned = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
            assert scanned <= {"soniq_queues"}, json.dumps(plan[0])
        # q0 and q2 hold done jobs only: history, not listed.
        [q1] = eq.sync.queue_stats()
        assert (q1.queue, q1.queued, q1.scheduled, q1.failed) == ("q1", 20, 20, 40)
        stats = eq.sync.stats(minutes=20)
        [(expected,)] = pg.execute(
            f"SELECT count(*) FROM {jobs} WHERE status = 'done' AND finished_at >= %s",
            (stats.buckets[0].start,),
        ).fetchall()
        assert stats.done == expected and 140 <= expected <= 160
        assert stats.failed == 40
    finally:
        eq.sync.close()
