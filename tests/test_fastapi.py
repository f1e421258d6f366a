"""``soniq.contrib.starlette`` / ``soniq.contrib.fastapi`` on real PostgreSQL: the
lifespan (opens and migrates, wraps the app's own lifespan and passes its state on,
closes even when that lifespan fails), the transaction (committed on success, rolled
back on an exception, on asyncpg and psycopg), the FastAPI dependency (rolls back on
``HTTPException``, commits *before* the response starts), and the example app of
``examples/fastapi_app`` end to end with ``soniq worker shop_api:eq --burst``."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient
from psycopg import sql

from soniq import Soniq
from soniq.contrib.fastapi import lifespan, transaction, transaction_dependency
from tests.conftest import ROOT, soniq_command

pytestmark = pytest.mark.timeout(120)

EXAMPLE = ROOT / "examples" / "fastapi_app"


def _jobs_table_exists(pg: psycopg.Connection[Any], schema: str) -> bool:
    found = pg.execute("SELECT to_regclass(%s)", (f'"{schema}".soniq_jobs',)).fetchone()
    return found is not None and found[0] is not None


def _job_count(pg: psycopg.Connection[Any], schema: str, job_id: int | None = None) -> int:
    query = sql.SQL("SELECT count(*) FROM {}.soniq_jobs").format(sql.Identifier(schema))
    if job_id is not None:
        query += sql.SQL(" WHERE id = {}").format(sql.Literal(job_id))
    row = pg.execute(query).fetchone()
    assert row is not None
    return int(row[0])


# -- lifespan -------------------------------------------------------------------------


async def test_lifespan_opens_soniq_around_the_apps_own_and_closes_it(
    database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    eq = Soniq(database_url, schema=schema)
    events: list[str] = []
    real_close = eq.close

    async def close() -> None:
        events.append("soniq closed")
        await real_close()

    eq.close = close  # type: ignore[method-assign]

    @contextlib.asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[dict[str, str]]:
        # Soniq is open and migrated when the app's own lifespan starts.
        events.append(f"app start, migrated={_jobs_table_exists(pg, schema)}")
        yield {"greeting": "hello"}
        events.append("app stop")

    assert not _jobs_table_exists(pg, schema)
    async with lifespan(eq, app_lifespan)(object()) as state:
        assert state == {"greeting": "hello"}  # the app's state, passed on
        assert await eq.get_job(1) is None  # open: its pool answers
    assert events == ["app start, migrated=True", "app stop", "soniq closed"]

    # Without an app lifespan: no state; migrate=False on a migrated schema is fine.
    async with lifespan(eq, migrate=False)(object()) as state:
        assert state is None


async def test_lifespan_closes_soniq_when_the_apps_lifespan_fails(
    database_url: str, schema: str
) -> None:
    eq = Soniq(database_url, schema=schema)
    closed: list[bool] = []
    real_close = eq.close

    async def close() -> None:
        closed.append(True)
        await real_close()

    eq.close = close  # type: ignore[method-assign]

    @contextlib.asynccontextmanager
    async def broken(app: object) -> AsyncIterator[None]:
        raise RuntimeError("no config")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError, match="no config"):
        async with lifespan(eq, broken)(object()):
            pass  # pragma: no cover
    assert closed == [True]


async def test_lifespan_without_migrate_refuses_a_schema_not_migrated(
    database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    eq = Soniq(database_url, schema=schema)
    with pytest.raises(Exception, match="migrate"):
        async with lifespan(eq, migrate=False)(object()):
            pass  # pragma: no cover
    assert not _jobs_table_exists(pg, schema)


# -- transaction ----------------------------------------------------------------------


async def test_transaction_commits_or_rolls_back_with_the_block(
    eq: Soniq, schema: str, pg: psycopg.Connection[Any]
) -> None:
    @eq.job(name="api.noop")
    async def noop() -> None:
        pass

    async with transaction(eq) as conn:
        kept = await eq.enqueue(noop, connection=conn)
        assert _job_count(pg, schema, kept) == 0  # not committed yet
    assert _job_count(pg, schema, kept) == 1

    with pytest.raises(ValueError, match="changed my mind"):
        async with transaction(eq) as conn:
            dropped = await eq.enqueue(noop, connection=conn)
            raise ValueError("changed my mind")
    assert _job_count(pg, schema, dropped) == 0
    assert await eq.get_job(dropped) is None


# -- the FastAPI dependency -----------------------------------------------------------


def _orders_app(eq: Soniq) -> FastAPI:
    """An app whose POST /enqueue?fail=... enqueues on the dependency's connection,
    then fails when asked."""
    app = FastAPI(lifespan=lifespan(eq))
    tx = transaction_dependency(eq)  # (a local: no Annotated alias, annotations are strings)

    @eq.job(name="api.ship")
    async def ship(n: int) -> None:
        pass

    async def same_connection(conn: Any = tx) -> Any:
        return conn

    also_tx = Depends(same_connection)

    @app.post("/enqueue")
    async def enqueue(
        n: int, fail: str = "", conn: Any = tx, also: Any = also_tx
    ) -> dict[str, int]:
        assert also is conn  # one transaction per request, however many ask for it
        job_id = await eq.enqueue(ship, connection=conn, n=n)
        app.state.last_id = job_id
        if fail == "http":
            raise HTTPException(409, "conflict after enqueue")
        if fail == "error":
            raise RuntimeError("bug after enqueue")
        return {"id": job_id}

    return app


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_the_dependency_commits_a_route_that_returns_and_rolls_back_one_that_raises(
    driver: str, database_url: str, schema: str, pg: psycopg.Connection[Any]
) -> None:
    # A Soniq not opened yet: the TestClient's lifespan opens it on the client's loop.
    app = _orders_app(Soniq(database_url, driver=driver, schema=schema))
    with TestClient(app, raise_server_exceptions=False) as client:
        ok = client.post("/enqueue", params={"n": 1})
        assert ok.status_code == 200
        assert _job_count(pg, schema, ok.json()["id"]) == 1

        conflict = client.post("/enqueue", params={"n": 2, "fail": "http"})
        assert conflict.status_code == 409
        assert _job_count(pg, schema, app.state.last_id) == 0

        crashed = client.post("/enqueue", params={"n": 3, "fail": "error"})
        assert crashed.status_code == 500
        assert _job_count(pg, schema, app.state.last_id) == 0
    assert _job_count(pg, schema) == 1


async def test_the_dependency_commits_before_the_response_starts(
    eq: Soniq, schema: str, pg: psycopg.Connection[Any]
) -> None:
    app = _orders_app(eq)
    committed_at_start: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            # What another session (a worker) sees when the client learns of success.
            committed_at_start.append(_job_count(pg, schema, app.state.last_id))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/enqueue",
        "raw_path": b"/enqueue",
        "query_string": b"n=1",
        "root_path": "",
        "headers": [],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    assert committed_at_start == [1]


# -- the example app ------------------------------------------------------------------


@pytest.fixture
def shop_api(fresh_database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's ``shop_api`` module, imported on ``fresh_database``."""
    monkeypatch.setenv("DATABASE_URL", fresh_database)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("shop_api", None)
    yield importlib.import_module("shop_api")
    sys.modules.pop("shop_api", None)


@pytest.mark.slow
def test_example_app_enqueues_with_the_order_and_its_worker_runs_it(
    shop_api: Any, fresh_database: str
) -> None:
    with TestClient(shop_api.app) as client:
        created = client.post("/orders", json={"email": "ada@example.com", "quantity": 2})
        assert created.status_code == 201, created.text
        order_id = created.json()["order_id"]
        refused = client.post("/orders", json={"email": "bob@example.com", "quantity": 50})
        assert refused.status_code == 422

        with psycopg.connect(fresh_database, autocommit=True) as conn:
            orders = conn.execute("SELECT id, email FROM api_orders ORDER BY id").fetchall()
            jobs = conn.execute("SELECT name, args, status FROM soniq_jobs ORDER BY id").fetchall()
        # The refused order rolled back, and its job with it.
        assert orders == [(order_id, "ada@example.com")]
        assert jobs == [("shop_api.send_confirmation", {"order_id": order_id}, "queued")]
        assert client.get(f"/orders/{order_id}").json()["confirmed"] is False

        # The worker of the README, as a process.
        done = subprocess.run(
            [*soniq_command(), "worker", "shop_api:eq", "--burst", "--burst-wait", "0"],
            cwd=EXAMPLE,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert client.get(f"/orders/{order_id}").json()["confirmed"] is True
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        assert conn.execute("SELECT status FROM soniq_jobs").fetchall() == [("done",)]


async def test_example_app_on_the_tests_loop_as_docs_fastapi_md_shows(
    shop_api: Any, fresh_database: str
) -> None:
    import httpx

    app, eq = shop_api.app, shop_api.eq
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            created = await client.post("/orders", json={"email": "ada@example.com", "quantity": 2})
            refused = await client.post(
                "/orders", json={"email": "bob@example.com", "quantity": 50}
            )
            assert created.status_code == 201 and refused.status_code == 422
            await eq.run_worker(burst=True)
            order = await client.get(f"/orders/{created.json()['order_id']}")
            assert order.json()["confirmed"] is True
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM api_orders").fetchall() == [(1,)]
        assert conn.execute("SELECT status FROM soniq_jobs").fetchall() == [("done",)]


# -- docs/fastapi.md ------------------------------------------------------------------


def python_blocks(doc: Path) -> list[tuple[str, str]]:
    """Each ```python block of ``doc``: the line before it (its marker) and its code."""
    lines = doc.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() == "```python":
            end = lines.index("```", i + 1)
            blocks.append((lines[i - 1].strip(), "\n".join(lines[i + 1 : end])))
    return blocks


def check_excerpts(doc: Path) -> int:
    """Every python block of ``doc`` is a verbatim excerpt of the file its marker
    names, or says why it is not run; the number of excerpts."""
    excerpts = 0
    for marker, code in python_blocks(doc):
        if marker.startswith("<!-- excerpt: ") and marker.endswith(" -->"):
            path = ROOT / marker.removeprefix("<!-- excerpt: ").removesuffix(" -->")
            assert code in path.read_text(), f"{doc.name}: not a part of {path}:\n{code}"
            excerpts += 1
        else:
            assert marker.startswith("<!-- not run: "), f"{doc.name}: unmarked block:\n{code}"
    return excerpts


def test_docs_fastapi_md_shows_the_example_as_it_is() -> None:
    assert check_excerpts(ROOT / "docs" / "fastapi.md") >= 4
