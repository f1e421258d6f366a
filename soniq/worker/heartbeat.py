"""The heartbeat: a thread with its own connection, so that a job that blocks the
event loop cannot make its worker look dead and get its work run twice.

Each beat refreshes this worker's row, collects cancellation requests for its running
jobs, rescues the jobs of workers whose heartbeat is stale, and prunes old finished
jobs. Losing the connection is logged and retried with back-off.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from soniq.drivers._common import is_connection_error
from soniq.drivers.base import MaintenanceSession

log = logging.getLogger("soniq.worker")

PRUNE_BATCH = 5000


class Heartbeat(threading.Thread):
    """Beats every ``interval`` seconds until :meth:`stop`, on a maintenance session
    of its own (``open_session()``), opened again after an error."""

    def __init__(
        self,
        *,
        open_session: Callable[[], MaintenanceSession],
        identity: tuple[str, str, int, Sequence[str] | None, int],
        interval: float,
        stale_after: float,
        retention: float | None,
        on_cancel: Callable[[Sequence[int]], object],
    ) -> None:
        super().__init__(name=f"soniq-heartbeat-{identity[0][:8]}", daemon=True)
        self._open_session = open_session
        self._identity = identity
        self._worker_id = identity[0]
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
        session: MaintenanceSession | None = None
        failures = 0
        while not self._stopped.is_set():
            try:
                if session is None:
                    session = self._open_session()
                    if failures:
                        log.info("heartbeat connection restored")
                self.beat(session)
                failures = 0
            except Exception as exc:  # the thread must not die: that would look like death
                failures += 1
                if is_connection_error(exc):
                    log.warning("heartbeat failed (%s); retrying", exc)
                else:
                    log.exception("heartbeat failed; retrying")
                if session is not None:
                    with contextlib.suppress(Exception):
                        session.close()
                session = None
            wait = self._interval if not failures else min(self._interval, 0.5 * failures)
            self._stopped.wait(wait)
        if session is not None:
            session.close()

    def beat(self, session: MaintenanceSession) -> None:
        """One pass: heartbeat, cancellation requests, rescue, prune."""
        if not session.heartbeat(self._worker_id):
            # Declared dead (a pause longer than the stale timeout): our jobs were put
            # back and their late finishes will be fenced off. Register again.
            log.warning("worker %s was declared dead; registering again", self._worker_id)
            session.register_worker(*self._identity)
        requested = session.cancel_requests(self._worker_id)
        if requested:
            self._on_cancel(requested)
        rescued = session.rescue_stale(self._stale_after)
        if rescued:
            log.warning(
                "rescued %d job(s) of dead workers: %s",
                len(rescued),
                ", ".join(f"{job_id}->{status}" for job_id, status in rescued[:20]),
            )
        if self._retention and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + max(60.0, self._interval)
            for _ in range(20):  # bounded per beat; the next beat goes on
                deleted = session.prune_finished(self._retention, PRUNE_BATCH)
                if deleted:
                    log.debug("pruned %d finished job(s)", deleted)
                if deleted < PRUNE_BATCH:
                    break
