-- Soniq 0005: how many times a job snoozed (raised soniq.Snooze): back to queued,
-- its run not counted. A constant default: no table rewrite.

ALTER TABLE {schema}.soniq_jobs ADD COLUMN snoozes integer NOT NULL DEFAULT 0;
