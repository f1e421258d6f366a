"""The memory backend (``memory://``): jobs in a dict of this process, with the same
semantics as PostgreSQL, for tests and examples.

One :class:`MemoryStore` holds the jobs, the workers, a lock, a clock and the wake-up
callbacks of listening workers. ``Soniq("memory://")`` makes one store and shares it
between ``eq`` (:class:`MemoryBackend`) and ``eq.sync`` (:class:`MemorySyncBackend`),
and a worker's heartbeat thread reaches it through :class:`MemoryMaintenance`.

Every operation mirrors a statement of ``soniq.core.sql.postgres`` and takes the lock
for its whole duration, so it is atomic like the statement it mirrors: the worker's
loop, its heartbeat thread and sync jobs enqueuing from their threads may all call in
at once. Status changes go through :func:`soniq.core.states.next_status`.

Differences that come with living in memory: there is no transaction, so an enqueue
is visible (and wakes listening workers) at once, and ``connection=`` is refused;
jobs are gone when the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, NoReturn

import attrs

from soniq.core import serialize, states
from soniq.core.errors import ConfigurationError, InvalidTransition
from soniq.core.jobs import Claimed, Job, JobSpec
from soniq.core.outcomes import Outcome
from soniq.core.sql.migrate import LATEST_VERSION
from soniq.core.states import Event, JobStatus

UTC = dt.timezone.utc
QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING

#: A ready job's place in claim order: priority DESC, run_at, id (+ its generation).
_ReadyKey = tuple[int, dt.datetime, int, int]
#: A scheduled job's place: run_at, id (+ its generation).
_ScheduledKey = tuple[dt.datetime, int, int]


@attrs.define(slots=True, eq=False)
class _Row:
    """One job, as the ``soniq_jobs`` table would hold it. ``args`` and ``result`` are
    JSON text, so what a caller or a job does to its dicts afterwards cannot reach the
    stored job (PostgreSQL stores a copy too)."""

    id: int
    name: str
    queue: str
    args: str
    priority: int
    run_at: dt.datetime
    max_retries: int
    timeout: float | None
    dedupe_key: str | None
    created_at: dt.datetime
    status: JobStatus = QUEUED
    attempts: int = 0
    claims: int = 0
    worker_id: str | None = None
    cancel_requested: bool = False
    last_error: str | None = None
    last_traceback: str | None = None
    result: str | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    #: Bumped each time the row is (re)queued; older heap entries are stale.
    generation: int = 0

    def to_job(self) -> Job:
        return Job(
            id=self.id,
            name=self.name,
            queue=self.queue,
            args=serialize.loads(self.args),
            status=self.status,
            priority=self.priority,
            run_at=self.run_at,
            attempts=self.attempts,
            max_retries=self.max_retries,
            timeout=self.timeout,
            dedupe_key=self.dedupe_key,
            worker_id=self.worker_id,
            last_error=self.last_error,
            result=serialize.loads(self.result),
            cancel_requested=self.cancel_requested,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            claims=self.claims,
        )


_Listener = tuple[asyncio.AbstractEventLoop, Callable[[str], None]]


class MemoryStore:
    """The jobs and workers of one ``memory://`` Soniq, shared by its async and sync
    backends and by the worker's heartbeat thread.

    ``clock`` returns the current time as epoch seconds (default :func:`time.time`).
    It is a plain attribute: a test may replace it (``store.clock = fake``) to make
    scheduled jobs and retries due without sleeping, or to make a worker look dead.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        #: Held for the whole of every operation (loop, heartbeat thread, job threads).
        self.lock = threading.Lock()
        self._jobs: dict[int, _Row] = {}
        self._ids = itertools.count(1)
        self._workers: dict[str, dt.datetime] = {}  # worker id -> last heartbeat
        self._dedupe: dict[str, int] = {}  # key -> id of the queued/running job holding it
        self._running: dict[int, _Row] = {}  # the heartbeat's scans read only these
        self._ready: dict[str, list[_ReadyKey]] = {}  # per queue, due jobs in claim order
        self._scheduled: list[_ScheduledKey] = []  # jobs not due yet, by run_at
        self._listeners: list[_Listener] = []

    def now(self) -> dt.datetime:
        """The store's current time, as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.clock(), UTC)

    # -- enqueue and inspect ---------------------------------------------------

    def insert_jobs(self, spec: JobSpec) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order. A ``dedupe_key``
        held by a queued or running job returns that job's id instead."""
        woken: set[str] = set()
        ids: list[int] = []
        args = [serialize.dumps(a) for a in spec.args]
        with self.lock:
            now = self.now()
            run_at = spec.due_at(now).astimezone(UTC)
            key = spec.dedupe_key
            if key is not None and key in self._dedupe:
                return [self._dedupe[key]]  # build_spec allows a key for one job only
            for text in args:
                row = _Row(
                    id=next(self._ids),
                    name=spec.name,
                    queue=spec.queue,
                    args=text,
                    priority=spec.priority,
                    run_at=run_at,
                    max_retries=spec.max_retries,
                    timeout=spec.timeout,
                    dedupe_key=key,
                    created_at=now,
                )
                self._jobs[row.id] = row
                self._enqueue(row, now)
                ids.append(row.id)
            if key is not None:
                self._dedupe[key] = ids[0]
            if run_at <= now:
                woken.add(spec.queue)
            listeners = list(self._listeners)
        if woken:
            self._notify(listeners, ",".join(sorted(woken)))
        return ids

    def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        _check_id(job_id)
        with self.lock:
            row = self._jobs.get(job_id)
            return None if row is None else row.to_job()

    def list_jobs(self, name: str | None, queue: str | None) -> list[Job]:
        """Queued jobs (due or not), optionally of one name and/or queue, by id."""
        with self.lock:
            return [
                row.to_job()
                for row in self._jobs.values()
                if row.status is QUEUED
                and (name is None or row.name == name)
                and (queue is None or row.queue == queue)
            ]

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job at once, or record the request for a running one."""
        _check_id(job_id)
        with self.lock:
            row = self._jobs.get(job_id)
            if row is None or row.status not in states.CANCELLABLE:
                return False
            if row.status is QUEUED:
                self._finish(row, states.next_status(QUEUED, Event.CANCEL), self.now())
            else:
                row.cancel_requested = True
            return True

    # -- the worker ------------------------------------------------------------

    def claim_jobs(self, limit: int, worker_id: str, queues: Sequence[str] | None) -> list[Claimed]:
        """Claim up to ``limit`` due jobs by priority DESC, run_at, id."""
        claimed: list[Claimed] = []
        with self.lock:
            now = self.now()
            self._promote(now)
            names: Iterable[str] = self._ready.keys() if queues is None else dict.fromkeys(queues)
            heaps = [self._ready[q] for q in names if q in self._ready]
            while len(claimed) < limit:
                best: list[_ReadyKey] | None = None
                for heap in heaps:
                    while heap and not self._current(heap[0][2], heap[0][3]):
                        heapq.heappop(heap)
                    if heap and (best is None or heap[0] < best[0]):
                        best = heap
                if best is None:
                    break
                _, run_at, job_id, _ = heapq.heappop(best)
                row = self._jobs[job_id]
                if run_at > now:  # the clock went back: not due after all
                    heapq.heappush(self._scheduled, (run_at, job_id, row.generation))
                    continue
                row.status = states.next_status(QUEUED, Event.CLAIM)
                self._running[job_id] = row
                row.attempts += 1
                row.claims += 1
                row.worker_id = worker_id
                row.started_at = now
                claimed.append(
                    Claimed(
                        row.id,
                        row.name,
                        row.queue,
                        serialize.loads(row.args),
                        row.attempts,
                        row.max_retries,
                        row.timeout,
                        row.claims,
                    )
                )
        return claimed

    def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        """Write outcomes, fenced by worker and attempt; ``keep=False`` deletes the jobs
        that finished."""
        with self.lock:
            now = self.now()
            for outcome in outcomes:
                row = self._jobs.get(outcome.job_id)
                if (
                    row is None
                    or row.status is not RUNNING
                    or row.worker_id != worker_id
                    or row.attempts != outcome.attempts
                ):
                    continue  # rescued meanwhile: this late finish changes nothing
                status = states.next_status(RUNNING, _event_of(outcome))
                if status is not outcome.status:
                    raise InvalidTransition(f"outcome {outcome!r} does not match its event")
                del self._running[row.id]
                if outcome.error is not None:
                    row.last_error = outcome.error
                if outcome.traceback is not None:
                    row.last_traceback = outcome.traceback
                row.result = outcome.result
                if status in states.FINISHED:
                    self._finish(row, status, now)
                    if not keep:
                        del self._jobs[row.id]
                    continue
                if outcome.release:
                    row.attempts -= 1
                if outcome.retry_in is not None:
                    row.run_at = now + dt.timedelta(seconds=outcome.retry_in)
                row.status = status
                row.worker_id = None
                row.finished_at = None
                row.cancel_requested = False
                self._enqueue(row, now)

    def register_worker(self, worker_id: str) -> None:
        """Record a worker (again); its heartbeat is now."""
        with self.lock:
            self._workers[worker_id] = self.now()

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""
        with self.lock:
            self._workers.pop(worker_id, None)

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh a worker's heartbeat; False if it was declared dead meanwhile."""
        with self.lock:
            if worker_id not in self._workers:
                return False
            self._workers[worker_id] = self.now()
            return True

    def cancel_requests(self, worker_id: str) -> list[int]:
        """Ids of the worker's running jobs whose cancellation was requested."""
        with self.lock:
            return [
                row.id
                for row in self._running.values()
                if row.worker_id == worker_id and row.cancel_requested
            ]

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        """Forget workers whose heartbeat is older than ``stale_after`` seconds and put
        back the running jobs of workers that are not registered, counting the attempt
        (a job with none left fails)."""
        rescued: list[tuple[int, str]] = []
        with self.lock:
            now = self.now()
            limit = now - dt.timedelta(seconds=stale_after)
            for worker_id in [w for w, beat in self._workers.items() if beat < limit]:
                del self._workers[worker_id]
            for row in list(self._running.values()):
                if row.worker_id in self._workers:
                    continue
                del self._running[row.id]
                row.last_error = f"WorkerLost: worker {row.worker_id} stopped heartbeating"
                if row.attempts > row.max_retries:
                    self._finish(row, states.next_status(RUNNING, Event.FAIL), now)
                else:
                    row.status = states.next_status(RUNNING, Event.RESCUE)
                    row.worker_id = None
                    self._enqueue(row, now)
                rescued.append((row.id, row.status.value))
        return rescued

    def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        """Put back the worker's running jobs that it does not hold, the attempt not
        counted; how many."""
        keep = set(held)
        count = 0
        with self.lock:
            now = self.now()
            for row in list(self._running.values()):
                if row.worker_id == worker_id and row.id not in keep:
                    del self._running[row.id]
                    row.status = states.next_status(RUNNING, Event.RELEASE)
                    row.attempts -= 1
                    row.claims -= 1
                    row.worker_id = None
                    self._enqueue(row, now)
                    count += 1
        return count

    def prune_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` jobs finished more than ``older_than`` seconds ago."""
        with self.lock:
            cutoff = self.now() - dt.timedelta(seconds=older_than)
            old = itertools.islice(
                (
                    row.id
                    for row in self._jobs.values()
                    if row.finished_at is not None
                    and row.status in states.FINISHED
                    and row.finished_at < cutoff
                ),
                limit,
            )
            doomed = list(old)
            for job_id in doomed:
                del self._jobs[job_id]
            return len(doomed)

    def clear(self) -> None:
        """Forget every job and worker, and number jobs from 1 again (between tests)."""
        with self.lock:
            self._jobs.clear()
            self._ids = itertools.count(1)
            self._workers.clear()
            self._dedupe.clear()
            self._running.clear()
            self._ready.clear()
            self._scheduled.clear()

    # -- waking listeners ------------------------------------------------------

    def add_listener(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], None]
    ) -> None:
        """Call ``callback(queues)`` on ``loop`` whenever due jobs are enqueued."""
        with self.lock:
            self._listeners.append((loop, callback))

    def remove_listener(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], None]
    ) -> None:
        """Stop calling a callback added with :meth:`add_listener`."""
        with self.lock, contextlib.suppress(ValueError):
            self._listeners.remove((loop, callback))

    def _notify(self, listeners: list[_Listener], payload: str) -> None:
        for loop, callback in listeners:
            try:
                loop.call_soon_threadsafe(callback, payload)
            except RuntimeError:  # its loop is closed: it will never listen again
                self.remove_listener(loop, callback)

    # -- internals (the lock is held) ------------------------------------------

    def _enqueue(self, row: _Row, now: dt.datetime) -> None:
        """Put a queued row where the claim will find it."""
        row.generation += 1
        if row.run_at <= now:
            heap = self._ready.setdefault(row.queue, [])
            heapq.heappush(heap, (-row.priority, row.run_at, row.id, row.generation))
        else:
            heapq.heappush(self._scheduled, (row.run_at, row.id, row.generation))

    def _promote(self, now: dt.datetime) -> None:
        """Move scheduled jobs that are now due to their queue's ready heap."""
        scheduled = self._scheduled
        while scheduled and scheduled[0][0] <= now:
            run_at, job_id, generation = heapq.heappop(scheduled)
            if self._current(job_id, generation):
                row = self._jobs[job_id]
                heap = self._ready.setdefault(row.queue, [])
                heapq.heappush(heap, (-row.priority, run_at, job_id, generation))

    def _current(self, job_id: int, generation: int) -> bool:
        """Whether a heap entry still stands for a queued job."""
        row = self._jobs.get(job_id)
        return row is not None and row.status is QUEUED and row.generation == generation

    def _finish(self, row: _Row, status: JobStatus, now: dt.datetime) -> None:
        row.status = status
        row.finished_at = now
        if row.dedupe_key is not None and self._dedupe.get(row.dedupe_key) == row.id:
            del self._dedupe[row.dedupe_key]

    def __iter__(self) -> Iterator[Job]:
        """Every job, in id order (a snapshot)."""
        with self.lock:
            jobs = [row.to_job() for row in self._jobs.values()]
        return iter(jobs)


def _event_of(outcome: Outcome) -> Event:
    """The event an outcome records, so that the transition table checks its status."""
    if outcome.release:
        return Event.RELEASE
    if outcome.retry_in is not None or outcome.status is QUEUED:
        return Event.RETRY
    if outcome.status is JobStatus.DONE:
        return Event.SUCCEED
    if outcome.status is JobStatus.FAILED:
        return Event.FAIL
    if outcome.status is JobStatus.CANCELLED:
        return Event.ACK_CANCEL
    return Event.CLAIM  # running -> running: next_status refuses it


def _check_id(job_id: object) -> None:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"job_id must be an int, got {job_id!r}")


def _refuse_connection() -> NoReturn:
    raise ValueError(
        "connection=: transactional enqueue needs PostgreSQL; the memory backend has no "
        "caller's transaction to join. Leave connection= out, or use a postgresql:// "
        "database_url"
    )


def _no_pool() -> NoReturn:
    raise ConfigurationError(
        "the memory backend has no database connection to lend: acquire() needs a "
        "postgresql:// database_url"
    )


class MemoryMaintenance:
    """What a worker's heartbeat thread does, on the shared store (no connection)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh the heartbeat; False if the worker was declared dead meanwhile."""
        return self.store.heartbeat(worker_id)

    def register_worker(
        self,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: Sequence[str] | None,
        concurrency: int,
    ) -> None:
        """Record the worker (again)."""
        self.store.register_worker(worker_id)

    def cancel_requests(self, worker_id: str) -> list[int]:
        """Ids of the worker's running jobs whose cancellation was requested."""
        return self.store.cancel_requests(worker_id)

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        """Put back the running jobs of dead workers: (id, new status) pairs."""
        return self.store.rescue_stale(stale_after)

    def prune_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` jobs finished ``older_than`` seconds ago; how many."""
        return self.store.prune_finished(older_than, limit)

    def abort(self) -> None:
        """Nothing to abort: no call waits on a connection."""

    def close(self) -> None:
        """Nothing to close."""


class MemoryBackend:
    """The async backend of ``memory://``. Its methods are coroutines for the sake of
    the protocol; none of them waits for anything but :meth:`listen`."""

    name = "memory"
    accepts_connections = False
    claim_lanes = 1
    claim_gather = 0.0

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        """Raises :class:`ConfigurationError`: there is no connection pool."""
        _no_pool()

    async def migrate(self, *, apply: bool) -> int:
        """Nothing to migrate; the latest schema version."""
        return LATEST_VERSION

    async def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order."""
        if conn is not None:
            _refuse_connection()
        return self.store.insert_jobs(spec)

    async def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        return self.store.get_job(job_id)

    async def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id."""
        if conn is not None:
            _refuse_connection()
        return self.store.list_jobs(name, queue)

    async def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""
        return self.store.cancel_job(job_id)

    async def claim_jobs(
        self, limit: int, worker_id: str, queues: Sequence[str] | None
    ) -> list[Claimed]:
        """Claim up to ``limit`` ready jobs for ``worker_id``."""
        return self.store.claim_jobs(limit, worker_id, queues)

    @contextlib.asynccontextmanager
    async def worker_session(self) -> AsyncIterator[MemoryBackend]:
        """No connection to hold: a worker's loops use the backend itself."""
        yield self

    async def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        """Write outcomes, fenced by worker and attempt."""
        self.store.finish_jobs(outcomes, worker_id, keep=keep)

    async def register_worker(
        self,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: Sequence[str] | None,
        concurrency: int,
    ) -> None:
        """Record a worker; its heartbeat starts now."""
        self.store.register_worker(worker_id)

    async def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""
        self.store.unregister_worker(worker_id)

    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        """Put back the worker's running jobs that it does not hold; how many."""
        return self.store.reconcile(worker_id, held)

    async def listen(self, on_notify: Callable[[str], None], on_ready: Callable[[], None]) -> None:
        """Call ``on_notify(queues)`` on this loop whenever due jobs are enqueued (from
        any thread), until cancelled."""
        loop = asyncio.get_running_loop()
        self.store.add_listener(loop, on_notify)
        try:
            on_ready()
            await loop.create_future()  # forever: only cancellation ends it
        finally:
            self.store.remove_listener(loop, on_notify)

    def maintenance(self) -> MemoryMaintenance:
        """The heartbeat thread's session: the same store."""
        return MemoryMaintenance(self.store)

    async def close(self) -> None:
        """Nothing to release; the jobs stay in the store."""


class MemorySyncBackend:
    """The blocking backend of ``memory://`` (``eq.sync``), on the same store."""

    name = "memory"
    accepts_connections = False

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def acquire(self) -> AbstractContextManager[Any]:
        """Raises :class:`ConfigurationError`: there is no connection pool."""
        _no_pool()

    def migrate(self, *, apply: bool) -> int:
        """Nothing to migrate; the latest schema version."""
        return LATEST_VERSION

    def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order."""
        if conn is not None:
            _refuse_connection()
        return self.store.insert_jobs(spec)

    def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        return self.store.get_job(job_id)

    def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id."""
        if conn is not None:
            _refuse_connection()
        return self.store.list_jobs(name, queue)

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""
        return self.store.cancel_job(job_id)

    def close(self) -> None:
        """Nothing to release; the jobs stay in the store."""
