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
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from soniq.core import serialize, states
from soniq.core.admin import RETRYABLE, JobFilter, WorkerInfo
from soniq.core.errors import JobNotFound
from soniq.core.flow import ClaimLimits, QueueLimits, stored_queue_limits
from soniq.core.jobs import Job, JobNode, JobSpec, WorkerIdentity
from soniq.core.outcomes import Outcome
from soniq.core.states import Event, JobStatus

ParamStyle = Literal["numeric", "format"]
_DONE = states.next_status(JobStatus.RUNNING, Event.SUCCEED)
_NUMERIC = re.compile(r"\$\d+")
_MAX_BIGINT = 2**63 - 1
#: Every finished status, in the table's order.
FINISHED_ORDER = tuple(s for s in JobStatus if s in states.FINISHED)


def quote_ident(name: str) -> str:
    """Quote a schema name as a SQL identifier."""
    if not name or "\x00" in name or len(name.encode()) > 63:
        raise ValueError(f"schema must be 1-63 bytes without NUL, got {name!r}")
    return '"' + name.replace('"', '""') + '"'


def check_placeholders(sql: str) -> str:
    """Return ``sql`` if its ``$n`` placeholders are ``$1..$N``, each once, in order
    (what makes the ``%s`` rendering correct); raise otherwise."""
    numbers = [int(m[1:]) for m in _NUMERIC.findall(sql)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"placeholders must be $1..$N once each, in order: {numbers}")
    return sql


def to_format_style(sql: str) -> str:
    """Turn ``$1, $2, ...`` placeholders into ``%s`` (each is used once, in order)."""
    if "%" in sql:
        raise ValueError("statement holds a literal '%'; it would break %s placeholders")
    return _NUMERIC.sub("%s", check_placeholders(sql))


@attrs.frozen
class Query:
    """A statement and its parameters, ready for a driver to execute."""

    sql: str
    params: tuple[Any, ...]


JOB_COLUMNS = (
    "id, name, queue, args::text, status, priority, run_at, attempts, max_retries, timeout, "
    "dedupe_key, worker_id, last_error, result::text, cancel_requested, created_at, "
    "started_at, finished_at, claims, snoozes, last_traceback, array_to_json(parents)::text, "
    "waiting_for, "
    "progress, progress_message, headers::text"
)


#: What a worker needs of a claimed job, in this order (see ``soniq.worker``): then
#: its parents and the results of those that are done, as one JSON array (NULL: no
#: parents; see parent_results), and last its headers (NULL: none).
CLAIM_COLUMNS = (
    "j.id, j.name, j.queue, j.args::text, j.attempts, j.max_retries, j.timeout, j.priority, "
    "j.claims, CASE WHEN j.parents IS NULL THEN NULL ELSE json_build_array("
    "array_to_json(j.parents), coalesce((SELECT jsonb_object_agg(p.id::text, p.result) "
    f"FILTER (WHERE p.status = '{JobStatus.DONE.value}') FROM @jobs@ AS p "
    "WHERE p.id = ANY(j.parents)), '{}'))::text END AS parent_results, "
    "j.headers::text AS headers"
)
# (The results are ordered by depends_on in Python: jsonb sorts its keys, and
# ordering the aggregate by each parent's position in the array cost a callback of
# 10,000 parents a second. The status is a FILTER, not a condition of the scan, so
# that only the primary key can find the parents: with statistics from before the
# parents were done, a status condition drew the planner to the index of finished
# jobs, checked against every parent.)


#: Whether a queue's row ``q`` holds stored limits.
HAS_LIMITS = "(q.concurrency IS NOT NULL OR q.rate_count IS NOT NULL)"

#: How many queued jobs a limited claim ranks per free slot. When several jobs of one
#: group stand first in line and only one may start, the claim takes another round
#: (see soniq.drivers.postgres_async), which steps over the group, now full: cheaper
#: than ranking more candidates every time.
CANDIDATES_PER_SLOT = 1

#: The limits of a worker's jobs as the claim reads them (see ClaimLimits.spec_json).
SPEC_RECORD = "name text, concurrency int, ckey text, rate int, period float8, rkey text"


def limit_group(kind: str, limit: str, key: str, schema: str) -> str:
    """The group a job ``j`` counts in for one of its limits (spec record ``s``; see
    the function soniq_limit_group of migration 0006)."""
    return f"{schema}.soniq_limit_group('{kind}', s.{limit} IS NOT NULL, j.name, s.{key}, j.args)"


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
        claims=row[18],
        snoozes=row[19],
        traceback=row[20],
        parents=tuple(serialize.loads(row[21]) or ()),
        waiting_for=row[22],
        progress=row[23],
        progress_message=row[24],
        headers=serialize.loads(row[25]) or {},
    )


class PostgresQueries:
    """Every statement Soniq runs against one schema, rendered once for one style."""

    def __init__(self, schema: str, paramstyle: ParamStyle) -> None:
        self.schema = schema
        self.paramstyle = paramstyle
        self.channel = f"soniq:{schema}"[:63]
        #: Where the end of a job someone waits for (``wait_for``) is told: its id.
        self.done_channel = f"soniq.done:{schema}"[:63]
        channel_literal = self.channel.replace("'", "''")
        jobs = f"{quote_ident(schema)}.soniq_jobs"
        render = to_format_style if paramstyle == "format" else check_placeholders
        active = states.sql_status_list(states.ACTIVE)
        ready = JobStatus.QUEUED.value
        # One statement per enqueue call: the rows, and one NOTIFY when any of them is
        # due now, fused so an autocommit connection cannot split them. Options shared
        # by the call are parameters of their own (evaluated once); only the argument
        # array is expanded per row. A dedupe hit "updates" the existing row to itself
        # so that RETURNING yields its id.
        self._insert = render(f"""
WITH ins AS (
    INSERT INTO {jobs} AS j
        (name, queue, args, priority, run_at, max_retries, dedupe_key, timeout, headers)
    SELECT $1::text, $2::text, a.args, $3::text::int,
           coalesce($4::text::timestamptz,
                    statement_timestamp() + $5::text::float8 * interval '1 second'),
           $6::text::int, $7::text, $8::text::float8, $9::text::jsonb
    FROM jsonb_array_elements($10::text::jsonb) WITH ORDINALITY AS a(args, ord)
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
        # The same for one job, as a VALUES row: cheaper to plan and run than the
        # array expansion, and one job is the common call.
        self._insert_one = render(f"""
WITH ins AS (
    INSERT INTO {jobs} AS j
        (name, queue, args, priority, run_at, max_retries, dedupe_key, timeout, headers)
    VALUES ($1::text, $2::text, $3::text::jsonb, $4::text::int,
            coalesce($5::text::timestamptz,
                     statement_timestamp() + $6::text::float8 * interval '1 second'),
            $7::text::int, $8::text, $9::text::float8, $10::text::jsonb)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN {active}
    DO UPDATE SET dedupe_key = excluded.dedupe_key
    RETURNING j.id, j.queue, j.run_at, (j.xmax = 0) AS inserted
)
SELECT id, CASE WHEN inserted AND run_at <= statement_timestamp()
                THEN pg_notify('{channel_literal}', queue) END
FROM ins""")
        # The enqueues of several callers merged (group commit, see insert_group): each
        # row has options of its own, so each is a record of one JSON document.
        self._insert_group = render(f"""
WITH ins AS (
    INSERT INTO {jobs} AS j
        (name, queue, args, priority, run_at, max_retries, dedupe_key, timeout, headers)
    SELECT r.name, r.queue, r.args, r.priority,
           coalesce(r.run_at, statement_timestamp() + r.delay * interval '1 second'),
           r.max_retries, r.dedupe_key, r.timeout, r.headers
    FROM ROWS FROM (jsonb_to_recordset($1::text::jsonb) AS (
        name text, queue text, args jsonb, priority int, run_at timestamptz, delay float8,
        max_retries int, dedupe_key text, timeout float8, headers jsonb)) WITH ORDINALITY AS r(
        name, queue, args, priority, run_at, delay, max_retries, dedupe_key, timeout, headers,
        ord)
    ORDER BY r.ord
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN {active}
    DO UPDATE SET dedupe_key = excluded.dedupe_key
    RETURNING j.id, j.dedupe_key, j.queue, j.run_at, (j.xmax = 0) AS inserted
),
wake AS (
    SELECT CASE WHEN count(*) > 0
           THEN pg_notify('{channel_literal}', string_agg(DISTINCT queue, ',')) END
    FROM ins WHERE inserted AND run_at <= statement_timestamp()
)
SELECT ins.id, ins.dedupe_key FROM ins, wake""")
        self._get_job = render(f"SELECT {JOB_COLUMNS} FROM {jobs} WHERE id = $1::text::bigint")
        # For test assertions (soniq.testing), also on a caller's connection: a NULL
        # filter matches every row, so each parameter appears once.
        self._list_jobs = render(f"""
SELECT {JOB_COLUMNS} FROM {jobs}
WHERE status = '{ready}' AND name = coalesce($1::text, name) AND queue = coalesce($2::text, queue)
ORDER BY id""")
        cancelled = states.next_status(JobStatus.QUEUED, Event.CANCEL).value
        at_once = states.sql_status_list(states.CANCELLED_AT_ONCE)
        running = JobStatus.RUNNING.value
        cancellable = states.sql_status_list(states.CANCELLABLE)
        # A waiting or queued job is cancelled at once (its children settled); for a
        # running one the request is recorded and its worker acknowledges it.
        self._cancel = render(f"""
WITH ended AS (
    UPDATE {jobs} AS j
    SET status = CASE WHEN status IN {at_once} THEN '{cancelled}' ELSE status END,
        finished_at = CASE WHEN status IN {at_once} THEN now() ELSE finished_at END,
        cancel_requested = cancel_requested OR status = '{running}'
    WHERE id = $1::text::bigint AND status IN {cancellable}
    RETURNING j.id, j.status, j.has_children, j.awaited
){self._ended_effects()}""")
        claim_to = states.next_status(JobStatus.QUEUED, Event.CLAIM).value
        queues = f"{quote_ident(schema)}.soniq_queues"
        # Pause and resume: stored, so every worker's next claim obeys; a resume wakes
        # the workers of the queue at once. Each returns a row when it changed the state.
        self._pause = render(f"""
INSERT INTO {queues} AS q (queue, paused) VALUES ($1::text, true)
ON CONFLICT (queue) DO UPDATE SET paused = true, updated_at = now() WHERE NOT q.paused
RETURNING q.queue""")
        self._resume = render(f"""
WITH resumed AS (
    UPDATE {queues} SET paused = false, updated_at = now()
    WHERE queue = $1::text AND paused
    RETURNING queue
)
SELECT queue, pg_notify('{channel_literal}', queue) FROM resumed""")
        self._paused = f"SELECT queue FROM {queues} WHERE paused ORDER BY queue"
        # Without statistics of its status column (a table never analyzed, or analyzed
        # while empty; a TRUNCATE keeps them) the planner takes queued rows for rare:
        # the claim becomes a scan and sort of every queued row. See never_analyzed.
        # The rows are counted only then.
        schema_literal = schema.replace("'", "''")
        self._never_analyzed = render(f"""
WITH bare AS (
    SELECT NOT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = '{schema_literal}'
                       AND tablename = 'soniq_jobs' AND attname = 'status') AS none
)
SELECT none, CASE WHEN none THEN
    (SELECT count(*) FROM (SELECT 1 FROM {jobs} LIMIT $1::text::int) AS s) >= $2::text::int
    ELSE false END
FROM bare""")
        # A burst worker's last question: how soon is a job it could claim due?
        self._next_due = render(f"""
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM {jobs}
WHERE status = '{ready}'
  AND name = ANY(ARRAY(SELECT jsonb_array_elements_text($1::text::jsonb)))
  AND ($2::text::boolean
       OR queue = ANY(ARRAY(SELECT jsonb_array_elements_text($3::text::jsonb))))
  AND queue NOT IN (SELECT q.queue FROM {queues} AS q WHERE q.paused)""")
        # The claim's commit need not wait for the disk: a claim lost in a server crash
        # only puts its jobs back, which the crash does to running jobs anyway (and a
        # later durable commit, such as the completion, flushes it). The setting is
        # local to the statement's transaction, so it is safe behind PgBouncer too.
        self._claim_head = f"""
WITH @first_ready@picked AS MATERIALIZED (
    SELECT id FROM {jobs}
    WHERE @ready_rows@ @name_filter@
      AND queue NOT IN (SELECT q.queue FROM {queues} AS q WHERE q.paused @limited@)
    ORDER BY priority DESC, run_at, id
    LIMIT @limit@::text::int
    FOR UPDATE SKIP LOCKED
),
no_flush_wait AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true) AS setting
)"""
        # The start is read as the claim runs, after its snapshot (now() is when its
        # transaction began, which a wait for a lock may put before a parent's end
        # that the claim saw): a child never starts before its parent ended.
        self._claim_update = f"""
UPDATE {jobs} AS j
SET status = '{claim_to}', attempts = j.attempts + 1, claims = j.claims + 1,
    worker_id = @worker@::text, started_at = (SELECT clock_timestamp())
FROM picked, no_flush_wait WHERE j.id = picked.id
RETURNING {CLAIM_COLUMNS.replace("@jobs@", jobs)}"""
        self._render = render
        # The claims, rendered when first used (see _plain_claim and _limited_claim).
        self._claims: dict[tuple[int, bool, bool, bool, bool], str] = {}
        self._limited_claims: dict[tuple[int, tuple[str, ...], bool, int], str] = {}
        self._worker_sql(jobs, render)
        self._periodic_sql(jobs, render, channel_literal)
        self._limits_sql(render)
        self._workflow_sql(jobs, render, channel_literal)
        self._admin_sql(jobs, render, channel_literal)

    def _plain_claim(
        self, queue_mode: int, named: bool, told: bool, capped: bool, asks: bool
    ) -> str:
        """The claim of ready jobs of the queues (``queue_mode`` 0: all, 1: one, 2:
        several) and, when ``named``, of the names asked for: the worker claims only
        the names it has registered (a job no running worker knows stays queued), so
        applications can share a database and a queue. The names are a filter on the
        rows the claim index gives in order, not an index condition: known names cost
        nothing; unknown jobs ahead of known ones in the same queue are stepped over.

        ``told`` (of limits: a worker's claim, see claim_jobs), it leaves the jobs of
        limited queues to the limited claim, and when it ``asks``, says whether there
        are any: one more row, of NULLs, after the claimed ones. ``capped`` (a turn given to it for
        fairness, see ClaimOrder), it looks at the first ``scan`` ready jobs in line
        only, whatever their names: no walk past a backlog of limited jobs.

        The claim's commit need not wait for the disk: a claim lost in a server crash
        only puts its jobs back, which the crash does to running jobs anyway (and a
        later durable commit, such as the completion, flushes it). The setting is
        local to the statement's transaction, so it is safe behind PgBouncer too."""
        key = (queue_mode, named, told, capped, asks)
        sql = self._claims.get(key)
        if sql is not None:
            return sql
        ready = JobStatus.QUEUED.value
        first_ready, ready_rows = "", f"status = '{ready}' @queue_filter@ AND run_at <= now()"
        if capped:  # (an id array: looked up by primary key, never a table scan)
            jobs = f"{quote_ident(self.schema)}.soniq_jobs"
            first_ready = f"head AS MATERIALIZED ({_first_ready(jobs, 'id', '@queue_filter@')}),\n"
            ready_rows = f"id = ANY(ARRAY(SELECT id FROM head)) AND status = '{ready}'"
        head = _fill(self._claim_head, first_ready=first_ready, ready_rows=ready_rows)
        text = head + self._claim_update
        if told and asks:
            text = f"""{head},
claimed AS ({self._claim_update}
)
SELECT * FROM claimed
{self._limited_queues_row(queue_mode)}"""
        tokens = [*(["queues"] if queue_mode else []), *(["scan"] if capped else [])]
        tokens += [*(["names"] if named else []), "limit", "worker"]
        tokens += ["again"] if told and asks and queue_mode else []
        sql = self._claims[key] = self._render(
            _number(
                text,
                tokens,
                queue_filter=_queue_filter(queue_mode, "queue"),
                name_filter=f"AND name {_any_of('@names@')}" if named else "",
                limited=f"OR {HAS_LIMITS}" if told else "",
            )
        )
        return sql

    def _limited_queues_row(self, queue_mode: int) -> str:
        """The row of NULLs a claim told of limits ends with when queues of its own
        (``@again@``) have stored limits (see claimed_rows)."""
        queues = f"{quote_ident(self.schema)}.soniq_queues"
        on_q = _queue_filter(queue_mode, "q.queue", "@again@")
        return (
            "UNION ALL\nSELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL\n"
            f"WHERE EXISTS (SELECT 1 FROM {queues} AS q WHERE {HAS_LIMITS} {on_q})"
        )

    def _limited_claim(
        self, queue_mode: int, kinds: tuple[str, ...], capped: bool, candidates: int
    ) -> str:
        """The claim of jobs with limits (theirs, or their queue's): it first takes its
        turn and counts what runs (soniq_limit_usage), then takes what the limits
        leave, each group's jobs in claim order, skipping full groups (so a job that
        must wait holds up no other), and logs the starts that rate limits count.

        ``kinds`` are the groups it ranks (``cg`` job concurrency, ``rg`` job rate,
        ``qg`` and ``qrg`` the queue's): the fewer, the cheaper to plan and run. Without
        the queue's it leaves the jobs of limited queues queued. Its last row is all
        NULL when there are limited queues (as the plain claim's). ``capped``: it looks
        only at the first ``scan`` queued jobs in claim order (a turn given to it for
        fairness, see ClaimOrder, need not walk a backlog of other jobs).
        ``candidates`` is written into the statement, not a parameter: with every
        estimate known, PostgreSQL soon reuses one plan instead of planning each claim
        (a third of its time).
        """
        jobs = f"{quote_ident(self.schema)}.soniq_jobs"
        queues = f"{quote_ident(self.schema)}.soniq_queues"
        with_queues = "qg" in kinds
        schema = quote_ident(self.schema)
        ready = JobStatus.QUEUED.value
        claim_to = states.next_status(JobStatus.QUEUED, Event.CLAIM).value
        rate_log = f"{schema}.soniq_rate_log"
        rank = "row_number() OVER (PARTITION BY {grp} ORDER BY priority DESC, run_at, id)"
        caps = {"cg": "ccap", "rg": "rcap", "qg": "qcap", "qrg": "qrcap"}
        groups = [(g, caps[g]) for g in kinds]
        # Without the queue's limits, the groups of every limited queue count as full:
        # their jobs are stepped over like those of full groups (a filter the planner
        # reads as unselective, as it must, see full_groups).
        skipped_queues = (
            ""
            if with_queues
            else (
                f" || ARRAY(SELECT 'q:' || queue FROM {queues} WHERE concurrency IS NOT NULL)"
                f" || ARRAY(SELECT 'rq:' || queue FROM {queues} WHERE rate_count IS NOT NULL)"
            )
        )
        rates = "rg" in kinds or "qrg" in kinds
        log_starts = f""",
logged AS (
    INSERT INTO {rate_log} (grp, cap, source, is_queue, until)
    SELECT rg, rcap, name, false, turn.at + rperiod * interval '1 second'
    FROM claimed, turn WHERE rg IS NOT NULL
    UNION ALL
    SELECT qrg, qrcap, queue, true, turn.at + qrperiod * interval '1 second'
    FROM claimed, turn WHERE qrg IS NOT NULL
),
expired AS (
    DELETE FROM {rate_log} WHERE until <= (SELECT at FROM turn)
)"""
        rooms = ", ".join(f"c.{cap} - coalesce(u_{g}.used, 0) AS {g}_room" for g, cap in groups)
        usage_of = " ".join(f"LEFT JOIN usage AS u_{g} ON u_{g}.grp = c.{g}" for g, _ in groups)
        ranks = ", ".join(rank.format(grp=grp) + f" AS {grp}_rank" for grp, _ in groups)
        fits = " AND ".join(f"({g} IS NULL OR {g}_rank <= {g}_room)" for g, _ in groups)
        free = " AND ".join(f"(g.{g} IS NULL OR g.{g} <> ALL(f.groups))" for g in caps)
        # Each placeholder appears once, numbered in order of use (see to_format_style).
        sql = f"""
WITH doc AS MATERIALIZED (SELECT @spec@::text::jsonb AS limits),
spec AS MATERIALIZED (
    SELECT s.* FROM doc, jsonb_to_recordset(doc.limits -> 'jobs') AS s({SPEC_RECORD})
),
usage AS MATERIALIZED (
    SELECT u.* FROM doc, {schema}.soniq_limit_usage(@turn@::text::bigint, doc.limits) AS u
),
-- The groups with no room, as one array: the scan below steps over their jobs in
-- claim order (the planner reads "not one of these" as unselective, so it walks the
-- claim index and stops at the LIMIT instead of sorting every queued job).
full_groups AS MATERIALIZED (
    SELECT coalesce(array_agg(grp) FILTER (WHERE used >= cap), '{{}}'){skipped_queues} AS groups
    FROM usage
),
cand AS MATERIALIZED (
    SELECT j.id, j.priority, j.run_at, g.*
    FROM @source@ AS j
    CROSS JOIN full_groups AS f
    LEFT JOIN LATERAL (SELECT * FROM spec WHERE spec.name = j.name LIMIT 1) AS s ON true
    LEFT JOIN LATERAL (
        SELECT * FROM {queues} AS q0 WHERE q0.queue = j.queue LIMIT 1
    ) AS q ON true
    CROSS JOIN LATERAL (SELECT
        {limit_group("c", "concurrency", "ckey", schema)} AS cg, s.concurrency AS ccap,
        {limit_group("r", "rate", "rkey", schema)} AS rg, s.rate AS rcap, s.period AS rperiod,
        CASE WHEN q.concurrency IS NOT NULL THEN 'q:' || j.queue END AS qg,
        q.concurrency AS qcap,
        CASE WHEN q.rate_count IS NOT NULL THEN 'rq:' || j.queue END AS qrg,
        q.rate_count AS qrcap, q.rate_period AS qrperiod) AS g
    WHERE j.status = '{ready}' @queue_filter@
      AND j.name {_any_of("@names@")}
      AND j.run_at <= now() AND q.paused IS NOT TRUE
      AND (s.name IS NOT NULL OR {HAS_LIMITS})
      AND {free}
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT @candidates@
),
ranked AS (
    SELECT c.*, {rooms}, {ranks} FROM cand AS c {usage_of}
),
chosen AS MATERIALIZED (
    SELECT id, rg, rcap, rperiod, qrg, qrcap, qrperiod FROM ranked WHERE {fits}
    ORDER BY priority DESC, run_at, id
    LIMIT @limit@::text::int
),
-- Locked, skipping rows others hold (a caller's transaction); a row claimed since
-- this statement's snapshot is rechecked and left (the caller claims again).
picked AS MATERIALIZED (
    SELECT c.* FROM chosen AS c
    WHERE c.id IN (SELECT j.id FROM {jobs} AS j WHERE j.id IN (SELECT id FROM chosen)
                   AND j.status = '{ready}' FOR UPDATE SKIP LOCKED)
),
no_flush_wait AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true) AS setting
),
-- The time of the claim, read once its turn came (after usage): the start of its
-- jobs, and of their rate windows, as the count measured them.
turn AS MATERIALIZED (
    SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM usage) AS counted
),
claimed AS (
    UPDATE {jobs} AS j
    SET status = '{claim_to}', attempts = j.attempts + 1, claims = j.claims + 1,
        worker_id = @worker@::text, started_at = turn.at
    FROM picked, no_flush_wait, turn WHERE j.id = picked.id AND j.status = '{ready}'
    RETURNING {CLAIM_COLUMNS.replace("@jobs@", jobs)}, picked.rg, picked.rcap,
        picked.rperiod, picked.qrg, picked.qrcap, picked.qrperiod
){log_starts if rates else ""}
SELECT id, name, queue, args, attempts, max_retries, timeout, priority, claims, parent_results,
    headers
FROM claimed
{self._limited_queues_row(queue_mode)}"""
        source = f"({_first_ready(jobs, '*', '')})" if capped else jobs
        tokens = [
            "spec",
            "turn",
            *(["scan"] if capped else []),
            *(["queues"] if queue_mode else []),
        ]
        tokens += ["names", "limit", "worker", *(["again"] if queue_mode else [])]
        return _number(
            sql,
            tokens,
            source=source,
            queue_filter=_queue_filter(queue_mode, "j.queue"),
            candidates=str(candidates),
        )

    def _workflow_sql(self, jobs: str, render: Any, channel_literal: str) -> None:
        """Statements of workflows: jobs that wait for others, replacing a queued job
        by its dedupe key, waiting for a job's end, progress."""
        schema = quote_ident(self.schema)
        active = states.sql_status_list(states.ACTIVE)
        finished = states.sql_status_list(states.FINISHED)
        waiting, queued, running = (
            s.value for s in (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING)
        )
        failed, cancelled = JobStatus.FAILED.value, JobStatus.CANCELLED.value
        not_started = states.sql_status_list(frozenset({JobStatus.WAITING, JobStatus.QUEUED}))
        jobs_text = jobs.replace("'", "''")
        # Jobs and the jobs they wait for, in one statement: ids are drawn first (in
        # input order) so that each row can name its parents. Existing parents are
        # locked and marked (has_children): a parent ending at the same moment either
        # ended before (its status says so here) or waits for this commit and then
        # settles the children (see soniq_settle_children). Nothing is inserted when
        # a parent does not exist: the last row names it instead.
        self._insert_graph = render(f"""
WITH n AS MATERIALIZED (
    SELECT * FROM ROWS FROM (jsonb_to_recordset($1::text::jsonb) AS (
        name text, queue text, args jsonb, priority int, run_at timestamptz, delay float8,
        max_retries int, timeout float8, after int[], parents bigint[], run_anyway boolean,
        headers jsonb
    )) WITH ORDINALITY AS n(name, queue, args, priority, run_at, delay, max_retries, timeout,
                           after, parents, run_anyway, headers, ord)
),
new_ids AS MATERIALIZED (
    SELECT ord, nextval(pg_get_serial_sequence('{jobs_text}', 'id')) AS id
    FROM n ORDER BY ord
),
parent_rows AS MATERIALIZED (
    UPDATE {jobs} AS p SET has_children = true
    WHERE p.id = ANY(ARRAY(SELECT DISTINCT unnest(n.parents) FROM n))
    RETURNING p.id, p.status
),
node AS MATERIALIZED (
    SELECT n.*, i.id,
        ARRAY(SELECT i2.id FROM unnest(n.after) AS a(o) JOIN new_ids AS i2 ON i2.ord = a.o)
            || n.parents AS all_parents,
        ARRAY(SELECT i2.id FROM unnest(n.after) AS a(o) JOIN new_ids AS i2 ON i2.ord = a.o)
            || ARRAY(SELECT p.id FROM parent_rows AS p
                     WHERE p.id = ANY(n.parents) AND p.status NOT IN {finished}) AS pending,
        (SELECT min(p.id) FROM parent_rows AS p
         WHERE p.id = ANY(n.parents) AND p.status = '{failed}') AS failed_parent,
        (SELECT min(p.id) FROM parent_rows AS p
         WHERE p.id = ANY(n.parents) AND p.status = '{cancelled}') AS cancelled_parent,
        (SELECT min(x) FROM unnest(n.parents) AS x
         WHERE x NOT IN (SELECT p.id FROM parent_rows AS p)) AS missing
    FROM n JOIN new_ids AS i USING (ord)
),
checked AS MATERIALIZED (
    SELECT node.*,
        (failed_parent IS NOT NULL OR cancelled_parent IS NOT NULL) AND NOT run_anyway AS doomed
    FROM node WHERE NOT EXISTS (SELECT 1 FROM node WHERE missing IS NOT NULL)
),
ins AS (
    INSERT INTO {jobs} AS j
        (id, name, queue, args, priority, run_at, max_retries, timeout, status, parents,
         waiting_for, has_children, run_if_parent_fails, finished_at, last_error, headers)
    OVERRIDING SYSTEM VALUE
    SELECT id, name, queue, args, priority,
           coalesce(run_at, statement_timestamp() + delay * interval '1 second'),
           max_retries, timeout,
           CASE WHEN doomed THEN '{cancelled}'
                WHEN cardinality(pending) > 0 THEN '{waiting}' ELSE '{queued}' END,
           nullif(all_parents, '{{}}'),
           CASE WHEN doomed THEN 0 ELSE cardinality(pending) END,
           ord IN (SELECT unnest(n.after) FROM n), run_anyway,
           CASE WHEN doomed THEN now() END,
           CASE WHEN NOT doomed THEN NULL
                WHEN failed_parent IS NOT NULL
                THEN 'Cancelled: parent job ' || failed_parent || ' failed'
                ELSE 'Cancelled: parent job ' || cancelled_parent || ' was cancelled' END,
           headers
    FROM checked ORDER BY ord
    RETURNING j.id, j.queue, j.status, j.run_at
),
edges AS (
    INSERT INTO {schema}.soniq_job_deps (parent_id, child_id)
    SELECT DISTINCT p.id, c.id FROM checked AS c, unnest(c.pending) AS p(id) WHERE NOT c.doomed
),
wake AS (
    SELECT CASE WHEN count(*) > 0
           THEN pg_notify('{channel_literal}', string_agg(DISTINCT queue, ',')) END
    FROM ins WHERE status = '{queued}' AND run_at <= statement_timestamp()
)
SELECT ins.id, NULL::bigint FROM ins, wake
UNION ALL
SELECT NULL, min(missing) FROM node HAVING min(missing) IS NOT NULL""")
        # dedupe="replace": the holder of the key takes the call's arguments and options
        # if it has not started; a running one gives the key up, and the statement
        # returns no row: run again, it inserts a new job with the key (a statement
        # cannot insert the key its own update gave up: the unique check still sees
        # it). No row either when another call took the key meanwhile: again too.
        self._insert_replace = render(f"""
WITH held AS MATERIALIZED (
    SELECT id, status FROM {jobs}
    WHERE dedupe_key = $1::text AND status IN {active} FOR UPDATE
),
replaced AS (
    UPDATE {jobs} AS j SET queue = $2::text, args = $3::text::jsonb, priority = $4::text::int,
        run_at = coalesce($5::text::timestamptz,
                          statement_timestamp() + $6::text::float8 * interval '1 second'),
        max_retries = $7::text::int, timeout = $8::text::float8, headers = $9::text::jsonb
    FROM held WHERE j.id = held.id AND held.status IN {not_started}
    RETURNING j.id, j.queue, j.run_at, j.status
),
given_up AS (
    UPDATE {jobs} AS j SET dedupe_key = NULL
    FROM held WHERE j.id = held.id AND held.status = '{running}'
),
ins AS (
    INSERT INTO {jobs} AS j
        (name, queue, args, priority, run_at, max_retries, dedupe_key, timeout, headers)
    SELECT $10::text, $11::text, $12::text::jsonb, $13::text::int,
           coalesce($14::text::timestamptz,
                    statement_timestamp() + $15::text::float8 * interval '1 second'),
           $16::text::int, $17::text, $18::text::float8, $19::text::jsonb
    WHERE NOT EXISTS (SELECT 1 FROM held)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN {active}
    DO UPDATE SET queue = excluded.queue, args = excluded.args, priority = excluded.priority,
        run_at = excluded.run_at, max_retries = excluded.max_retries, timeout = excluded.timeout,
        headers = excluded.headers
    WHERE j.status IN {not_started}
    RETURNING j.id, j.queue, j.run_at, j.status
),
kept AS (SELECT * FROM replaced UNION ALL SELECT * FROM ins)
SELECT id, CASE WHEN status = '{queued}' AND run_at <= statement_timestamp()
                THEN pg_notify('{channel_literal}', queue) END
FROM kept""")
        self._mark_awaited = render(
            f"UPDATE {jobs} SET awaited = true WHERE id = $1::text::bigint AND status IN {active} "
            "RETURNING id"
        )
        self._set_progress = render(
            f"UPDATE {jobs} SET progress = $1::text::float8, progress_message = $2::text "
            "WHERE id = $3::text::bigint AND claims = $4::text::int"
        )

    def _admin_sql(self, jobs: str, render: Any, channel_literal: str) -> None:
        """Statements of the operator's calls: pages of jobs, retries."""
        active = states.sql_status_list(states.ACTIVE)
        retryable = states.sql_status_list(RETRYABLE)
        queued, failed = JobStatus.QUEUED.value, JobStatus.FAILED.value
        # Newest first, by primary key: a page is a walk down the primary key from
        # before_id, whatever the table's size (see tests/test_migrations.py). One
        # statement per set of filters given (rendered on first use): a "column =
        # coalesce(NULL, column)" for a filter not given would read to the planner as
        # selective, and it would sort the whole table instead.
        self._page_template = f"""
SELECT {JOB_COLUMNS} FROM {jobs}
WHERE id < $1::text::bigint @filters@
ORDER BY id DESC LIMIT @limit@::text::int"""
        self._pages: dict[tuple[bool, bool, bool], str] = {}
        running = JobStatus.RUNNING.value
        workers = f"{quote_ident(self.schema)}.soniq_workers"
        # Each worker with the jobs it runs (the running index, by worker).
        self._list_workers = f"""
SELECT w.id, w.hostname, w.pid, array_to_json(w.queues)::text, w.concurrency, w.started_at,
    w.heartbeat_at, extract(epoch FROM now() - w.heartbeat_at)::float8,
    array_to_json(ARRAY(SELECT j.id FROM {jobs} AS j
                        WHERE j.worker_id = w.id AND j.status = '{running}' ORDER BY j.id))::text
FROM {workers} AS w ORDER BY w.started_at, w.id"""
        # The backlog's shapes (soniq check): waiting and queued jobs grouped by name
        # and argument names, read through the claim index and the waiting rows.
        waiting = states.sql_status_list(frozenset({JobStatus.WAITING, JobStatus.QUEUED}))
        self._backlog_shapes = f"""
SELECT j.name, array_to_json(k.keys)::text, count(*), min(j.id)
FROM {jobs} AS j,
     LATERAL (SELECT coalesce(array_agg(a.key ORDER BY a.key), '{{}}') AS keys
              FROM jsonb_object_keys(j.args) AS a(key)) AS k
WHERE j.status IN {waiting}
GROUP BY j.name, k.keys"""
        # Per queue (queue_stats), each count from the index of its rows alone: queued
        # ones from the claim index, running ones from the running index, waiting,
        # failed and cancelled ones from migration 8's; done history is never read.
        # Then the queue's stored settings (see QueueRow); a queue with no jobs is
        # listed while it is paused or limited.
        queues_table = f"{quote_ident(self.schema)}.soniq_queues"
        self._queue_stats = f"""
WITH queued AS (
    SELECT queue, count(*) FILTER (WHERE run_at <= now()) AS ready,
        count(*) FILTER (WHERE run_at > now()) AS later,
        extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8 AS age
    FROM {jobs} WHERE status = '{queued}' GROUP BY queue
), running AS (
    SELECT queue, count(*) AS n FROM {jobs} WHERE status = '{running}' GROUP BY queue
), others AS (
    SELECT queue, count(*) FILTER (WHERE status = '{JobStatus.WAITING.value}') AS waiting,
        count(*) FILTER (WHERE status = '{JobStatus.FAILED.value}') AS failed,
        count(*) FILTER (WHERE status = '{JobStatus.CANCELLED.value}') AS cancelled
    FROM {jobs} WHERE status IN {states.sql_status_list(states.COUNTED_BY_QUEUE)}
    GROUP BY queue
), names AS (
    SELECT queue FROM queued UNION SELECT queue FROM running
    UNION SELECT queue FROM others
    UNION SELECT q.queue FROM {queues_table} AS q WHERE q.paused OR {HAS_LIMITS}
)
SELECT n.queue, q.ready, q.later, r.n, o.waiting, o.failed, o.cancelled, q.age,
    s.paused, s.concurrency, s.rate_count, s.rate_period
FROM names AS n LEFT JOIN queued AS q USING (queue) LEFT JOIN running AS r USING (queue)
    LEFT JOIN others AS o USING (queue) LEFT JOIN {queues_table} AS s USING (queue)
ORDER BY n.queue"""
        # Jobs ended per minute over the last $1 minutes (the current one included;
        # see soniq.core.admin.stats_since), read by a range of the finished index
        # (its predicate repeated so the planner can use it): the cost is the rows of
        # the window, not of the table. $2: one queue, or NULL.
        self._stats = render(f"""
SELECT extract(epoch FROM now())::float8, (
    SELECT coalesce(json_agg(json_build_array(m, status, n)), '[]')::text FROM (
        SELECT floor(extract(epoch FROM finished_at) / 60)::bigint AS m, status, count(*) AS n
        FROM {jobs}
        WHERE status IN {states.sql_status_list(states.FINISHED)}
            AND finished_at >= to_timestamp(
                (floor(extract(epoch FROM now()) / 60) - ($1::text::int - 1)) * 60)
            AND queue = coalesce($2::text, queue)
        GROUP BY 1, 2) AS g)""")
        # Back to queued, due now, with every attempt again; its last error stays
        # until it runs. Not while another active job holds its dedupe_key.
        free_key = (
            f"(j.dedupe_key IS NULL OR NOT EXISTS (SELECT 1 FROM {jobs} AS o "
            f"WHERE o.dedupe_key = j.dedupe_key AND o.status IN {active}))"
        )
        back = f"""UPDATE {jobs} AS j SET status = '{queued}', attempts = 0, run_at = now(),
    finished_at = NULL, worker_id = NULL, cancel_requested = false, result = NULL,
    waiting_for = 0"""
        # A job that waited for others runs again only once they are all done (or
        # gone): retry them first.
        free_key += (
            f" AND (j.parents IS NULL OR NOT EXISTS (SELECT 1 FROM {jobs} AS p "
            f"WHERE p.id = ANY(j.parents) AND p.status <> '{JobStatus.DONE.value}'))"
        )
        wake = f"""SELECT r.id, w.n FROM retried AS r, (
    SELECT CASE WHEN count(*) > 0
           THEN pg_notify('{channel_literal}', string_agg(DISTINCT queue, ',')) END AS n
    FROM retried) AS w"""
        self._retry_job = render(f"""
WITH retried AS (
    {back}
    WHERE j.id = $1::text::bigint AND j.status IN {retryable} AND {free_key}
    RETURNING j.id, j.queue
)
{wake}""")
        # A batch of failed jobs (one per dedupe key), oldest first.
        self._retry_failed = render(f"""
WITH locked AS (
    SELECT j.id, j.dedupe_key FROM {jobs} AS j
    WHERE j.status = '{failed}' AND j.queue = coalesce($1::text, j.queue)
      AND j.name = coalesce($2::text, j.name) AND {free_key}
    ORDER BY j.id LIMIT $3::text::int
    FOR UPDATE SKIP LOCKED
),
picked AS (
    SELECT DISTINCT ON (coalesce(dedupe_key, id::text)) id FROM locked
    ORDER BY coalesce(dedupe_key, id::text), id
),
retried AS (
    {back}
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.queue
)
{wake}""")

    def _ended_effects(self, columns: str = "e.id") -> str:
        """The end of a statement that moves jobs (CTE ``ended``: id, status,
        has_children, awaited): the children of those that ended are settled
        (soniq_settle_children, migration 0007), their waiters told on
        :attr:`done_channel` (500 ids a notification: a payload may hold 8,000
        bytes); it selects the ids. Both cost nothing when no ended job
        has children or waiters."""
        schema = quote_ident(self.schema)
        done, failed, cancelled = (s.value for s in (_DONE, JobStatus.FAILED, JobStatus.CANCELLED))
        finished = states.sql_status_list(states.FINISHED)
        work, told = (c.replace("'", "''") for c in (self.channel, self.done_channel))

        def ended_as(status: str) -> str:
            return f"coalesce(array_agg(id) FILTER (WHERE status = '{status}'), '{{}}')"

        return f""",
settled AS (
    SELECT CASE WHEN bool_or(has_children) THEN {schema}.soniq_settle_children(
        {ended_as(done)}, {ended_as(failed)}, {ended_as(cancelled)}, '{work}', '{told}') END
    FROM ended WHERE has_children AND status IN {finished}
),
told AS (
    SELECT count(*) AS sent FROM (
        SELECT pg_notify('{told}', string_agg(a.id::text, ',')) AS sent
        FROM (SELECT id, (row_number() OVER ()) / 500 AS chunk
              FROM ended WHERE awaited AND status IN {finished}) AS a
        GROUP BY a.chunk
    ) AS s
)
SELECT {columns} FROM ended AS e, settled, told"""

    def _limits_sql(self, render: Any) -> None:
        """Statements of stored queue limits, and what a limited claim counts."""
        schema = quote_ident(self.schema)
        queues = f"{schema}.soniq_queues"
        self.limit_turn = zlib.crc32(f"soniq.limits:{self.schema}".encode()) - 2**31
        self._set_queue_limits = render(f"""
INSERT INTO {queues} AS q (queue, concurrency, rate_count, rate_period)
VALUES ($1::text, $2::text::int, $3::text::int, $4::text::float8)
ON CONFLICT (queue) DO UPDATE SET concurrency = excluded.concurrency,
    rate_count = excluded.rate_count, rate_period = excluded.rate_period, updated_at = now()""")
        self._queue_limits = (
            f"SELECT queue, concurrency, rate_count, rate_period FROM {queues} AS q "
            f"WHERE {HAS_LIMITS} ORDER BY queue"
        )

    def _periodic_sql(self, jobs: str, render: Any, channel_literal: str) -> None:
        """Statements of the periodic scheduler (``soniq.core.schedules``)."""
        periodic = f"{quote_ident(self.schema)}.soniq_periodic"
        self._last_ticks = render(f"""
SELECT key, last_tick FROM {periodic}
WHERE key = ANY(ARRAY(SELECT jsonb_array_elements_text($1::text::jsonb)))""")
        # The tick moves forward (or is recorded) only if it is newer; the job is
        # inserted only if it moved, in the same statement: of the workers that try
        # one tick, one inserts its job.
        self._enqueue_tick = render(f"""
WITH moved AS (
    INSERT INTO {periodic} AS p (key, last_tick) VALUES ($1::text, $2::text::timestamptz)
    ON CONFLICT (key) DO UPDATE SET last_tick = excluded.last_tick
    WHERE p.last_tick < excluded.last_tick
    RETURNING p.key
),
ins AS (
    INSERT INTO {jobs} (name, queue, args, priority, max_retries, timeout, run_at)
    SELECT $3::text, $4::text, $5::text::jsonb, $6::text::int, $7::text::int,
           $8::text::float8, $9::text::timestamptz
    FROM moved WHERE $10::text::boolean
    RETURNING id, queue
)
SELECT id, pg_notify('{channel_literal}', queue) FROM ins""")

    def _worker_sql(self, jobs: str, render: Any) -> None:
        """Statements of the worker runtime; they run on Soniq's own pools only."""
        workers = f"{quote_ident(self.schema)}.soniq_workers"
        running = JobStatus.RUNNING.value
        finished = states.sql_status_list(states.FINISHED)
        requeued = states.next_status(JobStatus.RUNNING, Event.RESCUE).value
        gave_up = states.next_status(JobStatus.RUNNING, Event.FAIL).value
        done = states.next_status(JobStatus.RUNNING, Event.SUCCEED).value
        # Most outcomes are plain successes: they travel as two integer arrays, cheap
        # to build and to read; the rest (failures, retries, results, releases) as one
        # JSON document. One statement writes both. The LIMIT by a sub-select is no
        # limit: it makes the planner count the successes as 10 rows (a tenth of what
        # it counts for any set-returning function), so that it probes the primary key
        # for them rather than scanning a table of a few thousand rows (see u_fence).
        outcomes = f"""
WITH me AS MATERIALIZED (SELECT $1::text AS worker_id, '{running}'::text AS running),
ok AS MATERIALIZED (
    SELECT * FROM unnest($2::text::bigint[], $3::text::int[]) AS f(id, attempts)
    LIMIT (SELECT 2147483647)
),
u AS MATERIALIZED (
    SELECT * FROM jsonb_to_recordset($4::text::jsonb) AS x(id bigint, attempts int,
        status text, retry_in float8, error text, traceback text, result text,
        release boolean, snoozed boolean)
)"""
        # Fenced by worker and attempt: a rescued job's late finish matches no row.
        # Rows are found by primary key, one probe per outcome, whatever the statistics
        # say: drivers cache prepared statements and PostgreSQL then reuses one generic
        # plan. Status and worker are compared with sub-select values, not constants,
        # so that the running index cannot serve: its statistics say "almost empty"
        # (few jobs run at any moment) while it holds an entry for every job run since
        # the last vacuum, and a plan walking it made each flush slower than the last.
        fence = (
            "j.id = @alias@.id AND j.attempts = @alias@.attempts "
            "AND j.status = (SELECT running FROM me) AND j.worker_id = (SELECT worker_id FROM me)"
        )
        ok_fence = fence.replace("@alias@", "f")
        # The other outcomes' ids are looked up as an array too: a set-returning
        # function counts for 100 rows to the planner, and 100 probes of the primary
        # key cost more than a scan of a table of less than ~30,000 rows, so it scanned
        # the whole table at every flush, even one with no other outcome to write
        # (0.65 ms of a 1.45 ms flush of 50 successes behind 8,000 rows).
        u_fence = f"j.id = ANY(ARRAY(SELECT id FROM u)) AND {fence.replace('@alias@', 'u')}"
        update = f"""
UPDATE {jobs} AS j SET
    status = u.status,
    attempts = j.attempts - CASE WHEN u.release THEN 1 ELSE 0 END,
    claims = j.claims - CASE WHEN u.snoozed THEN 1 ELSE 0 END,
    snoozes = j.snoozes + CASE WHEN u.snoozed THEN 1 ELSE 0 END,
    run_at = CASE WHEN u.retry_in IS NULL THEN j.run_at
                  ELSE now() + u.retry_in * interval '1 second' END,
    worker_id = CASE WHEN u.status IN {finished} THEN j.worker_id END,
    finished_at = CASE WHEN u.status IN {finished} THEN now() END,
    cancel_requested = j.cancel_requested AND u.status IN {finished},
    last_error = coalesce(u.error, j.last_error),
    last_traceback = coalesce(u.traceback, j.last_traceback),
    result = u.result::jsonb
FROM u
WHERE {u_fence}"""
        ended = self._ended_effects()
        returning = "RETURNING j.id, {status} AS status, j.has_children, j.awaited"
        self._finish = render(f"""{outcomes},
ok_done AS (
    UPDATE {jobs} AS j SET status = '{done}', finished_at = now(), result = NULL
    FROM ok AS f WHERE {ok_fence}
    {returning.format(status="j.status")}
),
other AS ({update}
    {returning.format(status="j.status")}
),
ended AS (SELECT * FROM ok_done UNION ALL SELECT * FROM other){ended}""")
        # With no retention, finished rows are deleted instead of kept.
        self._finish_delete = render(f"""{outcomes},
ok_gone AS (
    DELETE FROM {jobs} AS j USING ok AS f WHERE {ok_fence}
    {returning.format(status=f"'{done}'::text")}
),
gone AS (
    DELETE FROM {jobs} AS j USING u
    WHERE {u_fence} AND u.status IN {finished}
    {returning.format(status="u.status")}
),
kept AS ({update}
    AND u.status NOT IN {finished}
    {returning.format(status="j.status")}
),
ended AS (
    SELECT * FROM ok_gone UNION ALL SELECT * FROM gone UNION ALL SELECT * FROM kept
){ended}""")
        self._register = render(f"""
INSERT INTO {workers} (id, hostname, pid, queues, concurrency)
VALUES ($1::text, $2::text, $3::text::int,
        ARRAY(SELECT jsonb_array_elements_text($4::text::jsonb)), $5::text::int)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()""")
        self._heartbeat = render(
            f"UPDATE {workers} SET heartbeat_at = now() WHERE id = $1::text RETURNING id"
        )
        self._unregister = render(f"DELETE FROM {workers} WHERE id = $1::text")
        self._cancel_requests = render(
            f"SELECT id FROM {jobs} WHERE worker_id = $1::text AND status = '{running}' "
            "AND cancel_requested"
        )
        # Jobs of workers whose heartbeat is stale, or who are not registered at all,
        # go back to the queue with the attempt counted (or fail if none is left).
        self._rescue = render(f"""
WITH dead AS (
    DELETE FROM {workers} WHERE heartbeat_at < now() - $1::text::float8 * interval '1 second'
    RETURNING id
),
ended AS (
UPDATE {jobs} AS j SET
    status = CASE WHEN j.attempts > j.max_retries THEN '{gave_up}' ELSE '{requeued}' END,
    finished_at = CASE WHEN j.attempts > j.max_retries THEN now() END,
    worker_id = CASE WHEN j.attempts > j.max_retries THEN j.worker_id END,
    last_error = 'WorkerLost: worker ' || j.worker_id || ' stopped heartbeating'
WHERE j.status = '{running}'
  AND (j.worker_id IN (SELECT id FROM dead)
       OR NOT EXISTS (SELECT 1 FROM {workers} AS w WHERE w.id = j.worker_id))
RETURNING j.id, j.status, j.has_children, j.awaited
){self._ended_effects("e.id, e.status")}""")
        # After a lost connection: running rows of ours that we do not hold were claimed
        # but never received; put them back, the attempt not counted.
        self._reconcile = render(f"""
UPDATE {jobs} SET status = '{requeued}', attempts = attempts - 1, claims = claims - 1,
    worker_id = NULL
WHERE worker_id = $1::text AND status = '{running}'
  AND NOT (id = ANY(ARRAY(SELECT jsonb_array_elements_text($2::text::jsonb)::bigint)))
RETURNING id""")
        self._prune = render(f"""
DELETE FROM {jobs} WHERE id IN (
    SELECT id FROM {jobs}
    WHERE status IN {finished}
      AND finished_at < now() - $1::text::float8 * interval '1 second'
      AND status = ANY(ARRAY(SELECT jsonb_array_elements_text($2::text::jsonb)))
    LIMIT $3::text::int
)
RETURNING id""")

    def insert_jobs(self, spec: JobSpec) -> Query:
        """Insert the jobs of one enqueue call; rows hold each new (or deduplicated) id
        (see :func:`ids_in_input_order`)."""
        if spec.parents:
            return self.insert_graph([JobNode(attrs.evolve(spec, args=(a,))) for a in spec.args])
        one = len(spec.args) == 1
        args = serialize.dumps(spec.args[0] if one else spec.args)
        headers = None if spec.headers is None else serialize.dumps(spec.headers)
        options = (
            str(spec.priority),
            _iso(spec.run_at),
            repr(spec.delay),
            str(spec.max_retries),
            spec.dedupe_key,
            None if spec.timeout is None else repr(spec.timeout),
        )
        if spec.replace:
            when = (_iso(spec.run_at), repr(spec.delay))
            rest = (str(spec.max_retries), options[-1])
            replacing = (spec.queue, args, str(spec.priority), *when, *rest, headers)
            return Query(
                self._insert_replace,
                (spec.dedupe_key, *replacing, spec.name, spec.queue, args, *options, headers),
            )
        if one:
            return Query(self._insert_one, (spec.name, spec.queue, args, *options, headers))
        return Query(self._insert, (spec.name, spec.queue, *options, headers, args))

    def insert_group(self, specs: Sequence[JobSpec]) -> Query:
        """Insert the jobs of several one-job enqueue calls in one statement (group
        commit); :func:`group_ids` reads each call's id back from its rows. Calls with
        the same ``dedupe_key`` share one row (a statement may not upsert one row
        twice), so they get the same id. Keyed rows go first, in key order: two
        statements in flight lock the keys they share in the same order, so they
        cannot deadlock."""
        keyed: dict[str, JobSpec] = {}
        for spec in specs:
            if spec.dedupe_key is not None:
                keyed.setdefault(spec.dedupe_key, spec)
        ordered = [keyed[key] for key in sorted(keyed)]
        ordered += [spec for spec in specs if spec.dedupe_key is None]
        rows = [
            {
                "name": spec.name,
                "queue": spec.queue,
                "args": spec.args[0],
                "priority": spec.priority,
                "run_at": _iso(spec.run_at),
                "delay": spec.delay,
                "max_retries": spec.max_retries,
                "dedupe_key": spec.dedupe_key,
                "timeout": spec.timeout,
                **({} if spec.headers is None else {"headers": spec.headers}),
            }
            for spec in ordered
        ]
        return Query(self._insert_group, (serialize.dumps(rows),))

    def insert_graph(self, nodes: Sequence[JobNode]) -> Query:
        """Insert jobs that wait for their parents: the existing jobs of each node's
        ``spec.parents`` and the earlier nodes of ``after``; rows as for
        :meth:`insert_jobs` (see :func:`ids_in_input_order`), or one row naming a
        parent that does not exist (and nothing inserted)."""
        rows = [
            {
                "name": node.spec.name,
                "queue": node.spec.queue,
                "args": node.spec.args[0],
                "priority": node.spec.priority,
                "run_at": _iso(node.spec.run_at),
                "delay": node.spec.delay,
                "max_retries": node.spec.max_retries,
                "timeout": node.spec.timeout,
                "after": [a + 1 for a in node.after],  # ordinalities count from 1
                "parents": list(node.spec.parents),
                "run_anyway": node.spec.run_if_parent_fails,
                **({} if node.spec.headers is None else {"headers": node.spec.headers}),
            }
            for node in nodes
        ]
        return Query(self._insert_graph, (serialize.dumps(rows),))

    def mark_awaited(self, job_id: int) -> Query:
        """Mark an active job as awaited (its end is then sent on :attr:`done_channel`);
        a row when it was active."""
        return Query(self._mark_awaited, (str(_job_id(job_id)),))

    def set_progress(self, job_id: int, claims: int, progress: float, message: str | None) -> Query:
        """Store the progress run ``claims`` of a job reported."""
        return Query(self._set_progress, (repr(progress), message, str(job_id), str(claims)))

    def listen_channel(self, *, ends: bool) -> str:
        """The channel to LISTEN on: enqueues (for workers), or with ``ends`` the ends
        of awaited jobs (for wait_for)."""
        return self.done_channel if ends else self.channel

    def page_jobs(self, selection: JobFilter) -> Query:
        """Select a page of jobs, newest first (see :class:`JobFilter`)."""
        status = None if selection.status is None else selection.status.value
        given = [
            (c, v)
            for c, v in (("status", status), ("queue", selection.queue), ("name", selection.name))
        ]
        key = (status is not None, selection.queue is not None, selection.name is not None)
        sql = self._pages.get(key)
        if sql is None:
            columns = [column for column, value in given if value is not None]
            filters = " ".join(f"AND {c} = ${n}::text" for n, c in enumerate(columns, 2))
            limit = f"${len(columns) + 2}"
            sql = self._pages[key] = self._render(
                _fill(self._page_template, filters=filters, limit=limit)
            )
        before = min(selection.before_id or _MAX_BIGINT, _MAX_BIGINT)
        values = [v for _, v in given if v is not None]
        return Query(sql, (str(before), *values, str(selection.limit)))

    def backlog_shapes(self) -> Query:
        """Select the backlog's shapes: name, argument names (JSON), count, oldest id."""
        return Query(self._backlog_shapes, ())

    def list_workers(self) -> Query:
        """Select the registered workers (see :func:`worker_from_row`)."""
        return Query(self._list_workers, ())

    def queue_stats(self) -> Query:
        """Select each queue's counts and settings (see :data:`soniq.core.admin.QueueRow`)."""
        return Query(self._queue_stats, ())

    def stats(self, minutes: int, queue: str | None) -> Query:
        """Select the database's clock (epoch seconds) and, as JSON, the jobs (of
        ``queue``; None: all) ended per minute over the last ``minutes`` minutes, as
        [minute (epoch seconds // 60), status, count] rows."""
        return Query(self._stats, (str(minutes), queue))

    def retry_job(self, job_id: int) -> Query:
        """Put a failed or cancelled job back in line (a row when it was)."""
        return Query(self._retry_job, (str(_job_id(job_id)),))

    def retry_failed(self, queue: str | None, name: str | None, limit: int) -> Query:
        """Put up to ``limit`` failed jobs (of ``queue``, ``name``) back in line; rows
        hold their ids (none: nothing left)."""
        return Query(self._retry_failed, (queue, name, str(limit)))

    def get_job(self, job_id: int) -> Query:
        """Select one job by id (no row when it does not exist)."""
        return Query(self._get_job, (str(_job_id(job_id)),))

    def list_jobs(self, name: str | None, queue: str | None) -> Query:
        """Select queued jobs (due or not), optionally of one name and/or queue, by id."""
        return Query(self._list_jobs, (name, queue))

    def cancel_job(self, job_id: int) -> Query:
        """Cancel a queued job or request cancellation of a running one (a row if so)."""
        return Query(self._cancel, (str(_job_id(job_id)),))

    def claim_jobs(
        self,
        limit: int,
        worker_id: str,
        queues: Sequence[str] | None,
        names: Sequence[str] | None = None,
        limits: ClaimLimits | None = None,
        *,
        scan: int | None = None,
        ask_queue_limits: bool = True,
    ) -> Query:
        """Claim up to ``limit`` ready jobs, by priority, then run_at, then id: of
        ``queues`` (None: every queue) and ``names`` (None: every name).

        Told of ``limits`` (a worker's claim), the claim leaves the limited jobs and
        the jobs of queues with stored limits to :meth:`claim_limited`, and with
        ``ask_queue_limits`` its last row is all NULL when there are such queues (see
        :func:`claimed_rows`); with ``scan`` too, it looks at the first ``scan``
        ready jobs only."""
        queue_mode = _queue_mode(queues)
        queue = _queue_params(queues)
        told = limits is not None
        if limits is not None and limits.jobs and names is not None:
            names = [name for name in names if name not in limits.names]
        capped = told and scan is not None and names is not None
        params = [*queue, *([str(scan)] if capped else [])]
        params += [*([serialize.dumps(list(names))] if names is not None else [])]
        # A claim told of limits names its queues twice: in the claim and in the
        # question about limited queues.
        asks = told and ask_queue_limits
        params += [str(limit), worker_id, *(queue if asks else [])]
        sql = self._plain_claim(queue_mode, names is not None, told, capped, asks)
        return Query(sql, tuple(params))

    def claim_limited(
        self,
        limit: int,
        worker_id: str,
        queues: Sequence[str] | None,
        names: Sequence[str],
        limits: ClaimLimits,
        *,
        queue_limits: bool = True,
        scan: int | None = None,
    ) -> Query:
        """Claim up to ``limit`` ready jobs of ``names`` that have limits of their own
        (``limits``) or, with ``queue_limits``, a queue with stored limits, within
        those limits (looking at the first ``scan`` ready jobs only, when given). Its
        last row is all NULL when there are queues with stored limits (see
        :func:`claimed_rows`): then claim with ``queue_limits``."""
        queue_mode = _queue_mode(queues)
        kinds = limits.kinds + (("qg", "qrg") if queue_limits else ())
        # Candidates in powers of two: few statements, each planned once (see above).
        candidates = 1 << max(0, limit * CANDIDATES_PER_SLOT - 1).bit_length()
        key = (queue_mode, kinds, scan is not None, candidates)
        sql = self._limited_claims.get(key)
        if sql is None:
            sql = self._limited_claims[key] = self._render(self._limited_claim(*key))
        params = [limits.spec_json(worker_id, kinds), str(self.limit_turn)]
        if scan is not None:
            params.append(str(scan))
        queue = _queue_params(queues)
        params += [*queue, serialize.dumps(list(names)), str(limit), worker_id]
        return Query(sql, (*params, *queue))

    def set_queue_limits(self, queue: str, limits: QueueLimits) -> Query:
        """Store the limits of ``queue`` (None: no limit)."""
        columns = (_text(value) for value in stored_queue_limits(limits))
        return Query(self._set_queue_limits, (queue, *columns))

    def queue_limits(self) -> Query:
        """Select the queues with stored limits: queue, concurrency, rate count, period."""
        return Query(self._queue_limits, ())

    def never_analyzed(self, rows: int) -> Query:
        """Select whether the job table has no statistics of its status yet (never
        analyzed, or analyzed while empty), and if so whether it holds at least
        ``rows`` rows (counted up to that)."""
        return Query(self._never_analyzed, (str(rows), str(rows)))

    def analyze(self) -> str:
        """``ANALYZE`` the job table."""
        return f"ANALYZE {quote_ident(self.schema)}.soniq_jobs"

    def pause_queue(self, queue: str) -> Query:
        """Pause ``queue`` (a row if it was not paused)."""
        return Query(self._pause, (queue,))

    def resume_queue(self, queue: str) -> Query:
        """Resume ``queue`` and wake its workers (a row if it was paused)."""
        return Query(self._resume, (queue,))

    def next_due(self, queues: Sequence[str] | None, names: Sequence[str]) -> Query:
        """Select in how many seconds the first queued job of ``queues`` (None: all)
        and ``names`` is due (negative: overdue; NULL: none), paused queues left out."""
        every = "true" if queues is None else "false"
        return Query(
            self._next_due,
            (serialize.dumps(list(names)), every, serialize.dumps(list(queues or []))),
        )

    def paused_queues(self) -> Query:
        """Select the paused queues, by name."""
        return Query(self._paused, ())

    def last_ticks(self, keys: Sequence[str]) -> Query:
        """Select (key, last tick) of the schedules of ``keys`` that have one."""
        return Query(self._last_ticks, (serialize.dumps(list(keys)),))

    def enqueue_tick(self, key: str, tick: dt.datetime, spec: JobSpec, *, enqueue: bool) -> Query:
        """Move the last tick of schedule ``key`` to ``tick`` if it is newer and then,
        with ``enqueue``, insert the job of ``spec`` (one job) due at ``tick``; a row
        holds its id when it was inserted."""
        timeout = None if spec.timeout is None else repr(spec.timeout)
        args = serialize.dumps(spec.args[0])
        return Query(
            self._enqueue_tick,
            (
                key,
                tick.isoformat(),
                spec.name,
                spec.queue,
                args,
                str(spec.priority),
                str(spec.max_retries),
                timeout,
                tick.isoformat(),
                "true" if enqueue else "false",
            ),
        )

    def finish_jobs(self, outcomes: Sequence[Outcome], worker_id: str, *, keep: bool) -> Query:
        """Write a batch of outcomes in one statement, fenced by worker and attempt;
        rows hold the ids written. With ``keep=False`` finished jobs are deleted."""
        ok_ids: list[str] = []
        ok_attempts: list[str] = []
        doc = []
        # In id order: rows are locked as listed, as a child's enqueue locks its
        # parents (fewer deadlocks between the two).
        for o in sorted(outcomes, key=lambda o: o.job_id):
            if o.status is _DONE and o.result is None and o.error is None and not o.release:
                ok_ids.append(str(o.job_id))
                ok_attempts.append(str(o.attempts))
                continue
            doc.append(
                {
                    "id": o.job_id,
                    "attempts": o.attempts,
                    "status": o.status.value,
                    "retry_in": o.retry_in,
                    "error": o.error,
                    "traceback": o.traceback,
                    "result": o.result,
                    "release": o.release,
                    "snoozed": o.snoozed,
                }
            )
        sql = self._finish if keep else self._finish_delete
        ok = ("{" + ",".join(ok_ids) + "}", "{" + ",".join(ok_attempts) + "}")
        return Query(sql, (worker_id, *ok, serialize.dumps(doc)))

    def register_worker(self, worker: WorkerIdentity) -> Query:
        """Record a worker (its heartbeat starts now)."""
        queue_list = serialize.dumps(list(worker.queues) if worker.queues is not None else [])
        return Query(
            self._register,
            (worker.id, worker.hostname, str(worker.pid), queue_list, str(worker.concurrency)),
        )

    def heartbeat(self, worker_id: str) -> Query:
        """Refresh a worker's heartbeat; no row means it was declared dead."""
        return Query(self._heartbeat, (worker_id,))

    def unregister_worker(self, worker_id: str) -> Query:
        """Forget a worker that stopped cleanly."""
        return Query(self._unregister, (worker_id,))

    def cancel_requests(self, worker_id: str) -> Query:
        """Ids of this worker's running jobs whose cancellation was requested."""
        return Query(self._cancel_requests, (worker_id,))

    def rescue_stale(self, stale_after: float) -> Query:
        """Put back the running jobs of dead workers; rows are (id, new status)."""
        return Query(self._rescue, (repr(float(stale_after)),))

    def reconcile(self, worker_id: str, held: Sequence[int]) -> Query:
        """Put back this worker's running rows that it does not hold."""
        return Query(self._reconcile, (worker_id, serialize.dumps([str(i) for i in held])))

    def prune_finished(
        self, older_than: float, limit: int, statuses: Sequence[JobStatus] = FINISHED_ORDER
    ) -> Query:
        """Delete up to ``limit`` jobs finished (of ``statuses``) more than
        ``older_than`` seconds ago."""
        wanted = serialize.dumps([s.value for s in statuses])
        return Query(self._prune, (repr(float(older_than)), wanted, str(limit)))


def ids_in_input_order(rows: Sequence[Sequence[Any]]) -> list[int]:
    """Ids returned by :meth:`PostgresQueries.insert_jobs`, in the order of the input;
    :class:`JobNotFound` when a row names a parent that does not exist (its id is
    NULL, see :meth:`PostgresQueries.insert_graph`).

    Identity values are drawn as rows are inserted, and rows are inserted in input
    order (``ORDER BY ord``), so ascending ids are input order. A dedupe hit can only
    occur in a single-job call, where order is moot.
    """
    if rows and rows[-1][0] is None:
        raise unknown_parent(rows[-1][1])
    return sorted(row[0] for row in rows)


def unknown_parent(job_id: int) -> JobNotFound:
    """The error of a ``depends_on`` naming a job that does not exist."""
    return JobNotFound(
        f"depends_on: no job has id {job_id} (a parent must be enqueued first)", job_id=job_id
    )


def worker_from_row(row: Sequence[Any]) -> WorkerInfo:
    """A row of :meth:`PostgresQueries.list_workers` as a :class:`WorkerInfo`."""
    queues = serialize.loads(row[3]) if row[3] is not None else None
    return WorkerInfo(
        id=row[0],
        hostname=row[1],
        pid=row[2],
        queues=tuple(queues) if queues else None,
        concurrency=row[4],
        started_at=row[5],
        heartbeat_at=row[6],
        heartbeat_age=max(0.0, row[7]),
        running=tuple(serialize.loads(row[8])),
    )


def parent_results(text: str | None) -> dict[int, Any] | None:
    """A claimed job's parent results, by id in the order of its ``depends_on``, from
    the claim's ``[parents, {id: result}]`` (None: the job has no parents)."""
    if text is None:
        return None
    parents, results = serialize.loads(text)
    return {p: results[str(p)] for p in parents if str(p) in results}


def group_ids(specs: Sequence[JobSpec], rows: Sequence[Sequence[Any]]) -> list[int]:
    """Each call's id from the rows of :meth:`PostgresQueries.insert_group`, in the
    order of ``specs``: a keyed call's by its key, the others' in ascending order
    (identity values are drawn as rows are inserted, in input order)."""
    by_key = {row[1]: row[0] for row in rows if row[1] is not None}
    unkeyed = iter(sorted(row[0] for row in rows if row[1] is None))
    return [by_key[s.dedupe_key] if s.dedupe_key is not None else next(unkeyed) for s in specs]


def claimed_rows(rows: Sequence[Sequence[Any]]) -> tuple[Sequence[Sequence[Any]], bool]:
    """The claimed rows of a claim told of limits, and whether queues with stored
    limits exist (its last row is then all NULL)."""
    if rows and rows[-1][0] is None:
        return rows[:-1], True
    return rows, False


def _queue_mode(queues: Sequence[str] | None) -> int:
    return 0 if queues is None else 1 if len(queues) == 1 else 2


def _queue_params(queues: Sequence[str] | None) -> list[str]:
    """The parameter of a claim's queue filter (none for every queue)."""
    if queues is None:
        return []
    return [queues[0] if len(queues) == 1 else serialize.dumps(list(queues))]


def _any_of(token: str) -> str:
    """``= ANY`` the strings of the JSON array of placeholder ``token``."""
    return f"= ANY(ARRAY(SELECT jsonb_array_elements_text({token}::text::jsonb)))"


def _queue_filter(queue_mode: int, column: str, token: str = "@queues@") -> str:
    """The condition on ``column`` for a claim's queues (see _queue_mode): one queue
    is the common case, and an equality lets the index give claim order."""
    return ("", f"AND {column} = {token}::text", f"AND {column} {_any_of(token)}")[queue_mode]


def _first_ready(jobs: str, columns: str, queue_filter: str) -> str:
    """The first ``@scan@`` ready jobs in claim order (a turn given for fairness)."""
    ready = JobStatus.QUEUED.value
    return (
        f"SELECT {columns} FROM {jobs} WHERE status = '{ready}' {queue_filter} "
        "AND run_at <= now() ORDER BY priority DESC, run_at, id LIMIT @scan@::text::int"
    )


def _number(sql: str, tokens: Sequence[str], **text: str) -> str:
    """Fill the ``text`` tokens, then number the placeholder ``tokens`` $1..$N, in
    the order they are used (see check_placeholders)."""
    return _fill(sql, **text, **{token: f"${n}" for n, token in enumerate(tokens, 1)})


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _fill(template: str, **values: str) -> str:
    """Replace ``@name@`` tokens (str.format would trip on braces in a schema name)."""
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _job_id(job_id: object) -> int:
    """A job id as the statements take it: one outside PostgreSQL's bigint names no
    job (0, which no row has), as it would on SQLite."""
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"job_id must be an int, got {job_id!r}")
    return job_id if 0 < job_id <= _MAX_BIGINT else 0
