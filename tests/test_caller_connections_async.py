"""Transactional enqueue on callers' async connections, with the real libraries.

For every kind of connection the docs promise, a unit of work (an order row and its
job) runs twice: committed, the order and the job exist and one worker wake-up is
sent; rolled back, neither exists and nobody is woken. Then the traps: SQLAlchemy's
lazy BEGIN, failed, closed or released connections, foreign codecs, the wrong colour
of connection and a schema that was never migrated.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from sqlalchemy import Integer, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from tortoise import Tortoise, fields
from tortoise.models import Model
from tortoise.transactions import in_transaction

from soniq import ConnectionStateError, SchemaNotReadyError, Soniq
from tests.caller_env import Env, Rollback, rollback_if

pytestmark = pytest.mark.timeout(30)

LINES = [{"sku": "caf\u00e9 \u2615", "qty": 2, "price": 3.5, "gift": None, "ok": True}]


async def send_invoice(order_id: int, lines: list[Any] | None = None) -> None:
    """The job every test enqueues (registered per test with the seed's options)."""


class Base(DeclarativeBase):
    pass


class Order(Base):
    """The seed's SQLAlchemy model; "app" is mapped to the test's schema."""

    __tablename__ = "orders"
    __table_args__ = {"schema": "app"}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[int] = mapped_column(Integer)


class TortoiseOrder(Model):
    """The seed's Tortoise model (found through the connection's search_path)."""

    id = fields.IntField(primary_key=True)
    product_id = fields.IntField(null=True)
    quantity = fields.IntField(null=True)

    class Meta:
        table = "orders"


@pytest.fixture
async def env(
    request: pytest.FixtureRequest, database_url: str, schema: str, pg: psycopg.Connection
) -> AsyncIterator[Env]:
    """Parametrize indirectly with "asyncpg" or "psycopg" to choose Soniq's driver."""
    setup = Soniq(database_url, schema=schema)
    await setup.ensure_initialized()
    await setup.close()
    pg.execute(
        f'CREATE TABLE "{schema}".orders (id serial PRIMARY KEY, total numeric, '
        "product_id int, quantity int)"
    )
    eq = Soniq(database_url, driver=getattr(request, "param", "asyncpg"), schema=schema)
    eq.job(queue="invoices", max_retries=5)(send_invoice)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "soniq:{schema}"')
        yield Env(database_url, schema, eq, pg, listener)
    await eq.close()


Work = Callable[[int, bool], Awaitable[object]]


async def check_atomic(
    env: Env, work: Work, *, soniq_pool: bool = False, orders: bool = True
) -> None:
    """Run ``work(order_id, fail)`` committed, then rolled back: the order, its job and
    one wake-up, or none of them. Soniq's own pool stays closed unless it was used."""
    await work(1, False)
    assert env.order_ids() == ([1] if orders else [])
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == ["invoices"]
    with pytest.raises(Rollback):
        await work(2, True)
    assert env.order_ids() == ([1] if orders else [])
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == []
    if not soniq_pool:
        assert env.eq.backend._pool is None


async def execute(conn: Any, sql: str, *args: Any) -> None:
    """``conn.execute`` on asyncpg (``$n``) or psycopg (``%s``) alike."""
    if isinstance(conn, psycopg.AsyncConnection):
        await conn.execute(re.sub(r"\$\d+", "%s", sql), args)
    else:
        await conn.execute(sql, *args)


# --- the seed's four patterns -------------------------------------------------------


@pytest.mark.parametrize("env", ["asyncpg", "psycopg"], indirect=True)
async def test_pattern1_soniq_pool(env: Env) -> None:
    eq, orders, total = env.eq, env.orders, 9.5

    async def create_order(order_id: int, fail: bool) -> None:
        await eq.ensure_initialized()
        async with eq.backend.acquire() as conn:  # noqa: SIM117  (the seed's shape)
            async with conn.transaction():
                await execute(
                    conn, f"INSERT INTO {orders} (id, total) VALUES ($1, $2)", order_id, total
                )
                await eq.enqueue(send_invoice, connection=conn, order_id=order_id)
                rollback_if(fail)

    await check_atomic(env, create_order, soniq_pool=True)


async def test_pattern2_own_asyncpg_pool(env: Env) -> None:
    eq = env.eq
    async with asyncpg.create_pool(env.url, min_size=1, max_size=2) as db_pool:

        async def create_order(product_id: int, fail: bool) -> None:
            quantity = 1
            async with db_pool.acquire() as conn:  # noqa: SIM117  (the seed's shape)
                async with conn.transaction():
                    order_id = await conn.fetchval(
                        f"INSERT INTO {env.orders} (product_id, quantity) VALUES ($1, $2) "
                        "RETURNING id",
                        product_id,
                        quantity,
                    )
                    await eq.enqueue(send_invoice, connection=conn, order_id=order_id)
                    rollback_if(fail)

        await check_atomic(env, create_order)


@pytest.fixture(params=["asyncpg", "psycopg"])
async def engine(request: pytest.FixtureRequest, env: Env) -> AsyncIterator[AsyncEngine]:
    """An async SQLAlchemy engine on each driver; the model's "app" schema is the test's."""
    url = env.url.replace("postgresql://", f"postgresql+{request.param}://", 1)
    engine = create_async_engine(
        url, execution_options={"schema_translate_map": {"app": env.schema}}
    )
    yield engine
    await engine.dispose()


async def test_pattern3_sqlalchemy_extracted_connection(env: Env, engine: AsyncEngine) -> None:
    """The seed's code as written; on psycopg the same chain yields its AsyncConnection."""
    eq = env.eq

    async def create_order(product_id: int, fail: bool) -> None:
        async with AsyncSession(engine) as db:  # noqa: SIM117  (the seed's shape)
            async with db.begin():
                order = Order(product_id=product_id, quantity=1)
                db.add(order)
                await db.flush()  # populate order.id without committing

                # Reach down to the raw asyncpg connection.
                raw_conn = await db.connection()
                asyncpg_conn = raw_conn.sync_connection.connection.driver_connection

                await eq.enqueue(send_invoice, connection=asyncpg_conn, order_id=order.id)
                rollback_if(fail)

    await check_atomic(env, create_order)


async def test_sqlalchemy_async_session_passed_as_is(env: Env, engine: AsyncEngine) -> None:
    async def create_order(order_id: int, fail: bool) -> None:
        async with AsyncSession(engine) as db, db.begin():
            db.add(Order(id=order_id, product_id=1, quantity=1))
            await db.flush()
            await env.eq.enqueue(send_invoice, connection=db, order_id=order_id)
            rollback_if(fail)

    await check_atomic(env, create_order)


@pytest.mark.parametrize("backend", ["asyncpg", "psycopg"])
@pytest.mark.parametrize("unwrap", [True, False], ids=["conn._connection", "conn"])
async def test_pattern4_tortoise(env: Env, backend: str, unwrap: bool) -> None:
    url = env.url.replace("postgresql://", f"{backend}://", 1) + f"?schema={env.schema}"
    # One connection name per backend: Tortoise caches its SQL per connection name.
    apps = {"models": {"models": [__name__], "default_connection": backend}}
    await Tortoise.init(config={"connections": {backend: url}, "apps": apps})
    try:

        async def create_order(order_id: int, fail: bool) -> None:
            async with in_transaction() as conn:
                order = await TortoiseOrder.create(using_db=conn, id=order_id, quantity=1)
                target = conn._connection if unwrap else conn
                await env.eq.enqueue(send_invoice, connection=target, order_id=order.id)
                rollback_if(fail)

        await check_atomic(env, create_order)
    finally:
        await Tortoise.close_connections()


@pytest.mark.parametrize("row_factory", [None, dict_row], ids=["tuple_row", "dict_row"])
async def test_raw_psycopg_async_connection(env: Env, row_factory: Any) -> None:
    options = {"row_factory": row_factory} if row_factory else {}
    async with await psycopg.AsyncConnection.connect(env.url, **options) as conn:

        async def create_order(order_id: int, fail: bool) -> None:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {env.orders} (id) VALUES (%s)", (order_id,))
                await env.eq.enqueue(send_invoice, connection=conn, order_id=order_id)
                rollback_if(fail)

        await check_atomic(env, create_order)


async def test_enqueue_many_on_a_callers_connection(env: Env) -> None:
    conn = await asyncpg.connect(env.url)
    try:
        with pytest.raises(Rollback):
            async with conn.transaction():
                await env.eq.enqueue_many(send_invoice, [{"order_id": 1}], connection=conn)
                raise Rollback
        assert env.jobs() == [] and env.wakeups() == []
        async with conn.transaction():
            ids = await env.eq.enqueue_many(
                send_invoice, [{"order_id": n} for n in range(3)], connection=conn
            )
        assert len(ids) == 3
        assert env.jobs() == [{"order_id": n} for n in range(3)]
        assert env.wakeups() == ["invoices"]  # one per call, not per job
    finally:
        await conn.close()


# --- outside a transaction block ------------------------------------------------------


async def test_asyncpg_outside_a_transaction_commits_at_once(env: Env) -> None:
    conn = await asyncpg.connect(env.url)
    try:
        await env.eq.enqueue(send_invoice, connection=conn, order_id=1)
        assert env.jobs() == [{"order_id": 1}]
        assert env.wakeups() == ["invoices"]
    finally:
        await conn.close()


async def test_psycopg_async_joins_the_implicit_transaction(env: Env) -> None:
    async with await psycopg.AsyncConnection.connect(env.url) as conn:
        await env.eq.enqueue(send_invoice, connection=conn, order_id=1)
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert env.jobs() == [] and env.wakeups() == []  # in flight: invisible, silent
        await conn.commit()
        assert env.jobs() == [{"order_id": 1}]
        assert env.wakeups() == ["invoices"]
        await env.eq.enqueue(send_invoice, connection=conn, order_id=2)
        await conn.rollback()
        assert env.jobs() == [{"order_id": 1}] and env.wakeups() == []


# --- traps --------------------------------------------------------------------------


async def test_sqlalchemy_begin_block_before_any_statement(env: Env, engine: AsyncEngine) -> None:
    """SQLAlchemy begins lazily (on asyncpg not even BEGIN is sent): the job, enqueued
    first, must still belong to the block's transaction."""

    async def create_order(order_id: int, fail: bool) -> None:
        async with AsyncSession(engine) as db, db.begin():
            await env.eq.enqueue(send_invoice, connection=db, order_id=order_id)
            db.add(Order(id=order_id, product_id=1, quantity=1))
            rollback_if(fail)

    await check_atomic(env, create_order)


@pytest.mark.parametrize("kind", ["AsyncConnection", "AsyncSession"])
async def test_sqlalchemy_commit_as_you_go(env: Env, engine: AsyncEngine, kind: str) -> None:
    """Outside begin() SQLAlchemy autobegins on the first statement, even when the
    enqueue is the only one: commit() keeps the job, closing without it drops it."""

    async def enqueue_only(order_id: int, fail: bool) -> None:
        opened = engine.connect() if kind == "AsyncConnection" else AsyncSession(engine)
        async with opened as conn:
            await env.eq.enqueue(send_invoice, connection=conn, order_id=order_id)
            rollback_if(fail)
            await conn.commit()

    await check_atomic(env, enqueue_only, orders=False)


async def test_asyncpg_savepoint_rolled_back_inside_a_committed_transaction(env: Env) -> None:
    conn = await asyncpg.connect(env.url)
    try:
        async with conn.transaction():
            await env.eq.enqueue(send_invoice, connection=conn, order_id=1)
            with pytest.raises(Rollback):
                async with conn.transaction():  # a savepoint
                    await env.eq.enqueue(send_invoice, connection=conn, order_id=2)
                    raise Rollback
    finally:
        await conn.close()
    assert env.jobs() == [{"order_id": 1}]
    assert env.wakeups() == ["invoices"]


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg"])
async def test_callers_search_path_is_not_trusted(env: Env, kind: str) -> None:
    """A caller's search_path may lead to another soniq_jobs table: ours is qualified."""
    decoy = f"{env.schema}_decoy"
    env.pg.execute(f"CREATE SCHEMA {decoy}; CREATE TABLE {decoy}.soniq_jobs (nothing int)")
    if kind == "asyncpg":
        conn: Any = await asyncpg.connect(env.url, server_settings={"search_path": decoy})
    else:
        conn = await psycopg.AsyncConnection.connect(env.url, options=f"-c search_path={decoy}")
    try:
        async with conn.transaction():
            await env.eq.enqueue(send_invoice, connection=conn, order_id=1)
    finally:
        await conn.close()
        env.pg.execute(f"DROP SCHEMA {decoy} CASCADE")
    assert env.jobs() == [{"order_id": 1}]


async def test_callers_asyncpg_pool_with_its_own_jsonb_codec(env: Env) -> None:
    async def json_codecs(conn: asyncpg.Connection) -> None:
        for kind in ("json", "jsonb"):
            await conn.set_type_codec(
                kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )

    pool = await asyncpg.create_pool(env.url, min_size=1, max_size=1, init=json_codecs)
    async with pool, pool.acquire() as conn, conn.transaction():
        job_id = await env.eq.enqueue(send_invoice, connection=conn, order_id=1, lines=LINES)
        assert await conn.fetchval("SELECT '{\"a\": 1}'::jsonb") == {"a": 1}  # theirs
    job = await env.eq.get_job(job_id)
    assert job is not None
    assert job.args == {"order_id": 1, "lines": LINES}


async def test_psycopg_transaction_in_error_is_refused_before_any_sql(env: Env) -> None:
    async with await psycopg.AsyncConnection.connect(env.url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1/0")
        with pytest.raises(ConnectionStateError, match="roll it back") as refused:
            await env.eq.enqueue(send_invoice, connection=conn, order_id=1)
        assert refused.value.__context__ is None  # no statement was sent and failed
        await conn.rollback()  # the caller can still recover
        await env.eq.enqueue(send_invoice, connection=conn, order_id=2)
        await conn.commit()
    assert env.jobs() == [{"order_id": 2}]


async def test_asyncpg_transaction_in_error(env: Env) -> None:
    conn = await asyncpg.connect(env.url)
    try:
        with pytest.raises(ConnectionStateError, match="roll it back"):
            async with conn.transaction():
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.execute("SELECT 1/0")
                await env.eq.enqueue(send_invoice, connection=conn, order_id=1)
        assert not conn.is_in_transaction()  # asyncpg's block rolled back as usual
    finally:
        await conn.close()
    assert env.jobs() == [] and env.wakeups() == []


async def test_closed_and_released_connections_are_refused(env: Env) -> None:
    conn = await asyncpg.connect(env.url)
    await conn.close()
    with pytest.raises(ConnectionStateError, match="closed"):
        await env.eq.enqueue(send_invoice, connection=conn, order_id=1)

    aconn = await psycopg.AsyncConnection.connect(env.url)
    await aconn.close()
    with pytest.raises(ConnectionStateError, match="closed"):
        await env.eq.enqueue(send_invoice, connection=aconn, order_id=1)

    async with asyncpg.create_pool(env.url, min_size=1, max_size=1) as pool:
        async with pool.acquire() as released:
            pass
        with pytest.raises(ConnectionStateError, match="released"):
            await env.eq.enqueue(send_invoice, connection=released, order_id=1)
    assert env.jobs() == []


async def test_wrong_colour_of_connection_names_the_fix(env: Env) -> None:
    eq = env.eq
    with psycopg.connect(env.url) as sync_conn:
        with pytest.raises(TypeError, match=r"eq\.sync\.enqueue"):
            await eq.enqueue(send_invoice, connection=sync_conn, order_id=1)
        assert sync_conn.info.transaction_status == TransactionStatus.IDLE  # untouched
    sync_engine = create_engine(env.url.replace("postgresql://", "postgresql+psycopg://", 1))
    with Session(sync_engine) as session, pytest.raises(TypeError, match=r"eq\.sync\.enqueue"):
        await eq.enqueue(send_invoice, connection=session, order_id=1)
    sync_engine.dispose()

    conn = await asyncpg.connect(env.url)
    aconn = await psycopg.AsyncConnection.connect(env.url)
    async_engine = create_async_engine(env.url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with AsyncSession(async_engine) as db:
            for wrong in (conn, aconn, db):
                with pytest.raises(TypeError, match=r"await eq\.enqueue"):
                    eq.sync.enqueue(send_invoice, connection=wrong, order_id=1)
        with pytest.raises(TypeError, match="expected"):
            await eq.enqueue(send_invoice, connection="postgresql://nope", order_id=1)
    finally:
        await conn.close()
        await aconn.close()
        await async_engine.dispose()
    assert env.jobs() == []


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg"])
async def test_missing_schema_says_to_migrate(
    database_url: str, schema: str, pg: psycopg.Connection, kind: str
) -> None:
    """On a caller's connection Soniq never migrates (no DDL in their transaction) and
    never opens its own pool: a schema that was never migrated is a clear error."""
    eq = Soniq(database_url, schema=schema)
    eq.job(send_invoice)
    if kind == "asyncpg":
        conn: Any = await asyncpg.connect(database_url)
    else:
        conn = await psycopg.AsyncConnection.connect(database_url)
    try:
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            await eq.enqueue(send_invoice, connection=conn, order_id=1)
    finally:
        await conn.close()
    assert eq.backend._pool is None
    assert pg.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone() == (None,)
    await eq.close()
