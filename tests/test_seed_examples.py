"""Every example of the seed documentation runs as written, through FastAPI, with the
connection type it names: the order row and its job commit together, or neither does.

The ``orders`` table has a deferred foreign key to ``products``: ordering an unknown
product lets the INSERT and the enqueue succeed and fails at COMMIT, after the job row
was written on the caller's connection. That job must vanish with the order.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest

PATTERNS = [
    "pattern1_soniq_pool",
    "pattern2_own_pool",
    "pattern3_sqlalchemy",
    "pattern4_tortoise",
]


@pytest.fixture
def orders_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[psycopg.Connection]:
    """The seed's ``orders`` table in ``public`` (the seed uses the default schema)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    with psycopg.connect(database_url, autocommit=True) as pg:
        # Soniq's tables in public, whichever exist (a fresh schema for the seed's code).
        soniq_tables = pg.execute(
            "SELECT string_agg(format('public.%I', tablename), ', ') FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename LIKE 'soniq\\_%'"
        ).fetchone()
        pg.execute(f"DROP TABLE IF EXISTS orders, products, {soniq_tables[0] or 'orders'}")
        pg.execute(
            "CREATE TABLE products (id int PRIMARY KEY); INSERT INTO products VALUES (1);"
            "CREATE TABLE orders (id serial PRIMARY KEY, quantity int NOT NULL,"
            " product_id int NOT NULL REFERENCES products DEFERRABLE INITIALLY DEFERRED)"
        )
        yield pg
        pg.execute("DROP TABLE IF EXISTS orders, products")


def load(pattern: str) -> Any:
    name = f"tests.seed_examples.{pattern}"
    sys.modules.pop(name, None)  # fresh module: a fresh Soniq bound to this test's loop
    return importlib.import_module(name)


@pytest.fixture(params=PATTERNS)
async def example(
    request: pytest.FixtureRequest, orders_db: psycopg.Connection, database_url: str
) -> AsyncIterator[Any]:
    module = load(request.param)
    await module.eq.ensure_initialized()  # pattern 1 does this per request; the others
    if request.param == "pattern4_tortoise":  # need the table before the first request
        from tortoise import Tortoise

        await Tortoise.init(
            db_url=database_url.replace("postgresql://", "asyncpg://", 1),
            modules={"models": [module.__name__]},
        )
    try:
        async with module.app.router.lifespan_context(module.app):
            yield module
    finally:
        if request.param == "pattern4_tortoise":
            from tortoise import Tortoise

            await Tortoise.close_connections()
        if request.param == "pattern3_sqlalchemy":
            await module.engine.dispose()
        if request.param == "pattern2_own_pool":
            await module.db_pool.close()
        await module.eq.close()


async def post_order(module: Any, product_id: int) -> httpx.Response:
    transport = httpx.ASGITransport(app=module.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://seed") as client:
        return await client.post("/orders", params={"product_id": product_id, "quantity": 2})


def jobs(pg: psycopg.Connection) -> list[tuple[str, dict[str, Any]]]:
    return pg.execute("SELECT queue, args FROM public.soniq_jobs ORDER BY id").fetchall()


@pytest.mark.timeout(60)
async def test_commit_enqueues_the_job_with_the_order(
    example: Any, orders_db: psycopg.Connection
) -> None:
    response = await post_order(example, product_id=1)
    assert response.status_code == 200
    (order_id,) = orders_db.execute("SELECT id FROM orders").fetchone() or (None,)
    assert order_id is not None
    assert jobs(orders_db) == [("invoices", {"order_id": order_id})]


@pytest.mark.timeout(60)
async def test_failed_commit_takes_the_job_with_it(
    example: Any, orders_db: psycopg.Connection
) -> None:
    with pytest.raises(Exception, match=r"foreign key|ForeignKey|violates"):
        await post_order(example, product_id=404)  # fails at COMMIT, after the enqueue
    assert orders_db.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert jobs(orders_db) == []
