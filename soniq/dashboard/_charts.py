"""Bar charts as inline SVG, drawn on the server: the geometry is computed here and
the template only writes it out (escaped), so the page needs no script and no
network."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

import attrs

#: Most bars a chart draws: a longer window is grouped into as many bars.
MAX_BARS = 90


@attrs.frozen
class Series:
    """One kind of count stacked in each bar: its label, the bucket field it reads and
    the CSS class that colours it."""

    label: str
    field: str
    css: str


@attrs.frozen
class Bar:
    """One rectangle of the chart, with the tooltip of its bar."""

    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@attrs.frozen
class Chart:
    """What the template draws: the plot's size, its bars, horizontal grid lines
    (``(y, label)``), time labels under it (``(x, label, anchor)``) and the legend."""

    width: int
    height: int
    left: int
    top: int
    plot_height: int
    bars: tuple[Bar, ...]
    grid: tuple[tuple[float, str], ...]
    times: tuple[tuple[float, str, str], ...]
    legend: tuple[Series, ...]
    total: int


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``value`` (>= 1)."""
    if value <= 1:
        return 1
    power = 1
    while power * 10 <= value:
        power *= 10
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def _count(bucket: object, field: str) -> int:
    return int(getattr(bucket, field))


def bar_chart(
    buckets: Sequence[object],
    series: Sequence[Series],
    *,
    width: int = 640,
    height: int = 150,
) -> Chart:
    """A stacked bar chart of ``buckets`` (objects with a ``start`` datetime and the
    ``series``' fields, one a minute, oldest first), grouped into at most
    :data:`MAX_BARS` bars."""
    left, top, bottom, right = 44, 8, 22, 8
    plot_width = width - left - right
    plot_height = height - top - bottom
    per_bar = max(1, math.ceil(len(buckets) / MAX_BARS))
    groups = [list(buckets[i : i + per_bar]) for i in range(0, len(buckets), per_bar)]
    sums = [[sum(_count(b, s.field) for b in group) for s in series] for group in groups]
    peak = nice_ceiling(max((sum(row) for row in sums), default=0))
    slot = plot_width / max(len(groups), 1)
    gap = min(2.0, slot * 0.2)
    bars: list[Bar] = []
    for i, (group, row) in enumerate(zip(groups, sums, strict=True)):
        start: dt.datetime = getattr(group[0], "start")  # noqa: B009
        when = start.strftime("%H:%M")
        if per_bar > 1:
            when += f" ({per_bar} min)"
        title = f"{when} UTC: " + ", ".join(
            f"{n:,} {s.label}" for s, n in zip(series, row, strict=True)
        )
        base = float(top + plot_height)
        for s, n in zip(series, row, strict=True):
            if n == 0:
                continue
            h = plot_height * n / peak
            base -= h
            bars.append(
                Bar(round(left + i * slot + gap / 2, 2), round(base, 2),
                    round(max(slot - gap, 0.5), 2), round(h, 2), s.css, title)
            )  # fmt: skip
    fractions = (0.0, 0.5, 1.0) if peak >= 2 else (0.0, 1.0)
    grid = tuple((round(top + plot_height * (1 - f), 2), f"{peak * f:,g}") for f in fractions)
    times: list[tuple[float, str, str]] = []
    if groups:
        first: dt.datetime = getattr(groups[0][0], "start")  # noqa: B009
        last: dt.datetime = getattr(groups[-1][0], "start")  # noqa: B009
        times.append((left, first.strftime("%H:%M"), "start"))
        times.append((left + plot_width, last.strftime("%H:%M UTC"), "end"))
    total = sum(sum(row) for row in sums)
    return Chart(
        width, height, left, top, plot_height, tuple(bars), grid, tuple(times), tuple(series), total
    )
