"""Periodic jobs: when a schedule ticks, and what a scheduler does about it (pure).

A schedule is a cron expression read in a time zone (parsed by ``cronsim``, which
handles daylight saving time: a wall time skipped when clocks go forward runs at the
first minute after it; at a fixed wall time repeated when they go back it runs once,
while interval fields run at both) or a fixed interval, ``every``, whose ticks are
the multiples of the interval since the Unix epoch. Every worker computes the same
ticks, to the microsecond.

Each tick is enqueued once however many workers run the scheduler: the database keeps
each schedule's last tick (``soniq_periodic``), and the job is inserted in the same
statement or transaction that moves the last tick forward, only if it moved it. Ticks
missed while no worker ran are not replayed one by one: :meth:`Schedule.decide` makes
at most one catch-up run of the latest (or none with ``catch_up=False``).
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections.abc import Mapping
from typing import Any

import attrs
import cronsim

from soniq.core import serialize

UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = dt.timedelta(microseconds=1)
#: A tick enqueued later than this after its time, with none missed before it, counts
#: as missed too (it waited for a worker to start, not for the scheduler to wake).
MISSED_AFTER = dt.timedelta(seconds=60)


@attrs.frozen
class Tick:
    """What to do for a schedule now: move its last tick to ``at``, enqueueing the job
    (``enqueue``) or only skipping the ticks missed."""

    at: dt.datetime
    enqueue: bool


@attrs.frozen
class Schedule:
    """When the job ``job`` runs, with ``kwargs``; build it with :func:`make_schedule`."""

    job: str
    kwargs: Mapping[str, Any]
    cron: str | None
    timezone: str | None
    every_us: int | None  # the interval in microseconds
    catch_up: bool

    @property
    def key(self) -> str:
        """What identifies the schedule in the database: its job, its timing and its
        arguments (a changed schedule is a new one, starting at its next tick)."""
        when = f"cron={self.cron} tz={self.timezone}" if self.cron else f"every={self.every_us}us"
        args = f" args={serialize.dumps(dict(sorted(self.kwargs.items())))}" if self.kwargs else ""
        return f"{self.job} {when}{args}"

    def latest_due(self, now: dt.datetime) -> dt.datetime:
        """The last tick at or before ``now``."""
        if self.every_us is not None:
            elapsed = (now - _EPOCH) // _MICRO
            return _EPOCH + (elapsed // self.every_us * self.every_us) * _MICRO
        assert self.cron is not None and self.timezone is not None
        local = (now + _MICRO).astimezone(zoneinfo.ZoneInfo(self.timezone))
        due = next(cronsim.CronSim(self.cron, local, reverse=True)).astimezone(UTC)
        # In the hour repeated when clocks go back, the wall-clock search can land a
        # day early: step forward to the last tick that is still not after ``now``.
        while (following := self.next_after(due)) <= now:
            due = following
        return due

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first tick after ``moment``."""
        if self.every_us is not None:
            return self.latest_due(moment) + self.every_us * _MICRO
        assert self.cron is not None and self.timezone is not None
        local = moment.astimezone(zoneinfo.ZoneInfo(self.timezone))
        # In the hour repeated when clocks go back, a wall time may come out before
        # ``moment`` (its first pass): the answer is the first one after it.
        for tick in cronsim.CronSim(self.cron, local):
            if (at := tick.astimezone(UTC)) > moment:
                return at
        raise ValueError(f"cron {self.cron!r} never matches again")  # pragma: no cover

    def decide(self, last: dt.datetime | None, now: dt.datetime) -> Tick | None:
        """What to do at ``now``, the last tick recorded being ``last`` (None: the
        schedule is new). A new schedule starts from ``now``: its first run is its next
        tick. The latest tick runs when it is the one after ``last`` and on time; when
        ticks were missed (more than one, or one later than :data:`MISSED_AFTER`), it
        runs as the one catch-up run, or is skipped with ``catch_up=False``."""
        due = self.latest_due(now)
        if last is None:
            return Tick(due, enqueue=False)
        if last >= due:
            return None
        missed = self.next_after(last) < due or now - due > MISSED_AFTER
        return Tick(due, enqueue=self.catch_up or not missed)


def make_schedule(
    job: str,
    kwargs: Mapping[str, Any],
    *,
    cron: object,
    every: object,
    timezone: object,
    catch_up: object,
) -> Schedule:
    """Check a periodic job's timing (each problem a ``ValueError`` or ``TypeError``
    naming the argument) and build its schedule."""
    if (cron is None) == (every is None):
        raise TypeError("periodic: give exactly one of cron= (a cron string) or every=")
    if not isinstance(catch_up, bool):
        raise TypeError(f"catch_up must be True or False, got {catch_up!r}")
    if every is not None:
        if timezone is not None:
            raise TypeError("timezone: only a cron schedule has one; every= counts seconds")
        if isinstance(every, dt.timedelta):
            every_us = every // _MICRO
        elif isinstance(every, (int, float)) and not isinstance(every, bool):
            every_us = round(every * 1_000_000) if math.isfinite(every) else 0
        else:
            raise TypeError(f"every must be a timedelta or seconds, got {every!r}")
        if every_us <= 0 or every_us > 366 * 86_400 * 1_000_000:
            raise ValueError(f"every must be more than 0 and at most a year, got {every!r}")
        return Schedule(job, dict(kwargs), None, None, every_us, catch_up)
    if not isinstance(cron, str):
        raise TypeError(f"cron must be a string such as '*/5 * * * *', got {cron!r}")
    if len(cron.split()) != 5:
        raise ValueError(
            f"cron {cron!r} has {len(cron.split())} fields; five fields: minute hour "
            "day-of-month month day-of-week, e.g. '*/5 * * * *'"
        )
    zone = "UTC" if timezone is None else timezone
    if not isinstance(zone, str):
        raise TypeError(f"timezone must be an IANA name such as 'Europe/Paris', got {zone!r}")
    try:
        tz = zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"timezone {zone!r} is not a known IANA time zone (such as 'Europe/Paris')"
        ) from None
    try:
        next(cronsim.CronSim(cron, dt.datetime.now(tz)))
    except cronsim.CronSimError as exc:
        raise ValueError(
            f"cron {cron!r} does not parse ({exc}); five fields: minute hour day-of-month "
            "month day-of-week, e.g. '*/5 * * * *'"
        ) from None
    except StopIteration:
        raise ValueError(f"cron {cron!r} never matches a date") from None
    return Schedule(job, dict(kwargs), cron, zone, None, catch_up)
