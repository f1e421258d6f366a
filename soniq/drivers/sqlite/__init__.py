"""The SQLite backend (``sqlite:///path.db``, and the default when no URL is given):
stdlib ``sqlite3``, one file, any number of processes on one host. ``memory://`` is
the same code on a database in this process's memory (:class:`SqliteMemory`).

What runs where:

- :class:`SqliteBackend` (``eq``) runs every operation on a thread of its own, with its
  own connection (a one-thread executor per backend), so the event loop never waits on
  SQLite I/O, a busy lock or an fsync.
- :class:`SqliteSyncBackend` (``eq.sync``) blocks, on its caller's thread; any number
  of threads may call it at once: each read on a connection of a small pool, and
  its enqueues and cancellations in turns, grouped, on one connection kept for
  writing (a ``soniq.drivers.lines.ThreadLine``).
- :class:`SqliteMaintenance` is a worker's heartbeat thread's own connection.

The statements and what they mean live in :mod:`soniq.core.sql.sqlite`; this package
runs them (:func:`run`) and keeps the clock: the database's ``clock()`` is read here
and passed in.

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
price is an fsync per commit, of every page the commit changed: a database Soniq
creates has 1 KiB pages (:data:`PAGE_SIZE`; SQLite's default is 4 KiB), so an
enqueue writes a quarter of the bytes. ``sqlite:///path.db?synchronous=normal``
trades it away: still safe against a crash of the *process* (kill -9, an exception),
and the database is never corrupt, but in WAL mode the last transactions before a
power loss or an OS crash can be lost: enqueues the caller was told had succeeded,
and completions (those jobs would run again). Each process chooses for its own
connections; the level is not stored in the file.

Group commit. The async backend's writes queue for its one thread; those that queue
while it is busy commit in one transaction (``writes.run_together``), and a worker's
completions wait up to :data:`LINGER` for its next claim, so a busy worker pays one
commit for both. The enqueues and cancellations that several threads make through one
sync backend queue the same way, and one of those threads commits them
(a ``soniq.drivers.lines.ThreadLine``); other connections to the file (another backend, another
process, the heartbeat's) still meet them in SQLite's busy handler. An enqueue of one
job (no dedupe key) is one ``INSERT`` with no ``BEGIN`` when it runs alone, and joins
the shared transaction when others queued with it.

There is no LISTEN/NOTIFY: :meth:`SqliteBackend.listen` wakes a worker at once when
this process enqueues (any Soniq on the same file); jobs enqueued by other processes
are found by polling (``poll_interval``).

The package's modules: :mod:`.connection` (settings, databases, running an operation),
:mod:`.writes` (group commit), :mod:`.backends` (the backends).
"""

from soniq.drivers.sqlite.backends import (
    SqliteBackend,
    SqliteMaintenance,
    SqliteSyncBackend,
)
from soniq.drivers.sqlite.connection import (
    BUSY_TIMEOUT_MS,
    PAGE_SIZE,
    SYNCHRONOUS,
    SYNCHRONOUS_LEVELS,
    SqliteDatabase,
    SqliteFile,
    SqliteMemory,
    connect,
    migrate,
    run,
)
from soniq.drivers.sqlite.writes import LINGER, MAX_GROUP

__all__ = [
    "BUSY_TIMEOUT_MS",
    "LINGER",
    "MAX_GROUP",
    "PAGE_SIZE",
    "SYNCHRONOUS",
    "SYNCHRONOUS_LEVELS",
    "SqliteBackend",
    "SqliteDatabase",
    "SqliteFile",
    "SqliteMaintenance",
    "SqliteMemory",
    "SqliteSyncBackend",
    "connect",
    "migrate",
    "run",
]
