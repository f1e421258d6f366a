"""An unreachable database: every call that needs it fails within the configured
bound, with ``soniq.DatabaseUnavailable`` naming host, port and database (never the
password), the driver's error chained; the worker waits for it at start.

Real sockets only: a closed port ("refused"), a listener that accepts and never
answers ("stall"), a name that cannot resolve ("dns"), and a small TCP forwarder to the
real server that can be switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cr3t-Pw"
#: connect_timeout of these tests; psycopg rounds it up to 2 s (libpq's minimum).
CONNECT = 0.5
ACQUIRE = 1.0
#: A generous bound on how long a failing call may take (measured: ~0 s refused and
#: dns, 0.5 s asyncpg stall, 2 s psycopg stall, ~1 s pool checkout).
BOUND = 4.5


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, noted, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_listening(listener: socket.socket) -> None:
    """Close a listening socket and wake its accept() (close alone does neither on
    Linux while another thread is blocked in accept: the port keeps accepting)."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


class BlackHole:
    """Accepts TCP connections and never answers (holds them open until closed)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = int(self._listener.getsockname()[1])
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        _stop_listening(self._listener)
        self._thread.join(5)
        for conn in self._held:
            conn.close()


class Forwarder:
    """A TCP forwarder from 127.0.0.1:``port`` to the real server; :meth:`cut`
    closes every connection and stops listening (the server is "down")."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", port), backlog=128)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        _stop_listening(self._listener)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def _url(host: str, port: int, database: str = "appdb") -> str:
    return f"postgresql://app:{PASSWORD}@{host}:{port}/{database}"


def _target_url(kind: str, hole: BlackHole) -> tuple[str, str, int]:
    if kind == "refused":
        port = closed_port()
        return _url("127.0.0.1", port), "127.0.0.1", port
    if kind == "stall":
        return _url("127.0.0.1", hole.port), "127.0.0.1", hole.port
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
    kind: str, driver: str, black_hole: BlackHole
) -> None:
    url, host, port = _target_url(kind, black_hole)
    # Each call on a Soniq of its own (each opens its pool), all at once.
    results = await asyncio.gather(
        *(_timed_async(_new(url, driver), call) for call in ASYNC_CALLS.values())
    )
    for name, (exc, elapsed) in zip(ASYNC_CALLS, results, strict=True):
        _check(exc, host, port, elapsed, f"{driver} {name} ({kind})")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["refused", "stall", "dns"])
def test_every_sync_call_fails_in_bounded_time(kind: str, black_hole: BlackHole) -> None:
    url, host, port = _target_url(kind, black_hole)
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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_the_server_goes_away_after_the_pool_opened(
    driver: str, database_url: str, schema: str
) -> None:
    """Pooled connections die with the server; the next calls fail in bounded time
    (asyncpg reconnects and is refused; psycopg's pool finds none within
    acquire_timeout) instead of hanging or raising the driver's own words."""
    real = urlsplit(database_url)
    forwarder = Forwarder((real.hostname or "127.0.0.1", real.port or 5432))
    url = database_url.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{forwarder.port}")
    eq = Soniq(url, driver=driver, schema=schema, connect_timeout=CONNECT, acquire_timeout=ACQUIRE)

    @eq.job(name="ping")
    async def ping(n: int = 0) -> None: ...

    try:
        await eq.ensure_initialized()
        job_id = await eq.enqueue(ping)
        assert (await eq.get_job(job_id)) is not None
        forwarder.cut()
        await asyncio.sleep(0.2)  # the pool's sockets see the server's EOF
        dbname = real.path.lstrip("/")
        for name, call in ASYNC_CALLS.items():
            if name == "ensure_initialized":
                continue  # done already: no I/O
            start = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                await call(eq)
            elapsed = time.monotonic() - start
            assert elapsed < BOUND, f"{name} took {elapsed:.2f} s"
            assert f"127.0.0.1:{forwarder.port}" in str(info.value)
            assert dbname in str(info.value)
    finally:
        forwarder.cut()
        await eq.close()


@pytest.mark.timeout(60)
def test_the_sync_twin_after_the_server_went_away(database_url: str, schema: str) -> None:
    real = urlsplit(database_url)
    forwarder = Forwarder((real.hostname or "127.0.0.1", real.port or 5432))
    url = database_url.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{forwarder.port}")
    eq = Soniq(url, schema=schema, connect_timeout=CONNECT, acquire_timeout=ACQUIRE)

    @eq.job(name="ping")
    async def ping(n: int = 0) -> None: ...

    try:
        eq.sync.ensure_initialized()
        job_id = eq.sync.enqueue(ping)
        assert eq.sync.get_job(job_id) is not None
        forwarder.cut()
        time.sleep(0.2)
        for name, call in SYNC_CALLS.items():
            if name == "ensure_initialized":
                continue
            start = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                call(eq)
            assert time.monotonic() - start < BOUND, name
    finally:
        forwarder.cut()
        eq.sync.close()


async def test_a_callers_connection_is_not_timed_out_by_soniq(
    database_url: str, schema: str
) -> None:
    """connection= is the caller's: Soniq's timeouts and pool are not involved, even
    when Soniq's own URL points nowhere."""
    eq = Soniq(_url("127.0.0.1", closed_port()), schema=schema, connect_timeout=CONNECT)
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
    driver: str, black_hole: BlackHole
) -> None:
    """The worker's own connections (LISTEN, the heartbeat's maintenance session, a
    claim lane's session) give up on a silent server too."""
    eq = _new(_url("127.0.0.1", black_hole.port), driver)
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


def _worker(tmp_path: Path, url: str, schema: str, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "unavailable_app.py").write_text(APP)
    env = dict(os.environ, UNAVAILABLE_APP_URL=url, UNAVAILABLE_APP_SCHEMA=schema)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "soniq", "worker", "unavailable_app:eq", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_worker_waits_then_exits_1_with_one_line(tmp_path: Path) -> None:
    port = closed_port()
    start = time.monotonic()
    proc = _worker(tmp_path, _url("127.0.0.1", port), "public", "--wait-for-database", "2")
    out, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, (out, err)
    assert elapsed < 15, elapsed
    assert "Traceback" not in err and "Traceback" not in out, err
    assert PASSWORD not in err and PASSWORD not in out
    retries = [line for line in err.splitlines() if "WARNING" in line and "retrying" in line]
    assert retries, err
    assert all(f"127.0.0.1:{port}" in line and "appdb" in line for line in retries)
    last = err.strip().splitlines()[-1]
    assert last.startswith("soniq worker: PostgreSQL at 127.0.0.1"), err
    assert "gave up after waiting 2 s" in last, last


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_worker_fails_at_once_with_zero_wait(tmp_path: Path) -> None:
    proc = _worker(tmp_path, _url("127.0.0.1", closed_port()), "public", "--wait-for-database", "0")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err and "retrying" not in err, err
    assert err.strip().splitlines()[-1].startswith("soniq worker: PostgreSQL at"), err


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_worker_starts_when_the_database_comes_back(
    tmp_path: Path, database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    """Unreachable at start; the database "comes back" (a forwarder starts listening
    on the port) after the worker's first retry warning; the worker then runs the
    queued job and, with --burst, exits 0."""
    setup = Soniq(database_url, schema=schema)

    @setup.job(name="ping")
    async def ping() -> str: ...

    setup.sync.ensure_initialized()
    job_id = setup.sync.enqueue("ping")
    setup.sync.close()

    real = urlsplit(database_url)
    port = closed_port()
    url = database_url.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{port}")
    proc = _worker(tmp_path, url, schema, "--wait-for-database", "30", "--burst")
    forwarder = None
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # block until the first retry warning
            seen.append(line)
            if "WARNING" in line and "retrying" in line:
                break
        else:
            raise AssertionError("".join(seen))
        forwarder = Forwarder((real.hostname or "127.0.0.1", real.port or 5432), port=port)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(seen) + err
    finally:
        if proc.poll() is None:
            proc.kill()
        if forwarder is not None:
            forwarder.cut()
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


@pytest.mark.parametrize("wait", [-1, float("nan"), "60", True])
async def test_run_worker_refuses_a_bad_wait(wait: object) -> None:
    from soniq import ConfigurationError

    eq = Soniq("memory://")
    with pytest.raises(ConfigurationError, match="wait_for_database"):
        await eq.run_worker(burst=True, wait_for_database=wait)  # type: ignore[arg-type]
