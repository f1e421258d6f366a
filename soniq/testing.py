"""Helpers for your own test suite: assert what was enqueued, run it inline.

Every helper takes the Soniq you enqueue with and follows its colour: pass ``eq`` from
async code and ``await`` the result, pass ``eq.sync`` from blocking code (Django,
Flask, plain pytest) and get the result directly::

    job = await assert_enqueued(eq, send_invoice, order_id=1)
    job = assert_enqueued(eq.sync, send_invoice, order_id=1)

- :func:`enqueued_jobs` lists queued jobs (due or scheduled, retries waiting included).
- :func:`assert_enqueued` / :func:`assert_not_enqueued` assert on them; a failure
  lists what *is* queued.
- :func:`drain` runs ready jobs inline, one by one, until none is ready, and counts
  what happened (:class:`DrainResult`).
- :class:`FakeClock` and :func:`use_clock` move the memory backend's time by hand;
  :func:`clear_jobs` empties it between tests.

On PostgreSQL, ``connection=`` runs the query on your connection, inside your
transaction, so a test can see jobs its code enqueued there before anything commits
(and roll everything back afterwards). See ``docs/testing.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs

from soniq.app import Soniq, SyncSoniq
from soniq.core import outcomes, serialize
from soniq.core.enqueue import JobRef, check_queue
from soniq.core.jobs import Claimed, Job, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.states import JobStatus
from soniq.worker.execute import JobRun
from soniq.worker.progress import ProgressWriter

if TYPE_CHECKING:
    from soniq.drivers.sqlite import SqliteMemory

__all__ = [
    "DrainResult",
    "FakeClock",
    "assert_enqueued",
    "assert_not_enqueued",
    "clear_jobs",
    "drain",
    "enqueued_jobs",
    "use_clock",
]

T = TypeVar("T")

#: Enqueue options that :func:`assert_enqueued` compares with the job's own fields
#: (a job parameter can never have these names).
_FIELDS = ("priority", "run_at", "max_retries", "dedupe_key", "timeout")
_SHOWN = 25  # jobs listed in a failure message


# -- listing ---------------------------------------------------------------------


@overload
def enqueued_jobs(
    eq: SyncSoniq,
    job: JobRef | None = ...,
    /,
    *,
    queue: str | None = ...,
    connection: Any = ...,
) -> list[Job]: ...
@overload
def enqueued_jobs(
    eq: Soniq,
    job: JobRef | None = ...,
    /,
    *,
    queue: str | None = ...,
    connection: Any = ...,
) -> Coroutine[Any, Any, list[Job]]: ...
def enqueued_jobs(
    eq: Soniq | SyncSoniq,
    job: JobRef | None = None,
    /,
    *,
    queue: str | None = None,
    connection: Any = None,
) -> list[Job] | Coroutine[Any, Any, list[Job]]:
    """The queued jobs (due now or later, retries waiting included), oldest first;
    only those of ``job`` (a job function or its name) and of ``queue`` when given.

    ``await enqueued_jobs(eq, ...)`` from async code, ``enqueued_jobs(eq.sync, ...)``
    from blocking code. With ``connection=`` (PostgreSQL only) the query runs on that
    connection and sees what its open transaction has enqueued.
    """
    name = _job_name(eq, job)
    if isinstance(eq, SyncSoniq):
        return _list_sync(eq, name, queue, connection)
    return _list_async(eq, name, queue, connection)


async def _list_async(eq: Soniq, name: str | None, queue: str | None, conn: Any) -> list[Job]:
    if conn is None:
        return await eq.backend.list_jobs(name, queue)
    _check_accepts_connections(eq.backend)
    return await eq._config.callers().list_jobs(name, queue, conn)


def _list_sync(eq: SyncSoniq, name: str | None, queue: str | None, conn: Any) -> list[Job]:
    if conn is None:
        return eq.backend.list_jobs(name, queue)
    _check_accepts_connections(eq.backend)
    return eq._config.callers().list_jobs_sync(name, queue, conn)


def _check_accepts_connections(backend: Any) -> None:
    if not backend.accepts_connections:
        raise ValueError(
            f"connection=: the {backend.name} backend has no caller's transaction to look "
            "into; leave connection= out (every job is visible at once), or test on a "
            "postgresql:// database_url"
        )


def _job_name(eq: object, job: JobRef | None) -> str | None:
    if not isinstance(eq, (Soniq, SyncSoniq)):
        raise TypeError(
            f"soniq.testing: expected a Soniq (await ...) or eq.sync, got {type(eq).__name__}"
        )
    return None if job is None else eq.registry.resolve(job)[0]


# -- assertions ------------------------------------------------------------------


@attrs.frozen
class _Expectation:
    """What an assertion looks for: a name, a queue, arguments, option fields."""

    name: str | None
    queue: str | None
    args: Mapping[str, Any]
    fields: Mapping[str, Any]

    @classmethod
    def of(cls, name: str | None, queue: str | None, given: Mapping[str, Any]) -> _Expectation:
        if "delay" in given:
            raise TypeError(
                "delay is not stored; compare the returned job's run_at instead, or pass "
                "run_at= for an exact time"
            )
        fields = {k: v for k, v in given.items() if k in _FIELDS}
        args = {k: _as_stored(v) for k, v in given.items() if k not in _FIELDS}
        return cls(name, queue, args, fields)

    def matches(self, job: Job) -> bool:
        """Whether ``job`` is of this name and queue, and has these arguments (among
        others) and these option values."""
        if self.name is not None and job.name != self.name:
            return False
        if self.queue is not None and job.queue != self.queue:
            return False
        for key, expected in self.args.items():
            if key not in job.args or not _same(expected, job.args[key]):
                return False
        return all(expected == getattr(job, key) for key, expected in self.fields.items())

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in {**self.args, **self.fields}.items()]
        text = self.name or "any job"
        if parts:
            text += f"({', '.join(parts)})" if self.name else f" with {', '.join(parts)}"
        return text + (f" on queue {self.queue!r}" if self.queue is not None else "")


def _as_stored(value: Any) -> Any:
    """``value`` as it would read back from storage (tuples become lists...), or as it
    is when it is no JSON (a matcher such as ``unittest.mock.ANY``)."""
    try:
        return json.loads(serialize.dumps(value))
    except (TypeError, ValueError):
        return value


def _same(expected: Any, stored: Any) -> bool:
    """JSON equality: like ``==``, except that booleans equal only booleans."""
    if isinstance(expected, bool) or isinstance(stored, bool):
        return type(expected) is type(stored) and expected == stored
    if isinstance(expected, dict) and isinstance(stored, dict):
        return expected.keys() == stored.keys() and all(
            _same(v, stored[k]) for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(stored, list):
        return len(expected) == len(stored) and all(map(_same, expected, stored))
    return bool(expected == stored)


def _describe_job(job: Job) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in job.args.items())
    text = f"#{job.id} {job.name}({args}) queue={job.queue!r}"
    if job.priority:
        text += f" priority={job.priority}"
    if job.dedupe_key is not None:
        text += f" dedupe_key={job.dedupe_key!r}"
    if job.attempts:
        text += f" attempts={job.attempts}"
    return text + f" run_at={job.run_at.isoformat(timespec='seconds')}"


def _listing(jobs: Sequence[Job]) -> str:
    if not jobs:
        return "  (none)"
    lines = [f"  {_describe_job(job)}" for job in jobs[:_SHOWN]]
    if len(jobs) > _SHOWN:
        lines.append(f"  ... and {len(jobs) - _SHOWN} more")
    return "\n".join(lines)


def _one(expectation: _Expectation, jobs: list[Job], everything: Callable[[], list[Job]]) -> Job:
    found = [job for job in jobs if expectation.matches(job)]
    if len(found) == 1:
        return found[0]
    if found:
        raise AssertionError(
            f"expected exactly one queued job: {expectation.describe()}; found "
            f"{len(found)}:\n{_listing(found)}\n(name more arguments to tell them apart, "
            "or use enqueued_jobs())"
        )
    queued = everything()
    raise AssertionError(
        f"expected a queued job: {expectation.describe()}; found none. "
        f"Queued jobs ({len(queued)}):\n{_listing(queued)}"
    )


def _none(expectation: _Expectation, jobs: list[Job]) -> None:
    found = [job for job in jobs if expectation.matches(job)]
    if found:
        raise AssertionError(
            f"expected no queued job: {expectation.describe()}; found {len(found)}:\n"
            f"{_listing(found)}"
        )


@overload
def assert_enqueued(
    eq: SyncSoniq,
    job: JobRef | None = ...,
    /,
    *,
    queue: str | None = ...,
    connection: Any = ...,
    **expected: Any,
) -> Job: ...
@overload
def assert_enqueued(
    eq: Soniq,
    job: JobRef | None = ...,
    /,
    *,
    queue: str | None = ...,
    connection: Any = ...,
    **expected: Any,
) -> Coroutine[Any, Any, Job]: ...
def assert_enqueued(
    eq: Soniq | SyncSoniq,
    job: JobRef | None = None,
    /,
    *,
    queue: str | None = None,
    connection: Any = None,
    **expected: Any,
) -> Job | Coroutine[Any, Any, Job]:
    """Assert that exactly one queued job of ``job`` (a job function or its name;
    None for any) on ``queue`` (if given) has the ``expected`` arguments among its
    own, and return it. Otherwise raise :class:`AssertionError` listing what is queued
    (or the jobs that matched, when several did).

    Arguments compare as stored JSON (a tuple equals a list; ``True`` does not equal
    ``1``); a non-JSON expected value such as ``unittest.mock.ANY`` compares with
    ``==``. The options ``priority``, ``run_at``, ``max_retries``, ``dedupe_key`` and
    ``timeout`` compare with the job's fields of those names. ``connection=`` as for
    :func:`enqueued_jobs`.
    """
    name = _job_name(eq, job)
    expectation = _Expectation.of(name, queue, expected)
    if isinstance(eq, SyncSoniq):
        jobs = _list_sync(eq, name, queue, connection)
        return _one(expectation, jobs, lambda: _list_sync(eq, None, None, connection))
    return _assert_enqueued_async(eq, expectation, connection)


async def _assert_enqueued_async(eq: Soniq, expectation: _Expectation, conn: Any) -> Job:
    jobs = await _list_async(eq, expectation.name, expectation.queue, conn)
    everything: list[Job] = []
    if sum(1 for job in jobs if expectation.matches(job)) == 0:
        everything = await _list_async(eq, None, None, conn)
    return _one(expectation, jobs, lambda: everything)


@overload
def assert_not_enqueued(
    eq: SyncSoniq,
    job: JobRef | None = ...,
    /,
    *,
    queue: str | None = ...,
    connection: Any = ...,
    **expected: Any,
) -> None: ...
@overload
def assert_not_enqueued(
    eq: Soniq,
    job: JobRef | None = ...,
    /,
    *,
    queue: str | None = ...,
    connection: Any = ...,
    **expected: Any,
) -> Coroutine[Any, Any, None]: ...
def assert_not_enqueued(
    eq: Soniq | SyncSoniq,
    job: JobRef | None = None,
    /,
    *,
    queue: str | None = None,
    connection: Any = None,
    **expected: Any,
) -> Coroutine[Any, Any, None] | None:
    """Assert that no queued job matches (same matching as :func:`assert_enqueued`;
    with nothing given: that nothing at all is queued). Raise :class:`AssertionError`
    listing the jobs that match."""
    name = _job_name(eq, job)
    expectation = _Expectation.of(name, queue, expected)
    if isinstance(eq, SyncSoniq):
        _none(expectation, _list_sync(eq, name, queue, connection))
        return None
    return _assert_not_enqueued_async(eq, expectation, connection)


async def _assert_not_enqueued_async(eq: Soniq, expectation: _Expectation, conn: Any) -> None:
    _none(expectation, await _list_async(eq, expectation.name, expectation.queue, conn))


# -- draining --------------------------------------------------------------------


@attrs.frozen
class DrainResult:
    """What :func:`drain` did: how many runs ended done, failed (for good), retried
    (failed with attempts left), cancelled and snoozed (raised :class:`soniq.Snooze`).
    ``errors`` holds ``(job id, error)`` of each failed or retried run; it is left out
    of ``==`` so that ``assert result == DrainResult(done=2, failed=1)`` reads as
    intended."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    errors: tuple[tuple[int, str], ...] = attrs.field(default=(), eq=False)
    snoozed: int = 0

    @property
    def ran(self) -> int:
        """How many runs there were."""
        return self.done + self.failed + self.retried + self.cancelled + self.snoozed


@overload
def drain(
    eq: SyncSoniq,
    *,
    queue: str | Sequence[str] | None = ...,
    run_retries: bool = ...,
    raise_errors: bool = ...,
    max_jobs: int | None = ...,
) -> DrainResult: ...
@overload
def drain(
    eq: Soniq,
    *,
    queue: str | Sequence[str] | None = ...,
    run_retries: bool = ...,
    raise_errors: bool = ...,
    max_jobs: int | None = ...,
) -> Coroutine[Any, Any, DrainResult]: ...
def drain(
    eq: Soniq | SyncSoniq,
    *,
    queue: str | Sequence[str] | None = None,
    run_retries: bool = False,
    raise_errors: bool = False,
    max_jobs: int | None = None,
) -> DrainResult | Coroutine[Any, Any, DrainResult]:
    """Run ready jobs inline, one at a time in claim order (priority, then run_at,
    then id), until none is ready, and return what happened. Jobs that the drained
    jobs enqueue are run too when they are due.

    Each run is the worker's: claimed (attempt counted), given ``current_job()``, its
    timeout applied, its outcome written (fenced) so ``get_job`` shows it afterwards,
    and a failure retried with back-off. A retry is due only after its back-off, so it
    is not run by default; ``run_retries=True`` makes retries due at once, so each job
    runs until it succeeds or exhausts ``max_retries`` (a snooze keeps its delay: a
    job may snooze forever). Jobs scheduled for later stay queued (on the memory
    backend, move time with :func:`use_clock`).

    ``raise_errors=True`` re-raises a job's exception (after recording the run), for
    a traceback in the test. ``max_jobs`` stops after that many runs (a guard against
    jobs that enqueue themselves forever). ``queue`` limits the drain to one queue or
    several.

    ``await drain(eq)`` runs sync jobs in a thread, as the worker does;
    ``drain(eq.sync)`` runs them on the calling thread with no event loop running, so
    they see that thread's connections (e.g. Django's ``TestCase`` transaction); its
    async jobs run on a private event loop.

    On PostgreSQL the drain uses Soniq's own pool, so it runs committed jobs only; to
    check jobs enqueued in an open transaction, use :func:`assert_enqueued` with
    ``connection=``.
    """
    options = _DrainOptions(_queues(queue), run_retries, raise_errors, _max_jobs(max_jobs))
    if isinstance(eq, SyncSoniq):
        return _drain_sync(eq, options)
    if not isinstance(eq, Soniq):
        _job_name(eq, None)  # raises the TypeError
    return _drain_async(eq, options)


@attrs.frozen
class _DrainOptions:
    queues: tuple[str, ...] | None
    run_retries: bool
    raise_errors: bool
    max_jobs: int | None


def _queues(queue: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if queue is None:
        return None
    if isinstance(queue, str):
        queues: tuple[str, ...] = (queue,)
    elif isinstance(queue, (list, tuple)):
        queues = tuple(queue)
    else:
        raise TypeError(f"queue must be a queue name or a list of them, got {queue!r}")
    if not queues:
        raise ValueError(f"queue must be a queue name or a list of them, got {queue!r}")
    for name in queues:
        check_queue(name)  # the rules of enqueue's queue= (and of the worker's queues)
    return queues


def _max_jobs(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_jobs must be an int >= 1 or None, got {value!r}")
    return value


class _Drain:
    """The state of one drain: its worker identity, the tally, the options."""

    def __init__(self, eq: Soniq, options: _DrainOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = eq.backend
        self.registry = eq.registry
        # The run middleware (@eq.middleware), as a worker of this Soniq runs them.
        self.middleware = eq._config.middleware.run
        self.options = options
        self.worker_id = f"drain-{uuid.uuid4().hex}"
        # As the worker: only the names registered here (the others stay queued).
        self.names = self.registry.names()
        self.counts = {"done": 0, "failed": 0, "retried": 0, "cancelled": 0, "snoozed": 0}
        self.errors: list[tuple[int, str]] = []
        self._beat = 0.0
        self._progress = ProgressWriter(loop, self.backend.set_progress)

    def more(self) -> bool:
        limit = self.options.max_jobs
        return limit is None or sum(self.counts.values()) < limit

    async def register(self) -> None:
        """Register (again: a heartbeat) as a worker, so that a worker running beside
        the drain cannot take its job for a dead worker's."""
        self._beat = time.monotonic()
        await self.backend.register_worker(
            WorkerIdentity(
                self.worker_id, socket.gethostname(), os.getpid(), self.options.queues, 1
            )
        )

    async def claim(self) -> Claimed | None:
        if time.monotonic() - self._beat > 2.0:
            await self.register()
        claimed = await self.backend.claim_jobs(1, self.worker_id, self.options.queues, self.names)
        return claimed[0] if claimed else None

    def start(self, claimed: Claimed) -> JobRun:
        """The run of a claimed job (claimed by a registered name), as the worker
        makes it."""
        definition = self.registry.get(claimed.name)
        if definition is None:  # claimed by name: only if the registry lost it since
            raise RuntimeError(f"job {claimed.id}: {claimed.name!r} is no longer registered")
        return JobRun.of(
            definition,
            claimed,
            self.worker_id,
            on_progress=self._progress.report,
            middleware=self.middleware,
        )

    async def close(self) -> None:
        """Write the progress reported last, and unregister."""
        try:
            await self._progress.flush()
        finally:
            await self.backend.unregister_worker(self.worker_id)

    async def finish(self, outcome: Outcome, error: BaseException | None) -> None:
        """Write the outcome, count it, and re-raise the job's error if asked."""
        if self.options.run_retries and outcome.retry_in is not None and not outcome.snoozed:
            outcome = attrs.evolve(outcome, retry_in=0.0)
        await self.backend.finish_jobs([outcome], self.worker_id, keep=True)
        if outcome.snoozed:
            self.counts["snoozed"] += 1
            return
        if outcome.retry_in is not None:
            self.counts["retried"] += 1
        elif outcome.status is JobStatus.QUEUED:  # released: not a run that counts
            return
        else:
            self.counts[outcome.status.value] += 1
        if outcome.error is not None and outcome.status is not JobStatus.CANCELLED:
            self.errors.append((outcome.job_id, outcome.error))
        if error is not None and self.options.raise_errors:
            raise error

    async def release(self, claimed: Claimed) -> None:
        """The drain itself was interrupted: put the job back, attempt not counted."""
        await self.backend.finish_jobs(
            [outcomes.released(claimed.id, claimed.attempts)], self.worker_id, keep=True
        )

    def result(self) -> DrainResult:
        c = self.counts
        return DrainResult(
            c["done"],
            c["failed"],
            c["retried"],
            c["cancelled"],
            errors=tuple(self.errors),
            snoozed=c["snoozed"],
        )


async def _run_async_job(run: JobRun) -> tuple[Outcome, BaseException | None]:
    """An async job on this loop; past its timeout cancelled and failed with
    :class:`JobTimeout`. Interruptions of the drain itself propagate."""
    # In a task of its own even without a timeout: the body catches whatever it
    # raises, so awaited here it would swallow the drain's own cancellation.
    task = asyncio.ensure_future(run.run_async())
    try:
        finished, _ = await asyncio.wait({task}, timeout=run.context.timeout or None)
    except BaseException:
        task.cancel()
        raise
    if finished:
        return task.result(), run.error
    run.timed_out()  # recorded before the cancel, as the worker does: middleware see it
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return run.timed_out(), run.error  # (again: the cancelled body set its own error)


def _run_sync_job(run: JobRun) -> tuple[Outcome, BaseException | None]:
    """A sync job on this thread. It cannot be interrupted: at its timeout it is
    recorded as timed out (as the worker does, so its middleware see that), and the
    drain goes on when it returns."""
    timeout = run.context.timeout
    if not timeout:
        return run.run_sync(), run.error
    fired: list[Outcome] = []
    timer = threading.Timer(timeout, lambda: fired.append(run.timed_out()))
    timer.daemon = True
    timer.start()
    try:
        outcome = run.run_sync()
    finally:
        timer.cancel()
        timer.join()
    if fired:
        outcome = run.timed_out()  # (again: the body's end may have set its own error)
    return outcome, run.error


async def _run_sync_job_in_thread(run: JobRun) -> tuple[Outcome, BaseException | None]:
    """A sync job on a daemon thread of its own, the loop free meanwhile; at its
    timeout the thread is abandoned (Python cannot stop it), as the worker does."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Outcome] = loop.create_future()

    def deliver(outcome: Outcome) -> None:
        if not done.done():
            done.set_result(outcome)

    def target() -> None:
        outcome = run.run_sync()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=target, name=f"soniq-drain-{run.context.id}", daemon=True).start()
    try:
        outcome = await asyncio.wait_for(asyncio.shield(done), run.context.timeout)
    except asyncio.TimeoutError:
        outcome = run.timed_out()
    return outcome, run.error


async def _drain_async(eq: Soniq, options: _DrainOptions) -> DrainResult:
    await eq.ensure_initialized()
    drainer = _Drain(eq, options, asyncio.get_running_loop())
    await drainer.register()
    try:
        while drainer.more():
            claimed = await drainer.claim()
            if claimed is None:
                break
            run = drainer.start(claimed)
            try:
                if run.definition.is_async:
                    outcome, error = await _run_async_job(run)
                else:
                    outcome, error = await _run_sync_job_in_thread(run)
            except BaseException:
                await drainer.release(claimed)
                raise
            await drainer.finish(outcome, error)
    finally:
        await drainer.close()
    return drainer.result()


def _drain_sync(eq: SyncSoniq, options: _DrainOptions) -> DrainResult:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "drain(eq.sync) blocks and cannot run inside an event loop; in async code "
            "use `await drain(eq)`"
        )
    app = eq.async_twin()
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    try:
        run(app.ensure_initialized())
        drainer = _Drain(app, options, loop)
        run(drainer.register())
        try:
            while drainer.more():
                claimed = run(drainer.claim())
                if claimed is None:
                    break
                job_run = drainer.start(claimed)
                try:
                    if job_run.definition.is_async:
                        outcome, error = run(_run_async_job(job_run))
                    else:
                        outcome, error = _run_sync_job(job_run)
                except BaseException:
                    run(drainer.release(claimed))
                    raise
                run(drainer.finish(outcome, error))
        finally:
            run(drainer.close())
        return drainer.result()
    finally:
        try:
            run(app.close())
        finally:
            loop.close()


# -- time ------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when told, for the memory backend (:func:`use_clock`).

    ``FakeClock()`` starts at the current time; ``FakeClock(start)`` at ``start`` (an
    aware datetime or epoch seconds). Calling it returns epoch seconds.
    """

    def __init__(self, start: dt.datetime | float | None = None) -> None:
        self._now = _epoch(time.time() if start is None else start)

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> dt.datetime:
        """The clock's time, as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self._now, dt.timezone.utc)

    def advance(self, by: dt.timedelta | float) -> None:
        """Move forward ``by`` seconds (a number or a timedelta)."""
        seconds = by.total_seconds() if isinstance(by, dt.timedelta) else float(by)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"advance by a finite, non-negative amount, got {by!r}")
        self._now += seconds


def _epoch(value: dt.datetime | float) -> float:
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            raise ValueError("FakeClock: start must be timezone-aware")
        return value.timestamp()
    return float(value)


def clear_jobs(eq: Soniq | SyncSoniq) -> None:
    """Forget every job and worker of a ``memory://`` Soniq (and of its twin), and
    number jobs from 1 again: call it between tests that share one module-level Soniq.

    On PostgreSQL, roll back or truncate in your own fixtures instead.
    """
    from soniq.core.sql import sqlite as sq
    from soniq.drivers.sqlite import run

    database = _memory_database(eq, "clear_jobs")
    conn = database.connect()
    try:
        run(conn, sq.clear_all())  # the database was created current (SqliteMemory)
    finally:
        conn.close()


def _memory_database(eq: Soniq | SyncSoniq, caller: str) -> SqliteMemory:
    if not isinstance(eq, (Soniq, SyncSoniq)):
        raise TypeError(f"{caller}: expected a Soniq or eq.sync, got {type(eq).__name__}")
    database = getattr(eq.backend, "database", None)
    from soniq.drivers.sqlite import SqliteMemory

    if not isinstance(database, SqliteMemory):
        raise TypeError(f"{caller}: only memory:// applies; this Soniq is on {eq.backend.name}")
    return database


def use_clock(eq: Soniq | SyncSoniq, clock: Callable[[], float]) -> None:
    """Make the memory backend of ``eq`` (and of its twin: they share the database) read
    the time from ``clock`` (epoch seconds), e.g. a :class:`FakeClock`. Scheduled jobs
    and retries become due, and workers' heartbeats go stale, as it moves.

    Only ``memory://`` keeps time itself; PostgreSQL uses the database's clock.
    """
    _memory_database(eq, "use_clock").clock = clock
