"""The public API for enqueue and inspection, identical on every driver and on the
sync twin: one suite, parametrized, so the colours cannot drift apart."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from soniq import (
    ConfigurationError,
    JobArgumentsError,
    JobStatus,
    SchemaNotReadyError,
    SerializationError,
    Soniq,
    UnknownJobError,
)
from tests.conftest import new_soniq

UTC = dt.timezone.utc


class Api:
    """Soniq's async API or its sync twin behind one awaitable interface."""

    def __init__(self, eq: Soniq, colour: str) -> None:
        self.eq, self.colour = eq, colour

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.colour == "sync":
            return getattr(self.eq.sync, method)(*args, **kwargs)
        return await getattr(self.eq, method)(*args, **kwargs)


#: Each backend through the async API, and PostgreSQL and SQLite through eq.sync too.
API_BACKENDS = ["asyncpg", "psycopg", "sync", "sqlite", "sqlite-sync", "memory", "memory-sync"]


@pytest.fixture(params=API_BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    backend, _, colour = request.param.partition("-")
    if backend == "sync":
        backend, colour = "psycopg", "sync"
    eq = new_soniq(backend, request, tmp_path)
    api = Api(eq, colour or "async")
    await api.call("ensure_initialized")
    yield api
    await eq.close()


def register(eq: Soniq) -> Any:
    @eq.job(queue="invoices", max_retries=5, priority=1)
    async def send_invoice(order_id: int, note: str = "") -> None: ...

    return send_invoice


async def test_enqueue_stores_the_job(api: Api) -> None:
    job = register(api.eq)
    job_id = await api.call("enqueue", job, order_id=7, note="hi")
    stored = await api.call("get_job", job_id)
    assert stored.id == job_id
    assert stored.name == f"{__name__}.register.<locals>.send_invoice"
    assert (stored.queue, stored.args, stored.status) == (
        "invoices",
        {"order_id": 7, "note": "hi"},
        JobStatus.QUEUED,
    )
    assert (stored.priority, stored.max_retries, stored.attempts) == (1, 5, 0)
    assert stored.created_at.tzinfo is not None and stored.run_at <= dt.datetime.now(UTC)
    assert await api.call("get_job", job_id + 1000) is None


async def test_options_are_stored_on_the_row(api: Api) -> None:
    job = register(api.eq)
    when = dt.datetime(2031, 5, 1, 12, 0, tzinfo=UTC)
    scheduled = await api.call(
        "enqueue",
        job,
        order_id=1,
        queue="other",
        priority=-3,
        run_at=when,
        max_retries=0,
        timeout=2.5,
    )
    stored = await api.call("get_job", scheduled)
    assert (stored.queue, stored.priority, stored.run_at, stored.max_retries, stored.timeout) == (
        "other",
        -3,
        when,
        0,
        2.5,
    )
    before = dt.datetime.now(UTC)
    delayed = await api.call("get_job", await api.call("enqueue", job, order_id=2, delay=3600))
    assert before + dt.timedelta(minutes=59) < delayed.run_at < before + dt.timedelta(minutes=61)


async def test_enqueue_many_returns_ids_in_input_order(api: Api) -> None:
    job = register(api.eq)
    ids = await api.call("enqueue_many", job, [{"order_id": n} for n in range(300)], priority=9)
    assert len(ids) == 300 and len(set(ids)) == 300
    stored = [await api.call("get_job", i) for i in ids]
    assert [j.args["order_id"] for j in stored] == list(range(300))
    assert {j.priority for j in stored} == {9}
    assert await api.call("enqueue_many", job, []) == []


async def test_enqueue_by_name(api: Api) -> None:
    register(api.eq)
    name = f"{__name__}.register.<locals>.send_invoice"
    job = await api.call("get_job", await api.call("enqueue", name, order_id=3))
    assert job.queue == "invoices"  # the registered defaults apply
    with pytest.raises(JobArgumentsError, match="order_id"):
        await api.call("enqueue", name, wrong=1)
    # A name this process does not know: stored as given, validated by the worker.
    unknown = await api.call("get_job", await api.call("enqueue", "other.app.job", x=1))
    assert (unknown.name, unknown.queue, unknown.args) == ("other.app.job", "default", {"x": 1})


async def test_dedupe_key_returns_the_existing_job(api: Api) -> None:
    job = register(api.eq)
    first = await api.call("enqueue", job, order_id=1, dedupe_key="order-1")
    again = await api.call("enqueue", job, order_id=99, dedupe_key="order-1")
    assert again == first
    assert (await api.call("get_job", first)).args == {"order_id": 1}  # not overwritten
    # Once the job is finished (here: cancelled) the key is free again.
    assert await api.call("cancel_job", first) is True
    third = await api.call("enqueue", job, order_id=1, dedupe_key="order-1")
    assert third != first


async def test_cancel_job(api: Api) -> None:
    job = register(api.eq)
    queued = await api.call("enqueue", job, order_id=1)
    assert await api.call("cancel_job", queued) is True
    cancelled = await api.call("get_job", queued)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.finished_at is not None
    assert await api.call("cancel_job", queued) is False  # already finished
    assert await api.call("cancel_job", 10**12) is False  # unknown
    # A running job: the request is recorded, the status waits for its worker.
    running = await api.call("enqueue", job, order_id=2)
    claimed = await api.eq.backend.claim_jobs(1, "a-worker", None)
    assert [c.id for c in claimed] == [running]
    assert await api.call("cancel_job", running) is True
    requested = await api.call("get_job", running)
    assert requested.status == JobStatus.RUNNING and requested.cancel_requested is True


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"order_id": math.nan}, SerializationError),
        ({"order_id": 1, "note": "nul\x00"}, SerializationError),
        ({"order_id": 1, "run_at": dt.datetime(2030, 1, 1)}, ValueError),
        ({"order_id": 1, "delay": -5}, ValueError),
        ({"note": "no order id"}, JobArgumentsError),
        ({"order_id": 1, "surprise": True}, JobArgumentsError),
    ],
)
async def test_bad_input_writes_nothing(
    api: Api, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    job = register(api.eq)
    with pytest.raises(error):
        await api.call("enqueue", job, **kwargs)
    options = {k: v for k, v in kwargs.items() if k in ("run_at", "delay")}
    arguments = {k: v for k, v in kwargs.items() if k not in options}
    with pytest.raises(error):
        await api.call("enqueue_many", job, [{"order_id": 1}, arguments], **options)
    # Nothing reached the database, not even an id: the first good job gets id 1.
    assert await api.call("enqueue", job, order_id=1) == 1


async def test_enqueue_many_input_shape(api: Api) -> None:
    job = register(api.eq)
    with pytest.raises(TypeError, match="list of argument mappings"):
        await api.call("enqueue_many", job, {"order_id": 1})
    with pytest.raises(TypeError, match="index 1"):
        await api.call("enqueue_many", job, [{"order_id": 1}, 2])
    with pytest.raises(TypeError, match="order_id is not an option"):
        await api.call("enqueue_many", job, [{}], order_id=1)


async def test_a_function_of_another_soniq_is_refused(api: Api, database_url: str) -> None:
    other = Soniq(database_url)

    @other.job
    def elsewhere() -> None: ...

    with pytest.raises(UnknownJobError, match="not registered with this Soniq"):
        await api.call("enqueue", elsewhere)


async def test_missing_schema_says_to_migrate(database_url: str) -> None:
    eq = Soniq(database_url, schema="never_migrated")

    @eq.job
    def job() -> None: ...

    try:
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            await eq.enqueue(job)
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            await eq.ensure_initialized(migrate=False)
        with pytest.raises(SchemaNotReadyError, match="soniq migrate"):
            eq.sync.enqueue(job)
    finally:
        await eq.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"database_url": "mysql://localhost/db"}, "scheme 'mysql'"),
        ({"database_url": "localhost/db"}, "must look like postgresql://"),
        ({"database_url": "postgresql://h:notaport/db"}, "malformed"),
        ({"database_url": "postgresql://h/db", "driver": "pg8000"}, "driver must be"),
        ({"database_url": "postgresql+asyncpg://h/db", "driver": "psycopg"}, "contradicts"),
        ({"database_url": "postgresql://h/db", "schema": ""}, "schema"),
        ({"database_url": "postgresql://h/db", "pool_size": 0}, "pool_size"),
        ({"database_url": "sqlite://jobs.db"}, "sqlite:///relative"),
        ({"database_url": "memory://named"}, "memory://"),
        ({"database_url": "memory://", "driver": "asyncpg"}, "applies to PostgreSQL"),
        ({"database_url": "sqlite:///x.db", "schema": "jobs"}, "applies to PostgreSQL"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Soniq(**kwargs)


def test_no_url_at_all_means_the_embedded_sqlite_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SONIQ_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    eq = Soniq()
    assert eq.backend.name == "sqlite"


async def test_constructor_does_no_io_and_driver_follows_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing listens on port 1: construction must still succeed.
    assert Soniq("postgresql://nobody@127.0.0.1:1/none").backend.name == "asyncpg"
    assert Soniq("postgresql+psycopg://127.0.0.1:1/none").backend.name == "psycopg"
    monkeypatch.setenv("SONIQ_DATABASE_URL", "postgresql+psycopg://127.0.0.1:1/none")
    assert Soniq().backend.name == "psycopg"


async def test_pool_is_bound_to_the_loop(database_url: str, schema: str) -> None:
    """A second event loop gets a new pool instead of the first loop's dead one."""
    import asyncio
    import threading

    eq = Soniq(database_url, schema=schema)
    await eq.ensure_initialized()
    register(eq)
    first_pool = eq.backend._pool  # type: ignore[attr-defined]
    result: list[int] = []

    def other_loop() -> None:
        async def go() -> None:
            result.append(
                await eq.enqueue(f"{__name__}.register.<locals>.send_invoice", order_id=1)
            )
            await eq.backend.close()

        asyncio.run(go())

    thread = threading.Thread(target=other_loop)
    thread.start()
    thread.join(30)
    assert result and (await eq.get_job(result[0])) is not None
    assert eq.backend._pool is not first_pool  # type: ignore[attr-defined]
    await eq.close()


@pytest.mark.timeout(60)
def test_pool_is_recreated_after_fork(sync_eq: Soniq) -> None:
    register(sync_eq)
    name = f"{__name__}.register.<locals>.send_invoice"
    parent_id = sync_eq.sync.enqueue(name, order_id=1)  # the parent's pool is open now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's sockets
        try:
            child_id = sync_eq.sync.enqueue(name, order_id=2)
            os.write(write, str(child_id).encode())
            sync_eq.sync.close()
        finally:
            os._exit(0)
    os.close(write)
    child_id = int(os.read(read, 64).decode())
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    # The parent's pool survived the child's exit and both jobs exist.
    assert sync_eq.sync.get_job(parent_id) is not None
    assert sync_eq.sync.get_job(child_id) is not None


async def test_a_lent_connection_comes_back_reset(database_url: str, schema: str) -> None:
    """eq.backend.acquire() lends a raw connection; whatever the caller changed in its
    session (settings, LISTEN) is undone before the pool hands it out again."""
    eq = Soniq(database_url, schema=schema, pool_size=1)
    async with eq.backend.acquire() as conn:
        await conn.execute("SET application_name = 'changed by the app'")
        await conn.execute("LISTEN some_channel")
        backend_pid = await conn.fetchval("SELECT pg_backend_pid()")
    async with eq.backend.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == backend_pid  # same one
        assert await conn.fetchval("SHOW application_name") != "changed by the app"
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    await eq.close()


async def test_one_enqueue_is_one_statement_on_asyncpg(database_url: str, schema: str) -> None:
    """The hot path is a single INSERT: asyncpg's pool would otherwise send a reset
    query after every release, doubling the round trips of an enqueue."""
    eq = Soniq(database_url, schema=schema, pool_size=1)
    await eq.ensure_initialized()

    @eq.job()
    async def noop() -> None: ...

    await eq.enqueue(noop)  # opens the pool and prepares the statement
    statements: list[str] = []
    async with eq.backend.acquire() as conn:
        conn.add_query_logger(lambda record: statements.append(record.query))
    statements.clear()  # the reset of the lent connection itself
    await eq.enqueue(noop)
    await eq.enqueue(noop)
    await eq.close()
    assert len(statements) == 2, statements
    assert all(s.lstrip().upper().startswith(("INSERT", "WITH")) for s in statements), statements


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_close_on_another_event_loop_than_the_one_that_opened(
    database_url: str, schema: str
) -> None:
    """A Soniq opened under one loop (a fixture's, an app's first lifespan) and
    closed under another: close() does not fail, and the next use opens afresh."""
    eq = Soniq(database_url, schema=schema)

    async def use() -> int:
        await eq.ensure_initialized()
        return await eq.enqueue("api.job")

    first = asyncio.run(use())
    asyncio.run(eq.close())  # the first loop is gone
    assert asyncio.run(use()) == first + 1
    asyncio.run(eq.close())
