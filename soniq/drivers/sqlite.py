"""The SQLite backend (``sqlite:///path.db``, and the default when no URL is given):
stdlib ``sqlite3``, one file, any number of processes on one host.

What runs where:

- :class:`SqliteBackend` (``eq``) runs every operation on a thread of its own, with its
  own connection (a one-thread executor per backend), so the event loop never waits on
  SQLite I/O, a busy lock or an fsync.
- :class:`SqliteSyncBackend` (``eq.sync``) blocks, on its caller's thread; any number
  of threads may call it at once: each operation on a connection of a small pool, and
  its enqueues and cancellations in turns, grouped (:class:`_WriteTurns`).
- :class:`SqliteMaintenance` is a worker's heartbeat thread's own connection.

The statements and what they mean live in :mod:`soniq.core.sql.sqlite`; this module
runs them (:func:`run`) and keeps the clock: ``time.time()`` is read here and passed in.

Connections. ``isolation_level=None`` (Python's sqlite3 begins no transaction behind
our back); every operation that writes runs under ``BEGIN IMMEDIATE``, which takes the
database's single write lock before the first read, so a claim's SELECT and UPDATE
cannot interleave with another process's, and no transaction ever has to upgrade a
read lock (the upgrade that fails at once with SQLITE_BUSY, whatever the timeout).
``journal_mode=WAL`` lets readers and the writer proceed together; WAL needs shared
memory, so **the file must be on a local disk of one host** (no NFS/SMB, no
containers on different hosts sharing a volume). ``busy_timeout`` is 5 s: a writer
waits that long for the lock before "database is locked" (the worker logs it and
retries).

Durability: ``synchronous=FULL`` by default. Every commit fsyncs the WAL, so an
enqueue that returned an id survives a power cut or an OS crash, as it does on
PostgreSQL (whose default, ``synchronous_commit=on``, makes the same promise). The
price is an fsync per commit. ``sqlite:///path.db?synchronous=normal`` trades it away:
still safe against a crash of the *process* (kill -9, an exception), and the database
is never corrupt, but in WAL mode the last transactions before a power loss or an OS
crash can be lost: enqueues the caller was told had succeeded, and completions (those
jobs would run again). Each process chooses for its own connections; the level is
not stored in the file.

Group commit. The async backend's writes queue for its one thread; those that queue
while it is busy commit in one transaction (:func:`run_together`), and a worker's
completions wait up to :data:`LINGER` for its next claim, so a busy worker pays one
commit for both. The enqueues and cancellations that several threads make through one
sync backend queue the same way, and one of those threads commits them
(:class:`_WriteTurns`); other connections to the file (another backend, another
process, the heartbeat's) still meet them in SQLite's busy handler. An enqueue of one
job (no dedupe key) is one ``INSERT`` with no ``BEGIN`` when it runs alone, and joins
the shared transaction when others queued with it.

There is no LISTEN/NOTIFY: :meth:`SqliteBackend.listen` wakes a worker at once when
this process enqueues (any Soniq on the same file); jobs enqueued by other processes
are found by polling (``poll_interval``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, NoReturn, TypeVar

from soniq.core import outcomes as outcome_of
from soniq.core.errors import ConfigurationError, SchemaNotReadyError
from soniq.core.jobs import Claimed, Job, JobSpec
from soniq.core.outcomes import Outcome
from soniq.core.sql import sqlite as sq
from soniq.core.sql.sqlite import Operation, Result
from soniq.drivers._common import sync_owner
from soniq.drivers.embedded import SYNCHRONOUS_LEVELS

T = TypeVar("T")
log = logging.getLogger("soniq")

BUSY_TIMEOUT_MS = 5000
SYNCHRONOUS = SYNCHRONOUS_LEVELS[0]
#: How long a worker's completions wait for its next claim, to commit with it: one
#: fsync for both halves the commits of a busy worker; an idle one writes them late by
#: this much.
LINGER = 0.002
#: How long a worker's claim waits for more of its running jobs to free their slots
#: (``claim_gather``): one claim for all of them is one commit instead of several.
CLAIM_GATHER = 0.001
#: Idle connections a :class:`SqliteSyncBackend` keeps for its callers' threads.
MAX_IDLE = 4
#: Most writes one turn of a :class:`_WriteTurns` commits together.
MAX_GROUP = 64

#: Connections inherited from the parent process after a fork: never used and never
#: closed in the child (closing could checkpoint or unlock behind the parent's back).
_inherited: list[sqlite3.Connection] = []


def connect(path: str, synchronous: str = SYNCHRONOUS) -> sqlite3.Connection:
    """A connection to ``path`` with Soniq's settings (see the module docstring)."""
    if synchronous not in SYNCHRONOUS_LEVELS:
        raise ConfigurationError(
            f"synchronous must be one of {SYNCHRONOUS_LEVELS}, got {synchronous!r}"
        )
    try:
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,  # each connection is used by one thread at a time
        )
    except sqlite3.Error as exc:
        raise ConfigurationError(
            f"cannot open the SQLite database {path!r} ({exc}); does its directory exist "
            "and is it writable?"
        ) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning(
                "SQLite database %s: journal_mode is %s, not WAL (a file system without "
                "shared memory?); readers will wait for writers",
                path,
                mode,
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def run(conn: sqlite3.Connection, op: Operation[T]) -> T:
    """Run an operation's steps on ``conn``; under ``BEGIN IMMEDIATE`` ... ``COMMIT``
    when it asks for it (rolled back on any error)."""
    try:
        if op.immediate:
            conn.execute("BEGIN IMMEDIATE")
        value = _drive(conn, op)
        if op.immediate:
            conn.execute("COMMIT")
    except BaseException as exc:
        _roll_back(conn)
        translated = _translated(exc)
        if translated is exc:
            raise
        raise translated from None
    return value


def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _translated(exc: BaseException) -> BaseException:
    """The error to raise for ``exc``: a missing table says how to create it."""
    if isinstance(exc, sqlite3.OperationalError) and "no such table: soniq_" in str(exc):
        return SchemaNotReadyError(
            f"Soniq's tables are missing in the SQLite database ({exc}); create them "
            "with `soniq migrate --database-url sqlite:///PATH` or "
            "`await eq.ensure_initialized()`"
        )
    return exc


def _drive(conn: sqlite3.Connection, op: Operation[T]) -> T:
    steps = op.steps
    try:
        step = next(steps)
        while True:
            if step.many:
                cursor = conn.executemany(step.sql, step.params)
            else:
                cursor = conn.execute(step.sql, step.params)
            rows = cursor.fetchall() if cursor.description else []
            step = steps.send(Result(rows, cursor.rowcount, cursor.lastrowid))
    except StopIteration as stop:
        value: T = stop.value
        return value
    except BaseException:
        steps.close()
        raise


class _Write:
    """A write waiting for the backend's thread: how to build its operation (on the
    thread, so it reads the clock when it runs), what to do with its value once
    committed, and the future its caller waits on."""

    __slots__ = ("build", "committed", "future", "linger")

    def __init__(
        self,
        build: Callable[[], Operation[Any]],
        committed: Callable[[Any], Any] | None,
        linger: bool,
    ) -> None:
        self.build = build
        self.committed = committed
        self.linger = linger
        self.future: Future[Any] = Future()

    def settle(self, value: Any) -> None:
        try:
            if self.committed is not None:
                value = self.committed(value)
        except BaseException as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(value)


def _fail_unsettled(writes: Sequence[_Write], exc: BaseException) -> None:
    """Give ``exc`` to each write not settled yet, a copy each (their callers may
    raise it in several threads at once, and raising an exception rewrites its
    traceback). Only one thread settles a write, but a caller may cancel a pending
    one at any moment: that one is left alone."""
    for write in writes:
        future = write.future
        if future.done():
            continue
        with contextlib.suppress(InvalidStateError):
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(_own_copy(exc))


def _own_copy(exc: BaseException) -> BaseException:
    """A copy of ``exc`` with its traceback, cause and context (where it was raised)."""
    try:
        clone = copy.copy(exc)
    except Exception:  # an exception class that cannot be rebuilt from its args
        return exc
    clone.__cause__ = exc.__cause__
    clone.__context__ = exc.__context__
    clone.__suppress_context__ = exc.__suppress_context__
    return clone.with_traceback(exc.__traceback__)


def _interrupted(exc: BaseException) -> RuntimeError:
    """What the other writes of a group hear when the thread committing them is
    interrupted (KeyboardInterrupt, a signal handler's SystemExit): that thread
    raises the interruption itself."""
    return RuntimeError(
        f"the thread committing this write was interrupted ({type(exc).__name__}) "
        "before its outcome was known: it may or may not have been committed"
    )


def run_together(conn: sqlite3.Connection, writes: Sequence[_Write]) -> None:
    """Run the writes that queued up while the thread was busy in one ``BEGIN
    IMMEDIATE`` transaction: one commit, so one fsync at ``synchronous=FULL``, for all
    (group commit: a worker's completions and its next claim usually travel
    together). Each runs in a savepoint, so one that fails is undone alone and only
    its caller sees the error. Results are handed out after ``COMMIT``: nobody hears
    of a write that could still be lost. An interruption (KeyboardInterrupt, a signal
    handler's exception) rolls back and propagates: :func:`commit_together` tells the
    writes."""
    # A caller cancelled before its write started does not want it (a claim nobody
    # would run); once started, a write cannot be cancelled.
    live = [w for w in writes if w.future.set_running_or_notify_cancel()]
    if not live:
        return
    if len(live) == 1:  # alone: as the operation asks (a lone enqueue needs no BEGIN)
        write = live[0]
        try:
            value = run(conn, write.build())
        except Exception as exc:
            write.future.set_exception(exc)
        else:
            write.settle(value)
        return
    outcomes: list[tuple[_Write, Any, BaseException | None]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for write in live:
            conn.execute("SAVEPOINT soniq_write")
            try:
                value = _drive(conn, write.build())
            except Exception as exc:
                conn.execute("ROLLBACK TO soniq_write")
                outcomes.append((write, None, _translated(exc)))
            else:
                outcomes.append((write, value, None))
            conn.execute("RELEASE soniq_write")
        conn.execute("COMMIT")
    except Exception as exc:
        _roll_back(conn)
        _fail_unsettled(live, _translated(exc))
        return
    except BaseException:
        _roll_back(conn)
        raise
    for write, value, error in outcomes:
        if error is not None:
            write.future.set_exception(error)
        else:
            write.settle(value)


def commit_together(
    connection: Callable[[], AbstractContextManager[sqlite3.Connection]],
    writes: Sequence[_Write],
) -> None:
    """:func:`run_together` on a connection of ``connection()``, and every write settled
    whatever happens: when no database can be opened, each caller hears why; should
    run_together itself fail (a bug), each hears that rather than wait forever; when
    this thread is interrupted, each hears that its outcome is unknown, and the
    interruption propagates."""
    opened = False
    try:
        with connection() as conn:
            opened = True
            run_together(conn, writes)
    except Exception as exc:
        if opened:
            log.exception("SQLite writes failed unexpectedly")
        _fail_unsettled(writes, exc)
    except BaseException as exc:
        _fail_unsettled(writes, _interrupted(exc))
        raise


def migrate(conn: sqlite3.Connection, *, apply: bool) -> int:
    """Bring the file's schema up to date (or only check it): a read when it is
    current, else the pending DDL in one ``BEGIN IMMEDIATE`` transaction."""
    version = run(conn, sq.schema_version())
    if sq.check_version(version, apply=apply):
        return version
    return run(conn, sq.migrate(time.time()))


# -- waking this process's workers -------------------------------------------------

_Listener = tuple[asyncio.AbstractEventLoop, Callable[[str], None]]
_listeners_lock = threading.Lock()
_listeners: dict[str, list[_Listener]] = {}


@functools.lru_cache(maxsize=64)
def _key(path: str) -> str:
    # Cached: realpath costs several system calls, and every enqueue wakes by it.
    return os.path.realpath(path)


def _add_listener(path: str, listener: _Listener) -> None:
    with _listeners_lock:
        _listeners.setdefault(_key(path), []).append(listener)


def _remove_listener(path: str, listener: _Listener) -> None:
    with _listeners_lock:
        found = _listeners.get(_key(path), [])
        with contextlib.suppress(ValueError):
            found.remove(listener)
        if not found:
            _listeners.pop(_key(path), None)


def _wake(path: str, queues: str) -> None:
    """Tell the workers of this process that listen on ``path`` (on their loops)."""
    with _listeners_lock:
        targets = list(_listeners.get(_key(path), ()))
    for listener in targets:
        loop, callback = listener
        try:
            loop.call_soon_threadsafe(callback, queues)
        except RuntimeError:  # its loop is closed: it will never listen again
            _remove_listener(path, listener)


def _inserted_ids(path: str, inserted: sq.Inserted) -> list[int]:
    """Once an insert committed: wake this process's workers, hand back the ids."""
    if inserted.wake is not None:
        _wake(path, inserted.wake)
    return inserted.ids


def _refuse_connection() -> NoReturn:
    raise ValueError(
        "connection=: transactional enqueue needs PostgreSQL; the sqlite backend has no "
        "caller's transaction to join. Leave connection= out, or use a postgresql:// "
        "database_url"
    )


def _no_pool() -> NoReturn:
    raise ConfigurationError(
        "the sqlite backend has no connection pool to lend: acquire() needs a "
        "postgresql:// database_url (open your own sqlite3 connection to the file if "
        "you need one)"
    )


# -- the heartbeat thread's session --------------------------------------------------


class SqliteMaintenance:
    """A worker's heartbeat thread's operations, on a connection of its own."""

    def __init__(self, path: str, synchronous: str = SYNCHRONOUS) -> None:
        self._conn = connect(path, synchronous)

    def heartbeat(self, worker_id: str) -> bool:
        """Refresh the heartbeat; False if the worker was declared dead meanwhile."""
        return run(self._conn, sq.heartbeat(worker_id, time.time()))

    def register_worker(
        self,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: Sequence[str] | None,
        concurrency: int,
    ) -> None:
        """Record the worker (again)."""
        op = sq.register_worker(worker_id, hostname, pid, queues, concurrency, time.time())
        run(self._conn, op)

    def cancel_requests(self, worker_id: str) -> list[int]:
        """Ids of the worker's running jobs whose cancellation was requested."""
        return run(self._conn, sq.cancel_requests(worker_id))

    def rescue_stale(self, stale_after: float) -> list[tuple[int, str]]:
        """Put back the running jobs of dead workers: (id, new status) pairs."""
        return run(self._conn, sq.rescue_stale(stale_after, time.time()))

    def prune_finished(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` jobs finished ``older_than`` seconds ago; how many."""
        return run(self._conn, sq.prune_finished(older_than, limit, time.time()))

    def abort(self) -> None:
        """Nothing to do: a local file has no link that can go silent (a locked
        database is bounded by the busy timeout)."""

    def close(self) -> None:
        """Close the session's connection."""
        self._conn.close()


# -- async ---------------------------------------------------------------------------


class SqliteBackend:
    """The async backend of ``sqlite:///path``: every operation runs on this backend's
    own thread and connection, so the event loop never blocks on SQLite. Usable from
    any event loop; after a fork the child opens a new thread and connection."""

    name = "sqlite"
    accepts_connections = False
    claim_lanes = 1
    claim_gather = CLAIM_GATHER

    def __init__(self, path: str, *, synchronous: str = SYNCHRONOUS) -> None:
        self.path = path
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._current: _SqliteThread | None = None
        self._owner: object = None

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        """Raises :class:`ConfigurationError`: there is no connection pool to lend."""
        _no_pool()

    # -- plumbing

    def _thread(self) -> _SqliteThread:
        with self._lock:
            owner = sync_owner()
            current = self._current
            if current is None or self._owner != owner:
                if current is not None and current.conn is not None:
                    _inherited.append(current.conn)  # the parent's: leave it alone
                current = self._current = _SqliteThread(self.path, self.synchronous)
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
        write = _Write(build, committed, linger)
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
        return await self._call(lambda conn: migrate(conn, apply=apply))

    async def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order."""
        if conn is not None:
            _refuse_connection()
        return await self._commit(
            lambda: sq.insert_jobs(spec, time.time()),
            functools.partial(_inserted_ids, self.path),
        )

    async def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        op = sq.get_job(job_id)  # validates the id here, not on the thread
        return await self._call(lambda conn: run(conn, op))

    async def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id."""
        if conn is not None:
            _refuse_connection()
        op = sq.list_jobs(name, queue)
        return await self._call(lambda c: run(c, op))

    async def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""
        op = sq.cancel_job(job_id, time.time())  # validates the id here, not on the thread
        return await self._commit(lambda: op)

    async def claim_jobs(
        self, limit: int, worker_id: str, queues: Sequence[str] | None
    ) -> list[Claimed]:
        """Claim up to ``limit`` ready jobs for ``worker_id``.

        If the caller is cancelled while the claim runs on the thread, the claim still
        completes there; the jobs it took are then put back (attempt not counted), as
        nobody will run them. A claim cancelled before it started never runs.
        """
        future: Future[list[Claimed]] = self._write(
            lambda: sq.claim_jobs(limit, worker_id, queues, time.time())
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
        self._write(lambda: sq.finish_jobs(released, worker_id, keep=True, now=time.time()))

    @contextlib.asynccontextmanager
    async def worker_session(self) -> AsyncIterator[SqliteBackend]:
        """No connection to hold: a worker's loops use the backend itself."""
        yield self

    async def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        """Write outcomes, fenced by worker and attempt (``keep=False`` deletes the
        finished ones)."""
        await self._commit(
            lambda: sq.finish_jobs(outcomes, worker_id, keep=keep, now=time.time()), linger=True
        )

    async def register_worker(
        self,
        worker_id: str,
        hostname: str,
        pid: int,
        queues: Sequence[str] | None,
        concurrency: int,
    ) -> None:
        """Record a worker; its heartbeat starts now."""
        await self._commit(
            lambda: sq.register_worker(worker_id, hostname, pid, queues, concurrency, time.time())
        )

    async def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""
        await self._commit(lambda: sq.unregister_worker(worker_id))

    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        """Put back the worker's running jobs that it does not hold; how many."""
        return await self._commit(lambda: sq.reconcile(worker_id, held))

    async def listen(self, on_notify: Callable[[str], None], on_ready: Callable[[], None]) -> None:
        """Call ``on_notify(queues)`` on this loop when this process enqueues due jobs
        on the same file (any Soniq, any thread), until cancelled. Other processes
        cannot be heard: the worker's polling finds their jobs."""
        listener = (asyncio.get_running_loop(), on_notify)
        _add_listener(self.path, listener)
        try:
            on_ready()
            await listener[0].create_future()  # forever: only cancellation ends it
        finally:
            _remove_listener(self.path, listener)

    def maintenance(self) -> SqliteMaintenance:
        """A blocking session on a connection of its own, for the heartbeat thread."""
        return SqliteMaintenance(self.path, self.synchronous)

    async def close(self) -> None:
        """Close the connection and end the thread, after what was queued on them; a
        later call opens new ones."""
        with self._lock:
            thread, self._current = self._current, None
            mine = self._owner == sync_owner()
        if thread is None or not mine:
            return
        await asyncio.wrap_future(thread.close())


class _SqliteThread:
    """One thread of a :class:`SqliteBackend`, its connection and its queue of writes.
    The backend replaces it after ``close()`` or a fork; what was queued on it runs on
    it, before it closes."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="soniq-sqlite")
        self.conn: sqlite3.Connection | None = None  # used on the thread only
        self.writes_changed = threading.Condition()
        self.writes: list[_Write] = []  # queued for the thread's next transaction
        self.closing = False

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> Future[T] | None:
        """Run ``work`` on the thread with its connection; None once closing."""
        with self.writes_changed:
            if self.closing:
                return None
            return self.executor.submit(self._on_thread, work)

    def write(self, write: _Write) -> bool:
        """Queue ``write`` for the thread's next transaction; False once closing."""
        with self.writes_changed:
            if self.closing:
                return False
            self.writes.append(write)
            if len(self.writes) == 1:
                # Submitted under the lock, so never after close()'s last task.
                self.executor.submit(self._run_writes)
            elif not write.linger:
                self.writes_changed.notify()
        return True

    def close(self) -> Future[None]:
        """Take nothing new, close the connection after what was queued, end."""
        with self.writes_changed:
            self.closing = True
            done = self.executor.submit(self._close_connection)
        self.executor.shutdown(wait=False)
        return done

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = connect(self.path, self.synchronous)
        return self.conn

    @contextlib.contextmanager
    def _connected(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            yield conn
        finally:
            if conn.in_transaction:  # a failed rollback: do not reuse the connection
                self.conn = None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._connected() as conn:
            return work(conn)

    def _run_writes(self) -> None:
        with self.writes_changed:
            self.writes_changed.wait_for(
                lambda: not all(w.linger for w in self.writes), timeout=LINGER
            )
            writes, self.writes = self.writes, []
        commit_together(self._connected, writes)

    def _close_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


# -- blocking ------------------------------------------------------------------------


class _WriteTurns:
    """The writes of a :class:`SqliteSyncBackend`'s threads, committed in turns.

    Threads that each took SQLite's write lock on a connection of their own would
    fight for it in SQLite's busy handler, which sleeps 1, 2, 5, ... up to 100 ms at a
    time however soon the lock frees (a loser can wait most of a second while others
    win), and each would pay a commit (an fsync at FULL) of its own. Here they queue
    in Python instead, first come first served. One of the waiting threads at a time
    leads: it takes the writes at the front of the line (up to :data:`MAX_GROUP`,
    its own among them unless the line is longer) and commits them in one
    transaction on its own thread (:func:`run_together`: one commit, each write in a
    savepoint so a failing one fails alone); then any waiting thread whose write is
    not done leads the next turn. A thread writing alone leads at once and runs its
    write as if there were no line.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._line: collections.deque[_Write] = collections.deque()  # not taken yet
        self._leading = False

    def write(
        self,
        build: Callable[[], Operation[Any]],
        committed: Callable[[Any], Any] | None,
        connection: Callable[[], AbstractContextManager[sqlite3.Connection]],
    ) -> Any:
        """Commit ``build()``'s operation in turn, perhaps with others, and return its
        value (mapped by ``committed`` once committed). A writer that finds nobody
        writing and nobody waiting runs its operation at once, as if there were no
        line: the common case of one thread pays for no future and no hand-off."""
        leading = False
        try:
            with self._changed:
                if not self._leading and not self._line:
                    leading = True  # before the flag: the finally clears it
                    self._leading = True
            if leading:
                with connection() as conn:
                    value = run(conn, build())
        finally:
            if leading:
                self._hand_over()
        if leading:
            return value if committed is None else committed(value)
        return self._write_in_line(_Write(build, committed, linger=False), connection)

    def _write_in_line(
        self,
        write: _Write,
        connection: Callable[[], AbstractContextManager[sqlite3.Connection]],
    ) -> Any:
        queued = False
        while True:
            leading = False
            group: list[_Write] = []
            try:
                with self._changed:
                    try:
                        if not queued:
                            self._line.append(write)
                            queued = True
                        while self._leading and not write.future.done():
                            self._changed.wait()
                    except BaseException:
                        # Interrupted (KeyboardInterrupt, a signal handler's
                        # SystemExit): dropped, unless a leader has taken it.
                        with contextlib.suppress(ValueError):
                            self._line.remove(write)
                        raise
                    if write.future.done():
                        break
                    leading = True  # before the flag: the finally clears it
                    self._leading = True
                    group = [self._line.popleft() for _ in range(min(MAX_GROUP, len(self._line)))]
                commit_together(connection, group)
            except BaseException as exc:
                if leading:  # interrupted before commit_together took the group over
                    _fail_unsettled(group, _interrupted(exc))
                raise
            finally:
                if leading:
                    self._hand_over()
        return write.future.result()

    def _hand_over(self) -> None:
        """End this thread's turn: a waiting thread whose write is not done leads next."""
        with self._changed:
            self._leading = False
            self._changed.notify_all()


class SqliteSyncBackend:
    """The blocking backend of ``sqlite:///path`` (``eq.sync``). Safe to call from
    several threads at once: reads take a connection of a small pool each; writes
    commit in turns, grouped (:class:`_WriteTurns`)."""

    name = "sqlite"
    accepts_connections = False

    def __init__(self, path: str, *, synchronous: str = SYNCHRONOUS) -> None:
        self.path = path
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._owner: object = sync_owner()
        self._generation = 0  # bumped by close(): connections of before are not kept
        self._turns = _WriteTurns()

    def acquire(self) -> AbstractContextManager[Any]:
        """Raises :class:`ConfigurationError`: there is no connection pool to lend."""
        _no_pool()

    def _adopt_after_fork(self) -> None:
        """Under ``self._lock``: after a fork, the parent's idle connections stay its own
        and its line of writes is not ours (the threads in it are not in this process)."""
        if self._owner != sync_owner():
            _inherited.extend(self._idle)
            self._idle, self._owner = [], sync_owner()
            self._turns = _WriteTurns()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._adopt_after_fork()
            generation = self._generation
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = connect(self.path, self.synchronous)
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
        """Run a write in turn (:class:`_WriteTurns`); ``committed`` maps its value
        once it is committed."""
        with self._lock:
            self._adopt_after_fork()
            turns = self._turns
        result: T = turns.write(build, committed, self._connection)
        return result

    def migrate(self, *, apply: bool) -> int:
        """Create or upgrade the schema (``apply=False``: only check it)."""
        with self._connection() as conn:
            return migrate(conn, apply=apply)

    def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call; ids in input order."""
        if conn is not None:
            _refuse_connection()
        return self._commit(
            lambda: sq.insert_jobs(spec, time.time()),
            functools.partial(_inserted_ids, self.path),
        )

    def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        return self._run(sq.get_job(job_id))

    def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id."""
        if conn is not None:
            _refuse_connection()
        return self._run(sq.list_jobs(name, queue))

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job, or request cancellation of a running one."""
        op = sq.cancel_job(job_id, time.time())  # validates the id here, in the caller
        return self._commit(lambda: op)

    def close(self) -> None:
        """Close the idle connections (busy ones close when their call returns)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
            mine = self._owner == sync_owner()
        if mine:
            for conn in idle:
                conn.close()
