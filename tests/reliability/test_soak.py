"""The soak: ``SONIQ_SOAK_JOBS`` jobs (100,000 by default) drained by 4 worker
processes, once with a random worker SIGKILLed every 2-5 s (replaced at once), once
without. With kills every job ends ``done`` (a killed worker's claims are rescued and
run again: at-least-once); without kills each job runs exactly once."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import report
from tests.reliability.harness import (
    FAST_WORKER,
    Workers,
    check_none_lost,
    enqueue_records,
    prepare,
    rerun_errors,
    rerun_patterns,
    reruns,
    wait_until_done,
)

JOBS = int(os.environ.get("SONIQ_SOAK_JOBS", "100000"))
WORKERS = 4
# A kill counts an attempt of each job the killed worker held (the rescue says so);
# room for many kills, so that every job can end done.
MAX_RETRIES = 20
# Generous: the drain rate of a loaded 2-core machine, with room for kills.
DRAIN_TIMEOUT = 120 + JOBS / 250
SEED = int(os.environ.get("SONIQ_SOAK_SEED", str(int(time.time()))))


def drain(url: str, schema: str, logs: Path, *, kill: bool) -> dict[str, object]:
    prepare(url, schema)
    started = time.monotonic()
    ids = enqueue_records(url, schema, JOBS, max_retries=MAX_RETRIES)
    enqueued = time.monotonic() - started
    workers = Workers(url, schema, logs, "--concurrency", "10", *FAST_WORKER)
    rng = random.Random(SEED)
    next_kill = [rng.uniform(2, 5)]

    def killer(elapsed: float) -> None:
        if kill and elapsed >= next_kill[0]:
            workers.kill_one(rng)
            next_kill[0] = elapsed + rng.uniform(2, 5)

    workers.start(WORKERS)
    try:
        took = wait_until_done(url, schema, JOBS, DRAIN_TIMEOUT, during=killer, workers=workers)
    finally:
        codes = workers.stop()
    per_job = check_none_lost(url, schema, ids)
    figures = {
        "jobs": JOBS,
        "workers": WORKERS,
        "kills": workers.kills,
        "lost": sum(1 for i in ids if per_job[i] == 0),  # 0: check_none_lost asserted it
        "reruns": reruns(per_job),
        "jobs_run_more_than_once": sum(1 for c in per_job.values() if c > 1),
        "attempts_of_reruns": rerun_patterns(url, schema),
        "errors_of_reruns": rerun_errors(url, schema),
        "enqueue_seconds": round(enqueued, 1),
        "drain_seconds": round(took, 1),
        "jobs_per_second": round(JOBS / took),
        "seed": SEED,
    }
    assert all(code == 0 for code in codes), f"exit codes {codes}:\n{workers.output()}"
    return figures


@pytest.mark.timeout(DRAIN_TIMEOUT + 180)
def test_soak_with_random_kills(cluster_url: str, tmp_path: Path) -> None:
    figures = drain(cluster_url, "soak_kills", tmp_path / "logs", kill=True)
    report("soak_with_kills", **figures)
    assert figures["kills"], "the drain ended before the first kill"


@pytest.mark.timeout(DRAIN_TIMEOUT + 180)
def test_soak_without_kills_runs_each_job_exactly_once(cluster_url: str, tmp_path: Path) -> None:
    figures = drain(cluster_url, "soak", tmp_path / "logs", kill=False)
    report("soak_without_kills", **figures)
    assert figures["reruns"] == 0, figures
