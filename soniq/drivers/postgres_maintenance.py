"""The maintenance session of a PostgreSQL worker: what its heartbeat thread runs, on
a blocking psycopg connection of its own (so a job that blocks the event loop cannot
stop the heartbeat)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from soniq.core.sql.postgres import PostgresQueries, Query
from soniq.drivers._common import Target, libpq_connect_timeout, register_connection_errors

register_connection_errors(psycopg.OperationalError, psycopg.InterfaceError)


class PostgresMaintenance:
    """One connection, opened within the driver's ``connect_timeout`` (else
    :class:`soniq.DatabaseUnavailable`); every method is one statement. Raises on a
    lost connection (the heartbeat opens a new session)."""

    def __init__(self, dsn: str, schema: str, target: Target) -> None:
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=libpq_connect_timeout(target.connect_timeout),
                application_name="soniq heartbeat",
            )
        except psycopg.OperationalError as exc:
            raise target.unavailable(exc) from exc
        self._queries = PostgresQueries(schema, "format")

    def _fetch(self, query: Query) -> list[Any]:
        cur = self._conn.execute(query.sql, query.params)
        return cur.fetchall() if cur.description else []

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh the worker's heartbeat; False if it was declared dead meanwhile."""
        return bool(self._fetch(self._queries.heartbeat(worker_id)))

    def register_worker(
        self,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: Sequence[str] | None,
        concurrency: int,
    ) -> None:
        self._fetch(self._queries.register_worker(worker_id, hostname, pid, queues, concurrency))

    def cancel_requests(self, worker_id: str) -> list[int]:
        return [row[0] for row in self._fetch(self._queries.cancel_requests(worker_id))]

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        return [(row[0], row[1]) for row in self._fetch(self._queries.rescue_stale(stale_after))]

    def prune_finished(self, older_than: float, limit: int) -> int:
        query = self._queries.prune_finished(older_than, limit)
        return self._conn.execute(query.sql, query.params).rowcount

    def close(self) -> None:
        self._conn.close()
