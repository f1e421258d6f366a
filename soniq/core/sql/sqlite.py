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
from soniq.core.errors import SchemaNotReadyError
from soniq.core.flow import (
    ClaimLimits,
    QueueLimits,
    queue_limits_by_name,
    stored_queue_limits,
)
from soniq.core.jobs import Claimed, Job, JobSpec, WorkerIdentity
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
_ALL = states.sql_status_list(frozenset(JobStatus))
_ACTIVE = states.sql_status_list(states.ACTIVE)
_FINISHED = states.sql_status_list(states.FINISHED)
_CANCELLABLE = states.sql_status_list(states.CANCELLABLE)

JOBS = "soniq_jobs"
WORKERS = "soniq_workers"
PERIODIC = "soniq_periodic"
QUEUES = "soniq_queues"
RATE_LOG = "soniq_rate_log"


@attrs.frozen
class Migration:
    """One schema version: its DDL, one statement per item (a driver must not use
    ``executescript``, which would commit the migration's transaction)."""

    version: int
    name: str
    statements: tuple[str, ...]


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
    status           TEXT NOT NULL DEFAULT '{_QUEUED}' CHECK (status IN {_ALL}),
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
            # The claim reads queued rows in claim order and stops after its LIMIT: one
            # index for workers of every queue, one for workers of one queue. Only
            # queued rows are indexed, so finished history never slows a claim.
            f"CREATE INDEX soniq_jobs_claim_idx ON {JOBS} (priority DESC, run_at, id) "
            f"WHERE status = '{_QUEUED}'",
            f"CREATE INDEX soniq_jobs_claim_queue_idx ON {JOBS} "
            f"(queue, priority DESC, run_at, id) WHERE status = '{_QUEUED}'",
            # dedupe_key is unique among jobs that are still queued or running.
            f"CREATE UNIQUE INDEX soniq_jobs_dedupe_idx ON {JOBS} (dedupe_key) "
            f"WHERE dedupe_key IS NOT NULL AND status IN {_ACTIVE}",
            # Recovery of dead workers' jobs, reconciliation, cancellation requests.
            f"CREATE INDEX soniq_jobs_running_idx ON {JOBS} (worker_id) "
            f"WHERE status = '{_RUNNING}'",
            # Pruning finished jobs by age.
            f"CREATE INDEX soniq_jobs_finished_idx ON {JOBS} (finished_at) "
            f"WHERE status IN {_FINISHED}",
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
    "started_at, finished_at, claims, snoozes"
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


def insert_jobs(spec: JobSpec, now: float) -> Operation[Inserted]:
    """Insert the jobs of one enqueue call; ids in input order. A ``dedupe_key`` held by
    a queued or running job returns that job's id and inserts nothing."""
    run_at = spec.run_at.timestamp() if spec.run_at is not None else now + spec.delay
    shared = (spec.priority, run_at, spec.max_retries, spec.dedupe_key, spec.timeout, now)
    values = [(spec.name, spec.queue, serialize.dumps(args), *shared) for args in spec.args]
    wake = spec.queue if run_at <= now else None
    if len(values) == 1 and spec.dedupe_key is None:
        # One job without a dedupe key is one INSERT: no BEGIN IMMEDIATE needed.
        return Operation(_insert_one(values[0], wake), immediate=False)

    def steps() -> Steps[Inserted]:
        if spec.dedupe_key is not None:
            # Under the write lock: nobody can insert the key between this and the insert
            # (and the partial unique index would refuse it anyway).
            held = yield Step(
                f"SELECT id FROM {JOBS} WHERE dedupe_key = ? AND status IN {_ACTIVE}",
                (spec.dedupe_key,),
            )
            if held.rows:
                return Inserted([held.rows[0][0]], None)
            if len(values) == 1:
                return (yield from _insert_one(values[0], wake))
        yield Step(INSERT_JOB, values, many=True)
        last = (yield Step("SELECT last_insert_rowid()")).rows[0][0]
        # With AUTOINCREMENT each new row gets max(ever used) + 1, and the write lock is
        # held, so the rows of this call have consecutive ids, in input order.
        ids = list(range(last - len(values) + 1, last + 1))
        return Inserted(ids, wake)

    return Operation(steps(), immediate=True)


def _insert_one(values: tuple[Any, ...], wake: str | None) -> Steps[Inserted]:
    inserted = yield Step(INSERT_JOB, values)
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
_CANCEL = f"""UPDATE {JOBS}
SET status = CASE WHEN status = '{_QUEUED}' THEN '{_CANCEL_TO}' ELSE status END,
    finished_at = CASE WHEN status = '{_QUEUED}' THEN ? ELSE finished_at END,
    cancel_requested = (cancel_requested OR status = '{_RUNNING}')
WHERE id = ? AND status IN {_CANCELLABLE}"""


def cancel_job(job_id: int, now: float) -> Operation[bool]:
    """Cancel a queued job at once, or record the request for a running one (its
    worker acknowledges it); False when the job is unknown or finished."""
    known = _known_id(job_id)

    def steps() -> Steps[bool]:
        if not known:
            return False
        changed = yield Step(_CANCEL, (now, job_id))
        return changed.rowcount > 0

    return Operation(steps(), immediate=True)


# -- the worker ----------------------------------------------------------------------

_CLAIM_TO = states.next_status(JobStatus.QUEUED, Event.CLAIM).value
_CLAIM_SELECT = f"""SELECT id, name, queue, args, attempts, max_retries, timeout, claims
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
        j.priority, j.run_at,
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
SELECT id, name, queue, args, attempts, max_retries, timeout, claims,
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
        return claimed

    return Operation(steps(), immediate=True)


def _claimed(rows: Sequence[Sequence[Any]], *, limited: bool = False) -> list[Claimed]:
    return [
        Claimed(r[0], r[1], r[2], serialize.loads(r[3]), r[4] + 1, r[5], r[6], r[7] + 1, limited)
        for r in rows
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
    starts = [(r[8], now + r[9]) for r in found if r[8] is not None]
    starts += [(r[10], now + r[11]) for r in found if r[10] is not None]
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
) -> Operation[int]:
    """Write a batch of outcomes in one transaction, each fenced by worker and attempt;
    with ``keep=False`` finished jobs are deleted. Returns how many rows were written."""
    updates, deletes = [], []
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

    def steps() -> Steps[int]:
        written = 0
        if updates:
            written += (yield Step(_FINISH_UPDATE, updates, many=True)).rowcount
        if deletes:
            written += (yield Step(_FINISH_DELETE, deletes, many=True)).rowcount
        return written

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


def prune_finished(older_than: float, limit: int, now: float) -> Operation[int]:
    """Delete up to ``limit`` jobs finished more than ``older_than`` seconds ago."""

    def steps() -> Steps[int]:
        deleted = yield Step(
            f"DELETE FROM {JOBS} WHERE id IN (SELECT id FROM {JOBS} "
            f"WHERE status IN {_FINISHED} AND finished_at < ? LIMIT ?)",
            (now - older_than, limit),
        )
        return deleted.rowcount

    return Operation(steps(), immediate=True)


def clear_all() -> Operation[None]:
    """Forget every job and worker, and number jobs from 1 again (``memory://``
    between tests: ``soniq.testing.clear_jobs``)."""

    def steps() -> Steps[None]:
        yield Step(f"DELETE FROM {JOBS}", ())
        yield Step(f"DELETE FROM {WORKERS}", ())
        yield Step("DELETE FROM sqlite_sequence WHERE name = ?", (JOBS,))

    return Operation(steps(), immediate=True)
