"""The public facade: :class:`Soniq` (async) and its blocking twin :class:`SyncSoniq`
(``eq.sync``).

Both are shells: every rule (resolving the job, validating arguments and options,
building SQL, reading rows back) is in ``soniq.core``; the drivers do the I/O. Each
method here is a few lines that pick where a statement runs: Soniq's own pool, or the
caller's connection, whose type decides the driver.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from soniq.core.admin import (
    PURGE_BATCH,
    RETRY_BATCH,
    BacklogProblem,
    QueueStats,
    Stats,
    WorkerInfo,
    backlog_problems,
    job_filter,
    purge_selection,
    stats_minutes,
)
from soniq.core.enqueue import (
    JobRef,
    Registry,
    build_graph,
    build_spec,
    check_queue,
    split_options,
)
from soniq.core.errors import ConfigurationError, DatabaseUnavailable
from soniq.core.flow import QueueLimits, queue_limits
from soniq.core.jobs import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_QUEUE,
    Job,
    JobDefinition,
    JobNode,
    JobSpec,
)
from soniq.core.results import result_of
from soniq.core.retry import DEFAULT_BACKOFF, Backoff
from soniq.core.schedules import Schedule, make_schedule
from soniq.core.sql.postgres import quote_ident
from soniq.core.states import JobStatus
from soniq.drivers._common import redact_url, split_postgres_url
from soniq.drivers.base import AsyncBackend, SyncBackend
from soniq.drivers.embedded import (
    DEFAULT_SQLITE_URL,
    EMBEDDED,
    embedded_backend,
    embedded_location,
    embedded_sync_backend,
)
from soniq.middleware import MiddlewareChain, nodes_with_headers, with_headers
from soniq.waiting import EndWaiters, LoopThread
from soniq.worker import Worker, WorkerConfig

if TYPE_CHECKING:
    from soniq.drivers.connections import CallerConnections

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Callable[[Any], Any])
log = logging.getLogger("soniq")

# The PostgreSQL drivers are imported when a PostgreSQL URL is used: importing asyncpg
# and psycopg costs ~0.3 s, which an embedded user's process (and worker start) need
# not pay.
_ASYNC_DRIVERS = ("asyncpg", "psycopg")
#: Defaults of ``Soniq(connect_timeout=..., acquire_timeout=...)``, in seconds.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_ACQUIRE_TIMEOUT = 10.0


def _postgres_async_driver(config: _Config) -> AsyncBackend:
    if config.driver == "asyncpg":
        from soniq.drivers.asyncpg import AsyncpgDriver

        return AsyncpgDriver(config.dsn, **config.driver_options())
    from soniq.drivers.psycopg_async import PsycopgAsyncDriver

    return PsycopgAsyncDriver(config.dsn, **config.driver_options())


def _seconds(name: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a finite number of seconds, positive (or, with ``zero``, >= 0),
    or ConfigurationError naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        what = "a number of seconds >= 0" if zero else "a positive number of seconds"
        raise ConfigurationError(f"{name} must be {what}, got {value!r}")
    return float(value)


class _Config:
    """What both colours share: where the database is, the schema, the jobs."""

    def __init__(
        self,
        database_url: str | None,
        driver: str | None,
        schema: str,
        pool_size: int,
        connect_timeout: float,
        acquire_timeout: float,
        prepared_statements: bool = True,
    ) -> None:
        url = database_url if database_url is not None else os.environ.get("SONIQ_DATABASE_URL")
        if url is None:
            url = DEFAULT_SQLITE_URL
        if not isinstance(prepared_statements, bool):
            raise ConfigurationError(
                f"prepared_statements must be True or False, got {prepared_statements!r}"
            )
        #: False: no connection of Soniq's prepares statements (PgBouncer).
        self.prepared_statements = prepared_statements
        self._read(url, database_url, driver, schema, pool_size)
        self._callers: CallerConnections | None = None
        #: ``@eq.middleware``: around runs and enqueues, shared by ``eq`` and ``eq.sync``.
        self.middleware = MiddlewareChain()
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        self.acquire_timeout = _seconds("acquire_timeout", acquire_timeout)

    def _read(
        self,
        url: str,
        database_url: str | None,
        driver: str | None,
        schema: str,
        pool_size: int,
    ) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigurationError(f"pool_size must be an int >= 1, got {pool_size!r}")
        self.pool_size = pool_size
        #: The URL as messages and reprs may show it (no password).
        self.shown_url = redact_url(url)
        self.registry = Registry()
        self.kind, self.location = embedded_location(url)
        if self.kind != "postgres":
            if driver is not None:
                raise ConfigurationError(
                    f"driver={driver!r} applies to PostgreSQL; {self.shown_url!r} is {self.kind}"
                )
            if schema != "public":
                raise ConfigurationError(
                    f"schema={schema!r} applies to PostgreSQL; {self.shown_url!r} is {self.kind}, "
                    "whose tables are not in schemas (use another file instead)"
                )
            if not self.prepared_statements:
                raise ConfigurationError(
                    f"prepared_statements=False applies to PostgreSQL (behind PgBouncer); "
                    f"{self.shown_url!r} is {self.kind}"
                )
            if self.kind == "sqlite" and database_url is None:
                log.info("Soniq uses the SQLite database %s", self.location)
            self.schema = schema
            self.driver = self.kind
            return
        self.dsn, url_driver = split_postgres_url(url)
        if driver is not None and driver not in _ASYNC_DRIVERS:
            raise ConfigurationError(f"driver must be 'asyncpg' or 'psycopg', got {driver!r}")
        if driver and url_driver and url_driver not in (driver, "psycopg2"):
            raise ConfigurationError(
                f"driver={driver!r} contradicts the URL scheme (+{url_driver}); pass one"
            )
        self.driver = driver or (url_driver if url_driver in _ASYNC_DRIVERS else "asyncpg")
        try:
            quote_ident(schema)  # validates
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.schema = schema

    def driver_options(self) -> dict[str, Any]:
        """The settings of a PostgreSQL driver of Soniq's own pool."""
        return {
            "schema": self.schema,
            "max_size": self.pool_size,
            "connect_timeout": self.connect_timeout,
            "acquire_timeout": self.acquire_timeout,
            "prepared_statements": self.prepared_statements,
        }

    def callers(self) -> CallerConnections:
        """What runs statements on callers' connections (``connection=``); PostgreSQL
        only: elsewhere there is no caller's transaction to join (ValueError)."""
        if self.kind in EMBEDDED:
            raise ValueError(
                f"connection=: transactional enqueue needs PostgreSQL; the {self.kind} "
                "backend has no caller's transaction to join. Enqueue without "
                "connection=, or use a postgresql:// database_url"
            )
        if self._callers is None:
            from soniq.drivers.connections import CallerConnections

            self._callers = CallerConnections(self.dsn, self.driver_options())
        return self._callers


class Soniq:
    """A job queue on PostgreSQL, or on an embedded SQLite file or in memory.

    ``Soniq(database_url, driver=None, schema="public", pool_size=10)`` does no I/O:
    the pool opens on first use, bound to the running event loop (and re-created on
    another loop or after a fork). ``driver`` is ``"asyncpg"`` (default) or
    ``"psycopg"``; the URL scheme ``postgresql+asyncpg://`` / ``postgresql+psycopg://``
    says the same. ``sqlite:///path.db`` and ``memory://`` choose the embedded
    backends. ``Soniq()`` reads ``SONIQ_DATABASE_URL``, and without it uses the SQLite
    file ``soniq.db`` in the working directory (its absolute path is logged).

    On PostgreSQL, ``connect_timeout`` (seconds, default 5) bounds opening a
    connection, and ``acquire_timeout`` (default 10) waiting for one of the pool's;
    a call that needs the database fails past them with
    :class:`soniq.DatabaseUnavailable`, which names host, port and database. (psycopg
    rounds ``connect_timeout`` up to whole seconds, at least 2, per address of the
    host.) A connection passed as ``connection=`` is the caller's: Soniq sets no
    timeout on it.

    ``prepared_statements=False`` keeps every connection Soniq opens from preparing
    statements on the server (asyncpg's statement cache off, psycopg's
    ``prepare_threshold=None``), for PgBouncer in transaction pooling mode, where a
    statement prepared on one server connection is missing on the next (see
    docs/pgbouncer.md). PostgreSQL only.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        driver: str | None = None,
        schema: str = "public",
        pool_size: int = 10,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        prepared_statements: bool = True,
    ) -> None:
        self._adopt(
            _Config(
                database_url,
                driver,
                schema,
                pool_size,
                connect_timeout,
                acquire_timeout,
                prepared_statements,
            )
        )

    def __repr__(self) -> str:
        cfg = self._config
        return f"Soniq({cfg.shown_url!r}, driver={cfg.driver!r}, schema={cfg.schema!r})"

    def _adopt(self, config: _Config) -> None:
        self._config = config
        self.registry = config.registry
        #: The async driver of Soniq's own pool; ``eq.backend.acquire()`` borrows from it.
        if config.kind in EMBEDDED:
            self.backend: AsyncBackend = embedded_backend(config.location)
        else:
            self.backend = _postgres_async_driver(config)
        self._sync: SyncSoniq | None = None
        self._initialized = False
        self._waiters = EndWaiters(self.backend)

    @property
    def sync(self) -> SyncSoniq:
        """The blocking twin: same jobs, same names, no ``await`` (psycopg 3 pool)."""
        if self._sync is None:
            self._sync = SyncSoniq(self._config)
        return self._sync

    @overload
    def job(self, func: F, /) -> F: ...
    @overload
    def job(
        self,
        func: None = ...,
        /,
        *,
        name: str | None = ...,
        queue: str = ...,
        max_retries: int = ...,
        priority: int = ...,
        timeout: float | None = ...,
        backoff: Backoff = ...,
        concurrency: int | None = ...,
        concurrency_key: str | None = ...,
        rate_limit: str | None = ...,
        rate_key: str | None = ...,
    ) -> Callable[[F], F]: ...
    def job(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        max_retries: int = DEFAULT_MAX_RETRIES,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        concurrency: int | None = None,
        concurrency_key: str | None = None,
        rate_limit: str | None = None,
        rate_key: str | None = None,
    ) -> Any:
        """Register a job function: ``@eq.job`` or ``@eq.job(queue=..., ...)``.

        ``async def`` jobs run on the worker's event loop, plain functions in threads.
        The function is returned unchanged. Its name defaults to ``module.qualname``.
        ``max_retries=N`` allows N+1 runs; ``priority`` (higher first) and ``timeout``
        (seconds) are defaults that enqueue options override. ``backoff`` spaces
        retries (exponential with jitter; see :class:`soniq.Backoff`).

        Limits hold across all workers, enforced by the database's claim:
        ``concurrency=N`` runs at most N of this job at once, per value of the argument
        named by ``concurrency_key`` if given; ``rate_limit="10/s"`` (``/m``, ``/h``)
        starts at most that many in any such window, per value of ``rate_key`` if
        given. A job that must wait stays queued without holding up other jobs. See
        :mod:`soniq.core.flow` and docs/flow-control.md.
        """
        register: Callable[[F], F] = self._registrar(
            None,
            name=name,
            queue=queue,
            max_retries=max_retries,
            priority=priority,
            timeout=timeout,
            backoff=backoff,
            concurrency=concurrency,
            concurrency_key=concurrency_key,
            rate_limit=rate_limit,
            rate_key=rate_key,
        )
        return register(func) if func is not None else register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: dt.timedelta | float | None = None,
        timezone: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        catch_up: bool = True,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        max_retries: int = DEFAULT_MAX_RETRIES,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        concurrency: int | None = None,
        concurrency_key: str | None = None,
        rate_limit: str | None = None,
        rate_key: str | None = None,
    ) -> Callable[[F], F]:
        """Register a job (``name``, ``queue``, limits and the rest as :meth:`job`) that the
        workers enqueue on a schedule, with ``kwargs`` as its arguments:
        ``@eq.periodic(cron="*/5 * * * *", timezone="Europe/Paris")`` (five fields, read
        in ``timezone``, UTC by default) or ``@eq.periodic(every=timedelta(seconds=30))``
        (or seconds; ticks at multiples of it since the epoch).

        Every worker schedules (none with ``periodic=False``); each tick is enqueued
        once across them. Ticks missed while no worker ran are not replayed: the
        latest runs once as a catch-up, or not at all with ``catch_up=False``. A new
        schedule first runs at its next tick. Bad timing or arguments raise here, not
        at the first tick.
        """

        def schedule(definition: JobDefinition) -> Schedule:
            arguments = {} if kwargs is None else kwargs
            timing = {"cron": cron, "every": every, "timezone": timezone}
            return make_schedule(definition.name, arguments, **timing, catch_up=catch_up)

        register: Callable[[F], F] = self._registrar(
            schedule,
            name=name,
            queue=queue,
            max_retries=max_retries,
            priority=priority,
            timeout=timeout,
            backoff=backoff,
            concurrency=concurrency,
            concurrency_key=concurrency_key,
            rate_limit=rate_limit,
            rate_key=rate_key,
        )

        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping of the job's arguments, got {kwargs!r}")
        # Checked before any function is decorated, so a typo fails at the decorator.
        make_schedule("check", {}, cron=cron, every=every, timezone=timezone, catch_up=catch_up)
        return register

    def _registrar(
        self,
        schedule: Callable[[JobDefinition], Schedule] | None,
        *,
        name: str | None,
        queue: str,
        max_retries: int,
        priority: int,
        timeout: float | None,
        backoff: Backoff,
        concurrency: int | None,
        concurrency_key: str | None,
        rate_limit: str | None,
        rate_key: str | None,
    ) -> Callable[[F], F]:
        """The decorator of :meth:`job` and :meth:`periodic`: registers the function
        with its defaults, its limits and ``schedule``, and returns it unchanged."""
        limits = {
            "concurrency": concurrency,
            "concurrency_key": concurrency_key,
            "rate_limit": rate_limit,
            "rate_key": rate_key,
        }

        def register(f: F) -> F:
            self.registry.register(
                f,
                name=name,
                queue=queue,
                max_retries=max_retries,
                priority=priority,
                timeout=timeout,
                backoff=backoff,
                schedule=schedule,
                limits=limits,
            )
            return f

        return register

    @overload
    def middleware(self, func: M, /) -> M: ...
    @overload
    def middleware(
        self, func: None = ..., /, *, on: Literal["run", "enqueue"] = ...
    ) -> Callable[[M], M]: ...
    def middleware(self, func: M | None = None, /, *, on: Literal["run", "enqueue"] = "run") -> Any:
        """Register a middleware: ``@eq.middleware`` (around each run of a job) or
        ``@eq.middleware(on="enqueue")`` (around each enqueue call, ``eq.sync``'s too).

        ``func`` takes a :class:`soniq.RunContext` (or :class:`soniq.EnqueueContext`)
        and returns a context manager, sync or async: usually a generator function
        decorated with :func:`contextlib.contextmanager`. The first registered is the
        outermost. A run middleware sees the job's exception in its exit and cannot
        swallow it; an enqueue middleware may add ``ctx.headers``, stored with the
        jobs and given to their runs. Workers started after the registration use it.
        See :mod:`soniq.middleware` and docs/metrics.md. Returns ``func`` unchanged.
        """

        def register(f: M) -> M:
            self._config.middleware.add(f, on)
            return f

        return register(func) if func is not None else register

    async def ensure_initialized(self, *, migrate: bool = True) -> None:
        """Open the pool and apply pending migrations under an advisory lock.

        With ``migrate=False`` only check that the schema is current (for roles that
        may not run DDL). Cheap after the first success, so it can run per request.
        """
        if not self._initialized:
            await self.backend.migrate(apply=migrate)
            self._initialized = True

    async def enqueue(self, job: JobRef, /, *, connection: Any = None, **kwargs: Any) -> int:
        """Enqueue one job and return its id.

        ``job`` is a function registered with :meth:`job` or a job's name. Keyword
        options (``queue``, ``priority``, ``run_at``, ``delay``, ``max_retries``,
        ``dedupe_key``, ``timeout``) are read out; every other keyword is an argument.
        With ``connection=`` the job is inserted on that connection, inside its
        transaction: it exists if and only if that transaction commits.

        ``depends_on=[id, ...]``: the job waits (status ``waiting``) until every one of
        those jobs is done; if one fails or is cancelled, it is cancelled too (with
        ``on_parent_failure="run"`` it runs anyway). ``dedupe="replace"`` with a
        ``dedupe_key``: a job holding the key that has not started takes this call's
        arguments and options instead of keeping its own. See docs/workflows.md.
        """
        options = split_options(kwargs)
        spec = build_spec(self.registry, job, [kwargs], options)
        return (await self._insert(spec, connection))[0]

    async def enqueue_many(
        self,
        job: JobRef,
        args: Iterable[Mapping[str, Any]],
        /,
        *,
        connection: Any = None,
        **options: Any,
    ) -> list[int]:
        """Enqueue one job per mapping of ``args`` in one statement; ids in input order.

        Keyword ``options`` apply to every job (``connection`` as for :meth:`enqueue`).
        """
        batch = _as_batch(args)
        if not batch:
            return []
        spec = build_spec(self.registry, job, batch, _only_options(options))
        return await self._insert(spec, connection, "enqueue_many")

    async def enqueue_group(
        self,
        members: Iterable[tuple[JobRef, Mapping[str, Any]]],
        /,
        *,
        then: tuple[JobRef, Mapping[str, Any]] | None = None,
        connection: Any = None,
    ) -> list[int]:
        """Enqueue the ``members`` (``(job, arguments)`` pairs, run side by side) and,
        with ``then``, a job that runs once after all of them are done, with their
        results in ``current_job().parent_results``; in one statement (on
        ``connection``, inside its transaction, when given). Returns the members' ids
        in order, then ``then``'s. A member's mapping may hold enqueue options too."""
        nodes = build_graph(
            self.registry, members, chained=False, then=then, caller="enqueue_group"
        )
        return await self._insert_graph(nodes, connection, "enqueue_group")

    async def enqueue_chain(
        self,
        links: Iterable[tuple[JobRef, Mapping[str, Any]]],
        /,
        *,
        connection: Any = None,
    ) -> list[int]:
        """Enqueue ``(job, arguments)`` pairs that run one after the other: each once
        the one before is done (its result in ``current_job().parent_results``); a
        failure cancels the rest. One statement (on ``connection`` when given); ids in
        order."""
        nodes = build_graph(self.registry, links, chained=True, caller="enqueue_chain")
        return await self._insert_graph(nodes, connection, "enqueue_chain")

    async def wait_for(self, job_id: int, /, *, timeout: float | None = None) -> Any:
        """Wait until the job has ended and return its result (what it returned);
        raise :class:`soniq.JobFailed` if it failed, :class:`soniq.JobCancelled` if it
        was cancelled, ``TimeoutError`` if it has not ended within ``timeout`` seconds
        (None: no limit; the job is not touched), :class:`soniq.JobNotFound` if there
        is no such job. Woken by PostgreSQL's NOTIFY at the job's end (one listening
        connection for all the waiters of this Soniq), polling otherwise."""
        job = await self._waiters.wait(_check_job_id(job_id), _wait_timeout(timeout))
        return result_of(job)

    async def get_job(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        return await self.backend.get_job(job_id)

    async def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[Job]:
        """A page of jobs, newest first: of ``status``, ``queue`` and ``name`` (None:
        any), at most ``limit`` (1 to 1,000), with ids below ``before_id``. For the
        next page pass the last id of this one as ``before_id`` (keyset paging: a page
        costs the same however deep)."""
        return await self.backend.page_jobs(job_filter(status, queue, name, limit, before_id))

    async def purge_jobs(
        self,
        *,
        older_than: float | dt.timedelta,
        status: JobStatus | str | Sequence[JobStatus | str] | None = None,
    ) -> int:
        """Delete the finished jobs (``done``, ``failed``, ``cancelled``; or those of
        ``status``) that ended more than ``older_than`` (seconds or a timedelta) ago,
        in batches of 1,000 (never one huge DELETE); how many. Active jobs are never
        deleted (an active ``status`` is an error)."""
        seconds, statuses = purge_selection(older_than, status)
        total = 0
        while True:
            count = await self.backend.purge_jobs(seconds, statuses, PURGE_BATCH)
            total += count
            if count < PURGE_BATCH:
                return total

    async def check_backlog(self) -> list[BacklogProblem]:
        """The jobs waiting to run (``waiting``, ``queued``: scheduled and retrying
        ones too) that the jobs registered here would fail: an unknown name, a missing
        or unexpected argument; grouped by name and argument names, with how many and
        the oldest id. Empty when the code fits the backlog: run it (``soniq check
        module:eq``) before a deploy."""
        return backlog_problems(self.registry, await self.backend.backlog_shapes())

    async def list_workers(self) -> list[WorkerInfo]:
        """The registered workers, oldest first: host, pid, queues, slots, when each
        started, seconds since its last heartbeat, and the ids of the jobs it runs."""
        return await self.backend.list_workers()

    async def queue_stats(self) -> list[QueueStats]:
        """Every queue with jobs other than done ones, or with stored settings, by
        name: its jobs by status (queued and due, scheduled for later, running,
        waiting, failed, cancelled), seconds since its oldest ready job became due,
        whether it is paused, and its limits. Each count reads only the rows of its
        status, through an index of those rows alone, so done history, however long,
        costs nothing: done jobs are counted by :meth:`stats`."""
        return await self.backend.queue_stats()

    async def stats(self, *, minutes: int = 15, queue: str | None = None) -> Stats:
        """The jobs (of ``queue``; None: every queue) that ended over the last
        ``minutes`` minutes (1 to 1,440; the current minute included), per minute
        and by status (done, failed, cancelled), with the totals and the rate per
        second, by the database's clock. Computed from the jobs table (a range of its
        index of finished jobs): it costs the jobs of the window, not of the table.
        Jobs deleted at completion (``retention=0``) are not seen."""
        minutes = stats_minutes(minutes)
        if queue is not None:
            check_queue(queue)
        return await self.backend.stats(minutes, queue)

    async def retry_job(self, job_id: int) -> bool:
        """Put a ``failed`` or ``cancelled`` job back in line, due now, with all its
        attempts again (``attempts`` counts from 0; ``claims`` keeps counting its runs;
        its last error stays until it runs). Its children cancelled by its failure
        stay cancelled. False when it is not failed or cancelled (or does not exist),
        or when another active job holds its ``dedupe_key``."""
        return await self.backend.retry_job(_check_job_id(job_id))

    async def retry_failed(self, *, queue: str | None = None, name: str | None = None) -> int:
        """:meth:`retry_job` for every ``failed`` job of ``queue`` and ``name`` (None:
        any), oldest first, in batches of 1,000 (one per dedupe key); how many."""
        total, queue, name = 0, *_queue_and_name(queue, name)
        while True:
            # Until a batch puts none back: one may put back fewer than it read (a
            # second job of a dedupe key waits for the first) while more are left.
            count = await self.backend.retry_failed(queue, name, RETRY_BATCH)
            total += count
            if count == 0:
                return total

    async def cancel_job(self, job_id: int) -> bool:
        """Cancel a queued job (True), or request that a running one stop (True; its
        status turns ``cancelled`` when its worker acknowledges). False otherwise."""
        return await self.backend.cancel_job(job_id)

    async def pause_queue(self, queue: str) -> bool:
        """Pause ``queue`` for every worker: their next claim (within a poll interval)
        takes none of its jobs; running jobs finish; enqueues are still accepted. Stored
        in the database, so it holds across restarts until :meth:`resume_queue`. True
        when it was not paused already."""
        check_queue(queue)
        return await self.backend.pause_queue(queue)

    async def resume_queue(self, queue: str) -> bool:
        """Resume a paused ``queue``; its workers wake at once (NOTIFY, or in-process on
        SQLite). True when it was paused."""
        check_queue(queue)
        return await self.backend.resume_queue(queue)

    async def paused_queues(self) -> list[str]:
        """The paused queues, by name."""
        return await self.backend.paused_queues()

    async def set_queue_limits(
        self, queue: str, *, concurrency: int | None = None, rate_limit: str | None = None
    ) -> None:
        """Store the limits of ``queue``, obeyed by every worker from its next claim:
        at most ``concurrency`` of its jobs running at once, at most ``rate_limit``
        (``"100/m"``; ``/s``, ``/h``) started in any such window. The call sets both:
        None (the default) removes that limit, so ``set_queue_limits("mail")`` removes
        all. Jobs that must wait stay queued. See docs/flow-control.md."""
        check_queue(queue)
        await self.backend.set_queue_limits(queue, queue_limits(concurrency, rate_limit))

    async def queue_limits(self) -> dict[str, QueueLimits]:
        """The stored limits of every queue that has some, by queue name."""
        return await self.backend.queue_limits()

    async def run_worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        burst: bool = False,
        wait_for_database: float = 0,
        **settings: Any,
    ) -> None:
        """Run a worker in this event loop until the task is cancelled (or, with
        ``burst=True``, until no job is ready), then shut down gracefully and re-raise
        the cancellation. ``queues=None`` means every queue. Other ``settings`` are
        :class:`soniq.WorkerConfig` fields (``poll_interval``, ``listen``,
        ``stale_after``, ``shutdown_timeout``, ``retention``, ...). Installs no signal
        handler: the CLI does that.

        ``wait_for_database`` (seconds, default 0): when the database is unavailable
        at start, retry with back-off for up to that long, logging a WARNING per try,
        before raising :class:`soniq.DatabaseUnavailable` (``soniq worker`` waits 60 s
        by default; ``--wait-for-database``).
        """
        config = WorkerConfig(queues=queues, concurrency=concurrency, burst=burst, **settings)
        await self._initialize_waiting(wait_for_database)
        worker = Worker(
            backend=self.backend,
            registry=self.registry,
            config=config,
            middleware=self._config.middleware.run,
        )
        await worker.run()

    async def _initialize_waiting(self, wait: float) -> None:
        """:meth:`ensure_initialized`, retried with back-off (0.5 s doubling to 5 s)
        while the database is unavailable, for up to ``wait`` seconds."""
        wait = _seconds("wait_for_database", wait, zero=True)
        deadline = time.monotonic() + wait
        delay = 0.5
        while True:
            try:
                await self.ensure_initialized()
                return
            except DatabaseUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait:
                        raise DatabaseUnavailable(
                            f"{exc} (gave up after waiting {wait:g} s)",
                            host=exc.host,
                            port=exc.port,
                            database=exc.database,
                        ) from exc
                    raise
                pause = min(delay, left)
                log.warning("%s; retrying in %.1f s (giving up in %.1f s)", exc, pause, left)
                await asyncio.sleep(pause)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        """Close Soniq's pools (the async one, and the sync twin's if it was used)."""
        await self._waiters.close()
        await self.backend.close()
        if self._sync is not None:
            self._sync.close()

    async def _insert(
        self, spec: JobSpec, connection: Any, operation: str = "enqueue"
    ) -> list[int]:
        """Insert the jobs of one ``operation`` (enqueue, enqueue_many), inside the
        enqueue middleware if there are any."""
        chain = self._config.middleware
        if not chain.enqueue:
            return await self._insert_plain(spec, connection)
        ctx = chain.enqueue_context(operation, (spec,), connection)
        return await chain.around_enqueue(
            ctx, lambda headers: self._insert_plain(with_headers(spec, headers), connection)
        )

    async def _insert_plain(self, spec: JobSpec, connection: Any) -> list[int]:
        if connection is None:
            return await self.backend.insert_jobs(spec)
        return await self._config.callers().insert_jobs(spec, connection)

    async def _insert_graph(
        self, nodes: list[JobNode], connection: Any, operation: str
    ) -> list[int]:
        """:meth:`_insert` of jobs that wait for others (enqueue_group, _chain)."""
        chain = self._config.middleware
        if not chain.enqueue:
            return await self._insert_graph_plain(nodes, connection)
        ctx = chain.enqueue_context(operation, [n.spec for n in nodes], connection)
        return await chain.around_enqueue(
            ctx,
            lambda headers: self._insert_graph_plain(
                nodes_with_headers(nodes, headers), connection
            ),
        )

    async def _insert_graph_plain(self, nodes: list[JobNode], connection: Any) -> list[int]:
        if connection is None:
            return await self.backend.insert_graph(nodes)
        return await self._config.callers().insert_graph(nodes, connection)


class SyncSoniq:
    """The blocking twin of :class:`Soniq`, reached as ``eq.sync``: same jobs, same
    method names, for Django, Flask and scripts. Uses psycopg 3 and its own pool;
    ``connection=`` also takes psycopg2 connections, SQLAlchemy ``Session`` and
    Django's connection."""

    def __init__(self, config: _Config) -> None:
        self._config = config
        self.registry = config.registry
        #: The sync driver of the twin's own pool; ``eq.sync.backend.acquire()``.
        self.backend: SyncBackend
        if config.kind in EMBEDDED:
            self.backend = embedded_sync_backend(config.location)
        else:
            from soniq.drivers.psycopg_sync import PsycopgSyncDriver

            self.backend = PsycopgSyncDriver(config.dsn, **config.driver_options())
        self._initialized = False
        # wait_for's waiters share one loop on a thread of its own (see LoopThread).
        self._wait_loop = LoopThread(self.async_twin)

    def __repr__(self) -> str:
        cfg = self._config
        return f"SyncSoniq({cfg.shown_url!r}, schema={cfg.schema!r})"

    def ensure_initialized(self, *, migrate: bool = True) -> None:
        """Blocking :meth:`Soniq.ensure_initialized`."""
        if not self._initialized:
            self.backend.migrate(apply=migrate)
            self._initialized = True

    def enqueue(self, job: JobRef, /, *, connection: Any = None, **kwargs: Any) -> int:
        """Blocking :meth:`Soniq.enqueue`."""
        options = split_options(kwargs)
        spec = build_spec(self.registry, job, [kwargs], options)
        return self._insert(spec, connection)[0]

    def enqueue_many(
        self,
        job: JobRef,
        args: Iterable[Mapping[str, Any]],
        /,
        *,
        connection: Any = None,
        **options: Any,
    ) -> list[int]:
        """Blocking :meth:`Soniq.enqueue_many`."""
        batch = _as_batch(args)
        if not batch:
            return []
        spec = build_spec(self.registry, job, batch, _only_options(options))
        return self._insert(spec, connection, "enqueue_many")

    def enqueue_group(
        self,
        members: Iterable[tuple[JobRef, Mapping[str, Any]]],
        /,
        *,
        then: tuple[JobRef, Mapping[str, Any]] | None = None,
        connection: Any = None,
    ) -> list[int]:
        """Blocking :meth:`Soniq.enqueue_group`."""
        nodes = build_graph(
            self.registry, members, chained=False, then=then, caller="enqueue_group"
        )
        return self._insert_graph(nodes, connection, "enqueue_group")

    def enqueue_chain(
        self,
        links: Iterable[tuple[JobRef, Mapping[str, Any]]],
        /,
        *,
        connection: Any = None,
    ) -> list[int]:
        """Blocking :meth:`Soniq.enqueue_chain`."""
        nodes = build_graph(self.registry, links, chained=True, caller="enqueue_chain")
        return self._insert_graph(nodes, connection, "enqueue_chain")

    def wait_for(self, job_id: int, /, *, timeout: float | None = None) -> Any:
        """Blocking :meth:`Soniq.wait_for`: the waiters of all threads share one loop
        (on a thread of its own) and one listening connection."""
        job_id, timeout = _check_job_id(job_id), _wait_timeout(timeout)
        return self._wait_loop.run(lambda app: app.wait_for(job_id, timeout=timeout))

    def get_job(self, job_id: int) -> Job | None:
        """Blocking :meth:`Soniq.get_job`."""
        return self.backend.get_job(job_id)

    def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[Job]:
        """Blocking :meth:`Soniq.list_jobs`."""
        return self.backend.page_jobs(job_filter(status, queue, name, limit, before_id))

    def purge_jobs(
        self,
        *,
        older_than: float | dt.timedelta,
        status: JobStatus | str | Sequence[JobStatus | str] | None = None,
    ) -> int:
        """Blocking :meth:`Soniq.purge_jobs`."""
        seconds, statuses = purge_selection(older_than, status)
        total = 0
        while True:
            count = self.backend.purge_jobs(seconds, statuses, PURGE_BATCH)
            total += count
            if count < PURGE_BATCH:
                return total

    def check_backlog(self) -> list[BacklogProblem]:
        """Blocking :meth:`Soniq.check_backlog`."""
        return backlog_problems(self.registry, self.backend.backlog_shapes())

    def list_workers(self) -> list[WorkerInfo]:
        """Blocking :meth:`Soniq.list_workers`."""
        return self.backend.list_workers()

    def queue_stats(self) -> list[QueueStats]:
        """Blocking :meth:`Soniq.queue_stats`."""
        return self.backend.queue_stats()

    def stats(self, *, minutes: int = 15, queue: str | None = None) -> Stats:
        """Blocking :meth:`Soniq.stats`."""
        minutes = stats_minutes(minutes)
        if queue is not None:
            check_queue(queue)
        return self.backend.stats(minutes, queue)

    def retry_job(self, job_id: int) -> bool:
        """Blocking :meth:`Soniq.retry_job`."""
        return self.backend.retry_job(_check_job_id(job_id))

    def retry_failed(self, *, queue: str | None = None, name: str | None = None) -> int:
        """Blocking :meth:`Soniq.retry_failed`."""
        total, queue, name = 0, *_queue_and_name(queue, name)
        while True:
            count = self.backend.retry_failed(queue, name, RETRY_BATCH)
            total += count
            if count == 0:
                return total

    def cancel_job(self, job_id: int) -> bool:
        """Blocking :meth:`Soniq.cancel_job`."""
        return self.backend.cancel_job(job_id)

    def pause_queue(self, queue: str) -> bool:
        """Blocking :meth:`Soniq.pause_queue`."""
        check_queue(queue)
        return self.backend.pause_queue(queue)

    def resume_queue(self, queue: str) -> bool:
        """Blocking :meth:`Soniq.resume_queue`."""
        check_queue(queue)
        return self.backend.resume_queue(queue)

    def paused_queues(self) -> list[str]:
        """Blocking :meth:`Soniq.paused_queues`."""
        return self.backend.paused_queues()

    def set_queue_limits(
        self, queue: str, *, concurrency: int | None = None, rate_limit: str | None = None
    ) -> None:
        """Blocking :meth:`Soniq.set_queue_limits`."""
        check_queue(queue)
        self.backend.set_queue_limits(queue, queue_limits(concurrency, rate_limit))

    def queue_limits(self) -> dict[str, QueueLimits]:
        """Blocking :meth:`Soniq.queue_limits`."""
        return self.backend.queue_limits()

    def run_worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        burst: bool = False,
        wait_for_database: float = 0,
        **settings: Any,
    ) -> None:
        """Blocking :meth:`Soniq.run_worker`: runs the same asyncio worker with
        ``asyncio.run`` (async jobs on its loop, sync jobs in threads)."""
        app = self.async_twin()

        async def run() -> None:
            try:
                await app.run_worker(
                    queues=queues,
                    concurrency=concurrency,
                    burst=burst,
                    wait_for_database=wait_for_database,
                    **settings,
                )
            finally:
                await app.close()

        asyncio.run(run())

    def async_twin(self) -> Soniq:
        """A new :class:`Soniq` on this one's configuration: the same jobs and the same
        database, with pools of its own (bound to the loop that first uses them), for
        async work started from blocking code (``run_worker``, ``soniq.testing``'s
        ``drain``). Close it when done."""
        app = Soniq.__new__(Soniq)
        app._adopt(self._config)
        return app

    def close(self) -> None:
        """Close the twin's pool (and the waiting loop's, if it was used)."""
        self._wait_loop.close(lambda app: app.close())
        self.backend.close()

    def _insert(self, spec: JobSpec, connection: Any, operation: str = "enqueue") -> list[int]:
        """Blocking :meth:`Soniq._insert`."""
        chain = self._config.middleware
        if not chain.enqueue:
            return self._insert_plain(spec, connection)
        ctx = chain.enqueue_context(operation, (spec,), connection)
        return chain.around_enqueue_sync(
            ctx, lambda headers: self._insert_plain(with_headers(spec, headers), connection)
        )

    def _insert_plain(self, spec: JobSpec, connection: Any) -> list[int]:
        if connection is None:
            return self.backend.insert_jobs(spec)
        return self._config.callers().insert_jobs_sync(spec, connection)

    def _insert_graph(self, nodes: list[JobNode], connection: Any, operation: str) -> list[int]:
        """Blocking :meth:`Soniq._insert_graph`."""
        chain = self._config.middleware
        if not chain.enqueue:
            return self._insert_graph_plain(nodes, connection)
        ctx = chain.enqueue_context(operation, [n.spec for n in nodes], connection)
        return chain.around_enqueue_sync(
            ctx,
            lambda headers: self._insert_graph_plain(
                nodes_with_headers(nodes, headers), connection
            ),
        )

    def _insert_graph_plain(self, nodes: list[JobNode], connection: Any) -> list[int]:
        if connection is None:
            return self.backend.insert_graph(nodes)
        return self._config.callers().insert_graph_sync(nodes, connection)


def _check_job_id(job_id: object) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"job_id must be an int (an id from enqueue), got {job_id!r}")
    return job_id


def _queue_and_name(queue: str | None, name: str | None) -> tuple[str | None, str | None]:
    selection = job_filter(queue=queue, name=name)
    return selection.queue, selection.name


def _wait_timeout(timeout: object) -> float | None:
    return None if timeout is None else _seconds("timeout", timeout, zero=True)


def _as_batch(args: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(args, (Mapping, str, bytes)):
        raise TypeError(
            "enqueue_many takes a list of argument mappings, one per job, e.g. "
            "[{'order_id': 1}, {'order_id': 2}]"
        )
    batch = []
    for index, item in enumerate(args):
        if not isinstance(item, Mapping):
            raise TypeError(
                f"enqueue_many: the job at index {index} is {type(item).__name__}, "
                "expected a mapping of argument names to values"
            )
        batch.append(item if type(item) is dict else dict(item))
    return batch


def _only_options(options: dict[str, Any]) -> dict[str, Any]:
    rest = dict(options)
    found = split_options(rest)
    if rest:
        raise TypeError(
            f"enqueue_many: {', '.join(sorted(rest))} is not an option; job arguments go "
            "in the list of mappings"
        )
    return found
