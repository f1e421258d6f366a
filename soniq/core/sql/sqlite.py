"""SQLite statements and the operations built from them (sans-IO).

Each operation is a generator of :class:`Step` objects: a driver executes each step on
its connection and sends back a :class:`Result` (rows and row count); the generator's
return value is the operation's result. :class:`Operation` says whether the steps must
run inside ``BEGIN IMMEDIATE`` (every operation that writes more than one statement or
reads before it writes: it takes SQLite's single write lock up front, so a
read-modify-write such as a claim can neither interleave with another writer nor fail
half-way on a lock upgrade). The enqueue of one job without a dedupe key says it needs
no ``BEGIN``: its one ``INSERT`` runs alone, in autocommit, where SQLite makes it a
transaction of its own and takes the write lock as its first act, which is as safe
and spares two statements. (Single-statement writes of other kinds keep ``BEGIN
IMMEDIATE``: they are not on a hot path.) The driver is a loop; which statements run,
in what order and what they mean is decided here.

Portability. The SQLite that Python links varies by platform: 3.40 here, but RHEL 9
and derivatives ship 3.34, which has no ``RETURNING`` (3.35) and no
``UPDATE ... FROM`` before 3.33. Every operation already runs in one transaction that
holds the write lock, where ``SELECT`` then ``UPDATE`` is as atomic as
``UPDATE ... RETURNING`` and costs no network round trip, so the statements use only
partial indexes (3.8) and ``INSERT OR IGNORE``. Neither ``ON CONFLICT`` upserts, nor
``RETURNING``, nor the JSON functions are needed.

Times are epoch seconds (``REAL``), read from the clock by the driver and passed in as
``now``: this module never reads a clock. Rows come back as :class:`soniq.core.jobs.Job`
with aware UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Generator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import attrs

from soniq.core import serialize, states
from soniq.core.admin import (
    RETRYABLE,
    BacklogShape,
    JobFilter,
    QueueStats,
    Stats,
    WorkerInfo,
    backlog_shapes_from_rows,
    queue_stats_from_rows,
    stats_from_rows,
    stats_since,
)
from soniq.core.errors import JobNotFound, SchemaNotReadyError
from soniq.core.flow import (
    ClaimLimits,
    QueueLimits,
    queue_limits_by_name,
    stored_queue_limits,
)
from soniq.core.jobs import Claimed, Job, JobNode, JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.states import Event, JobStatus

T = TypeVar("T")
UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

#: SQLite integers are signed 64-bit: no job can have an id outside this range.
_MAX_ID = 2**63 - 1


# Step, Result and Inserted are named tuples, not attrs classes: an enqueue makes one
# of each, and a tuple is the cheapest immutable record to build.


class Step(NamedTuple):
    """One statement. With ``many``, ``params`` is a list of parameter tuples for
    ``executemany``."""

    sql: str
    params: Any = ()
    many: bool = False


class Result(NamedTuple):
    """What a step gave back: its rows (empty for DML), the rows it changed, and the
    rowid of the row a one-row ``INSERT`` (not ``many``) added."""

    rows: list[tuple[Any, ...]]
    rowcount: int = -1
    lastrowid: int | None = None


Steps = Generator[Step, Result, T]


@attrs.frozen
class Operation(Generic[T]):
    """An operation's steps, and whether they run under ``BEGIN IMMEDIATE`` (else each
    statement is its own transaction)."""

    steps: Steps[T]
    immediate: bool


class Inserted(NamedTuple):
    """The ids of one enqueue call, in input order, and the queue to wake (None when
    nothing new is due now: a dedupe hit or a job scheduled for later)."""

    ids: list[int]
    wake: str | None


# -- schema --------------------------------------------------------------------

_QUEUED = JobStatus.QUEUED.value
_RUNNING = JobStatus.RUNNING.value
_WAITING = JobStatus.WAITING.value
_ALL = states.sql_status_list(frozenset(JobStatus))
_ACTIVE = states.sql_status_list(states.ACTIVE)
_FINISHED = states.sql_status_list(states.FINISHED)
_CANCELLABLE = states.sql_status_list(states.CANCELLABLE)
# The predicates of the job table's CHECK and partial indexes from migration 9 on, and
# of the queries that read those indexes (see states.sql_status_any).
_ACTIVE_ANY = states.sql_status_any(states.ACTIVE)
_FINISHED_ANY = states.sql_status_any(states.FINISHED)
_COUNTED_ANY = states.sql_status_any(states.COUNTED_BY_QUEUE)

JOBS = "soniq_jobs"
WORKERS = "soniq_workers"
PERIODIC = "soniq_periodic"
QUEUES = "soniq_queues"
RATE_LOG = "soniq_rate_log"
DEPS = "soniq_job_deps"


@attrs.frozen
class Migration:
    """One schema version: its DDL, one statement per item (a driver must not use
    ``executescript``, which would commit the migration's transaction)."""

    version: int
    name: str
    statements: tuple[str, ...]


def _job_indexes(active: str, finished: str) -> tuple[str, ...]:
    """The job table's indexes, for the predicates of its schema version: the job is
    ``active``, the job is ``finished``."""
    return (
        # The claim reads queued rows in claim order and stops after its LIMIT: one
        # index for workers of every queue, one for workers of one queue. Only queued
        # rows are indexed, so finished history (or waiting jobs) never slows a claim.
        f"CREATE INDEX soniq_jobs_claim_idx ON {JOBS} (priority DESC, run_at, id) "
        "WHERE status = 'queued'",
        f"CREATE INDEX soniq_jobs_claim_queue_idx ON {JOBS} "
        "(queue, priority DESC, run_at, id) WHERE status = 'queued'",
        # dedupe_key is unique among jobs that are still active.
        f"CREATE UNIQUE INDEX soniq_jobs_dedupe_idx ON {JOBS} (dedupe_key) "
        f"WHERE dedupe_key IS NOT NULL AND {active}",
        # Recovery of dead workers' jobs, reconciliation, cancellation requests.
        f"CREATE INDEX soniq_jobs_running_idx ON {JOBS} (worker_id) WHERE status = 'running'",
        # Pruning finished jobs by age.
        f"CREATE INDEX soniq_jobs_finished_idx ON {JOBS} (finished_at) WHERE {finished}",
    )


# Migrations keep the statuses of their time: a later one widens them.
_JOB_INDEXES_V1 = _job_indexes(
    "status IN ('queued', 'running')", "status IN ('done', 'failed', 'cancelled')"
)


def _jobs_table(table: str, status_check: str, more_columns: str = "") -> str:
    """The job table from migration 7 on (SQLite cannot change a CHECK: the table is
    rebuilt), its status one of ``status_check``. parents: a JSON list of the jobs it
    waited for (NULL: none); waiting_for: how many of them have not ended;
    has_children: some job waits for this one, so its end settles them;
    run_if_parent_fails: a failed or cancelled parent counts as ended instead of
    cancelling it."""
    return f"""CREATE TABLE {table} (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT NOT NULL,
    queue               TEXT NOT NULL,
    args                TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'queued' CHECK {status_check},
    priority            INTEGER NOT NULL DEFAULT 0,
    run_at              REAL NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    max_retries         INTEGER NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    timeout             REAL CHECK (timeout > 0),
    dedupe_key          TEXT,
    worker_id           TEXT,
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    last_traceback      TEXT,
    result              TEXT,
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    claims              INTEGER NOT NULL DEFAULT 0,
    snoozes             INTEGER NOT NULL DEFAULT 0,
    parents             TEXT,
    waiting_for         INTEGER NOT NULL DEFAULT 0,
    has_children        INTEGER NOT NULL DEFAULT 0,
    run_if_parent_fails INTEGER NOT NULL DEFAULT 0,
    progress            REAL,
    progress_message    TEXT{more_columns}
)"""


_COLUMNS_V6 = (
    "id, name, queue, args, status, priority, run_at, attempts, max_retries, timeout, "
    "dedupe_key, worker_id, cancel_requested, last_error, last_traceback, result, "
    "created_at, started_at, finished_at, claims, snoozes"
)
_COLUMNS_V8 = (
    f"{_COLUMNS_V6}, parents, waiting_for, has_children, run_if_parent_fails, progress, "
    "progress_message, headers"
)
#: The column migration 8 added (last, as ALTER TABLE does).
_HEADERS_V8 = ",\n    headers             TEXT"


def _rebuild_jobs(
    version: int, status_check: str, columns: str, more_columns: str = ""
) -> tuple[str, ...]:
    """Copy the job table into a new one (see _jobs_table), ``columns`` kept, its id
    counter too. Dropping the old table dropped its indexes: the caller adds them."""
    new = f"soniq_jobs_v{version}"
    return (
        _jobs_table(new, status_check, more_columns),
        f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {JOBS}",
        f"DELETE FROM sqlite_sequence WHERE name = '{new}'",
        f"INSERT INTO sqlite_sequence (name, seq) "
        f"SELECT '{new}', seq FROM sqlite_sequence WHERE name = '{JOBS}'",
        f"DROP TABLE {JOBS}",
        f"ALTER TABLE {new} RENAME TO {JOBS}",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial",
        (
            # AUTOINCREMENT: ids are never reused, even after finished jobs are deleted
            # (as PostgreSQL's identity), and the rows of one insert get consecutive ids.
            f"""CREATE TABLE {JOBS} (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    args             TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    run_at           REAL NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_retries      INTEGER NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    timeout          REAL CHECK (timeout > 0),
    dedupe_key       TEXT,
    worker_id        TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    last_traceback   TEXT,
    result           TEXT,
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
)""",
            # (The indexes are those of migration 7, which rebuilt the table.)
            *_JOB_INDEXES_V1,
            f"""CREATE TABLE {WORKERS} (
    id           TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT,
    concurrency  INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
)""",
        ),
    ),
    # Runs a worker started, apart from the counted attempts, so that a run put back
    # uncounted and run again can be seen.
    Migration(
        2,
        "claims",
        (f"ALTER TABLE {JOBS} ADD COLUMN claims INTEGER NOT NULL DEFAULT 0",),
    ),
    # Periodic jobs: each schedule's last tick enqueued (or skipped as missed), in
    # whole microseconds since the epoch, so that ticks compare exactly.
    Migration(
        3,
        "periodic",
        (f"CREATE TABLE {PERIODIC} (key TEXT PRIMARY KEY, last_tick INTEGER NOT NULL)",),
    ),
    # Settings of a queue that every worker obeys: a paused queue is not claimed.
    Migration(
        4,
        "queues",
        (
            f"CREATE TABLE {QUEUES} (queue TEXT PRIMARY KEY, "
            "paused INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL)",
        ),
    ),
    # How many times a job snoozed (raised soniq.Snooze), its run not counted.
    Migration(
        5,
        "snoozes",
        (f"ALTER TABLE {JOBS} ADD COLUMN snoozes INTEGER NOT NULL DEFAULT 0",),
    ),
    # Concurrency and rate limits (see soniq.core.flow): a queue's stored limits, and
    # the sliding windows of rate limits, one row per start until its window ends.
    Migration(
        6,
        "limits",
        (
            f"ALTER TABLE {QUEUES} ADD COLUMN concurrency INTEGER",
            f"ALTER TABLE {QUEUES} ADD COLUMN rate_count INTEGER",
            f"ALTER TABLE {QUEUES} ADD COLUMN rate_period REAL",
            f"CREATE TABLE {RATE_LOG} (grp TEXT NOT NULL, until REAL NOT NULL)",
            f"CREATE INDEX soniq_rate_log_until_idx ON {RATE_LOG} (until)",
        ),
    ),
    # Workflows (see docs/workflows.md): the 'waiting' status and what a job waits
    # for, progress; the edges still to settle, one row per (parent, child) until the
    # parent ends. The table is copied into the new shape, its id counter kept.
    Migration(
        7,
        "workflows",
        (
            *_rebuild_jobs(7, f"(status IN {_ALL})", _COLUMNS_V6),
            *_job_indexes(f"status IN {_ACTIVE}", f"status IN {_FINISHED}"),
            f"CREATE TABLE {DEPS} (parent_id INTEGER NOT NULL, child_id INTEGER NOT NULL, "
            "PRIMARY KEY (parent_id, child_id)) WITHOUT ROWID",
        ),
    ),
    # Operations: waiting, failed and cancelled jobs counted per queue without walking
    # done history; headers carried from enqueue to run (a JSON object; NULL: none).
    Migration(
        8,
        "operations",
        (
            f"CREATE INDEX soniq_jobs_queue_status_idx ON {JOBS} (queue, status) "
            "WHERE status IN ('waiting', 'failed', 'cancelled')",
            f"ALTER TABLE {JOBS} ADD COLUMN headers TEXT",
        ),
    ),
    # The status CHECK and the partial indexes' predicates as equalities joined by OR
    # (see states.sql_status_any): as IN lists they cost four tables built per INSERT.
    Migration(
        9,
        "predicates",
        (
            *_rebuild_jobs(
                9, states.sql_status_any(frozenset(JobStatus)), _COLUMNS_V8, _HEADERS_V8
            ),
            *_job_indexes(_ACTIVE_ANY, _FINISHED_ANY),
            f"CREATE INDEX soniq_jobs_queue_status_idx ON {JOBS} (queue, status) "
            f"WHERE {_COUNTED_ANY}",
        ),
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version

_BOOTSTRAP = """CREATE TABLE IF NOT EXISTS soniq_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


def schema_version() -> Operation[int]:
    """The applied schema version (0 when Soniq's tables do not exist); no DDL."""

    def steps() -> Steps[int]:
        found = yield Step(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
            ("soniq_migrations",),
        )
        if not found.rows[0][0]:
            return 0
        version = yield Step("SELECT coalesce(max(version), 0) FROM soniq_migrations")
        return int(version.rows[0][0])

    return Operation(steps(), immediate=False)


def check_version(version: int, *, apply: bool) -> bool:
    """True when ``version`` is current; False when :func:`migrate` must run; raises
    :class:`SchemaNotReadyError` when the file is newer than this Soniq, or older and
    ``apply`` is False."""
    if version == LATEST_VERSION:
        return True
    if version > LATEST_VERSION:
        raise SchemaNotReadyError(
            f"the SQLite database is at schema version {version}, newer than this Soniq "
            f"({LATEST_VERSION}); upgrade the soniq package"
        )
    if not apply:
        raise SchemaNotReadyError(
            f"the SQLite database is at schema version {version}, this Soniq needs "
            f"{LATEST_VERSION}; run `soniq migrate --database-url sqlite:///PATH` or "
            "ensure_initialized()"
        )
    return False


def migrate(now: float) -> Operation[int]:
    """Apply pending migrations under the write lock (so processes starting at once
    serialise: the first applies, the others find nothing left). Returns the version."""

    def steps() -> Steps[int]:
        yield Step(_BOOTSTRAP)
        applied = {row[0] for row in (yield Step("SELECT version FROM soniq_migrations")).rows}
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements:
                yield Step(statement)
            yield Step(
                "INSERT INTO soniq_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, now),
            )
        return LATEST_VERSION

    return Operation(steps(), immediate=True)


# -- rows ----------------------------------------------------------------------

JOB_COLUMNS = (
    "id, name, queue, args, status, priority, run_at, attempts, max_retries, timeout, "
    "dedupe_key, worker_id, last_error, result, cancel_requested, created_at, "
    "started_at, finished_at, claims, snoozes, last_traceback, parents, waiting_for, "
    "progress, progress_message, headers"
)


def to_datetime(epoch: float | None) -> dt.datetime | None:
    """Epoch seconds as stored -> an aware UTC datetime."""
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, UTC)


def job_from_row(row: Sequence[Any]) -> Job:
    """Map a row selected with :data:`JOB_COLUMNS` to a :class:`Job`."""
    run_at, created_at = to_datetime(row[6]), to_datetime(row[15])
    assert run_at is not None and created_at is not None  # NOT NULL columns
    return Job(
        id=row[0],
        name=row[1],
        queue=row[2],
        args=serialize.loads(row[3]),
        status=JobStatus(row[4]),
        priority=row[5],
        run_at=run_at,
        attempts=row[7],
        max_retries=row[8],
        timeout=row[9],
        dedupe_key=row[10],
        worker_id=row[11],
        last_error=row[12],
        result=serialize.loads(row[13]),
        cancel_requested=bool(row[14]),
        created_at=created_at,
        started_at=to_datetime(row[16]),
        finished_at=to_datetime(row[17]),
        claims=row[18],
        snoozes=row[19],
        traceback=row[20],
        parents=tuple(serialize.loads(row[21]) or ()),
        waiting_for=row[22],
        progress=row[23],
        progress_message=row[24],
        headers=serialize.loads(row[25]) or {},
    )


def _known_id(job_id: object) -> bool:
    """Validate a job id; False when no row can have it (outside SQLite's integers)."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"job_id must be an int, got {job_id!r}")
    return 0 < job_id <= _MAX_ID


# -- enqueue and inspect -----------------------------------------------------------

#: One job row; the enqueue statement (also the benchmark's raw baseline).
INSERT_JOB = (
    f"INSERT INTO {JOBS} (name, queue, args, priority, run_at, max_retries, dedupe_key, "
    "timeout, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The same with headers (enqueue middleware gave some): the plain one stays as it was.
_INSERT_JOB_HEADERS = (
    f"INSERT INTO {JOBS} (name, queue, args, priority, run_at, max_retries, dedupe_key, "
    "timeout, created_at, headers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def insert_jobs(spec: JobSpec, now: float) -> Operation[Inserted]:
    """Insert the jobs of one enqueue call; ids in input order. A ``dedupe_key`` held by
    an active job returns that job's id and inserts nothing (with ``spec.replace``,
    the job takes the call's arguments and options if it has not started; if it
    runs, it gives the key up to a new job). Jobs with ``parents`` wait for them."""
    if spec.parents:
        return insert_graph([JobNode(attrs.evolve(spec, args=(a,))) for a in spec.args], now)
    run_at = spec.run_at.timestamp() if spec.run_at is not None else now + spec.delay
    shared: tuple[Any, ...] = (
        spec.priority,
        run_at,
        spec.max_retries,
        spec.dedupe_key,
        spec.timeout,
        now,
    )
    insert = INSERT_JOB
    if spec.headers is not None:
        shared, insert = (*shared, serialize.dumps(spec.headers)), _INSERT_JOB_HEADERS
    values = [(spec.name, spec.queue, serialize.dumps(args), *shared) for args in spec.args]
    wake = spec.queue if run_at <= now else None
    if len(values) == 1 and spec.dedupe_key is None:
        # One job without a dedupe key is one INSERT: no BEGIN IMMEDIATE needed.
        return Operation(_insert_one(values[0], wake, insert), immediate=False)

    def steps() -> Steps[Inserted]:
        if spec.dedupe_key is not None:
            # Under the write lock: nobody can insert the key between this and the insert
            # (and the partial unique index would refuse it anyway).
            held = yield Step(
                f"SELECT id, status FROM {JOBS} WHERE dedupe_key = ? AND {_ACTIVE_ANY}",
                (spec.dedupe_key,),
            )
            if held.rows and spec.replace and held.rows[0][1] != _RUNNING:
                job_id = held.rows[0][0]
                headers = None if spec.headers is None else shared[-1]
                yield Step(_REPLACE, (*values[0][1:6], spec.timeout, headers, job_id))
                return Inserted([job_id], wake if held.rows[0][1] == _QUEUED else None)
            if held.rows and spec.replace:  # it runs: a new job takes the key
                yield Step(f"UPDATE {JOBS} SET dedupe_key = NULL WHERE id = ?", (held.rows[0][0],))
            elif held.rows:
                return Inserted([held.rows[0][0]], None)
            if len(values) == 1:
                return (yield from _insert_one(values[0], wake, insert))
        yield Step(insert, values, many=True)
        last = (yield Step("SELECT last_insert_rowid()")).rows[0][0]
        # With AUTOINCREMENT each new row gets max(ever used) + 1, and the write lock is
        # held, so the rows of this call have consecutive ids, in input order.
        ids = list(range(last - len(values) + 1, last + 1))
        return Inserted(ids, wake)

    return Operation(steps(), immediate=True)


#: A job replaced by a later enqueue of its dedupe_key (``dedupe="replace"``).
_REPLACE = f"""UPDATE {JOBS} SET queue = ?, args = ?, priority = ?, run_at = ?, max_retries = ?,
    timeout = ?, headers = ? WHERE id = ?"""

_INSERT_NODE = (
    f"INSERT INTO {JOBS} (id, name, queue, args, priority, run_at, max_retries, dedupe_key, "
    "timeout, created_at, status, parents, waiting_for, has_children, run_if_parent_fails, "
    "finished_at, last_error, headers) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The id AUTOINCREMENT gives next, less one.
_LAST_ID = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'soniq_jobs'), 0), "
    f"coalesce((SELECT max(id) FROM {JOBS}), 0))"
)
#: Most parameters one statement binds (SQLite's default limit is 32,766 since 3.32,
#: 999 before).
_CHUNK = 900


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def _marks(ids: Sequence[int]) -> str:
    return ", ".join("?" * len(ids))


def insert_graph(nodes: Sequence[JobNode], now: float) -> Operation[Inserted]:
    """Insert jobs that wait for their parents: the existing jobs of each node's
    ``spec.parents`` and the earlier nodes of ``after``; ids in input order. A node
    whose parents are all done is queued, else waiting; one with a failed or
    cancelled existing parent is cancelled at once (unless it runs anyway). An
    unknown parent id raises :class:`JobNotFound` and inserts nothing."""

    def steps() -> Steps[Inserted]:
        external = sorted({p for node in nodes for p in node.spec.parents})
        status_of: dict[int, str] = {}
        for chunk in _chunks(external):
            found = yield Step(
                f"SELECT id, status FROM {JOBS} WHERE id IN ({_marks(chunk)})", chunk
            )
            status_of.update(found.rows)
            yield Step(f"UPDATE {JOBS} SET has_children = 1 WHERE id IN ({_marks(chunk)})", chunk)
        missing = [p for p in external if p not in status_of]
        if missing:
            raise JobNotFound(
                f"depends_on: no job has id {missing[0]} (a parent must be enqueued first)",
                job_id=missing[0],
            )
        first = (yield Step(_LAST_ID)).rows[0][0] + 1
        ids = list(range(first, first + len(nodes)))
        has_children = {a for node in nodes for a in node.after}
        rows, edges, woken = [], [], set()
        for index, node in enumerate(nodes):
            spec = node.spec
            run_at = spec.run_at.timestamp() if spec.run_at is not None else now + spec.delay
            parents = [ids[a] for a in node.after] + list(spec.parents)
            pending = [ids[a] for a in node.after]
            pending += [p for p in spec.parents if status_of[p] not in _FINISHED_VALUES]
            ended_badly = sorted(
                (status_of[p] != _FAILED, p) for p in spec.parents if status_of[p] in _BAD_VALUES
            )
            doomed = bool(ended_badly) and not spec.run_if_parent_fails
            status = _CANCELLED if doomed else _WAITING if pending else _QUEUED
            error = _parent_ended_message(*ended_badly[0]) if doomed else None
            rows.append(
                (
                    ids[index],
                    spec.name,
                    spec.queue,
                    serialize.dumps(spec.args[0]),
                    spec.priority,
                    run_at,
                    spec.max_retries,
                    spec.dedupe_key,
                    spec.timeout,
                    now,
                    status,
                    serialize.dumps(parents) if parents else None,
                    0 if doomed else len(pending),
                    index in has_children,
                    spec.run_if_parent_fails,
                    now if doomed else None,
                    error,
                    None if spec.headers is None else serialize.dumps(spec.headers),
                )
            )
            if not doomed:
                edges += [(p, ids[index]) for p in pending]
            if status == _QUEUED and run_at <= now:
                woken.add(spec.queue)
        yield Step(_INSERT_NODE, rows, many=True)
        if edges:
            yield Step(f"INSERT OR IGNORE INTO {DEPS} VALUES (?, ?)", edges, many=True)
        return Inserted(ids, ",".join(sorted(woken)) or None)

    return Operation(steps(), immediate=True)


_FAILED = JobStatus.FAILED.value
_CANCELLED = JobStatus.CANCELLED.value
_FINISHED_VALUES = frozenset(s.value for s in states.FINISHED)
_BAD_VALUES = frozenset(s.value for s in states.UNSUCCESSFUL)


def _parent_ended_message(cancelled: bool, parent: int) -> str:
    """Why a child of ``parent`` was cancelled (as soniq_settle_children says it)."""
    return f"Cancelled: parent job {parent} " + ("was cancelled" if cancelled else "failed")


def settle_children(
    done: Sequence[int], failed: Sequence[int], cancelled: Sequence[int], now: float
) -> Steps[set[str]]:
    """Settle the children of jobs that just ended, as PostgreSQL's
    soniq_settle_children does (migration 0007): a child counts one parent fewer per
    parent done (or ended otherwise, when it runs anyway) and is queued when none is
    left; a child of a failed or cancelled parent is cancelled, naming it, and so are
    its own children in turn. Returns the queues of children queued and due now."""
    woken: set[str] = set()
    ok, bad = set(done), {p: False for p in failed} | {p: True for p in cancelled}
    while ok or bad:
        ended = sorted(ok | bad.keys())
        children: dict[int, list[Any]] = {}
        for chunk in _chunks(ended):
            found = yield Step(
                f"""SELECT d.parent_id, c.id, c.waiting_for, c.run_if_parent_fails, c.queue,
    c.run_at, c.has_children
FROM {DEPS} AS d JOIN {JOBS} AS c ON c.id = d.child_id
WHERE d.parent_id IN ({_marks(chunk)}) AND c.status = '{_WAITING}'""",
                chunk,
            )
            for parent, child, waiting_for, runs_anyway, queue, run_at, kids in found.rows:
                seen = children.setdefault(child, [waiting_for, runs_anyway, queue, run_at, kids])
                seen.append(parent)
            yield Step(f"DELETE FROM {DEPS} WHERE parent_id IN ({_marks(chunk)})", chunk)
        counted, doomed, next_bad = [], [], {}
        for child, (waiting_for, runs_anyway, queue, run_at, kids, *parents) in children.items():
            culprits = sorted((bad[p], p) for p in parents if p in bad)
            if culprits and not runs_anyway:
                doomed.append((now, _parent_ended_message(*culprits[0]), child))
                if kids:
                    next_bad[child] = True
                continue
            left = waiting_for - len(parents)
            counted.append((max(left, 0), _QUEUED if left <= 0 else _WAITING, child))
            if left <= 0 and run_at <= now:
                woken.add(queue)
        if counted:
            yield Step(
                f"UPDATE {JOBS} SET waiting_for = ?, status = ? WHERE id = ?", counted, many=True
            )
        if doomed:
            yield Step(
                f"UPDATE {JOBS} SET status = '{_CANCELLED}', finished_at = ?, last_error = ? "
                "WHERE id = ?",
                doomed,
                many=True,
            )
        ok, bad = set(), next_bad
    return woken


def _any_children(ids: Sequence[int]) -> Steps[set[int]]:
    """Which of ``ids`` have children to settle (nothing to ask when no job waits)."""
    if not ids or not (yield Step(f"SELECT 1 FROM {DEPS} LIMIT 1")).rows:
        return set()
    found: set[int] = set()
    for chunk in _chunks(ids):
        rows = yield Step(
            f"SELECT id FROM {JOBS} WHERE id IN ({_marks(chunk)}) AND has_children", chunk
        )
        found.update(row[0] for row in rows.rows)
    return found


def _insert_one(
    values: tuple[Any, ...], wake: str | None, insert: str = INSERT_JOB
) -> Steps[Inserted]:
    inserted = yield Step(insert, values)
    assert inserted.lastrowid is not None
    return Inserted([inserted.lastrowid], wake)


def get_job(job_id: int) -> Operation[Job | None]:
    """The job, or None."""
    known = _known_id(job_id)

    def steps() -> Steps[Job | None]:
        if not known:
            return None
        found = yield Step(f"SELECT {JOB_COLUMNS} FROM {JOBS} WHERE id = ?", (job_id,))
        return job_from_row(found.rows[0]) if found.rows else None

    return Operation(steps(), immediate=False)


def list_jobs(name: str | None, queue: str | None) -> Operation[list[Job]]:
    """Queued jobs (due or not), optionally of one name and/or queue, by id."""
    where, params = [f"status = '{_QUEUED}'"], []
    if name is not None:
        where.append("name = ?")
        params.append(name)
    if queue is not None:
        where.append("queue = ?")
        params.append(queue)
    sql = f"SELECT {JOB_COLUMNS} FROM {JOBS} WHERE {' AND '.join(where)} ORDER BY id"

    def steps() -> Steps[list[Job]]:
        found = yield Step(sql, tuple(params))
        return [job_from_row(row) for row in found.rows]

    return Operation(steps(), immediate=False)


_CANCEL_TO = states.next_status(JobStatus.QUEUED, Event.CANCEL).value
_AT_ONCE = states.sql_status_list(states.CANCELLED_AT_ONCE)
_CANCEL = f"""UPDATE {JOBS}
SET status = CASE WHEN status IN {_AT_ONCE} THEN '{_CANCEL_TO}' ELSE status END,
    finished_at = CASE WHEN status IN {_AT_ONCE} THEN ? ELSE finished_at END,
    cancel_requested = (cancel_requested OR status = '{_RUNNING}')
WHERE id = ? AND status IN {_CANCELLABLE}"""


def cancel_job(job_id: int, now: float) -> Operation[bool]:
    """Cancel a waiting or queued job at once (its children settled), or record the
    request for a running one (its worker acknowledges it); False when the job is
    unknown or finished."""
    known = _known_id(job_id)

    def steps() -> Steps[bool]:
        if not known:
            return False
        found = yield Step(f"SELECT status, has_children FROM {JOBS} WHERE id = ?", (job_id,))
        changed = yield Step(_CANCEL, (now, job_id))
        if changed.rowcount and found.rows[0][1] and found.rows[0][0] != _RUNNING:
            yield from settle_children((), (), (job_id,), now)
        return changed.rowcount > 0

    return Operation(steps(), immediate=True)


# -- the worker ----------------------------------------------------------------------

_CLAIM_TO = states.next_status(JobStatus.QUEUED, Event.CLAIM).value
_CLAIM_SELECT = f"""SELECT id, name, queue, args, attempts, max_retries, timeout, claims, parents,
    headers
FROM {JOBS}
WHERE status = '{_QUEUED}' @queue_filter@ @name_filter@ AND run_at <= ?
  AND queue NOT IN (SELECT queue FROM {QUEUES} WHERE paused @limited@)
ORDER BY priority DESC, run_at, id
LIMIT ?"""
_CLAIM_UPDATE = (
    f"UPDATE {JOBS} SET status = '{_CLAIM_TO}', attempts = attempts + 1, "
    "claims = claims + 1, worker_id = ?, "
    f"started_at = ? WHERE id = ? AND status = '{_QUEUED}'"
)
#: Whether a queue's row holds stored limits.
_HAS_LIMITS = "(concurrency IS NOT NULL OR rate_count IS NOT NULL)"
#: A running job ``j`` is counted unless it is a run of this worker's that has ended
#: (its outcome not written yet; see ClaimLimits.ended).
_NOT_ENDED = """AND NOT (j.worker_id = :spec ->> '$.worker' AND EXISTS (
              SELECT 1 FROM json_each(:spec, '$.ended') AS e
              WHERE e.value ->> 0 = j.id AND e.value ->> 1 = j.claims))"""


def _limit_group(kind: str, limit: str, key: str) -> str:
    """The group a job ``j`` counts in for one of its limits (as on PostgreSQL)."""
    return (
        f"CASE WHEN s.{limit} IS NOT NULL THEN '{kind}:' || j.name || CASE WHEN s.{key} IS NULL "
        f"THEN '' ELSE ':' || coalesce(j.args -> s.{key}, 'null') END END"
    )


_SPEC = (
    "SELECT value ->> 'name' AS name, value ->> 'concurrency' AS concurrency, "
    "value ->> 'ckey' AS ckey, value ->> 'rate' AS rate, value ->> 'period' AS period, "
    "value ->> 'rkey' AS rkey FROM json_each(:spec, '$.jobs')"
)
_ROOMS = (("cg", "ccap"), ("rg", "rcap"), ("qg", "qcap"), ("qrg", "qrcap"))
# Under the write lock: what runs and what the rate windows hold is counted in the
# same statement that picks (see soniq.core.flow and the PostgreSQL claim).
_LIMITED_SELECT = f"""
WITH spec AS MATERIALIZED ({_SPEC}),
usage AS MATERIALIZED (
    SELECT grp, count(*) AS used FROM (
        SELECT {_limit_group("c", "concurrency", "ckey")} AS grp
        FROM {JOBS} AS j JOIN spec AS s ON s.name = j.name
        WHERE j.status = '{_RUNNING}' AND s.concurrency IS NOT NULL
          {_NOT_ENDED}
        UNION ALL
        SELECT 'q:' || j.queue FROM {JOBS} AS j JOIN {QUEUES} AS q ON q.queue = j.queue
        WHERE j.status = '{_RUNNING}' AND q.concurrency IS NOT NULL
          {_NOT_ENDED}
        UNION ALL
        SELECT grp FROM {RATE_LOG} WHERE until > :now
    ) GROUP BY grp
),
grouped AS (
    SELECT j.id, j.name, j.queue, j.args, j.attempts, j.max_retries, j.timeout, j.claims,
        j.parents, j.headers, j.priority, j.run_at,
        {_limit_group("c", "concurrency", "ckey")} AS cg, s.concurrency AS ccap,
        {_limit_group("r", "rate", "rkey")} AS rg, s.rate AS rcap, s.period AS rperiod,
        CASE WHEN q.concurrency IS NOT NULL THEN 'q:' || j.queue END AS qg,
        q.concurrency AS qcap,
        CASE WHEN q.rate_count IS NOT NULL THEN 'rq:' || j.queue END AS qrg,
        q.rate_count AS qrcap, q.rate_period AS qrperiod
    FROM {JOBS} AS j
    LEFT JOIN spec AS s ON s.name = j.name
    LEFT JOIN {QUEUES} AS q ON q.queue = j.queue
    WHERE j.status = '{_QUEUED}' @queue_filter@
      AND j.name IN (SELECT value FROM json_each(:names))
      AND j.run_at <= :now AND coalesce(q.paused, 0) = 0
      AND (s.name IS NOT NULL OR q.concurrency IS NOT NULL OR q.rate_count IS NOT NULL)
),
roomed AS (
    SELECT g.*, {
    ", ".join(
        f"g.{cap} - coalesce((SELECT used FROM usage AS u WHERE u.grp = g.{grp}), 0) AS {grp}_room"
        for grp, cap in _ROOMS
    )
}
    FROM grouped AS g
),
cand AS (
    SELECT * FROM roomed
    WHERE {" AND ".join(f"({grp} IS NULL OR {grp}_room > 0)" for grp, _ in _ROOMS)}
    ORDER BY priority DESC, run_at, id
    LIMIT :candidates
),
ranked AS (
    SELECT *, {
    ", ".join(
        f"row_number() OVER (PARTITION BY {grp} ORDER BY priority DESC, run_at, id) AS {grp}_rank"
        for grp, _ in _ROOMS
    )
}
    FROM cand
)
SELECT id, name, queue, args, attempts, max_retries, timeout, claims, parents, headers,
    rg, rperiod, qrg, qrperiod
FROM ranked
WHERE {" AND ".join(f"({grp} IS NULL OR {grp}_rank <= {grp}_room)" for grp, _ in _ROOMS)}
ORDER BY priority DESC, run_at, id
LIMIT :limit"""


#: Rounds of one limited claim at most: each round takes what the groups with room
#: allow among as many candidates as slots (times CANDIDATES_PER_SLOT); a group
#: filled by one round is stepped over by the next.
LIMITED_ROUNDS = 8
CANDIDATES_PER_SLOT = 2


def claim_jobs(
    limit: int,
    worker_id: str,
    queues: Sequence[str] | None,
    now: float,
    names: Sequence[str] | None = None,
    limits: ClaimLimits | None = None,
    *,
    clock: Callable[[], float] | None = None,
    limited_first: bool = False,
) -> Operation[list[Claimed]]:
    """Claim up to ``limit`` due jobs, by priority DESC, then run_at, then id, of
    ``queues`` and ``names`` (None: all). Under the write lock, so no other worker
    (thread or process) can claim the same rows. The names filter the rows the claim
    index gives in order (as on PostgreSQL). Told of ``limits`` (a worker's claim),
    the jobs under limits (theirs or their queue's) are claimed within them, by a
    claim of their own; with ``limited_first`` it goes first (the caller alternates,
    so that neither kind of job can keep every slot). ``clock``, when given, is read
    once the write lock is held, instead of ``now``: a rate's window is then measured
    from when the claim could count."""
    queue_filter = name_filter = ""
    queue_params: list[Any] = []
    if queues is not None and len(queues) == 1:
        # One queue is the common case: an equality lets the index give claim order.
        queue_filter = "AND queue = ?"
        queue_params.append(queues[0])
    elif queues is not None:
        queue_filter = f"AND queue IN ({', '.join('?' * len(queues))})"
        queue_params += queues
    unlimited = names
    if limits is not None and limits.jobs and names is not None:
        unlimited = [name for name in names if name not in limits.names]
    if unlimited is not None:
        name_filter = "AND name IN (SELECT value FROM json_each(?))"
        queue_params.append(serialize.dumps(list(unlimited)))
    sql = _CLAIM_SELECT.replace("@queue_filter@", queue_filter)
    sql = sql.replace("@name_filter@", name_filter)
    sql = sql.replace("@limited@", "" if limits is None else f"OR {_HAS_LIMITS}")

    def plain(at: float, left: int) -> Steps[list[Claimed]]:
        if not left or (unlimited is not None and not unlimited):
            return []  # (no name: nothing for the index walk to find)
        found = _claimed((yield Step(sql, (*queue_params, at, left))).rows)
        if found:
            yield Step(_CLAIM_UPDATE, [(worker_id, at, c.id) for c in found], many=True)
        return found

    def limited(at: float, left: int) -> Steps[list[Claimed]]:
        claimed: list[Claimed] = []
        if limits is None or names is None:
            return claimed
        for _ in range(LIMITED_ROUNDS):
            if len(claimed) == left:
                break
            more = yield from _claim_limited(
                left - len(claimed), queues, names, limits, worker_id, at
            )
            if not more:
                break
            yield Step(_CLAIM_UPDATE, [(worker_id, at, c.id) for c in more], many=True)
            claimed += more
        return claimed

    def steps() -> Steps[list[Claimed]]:
        at = now if clock is None else clock()
        first, second = (limited, plain) if limited_first else (plain, limited)
        claimed = yield from first(at, limit)
        claimed += yield from second(at, limit - len(claimed))
        return (yield from _with_parent_results(claimed))

    return Operation(steps(), immediate=True)


def _claimed(rows: Sequence[Sequence[Any]], *, limited: bool = False) -> list[Claimed]:
    # (A job's parents, when it has some, are read here, and replaced by their results
    # before the claim returns: see _with_parent_results.)
    return [
        Claimed(
            r[0],
            r[1],
            r[2],
            serialize.loads(r[3]),
            r[4] + 1,
            r[5],
            r[6],
            r[7] + 1,
            limited,
            None if r[8] is None else {p: None for p in serialize.loads(r[8])},
            serialize.loads(r[9]),
        )
        for r in rows
    ]


def _with_parent_results(claimed: list[Claimed]) -> Steps[list[Claimed]]:
    """The claimed jobs, each with the results of its parents that are done."""
    parents = sorted({p for c in claimed if c.parent_results for p in c.parent_results})
    if not parents:
        return claimed
    results: dict[int, Any] = {}
    for chunk in _chunks(parents):
        found = yield Step(
            f"SELECT id, result FROM {JOBS} WHERE id IN ({_marks(chunk)}) "
            f"AND status = '{JobStatus.DONE.value}'",
            chunk,
        )
        results.update((i, serialize.loads(r)) for i, r in found.rows)
    return [
        c
        if c.parent_results is None
        else attrs.evolve(
            c, parent_results={p: results[p] for p in c.parent_results if p in results}
        )
        for c in claimed
    ]


def _claim_limited(
    limit: int,
    queues: Sequence[str] | None,
    names: Sequence[str],
    limits: ClaimLimits,
    worker_id: str,
    now: float,
) -> Steps[list[Claimed]]:
    """The limited part of :func:`claim_jobs`: picks within the limits and logs the
    starts that rate limits count (the caller marks the jobs claimed)."""
    limited_queues = f"SELECT 1 FROM {QUEUES} WHERE {_HAS_LIMITS} LIMIT 1"
    if not limits.jobs and not (yield Step(limited_queues)).rows:
        return []
    named: dict[str, Any] = {
        "now": now,
        "names": serialize.dumps(list(names)),
        "candidates": limit * CANDIDATES_PER_SLOT,
        "limit": limit,
    }
    for n, queue in enumerate(queues or ()):
        named[f"q{n}"] = queue
    filter_sql = ""
    if queues is not None:
        filter_sql = f"AND j.queue IN ({', '.join(f':q{n}' for n in range(len(queues)))})"
    named["spec"] = limits.spec_json(worker_id)
    sql = _LIMITED_SELECT.replace("@queue_filter@", filter_sql)
    found = (yield Step(sql, named)).rows
    starts = [(r[10], now + r[11]) for r in found if r[10] is not None]
    starts += [(r[12], now + r[13]) for r in found if r[12] is not None]
    if starts:
        yield Step(f"INSERT INTO {RATE_LOG} (grp, until) VALUES (?, ?)", starts, many=True)
    yield Step(f"DELETE FROM {RATE_LOG} WHERE until <= ?", (now,))
    return _claimed(found, limited=True)


# -- queues --------------------------------------------------------------------------


def pause_queue(queue: str, now: float) -> Operation[bool]:
    """Pause ``queue``: its jobs are not claimed until it is resumed. True when it was
    not paused."""

    def steps() -> Steps[bool]:
        rows = (yield Step(f"SELECT paused FROM {QUEUES} WHERE queue = ?", (queue,))).rows
        if rows and rows[0][0]:
            return False
        if rows:
            yield Step(
                f"UPDATE {QUEUES} SET paused = 1, updated_at = ? WHERE queue = ?", (now, queue)
            )
        else:
            yield Step(
                f"INSERT INTO {QUEUES} (queue, paused, updated_at) VALUES (?, 1, ?)", (queue, now)
            )
        return True

    return Operation(steps(), immediate=True)


def resume_queue(queue: str, now: float) -> Operation[bool]:
    """Resume a paused ``queue``; True when it was paused."""

    def steps() -> Steps[bool]:
        changed = yield Step(
            f"UPDATE {QUEUES} SET paused = 0, updated_at = ? WHERE queue = ? AND paused",
            (now, queue),
        )
        return changed.rowcount > 0

    return Operation(steps(), immediate=True)


def next_due(
    queues: Sequence[str] | None, names: Sequence[str], now: float
) -> Operation[float | None]:
    """In how many seconds the first queued job of ``queues`` (None: all) and ``names``
    is due (negative: overdue; None: no such job), paused queues left out."""
    queue_filter, params = "", [serialize.dumps(list(names))]
    if queues is not None:
        queue_filter = "AND queue IN (SELECT value FROM json_each(?))"
        params.append(serialize.dumps(list(queues)))

    def steps() -> Steps[float | None]:
        rows = (
            yield Step(
                f"SELECT min(run_at) FROM {JOBS} WHERE status = '{_QUEUED}' "
                f"AND name IN (SELECT value FROM json_each(?)) {queue_filter} "
                f"AND queue NOT IN (SELECT queue FROM {QUEUES} WHERE paused)",
                tuple(params),
            )
        ).rows
        first = rows[0][0] if rows else None
        return None if first is None else first - now

    return Operation(steps(), immediate=False)


def set_queue_limits(queue: str, limits: QueueLimits, now: float) -> Operation[None]:
    """Store the limits of ``queue`` (None fields: no limit)."""
    values = (queue, *stored_queue_limits(limits), now)

    def steps() -> Steps[None]:
        yield Step(
            f"INSERT INTO {QUEUES} (queue, concurrency, rate_count, rate_period, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (queue) DO UPDATE SET "
            "concurrency = excluded.concurrency, rate_count = excluded.rate_count, "
            "rate_period = excluded.rate_period, updated_at = excluded.updated_at",
            values,
        )

    return Operation(steps(), immediate=True)


def queue_limits() -> Operation[dict[str, QueueLimits]]:
    """The queues with stored limits, by name."""

    def steps() -> Steps[dict[str, QueueLimits]]:
        rows = (
            yield Step(
                f"SELECT queue, concurrency, rate_count, rate_period FROM {QUEUES} "
                f"WHERE {_HAS_LIMITS} ORDER BY queue"
            )
        ).rows
        return queue_limits_by_name(rows)

    return Operation(steps(), immediate=False)


def paused_queues() -> Operation[list[str]]:
    """The paused queues, by name."""

    def steps() -> Steps[list[str]]:
        rows = (yield Step(f"SELECT queue FROM {QUEUES} WHERE paused ORDER BY queue")).rows
        return [row[0] for row in rows]

    return Operation(steps(), immediate=False)


# -- periodic jobs (see soniq.core.schedules) ----------------------------------------


def _micros(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


def last_ticks(keys: Sequence[str]) -> Operation[dict[str, dt.datetime]]:
    """The last tick of each schedule of ``keys`` that has one."""

    def steps() -> Steps[dict[str, dt.datetime]]:
        rows = (
            yield Step(
                f"SELECT key, last_tick FROM {PERIODIC} WHERE key IN "
                "(SELECT value FROM json_each(?))",
                (serialize.dumps(list(keys)),),
            )
        ).rows
        return {key: _EPOCH + dt.timedelta(microseconds=us) for key, us in rows}

    return Operation(steps(), immediate=False)


def enqueue_tick(
    key: str, tick: dt.datetime, spec: JobSpec, now: float, *, enqueue: bool
) -> Operation[Inserted | None]:
    """Move the last tick of schedule ``key`` to ``tick`` if it is newer and then, with
    ``enqueue``, insert the job of ``spec`` due at ``tick``; None when nothing was
    inserted. Under the write lock, so of the workers that try one tick, one inserts
    its job."""
    at = _micros(tick)

    def steps() -> Steps[Inserted | None]:
        rows = (yield Step(f"SELECT last_tick FROM {PERIODIC} WHERE key = ?", (key,))).rows
        if rows and rows[0][0] >= at:
            return None
        if rows:
            yield Step(f"UPDATE {PERIODIC} SET last_tick = ? WHERE key = ?", (at, key))
        else:
            yield Step(f"INSERT INTO {PERIODIC} (key, last_tick) VALUES (?, ?)", (key, at))
        if not enqueue:
            return None
        return (yield from insert_jobs(attrs.evolve(spec, run_at=tick), now).steps)

    return Operation(steps(), immediate=True)


# Fenced by worker and attempt: a rescued job's late finish matches no row.
_FENCE = f"id = ? AND status = '{_RUNNING}' AND worker_id = ? AND attempts = ?"
_FINISH_UPDATE = f"""UPDATE {JOBS} SET
    status = ?,
    attempts = attempts - ?,
    claims = claims - ?,
    snoozes = snoozes + ?,
    run_at = coalesce(?, run_at),
    worker_id = CASE WHEN ? THEN worker_id END,
    finished_at = ?,
    cancel_requested = (cancel_requested AND ?),
    last_error = coalesce(?, last_error),
    last_traceback = coalesce(?, last_traceback),
    result = ?
WHERE {_FENCE}"""
_FINISH_DELETE = f"DELETE FROM {JOBS} WHERE {_FENCE}"


def finish_jobs(
    outcomes: Sequence[Outcome], worker_id: str, *, keep: bool, now: float
) -> Operation[str | None]:
    """Write a batch of outcomes in one transaction, each fenced by worker and attempt;
    with ``keep=False`` finished jobs are deleted. The children of jobs that ended are
    settled (:func:`settle_children`). Returns the queues of children that became
    ready now (to wake, comma-separated), or None."""
    updates, deletes = [], []
    ended = {o.job_id: o for o in outcomes if o.status in states.FINISHED}
    for o in outcomes:
        finished = o.status in states.FINISHED
        if finished and not keep:
            deletes.append((o.job_id, worker_id, o.attempts))
            continue
        updates.append(
            (
                o.status.value,
                1 if o.release else 0,
                1 if o.snoozed else 0,
                1 if o.snoozed else 0,
                None if o.retry_in is None else now + o.retry_in,
                finished,
                now if finished else None,
                finished,
                o.error,
                o.traceback,
                o.result,
                o.job_id,
                worker_id,
                o.attempts,
            )
        )

    def steps() -> Steps[str | None]:
        parents = yield from _any_children(list(ended))
        # Only the runs this write ends settle their children (the fence, read first).
        if parents:
            found = yield Step(
                f"SELECT id, attempts FROM {JOBS} WHERE id IN ({_marks(list(parents))}) "
                f"AND status = '{_RUNNING}' AND worker_id = ?",
                (*parents, worker_id),
            )
            parents = {i for i, attempts in found.rows if ended[i].attempts == attempts}
        if updates:
            yield Step(_FINISH_UPDATE, updates, many=True)
        if deletes:
            yield Step(_FINISH_DELETE, deletes, many=True)
        woken: set[str] = set()
        if parents:
            done, failed, cancelled = (
                [i for i in parents if ended[i].status is status]
                for status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
            )
            woken = yield from settle_children(done, failed, cancelled, now)
        return ",".join(sorted(woken)) or None

    return Operation(steps(), immediate=True)


def register_worker(worker: WorkerIdentity, now: float) -> Operation[None]:
    """Record a worker (again); its heartbeat is now."""
    queue_list = None if worker.queues is None else serialize.dumps(list(worker.queues))

    def steps() -> Steps[None]:
        yield Step(
            f"INSERT OR IGNORE INTO {WORKERS} "
            "(id, hostname, pid, queues, concurrency, started_at, heartbeat_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (worker.id, worker.hostname, worker.pid, queue_list, worker.concurrency, now, now),
        )
        yield Step(f"UPDATE {WORKERS} SET heartbeat_at = ? WHERE id = ?", (now, worker.id))

    return Operation(steps(), immediate=True)


def unregister_worker(worker_id: str) -> Operation[None]:
    """Forget a worker that stopped cleanly."""

    def steps() -> Steps[None]:
        yield Step(f"DELETE FROM {WORKERS} WHERE id = ?", (worker_id,))

    return Operation(steps(), immediate=True)


def heartbeat(worker_id: str, now: float) -> Operation[bool]:
    """Refresh a worker's heartbeat; False if it was declared dead meanwhile."""

    def steps() -> Steps[bool]:
        changed = yield Step(
            f"UPDATE {WORKERS} SET heartbeat_at = ? WHERE id = ?", (now, worker_id)
        )
        return changed.rowcount > 0

    return Operation(steps(), immediate=True)


def cancel_requests(worker_id: str) -> Operation[list[int]]:
    """Ids of the worker's running jobs whose cancellation was requested."""

    def steps() -> Steps[list[int]]:
        found = yield Step(
            f"SELECT id FROM {JOBS} WHERE worker_id = ? AND status = '{_RUNNING}' "
            "AND cancel_requested",
            (worker_id,),
        )
        return [row[0] for row in found.rows]

    return Operation(steps(), immediate=False)


_REQUEUED = states.next_status(JobStatus.RUNNING, Event.RESCUE).value
_GAVE_UP = states.next_status(JobStatus.RUNNING, Event.FAIL).value
# Running jobs of workers that are not registered (dead ones were just deleted).
_ORPHANED = (
    f"status = '{_RUNNING}' AND NOT EXISTS "
    f"(SELECT 1 FROM {WORKERS} AS w WHERE w.id = {JOBS}.worker_id)"
)
_RESCUE_STATUS = f"CASE WHEN attempts > max_retries THEN '{_GAVE_UP}' ELSE '{_REQUEUED}' END"


def rescue_stale(stale_after: float, now: float) -> Operation[list[tuple[int, str]]]:
    """Forget workers whose heartbeat is older than ``stale_after`` seconds, and put
    back the running jobs of unregistered workers with the attempt counted (a job with
    no attempt left fails). Returns (id, new status) pairs."""

    def steps() -> Steps[list[tuple[int, str]]]:
        yield Step(f"DELETE FROM {WORKERS} WHERE heartbeat_at < ?", (now - stale_after,))
        found = yield Step(f"SELECT id, {_RESCUE_STATUS} FROM {JOBS} WHERE {_ORPHANED}")
        if not found.rows:
            return []
        yield Step(
            f"""UPDATE {JOBS} SET
    status = {_RESCUE_STATUS},
    finished_at = CASE WHEN attempts > max_retries THEN ? END,
    worker_id = CASE WHEN attempts > max_retries THEN worker_id END,
    last_error = 'WorkerLost: worker ' || coalesce(worker_id, '?') || ' stopped heartbeating'
WHERE {_ORPHANED}""",
            (now,),
        )
        gave_up = [row[0] for row in found.rows if row[1] == _GAVE_UP]
        parents = yield from _any_children(gave_up)
        if parents:
            yield from settle_children((), sorted(parents), (), now)
        return [(row[0], row[1]) for row in found.rows]

    return Operation(steps(), immediate=True)


_RELEASED = states.next_status(JobStatus.RUNNING, Event.RELEASE).value


def reconcile(worker_id: str, held: Sequence[int]) -> Operation[int]:
    """Put back the worker's running jobs that it does not hold (claimed, but the reply
    was lost), the attempt not counted; how many."""
    keep = set(held)

    def steps() -> Steps[int]:
        found = yield Step(
            f"SELECT id FROM {JOBS} WHERE worker_id = ? AND status = '{_RUNNING}'",
            (worker_id,),
        )
        lost = [(row[0], worker_id) for row in found.rows if row[0] not in keep]
        if not lost:
            return 0
        changed = yield Step(
            f"UPDATE {JOBS} SET status = '{_RELEASED}', attempts = attempts - 1, "
            f"claims = claims - 1, worker_id = NULL "
            f"WHERE id = ? AND worker_id = ? AND status = '{_RUNNING}'",
            lost,
            many=True,
        )
        return changed.rowcount

    return Operation(steps(), immediate=True)


def prune_finished(
    older_than: float, limit: int, now: float, statuses: Sequence[JobStatus] | None = None
) -> Operation[int]:
    """Delete up to ``limit`` jobs finished (of ``statuses``; None: any) more than
    ``older_than`` seconds ago."""
    only = (
        "" if statuses is None else f"AND status IN {states.sql_status_list(frozenset(statuses))}"
    )

    def steps() -> Steps[int]:
        deleted = yield Step(
            f"DELETE FROM {JOBS} WHERE id IN (SELECT id FROM {JOBS} "
            f"WHERE {_FINISHED_ANY} {only} AND finished_at < ? LIMIT ?)",
            (now - older_than, limit),
        )
        return deleted.rowcount

    return Operation(steps(), immediate=True)


def clear_all() -> Operation[None]:
    """Forget every job and worker, and number jobs from 1 again (``memory://``
    between tests: ``soniq.testing.clear_jobs``)."""

    def steps() -> Steps[None]:
        yield Step(f"DELETE FROM {JOBS}", ())
        yield Step(f"DELETE FROM {DEPS}", ())
        yield Step(f"DELETE FROM {WORKERS}", ())
        yield Step("DELETE FROM sqlite_sequence WHERE name = ?", (JOBS,))

    return Operation(steps(), immediate=True)


def set_progress(job_id: int, claims: int, progress: float, message: str | None) -> Operation[None]:
    """Store the progress a run of a job reported (fenced by its run number: a later
    run's progress is not overwritten by an earlier one's)."""

    def steps() -> Steps[None]:
        yield Step(
            f"UPDATE {JOBS} SET progress = ?, progress_message = ? WHERE id = ? AND claims = ?",
            (progress, message, job_id, claims),
        )

    return Operation(steps(), immediate=True)


# -- the operator's calls ---------------------------------------------------------------


def page_jobs(selection: JobFilter) -> Operation[list[Job]]:
    """A page of jobs, newest first (see :class:`soniq.core.admin.JobFilter`): a walk
    down the primary key from ``before_id``."""
    where = ["id < ?"]
    params: list[Any] = [min(selection.before_id or _MAX_ID, _MAX_ID)]
    for column, value in (
        ("status", None if selection.status is None else selection.status.value),
        ("queue", selection.queue),
        ("name", selection.name),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT {JOB_COLUMNS} FROM {JOBS} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"

    def steps() -> Steps[list[Job]]:
        found = yield Step(sql, (*params, selection.limit))
        return [job_from_row(row) for row in found.rows]

    return Operation(steps(), immediate=False)


#: Back to queued, due now, with every attempt again; its last error stays until it
#: runs. Not while another active job holds its dedupe_key.
_FREE_KEY = (
    f"(j.dedupe_key IS NULL OR NOT EXISTS (SELECT 1 FROM {JOBS} AS o "
    f"WHERE o.dedupe_key = j.dedupe_key AND {states.sql_status_any(states.ACTIVE, 'o.status')}))"
)
#: A job that waited for others is retried once they are all done.
_PARENTS_DONE = (
    f"(j.parents IS NULL OR NOT EXISTS (SELECT 1 FROM {JOBS} AS p "
    "WHERE p.id IN (SELECT value FROM json_each(j.parents)) "
    f"AND p.status <> '{JobStatus.DONE.value}'))"
)
_RETRY = f"""UPDATE {JOBS} AS j SET status = '{_QUEUED}', attempts = 0, run_at = ?,
    finished_at = NULL, worker_id = NULL, cancel_requested = 0, result = NULL, waiting_for = 0
WHERE j.id = ? AND j.status IN {states.sql_status_list(RETRYABLE)} AND {_FREE_KEY}
  AND {_PARENTS_DONE}"""


def retry_jobs(job_ids: Sequence[int], now: float) -> Operation[Inserted]:
    """Put failed or cancelled jobs back in line, one per dedupe key; the ids put
    back, and their queues to wake."""

    def steps() -> Steps[Inserted]:
        retried, queues = [], set()
        for job_id in job_ids:
            if not _known_id(job_id):
                continue
            found = yield Step(f"SELECT queue FROM {JOBS} WHERE id = ?", (job_id,))
            if found.rows and (yield Step(_RETRY, (now, job_id))).rowcount:
                retried.append(job_id)
                queues.add(found.rows[0][0])
        return Inserted(retried, ",".join(sorted(queues)) or None)

    return Operation(steps(), immediate=True)


def retry_failed(
    queue: str | None, name: str | None, limit: int, now: float
) -> Operation[Inserted]:
    """Put up to ``limit`` failed jobs of ``queue`` and ``name`` (None: any) back in
    line, oldest first, one per dedupe key; the ids put back (none: nothing is left),
    and their queues to wake."""
    # As the update's conditions, so that a batch is not filled with jobs it skips.
    where, params = [f"j.status = '{JobStatus.FAILED.value}'", _FREE_KEY, _PARENTS_DONE], []
    for column, value in (("queue", queue), ("name", name)):
        if value is not None:
            where.append(f"j.{column} = ?")
            params.append(value)
    sql = f"SELECT j.id FROM {JOBS} AS j WHERE {' AND '.join(where)} ORDER BY j.id LIMIT ?"

    def steps() -> Steps[Inserted]:
        ids = [row[0] for row in (yield Step(sql, (*params, limit))).rows]
        return (yield from retry_jobs(ids, now).steps)

    return Operation(steps(), immediate=True)


def list_workers(now: float) -> Operation[list[WorkerInfo]]:
    """The registered workers, oldest first, each with the jobs it runs."""

    def steps() -> Steps[list[WorkerInfo]]:
        found = yield Step(
            f"SELECT id, hostname, pid, queues, concurrency, started_at, heartbeat_at "
            f"FROM {WORKERS} ORDER BY started_at, id"
        )
        running = yield Step(
            f"SELECT worker_id, id FROM {JOBS} WHERE status = '{_RUNNING}' ORDER BY id"
        )
        jobs: dict[str, list[int]] = {}
        for worker_id, job_id in running.rows:
            jobs.setdefault(worker_id, []).append(job_id)
        workers = []
        for worker_id, host, pid, queues, concurrency, started, beat in found.rows:
            listed = serialize.loads(queues) if queues is not None else None
            started_at, heartbeat_at = to_datetime(started), to_datetime(beat)
            assert started_at is not None and heartbeat_at is not None  # NOT NULL columns
            workers.append(
                WorkerInfo(
                    worker_id,
                    host,
                    pid,
                    tuple(listed) if listed else None,
                    concurrency,
                    started_at,
                    heartbeat_at,
                    max(0.0, now - beat),
                    tuple(jobs.get(worker_id, ())),
                )
            )
        return workers

    return Operation(steps(), immediate=False)


def queue_stats(now: float) -> Operation[list[QueueStats]]:
    """Each queue's counts by status and settings, by name (see
    :data:`soniq.core.admin.QueueRow`). One statement, so one snapshot; each arm
    reads the index of its rows alone (the claim index, the running index, migration
    8's), never done history."""
    sql = f"""
SELECT 'queued', queue, sum(run_at <= ?1), sum(run_at > ?1),
       min(CASE WHEN run_at <= ?1 THEN run_at END), NULL
FROM {JOBS} WHERE status = '{_QUEUED}' GROUP BY queue
UNION ALL
SELECT '{_RUNNING}', queue, count(*), NULL, NULL, NULL
FROM {JOBS} WHERE status = '{_RUNNING}' GROUP BY queue
UNION ALL
SELECT status, queue, count(*), NULL, NULL, NULL
FROM {JOBS} WHERE {_COUNTED_ANY}
GROUP BY queue, status
UNION ALL
SELECT 'settings', queue, paused, concurrency, rate_count, rate_period FROM {QUEUES}"""
    column = {
        JobStatus.RUNNING.value: 3,
        JobStatus.WAITING.value: 4,
        JobStatus.FAILED.value: 5,
        JobStatus.CANCELLED.value: 6,
    }

    def steps() -> Steps[list[QueueStats]]:
        rows: dict[str, list[Any]] = {}
        settings = []
        for kind, queue, a, b, c, d in (yield Step(sql, (now,))).rows:
            if kind == "settings":
                settings.append((queue, a, b, c, d))
                continue
            row = rows.setdefault(queue, [queue, 0, 0, 0, 0, 0, 0, None, False, None, None, None])
            if kind == "queued":
                row[1:3] = [a, b]
                row[7] = None if c is None else now - c
            else:
                row[column[kind]] = a
        for queue, *stored in settings:
            # A queue with no jobs is listed while it is paused or limited.
            if queue in rows or stored[0] or any(v is not None for v in stored[1:]):
                rows.setdefault(queue, [queue, 0, 0, 0, 0, 0, 0, None, False, None, None, None])[
                    8:
                ] = stored
        return queue_stats_from_rows(rows.values())

    return Operation(steps(), immediate=False)


def stats(now: float, minutes: int, queue: str | None) -> Operation[Stats]:
    """The jobs (of ``queue``; None: all) ended per minute over the last ``minutes``
    minutes at ``now``, read by a range of the finished index."""
    sql = (
        f"SELECT CAST(finished_at / 60 AS INTEGER), status, count(*) FROM {JOBS} "
        f"WHERE {_FINISHED_ANY} AND finished_at >= ? AND (? IS NULL OR queue = ?) "
        "GROUP BY 1, 2"
    )

    def steps() -> Steps[Stats]:
        found = yield Step(sql, (stats_since(now, minutes), queue, queue))
        return stats_from_rows(now, minutes, found.rows)

    return Operation(steps(), immediate=False)


def backlog_shapes() -> Operation[list[BacklogShape]]:
    """The jobs waiting to run (waiting, queued), grouped by name and argument names."""
    waiting = states.sql_status_list(frozenset({JobStatus.WAITING, JobStatus.QUEUED}))
    sql = f"""SELECT j.name, (SELECT json_group_array(key) FROM (
        SELECT key FROM json_each(j.args) ORDER BY key)) AS keys, count(*), min(j.id)
FROM {JOBS} AS j WHERE j.status IN {waiting} GROUP BY 1, 2"""

    def steps() -> Steps[list[BacklogShape]]:
        rows = (yield Step(sql)).rows
        return backlog_shapes_from_rows(rows)

    return Operation(steps(), immediate=False)
