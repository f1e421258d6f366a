"""A process that enqueues on SQLite from two threads and shrugs off Ctrl-C on its
main thread (a notebook's kernel does the same): the test sends it SIGINT after
SIGINT and watches the other thread's writes go on.

``python -m tests.ctrl_c_app PATH``: prints ``ready``, then ``progress N`` every 100
jobs of the other thread."""

from __future__ import annotations

import sys
import threading

from soniq import Soniq

eq = Soniq(f"sqlite:///{sys.argv[1]}" if __name__ == "__main__" else "memory://")


@eq.job(name="noted")
def noted(n: int) -> None:
    pass


def other_thread() -> None:
    n = 0
    while True:
        eq.sync.enqueue("noted", n=-1)
        n += 1
        if n % 100 == 0:
            print(f"progress {n}", flush=True)


def main_thread() -> None:
    while True:
        # (try, not contextlib.suppress: no Python steps of its own where a Ctrl-C
        # could land outside it)
        try:  # noqa: SIM105
            eq.sync.enqueue("noted", n=0)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    eq.sync.ensure_initialized()
    threading.Thread(target=other_thread, daemon=True).start()
    print("ready", flush=True)
    while True:  # (a Ctrl-C between two enqueues, outside main_thread's try)
        try:  # noqa: SIM105
            main_thread()
        except KeyboardInterrupt:
            pass
