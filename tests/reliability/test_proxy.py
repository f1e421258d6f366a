"""Connections between Soniq and PostgreSQL cut, frozen, slowed and half-opened by a
fault-injecting proxy (``proxy.py``), under worker processes and under enqueues."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import soniq
from tests.conftest import wait_until
from tests.reliability.conftest import report
from tests.reliability.harness import (
    FAST_WORKER,
    Workers,
    check_none_lost,
    enqueue_records,
    prepare,
    query_retrying,
    rerun_errors,
    rerun_patterns,
    reruns,
    statuses,
    wait_until_done,
)
from tests.reliability.proxy import FaultProxy
from tests.reliability.test_pg_restart import (
    BOUND,
    PROMISED_OPTIONS,
    _faces,
    _timed_calls,
)

SCHEMA = "rel"
JOBS = 3000
FAULT_SECONDS = 3.0


@pytest.fixture
def proxy(cluster_url: str) -> Any:
    with FaultProxy.to(cluster_url, delay=0.05) as made:
        yield made


def drain_through_fault(
    mode: str,
    proxy: FaultProxy,
    cluster_url: str,
    tmp_path: Path,
    *,
    fresh_worker: bool = False,
    timeout: float = 90,
) -> tuple[list[int], float, Workers, list[int | None], int]:
    """Two workers through the proxy; at a third of the drain ``mode`` lasts 3 s, then
    the proxy passes again (and, with ``fresh_worker``, a third worker starts then).
    (ids, seconds, workers, exit codes, workers alive at the end)."""
    prepare(cluster_url, SCHEMA)
    ids = enqueue_records(cluster_url, SCHEMA, JOBS)
    url = proxy.through(cluster_url)
    workers = Workers(
        url, SCHEMA, tmp_path / "logs", "--concurrency", "10", *FAST_WORKER, record_url=cluster_url
    )
    workers.start(2)
    fault: dict[str, float] = {}

    def inject(elapsed: float) -> None:
        if "end" in fault:
            return
        if "start" not in fault:
            done = query_retrying(cluster_url, lambda c: statuses(c, SCHEMA)).get("done", 0)
            if done >= JOBS // 3:
                proxy.mode = mode
                fault["start"] = elapsed
        elif elapsed - fault["start"] >= FAULT_SECONDS:
            proxy.mode = "pass"
            fault["end"] = elapsed
            if fresh_worker:
                workers.start(1)

    try:
        took = wait_until_done(cluster_url, SCHEMA, JOBS, timeout, during=inject, workers=workers)
        alive = len(workers.alive())
    finally:
        proxy.mode = "pass"
        codes = workers.stop(timeout=10)
    assert "end" in fault, "the drain ended before the fault"
    return ids, took, workers, codes, alive


def report_drain(name: str, ids: list[int], took: float, proxy: FaultProxy, url: str) -> None:
    per_job = check_none_lost(url, SCHEMA, ids)
    report(
        name,
        jobs=len(ids),
        fault_seconds=FAULT_SECONDS,
        lost=0,
        reruns=reruns(per_job),
        attempts_of_reruns=rerun_patterns(url, SCHEMA),
        errors_of_reruns=rerun_errors(url, SCHEMA),
        seconds=round(took, 1),
        connections_aborted=proxy.aborted,
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["drop", "stall", "slow"])
def test_a_two_worker_drain_through_a_fault(
    mode: str, proxy: FaultProxy, cluster_url: str, tmp_path: Path
) -> None:
    """The same two workers finish the drain after the fault: every job done, none
    lost, both workers alive and stopping cleanly."""
    ids, took, workers, codes, alive = drain_through_fault(mode, proxy, cluster_url, tmp_path)
    report_drain(f"proxy_{mode}", ids, took, proxy, cluster_url)
    assert alive == 2 and codes == [0, 0], f"{codes}:\n{workers.output()}"


@pytest.mark.timeout(150)
def test_a_half_open_link_loses_no_job(proxy: FaultProxy, cluster_url: str, tmp_path: Path) -> None:
    """Half-open for 3 s under two workers, then a third worker starts: every job is
    done, none lost (the stuck workers' jobs are rescued once their heartbeat is
    stale)."""
    ids, took, _workers, codes, _alive = drain_through_fault(
        "half_open", proxy, cluster_url, tmp_path, fresh_worker=True
    )
    report_drain("proxy_half_open_with_a_fresh_worker", ids, took, proxy, cluster_url)
    report(
        "proxy_half_open_with_a_fresh_worker",
        workers_stuck=sum(1 for code in codes[:2] if code != 0),
    )


@pytest.mark.timeout(120)
def test_workers_recover_from_a_half_open_link(
    proxy: FaultProxy, cluster_url: str, tmp_path: Path
) -> None:
    """After 3 s of half-open link under a drain, both workers heartbeat again within
    30 s (every worker's heartbeat connection carries bytes every 0.5 s, so each
    loses some and must notice), finish the drain, and stop on SIGTERM."""
    prepare(cluster_url, SCHEMA)
    ids = enqueue_records(cluster_url, SCHEMA, JOBS)
    workers = Workers(
        proxy.through(cluster_url),
        SCHEMA,
        tmp_path / "logs",
        "--concurrency",
        "10",
        *FAST_WORKER,
        record_url=cluster_url,
    )
    workers.start(2)
    pids = {proc.pid for proc in workers.procs}
    try:
        wait_until_done(cluster_url, SCHEMA, JOBS // 3, 60, workers=workers)
        with proxy.fault("half_open"):
            time.sleep(FAULT_SECONDS)
        beating: set[int] = set()
        with psycopg.connect(cluster_url, autocommit=True) as conn:
            fault_end = conn.execute("SELECT now()").fetchone()[0]

            def all_beating() -> bool:
                rows = conn.execute(
                    f'SELECT pid FROM "{SCHEMA}".soniq_workers WHERE heartbeat_at > %s',
                    (fault_end,),
                ).fetchall()
                beating.clear()
                beating.update(row[0] for row in rows)
                return beating == pids

            with contextlib.suppress(AssertionError):  # the assert below says who is missing
                wait_until(all_beating, 30, "both workers to heartbeat again")
        assert beating == pids, f"workers heartbeating again: {beating} of {pids}"
        wait_until_done(cluster_url, SCHEMA, JOBS, 30, workers=workers)
    finally:
        codes = workers.stop(timeout=10)
    check_none_lost(cluster_url, SCHEMA, ids)
    assert codes == [0, 0], f"{codes}:\n{workers.output()}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mode", "options", "bound"),
    [
        ("drop", "configured", BOUND),
        ("stall", "configured", BOUND),
        # The defaults are "a few seconds": connect_timeout 5, acquire_timeout 10.
        ("stall", "default", 2 * BOUND),
    ],
)
def test_enqueue_through_a_fault_fails_within_the_bound(
    mode: str, options: str, bound: float, proxy: FaultProxy, cluster_url: str
) -> None:
    """Each face's enqueue through a dropped or stalled link raises
    soniq.DatabaseUnavailable within the bound, and enqueues again once the link
    passes."""
    prepare(cluster_url, SCHEMA)
    calls = _faces(
        proxy.through(cluster_url), **(PROMISED_OPTIONS if options == "configured" else {})
    )
    with proxy.fault(mode):
        results = _timed_calls(calls, cap=2 * bound)
    report(
        f"enqueue_through_{mode}_{options}_timeouts",
        **{f"{name}_seconds": round(took, 1) for name, (took, _) in results.items()},
        **{f"{name}_raised": type(value).__name__ for name, (_, value) in results.items()},
    )
    for name, (took, value) in results.items():
        assert isinstance(value, soniq.DatabaseUnavailable), (name, value)
        assert took < bound, (name, took)
    after = _timed_calls(calls, cap=2 * bound)
    calls["_close"]()
    assert all(isinstance(v, int) for _, v in after.values()), after
