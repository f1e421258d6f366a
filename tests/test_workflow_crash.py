"""A worker killed in the middle of a 1,000-job graph: its parents are rescued as
any job is, their children still run exactly when they should, and every job ends.

The graph (:func:`plan`, seeded): a fan-out group of 150 jobs with a fan-in callback,
a second group of 60 with its own, 20 chains of 12 links, 547 jobs that wait
(``depends_on``) for 2 to 5 earlier jobs of any kind (every 25th for 10 to 40, some
with ``on_parent_failure="run"``), and a sink waiting for both callbacks and the last
30 jobs: 1,000 jobs of ``tests.workflow_app`` (async and sync, each sleeping a few
ms and returning a value computed from its parents' results).

Per backend (PostgreSQL, a SQLite file):

1. the graph is enqueued, and one ``soniq worker`` process (the CLI) starts on it;
2. once the database shows a good part, not all, of the graph done, the test arms the
   freeze (see tests/workflow_app.py): the next async job that has children to end
   blocks its worker's loop as it returns, so its completion cannot be written;
3. the test SIGKILLs that worker then: a parent that finished while its worker
   died, with other jobs of the worker still running (or ended, unwritten);
4. the database, once the dead worker's sessions are gone, must show exactly that:
   the frozen parent ``running``, its children still waiting, some jobs not done;
5. a second worker (short heartbeat and ``stale_after``) rescues the dead worker's
   jobs and runs the rest; the test waits until every job has ended (bounded).

Then: every job is ``done`` with nothing left to settle (no edge left, nothing
waiting); every job got exactly its parents' results, so its claim saw every parent
done (the fan-in callbacks the values of their whole group, each chain link its
predecessor's); every logged start of every run (the dead worker's too) came after
the end of the run that completed each parent (the machine's clock); every child's
``started_at`` is not before its parents' ``finished_at`` (the database's times);
only the jobs that
were running when the worker died ran twice, and the frozen parent was completed
after the kill.

About 5 s per backend. The figures of each run (when the kill landed, how many jobs
were rescued) are printed (``-s``).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest

from soniq import Job, JobStatus, Soniq
from tests.conftest import Process, wait_until
from tests.workflow_app import MODULUS, read_log

pytestmark = pytest.mark.slow


APP = "tests.workflow_app"
NODE = f"{APP}.node"
NODE_SYNC = f"{APP}.node_sync"
TOTAL = 1000
#: Done when the freeze is armed: a good part of the graph, far from all of it.
ARM_AT = 350
# Short enough that the dead worker's jobs come back within a few seconds.
WORKER = (
    "worker",
    f"{APP}:eq",
    "--concurrency",
    "8",
    "--heartbeat-interval",
    "0.25",
    "--stale-after",
    "2",
    "--command-timeout",
    "1",
    "--poll-interval",
    "0.1",
    "--shutdown-timeout",
    "5",
)
ENDED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


# -- the graph -------------------------------------------------------------------------


@attrs.frozen
class Planned:
    """One job of the graph; ``parents`` are indexes of earlier jobs."""

    index: int
    kind: str  # member, callback, link, multi, sink
    job: str
    base: int
    ms: float
    parents: tuple[int, ...] = ()
    run_anyway: bool = False

    def args(self, has_children: bool) -> dict[str, Any]:
        # Only an async job with children may freeze its worker (tests/workflow_app.py).
        return {"base": self.base, "ms": self.ms, "freeze": has_children}


@attrs.frozen
class Graph:
    nodes: list[Planned]
    #: How to enqueue it, in order: ("group", members + callback), ("chain", links),
    #: ("one", [index]).
    steps: list[tuple[str, list[int]]]

    def children(self) -> dict[int, list[int]]:
        found: dict[int, list[int]] = collections.defaultdict(list)
        for node in self.nodes:
            for parent in node.parents:
                found[parent].append(node.index)
        return found

    def expected_values(self) -> list[int]:
        """What each job returns as ``v`` when it got its parents' results."""
        values: list[int] = []
        for node in self.nodes:  # parents come first
            values.append((node.base + sum(values[p] for p in node.parents)) % MODULUS)
        return values


def plan(seed: int) -> Graph:
    rng = random.Random(seed)
    nodes: list[Planned] = []
    steps: list[tuple[str, list[int]]] = []

    def add(kind: str, parents: list[int] | tuple[int, ...] = (), run_anyway: bool = False) -> int:
        index = len(nodes)
        job = NODE_SYNC if rng.random() < 0.25 else NODE
        ms = round(rng.uniform(2, 10), 1)
        nodes.append(
            Planned(
                index, kind, job, rng.randrange(MODULUS), ms, tuple(sorted(parents)), run_anyway
            )
        )
        return index

    callbacks = []
    for size in (150, 60):
        members = [add("member") for _ in range(size)]
        callbacks.append(add("callback", members))
        steps.append(("group", [*members, callbacks[-1]]))
    for _ in range(20):
        links: list[int] = []
        for _ in range(12):
            links.append(add("link", links[-1:]))
        steps.append(("chain", links))
    multi = 0
    while len(nodes) < TOTAL - 1:
        fan_in = multi % 25 == 0
        parents = rng.sample(
            range(len(nodes)), rng.randint(10, 40) if fan_in else rng.randint(2, 5)
        )
        steps.append(("one", [add("multi", parents, run_anyway=rng.random() < 0.1)]))
        multi += 1
    sink = add("sink", sorted({*range(TOTAL - 31, TOTAL - 1), *callbacks}))
    steps.append(("one", [sink]))
    assert len(nodes) == TOTAL
    return Graph(nodes, steps)


def enqueue(eq: Soniq, graph: Graph) -> list[int]:
    """Enqueue the graph; the ids by index."""
    ids: dict[int, int] = {}
    children = graph.children()

    def pair(index: int) -> tuple[str, dict[str, Any]]:
        node = graph.nodes[index]
        return node.job, node.args(index in children)

    for kind, indexes in graph.steps:
        if kind == "group":
            got = eq.sync.enqueue_group([pair(i) for i in indexes[:-1]], then=pair(indexes[-1]))
        elif kind == "chain":
            got = eq.sync.enqueue_chain([pair(i) for i in indexes])
        else:
            [index] = indexes
            node = graph.nodes[index]
            job, args = pair(index)
            got = [
                eq.sync.enqueue(
                    job,
                    **args,
                    depends_on=[ids[p] for p in node.parents],
                    on_parent_failure="run" if node.run_anyway else "cancel",
                )
            ]
        assert len(got) == len(indexes)
        ids.update(zip(indexes, got, strict=True))
    return [ids[i] for i in range(TOTAL)]


# -- the database, seen from the test ---------------------------------------------------


class Store:
    """Plain reads of the jobs' table, for polling (cheaper than ``get_job`` x 1000)."""

    def __init__(self, url: str, schema: str, sqlite_path: Path | None) -> None:
        self.schema = schema
        self.sqlite_path = sqlite_path
        if sqlite_path is None:
            self.pg: psycopg.Connection[Any] | None = psycopg.connect(url, autocommit=True)
        else:
            self.pg = None

    def _rows(self, query: str) -> list[tuple[Any, ...]]:
        if self.pg is not None:
            return self.pg.execute(query.replace("soniq_", f'"{self.schema}".soniq_')).fetchall()
        conn = sqlite3.connect(str(self.sqlite_path), timeout=10)
        try:
            return conn.execute(query).fetchall()
        finally:
            conn.close()

    def statuses(self) -> collections.Counter[str]:
        rows = self._rows("SELECT status, count(*) FROM soniq_jobs GROUP BY status")
        return collections.Counter({status: int(count) for status, count in rows})

    def running(self) -> dict[int, int]:
        """The running jobs' claims, by id."""
        rows = self._rows("SELECT id, claims FROM soniq_jobs WHERE status = 'running'")
        return {int(i): int(c) for i, c in rows}

    def waiting(self) -> set[int]:
        return {int(i) for (i,) in self._rows("SELECT id FROM soniq_jobs WHERE status = 'waiting'")}

    def status_of(self, job_id: int) -> list[tuple[Any, ...]]:
        """A job's status, claims, worker and last error (for a failure's message)."""
        return self._rows(
            f"SELECT status, claims, worker_id, last_error FROM soniq_jobs WHERE id = {job_id}"
        )

    def edges_left(self) -> int:
        return int(self._rows("SELECT count(*) FROM soniq_job_deps")[0][0])

    def now(self) -> dt.datetime:
        """The clock the backend stamps jobs with (the server's; SQLite: the workers')."""
        if self.pg is None:
            return dt.datetime.now(dt.timezone.utc)
        row = self.pg.execute("SELECT now()").fetchone()
        assert row is not None and isinstance(row[0], dt.datetime)
        return row[0]

    def wait_quiet(self) -> None:
        """Wait until no session is still running a statement of this schema: the
        dead worker's in-flight statements (if any) have committed or rolled back, so
        what is read next is what the rescuer will find."""
        if self.pg is None:
            return  # a killed process commits nothing more on SQLite

        def quiet() -> bool:
            row = self.pg.execute(  # type: ignore[union-attr]
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state <> 'idle' AND query LIKE %s",
                (f"%{self.schema}%",),
            ).fetchone()
            return row is not None and row[0] == 0

        wait_until(quiet, 10, "the dead worker's sessions to end")

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()


def _alive(*workers: Process) -> None:
    for w in workers:
        if w.proc.poll() is not None:
            raise AssertionError(f"a worker exited {w.proc.returncode}:\n{w.output[-5000:]}")


# -- the test --------------------------------------------------------------------------


@attrs.frozen
class Killed:
    """What the database held once the killed worker could change nothing more."""

    statuses: collections.Counter[str]
    running: dict[int, int]  # claims by id
    waiting: set[int]
    frozen: int  # the job id of the parent that finished as its worker died
    at: dt.datetime  # the backend's clock then


def crash_and_rescue(
    url: str, schema: str, tmp: Path, seed: int, *, store_url: str, sqlite_path: Path | None
) -> None:
    """Enqueue the graph on ``url``, kill its first worker mid-graph, let a second
    one finish it, and check what happened (see the module's docstring). The test
    reads the database on ``store_url`` (a plain PostgreSQL URL), or in the SQLite
    file ``sqlite_path``."""
    graph = plan(seed)
    log, arm = tmp / "runs.log", tmp / "freeze.arm"
    env = os.environ.copy()
    env.pop("SONIQ_DATABASE_URL", None)
    env.update(
        SONIQ_WORKFLOW_APP_URL=url,
        SONIQ_WORKFLOW_APP_SCHEMA=schema,
        SONIQ_WORKFLOW_APP_LOG=str(log),
        SONIQ_WORKFLOW_APP_ARM=str(arm),
    )
    eq = Soniq(url, schema=schema)
    try:
        eq.sync.ensure_initialized()
        ids = enqueue(eq, graph)
    finally:
        eq.sync.close()
    index_of = {job_id: index for index, job_id in enumerate(ids)}
    children = graph.children()
    store = Store(store_url, schema, sqlite_path)
    workers: list[Process] = []
    try:
        ready = sum(
            1 for n in graph.nodes if n.kind == "member" or (n.kind == "link" and not n.parents)
        )
        assert store.statuses() == {"queued": ready, "waiting": TOTAL - ready}

        # The first worker judges no worker dead for a long while: with its loop
        # frozen and the machine busy, it must not put back its own frozen job (the
        # second worker, with the short stale_after, rescues its jobs after the kill).
        patient = [*WORKER[:-8], "--stale-after", "60", *WORKER[-6:]]
        first = Process(patient, {**env, "SONIQ_WORKFLOW_APP_FREEZE": "1"})
        workers.append(first)
        start = time.monotonic()

        def armed() -> bool:
            _alive(first)
            return store.statuses()["done"] >= ARM_AT

        wait_until(armed, 30, f"{ARM_AT} jobs done")
        arm.touch()

        def frozen() -> int | None:
            _alive(first)
            lines = [line for line in read_log(str(log)) if line[0] == "frozen"]
            return lines[0][1] if lines else None

        frozen_id = wait_until(frozen, 15, "a parent to finish and freeze its worker")
        first.kill()  # SIGKILL
        killed_after = time.monotonic() - start
        store.wait_quiet()
        killed = Killed(store.statuses(), store.running(), store.waiting(), frozen_id, store.now())

        # The kill landed mid-graph: a parent had finished its run (logged) but not
        # been written, its children still waiting; other jobs not done either.
        [frozen_line] = [line for line in read_log(str(log)) if line[0] == "frozen"]
        assert frozen_line[4] == first.pid
        assert killed.running.get(frozen_id) == frozen_line[2] == 1, (
            killed,
            store.status_of(frozen_id),
        )
        frozen_children = [ids[c] for c in children[index_of[frozen_id]]]
        assert frozen_children and set(frozen_children) <= killed.waiting, killed
        assert ARM_AT <= killed.statuses["done"] < TOTAL - 100, killed.statuses
        assert killed.statuses["waiting"] > 0 and killed.statuses["running"] > 0, killed
        assert sum(killed.statuses.values()) == TOTAL

        second = Process(list(WORKER), env)
        workers.append(second)

        def all_ended() -> bool:
            _alive(second)
            counts = store.statuses()
            return sum(counts[s.value] for s in ENDED) == TOTAL

        try:
            wait_until(all_ended, 40, "every job to end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {store.statuses()}\n{second.output[-5000:]}") from None
        rescued_after = time.monotonic() - start
        second.send_signal(signal.SIGTERM)
        code, out = second.finish(timeout=30)
        assert code == 0, out[-5000:]
        edges_left = store.edges_left()
    finally:
        for w in workers:
            w.kill()
        store.close()

    eq = Soniq(url, schema=schema)
    try:
        jobs = {job_id: eq.sync.get_job(job_id) for job_id in ids}
    finally:
        eq.sync.close()
    lines = read_log(str(log))
    check(graph, ids, jobs, lines, killed, edges_left, (first.pid, second.pid))
    print(
        f"[workflow crash] killed after {killed_after:.1f}s with {dict(killed.statuses)}; "
        f"all ended after {rescued_after:.1f}s; {len(killed.running)} jobs rescued, of "
        f"which {sum(1 for i in killed.running if _ended_run(lines, i))} had ended their run"
    )


def _ended_run(lines: list[tuple[str, int, int, int, int, float]], job_id: int) -> bool:
    return any(e == "end" and i == job_id and c == 1 for e, i, c, _, _, _ in lines)


def check(
    graph: Graph,
    ids: list[int],
    found: dict[int, Job | None],
    lines: list[tuple[str, int, int, int, int, float]],
    killed: Killed,
    edges_left: int,
    pids: tuple[int, int],
) -> None:
    """Assert what the module's docstring says; the number of children whose
    ``started_at`` precedes a parent's ``finished_at`` (within ``stamp_slack``)."""
    jobs: dict[int, Job] = {}
    for job_id, job in found.items():
        assert job is not None, job_id
        jobs[job_id] = job

    # Every job ended done; nothing waits, nothing is left to settle.
    not_done = {
        i: (j.status.value, j.waiting_for, j.last_error)
        for i, j in jobs.items()
        if j.status != JobStatus.DONE
    }
    assert not not_done, not_done
    assert {j.waiting_for for j in jobs.values()} == {0}
    assert edges_left == 0

    # The graph is the one planned.
    for node in graph.nodes:
        assert set(jobs[ids[node.index]].parents) == {ids[p] for p in node.parents}, node

    # Exactly the jobs running when the worker died ran again (rescued, the attempt
    # counted); every other job was claimed once.
    claims = {i: (j.claims, j.attempts) for i, j in jobs.items()}
    assert {i for i, (c, _) in claims.items() if c != 1} == set(killed.running), claims
    for job_id in killed.running:
        assert claims[job_id] == (2, 2), (job_id, claims[job_id])
        assert "WorkerLost" in (jobs[job_id].last_error or ""), jobs[job_id]

    # Each job saw exactly its parents' results (computed from theirs, and so on). A
    # claim reads the results of the parents that are done in its own snapshot: a
    # child claimed before one of its parents was done would miss that one.
    values = graph.expected_values()
    for node in graph.nodes:
        result = jobs[ids[node.index]].result
        expected_seen = {str(ids[p]): values[p] for p in node.parents}
        assert result == {"v": values[node.index], "seen": expected_seen}, (node, result)
    for node in graph.nodes:
        if node.kind == "callback":  # a fan-in saw its whole group
            result = jobs[ids[node.index]].result
            assert len(result["seen"]) == len(node.parents) >= 60
            assert sum(result["seen"].values()) == sum(values[p] for p in node.parents)

    # By the runs' own log (the machine's clock), every run included (the dead
    # worker's too): each start of a child came after the end of the run that
    # completed each of its parents.
    starts: dict[int, list[tuple[int, int, float]]] = collections.defaultdict(list)
    ends: dict[tuple[int, int], float] = {}
    for event, job_id, claim, _, pid, at in lines:
        if event == "start":
            starts[job_id].append((claim, pid, at))
        elif event == "end":
            ends[job_id, claim] = at
    assert set(starts) == set(ids)
    assert {pid for runs in starts.values() for _, pid, _ in runs} == set(pids)
    for job_id, job in jobs.items():
        assert (job_id, job.claims) in ends, (job_id, job.claims)  # the run that counted
        assert [c for c, _, _ in starts[job_id]] == sorted({c for c, _, _ in starts[job_id]})
    early_runs = []
    for node in graph.nodes:
        job_id = ids[node.index]
        for parent in node.parents:
            parent_id = ids[parent]
            parent_end = ends[parent_id, jobs[parent_id].claims]
            early_runs += [(job_id, c, parent_id) for c, _, at in starts[job_id] if at < parent_end]
    assert not early_runs, early_runs

    # The frozen parent was completed by the rescuer, after the kill.
    frozen = jobs[killed.frozen]
    assert frozen.finished_at is not None and frozen.finished_at > killed.at

    # By the database's times: each child's started_at is not before its parents'
    # finished_at.
    early = []
    for node in graph.nodes:
        if not node.parents:
            continue
        job = jobs[ids[node.index]]
        finished = [jobs[ids[p]].finished_at for p in node.parents]
        assert job.started_at is not None and None not in finished
        last_parent = max(f for f in finished if f is not None)
        if job.started_at < last_parent:
            early.append((job.id, job.started_at, last_parent))
    assert not early, early


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_a_worker_killed_mid_graph_on_postgresql(
    driver: str, database_url: str, schema: str, tmp_path: Path
) -> None:
    url = database_url.replace("postgresql://", f"postgresql+{driver}://", 1)
    crash_and_rescue(url, schema, tmp_path, 1, store_url=database_url, sqlite_path=None)


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_graph_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    crash_and_rescue(f"sqlite:///{path}", "public", tmp_path, 2, store_url="", sqlite_path=path)
