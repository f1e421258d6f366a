"""Fixtures: a fresh PostgreSQL database for the run, a fresh schema per test.

``SONIQ_TEST_DATABASE_URL`` is an admin URL (default
``postgresql://postgres@127.0.0.1:5432/postgres``). The run creates its own database
there and drops it at the end. When no server answers, a throwaway cluster is started
from the installed PostgreSQL binaries (see ``tests/throwaway_pg.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from soniq import JobStatus, Soniq
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_schemas = itertools.count()

#: Every backend Soniq has: the two async PostgreSQL drivers and the embedded two.
BACKENDS = ("asyncpg", "psycopg", "sqlite", "memory")


# -- helpers shared by the test files ------------------------------------------------


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any] | Any],
    timeout: float = 30,
    what: str = "the condition",
) -> Any:
    """:func:`wait_until` for a running event loop: ``predicate`` may be a coroutine
    function (awaited) or a cheap plain function (called on the loop)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def status_of(eq: Soniq, job_id: int) -> JobStatus | None:
    """The job's status, or None when there is no such job (any more)."""
    job = await eq.get_job(job_id)
    return None if job is None else job.status


def new_soniq(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **kwargs: Any) -> Soniq:
    """A Soniq on one backend: ``asyncpg``/``psycopg`` in this test's schema of the
    run's database, ``sqlite`` in a file of ``tmp_path``, or ``memory``. Not
    initialised and not closed: the caller owns it."""
    if kind == "sqlite":
        return Soniq(f"sqlite:///{tmp_path}/jobs.db", **kwargs)
    if kind == "memory":
        return Soniq("memory://", **kwargs)
    if kind not in ("asyncpg", "psycopg"):
        raise ValueError(f"no backend {kind!r}")
    url = request.getfixturevalue("database_url")
    schema = request.getfixturevalue("schema")
    return Soniq(url, driver=kind, schema=schema, **kwargs)


@contextlib.asynccontextmanager
async def migrated_soniq(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Soniq]:
    """:func:`new_soniq`, migrated, and closed when the block ends."""
    app = new_soniq(kind, request, tmp_path)
    await app.ensure_initialized()
    try:
        yield app
    finally:
        await app.close()


@pytest.fixture(params=BACKENDS)
async def any_eq(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Soniq]:
    """A migrated Soniq on each backend of :data:`BACKENDS`, closed afterwards."""
    async with migrated_soniq(request.param, request, tmp_path) as app:
        yield app


def soniq_command() -> list[str]:
    """The ``soniq`` console script of this environment, as users run it (nox and the
    dev virtualenv install the package, which puts the script next to Python);
    ``python -m soniq`` where the package is only on the path."""
    script = Path(sys.executable).parent / "soniq"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "soniq"]


class Process:
    """A ``soniq`` child process whose output (stdout and stderr together) is read as
    it comes, so that a test can wait for a line instead of sleeping."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*soniq_command(), *args],
            cwd=ROOT,
            env=os.environ.copy() if env is None else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` has been printed; fail at once if the process ends
        without printing it."""

        def printed() -> bool:
            if text in self.output:
                return True
            if self.proc.poll() is not None:
                self._reader.join(5)
                if text in self.output:
                    return True
                raise AssertionError(
                    f"soniq {' '.join(self.args)} exited {self.proc.returncode} "
                    f"without printing {text!r}:\n{self.output}"
                )
            return False

        wait_until(printed, timeout, repr(text))

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Its exit status and all its output; killed and failed past ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"soniq {' '.join(self.args)} did not exit within {timeout}s:\n{self.output}"
            ) from None
        self._reader.join(10)
        return code, self.output

    def kill(self) -> None:
        """SIGKILL it if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)


def listening_sessions(conn: psycopg.Connection[Any], schema: str) -> int:
    """Sessions of this database that LISTEN on Soniq's channel of ``schema``. A
    session's LISTEN cannot be seen from another one (``pg_listening_channels()`` is
    per session), but nothing else runs on a listener's connection, so its last
    statement in ``pg_stat_activity`` is its LISTEN."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query ILIKE 'LISTEN%%' AND query LIKE %s",
        (f"%soniq:{schema}%",),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _server_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL of a server for this run (the configured one, or a throwaway)."""
    url = os.environ.get("SONIQ_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    if _server_answers(url):
        yield url
        return
    from tests.throwaway_pg import throwaway_cluster

    with throwaway_cluster(tmp_path_factory.mktemp("pg")) as throwaway_url:
        yield throwaway_url


def url_for_database(admin_url: str, dbname: str) -> str:
    """``admin_url`` pointing at another database."""
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo("", **info)


@contextlib.contextmanager
def new_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A database of its own, as a ``postgresql://`` URL (Soniq takes URLs),
    dropped on exit."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(url_for_database(admin_url, name))
    host = info.get("host", "127.0.0.1")
    port = info.get("port", "5432")
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    try:
        yield f"postgresql://{user}{password}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    """A database created for this test run, dropped at its end."""
    with new_database(admin_url, "soniq_test") as url:
        yield url


@pytest.fixture
def fresh_database(admin_url: str) -> Iterator[str]:
    """A database of this test's own, for examples whose tables are in ``public``."""
    with new_database(admin_url, "soniq_fresh") as url:
        yield url


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A schema name no other test uses; dropped afterwards."""
    name = f"t{os.getpid()}_{next(_schemas)}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["asyncpg", "psycopg"])
async def eq(
    request: pytest.FixtureRequest, database_url: str, schema: str
) -> AsyncIterator[Soniq]:
    """A migrated Soniq on each async driver, in its own schema."""
    app = Soniq(database_url, driver=request.param, schema=schema)
    await app.ensure_initialized()
    yield app
    await app.close()


@pytest.fixture
def sync_eq(database_url: str, schema: str) -> Iterator[Soniq]:
    """A migrated Soniq for the sync twin (``sync_eq.sync``), in its own schema."""
    app = Soniq(database_url, schema=schema)
    app.sync.ensure_initialized()
    yield app
    app.sync.close()


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the run's database, for assertions."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def django_connection(database_url: str) -> Iterator[Any]:
    """``django.db.connection`` on the psycopg 3 backend, configured once per process
    for the run's database; closed after each test so the next one connects lazily."""
    import django
    from django.conf import settings

    if not settings.configured:
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": info["dbname"],
                    "USER": info.get("user", ""),
                    "PASSWORD": info.get("password", ""),
                    "HOST": info.get("host", ""),
                    "PORT": info.get("port", ""),
                }
            },
            USE_TZ=True,
        )
        django.setup()
    from django.db import connection

    assert (
        connection.settings_dict["NAME"]
        == psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    ), "Django was configured for another database earlier in this process"
    connection.close()
    yield connection
    connection.close()


@pytest.fixture
def soniq_processes() -> Iterator[Callable[..., Process]]:
    """Start ``soniq ARGS...`` processes (``start(*args, env=None)``); any still
    running when the test ends is killed, so none outlives it."""
    started: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        process = Process(list(args), env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def worker_app(database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``tests.worker_app`` bound to this test's schema (in this process and in the
    worker processes a test starts), migrated, with its ``runs`` table."""
    monkeypatch.setenv("SONIQ_WORKER_APP_URL", database_url)
    monkeypatch.setenv("SONIQ_WORKER_APP_SCHEMA", schema)
    sys.modules.pop("tests.worker_app", None)
    module = importlib.import_module("tests.worker_app")
    module.eq.sync.ensure_initialized()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(module.RUNS_DDL)
    yield module
    module.eq.sync.close()
    sys.modules.pop("tests.worker_app", None)


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here even when the suite was started with it
    ignored (a background job of a shell script inherits that)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
