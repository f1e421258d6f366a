-- Soniq 0008: what operators read, and context carried from enqueue to run.
--
-- queue_stats counts waiting, failed and cancelled jobs per queue from this index of
-- those rows alone, so the count never walks the history of done jobs (queued ones
-- come from the claim index, running ones from the running index).
CREATE INDEX soniq_jobs_queue_status_idx
    ON {schema}.soniq_jobs (queue, status)
    WHERE status IN ('waiting', 'failed', 'cancelled');

-- Headers carried with a job from the process that enqueued it to its runs (string
-- keys and values; e.g. the W3C trace context of OpenTelemetry). NULL: none. A
-- nullable column without default: no table rewrite.
ALTER TABLE {schema}.soniq_jobs ADD COLUMN headers jsonb;
