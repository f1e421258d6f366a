"""The asyncpg driver: Soniq's default for ``postgresql://`` URLs.

Owns a lazily created ``asyncpg.Pool``, bound to the running event loop and replaced
after a fork or on another loop; runs core statements on it or on a caller's
connection. ``$n`` placeholders.

Every connection it opens has ``connect_timeout``, every checkout from its pool
``acquire_timeout``; a failure of either is :class:`soniq.DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from soniq.core.errors import ConnectionStateError
from soniq.core.sql.migrate import MigrationSteps, migration_steps
from soniq.core.sql.postgres import Query
from soniq.drivers._common import (
    async_owner,
    register_connection_errors,
    schema_missing,
)
from soniq.drivers.postgres_async import PostgresAsyncOps

register_connection_errors(
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    # asyncpg can report a connection killed under a running query this way.
    asyncpg.exceptions._base.InternalClientError,
)

#: What a caller may hand to ``enqueue(connection=...)`` for this driver.
CONNECTION_TYPES = (asyncpg.Connection, PoolConnectionProxy)

#: What opening or checking out a connection raises when the server is down, silent,
#: refuses us (starting up, too many clients, authentication) or the name does not
#: resolve. Mapped to DatabaseUnavailable; statements' own errors are not.
_CANNOT_CONNECT = (OSError, TimeoutError, asyncpg.PostgresError)


class AsyncpgDriver(PostgresAsyncOps):
    """asyncpg with Soniq's own pool."""

    name = "asyncpg"

    paramstyle = "numeric"
    _pool: asyncpg.Pool | None

    @property
    def _statement_options(self) -> dict[str, Any]:
        """Without prepared statements: no statement cache, so asyncpg's statements
        are unnamed and live within one round trip (safe behind PgBouncer)."""
        return {} if self.prepared_statements else {"statement_cache_size": 0}

    async def _get_pool(self) -> asyncpg.Pool:
        owner = async_owner()
        if self._pool is not None and self._owner == owner:
            return self._pool
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                reset=_keep_session,
                timeout=self.target.connect_timeout,  # each connect, the pool's refills too
                **self._statement_options,
            )
        except _CANNOT_CONNECT as exc:
            raise self.target.unavailable(exc) from exc
        if self._pool is not None and self._owner == owner:  # another task won the race
            await pool.close()
            return self._pool
        self._pool, self._owner = pool, owner
        return pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """Borrow a raw ``asyncpg`` connection from Soniq's pool. It is reset when
        given back (an open transaction rolled back; settings and role, LISTENs and
        their callbacks, advisory locks, cursors, temporary tables): the next
        borrower, or Soniq's own statements, find it as the pool made it."""
        pool = await self._get_pool()
        conn = await self._checkout(pool)
        try:
            yield conn
        finally:
            try:
                await _reset_lent(conn)
            finally:
                await pool.release(conn)

    async def _checkout(self, pool: asyncpg.Pool) -> Any:
        """A connection of the pool within ``acquire_timeout`` (a refill within
        ``connect_timeout``), or DatabaseUnavailable."""
        try:
            if pool.get_idle_size():
                # A connection is free, so there is no wait to bound, and the hot
                # path arms no timer (a timed acquire and its release cost ~13 us).
                return await pool.acquire()
            return await pool.acquire(timeout=self.target.acquire_timeout)
        except _CANNOT_CONNECT as exc:
            raise self.target.unavailable(exc, timed_out=self.target.acquire_timed_out()) from exc

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        """A connection outside the pool, closed on exit."""
        conn = await self._connect()
        try:
            yield conn
        finally:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except BaseException as exc:  # broken already: nothing to close gracefully
                conn.terminate()
                if not isinstance(exc, Exception):
                    raise

    def abort_own(self, conn: Any) -> None:
        """Abandon a connection at once (``terminate``: no goodbye, no wait); a
        statement waiting on it fails with ``ConnectionDoesNotExistError``."""
        conn.terminate()

    async def _connect(self) -> Any:
        """A new connection within ``connect_timeout``, or DatabaseUnavailable."""
        try:
            return await asyncpg.connect(
                self.dsn, timeout=self.target.connect_timeout, **self._statement_options
            )
        except _CANNOT_CONNECT as exc:
            raise self.target.unavailable(exc) from exc

    async def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        pool = await self._get_pool()
        conn = await self._checkout(pool)
        try:
            return await self.fetch_own(conn, query)
        except asyncio.CancelledError:
            # Cancelled in flight (a worker's command_timeout, a caller's own timeout):
            # the answer may never come (a silent link), so the connection is
            # terminated rather than released, which would wait for it.
            conn.terminate()
            raise
        finally:
            await pool.release(conn)

    async def fetch_own(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        """On a connection of :meth:`connect` (or one checked out of the pool)."""
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

    async def listen(
        self, on_notify: Callable[[str], None], on_ready: Callable[[], None], *, ends: bool = False
    ) -> None:
        """``soniq.drivers.base.AsyncBackend.listen`` on a dedicated connection (LISTEN)."""
        channel = self.queries.listen_channel(ends=ends)
        conn = await self._connect()
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
            on_ready()
            await lost.wait()
            raise ConnectionError("the LISTEN connection was closed by the server")
        finally:
            conn.terminate()

    async def migrate(self, *, apply: bool) -> int:
        async with self.acquire() as conn, conn.transaction():
            return await _run(conn, migration_steps(self.migrations, apply=apply))

    def _abandon(self, pool: asyncpg.Pool) -> None:
        # Its connections are cut (asyncpg's pool holds no thread to leave behind);
        # when the loop they belong to is closed already, they went with it.
        with contextlib.suppress(RuntimeError):
            pool.terminate()


async def _reset_lent(conn: Any) -> None:
    """Undo what a borrower of :meth:`AsyncpgDriver.acquire` may have changed, or
    terminate the connection (the pool reconnects) when that cannot be done.

    Not ``DISCARD ALL``: it would drop the prepared statements of asyncpg's statement
    cache behind its back. ``Connection.reset`` (advisory locks, cursors, LISTENs,
    settings) plus what it leaves out (session authorization, temporary tables,
    sequence state) instead; a transaction left open is rolled back first, quietly
    (``reset`` would report it through the loop's exception handler)."""
    if conn.is_closed():
        return
    try:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        await conn.reset()
        await conn.execute("SET SESSION AUTHORIZATION DEFAULT; DISCARD TEMP; DISCARD SEQUENCES")
    except BaseException as exc:
        conn.terminate()  # not lent again half reset
        if not isinstance(exc, Exception):
            raise


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
