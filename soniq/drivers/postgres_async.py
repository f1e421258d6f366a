"""The job operations on PostgreSQL, shared by the asyncpg and psycopg drivers.

Each operation renders its statement with ``soniq.core`` and runs it with the
driver's ``fetch`` (Soniq's pool) or ``fetch_on`` (a caller's connection). This file
is the source of ``postgres_sync.py`` (``tools/unasync.py``).
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from soniq.core import serialize
from soniq.core.admin import (
    BacklogShape,
    JobFilter,
    QueueStats,
    Stats,
    WorkerInfo,
    backlog_shapes_from_rows,
    queue_stats_from_rows,
    stats_from_rows,
)
from soniq.core.flow import ClaimLimits, QueueLimits, queue_limits_by_name
from soniq.core.jobs import Claimed, Job, JobNode, JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.sql.migrate import MigrationPlan
from soniq.core.sql.postgres import (
    ParamStyle,
    PostgresQueries,
    Query,
    claimed_rows,
    group_ids,
    ids_in_input_order,
    job_from_row,
    parent_results,
    worker_from_row,
)
from soniq.core.states import JobStatus
from soniq.drivers._common import Target, async_only, async_owner, redact_url
from soniq.drivers.insert_lines import AsyncInsertLine
from soniq.drivers.postgres_maintenance import PostgresMaintenance

#: How many times an enqueue with ``dedupe="replace"`` runs its statement at most.
REPLACE_TRIES = 5
#: How many times an enqueue that locks parents runs when PostgreSQL picks it as a
#: deadlock's victim (SQLSTATE 40P01: a completion of some of those parents held
#: others).
DEADLOCK_TRIES, DEADLOCK = 3, "40P01"


class PostgresAsyncOps:
    """The base of a PostgreSQL driver: its settings, and the operations, which run
    on the driver's ``fetch`` (Soniq's pool) and ``fetch_on`` (a caller's
    connection). The pool itself (``_pool``, bound to ``_owner``) is the driver's."""

    #: The placeholders of the driver's statements (see ``PostgresQueries``).
    paramstyle: ParamStyle
    #: Enqueue accepts ``connection=`` (transactional enqueue).
    accepts_connections = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        max_size: int,
        connect_timeout: float,
        acquire_timeout: float,
        min_size: int = 1,
        prepared_statements: bool = True,
    ) -> None:
        self.dsn = dsn
        #: False: connections prepare no statement on the server (PgBouncer in
        #: transaction pooling mode; see ``Soniq(prepared_statements=)``).
        self.prepared_statements = prepared_statements
        #: Host, port, database and timeouts, for errors (see :class:`Target`).
        self.target = Target(dsn, connect_timeout=connect_timeout, acquire_timeout=acquire_timeout)
        self.queries = PostgresQueries(schema, self.paramstyle)
        self.migrations = MigrationPlan(schema)
        self._min_size = min_size
        self._max_size = max_size  # also the most merged enqueues in flight
        self._pool: Any = None  # the driver's pool, opened on first use
        self._owner: object = None
        self._line: tuple[object, AsyncInsertLine] | None = None
        self._line_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.dsn)!r}, schema={self.queries.schema!r})"

    async def close(self) -> None:
        """Close the driver's pool. One opened on another event loop (a test
        fixture's, an app's earlier lifespan) or before a fork is not this loop's or
        process's to close: its connections cannot be awaited from here, and a child
        closing them would end its parent's sessions. It is left to its owner
        (:meth:`_abandon`)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._owner != async_owner():
            self._abandon(pool)
            return
        await pool.close()

    def _abandon(self, pool: Any) -> None:
        """A pool :meth:`close` leaves to its owner: nothing to do, unless the driver
        must cut its connections."""

    @async_only
    def maintenance(self) -> PostgresMaintenance:
        """A blocking session of its own for the worker's heartbeat thread."""
        return PostgresMaintenance(
            self.dsn, self.queries.schema, self.target, prepared=self.prepared_statements
        )

    @property
    @async_only
    def one_writer(self) -> bool:
        """False: the server runs a worker's claims side by side."""
        return False

    async def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        raise NotImplementedError

    async def fetch_on(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        raise NotImplementedError

    async def insert_jobs(self, spec: JobSpec, conn: Any = None) -> list[int]:
        """Insert the jobs of one enqueue call (on ``conn`` if given); ids in order.
        One job on Soniq's own pool goes through the enqueue line, merged with the
        enqueues of this process that are waiting (:mod:`soniq.drivers.insert_lines`)."""
        if conn is None and len(spec.args) == 1 and spec.is_plain:
            return [await self.insert_line().insert(spec)]
        query = self.queries.insert_jobs(spec)
        for _ in range(REPLACE_TRIES):
            rows = await (
                self._fetch_parents(query) if conn is None else self.fetch_on(conn, query)
            )
            if rows or not spec.replace:  # (a replace returns no row: again, see there)
                return ids_in_input_order(rows)
        raise RuntimeError(
            f"dedupe='replace': the holder of {spec.dedupe_key!r} changed {REPLACE_TRIES} "
            "times while enqueueing; try again"
        )

    async def insert_graph(self, nodes: Sequence[JobNode], conn: Any = None) -> list[int]:
        """Insert jobs that wait for one another (on ``conn`` if given); ids in order."""
        query = self.queries.insert_graph(nodes)
        rows = await (self._fetch_parents(query) if conn is None else self.fetch_on(conn, query))
        return ids_in_input_order(rows)

    async def _fetch_parents(self, query: Query) -> Sequence[Sequence[Any]]:
        """:meth:`fetch` of a statement that may lock jobs that are ending (a child's
        parents), run again when PostgreSQL broke a deadlock by cancelling it (it did
        nothing then). On a caller's connection its transaction is lost: it is the
        caller's to run again, as with any deadlock."""
        for attempt in range(1, DEADLOCK_TRIES + 1):
            try:
                return await self.fetch(query)
            except Exception as exc:
                if getattr(exc, "sqlstate", None) != DEADLOCK or attempt == DEADLOCK_TRIES:
                    raise
        raise AssertionError("unreachable")

    async def page_jobs(self, selection: JobFilter) -> list[Job]:
        """A page of jobs, newest first (see :class:`soniq.core.admin.JobFilter`)."""
        return [job_from_row(row) for row in await self.fetch(self.queries.page_jobs(selection))]

    async def retry_job(self, job_id: int) -> bool:
        """Put a failed or cancelled job back in line; False when it was not one (or
        another active job holds its dedupe key)."""
        return bool(await self.fetch(self.queries.retry_job(job_id)))

    async def retry_failed(self, queue: str | None, name: str | None, limit: int) -> int:
        """Put up to ``limit`` failed jobs back in line; how many."""
        return len(await self.fetch(self.queries.retry_failed(queue, name, limit)))

    async def backlog_shapes(self) -> list[BacklogShape]:
        """The jobs waiting to run, grouped by name and argument names."""
        rows = await self.fetch(self.queries.backlog_shapes())
        return backlog_shapes_from_rows(rows)

    async def list_workers(self) -> list[WorkerInfo]:
        """The registered workers, oldest first, each with the jobs it runs."""
        return [worker_from_row(row) for row in await self.fetch(self.queries.list_workers())]

    async def queue_stats(self) -> list[QueueStats]:
        """Each queue's counts by status and settings, by name."""
        return queue_stats_from_rows(await self.fetch(self.queries.queue_stats()))

    async def stats(self, minutes: int, queue: str | None) -> Stats:
        """The jobs ended per minute over the last ``minutes`` minutes."""
        [(now, rows)] = await self.fetch(self.queries.stats(minutes, queue))
        return stats_from_rows(now, minutes, serialize.loads(rows))

    async def purge_jobs(self, older_than: float, statuses: Sequence[JobStatus], limit: int) -> int:
        """Delete up to ``limit`` jobs of ``statuses`` (finished) that ended more than
        ``older_than`` seconds ago; how many."""
        query = self.queries.prune_finished(older_than, limit, statuses)
        return len(await self.fetch(query))

    async def mark_awaited(self, job_id: int) -> bool:
        """Mark an active job as awaited: its end is then told on the done channel
        (see :meth:`listen`); False when it is not active (finished, or unknown)."""
        return bool(await self.fetch(self.queries.mark_awaited(job_id)))

    async def set_progress(
        self, job_id: int, claims: int, progress: float, message: str | None
    ) -> None:
        """Store the progress run ``claims`` of a job reported."""
        await self.fetch(self.queries.set_progress(job_id, claims, progress, message))

    def insert_line(self) -> AsyncInsertLine:
        """The line of enqueues on Soniq's pool: one per event loop (per process in
        blocking code), like the pool."""
        owner = async_owner()
        bound = self._line  # (owner, line), read as one: loops in several threads
        if bound is not None and bound[0] == owner:
            return bound[1]
        with self._line_lock:  # two threads must not make two lines
            bound = self._line
            if bound is None or bound[0] != owner:
                line = AsyncInsertLine(self._insert_alone, self._insert_group, self._max_size)
                bound = self._line = (owner, line)
            return bound[1]

    async def _insert_alone(self, spec: JobSpec) -> int:
        return ids_in_input_order(await self.fetch(self.queries.insert_jobs(spec)))[0]

    async def _insert_group(self, specs: Sequence[JobSpec]) -> list[int]:
        return group_ids(specs, await self.fetch(self.queries.insert_group(specs)))

    async def get_job(self, job_id: int) -> Job | None:
        rows = await self.fetch(self.queries.get_job(job_id))
        return job_from_row(rows[0]) if rows else None

    async def list_jobs(self, name: str | None, queue: str | None, conn: Any = None) -> list[Job]:
        """Queued jobs, optionally of one name and/or queue, by id; on ``conn`` if given
        (it then sees the jobs of that connection's uncommitted transaction)."""
        query = self.queries.list_jobs(name, queue)
        rows = await (self.fetch(query) if conn is None else self.fetch_on(conn, query))
        return [job_from_row(row) for row in rows]

    async def cancel_job(self, job_id: int) -> bool:
        return bool(await self.fetch(self.queries.cancel_job(job_id)))

    async def pause_queue(self, queue: str) -> bool:
        return bool(await self.fetch(self.queries.pause_queue(queue)))

    async def resume_queue(self, queue: str) -> bool:
        return bool(await self.fetch(self.queries.resume_queue(queue)))

    async def paused_queues(self) -> list[str]:
        return [row[0] for row in await self.fetch(self.queries.paused_queues())]

    async def set_queue_limits(self, queue: str, limits: QueueLimits) -> None:
        await self.fetch(self.queries.set_queue_limits(queue, limits))

    async def queue_limits(self) -> dict[str, QueueLimits]:
        return queue_limits_by_name(await self.fetch(self.queries.queue_limits()))

    @async_only
    async def claim_jobs(
        self,
        limit: int,
        worker_id: str,
        queues: Sequence[str] | None,
        names: Sequence[str] | None = None,
        limits: ClaimLimits | None = None,
    ) -> list[Claimed]:
        return await _claim(self.fetch, self.queries, limit, worker_id, queues, names, limits)

    @async_only
    async def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        await self.fetch(self.queries.finish_jobs(outcomes, worker_id, keep=keep))

    @async_only
    async def next_due(self, queues: Sequence[str] | None, names: Sequence[str]) -> float | None:
        rows = await self.fetch(self.queries.next_due(queues, names))
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    @async_only
    async def last_ticks(self, keys: Sequence[str]) -> dict[str, dt.datetime]:
        return {key: tick for key, tick in await self.fetch(self.queries.last_ticks(keys))}

    @async_only
    async def enqueue_tick(
        self, key: str, tick: dt.datetime, spec: JobSpec, *, enqueue: bool
    ) -> int | None:
        rows = await self.fetch(self.queries.enqueue_tick(key, tick, spec, enqueue=enqueue))
        return int(rows[0][0]) if rows else None

    @async_only
    @asynccontextmanager
    async def worker_session(self) -> AsyncIterator[PinnedWorkerOps]:
        """Claims or completions on a connection of their own, held throughout (not
        one of the pool's: a worker's loops must not starve a small pool). Left with
        an error (a statement failed, or went unanswered and was aborted), the
        connection is abandoned (:meth:`abort_own`), not closed politely: a goodbye
        on a silent link could wait too."""
        async with self.connect() as conn:
            ops = PinnedWorkerOps(self, conn)
            try:
                yield ops
            except BaseException:
                ops.abort()
                raise

    @async_only
    def connect(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    @async_only
    def abort_own(self, conn: Any) -> None:
        """Abandon a connection of :meth:`connect` at once, from the thread that runs
        its statements, without a word to the server and without waiting: a
        statement waiting on it fails as on a lost connection. Closing it is left to
        its owner."""
        raise NotImplementedError

    @async_only
    async def fetch_own(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        """Run ``query`` on a connection from :meth:`connect` (the driver's own errors
        come through, so a lost connection reads as one)."""
        raise NotImplementedError

    @async_only
    async def register_worker(self, worker: WorkerIdentity) -> None:
        await self.fetch(self.queries.register_worker(worker))

    @async_only
    async def unregister_worker(self, worker_id: str) -> None:
        await self.fetch(self.queries.unregister_worker(worker_id))

    @async_only
    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        return len(await self.fetch(self.queries.reconcile(worker_id, held)))


@async_only
class PinnedWorkerOps:
    """A worker loop's claims and completions on one connection."""

    def __init__(self, ops: PostgresAsyncOps, conn: Any) -> None:
        self._ops = ops
        self._conn = conn
        self._order = ClaimOrder()

    async def claim_jobs(
        self,
        limit: int,
        worker_id: str,
        queues: Sequence[str] | None,
        names: Sequence[str] | None = None,
        limits: ClaimLimits | None = None,
    ) -> list[Claimed]:
        fetch = functools.partial(self._ops.fetch_own, self._conn)
        queries = self._ops.queries
        return await _claim(fetch, queries, limit, worker_id, queues, names, limits, self._order)

    async def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> None:
        query = self._ops.queries.finish_jobs(outcomes, worker_id, keep=keep)
        await self._ops.fetch_own(self._conn, query)

    async def reconcile(self, worker_id: str, held: Sequence[int]) -> int:
        """:meth:`PostgresAsyncOps.reconcile` on this session's connection."""
        query = self._ops.queries.reconcile(worker_id, held)
        return len(await self._ops.fetch_own(self._conn, query))

    def abort(self) -> None:
        """Abandon the connection now: a statement waiting on it fails at once as on a
        lost connection (the worker's ``command_timeout`` calls this). The session is
        unusable afterwards."""
        self._ops.abort_own(self._conn)


@async_only
class ClaimOrder:
    """Which of a worker's two claims (jobs under limits, the others) goes first.
    Each one's index walk steps over the other's queued jobs, so the one that last
    found jobs while the other found none goes first, and the other takes the slots
    it left. When it left none :attr:`FAIR_TURNS` times in a row, the other goes
    first once, looking near the head of the line only, so that a backlog of one kind
    cannot keep every slot from a job of the other ahead of it."""

    #: Claims in a row that the first claim may fill alone before the other goes first.
    FAIR_TURNS = 16
    #: How far down the line a claim given a turn for fairness looks, per free slot.
    FAIR_SCAN_PER_SLOT = 10
    #: Rounds of one limited claim at most: a group filled by one round is stepped
    #: over by the next.
    LIMITED_ROUNDS = 8
    #: Plain claims in a row that fill every slot without asking whether queues have
    #: stored limits (see :meth:`asks_queue_limits`).
    UNASKED_RUN = 15

    def __init__(self) -> None:
        self.limited_first = False
        self.filled_alone = 0
        self.turn_pending = False
        #: Whether the last claim that asked saw queues with stored limits (then the
        #: limited claim also counts its queue's limits; without, it leaves those
        #: jobs, which no plain claim takes).
        self.queue_limits = False
        self.last_full = False
        self.unasked = 0

    def asks_queue_limits(self) -> bool:
        """Whether the next plain claim asks whether queues have stored limits (a
        row more; the question costs a drain about 4%). Not while claims fill every
        slot: the answer matters when a claim comes back short (then the limited claim
        may have jobs), and a short claim that did not ask is asked again at once. A
        claim in :attr:`UNASKED_RUN` does ask: queues limited meanwhile get their turn
        for fairness."""
        return self.queue_limits or not self.last_full or self.unasked >= self.UNASKED_RUN


@async_only
async def _claim(
    fetch: Callable[[Query], Awaitable[Sequence[Sequence[Any]]]],
    queries: PostgresQueries,
    limit: int,
    worker_id: str,
    queues: Sequence[str] | None,
    names: Sequence[str] | None,
    limits: ClaimLimits | None,
    order: ClaimOrder | None = None,
) -> list[Claimed]:
    """A claim; told of ``limits`` (a worker's), the jobs under limits are claimed by
    their own statement (when there are such jobs), and the rest by the plain claim,
    in the order ``order`` keeps (a new one: the plain claim first)."""
    if limits is None:
        return _claimed(await fetch(queries.claim_jobs(limit, worker_id, queues, names)))
    order = order or ClaimOrder()
    # With only limited names the plain claim has nothing to find.
    plain_too = names is None or not limits.names.issuperset(names)
    limited_first = order.limited_first or not plain_too
    # Turns for fairness, between two kinds of job only.
    both = plain_too and names is not None and bool(limits.jobs or order.queue_limits)
    fairness_turn = both and order.turn_pending
    if fairness_turn:
        limited_first, order.turn_pending = not limited_first, False
    # A turn given for fairness looks near the head of the line only: a job waiting
    # ahead of the other kind's backlog in claim order is there.
    scan_per_slot = order.FAIR_SCAN_PER_SLOT if fairness_turn else None

    async def plain(n: int) -> list[Claimed]:
        scan = None if scan_per_slot is None else n * scan_per_slot
        asks = order.asks_queue_limits()
        query = queries.claim_jobs(
            n, worker_id, queues, names, limits, scan=scan, ask_queue_limits=asks
        )
        rows = await fetch(query)
        if asks:
            rows, order.queue_limits = claimed_rows(rows)
        elif len(rows) < n:  # short, not asked: the rest may be in limited queues
            query = queries.claim_jobs(n - len(rows), worker_id, queues, names, limits, scan=scan)
            more, order.queue_limits = claimed_rows(await fetch(query))
            rows, asks = [*rows, *more], True
        order.last_full, order.unasked = len(rows) == n, 0 if asks else order.unasked + 1
        return _claimed(rows)

    async def limited(n: int) -> list[Claimed]:
        """Again while a round takes some but not all it may (its candidates are the
        first jobs in line, and one group's can fill them while one may start), or
        when it learns that queues have stored limits, which it then counts."""
        claimed: list[Claimed] = []
        scan = None if scan_per_slot is None else n * scan_per_slot
        for _ in range(order.LIMITED_ROUNDS):
            counted = order.queue_limits
            if names is None or not (counted or limits.jobs):
                break
            query = queries.claim_limited(
                n - len(claimed), worker_id, queues, names, limits, queue_limits=counted, scan=scan
            )
            rows, order.queue_limits = claimed_rows(await fetch(query))
            more = _claimed(rows, limited=True)
            claimed += more
            if len(claimed) == n or not (more or order.queue_limits != counted):
                break
        return claimed

    first, second = (limited, plain if plain_too else None) if limited_first else (plain, limited)
    claimed = await first(limit)
    if second is None or (fairness_turn and len(claimed) == limit):
        return claimed
    if len(claimed) == limit:
        if both:
            order.filled_alone += 1
            if order.filled_alone >= order.FAIR_TURNS:  # the other kind's turn first
                order.turn_pending, order.filled_alone = True, 0
        return claimed
    order.filled_alone = 0
    more = await second(limit - len(claimed))
    if more and not claimed and not fairness_turn:  # the one that finds jobs goes first
        order.limited_first = not limited_first
    return claimed + more


@async_only
def _claimed(rows: Sequence[Sequence[Any]], *, limited: bool = False) -> list[Claimed]:
    args = serialize.loads_each([r[3] for r in rows])
    return [
        Claimed(
            r[0],
            r[1],
            r[2],
            a,
            r[4],
            r[5],
            r[6],
            r[8],
            limited,
            parent_results(r[9]),
            serialize.loads(r[10]),
        )
        for r, a in zip(rows, args, strict=True)
    ]
