"""The worker: one asyncio runtime for async and sync jobs.

Theory of operation:

- **Fetch.** One task claims up to the number of free slots in one statement
  (``FOR UPDATE SKIP LOCKED`` behind a CTE fence), and claims again at once after a
  full batch. Otherwise it waits for a NOTIFY, a freed slot, or the poll interval.
- **Run.** Async jobs run as tasks on the loop; sync jobs on daemon threads.
  ``concurrency`` is one pool of slots for both.
- **Complete.** Outcomes are queued in memory and written by one task, one statement
  per flush, on another pooled connection than the claims, so the two overlap. Each
  write is fenced by worker id and attempt.
- **Heartbeat.** A thread with its own connection (see ``heartbeat.py``) keeps this
  worker alive in the database, relays cancellation requests and rescues the jobs
  of dead workers.
- **Shutdown.** Stop fetching; give running jobs ``shutdown_timeout`` seconds; put
  back what did not finish, without counting the attempt; flush; unregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import attrs

from soniq.contrib.django import close_stale_connections
from soniq.core.enqueue import Registry, check_queue
from soniq.core.errors import ConfigurationError
from soniq.core.flow import ClaimLimits
from soniq.core.jobs import Claimed, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.states import JobStatus
from soniq.drivers._common import is_connection_error
from soniq.drivers.base import AsyncBackend, WorkerOps
from soniq.middleware import Middleware
from soniq.worker.execute import JobRun
from soniq.worker.heartbeat import Heartbeat
from soniq.worker.periodic import run_schedules
from soniq.worker.progress import ProgressWriter
from soniq.worker.threads import DaemonThreadPool

_DONE = JobStatus.DONE
log = logging.getLogger("soniq.worker")

#: How long a claim on a one-writer database (:attr:`AsyncBackend.one_writer`) waits,
#: while jobs run, for more of them to free their slots: one claim for all of them is
#: one commit instead of several. (A server's claims are cheap and overlap: no wait.)
CLAIM_GATHER = 0.001


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not _is_number(value) or not value > 0 or not math.isfinite(value):
        raise ConfigurationError(f"{attribute.name} must be a positive number, got {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not _is_number(value) or not value >= 0 or not math.isfinite(value):
        raise ConfigurationError(f"{attribute.name} must be seconds >= 0, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _queues(value: Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [q for q in value.split(",") if q]
    queues = tuple(value)
    if not queues:
        raise ConfigurationError(f"queues must be None (all) or queue names, got {value!r}")
    for queue in queues:
        try:
            check_queue(queue)  # the rules of enqueue's queue=
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"queues: {exc}") from None
    return queues


@attrs.frozen
class WorkerConfig:
    """How a worker behaves. Every duration is in seconds."""

    queues: tuple[str, ...] | None = attrs.field(default=None, converter=_queues)
    concurrency: int = attrs.field(default=10, validator=_positive)
    burst: bool = False
    #: A burst worker with nothing ready waits for a job of its queues due within this
    #: long (a retry, a snooze, a job enqueued with a short delay) instead of exiting
    #: with it pending; 0 exits at once.
    burst_wait: float = attrs.field(default=10.0, validator=_not_negative)
    #: Poll this often when no NOTIFY arrives (and always, with ``listen=False``).
    poll_interval: float = attrs.field(default=1.0, validator=_positive)
    #: LISTEN for new jobs; turn off behind PgBouncer in transaction pooling mode.
    listen: bool = True
    heartbeat_interval: float = attrs.field(default=2.0, validator=_positive)
    #: A worker silent for this long is dead: live workers put its jobs back.
    stale_after: float = attrs.field(default=30.0, validator=_positive)
    #: On SIGTERM/cancel, running jobs get this long to finish before being put back.
    shutdown_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Keep finished jobs this long (None: forever; 0: delete them at completion).
    retention: float | None = 7 * 24 * 3600.0
    #: Enqueue the periodic jobs (``@eq.periodic``) at their ticks; every worker does,
    #: each tick once across them. ``soniq worker --no-periodic`` turns it off. A
    #: burst worker never schedules.
    periodic: bool = True
    #: Log a summary line at INFO this often.
    summary_interval: float = attrs.field(default=60.0, validator=_positive)
    #: A statement of the worker's own (a claim, a batch of outcomes, a heartbeat,
    #: reconcile, register) that gets no answer within this long is given up: its
    #: connection is abandoned at once (a link that went silent, a half-open
    #: connection, is never waited on) and the worker reconnects and goes on. Default:
    #: 10 s, or a third of ``stale_after`` when that is shorter; below ``stale_after``.
    command_timeout: float = attrs.field(
        default=attrs.Factory(lambda self: min(10.0, self.stale_after / 3), takes_self=True),
        validator=_positive,
    )

    def __attrs_post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise ConfigurationError(f"concurrency must be an int, got {self.concurrency!r}")
        retention = self.retention
        if retention is not None and (
            not _is_number(retention) or not retention >= 0 or math.isinf(retention)
        ):
            raise ConfigurationError(
                f"retention must be seconds >= 0 (0: delete at completion) or None "
                f"(keep forever), got {retention!r}"
            )
        if self.stale_after <= 2 * self.heartbeat_interval:
            raise ConfigurationError(
                "stale_after must exceed two heartbeat intervals, or live workers would "
                f"be declared dead (stale_after={self.stale_after}, "
                f"heartbeat_interval={self.heartbeat_interval})"
            )
        if self.command_timeout >= self.stale_after:
            raise ConfigurationError(
                "command_timeout must be below stale_after, or a worker waiting on a "
                f"silent connection would be declared dead (command_timeout="
                f"{self.command_timeout}, stale_after={self.stale_after})"
            )


@attrs.define(eq=False)
class _Running:
    """A claimed job while it holds a slot."""

    run: JobRun
    task: asyncio.Task[None] | None = None
    settled: bool = False  # its outcome is recorded (a later one is ignored)
    timer: asyncio.TimerHandle | None = None  # its timeout


class Worker:
    """Runs jobs of one Soniq app. Use ``await eq.run_worker(...)`` or the CLI."""

    def __init__(
        self,
        *,
        backend: AsyncBackend,
        registry: Registry,
        config: WorkerConfig,
        middleware: tuple[Middleware, ...] = (),
    ) -> None:
        self.config = config
        #: What wraps each run (``@eq.middleware``; see soniq.middleware).
        self.middleware = middleware
        self.id = uuid.uuid4().hex
        self._backend = backend
        self._registry = registry
        # The worker claims only the jobs it can run (those registered when it
        # starts): a job no running worker knows stays queued, so applications and
        # versions can share a database and its queues.
        self._names = registry.names()
        self._limits = registry.claim_limits()
        # The runs claimed under limits, job id: run number (claims), from the claim
        # until their outcome is written: a limit counts them as running until then.
        self._limited_runs: dict[int, int] = {}
        self._running: dict[int, _Running] = {}
        self._pending: list[Outcome] = []
        self._writing: list[Outcome] = []  # the completer's batch in flight
        self._batches_written = 0  # (a burst worker claims again after one is written)
        # Sync jobs' outcomes on their way from the threads to the loop.
        self._sync_done_lock = threading.Lock()
        self._sync_done: list[tuple[_Running, Outcome, float]] = []
        self._stopping = False
        self._reserved = 0  # slots of the claims in flight
        self._backlog = False  # the last claim filled every slot it asked for
        self._reconcile_needed = False
        self._stopping_completer = False
        self._random = random.Random().random
        # The summary line's counts: runs by final status, and retries.
        self._counts = {s.value: 0 for s in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)}
        self._counts["retried"] = 0
        self._counts["snoozed"] = 0
        self._totals: dict[str, int] = {}  # the counts of the intervals logged
        self._started = time.monotonic()
        # A burst worker with nothing ready waits for jobs due soon, until this
        # deadline (burst_wait after it first found nothing ready): a job that keeps
        # snoozing or failing cannot keep it alive.
        self._burst_deadline: float | None = None

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled (or, with ``burst``, until no job is ready)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        self._idlers: list[tuple[asyncio.Future[None], bool]] = []  # see _idle
        self._claims_open = asyncio.Event()
        self._claims_open.set()
        self._no_claim_in_flight = asyncio.Event()
        self._no_claim_in_flight.set()
        self._slot_freed = asyncio.Event()
        self._flush_needed = asyncio.Event()
        self._batch_written = asyncio.Event()
        self._progress = ProgressWriter(loop, self._backend.set_progress)
        self._threads = DaemonThreadPool(self.config.concurrency)
        identity = WorkerIdentity(
            self.id,
            socket.gethostname(),
            os.getpid(),
            self.config.queues,
            self.config.concurrency,
        )
        bound = self.config.command_timeout
        await asyncio.wait_for(self._backend.register_worker(identity), bound)
        heartbeat = Heartbeat(
            open_session=self._backend.maintenance,
            identity=identity,
            interval=self.config.heartbeat_interval,
            stale_after=self.config.stale_after,
            retention=self.config.retention,
            command_timeout=bound,
            on_cancel=lambda ids: loop.call_soon_threadsafe(self._cancel_requested, ids),
        )
        heartbeat.start()
        self._heartbeat = heartbeat
        helpers = [loop.create_task(self._complete_forever(), name="soniq-completer")]
        if self.config.listen:
            helpers.append(loop.create_task(self._listen_forever(), name="soniq-listener"))
        helpers.append(loop.create_task(self._summarise_forever(), name="soniq-summary"))
        if self.config.periodic and not self.config.burst and self._registry.schedules:
            periodic = run_schedules(self._backend, self._registry, self.config.command_timeout)
            helpers.append(loop.create_task(periodic, name="soniq-periodic"))
        log.info(
            "worker %s started: queues=%s concurrency=%d jobs=%d",
            self.id,
            ",".join(self.config.queues or ["*"]),
            self.config.concurrency,
            len(self._names),
        )
        if not self._names:
            log.warning(
                "no job is registered with this Soniq: the worker will take no job "
                "(it takes only the jobs it knows); import the module that defines them"
            )
        cancelled = False
        try:
            # Its first beat gives a job table without statistics some before the first
            # claim is planned (see heartbeat.ANALYZE_ROWS): a few milliseconds.
            await asyncio.to_thread(heartbeat.first_beat.wait, bound)
            await self._fetch_forever()
        except asyncio.CancelledError:
            cancelled = True
        finally:
            await self._shutdown(helpers, heartbeat)
        if cancelled:
            raise asyncio.CancelledError

    async def _shutdown(self, helpers: list[asyncio.Task[None]], heartbeat: Heartbeat) -> None:
        self._stopping = True
        if self._unsettled():
            log.info(
                "stopping: waiting up to %ss for %d job(s)",
                self.config.shutdown_timeout,
                sum(not r.settled for r in self._running.values()),
            )
            deadline = time.monotonic() + self.config.shutdown_timeout
            # Jobs whose outcome is recorded already (timed out, still on their
            # thread) are not waited for.
            while self._unsettled() and time.monotonic() < deadline:
                self._slot_freed.clear()
                await _wait(self._slot_freed, deadline - time.monotonic())
        released = [r for r in self._running.values() if not r.settled]
        for running in list(self._running.values()):
            self._release(running)
        # Let the async jobs cancelled now unwind (bounded: a job may swallow
        # cancellation); those whose outcome was recorded earlier are not waited for.
        tasks = [r.task for r in released if r.task is not None and not r.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for task in helpers:
            if task.get_name() != "soniq-completer":
                task.cancel()
        self._flush_needed.set()
        self._stopping_completer = True
        await asyncio.wait(helpers, timeout=10)
        self._threads.shutdown()
        await asyncio.wait_for(self._progress.flush(), self.config.command_timeout)
        await asyncio.to_thread(heartbeat.stop)
        try:
            await asyncio.wait_for(
                self._backend.unregister_worker(self.id), self.config.command_timeout
            )
        except Exception as exc:  # the rows are rescued by others in time anyway
            log.warning("could not unregister worker %s: %s", self.id, exc)
        log.info("worker %s stopped %s", self.id, self._exit_summary())

    # -- fetching --------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        """Claim in lanes until stopped; returns when a lane does (``burst``: nothing
        ready and nothing running), re-raising a lane's error."""
        # A server overlaps two claims with the running jobs; where each claim is a
        # commit of a one-writer database, a second one would only wait its turn, as
        # would the limited claims of a worker with limited jobs (they take turns):
        # one claim of all its free slots costs less than two of half.
        lane_count = 1 if self._backend.one_writer or self._limits.jobs else 2
        lanes = [
            asyncio.ensure_future(self._claim_lane(cap))
            for cap in _lane_caps(self.config.concurrency, lane_count)
        ]
        try:
            done, _ = await asyncio.wait(lanes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
        for lane in done:
            lane.result()

    async def _claim_lane(self, cap: int) -> None:
        """Claim up to ``cap`` jobs (never more than the free slots, counting those
        other lanes are claiming) in one statement, start them, repeat."""
        async with _Session(self._backend, self.config.command_timeout) as session:
            await self._claim_forever(cap, session)

    async def _claim_forever(self, cap: int, session: _Session) -> None:
        failures = 0
        gather = CLAIM_GATHER if self._backend.one_writer else 0.0
        gather_until: float | None = None
        # Claim only while the heartbeat is confirmed recently enough that no other
        # worker can have declared this one dead: they would put back (and count) what
        # it claims, again and again, until its heartbeat registers it again.
        unconfirmed_limit = self.config.stale_after - self.config.command_timeout
        paused = False
        # An abandoned claim may still reach the server and run later (a link that
        # held its bytes): reconcile once more a while after one.
        recheck_at: float | None = None
        while not self._stopping:
            if not self._claims_open.is_set():  # another lane is reconciling
                await self._claims_open.wait()
                continue
            if recheck_at is not None and self._loop.time() >= recheck_at:
                recheck_at, self._reconcile_needed = None, True
            if self._heartbeat.unconfirmed_for() > unconfirmed_limit:
                if not paused:
                    log.warning(
                        "heartbeat not confirmed for %.1fs: claiming nothing until it is",
                        self._heartbeat.unconfirmed_for(),
                    )
                paused = True
                await asyncio.sleep(min(self.config.heartbeat_interval, 0.2))
                continue
            paused = False
            free = min(cap, self.config.concurrency - len(self._running) - self._reserved)
            # Idle, with another lane's claim in flight: a second claim would most
            # likely find nothing (a wake-up usually means one new job). Under load the
            # lanes overlap, because running jobs keep freeing slots, and behind a
            # backlog (the last claim came back full) even jobs that end at once do.
            if free > 0 and self._reserved and not self._running and not self._backlog:
                free = 0
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                # Jobs tend to finish together: let the others of this turn of the loop
                # free their slots too, so one claim fills them all.
                await asyncio.sleep(0)
                continue
            if gather and free < cap and self._running:
                # Each claim costs a commit here (CLAIM_GATHER): give the running jobs
                # a moment to free their slots too, so that one claim fills them all.
                now = self._loop.time()
                if gather_until is None:
                    gather_until = now + gather
                if now < gather_until:
                    self._slot_freed.clear()
                    await _wait(self._slot_freed, gather_until - now)
                    continue
            gather_until = None
            self._wake.clear()  # a NOTIFY during the claim will still wake the next wait
            written = self._batches_written
            try:
                if self._reconcile_needed:
                    await self._reconcile(session)
                    continue
                self._reserved += free
                self._no_claim_in_flight.clear()
                try:
                    ops = await session.ops()
                    with session.bounded():
                        rows = await ops.claim_jobs(
                            free, self.id, self.config.queues, self._names, self._claim_limits()
                        )
                except Exception as exc:
                    await session.drop(exc)
                    lost = session.timed_out()
                    if lost is None:
                        raise
                    recheck_at = self._loop.time() + self.config.stale_after
                    raise lost from exc
                finally:
                    self._reserved -= free
                    if not self._reserved:
                        self._no_claim_in_flight.set()
            except Exception as exc:
                # A worker must outlive a bad moment of its database: log, back off,
                # reconcile what a lost reply may have claimed, and go on.
                failures, self._reconcile_needed = failures + 1, True
                if is_connection_error(exc):
                    log.warning("claim failed (%s); retrying", exc)
                else:
                    log.exception("claim failed; retrying")
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            failures = 0
            self._backlog = len(rows) == free
            for row in rows:
                self._start(row)
            if len(rows) == free:
                continue
            if self.config.burst and not rows and not self._unsettled() and not self._reserved:
                if self._pending or self._writing:
                    # An outcome not written yet: a retry is not queued yet, nor are the
                    # children its end releases. Claim again once it is.
                    self._batch_written.clear()
                    await _wait(self._batch_written, 0.05)
                    continue
                if self._batches_written != written:
                    continue  # written during the claim: what it released, claim it
                due_in = await self._burst_due_in()
                if due_in is None:
                    return
                await asyncio.sleep(max(0.05, due_in))  # not a spin on a locked row
                continue
            await self._idle(slots=bool(self._running))

    def _claim_limits(self) -> ClaimLimits:
        """The limits a claim obeys, told which of this worker's limited jobs have
        ended with their outcome not written yet (not running any more: not counted)."""
        if not self._limited_runs:
            return self._limits
        # Ended: its outcome is recorded and it has left its slot (a job past its
        # timeout whose body still runs keeps its slot, so it keeps counting until its
        # outcome is written; see docs/flow-control.md).
        recorded = {o.job_id for o in (*self._writing, *self._pending)}
        ended = tuple(
            (i, run)
            for i, run in self._limited_runs.items()
            if i in recorded and i not in self._running
        )
        return attrs.evolve(self._limits, ended=ended) if ended else self._limits

    async def _burst_due_in(self) -> float | None:
        """Seconds until a job of this burst worker is due, if that is before its
        deadline (see ``burst_wait``); None: time to exit. A failed question is an
        answer too: the worker exits (as a burst worker always did with nothing
        ready), saying why."""
        now = self._loop.time()
        if self._burst_deadline is None:
            self._burst_deadline = now + self.config.burst_wait
        left = self._burst_deadline - now
        if left <= 0:
            return None
        try:
            due_in = await asyncio.wait_for(
                self._backend.next_due(self.config.queues, self._names),
                self.config.command_timeout,
            )
        except Exception as exc:
            log.warning("burst: could not ask for jobs due soon (%s); exiting", exc)
            return None
        return None if due_in is None or due_in > left else due_in

    async def _idle(self, *, slots: bool) -> None:
        """Wait for a NOTIFY (or, with ``slots``, a freed slot), at most one poll
        interval. One future and one timer: this is on the enqueue-to-start path."""
        if self._wake.is_set():
            return
        if slots:
            self._slot_freed.clear()
        waiter = self._loop.create_future()
        self._idlers.append((waiter, slots))
        timer = self._loop.call_later(self.config.poll_interval, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    def _nudge(self, *, slot: bool) -> None:
        """Wake the idle lanes that wait for this kind of news."""
        if not self._idlers:
            return
        staying: list[tuple[asyncio.Future[None], bool]] = []
        for waiter, slots in self._idlers:
            if slot and not slots:
                staying.append((waiter, slots))
            else:
                _resolve(waiter)
        self._idlers = staying

    async def _reconcile(self, session: _Session) -> None:
        """Put back what a lost claim reply may have claimed, with no claim of another
        lane in flight (its rows are claimed but not known to this worker yet). On the
        lane's session when it can (bounded as a claim is), else on the pool."""
        self._reconcile_needed = False
        self._claims_open.clear()
        try:
            await self._no_claim_in_flight.wait()
            try:
                ops = await session.ops()
                # Jobs whose outcome is on its way (pending, or in the completer's write
                # right now) are held too: putting them back would run them again.
                held = [*self._running, *(o.job_id for o in (*self._pending, *self._writing))]
                with session.bounded():
                    put_back = await ops.reconcile(self.id, held)
            except Exception as exc:
                await session.drop(exc)
                lost = session.timed_out()
                if lost is None:
                    raise
                raise lost from exc
        finally:
            self._claims_open.set()
        if put_back:
            log.warning("put back %d job(s) claimed while the connection was lost", put_back)

    def _start(self, claimed: Claimed) -> None:
        job_id, name, attempts, timeout = (
            claimed.id,
            claimed.name,
            claimed.attempts,
            claimed.timeout,
        )
        definition = self._registry.get(name)
        if definition is None:  # claimed by name: only if the registry lost it since
            raise RuntimeError(f"job {job_id}: {name!r} is no longer registered")
        if claimed.claims > attempts:
            log.warning(
                "job %s %s: started again (run %d, attempt %d): an earlier run was put "
                "back uncounted and may have done some of its work",
                job_id,
                name,
                claimed.claims,
                attempts,
            )
        run = JobRun.of(
            definition, claimed, self.id, self._random, self._progress.report, self.middleware
        )
        running = _Running(run)
        self._running[job_id] = running
        if claimed.limited:
            self._limited_runs[job_id] = claimed.claims
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s %s: start (attempt %d)", job_id, name, attempts)
        if definition.is_async:
            running.task = self._loop.create_task(self._run_async(running))
        else:
            self._threads.submit(lambda: self._run_sync(running))
        if timeout is not None:
            # A timer, not asyncio.wait_for: a job that swallows its cancellation is
            # still recorded as timed out on time (it keeps its slot until it ends).
            running.timer = self._loop.call_later(timeout, self._timed_out, running)

    # -- running -----------------------------------------------------------------

    async def _run_async(self, running: _Running) -> None:
        started = time.monotonic()
        try:
            # Cancelled at shutdown or after its timeout, a run's outcome is recorded
            # already: what it returns then is ignored (see _settle).
            outcome = await running.run.run_async()
            self._settle(running, outcome, time.monotonic() - started)
        finally:
            self._free(running)

    def _run_sync(self, running: _Running) -> None:
        """On a pool thread. Hands the outcome back to the loop, whatever happens."""
        started = time.monotonic()
        try:
            # As Django does around a request: never a connection the server closed.
            # (Not in soniq.testing's drain: a test's connection is inside its
            # transaction, and Django would close it.)
            close_stale_connections()
            outcome = running.run.run_sync()
        except BaseException as exc:  # a bug of ours: the job must still end
            outcome = running.run.failed(exc)
        try:
            close_stale_connections()
        except Exception:
            log.warning(
                "job %s: closing Django's old connections failed",
                running.run.context.id,
                exc_info=True,
            )
        elapsed = time.monotonic() - started
        # One wake-up of the loop for the outcomes of all the threads that finish
        # before it runs: each wake-up is a system call, and threads finish together.
        with self._sync_done_lock:
            first = not self._sync_done
            self._sync_done.append((running, outcome, elapsed))
        if first:
            # The loop is gone if the worker exited while this job was stuck: nothing
            # to do.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._finish_sync)

    def _finish_sync(self) -> None:
        with self._sync_done_lock:
            done, self._sync_done = self._sync_done, []
        for running, outcome, elapsed in done:
            try:
                self._settle(running, outcome, elapsed)
            except Exception:  # one bad outcome must not keep the others' slots
                log.exception("job %s: recording its outcome failed", running.run.context.id)
            self._free(running)

    def _timed_out(self, running: _Running) -> None:
        """The job's timeout passed: record it as timed out now. An async job is
        cancelled too; a sync thread cannot be stopped and keeps its slot until it
        returns (as does an async job that swallows its cancellation)."""
        if running.settled:
            return
        self._settle(running, running.run.timed_out(), None)
        self._slot_freed.set()  # a shutdown waits for unsettled jobs only: re-count
        if running.task is None:
            self._warn_if_held(running)
        else:
            running.task.cancel()
            # A task ends soon after its cancellation; warn about one that goes on.
            self._loop.call_later(1.0, self._warn_if_held, running)

    def _warn_if_held(self, running: _Running) -> None:
        ctx = running.run.context
        if self._running.get(ctx.id) is not running:
            return
        log.warning(
            "job %s %s: ran past its timeout of %ss and was recorded as timed out, but "
            "its %s goes on and keeps its slot until it returns (%d of %d slots held "
            "by timed-out jobs)",
            ctx.id,
            ctx.name,
            ctx.timeout,
            "thread" if running.task is None else "task (it ignores cancellation)",
            self._slots_held_after_timeout(),
            self.config.concurrency,
        )

    def _slots_held_after_timeout(self) -> int:
        return sum(1 for r in self._running.values() if r.settled)

    def _unsettled(self) -> bool:
        """True while a running job's outcome is still to come."""
        return any(not r.settled for r in self._running.values())

    def _settle(self, running: _Running, outcome: Outcome, elapsed: float | None) -> None:
        if running.settled:
            return
        running.settled = True
        ctx = running.run.context
        if ctx.progress is not None:  # (a job that reported none has none to write)
            self._progress.ended(ctx)
        if outcome.status is _DONE and outcome.error is None:  # every job's path
            self._counts["done"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("job %s %s: done in %.3fs", ctx.id, ctx.name, elapsed or 0.0)
        elif outcome.snoozed:
            self._counts["snoozed"] += 1
            log.info("job %s %s: snoozed for %gs", ctx.id, ctx.name, outcome.retry_in)
        elif outcome.release:
            log.info("job %s %s: put back (shutdown)", ctx.id, ctx.name)
        elif outcome.retry_in is not None:
            self._counts["retried"] += 1
            log.warning(
                "job %s %s: attempt %d failed (%s); retry in %.1fs",
                ctx.id,
                ctx.name,
                ctx.attempt,
                outcome.error,
                outcome.retry_in,
            )
        elif outcome.status is JobStatus.FAILED:
            self._counts["failed"] += 1
            log.error(
                "job %s %s: failed after %d attempt(s): %s",
                ctx.id,
                ctx.name,
                ctx.attempt,
                outcome.error,
            )
        else:
            status = outcome.status.value
            self._counts[status] = self._counts.get(status, 0) + 1
            if outcome.error is not None and status == "done":
                log.warning("job %s %s: done; %s", ctx.id, ctx.name, outcome.error)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("job %s %s: %s in %.3fs", ctx.id, ctx.name, status, elapsed or 0.0)
        self._record(outcome)

    def _free(self, running: _Running) -> None:
        if running.timer is not None:
            running.timer.cancel()
        if self._running.pop(running.run.context.id, None) is not None:
            self._slot_freed.set()
            self._nudge(slot=True)

    def _release(self, running: _Running) -> None:
        """Shutdown: put the job back; an async job is cancelled too."""
        ctx = running.run.context
        self._settle(running, running.run.released(), None)
        if running.task is not None and not running.task.done():
            running.task.cancel()
        else:  # a stuck sync thread: give its slot up; its late outcome is ignored
            self._running.pop(ctx.id, None)

    def _cancel_requested(self, job_ids: Sequence[int]) -> None:
        for job_id in job_ids:
            running = self._running.get(job_id)
            if running is None or running.run.context.cancelled:
                continue
            running.run.context.request_cancel()
            log.info("job %s %s: cancellation requested", job_id, running.run.context.name)
            if running.task is not None:
                running.task.cancel()

    # -- completing --------------------------------------------------------------

    def _record(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._flush_needed.set()

    async def _complete_forever(self) -> None:
        async with _Session(self._backend, self.config.command_timeout) as session:
            await self._complete(session)

    async def _complete(self, session: _Session) -> None:
        failures = 0
        keep = self.config.retention != 0
        while True:
            await self._flush_needed.wait()
            self._flush_needed.clear()
            batch, self._pending = self._pending, []
            if batch:
                self._writing = batch
                try:
                    ops = await session.ops()
                    with session.bounded():
                        await ops.finish_jobs(batch, self.id, keep=keep)
                    failures = 0
                except Exception as error:
                    self._pending[:0], self._writing = batch, []
                    await session.drop(error)
                    exc = session.timed_out() or error
                    if not is_connection_error(exc):
                        log.exception("writing %d outcome(s) failed", len(batch))
                    else:
                        log.warning("writing %d outcome(s) failed (%s); retrying", len(batch), exc)
                    failures += 1
                    self._flush_needed.set()
                    if self._stopping_completer and failures > 3:
                        log.error("giving up on %d outcome(s); they will be rescued", len(batch))
                        return
                    await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                    continue
                self._writing = []
                self._batches_written += 1
                self._batch_written.set()
                limited = self._limited_runs
                if limited and [limited.pop(o.job_id) for o in batch if o.job_id in limited]:
                    self._nudge(slot=False)  # a limit has room now: claim again
            if self._stopping_completer and not self._pending:
                return

    # -- waking --------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        failures = 0

        def ready() -> None:
            nonlocal failures
            if failures:
                log.info("LISTEN connection restored; back to notifications")
            failures = 0
            self._wake.set()  # jobs may have arrived while we were deaf
            self._nudge(slot=False)

        while True:
            try:
                await self._backend.listen(self._on_notify, ready)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(30.0, 0.2 * 2**failures)
                log.warning(
                    "LISTEN connection lost (%s); polling every %ss, reconnecting in %.1fs",
                    exc,
                    self.config.poll_interval,
                    delay,
                )
                await asyncio.sleep(delay)

    def _on_notify(self, payload: str) -> None:
        queues = self.config.queues
        if queues is None or any(q in queues for q in payload.split(",")):
            self._wake.set()
            self._nudge(slot=False)

    async def _summarise_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.summary_interval)
            counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
            for key, count in counts.items():
                self._totals[key] = self._totals.get(key, 0) + count
            held = self._slots_held_after_timeout()
            if held:
                log.warning(
                    "%d of %d slots are held by timed-out jobs that have not returned",
                    held,
                    self.config.concurrency,
                )
            if any(counts.values()):
                log.info(
                    "last %gs: %s; running %d",
                    self.config.summary_interval,
                    _summary(counts, self.config.summary_interval),
                    len(self._running),
                )

    def _exit_summary(self) -> str:
        """The whole run's counts, for the line logged at exit."""
        totals = dict(self._totals)
        for key, count in self._counts.items():
            totals[key] = totals.get(key, 0) + count
        seconds = time.monotonic() - self._started
        return f"after {seconds:.1f}s: {_summary(totals, seconds)}"


def _summary(counts: dict[str, int], seconds: float) -> str:
    """``done 120, failed 2, cancelled 0, retried 3, snoozed 0; 2.1 jobs/s``: runs
    by how they ended (per second: the runs that ended, retries included)."""
    runs = sum(counts.values())
    listed = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"{listed}; {runs / max(seconds, 1e-9):.1f} jobs/s"


def _lane_caps(concurrency: int, lanes: int) -> list[int]:
    """Batch caps of the claim lanes, which share the slots. With one lane the worker
    idles while each claim travels; with two, one batch runs while the next is
    claimed (as the raw limit does)."""
    lanes = max(1, min(lanes, concurrency))
    return [concurrency // lanes + (i < concurrency % lanes) for i in range(lanes)]


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, timeout))


class _Session:
    """A worker loop's backend session (:meth:`AsyncBackend.worker_session`), opened
    on first use and dropped after an error, so that the next use opens a new one.

    A statement run under :meth:`bounded` that gets no answer within ``timeout``
    seconds has its connection abandoned at once: the session's ``abort()`` makes the
    statement fail as on a lost connection, and the caller's retry takes over. One
    timer per statement, that is per claim batch or per flush."""

    def __init__(self, backend: AsyncBackend, timeout: float) -> None:
        self._backend = backend
        self._timeout = timeout
        self._context: contextlib.AbstractAsyncContextManager[WorkerOps] | None = None
        self._ops: WorkerOps | None = None
        self._expired = False

    async def ops(self) -> WorkerOps:
        if self._ops is None:
            context = self._backend.worker_session()
            self._ops = await context.__aenter__()
            self._context = context
        return self._ops

    @contextlib.contextmanager
    def bounded(self) -> Any:
        """Abandon the connection if the statement in this block outlasts the timeout."""
        self._expired = False
        ops = self._ops
        if ops is None:  # nothing opened: nothing to bound
            yield
            return
        timer = asyncio.get_running_loop().call_later(self._timeout, self._expire, ops)
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self, ops: WorkerOps) -> None:
        self._expired = True
        ops.abort()

    def timed_out(self) -> TimeoutError | None:
        """The error to report for a statement's failure when the timeout abandoned
        its connection (else None)."""
        if not self._expired:
            return None
        self._expired = False
        return TimeoutError(
            f"no answer within command_timeout={self._timeout:g}s; the connection was abandoned"
        )

    async def drop(self, error: BaseException | None = None) -> None:
        """Forget the session; after an ``error`` its connection is abandoned, not
        closed politely (a goodbye on a silent link could wait too)."""
        context, self._context, self._ops = self._context, None, None
        if context is not None:
            with contextlib.suppress(Exception):
                if error is None:
                    await context.__aexit__(None, None, None)
                else:
                    await context.__aexit__(type(error), error, error.__traceback__)

    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drop()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
