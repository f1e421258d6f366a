"""The heartbeat: a thread with its own connection, so that a job that blocks the
event loop cannot make its worker look dead and get its work run twice.

Each beat refreshes this worker's row, collects cancellation requests for its running
jobs, rescues the jobs of workers whose heartbeat is stale, and prunes old finished
jobs. Losing the connection is logged and retried with back-off.

No call may wait forever on a connection that went silent (a half-open link: the
server's answers stop arriving and nothing closes): a watchdog thread aborts the
session (:meth:`MaintenanceSession.abort`) when one call has been in flight for
longer than ``command_timeout``, so that the call fails and the heartbeat reconnects
well before the worker would be declared dead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from soniq.core.jobs import WorkerIdentity
from soniq.drivers._common import is_connection_error
from soniq.drivers.base import MaintenanceSession

log = logging.getLogger("soniq.worker")

PRUNE_BATCH = 5000
#: A job table with no statistics and this many rows is analyzed by the first heartbeat
#: that sees it: without statistics PostgreSQL plans the claim as a scan and sort of
#: every queued row (a fresh table loaded in bulk, before autovacuum's first pass).
#: The worker's first claim waits for its first heartbeat.
ANALYZE_ROWS = 1000

T = TypeVar("T")


class Heartbeat(threading.Thread):
    """Beats every ``interval`` seconds until :meth:`stop`, on a maintenance session
    of its own (``open_session()``), opened again after an error."""

    def __init__(
        self,
        *,
        open_session: Callable[[], MaintenanceSession],
        identity: WorkerIdentity,
        interval: float,
        stale_after: float,
        retention: float | None,
        on_cancel: Callable[[Sequence[int]], object],
        command_timeout: float,
    ) -> None:
        super().__init__(name=f"soniq-heartbeat-{identity.id[:8]}", daemon=True)
        self._open_session = open_session
        self._identity = identity
        self._worker_id = identity.id
        self._interval = interval
        self._stale_after = stale_after
        self._retention = retention
        self._on_cancel = on_cancel
        self._stopped = threading.Event()
        self._next_prune = 0.0
        self._statistics_checked = False  # the job table has statistics, or we tried
        #: Set once the first beat has ended, well or not: the worker claims after it.
        self.first_beat = threading.Event()
        #: A call longer than this is aborted (WorkerConfig.command_timeout).
        self._command_timeout = command_timeout
        # The call in flight, for the watchdog: its session and its deadline. Set and
        # cleared under the lock, and the watchdog aborts under it, so a session is
        # aborted only while its call runs (never after it was closed).
        self._lock = threading.Lock()
        self._in_flight: tuple[MaintenanceSession, float] | None = None
        self._watch = threading.Event()
        #: Calls aborted by the watchdog (for tests and logs).
        self.aborted = 0
        # When the last beat that reached the database started (monotonic); the
        # worker registered just before this thread was made.
        self._confirmed = time.monotonic()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and wait for it (bounded)."""
        self._stopped.set()
        self._watch.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        watchdog = threading.Thread(
            target=self._watchdog, name=f"{self.name}-watchdog", daemon=True
        )
        watchdog.start()
        try:
            self._beat_forever()
        finally:
            self.first_beat.set()  # stopped before its first beat: nobody waits for it
            self._stopped.set()
            self._watch.set()

    def _beat_forever(self) -> None:
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
            self.first_beat.set()
            wait = self._interval if not failures else min(self._interval, 0.5 * failures)
            self._stopped.wait(wait)
        if session is not None:
            session.close()

    def _bounded(self, session: MaintenanceSession, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, a call on ``session``, watched: aborted by the watchdog
        if it outlasts ``command_timeout``."""
        with self._lock:
            self._in_flight = (session, time.monotonic() + self._command_timeout)
        self._watch.set()
        try:
            return call(*args)
        finally:
            with self._lock:
                self._in_flight = None

    def _watchdog(self) -> None:
        """Abort the session of a call in flight past its deadline; sleeps otherwise."""
        while not self._stopped.is_set():
            self._watch.clear()
            with self._lock:
                in_flight = self._in_flight
                wait: float | None = None
                if in_flight is not None:
                    session, deadline = in_flight
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        self._in_flight, wait = None, None
                        self.aborted += 1
                        log.warning(
                            "heartbeat: no answer within command_timeout=%gs; abandoning "
                            "its connection",
                            self._command_timeout,
                        )
                        session.abort()
            self._watch.wait(wait)

    def unconfirmed_for(self) -> float:
        """Seconds since the start of the last beat that reached the database: past
        ``stale_after`` other workers may have declared this one dead, and would put
        back what it claims until it registers again (the worker claims nothing
        meanwhile)."""
        return time.monotonic() - self._confirmed

    def beat(self, session: MaintenanceSession) -> None:
        """One pass: heartbeat, cancellation requests, rescue, statistics (until the
        job table has some), prune."""
        call = self._bounded
        started = time.monotonic()
        if not call(session, session.heartbeat, self._worker_id):
            # Declared dead (a pause longer than the stale timeout): our jobs were put
            # back and their late finishes will be fenced off. Register again.
            log.warning("worker %s was declared dead; registering again", self._worker_id)
            call(session, session.register_worker, self._identity)
        self._confirmed = started
        requested = call(session, session.cancel_requests, self._worker_id)
        if requested:
            self._on_cancel(requested)
        rescued = call(session, session.rescue_stale, self._stale_after)
        if rescued:
            log.warning(
                "rescued %d job(s) of dead workers: %s",
                len(rescued),
                ", ".join(f"{job_id}->{status}" for job_id, status in rescued[:20]),
            )
        if not self._statistics_checked:
            # Tried once per worker, whatever happens (an ANALYZE that fails or outlasts
            # command_timeout is left to autovacuum); asked again only while the table
            # is too small to matter.
            self._statistics_checked = True
            analyzed = call(session, session.analyze_if_never, ANALYZE_ROWS)
            if analyzed is None:
                self._statistics_checked = False
            if analyzed:
                log.info("analyzed the job table, which had no statistics yet")
        if self._retention and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + max(60.0, self._interval)
            for _ in range(20):  # bounded per beat; the next beat goes on
                deleted = call(session, session.prune_finished, self._retention, PRUNE_BATCH)
                if deleted:
                    log.debug("pruned %d finished job(s)", deleted)
                if deleted < PRUNE_BATCH:
                    break
