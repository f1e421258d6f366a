"""A connection lent by ``eq.backend.acquire()`` / ``eq.sync.backend.acquire()`` comes
back clean: with ``pool_size=1`` the next borrower gets the same server session and
sees nothing of the previous borrower's (settings, LISTENs, an open transaction,
advisory locks, temporary tables), on asyncpg, psycopg async and the sync twin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from soniq import Soniq
from tests.conftest import new_soniq

PROBE = """
SELECT pg_backend_pid(),
       current_setting('application_name'),
       current_setting('statement_timeout'),
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_class WHERE relpersistence = 't'
            AND relnamespace = pg_my_temp_schema())
"""

DIRTY = [
    "SET application_name = 'borrower one'",
    "SET statement_timeout = '123s'",
    "LISTEN borrower_one",
    "SELECT pg_advisory_lock(4242)",
    "CREATE TEMP TABLE borrower_one_scratch (x int)",
]


@pytest.fixture(params=["asyncpg", "psycopg"])
async def lone(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Soniq]:
    """A migrated Soniq whose pool has one connection (``pool_size=1``), on each async
    driver (``@pytest.mark.parametrize("lone", [...], indirect=True)`` narrows it)."""
    eq = new_soniq(request.param, request, tmp_path, pool_size=1)
    await eq.ensure_initialized()
    yield eq
    await eq.close()


@pytest.fixture
def lone_sync(database_url: str, schema: str) -> Iterator[Soniq]:
    eq = Soniq(database_url, schema=schema, pool_size=1)
    eq.sync.ensure_initialized()
    yield eq
    eq.sync.close()


def _assert_clean(row: tuple[object, ...] | None, pid: int) -> None:
    assert row is not None
    assert row[0] == pid, "the pool lent another session: the test proves nothing"
    assert row[1] != "borrower one"
    assert row[2] == "0"  # statement_timeout back to the server's default
    assert row[3:] == (0, 0, 0), row


async def _fetchrow(conn: object, sql: str) -> tuple[object, ...]:
    if isinstance(conn, psycopg.AsyncConnection):
        cur = await conn.execute(sql)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)
    return tuple(await conn.fetchrow(sql))  # type: ignore[attr-defined]


async def test_the_next_borrower_sees_a_clean_session(lone: Soniq) -> None:
    async with lone.backend.acquire() as conn:
        pid = (await _fetchrow(conn, "SELECT pg_backend_pid()"))[0]
        for statement in DIRTY:
            await conn.execute(statement)
        # ... and leaves a transaction open, with a lock of its own in it.
        if isinstance(conn, psycopg.AsyncConnection):
            await conn.set_autocommit(False)
            await conn.execute("SELECT pg_advisory_xact_lock(4343)")
        else:
            await conn.execute("BEGIN; SELECT pg_advisory_xact_lock(4343)")
    async with lone.backend.acquire() as conn:
        _assert_clean(await _fetchrow(conn, PROBE), pid)
        if isinstance(conn, psycopg.AsyncConnection):
            assert conn.autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        else:
            assert not conn.is_in_transaction()

    # Soniq's own statements run on that session afterwards, as before.
    @lone.job(name="after_lending")
    async def after_lending() -> None: ...

    job_id = await lone.enqueue(after_lending)
    assert (await lone.get_job(job_id)) is not None


@pytest.mark.parametrize("lone", ["psycopg"], indirect=True)
async def test_a_psycopg_borrowers_python_side_options_are_undone(lone: Soniq) -> None:
    """What psycopg keeps on the connection object (row factory, isolation, read
    only, prepared-statement threshold, unread notifications) does not reach the next
    borrower either."""
    from psycopg.rows import dict_row, tuple_row

    async with lone.backend.acquire() as conn:
        conn.row_factory = dict_row
        conn.prepare_threshold = None
        await conn.set_autocommit(False)
        await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
        await conn.set_read_only(True)
        await conn.execute("LISTEN borrower_one")
        await conn.commit()
        await conn.execute("NOTIFY borrower_one, 'stale'")
        await conn.commit()  # the notification now waits in psycopg's backlog
    async with lone.backend.acquire() as conn:
        assert conn.row_factory is tuple_row
        assert conn.prepare_threshold == 5
        assert conn.autocommit and conn.read_only is None and conn.isolation_level is None
        await conn.execute("LISTEN borrower_two")
        stale = [n async for n in conn.notifies(timeout=0.05)]
        assert stale == []


@pytest.mark.parametrize("lone", ["psycopg"], indirect=True)
async def test_prepared_statements_survive_the_reset(lone: Soniq) -> None:
    """The reset keeps the server's prepared statements, so Soniq's statements
    (prepared by psycopg after a few runs) keep working on a connection that was
    lent."""

    @lone.job(name="prepared")
    async def prepared() -> None: ...

    for _ in range(8):  # past psycopg's prepare_threshold (5)
        await lone.get_job(await lone.enqueue(prepared))
    async with lone.backend.acquire() as conn:
        names = await (await conn.execute("SELECT count(*) FROM pg_prepared_statements")).fetchone()
        assert names is not None and names[0] > 0, "nothing was prepared: the test proves nothing"
    for _ in range(8):
        assert (await lone.get_job(await lone.enqueue(prepared))) is not None


@pytest.mark.parametrize("lone", ["psycopg"], indirect=True)
async def test_a_borrower_that_prepares_can_borrow_again(lone: Soniq) -> None:
    """Found by the benchmark's transactional case: a borrower whose own queries get
    prepared (past psycopg's threshold), lent the same connection again and again,
    must not be handed psycopg names the reset dropped on the server
    ("prepared statement _pg3_1 does not exist")."""
    for loan in range(4):
        async with lone.backend.acquire() as conn:
            for _ in range(8):  # past psycopg's prepare_threshold (5)
                cur = await conn.execute("SELECT %s::int + 1", (loan,))
                assert await cur.fetchone() == (loan + 1,)
    # The benchmark's pattern: one statement and an enqueue per loan, in a
    # transaction, loan after loan.
    for loan in range(20):
        async with lone.backend.acquire() as conn, conn.transaction():
            cur = await conn.execute("SELECT %s::int + 1", (loan,))
            assert await cur.fetchone() == (loan + 1,)
            await lone.enqueue("lent.job", connection=conn, n=loan)


def test_a_sync_borrower_that_prepares_can_borrow_again(lone_sync: Soniq) -> None:
    for loan in range(4):
        with lone_sync.sync.backend.acquire() as conn:
            for _ in range(8):
                assert conn.execute("SELECT %s::int + 1", (loan,)).fetchone() == (loan + 1,)
    for loan in range(20):
        with lone_sync.sync.backend.acquire() as conn, conn.transaction():
            assert conn.execute("SELECT %s::int + 1", (loan,)).fetchone() == (loan + 1,)
            lone_sync.sync.enqueue("lent.job", connection=conn, n=loan)


def test_the_sync_twin_lends_clean_sessions(lone_sync: Soniq) -> None:
    from psycopg.rows import dict_row, tuple_row

    with lone_sync.sync.backend.acquire() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for statement in DIRTY:
            conn.execute(statement)
        conn.row_factory = dict_row
        conn.set_autocommit(False)
        conn.execute("SELECT pg_advisory_xact_lock(4343)")  # a transaction left open
    with lone_sync.sync.backend.acquire() as conn:
        assert conn.row_factory is tuple_row and conn.autocommit
        _assert_clean(conn.execute(PROBE).fetchone(), pid)

    @lone_sync.job(name="after_lending_sync")
    def after_lending_sync() -> None: ...

    job_id = lone_sync.sync.enqueue(after_lending_sync)
    assert lone_sync.sync.get_job(job_id) is not None


def test_a_borrower_that_breaks_the_session_gets_it_replaced(lone_sync: Soniq) -> None:
    """A connection that cannot be reset (its backend was terminated under the
    borrower) is closed, not lent again; the pool makes a new one."""
    with lone_sync.sync.backend.acquire() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(lone_sync.sync.backend.dsn, autocommit=True) as other:  # type: ignore[attr-defined]
            # Waits (up to 5 s, PostgreSQL 14+) for the backend to exit: the next
            # checkout cannot race its end.
            ended = other.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
            assert ended == (True,), "the backend did not exit within 5 s"
    with lone_sync.sync.backend.acquire() as conn:
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_a_pool_opened_on_another_loop_closes_without_error(
    driver: str, database_url: str, schema: str
) -> None:
    """A Soniq opened on one event loop (a test fixture's, an app's earlier lifespan)
    and closed on another: its pool's connections cannot be awaited there; close()
    lets them go and raises nothing, and the Soniq opens a new pool on the new loop."""
    eq = Soniq(database_url, schema=schema, driver=driver)

    async def open_and_enqueue() -> int:
        await eq.ensure_initialized()
        return await eq.enqueue("lent.job", n=1)

    first = asyncio.run(open_and_enqueue())

    async def close_then_use() -> int:
        await asyncio.wait_for(eq.close(), 10)
        second = await eq.enqueue("lent.job", n=2)
        await eq.close()
        return second

    assert asyncio.run(close_then_use()) > first
