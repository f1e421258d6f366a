"""The no-op jobs of :mod:`benchmarks.embedded`, importable by its worker processes.

``SONIQ_EMBEDDED_DB``: the SQLite file of ``eq`` (``soniq worker
benchmarks.embedded_jobs:eq --burst``). ``HUEY_EMBEDDED_DB`` (and
``HUEY_EMBEDDED_FSYNC``: ``1`` for ``synchronous=FULL``, ``default`` for huey's own
default): the file of ``huey``, built only when the variable is set (SqliteHuey
creates its tables as soon as it is constructed).

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


def make_soniq(path: str) -> Soniq:
    """A Soniq on ``path`` with both no-op jobs registered under fixed names."""
    app = Soniq(f"sqlite:///{path}")
    app.job(name=NOOP)(noop)
    app.job(name=NOOP_SYNC)(noop_sync)
    return app


def make_huey(path: str, fsync: str) -> tuple[Any, Any]:
    """A ``SqliteHuey`` on ``path`` and its no-op task. ``fsync="1"``: huey's
    ``fsync=True`` (``PRAGMA synchronous=2``, FULL); ``"default"``: no pragma set
    (SQLite's compiled default). WAL journal either way (huey's default)."""
    from huey import SqliteHuey

    kwargs: dict[str, Any] = {"journal_mode": "wal"}
    if fsync != "default":
        kwargs["fsync"] = fsync == "1"
    h = SqliteHuey(name="embedded", filename=path, **kwargs)
    return h, h.task(name=HUEY_NOOP)(huey_noop)


eq = make_soniq(os.environ.get("SONIQ_EMBEDDED_DB", "soniq-embedded.db"))

huey: Any = None
huey_task: Any = None
if os.environ.get("HUEY_EMBEDDED_DB"):
    huey, huey_task = make_huey(
        os.environ["HUEY_EMBEDDED_DB"], os.environ.get("HUEY_EMBEDDED_FSYNC", "1")
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
