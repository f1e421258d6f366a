"""An unreachable database: every call that needs it fails within the configured
bound, with ``soniq.DatabaseUnavailable`` naming host, port and database (never the
password), the driver's error chained; the worker waits for it at start.

Real sockets only: a closed port ("refused"), a name that cannot resolve ("dns"), and
the reliability tests' :class:`FaultProxy` to the real server, which accepts and never
answers ("stall") or passes until it drops every connection.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from soniq import DatabaseUnavailable, Soniq, SoniqError
from soniq.drivers._common import is_connection_error
from tests.conftest import Process, async_wait_until, wait_until
from tests.reliability.proxy import FaultProxy
from tests.throwaway_pg import free_port

PASSWORD = "s3cr3t-Pw"
#: connect_timeout of these tests; psycopg rounds it up to 2 s (libpq's minimum).
CONNECT = 0.5
ACQUIRE = 1.0
#: A generous bound on how long a failing call may take (measured: ~0 s refused and
#: dns, 0.5 s asyncpg stall, 2 s psycopg stall, ~1 s pool checkout).
BOUND = 4.5


@pytest.fixture
def proxy(database_url: str) -> Iterator[FaultProxy]:
    """A proxy to the test server, passing; ``proxy.mode = "stall"`` makes it a
    listener that accepts and never answers."""
    with FaultProxy.to(database_url) as made:
        yield made


def _url(host: str, port: int, database: str = "appdb") -> str:
    return f"postgresql://app:{PASSWORD}@{host}:{port}/{database}"


def _target_url(kind: str, proxy: FaultProxy) -> tuple[str, str, int]:
    if kind == "refused":
        port = free_port()
        return _url("127.0.0.1", port), "127.0.0.1", port
    if kind == "stall":
        proxy.mode = "stall"
        return _url("127.0.0.1", proxy.port), "127.0.0.1", proxy.port
    return _url("soniq-test.invalid", 5432), "soniq-test.invalid", 5432


def _check(exc: BaseException | None, host: str, port: int, elapsed: float, what: str) -> None:
    assert isinstance(exc, DatabaseUnavailable), f"{what}: {exc!r}"
    assert isinstance(exc, SoniqError) and is_connection_error(exc)
    message = str(exc)
    assert host in message and str(port) in message and "appdb" in message, message
    assert PASSWORD not in message and PASSWORD not in repr(exc.args), message
    assert (exc.host, exc.port, exc.database) == (host, port, "appdb")
    assert exc.__cause__ is not None, f"{what}: the driver's error is not chained"
    assert "\n" not in message
    assert elapsed < BOUND, f"{what} took {elapsed:.2f} s"


def _new(url: str, driver: str | None = None) -> Soniq:
    eq = Soniq(url, driver=driver, connect_timeout=CONNECT, acquire_timeout=ACQUIRE)

    @eq.job(name="ping")
    async def ping(n: int = 0) -> None: ...

    return eq


async def _acquire(eq: Soniq) -> None:
    async with eq.backend.acquire():
        raise AssertionError("a connection was lent")


ASYNC_CALLS: dict[str, Callable[[Soniq], Awaitable[Any]]] = {
    "enqueue": lambda eq: eq.enqueue("ping", n=1),
    "enqueue_many": lambda eq: eq.enqueue_many("ping", [{"n": 1}, {"n": 2}]),
    "get_job": lambda eq: eq.get_job(1),
    "cancel_job": lambda eq: eq.cancel_job(1),
    "ensure_initialized": lambda eq: eq.ensure_initialized(),
    "acquire": _acquire,
}


def _sync_acquire(eq: Soniq) -> None:
    with eq.sync.backend.acquire():
        raise AssertionError("a connection was lent")


SYNC_CALLS: dict[str, Callable[[Soniq], Any]] = {
    "enqueue": lambda eq: eq.sync.enqueue("ping", n=1),
    "enqueue_many": lambda eq: eq.sync.enqueue_many("ping", [{"n": 1}]),
    "get_job": lambda eq: eq.sync.get_job(1),
    "cancel_job": lambda eq: eq.sync.cancel_job(1),
    "ensure_initialized": lambda eq: eq.sync.ensure_initialized(),
    "acquire": _sync_acquire,
}


async def _timed_async(eq: Soniq, call: Callable[[Soniq], Awaitable[Any]]) -> Any:
    start = time.monotonic()
    try:
        await call(eq)
    except Exception as exc:
        return exc, time.monotonic() - start
    finally:
        await eq.close()
    return None, time.monotonic() - start


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["refused", "stall", "dns"])
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_every_async_call_fails_in_bounded_time(
    kind: str, driver: str, proxy: FaultProxy
) -> None:
    url, host, port = _target_url(kind, proxy)
    # Each call on a Soniq of its own (each opens its pool), all at once.
    results = await asyncio.gather(
        *(_timed_async(_new(url, driver), call) for call in ASYNC_CALLS.values())
    )
    for name, (exc, elapsed) in zip(ASYNC_CALLS, results, strict=True):
        _check(exc, host, port, elapsed, f"{driver} {name} ({kind})")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["refused", "stall", "dns"])
def test_every_sync_call_fails_in_bounded_time(kind: str, proxy: FaultProxy) -> None:
    url, host, port = _target_url(kind, proxy)
    results: dict[str, tuple[BaseException | None, float]] = {}

    def run(name: str, call: Callable[[Soniq], Any]) -> None:
        eq = _new(url)
        start = time.monotonic()
        try:
            call(eq)
            results[name] = (None, time.monotonic() - start)
        except Exception as exc:
            results[name] = (exc, time.monotonic() - start)
        finally:
            eq.sync.close()

    threads = [threading.Thread(target=run, args=item) for item in SYNC_CALLS.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for name in SYNC_CALLS:
        exc, elapsed = results[name]
        _check(exc, host, port, elapsed, f"sync {name} ({kind})")


def _drop_seen(eq: Soniq, driver: str, proxy: FaultProxy) -> bool:
    """The proxy closed every connection (so each pooled socket has its reset), and
    asyncpg, which reads its idle connections, saw them close (psycopg's pool finds a
    dead one at checkout, from its socket)."""
    if proxy.connections():
        return False
    return driver != "asyncpg" or eq.backend._pool.get_size() == 0  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_the_server_goes_away_after_the_pool_opened(
    driver: str, database_url: str, schema: str, proxy: FaultProxy
) -> None:
    """Pooled connections die with the server; the next calls fail in bounded time
    (asyncpg reconnects and is reset; psycopg's pool finds none within
    acquire_timeout) instead of hanging or raising the driver's own words."""
    eq = Soniq(
        proxy.through(database_url),
        driver=driver,
        schema=schema,
        connect_timeout=CONNECT,
        acquire_timeout=ACQUIRE,
    )

    @eq.job(name="ping")
    async def ping(n: int = 0) -> None: ...

    try:
        await eq.ensure_initialized()
        job_id = await eq.enqueue(ping)
        assert (await eq.get_job(job_id)) is not None
        proxy.mode = "drop"
        await async_wait_until(lambda: _drop_seen(eq, driver, proxy), 5, "the drop to be seen")
        dbname = urlsplit(database_url).path.lstrip("/")
        for name, call in ASYNC_CALLS.items():
            if name == "ensure_initialized":
                continue  # done already: no I/O
            start = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                await call(eq)
            elapsed = time.monotonic() - start
            assert elapsed < BOUND, f"{name} took {elapsed:.2f} s"
            assert f"127.0.0.1:{proxy.port}" in str(info.value)
            assert dbname in str(info.value)
    finally:
        await eq.close()


@pytest.mark.timeout(60)
def test_the_sync_twin_after_the_server_went_away(
    database_url: str, schema: str, proxy: FaultProxy
) -> None:
    url = proxy.through(database_url)
    eq = Soniq(url, schema=schema, connect_timeout=CONNECT, acquire_timeout=ACQUIRE)

    @eq.job(name="ping")
    async def ping(n: int = 0) -> None: ...

    try:
        eq.sync.ensure_initialized()
        job_id = eq.sync.enqueue(ping)
        assert eq.sync.get_job(job_id) is not None
        proxy.mode = "drop"
        wait_until(lambda: proxy.connections() == 0, 5, "the connections dropped")
        for name, call in SYNC_CALLS.items():
            if name == "ensure_initialized":
                continue
            start = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                call(eq)
            assert time.monotonic() - start < BOUND, name
    finally:
        eq.sync.close()


async def test_a_callers_connection_is_not_timed_out_by_soniq(
    database_url: str, schema: str
) -> None:
    """connection= is the caller's: Soniq's timeouts and pool are not involved, even
    when Soniq's own URL points nowhere."""
    eq = Soniq(_url("127.0.0.1", free_port()), schema=schema, connect_timeout=CONNECT)
    probe = Soniq(database_url, schema=schema)
    await probe.ensure_initialized()
    await probe.close()

    @eq.job(name="ping")
    async def ping() -> None: ...

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        job_id = await eq.enqueue(ping, connection=conn)
        await conn.commit()
    assert isinstance(job_id, int)
    await eq.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("connect_timeout", 0),
        ("connect_timeout", -1),
        ("connect_timeout", float("inf")),
        ("connect_timeout", float("nan")),
        ("connect_timeout", "5"),
        ("connect_timeout", True),
        ("acquire_timeout", 0),
        ("acquire_timeout", None),
        ("acquire_timeout", float("-inf")),
    ],
)
def test_timeouts_are_validated(name: str, value: object) -> None:
    from soniq import ConfigurationError

    with pytest.raises(ConfigurationError, match=name):
        Soniq("postgresql://localhost/db", **{name: value})  # type: ignore[arg-type]


def test_the_default_timeouts_are_a_few_seconds() -> None:
    eq = Soniq("postgresql://localhost/db")
    target = eq.backend.target  # type: ignore[attr-defined]
    assert 0 < target.connect_timeout <= 10 and 0 < target.acquire_timeout <= 30
    assert eq.sync.backend.target.connect_timeout == target.connect_timeout  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_listen_and_the_heartbeat_session_use_the_connect_timeout(
    driver: str, proxy: FaultProxy
) -> None:
    """The worker's own connections (LISTEN, the heartbeat's maintenance session, a
    claim lane's session) give up on a silent server too."""
    proxy.mode = "stall"
    eq = _new(_url("127.0.0.1", proxy.port), driver)
    backend: Any = eq.backend

    async def listen() -> None:
        await backend.listen(lambda _payload: None, lambda: None)

    async def session() -> None:
        async with backend.worker_session():
            pass

    for what, call in (("listen", listen), ("worker_session", session)):
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await call()
        assert time.monotonic() - start < BOUND, what
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        await asyncio.to_thread(backend.maintenance)
    assert time.monotonic() - start < BOUND, "maintenance"
    await eq.close()


# -- the worker's start ----------------------------------------------------------------

APP = """
from soniq import Soniq
import os

eq = Soniq(os.environ["UNAVAILABLE_APP_URL"], schema=os.environ["UNAVAILABLE_APP_SCHEMA"],
           connect_timeout=0.5, acquire_timeout=1)


@eq.job(name="ping")
async def ping() -> str:
    return "pong"
"""


@pytest.fixture
def start_worker(tmp_path: Path, soniq_processes: Callable[..., Process]) -> Callable[..., Process]:
    """``start_worker(url, schema, *args)``: ``soniq worker`` of :data:`APP` on that
    database and schema (killed at the end of the test if still running)."""
    (tmp_path / "unavailable_app.py").write_text(APP)

    def start(url: str, schema: str, *args: str) -> Process:
        env = dict(os.environ, UNAVAILABLE_APP_URL=url, UNAVAILABLE_APP_SCHEMA=schema)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        return soniq_processes("worker", "unavailable_app:eq", *args, env=env)

    return start


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_worker_waits_then_exits_1_with_one_line(start_worker: Callable[..., Process]) -> None:
    port = free_port()
    start = time.monotonic()
    proc = start_worker(_url("127.0.0.1", port), "public", "--wait-for-database", "2")
    code, output = proc.finish(30)
    elapsed = time.monotonic() - start
    assert code == 1, output
    assert elapsed < 15, elapsed
    assert "Traceback" not in output, output
    assert PASSWORD not in output
    retries = [line for line in output.splitlines() if "WARNING" in line and "retrying" in line]
    assert retries, output
    assert all(f"127.0.0.1:{port}" in line and "appdb" in line for line in retries)
    last = output.strip().splitlines()[-1]
    assert last.startswith("soniq worker: PostgreSQL at 127.0.0.1"), output
    assert "gave up after waiting 2 s" in last, last


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_worker_fails_at_once_with_zero_wait(start_worker: Callable[..., Process]) -> None:
    proc = start_worker(_url("127.0.0.1", free_port()), "public", "--wait-for-database", "0")
    code, output = proc.finish(30)
    assert code == 1, output
    assert "Traceback" not in output and "retrying" not in output, output
    assert output.strip().splitlines()[-1].startswith("soniq worker: PostgreSQL at"), output


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_worker_starts_when_the_database_comes_back(
    start_worker: Callable[..., Process],
    proxy: FaultProxy,
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
) -> None:
    """Unreachable at start (the proxy drops every connection); the database "comes
    back" (the proxy passes) after the worker's first retry warning; the worker then
    runs the queued job and, with --burst, exits 0."""
    setup = Soniq(database_url, schema=schema)

    @setup.job(name="ping")
    async def ping() -> str: ...

    setup.sync.ensure_initialized()
    job_id = setup.sync.enqueue("ping")
    setup.sync.close()

    proxy.mode = "drop"
    proc = start_worker(proxy.through(database_url), schema, "--wait-for-database", "30", "--burst")
    proc.wait_for_output("retrying in", 30)  # the worker's first retry warning
    proxy.mode = "pass"
    code, output = proc.finish(60)
    assert code == 0, output
    status = pg.execute(
        f'SELECT status FROM "{schema}".soniq_jobs WHERE id = %s', (job_id,)
    ).fetchone()
    assert status == ("done",)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_an_exhausted_pool_fails_after_acquire_timeout(
    driver: str, database_url: str, schema: str
) -> None:
    """The one connection is lent and not given back: the next call waits
    acquire_timeout for it, then raises (and works again once it is back)."""
    eq = Soniq(database_url, driver=driver, schema=schema, pool_size=1, acquire_timeout=0.5)
    await eq.ensure_initialized()
    async with eq.backend.acquire():
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match=r"acquire_timeout|PoolTimeout"):
            await eq.get_job(1)
        assert 0.4 < time.monotonic() - start < BOUND
    assert await eq.get_job(1) is None
    await eq.close()


@pytest.mark.timeout(60)
def test_an_exhausted_sync_pool_fails_after_acquire_timeout(database_url: str, schema: str) -> None:
    eq = Soniq(database_url, schema=schema, pool_size=1, acquire_timeout=0.5)
    eq.sync.ensure_initialized()
    with eq.sync.backend.acquire():
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            eq.sync.get_job(1)
        assert 0.4 < time.monotonic() - start < BOUND
    assert eq.sync.get_job(1) is None
    eq.sync.close()


def test_the_wait_flag_and_setting_are_validated() -> None:
    from soniq.cli import _parser

    args = _parser().parse_args(["worker", "m:eq", "--wait-for-database", "0"])
    assert args.wait_for_database == 0
    assert _parser().parse_args(["worker", "m:eq"]).wait_for_database == 60
    for bad in ("-1", "inf", "nan", "soon"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["worker", "m:eq", "--wait-for-database", bad])


@pytest.mark.parametrize("wait", [-1, float("nan"), float("inf"), "60", True])
async def test_run_worker_refuses_a_bad_wait(wait: object) -> None:
    from soniq import ConfigurationError

    eq = Soniq("memory://")
    with pytest.raises(ConfigurationError, match="wait_for_database"):
        await eq.run_worker(burst=True, wait_for_database=wait)  # type: ignore[arg-type]
