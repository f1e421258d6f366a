"""What an operator asks of the jobs (``eq.list_jobs``, ``eq.retry_job``,
``eq.queue_stats``, ``eq.stats``, ...): the selections, checked here, that both SQL
dialects run, and the shapes of their answers."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from soniq.core import serialize
from soniq.core.enqueue import Registry, check_queue
from soniq.core.flow import queue_limits_by_name
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


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """A duration as operators write it, ``90s``, ``30m``, ``12h``, ``7d`` or plain
    seconds (``1.5``), in seconds (>= 0); ValueError for anything else. What ``soniq
    purge --older-than`` and the dashboard's purge form take."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"expected a duration such as 90s, 30m, 12h or 7d, got {text!r}")
    return value


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


def backlog_shapes_from_rows(rows: Iterable[Sequence[Any]]) -> list[BacklogShape]:
    """Rows of (name, argument names as a JSON list, count, oldest id), as both
    dialects select them, as :class:`BacklogShape` values."""
    return [BacklogShape(r[0], tuple(serialize.loads(r[1])), r[2], r[3]) for r in rows]


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


@attrs.frozen
class QueueStats:
    """One queue as ``queue_stats`` sees it: its jobs by status, how long the oldest
    ready job has waited, whether it is paused, and its stored limits.

    Done jobs are not counted: they are history (and may be millions); their rate is
    :meth:`soniq.Soniq.stats`. Failed and cancelled jobs are counted while they are
    kept (until pruned or purged)."""

    queue: str
    #: Queued and due: a worker would take them now.
    queued: int
    #: Queued with ``run_at`` in the future: delayed, retrying or snoozed.
    scheduled: int
    running: int
    #: Waiting for their parents (``depends_on``).
    waiting: int
    failed: int
    cancelled: int
    #: Seconds since the oldest ready job became due (None: none is ready).
    oldest_queued_age: float | None
    paused: bool
    #: The stored limits (``set_queue_limits``); None: no limit.
    concurrency: int | None
    rate_limit: str | None


#: A row of queue counts, as both dialects compute it: queue, queued, scheduled,
#: running, waiting, failed, cancelled, oldest ready age, then the queue's stored
#: settings: paused, concurrency, rate count, rate period (None when not stored).
QueueRow = Sequence[Any]


def queue_stats_from_rows(rows: Iterable[QueueRow]) -> list[QueueStats]:
    """:class:`QueueStats` of rows of queue counts (see :data:`QueueRow`), by name."""
    found = []
    for row in rows:
        queue, *counts, age, paused, concurrency, rate_count, rate_period = row
        limits = queue_limits_by_name([(queue, concurrency, rate_count, rate_period)])[queue]
        queued, scheduled, running, waiting, failed, cancelled = (int(n or 0) for n in counts)
        found.append(
            QueueStats(
                queue,
                queued,
                scheduled,
                running,
                waiting,
                failed,
                cancelled,
                None if age is None else max(0.0, float(age)),
                bool(paused),
                limits.concurrency,
                limits.rate_limit,
            )
        )
    return sorted(found, key=lambda q: q.queue)


#: The longest window ``stats`` looks back over: a day, in minutes.
MAX_STATS_MINUTES = 24 * 60


@attrs.frozen
class StatsBucket:
    """Jobs that ended in one minute (``start`` is its first instant, UTC), by how."""

    start: dt.datetime
    done: int
    failed: int
    cancelled: int


@attrs.frozen
class Stats:
    """Jobs that ended over the last ``minutes`` minutes (``stats``): one bucket per
    minute, oldest first, the last one the current minute so far; the totals, and
    jobs ended per second over the window."""

    minutes: int
    buckets: tuple[StatsBucket, ...]
    done: int
    failed: int
    cancelled: int
    per_second: float


def stats_minutes(minutes: object) -> int:
    """The ``minutes`` of ``stats(minutes=)``, or an error naming the argument."""
    if (
        isinstance(minutes, bool)
        or not isinstance(minutes, int)
        or not 1 <= minutes <= MAX_STATS_MINUTES
    ):
        raise ValueError(
            f"minutes must be an int from 1 to {MAX_STATS_MINUTES:,} (a day), got {minutes!r}"
        )
    return minutes


def stats_since(now: float, minutes: int) -> float:
    """The first instant (epoch seconds) of the window of ``stats(minutes)`` at
    ``now``: the start of the minute ``minutes - 1`` minutes before the current one."""
    return (math.floor(now / 60) - (minutes - 1)) * 60.0


def stats_from_rows(now: float, minutes: int, rows: Iterable[Sequence[Any]]) -> Stats:
    """:class:`Stats` at ``now`` (epoch seconds, the database's clock) of rows of
    (minute: epoch seconds // 60, status, count)."""
    first = int(stats_since(now, minutes)) // 60
    counts = [dict.fromkeys(("done", "failed", "cancelled"), 0) for _ in range(minutes)]
    for minute, status, count in rows:
        slot = int(minute) - first
        if 0 <= slot < minutes and status in counts[slot]:
            counts[slot][status] += int(count)
    buckets = tuple(
        StatsBucket(
            dt.datetime.fromtimestamp((first + i) * 60, dt.timezone.utc),
            c["done"],
            c["failed"],
            c["cancelled"],
        )
        for i, c in enumerate(counts)
    )
    done, failed, cancelled = (sum(c[s] for c in counts) for s in ("done", "failed", "cancelled"))
    elapsed = max(now - first * 60, 1.0)
    return Stats(minutes, buckets, done, failed, cancelled, (done + failed + cancelled) / elapsed)
