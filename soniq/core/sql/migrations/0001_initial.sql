-- Soniq 0001: jobs and workers.
-- {schema} is replaced by the quoted schema name; nothing else is templated.

CREATE TABLE {schema}.soniq_jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text NOT NULL,
    queue            text NOT NULL,
    args             jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CONSTRAINT soniq_jobs_status_check
                     CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    priority         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT statement_timestamp(),
    attempts         integer NOT NULL DEFAULT 0,
    max_retries      integer NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    timeout          double precision CHECK (timeout > 0),
    dedupe_key       text,
    worker_id        text,
    cancel_requested boolean NOT NULL DEFAULT false,
    last_error       text,
    last_traceback   text,
    result           jsonb,
    created_at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    started_at       timestamptz,
    finished_at      timestamptz
) WITH (
    -- The table churns: every job is inserted, updated twice and pruned. Vacuum early
    -- so dead rows do not pile up in front of the claim.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- The claim reads queued rows in claim order and stops after LIMIT: one index for
-- workers of every queue, one for workers of named queues. Only queued rows are
-- indexed, so finished history never slows a claim.
CREATE INDEX soniq_jobs_claim_idx
    ON {schema}.soniq_jobs (priority DESC, run_at, id)
    WHERE status = 'queued';
CREATE INDEX soniq_jobs_claim_queue_idx
    ON {schema}.soniq_jobs (queue, priority DESC, run_at, id)
    WHERE status = 'queued';

-- dedupe_key is unique among jobs that are still queued or running.
CREATE UNIQUE INDEX soniq_jobs_dedupe_idx
    ON {schema}.soniq_jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('queued', 'running');

-- Recovery of a dead worker's jobs, and a worker's own reconciliation.
CREATE INDEX soniq_jobs_running_idx
    ON {schema}.soniq_jobs (worker_id)
    WHERE status = 'running';

-- Pruning finished jobs by age.
CREATE INDEX soniq_jobs_finished_idx
    ON {schema}.soniq_jobs (finished_at)
    WHERE status IN ('done', 'failed', 'cancelled');

CREATE TABLE {schema}.soniq_workers (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    queues       text[],
    concurrency  integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
