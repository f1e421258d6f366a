"""Enqueue throughput: Soniq against the raw driver doing the same by hand.

For each driver (asyncpg, psycopg async, psycopg sync), in one run:

* ``single``: N jobs enqueued one by one on the library's own pool. Raw baselines: a
  plain ``INSERT ... RETURNING id``, and the same fused with ``pg_notify`` in one CTE
  (the statement shape Soniq uses, so the wake-up costs the same on both sides).
* ``tx``: per job, borrow a connection, ``BEGIN``, insert a business row into
  ``orders``, enqueue the job on that connection, ``COMMIT``. Raw baseline: the same
  with a plain ``INSERT`` for the job row.
* ``many``: one call that enqueues a batch (20,000 by default). Raw baseline:
  ``INSERT ... SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[])``.
* ``concurrent``: N jobs enqueued one by one by 64 coroutines at once (async drivers)
  or 16 threads (``psycopg-sync``), through a pool of 10 connections on every side:
  a web server's requests. Raw baseline: the plain ``INSERT`` per call. Soniq merges
  the calls that wait (group commit, ``soniq.drivers.insert_lines``). Beside
  ``psycopg-sync``, the ceilings of Soniq's line of blocking callers: the 16 threads
  through it (``soniq.drivers.lines.ThreadLine``) whose statement writes
  nothing and only sleeps :data:`LINE_STATEMENT_S` (about one INSERT's round trip and
  commit here): what threads that must each block and be woken can pass on this
  machine, whatever the database; and the same line with statements that return at
  once (``time.sleep(0)``: the GIL let go as by any I/O), the most Soniq's line of 16
  blocking callers passes here, with no database and no statement time at all; and
  the wake ceiling, a practical bound under any line: the 16 threads each blocked once
  per call on a lock until one other thread wakes them, and nothing else; and the
  commit ceiling, a bound under any design: 16 blocking callers that each wait for
  their own job's commit never have more than 16 jobs in flight, so they cannot pass
  more than 16-row statements sent back to back with no caller at all (bare
  ``INSERT ... SELECT unnest``, one thread); and two bounds of what Soniq's line of
  the same 16 threads reaches with a real statement and next to no work per call
  (through libpq, prepared, no pool, no validation): carrying the barest ``INSERT ...
  SELECT`` of its rows (no NOTIFY, no dedupe), and carrying Soniq's own merged
  statement with its parameter built once per group size. Both are printed as
  ``bound:`` lines beside the targets.

Beside them, the peers doing the same with their own documented calls: pgqueuer on
asyncpg (``Queries.enqueue`` on a pool; on the transaction's connection; with lists),
procrastinate on psycopg async and on its sync connector (``defer_async`` /
``defer``; ``configure(connection=...)``; ``batch_defer``).

Every system gets a fresh database per driver, dropped at the end. The raw databases
get Soniq's schema through ``ensure_initialized``, so raw inserts hit the same table,
defaults and indexes; the peers install their own schema. Before every measurement the
tables are truncated
and the server checkpoints (untimed), so no measurement pays for another's dirty
pages; after it the rows are counted. Each repeat runs every measurement of a case
back to back, in an order rotated from one repeat to the next, so drift of the machine
hits all of them alike; ratios are taken per repeat (both sides measured moments
apart) and summarised by their median.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import psycopg_pool

from benchmarks._common import (
    Series,
    fresh_databases,
    paired_ratios,
    quiesce,
    render_table,
    target,
)
from soniq import Soniq
from soniq.core.jobs import JobSpec
from soniq.core.sql.postgres import PostgresQueries
from soniq.drivers.insert_lines import MAX_BATCH, MAX_IN_FLIGHT, MIN_SPLIT
from soniq.drivers.lines import Answer, ThreadLine

DRIVERS = ("asyncpg", "psycopg", "psycopg-sync")
CASES = ("single", "tx", "many", "concurrent")
COROUTINES = 64  # async callers of the concurrent case
THREADS = 16  # blocking callers of the concurrent case
LINE_STATEMENT_S = 0.0005  # the statement of the line ceiling (psycopg-sync concurrent)
JOB_NAME = "benchmarks.noop"
QUEUE = "default"
CHANNEL = "soniq:public"  # Soniq's channel for schema "public"; nobody listens here

TARGET_SINGLE_RATIO = 0.85  # asyncpg: soniq single enqueue / raw plain INSERT
TARGET_MANY_RATE = 100_000.0  # asyncpg: enqueue_many, jobs/s
TARGET_CONCURRENT_RAW = 4.0  # every driver: soniq concurrent / raw per-call INSERT
TARGET_CONCURRENT_PEER = 8.0  # every driver: soniq concurrent / its peer


async def _in_coroutines(n: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Seconds for :data:`COROUTINES` coroutines to make the calls ``one(i)``, i < n."""

    async def caller(k: int) -> None:
        for i in range(k, n, COROUTINES):
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(COROUTINES)))
    return time.perf_counter() - start


def _in_threads(n: int, one: Callable[[int], Any]) -> float:
    """Seconds for :data:`THREADS` threads, started before the clock, to make the calls
    ``one(i)``, i < n; the first error raised in a thread is raised here."""
    ready = threading.Barrier(THREADS + 1)
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        ready.wait()
        try:
            for i in range(k, n, THREADS):
                one(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


# The raw statements, with asyncpg's $n placeholders; psycopg gets them as %s.
ORDERS_DDL = """
CREATE TABLE public.orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer    text NOT NULL,
    total_cents integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
)"""
ORDER_SQL = "INSERT INTO public.orders (customer, total_cents) VALUES ($1, $2) RETURNING id"
INSERT_SQL = (
    "INSERT INTO public.soniq_jobs (name, queue, args) VALUES ($1, $2, $3::jsonb) RETURNING id"
)
NOTIFY_SQL = (
    "WITH ins AS (INSERT INTO public.soniq_jobs (name, queue, args) "
    "VALUES ($1, $2, $3::jsonb) RETURNING id, queue) "
    f"SELECT id, pg_notify('{CHANNEL}', queue) FROM ins"
)
BATCH_SQL = (
    "INSERT INTO public.soniq_jobs (name, queue, args) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[]) RETURNING id"
)


def _fmt(statement: str) -> str:
    return re.sub(r"\$\d+", "%s", statement)


ORDER_SQL_F, INSERT_SQL_F, NOTIFY_SQL_F, BATCH_SQL_F = map(
    _fmt, (ORDER_SQL, INSERT_SQL, NOTIFY_SQL, BATCH_SQL)
)
_dumps = json.dumps


def noop(n: int) -> None:
    """The job: one int argument, does nothing (it never runs here)."""


def _batch_args(n: int) -> list[dict[str, Any]]:
    return [{"n": i} for i in range(n)]


# --- the systems under test ---------------------------------------------------------
#
# Each method builds its inputs, starts the clock, does the work for ``n`` jobs and
# returns the elapsed seconds. Async methods return a coroutine.


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg's pool reset hook, doing nothing (as Soniq's own pool does)."""


class RawAsyncpg:
    is_async = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        await _soniq_schema(self.url, "asyncpg")
        # The same pool setting as Soniq's: no reset query on release (statements
        # that leave no session state need none), so the ratio compares like for like.
        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=10, reset=_no_reset)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def single(self, n: int) -> float:
        return await self._single(n, INSERT_SQL)

    async def single_notify(self, n: int) -> float:
        return await self._single(n, NOTIFY_SQL)

    async def _single(self, n: int, statement: str) -> float:
        # pool.fetchval = acquire, run, release; asyncpg's release sends its reset query
        # (one more round trip), exactly as for Soniq's own pool.
        fetchval = self.pool.fetchval  # type: ignore[union-attr]
        start = time.perf_counter()
        for i in range(n):
            await fetchval(statement, JOB_NAME, QUEUE, _dumps({"n": i}))
        return time.perf_counter() - start

    async def tx(self, n: int) -> float:
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        for _ in range(n):
            async with pool.acquire() as conn, conn.transaction():
                order_id = await conn.fetchval(ORDER_SQL, "acme", 1999)
                await conn.fetchval(INSERT_SQL, JOB_NAME, QUEUE, _dumps({"n": order_id}))
        return time.perf_counter() - start

    async def concurrent(self, n: int) -> float:
        fetchval = self.pool.fetchval  # type: ignore[union-attr]
        return await _in_coroutines(
            n, lambda i: fetchval(INSERT_SQL, JOB_NAME, QUEUE, _dumps({"n": i}))
        )

    async def many(self, n: int) -> float:
        args = _batch_args(n)
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        ids = await pool.fetch(BATCH_SQL, [JOB_NAME] * n, [QUEUE] * n, [_dumps(a) for a in args])
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class RawPsycopgAsync:
    is_async = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool: psycopg_pool.AsyncConnectionPool[Any] | None = None

    async def open(self) -> None:
        await _soniq_schema(self.url, "psycopg")
        self.pool = psycopg_pool.AsyncConnectionPool(
            self.url, min_size=1, max_size=10, kwargs={"autocommit": True}, open=False
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def single(self, n: int) -> float:
        return await self._single(n, INSERT_SQL_F)

    async def single_notify(self, n: int) -> float:
        return await self._single(n, NOTIFY_SQL_F)

    async def concurrent(self, n: int) -> float:
        pool = self.pool
        assert pool is not None

        async def one(i: int) -> None:
            async with pool.connection() as conn:
                cur = await conn.execute(INSERT_SQL_F, (JOB_NAME, QUEUE, _dumps({"n": i})))
                await cur.fetchone()

        return await _in_coroutines(n, one)

    async def _single(self, n: int, statement: str) -> float:
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        for i in range(n):
            async with pool.connection() as conn:
                cur = await conn.execute(statement, (JOB_NAME, QUEUE, _dumps({"n": i})))
                await cur.fetchone()
        return time.perf_counter() - start

    async def tx(self, n: int) -> float:
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        for _ in range(n):
            async with pool.connection() as conn, conn.transaction():
                cur = await conn.execute(ORDER_SQL_F, ("acme", 1999))
                (order_id,) = await cur.fetchone()  # type: ignore[misc]
                cur = await conn.execute(INSERT_SQL_F, (JOB_NAME, QUEUE, _dumps({"n": order_id})))
                await cur.fetchone()
        return time.perf_counter() - start

    async def many(self, n: int) -> float:
        args = _batch_args(n)
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        async with pool.connection() as conn:
            cur = await conn.execute(
                BATCH_SQL_F, ([JOB_NAME] * n, [QUEUE] * n, [_dumps(a) for a in args])
            )
            ids = await cur.fetchall()
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class RawPsycopgSync:
    is_async = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool: psycopg_pool.ConnectionPool[Any] | None = None

    def open(self) -> None:
        eq = Soniq(self.url)
        eq.sync.ensure_initialized()
        eq.sync.close()
        self.pool = psycopg_pool.ConnectionPool(
            self.url, min_size=1, max_size=10, kwargs={"autocommit": True}, open=False
        )
        self.pool.open(wait=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def single(self, n: int) -> float:
        return self._single(n, INSERT_SQL_F)

    def single_notify(self, n: int) -> float:
        return self._single(n, NOTIFY_SQL_F)

    def concurrent(self, n: int) -> float:
        pool = self.pool
        assert pool is not None

        def one(i: int) -> None:
            with pool.connection() as conn:
                conn.execute(INSERT_SQL_F, (JOB_NAME, QUEUE, _dumps({"n": i}))).fetchone()

        return _in_threads(n, one)

    def line_ceiling(self, n: int, seconds: float = LINE_STATEMENT_S) -> float:
        """:data:`THREADS` threads through Soniq's line of blocking calls, its
        statement a sleep of ``seconds`` writing nothing."""

        def statement(calls: list[_LineCall]) -> None:
            time.sleep(seconds)
            for call in calls:
                call.future.set_result(None)

        line = ThreadLine(
            statement, max_in_flight=MAX_IN_FLIGHT, max_batch=MAX_BATCH, min_split=MIN_SPLIT
        )
        return _in_threads(n, lambda i: line.run(lambda: time.sleep(seconds), _LineCall))

    def commit_ceiling(self, n: int) -> float:
        """The most :data:`THREADS` blocking callers can pass whatever the line: each
        waits for its own job's commit, so at most :data:`THREADS` jobs are ever in
        flight. Here they are, with no caller at all: one thread sends them back to
        back as one bare ``INSERT ... SELECT unnest`` of :data:`THREADS` rows (the
        cheapest statement writing them; two of half as many at once measured
        lower here)."""
        pool = self.pool
        assert pool is not None
        args = [_dumps(a) for a in _batch_args(n)]
        with pool.connection() as conn:
            start = time.perf_counter()
            for k in range(0, n, THREADS):
                chunk = args[k : k + THREADS]
                rows = ([JOB_NAME] * len(chunk), [QUEUE] * len(chunk), chunk)
                conn.execute(BATCH_SQL_F, rows).fetchall()
            return time.perf_counter() - start

    def bare_line_ceiling(self, n: int) -> float:
        """:data:`THREADS` threads through Soniq's line of blocking calls, each group
        sent as the barest ``INSERT ... SELECT`` of its rows through libpq (prepared,
        no cursor, no validation, no NOTIFY, no dedupe, no failure isolation): what
        Soniq's line passes here with next to no work per call and the cheapest
        statement. The analogue for threads of the hand-written coalescer of 64
        coroutines that issue 18 measured at 7.5x the per-call INSERT."""
        return self._line_through_libpq(
            n, BARE_GROUP_SQL, lambda args: _dumps(args).encode(), lambda i: {"n": i}
        )

    def statement_ceiling(self, n: int) -> float:
        """:data:`THREADS` threads through Soniq's line, each group sent through libpq
        as Soniq's own merged statement (the one its psycopg driver sends: per-row
        options, dedupe, one NOTIFY), its parameter built once per group size and
        reused: what Soniq's statement allows its line with no work per call at all
        (no validation, no JSON, no pool, no driver)."""
        queries = PostgresQueries("public", "numeric")
        spec = JobSpec(JOB_NAME, QUEUE, ({"n": 1},))
        params: dict[int, bytes] = {}

        def param(specs: list[JobSpec]) -> bytes:
            text = params.get(len(specs))
            if text is None:
                text = params[len(specs)] = queries.insert_group(specs).params[0].encode()
            return text

        sql = queries.insert_group([]).sql.encode()
        return self._line_through_libpq(n, sql, param, lambda i: spec)

    def _line_through_libpq(
        self,
        n: int,
        sql: bytes,
        param: Callable[[list[Any]], bytes],
        item: Callable[[int], Any],
    ) -> float:
        """:data:`THREADS` threads through a ``ThreadLine`` whose calls carry
        ``item(i)``; each group (or call alone) runs ``sql`` prepared, its one
        parameter ``param(items)``, on one of :data:`MAX_IN_FLIGHT` connections
        (the line never has more statements in flight), and hands each call the id
        of its row."""
        pool = self.pool
        assert pool is not None
        conns = [pool.getconn() for _ in range(MAX_IN_FLIGHT)]
        free = [conn.pgconn for conn in conns]
        guard = threading.Lock()

        def insert(items: list[Any]) -> list[int]:
            with guard:
                pgconn = free.pop()
            try:
                result = pgconn.exec_prepared(LINE_STATEMENT, [param(items)])
                if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                    raise RuntimeError(result.get_error_message())
                return [int(result.get_value(k, 0)) for k in range(len(items))]
            finally:
                with guard:
                    free.append(pgconn)

        def statement(calls: list[_LineCall]) -> None:
            for call, job_id in zip(calls, insert([c.item for c in calls]), strict=True):
                call.future.set_result(job_id)

        def one(i: int) -> int:
            it = item(i)
            return line.run(lambda: insert([it])[0], lambda: _LineCall(it))

        line = ThreadLine(
            statement, max_in_flight=MAX_IN_FLIGHT, max_batch=MAX_BATCH, min_split=MIN_SPLIT
        )
        try:
            for pgconn in free:
                pgconn.prepare(LINE_STATEMENT, sql)
            return _in_threads(n, one)
        finally:
            for conn in conns:
                conn.pgconn.exec_(b"DEALLOCATE " + LINE_STATEMENT)
                pool.putconn(conn)

    def line_ceiling_idle(self, n: int) -> float:
        """:meth:`line_ceiling` with statements that take no time."""
        return self.line_ceiling(n, 0.0)

    def wake_ceiling(self, n: int) -> float:
        """:data:`THREADS` threads that each block once per call on a lock until one
        other thread wakes them, and do nothing else: no line, no statement, no future.
        What a blocking caller that waits for a commit costs at the least when it is
        woken by another thread: a practical bound on what a line of threads passes on
        this machine."""
        waiting: collections.deque[threading.Lock] = collections.deque()
        guard = threading.Lock()
        work = threading.Semaphore(0)
        done = threading.Event()

        def waker() -> None:
            while not done.is_set():
                if not work.acquire(timeout=0.05):
                    continue
                with guard:
                    woken = list(waiting)
                    waiting.clear()
                for lock in woken:
                    lock.release()

        def one(i: int) -> None:
            lock = threading.Lock()
            lock.acquire()
            with guard:
                waiting.append(lock)
            work.release()
            lock.acquire()

        thread = threading.Thread(target=waker, daemon=True)
        thread.start()
        # Stopped only once every caller is back: interrupted, the callers still
        # running need it (a daemon, it does not keep the process alive).
        elapsed = _in_threads(n, one)
        done.set()
        thread.join()
        return elapsed

    def _single(self, n: int, statement: str) -> float:
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        for i in range(n):
            with pool.connection() as conn:
                conn.execute(statement, (JOB_NAME, QUEUE, _dumps({"n": i}))).fetchone()
        return time.perf_counter() - start

    def tx(self, n: int) -> float:
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        for _ in range(n):
            with pool.connection() as conn, conn.transaction():
                (order_id,) = conn.execute(ORDER_SQL_F, ("acme", 1999)).fetchone()  # type: ignore[misc]
                conn.execute(INSERT_SQL_F, (JOB_NAME, QUEUE, _dumps({"n": order_id}))).fetchone()
        return time.perf_counter() - start

    def many(self, n: int) -> float:
        args = _batch_args(n)
        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        with pool.connection() as conn:
            ids = conn.execute(
                BATCH_SQL_F, ([JOB_NAME] * n, [QUEUE] * n, [_dumps(a) for a in args])
            ).fetchall()
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class _LineCall:
    """A call in the line of the ceilings of blocking callers: what it carries, and
    its answer."""

    __slots__ = ("future", "item")

    def __init__(self, item: Any = None) -> None:
        self.item = item
        self.future: Answer[Any] = Answer()


LINE_STATEMENT = b"soniq_bench_line"  # the statement of the libpq bounds
BARE_GROUP_SQL = (
    f"INSERT INTO public.soniq_jobs (name, queue, args) "
    f"SELECT '{JOB_NAME}', '{QUEUE}', a FROM jsonb_array_elements($1::jsonb) AS a RETURNING id"
).encode()


class SoniqAsync:
    is_async = True

    def __init__(self, url: str, driver: str) -> None:
        self.driver = driver
        self.eq = Soniq(url, driver=driver)
        self.eq.job(name=JOB_NAME)(noop)

    async def open(self) -> None:
        await self.eq.ensure_initialized()

    async def close(self) -> None:
        await self.eq.close()

    async def single(self, n: int) -> float:
        enqueue = self.eq.enqueue
        start = time.perf_counter()
        for i in range(n):
            await enqueue(noop, n=i)
        return time.perf_counter() - start

    async def concurrent(self, n: int) -> float:
        enqueue = self.eq.enqueue
        return await _in_coroutines(n, lambda i: enqueue(noop, n=i))

    async def tx(self, n: int) -> float:
        eq = self.eq
        start = time.perf_counter()
        if self.driver == "asyncpg":
            for _ in range(n):
                async with eq.backend.acquire() as conn, conn.transaction():
                    order_id = await conn.fetchval(ORDER_SQL, "acme", 1999)
                    await eq.enqueue(noop, connection=conn, n=order_id)
        else:
            for _ in range(n):
                async with eq.backend.acquire() as conn, conn.transaction():
                    cur = await conn.execute(ORDER_SQL_F, ("acme", 1999))
                    (order_id,) = await cur.fetchone()
                    await eq.enqueue(noop, connection=conn, n=order_id)
        return time.perf_counter() - start

    async def many(self, n: int) -> float:
        args = _batch_args(n)
        start = time.perf_counter()
        ids = await self.eq.enqueue_many(noop, args)
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class SoniqSync:
    is_async = False

    def __init__(self, url: str) -> None:
        self.eq = Soniq(url)
        self.eq.job(name=JOB_NAME)(noop)
        self.sync = self.eq.sync

    def open(self) -> None:
        self.sync.ensure_initialized()

    def close(self) -> None:
        self.sync.close()

    def single(self, n: int) -> float:
        enqueue = self.sync.enqueue
        start = time.perf_counter()
        for i in range(n):
            enqueue(noop, n=i)
        return time.perf_counter() - start

    def concurrent(self, n: int) -> float:
        enqueue = self.sync.enqueue
        return _in_threads(n, lambda i: enqueue(noop, n=i))

    def tx(self, n: int) -> float:
        sync = self.sync
        start = time.perf_counter()
        for _ in range(n):
            with sync.backend.acquire() as conn, conn.transaction():
                (order_id,) = conn.execute(ORDER_SQL_F, ("acme", 1999)).fetchone()
                sync.enqueue(noop, connection=conn, n=order_id)
        return time.perf_counter() - start

    def many(self, n: int) -> float:
        args = _batch_args(n)
        start = time.perf_counter()
        ids = self.sync.enqueue_many(noop, args)
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class PgqueuerAsyncpg:
    """pgqueuer: ``Queries`` over an asyncpg pool (single and batch); in a caller's
    transaction, ``Queries`` over that connection, as its README shows."""

    is_async = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool: asyncpg.Pool | None = None
        self.queries: Any = None

    async def open(self) -> None:
        from pgqueuer import AsyncpgPoolDriver, Queries

        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=10)
        self.queries = Queries(AsyncpgPoolDriver(self.pool))
        await self.queries.install()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def single(self, n: int) -> float:
        enqueue = self.queries.enqueue
        start = time.perf_counter()
        for i in range(n):
            await enqueue(JOB_NAME, _dumps({"n": i}).encode())
        return time.perf_counter() - start

    async def concurrent(self, n: int) -> float:
        enqueue = self.queries.enqueue
        return await _in_coroutines(n, lambda i: enqueue(JOB_NAME, _dumps({"n": i}).encode()))

    async def tx(self, n: int) -> float:
        from pgqueuer import AsyncpgDriver, Queries

        pool = self.pool
        assert pool is not None
        start = time.perf_counter()
        for _ in range(n):
            async with pool.acquire() as conn, conn.transaction():
                order_id = await conn.fetchval(ORDER_SQL, "acme", 1999)
                await Queries(AsyncpgDriver(conn)).enqueue(
                    JOB_NAME, _dumps({"n": order_id}).encode()
                )
        return time.perf_counter() - start

    async def many(self, n: int) -> float:
        payloads = [_dumps(a).encode() for a in _batch_args(n)]
        start = time.perf_counter()
        ids = await self.queries.enqueue([JOB_NAME] * n, payloads, [0] * n)
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class ProcrastinateAsync:
    """procrastinate on its psycopg async connector: ``defer_async``;
    ``configure(connection=conn).defer_async`` in a caller's transaction (a connection
    of its own pool); ``batch_defer_async``."""

    is_async = True

    def __init__(self, url: str) -> None:
        from procrastinate import App, PsycopgConnector

        self.app = App(connector=PsycopgConnector(conninfo=url, min_size=1, max_size=10))
        self.task = self.app.task(name=JOB_NAME)(noop)

    async def open(self) -> None:
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()

    async def close(self) -> None:
        await self.app.close_async()

    async def single(self, n: int) -> float:
        defer = self.task.defer_async
        start = time.perf_counter()
        for i in range(n):
            await defer(n=i)
        return time.perf_counter() - start

    async def concurrent(self, n: int) -> float:
        defer = self.task.defer_async
        return await _in_coroutines(n, lambda i: defer(n=i))

    async def tx(self, n: int) -> float:
        pool, task = self.app.connector.pool, self.task  # type: ignore[attr-defined]
        start = time.perf_counter()
        for _ in range(n):
            async with pool.connection() as conn, conn.transaction():
                cur = await conn.execute(ORDER_SQL_F, ("acme", 1999))
                (order_id,) = await cur.fetchone()
                await task.configure(connection=conn).defer_async(n=order_id)
        return time.perf_counter() - start

    async def many(self, n: int) -> float:
        args = _batch_args(n)
        start = time.perf_counter()
        ids = await self.task.batch_defer_async(*args)
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


class ProcrastinateSync:
    """procrastinate's ``SyncPsycopgConnector``: ``defer``;
    ``configure(connection=conn).defer``; ``batch_defer``."""

    is_async = False

    def __init__(self, url: str) -> None:
        from procrastinate import App, SyncPsycopgConnector

        self.app = App(connector=SyncPsycopgConnector(conninfo=url, min_size=1, max_size=10))
        self.task = self.app.task(name=JOB_NAME)(noop)

    def open(self) -> None:
        self.app.open()
        self.app.schema_manager.apply_schema()

    def close(self) -> None:
        self.app.close()

    def single(self, n: int) -> float:
        defer = self.task.defer
        start = time.perf_counter()
        for i in range(n):
            defer(n=i)
        return time.perf_counter() - start

    def concurrent(self, n: int) -> float:
        defer = self.task.defer
        return _in_threads(n, lambda i: defer(n=i))

    def tx(self, n: int) -> float:
        pool, task = self.app.connector.pool, self.task  # type: ignore[attr-defined]
        start = time.perf_counter()
        for _ in range(n):
            with pool.connection() as conn, conn.transaction():
                (order_id,) = conn.execute(ORDER_SQL_F, ("acme", 1999)).fetchone()
                task.configure(connection=conn).defer(n=order_id)
        return time.perf_counter() - start

    def many(self, n: int) -> float:
        args = _batch_args(n)
        start = time.perf_counter()
        ids = self.task.batch_defer(*args)
        elapsed = time.perf_counter() - start
        assert len(ids) == n
        return elapsed


async def _soniq_schema(url: str, driver: str) -> None:
    eq = Soniq(url, driver=driver)
    try:
        await eq.ensure_initialized()
    finally:
        await eq.close()


System = (
    RawAsyncpg
    | RawPsycopgAsync
    | RawPsycopgSync
    | SoniqAsync
    | SoniqSync
    | PgqueuerAsyncpg
    | ProcrastinateAsync
    | ProcrastinateSync
)

#: The peer measured beside each driver (its own driver of that kind).
PEERS = {"asyncpg": "pgqueuer", "psycopg": "procrastinate", "psycopg-sync": "procrastinate"}


def make_system(driver: str, kind: str, url: str) -> System:
    if kind == "pgqueuer":
        return PgqueuerAsyncpg(url)
    if kind == "procrastinate":
        return ProcrastinateSync(url) if driver == "psycopg-sync" else ProcrastinateAsync(url)
    if kind == "raw":
        if driver == "asyncpg":
            return RawAsyncpg(url)
        return RawPsycopgAsync(url) if driver == "psycopg" else RawPsycopgSync(url)
    if driver == "psycopg-sync":
        return SoniqSync(url)
    return SoniqAsync(url, driver)


# --- what is measured ---------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    driver: str
    case: str
    key: str  # unique within (driver, case)
    label: str
    database: str  # label of the database it runs on
    method: str  # method of the system

    @property
    def id(self) -> str:
        return f"{self.driver}/{self.case}/{self.key}"


def measures(drivers: list[str], cases: list[str], peers: bool = True) -> list[Measure]:
    out = []
    for driver in drivers:
        raw, soniq = f"{driver}-raw", f"{driver}-soniq"
        peer = PEERS[driver]
        db = f"{driver}-{peer}"
        sync = driver == "psycopg-sync"
        callers = f"{THREADS} threads" if sync else f"{COROUTINES} coroutines"
        peer_plan = {
            "pgqueuer": {
                "single": "pgqueuer Queries.enqueue (own pool)",
                "tx": "pgqueuer BEGIN; order; Queries(conn).enqueue; COMMIT",
                "many": "pgqueuer Queries.enqueue(lists)",
                "concurrent": f"pgqueuer Queries.enqueue, {COROUTINES} coroutines",
            },
            "procrastinate": {
                "single": f"procrastinate {'defer' if sync else 'defer_async'} (own pool)",
                "tx": "procrastinate BEGIN; order; configure(connection=).defer; COMMIT",
                "many": f"procrastinate {'batch_defer' if sync else 'batch_defer_async'}",
                "concurrent": f"procrastinate {'defer' if sync else 'defer_async'}, {callers}",
            },
        }[peer]
        plan = {
            "single": [
                ("raw", "raw INSERT ... RETURNING id", raw, "single"),
                ("raw_notify", "raw INSERT + pg_notify (one CTE)", raw, "single_notify"),
                ("soniq", "soniq enqueue (own pool)", soniq, "single"),
            ],
            "tx": [
                ("raw", "raw BEGIN; order; INSERT job; COMMIT", raw, "tx"),
                ("soniq", "soniq BEGIN; order; enqueue(connection=); COMMIT", soniq, "tx"),
            ],
            "many": [
                ("raw", "raw INSERT ... SELECT unnest(...)", raw, "many"),
                ("soniq", "soniq enqueue_many", soniq, "many"),
            ],
            "concurrent": [
                ("raw", f"raw INSERT per call, {callers}", raw, "concurrent"),
                ("soniq", f"soniq enqueue, {callers}", soniq, "concurrent"),
            ],
        }
        if sync:
            line = f"line ceiling: {callers}, no database, {LINE_STATEMENT_S * 1e3:g} ms sleeps"
            plan["concurrent"].append(("line", line, raw, "line_ceiling"))
            idle = f"line ceiling: {callers}, no database, statements that take no time"
            plan["concurrent"].append(("line-idle", idle, raw, "line_ceiling_idle"))
            wake = f"wake ceiling: {callers} blocked and woken per call, nothing else"
            plan["concurrent"].append(("wake", wake, raw, "wake_ceiling"))
            bare = f"line + bare INSERT: {callers}, no checks, no NOTIFY, libpq"
            plan["concurrent"].append(("bare-line", bare, raw, "bare_line_ceiling"))
            own = f"line + Soniq's statement: {callers}, no per-call work, libpq"
            plan["concurrent"].append(("statement", own, raw, "statement_ceiling"))
            commit = f"commit ceiling: {THREADS} jobs in flight, INSERTs of {THREADS}, no callers"
            plan["concurrent"].append(("commit", commit, raw, "commit_ceiling"))
        if peers:
            for case in plan:
                plan[case].append((peer, peer_plan[case], db, case))
        for case in cases:
            for key, label, database, method in plan[case]:
                out.append(Measure(driver, case, key, label, database, method))
    return out


#: The measures that write nothing: the ceilings of blocking callers (psycopg-sync).
CEILINGS = ("line", "line-idle", "wake")

# Ratios kept: (driver-less) numerator key -> denominator key, per case. Every
# measure's ratio to its case's plain raw baseline comes first; then Soniq's to the rest.
RATIOS = {
    "single": [
        ("raw_notify", "raw"),
        ("soniq", "raw"),
        ("pgqueuer", "raw"),
        ("procrastinate", "raw"),
        ("soniq", "raw_notify"),
        ("soniq", "pgqueuer"),
        ("soniq", "procrastinate"),
    ],
    "tx": [
        ("soniq", "raw"),
        ("pgqueuer", "raw"),
        ("procrastinate", "raw"),
        ("soniq", "pgqueuer"),
        ("soniq", "procrastinate"),
    ],
    "many": [
        ("soniq", "raw"),
        ("pgqueuer", "raw"),
        ("procrastinate", "raw"),
        ("soniq", "pgqueuer"),
        ("soniq", "procrastinate"),
    ],
    "concurrent": [
        ("soniq", "raw"),
        ("line", "raw"),
        ("line-idle", "raw"),
        ("wake", "raw"),
        ("commit", "raw"),
        ("bare-line", "raw"),
        ("statement", "raw"),
        ("pgqueuer", "raw"),
        ("procrastinate", "raw"),
        ("soniq", "line"),
        ("soniq", "statement"),
        ("soniq", "pgqueuer"),
        ("soniq", "procrastinate"),
        ("bare-line", "procrastinate"),
        ("statement", "procrastinate"),
    ],
}


#: Per kind of database: its job table, and what TRUNCATE empties.
TABLES = {
    "raw": ("public.soniq_jobs", "public.soniq_jobs, public.orders"),
    "soniq": ("public.soniq_jobs", "public.soniq_jobs, public.orders"),
    "pgqueuer": ("pgqueuer", "pgqueuer, pgqueuer_log, pgqueuer_statistics, public.orders"),
    "procrastinate": ("procrastinate_jobs", "procrastinate_jobs, public.orders CASCADE"),
}


class Control:
    """A plain autocommit connection per database, for the untimed chores."""

    def __init__(self, url: str, kind: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.can_checkpoint = True
        self.jobs_table, self.truncate = TABLES[kind]

    def clear(self) -> None:
        """Empty the tables: after a measurement too, so that no autovacuum of these
        rows runs during another database's measurement."""
        self.conn.execute(f"TRUNCATE {self.truncate}")

    def reset(self) -> None:
        self.clear()
        quiesce(self.conn)
        if self.can_checkpoint:
            try:
                self.conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                self.can_checkpoint = False

    def count(self) -> tuple[int, int]:
        row = self.conn.execute(
            f"SELECT (SELECT count(*) FROM {self.jobs_table}), (SELECT count(*) FROM public.orders)"
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    def close(self) -> None:
        self.conn.close()


_TIMEOUTS = (asyncpg.QueryCanceledError, psycopg.errors.QueryCanceled)


class MeasureFailed(Exception):
    """A measurement that could not finish (its statement hit the timeout)."""


@dataclass
class Bench:
    systems: dict[str, System]
    controls: dict[str, Control]
    loop: asyncio.AbstractEventLoop

    def run(self, m: Measure, n: int) -> float:
        """Reset the database, time ``n`` jobs of ``m``, check the rows; jobs/s."""
        control = self.controls[m.database]
        control.reset()
        gc.collect()
        fn: Callable[[int], Any] = getattr(self.systems[m.database], m.method)
        started = time.perf_counter()
        try:
            result = fn(n)
            elapsed: float = (
                self.loop.run_until_complete(result) if isinstance(result, Awaitable) else result
            )
        except _TIMEOUTS as exc:
            waited = time.perf_counter() - started
            raise MeasureFailed(
                f"{n} jobs: cancelled by statement_timeout after {waited:.1f} s ({exc})"
            ) from exc
        jobs, orders = control.count()
        control.clear()
        want_orders = n if m.case == "tx" else 0
        want_jobs = 0 if m.key in CEILINGS else n
        if (jobs, orders) != (want_jobs, want_orders):
            raise RuntimeError(
                f"{m.id}: expected {want_jobs} jobs and {want_orders} orders, "
                f"found {jobs} and {orders}"
            )
        return n / elapsed


def _size(m: Measure, n_single: int, n_batch: int) -> int:
    return n_batch if m.case == "many" else n_single


def run_benchmark(args: argparse.Namespace, admin: str) -> dict[str, Any]:
    """The enqueue measurements of ``args`` (see :mod:`benchmarks.suite`), on fresh
    databases made with the ``admin`` URL."""
    print(
        f"enqueue: single/tx: N={args.n} jobs per measurement; many: {args.batch} jobs in "
        f"one call; {args.repeats} repeat(s) after a warm-up; drivers: "
        f"{', '.join(args.drivers)}",
        flush=True,
    )
    plan = measures(args.drivers, args.cases)
    labels = sorted({m.database for m in plan})
    series: dict[str, Series] = {m.id: Series() for m in plan}
    loop = asyncio.new_event_loop()
    with fresh_databases(admin, labels, statement_timeout=args.statement_timeout) as urls:
        systems: dict[str, System] = {}
        controls: dict[str, Control] = {}
        try:
            for label in labels:
                driver, kind = label.rsplit("-", 1)
                system = systems[label] = make_system(driver, kind, urls[label])
                opened = system.open()
                if opened is not None:
                    loop.run_until_complete(opened)
                controls[label] = Control(urls[label], kind)
                controls[label].conn.execute(ORDERS_DDL)
            bench = Bench(systems, controls, loop)

            def attempt(m: Measure, n: int, *, record: bool) -> None:
                s = series[m.id]
                if s.failure:  # failed once: not tried again, so the run still ends
                    return
                try:
                    rate = bench.run(m, n)
                except MeasureFailed as exc:
                    s.failure = f"{'warm-up' if not record else 'measure'}: {exc}"
                    print(f"  {m.id} FAILED: {s.failure}", file=sys.stderr, flush=True)
                    return
                if record:
                    s.rates.append(rate)

            started = time.perf_counter()
            # Warm-up: connections, prepared statements, caches. Each single/tx
            # statement runs more than 5 times on a connection, so PostgreSQL's plan
            # cache has made its generic-or-custom choice, as in a long-running app
            # (a generic plan is what made enqueue_many quadratic once).
            for m in plan:
                attempt(m, min(_size(m, args.n, args.batch), args.warmup), record=False)
            for r in range(args.repeats):
                for case in args.cases:
                    batch = [m for m in plan if m.case == case]
                    shift = r % len(batch)
                    for m in batch[shift:] + batch[:shift]:
                        attempt(m, _size(m, args.n, args.batch), record=True)
                print(
                    f"  enqueue repeat {r + 1}/{args.repeats} done "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for system in systems.values():
                closed = system.close()
                if closed is not None:
                    loop.run_until_complete(closed)
            for control in controls.values():
                control.close()
            loop.close()
        checkpointed = all(c.can_checkpoint for c in controls.values())
    paired = _paired(plan, series)
    return {
        "parameters": {
            "n": args.n,
            "batch": args.batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "statement_timeout_s": args.statement_timeout,
            "quick": args.quick,
            "drivers": args.drivers,
            "cases": args.cases,
            "checkpoint_before_each": checkpointed,
        },
        "measures": [
            {"id": m.id, "driver": m.driver, "case": m.case, "label": m.label}
            | series[m.id].as_dict()
            for m in plan
        ],
        "ratios": _ratios(paired),
        "targets": _targets(plan, series, paired),
    }


def _paired(plan: list[Measure], series: dict[str, Series]) -> dict[tuple[str, str], Series]:
    """The per-repeat ratios of each pair of :data:`RATIOS` measured in this run (none
    where a side failed)."""
    have = {m.id for m in plan}
    out = {}
    for driver in dict.fromkeys(m.driver for m in plan):
        for case, pairs in RATIOS.items():
            for num, den in pairs:
                a, b = f"{driver}/{case}/{num}", f"{driver}/{case}/{den}"
                if a in have and b in have:
                    per_repeat = Series(paired_ratios(series[a], series[b]))
                    if per_repeat.rates:
                        out[a, b] = per_repeat
    return out


def _ratios(paired: dict[tuple[str, str], Series]) -> list[dict[str, Any]]:
    return [
        {
            "of": a,
            "to": b,
            "median": round(per_repeat.median, 3),
            "min": round(per_repeat.low, 3),
            "max": round(per_repeat.high, 3),
            "per_repeat": [round(r, 3) for r in per_repeat.rates],
        }
        for (a, b), per_repeat in paired.items()
    ]


def _targets(
    plan: list[Measure], series: dict[str, Series], paired: dict[tuple[str, str], Series]
) -> list[dict[str, Any]]:
    have = {m.id for m in plan}

    def ratio(of: str, to: str) -> float | None:
        per_repeat = paired.get((of, to))
        return None if per_repeat is None else per_repeat.median

    out = []
    if {"asyncpg/single/soniq", "asyncpg/single/raw"} <= have:
        value = ratio("asyncpg/single/soniq", "asyncpg/single/raw")
        out.append(
            target("asyncpg single enqueue / raw INSERT", value, TARGET_SINGLE_RATIO, digits=3)
        )
    for driver in dict.fromkeys(m.driver for m in plan):
        soniq = f"{driver}/concurrent/soniq"
        for other, want in (
            ("raw", TARGET_CONCURRENT_RAW),
            (PEERS[driver], TARGET_CONCURRENT_PEER),
        ):
            if {soniq, f"{driver}/concurrent/{other}"} <= have:
                value = ratio(soniq, f"{driver}/concurrent/{other}")
                out.append(target(f"{driver} concurrent enqueue / {other}", value, want, digits=3))
    if "asyncpg/many/soniq" in have:
        many = series["asyncpg/many/soniq"]
        rate = many.median if many.rates and not many.failure else None
        out.append(target("asyncpg enqueue_many, jobs/s", rate, TARGET_MANY_RATE, spec=",.0f"))
    return out


def _ratio(result: dict[str, Any], of: str, to: str) -> str:
    r = next((x for x in result["ratios"] if x["of"] == of and x["to"] == to), None)
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" if r else ""


def render(result: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    previous: tuple[str, str] | None = None
    for m in result["measures"]:
        group = (m["driver"], m["case"])
        if previous is not None and group != previous:
            rows.append([])
        previous = group
        key = m["id"].rsplit("/", 1)[1]
        base = f"{m['driver']}/{m['case']}"
        if m["failure"]:
            rate, spread = "FAILED", "-"
        else:
            rate, spread = f"{m['median']:,.0f}", f"{m['min']:,.0f}-{m['max']:,.0f}"
        of_raw = _ratio(result, m["id"], f"{base}/raw") if key != "raw" else ""
        soniq_to = _ratio(result, f"{base}/soniq", m["id"]) if key != "soniq" else ""
        rows.append([m["driver"], m["case"], m["label"], rate, spread, of_raw, soniq_to])
    table = render_table(
        ["driver", "case", "what", "jobs/s", "min-max", "this / raw", "soniq / this"],
        rows,
        right={3, 4},
    )
    lines = [
        table,
        "",
        "ratios: median of the per-repeat ratios (min-max); each pair measured moments apart",
    ]
    for m in result["measures"]:
        if m["failure"]:
            lines.append(f"FAILED {m['id']}: {m['failure']}")
    for t in result["targets"]:
        if t["value"] is None:
            value = "n/a"
        else:
            value = f"{t['value']:,}" if isinstance(t["value"], int) else f"{t['value']:.2f}"
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"target: {t['what']} = {value} (want {t['target']}): {verdict}")
    # What Soniq's line of the same threads reaches with no work per call: with the
    # barest INSERT, and with Soniq's own merged statement.
    for key, what in (("bare-line", "line + bare INSERT"), ("statement", "line + statement")):
        for peer in ("raw", "procrastinate"):
            bound = _ratio(
                result, f"psycopg-sync/concurrent/{key}", f"psycopg-sync/concurrent/{peer}"
            )
            if bound:
                lines.append(f"bound: psycopg-sync {what} / {peer} = {bound}")
    return "\n".join(lines)
