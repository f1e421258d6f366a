"""The no-op jobs of :mod:`benchmarks.embedded`, and its drain processes.

``SONIQ_EMBEDDED_DB`` (and ``SONIQ_EMBEDDED_SYNC``: ``FULL`` or ``NORMAL``): the
SQLite file of ``eq``. ``HUEY_EMBEDDED_DB`` (and ``HUEY_EMBEDDED_SYNC``: ``FULL``,
``NORMAL`` or ``default``, see :func:`make_huey`): the file of ``huey``. Each is
built only when its variable is set, and each system's library is imported only
then: a drain process of one system never pays for importing the other.

Both drains are timed inside their process, after the imports (as the PostgreSQL
worker benchmark times its drains), and print ``done <ran> <seconds>``:

``python -m benchmarks.embedded_jobs soniq-drain C TIMEOUT`` runs
``eq.sync.run_worker(concurrency=C, burst=True)`` and times the call (the worker's
start, its claims, the jobs, the completion writes and its shutdown); ``<ran>`` is the
number of jobs ``done`` in the file. Past TIMEOUT seconds it prints ``timeout <ran>
<seconds>`` and exits with status 1.

``python -m benchmarks.embedded_jobs huey-drain N TIMEOUT`` runs huey's consumer with
4 worker threads (``Consumer(huey, workers=4, worker_type='thread')``, what
``huey_consumer -w 4 -k thread`` builds) and times from ``start()`` until N tasks
have completed (counted with huey's ``SIGNAL_COMPLETE``; its shutdown is not timed);
it gives up after TIMEOUT seconds (``timeout <ran> <seconds>``, exit status 1).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from soniq import Soniq

NOOP = "embedded.noop"
NOOP_SYNC = "embedded.noop_sync"
HUEY_NOOP = "embedded.huey_noop"
HUEY_WORKERS = 4


async def noop(n: int) -> None:
    """An async no-op job."""


def noop_sync(n: int) -> None:
    """A sync no-op job (Soniq runs it in a thread)."""


def huey_noop(n: int) -> None:
    """huey's no-op task (returns None, so huey stores no result)."""


def make_soniq(path: str, synchronous: str = "FULL") -> Soniq:
    """A Soniq on ``path`` (at ``synchronous`` FULL or NORMAL) with both no-op jobs
    registered under fixed names."""
    from soniq import Soniq

    app = Soniq(f"sqlite:///{path}?synchronous={synchronous.lower()}")
    app.job(name=NOOP)(noop)
    app.job(name=NOOP_SYNC)(noop_sync)
    return app


def make_huey(path: str, level: str) -> tuple[Any, Any]:
    """A ``SqliteHuey`` on ``path`` and its no-op task, WAL journal either way (huey's
    default). ``level``: ``FULL`` is huey's ``fsync=True`` (``PRAGMA synchronous=2``);
    ``NORMAL`` sets ``PRAGMA synchronous=1`` on each of its connections (huey's own
    ``fsync=False`` means OFF); ``default`` sets nothing (SQLite's compiled default)."""
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSqliteStorage(SqliteStorage):  # type: ignore[misc]
        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("PRAGMA synchronous=1")
            return conn

    class NormalSqliteHuey(SqliteHuey):  # type: ignore[misc]
        storage_class = NormalSqliteStorage

    kwargs: dict[str, Any] = {"journal_mode": "wal"}
    cls = SqliteHuey
    if level == "FULL":
        kwargs["fsync"] = True
    elif level == "NORMAL":
        cls = NormalSqliteHuey
    elif level != "default":
        raise ValueError(f"level must be FULL, NORMAL or default, got {level!r}")
    h = cls(name="embedded", filename=path, **kwargs)
    return h, h.task(name=HUEY_NOOP)(huey_noop)


eq: Any = None
if os.environ.get("SONIQ_EMBEDDED_DB"):
    eq = make_soniq(os.environ["SONIQ_EMBEDDED_DB"], os.environ.get("SONIQ_EMBEDDED_SYNC", "FULL"))

huey: Any = None
huey_task: Any = None
if os.environ.get("HUEY_EMBEDDED_DB"):
    huey, huey_task = make_huey(
        os.environ["HUEY_EMBEDDED_DB"], os.environ.get("HUEY_EMBEDDED_SYNC", "FULL")
    )


def _huey_drain(n: int, timeout: float) -> int:
    """Run huey's consumer (4 threads) until ``n`` tasks completed; see the module
    docstring."""
    import logging

    from huey.consumer import Consumer
    from huey.signals import SIGNAL_COMPLETE

    logging.basicConfig(level=logging.WARNING)
    if n <= 0:
        print("done 0 0.000000", flush=True)
        return 0
    counter = itertools.count(1)
    finished = threading.Event()

    @huey.signal(SIGNAL_COMPLETE)
    def on_complete(signal: str, task: Any) -> None:
        if next(counter) >= n:
            finished.set()

    consumer = Consumer(huey, workers=HUEY_WORKERS, worker_type="thread")
    started = time.perf_counter()
    consumer.start()
    ok = finished.wait(timeout)
    elapsed = time.perf_counter() - started
    ran = next(counter) - 1
    print(f"{'done' if ok else 'timeout'} {ran} {elapsed:.6f}", flush=True)
    consumer.stop(graceful=True)
    return 0 if ok else 1


def _soniq_drain(concurrency: int, timeout: float) -> int:
    """Run a burst worker on ``eq``; see the module docstring."""
    import contextlib
    import logging
    import sqlite3

    def ran() -> int:
        with contextlib.closing(sqlite3.connect(os.environ["SONIQ_EMBEDDED_DB"])) as conn:
            done = conn.execute("SELECT count(*) FROM soniq_jobs WHERE status = 'done'")
            return int(done.fetchone()[0])

    def give_up() -> None:
        print(f"timeout {ran()} {time.perf_counter() - started:.6f}", flush=True)
        os._exit(1)  # the worker is stuck: do not wait for it

    logging.basicConfig(level=logging.WARNING)
    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    started = time.perf_counter()
    watchdog.start()
    eq.sync.run_worker(concurrency=concurrency, burst=True)
    elapsed = time.perf_counter() - started
    watchdog.cancel()
    print(f"done {ran()} {elapsed:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    # Run the importable module's copy, not ``__main__``'s, so that there is one huey.
    from benchmarks import embedded_jobs as _module

    if len(sys.argv) == 4 and sys.argv[1] == "huey-drain" and _module.huey is not None:
        sys.exit(_module._huey_drain(int(sys.argv[2]), float(sys.argv[3])))
    if len(sys.argv) == 4 and sys.argv[1] == "soniq-drain" and _module.eq is not None:
        sys.exit(_module._soniq_drain(int(sys.argv[2]), float(sys.argv[3])))
    sys.exit(
        "usage: HUEY_EMBEDDED_DB=... python -m benchmarks.embedded_jobs huey-drain N TIMEOUT\n"
        "       SONIQ_EMBEDDED_DB=... python -m benchmarks.embedded_jobs soniq-drain C TIMEOUT"
    )
