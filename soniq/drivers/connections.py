"""Recognise the connection a caller hands to ``enqueue(connection=...)``.

Raw driver connections are used as they are. Connections wrapped by an ORM are
unwrapped here: SQLAlchemy ``Session``/``AsyncSession``/``Connection``/
``AsyncConnection``, Django's connection, Tortoise's transaction wrapper. Optional
libraries are recognised by the module of the object's class, so none of them is
imported unless the caller already uses it.

The driver follows the connection, not Soniq's own pool: :class:`CallerConnections`
turns a caller's connection into the driver that runs Soniq's statement on it, so the
facade asks once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import asyncpg
import psycopg

from soniq.core.errors import ConnectionStateError
from soniq.core.jobs import Job, JobNode, JobSpec
from soniq.drivers import asyncpg as asyncpg_driver
from soniq.drivers.psycopg2_compat import Psycopg2Runner, is_psycopg2_connection

AsyncKind = Literal["asyncpg", "psycopg"]
SyncKind = Literal["psycopg", "psycopg2"]

_ASYNC_ACCEPTS = (
    "asyncpg.Connection (or a pool-acquired one), psycopg.AsyncConnection, SQLAlchemy "
    "AsyncSession/AsyncConnection, or a Tortoise transaction"
)
_SYNC_ACCEPTS = (
    "psycopg.Connection, a psycopg2 connection, SQLAlchemy Session/Connection, or "
    "django.db.connection"
)


def _module(obj: object) -> str:
    return type(obj).__module__ or ""


async def resolve_async(conn: Any) -> tuple[AsyncKind, Any]:
    """The driver kind and raw connection behind ``conn``, for ``await eq.enqueue``."""
    if isinstance(conn, asyncpg_driver.CONNECTION_TYPES):
        _check_not_released(conn)
        return "asyncpg", conn
    if isinstance(conn, psycopg.AsyncConnection):
        return "psycopg", conn
    module = _module(conn)
    if module.startswith("sqlalchemy."):
        return await _resolve_sqlalchemy_async(conn)
    if module.startswith("tortoise."):
        inner = getattr(conn, "_connection", None)
        if inner is None:
            raise TypeError(
                f"connection: {type(conn).__name__} holds no database connection; pass the "
                "object that `async with in_transaction() as conn` gives you"
            )
        return await resolve_async(inner)
    if _looks_sync(conn):
        raise TypeError(
            f"connection: {type(conn).__module__}.{type(conn).__name__} is a synchronous "
            "connection; enqueue on it with eq.sync.enqueue(..., connection=conn), or "
            f"pass an async one to await eq.enqueue: {_ASYNC_ACCEPTS}"
        )
    raise TypeError(f"connection: expected {_ASYNC_ACCEPTS}; got {type(conn).__name__}")


def resolve_sync(conn: Any) -> tuple[SyncKind, Any]:
    """The driver kind and raw connection behind ``conn``, for ``eq.sync.enqueue``."""
    if isinstance(conn, psycopg.Connection):
        return "psycopg", conn
    if is_psycopg2_connection(conn):
        return "psycopg2", conn
    module = _module(conn)
    if module.startswith("sqlalchemy."):
        return resolve_sync(_unwrap_sqlalchemy_sync(conn))
    if module.startswith("django.") and hasattr(conn, "ensure_connection"):
        # Django connects lazily; inside atomic() it has already turned autocommit off.
        conn.ensure_connection()
        return resolve_sync(conn.connection)
    if _looks_async(conn):
        raise TypeError(
            f"connection: {type(conn).__module__}.{type(conn).__name__} is an async "
            "connection; enqueue on it with `await eq.enqueue(..., connection=conn)`, or "
            f"pass a synchronous one to eq.sync.enqueue: {_SYNC_ACCEPTS}"
        )
    raise TypeError(f"connection: expected {_SYNC_ACCEPTS}; got {type(conn).__name__}")


async def _resolve_sqlalchemy_async(conn: Any) -> tuple[AsyncKind, Any]:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    if isinstance(conn, (AsyncSession, async_scoped_session)):
        conn = await conn.connection()
    if not isinstance(conn, AsyncConnection):
        raise TypeError(
            f"connection: {type(conn).__name__} is a synchronous SQLAlchemy object; use "
            "eq.sync.enqueue(..., connection=session), or pass an AsyncSession"
        )
    if not conn.in_transaction():
        # Outside begin() SQLAlchemy autobegins on the first statement; ours bypasses it,
        # so begin as that statement would have. Otherwise conn.commit() would find no
        # transaction to commit and the pool's reset would roll our INSERT back (psycopg),
        # or the INSERT would autocommit (asyncpg).
        await conn.begin()
    raw = (await conn.get_raw_connection()).driver_connection
    kind, raw = await resolve_async(raw)
    if kind == "asyncpg" and not raw.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN with its first statement. Had nothing
        # run yet, our INSERT would autocommit and survive a rollback: make it begin.
        await conn.exec_driver_sql("SELECT 1")
    return kind, raw


def _unwrap_sqlalchemy_sync(conn: Any) -> Any:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, scoped_session

    if isinstance(conn, (Session, scoped_session)):
        conn = conn.connection()
    if not isinstance(conn, Connection):
        raise TypeError(
            f"connection: {type(conn).__name__} is not a SQLAlchemy Session or Connection; "
            "for AsyncSession use `await eq.enqueue(..., connection=session)`"
        )
    if not conn.in_transaction():
        # As in the async case: make SQLAlchemy autobegin, or its commit() would be a
        # no-op and the pool's reset-on-return would roll our INSERT back.
        conn.begin()
    # psycopg and psycopg2 begin implicitly on our statement; SQLAlchemy ends it.
    return conn.connection.driver_connection


def _check_not_released(conn: Any) -> None:
    """A pool-acquired asyncpg proxy refuses every call once released; say why."""
    try:
        conn.is_closed()
    except asyncpg.InterfaceError as exc:
        raise ConnectionStateError(
            "connection: the asyncpg connection was released back to its pool; enqueue "
            "inside the `async with pool.acquire() as conn:` block"
        ) from exc


def _looks_sync(conn: Any) -> bool:
    module = _module(conn)
    if isinstance(conn, psycopg.Connection) or is_psycopg2_connection(conn):
        return True
    if module.startswith("django."):
        return True
    return module.startswith("sqlalchemy.") and "asyncio" not in module


def _looks_async(conn: Any) -> bool:
    module = _module(conn)
    return (
        isinstance(conn, (psycopg.AsyncConnection, *asyncpg_driver.CONNECTION_TYPES))
        or module.startswith("tortoise.")
        or (module.startswith("sqlalchemy.") and "asyncio" in module)
    )


class CallerConnections:
    """Runs Soniq's statements on the connections callers hand in (``connection=``),
    for both faces of one Soniq: the connection's type picks the driver that runs the
    statement there, made once per type. Nothing here opens a pool: a caller's
    connection is used as it is, inside its own transaction."""

    def __init__(self, dsn: str, options: dict[str, Any]) -> None:
        self._dsn = dsn
        self._options = options  # a driver's settings (``_Config.driver_options``)
        self._runners: dict[type[Any], Any] = {}

    def _runner(self, kind: type[Any]) -> Any:
        runner = self._runners.get(kind)
        if runner is None:
            if kind is Psycopg2Runner:
                from soniq.core.sql.postgres import PostgresQueries

                runner = Psycopg2Runner(PostgresQueries(self._options["schema"], "format"))
            else:
                runner = kind(self._dsn, **self._options)
            self._runners[kind] = runner
        return runner

    async def _async(self, conn: Any) -> tuple[Any, Any]:
        kind, raw = await resolve_async(conn)
        if kind == "asyncpg":
            return self._runner(asyncpg_driver.AsyncpgDriver), raw
        from soniq.drivers.psycopg_async import PsycopgAsyncDriver

        return self._runner(PsycopgAsyncDriver), raw

    def _sync(self, conn: Any) -> tuple[Any, Any]:
        kind, raw = resolve_sync(conn)
        if kind == "psycopg2":
            return self._runner(Psycopg2Runner), raw
        from soniq.drivers.psycopg_sync import PsycopgSyncDriver

        return self._runner(PsycopgSyncDriver), raw

    async def insert_jobs(self, spec: JobSpec, conn: Any) -> list[int]:
        """Insert on ``conn`` (any accepted async connection); ids in input order."""
        runner, raw = await self._async(conn)
        return await runner.insert_jobs(spec, raw)  # type: ignore[no-any-return]

    async def insert_graph(self, nodes: Sequence[JobNode], conn: Any) -> list[int]:
        """Insert jobs that wait for one another on ``conn``; ids in input order."""
        runner, raw = await self._async(conn)
        return await runner.insert_graph(nodes, raw)  # type: ignore[no-any-return]

    async def list_jobs(self, name: str | None, queue: str | None, conn: Any) -> list[Job]:
        """Queued jobs as ``conn`` sees them (its own transaction's included)."""
        runner, raw = await self._async(conn)
        return await runner.list_jobs(name, queue, raw)  # type: ignore[no-any-return]

    def insert_jobs_sync(self, spec: JobSpec, conn: Any) -> list[int]:
        """:meth:`insert_jobs` on a blocking connection (psycopg, psycopg2, Django,
        SQLAlchemy)."""
        runner, raw = self._sync(conn)
        return runner.insert_jobs(spec, raw)  # type: ignore[no-any-return]

    def insert_graph_sync(self, nodes: Sequence[JobNode], conn: Any) -> list[int]:
        """:meth:`insert_graph` on a blocking connection."""
        runner, raw = self._sync(conn)
        return runner.insert_graph(nodes, raw)  # type: ignore[no-any-return]

    def list_jobs_sync(self, name: str | None, queue: str | None, conn: Any) -> list[Job]:
        """:meth:`list_jobs` on a blocking connection."""
        runner, raw = self._sync(conn)
        return runner.list_jobs(name, queue, raw)  # type: ignore[no-any-return]
