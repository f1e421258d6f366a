"""The psycopg 3 async driver, with ``psycopg_pool.AsyncConnectionPool``.

This file is the source of ``psycopg_sync.py``, which ``tools/unasync.py`` generates
from it; CI fails when the generated file is out of date. Write code here that the
plain renames in that tool turn into correct blocking code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from soniq.core.errors import ConnectionStateError
from soniq.core.sql.migrate import MigrationPlan, MigrationSteps, migration_steps
from soniq.core.sql.postgres import PostgresQueries, Query
from soniq.drivers._common import async_owner, has_unread_input, schema_missing
from soniq.drivers.postgres_async import PostgresAsyncOps
from soniq.drivers.postgres_maintenance import PostgresMaintenance

#: What a caller may hand to ``enqueue(connection=...)`` for this driver.
CONNECTION_TYPES = (psycopg.AsyncConnection,)


class PsycopgAsyncDriver(PostgresAsyncOps):
    """psycopg 3 with Soniq's own pool (autocommit connections)."""

    name = "psycopg"

    def __init__(self, dsn: str, *, schema: str, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.queries = PostgresQueries(schema, "format")
        self.migrations = MigrationPlan(schema)
        self._min_size = min_size
        self._max_size = max_size
        self._pool: AsyncConnectionPool[Any] | None = None
        self._owner: object = None

    async def _get_pool(self) -> AsyncConnectionPool[Any]:
        owner = async_owner()
        if self._pool is not None and self._owner == owner:
            return self._pool
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs={"autocommit": True},
            open=False,
            name="soniq",
            check=_check_connection,
        )
        await pool.open(wait=True)
        if self._pool is not None and self._owner == owner:  # another caller won the race
            await pool.close()
            return self._pool
        self._pool, self._owner = pool, owner
        return pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """Borrow a raw ``psycopg.AsyncConnection`` (autocommit) from Soniq's pool."""
        pool = await self._get_pool()
        async with pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        """A connection outside the pool (autocommit), closed on exit."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            yield conn

    async def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        pool = await self._get_pool()
        async with pool.connection() as conn:
            return await self._execute(conn, query)

    async def fetch_own(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        return await self._execute(conn, query)

    async def fetch_on(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        if conn.closed:
            raise ConnectionStateError("connection: the psycopg connection is closed")
        if conn.info.transaction_status == TransactionStatus.INERROR:
            raise ConnectionStateError(
                "connection: its transaction has already failed; roll it back first "
                "(nothing was sent)"
            )
        return await self._execute(conn, query)

    async def _execute(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        # A cursor of our own: the connection's cursor_factory and row_factory are the
        # caller's (Django's client-side cursor, dict rows...), not ours to rely on.
        async with psycopg.AsyncCursor(conn, row_factory=tuple_row) as cur:
            try:
                await cur.execute(query.sql, query.params)
            except psycopg.errors.UndefinedTable as exc:
                raise schema_missing(self.queries.schema, exc) from exc
            # Statements without RETURNING (register, unregister) produce no rows.
            return await cur.fetchall() if cur.description is not None else []

    async def listen(self, on_notify: Callable[[str], None], on_ready: Callable[[], None]) -> None:
        """LISTEN on a dedicated connection and hand each payload to ``on_notify``;
        raises when the connection is lost (the caller reconnects)."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.queries.channel))
            )
            on_ready()
            async for notify in conn.notifies():
                on_notify(notify.payload)

    async def migrate(self, *, apply: bool) -> int:
        async with self.acquire() as conn, conn.transaction():
            return await _run(conn, migration_steps(self.migrations, apply=apply))

    def maintenance(self) -> PostgresMaintenance:
        """A blocking session of its own for the worker's heartbeat thread."""
        return PostgresMaintenance(self.dsn, self.queries.schema)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _check_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Pool check on checkout: a round trip only when the idle socket has input
    (costs ~1 us otherwise); raises for a dead connection, which the pool replaces."""
    if has_unread_input(conn.fileno()):
        await conn.execute("SELECT 1")


async def _run(conn: Any, steps: MigrationSteps) -> int:
    try:
        statement = next(steps)
        while True:
            cur = await conn.execute(statement.sql)
            rows = await cur.fetchall() if statement.returns_rows else []
            statement = steps.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
