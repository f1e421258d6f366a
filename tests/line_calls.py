"""What the tests of soniq.drivers.lines.ThreadLine share: a call that waits in a
line, and a way to tell that a call is answered (not held up for good)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future


class Call:
    """A call in a line: its number, and the future its statement answers."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.future: Future[int] = Future()


def answered_in_time(call: Callable[[], int]) -> int | None:
    """call() in another thread; its value, or None if it is not back within 10 s."""
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    thread.start()
    thread.join(10)
    return answers[0] if answers else None
