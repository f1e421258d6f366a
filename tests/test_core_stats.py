"""The window of ``stats``: which minute a job that ended lands in, the current
partial minute, per second; pure (soniq.core.admin), at fixed instants."""

from __future__ import annotations

import datetime as dt

import pytest

from soniq.core.admin import stats_from_rows, stats_minutes, stats_since

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 4, 14, 3, 30, tzinfo=UTC).timestamp()  # 30 s into 14:03


def test_the_window_is_whole_minutes_up_to_the_current_one() -> None:
    assert stats_since(NOW, 1) == dt.datetime(2026, 12, 4, 14, 3, tzinfo=UTC).timestamp()
    assert stats_since(NOW, 3) == dt.datetime(2026, 12, 4, 14, 1, tzinfo=UTC).timestamp()
    assert stats_since(NOW - 30, 1) == stats_since(NOW, 1)  # 14:03:00 itself


def test_rows_land_in_their_minute_and_outside_ones_are_dropped() -> None:
    minute = int(NOW // 60)
    rows = [
        (minute, "done", 4),  # this minute so far
        (minute - 1, "failed", 2),
        (minute - 2, "done", 1),  # the first of three
        (minute - 3, "done", 100),  # before the window
        (minute + 1, "done", 100),  # a later clock's: not in the window
        (minute, "cancelled", 1),
    ]
    stats = stats_from_rows(NOW, 3, rows)
    assert [b.start.strftime("%H:%M") for b in stats.buckets] == ["14:01", "14:02", "14:03"]
    assert [(b.done, b.failed, b.cancelled) for b in stats.buckets] == [
        (1, 0, 0),
        (0, 2, 0),
        (4, 0, 1),
    ]
    assert (stats.done, stats.failed, stats.cancelled) == (5, 2, 1)
    # 8 jobs over two whole minutes and 30 s of this one.
    assert stats.per_second == pytest.approx(8 / 150)
    assert all(b.start.tzinfo is UTC for b in stats.buckets)


def test_an_empty_window_and_its_first_second() -> None:
    at_turn = dt.datetime(2026, 12, 4, 14, 3, tzinfo=UTC).timestamp()
    stats = stats_from_rows(at_turn, 1, [(int(at_turn // 60), "done", 3)])
    assert stats.per_second == 3.0  # at least one second of window, never a division by 0
    assert stats_from_rows(NOW, 15, []).per_second == 0.0


@pytest.mark.parametrize("bad", [0, 1441, -1, 2.0, "5", True, None])
def test_minutes_must_be_a_whole_number_up_to_a_day(bad: object) -> None:
    with pytest.raises(ValueError, match="minutes must be an int from 1 to 1,440"):
        stats_minutes(bad)
