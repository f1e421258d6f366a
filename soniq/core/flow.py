"""Concurrency and rate limits: what a job or a queue allows, checked when it is
defined, and what a worker's claim is told to obey.

A job's limits live in the code (``@eq.job(concurrency=..., rate_limit=...)``): every
worker passes its jobs' limits to its claims, so every worker must run the same
definitions. A queue's limits are stored (``eq.set_queue_limits``), so every worker
reads them at each claim. The database enforces both (see ``soniq.core.sql``):

- **concurrency**: jobs of a group in ``running`` are counted when a claim starts;
  a claim takes at most what is left. A group is the job (by name), or the job and
  the JSON value of its ``concurrency_key`` argument, or the queue.
- **rate**: a sliding window. Each start of a rate-limited job is logged with the end
  of its window; a claim starts at most ``count`` minus the starts whose window has
  not ended. At most ``count`` starts fall in any window of ``period`` seconds, as
  measured by the database's clock at each claim; a job waiting for the window to
  move is claimed by the next claim after it moves (at the latest one poll interval).

Claims of limited jobs take turns (one at a time per schema, under a lock), so that
each counts what the one before it took; claims of other jobs do not wait for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from soniq.core import serialize
from soniq.core.errors import JobDefinitionError

#: Seconds in each unit a rate may be given in (``"10/s"``, ``"100/minute"``).
RATE_UNITS: Mapping[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}

#: The largest concurrency limit and the largest count of a rate: far above any
#: worker's slots, and within the database's 32-bit integers.
MAX_LIMIT = 1_000_000

_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@attrs.frozen
class Rate:
    """At most ``count`` starts in any window of ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period:g}s"


def parse_rate(value: object, argument: str) -> Rate:
    """``"10/s"``, ``"100/m"``, ``"5000/h"`` (or ``second``, ``minute``, ``hour``) as a
    :class:`Rate`; anything else is a ``ValueError`` naming ``argument``."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or match[2] not in RATE_UNITS:
        raise ValueError(
            f"{argument} must be a string like '10/s', '100/m' or '5000/h' "
            f"(units: {', '.join(RATE_UNITS)}), got {value!r}"
        )
    count = int(match[1])
    if count < 1:
        raise ValueError(f"{argument} must allow at least 1 start, got {value!r}")
    if count > MAX_LIMIT:
        raise ValueError(f"{argument} allows at most {MAX_LIMIT:,} starts, got {value!r}")
    return Rate(count, RATE_UNITS[match[2]])


def check_concurrency(value: object, argument: str) -> int | None:
    """A concurrency limit: None (no limit) or an int of at least 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int (or None for no limit), got {value!r}")
    if value < 1:
        raise ValueError(
            f"{argument} must be at least 1, got {value}; to stop a queue, pause it "
            "(eq.pause_queue)"
        )
    if value > MAX_LIMIT:
        raise ValueError(
            f"{argument} must be at most {MAX_LIMIT:,}, got {value}; for no limit pass None"
        )
    return value


@attrs.frozen
class JobLimits:
    """The limits of one job (``@eq.job(concurrency=..., rate_limit=...)``)."""

    concurrency: int | None = None
    concurrency_key: str | None = None
    rate: Rate | None = None
    rate_key: str | None = None


def job_limits(
    job: str,
    accepted: frozenset[str],
    *,
    concurrency: object = None,
    concurrency_key: object = None,
    rate_limit: object = None,
    rate_key: object = None,
) -> JobLimits | None:
    """Check the limit options of job ``job`` (whose named parameters are ``accepted``)
    and return them, or None when it has none."""
    try:
        limit = check_concurrency(concurrency, "concurrency")
        rate = None if rate_limit is None else parse_rate(rate_limit, "rate_limit")
    except (TypeError, ValueError) as exc:
        raise JobDefinitionError(f"job {job!r}: {exc}") from None
    keys = (
        ("concurrency_key", concurrency_key, "concurrency", limit),
        ("rate_key", rate_key, "rate_limit", rate),
    )
    for argument, key, needs, given in keys:
        if key is None:
            continue
        if given is None:
            raise JobDefinitionError(
                f"job {job!r}: {argument}={key!r} needs {needs}= as well (the limit per key)"
            )
        if not isinstance(key, str) or key not in accepted:
            raise JobDefinitionError(
                f"job {job!r}: {argument} must name one of its parameters "
                f"({', '.join(sorted(accepted)) or 'it has none'}), got {key!r}"
            )
    if limit is None and rate is None:
        return None
    return JobLimits(limit, concurrency_key, rate, rate_key)  # type: ignore[arg-type]


@attrs.frozen
class QueueLimits:
    """The stored limits of one queue (``eq.set_queue_limits``); None: no limit."""

    concurrency: int | None = None
    rate: Rate | None = None

    @property
    def rate_limit(self) -> str | None:
        """The rate as given to ``set_queue_limits`` (``"100/m"``), or None."""
        return None if self.rate is None else str(self.rate)


def queue_limits(
    concurrency: object = None,
    rate_limit: object = None,
    *,
    options: tuple[str, str] = ("concurrency", "rate_limit"),
) -> QueueLimits:
    """Check the arguments of ``set_queue_limits`` (errors name them as ``options``,
    e.g. the CLI's ``--concurrency``)."""
    return QueueLimits(
        check_concurrency(concurrency, options[0]),
        None if rate_limit is None else parse_rate(rate_limit, options[1]),
    )


def stored_queue_limits(limits: QueueLimits) -> tuple[int | None, int | None, float | None]:
    """A queue's limits as its row stores them: concurrency, rate count, rate period."""
    rate = limits.rate
    if rate is None:
        return limits.concurrency, None, None
    return limits.concurrency, rate.count, rate.period


def queue_limits_by_name(rows: Iterable[Sequence[Any]]) -> dict[str, QueueLimits]:
    """Rows of (queue, concurrency, rate count, rate period) as limits by queue name."""
    return {
        queue: QueueLimits(concurrency, None if count is None else Rate(int(count), float(period)))
        for queue, concurrency, count, period in rows
    }


@attrs.frozen
class ClaimLimits:
    """What a worker's claims obey: the limits of its jobs, by name. A claim given
    these also obeys the stored queue limits; a claim given none (``soniq.testing``,
    which runs one job at a time) obeys neither."""

    jobs: tuple[tuple[str, JobLimits], ...] = ()
    #: Runs of this worker that have ended but whose outcome is not written yet, as
    #: (job id, run number: ``claims``): no longer running, though their rows still
    #: say so. A claim does not count them (only while the row is still that run of
    #: this worker's, so a run claimed again since is counted).
    ended: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, limits: Iterable[tuple[str, JobLimits | None]]) -> ClaimLimits:
        """The limits of the named jobs that have some."""
        return cls(tuple(sorted((n, lim) for n, lim in limits if lim is not None)))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The groups the jobs' limits count in: ``cg`` (concurrency), ``rg`` (rate)."""
        concurrency = any(lim.concurrency is not None for _, lim in self.jobs)
        rate = any(lim.rate is not None for _, lim in self.jobs)
        return ("cg",) * concurrency + ("rg",) * rate

    @property
    def names(self) -> frozenset[str]:
        """The names of the limited jobs."""
        return frozenset(name for name, _ in self.jobs)

    def spec_json(self, worker_id: str, kinds: tuple[str, ...] = ()) -> str:
        """The limits as one JSON document, as the claim of ``worker_id`` reads them:
        ``jobs``, one record per limited job, the ``ended`` runs of the ``worker``, and
        the ``kinds`` of group the claim ranks (what PostgreSQL's count counts)."""
        jobs = [
            {
                "name": name,
                "concurrency": lim.concurrency,
                "ckey": lim.concurrency_key,
                "rate": None if lim.rate is None else lim.rate.count,
                "period": None if lim.rate is None else lim.rate.period,
                "rkey": lim.rate_key,
            }
            for name, lim in self.jobs
        ]
        return serialize.dumps(
            {
                "jobs": jobs,
                "worker": worker_id,
                "ended": [list(run) for run in self.ended],
                "kinds": list(kinds),
            }
        )


__all__ = [
    "MAX_LIMIT",
    "RATE_UNITS",
    "ClaimLimits",
    "JobLimits",
    "QueueLimits",
    "Rate",
    "check_concurrency",
    "job_limits",
    "parse_rate",
    "queue_limits",
    "queue_limits_by_name",
    "stored_queue_limits",
]
