"""The PNG chart of one run: one panel per figure, bars at the median, whiskers at
the min and max of the repeats. Needs matplotlib (installed by ``nox -s bench`` only).

``python -m benchmarks.chart RESULT.json OUT.png`` draws it again from a result file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
from PIL import Image

matplotlib.use("Agg")

import matplotlib.pyplot as plt

COLOURS = {
    "soniq": "#1f6fb4",
    "raw": "#9a9a9a",
    "pgqueuer": "#e6862a",
    "procrastinate": "#3b9a4a",
    "huey": "#b04a9a",
}
DRIVERS = {"asyncpg": "asyncpg", "psycopg": "psycopg", "psycopg-sync": "psycopg sync"}


def _family(key: str) -> str:
    for family in COLOURS:
        if key.startswith(family):
            return family
    return "raw"


def _short_worker(m: dict[str, Any]) -> str:
    return {
        "soniq-asyncpg": "soniq asyncpg",
        "soniq-psycopg": "soniq psycopg",
        "soniq-asyncpg-metrics": "soniq asyncpg + metrics",
        "pgqueuer-50": "pgqueuer 50/100",
        "pgqueuer-200": "pgqueuer 200/400",
        "procrastinate": "procrastinate",
        "raw-100": "raw 2x50",
        "raw-1000": "raw 4x250",
    }.get(m["system"], m["system"])


def _bars(ax: Any, items: list[tuple[str, str, dict[str, Any]]], title: str, unit: str) -> None:
    """Horizontal bars, top to bottom in ``items`` order: (label, family, measure)."""
    labels, values, lows, highs, colours = [], [], [], [], []
    for label, family, m in items:
        labels.append(label)
        ok = not m["failure"] and m["median"] is not None
        values.append(m["median"] if ok else 0.0)
        lows.append(m["median"] - m["min"] if ok else 0.0)
        highs.append(m["max"] - m["median"] if ok else 0.0)
        colours.append(COLOURS[family])
    ys = list(range(len(items)))[::-1]
    ax.barh(ys, values, color=colours, xerr=[lows, highs], ecolor="#333333", capsize=2)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ends = [v + h for v, h in zip(values, highs, strict=True)]  # right end of each whisker
    top = max(ends, default=0.0)
    for y, v, end, m in zip(ys, values, ends, (i[2] for i in items), strict=True):
        text = "failed" if m["failure"] else (f"{v:,.2f}" if unit == "ms" else f"{v:,.0f}")
        ax.text(end + top * 0.02, y, text, va="center", fontsize=7)
    ax.set_xlim(0, top * 1.22 if top else 1)


def draw(result: dict[str, Any], path: Path) -> bool:
    """Write the chart of ``result`` to ``path``; False (nothing written) when the run
    measured nothing that is charted."""
    panels: list[tuple[str, str, list[tuple[str, str, dict[str, Any]]]]] = []
    enq = result.get("enqueue")
    if enq:
        titles = {
            "single": "enqueue one job per call (own pool)",
            "tx": "enqueue in the caller's transaction (+ business row)",
            "many": "batch enqueue (one call)",
            "concurrent": "enqueue one job per call, many callers at once (pool of 10)",
        }
        for case, title in titles.items():
            items = []
            for m in enq["measures"]:
                if m["case"] == case:
                    key = m["id"].rsplit("/", 1)[1]
                    name = "raw+notify" if key == "raw_notify" else key
                    items.append((f"{DRIVERS[m['driver']]}: {name}", _family(key), m))
            if items:
                panels.append((title, "jobs/s", items))
    wrk = result.get("worker")
    if wrk:
        figures: tuple[str, ...] = ("drain-async", "drain-sync", "latency-p50", "latency-p99")
        figures += ("latency-loaded-p50", "latency-loaded-p99", "bloat", "rss")
        for figure in figures:
            ms = [m for m in wrk["measures"] if m["figure"] == figure]
            if ms:
                title = ms[0]["title"]
                if figure.startswith("drain") or figure == "bloat":
                    title += f" ({ms[0]['n']:,} jobs)"
                items = [(_short_worker(m), m["family"], m) for m in ms]
                panels.append((title, ms[0]["unit"], items))
    emb = result.get("embedded")
    if emb:
        for kind, title in (
            ("enqueue", "SQLite: enqueue one job per call"),
            ("threads", f"SQLite: enqueue from {emb.get('threads', 8)} threads at once"),
            ("drain", "SQLite: drain, one worker process"),
        ):
            items = []
            for key, m in emb["figures"].items():
                if m["kind"] == kind:
                    huey = f"huey {emb['huey_version']} "
                    label = (
                        m["label"]
                        .replace(f"{huey}consumer, 4 threads", "huey 4 threads")
                        .replace(huey, "huey ")
                        .replace("worker, ", "")
                        .replace("sqlite3: INSERT into soniq_jobs, one per commit", "INSERT")
                        .replace(
                            "sqlite3: huey's INSERT into huey's table, one per commit",
                            "huey's INSERT",
                        )
                        .replace("concurrency ", "c=")
                        .replace(f", {emb.get('threads', 8)} threads", "")
                    )
                    items.append((label, _family(key), m))
            if items:
                panels.append((f"{title} ({emb['n']:,} jobs)", "jobs/s", items))
    if not panels:
        return False
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(17, 4.2 * rows), squeeze=False)
    for ax, (title, unit, items) in zip(axes.flat, panels, strict=False):
        _bars(ax, items, title, unit)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    machine = result["machine"]
    fig.suptitle(
        f"Soniq benchmarks ({'--quick smoke run, ' if result.get('quick') else ''}"
        f"{machine['cores']} cores, PostgreSQL {machine['postgresql'].split()[0]}, "
        f"Python {machine['python']}, CPU check {machine.get('cpu_check_ms', '?')} ms): "
        "median of the repeats, whiskers min-max. "
        "Higher is better except latency and RSS.",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=64)
    plt.close(fig)
    # 64 colours are plenty for flat bars and text, and the file shrinks ~3x (the copy
    # under docs/ is committed).
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)
    return True


if __name__ == "__main__":
    import json
    import sys

    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
