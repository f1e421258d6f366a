"""The no-op jobs of :mod:`benchmarks.embedded`, importable by its worker processes.

``SONIQ_EMBEDDED_DB`` (and ``SONIQ_EMBEDDED_SYNC``: ``FULL`` or ``NORMAL``): the
SQLite file of ``eq`` (``soniq worker benchmarks.embedded_jobs:eq --burst``).
``HUEY_EMBEDDED_DB`` (and ``HUEY_EMBEDDED_SYNC``: ``FULL``, ``NORMAL`` or
``default``, see :func:`make_huey`): the file of ``huey``, built only when the
variable is set (SqliteHuey creates its tables as soon as it is constructed).

``python -m benchmarks.embedded_jobs huey-drain N TIMEOUT`` runs huey's consumer with
4 worker threads on ``$HUEY_EMBEDDED_DB`` until N tasks have completed (counted with
huey's ``SIGNAL_COMPLETE``), prints ``done <ran>`` and stops the consumer; it gives up
after TIMEOUT seconds (``timeout <ran>``, exit status 1).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from typing import Any

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


eq = make_soniq(
    os.environ.get("SONIQ_EMBEDDED_DB", "soniq-embedded.db"),
    os.environ.get("SONIQ_EMBEDDED_SYNC", "FULL"),
)

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
    counter = itertools.count(1)
    finished = threading.Event()

    @huey.signal(SIGNAL_COMPLETE)
    def on_complete(signal: str, task: Any) -> None:
        if next(counter) >= n:
            finished.set()

    consumer = Consumer(huey, workers=HUEY_WORKERS, worker_type="thread")
    consumer.start()
    ok = finished.wait(timeout)
    ran = next(counter) - 1
    print(f"{'done' if ok else 'timeout'} {ran}", flush=True)
    consumer.stop(graceful=True)
    return 0 if ok else 1


if __name__ == "__main__":
    # Run the importable module's copy, not ``__main__``'s, so that there is one huey.
    from benchmarks import embedded_jobs as _module

    if len(sys.argv) == 4 and sys.argv[1] == "huey-drain" and _module.huey is not None:
        sys.exit(_module._huey_drain(int(sys.argv[2]), float(sys.argv[3])))
    sys.exit("usage: HUEY_EMBEDDED_DB=... python -m benchmarks.embedded_jobs huey-drain N TIMEOUT")
