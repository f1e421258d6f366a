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
    grp   text NOT NULL,
    cap   integer NOT NULL,
    until timestamptz NOT NULL
);
CREATE INDEX soniq_rate_log_until_idx ON {schema}.soniq_rate_log (until);

-- What the claims of limited jobs count (per group: used, and the limit), read after
-- taking their turn: a VOLATILE
-- function's statements see what was committed before they started, so each claim
-- counts what the claim before it took (a statement's own snapshot predates the lock).
-- The query is built by Soniq (soniq.core.sql.postgres) and reads the limits as $1.
CREATE OR REPLACE FUNCTION {schema}.soniq_limit_usage(turn bigint, query text, limits jsonb)
RETURNS TABLE (grp text, used bigint, cap integer)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(turn);
    RETURN QUERY EXECUTE query USING limits;
END
$$;
