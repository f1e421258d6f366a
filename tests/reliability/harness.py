"""Worker processes of ``tests.reliability.app`` for the fault matrix, and what a test
counts afterwards: job statuses and runs per job (each run of ``record`` inserts a row
into the schema's ``runs`` table before its outcome is written, so a job that ran
twice shows two rows)."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from soniq import Soniq
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
RECORD = "reliability.record"

# Short enough that a killed worker's jobs come back within seconds.
FAST_WORKER = (
    "--heartbeat-interval",
    "0.5",
    "--stale-after",
    "3",
    "--poll-interval",
    "0.2",
    "--shutdown-timeout",
    "5",
)


def prepare(url: str, schema: str) -> None:
    """Migrate ``schema`` and create its ``runs`` table."""
    app = Soniq(url, schema=schema)
    try:
        app.sync.ensure_initialized()
    finally:
        app.sync.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".runs (job_id bigint, attempt int, note text)'
        )


def enqueue_records(
    url: str, schema: str, count: int, *, batch: int = 5000, **options: Any
) -> list[int]:
    """``count`` jobs of ``record`` in batches (by name: this process needs no app)."""
    app = Soniq(url, schema=schema)
    ids: list[int] = []
    try:
        for start in range(0, count, batch):
            size = min(batch, count - start)
            ids += app.sync.enqueue_many(RECORD, [{"n": start + i} for i in range(size)], **options)
    finally:
        app.sync.close()
    return ids


class Workers:
    """``soniq worker tests.reliability.app:eq`` processes bound to one database and
    schema; their output goes to files under ``logs`` (a pipe could fill and block
    them). ``record_url``: where the jobs record their runs (default ``url``)."""

    def __init__(
        self, url: str, schema: str, logs: Path, *args: str, record_url: str | None = None
    ) -> None:
        self.env = dict(
            os.environ,
            SONIQ_RELIABILITY_URL=url,
            SONIQ_RELIABILITY_SCHEMA=schema,
            SONIQ_RELIABILITY_RECORD_URL=record_url or url,
        )
        self.logs = logs
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logfiles: list[Path] = []
        self.started = 0
        self.kills = 0
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, count: int = 1) -> None:
        for _ in range(count):
            self.started += 1
            path = self.logs / f"worker-{self.started}.log"
            log = open(path, "wb")  # noqa: SIM115
            self.logfiles.append(path)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "soniq",
                        "worker",
                        "tests.reliability.app:eq",
                        *self.args,
                    ],
                    cwd=ROOT,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random live worker and start another in its place at once."""
        victims = self.alive()
        if not victims:
            return
        victim = rng.choice(victims)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        index = self.procs.index(victim)
        del self.procs[index], self.logfiles[index]
        self.kills += 1
        self.start()

    def stop(self, timeout: float = 30) -> list[int | None]:
        """SIGTERM all, wait (bounded), SIGKILL what is left; the exit codes.

        A worker replaced a moment ago may still be importing, before the CLI installs
        its signal handlers (SIGTERM would kill it, -15, having claimed nothing): each
        gets up to 15 s to log that it started first."""

        def all_started() -> bool:
            return all(
                proc.poll() is not None or b" started: " in log.read_bytes()
                for proc, log in zip(self.procs, self.logfiles, strict=True)
            )

        with contextlib.suppress(AssertionError):  # still importing after 15 s: stopped anyway
            wait_until(all_started, 15, "the workers to start")
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return [p.returncode for p in self.procs]

    def output(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:]
            for path in sorted(self.logs.glob("worker-*.log"))
        )


def statuses(conn: psycopg.Connection[Any], schema: str) -> collections.Counter[str]:
    rows = conn.execute(
        f'SELECT status, count(*) FROM "{schema}".soniq_jobs GROUP BY status'
    ).fetchall()
    return collections.Counter({status: count for status, count in rows})


def runs_per_job(conn: psycopg.Connection[Any], schema: str) -> collections.Counter[int]:
    rows = conn.execute(f'SELECT job_id, count(*) FROM "{schema}".runs GROUP BY job_id').fetchall()
    return collections.Counter({job_id: count for job_id, count in rows})


def query_retrying(url: str, action: Callable[[psycopg.Connection[Any]], Any]) -> Any:
    """Run ``action`` on a fresh connection, retrying while the server is away."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
                return action(conn)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_until_done(
    url: str,
    schema: str,
    total: int,
    timeout: float,
    *,
    during: Callable[[float], None] | None = None,
    workers: Workers | None = None,
) -> float:
    """Poll until ``total`` jobs are ``done``; ``during(elapsed)`` is called on each
    poll (to inject faults). Seconds taken; AssertionError with counts on timeout."""
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if during is not None:
            during(elapsed)
        counts = query_retrying(url, lambda c: statuses(c, schema))
        if counts.get("done", 0) >= total:
            return elapsed
        if elapsed > timeout:
            raise AssertionError(
                f"after {timeout:.0f}s only {dict(counts)} of {total} jobs; workers:\n"
                + (workers.output() if workers else "")
            )
        time.sleep(0.25 if total < 10_000 else 0.5)


def rerun_patterns(url: str, schema: str) -> dict[str, int]:
    """How the jobs that ran more than once ran: ``{"1,1": 3, "1,2": 5}`` means three
    jobs ran twice as attempt 1 (a re-run nothing counted) and five ran as attempts 1
    and 2 (a rescue or retry that counted the attempt)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            f"""SELECT string_agg(attempt::text, ',' ORDER BY attempt) AS pattern, count(*)
            FROM (SELECT job_id, attempt FROM "{schema}".runs
                  WHERE job_id IN (SELECT job_id FROM "{schema}".runs
                                   GROUP BY job_id HAVING count(*) > 1)) AS r
            GROUP BY job_id"""
        ).fetchall()
    patterns: collections.Counter[str] = collections.Counter()
    for pattern, _ in rows:
        patterns[pattern] += 1
    return dict(patterns)


def rerun_errors(url: str, schema: str) -> dict[str, int]:
    """The ``last_error`` (its first words) of the jobs that ran more than once."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            f"""SELECT coalesce(split_part(last_error, ':', 1), '(none)'), count(*)
            FROM "{schema}".soniq_jobs WHERE id IN (SELECT job_id FROM "{schema}".runs
                                   GROUP BY job_id HAVING count(*) > 1)
            GROUP BY 1"""
        ).fetchall()
    return dict(rows)


def reruns(per_job: collections.Counter[int]) -> int:
    """Runs beyond the first, over all jobs."""
    return sum(count - 1 for count in per_job.values() if count > 1)


def check_none_lost(url: str, schema: str, ids: Sequence[int]) -> collections.Counter[int]:
    """Every job is done and ran at least once, and no run was invisible: a job never
    ran more often than its ``claims`` column says it was started (a second run shows
    as ``claims`` > 1). The runs per job."""
    with psycopg.connect(url, autocommit=True) as conn:
        counts = statuses(conn, schema)
        per_job = runs_per_job(conn, schema)
        claims = dict(conn.execute(f'SELECT id, claims FROM "{schema}".soniq_jobs').fetchall())
    assert counts == {"done": len(ids)}, counts
    never_ran = [i for i in ids if per_job[i] == 0]
    assert not never_ran, f"{len(never_ran)} jobs done without a run: {never_ran[:10]}"
    hidden = {i: (per_job[i], claims[i]) for i in ids if per_job[i] > claims[i]}
    assert not hidden, f"{len(hidden)} jobs ran more often than claimed (runs, claims): {hidden}"
    return per_job
