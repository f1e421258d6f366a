"""The asyncpg driver: Soniq's default for ``postgresql://`` URLs.

Owns a lazily created ``asyncpg.Pool``, bound to the running event loop and replaced
after a fork or on another loop; runs core statements on it or on a caller's
connection. ``$n`` placeholders.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from soniq.core.errors import ConnectionStateError
from soniq.core.sql.migrate import MigrationPlan, MigrationSteps, migration_steps
from soniq.core.sql.postgres import PostgresQueries, Query
from soniq.drivers._common import async_owner, schema_missing
from soniq.drivers.postgres_async import PostgresAsyncOps
from soniq.drivers.postgres_maintenance import PostgresMaintenance

#: What a caller may hand to ``enqueue(connection=...)`` for this driver.
CONNECTION_TYPES = (asyncpg.Connection, PoolConnectionProxy)


class AsyncpgDriver(PostgresAsyncOps):
    """asyncpg with Soniq's own pool."""

    name = "asyncpg"

    def __init__(self, dsn: str, *, schema: str, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.queries = PostgresQueries(schema, "numeric")
        self.migrations = MigrationPlan(schema)
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._owner: object = None

    async def _get_pool(self) -> asyncpg.Pool:
        owner = async_owner()
        if self._pool is not None and self._owner == owner:
            return self._pool
        pool = await asyncpg.create_pool(
            self.dsn, min_size=self._min_size, max_size=self._max_size, reset=_keep_session
        )
        if self._pool is not None and self._owner == owner:  # another task won the race
            await pool.close()
            return self._pool
        self._pool, self._owner = pool, owner
        return pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """Borrow a raw ``asyncpg`` connection from Soniq's pool. It is reset
        (transaction, LISTENs, settings, advisory locks) when given back."""
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            try:
                yield conn
            finally:
                if not conn.is_closed():
                    await conn.reset()

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        """A connection outside the pool, closed on exit."""
        conn = await asyncpg.connect(self.dsn)
        try:
            yield conn
        finally:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # broken already: nothing to close gracefully
                conn.terminate()
            except BaseException:
                conn.terminate()
                raise

    async def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        return await self.fetch_own(await self._get_pool(), query)

    async def fetch_own(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        """On a connection of :meth:`connect`, or on the pool."""
        try:
            return await conn.fetch(query.sql, *query.params)  # type: ignore[no-any-return]
        except asyncpg.UndefinedTableError as exc:
            raise schema_missing(self.queries.schema, exc) from exc

    async def fetch_on(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        if conn.is_closed():
            raise ConnectionStateError("connection: the asyncpg connection is closed")
        try:
            return await conn.fetch(query.sql, *query.params)  # type: ignore[no-any-return]
        except asyncpg.UndefinedTableError as exc:
            raise schema_missing(self.queries.schema, exc) from exc
        except asyncpg.InFailedSQLTransactionError as exc:
            raise ConnectionStateError(
                "connection: its transaction has already failed; roll it back first"
            ) from exc

    async def listen(self, on_notify: Callable[[str], None], on_ready: Callable[[], None]) -> None:
        """LISTEN on a dedicated connection and hand each payload to ``on_notify``;
        raises when the connection is lost (the caller reconnects)."""
        conn = await asyncpg.connect(self.dsn)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(
                self.queries.channel, lambda _c, _pid, _ch, payload: on_notify(payload)
            )
            on_ready()
            await lost.wait()
            raise ConnectionError("the LISTEN connection was closed by the server")
        finally:
            conn.terminate()

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


async def _keep_session(conn: Any) -> None:
    """The pool's reset hook. asyncpg resets every released connection with a query
    (one more round trip per statement, ~0.2 ms here). Soniq's own statements leave
    no session state behind, and connections lent by :meth:`AsyncpgDriver.acquire`
    are reset there, so nothing is left to do."""


async def _run(conn: Any, steps: MigrationSteps) -> int:
    try:
        statement = next(steps)
        while True:
            if statement.returns_rows:
                rows = await conn.fetch(statement.sql)
            else:
                await conn.execute(statement.sql)
                rows = []
            statement = steps.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
