"""Job statuses and the transition table.

Rule 1: everything that decides whether a job may move from one status to another
lives here, in ``TRANSITIONS``. SQL builders and backends ask this module which
statuses an event applies to; they never spell a status list themselves.

A job is ``waiting`` (for its parents, see ``depends_on``), ``queued`` (this includes
a future ``run_at`` and a retry waiting for its back-off), ``running`` (claimed by a
worker), or finished: ``done``, ``failed`` (retries exhausted or not retryable) or
``cancelled``.
"""

from __future__ import annotations

import enum

from soniq.core.errors import InvalidTransition


class JobStatus(str, enum.Enum):
    """Where a job is in its life."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    """What can happen to a job."""

    CLAIM = "claim"  # a worker takes a ready job
    SUCCEED = "succeed"  # the job returned
    RETRY = "retry"  # the job raised and has attempts left
    FAIL = "fail"  # the job raised with no attempts left, or must not retry
    CANCEL = "cancel"  # a user asked to cancel a job that has not started
    ACK_CANCEL = "ack_cancel"  # a worker stopped a running job whose cancel was requested
    RESCUE = "rescue"  # its worker died: put back, attempt counted
    RELEASE = "release"  # graceful shutdown: put back, attempt not counted
    SNOOZE = "snooze"  # the job asked to run later: put back, attempt not counted
    PARENTS_DONE = "parents_done"  # the last of a waiting job's parents is done
    PARENT_FAILED = "parent_failed"  # a parent failed or was cancelled: the child too


W, Q, R = JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING
D, F, C = JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED

#: {current status: {event: next status}}. A missing entry is an illegal move.
TRANSITIONS: dict[JobStatus, dict[Event, JobStatus]] = {
    W: {Event.PARENTS_DONE: Q, Event.PARENT_FAILED: C, Event.CANCEL: C},
    Q: {Event.CLAIM: R, Event.CANCEL: C},
    R: {
        Event.SUCCEED: D,
        Event.RETRY: Q,
        Event.FAIL: F,
        Event.ACK_CANCEL: C,
        Event.RESCUE: Q,
        Event.RELEASE: Q,
        Event.SNOOZE: Q,
    },
    D: {},
    F: {},
    C: {},
}

FINISHED: frozenset[JobStatus] = frozenset(s for s, moves in TRANSITIONS.items() if not moves)
#: Statuses in which a job still holds its ``dedupe_key``.
ACTIVE: frozenset[JobStatus] = frozenset(JobStatus) - FINISHED
#: Statuses a cancel request applies to: waiting and queued jobs are cancelled at once,
#: running jobs get the request recorded and stop when their worker acknowledges it.
CANCELLABLE: frozenset[JobStatus] = frozenset({W, Q, R})
#: Statuses ``queue_stats`` counts per queue besides queued and running: through
#: migration 8's partial index on PostgreSQL, whose predicate lists the same ones.
COUNTED_BY_QUEUE: frozenset[JobStatus] = frozenset({W, F, C})
#: Statuses cancelled at once by a cancel request (no worker to acknowledge it).
CANCELLED_AT_ONCE: frozenset[JobStatus] = frozenset(
    s for s, moves in TRANSITIONS.items() if Event.CANCEL in moves
)
#: Finished statuses that are not success: a child of such a parent is cancelled
#: (or, when it asked to run anyway, counts the parent as ended).
UNSUCCESSFUL: frozenset[JobStatus] = FINISHED - {D}


def next_status(status: JobStatus, event: Event) -> JobStatus:
    """The status after ``event``, or :class:`InvalidTransition` if the move is illegal."""
    try:
        return TRANSITIONS[status][event]
    except KeyError:
        raise InvalidTransition(
            f"can't apply event {event.value!r} to a job whose status is {status.value!r}"
        ) from None


def sources(event: Event) -> frozenset[JobStatus]:
    """Every status from which ``event`` is a legal move."""
    return frozenset(s for s, moves in TRANSITIONS.items() if event in moves)


def sql_status_list(statuses: frozenset[JobStatus]) -> str:
    """A SQL list literal of statuses, in a stable order, for builders."""
    return "(" + ", ".join(f"'{s.value}'" for s in JobStatus if s in statuses) + ")"


def sql_status_any(statuses: frozenset[JobStatus], column: str = "status") -> str:
    """``column`` is one of ``statuses``, as equalities joined by OR, in a stable order.

    SQLite evaluates an ``IN`` list by building a table for it, once per statement:
    in a CHECK or a partial index's predicate, that is once per ``INSERT``. A query
    that should use a partial index written this way must write the same expression
    (SQLite matches predicates by their form)."""
    return "(" + " OR ".join(f"{column} = '{s.value}'" for s in JobStatus if s in statuses) + ")"
