"""The heartbeat: a thread with its own connection, so that a job that blocks the
event loop cannot make its worker look dead and get its work run twice.

Each beat refreshes this worker's row, collects cancellation requests for its running
jobs, rescues the jobs of workers whose heartbeat is stale, and prunes old finished
jobs. Losing the connection is logged and retried with back-off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from soniq.core.sql.postgres import PostgresQueries, Query

log = logging.getLogger("soniq.worker")

PRUNE_BATCH = 5000


class Heartbeat(threading.Thread):
    """Beats every ``interval`` seconds until :meth:`stop`."""

    def __init__(
        self,
        *,
        dsn: str,
        queries: PostgresQueries,
        worker_id: str,
        register: Query,
        interval: float,
        stale_after: float,
        retention: float | None,
        on_cancel: Callable[[Sequence[int]], object],
    ) -> None:
        super().__init__(name=f"soniq-heartbeat-{worker_id[:8]}", daemon=True)
        self._dsn = dsn
        self._queries = queries
        self._worker_id = worker_id
        self._register = register
        self._interval = interval
        self._stale_after = stale_after
        self._retention = retention
        self._on_cancel = on_cancel
        self._stopped = threading.Event()
        self._next_prune = 0.0

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and wait for it (bounded)."""
        self._stopped.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        failures = 0
        while not self._stopped.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
                    if failures:
                        log.info("heartbeat connection restored")
                self.beat(conn)
                failures = 0
            except Exception as exc:  # the thread must not die: that would look like death
                failures += 1
                if isinstance(exc, psycopg.Error):
                    log.warning("heartbeat failed (%s); retrying", exc)
                else:
                    log.exception("heartbeat failed; retrying")
                if conn is not None:
                    conn.close()
                conn = None
            wait = self._interval if not failures else min(self._interval, 0.5 * failures)
            self._stopped.wait(wait)
        if conn is not None:
            conn.close()

    def beat(self, conn: psycopg.Connection[Any]) -> None:
        """One pass: heartbeat, cancellation requests, rescue, prune."""
        if not self._fetch(conn, self._queries.heartbeat(self._worker_id)):
            # Declared dead (a pause longer than the stale timeout): our jobs were put
            # back and their late finishes will be fenced off. Register again.
            log.warning("worker %s was declared dead; registering again", self._worker_id)
            self._fetch(conn, self._register)
        requested = self._fetch(conn, self._queries.cancel_requests(self._worker_id))
        if requested:
            self._on_cancel([row[0] for row in requested])
        rescued = self._fetch(conn, self._queries.rescue_stale(self._stale_after))
        if rescued:
            log.warning(
                "rescued %d job(s) of dead workers: %s",
                len(rescued),
                ", ".join(f"{job_id}->{status}" for job_id, status in rescued[:20]),
            )
        if self._retention and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + max(60.0, self._interval)
            self._prune(conn, self._retention)

    def _prune(self, conn: psycopg.Connection[Any], retention: float) -> None:
        for _ in range(20):  # bounded per beat; the next beat goes on
            query = self._queries.prune_finished(retention, PRUNE_BATCH)
            deleted = conn.execute(query.sql, query.params).rowcount
            if deleted:
                log.debug("pruned %d finished job(s)", deleted)
            if deleted < PRUNE_BATCH:
                return

    @staticmethod
    def _fetch(conn: psycopg.Connection[Any], query: Query) -> list[Any]:
        cur = conn.execute(query.sql, query.params)
        return cur.fetchall() if cur.description else []
