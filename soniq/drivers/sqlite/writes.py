"""Group commit: writes that queue up while a connection is busy commit together, in
one transaction, each in a savepoint (:func:`run_together`). Two lines feed it:

- :class:`WriteThread`, the async backend's one thread: the event loop queues writes
  for it, and those that queue while it commits go in its next transaction; a
  worker's completions (``linger``) wait up to :data:`LINGER` for its next claim.
- the blocking backend's callers' threads wait in a
  :class:`~soniq.drivers.lines.ThreadLine`, and one of them at a time commits the
  front of the line on its own thread (:func:`commit_together`).

Both are needed: the async backend must never run SQLite on the event loop's thread
(so it owns a thread), while blocking callers already have threads of their own, and
handing their writes to another thread would cost each a hand-off.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, TypeVar

from soniq.core.sql.sqlite import Operation
from soniq.drivers._common import interrupted, own_copy
from soniq.drivers.sqlite.connection import SqliteDatabase, _drive, _roll_back, _translated, run

T = TypeVar("T")
log = logging.getLogger("soniq")

#: How long a worker's completions wait for its next claim, to commit with it: one
#: fsync for both halves the commits of a busy worker; an idle one writes them late by
#: this much.
LINGER = 0.002
#: Most writes one turn of the blocking backend's line commits together.
MAX_GROUP = 64


class Write:
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


def _fail_unsettled(writes: Sequence[Write], exc: BaseException) -> None:
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
                future.set_exception(own_copy(exc))


def run_together(conn: sqlite3.Connection, writes: Sequence[Write]) -> None:
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
    outcomes: list[tuple[Write, Any, BaseException | None]] = []
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
    connection: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]],
    writes: Sequence[Write],
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
        _fail_unsettled(writes, interrupted(exc))
        raise


class Writer:
    """The one connection that a line of writes commits on, opened on first use:
    used by one thread at a time (a :class:`WriteThread`'s thread, or the thread
    whose turn it is in the blocking backend's line), so a write takes no connection
    from a pool. A connection left in a transaction (its rollback failed) is not
    reused; one asked to close while in use closes when that use ends."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._busy = False
        self._close_after = False
        self.conn: sqlite3.Connection | None = None

    def begin(self) -> sqlite3.Connection:
        """The connection for one use (opened now if it is not); :meth:`end` after."""
        with self._lock:
            self._busy = True
        try:
            if self.conn is None:
                self.conn = self._connect()
        except BaseException:
            self.end(None)
            raise
        return self.conn

    def end(self, conn: sqlite3.Connection | None) -> None:
        """After a use of ``conn``: drop it if it is still in a transaction, and close
        it if that was asked meanwhile."""
        with self._lock:
            self._busy = False
            closing = self._close_after or (conn is not None and conn.in_transaction)
            self._close_after = False
            if closing:
                conn, self.conn = self.conn, None
        if closing and conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @contextlib.contextmanager
    def connected(self) -> Iterator[sqlite3.Connection]:
        """The connection, for one use."""
        conn = self.begin()
        try:
            yield conn
        finally:
            self.end(conn)

    def close(self) -> None:
        """Close the connection, now or when its use ends; a later use opens another."""
        with self._lock:
            if self._busy:
                self._close_after = True
                return
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class WriteThread:
    """One thread of a :class:`SqliteBackend`, its connection and its queue of writes.
    The backend replaces it after ``close()`` or a fork; what was queued on it runs on
    it, before it closes."""

    def __init__(self, database: SqliteDatabase) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="soniq-sqlite")
        self.writer = Writer(database.connect)  # used on the thread only
        self.writes_changed = threading.Condition()
        self.writes: list[Write] = []  # queued for the thread's next transaction
        self.closing = False

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> Future[T] | None:
        """Run ``work`` on the thread with its connection; None once closing."""
        with self.writes_changed:
            if self.closing:
                return None
            return self.executor.submit(self._on_thread, work)

    def write(self, write: Write) -> bool:
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
            done = self.executor.submit(self.writer.close)
        self.executor.shutdown(wait=False)
        return done

    def _on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self.writer.connected() as conn:
            return work(conn)

    def _run_writes(self) -> None:
        with self.writes_changed:
            self.writes_changed.wait_for(
                lambda: not all(w.linger for w in self.writes), timeout=LINGER
            )
            writes, self.writes = self.writes, []
        commit_together(self.writer.connected, writes)
