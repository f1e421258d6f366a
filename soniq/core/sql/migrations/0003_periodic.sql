-- Soniq 0003: periodic jobs. The last tick of each schedule that was enqueued (or
-- skipped as missed); a worker enqueues a tick only by moving it forward, in the
-- same statement, so each tick is enqueued once however many workers schedule.

CREATE TABLE {schema}.soniq_periodic (
    key       text PRIMARY KEY,
    last_tick timestamptz NOT NULL
);
