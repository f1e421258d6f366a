-- Soniq 0006: concurrency and rate limits (see soniq.core.flow).
-- A queue's stored limits; NULL: no limit.
ALTER TABLE {schema}.soniq_queues
    ADD COLUMN concurrency integer CHECK (concurrency > 0),
    ADD COLUMN rate_count integer CHECK (rate_count > 0),
    ADD COLUMN rate_period double precision CHECK (rate_period > 0),
    ALTER COLUMN paused SET DEFAULT false;

-- The sliding windows of rate limits: one row per start of a rate-limited job (with
-- its limit's count), kept until its window ends. Small: a limit's count per group.
CREATE TABLE {schema}.soniq_rate_log (
    grp      text NOT NULL,
    cap      integer NOT NULL,
    source   text NOT NULL,
    is_queue boolean NOT NULL,
    until    timestamptz NOT NULL
);
CREATE INDEX soniq_rate_log_until_idx ON {schema}.soniq_rate_log (until);

-- The group a job counts in for one of its limits: the job's name, with the JSON of
-- its key argument when the limit is per key (a missing argument is null); NULL when
-- the limit is not set. (A SQL function: the planner inlines it.)
CREATE OR REPLACE FUNCTION {schema}.soniq_limit_group(
    kind text, is_set boolean, job text, key text, args jsonb
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN is_set THEN kind || ':' || job || CASE WHEN key IS NULL THEN ''
           ELSE ':' || coalesce(args -> key, 'null'::jsonb)::text END END
$$;

-- What the claims of limited jobs count, per group (jobs running, or starts in the
-- rate window; and the limit), read after taking their turn: a VOLATILE function's
-- statements see what was committed before they started, so each claim counts what
-- the claim before it took (a statement's own snapshot predates the lock). limits:
-- soniq.core.flow.ClaimLimits.spec_json (the limits of the worker's jobs, and its runs
-- that have ended, their outcome not written yet: not counted).
CREATE OR REPLACE FUNCTION {schema}.soniq_limit_usage(turn bigint, limits jsonb)
RETURNS TABLE (grp text, used bigint, cap integer)
LANGUAGE plpgsql VOLATILE ROWS 10 AS $$
DECLARE
    -- The worker's runs that have ended, their outcome not written: not counted.
    me text := limits ->> 'worker';
    ended_ids bigint[] := ARRAY(SELECT (e ->> 0)::bigint
                                FROM jsonb_array_elements(limits -> 'ended') AS e);
    ended_runs int[] := ARRAY(SELECT (e ->> 1)::int
                              FROM jsonb_array_elements(limits -> 'ended') AS e);
    now_counted timestamptz;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE the count would come from the snapshot
    -- taken before the lock: refuse rather than overrun a limit.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'soniq: limited claims need READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING HINT = 'set default_transaction_isolation to read committed for Soniq''s role';
    END IF;
    PERFORM pg_advisory_xact_lock(turn);
    now_counted := clock_timestamp();  -- the window's end is measured after the wait
    -- Only the kinds of limit the claim ranks (limits -> 'kinds'); each RETURN QUERY
    -- takes a snapshot of its own, after the lock, as the count needs.
    IF limits -> 'kinds' ? 'cg' THEN
        RETURN QUERY
        SELECT u.grp, count(*), min(u.cap) FROM (
            SELECT {schema}.soniq_limit_group(
                       'c', s.concurrency IS NOT NULL, j.name, s.ckey, j.args),
                   s.concurrency
            FROM {schema}.soniq_jobs AS j
            JOIN jsonb_to_recordset(limits -> 'jobs') AS s(name text, concurrency int, ckey text)
              ON s.name = j.name
            WHERE j.status = 'running' AND s.concurrency IS NOT NULL
              AND NOT (j.worker_id = me AND (j.id, j.claims) IN (
                  SELECT e.id, e.run FROM unnest(ended_ids, ended_runs) AS e (id, run)))
        ) AS u (grp, cap) GROUP BY u.grp;
    END IF;
    IF limits -> 'kinds' ? 'qg' THEN
        RETURN QUERY
        SELECT 'q:' || j.queue, count(*), min(q.concurrency)
        FROM {schema}.soniq_jobs AS j JOIN {schema}.soniq_queues AS q ON q.queue = j.queue
        WHERE j.status = 'running' AND q.concurrency IS NOT NULL
          AND NOT (j.worker_id = me AND (j.id, j.claims) IN (
              SELECT e.id, e.run FROM unnest(ended_ids, ended_runs) AS e (id, run)))
        GROUP BY j.queue;
    END IF;
    IF limits -> 'kinds' ? 'rg' OR limits -> 'kinds' ? 'qrg' THEN
        -- A rate's limit is the one in force now (the log's is the fallback, for a
        -- job this worker does not know the limit of).
        RETURN QUERY
        SELECT l.grp, count(*),
               min(coalesce(CASE WHEN l.is_queue THEN q.rate_count ELSE s.rate END, l.cap))
        FROM {schema}.soniq_rate_log AS l
        LEFT JOIN jsonb_to_recordset(limits -> 'jobs') AS s(name text, rate int)
          ON NOT l.is_queue AND s.name = l.source
        LEFT JOIN {schema}.soniq_queues AS q ON l.is_queue AND q.queue = l.source
        WHERE l.until > now_counted
        GROUP BY l.grp;
    END IF;
END
$$;
