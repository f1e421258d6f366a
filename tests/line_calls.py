"""What the tests of soniq.drivers.lines.ThreadLine share: a call that waits in a
line, a statement that answers it, a way to tell that a call is answered (not held
up for good), and what the line holds of Ctrl-C right now."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future

from soniq.drivers.lines import _HeldInterrupt


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


def answering(sent: list[list[int]] | None = None) -> Callable[[list[Call]], None]:
    """A group's statement that answers each call with its own number (and notes
    the groups it sent in ``sent``)."""

    def send(calls: list[Call]) -> None:
        if sent is not None:
            sent.append([call.n for call in calls])
        for call in calls:
            call.future.set_result(call.n)

    return send


def holding_interrupt() -> _HeldInterrupt | None:
    """The line's holder of Ctrl-C now (None: the main thread is in no line)."""
    handler = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return handler if isinstance(handler, _HeldInterrupt) else None


def presses_held() -> int:
    """How many Ctrl-C the line holds off for the main thread now."""
    held = holding_interrupt()
    return 0 if held is None else len(held._caught)
