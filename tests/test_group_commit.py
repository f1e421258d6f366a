"""Group commit of concurrent enqueues on PostgreSQL (``soniq.drivers.insert_lines``):
the calls that wait while the line's statements are in flight go out as one
statement, each caller getting its own id once its row is committed.

Every test holds the job table with ``LOCK TABLE ... IN EXCLUSIVE MODE`` from another
connection (inserts wait, reads do not), so that the line's first statements are
stuck in flight and the other calls are known to wait in line: what is merged is
decided, not left to timing."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import sql

from soniq import SchemaNotReadyError, Soniq
from soniq.core.jobs import JobSpec
from soniq.core.sql.postgres import PostgresQueries, group_ids
from soniq.drivers import insert_lines, psycopg_async
from soniq.drivers.insert_lines import MAX_IN_FLIGHT
from tests.conftest import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def table_locked(database_url: str, schema: str) -> Iterator[psycopg.Connection[Any]]:
    """Inserts into the schema's job table wait until the block ends (or the yielded
    connection commits)."""
    with psycopg.connect(database_url) as conn:
        table = sql.Identifier(schema, "soniq_jobs")
        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
        try:
            yield conn
        finally:
            conn.commit()


def count_jobs(pg: psycopg.Connection[Any], schema: str, where: str = "true") -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE " + where).format(
        sql.Identifier(schema, "soniq_jobs")
    )
    row = pg.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _waiting_on_lock(pg: psycopg.Connection[Any], text: str) -> int:
    row = pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
        (f"%{text}%",),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def line_waiting(eq: Soniq, waiting: int) -> None:
    line = eq.backend.insert_line()  # type: ignore[attr-defined]
    await async_wait_until(
        lambda: len(line._in_flight) == line._max and len(line._line) == waiting,
        10,
        f"{line._max} statements in flight and {waiting} calls in line",
    )


async def stuck_in_flight(eq: Soniq, start: Any) -> list[asyncio.Future[Any]]:
    """Fill the line's places (:data:`MAX_IN_FLIGHT`, fewer on a smaller pool) with one
    stuck statement each (the table locked): the calls ``start(i)`` are made one at a
    time, each once the one before is in flight (calls made together would go out
    together), so later calls wait in line."""
    line = eq.backend.insert_line()  # type: ignore[attr-defined]
    stuck = []
    for i in range(line._max):
        stuck.append(asyncio.ensure_future(start(i)))
        await async_wait_until(lambda i=i: len(line._in_flight) == i + 1, 10, "a call in flight")
    return stuck


async def test_waiting_enqueues_go_out_together_and_each_caller_gets_its_own_ids(
    eq: Soniq, database_url: str, schema: str
) -> None:
    async def caller(k: int) -> list[int]:
        return [await eq.enqueue("app.job", k=k, i=i) for i in range(3)]

    with table_locked(database_url, schema):
        callers = await stuck_in_flight(eq, caller)
        callers += [asyncio.ensure_future(caller(k)) for k in range(MAX_IN_FLIGHT, 12)]
        await line_waiting(eq, 12 - MAX_IN_FLIGHT)
    results = await asyncio.wait_for(asyncio.gather(*callers), 30)
    for k, ids in enumerate(results):
        assert ids == sorted(ids)
        for i, job_id in enumerate(ids):
            job = await eq.get_job(job_id)
            assert job is not None and job.args == {"k": k, "i": i}
    assert len({i for ids in results for i in ids}) == 36
    batches = eq.backend.insert_line().batches  # type: ignore[attr-defined]
    # The line went out together: in as many statements as places became free.
    assert max(batches) >= -(-(12 - MAX_IN_FLIGHT) // MAX_IN_FLIGHT)


async def test_a_merged_statement_that_fails_retries_its_calls_alone(
    eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    """A row the database refuses (here a CHECK constraint of the table's owner)
    fails its own call only; the others of its statement are committed."""
    pg.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT no_bad CHECK (args->>'bad' IS NULL)").format(
            sql.Identifier(schema, "soniq_jobs")
        )
    )
    with table_locked(database_url, schema):
        calls = await stuck_in_flight(eq, lambda i: eq.enqueue("app.job", i=i))
        calls += [asyncio.ensure_future(eq.enqueue("app.job", i=i)) for i in range(2, 6)]
        bad = asyncio.ensure_future(eq.enqueue("app.job", i=6, bad=True))
        more = [asyncio.ensure_future(eq.enqueue("app.job", i=i)) for i in range(7, 9)]
        await line_waiting(eq, 9 - MAX_IN_FLIGHT)
    ids = await asyncio.wait_for(asyncio.gather(*calls, *more), 30)
    with pytest.raises(Exception, match="no_bad"):
        await asyncio.wait_for(bad, 30)
    assert len(set(ids)) == 8
    assert count_jobs(pg, schema) == 8


async def test_calls_with_one_dedupe_key_in_one_statement_share_one_job(
    eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    with table_locked(database_url, schema):
        first = await stuck_in_flight(eq, lambda i: eq.enqueue("app.job", i=i))
        keyed = [
            asyncio.ensure_future(eq.enqueue("app.job", i=i, dedupe_key=f"k{i % 2}"))
            for i in range(6)
        ]
        await line_waiting(eq, 6)
    await asyncio.wait_for(asyncio.gather(*first), 30)
    ids = await asyncio.wait_for(asyncio.gather(*keyed), 30)
    assert ids[0] == ids[2] == ids[4] and ids[1] == ids[3] == ids[5] and ids[0] != ids[1]
    job = await eq.get_job(ids[0])
    assert job is not None and job.args == {"i": 0}  # the first call's arguments
    assert count_jobs(pg, schema, "dedupe_key IS NOT NULL") == 2


async def test_a_caller_cancelled_while_it_waits_in_line_is_not_enqueued(
    eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    with table_locked(database_url, schema):
        first = await stuck_in_flight(eq, lambda i: eq.enqueue("app.job", i=i))
        kept = asyncio.ensure_future(eq.enqueue("app.job", i=10))
        dropped = asyncio.ensure_future(eq.enqueue("app.job", i=11))
        await line_waiting(eq, 2)
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
    await asyncio.wait_for(asyncio.gather(*first, kept), 30)
    assert count_jobs(pg, schema, "args->>'i' = '11'") == 0
    assert count_jobs(pg, schema) == MAX_IN_FLIGHT + 1


async def test_a_connection_killed_under_a_merged_statement_answers_every_caller(
    eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    """The statements in flight lose their connections before they commit: each of
    their callers gets the connection error, nothing is retried (so nothing can be
    committed twice), and the calls still in line go out afterwards."""
    with table_locked(database_url, schema):
        stuck = await stuck_in_flight(eq, lambda i: eq.enqueue("app.job", i=i))
        merged = [asyncio.ensure_future(eq.enqueue("app.job", i=i)) for i in range(10, 15)]
        await line_waiting(eq, 5)
        # The first statement to end sends the line: kill the stuck ones' backends.
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE '%soniq_jobs%'"
        )
        outcomes = await asyncio.wait_for(asyncio.gather(*stuck, return_exceptions=True), 30)
        assert all(isinstance(o, Exception) for o in outcomes), outcomes
        line = eq.backend.insert_line()  # type: ignore[attr-defined]
        await async_wait_until(  # (in one statement or two, as places became free)
            lambda: (
                not line._line
                and _waiting_on_lock(pg, "jsonb_to_recordset") == len(line._in_flight) > 0
            ),
            10,
            "the merged statements sent",
        )
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE '%jsonb_to_recordset%'"
        )
    answers = await asyncio.wait_for(asyncio.gather(*merged, return_exceptions=True), 30)
    assert all(isinstance(a, Exception) for a in answers), answers
    assert count_jobs(pg, schema) == 0  # killed before commit, and never retried
    assert await eq.enqueue("app.job", i=99) > 0  # the line goes on


def test_threads_of_eq_sync_go_out_together(sync_eq: Soniq, database_url: str, schema: str) -> None:
    results: dict[int, list[int]] = {}

    def caller(k: int) -> None:
        results[k] = [sync_eq.sync.enqueue("app.job", k=k, i=i) for i in range(3)]

    line = sync_eq.sync.backend.insert_line()  # type: ignore[attr-defined]
    with table_locked(database_url, schema):
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: line._in_flight == MAX_IN_FLIGHT and len(line._line) == 8 - MAX_IN_FLIGHT,
            10,
            "the line to form",
        )
    for thread in threads:
        thread.join(30)
    assert sorted(results) == list(range(8))
    for k, ids in results.items():
        assert ids == sorted(ids)
        job = sync_eq.sync.get_job(ids[2])
        assert job is not None and job.args == {"k": k, "i": 2}
    assert max(line.batches) >= 8 - MAX_IN_FLIGHT  # the line went out as one


def sync_line_waiting(eq: Soniq, waiting: int) -> None:
    line = eq.sync.backend.insert_line()  # type: ignore[attr-defined]
    wait_until(
        lambda: line._in_flight == line._max and len(line._line) == waiting,
        10,
        f"{line._max} statements in flight and {waiting} calls in line",
    )


def sync_stuck_in_flight(
    eq: Soniq, pool: ThreadPoolExecutor, start: Callable[[int], int]
) -> list[Future[int]]:
    """:func:`stuck_in_flight` for ``eq.sync``'s threads (``pool``)."""
    line = eq.sync.backend.insert_line()  # type: ignore[attr-defined]
    stuck = []
    for i in range(line._max):
        stuck.append(pool.submit(start, i))
        wait_until(lambda i=i: line._in_flight == i + 1, 10, "a call in flight")
    return stuck


def test_a_merged_statement_of_threads_that_fails_retries_its_calls_alone(
    sync_eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    """:func:`test_a_merged_statement_that_fails_retries_its_calls_alone` for
    ``eq.sync``: the row refused fails its own thread's call only."""
    pg.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT no_bad CHECK (args->>'bad' IS NULL)").format(
            sql.Identifier(schema, "soniq_jobs")
        )
    )
    enqueue = sync_eq.sync.enqueue
    with ThreadPoolExecutor(12) as pool:
        with table_locked(database_url, schema):
            calls = sync_stuck_in_flight(sync_eq, pool, lambda i: enqueue("app.job", i=i))
            calls += [pool.submit(enqueue, "app.job", i=i) for i in range(2, 6)]
            bad = pool.submit(enqueue, "app.job", i=6, bad=True)
            more = [pool.submit(enqueue, "app.job", i=i) for i in range(7, 9)]
            sync_line_waiting(sync_eq, 9 - MAX_IN_FLIGHT)
        ids = [call.result(30) for call in (*calls, *more)]
        with pytest.raises(Exception, match="no_bad"):
            bad.result(30)
    assert len(set(ids)) == 8
    assert count_jobs(pg, schema) == 8
    line = sync_eq.sync.backend.insert_line()  # type: ignore[attr-defined]
    assert max(line.batches) > 1  # the bad row was in a merged statement


def test_threads_with_one_dedupe_key_in_one_statement_share_one_job(
    sync_eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    enqueue = sync_eq.sync.enqueue
    with ThreadPoolExecutor(8) as pool:
        with table_locked(database_url, schema):
            first = sync_stuck_in_flight(sync_eq, pool, lambda i: enqueue("app.job", i=i))
            keyed = []
            for i in range(6):  # one at a time: in line in this order
                keyed.append(pool.submit(enqueue, "app.job", i=i, dedupe_key=f"k{i % 2}"))
                sync_line_waiting(sync_eq, i + 1)
        for call in first:
            call.result(30)
        ids = [call.result(30) for call in keyed]
    assert ids[0] == ids[2] == ids[4] and ids[1] == ids[3] == ids[5] and ids[0] != ids[1]
    job = sync_eq.sync.get_job(ids[0])
    assert job is not None and job.args == {"i": 0}  # the first call's arguments
    assert count_jobs(pg, schema, "dedupe_key IS NOT NULL") == 2


def test_a_connection_killed_under_a_merged_statement_of_threads_answers_every_caller(
    sync_eq: Soniq, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    """:func:`test_a_connection_killed_under_a_merged_statement_answers_every_caller`
    for ``eq.sync``: every thread gets an answer, nothing is committed twice."""
    enqueue = sync_eq.sync.enqueue
    line = sync_eq.sync.backend.insert_line()  # type: ignore[attr-defined]
    with ThreadPoolExecutor(8) as pool:
        with table_locked(database_url, schema):
            stuck = sync_stuck_in_flight(sync_eq, pool, lambda i: enqueue("app.job", i=i))
            merged = [pool.submit(enqueue, "app.job", i=i) for i in range(10, 15)]
            sync_line_waiting(sync_eq, 5)
            wait_until(  # (in flight for the line, but perhaps not at the server yet)
                lambda: _waiting_on_lock(pg, "soniq_jobs") == MAX_IN_FLIGHT,
                10,
                "the stuck statements waiting for the lock",
            )
            pg.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE '%soniq_jobs%'"
            )
            for call in stuck:
                with pytest.raises(psycopg.OperationalError):  # the connection lost
                    call.result(30)
            wait_until(  # (in one statement or two, as places became free)
                lambda: (
                    not line._line
                    and _waiting_on_lock(pg, "jsonb_to_recordset") == line._in_flight > 0
                ),
                10,
                "the merged statements sent",
            )
            pg.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE '%jsonb_to_recordset%'"
            )
        for call in merged:
            with pytest.raises(psycopg.OperationalError):
                call.result(30)
    assert count_jobs(pg, schema) == 0  # killed before commit, and never retried
    assert enqueue("app.job", i=99) > 0  # the line goes on
    assert line._in_flight == 0 and not line._line


GROUP_STATEMENT = psycopg_async.GROUP_STATEMENT.decode()  # its prepared name
PREPARED = "SELECT name, prepare_time FROM pg_prepared_statements"


def alone_calls(backend: Any) -> list[JobSpec]:
    """The calls ``backend``'s line (made after this) sends alone, by itself or after
    a merged statement failed: a merged statement that succeeded adds none."""
    calls: list[JobSpec] = []
    alone = backend._insert_alone

    def spy(spec: JobSpec) -> Any:
        calls.append(spec)
        return alone(spec)

    backend._insert_alone = spy
    return calls


async def _merged_on_one_connection(eq: Soniq, database_url: str, schema: str) -> list[int]:
    """Four calls on a pool of one connection, the last three merged."""
    with table_locked(database_url, schema):
        calls = await stuck_in_flight(eq, lambda i: eq.enqueue("app.job", i=i))
        calls += [asyncio.ensure_future(eq.enqueue("app.job", i=i)) for i in range(1, 4)]
        await line_waiting(eq, 3)
    return list(await asyncio.wait_for(asyncio.gather(*calls), 30))


@pytest.mark.parametrize("prepared", [True, False])
async def test_the_merged_statement_is_prepared_once_per_connection_and_again_when_dropped(
    database_url: str, schema: str, pg: psycopg.Connection[Any], prepared: bool
) -> None:
    """psycopg sends the merged statement on its libpq connection: prepared under
    its own name once, prepared again after a borrower of the connection ran
    ``DEALLOCATE ALL``; with ``prepared_statements=False`` (PgBouncer) never. Every
    merged statement succeeds: no call is sent again alone."""
    eq = Soniq(
        database_url, schema=schema, driver="psycopg", pool_size=1, prepared_statements=prepared
    )
    await eq.ensure_initialized()
    alone = alone_calls(eq.backend)

    async def statements() -> dict[str, Any]:
        async with eq.backend.acquire() as conn:
            return dict(await (await conn.execute(PREPARED)).fetchall())

    try:
        ids = await _merged_on_one_connection(eq, database_url, schema)
        after_one = await statements()
        ids += await _merged_on_one_connection(eq, database_url, schema)
        assert await statements() == after_one  # (prepared once, or never)
        async with eq.backend.acquire() as conn:
            await conn.execute("DEALLOCATE ALL")
        ids += await _merged_on_one_connection(eq, database_url, schema)
        after_drop = await statements()
    finally:
        await eq.close()
    assert (GROUP_STATEMENT in after_one) is (GROUP_STATEMENT in after_drop) is prepared
    if prepared:
        assert after_drop[GROUP_STATEMENT] > after_one[GROUP_STATEMENT]
    assert eq.backend.insert_line().batches[3] == 3  # type: ignore[attr-defined]
    assert len(alone) == 3  # the first call of each round, nothing else
    assert len(set(ids)) == 12 == count_jobs(pg, schema)


@pytest.mark.parametrize("prepared", [True, False])
def test_the_merged_statement_of_threads_is_prepared_once_per_connection_and_again_when_dropped(
    database_url: str, schema: str, pg: psycopg.Connection[Any], prepared: bool
) -> None:
    """:func:`test_the_merged_statement_is_prepared_once_per_connection_and_again_when_dropped`
    for ``eq.sync``."""
    eq = Soniq(database_url, schema=schema, pool_size=1, prepared_statements=prepared)
    eq.sync.ensure_initialized()
    alone = alone_calls(eq.sync.backend)
    line = eq.sync.backend.insert_line()  # type: ignore[attr-defined]
    enqueue = eq.sync.enqueue

    def merged_on_one_connection() -> list[int]:
        with ThreadPoolExecutor(4) as pool:
            with table_locked(database_url, schema):
                calls = sync_stuck_in_flight(eq, pool, lambda i: enqueue("app.job", i=i))
                calls += [pool.submit(enqueue, "app.job", i=i) for i in range(1, 4)]
                sync_line_waiting(eq, 3)
            return [call.result(30) for call in calls]

    def statements() -> dict[str, Any]:
        with eq.sync.backend.acquire() as conn:
            return dict(conn.execute(PREPARED).fetchall())

    try:
        ids = merged_on_one_connection()
        after_one = statements()
        ids += merged_on_one_connection()
        assert statements() == after_one  # (prepared once, or never)
        with eq.sync.backend.acquire() as conn:
            conn.execute("DEALLOCATE ALL")
        ids += merged_on_one_connection()
        after_drop = statements()
    finally:
        eq.sync.close()
    assert (GROUP_STATEMENT in after_one) is (GROUP_STATEMENT in after_drop) is prepared
    if prepared:
        assert after_drop[GROUP_STATEMENT] > after_one[GROUP_STATEMENT]
    assert line.batches[3] == 3
    assert len(alone) == 3  # the first call of each round, nothing else
    assert len(set(ids)) == 12 == count_jobs(pg, schema)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, asyncio.CancelledError])
def test_a_merged_statement_interrupted_once_prepared_is_not_prepared_twice(
    database_url: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
    interruption: type[BaseException],
) -> None:
    """An interruption that lands as the server has just prepared the statement
    (the wait returned, the driver has not gone on yet): the next merged statement
    on that connection runs it, rather than failing to prepare it again ("already
    exists") and sending its calls alone, as every later one would."""
    eq = Soniq(database_url, schema=schema, pool_size=1)  # (both statements on one connection)
    eq.sync.ensure_initialized()
    backend = eq.sync.backend
    wait = psycopg.Connection.wait
    waits = 0

    def interrupted_after_prepare(conn: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal waits
        result = wait(conn, gen, *args, **kwargs)
        waits += 1
        if waits == 1:  # the prepare's
            raise interruption()
        return result

    monkeypatch.setattr(psycopg.Connection, "wait", interrupted_after_prepare)
    try:
        with pytest.raises(interruption):
            backend._insert_group([_spec(1), _spec(2)])  # type: ignore[attr-defined]
        ids = backend._insert_group([_spec(3), _spec(4)])  # type: ignore[attr-defined]
    finally:
        eq.sync.close()
    assert len(set(ids)) == 2


def test_a_merged_statement_into_a_schema_not_installed_names_the_fix(
    database_url: str, schema: str
) -> None:
    """The merged statement (libpq, not a cursor) turns a missing table into the same
    error as every other statement: it names the schema and ``ensure_initialized``."""
    eq = Soniq(database_url, schema=schema)
    specs = [_spec(1), _spec(2)]
    try:
        with pytest.raises(SchemaNotReadyError, match="ensure_initialized"):
            eq.sync.backend._insert_group(specs)  # type: ignore[attr-defined]
    finally:
        eq.sync.close()


async def test_enqueues_on_a_callers_connection_never_join_the_line(
    eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_line() -> None:
        raise AssertionError("an enqueue on a caller's connection reached the line")

    monkeypatch.setattr(eq.backend, "insert_line", no_line)
    async with eq.backend.acquire() as conn, conn.transaction():
        job_id = await eq.enqueue("app.job", connection=conn, i=1)
    assert await eq.get_job(job_id) is not None


def test_sync_enqueues_on_a_callers_connection_never_join_the_line(
    sync_eq: Soniq, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_line() -> None:
        raise AssertionError("an enqueue on a caller's connection reached the line")

    monkeypatch.setattr(sync_eq.sync.backend, "insert_line", no_line)
    with sync_eq.sync.backend.acquire() as conn, conn.transaction():
        job_id = sync_eq.sync.enqueue("app.job", connection=conn, i=1)
    assert sync_eq.sync.get_job(job_id) is not None


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),  # an OperationalError
        (psycopg.errors.QueryCanceled("statement timeout"), True),  # so is this
        (psycopg.errors.CheckViolation("check"), True),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), False),
        (psycopg.errors.AdminShutdown("terminating connection"), False),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), False),
    ],
)
def test_a_merged_statement_is_retried_call_by_call_only_when_it_surely_rolled_back(
    error: Exception, retried: bool
) -> None:
    """A statement the server refused rolled back, whatever class the driver files it
    under: safe to send each call again. A lost connection leaves the commit unknown:
    every caller hears the error, and nothing is sent twice."""
    futures = [Future(), Future()]
    assert insert_lines._retry_each(futures, error) is retried
    for future in futures:
        if retried:
            assert not future.done()
        else:
            assert type(future.exception(0)) is type(error)


def test_a_merged_statement_upserts_its_keys_in_key_order() -> None:
    """Two merged statements in flight lock the dedupe keys they share in the same
    order, so they cannot deadlock; the ids still come back per call."""
    specs = [
        JobSpec("a", "q", ({"n": 0},)),
        JobSpec("a", "q", ({"n": 1},), dedupe_key="k2"),
        JobSpec("a", "q", ({"n": 2},)),
        JobSpec("a", "q", ({"n": 3},), dedupe_key="k1"),
        JobSpec("a", "q", ({"n": 4},), dedupe_key="k2"),
    ]
    (doc,) = PostgresQueries("public", "numeric").insert_group(specs).params
    rows = json.loads(doc)
    assert [(r["dedupe_key"], r["args"]["n"]) for r in rows] == [
        ("k1", 3),
        ("k2", 1),
        (None, 0),
        (None, 2),
    ]
    returned = [(11, "k1"), (10, "k2"), (12, None), (13, None)]
    assert group_ids(specs, returned) == [12, 10, 13, 11, 10]


def _n(spec: JobSpec) -> int:
    return int(spec.args[0]["n"])


def _line(
    before: Callable[[Sequence[JobSpec]], Awaitable[None]],
    before_group: Callable[[Sequence[JobSpec]], Awaitable[None]] | None = None,
) -> insert_lines.AsyncInsertLine:
    """A line with no database: each statement awaits ``before(its specs)``
    (``before_group`` for a merged one, when given), then answers each call with its
    ``n``."""

    async def alone(spec: JobSpec) -> int:
        await before([spec])
        return _n(spec)

    async def group(specs: list[JobSpec]) -> list[int]:
        await (before_group or before)(specs)
        return [_n(spec) for spec in specs]

    return insert_lines.AsyncInsertLine(alone, group, max_in_flight=10)


async def test_a_caller_alone_sends_its_own_statement_at_once() -> None:
    """No statement in flight and nobody waiting: the call's own statement starts in
    its first step, with no round of the loop in between (a lone client's latency)."""
    started: list[int] = []

    async def alone(spec: JobSpec) -> int:
        started.append(_n(spec))
        return _n(spec)

    async def group(specs: list[JobSpec]) -> list[int]:
        raise AssertionError("a lone call was merged")

    line = insert_lines.AsyncInsertLine(alone, group, max_in_flight=10)
    call = asyncio.ensure_future(line.insert(JobSpec("a", "q", ({"n": 7},))))
    await asyncio.sleep(0)  # the call's first step
    assert started == [7]
    assert await call == 7


async def test_callers_answered_together_go_out_together_in_even_statements() -> None:
    """64 callers enqueueing one job at a time: the callers one statement answered go
    out together, and the line alternates two statements of 32, not one long
    statement beside short ones (which leaves the database idle while the long one's
    callers come back)."""

    line = _line(lambda specs: asyncio.sleep(0.002))

    async def caller(k: int) -> list[int]:
        return [await line.insert(JobSpec("a", "q", ({"n": k * 100 + i},))) for i in range(20)]

    results = await asyncio.wait_for(asyncio.gather(*(caller(k) for k in range(64))), 30)
    assert results == [[k * 100 + i for i in range(20)] for k in range(64)]
    statements = sum(line.batches.values())
    assert line.batches[32] >= 0.8 * statements, line.batches
    assert not line._in_flight and not line._line


def _spec(n: int, dedupe_key: str | None = None) -> JobSpec:
    return JobSpec("a", "q", ({"n": n},), dedupe_key=dedupe_key)


async def test_a_statement_cancelled_before_it_started_answers_and_frees_its_place() -> None:
    """A shutdown that cancels every other task can catch a merged statement's task
    before its first step: its callers still hear so, and the line goes on (a place
    left taken would hold every later enqueue of the loop)."""

    line = _line(lambda specs: asyncio.sleep(0.05), lambda specs: asyncio.sleep(0.2))
    first = asyncio.ensure_future(line.insert(_spec(0)))  # alone
    await asyncio.sleep(0.01)
    sent = [asyncio.ensure_future(line.insert(_spec(i))) for i in range(1, 21)]
    await asyncio.sleep(0.01)
    waiting = [asyncio.ensure_future(line.insert(_spec(i))) for i in range(21, 41)]
    await first  # its end scheduled the line's statement: its task is not started yet
    unstarted = [
        t for t in line._tasks if inspect.getcoroutinestate(t.get_coro()) == "CORO_CREATED"
    ]
    assert unstarted, "the waiting line's statement should have been created, not run"
    for task in unstarted:
        task.cancel()
    answers = await asyncio.wait_for(asyncio.gather(*sent, *waiting, return_exceptions=True), 5)
    assert answers[:20] == list(range(1, 21))
    assert all(isinstance(a, Exception) for a in answers[20:]), answers[20:]
    assert await asyncio.wait_for(line.insert(_spec(99)), 5) == 99
    assert not line._in_flight and not line._line


async def test_a_statement_held_up_holds_up_other_callers_briefly_only() -> None:
    """A merged statement waiting on a row lock (its dedupe key held by a caller's
    open transaction) keeps a later, unrelated caller waiting at most MAX_HOLD,
    then that caller takes the free place."""
    released = asyncio.Event()

    async def before(specs: Sequence[JobSpec]) -> None:
        if any(spec.dedupe_key == "k" for spec in specs):
            await released.wait()
        await asyncio.sleep(0.001)

    line = _line(before)
    first = asyncio.ensure_future(line.insert(_spec(0)))
    await asyncio.sleep(0)
    held = [
        asyncio.ensure_future(line.insert(_spec(i, "k" if i == 1 else None))) for i in range(1, 11)
    ]
    await async_wait_until(lambda: line._in_flight == [10], 5, "the held statement in flight")
    assert await asyncio.wait_for(line.insert(_spec(99)), 5) == 99  # without the release
    released.set()
    assert await asyncio.wait_for(asyncio.gather(*held), 5) == list(range(1, 11))
    await first


async def test_statements_ending_together_send_their_callers_together() -> None:
    """A merged statement and a lone one end in the same round: the merged one's
    callers, back in the next round, go out together, not the first alone."""
    gate = asyncio.Event()

    async def before(specs: Sequence[JobSpec]) -> None:
        await gate.wait()
        await asyncio.sleep(0.001)

    line = _line(before)

    async def caller(k: int, calls: int) -> None:
        for i in range(calls):
            await line.insert(_spec(k * 100 + i))

    lone = asyncio.ensure_future(caller(0, 1))
    await asyncio.sleep(0)
    merged = [asyncio.ensure_future(caller(k, 2)) for k in range(1, 6)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sorted(line._in_flight) == [1, 5]
    gate.set()  # both end in the same round
    await asyncio.wait_for(asyncio.gather(lone, *merged), 5)
    assert line.batches == {5: 2}, line.batches
