-- Soniq 0002: count the runs a worker started (claims), apart from the counted
-- attempts, so that a run put back uncounted and run again can be seen.
-- A constant default: PostgreSQL adds the column without rewriting the table.

ALTER TABLE {schema}.soniq_jobs ADD COLUMN claims integer NOT NULL DEFAULT 0;
