"""Group commit of concurrent enqueues on PostgreSQL: the enqueues of one process that
arrive while others are in flight wait in line, and the line is written as one
statement in one transaction (one commit, one NOTIFY), each caller getting its own id.

- A caller that finds a free place (fewer than :data:`MAX_IN_FLIGHT` statements of the
  line running, and never more than the pool's size) and nobody waiting runs its own
  statement at once, exactly as without a line: a lone client's latency does not
  change.
- Otherwise it joins the line. When a statement ends, the front of the line (up to
  :data:`MAX_BATCH` calls) goes out as one ``insert_group`` statement.
- Each call returns only once its own row is committed. If a merged statement fails
  for a reason of its own (not a lost connection), its calls are run again one by one,
  so that nobody hears another caller's error; a lost connection (the commit's fate
  unknown) is reported to every caller of the statement, as a single enqueue would
  report it, and nothing is retried, so nothing is committed twice.
- A caller cancelled (or interrupted) while it waits in line is dropped: its job is
  not inserted. Once its statement has been sent, the job is committed as it would
  have been, and its id is logged.

:class:`AsyncInsertLine` serves ``eq`` (one event loop; a task per merged statement),
:class:`SyncInsertLine` serves ``eq.sync`` (threads; the thread at the front of the
line sends it on its own thread, and only the threads concerned are woken). Enqueues
on a caller's connection never come here: they belong to the caller's transaction.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from soniq.core.jobs import JobSpec
from soniq.drivers._common import interrupted, is_connection_error, own_copy

log = logging.getLogger("soniq")

#: Most enqueues one merged statement carries.
MAX_BATCH = 500
#: Most statements of a line in flight at once (and never more than the pool has
#: connections). Measured with 64 coroutines on a pool of 10 (2 cores): 1 in flight
#: 29k jobs/s, 2 31k, 3 28k, 5 23k, 10 16k; 16 threads of ``eq.sync``: 1 9.9k, 2 9.5k,
#: 10 4.8k. Fewer, larger statements win: each costs a commit, and a waiting caller
#: loses nothing when the statement ahead of it takes it along.
MAX_IN_FLIGHT = 2


M = TypeVar("M")  # what waits in a line


class _Line(Generic[M]):
    """What both lines hold: the calls waiting, how many statements are in flight, and
    the sizes of the statements sent (for tests and metrics)."""

    def __init__(self, max_in_flight: int) -> None:
        self._max = min(max_in_flight, MAX_IN_FLIGHT)
        self._in_flight = 0
        self._line: collections.deque[M] = collections.deque()
        #: How many statements carried each number of calls.
        self.batches: collections.Counter[int] = collections.Counter()

    def _free(self) -> bool:
        """Whether a call may send its own statement now."""
        return self._in_flight < self._max and not self._line

    def _take(self) -> list[M]:
        """The front of the line, as one statement in flight."""
        group = [self._line.popleft() for _ in range(min(MAX_BATCH, len(self._line)))]
        self._in_flight += 1
        self.batches[len(group)] += 1
        return group


def _fail_all(futures: Sequence[Any], exc: BaseException) -> bool:
    """After the statement of ``futures``' calls failed with ``exc``: True when the
    calls are to be sent again one by one (several calls, and a failure of the
    statement's own: nobody may hear another caller's error); else each caller not
    answered yet is given ``exc`` (a copy each) and False. A lost connection leaves
    the commit's fate unknown: it is never retried."""
    if len(futures) > 1 and not is_connection_error(exc):
        return True
    for future in futures:
        if not future.done():
            future.set_exception(own_copy(exc))
    return False


def _late(job_id: int) -> None:
    log.info("job %s was enqueued, but its enqueue call was cancelled before it returned", job_id)


def _settle(future: asyncio.Future[int], job_id: int) -> None:
    if future.done():  # its caller was cancelled after the statement was sent
        _late(job_id)
    else:
        future.set_result(job_id)


class AsyncInsertLine(_Line[tuple[JobSpec, "asyncio.Future[int]"]]):
    """The enqueue line of one event loop (see the module's docstring)."""

    def __init__(
        self,
        alone: Callable[[JobSpec], Awaitable[int]],
        group: Callable[[Sequence[JobSpec]], Awaitable[list[int]]],
        max_in_flight: int,
    ) -> None:
        super().__init__(max_in_flight)
        self._alone = alone
        self._group = group
        self._tasks: set[asyncio.Task[None]] = set()

    async def insert(self, spec: JobSpec) -> int:
        """Insert one job (``spec`` holds one), alone or merged; its id once committed."""
        if self._free():
            self._in_flight += 1
            try:
                return await self._alone(spec)
            finally:
                self._end_statement()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._line.append((spec, future))
        return await future  # cancelled in line: the future is, and it is not sent

    def _end_statement(self) -> None:
        self._in_flight -= 1
        while self._in_flight < self._max and self._line:
            # Calls cancelled while they waited are dropped here, never sent.
            self._line = collections.deque(m for m in self._line if not m[1].done())
            if self._line:
                task = asyncio.get_running_loop().create_task(self._send(self._take()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[JobSpec, asyncio.Future[int]]]) -> None:
        try:
            await self._answer(group)
        except BaseException:  # this task cancelled (the loop is closing)
            for _, future in group:
                future.cancel()
            raise
        finally:
            self._end_statement()

    async def _answer(self, group: list[tuple[JobSpec, asyncio.Future[int]]]) -> None:
        specs = [spec for spec, _ in group]
        futures = [future for _, future in group]
        try:
            ids = await self._group(specs) if len(specs) > 1 else [await self._alone(specs[0])]
        except Exception as exc:
            if _fail_all(futures, exc):
                for spec, future in group:  # each alone: each hears of its own job only
                    try:
                        _settle(future, await self._alone(spec))
                    except Exception as error:
                        if not future.done():
                            future.set_exception(error)
            return
        for future, job_id in zip(futures, ids, strict=True):
            _settle(future, job_id)


class _Waiter:
    """A call of :class:`SyncInsertLine` waiting in line: woken once, either with
    ``group`` (its turn to send the front of the line, itself first) or with its
    future answered by the thread that sent it."""

    __slots__ = ("future", "group", "spec", "woken")

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.future: Future[int] = Future()
        self.woken = threading.Event()
        self.group: list[_Waiter] | None = None


class SyncInsertLine(_Line[_Waiter]):
    """The enqueue line of ``eq.sync``'s threads (see the module's docstring). When a
    statement ends, the front of the line is handed to the first thread in it, which
    sends it on its own thread; each other thread sleeps until its own call is
    answered (no thread is woken for nothing)."""

    def __init__(
        self,
        alone: Callable[[JobSpec], int],
        group: Callable[[Sequence[JobSpec]], list[int]],
        max_in_flight: int,
    ) -> None:
        super().__init__(max_in_flight)
        self._alone = alone
        self._group = group
        self._lock = threading.Lock()

    def insert(self, spec: JobSpec) -> int:
        """Insert one job (``spec`` holds one), alone or merged; its id once committed."""
        with self._lock:
            alone = self._free()
            if alone:
                self._in_flight += 1
        if alone:
            try:
                return self._alone(spec)
            finally:
                self._end_statement()
        waiter = _Waiter(spec)
        with self._lock:
            self._line.append(waiter)
        try:
            waiter.woken.wait()
        except BaseException:
            self._leave(waiter)
            raise
        if waiter.group is not None:
            try:
                self._send(waiter.group)
            finally:
                self._end_statement()
        return waiter.future.result()

    def _leave(self, waiter: _Waiter) -> None:
        """An interrupted waiter (KeyboardInterrupt, a signal handler's exception):
        dropped from the line, unless its call was sent already; handed the front of
        the line, it gives the others back their place and its turn to the next."""
        with self._lock:
            if waiter.group is not None:
                self._line.extendleft(reversed(waiter.group[1:]))
                waiter.group = None
                self._in_flight -= 1
                self._hand_out()
            elif waiter in self._line:
                self._line.remove(waiter)

    def _end_statement(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._hand_out()

    def _hand_out(self) -> None:
        """Under the lock: give the front of the line to its first thread, while
        statements may start."""
        while self._in_flight < self._max and self._line:
            group = self._take()
            group[0].group = group
            group[0].woken.set()

    def _send(self, group: list[_Waiter]) -> None:
        """Send ``group`` on this thread (its first call is this thread's own) and
        wake the others, each answered, whatever happens."""
        try:
            self._answer(group)
        except BaseException as exc:  # this thread interrupted: it raises that itself
            for waiter in group[1:]:
                if not waiter.future.done():
                    waiter.future.set_exception(interrupted(exc))
            raise
        finally:
            for waiter in group[1:]:
                waiter.woken.set()

    def _answer(self, group: list[_Waiter]) -> None:
        futures = [w.future for w in group]
        try:
            if len(group) > 1:
                ids = self._group([w.spec for w in group])
            else:
                ids = [self._alone(group[0].spec)]
        except Exception as exc:
            if _fail_all(futures, exc):
                for waiter in group:  # each alone: each hears of its own job only
                    try:
                        waiter.future.set_result(self._alone(waiter.spec))
                    except Exception as error:
                        waiter.future.set_exception(error)
            return
        for future, job_id in zip(futures, ids, strict=True):
            future.set_result(job_id)
