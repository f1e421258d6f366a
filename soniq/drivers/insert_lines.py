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
:class:`SyncInsertLine` serves ``eq.sync`` (threads; a waiting thread sends the front
of the line on its own thread). Enqueues on a caller's connection never come here:
they belong to the caller's transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future

from soniq.core.jobs import JobSpec
from soniq.drivers._common import is_connection_error, own_copy

log = logging.getLogger("soniq")

#: Most enqueues one merged statement carries.
MAX_BATCH = 500
#: Most statements of a line in flight at once (and never more than the pool has
#: connections). Measured with 64 coroutines on a pool of 10 (2 cores): 1 in flight
#: 29k jobs/s, 2 31k, 3 28k, 5 23k, 10 16k; 16 threads of ``eq.sync``: 1 9.9k, 2 9.5k,
#: 10 4.8k. Fewer, larger statements win: each costs a commit, and a waiting caller
#: loses nothing when the statement ahead of it takes it along.
MAX_IN_FLIGHT = 2


def _late(job_id: int) -> None:
    log.info("job %s was enqueued, but its enqueue call was cancelled before it returned", job_id)


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
        self._in_flight = 0
        self._line: collections.deque[tuple[JobSpec, asyncio.Future[int]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Sizes of the merged statements sent (for tests and metrics).
        self.batches: collections.Counter[int] = collections.Counter()

    async def insert(self, spec: JobSpec) -> int:
        """Insert one job (``spec`` holds one), alone or merged; its id once committed."""
        if self._in_flight < self._max and not self._line:
            self._in_flight += 1
            try:
                return await self._alone(spec)
            finally:
                self._end_statement()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._line.append((spec, future))
        return await future  # cancelled in line: the future is, and it is skipped

    def _end_statement(self) -> None:
        self._in_flight -= 1
        while self._in_flight < self._max and self._line:
            group: list[tuple[JobSpec, asyncio.Future[int]]] = []
            while self._line and len(group) < MAX_BATCH:
                spec, future = self._line.popleft()
                if not future.done():  # done in line: its caller was cancelled
                    group.append((spec, future))
            if group:
                self._in_flight += 1
                task = asyncio.get_running_loop().create_task(self._send(group))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[JobSpec, asyncio.Future[int]]]) -> None:
        try:
            self.batches[len(group)] += 1
            specs = [spec for spec, _ in group]
            try:
                ids = await (self._group(specs) if len(specs) > 1 else _one(self._alone, specs))
            except Exception as exc:
                if len(group) == 1 or is_connection_error(exc):
                    for _, future in group:
                        if not future.done():
                            future.set_exception(own_copy(exc))
                    return
                # The merged statement failed for a reason of its own: each call alone.
                for spec, future in group:
                    try:
                        job_id = await self._alone(spec)
                    except Exception as error:
                        if not future.done():
                            future.set_exception(error)
                    else:
                        _settle(future, job_id)
                return
            except BaseException:
                for _, future in group:
                    future.cancel()
                raise
            for (_, future), job_id in zip(group, ids, strict=True):
                _settle(future, job_id)
        finally:
            self._end_statement()


async def _one(alone: Callable[[JobSpec], Awaitable[int]], specs: list[JobSpec]) -> list[int]:
    return [await alone(specs[0])]


def _settle(future: asyncio.Future[int], job_id: int) -> None:
    if future.done():  # its caller was cancelled after the statement was sent
        _late(job_id)
    else:
        future.set_result(job_id)


class SyncInsertLine:
    """The enqueue line of ``eq.sync``'s threads (see the module's docstring). A
    thread that waits in line leads a statement when one ends: it takes the front of
    the line (its own call among them unless the line is longer than
    :data:`MAX_BATCH`) and sends it on its own thread."""

    def __init__(
        self,
        alone: Callable[[JobSpec], int],
        group: Callable[[Sequence[JobSpec]], list[int]],
        max_in_flight: int,
    ) -> None:
        self._alone = alone
        self._group = group
        self._max = min(max_in_flight, MAX_IN_FLIGHT)
        self._in_flight = 0
        self._waiting = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._line: collections.deque[tuple[JobSpec, Future[int]]] = collections.deque()
        #: Sizes of the merged statements sent (for tests and metrics).
        self.batches: collections.Counter[int] = collections.Counter()

    def insert(self, spec: JobSpec) -> int:
        """Insert one job (``spec`` holds one), alone or merged; its id once committed."""
        with self._lock:
            alone = self._in_flight < self._max and not self._line
            if alone:
                self._in_flight += 1
        if alone:
            try:
                return self._alone(spec)
            finally:
                self._end_statement()
        member: tuple[JobSpec, Future[int]] = (spec, Future())
        future = member[1]
        with self._lock:
            self._line.append(member)
        while True:
            group: list[tuple[JobSpec, Future[int]]] = []
            with self._lock:
                self._waiting += 1
                try:
                    while not future.done() and (self._in_flight >= self._max or not self._line):
                        self._changed.wait()
                except BaseException:
                    # Interrupted (KeyboardInterrupt, a signal handler's exception):
                    # dropped, unless a leader took it already.
                    with contextlib.suppress(ValueError):
                        self._line.remove(member)
                    raise
                finally:
                    self._waiting -= 1
                if future.done():
                    break
                self._in_flight += 1
                while self._line and len(group) < MAX_BATCH:
                    group.append(self._line.popleft())
            try:
                self._send(group)
            finally:
                self._end_statement()
        return future.result()

    def _end_statement(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._waiting:
                self._changed.notify_all()

    def _send(self, group: list[tuple[JobSpec, Future[int]]]) -> None:
        self.batches[len(group)] += 1
        specs = [spec for spec, _ in group]
        try:
            ids = self._group(specs) if len(specs) > 1 else [self._alone(specs[0])]
        except Exception as exc:
            if len(group) == 1 or is_connection_error(exc):
                for _, future in group:
                    future.set_exception(own_copy(exc))
                return
            for spec, future in group:  # each call alone: each hears of its own job
                try:
                    future.set_result(self._alone(spec))
                except Exception as error:
                    future.set_exception(error)
            return
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(
                        RuntimeError(
                            f"the thread sending this enqueue was interrupted "
                            f"({type(exc).__name__}): the job may or may not be committed"
                        )
                    )
            raise
        for (_, future), job_id in zip(group, ids, strict=True):
            future.set_result(job_id)
