-- Soniq 0004: settings of a queue that every worker obeys, stored in the database:
-- a paused queue's jobs are not claimed (enqueues are still accepted).

CREATE TABLE {schema}.soniq_queues (
    queue      text PRIMARY KEY,
    paused     boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
