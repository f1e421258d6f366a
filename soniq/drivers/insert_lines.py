"""Group commit of concurrent enqueues on PostgreSQL: the enqueues of one process that
arrive while others are in flight wait in line, and the line is written as one
statement in one transaction (one commit, one NOTIFY), each caller getting its own id.

- A caller that finds nobody waiting and no statement of the line in flight (on an
  event loop: nor one that just ended, whose callers are coming back; threads: fewer
  than :data:`MAX_IN_FLIGHT` in flight) runs its own statement at once, exactly as
  without a line: a lone client's latency does not change.
- Otherwise it joins the line. The line goes out (up to :data:`MAX_BATCH` calls per
  statement) as ``insert_group`` statements, while fewer than :data:`MAX_IN_FLIGHT`
  are in flight (never more than the pool's size). On an event loop it goes out at
  the end of the loop's round, once the callers woken together have joined it, in
  even parts when places are free, and not shorter than a statement in flight unless
  that one takes longer than :data:`MAX_HOLD` (:meth:`AsyncInsertLine._send_line`);
  threads take the front of the line when a
  statement ends (:class:`~soniq.drivers.lines.ThreadLine`).
- Each call returns only once its own row is committed. If a merged statement is
  refused by the server (it rolled back: a row it refuses, a deadlock, a timeout), its
  calls are run again one by one, so that nobody hears another caller's error; a lost
  connection (the commit's fate unknown) is reported to every caller of the
  statement, as a single enqueue would report it, and nothing is retried, so nothing
  is committed twice.
- A caller cancelled (or interrupted) while it waits in line is dropped: its job is
  not inserted. Once its statement has been sent, the job is committed as it would
  have been, and its id is logged; should that merged statement be refused, a
  cancelled caller's call is not sent again (``eq``), and an interrupted thread's is,
  its id logged (``eq.sync``: the thread that sends a group answers every call). On
  the main thread a first Ctrl-C is held off until the call has ended (see
  :class:`~soniq.drivers.lines.ThreadLine`).

:class:`AsyncInsertLine` serves ``eq`` (one event loop; a task per merged statement),
:class:`SyncInsertLine` serves ``eq.sync`` (threads: a :class:`~soniq.drivers.lines.ThreadLine`,
as the SQLite backend's blocking writes). Enqueues
on a caller's connection never come here: they belong to the caller's transaction.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from soniq.core.jobs import JobSpec
from soniq.drivers._common import interrupted, is_connection_error, own_copy, rolled_back
from soniq.drivers.lines import Answer, ThreadLine

log = logging.getLogger("soniq")

#: Most enqueues one merged statement carries.
MAX_BATCH = 500
#: Most statements of a line in flight at once (and never more than the pool has
#: connections). Measured with 64 coroutines on a pool of 10 (2 cores), asyncpg: 2 in
#: flight 38-44k jobs/s, 3 36-39k, 4 32-37k; 16 threads of ``eq.sync``: 1 9.9k, 2
#: 9.5k, 10 4.8k. Two statements of half the callers each keep the database writing
#: one while the callers of the other come back; more cost a commit each.
MAX_IN_FLIGHT = 2
#: Fewest calls in each of the statements a line is split into, when several places
#: are free: a short line goes out whole (one commit), a long one in even parts.
MIN_SPLIT = 8
#: Longest a line shorter than a statement in flight waits for it to end (seconds):
#: a statement held up (on a row lock, say) holds up nobody else for long.
MAX_HOLD = 0.002


class _Future(Protocol):
    def done(self) -> bool: ...
    def set_exception(self, exception: BaseException) -> None: ...


def _retry_each(futures: Sequence[_Future], exc: BaseException) -> bool:
    """After the merged statement of ``futures``' calls failed with ``exc``: True when
    each call is to be sent again alone (several calls, in a statement the server
    rolled back, or that failed before reaching it: nobody may hear another caller's
    error). Otherwise each caller not answered yet is given ``exc`` (a copy each) and
    False: a lost connection leaves the commit's fate unknown, so it is never
    retried."""
    if len(futures) > 1 and (rolled_back(exc) or not is_connection_error(exc)):
        return True
    for future in futures:
        if not future.done():
            future.set_exception(own_copy(exc))
    return False


def _late(job_id: int) -> None:
    log.info("job %s was enqueued, but its enqueue call had been cancelled", job_id)


class _Call:
    """An enqueue waiting in line: its job, and the future its caller waits on."""

    __slots__ = ("future", "spec")

    def __init__(self, spec: JobSpec, future: Any) -> None:
        self.spec = spec
        self.future = future


class AsyncInsertLine:
    """The enqueue line of one event loop (see the module's docstring)."""

    def __init__(
        self,
        alone: Callable[[JobSpec], Awaitable[int]],
        group: Callable[[Sequence[JobSpec]], Awaitable[list[int]]],
        max_in_flight: int,
    ) -> None:
        self._alone = alone
        self._group = group
        self._max = min(max_in_flight, MAX_IN_FLIGHT)
        #: The sizes of the statements in flight (an alone call counts 1).
        self._in_flight: list[int] = []
        self._line: collections.deque[_Call] = collections.deque()
        self._flush: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: How many merged statements were sent of each size (for tests and metrics).
        self.batches: collections.Counter[int] = collections.Counter()

    async def insert(self, spec: JobSpec) -> int:
        """Insert one job (``spec`` holds one), alone or merged; its id once committed."""
        if not self._in_flight and not self._line and self._flush is None:  # alone: at once
            self._in_flight.append(1)
            try:
                return await self._alone(spec)
            finally:
                self._end(1)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._line.append(_Call(spec, future))
        if self._flush is None:
            self._schedule_flush()
        return await future  # cancelled in line: the future is, and it is not sent

    def _end(self, size: int) -> None:
        """A statement ended (its callers answered): the line goes out after they have
        come back, even when it was to go out before, and none of them goes alone."""
        self._in_flight.remove(size)
        flush = self._flush
        if flush is not None:  # (perhaps for the callers of another statement)
            flush.cancel()
        self._schedule_flush(answered=size > 1 or flush is not None)

    def _schedule_flush(self, answered: bool = False) -> None:
        """Send the line in the loop's next round, after the callers woken in this one
        have joined it: the callers a statement answers come back together and go out
        together (not the first alone and the rest behind it)."""
        if (self._line or answered) and len(self._in_flight) < self._max:
            self._flush = asyncio.get_running_loop().call_soon(self._send_line)
        else:
            self._flush = None

    def _send_line(self, held: bool = False) -> None:
        """Send the line in even statements, as many as there are free places and at
        most one per :data:`MIN_SPLIT` calls, unless it is shorter than a statement
        in flight (and not ``held`` already): it then waits for one to end, or
        :data:`MAX_HOLD`, and grows. (Otherwise the callers of a short statement,
        back at once, go out short again and again beside a long one, which is
        written with nothing to overlap it; even statements keep the database busy
        with one while the callers of the other come back.)"""
        self._flush = None
        while self._line and self._line[0].future.done():  # cancelled in line
            self._line.popleft()
        waiting = len(self._line)
        free = self._max - len(self._in_flight)
        if not waiting or free <= 0:
            return
        if not held and self._in_flight and waiting < min(self._in_flight):
            # Sent when a statement ends (_end), or after MAX_HOLD at the latest.
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(MAX_HOLD, self._send_line, True)
            return
        statements = max(1, min(free, waiting // MIN_SPLIT))
        for i in range(statements):
            size = min(MAX_BATCH, -(-len(self._line) // (statements - i)))
            group = [
                call
                for call in (self._line.popleft() for _ in range(size))
                if not call.future.done()
            ]  # done in line: its caller was cancelled
            if group:
                self._in_flight.append(len(group))
                self.batches[len(group)] += 1
                task = asyncio.get_running_loop().create_task(self._answer(group))
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._sent, group))
        self._schedule_flush()  # more than MAX_BATCH per statement were waiting

    def _sent(self, group: list[_Call], task: asyncio.Task[None]) -> None:
        """The task of ``group``'s statement is done, even when it was cancelled before
        its first step (the loop closing): a call not answered hears why, and the
        statement's place is free."""
        self._tasks.discard(task)
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if exc is not None:
            for call in group:
                if not call.future.done():
                    call.future.set_exception(interrupted(exc))
        self._end(len(group))

    async def _answer(self, group: list[_Call]) -> None:
        futures = [call.future for call in group]
        try:
            if len(group) > 1:
                ids = await self._group([call.spec for call in group])
            else:
                ids = [await self._alone(group[0].spec)]
        except Exception as exc:
            if _retry_each(futures, exc):
                for call in group:  # each alone: each hears of its own job only
                    if call.future.done():  # cancelled meanwhile: not sent again
                        continue
                    try:
                        _settle(call.future, await self._alone(call.spec))
                    except Exception as error:
                        if not call.future.done():
                            call.future.set_exception(error)
            return
        for future, job_id in zip(futures, ids, strict=True):
            _settle(future, job_id)


def _settle(future: asyncio.Future[int], job_id: int) -> None:
    if future.done():  # its caller was cancelled after the statement was sent
        _late(job_id)
    else:
        future.set_result(job_id)


class SyncInsertLine(ThreadLine[_Call]):
    """The enqueue line of ``eq.sync``'s threads (see the module's docstring)."""

    def __init__(
        self,
        alone: Callable[[JobSpec], int],
        group: Callable[[Sequence[JobSpec]], list[int]],
        max_in_flight: int,
    ) -> None:
        super().__init__(
            self._answer,
            max_in_flight=min(max_in_flight, MAX_IN_FLIGHT),
            max_batch=MAX_BATCH,
            late=_late,
            min_split=MIN_SPLIT,
        )
        self._alone = alone
        self._group = group

    def insert(self, spec: JobSpec) -> int:
        """Insert one job (``spec`` holds one), alone or merged; its id once committed."""
        return self.run(lambda: self._alone(spec), lambda: _Call(spec, Answer()))

    def _answer(self, group: list[_Call]) -> None:
        futures = [call.future for call in group]
        try:
            if len(group) > 1:
                ids = self._group([call.spec for call in group])
            else:
                ids = [self._alone(group[0].spec)]
        except Exception as exc:
            if _retry_each(futures, exc):
                for call in group:  # each alone: each hears of its own job only
                    try:
                        call.future.set_result(self._alone(call.spec))
                    except Exception as error:
                        call.future.set_exception(error)
            return
        for future, job_id in zip(futures, ids, strict=True):
            future.set_result(job_id)
