"""The maintenance session of a PostgreSQL worker: what its heartbeat thread runs, on
a blocking psycopg connection of its own (so a job that blocks the event loop cannot
stop the heartbeat)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import psycopg
from psycopg.pq import ExecStatus

from soniq.core.jobs import WorkerIdentity
from soniq.core.sql.postgres import PostgresQueries, Query
from soniq.drivers._common import Target, libpq_connect_timeout, register_connection_errors

register_connection_errors(psycopg.OperationalError, psycopg.InterfaceError)

#: TCP settings of the heartbeat's connection: a peer that vanished (a host gone, a
#: NAT mapping expired) is found by the kernel, not waited on forever. Keepalives probe
#: an idle link (after 5 s, every 2 s, given up after 3 unanswered probes), and data
#: left unacknowledged for 10 s drops the connection (Linux's TCP_USER_TIMEOUT). A link
#: whose peer still acknowledges but never answers is the watchdog's job (:meth:`abort`).
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def returned_rows(cur: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> bool:
    """Whether the statement just run on ``cur`` returned rows (a statement without
    RETURNING returns none). Read from the result's status: ``cur.description``
    builds a Column per field, ~4 us a statement."""
    result = cur.pgresult
    return result is not None and result.status == ExecStatus.TUPLES_OK


class PostgresMaintenance:
    """One connection, opened within the driver's ``connect_timeout`` (else
    :class:`soniq.DatabaseUnavailable`); every method is one statement. Raises on a
    lost connection (the heartbeat opens a new session)."""

    def __init__(self, dsn: str, schema: str, target: Target, *, prepared: bool = True) -> None:
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=libpq_connect_timeout(target.connect_timeout),
                application_name="soniq heartbeat",
                # prepared=False: never prepare (PgBouncer in transaction pooling).
                **({} if prepared else {"prepare_threshold": None}),
                **KEEPALIVES,
            )
        except psycopg.OperationalError as exc:
            raise target.unavailable(exc) from exc
        except psycopg.ProgrammingError as exc:  # libpq refused the URL, perhaps quoting it
            raise target.misconfigured(exc) from None
        self._queries = PostgresQueries(schema, "format")

    def _fetch(self, query: Query) -> list[Any]:
        cur = self._conn.execute(query.sql, query.params)
        return cur.fetchall() if returned_rows(cur) else []

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh the worker's heartbeat; False if it was declared dead meanwhile."""
        return bool(self._fetch(self._queries.heartbeat(worker_id)))

    def register_worker(self, worker: WorkerIdentity) -> None:
        self._fetch(self._queries.register_worker(worker))

    def cancel_requests(self, worker_id: str) -> list[int]:
        return [row[0] for row in self._fetch(self._queries.cancel_requests(worker_id))]

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        return [(row[0], row[1]) for row in self._fetch(self._queries.rescue_stale(stale_after))]

    def prune_finished(self, older_than: float, limit: int) -> int:
        query = self._queries.prune_finished(older_than, limit)
        return self._conn.execute(query.sql, query.params).rowcount

    def analyze_if_never(self, rows: int) -> bool | None:
        [(never, enough)] = self._fetch(self._queries.never_analyzed(rows)) or [(False, False)]
        if not never:
            return False
        if not enough:
            return None  # too few rows for a plan to matter yet: ask again later
        # A role that does not own the table gets a WARNING from the server, not an
        # error, and the table keeps no statistics: autovacuum will make them.
        self._conn.execute(self._queries.analyze())
        return True

    def abort(self) -> None:
        """Shut the connection's socket down, from another thread while a call waits
        on it: the call fails at once with ``OperationalError``. Only while a call is
        in flight (the caller makes sure): the descriptor is the connection's until
        :meth:`close`."""
        shutdown_socket(self._conn)

    def close(self) -> None:
        self._conn.close()


def shutdown_socket(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """Shut down the socket of a psycopg connection, in both directions, without
    closing its descriptor (which stays the connection's, so it cannot be reused by
    another socket under libpq's feet): whoever waits on it wakes up to an end of
    file. A connection that is closed already is left alone."""
    with contextlib.suppress(Exception):
        if conn.closed:
            return
        fd = conn.fileno()
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
