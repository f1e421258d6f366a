"""SQLite connections with Soniq's settings, the databases they open (a file, or
memory), and running an operation of ``soniq.core.sql.sqlite`` on one. See the
package's docstring for the settings and why."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import attrs

from soniq.core.errors import ConfigurationError, SchemaNotReadyError
from soniq.core.sql import sqlite as sq
from soniq.core.sql.sqlite import Operation, Result
from soniq.drivers._common import register_connection_errors

T = TypeVar("T")
log = logging.getLogger("soniq")

# "database is locked" past the busy timeout: the next try may pass.
register_connection_errors(sqlite3.OperationalError)

BUSY_TIMEOUT_MS = 5000
#: The ``synchronous`` levels a SQLite URL may ask for; the first is the default.
SYNCHRONOUS_LEVELS = ("FULL", "NORMAL")
SYNCHRONOUS = SYNCHRONOUS_LEVELS[0]
#: The page size of a database Soniq creates (a file with a database in it keeps its own).
#: A commit writes each page it changed to the WAL, whole, and fsyncs it: a one-job
#: enqueue changes four pages (the table, the two claim indexes, the id counter), so
#: 4 KiB pages (SQLite's default) write 16 KiB per enqueue, 1 KiB pages 4 KiB.
#: (``python -m benchmarks.embedded --repeats 15``: ``eq.sync.enqueue`` at FULL 1.01x
#: huey with 1 KiB pages, 0.94x with 4 KiB; see docs/benchmarks.md.)
PAGE_SIZE = 1024


@attrs.frozen
class SqliteFile:
    """``sqlite:///path``: a database file, and the ``synchronous`` level of this
    process's connections to it (``FULL`` unless the URL says ``?synchronous=normal``).
    Time is the system clock."""

    path: str
    synchronous: str = SYNCHRONOUS

    name = "sqlite"

    def __str__(self) -> str:
        return self.path

    def connect(self) -> sqlite3.Connection:
        """A new connection with Soniq's settings."""
        return connect(self.path, self.synchronous)

    @property
    def key(self) -> str:
        """What identifies the database in this process (for wake-ups)."""
        return _key(self.path)

    @staticmethod
    def clock() -> float:
        """Now, in epoch seconds."""
        return time.time()


@attrs.define(eq=False)
class SqliteMemory:
    """``memory://``: a SQLite database in this process's memory, with the same SQL
    and the same backends as a file. The connections of one Soniq and its twin share
    it (SQLite's ``memdb`` VFS, by name); it lives as long as this object. ``clock``
    (epoch seconds) is an attribute that tests may replace (``soniq.testing.use_clock``)
    to make scheduled jobs due without sleeping."""

    clock: Callable[[], float] = time.time
    path: str = attrs.field(factory=lambda: f"/soniq-memory-{uuid.uuid4().hex}")
    _anchor: sqlite3.Connection | None = attrs.field(default=None, repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    name = "memory"

    def __str__(self) -> str:
        return "memory://"

    @property
    def key(self) -> str:
        """What identifies the database in this process (for wake-ups)."""
        return self.path

    def connect(self) -> sqlite3.Connection:
        """A new connection to the shared in-memory database."""
        with self._lock:
            # The database is freed with its last connection: one stays open for as
            # long as this object lives, whatever the backends close.
            if self._anchor is None:
                anchor = _open(f"file:{self.path}?vfs=memdb", uri=True)
                # A new database in memory has nothing to upgrade: it starts current,
                # so that tests need no migration step (as PostgreSQL's test fixtures
                # usually make one).
                migrate(anchor, self.clock(), apply=True)
                self._anchor = anchor
        return _open(f"file:{self.path}?vfs=memdb", uri=True)


#: Where a SQLite backend's jobs are.
SqliteDatabase = SqliteFile | SqliteMemory


def _open(target: str, *, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(
        target,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,  # each connection is used by one thread at a time
        uri=uri,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except BaseException:
        conn.close()
        raise
    return conn


def connect(path: str, synchronous: str = SYNCHRONOUS) -> sqlite3.Connection:
    """A connection to the file ``path`` with Soniq's settings (see the module
    docstring)."""
    if synchronous not in SYNCHRONOUS_LEVELS:
        raise ConfigurationError(
            f"synchronous must be one of {SYNCHRONOUS_LEVELS}, got {synchronous!r}"
        )
    try:
        conn = _open(path)
    except sqlite3.Error as exc:
        raise ConfigurationError(
            f"cannot open the SQLite database {path!r} ({exc}); does its directory exist "
            "and is it writable?"
        ) from None
    try:
        # Before journal_mode: a WAL database's page size cannot change afterwards.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = _wal(conn)
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


def _wal(conn: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode = WAL``, again while the file is locked (within the busy
    timeout): processes opening one new file at once race to write its first page,
    and the loser is told "database is locked" at once, SQLite's busy handler not
    called (8 processes running ``soniq migrate`` on a new file: 1 run in 5)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


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


def migrate(conn: sqlite3.Connection, now: float, *, apply: bool) -> int:
    """Bring the database's schema up to date (or only check it): a read when it is
    current, else the pending DDL in one ``BEGIN IMMEDIATE`` transaction."""
    version = run(conn, sq.schema_version())
    if sq.check_version(version, apply=apply):
        return version
    return run(conn, sq.migrate(now))


@functools.lru_cache(maxsize=64)
def _key(path: str) -> str:
    # Cached: realpath costs several system calls, and every enqueue wakes by it.
    return os.path.realpath(path)
