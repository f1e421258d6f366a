"""soniq.drivers.lines.ThreadLine on its own: threads that share statements, with
no database (the SQLite and PostgreSQL blocking faces are tested through it too)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from soniq.drivers.lines import ThreadLine

pytestmark = pytest.mark.timeout(60)


class Call:
    def __init__(self, n: int) -> None:
        self.n = n
        self.future: Future[int] = Future()


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
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a caller never got its answer"
    assert results == {n: n * 10 for n in results} and len(results) == 8 * 300
    assert sorted(sent) == sorted(results)  # each call sent exactly once
    assert line._in_flight == 0 and not line._line
    assert sum(size * count for size, count in line.batches.items()) <= len(results)
