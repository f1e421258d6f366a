"""What every backend implements: job operations, async (:class:`AsyncBackend`) and
blocking (:class:`SyncBackend`), and the maintenance session a worker's heartbeat
thread uses (:class:`MaintenanceSession`).

Every backend runs statements built by ``soniq.core``: the PostgreSQL drivers those
of ``core/sql/postgres.py`` (``postgres_async.py``), the SQLite backends, ``memory://``
included, those of ``core/sql/sqlite.py``; ``tests/test_conformance.py`` holds them all
to the same rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

from soniq.core.admin import BacklogShape, JobFilter, QueueStats, Stats, WorkerInfo
from soniq.core.flow import ClaimLimits, QueueLimits
from soniq.core.jobs import Claimed, Job, JobNode, JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.states import JobStatus


class MaintenanceSession(Protocol):
    """Blocking operations of a worker's heartbeat thread, on a connection of its own.
    Any method may raise on a lost connection; the caller opens a new session."""

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh the heartbeat; False if the worker was declared dead meanwhile."""

    def register_worker(self, worker: WorkerIdentity) -> None:
        """Record the worker (again)."""

    def cancel_requests(self, worker_id: str) -> list[int]:
        """Ids of the worker's running jobs whose cancellation was requested."""

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        """Put back the running jobs of dead workers: (id, new status) pairs."""

    def prune_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` jobs finished ``older_than`` seconds ago; how many."""

    def analyze_if_never(self, rows: int) -> bool | None:
        """Give the job table statistics if it has none yet while holding ``rows``
        rows or more: True if it was analyzed now, False if it has statistics, None
        if it still has too few rows to tell (or the database needs none)."""

    def abort(self) -> None:
        """Make a call that waits on the session's connection now, in another thread,
        fail at once as on a lost connection (the heartbeat's watchdog calls this when
        a call outlasts the worker's ``command_timeout``). Called only while a call is
        in flight; the session is then closed and a new one opened. A session with no
        link to lose (an embedded database) does nothing."""

    def close(self) -> None:
        """Close the session's connection."""


class WorkerStatements(Protocol):
    """A worker's claims and completions: on a backend, and on one of its sessions."""

    async def claim_jobs(
        self,
        limit: int,
        worker_id: str,
        queues: Sequence[str] | None,
        names: Sequence[str] | None = None,
        limits: ClaimLimits | None = None,
    ) -> list[Claimed]:
        """Claim up to ``limit`` ready jobs for ``worker_id``, of ``queues`` and of
        ``names`` (None: all); told of ``limits`` (a worker's claim), within them and
        within the stored queue limits."""

    async def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        """Write outcomes, fenced by worker and attempt (``keep=False`` deletes the
        finished ones)."""

    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        """Put back the worker's running jobs that it does not hold; how many."""


class WorkerOps(WorkerStatements, Protocol):
    """What a worker's loop does with its session (see :meth:`AsyncBackend.worker_session`)."""

    def abort(self) -> None:
        """Abandon the session's connection at once (no goodbye, no wait), so that a
        statement waiting on it fails as on a lost connection: what the worker does
        when one gets no answer within ``command_timeout``. A no-op where there is no
        link to lose."""


class AsyncBackend(WorkerStatements, Protocol):
    """Where jobs live, seen from async code."""

    name: str
    #: Whether enqueue accepts ``connection=`` (only PostgreSQL has a caller's
    #: transaction to join).
    accepts_connections: bool

    @property
    def one_writer(self) -> bool:
        """The database commits one writer at a time (an embedded file), so each of a
        worker's claims is a commit that waits its turn; a server runs them side by
        side. The worker tunes its claims to it."""

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        """A raw connection of the backend's own pool."""

    async def migrate(self, *, apply: bool) -> int:
        """Apply pending migrations (or, with ``apply=False``, only check them)."""

    async def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call (on a caller's ``conn``); ids in order."""

    async def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""

    async def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name or queue, oldest first (on ``conn``,
        a caller's connection, when given: it sees the caller's own transaction)."""

    async def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""

    async def pause_queue(self, queue: str) -> bool:
        """Pause ``queue``: no worker claims its jobs until it is resumed. True when it
        was not paused."""

    async def resume_queue(self, queue: str) -> bool:
        """Resume a paused ``queue`` and wake its workers; True when it was paused."""

    async def paused_queues(self) -> list[str]:
        """The paused queues, by name."""

    async def set_queue_limits(self, queue: str, limits: QueueLimits) -> None:
        """Store the limits of ``queue`` (None fields: no limit)."""

    async def queue_limits(self) -> dict[str, QueueLimits]:
        """The queues with stored limits, by name."""

    async def next_due(self, queues: Sequence[str] | None, names: Sequence[str]) -> float | None:
        """In how many seconds the first queued job of ``queues`` (None: all) and
        ``names`` is due (negative when overdue; None when there is none), paused
        queues left out (a burst worker's question before it exits)."""

    def worker_session(self) -> AbstractAsyncContextManager[WorkerOps]:
        """The claims and completions of one loop of a worker (a claim lane, the
        completer) on one connection held throughout, which saves a pool checkout per
        statement. After an error the session is closed and another one opened."""

    async def register_worker(self, worker: WorkerIdentity) -> None:
        """Record a worker; its heartbeat starts now."""

    async def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""

    async def last_ticks(self, keys: Sequence[str]) -> dict[str, dt.datetime]:
        """The last tick recorded of each periodic schedule of ``keys`` that has one."""

    async def enqueue_tick(
        self, key: str, tick: dt.datetime, spec: JobSpec, *, enqueue: bool
    ) -> int | None:
        """Move schedule ``key``'s last tick to ``tick`` if it is newer, and then (with
        ``enqueue``) insert the job of ``spec`` due at ``tick``; its id, or None when
        nothing was inserted (another worker had moved it, or ``enqueue`` was false)."""

    async def listen(
        self, on_notify: Callable[[str], None], on_ready: Callable[[], None], *, ends: bool = False
    ) -> None:
        """Call ``on_notify(queues)`` when jobs are enqueued, until the connection is
        lost (then raise). ``on_ready`` once listening. With ``ends``: call
        ``on_notify(ids)`` (comma-separated) when awaited jobs end (see
        :meth:`mark_awaited`), where the backend can tell (else never)."""

    async def page_jobs(self, selection: JobFilter) -> list[Job]:
        """A page of jobs, newest first (see :class:`soniq.core.admin.JobFilter`)."""

    async def retry_job(self, job_id: int) -> bool:
        """Put a failed or cancelled job back in line, due now, its attempts counted
        from zero; False when it is not one, or another active job holds its
        dedupe key."""

    async def retry_failed(self, queue: str | None, name: str | None, limit: int) -> int:
        """Put up to ``limit`` failed jobs of ``queue`` and ``name`` (None: any) back in
        line, oldest first, one per dedupe key; how many (0: none is left)."""

    async def list_workers(self) -> list[WorkerInfo]:
        """The registered workers, oldest first, each with the jobs it runs."""

    async def backlog_shapes(self) -> list[BacklogShape]:
        """The jobs waiting to run (waiting, queued), grouped by name and argument
        names."""

    async def queue_stats(self) -> list[QueueStats]:
        """Every queue that has jobs other than done ones, or stored settings: its
        counts by status and settings, by name."""

    async def stats(self, minutes: int, queue: str | None) -> Stats:
        """The jobs (of ``queue``; None: all) ended per minute over the last
        ``minutes`` minutes, by the database's clock."""

    async def purge_jobs(self, older_than: float, statuses: Sequence[JobStatus], limit: int) -> int:
        """Delete up to ``limit`` finished jobs of ``statuses`` that ended more than
        ``older_than`` seconds ago; how many (0: none is left)."""

    async def mark_awaited(self, job_id: int) -> bool:
        """Mark an active job as awaited (its end is told to :meth:`listen` with
        ``ends``); False when it is not active (finished, or unknown)."""

    async def insert_graph(self, nodes: Sequence[JobNode], conn: Any = None) -> list[int]:
        """Insert jobs that wait for one another: each node's ``spec.parents``
        (existing jobs) and the earlier nodes of its ``after``; ids in input order.
        :class:`soniq.JobNotFound` (nothing inserted) when a parent does not exist."""

    async def set_progress(
        self, job_id: int, claims: int, progress: float, message: str | None
    ) -> None:
        """Store the progress run ``claims`` of a job reported."""

    def maintenance(self) -> MaintenanceSession:
        """A blocking session of its own, for the heartbeat thread."""

    async def close(self) -> None:
        """Release the backend's resources; a later call opens them again."""


class SyncBackend(Protocol):
    """Where jobs live, seen from blocking code (``eq.sync``)."""

    name: str
    accepts_connections: bool

    def acquire(self) -> AbstractContextManager[Any]:
        """A raw connection of the backend's own pool."""

    def migrate(self, *, apply: bool) -> int:
        """Apply pending migrations (or, with ``apply=False``, only check them)."""

    def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call (on a caller's ``conn``); ids in order."""

    def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""

    def insert_graph(self, nodes: Sequence[JobNode], conn: Any = None) -> list[int]:
        """Blocking :meth:`AsyncBackend.insert_graph`."""

    def page_jobs(self, selection: JobFilter) -> list[Job]:
        """Blocking :meth:`AsyncBackend.page_jobs`."""

    def retry_job(self, job_id: int) -> bool:
        """Blocking :meth:`AsyncBackend.retry_job`."""

    def retry_failed(self, queue: str | None, name: str | None, limit: int) -> int:
        """Blocking :meth:`AsyncBackend.retry_failed`."""

    def list_workers(self) -> list[WorkerInfo]:
        """Blocking :meth:`AsyncBackend.list_workers`."""

    def backlog_shapes(self) -> list[BacklogShape]:
        """Blocking :meth:`AsyncBackend.backlog_shapes`."""

    def queue_stats(self) -> list[QueueStats]:
        """Blocking :meth:`AsyncBackend.queue_stats`."""

    def stats(self, minutes: int, queue: str | None) -> Stats:
        """Blocking :meth:`AsyncBackend.stats`."""

    def purge_jobs(self, older_than: float, statuses: Sequence[JobStatus], limit: int) -> int:
        """Blocking :meth:`AsyncBackend.purge_jobs`."""

    def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Blocking :meth:`AsyncBackend.list_jobs`."""

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""

    def pause_queue(self, queue: str) -> bool:
        """Blocking :meth:`AsyncBackend.pause_queue`."""

    def resume_queue(self, queue: str) -> bool:
        """Blocking :meth:`AsyncBackend.resume_queue`."""

    def paused_queues(self) -> list[str]:
        """Blocking :meth:`AsyncBackend.paused_queues`."""

    def set_queue_limits(self, queue: str, limits: QueueLimits) -> None:
        """Blocking :meth:`AsyncBackend.set_queue_limits`."""

    def queue_limits(self) -> dict[str, QueueLimits]:
        """Blocking :meth:`AsyncBackend.queue_limits`."""

    def close(self) -> None:
        """Release the backend's resources."""
