"""The psycopg 3 async driver, with ``psycopg_pool.AsyncConnectionPool``.

This file is the source of ``psycopg_sync.py``, which ``tools/unasync.py`` generates
from it; CI fails when the generated file is out of date. Write code here that the
plain renames in that tool turn into correct blocking code.

Every connection it opens has ``connect_timeout`` (libpq's: whole seconds, at least
2), every checkout from its pool ``acquire_timeout``; a failure of either is
:class:`soniq.DatabaseUnavailable`.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.sql
from psycopg import generators
from psycopg.pq import DiagnosticField, ExecStatus, TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from soniq.core.errors import ConnectionStateError
from soniq.core.jobs import JobSpec
from soniq.core.sql.migrate import MigrationSteps, migration_steps
from soniq.core.sql.postgres import PostgresQueries, Query, group_ids
from soniq.drivers._common import (
    async_only,
    async_owner,
    has_unread_input,
    libpq_connect_timeout,
    register_connection_errors,
    schema_missing,
)
from soniq.drivers.postgres_async import PostgresAsyncOps
from soniq.drivers.postgres_maintenance import returned_rows, shutdown_socket

register_connection_errors(psycopg.OperationalError, psycopg.InterfaceError)

#: What a caller may hand to ``enqueue(connection=...)`` for this driver.
CONNECTION_TYPES = (psycopg.AsyncConnection,)

#: The name of the merged enqueue statement on the connections of Soniq's pool
#: (psycopg's own prepared statements are named ``_pg3_<n>``).
GROUP_STATEMENT = b"soniq_insert_group"
#: SQLSTATE invalid_sql_statement_name: a prepared statement that is not there.
_NO_SUCH_STATEMENT = b"26000"


class PsycopgAsyncDriver(PostgresAsyncOps):
    """psycopg 3 with Soniq's own pool (autocommit connections)."""

    name = "psycopg"

    paramstyle = "format"
    _pool: AsyncConnectionPool[Any] | None

    def __init__(self, dsn: str, **options: Any) -> None:
        super().__init__(dsn, **options)
        #: The merged enqueue statement with libpq's ``$1`` (see :meth:`_insert_group`).
        self._group_sql = PostgresQueries(self.queries.schema, "numeric").insert_group([]).sql
        #: The pool's connections :data:`GROUP_STATEMENT` was prepared on.
        self._prepared: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def _connect_kwargs(self) -> dict[str, Any]:
        """Every connection Soniq's pool opens is autocommit, and bounded in time."""
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": libpq_connect_timeout(self.target.connect_timeout),
        }
        if not self.prepared_statements:
            kwargs["prepare_threshold"] = None  # never prepare (PgBouncer)
        return kwargs

    async def _get_pool(self) -> AsyncConnectionPool[Any]:
        owner = async_owner()
        if self._pool is not None and self._owner == owner:
            return self._pool
        # One connection of our own first: a server that is down, silent or refusing
        # fails here, within connect_timeout and in libpq's words. (The pool would
        # retry in the background until its timeout and then say only PoolTimeout.)
        await (await self._connect()).close()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs=self._connect_kwargs,
            open=False,
            name="soniq",
            check=_check_connection,
            timeout=self.target.acquire_timeout,  # getconn's default
        )
        try:
            await pool.open(wait=True, timeout=self.target.acquire_timeout)
        except PoolTimeout as exc:
            await pool.close()
            raise self.target.unavailable(exc) from exc
        if self._pool is not None and self._owner == owner:  # another caller won the race
            await pool.close()
            return self._pool
        self._pool, self._owner = pool, owner
        return pool

    async def _checkout(self, pool: AsyncConnectionPool[Any]) -> Any:
        """A connection of the pool within ``acquire_timeout``, or DatabaseUnavailable."""
        try:
            return await pool.getconn()
        except PoolTimeout as exc:
            raise self.target.unavailable(exc) from exc

    async def _connect(self) -> Any:
        """A new autocommit connection within ``connect_timeout``, or
        DatabaseUnavailable."""
        try:
            return await psycopg.AsyncConnection.connect(self.dsn, **self._connect_kwargs)
        except psycopg.OperationalError as exc:
            raise self.target.unavailable(exc) from exc
        except psycopg.ProgrammingError as exc:  # libpq refused the URL, perhaps quoting it
            raise self.target.misconfigured(exc) from None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """Borrow a raw ``psycopg.AsyncConnection`` (autocommit) from Soniq's pool.
        It is reset when given back (transaction, settings, LISTENs, advisory locks,
        temporary tables, the connection's Python-side options): the next borrower,
        or Soniq's own statements, find it as the pool made it."""
        pool = await self._get_pool()
        conn = await self._checkout(pool)
        options = (conn.row_factory, conn.cursor_factory, conn.prepare_threshold)
        try:
            yield conn
        finally:
            try:
                await _reset_lent(conn, options)
            finally:
                await pool.putconn(conn)

    @async_only
    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        """A connection outside the pool (autocommit), closed on exit (no ROLLBACK or
        COMMIT first: a broken or abandoned connection is just let go)."""
        conn = await self._connect()
        try:
            yield conn
        finally:
            await conn.close()

    @async_only
    def abort_own(self, conn: Any) -> None:
        """Abandon a connection at once: its socket is shut down (not closed: the
        descriptor stays the connection's until it is closed), so a statement
        waiting on it fails with ``OperationalError`` instead of waiting on, as
        psycopg's own cancellation would (it asks the server, then waits 5 s more)."""
        shutdown_socket(conn)

    async def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        pool = await self._get_pool()
        conn = await self._checkout(pool)
        try:
            return await self._execute(conn, query)
        finally:
            await pool.putconn(conn)

    @async_only
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
            return await cur.fetchall() if returned_rows(cur) else []

    async def _insert_group(self, specs: Sequence[JobSpec]) -> list[int]:
        """The merged statement of the enqueue line (:mod:`soniq.drivers.insert_lines`),
        sent on psycopg's libpq connection (``pgconn``), not through a cursor. Its one
        parameter is text and its rows an id and a key: psycopg's adaptation, row
        loading and prepared-statement counts buy nothing here, and were a third of
        the Python time of a merged enqueue (50-58 us of CPU per statement of 8 calls
        against 64-77, one thread, three alternating runs). What a cursor would do
        stays:

        - the wait is psycopg's (``Connection.wait``): a Ctrl-C, or a task's
          cancellation, cancels the statement on the server;
        - a failure raises psycopg's own error class (a lost connection
          ``OperationalError``, a refused row its ``IntegrityError``...), on which
          the line decides to retry the calls one by one or not;
        - the statement is prepared once per connection (again if a borrower of the
          connection deallocated it), or never with ``prepared_statements=False``.
        """
        params = [self.queries.insert_group(specs).params[0].encode()]
        pool = await self._get_pool()
        conn = await self._checkout(pool)
        try:
            encoding = conn.info.encoding  # (for the SQL, and the keys and errors read back)
            async with conn.lock:
                result = await self._run_group(conn, encoding, params)
        finally:
            await pool.putconn(conn)
        if result.status != ExecStatus.TUPLES_OK:
            exc = psycopg.errors.error_from_result(result, encoding=encoding)
            if isinstance(exc, psycopg.errors.UndefinedTable):
                raise schema_missing(self.queries.schema, exc) from exc
            raise exc
        rows = []
        for row in range(result.ntuples):
            key = result.get_value(row, 1)
            rows.append(
                (int(result.get_value(row, 0)), None if key is None else key.decode(encoding))
            )
        return group_ids(specs, rows)

    async def _run_group(self, conn: Any, encoding: str, params: list[bytes]) -> Any:
        """The merged statement's result on ``conn`` (its lock held), preparing it first
        on a connection that does not have it (its SQL is sent in the connection's
        client ``encoding``, as a cursor sends it, and only when it is sent)."""
        pgconn = conn.pgconn
        if not self.prepared_statements:  # (PgBouncer: an unnamed statement)
            pgconn.send_query_params(self._group_sql.encode(encoding), params)
            return (await conn.wait(generators.execute(pgconn)))[-1]
        for _ in range(2):
            if conn not in self._prepared:
                # Counted as prepared before it is: interrupted once the server has
                # prepared it, preparing it again would fail ("already exists") on
                # every later statement; not prepared after all, running it says so
                # (26000, below) and it is prepared then.
                self._prepared.add(conn)
                pgconn.send_prepare(GROUP_STATEMENT, self._group_sql.encode(encoding))
                prepared = (await conn.wait(generators.execute(pgconn)))[-1]
                if prepared.status != ExecStatus.COMMAND_OK:
                    self._prepared.discard(conn)
                    return prepared
            pgconn.send_query_prepared(GROUP_STATEMENT, params)
            result = (await conn.wait(generators.execute(pgconn)))[-1]
            if result.error_field(DiagnosticField.SQLSTATE) != _NO_SUCH_STATEMENT:
                return result
            self._prepared.discard(conn)  # deallocated by a borrower: prepared again
        return result

    @async_only
    async def listen(
        self, on_notify: Callable[[str], None], on_ready: Callable[[], None], *, ends: bool = False
    ) -> None:
        """``soniq.drivers.base.AsyncBackend.listen`` on a dedicated connection (LISTEN)."""
        channel = self.queries.listen_channel(ends=ends)
        async with await self._connect() as conn:
            await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
            on_ready()
            async for notify in conn.notifies():
                on_notify(notify.payload)

    async def migrate(self, *, apply: bool) -> int:
        pool = await self._get_pool()
        conn = await self._checkout(pool)
        try:
            async with conn.transaction():
                return await _run(conn, migration_steps(self.migrations, apply=apply))
        finally:
            await pool.putconn(conn)


#: DISCARD ALL but DEALLOCATE ALL (see :func:`_reset_lent`), in its order.
_RESET_SESSION = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES"
)


async def _reset_lent(conn: psycopg.AsyncConnection[Any], options: tuple[Any, ...]) -> None:
    """Undo what a borrower of :meth:`PsycopgAsyncDriver.acquire` may have changed, or
    close the connection (the pool then replaces it) when that cannot be done.

    The session is reset as ``DISCARD ALL`` would, except for prepared statements:
    settings and role, LISTENs, advisory locks, cursors, cached plans, temporary
    tables and sequences. Prepared statements stay: psycopg prepares the borrower's
    frequent queries itself and notices a ``DISCARD ALL`` only sometimes (not when
    the command is already in its statement counts), so dropping them on the server
    made a later loan run a name that was gone ("prepared statement _pg3_4 does not
    exist", found by the benchmark's transactional case). (asyncpg gets its own
    ``Connection.reset``.)
    """
    if conn.closed:
        return
    try:
        status = conn.info.transaction_status
        if status == TransactionStatus.ACTIVE:  # a query or COPY left running
            await conn.close()
            return
        if status != TransactionStatus.IDLE:
            await conn.rollback()
        if not conn.autocommit:
            await conn.set_autocommit(True)
        if conn.isolation_level is not None:
            await conn.set_isolation_level(None)
        if conn.read_only is not None:
            await conn.set_read_only(None)
        if conn.deferrable is not None:
            await conn.set_deferrable(None)
        conn.row_factory, conn.cursor_factory, conn.prepare_threshold = options
        await conn.execute(_RESET_SESSION, prepare=False)
        # Notifications that arrived after the borrower's last read wait in psycopg's
        # backlog; the next notifies() would return them.
        async for _ in conn.notifies(timeout=0):
            pass
    except BaseException as exc:
        await conn.close()  # not lent again half reset: the pool replaces it
        if not isinstance(exc, Exception):
            raise


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
