"""A line of threads that share statements: while a statement runs, the threads that
come wait in line, and the front of the line goes out as one group, sent by the first
thread in it on its own thread. The SQLite backend's blocking writes
(``eq.sync``: one statement at a time, the group in one transaction) and the
PostgreSQL blocking enqueues (``eq.sync``: one merged statement per group) both wait
in a :class:`ThreadLine`; only what a group's statement is differs.

A thread that finds room (fewer statements in flight than allowed), nobody waiting
and nobody expected back runs its own statement at once, with no hand-off and no
future: a thread alone pays for no line. A waiting thread sleeps until it is woken:
to send the group it was handed, with its own call answered, or (the first in line)
to wait for the callers of a statement, which is woken again when one ends.

The callers a group's statement answers come back together (threads enqueueing in a
loop, the requests of one burst), and they go out together: the first of them back
finds a place free but waits until the others have joined it, as long as they keep
coming (:data:`GAP` at most between two) and :data:`HOLD` at most in all; so does a
call that finds a statement of several calls in flight, for that statement's callers.
Otherwise the first one back would go alone, the next ones would queue behind it, and
the groups would dwindle to a call or two, each paying a commit. The line goes out as
soon as it holds its share of the callers about (those waiting, those expected back,
those of statements of several calls in flight: one share per place), not when all
are back: statements then go out one after the other, and the database writes one
while the callers of the other run, instead of writing both at once while every
caller waits, then none while they all run.

The callers of a group are woken one after the other: the sender wakes the first, and
each wakes the next as it wakes. Woken all at once, they would all queue for the GIL
(a second sleep and wake-up each) behind the first, and ahead of the sender of the
other statement, whose answer then waits.

Ctrl-C on the main thread is held off until its call has ended, then raised (a second
one at once): see :class:`_HeldInterrupt`.
"""

from __future__ import annotations

import collections
import importlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

from soniq.drivers._common import interrupted

log = logging.getLogger("soniq")

try:  # The C module under ``signal``: its functions without the enum conversions
    _signals: Any = importlib.import_module("_signal")  # (0.3 us a call, not 2-3)
except ImportError:  # (a Python without it)
    _signals = signal

R = TypeVar("R")


class Future(Protocol):
    """What a line needs of a call's future (a ``concurrent.futures.Future`` is one)."""

    def done(self) -> bool: ...
    def result(self) -> Any: ...
    def set_result(self, value: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...
    def add_done_callback(self, fn: Callable[[Any], object]) -> None: ...


class Answered(Protocol):
    """What waits in a line: a call, answered through its future."""

    @property
    def future(self) -> Future: ...


#: Orders an Answer's callbacks with its setting (an uncontended lock: setting an
#: answer takes it once).
_ANSWER_LOCK = threading.Lock()


class Answer(Generic[R]):
    """The future of a call in a line whose thread reads it only once woken (the
    wake-up orders the read after the write): a ``concurrent.futures.Future`` but for
    the condition that one takes and notifies on every step (2.7 us a call)."""

    __slots__ = ("_callbacks", "_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Answer[R]], object]] | None = None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> R:
        if self._error is not None:
            raise self._error
        value: R = self._value  # (set with no error: an R)
        return value

    def set_result(self, value: R) -> None:
        self._set(value, None)

    def set_exception(self, exception: BaseException) -> None:
        self._set(None, exception)

    def _set(self, value: Any, error: BaseException | None) -> None:
        with _ANSWER_LOCK:
            if self._done:  # (and the answer given first stays)
                raise InvalidStateError("this answer was already set")
            self._value, self._error, self._done = value, error, True
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(self)

    def add_done_callback(self, fn: Callable[[Answer[R]], object]) -> None:
        with _ANSWER_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)


I = TypeVar("I", bound=Answered)  # noqa: E741  (the line's item)

#: Longest the first in line waits, with a place free, for the callers of statements
#: to come back (seconds): about two commits' time. Callers that are not back by then
#: are not waited for again.
HOLD = 0.001
#: Longest the gatherer waits for the next caller coming back (seconds): callers in a
#: loop come back within tens of microseconds of each other; callers with other work
#: to do (a web request's) do not, and are not waited for long.
GAP = 0.0002


class _Turn(Generic[I]):
    __slots__ = ("after", "gone", "group", "item", "signalled", "woken")

    def __init__(self, item: I) -> None:
        self.item = item
        # A bare lock, taken now and released to wake the thread: an Event's
        # condition wakes it only to queue again for the waker's lock. (16 threads
        # through a line whose statement sleeps 0.5 ms: 10-12k calls/s with Events,
        # 11-15k with locks, CPU per call 63 -> 40 us.)
        self.woken = threading.Lock()
        self.woken.acquire()
        #: Under the line's lock: ``woken`` was released and the thread has not woken
        #: yet (so it is not released twice).
        self.signalled = False
        #: Set when this thread is to send the front of the line (itself first).
        self.group: list[_Turn[I]] | None = None
        #: Set under the line's lock when this call's group ended: the next caller of
        #: the group, which this thread wakes once woken (see the module docstring).
        self.after: _Turn[I] | None = None
        #: Set under the line's lock when this thread stopped waiting (interrupted)
        #: after its call was sent: the group's end does not count on it to wake the
        #: next caller.
        self.gone = False

    def wake(self) -> None:
        """Under the line's lock, for a turn still in line."""
        if not self.signalled:
            self.signalled = True
            self.woken.release()

    def wake_next(self) -> None:
        """Wake the next caller of this call's group, if there is one (at most once:
        an interruption between the two steps may bring a second call, which finds
        that caller's lock released and does nothing)."""
        after = self.after
        if after is not None:
            try:  # noqa: SIM105  (once per call: suppress() would build a context)
                after.woken.release()
            except RuntimeError:  # released already
                pass
            self.after = None


class _HeldInterrupt:
    """Ctrl-C held off while the main thread is in a line (Python runs signal handlers
    on the main thread only, between two steps of its code): the call runs to its end,
    then raises KeyboardInterrupt. An interruption landing in the line's bookkeeping
    could keep a place or leave a turn in line, and with SQLite's single place every
    later write would wait for good. A second Ctrl-C interrupts at once."""

    __slots__ = ("_caught", "_previous")

    def __init__(self, previous: Callable[[int, FrameType | None], Any]) -> None:
        self._previous = previous
        #: The frame of the first Ctrl-C caught, if one was.
        self._caught: list[FrameType | None] = []

    @classmethod
    def here(cls) -> _HeldInterrupt | None:
        """On the main thread, with a Python handler for SIGINT: hold it off (else
        None: no handler of this thread can raise)."""
        if threading.get_ident() != threading.main_thread().ident:
            return None
        previous = _signals.getsignal(signal.SIGINT)
        if not callable(previous):  # ignored, the default action, or set from C
            return None
        held = cls(previous)
        _signals.signal(signal.SIGINT, held._catch)
        return held

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        if not self._caught:
            self._caught.append(frame)
            return
        # Asked again: now, as if the line held nothing off (and only this one).
        self._caught.clear()
        _signals.signal(signal.SIGINT, self._previous)
        self._previous(signum, frame)

    def let_go(self, first: Callable[[], object] | None = None) -> None:
        """Give SIGINT its handler back; if a Ctrl-C was held off, call ``first``,
        then that handler (the default one raises KeyboardInterrupt)."""
        _signals.signal(signal.SIGINT, self._previous)
        if self._caught:
            frame, self._caught = self._caught[0], []
            if first is not None:
                first()
            self._previous(signal.SIGINT, frame)


class ThreadLine(Generic[I]):
    """Threads sharing statements (see the module's docstring). ``send(items)``
    runs one group's statement and answers each item's future; should it raise
    (the thread interrupted), every item not answered yet hears so, and the line
    goes on. ``late(value)`` is told of the value of a call whose thread was
    interrupted after its group was sent. The line goes out in even groups of at
    least ``min_split`` calls when several places are free. ``hold`` and ``gap``: see
    :data:`HOLD` and :data:`GAP`."""

    def __init__(
        self,
        send: Callable[[list[I]], None],
        *,
        max_in_flight: int,
        max_batch: int,
        late: Callable[[Any], None] | None = None,
        hold: float = HOLD,
        gap: float = GAP,
        min_split: int = 1,
    ) -> None:
        self._send = send
        self._max = max_in_flight
        self._max_batch = max_batch
        self._late = late
        self._hold = hold
        self._gap = gap
        self._min_split = min_split
        self._lock = threading.Lock()
        self._in_flight = 0
        #: The calls of the statements of several calls in flight, whose callers will
        #: come back together (0: no such statement in flight).
        self._grouped = 0
        self._line: collections.deque[_Turn[I]] = collections.deque()
        #: Callers answered by groups that ended, not back yet: a hint (a caller may
        #: not come back), forgotten when the gatherer stops waiting.
        self._returning = 0
        #: Callers have been seen to come back at once (a line formed while every
        #: place was taken): they are waited for. Off when a gatherer waited in vain,
        #: so that callers with other work between calls go at once, as alone.
        self._looping = False
        #: The first in line while it waits, a place being free, for those callers.
        self._gatherer: _Turn[I] | None = None
        #: When a caller last joined the line or a statement ended (monotonic).
        self._last_come = 0.0
        #: How many groups were sent of each size (for tests and metrics).
        self.batches: collections.Counter[int] = collections.Counter()

    def run(self, alone: Callable[[], R], item: Callable[[], I]) -> R:
        """``alone()`` at once when there is room and nobody waits or is expected
        back; else wait in line as ``item()`` and return its future's value.

        On the main thread a Ctrl-C is held off until the call has ended (its job
        committed, and its value told to ``late``), then raised; a second one is
        raised at once (see :class:`_HeldInterrupt`)."""
        held = _HeldInterrupt.here()
        if held is None:
            return self._run(alone, item)
        try:
            value = self._run(alone, item)
        except BaseException:
            held.let_go()  # (a Ctrl-C held off is raised over the call's own error)
            raise
        late = self._late
        held.let_go(None if late is None else lambda: late(value))
        return value

    def _run(self, alone: Callable[[], R], item: Callable[[], I]) -> R:
        # Everything after the place is taken or the turn joins the line is inside the
        # try: an interruption (Ctrl-C) can land as soon as the lock is let go, and a
        # place kept or a turn left in line would hold up every later call for good.
        taken = False  # a place for this thread's own statement
        turn: _Turn[I] | None = None
        group: list[_Turn[I]] | None = None
        gathering = False  # (made the gatherer on joining: not to be woken for it)
        try:
            with self._lock:
                # One decision under the lock: a thread that found no room joins the
                # line before a statement ending now could miss it. (So the line never
                # waits while there is room, but behind a gatherer, which has a timer.)
                if self._returning:
                    self._returning -= 1
                if self._in_flight < self._max and not self._waited_for():
                    self._in_flight += 1
                    taken = True
                else:
                    turn = _Turn(item())
                    self._line.append(turn)
                    self._last_come = time.monotonic()
                    self._line_changed(turn)
                    gathering = self._gatherer is turn
            if turn is None:
                return alone()
            if not gathering:
                turn.woken.acquire()
                turn.wake_next()
            if not turn.item.future.done():  # (answered: sent by another, nothing to do)
                group = self._woken(turn, woken=not gathering)
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
            # The place is given back before the group's callers are woken, so that
            # they find themselves expected back.
            if taken:
                self._end([])
            elif group is not None:
                first = self._end(group)
                if first is not None:
                    first.woken.release()
        result: R = turn.item.future.result()
        return result

    def _woken(self, turn: _Turn[I], *, woken: bool) -> list[_Turn[I]] | None:
        """The first in line, woken (``woken``: run() took the turn's lock, released
        once) or made the gatherer as it joined: the group it is to send (itself
        first), once it has one. As the gatherer, it waits for the callers coming back
        while they come (a ``gap`` at most between two, counted from the gathering's
        start or the last statement's end) and while statements of several calls are
        in flight, ``hold`` at most in all; then it has the line handed out."""
        started = None
        while True:
            with self._lock:
                if woken:  # a wait that timed out may have missed a release since
                    turn.signalled = False
                if turn.group is not None or turn.item.future.done():
                    return turn.group
                gathering = self._gatherer is turn
                if gathering:
                    now = time.monotonic()
                    if started is None:
                        started = now
                    until = started + self._hold
                    if not self._grouped:
                        until = min(until, max(started, self._last_come) + self._gap)
                    wait = until - now
                    if wait <= 0:  # those not back by now are not coming soon
                        self._returning = 0
                        self._looping = False
                        self._hand_out()  # the gatherer is first in line: its group
                        continue
            woken = turn.woken.acquire(timeout=wait if gathering else -1)

    def _waited_for(self) -> bool:
        """Under the lock: somebody to go with (a call that finds a place free goes
        alone only if not): a line, callers expected back, or a statement of
        several calls in flight, whose callers will come back together."""
        return bool(self._line or (self._looping and (self._returning or self._grouped)))

    def _line_changed(self, joining: _Turn[I] | None = None) -> None:
        """Under the lock, a call having joined the line (``joining``) or a place
        freed: hand the line out, unless callers are expected back to join it while a
        place is free and it is shorter than its share of the callers about (the
        first in line then waits for them: it is woken to, unless it is the one
        joining, which gathers at once)."""
        if not self._line:
            return
        if self._in_flight >= self._max:
            self._looping = True  # callers come faster than statements end
            return
        waiting = len(self._line)
        share = -(-(waiting + self._returning + self._grouped) // self._max)
        if not self._looping or not (self._returning or self._grouped) or waiting >= share:
            self._hand_out()  # (nobody else to wait for, or enough to go)
        elif self._gatherer is None:
            self._gatherer = self._line[0]
            if self._gatherer is not joining:
                self._gatherer.wake()

    def _leave(self, turn: _Turn[I]) -> None:
        """A waiting thread interrupted (KeyboardInterrupt, a signal handler's
        exception): its call is dropped from the line; handed a group, it gives the
        others their place back and its turn to the next; already sent by another,
        its call goes on, and ``late`` hears of its value."""
        with self._lock:
            if turn.group is not None:
                self.batches[len(turn.group)] -= 1
                if len(turn.group) > 1:
                    self._grouped -= len(turn.group)
                # Back at the front, behind a gatherer (first in line, which may
                # have been woken: nobody else in line may be).
                gatherer = self._line.popleft() if self._gatherer is not None else None
                self._line.extendleft(reversed(turn.group[1:]))
                if gatherer is not None:
                    self._line.appendleft(gatherer)
                turn.group = None
                self._in_flight -= 1
                self._line_changed()
                return
            if turn in self._line:
                self._line.remove(turn)
                if self._gatherer is turn:
                    self._gatherer = None
                    self._line_changed()  # the next one gathers
                return
            turn.gone = True
            turn.wake_next()  # (its group ended: the next caller counts on this thread)
        late = self._late
        if late is not None:
            turn.item.future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else late(f.result())
            )

    def _end(self, group: list[_Turn[I]]) -> _Turn[I] | None:
        """A statement ended, its callers answered: those of ``group`` (empty for a
        call alone) are expected back (when more than one), and the line may go out.
        Returns the first of the group's other callers to wake; each wakes the next
        (``_Turn.after``), those that stopped waiting left out."""
        with self._lock:
            size = len(group)
            self._in_flight -= 1
            if size > 1:
                self._grouped -= size
                self._returning += size
                self._last_come = time.monotonic()
                if self._gatherer is not None:  # it waits by another rule now
                    self._gatherer.wake()
            self._line_changed()
            first = None
            for other in reversed(group[1:]):
                if not other.gone:
                    other.after, first = first, other
            return first

    def _hand_out(self) -> None:
        """Under the lock: hand the line out to the first thread of each group, in
        even groups of at least ``min_split`` calls while places are free."""
        self._gatherer = None
        waiting = len(self._line)
        free = self._max - self._in_flight
        statements = min(free, max(1, waiting // self._min_split, -(-waiting // self._max_batch)))
        for i in range(statements):
            size = min(self._max_batch, -(-len(self._line) // (statements - i)))
            group = [self._line.popleft() for _ in range(size)]
            self._in_flight += 1
            if size > 1:
                self._grouped += size
            self.batches[size] += 1
            group[0].group = group
            group[0].wake()
