"""Periodic schedules (``soniq.core.schedules``, pure): their ticks, across daylight
saving time, what a scheduler does at a moment (on time, new, missed, caught up),
and bad timing refused where it is written (the decorator), naming the argument."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from pathlib import Path
from typing import Any

import pytest

from soniq import Soniq
from soniq.core.errors import JobArgumentsError, JobDefinitionError
from soniq.core.schedules import MISSED_AFTER, Schedule, Tick, make_schedule

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


def cron(expr: str, tz: str = "UTC", catch_up: bool = True) -> Schedule:
    return make_schedule("j", {}, cron=expr, every=None, timezone=tz, catch_up=catch_up)


def every(seconds: Any, catch_up: bool = True) -> Schedule:
    return make_schedule("j", {}, cron=None, every=seconds, timezone=None, catch_up=catch_up)


def ticks(schedule: Schedule, start: dt.datetime, n: int) -> list[str]:
    out, moment = [], start
    for _ in range(n):
        moment = schedule.next_after(moment)
        out.append(moment.isoformat())
    return out


def test_every_ticks_at_multiples_of_the_interval_since_the_epoch() -> None:
    s = every(dt.timedelta(seconds=30))
    assert s.latest_due(at("2026-12-03T10:00:29.999999+00:00")) == at("2026-12-03T10:00:00+00:00")
    assert s.latest_due(at("2026-12-03T10:00:30+00:00")) == at("2026-12-03T10:00:30+00:00")
    assert ticks(s, at("2026-12-03T10:00:30+00:00"), 2) == [
        "2026-12-03T10:01:00+00:00",
        "2026-12-03T10:01:30+00:00",
    ]
    # Fractions of a second are whole microseconds: every worker computes the same.
    tenth = every(0.1)
    assert tenth.latest_due(at("2026-12-03T10:00:00.35+00:00")) == at("2026-12-03T10:00:00.3+00:00")


def test_cron_in_a_time_zone_across_daylight_saving_time() -> None:
    daily = cron("30 2 * * *", "Europe/Paris")
    # Clocks go forward at 02:00 on 29 March 2026: 02:30 does not exist that day, so
    # it runs at the first minute after; then at 02:30 again.
    assert ticks(daily, at("2026-03-28T12:00:00+01:00"), 3) == [
        "2026-03-29T01:00:00+00:00",
        "2026-03-30T00:30:00+00:00",
        "2026-03-31T00:30:00+00:00",
    ]
    # Clocks go back at 03:00 on 25 October 2026: 02:30 happens twice, runs once.
    assert ticks(daily, at("2026-10-24T12:00:00+02:00"), 2) == [
        "2026-10-25T00:30:00+00:00",
        "2026-10-26T01:30:00+00:00",
    ]
    # An interval runs in both of the repeated hours.
    half_hourly = cron("*/30 * * * *", "Europe/Paris")
    assert ticks(half_hourly, at("2026-10-25T01:45:00+02:00"), 4) == [
        "2026-10-25T00:00:00+00:00",  # 02:00 CEST
        "2026-10-25T00:30:00+00:00",  # 02:30 CEST
        "2026-10-25T01:00:00+00:00",  # 02:00 CET
        "2026-10-25T01:30:00+00:00",  # 02:30 CET
    ]
    assert half_hourly.latest_due(at("2026-10-25T01:10:00+00:00")) == at(
        "2026-10-25T01:00:00+00:00"
    )


def test_what_a_scheduler_does_at_a_moment() -> None:
    s = every(60)
    now = at("2026-12-03T10:05:01+00:00")
    due = at("2026-12-03T10:05:00+00:00")
    # A new schedule starts now: its first run is its next tick.
    assert s.decide(None, now) == Tick(due, enqueue=False)
    assert s.decide(due, now) is None  # done already (by this worker or another)
    assert s.decide(due + dt.timedelta(minutes=1), now) is None
    # The tick after the last one, on time: runs.
    assert s.decide(at("2026-12-03T10:04:00+00:00"), now) == Tick(due, enqueue=True)
    # Ticks missed while no worker ran: one catch-up run of the latest, or none.
    last = at("2026-12-03T09:00:00+00:00")
    assert s.decide(last, now) == Tick(due, enqueue=True)
    assert every(60, catch_up=False).decide(last, now) == Tick(due, enqueue=False)
    # One tick only, but found long after its time (a worker started late): missed too.
    hour, late = at("2026-12-03T10:00:00+00:00"), at("2026-12-03T10:00:00+00:00") + MISSED_AFTER * 2
    before = at("2026-12-03T09:00:00+00:00")
    assert every(3600, catch_up=False).decide(before, late) == Tick(hour, enqueue=False)
    assert every(3600).decide(before, late) == Tick(hour, enqueue=True)
    assert every(3600, catch_up=False).decide(before, hour + MISSED_AFTER) == Tick(hour, True)


@pytest.mark.parametrize(
    ("expr", "zone", "start"),
    [
        ("30 2 * * *", "Europe/Paris", "2024-10-26T23:00:00+00:00"),  # the repeated hour
        ("59 1 * * *", "America/New_York", "2024-11-03T04:00:00+00:00"),
        ("*/20 * * * *", "Europe/Paris", "2024-10-26T23:00:00+00:00"),
        ("30 2 * * *", "Europe/Paris", "2024-03-30T23:00:00+00:00"),  # the skipped hour
    ],
)
def test_ticks_around_a_clock_change_are_never_in_the_past(
    expr: str, zone: str, start: str
) -> None:
    """Minute by minute through a clock change: the latest tick is not after now and
    the next one is after it (a scheduler never sleeps until the past, nor spins)."""
    s = cron(expr, zone)
    for minute in range(0, 5 * 60):
        now = at(start) + dt.timedelta(minutes=minute, seconds=30)
        assert s.latest_due(now) <= now < s.next_after(now), now


def test_a_scheduler_run_every_second_enqueues_each_tick_once() -> None:
    """Scheduling passes at any moments (several per tick, as several workers make):
    each tick is enqueued exactly once, in order, none skipped."""
    s = every(1)
    start = at("2026-12-03T10:00:00.5+00:00")
    last: dt.datetime | None = None
    enqueued = []
    for step in itertools.islice(itertools.count(), 0, 100):
        now = start + dt.timedelta(milliseconds=170 * step)
        tick = s.decide(last, now)
        if tick is not None and (last is None or tick.at > last):
            last = tick.at
            if tick.enqueue:
                enqueued.append(tick.at)
    assert len(enqueued) == len(set(enqueued)) >= 15
    gaps = {b - a for a, b in itertools.pairwise(enqueued)}
    assert gaps == {dt.timedelta(seconds=1)}


def test_the_key_names_the_job_its_timing_and_its_arguments() -> None:
    a = make_schedule(
        "j", {"b": 1, "a": 2}, cron="0 * * * *", every=None, timezone=None, catch_up=True
    )
    b = make_schedule(
        "j", {"a": 2, "b": 1}, cron="0 * * * *", every=None, timezone=None, catch_up=False
    )
    assert a.key == b.key == 'j cron=0 * * * * tz=UTC args={"a":2,"b":1}'
    assert every(30).key == "j every=30000000us"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"cron": "61 * * * *"}, ValueError, r"cron '61 \* \* \* \*' does not parse"),
        ({"cron": "* * *"}, ValueError, "cron .* has 3 fields; five fields"),
        ({"cron": "0 30 2 * * *"}, ValueError, "has 6 fields"),  # no seconds field
        ({"cron": 5}, TypeError, "cron must be a string"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, ValueError, "timezone 'Mars/Olympus'"),
        ({"cron": "* * * * *", "timezone": 1}, TypeError, "timezone must be an IANA name"),
        ({"every": 0}, ValueError, "every must be more than 0"),
        ({"every": -5}, ValueError, "every must be more than 0"),
        ({"every": dt.timedelta(0)}, ValueError, "every must be more than 0"),
        ({"every": float("nan")}, ValueError, "every must be more than 0"),
        ({"every": float("inf")}, ValueError, "every must be more than 0"),
        ({"every": "5s"}, TypeError, "every must be a timedelta or seconds"),
        ({"every": 5, "timezone": "UTC"}, TypeError, "timezone: only a cron schedule"),
        ({}, TypeError, "exactly one of cron= .* or every="),
        ({"cron": "* * * * *", "every": 5}, TypeError, "exactly one of cron="),
        ({"every": 5, "catch_up": "yes"}, TypeError, "catch_up must be True or False"),
        ({"every": 5, "kwargs": [1]}, TypeError, "kwargs must be a mapping"),
    ],
)
def test_bad_timing_is_refused_at_the_decorator(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    eq = Soniq("memory://")
    with pytest.raises(error, match=match):
        eq.periodic(**options)
    assert eq.registry.schedules == []


def test_bad_arguments_and_a_repeated_schedule_are_refused_at_definition() -> None:
    eq = Soniq("memory://")
    with pytest.raises(JobArgumentsError, match=r"periodic job 'p\.pull': kwargs: .*region.*nope"):

        @eq.periodic(every=30, kwargs={"nope": 1}, name="p.pull")
        def pull(region: str) -> None: ...

    assert eq.registry.get("p.pull") is None  # refused whole: not left half-registered

    @eq.periodic(every=30, kwargs={"region": "eu"}, name="p.push")
    @eq.periodic(every=30, kwargs={"region": "us"}, name="p.push")
    def push(region: str) -> None: ...

    assert [s.kwargs for s in eq.registry.schedules] == [{"region": "us"}, {"region": "eu"}]
    with pytest.raises(JobDefinitionError, match="has this schedule already"):
        eq.periodic(every=30, kwargs={"region": "eu"}, name="p.push")(push)


DOC = Path(__file__).resolve().parent.parent / "docs" / "periodic.md"


def test_the_documented_example_defines_its_three_schedules() -> None:
    [code] = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    namespace: dict[str, Any] = {"__name__": "docs_periodic"}
    exec(compile(code, str(DOC), "exec"), namespace)
    eq: Soniq = namespace["eq"]
    schedules = {s.job: s for s in eq.registry.schedules}
    assert set(schedules) == {
        "docs_periodic.refresh_rates",
        "docs_periodic.pull",
        "reports.nightly",
    }
    now = at("2026-12-03T10:02:00+00:00")
    assert schedules["docs_periodic.refresh_rates"].next_after(now) == at(
        "2026-12-03T10:05:00+00:00"
    )
    pull = schedules["docs_periodic.pull"]
    assert (pull.kwargs, pull.next_after(now)) == (
        {"region": "eu"},
        at("2026-12-03T10:02:30+00:00"),
    )
    assert eq.registry.get("docs_periodic.pull").queue == "sync"
    nightly = schedules["reports.nightly"]
    assert (nightly.catch_up, nightly.next_after(now)) == (False, at("2026-12-04T03:00:00+00:00"))
    assert eq.registry.get("reports.nightly").max_retries == 0
