"""The SQLite backends: :class:`SqliteBackend` (``eq``), :class:`SqliteSyncBackend`
(``eq.sync``) and :class:`SqliteMaintenance` (a worker's heartbeat thread), and how
an enqueue wakes the workers of this process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, NoReturn, TypeVar

from soniq.core import outcomes as outcome_of
from soniq.core import states
from soniq.core.admin import BacklogShape, JobFilter, QueueStats, Stats, WorkerInfo
from soniq.core.errors import ConfigurationError
from soniq.core.flow import ClaimLimits, QueueLimits
from soniq.core.jobs import Claimed, Job, JobNode, JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.sql import sqlite as sq
from soniq.core.sql.sqlite import Operation
from soniq.core.states import JobStatus
from soniq.drivers._common import sync_owner
from soniq.drivers.lines import ThreadLine
from soniq.drivers.sqlite import writes
from soniq.drivers.sqlite.connection import (
    SYNCHRONOUS,
    SqliteDatabase,
    SqliteFile,
    migrate,
    run,
)
from soniq.drivers.sqlite.writes import Write, Writer, WriteThread, commit_together

T = TypeVar("T")

#: Idle connections a :class:`SqliteSyncBackend` keeps for its callers' threads.
MAX_IDLE = 4

#: Connections inherited from the parent process after a fork: never used and never
#: closed in the child (closing could checkpoint or unlock behind the parent's back).
_inherited: list[sqlite3.Connection] = []


# -- waking this process's workers -------------------------------------------------

_Listener = tuple[asyncio.AbstractEventLoop, Callable[[str], None]]
_listeners_lock = threading.Lock()
_listeners: dict[str, list[_Listener]] = {}


def _add_listener(key: str, listener: _Listener) -> None:
    with _listeners_lock:
        _listeners.setdefault(key, []).append(listener)


def _remove_listener(key: str, listener: _Listener) -> None:
    with _listeners_lock:
        found = _listeners.get(key, [])
        with contextlib.suppress(ValueError):
            found.remove(listener)
        if not found:
            _listeners.pop(key, None)


def _wake(key: str, queues: str) -> None:
    """Tell the workers of this process that listen on the database ``key`` (on their
    loops)."""
    # Read without the lock first: most enqueues have nobody to wake. A listener that
    # starts meanwhile claims once it is listening, so it misses no job.
    if key not in _listeners:
        return
    with _listeners_lock:
        targets = list(_listeners.get(key, ()))
    for listener in targets:
        loop, callback = listener
        try:
            loop.call_soon_threadsafe(callback, queues)
        except RuntimeError:  # its loop is closed: it will never listen again
            _remove_listener(key, listener)


def _inserted_ids(key: str, inserted: sq.Inserted) -> list[int]:
    """Once an insert committed: wake this process's workers, hand back the ids."""
    if inserted.wake is not None:
        _wake(key, inserted.wake)
    return inserted.ids


def _woken(key: str, queues: str | None) -> None:
    """Once jobs became ready (children whose parents are done): wake this process's
    workers of their queues."""
    if queues is not None:
        _wake(key, queues)


def _resumed(key: str, queue: str, resumed: bool) -> bool:
    """Once a resume committed: wake this process's workers of the queue."""
    if resumed:
        _wake(key, queue)
    return resumed


def _refuse_connection(name: str) -> NoReturn:
    raise ValueError(
        f"connection=: transactional enqueue needs PostgreSQL; the {name} backend has no "
        "caller's transaction to join. Leave connection= out, or use a postgresql:// "
        "database_url"
    )


class _OnDatabase:
    """What both SQLite backends are: a database (a path is a file with this
    ``synchronous`` level), named after it, with no pool to lend and no caller's
    transaction to join."""

    accepts_connections = False

    def __init__(self, database: str | SqliteDatabase, *, synchronous: str = SYNCHRONOUS) -> None:
        #: Where the jobs are.
        self.database = SqliteFile(database, synchronous) if isinstance(database, str) else database
        self.name = self.database.name

    @property
    def path(self) -> str:
        """The database file (for ``memory://``, the database's name in this process)."""
        return self.database.path

    def acquire(self) -> NoReturn:
        """Raises :class:`ConfigurationError`: there is no connection pool to lend."""
        raise ConfigurationError(
            f"the {self.name} backend has no connection pool to lend: acquire() needs a "
            "postgresql:// database_url"
        )


# -- the heartbeat thread's session --------------------------------------------------


class SqliteMaintenance:
    """A worker's heartbeat thread's operations, on a connection of its own."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._conn = database.connect()
        self._database = database

    def _clock(self) -> float:
        # Read through the database each time: a test may replace its clock while
        # the worker runs (soniq.testing.use_clock).
        return self._database.clock()

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh the heartbeat; False if the worker was declared dead meanwhile."""
        return run(self._conn, sq.heartbeat(worker_id, self._clock()))

    def register_worker(self, worker: WorkerIdentity) -> None:
        """Record the worker (again)."""
        run(self._conn, sq.register_worker(worker, self._clock()))

    def cancel_requests(self, worker_id: str) -> list[int]:
        """Ids of the worker's running jobs whose cancellation was requested."""
        return run(self._conn, sq.cancel_requests(worker_id))

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        """Put back the running jobs of dead workers: (id, new status) pairs."""
        return run(self._conn, sq.rescue_stale(stale_after, self._clock()))

    def prune_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` jobs finished ``older_than`` seconds ago; how many."""
        return run(self._conn, sq.prune_finished(older_than, limit, self._clock()))

    def analyze_if_never(self, rows: int) -> bool | None:
        """SQLite plans the claim from its partial indexes, statistics or not."""
        return False

    def abort(self) -> None:
        """Nothing to do: a local file has no link that can go silent (a locked
        database is bounded by the busy timeout)."""

    def close(self) -> None:
        """Close the session's connection."""
        self._conn.close()


# -- async ---------------------------------------------------------------------------


class SqliteBackend(_OnDatabase):
    """The async backend of ``sqlite:///path``: every operation runs on this backend's
    own thread and connection, so the event loop never blocks on SQLite. Usable from
    any event loop; after a fork the child opens a new thread and connection."""

    one_writer = True

    def __init__(self, database: str | SqliteDatabase, *, synchronous: str = SYNCHRONOUS) -> None:
        super().__init__(database, synchronous=synchronous)
        self._lock = threading.Lock()
        self._current: WriteThread | None = None
        self._owner: object = None
        self._limited_first = False  # the kind of job the next limited claim takes first

    # -- plumbing

    def _thread(self) -> WriteThread:
        current = self._current
        if current is not None and self._owner == sync_owner():  # the common case
            return current
        with self._lock:
            owner = sync_owner()
            current = self._current
            if current is None or self._owner != owner:
                if current is not None and current.writer.conn is not None:
                    _inherited.append(current.writer.conn)  # the parent's: leave it alone
                current = self._current = WriteThread(self.database)
                self._owner = owner
            return current

    def _submit(self, work: Callable[[sqlite3.Connection], T]) -> Future[T]:
        while True:  # a thread being closed takes nothing new: the next one does
            future = self._thread().submit(work)
            if future is not None:
                return future

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self._submit(work))

    def _write(
        self,
        build: Callable[[], Operation[Any]],
        committed: Callable[[Any], T] | None = None,
        *,
        linger: bool = False,
    ) -> Future[T]:
        """Queue a write for the thread; the writes that queue while it is busy commit
        together (:func:`run_together`). A ``linger`` write (a worker's completions)
        alone in the queue waits up to :data:`LINGER` seconds for another to commit
        with: the worker's next claim almost always follows at once."""
        write = Write(build, committed, linger)
        while not self._thread().write(write):  # that thread is being closed
            pass
        return write.future

    async def _commit(
        self,
        build: Callable[[], Operation[Any]],
        committed: Callable[[Any], T] | None = None,
        *,
        linger: bool = False,
    ) -> T:
        """:meth:`_write`, awaited."""
        return await asyncio.wrap_future(self._write(build, committed, linger=linger))

    # -- operations

    async def migrate(self, *, apply: bool) -> int:
        """Create or upgrade the schema (``apply=False``: only check it)."""
        return await self._call(lambda conn: migrate(conn, self.database.clock(), apply=apply))

    async def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order."""
        if conn is not None:
            _refuse_connection(self.name)
        return await self._commit(
            lambda: sq.insert_jobs(spec, self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )

    async def insert_graph(self, nodes: Sequence[JobNode], conn: Any = None) -> list[int]:
        """Insert jobs that wait for one another (see ``sq.insert_graph``); ids in order."""
        if conn is not None:
            _refuse_connection(self.name)
        return await self._commit(
            lambda: sq.insert_graph(nodes, self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )

    async def page_jobs(self, selection: JobFilter) -> list[Job]:
        """A page of jobs, newest first (see :class:`soniq.core.admin.JobFilter`)."""
        op = sq.page_jobs(selection)
        return await self._call(lambda conn: run(conn, op))

    async def retry_job(self, job_id: int) -> bool:
        """Put a failed or cancelled job back in line (see PostgresAsyncOps)."""
        ids = await self._commit(
            lambda: sq.retry_jobs([job_id], self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )
        return bool(ids)

    async def retry_failed(self, queue: str | None, name: str | None, limit: int) -> int:
        """Put up to ``limit`` failed jobs back in line; how many."""
        ids = await self._commit(
            lambda: sq.retry_failed(queue, name, limit, self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )
        return len(ids)

    async def backlog_shapes(self) -> list[BacklogShape]:
        """The jobs waiting to run, grouped by name and argument names."""
        op = sq.backlog_shapes()
        return await self._call(lambda conn: run(conn, op))

    async def list_workers(self) -> list[WorkerInfo]:
        """The registered workers, oldest first, each with the jobs it runs."""
        op = sq.list_workers(self.database.clock())
        return await self._call(lambda conn: run(conn, op))

    async def queue_stats(self) -> list[QueueStats]:
        """Each queue's counts by status and settings, by name."""
        op = sq.queue_stats(self.database.clock())
        return await self._call(lambda conn: run(conn, op))

    async def stats(self, minutes: int, queue: str | None) -> Stats:
        """The jobs ended per minute over the last ``minutes`` minutes."""
        op = sq.stats(self.database.clock(), minutes, queue)
        return await self._call(lambda conn: run(conn, op))

    async def purge_jobs(self, older_than: float, statuses: Sequence[JobStatus], limit: int) -> int:
        """Delete up to ``limit`` finished jobs of ``statuses``; how many."""
        clock = self.database.clock
        return await self._commit(lambda: sq.prune_finished(older_than, limit, clock(), statuses))

    async def mark_awaited(self, job_id: int) -> bool:
        """Whether the job is active: nobody is told of its end here (see
        :meth:`listen`), its waiters poll."""
        job = await self.get_job(job_id)
        return job is not None and job.status in states.ACTIVE

    async def set_progress(
        self, job_id: int, claims: int, progress: float, message: str | None
    ) -> None:
        """Store the progress a run of a job reported."""
        await self._commit(lambda: sq.set_progress(job_id, claims, progress, message))

    async def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        op = sq.get_job(job_id)  # validates the id here, not on the thread
        return await self._call(lambda conn: run(conn, op))

    async def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id."""
        if conn is not None:
            _refuse_connection(self.name)
        op = sq.list_jobs(name, queue)
        return await self._call(lambda c: run(c, op))

    async def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""
        # Built here, not on the thread: it validates the id.
        op = sq.cancel_job(job_id, self.database.clock())
        return await self._commit(lambda: op)

    async def pause_queue(self, queue: str) -> bool:
        """Pause ``queue`` (see AsyncBackend); True when it was not paused."""
        return await self._commit(lambda: sq.pause_queue(queue, self.database.clock()))

    async def resume_queue(self, queue: str) -> bool:
        """Resume ``queue`` and wake this process's workers; True when it was paused."""
        return await self._commit(
            lambda: sq.resume_queue(queue, self.database.clock()),
            functools.partial(_resumed, self.database.key, queue),
        )

    async def paused_queues(self) -> list[str]:
        """The paused queues, by name."""
        op = sq.paused_queues()
        return await self._call(lambda conn: run(conn, op))

    async def set_queue_limits(self, queue: str, limits: QueueLimits) -> None:
        """Store the limits of ``queue`` (see AsyncBackend)."""
        await self._commit(lambda: sq.set_queue_limits(queue, limits, self.database.clock()))

    async def queue_limits(self) -> dict[str, QueueLimits]:
        """The queues with stored limits, by name."""
        op = sq.queue_limits()
        return await self._call(lambda conn: run(conn, op))

    async def claim_jobs(
        self,
        limit: int,
        worker_id: str,
        queues: Sequence[str] | None,
        names: Sequence[str] | None = None,
        limits: ClaimLimits | None = None,
    ) -> list[Claimed]:
        """Claim up to ``limit`` ready jobs for ``worker_id`` (within ``limits``, see
        AsyncBackend).

        If the caller is cancelled while the claim runs on the thread, the claim still
        completes there; the jobs it took are then put back (attempt not counted), as
        nobody will run them. A claim cancelled before it started never runs.
        """
        # A worker's claims alternate which kind of job goes first (see sq.claim_jobs).
        limited_first = self._limited_first = limits is not None and not self._limited_first
        clock = self.database.clock
        future: Future[list[Claimed]] = self._write(
            lambda: sq.claim_jobs(
                limit,
                worker_id,
                queues,
                clock(),
                names,
                limits,
                clock=clock,
                limited_first=limited_first,
            )
        )
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: self._put_back(f, worker_id))
            raise

    def _put_back(self, future: Future[list[Claimed]], worker_id: str) -> None:
        """Release the jobs of a claim nobody received (called when the claim ends:
        on the SQLite thread, or at once if it had ended)."""
        if future.cancelled() or future.exception() is not None or not future.result():
            return
        released = [outcome_of.released(c.id, c.attempts) for c in future.result()]
        clock = self.database.clock
        self._write(lambda: sq.finish_jobs(released, worker_id, keep=True, now=clock()))

    @contextlib.asynccontextmanager
    async def worker_session(self) -> AsyncIterator[SqliteBackend]:
        """No connection to hold: a worker's loops use the backend itself."""
        yield self

    def abort(self) -> None:
        """Nothing to abandon (a worker session's ``abort``): a local database has no
        link that can go silent, and a lock is bounded by the busy timeout."""

    async def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        """Write outcomes, fenced by worker and attempt (``keep=False`` deletes the
        finished ones)."""
        await self._commit(
            lambda: sq.finish_jobs(outcomes, worker_id, keep=keep, now=self.database.clock()),
            functools.partial(_woken, self.database.key),
            linger=True,
        )

    async def register_worker(self, worker: WorkerIdentity) -> None:
        """Record a worker; its heartbeat starts now."""
        await self._commit(lambda: sq.register_worker(worker, self.database.clock()))

    async def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""
        await self._commit(lambda: sq.unregister_worker(worker_id))

    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        """Put back the worker's running jobs that it does not hold; how many."""
        return await self._commit(lambda: sq.reconcile(worker_id, held))

    async def next_due(self, queues: Sequence[str] | None, names: Sequence[str]) -> float | None:
        """In how many seconds a job of ``queues`` and ``names`` is due (see
        AsyncBackend)."""
        op = sq.next_due(queues, names, self.database.clock())
        return await self._call(lambda conn: run(conn, op))

    async def last_ticks(self, keys: Sequence[str]) -> dict[str, dt.datetime]:
        """The last tick of each periodic schedule of ``keys`` that has one."""
        op = sq.last_ticks(keys)
        return await self._call(lambda conn: run(conn, op))

    async def enqueue_tick(
        self, key: str, tick: dt.datetime, spec: JobSpec, *, enqueue: bool
    ) -> int | None:
        """Move the schedule's last tick forward and insert its job (see AsyncBackend)."""
        inserted: sq.Inserted | None = await self._commit(
            lambda: sq.enqueue_tick(key, tick, spec, self.database.clock(), enqueue=enqueue)
        )
        return None if inserted is None else _inserted_ids(self.database.key, inserted)[0]

    async def listen(
        self, on_notify: Callable[[str], None], on_ready: Callable[[], None], *, ends: bool = False
    ) -> None:
        """Call ``on_notify(queues)`` on this loop when this process enqueues due jobs
        on the same file (any Soniq, any thread), until cancelled. Other processes
        cannot be heard: the worker's polling finds their jobs. With ``ends`` (the
        ends of awaited jobs) nothing is heard: waiters poll."""
        if ends:
            on_ready()
            await asyncio.get_running_loop().create_future()  # forever
        listener = (asyncio.get_running_loop(), on_notify)
        _add_listener(self.database.key, listener)
        try:
            on_ready()
            await listener[0].create_future()  # forever: only cancellation ends it
        finally:
            _remove_listener(self.database.key, listener)

    def maintenance(self) -> SqliteMaintenance:
        """A blocking session on a connection of its own, for the heartbeat thread."""
        return SqliteMaintenance(self.database)

    async def close(self) -> None:
        """Close the connection and end the thread, after what was queued on them; a
        later call opens new ones."""
        with self._lock:
            thread, self._current = self._current, None
            mine = self._owner == sync_owner()
        if thread is None:
            return
        if not mine:  # a forked child: the parent's connection is left alone
            if thread.writer.conn is not None:
                _inherited.append(thread.writer.conn)
            return
        await asyncio.wrap_future(thread.close())


# -- blocking ------------------------------------------------------------------------


class SqliteSyncBackend(_OnDatabase):
    """The blocking backend of ``sqlite:///path`` (``eq.sync``). Safe to call from
    several threads at once: reads take a connection of a small pool each; writes
    commit in turns, grouped, on one connection kept for writing (a
    :class:`~soniq.drivers.lines.ThreadLine`, one write at a time)."""

    def __init__(self, database: str | SqliteDatabase, *, synchronous: str = SYNCHRONOUS) -> None:
        super().__init__(database, synchronous=synchronous)
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._owner: object = sync_owner()
        self._generation = 0  # bumped by close(): connections of before are not kept
        self._new_line()

    def _new_line(self) -> None:
        self._writer = Writer(self.database.connect)
        self._turns: ThreadLine[Write] = ThreadLine(
            functools.partial(commit_together, self._writer.connected),
            max_in_flight=1,
            max_batch=writes.MAX_GROUP,
        )

    def _adopt_after_fork(self) -> None:
        """Under ``self._lock``: after a fork, the parent's connections stay its own
        (never used nor closed here), and its line of writes is not ours (the threads
        in it are not in this process)."""
        if self._owner != sync_owner():
            _inherited.extend(self._idle)
            if self._writer.conn is not None:
                _inherited.append(self._writer.conn)
            self._idle, self._owner = [], sync_owner()
            self._new_line()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._adopt_after_fork()
            generation = self._generation
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self.database.connect()
        try:
            yield conn
        finally:
            with self._lock:
                keep = (
                    generation == self._generation
                    and not conn.in_transaction
                    and len(self._idle) < MAX_IDLE
                )
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _run(self, op: Operation[T]) -> T:
        with self._connection() as conn:
            return run(conn, op)

    def _commit(
        self, build: Callable[[], Operation[Any]], committed: Callable[[Any], T] | None = None
    ) -> T:
        """Run a write in turn, perhaps with others (one transaction, each in a
        savepoint); ``committed`` maps its value once it is committed. A writer
        alone runs its operation at once on the write connection."""
        if self._owner != sync_owner():  # changes only in a forked child: read unlocked
            with self._lock:
                self._adopt_after_fork()
        writer = self._writer

        def alone() -> T:
            conn = writer.begin()
            try:
                value = run(conn, build())
            finally:
                writer.end(conn)
            return value if committed is None else committed(value)

        return self._turns.run(alone, lambda: Write(build, committed, linger=False))

    def migrate(self, *, apply: bool) -> int:
        """Create or upgrade the schema (``apply=False``: only check it)."""
        with self._connection() as conn:
            return migrate(conn, self.database.clock(), apply=apply)

    def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order."""
        if conn is not None:
            _refuse_connection(self.name)
        return self._commit(
            lambda: sq.insert_jobs(spec, self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )

    def page_jobs(self, selection: JobFilter) -> list[Job]:
        """Blocking :meth:`SqliteBackend.page_jobs`."""
        return self._run(sq.page_jobs(selection))

    def retry_job(self, job_id: int) -> bool:
        """Blocking :meth:`SqliteBackend.retry_job`."""
        ids = self._commit(
            lambda: sq.retry_jobs([job_id], self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )
        return bool(ids)

    def retry_failed(self, queue: str | None, name: str | None, limit: int) -> int:
        """Blocking :meth:`SqliteBackend.retry_failed`."""
        ids = self._commit(
            lambda: sq.retry_failed(queue, name, limit, self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )
        return len(ids)

    def backlog_shapes(self) -> list[BacklogShape]:
        """Blocking :meth:`SqliteBackend.backlog_shapes`."""
        return self._run(sq.backlog_shapes())

    def list_workers(self) -> list[WorkerInfo]:
        """Blocking :meth:`SqliteBackend.list_workers`."""
        return self._run(sq.list_workers(self.database.clock()))

    def queue_stats(self) -> list[QueueStats]:
        """Blocking :meth:`SqliteBackend.queue_stats`."""
        return self._run(sq.queue_stats(self.database.clock()))

    def stats(self, minutes: int, queue: str | None) -> Stats:
        """Blocking :meth:`SqliteBackend.stats`."""
        return self._run(sq.stats(self.database.clock(), minutes, queue))

    def purge_jobs(self, older_than: float, statuses: Sequence[JobStatus], limit: int) -> int:
        """Blocking :meth:`SqliteBackend.purge_jobs`."""
        clock = self.database.clock
        return self._commit(lambda: sq.prune_finished(older_than, limit, clock(), statuses))

    def insert_graph(self, nodes: Sequence[JobNode], conn: Any = None) -> list[int]:
        """Blocking :meth:`SqliteBackend.insert_graph`."""
        if conn is not None:
            _refuse_connection(self.name)
        return self._commit(
            lambda: sq.insert_graph(nodes, self.database.clock()),
            functools.partial(_inserted_ids, self.database.key),
        )

    def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        return self._run(sq.get_job(job_id))

    def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id."""
        if conn is not None:
            _refuse_connection(self.name)
        return self._run(sq.list_jobs(name, queue))

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""
        # Built here, in the caller: it validates the id.
        op = sq.cancel_job(job_id, self.database.clock())
        return self._commit(lambda: op)

    def pause_queue(self, queue: str) -> bool:
        """Blocking :meth:`SqliteBackend.pause_queue`."""
        return self._commit(lambda: sq.pause_queue(queue, self.database.clock()))

    def resume_queue(self, queue: str) -> bool:
        """Blocking :meth:`SqliteBackend.resume_queue`."""
        return self._commit(
            lambda: sq.resume_queue(queue, self.database.clock()),
            functools.partial(_resumed, self.database.key, queue),
        )

    def paused_queues(self) -> list[str]:
        """The paused queues, by name."""
        return self._run(sq.paused_queues())

    def set_queue_limits(self, queue: str, limits: QueueLimits) -> None:
        """Blocking :meth:`SqliteBackend.set_queue_limits`."""
        self._commit(lambda: sq.set_queue_limits(queue, limits, self.database.clock()))

    def queue_limits(self) -> dict[str, QueueLimits]:
        """The queues with stored limits, by name."""
        return self._run(sq.queue_limits())

    def close(self) -> None:
        """Close the idle connections (busy ones close when their call returns); a
        later call opens new ones."""
        with self._lock:
            self._adopt_after_fork()  # in a forked child: the parent's are left alone
            idle, self._idle = self._idle, []
            self._generation += 1
        self._writer.close()
        for conn in idle:
            conn.close()
