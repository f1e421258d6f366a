"""The worker's statements against the real database, one by one: fencing, rescue,
reconcile, prune. (The runtime that uses them is tested in test_worker.py.)"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from soniq import Soniq
from soniq.core import outcomes
from soniq.core.jobs import WorkerIdentity
from soniq.core.sql.postgres import PostgresQueries


@pytest.fixture
def db(database_url: str, schema: str) -> Iterator[tuple[Soniq, PostgresQueries]]:
    eq = Soniq(database_url, schema=schema)
    eq.sync.ensure_initialized()
    yield eq, PostgresQueries(schema, "format")
    eq.sync.close()


def run(pg: psycopg.Connection, query: Any) -> list[tuple[Any, ...]]:
    cur = pg.execute(query.sql, query.params)
    return cur.fetchall() if cur.description else []


def register(pg: psycopg.Connection, q: PostgresQueries, worker: str) -> None:
    run(pg, q.register_worker(WorkerIdentity(worker, "host", 1, None, 10)))


def test_a_rescued_jobs_late_finish_changes_nothing(db: Any, pg: psycopg.Connection) -> None:
    eq, q = db
    job_id = eq.sync.enqueue("some.job")
    register(pg, q, "A")
    assert [r[0] for r in run(pg, q.claim_jobs(10, "A", None))] == [job_id]
    # A stops heartbeating; B rescues its job and claims it (attempt 2).
    pg.execute(f"UPDATE \"{q.schema}\".soniq_workers SET heartbeat_at = now() - interval '1 hour'")
    assert run(pg, q.rescue_stale(30)) == [(job_id, "queued")]
    register(pg, q, "B")
    assert [r[0] for r in run(pg, q.claim_jobs(10, "B", None))] == [job_id]
    # A wakes up and reports its (attempt 1) success: fenced off.
    late = outcomes.succeeded(job_id, 1, "late")
    assert run(pg, q.finish_jobs([late], "A", keep=True)) == []
    job = eq.sync.get_job(job_id)
    assert (job.status.value, job.worker_id, job.attempts, job.result) == ("running", "B", 2, None)
    # B's own finish goes through.
    assert run(pg, q.finish_jobs([outcomes.succeeded(job_id, 2, 7)], "B", keep=True)) == [(job_id,)]
    assert eq.sync.get_job(job_id).result == 7


def test_rescue_counts_the_attempt_and_fails_when_none_is_left(
    db: Any, pg: psycopg.Connection
) -> None:
    eq, q = db
    retryable = eq.sync.enqueue("some.job", max_retries=1)
    exhausted = eq.sync.enqueue("some.job", max_retries=0)
    # A job claimed by a worker that never registered is rescued too.
    run(pg, q.claim_jobs(10, "ghost", None))
    rescued = dict(run(pg, q.rescue_stale(30)))
    assert rescued == {retryable: "queued", exhausted: "failed"}
    job = eq.sync.get_job(retryable)
    assert job.attempts == 1 and "stopped heartbeating" in job.last_error
    assert eq.sync.get_job(exhausted).finished_at is not None


def test_live_workers_keep_their_jobs(db: Any, pg: psycopg.Connection) -> None:
    eq, q = db
    eq.sync.enqueue("some.job")
    register(pg, q, "alive")
    run(pg, q.claim_jobs(10, "alive", None))
    assert run(pg, q.rescue_stale(30)) == []
    assert run(pg, q.heartbeat("alive")) == [("alive",)]
    assert run(pg, q.heartbeat("unknown")) == []


def test_reconcile_puts_back_what_the_worker_does_not_hold(db: Any, pg: psycopg.Connection) -> None:
    eq, q = db
    ids = eq.sync.enqueue_many("some.job", [{}, {}, {}])
    register(pg, q, "W")
    run(pg, q.claim_jobs(10, "W", None))
    put_back = [r[0] for r in run(pg, q.reconcile("W", held=[ids[0]]))]
    assert sorted(put_back) == ids[1:]
    states = [(j.status.value, j.attempts) for j in map(eq.sync.get_job, ids)]
    assert states == [("running", 1), ("queued", 0), ("queued", 0)]


def test_release_does_not_count_the_attempt(db: Any, pg: psycopg.Connection) -> None:
    eq, q = db
    job_id = eq.sync.enqueue("some.job")
    register(pg, q, "W")
    run(pg, q.claim_jobs(1, "W", None))
    run(pg, q.finish_jobs([outcomes.released(job_id, 1)], "W", keep=True))
    job = eq.sync.get_job(job_id)
    assert (job.status.value, job.attempts, job.worker_id) == ("queued", 0, None)


def test_retry_schedules_the_next_run(db: Any, pg: psycopg.Connection) -> None:
    eq, q = db
    job_id = eq.sync.enqueue("some.job", max_retries=2)
    register(pg, q, "W")
    run(pg, q.claim_jobs(1, "W", None))
    outcome = outcomes.failed(job_id, 1, 2, ValueError("bad"), lambda: 0.5)
    assert outcome.retry_in == 1.0
    before = dt.datetime.now(dt.timezone.utc)
    run(pg, q.finish_jobs([outcome], "W", keep=True))
    job = eq.sync.get_job(job_id)
    assert job.status.value == "queued" and job.last_error == "ValueError: bad"
    assert before < job.run_at < before + dt.timedelta(seconds=5)
    assert run(pg, q.claim_jobs(1, "W", None)) == []  # not due yet


def test_prune_deletes_old_finished_jobs_in_batches(db: Any, pg: psycopg.Connection) -> None:
    eq, q = db
    ids = eq.sync.enqueue_many("some.job", [{} for _ in range(30)])
    jobs = f'"{q.schema}".soniq_jobs'
    pg.execute(
        f"UPDATE {jobs} SET status = 'done', finished_at = now() - interval '2 days' "
        "WHERE id = ANY(%s)",
        (ids[:20],),
    )
    pg.execute(f"UPDATE {jobs} SET status = 'done', finished_at = now() WHERE id = %s", (ids[20],))
    assert (
        pg.execute(q.prune_finished(86400, 15).sql, q.prune_finished(86400, 15).params).rowcount
        == 15
    )
    query = q.prune_finished(86400, 15)
    assert pg.execute(query.sql, query.params).rowcount == 5
    remaining = pg.execute(f"SELECT count(*) FROM {jobs}").fetchone()
    assert remaining == (10,)  # the recent one and the 9 queued ones


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "delete"])
@pytest.mark.parametrize("rows", [0, 8_000, 100_000])
def test_finish_never_reads_the_running_index_in_a_generic_plan(
    db: Any, pg: psycopg.Connection, keep: bool, rows: int
) -> None:
    """A flush must look its jobs up by id, whatever the statistics say. Drivers cache
    prepared statements, and PostgreSQL then reuses one generic plan; statistics
    taken when no job was running once made that plan read the running index, which
    holds an entry for every job run since the last vacuum: each flush was slower
    than the last (a 20,000-job drain fell from ~16,000 to ~1,700 jobs/s). Nor may a
    table of a few thousand rows be scanned because the planner counts the outcomes
    as 100 rows whatever their number (0.65 ms of a 1.45 ms flush of 50 successes
    behind 8,000 rows)."""
    _, q = db
    jobs = f'"{q.schema}".soniq_jobs'
    pg.execute(
        f"INSERT INTO {jobs} (name, queue, args, status, finished_at) "
        f"SELECT 'j', 'default', '{{}}', 'done', now() FROM generate_series(1, {rows})"
    )
    pg.execute(f"ANALYZE {jobs}")  # nothing running: the trap's statistics
    mixed = [outcomes.succeeded(i, 1, None) for i in range(1, 101)] + [
        outcomes.released(101, 1),
        outcomes.succeeded(102, 1, {"a": 1}),
    ]
    finish = q.finish_jobs(mixed, "w1", keep=keep)
    with pg.transaction():
        pg.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        plan = pg.execute(f"EXPLAIN (FORMAT JSON) {finish.sql}", finish.params).fetchone()
    assert plan is not None
    text = json.dumps(plan[0])
    assert "soniq_jobs_running_idx" not in text, text
    if rows:  # read by primary key only (an empty one may be scanned)
        assert '"Seq Scan"' not in text, text
        assert text.count('"Index Name": "soniq_jobs_pkey"') == (2 if keep else 3), text


def test_a_claim_commits_without_waiting_for_the_disk_and_leaves_the_session_alone(
    db: Any, database_url: str
) -> None:
    """A claim lost in a server crash only puts its jobs back, so its commit skips
    the WAL flush; the setting is the transaction's own (safe behind PgBouncer)."""
    eq, q = db
    eq.sync.enqueue("some.job")
    with psycopg.connect(database_url) as conn:  # not autocommit: look inside
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert len(run(conn, q.claim_jobs(10, "w1", None))) == 1
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        conn.commit()
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_a_job_table_without_statistics_gets_them_once_it_holds_jobs(
    db: Any, pg: psycopg.Connection
) -> None:
    """A fresh table loaded in bulk has no statistics until autovacuum's first pass, and
    the planner then scans and sorts every queued row per claim: the heartbeat's
    session analyzes it (once it holds enough rows to matter), and the claim plan
    turns to the claim index's order."""
    eq, q = db
    session = eq.backend.maintenance()
    jobs = f'"{eq._config.schema}".soniq_jobs'
    try:
        pg.execute(f"ANALYZE {jobs}")  # while empty: no statistics of its columns
        eq.sync.enqueue_many("some.job", [{"n": n} for n in range(50)])
        assert session.analyze_if_never(1000) is None  # too few rows to matter yet
        # Enough rows that, without statistics, the planner sorts them (a few thousand
        # it may read in index order, estimate or not).
        eq.sync.enqueue_many("some.job", [{"n": n} for n in range(30000)])
        claim = q.claim_jobs(50, "w", None, ["some.job"])
        pg.execute("SET plan_cache_mode = force_generic_plan")  # as a long-lived driver
        plan = lambda: json.dumps(  # noqa: E731
            pg.execute(f"EXPLAIN (FORMAT JSON) {claim.sql}", claim.params).fetchone()[0]
        )
        assert '"Sort"' in plan()  # no statistics: scan and sort every queued row
        assert session.analyze_if_never(1000) is True
        assert '"Sort"' not in plan() and "soniq_jobs_claim_idx" in plan()
        assert session.analyze_if_never(1000) is False  # it has statistics now
        # A TRUNCATE keeps them (a test suite's reset, a benchmark's), and the plan.
        pg.execute(f"TRUNCATE {jobs}")
        eq.sync.enqueue_many("some.job", [{"n": n} for n in range(30000)])
        assert session.analyze_if_never(1000) is False
        assert '"Sort"' not in plan()
    finally:
        session.close()


def _plan_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "Node Type" in node:
            yield node
        for value in node.values():
            yield from _plan_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _plan_nodes(value)


@pytest.mark.timeout(90)
def test_limited_claims_walk_the_claim_index_in_custom_and_generic_plans(
    db: Any, pg: psycopg.Connection
) -> None:
    """A limited claim steps over the jobs of full groups in claim order and stops at
    its LIMIT: its plan must walk a claim index, never scan or sort the job table,
    whether planned for its parameters or reused generically (as drivers do)."""
    from soniq.core.flow import ClaimLimits, JobLimits, Rate

    _, q = db
    jobs = f'"{q.schema}".soniq_jobs'
    pg.execute(
        f"INSERT INTO {jobs} (name, queue, args) SELECT 'lim', q, "
        "jsonb_build_object('account', i % 100) "
        "FROM generate_series(1, 10000) AS i, unnest(ARRAY['default', 'mail']) AS q"
    )
    pg.execute(f"ANALYZE {jobs}")
    specs = [
        ClaimLimits.of([("lim", JobLimits(concurrency=1, concurrency_key="account"))]),
        ClaimLimits.of([("lim", JobLimits(rate=Rate(5, 1.0), rate_key="account"))]),
        ClaimLimits.of([("lim", JobLimits(concurrency=2, rate=Rate(5, 1.0)))]),
    ]
    checked = 0
    for limits in specs:
        for queues in (None, ["mail"], ["mail", "default"]):
            for queue_limits in (False, True):
                for limit, scan in ((1, None), (100, None), (10, 100)):
                    claim = q.claim_limited(
                        limit, "w", queues, ["lim"], limits, queue_limits=queue_limits, scan=scan
                    )
                    for mode in ("force_custom_plan", "force_generic_plan"):
                        with pg.transaction():
                            pg.execute(f"SET LOCAL plan_cache_mode = {mode}")
                            explained = pg.execute(
                                f"EXPLAIN (FORMAT JSON) {claim.sql}", claim.params
                            ).fetchone()
                        assert explained is not None
                        nodes = list(_plan_nodes(explained[0]))
                        walked = {n.get("Index Name") for n in nodes}
                        assert walked & {"soniq_jobs_claim_idx", "soniq_jobs_claim_queue_idx"}
                        scans = {
                            n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"
                        }
                        assert "soniq_jobs" not in scans, (mode, queues, limit)
                        sorts = [n for n in nodes if n["Node Type"] in ("Sort", "Incremental Sort")]
                        assert not any(
                            "j.priority DESC" in " ".join(n.get("Sort Key", [])) for n in sorts
                        ), (mode, queues, limit)
                        checked += 1
    assert checked == 3 * 3 * 2 * 3 * 2
    # And the plain claim's turn given for fairness, which looks at the head of the line.
    for queues in (None, ["mail"], ["mail", "default"]):
        capped = q.claim_jobs(10, "w", queues, ["lim", "free"], specs[0], scan=100)
        for mode in ("force_custom_plan", "force_generic_plan"):
            with pg.transaction():
                pg.execute(f"SET LOCAL plan_cache_mode = {mode}")
                explained = pg.execute(f"EXPLAIN (FORMAT JSON) {capped.sql}", capped.params)
                row = explained.fetchone()
            assert row is not None
            nodes = list(_plan_nodes(row[0]))
            assert {n.get("Index Name") for n in nodes} & {
                "soniq_jobs_claim_idx",
                "soniq_jobs_claim_queue_idx",
            }
            scans = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
            assert "soniq_jobs" not in scans, (mode, queues)


async def test_a_queue_limited_while_claims_fill_every_slot_is_claimed_once_they_run_short(
    eq: Soniq,
) -> None:
    """Claims that fill every slot do not ask whether queues have stored limits (one
    row more each, see ClaimOrder.asks_queue_limits). Limits stored meanwhile keep the
    plain claim off that queue at once; the first claim that runs short asks, and
    claims that queue's jobs within its limits in the same call."""

    @eq.job(name="some.job")
    async def some_job() -> None: ...

    await eq.enqueue_many(some_job, [{} for _ in range(20)], queue="a")
    limits = eq.registry.claim_limits()
    async with eq.backend.worker_session() as ops:

        async def claim() -> list[str]:
            return [c.queue for c in await ops.claim_jobs(10, "w", None, ["some.job"], limits)]

        assert await claim() == ["a"] * 10  # a new session asks: no limits
        await eq.set_queue_limits("b", concurrency=3)
        await eq.enqueue_many(some_job, [{} for _ in range(5)], queue="b", priority=5)
        assert await claim() == ["a"] * 10  # full, not asked: b is left alone all the same
        assert await claim() == ["b"] * 3  # short: asked, and b's limit obeyed
        assert await claim() == []
