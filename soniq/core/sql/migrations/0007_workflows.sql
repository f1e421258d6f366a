-- Soniq 0007: results and workflows (see docs/workflows.md): jobs that wait for
-- their parents, waiters told when a job ends, progress.

-- A job waiting for its parents is 'waiting' until the last one is done. (Widened
-- without a table rewrite; the validation reads the table once, in the migration's
-- transaction.)
ALTER TABLE {schema}.soniq_jobs DROP CONSTRAINT soniq_jobs_status_check;
ALTER TABLE {schema}.soniq_jobs ADD CONSTRAINT soniq_jobs_status_check
    CHECK (status IN ('waiting', 'queued', 'running', 'done', 'failed', 'cancelled')) NOT VALID;
ALTER TABLE {schema}.soniq_jobs VALIDATE CONSTRAINT soniq_jobs_status_check;

-- A waiting job holds its dedupe_key too (only active jobs are indexed: small).
DROP INDEX {schema}.soniq_jobs_dedupe_idx;
CREATE UNIQUE INDEX soniq_jobs_dedupe_idx
    ON {schema}.soniq_jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('waiting', 'queued', 'running');

-- parents: the jobs this one waited for (NULL: none); waiting_for: how many of them
-- have not ended yet; has_children: some job waits for this one, so its end settles
-- them (soniq_settle_children); run_if_parent_fails: a failed or cancelled parent
-- counts as ended instead of cancelling this job; awaited: someone waits for its end
-- (wait_for), so its end is sent on the channel 'soniq.done:<schema>'. Constant
-- defaults: no table rewrite.
ALTER TABLE {schema}.soniq_jobs
    ADD COLUMN parents bigint[],
    ADD COLUMN waiting_for integer NOT NULL DEFAULT 0,
    ADD COLUMN has_children boolean NOT NULL DEFAULT false,
    ADD COLUMN run_if_parent_fails boolean NOT NULL DEFAULT false,
    ADD COLUMN awaited boolean NOT NULL DEFAULT false,
    ADD COLUMN progress double precision,
    ADD COLUMN progress_message text;

-- The edges still to settle: one row per (parent, child) until the parent ends.
CREATE TABLE {schema}.soniq_job_deps (
    parent_id bigint NOT NULL,
    child_id  bigint NOT NULL,
    PRIMARY KEY (parent_id, child_id)
);

-- Settle the children of jobs that just ended (``done``, ``failed``, ``cancelled``):
-- a child counts one parent fewer per parent done (or ended otherwise, when it runs
-- anyway) and is queued when none is left; a child of a failed or cancelled parent is
-- cancelled, naming it, and so are its own children in turn. Called by the statements
-- that end jobs, in their transaction, only when an ended job has children.
--
-- VOLATILE: its statements see what was committed before each of them started. The
-- enqueue of a child locks its parents (it marks them has_children), so a parent's
-- end that raced with it waited for that commit: the edge is visible here, though
-- not to the snapshot of the calling statement.
CREATE OR REPLACE FUNCTION {schema}.soniq_settle_children(
    done bigint[], failed bigint[], cancelled bigint[], work_channel text, done_channel text
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    settled integer := 0;
    n integer;
    ended_now bigint[];
    woken text;
    told bigint[];
BEGIN
    WHILE cardinality(done) + cardinality(failed) + cardinality(cancelled) > 0 LOOP
        -- Children are locked in id order: two ends settling the same children
        -- cannot deadlock.
        WITH ended AS (
            SELECT d.child_id AS id,
                   count(*) FILTER (WHERE d.parent_id = ANY(done)) AS ok,
                   count(*) FILTER (WHERE NOT d.parent_id = ANY(done)) AS bad,
                   min(d.parent_id) FILTER (WHERE d.parent_id = ANY(failed)) AS failed_parent,
                   min(d.parent_id) FILTER (WHERE d.parent_id = ANY(cancelled)) AS cancelled_parent
            FROM {schema}.soniq_job_deps AS d
            WHERE d.parent_id = ANY(done || failed || cancelled)
            GROUP BY d.child_id
        ),
        locked AS (
            SELECT c.id, e.ok, e.bad, e.failed_parent, e.cancelled_parent,
                   e.bad > 0 AND NOT c.run_if_parent_fails AS doomed
            FROM {schema}.soniq_jobs AS c JOIN ended AS e ON e.id = c.id
            WHERE c.status = 'waiting'
            ORDER BY c.id
            FOR UPDATE OF c
        ),
        moved AS (
            UPDATE {schema}.soniq_jobs AS c SET
                waiting_for = CASE WHEN l.doomed THEN c.waiting_for
                                   ELSE c.waiting_for - l.ok - l.bad END,
                status = CASE
                    WHEN l.doomed THEN 'cancelled'
                    WHEN c.waiting_for - l.ok - l.bad <= 0 THEN 'queued'
                    ELSE 'waiting' END,
                finished_at = CASE WHEN l.doomed THEN now() END,
                last_error = CASE
                    WHEN NOT l.doomed THEN c.last_error
                    WHEN l.failed_parent IS NOT NULL
                    THEN 'Cancelled: parent job ' || l.failed_parent || ' failed'
                    ELSE 'Cancelled: parent job ' || l.cancelled_parent || ' was cancelled' END
            FROM locked AS l
            WHERE c.id = l.id
            RETURNING c.id, c.status, c.queue, c.run_at, c.has_children, c.awaited
        )
        SELECT count(*),
               coalesce(array_agg(m.id) FILTER (WHERE m.status = 'cancelled' AND m.has_children),
                        '{}'),
               string_agg(DISTINCT m.queue, ',') FILTER (WHERE m.status = 'queued'
                                                         AND m.run_at <= now()),
               coalesce(array_agg(m.id) FILTER (WHERE m.status = 'cancelled' AND m.awaited), '{}')
        INTO n, ended_now, woken, told
        FROM moved AS m;
        DELETE FROM {schema}.soniq_job_deps WHERE parent_id = ANY(done || failed || cancelled);
        IF woken IS NOT NULL THEN
            PERFORM pg_notify(work_channel, woken);
        END IF;
        -- 500 ids a notification: a payload may hold 8,000 bytes.
        FOR i IN 0..(cardinality(told) - 1) / 500 LOOP
            EXIT WHEN cardinality(told) = 0;
            PERFORM pg_notify(done_channel, array_to_string(told[i * 500 + 1:(i + 1) * 500], ','));
        END LOOP;
        settled := settled + n;
        done := '{}';
        failed := '{}';
        cancelled := ended_now;
    END LOOP;
    RETURN settled;
END
$$;
