"""Ctrl-C at any moment of a ThreadLine call in the main thread (where Python delivers
it) leaves the line as it should be: no place kept, no turn left in line, no caller
asleep though answered, so that every later call is answered (with SQLite's single
place, one place kept would hold up every later write for good).

A real SIGINT is raised at each line boundary of the line's own code in turn (a trace
function counts them), which is where Python runs a signal's handler."""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import soniq.drivers.lines as lines_module
from soniq.drivers.lines import ThreadLine
from tests.conftest import wait_until
from tests.line_calls import Call, answered_in_time, answering, holding_interrupt

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("sigint_raises"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

LINES_FILE = lines_module.__file__


class SigintAt:
    """A trace function that raises SIGINT once, at the ``at``-th line boundary of
    the line's code run by this thread (and counts them: ``seen``)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        #: The signal came while the line held Ctrl-C off; ``after``: after it did.
        self.held = False
        self.after = False
        self._holding_seen = False

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != LINES_FILE:
            return None  # (nor the frames this one calls)
        if event == "line":
            self.seen += 1
            holding = holding_interrupt() is not None
            self._holding_seen = self._holding_seen or holding
            if self.seen == self.at:
                self.held, self.after = holding, self._holding_seen and not holding
                signal.raise_signal(signal.SIGINT)
        return self


def interrupted_at(at: int, call: Callable[[], int]) -> tuple[int | None, SigintAt]:
    """call() on this thread with SIGINT raised at boundary ``at``: its value (None
    when interrupted) and the trace (how many boundaries it passed, whether the line
    held the signal off)."""
    tracer = SigintAt(at)
    sys.settrace(tracer)
    try:
        value: int | None = call()
    except KeyboardInterrupt:
        value = None
    finally:
        sys.settrace(None)
    return value, tracer


def assert_clean(line: ThreadLine[Call]) -> None:
    """Nothing kept: no place, no statement of several calls, nobody in line."""
    assert line._in_flight == 0
    assert line._grouped == 0
    assert not line._line
    assert line._gatherer is None


def each_boundary(run_once: Callable[[int], int]) -> None:
    """run_once(at) for at = 1, 2, ... until a run passes fewer boundaries than
    ``at`` (the signal then came after the call: every boundary was tried)."""
    at = 1
    while True:
        seen = run_once(at)
        if seen < at:
            break
        at += 1
    assert at > 10, "the trace saw the line's code"


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_a_call_alone_interrupted_anywhere_gives_its_place_back(max_in_flight: int) -> None:
    sent: list[int] = []

    def run_once(at: int) -> int:
        line: ThreadLine[Call] = ThreadLine(answering(), max_in_flight=max_in_flight, max_batch=5)
        value, trace = interrupted_at(
            at, lambda: line.run(lambda: sent.append(1) or 1, lambda: Call(1))
        )
        assert value in (None, 1)
        if trace.held:  # held off: the call ran to its end, then was interrupted
            assert value is None and sent[-1:] == [1]
        assert_clean(line)
        for n in range(2, 2 + max_in_flight + 1):  # more calls than places
            assert answered_in_time(lambda n=n: line.run(lambda: n, lambda: Call(n))) == n
        assert_clean(line)
        return trace.seen

    each_boundary(run_once)


def test_a_group_sender_interrupted_anywhere_answers_or_frees_every_caller() -> None:
    """This thread waits in line behind a statement, is handed the group of itself and
    two other callers, sends it: Ctrl-C anywhere on that way leaves every other caller
    answered (its own job committed once) or sent again, and the line clean."""

    def run_once(at: int) -> int:
        first_sent, release_first = threading.Event(), threading.Event()
        committed: list[int] = []
        lock = threading.Lock()

        def commit(n: int) -> int:
            with lock:
                committed.append(n)
            return n * 10

        def alone(n: int) -> int:
            if n == 1:  # the statement in flight that the others wait behind
                first_sent.set()
                assert release_first.wait(10)
            return commit(n)

        def send(calls: list[Call]) -> None:
            for call in calls:
                call.future.set_result(commit(call.n))

        late: list[int] = []
        line: ThreadLine[Call] = ThreadLine(send, max_in_flight=1, max_batch=5, late=late.append)

        def call(n: int) -> int:
            return line.run(lambda: alone(n), lambda: Call(n))

        answers: dict[int, int] = {}
        errors: list[BaseException] = []

        def other(n: int) -> None:
            try:
                answers[n] = call(n)
            except BaseException as exc:  # (reported below)
                errors.append(exc)

        first = threading.Thread(target=other, args=(1,))
        first.start()
        assert first_sent.wait(10)
        others = [threading.Thread(target=other, args=(n,)) for n in (3, 4)]

        back = threading.Event()  # this thread's call is back (perhaps interrupted early)

        def join_then_release() -> None:
            # This thread first in line (unless interrupted before it joined), then
            # the two others behind it.
            wait_until(lambda: len(line._line) == 1 or back.is_set())
            for k, thread in enumerate(others):
                thread.start()
                wait_until(lambda k=k: len(line._line) >= 2 + k or back.is_set())
            release_first.set()

        helper = threading.Thread(target=join_then_release)
        helper.start()
        try:
            value, trace = interrupted_at(at, lambda: call(2))
        finally:
            back.set()
        helper.join(10)
        for thread in (first, *others):
            thread.join(10)
            assert not thread.is_alive(), "a caller was never answered"
        assert not errors, errors
        assert answers == {1: 10, 3: 30, 4: 40}
        assert value in (None, 20)
        # Every job committed once. Held off, the signal lets this thread's call run
        # to its end (committed, and its value told to late) before it is raised.
        assert sorted(committed) in ([1, 3, 4], [1, 2, 3, 4]), committed
        if trace.held:
            assert value is None and 2 in committed
            wait_until(lambda: late == [20])
        assert_clean(line)
        assert answered_in_time(lambda: call(5)) == 50
        assert_clean(line)
        return trace.seen

    each_boundary(run_once)


def test_sqlite_writes_go_on_after_ctrl_c_anywhere_in_a_blocking_enqueue(tmp_path: Any) -> None:
    """What a notebook does: Ctrl-C during ``eq.sync.enqueue`` on the embedded
    default, then more enqueues. Every later write is answered, and the jobs in the
    table are those whose calls returned, plus the one held off (committed)."""
    from soniq import Soniq

    eq = Soniq(f"sqlite:///{tmp_path}/jobs.db")

    @eq.job(name="noted")
    def noted(n: int) -> None:
        pass

    eq.sync.ensure_initialized()
    expected = 0

    def run_once(at: int) -> int:
        nonlocal expected
        value, trace = interrupted_at(at, lambda: eq.sync.enqueue("noted", n=at))
        if value is not None or trace.held or trace.after:  # (after: it had returned)
            expected += 1
        assert answered_in_time(lambda: eq.sync.enqueue("noted", n=-at)) is not None
        expected += 1
        assert len(eq.sync.list_jobs(limit=1000)) == expected
        return trace.seen

    try:
        each_boundary(run_once)
    finally:
        eq.sync.close()


def test_a_process_showered_with_ctrl_c_keeps_writing(tmp_path: Any) -> None:
    """Real SIGINTs from outside, 300 of them at random moments, into a process whose
    main thread enqueues on SQLite (and carries on after each KeyboardInterrupt) while
    another thread enqueues too: the other thread's writes still go on afterwards.
    Before the line held Ctrl-C off, such a process hung after 10-15 of them (5 runs
    of 5 by hand)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.ctrl_c_app", str(tmp_path / "jobs.db")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        assert child.stdout is not None
        out = child.stdout

        def read() -> None:
            for line in out:
                lines.put(line.strip())

        threading.Thread(target=read, daemon=True).start()
        assert lines.get(timeout=30) == "ready"
        pace = random.Random(0)
        for _ in range(300):
            time.sleep(pace.uniform(0.001, 0.02))
            child.send_signal(signal.SIGINT)
        while not lines.empty():  # what was written before the last signal
            lines.get_nowait()
        assert child.poll() is None, "the process ended"
        assert lines.get(timeout=10).startswith("progress"), "its writes stopped"
    finally:
        child.kill()
        child.wait(10)
