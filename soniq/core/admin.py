"""What an operator asks of the jobs (``eq.list_jobs``, ``eq.retry_job``,
``eq.retry_failed``): the selections, checked here, that both SQL dialects run."""

from __future__ import annotations

import datetime as dt
import math

import attrs

from soniq.core.enqueue import Registry, check_queue
from soniq.core.states import FINISHED, JobStatus

#: Most jobs one page of ``list_jobs`` holds.
MAX_PAGE = 1_000
#: Jobs one statement of ``retry_failed`` puts back (it repeats until none is left).
RETRY_BATCH = 1_000
#: Statuses ``retry_job`` takes a job from.
RETRYABLE: frozenset[JobStatus] = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})


@attrs.frozen
class JobFilter:
    """A page of ``list_jobs``: jobs of ``status``, ``queue`` and ``name`` (None: any),
    newest first, at most ``limit``, with ids below ``before_id`` (None: from the
    newest): pass the last id of a page to get the next one."""

    status: JobStatus | None = None
    queue: str | None = None
    name: str | None = None
    limit: int = 50
    before_id: int | None = None


def job_filter(
    status: object = None,
    queue: object = None,
    name: object = None,
    limit: object = 50,
    before_id: object = None,
) -> JobFilter:
    """A :class:`JobFilter` of the arguments of ``list_jobs``, or an error naming the
    argument."""
    if status is not None:
        try:
            status = JobStatus(status)
        except ValueError:
            choices = ", ".join(s.value for s in JobStatus)
            raise ValueError(f"status must be one of {choices}, got {status!r}") from None
    if queue is not None:
        check_queue(queue)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a job's name (a non-empty str), got {name!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be an int from 1 to {MAX_PAGE:,}, got {limit!r}")
    if before_id is not None and (
        isinstance(before_id, bool) or not isinstance(before_id, int) or before_id < 1
    ):
        raise TypeError(f"before_id must be a job id (an int >= 1), got {before_id!r}")
    return JobFilter(status, queue, name, limit, before_id)  # type: ignore[arg-type]


@attrs.frozen
class WorkerInfo:
    """A worker as ``list_workers`` sees it: who and where, what it takes, how long
    since its last heartbeat (seconds, by the database's clock), and the ids of the
    jobs it runs."""

    id: str
    hostname: str
    pid: int
    #: The queues it takes (None: every queue).
    queues: tuple[str, ...] | None
    concurrency: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    heartbeat_age: float
    running: tuple[int, ...]


#: The oldest age ``purge_jobs`` looks back to (a thousand years, in seconds).
MAX_AGE = 1_000 * 366 * 86_400.0

#: Jobs one statement of ``purge_jobs`` deletes (it repeats until none is left).
PURGE_BATCH = 1_000


def purge_selection(older_than: object, status: object) -> tuple[float, tuple[JobStatus, ...]]:
    """The seconds and the finished statuses of ``purge_jobs(older_than=, status=)``,
    or an error naming the argument."""
    seconds = older_than.total_seconds() if isinstance(older_than, dt.timedelta) else older_than
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise ValueError(f"older_than must be seconds >= 0 or a timedelta, got {older_than!r}")
    wanted = (
        [status] if isinstance(status, (str, JobStatus)) else list(status or FINISHED)  # type: ignore[call-overload]
    )
    statuses = []
    for value in wanted:
        try:
            found = JobStatus(value)
        except ValueError:
            found = None
        if found not in FINISHED:
            raise ValueError(
                "status: purge_jobs deletes finished jobs only (done, failed, cancelled), "
                f"got {value!r}"
            )
        statuses.append(found)
    order = [s for s in JobStatus if s in statuses]
    # Nothing ended more than a few centuries ago: a longer age is that one (a date
    # that far back would overflow the database's).
    return min(float(seconds), MAX_AGE), tuple(order)


@attrs.frozen
class BacklogShape:
    """Jobs waiting to run (``waiting`` or ``queued``: scheduled and retrying ones
    too) that share a name and a set of argument names: how many, and the oldest."""

    name: str
    arguments: tuple[str, ...]
    jobs: int
    oldest_id: int


@attrs.frozen
class BacklogProblem:
    """Jobs waiting to run that the code at hand would fail (``check_backlog``):
    their name, argument names, how many, the oldest id, and why."""

    name: str
    arguments: tuple[str, ...]
    jobs: int
    oldest_id: int
    problem: str


def backlog_problems(registry: Registry, shapes: list[BacklogShape]) -> list[BacklogProblem]:
    """The shapes of the backlog that the jobs of ``registry`` cannot run: an unknown
    name, or arguments that do not fit the function's signature. By name, then
    arguments."""
    found = []
    for shape in sorted(shapes, key=lambda s: (s.name, s.arguments)):
        definition = registry.get(shape.name)
        if definition is None:
            problem: str | None = "no job of this name in the code (a worker would not claim it)"
        else:
            problem = definition.check_names(frozenset(shape.arguments))
        if problem is not None:
            found.append(
                BacklogProblem(shape.name, shape.arguments, shape.jobs, shape.oldest_id, problem)
            )
    return found
