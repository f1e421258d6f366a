"""Concurrency and rate limits hold across several real worker processes, on
PostgreSQL (both drivers) and on a SQLite file the processes share.

Four kinds of limited jobs (tests/limits_app.py):

- ``two_at_a_time`` (``concurrency=2``): 12 runs of 0.2 s;
- ``one_per_account`` (``concurrency=1, concurrency_key="account"``): 3 accounts x 4
  runs of 0.2 s;
- ``in_capped_queue``, with no limit of its own, in a queue whose stored limit is
  ``concurrency=3`` (``set_queue_limits``): 12 runs of 0.2 s;
- ``four_per_second`` (``rate_limit="4/s"``): 12 quick runs.

Per backend, ``soniq worker tests.limits_app:eq`` processes drain them twice, in two
layouts (one set of processes each; the jobs are enqueued once every worker is
claiming, and on PostgreSQL each NOTIFY wakes them all at once, so they race):

- ``mixed``: 3 processes of 5 slots take every kind at once. A slot count enough for
  any one limit, but not for all that the limits allow at once (2 + 3 + 3 + 4): the
  limited claims of several processes interleave, each taking several jobs per claim.
- ``one-slot``: 4 processes of 1 slot take one kind after another. A process that
  finishes a job claims again at once, so with many slots a group tends to stay in the
  process that first took it; with one slot each, every overlap of two runs is an
  overlap of two processes, and a limit of N is reached only by N processes at once.

Every run logs its start and end in a file (``time.time()``, the clock all processes
of the machine share). What is asserted is the overlap actually observed: a limit of N
must be reached (N runs at once, which proves the runs could overlap) and never
exceeded. Each test reads one kind of job from the drain of one backend and layout.

Waits poll a condition with a deadline; the workers are stopped with SIGTERM once
every job is done.
"""

from __future__ import annotations

import collections
import os
import signal
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs
import psycopg
import pytest
from psycopg import sql

from soniq import Job, JobStatus, Soniq
from tests.conftest import Process, wait_until
from tests.limits_app import CAPPED_QUEUE, read_log

pytestmark = pytest.mark.slow

BACKENDS = ("asyncpg", "psycopg", "sqlite")
#: Worker processes and slots per process, by layout.
LAYOUTS = {"mixed": (3, 5), "one-slot": (4, 1)}
APP = "tests.limits_app"
PAIR = f"{APP}.two_at_a_time"
PER_ACCOUNT = f"{APP}.one_per_account"
CAPPED = f"{APP}.in_capped_queue"
RATED = f"{APP}.four_per_second"
ACCOUNTS = ("acme", "globex", "initech")
RUN_SECONDS = 0.2


def _enqueue(eq: Soniq, name: str) -> list[int]:
    """Enqueue the 12 jobs of one kind."""
    if name == PAIR:
        return eq.sync.enqueue_many(PAIR, [{"seconds": RUN_SECONDS}] * 12)
    if name == PER_ACCOUNT:
        args = [{"account": a, "seconds": RUN_SECONDS} for _ in range(4) for a in ACCOUNTS]
        return eq.sync.enqueue_many(PER_ACCOUNT, args)
    if name == CAPPED:
        return eq.sync.enqueue_many(CAPPED, [{"seconds": RUN_SECONDS}] * 12, queue=CAPPED_QUEUE)
    assert name == RATED
    return eq.sync.enqueue_many(RATED, [{"n": n} for n in range(12)])


@attrs.frozen
class Run:
    """One run of a job, as its worker logged it."""

    job_id: int
    attempt: int
    name: str
    key: str
    pid: int
    start: float
    end: float


Line = tuple[str, int, int, str, str, int, float]


@attrs.frozen
class Drain:
    """What one drain of every kind of job by the worker processes left behind."""

    backend: str
    layout: str
    ids: dict[str, list[int]]  # by job name
    lines: list[Line]
    runs: list[Run]
    jobs: dict[int, Job]  # as the database has them at the end

    def of(self, name: str) -> list[Run]:
        assert len(self.ids[name]) == 12
        return [run for run in self.runs if run.name == name]


def timeline(runs: Iterable[Run]) -> list[tuple[int, int, str, float, float]]:
    """The runs by start (job id, pid, key, start, end), for failure messages."""
    return [(r.job_id, r.pid, r.key, r.start, r.end) for r in sorted(runs, key=lambda r: r.start)]


def max_overlap(runs: Iterable[Run]) -> int:
    """The most runs in progress at any one time. At equal times a start counts
    before an end: the stricter reading (it can only make the overlap bigger)."""
    runs = list(runs)
    events = sorted([(run.start, 0) for run in runs] + [(run.end, 1) for run in runs])
    most = now = 0
    for _, is_end in events:
        now += -1 if is_end else 1
        most = max(most, now)
    return most


def most_in_a_window(times: Sequence[float], window: float) -> int:
    """The most of ``times`` in any half-open window ``[t, t + window)``."""
    times = sorted(times)
    most = 0
    for i, first in enumerate(times):
        most = max(most, sum(1 for t in times[i:] if t - first < window))
    return most


def _runs(lines: list[Line]) -> list[Run]:
    """The logged runs: each start paired with the end of the same job and attempt."""
    starts = {(i, a): (n, k, p, t) for e, i, a, n, k, p, t in lines if e == "start"}
    ends = {(i, a): t for e, i, a, _, _, _, t in lines if e == "end"}
    return [
        Run(job_id, attempt, name, key, pid, start, ends[job_id, attempt])
        for (job_id, attempt), (name, key, pid, start) in starts.items()
        if (job_id, attempt) in ends
    ]


def _backend_url(backend: str, request: pytest.FixtureRequest, tmp: Path) -> tuple[str, str]:
    """The URL and schema of a fresh database of ``backend``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp}/jobs.db", "public"
    database_url: str = request.getfixturevalue("database_url")
    url = database_url.replace("postgresql://", f"postgresql+{backend}://", 1)
    return url, f"limits_{os.getpid()}_{backend}_{uuid.uuid4().hex[:6]}"


def _drop_schema(database_url: str, schema: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _wait_done(eq: Soniq, ids: list[int], log: str, workers: list[Process], what: str) -> None:
    """Wait until the jobs ``ids`` are all done (their ends logged first: the cheap
    check); fail at once if a worker exits, and with the workers' output past the
    deadline."""

    def done() -> bool:
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"a worker exited {w.proc.returncode}:\n{w.output}")
        wanted = set(ids)
        ended = {line[1] for line in read_log(log) if line[0] == "end"} & wanted
        if ended != wanted:
            return False
        return all((job := eq.sync.get_job(i)) and job.status == JobStatus.DONE for i in ids)

    try:
        wait_until(done, 30, what)
    except AssertionError as exc:
        outputs = "\n".join(w.output[-3000:] for w in workers)
        raise AssertionError(f"{exc}\nlog: {read_log(log)}\n{outputs}") from None


@pytest.fixture(
    scope="module",
    params=[(b, layout) for layout in LAYOUTS for b in BACKENDS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def drain(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Drain]:
    """Worker processes drain every kind of limited job, on one backend, in one
    layout (see the module's docstring)."""
    backend, layout = request.param
    processes, slots = LAYOUTS[layout]
    tmp = tmp_path_factory.mktemp(f"limits-{backend}-{layout}")
    url, schema = _backend_url(backend, request, tmp)
    log = str(tmp / "runs.log")
    eq = Soniq(url, schema=schema)
    workers: list[Process] = []
    try:
        eq.sync.ensure_initialized()
        eq.sync.set_queue_limits(CAPPED_QUEUE, concurrency=3)
        env = os.environ.copy()
        env.pop("SONIQ_DATABASE_URL", None)
        env.update(
            SONIQ_LIMITS_APP_URL=url, SONIQ_LIMITS_APP_SCHEMA=schema, SONIQ_LIMITS_APP_LOG=log
        )
        args = ["worker", f"{APP}:eq", "--concurrency", str(slots), "--poll-interval", "0.05"]
        workers += [Process(args, env) for _ in range(processes)]
        for w in workers:
            w.wait_for_output(" started: ")
        kinds = (PAIR, PER_ACCOUNT, CAPPED, RATED)
        ids: dict[str, list[int]] = {}
        if layout == "mixed":
            ids = {name: _enqueue(eq, name) for name in kinds}
            every_id = [i for group in ids.values() for i in group]
            _wait_done(eq, every_id, log, workers, "the workers to finish every job")
        else:
            for name in kinds:
                ids[name] = _enqueue(eq, name)
                _wait_done(eq, ids[name], log, workers, f"the workers to finish {name}")
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            code, out = w.finish(timeout=30)
            assert code == 0, out

        lines = read_log(log)
        every_id = [i for group in ids.values() for i in group]
        jobs = {i: job for i in every_id if (job := eq.sync.get_job(i)) is not None}
        yield Drain(backend, layout, ids, lines, _runs(lines), jobs)
    finally:
        for w in workers:
            w.kill()
        eq.sync.close()
        if backend != "sqlite":
            _drop_schema(request.getfixturevalue("database_url"), schema)


# -- every job once --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_every_job_ran_exactly_once_and_the_processes_shared_them(drain: Drain) -> None:
    every_id = sorted(i for group in drain.ids.values() for i in group)
    starts = collections.Counter(i for e, i, _, _, _, _, _ in drain.lines if e == "start")
    ends = collections.Counter(i for e, i, _, _, _, _, _ in drain.lines if e == "end")
    assert starts == ends == {i: 1 for i in every_id}
    assert sorted(run.job_id for run in drain.runs) == every_id
    assert {run.attempt for run in drain.runs} == {1}
    assert sorted(drain.jobs) == every_id
    assert {job.status for job in drain.jobs.values()} == {JobStatus.DONE}
    assert {job.attempts for job in drain.jobs.values()} == {1}
    # The limits were held by several processes, not by one worker alone.
    assert len({run.pid for run in drain.runs}) >= 2, timeline(drain.runs)
    if drain.layout == "one-slot":
        # One job at a time per process: each overlap below is one of processes.
        for pid in {run.pid for run in drain.runs}:
            assert max_overlap(r for r in drain.runs if r.pid == pid) == 1


# -- concurrency -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_job_concurrency_limit_holds_across_processes(drain: Drain) -> None:
    runs = drain.of(PAIR)
    assert max_overlap(runs) == 2, timeline(runs)  # reached, never exceeded


@pytest.mark.timeout(60)
def test_a_per_key_concurrency_limit_holds_per_key_and_blocks_no_other_key(
    drain: Drain,
) -> None:
    runs = drain.of(PER_ACCOUNT)
    assert sorted(collections.Counter(run.key for run in runs).items()) == [
        (account, 4) for account in ACCOUNTS
    ]
    for account in ACCOUNTS:
        mine = [r for r in runs if r.key == account]
        assert max_overlap(mine) == 1, (account, timeline(runs))
    # Accounts ran side by side: a full account held up no other.
    assert max_overlap(runs) > 1, timeline(runs)


@pytest.mark.timeout(60)
def test_a_stored_queue_concurrency_limit_holds_across_processes(drain: Drain) -> None:
    runs = drain.of(CAPPED)
    assert max_overlap(runs) == 3, timeline(runs)  # reached, never exceeded


# -- rate ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_rate_limit_holds_across_processes(drain: Drain) -> None:
    runs = drain.of(RATED)
    assert len(runs) == 12
    # The limit is kept by the database's clock: each claim counts the starts logged
    # less than a second before its own timestamp, and that timestamp is the job's
    # started_at (on PostgreSQL the claim is one statement in its own transaction, so
    # its now() is the statement_timestamp() the rate log records; on SQLite both are
    # the claiming worker's clock). By that clock the bound is exact: at most 4 in any
    # window of 1 s (less a microsecond, for the rounding of SQLite's float seconds).
    claimed = [_started_at(drain.jobs[run.job_id]) for run in runs]
    assert most_in_a_window(claimed, 1.0 - 1e-6) == 4, sorted(claimed)
    assert max(claimed) - min(claimed) >= 2.0 - 1e-6  # 12 starts: three windows at least
    # The starts each worker process logged, by the machine's clock (the database runs
    # on this machine too: no skew between clocks). A run starts a little after its
    # claim's timestamp: the claim's rows are dispatched when the whole claim returns,
    # after waiting for the claims' turn, the round trips and the event loop. That
    # delay varies from claim to claim (mostly 1 to 30 ms here, past 50 ms now and then
    # on a busy two-core machine), so the starts of two windows may look a little
    # closer than a second. Hence windows of 0.9 s: a 100 ms margin for that delay.
    started = [run.start for run in runs]
    assert most_in_a_window(started, 0.9) == 4, timeline(runs)
    assert max(started) - min(started) >= 1.9, timeline(runs)


def _started_at(job: Job) -> float:
    """When the job's claim took it, by the database's clock (as a Unix time)."""
    assert job.started_at is not None
    return job.started_at.timestamp()
