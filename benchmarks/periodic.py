"""Periodic jobs across worker processes: :data:`benchmarks.periodic_jobs.SCHEDULES`
schedules ticking every second, scheduled by several ``soniq worker`` processes at
once for a while; then every schedule's ticks are counted from the jobs' ``run_at``
(a periodic job is due at its tick). Every tick must have been enqueued exactly once:
none twice (duplicates), none skipped between the first and the last (missed)."""

from __future__ import annotations

import collections
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import periodic_jobs
from soniq import Soniq

ROOT = Path(__file__).resolve().parent.parent


def run(url: str, *, workers: int, seconds: float) -> dict[str, Any]:
    """Run ``workers`` worker processes of :mod:`benchmarks.periodic_jobs` on ``url``
    for ``seconds``; the ticks each schedule enqueued."""
    app = Soniq(url)
    app.sync.ensure_initialized()
    app.sync.close()
    env = os.environ | {"SONIQ_BENCH_URL": url}
    command = [sys.executable, "-m", "soniq", "worker", "benchmarks.periodic_jobs:eq"]
    procs = [
        subprocess.Popen(
            [*command, "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    started = time.time()
    try:
        time.sleep(seconds)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
        errors = [proc.stderr.read() if proc.stderr else "" for proc in procs]
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT args->>'n', run_at FROM soniq_jobs WHERE name = 'bench.beat' ORDER BY 2"
        ).fetchall()
    ticks: dict[str, list[dt.datetime]] = collections.defaultdict(list)
    for n, run_at in rows:
        ticks[n].append(run_at)
    step = dt.timedelta(seconds=periodic_jobs.EVERY)
    schedules = []
    for n in sorted(ticks, key=int):
        seen = ticks[n]
        distinct = sorted(set(seen))
        expected = int((distinct[-1] - distinct[0]) / step) + 1
        schedules.append(
            {
                "schedule": int(n),
                "enqueued": len(seen),
                "duplicates": len(seen) - len(distinct),
                "missed": expected - len(distinct),
            }
        )
    return {
        "workers": workers,
        "seconds": seconds,
        "schedules_expected": periodic_jobs.SCHEDULES,
        "started": started,
        "exit_codes": codes,
        "errors": [e for e in errors if e.strip()],
        "schedules": schedules,
    }


def render(result: dict[str, Any]) -> str:
    schedules = result["schedules"]
    enqueued = sum(s["enqueued"] for s in schedules)
    duplicates = sum(s["duplicates"] for s in schedules)
    missed = sum(s["missed"] for s in schedules)
    lines = [
        f"{len(schedules)} of {result['schedules_expected']} schedules every "
        f"{periodic_jobs.EVERY:g} s, {result['workers']} worker processes, "
        f"{result['seconds']:g} s: {enqueued} ticks enqueued, {duplicates} twice, "
        f"{missed} missed; worker exit codes {result['exit_codes']}",
    ]
    ok = (
        len(schedules) == result["schedules_expected"]
        and duplicates == 0
        and missed == 0
        and set(result["exit_codes"]) == {0}
    )
    lines.append(f"target: every tick enqueued once: {'met' if ok else 'MISSED'}")
    lines += [f"worker stderr: {e.strip()[:500]}" for e in result["errors"]]
    return "\n".join(lines)
