"""soniq.drivers.lines.ThreadLine on its own: threads that share statements, with
no database (the SQLite and PostgreSQL blocking faces are tested through it too)."""

from __future__ import annotations

import inspect
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import InvalidStateError
from types import TracebackType

import pytest

from soniq.drivers.lines import Answer, ThreadLine
from tests.conftest import wait_until
from tests.line_calls import Call, answered_in_time, answering, presses_held

pytestmark = pytest.mark.timeout(60)


def run_to_the_end(threads: list[threading.Thread], timeout: float) -> None:
    """Start ``threads`` and wait for them: each must be back within ``timeout``."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a caller never got its answer"


@pytest.fixture
def switching_often() -> Iterator[None]:
    """Threads switch as often as possible, so that a decision taken outside the
    line's lock would be interleaved with a statement ending."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_every_call_of_many_threads_is_answered_once_alone_or_in_a_group(
    switching_often: None, max_in_flight: int
) -> None:
    sent: list[int] = []
    lock = threading.Lock()

    def alone(n: int) -> int:
        with lock:
            sent.append(n)
        return n * 10

    def send(calls: list[Call]) -> None:
        for call in calls:
            call.future.set_result(alone(call.n))

    line: ThreadLine[Call] = ThreadLine(send, max_in_flight=max_in_flight, max_batch=5)
    results: dict[int, int] = {}

    def caller(k: int) -> None:
        for i in range(300):
            n = k * 1000 + i
            results[n] = line.run(lambda n=n: alone(n), lambda n=n: Call(n))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    run_to_the_end(threads, 30)
    assert results == {n: n * 10 for n in results} and len(results) == 8 * 300
    assert sorted(sent) == sorted(results)  # each call sent exactly once
    assert line._in_flight == 0 and not line._line
    assert sum(size * count for size, count in line.batches.items()) <= len(results)


def _blocked_in_line(thread_id: int) -> bool:
    """The thread sleeps on its turn's lock in ThreadLine._run (not about to)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None or frame.f_code is not ThreadLine._run.__code__:
        return False
    lines, first = inspect.getsourcelines(ThreadLine._run)
    (wait,) = [first + i for i, text in enumerate(lines) if "turn.woken.acquire()" in text]
    return frame.f_lineno == wait


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("presses", [1, 2])
def test_a_caller_interrupted_after_its_group_was_sent_leaves_its_value_to_late(
    sigint_raises: None, presses: int
) -> None:
    """Ctrl-C in the main thread while it waits for a group that another thread is
    sending: once, it is held off until the call has ended (its job committed, its
    value told to ``late``), then raised; twice, the second is raised at once, and
    ``late`` hears of the value when the group is committed. Nothing is lost, nothing
    is sent twice, and the caller behind it in the group, which it would have woken,
    is woken all the same."""
    first_sent, release_first, release_group = (threading.Event() for _ in range(3))
    groups: list[list[int]] = []
    late: list[int] = []

    def alone(n: int) -> int:  # the statement in flight that the others wait behind
        first_sent.set()
        assert release_first.wait(10)
        return n * 10

    def send(calls: list[Call]) -> None:
        groups.append([call.n for call in calls])
        assert release_group.wait(10)
        for call in calls:
            call.future.set_result(call.n * 10)

    line: ThreadLine[Call] = ThreadLine(send, max_in_flight=1, max_batch=5, late=late.append)

    def call(n: int) -> int:
        return line.run(lambda: alone(n), lambda: Call(n))

    answers: dict[int, int] = {}
    first = threading.Thread(target=lambda: answers.update({1: call(1)}))
    first.start()
    assert first_sent.wait(10)
    sender = threading.Thread(target=lambda: answers.update({2: call(2)}))
    sender.start()  # first in line: it will send the group
    wait_until(lambda: len(line._line) == 1)
    behind = threading.Thread(target=lambda: answers.update({4: call(4)}))
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main  # signals reach this thread
    still_waiting: list[bool] = []

    def interrupt_once_grouped() -> None:
        wait_until(lambda: len(line._line) == 2)  # this thread is in line behind 2
        behind.start()
        wait_until(lambda: len(line._line) == 3)
        release_first.set()  # statement 1 ends: the line [2, 3, 4] goes to thread 2
        wait_until(lambda: groups == [[2, 3, 4]])  # sent by thread 2
        wait_until(lambda: _blocked_in_line(main))  # the signal finds this thread asleep
        for press in range(1, presses + 1):
            signal.pthread_kill(main, signal.SIGINT)
            if press < presses:
                wait_until(lambda press=press: presses_held() == press)
        if presses == 1:
            wait_until(lambda: presses_held() == 1)
            time.sleep(0.05)  # (a signal not held off would have woken it by now)
            still_waiting.append(_blocked_in_line(main))
            release_group.set()

    interrupter = threading.Thread(target=interrupt_once_grouped)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        # This thread waits in line behind thread 2 until the signal: a real SIGINT,
        # which wakes a blocked lock, unlike _thread.interrupt_main.
        interrupter.start()
        call(3)
    interrupter.join(10)
    assert time.monotonic() - started < 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    if presses == 1:
        assert still_waiting == [True]
        assert late == [30]  # committed with its group, and reported before the raise
    else:
        assert late == []  # raised at once: its group has not been committed yet
        release_group.set()
    for thread in (first, sender, behind):
        thread.join(10)
    assert answers == {1: 10, 2: 20, 4: 40}
    wait_until(lambda: late == [30])  # committed with its group, and reported
    assert groups == [[2, 3, 4]] and line._in_flight == 0 and not line._line


class InterruptedOnLeaving:
    """The line's lock, with an interruption (what Ctrl-C does) raised once as the
    lock is let go: the first moment a signal's handler can run after a call took
    its place or joined the line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed = False

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_an_interruption_just_after_taking_a_place_gives_it_back(max_in_flight: int) -> None:
    """Ctrl-C landing as a thread that found room lets go of the lock, before its
    statement: the place is freed (else, with one place, every later call would wait
    for a statement that never ends)."""

    send = answering()

    line: ThreadLine[Call] = ThreadLine(send, max_in_flight=max_in_flight, max_batch=5)
    lock = InterruptedOnLeaving()
    line._lock = lock  # type: ignore[assignment]
    sent: list[int] = []
    lock.armed = True
    with pytest.raises(KeyboardInterrupt):
        line.run(lambda: sent.append(1) or 1, lambda: Call(1))
    assert sent == [] and line._in_flight == 0
    for n in range(2, 2 + max_in_flight + 1):  # more calls than places
        assert answered_in_time(lambda n=n: line.run(lambda: n, lambda: Call(n))) == n
    assert line._in_flight == 0 and not line._line


def test_an_interruption_just_after_joining_the_line_leaves_it() -> None:
    """Ctrl-C landing as a thread that joined the line lets go of the lock: its turn
    leaves the line (else the next statement's end would hand the line to a thread
    that is gone, and nobody would send it)."""
    in_flight, release = threading.Event(), threading.Event()
    sent: list[list[int]] = []

    def slow(n: int) -> int:
        in_flight.set()
        assert release.wait(10)
        return n

    send = answering(sent)

    line: ThreadLine[Call] = ThreadLine(send, max_in_flight=1, max_batch=5)
    lock = InterruptedOnLeaving()
    line._lock = lock  # type: ignore[assignment]
    first = threading.Thread(target=lambda: line.run(lambda: slow(1), lambda: Call(1)))
    first.start()
    assert in_flight.wait(10)
    lock.armed = True
    with pytest.raises(KeyboardInterrupt):
        line.run(lambda: 2, lambda: Call(2))  # no room: joins the line, interrupted
    assert not line._line
    release.set()
    first.join(10)
    assert answered_in_time(lambda: line.run(lambda: 3, lambda: Call(3))) == 3
    assert sent == [] and line._in_flight == 0 and not line._line


def test_the_callers_of_a_group_come_back_and_go_out_together_again(
    switching_often: None,
) -> None:
    """Threads enqueueing in a loop: once they have gone out together, the first of
    them back waits for the others instead of going alone (which would leave the
    rest to queue behind it in ever smaller groups). ``hold`` and ``gap`` are long
    here, so the groups do not depend on how fast threads are woken."""
    line, results, alone_calls = _callers_in_a_loop(max_in_flight=1, min_split=1, hold=30)
    assert sorted(results) == sorted(k * 100 + i for k in range(8) for i in range(20))
    assert dict(line.batches) == {8: 20} and alone_calls == []


def test_with_two_places_the_callers_go_out_in_halves_one_after_the_other(
    switching_often: None,
) -> None:
    """With two places, the 8 callers go out in statements of 4 (half of them each),
    never merged back into one of 8. Which 4 go together depends on who comes back
    first, so a thread may fall behind the others; its last calls then wait ``hold``
    (1 s here) for callers that are done, and go out short or alone."""
    line, results, _ = _callers_in_a_loop(max_in_flight=2, min_split=4, hold=1)
    assert sorted(results) == sorted(k * 100 + i for k in range(8) for i in range(20))
    sizes = dict(line.batches)
    assert sizes.pop(8) == 1, line.batches  # the 8 that queued behind the two blockers
    assert max(sizes) <= 4, line.batches
    # Most calls in halves (38 statements of 4 if every thread kept in step; at
    # least 29 seen with the machine busy), few statements cut short.
    assert sizes.pop(4) >= 19, line.batches
    assert sum(sizes.values()) <= 3, line.batches


def test_half_the_callers_back_go_out_without_waiting_for_the_others(
    switching_often: None,
) -> None:
    """With two places, as soon as half the callers expected back have come back, they
    go out: the others, busy elsewhere, do not hold them up (``hold`` and ``gap`` are
    30 s here: a line that waited for every caller expected back would wait that
    long)."""
    line: ThreadLine[Call] = ThreadLine(
        answering(), max_in_flight=2, max_batch=50, hold=30, gap=30, min_split=4
    )
    release, later = threading.Event(), threading.Event()

    def alone(n: int) -> int:
        assert release.wait(10)
        return n

    def call(n: int) -> int:
        return line.run(lambda: alone(n), lambda: Call(n))

    answers: dict[int, int] = {}

    def caller(k: int) -> None:
        answers[k] = call(k)
        if k >= 4:  # busy elsewhere for a while
            assert later.wait(30)
        answers[10 + k] = call(10 + k)

    # The 8 go out together once both places are free, then come back.
    threads = _eight_queued_behind_its_places(line, alone, caller)
    release.set()
    started = time.monotonic()
    wait_until(lambda: all(10 + k in answers for k in range(4)))
    assert time.monotonic() - started < 10
    assert line.batches[8] == 1 and line.batches[4] == 1  # the 4 back, as one
    later.set()
    for thread in threads:
        thread.join(30)
    assert answers == {n: n for k in range(8) for n in (k, 10 + k)}
    assert line._in_flight == 0 and not line._line


def _callers_in_a_loop(
    *, max_in_flight: int, min_split: int, hold: float
) -> tuple[ThreadLine[Call], list[int], list[int]]:
    """8 threads that each make 20 calls in a loop, queued first behind
    ``max_in_flight`` calls of their own; the line, the values, and the callers'
    calls that went alone."""
    release = threading.Event()
    alone_calls: list[int] = []

    def alone(n: int) -> int:
        assert release.wait(10)
        if n >= 0:
            alone_calls.append(n)
        return n

    send = answering()

    line: ThreadLine[Call] = ThreadLine(
        send,
        max_in_flight=max_in_flight,
        max_batch=50,
        hold=hold,
        gap=hold,
        min_split=min_split,
    )
    results: list[int] = []

    def caller(k: int) -> None:
        for i in range(20):
            n = k * 100 + i
            results.append(line.run(lambda n=n: alone(n), lambda n=n: Call(n)))

    threads = _eight_queued_behind_its_places(line, alone, caller)
    release.set()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert line._in_flight == 0 and not line._line and line._gatherer is None
    return line, results, alone_calls


def _eight_queued_behind_its_places(
    line: ThreadLine[Call], alone: Callable[[int], int], caller: Callable[[int], None]
) -> list[threading.Thread]:
    """Every place of ``line`` taken by a call of its own (``alone(-1)``, which the
    test holds until it lets it go), then 8 threads running ``caller(k)``, whose first
    calls queue behind those: all these threads, started."""
    blockers = [
        threading.Thread(target=lambda: line.run(lambda: alone(-1), lambda: Call(-1)))
        for _ in range(line._max)
    ]
    for thread in blockers:
        thread.start()
    wait_until(lambda: line._in_flight == line._max)
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(line._line) == 8)
    return [*blockers, *threads]


def test_callers_that_do_not_come_back_hold_up_the_first_one_back_briefly() -> None:
    """Three calls go out together; only one of their threads calls again: it waits
    ``gap`` for the two others (callers with other work to do between calls), then
    goes out alone; the next call goes at once."""
    release = threading.Event()
    sent: list[list[int]] = []

    def alone(n: int) -> int:
        assert release.wait(10)
        return n

    send = answering(sent)

    line: ThreadLine[Call] = ThreadLine(send, max_in_flight=1, max_batch=50, hold=30, gap=0.05)
    first = threading.Thread(target=lambda: line.run(lambda: alone(0), lambda: Call(0)))
    first.start()
    wait_until(lambda: line._in_flight == 1)
    waiting = [
        threading.Thread(target=lambda n=n: line.run(lambda: n, lambda: Call(n))) for n in (1, 2, 3)
    ]
    for thread in waiting:
        thread.start()
    wait_until(lambda: len(line._line) == 3)
    release.set()
    for thread in [first, *waiting]:
        thread.join(10)
    assert sent == [[1, 2, 3]]
    started = time.monotonic()
    assert answered_in_time(lambda: line.run(lambda: 4, lambda: Call(4))) == 4
    assert time.monotonic() - started >= 0.05  # it waited for the two others
    assert sent == [[1, 2, 3], [4]]  # and went out alone, through the line
    assert answered_in_time(lambda: line.run(lambda: 5, lambda: Call(5))) == 5
    assert sent == [[1, 2, 3], [4]]  # at once, on its own thread: nobody expected back
    assert line._in_flight == 0 and not line._line and line._returning == 0


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_gatherers_timing_out_as_statements_end_answer_every_call_once(
    switching_often: None, max_in_flight: int
) -> None:
    """Waits so short that they time out all the time, while statements end and wake
    the gatherer: every call answered once, no thread's lock released twice (a
    gatherer that timed out must not forget a wake-up given meanwhile)."""
    sent: list[int] = []

    def alone(n: int) -> int:
        time.sleep(random.random() * 1e-4)
        sent.append(n)
        return n

    def send(calls: list[Call]) -> None:
        time.sleep(random.random() * 1e-4)
        for call in calls:
            sent.append(call.n)
            call.future.set_result(call.n)

    line: ThreadLine[Call] = ThreadLine(
        send, max_in_flight=max_in_flight, max_batch=6, hold=2e-4, gap=2e-5, min_split=3
    )
    errors: list[BaseException] = []
    results: list[int] = []

    def caller(k: int) -> None:
        try:
            for i in range(600):
                n = k * 1000 + i
                results.append(line.run(lambda n=n: alone(n), lambda n=n: Call(n)))
                if random.random() < 0.2:
                    time.sleep(random.random() * 3e-4)  # other work, now and then
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(12)]
    run_to_the_end(threads, 60)
    assert errors == []
    assert (
        sorted(results)
        == sorted(sent)
        == sorted(k * 1000 + i for k in range(12) for i in range(600))
    )
    assert line._in_flight == 0 and not line._line and line._gatherer is None


def test_a_thread_alone_never_waits_in_line() -> None:
    line: ThreadLine[Call] = ThreadLine(lambda calls: None, max_in_flight=1, max_batch=50)
    assert [line.run(lambda n=n: n, lambda n=n: Call(n)) for n in range(50)] == list(range(50))
    assert not line.batches and line._returning == 0


def test_an_answer_is_set_once_and_tells_its_callbacks() -> None:
    told: list[int] = []
    answer: Answer[int] = Answer()
    answer.add_done_callback(lambda a: told.append(a.result()))
    assert not answer.done() and told == []
    answer.set_result(7)
    assert answer.done() and answer.result() == 7 and told == [7]
    answer.add_done_callback(lambda a: told.append(a.result() + 1))  # already set: at once
    assert told == [7, 8]
    with pytest.raises(InvalidStateError):
        answer.set_exception(ValueError("late"))
    with pytest.raises(InvalidStateError):
        answer.set_result(8)
    assert answer.result() == 7 and told == [7, 8]  # the first answer stays
    failed: Answer[int] = Answer()
    failed.set_exception(ValueError("refused"))
    assert isinstance(failed.exception(), ValueError) and not failed.cancelled()
    with pytest.raises(ValueError, match="refused"):
        failed.result()
