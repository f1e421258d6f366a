"""A small pool of daemon threads for sync jobs.

Not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined at interpreter
exit, so one stuck sync job would keep a worker from exiting after its grace period.
Daemon threads let the process end; the stuck job's row has been put back by then.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_STOP = object()


class DaemonThreadPool:
    """Runs callables on up to ``max_threads`` daemon threads, started on demand.

    The worker never submits more callables at once than it has slots, and the pool
    has one thread per slot at most, so a submitted callable never waits for a thread.
    """

    def __init__(self, max_threads: int, name: str = "soniq-job") -> None:
        self._max = max_threads
        self._name = name
        self._tasks: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on a pool thread (it must handle its own exceptions)."""
        with self._lock:
            self._busy += 1
            if self._busy > len(self._threads) and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._tasks.put(fn)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            try:
                task()  # type: ignore[operator]
            finally:
                with self._lock:
                    self._busy -= 1

    def shutdown(self) -> None:
        """Ask threads to exit once idle; a busy one exits after its job (never joined)."""
        for _ in self._threads:
            self._tasks.put(_STOP)
