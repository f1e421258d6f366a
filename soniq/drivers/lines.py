"""A line of threads that share statements: while a statement runs, the threads that
come wait in line, and the front of the line goes out as one group, sent by the first
thread in it on its own thread. The SQLite backend's blocking writes
(``eq.sync``: one statement at a time, the group in one transaction) and the
PostgreSQL blocking enqueues (``eq.sync``: one merged statement per group) both wait
in a :class:`ThreadLine`; only what a group's statement is differs.

A thread that finds room (fewer statements in flight than allowed) and nobody waiting
runs its own statement at once, with no hand-off and no future: a thread alone pays
for no line. A waiting thread sleeps until it is woken once: to send the group it
was handed, or with its own call answered. No thread is woken for nothing.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Protocol, TypeVar

from soniq.drivers._common import interrupted

log = logging.getLogger("soniq")

R = TypeVar("R")


class Answered(Protocol):
    """What waits in a line: a call, answered through its future."""

    @property
    def future(self) -> Future[Any]: ...


I = TypeVar("I", bound=Answered)  # noqa: E741  (the line's item)


class _Turn(Generic[I]):
    __slots__ = ("group", "item", "woken")

    def __init__(self, item: I) -> None:
        self.item = item
        # A bare lock, taken now and released once to wake the thread: an Event's
        # condition wakes it only to queue again for the waker's lock. (16 threads
        # through a line whose statement sleeps 0.5 ms: 10-12k calls/s with Events,
        # 11-15k with locks, CPU per call 63 -> 40 us.)
        self.woken = threading.Lock()
        self.woken.acquire()
        #: Set when this thread is to send the front of the line (itself first).
        self.group: list[_Turn[I]] | None = None


class ThreadLine(Generic[I]):
    """Threads sharing statements (see the module's docstring). ``send(items)``
    runs one group's statement and answers each item's future; should it raise
    (the thread interrupted), every item not answered yet hears so, and the line
    goes on. ``late(value)`` is told of the value of a call whose thread was
    interrupted after its group was sent."""

    def __init__(
        self,
        send: Callable[[list[I]], None],
        *,
        max_in_flight: int,
        max_batch: int,
        late: Callable[[Any], None] | None = None,
    ) -> None:
        self._send = send
        self._max = max_in_flight
        self._max_batch = max_batch
        self._late = late
        self._lock = threading.Lock()
        self._in_flight = 0
        self._line: collections.deque[_Turn[I]] = collections.deque()
        #: How many groups were sent of each size (for tests and metrics).
        self.batches: collections.Counter[int] = collections.Counter()

    def run(self, alone: Callable[[], R], item: Callable[[], I]) -> R:
        """``alone()`` at once when there is room and nobody waits; else wait in line
        as ``item()`` and return its future's value."""
        # Everything after the place is taken or the turn joins the line is inside the
        # try: an interruption (Ctrl-C) can land as soon as the lock is let go, and a
        # place kept or a turn left in line would hold up every later call for good.
        taken = False  # a place for this thread's own statement
        turn: _Turn[I] | None = None
        group: list[_Turn[I]] | None = None
        try:
            with self._lock:
                # One decision under the lock: a thread that found no room joins the
                # line before a statement ending now could miss it. (So the line is
                # never waiting while there is room: whoever frees room hands it out.)
                if self._in_flight < self._max and not self._line:
                    self._in_flight += 1
                    taken = True
                else:
                    turn = _Turn(item())
                    self._line.append(turn)
            if turn is None:
                return alone()
            turn.woken.acquire()
            group = turn.group
            if group is not None:
                self._send([t.item for t in group])
        except BaseException as exc:
            if turn is not None and group is None:
                self._leave(turn)
            elif group is not None:  # this thread, sending its group, was interrupted
                for other in group[1:]:
                    if not other.item.future.done():
                        other.item.future.set_exception(interrupted(exc))
            raise
        finally:
            if group is not None:
                for other in group[1:]:
                    other.woken.release()
            if taken or group is not None:
                self._end()
        result: R = turn.item.future.result()
        return result

    def _leave(self, turn: _Turn[I]) -> None:
        """A waiting thread interrupted (KeyboardInterrupt, a signal handler's
        exception): its call is dropped from the line; handed a group, it gives the
        others their place back and its turn to the next; already sent by another,
        its call goes on, and ``late`` hears of its value."""
        with self._lock:
            if turn.group is not None:
                self.batches[len(turn.group)] -= 1
                self._line.extendleft(reversed(turn.group[1:]))
                turn.group = None
                self._in_flight -= 1
                self._hand_out()
                return
            if turn in self._line:
                self._line.remove(turn)
                return
        late = self._late
        if late is not None:
            turn.item.future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else late(f.result())
            )

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._hand_out()

    def _hand_out(self) -> None:
        """Under the lock: hand the front of the line to its first thread, while
        statements may start."""
        while self._in_flight < self._max and self._line:
            size = min(self._max_batch, len(self._line))
            group = [self._line.popleft() for _ in range(size)]
            self._in_flight += 1
            self.batches[size] += 1
            group[0].group = group
            group[0].woken.release()
