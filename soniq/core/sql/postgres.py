"""PostgreSQL statements, rendered for either placeholder style.

asyncpg numbers its placeholders (``$1``), psycopg and psycopg2 use ``%s``. Every
statement here is written once with ``$n`` placeholders, each used exactly once and in
order, and rendered for the other style by :func:`to_format_style`.

Statements that may run on a caller's connection bind their parameters as text and
cast in SQL (``$1::text::jsonb``), select only plain types, and schema-qualify every
table: the caller's codecs and ``search_path`` are not ours to trust.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from soniq.core import serialize, states
from soniq.core.jobs import Job, JobSpec
from soniq.core.states import Event, JobStatus

ParamStyle = Literal["numeric", "format"]
_NUMERIC = re.compile(r"\$\d+")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def quote_ident(name: str) -> str:
    """Quote a schema name as a SQL identifier."""
    if not name or "\x00" in name or len(name.encode()) > 63:
        raise ValueError(f"schema must be 1-63 bytes without NUL, got {name!r}")
    return '"' + name.replace('"', '""') + '"'


def to_format_style(sql: str) -> str:
    """Turn ``$1, $2, ...`` placeholders into ``%s`` (each is used once, in order)."""
    if "%" in sql:
        raise ValueError("statement holds a literal '%'; it would break %s placeholders")
    return _NUMERIC.sub("%s", sql)


@attrs.frozen
class Query:
    """A statement and its parameters, ready for a driver to execute."""

    sql: str
    params: tuple[Any, ...]


JOB_COLUMNS = (
    "id, name, queue, args::text, status, priority, run_at, attempts, max_retries, timeout, "
    "dedupe_key, worker_id, last_error, result::text, cancel_requested, created_at, "
    "started_at, finished_at"
)


def job_from_row(row: Sequence[Any]) -> Job:
    """Map a row selected with :data:`JOB_COLUMNS` to a :class:`Job`."""
    return Job(
        id=row[0],
        name=row[1],
        queue=row[2],
        args=serialize.loads(row[3]),
        status=JobStatus(row[4]),
        priority=row[5],
        run_at=row[6],
        attempts=row[7],
        max_retries=row[8],
        timeout=row[9],
        dedupe_key=row[10],
        worker_id=row[11],
        last_error=row[12],
        result=serialize.loads(row[13]),
        cancel_requested=row[14],
        created_at=row[15],
        started_at=row[16],
        finished_at=row[17],
    )


class PostgresQueries:
    """Every statement Soniq runs against one schema, rendered once for one style."""

    def __init__(self, schema: str, paramstyle: ParamStyle) -> None:
        self.schema = schema
        self.paramstyle = paramstyle
        self.channel = f"soniq:{schema}"[:63]
        channel_literal = self.channel.replace("'", "''")
        jobs = f"{quote_ident(schema)}.soniq_jobs"
        render = to_format_style if paramstyle == "format" else (lambda sql: sql)
        active = states.sql_status_list(states.ACTIVE)
        ready = JobStatus.QUEUED.value
        # One statement per enqueue call: the rows, and one NOTIFY when any of them is
        # due now, fused so an autocommit connection cannot split them. A dedupe hit
        # "updates" the existing row to itself so RETURNING yields its id.
        self._insert = render(f"""
WITH doc AS (SELECT $1::text::jsonb AS d),
ins AS (
    INSERT INTO {jobs} AS j
        (name, queue, args, priority, run_at, max_retries, dedupe_key, timeout)
    SELECT d->>'name', d->>'queue', a.args, (d->>'priority')::int,
           coalesce((d->>'run_at')::timestamptz,
                    statement_timestamp() + (d->>'delay')::float8 * interval '1 second'),
           (d->>'max_retries')::int, d->>'dedupe_key', (d->>'timeout')::float8
    FROM doc, jsonb_array_elements(d->'args') WITH ORDINALITY AS a(args, ord)
    ORDER BY a.ord
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN {active}
    DO UPDATE SET dedupe_key = excluded.dedupe_key
    RETURNING j.id, j.queue, j.run_at, (j.xmax = 0) AS inserted
),
wake AS (
    SELECT CASE WHEN count(*) > 0
           THEN pg_notify('{channel_literal}', string_agg(DISTINCT queue, ',')) END
    FROM ins WHERE inserted AND run_at <= statement_timestamp()
)
SELECT ins.id FROM ins, wake""")
        self._get_job = render(f"SELECT {JOB_COLUMNS} FROM {jobs} WHERE id = $1::text::bigint")
        queued_to = states.next_status(JobStatus.QUEUED, Event.CANCEL).value
        running = JobStatus.RUNNING.value
        cancellable = states.sql_status_list(states.CANCELLABLE)
        # A queued job is cancelled at once; for a running one the request is recorded
        # and its worker acknowledges it.
        self._cancel = render(f"""
UPDATE {jobs}
SET status = CASE WHEN status = '{ready}' THEN '{queued_to}' ELSE status END,
    finished_at = CASE WHEN status = '{ready}' THEN now() ELSE finished_at END,
    cancel_requested = cancel_requested OR status = '{running}'
WHERE id = $1::text::bigint AND status IN {cancellable}
RETURNING id""")
        claim_to = states.next_status(JobStatus.QUEUED, Event.CLAIM).value
        claim_body = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM {jobs}
    WHERE status = '{ready}' @queue_filter@ AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT @limit@::text::int
    FOR UPDATE SKIP LOCKED
)
UPDATE {jobs} AS j
SET status = '{claim_to}', attempts = j.attempts + 1, worker_id = @worker@::text,
    started_at = now()
FROM picked WHERE j.id = picked.id
RETURNING {", ".join("j." + c for c in JOB_COLUMNS.split(", "))}"""
        queue_filter = "AND queue = ANY(ARRAY(SELECT jsonb_array_elements_text($1::text::jsonb)))"
        self._claim_all = render(_fill(claim_body, queue_filter="", limit="$1", worker="$2"))
        self._claim_queues = render(
            _fill(claim_body, queue_filter=queue_filter, limit="$2", worker="$3")
        )

    def insert_jobs(self, spec: JobSpec) -> Query:
        """Insert the jobs of one enqueue call; rows hold each new (or deduplicated) id."""
        doc = {
            "name": spec.name,
            "queue": spec.queue,
            "priority": spec.priority,
            "run_at": _iso(spec.run_at),
            "delay": spec.delay,
            "max_retries": spec.max_retries,
            "dedupe_key": spec.dedupe_key,
            "timeout": spec.timeout,
            "args": spec.args,
        }
        return Query(self._insert, (serialize.dumps(doc),))

    def get_job(self, job_id: int) -> Query:
        """Select one job by id (no row when it does not exist)."""
        return Query(self._get_job, (str(_job_id(job_id)),))

    def cancel_job(self, job_id: int) -> Query:
        """Cancel a queued job or request cancellation of a running one (a row if so)."""
        return Query(self._cancel, (str(_job_id(job_id)),))

    def claim_jobs(self, limit: int, worker_id: str, queues: Sequence[str] | None) -> Query:
        """Claim up to ``limit`` ready jobs, by priority, then run_at, then id."""
        if queues is None:
            return Query(self._claim_all, (str(limit), worker_id))
        return Query(self._claim_queues, (serialize.dumps(list(queues)), str(limit), worker_id))


def ids_in_input_order(rows: Sequence[Sequence[Any]]) -> list[int]:
    """Ids returned by :meth:`PostgresQueries.insert_jobs`, in the order of the input.

    Identity values are drawn as rows are inserted, and rows are inserted in input
    order (``ORDER BY ord``), so ascending ids are input order. A dedupe hit can only
    occur in a single-job call, where order is moot.
    """
    return sorted(row[0] for row in rows)


def _fill(template: str, **values: str) -> str:
    """Replace ``@name@`` tokens (str.format would trip on braces in a schema name)."""
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _job_id(job_id: object) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"job_id must be an int, got {job_id!r}")
    return job_id
