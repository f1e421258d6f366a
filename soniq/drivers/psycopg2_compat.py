"""Runs core statements on a caller's psycopg2 connection (sync twin only).

Many Django and Flask apps still run on psycopg2. It shares psycopg's ``%s`` style, so
the statements rendered for psycopg serve as they are; only execution differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from soniq.core.errors import ConnectionStateError
from soniq.core.sql.postgres import PostgresQueries, Query
from soniq.drivers._common import schema_missing
from soniq.drivers.postgres_sync import PostgresSyncOps

_IN_ERROR = 3  # psycopg2.extensions.TRANSACTION_STATUS_INERROR


def is_psycopg2_connection(conn: object) -> bool:
    """True for a psycopg2 connection (checked without importing psycopg2)."""
    return any(cls.__module__.startswith("psycopg2") for cls in type(conn).__mro__) and hasattr(
        conn, "get_transaction_status"
    )


class Psycopg2Runner(PostgresSyncOps):
    """Executes on psycopg2 connections it is handed; it has no pool of its own, so
    only ``insert_jobs(spec, conn)`` is meaningful."""

    name = "psycopg2"

    def __init__(self, queries: PostgresQueries) -> None:
        self.queries = queries

    def fetch_on(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        import psycopg2.errors
        import psycopg2.extensions

        if conn.closed:
            raise ConnectionStateError("connection: the psycopg2 connection is closed")
        if conn.get_transaction_status() == _IN_ERROR:
            raise ConnectionStateError(
                "connection: its transaction has already failed; roll it back first "
                "(nothing was sent)"
            )
        # A plain cursor: the connection's cursor_factory may yield dicts.
        with conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cur:
            try:
                cur.execute(query.sql, query.params)
            except psycopg2.errors.UndefinedTable as exc:
                raise schema_missing(self.queries.schema, exc) from exc
            return cur.fetchall()  # type: ignore[no-any-return]
