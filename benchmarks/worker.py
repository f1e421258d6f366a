"""The worker side: drain rate, enqueue-to-start latency, worker memory, and the drain
over a table holding 1,000,000 finished rows. Soniq beside pgqueuer, procrastinate and
the raw limit.

Every system gets a fresh database and one long-lived worker process
(:mod:`benchmarks._child`) that imports its library and opens its connections once,
then runs the system's worker on command:

* **drain**: the parent empties the tables, waits until no autovacuum worker runs,
  checkpoints, and queues N no-op jobs with the system's own batch call (all
  untimed); the child times its worker's drain/burst mode from the call to its return
  (worker startup, claims, runs, completion writes, shutdown): for Soniq ``await
  eq.run_worker(concurrency=100, burst=True, retention=None)``. The rows are checked,
  then the tables emptied at once (so that no vacuum of them lands in the next
  system's measurement). Async jobs, and sync jobs where the system has them (Soniq
  runs ``def`` jobs in threads, procrastinate too; pgqueuer's handlers are async
  only). procrastinate, ~50x slower, drains a tenth of N.
* **latency**: the child's worker idles in its continuous mode; the parent enqueues
  one job at a time, about 100 a second, with the system's own single-enqueue call,
  passing ``time.time()`` read just before the call; the job reads ``time.time()``
  as it starts. p50 and p99 per repeat.
* **latency under load** (Soniq): the same, but the jobs are enqueued by 64
  coroutines at once, each one job at a time and as fast as it can (a web server's
  requests; their enqueues are merged, ``soniq.drivers.insert_lines``), ten times as
  many jobs; the worker drains them while they come. p50 and p99 per repeat.
* **RSS**: the child's peak resident memory during each async drain (the kernel's
  high-water mark, reset before the drain).
* **bloat**: the same drain (fewer jobs) after one ``INSERT ... SELECT
  generate_series`` put 1,000,000 finished rows where the system keeps finished jobs,
  followed by ``VACUUM ANALYZE`` (what autovacuum does soon after such a load).

Each repeat runs every system of a measurement back to back, in an order rotated from
one repeat to the next; ratios are per repeat and summarised by their median.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from benchmarks import jobs
from benchmarks._child import MARK
from benchmarks._common import Series, paired_ratios, quiesce, render_table, target
from soniq import Soniq

ROOT = Path(__file__).resolve().parent.parent

TARGET_DRAIN = 25_000.0  # Soniq, async no-op jobs, concurrency 100, jobs/s
TARGET_DRAIN_RATIO = 3.0  # Soniq / pgqueuer at batch 50, max_concurrent_tasks 100
TARGET_P50_MS = 2.0
TARGET_P99_MS = 5.0


def _v(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class System:
    key: str
    family: str  # soniq | pgqueuer | procrastinate | raw
    label: str
    settings: dict[str, Any]
    kinds: tuple[str, ...] = ("async",)  # drains it runs
    latency: bool = False
    loaded: bool = False  # also the latency under load (64 coroutines enqueueing)
    bloat: bool = False
    scale: float = 1.0  # a slow system drains this fraction of the jobs the others do


#: Soniq on asyncpg with soniq.contrib.prometheus instrumenting its worker.
METRICS = "soniq-asyncpg-metrics"


def systems() -> list[System]:
    pgq, proc = _v("pgqueuer"), _v("procrastinate")
    return [
        System(
            "soniq-asyncpg",
            "soniq",
            "soniq, asyncpg, concurrency 100",
            {"driver": "asyncpg", "concurrency": 100},
            ("async", "sync"),
            latency=True,
            loaded=True,
            bloat=True,
        ),
        System(
            "soniq-psycopg",
            "soniq",
            "soniq, psycopg async, concurrency 100",
            {"driver": "psycopg", "concurrency": 100},
            ("async", "sync"),
            latency=True,
            loaded=True,
        ),
        # The same worker measured by soniq.contrib.prometheus (its run middleware on
        # every job): the cost of metrics, reported as a ratio to soniq-asyncpg.
        System(
            METRICS,
            "soniq",
            "soniq, asyncpg, concurrency 100, Prometheus metrics",
            {"driver": "asyncpg", "concurrency": 100, "metrics": True},
            ("async", "sync"),
        ),
        System(
            "pgqueuer-50",
            "pgqueuer",
            f"pgqueuer {pgq}, batch 50, max tasks 100",
            {"batch_size": 50, "max_tasks": 100},
            latency=True,
            bloat=True,
        ),
        System(
            "pgqueuer-200",
            "pgqueuer",
            f"pgqueuer {pgq}, batch 200, max tasks 400 (its best)",
            {"batch_size": 200, "max_tasks": 400},
        ),
        System(
            "procrastinate",
            "procrastinate",
            f"procrastinate {proc}, concurrency 100",
            {"concurrency": 100},
            ("async", "sync"),
            latency=True,
            bloat=True,
            scale=0.1,
        ),
        System(
            "raw-100",
            "raw",
            "raw asyncpg, 2 x (claim 50, finish 50)",
            {"loops": 2, "batch": 50},
            ("async", "sync"),
            latency=True,
            bloat=True,
        ),
        System(
            "raw-1000",
            "raw",
            "raw asyncpg, 4 x (claim 250, finish 250)",
            {"loops": 4, "batch": 250},
        ),
    ]


SONIQ = "soniq-asyncpg"  # the Soniq every ratio is taken for
LOAD_COROUTINES = 64  # enqueueing at once in the latency-under-load measurement
PGQUEUER_SAME_BUDGET = "pgqueuer-50"


# --- the parent's side of each system: schema, enqueue, reset, checks ---------------


class Producer:
    """Installs a system's schema, enqueues its jobs the way its users do, and knows
    its tables (through a plain autocommit connection, ``self.control``)."""

    family = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self.control = psycopg.connect(url, autocommit=True)
        self.can_checkpoint = True
        self.bloat_max_id = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue_batch(self, kind: str, n: int) -> None:
        raise NotImplementedError

    async def enqueue_one(self, enqueued_at: float) -> None:
        raise NotImplementedError

    # SQL per family
    truncate = ""
    finished = ""  # finished jobs with id > %s
    leftover = ""  # jobs not finished (queued or running) with id > %s
    bloat_insert = ""  # %s: how many rows
    bloat_vacuum = ""
    bloat_clear = ""  # delete rows of id > %s

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        for statement in sql.split(";"):
            if statement.strip():
                self.control.execute(statement, params if "%s" in statement else ())

    def checkpoint(self) -> None:
        if self.can_checkpoint:
            try:
                self.control.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                self.can_checkpoint = False

    def clear(self) -> None:
        """Empty the job tables (keeping the bloat rows, if any): after a measurement,
        so that no vacuum of these rows runs during another system's measurement."""
        if self.bloat_max_id:
            self.execute(self.bloat_clear, (self.bloat_max_id,))
            self.execute(self.bloat_vacuum)
        else:
            self.execute(self.truncate)

    def reset(self) -> None:
        """Before a measurement: empty tables, no autovacuum running, a checkpoint."""
        self.clear()
        quiesce(self.control)
        self.checkpoint()

    def counts(self) -> tuple[int, int]:
        """(finished, not finished) among jobs newer than the bloat rows."""
        done = self.control.execute(self.finished, (self.bloat_max_id,)).fetchone()
        left = self.control.execute(self.leftover, (self.bloat_max_id,)).fetchone()
        assert done is not None and left is not None
        return done[0], left[0]

    def add_bloat(self, rows: int) -> float:
        """Insert ``rows`` finished rows in one statement, vacuum and analyze; seconds."""
        started = time.perf_counter()
        self.execute(self.truncate)
        self.execute(self.bloat_insert, (rows,))
        self.execute(self.bloat_vacuum)
        self.bloat_max_id = self.max_id()
        self.checkpoint()
        return time.perf_counter() - started

    def max_id(self) -> int:
        raise NotImplementedError

    def close_control(self) -> None:
        self.control.close()


SONIQ_BLOAT = """
INSERT INTO public.soniq_jobs
    (name, queue, args, status, attempts, worker_id, created_at, started_at, finished_at)
SELECT 'bench.noop', 'default', jsonb_build_object('n', g), 'done', 1, 'old-worker',
       now() - interval '1 hour', now() - interval '1 hour', now() - interval '1 hour'
FROM generate_series(1, %s) AS g"""


class SoniqProducer(Producer):
    family = "soniq"
    truncate = "TRUNCATE public.soniq_jobs"
    finished = "SELECT count(*) FROM public.soniq_jobs WHERE status = 'done' AND id > %s"
    leftover = "SELECT count(*) FROM public.soniq_jobs WHERE status <> 'done' AND id > %s"
    bloat_insert = SONIQ_BLOAT
    bloat_vacuum = "VACUUM ANALYZE public.soniq_jobs"
    bloat_clear = "DELETE FROM public.soniq_jobs WHERE id > %s"

    def __init__(self, url: str, driver: str) -> None:
        super().__init__(url)
        self.eq = jobs.register_soniq(Soniq(url, driver=driver))

    async def open(self) -> None:
        await self.eq.ensure_initialized()

    async def close(self) -> None:
        await self.eq.close()

    async def enqueue_batch(self, kind: str, n: int) -> None:
        name = jobs.NOOP if kind == "async" else jobs.NOOP_SYNC
        await self.eq.enqueue_many(name, [{"n": i} for i in range(n)])

    async def enqueue_one(self, enqueued_at: float) -> None:
        await self.eq.enqueue(jobs.LATENCY, t=enqueued_at)

    def max_id(self) -> int:
        row = self.control.execute("SELECT coalesce(max(id), 0) FROM public.soniq_jobs").fetchone()
        return int(row[0]) if row else 0


RAW_BATCH = (
    "INSERT INTO public.soniq_jobs (name, queue, args) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[])"
)
RAW_ONE = (
    "WITH ins AS (INSERT INTO public.soniq_jobs (name, queue, args) "
    "VALUES ($1, 'default', $2::jsonb) RETURNING id, queue) "
    "SELECT id, pg_notify('soniq:public', queue) FROM ins"
)


class RawProducer(SoniqProducer):
    """Soniq's table and schema, rows inserted by hand (INSERT + pg_notify)."""

    family = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url, "asyncpg")
        self.pool: Any = None

    async def open(self) -> None:
        await self.eq.ensure_initialized()
        await self.eq.close()
        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=2)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def enqueue_batch(self, kind: str, n: int) -> None:
        name = jobs.NOOP if kind == "async" else jobs.NOOP_SYNC
        args = [json.dumps({"n": i}) for i in range(n)]
        await self.pool.execute(RAW_BATCH, [name] * n, ["default"] * n, args)

    async def enqueue_one(self, enqueued_at: float) -> None:
        await self.pool.fetchval(RAW_ONE, jobs.LATENCY, json.dumps({"t": enqueued_at}))


class PgqueuerProducer(Producer):
    """pgqueuer's ``Queries`` on an asyncpg pool. Finished jobs leave its queue table
    and stay as rows of ``pgqueuer_log``: that is where the bloat rows go."""

    family = "pgqueuer"
    truncate = "TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics"
    finished = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful' AND job_id > %s"
    leftover = "SELECT count(*) FROM pgqueuer WHERE id > %s"
    bloat_insert = """
INSERT INTO pgqueuer_log (created, job_id, status, priority, entrypoint, aggregated)
SELECT now() - interval '1 hour', g, 'successful', 0, 'bench.noop', true
FROM generate_series(1, %s) AS g"""
    bloat_vacuum = "VACUUM ANALYZE pgqueuer; VACUUM ANALYZE pgqueuer_log"
    bloat_clear = (
        "TRUNCATE pgqueuer, pgqueuer_statistics; DELETE FROM pgqueuer_log WHERE job_id > %s"
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.pool: Any = None
        self.queries: Any = None

    async def open(self) -> None:
        from pgqueuer import AsyncpgPoolDriver, Queries

        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=10)
        self.queries = Queries(AsyncpgPoolDriver(self.pool))
        await self.queries.install()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def enqueue_batch(self, kind: str, n: int) -> None:
        payloads = [str(i).encode() for i in range(n)]
        await self.queries.enqueue([jobs.NOOP] * n, payloads, [0] * n)

    async def enqueue_one(self, enqueued_at: float) -> None:
        await self.queries.enqueue(jobs.LATENCY, repr(enqueued_at).encode())

    def max_id(self) -> int:
        # Bloat rows use job ids 1..N; pgqueuer's own ids continue from its sequence,
        # so move the sequence past them.
        row = self.control.execute("SELECT coalesce(max(job_id), 0) FROM pgqueuer_log").fetchone()
        top = int(row[0]) if row else 0
        self.control.execute("SELECT setval('pgqueuer_id_seq', %s)", (top + 1,))
        return top


class ProcrastinateProducer(Producer):
    """procrastinate on its psycopg async connector; it keeps finished jobs in
    ``procrastinate_jobs`` (status ``succeeded``) by default."""

    family = "procrastinate"
    truncate = "TRUNCATE procrastinate_jobs, procrastinate_workers CASCADE"
    finished = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded' AND id > %s"
    leftover = "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded' AND id > %s"
    bloat_insert = """
INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)
SELECT 'default', 'bench.noop', jsonb_build_object('n', g), 'succeeded', 1
FROM generate_series(1, %s) AS g"""
    bloat_vacuum = "VACUUM ANALYZE procrastinate_jobs; VACUUM ANALYZE procrastinate_events"
    bloat_clear = "DELETE FROM procrastinate_jobs WHERE id > %s"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from procrastinate import App, PsycopgConnector

        self.app = App(connector=PsycopgConnector(conninfo=url, min_size=1, max_size=10))
        jobs.register_procrastinate(self.app)

    async def open(self) -> None:
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()

    async def close(self) -> None:
        await self.app.close_async()

    async def enqueue_batch(self, kind: str, n: int) -> None:
        task = self.app.tasks[jobs.NOOP if kind == "async" else jobs.NOOP_SYNC]
        await task.batch_defer_async(*({"n": i} for i in range(n)))

    async def enqueue_one(self, enqueued_at: float) -> None:
        await self.app.tasks[jobs.LATENCY].defer_async(t=enqueued_at)

    def max_id(self) -> int:
        row = self.control.execute("SELECT coalesce(max(id), 0) FROM procrastinate_jobs").fetchone()
        return int(row[0]) if row else 0


def make_producer(system: System, url: str) -> Producer:
    if system.family == "soniq":
        return SoniqProducer(url, system.settings["driver"])
    if system.family == "raw":
        return RawProducer(url)
    if system.family == "pgqueuer":
        return PgqueuerProducer(url)
    return ProcrastinateProducer(url)


# --- the worker processes -------------------------------------------------------------


class ChildFailed(Exception):
    """A worker process that crashed, answered with an error, or did not answer."""


class Child:
    """A worker process of one system; JSON lines in, ``@@bench`` lines out."""

    def __init__(self, system: System, url: str) -> None:
        spec = {"family": system.family, "url": url, **system.settings}
        self.system = system
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from benchmarks._child import main; main()", json.dumps(spec)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.startup: dict[str, Any] | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK) :]))
        self.replies.put(None)  # the process ended

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise ChildFailed(f"worker process is gone ({exc})") from exc

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise ChildFailed(f"no answer within {timeout:.0f} s; worker process killed") from None
        if answer is None:
            raise ChildFailed(f"worker process exited with status {self.proc.wait()}")
        if answer.get("error") and "latencies" not in answer:
            raise ChildFailed(answer["error"])
        return answer

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.wait(timeout=15)
            except (ChildFailed, subprocess.TimeoutExpired):
                self.kill()


# --- the run ----------------------------------------------------------------------------


@dataclass
class Sizes:
    drain: int
    warmup: int
    latency: int
    latency_warmup: int
    loaded: int  # jobs per latency-under-load measurement
    rate: float
    bloat_rows: int
    bloat_drain: int
    repeats: int
    timeout: float
    settle: float

    def capped(self, system: System, n: int) -> int:
        """How many jobs ``system`` gets where the others get ``n``."""
        return n if system.scale == 1.0 else max(10, round(n * system.scale))


@dataclass
class Results:
    series: dict[str, Series] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, mid: str) -> Series:
        return self.series.setdefault(mid, Series())


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class WorkerBench:
    def __init__(
        self,
        plan: list[System],
        urls: dict[str, str],
        sizes: Sizes,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.plan = plan
        self.urls = urls
        self.sizes = sizes
        self.loop = loop
        self.producers: dict[str, Producer] = {}
        self.children: dict[str, Child] = {}
        self.results = Results()

    def open(self) -> None:
        for s in self.plan:
            producer = self.producers[s.key] = make_producer(s, self.urls[s.key])
            self.loop.run_until_complete(producer.open())
        # Start every worker process at once; each imports and connects in parallel.
        for s in self.plan:
            self.children[s.key] = Child(s, self.urls[s.key])
        for s in self.plan:
            child = self.children[s.key]
            try:
                child.startup = child.receive(self.sizes.timeout)
            except ChildFailed as exc:
                self._fail_all(s, f"start: {exc}")

    def close(self) -> None:
        for child in self.children.values():
            child.stop()
        for producer in self.producers.values():
            self.loop.run_until_complete(producer.close())
            producer.close_control()

    def _fail_all(self, s: System, reason: str) -> None:
        for mid in self._ids(s):
            self.results.get(mid).failure = reason
        print(f"  {s.key} FAILED: {reason}", file=sys.stderr, flush=True)

    def _ids(self, s: System) -> list[str]:
        out = [f"drain-{k}/{s.key}" for k in s.kinds] + [f"rss/{s.key}"]
        if s.latency:
            out += [f"latency-p50/{s.key}", f"latency-p99/{s.key}"]
        if s.loaded:
            out += [f"latency-loaded-p50/{s.key}", f"latency-loaded-p99/{s.key}"]
        if s.bloat:
            out.append(f"bloat/{s.key}")
        return out

    def _failed(self, s: System) -> bool:
        return any(self.results.get(mid).failure for mid in self._ids(s))

    # -- one measurement each ----------------------------------------------------------

    def drain(self, s: System, kind: str, n: int, *, record: str | None) -> None:
        """Queue ``n`` jobs, have the child drain them, check the rows; record the
        rate under ``record`` (None: a warm-up)."""
        if self._failed(s):
            return
        producer, child = self.producers[s.key], self.children[s.key]
        try:
            producer.reset()
            self.loop.run_until_complete(producer.enqueue_batch(kind, n))
            child.send({"op": "drain", "kind": kind})
            answer = child.receive(self.sizes.timeout)
            done, left = producer.counts()
            producer.clear()
            if answer["ran"] != n or done != n or left:
                raise ChildFailed(
                    f"{kind} drain of {n}: ran {answer['ran']}, {done} finished, {left} left"
                )
        except Exception as exc:  # recorded as the failure; the run goes on
            self._fail_all(s, f"{'warm-up ' if record is None else ''}{kind} drain: {exc}")
            return
        if record is not None:
            self.results.get(record).rates.append(n / answer["elapsed"])
            if kind == "async" and not record.startswith("bloat"):
                self.results.get(f"rss/{s.key}").rates.append(answer["rss_peak_kib"] / 1024)

    def latency(self, s: System, n: int, *, record: bool, loaded: bool = False) -> None:
        """Enqueue-to-start latency of ``n`` jobs: paced one client, or ``loaded``: as
        fast as :data:`LOAD_COROUTINES` coroutines enqueue them."""
        if self._failed(s):
            return
        producer, child = self.producers[s.key], self.children[s.key]
        try:
            producer.reset()
            child.send({"op": "latency", "n": n, "settle": self.sizes.settle, "timeout": 30.0})
            child.receive(self.sizes.timeout)
            send = self._flood if loaded else self._pace
            self.loop.run_until_complete(send(producer, n))
            answer = child.receive(self.sizes.timeout)
            producer.clear()
            if answer.get("error"):
                raise ChildFailed(answer["error"])
        except Exception as exc:  # recorded as the failure; the run goes on
            self._fail_all(s, f"{'warm-up ' if not record else ''}latency: {exc}")
            return
        if record:
            ms = [x * 1000 for x in answer["latencies"]]
            prefix = "latency-loaded" if loaded else "latency"
            self.results.get(f"{prefix}-p50/{s.key}").rates.append(_pct(ms, 0.50))
            self.results.get(f"{prefix}-p99/{s.key}").rates.append(_pct(ms, 0.99))

    async def _pace(self, producer: Producer, n: int) -> None:
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / self.sizes.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.enqueue_one(time.time())

    async def _flood(self, producer: Producer, n: int) -> None:
        left = iter(range(n))  # shared: each coroutine takes the next job

        async def caller() -> None:
            for _ in left:
                await producer.enqueue_one(time.time())

        await asyncio.gather(*(caller() for _ in range(LOAD_COROUTINES)))

    # -- the whole run -----------------------------------------------------------------

    def run(self) -> None:
        sz = self.sizes
        started = time.perf_counter()
        for s in self.plan:  # warm-up: connections, prepared statements, code paths
            for kind in s.kinds:
                self.drain(s, kind, sz.capped(s, sz.warmup), record=None)
            if s.latency:
                self.latency(s, sz.latency_warmup, record=False)
            if s.loaded:
                self.latency(s, sz.loaded // 10, record=False, loaded=True)
        groups: list[tuple[str, list[System]]] = [
            (f"drain-{kind}", [s for s in self.plan if kind in s.kinds])
            for kind in ("async", "sync")
        ]
        groups.append(("latency", [s for s in self.plan if s.latency]))
        groups.append(("latency-loaded", [s for s in self.plan if s.loaded]))
        for r in range(sz.repeats):
            for name, members in groups:
                shift = r % len(members) if members else 0
                for s in members[shift:] + members[:shift]:
                    if name == "latency":
                        self.latency(s, sz.latency, record=True)
                    elif name == "latency-loaded":
                        self.latency(s, sz.loaded, record=True, loaded=True)
                    else:
                        kind = name.split("-")[1]
                        self.drain(s, kind, sz.capped(s, sz.drain), record=f"{name}/{s.key}")
            print(
                f"  worker repeat {r + 1}/{sz.repeats} done "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        self.run_bloat(started)

    def run_bloat(self, started: float) -> None:
        sz = self.sizes
        members = [s for s in self.plan if s.bloat]
        for s in members:
            if self._failed(s):
                continue
            try:
                took = self.producers[s.key].add_bloat(sz.bloat_rows)
            except psycopg.Error as exc:
                self._fail_all(s, f"inserting {sz.bloat_rows} finished rows: {exc}")
                continue
            print(
                f"  {s.key}: {sz.bloat_rows:,} finished rows inserted and vacuumed in {took:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            self.drain(s, "async", sz.capped(s, min(sz.warmup, sz.bloat_drain)), record=None)
        for r in range(sz.repeats):
            shift = r % len(members) if members else 0
            for s in members[shift:] + members[:shift]:
                n = sz.capped(s, sz.bloat_drain)
                self.drain(s, "async", n, record=f"bloat/{s.key}")
        print(
            f"  worker bloat case done ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


# --- what is reported -------------------------------------------------------------------

FIGURES = [
    # (measure prefix, title, unit, higher is better)
    ("drain-async", "drain, async no-op jobs", "jobs/s", True),
    ("drain-sync", "drain, sync no-op jobs (threads)", "jobs/s", True),
    ("latency-p50", "enqueue-to-start latency p50", "ms", False),
    ("latency-p99", "enqueue-to-start latency p99", "ms", False),
    ("latency-loaded-p50", "enqueue-to-start latency p50, 64 coroutines enqueueing", "ms", False),
    ("latency-loaded-p99", "enqueue-to-start latency p99, 64 coroutines enqueueing", "ms", False),
    ("rss", "worker peak RSS during the async drain", "MiB", False),
    ("bloat", "drain with {rows} finished rows in the table", "jobs/s", True),
]


def summarise(
    plan: list[System], results: Results, sizes: Sizes, startup: dict[str, Any]
) -> dict[str, Any]:
    measures = []
    for prefix, title, unit, higher in FIGURES:
        for s in plan:
            mid = f"{prefix}/{s.key}"
            if mid not in results.series:
                continue
            series = results.series[mid]
            entry: dict[str, Any] = {
                "id": mid,
                "figure": prefix,
                "title": title.format(rows=f"{sizes.bloat_rows:,}"),
                "unit": unit,
                "higher_is_better": higher,
                "system": s.key,
                "family": s.family,
                "label": s.label,
                "n": _n_for(prefix, s, sizes),
            } | series.as_dict(digits=2 if unit == "ms" else 1)
            soniq = results.series.get(f"{prefix}/{SONIQ}")
            if soniq is not None and s.key != SONIQ and s.family != "soniq":
                pairs = paired_ratios(soniq, series) if higher else paired_ratios(series, soniq)
                if pairs:
                    ratio = Series(pairs)
                    entry["soniq_advantage"] = {
                        "median": round(ratio.median, 3),
                        "min": round(ratio.low, 3),
                        "max": round(ratio.high, 3),
                        "per_repeat": [round(x, 3) for x in pairs],
                    }
            measures.append(entry)
    return {
        "parameters": {
            "drain_jobs": sizes.drain,
            "drain_warmup": sizes.warmup,
            "latency_jobs": sizes.latency,
            "latency_rate_per_s": sizes.rate,
            "bloat_finished_rows": sizes.bloat_rows,
            "bloat_drain_jobs": sizes.bloat_drain,
            "repeats": sizes.repeats,
        },
        "systems": [
            {
                "key": s.key,
                "family": s.family,
                "label": s.label,
                "settings": s.settings,
                "scale": s.scale,
                "idle_rss_mib": round(startup[s.key]["rss_kib"] / 1024, 1)
                if startup.get(s.key)
                else None,
            }
            for s in plan
        ],
        "measures": measures,
        "targets": _targets(results, sizes),
        "notes": _notes(plan, sizes, results),
    }


def _notes(plan: list[System], sizes: Sizes, results: Results) -> list[str]:
    out = []
    overhead = []
    for kind in ("async", "sync"):
        plain = results.series.get(f"drain-{kind}/{SONIQ}")
        measured = results.series.get(f"drain-{kind}/{METRICS}")
        pairs = paired_ratios(measured, plain) if plain and measured else []
        if pairs:
            ratio = Series(pairs)
            overhead.append(
                f"{kind} {ratio.median:.3f} ({ratio.low:.3f}-{ratio.high:.3f}, "
                f"per repeat {', '.join(f'{x:.3f}' for x in pairs)})"
            )
    if overhead:
        out.append(
            f"metrics (drain of {METRICS} / {SONIQ}, median of the per-repeat ratios, "
            f"min-max): {'; '.join(overhead)}"
        )
    resistance = []
    for s in plan:
        bloat, plain = (
            results.series.get(f"bloat/{s.key}"),
            results.series.get(f"drain-async/{s.key}"),
        )
        if bloat and plain and bloat.rates and plain.rates and not (bloat.failure or plain.failure):
            resistance.append(f"{s.key} {bloat.median / plain.median:.2f}")
    if resistance:
        out.append(
            f"bloat resistance (drain with {sizes.bloat_rows:,} finished rows / without, "
            f"medians): {', '.join(resistance)}"
        )
    if any(s.family == "pgqueuer" for s in plan):
        out.append("pgqueuer: async handlers only, so no sync drain (its sync API enqueues only)")
    for s in plan:
        if s.scale != 1.0:
            out.append(
                f"{s.key}: drains {s.scale:.0%} of the jobs the others do "
                f"({sizes.capped(s, sizes.drain):,} instead of {sizes.drain:,}), "
                "its rate being ~50x lower"
            )
    return out


def _n_for(prefix: str, s: System, sizes: Sizes) -> int:
    if prefix.startswith("latency-loaded"):
        return sizes.loaded
    if prefix.startswith("latency"):
        return sizes.latency
    if prefix == "bloat":
        return sizes.capped(s, sizes.bloat_drain)
    return sizes.capped(s, sizes.drain)


def _targets(results: Results, sizes: Sizes) -> list[dict[str, Any]]:
    out = []
    for key in (SONIQ, "soniq-psycopg"):
        drain = results.series.get(f"drain-async/{key}")
        if drain is None:  # not in this run
            continue
        pgq = results.series.get(f"drain-async/{PGQUEUER_SAME_BUDGET}")
        p50 = results.series.get(f"latency-p50/{key}")
        p99 = results.series.get(f"latency-p99/{key}")
        ok = lambda s: s is not None and s.rates and not s.failure  # noqa: E731
        rate = drain.median if ok(drain) else None
        what = f"{key}: drain {sizes.drain:,} async no-op jobs, concurrency 100, jobs/s"
        out.append(target(what, rate, TARGET_DRAIN, spec=",.0f"))
        pairs = paired_ratios(drain, pgq) if ok(drain) and ok(pgq) else []
        ratio = Series(pairs).median if pairs else None
        what = f"{key}: drain / pgqueuer (batch 50, max tasks 100)"
        out.append(target(what, ratio, TARGET_DRAIN_RATIO, digits=2))
        for name, series, want in (("p50", p50, TARGET_P50_MS), ("p99", p99, TARGET_P99_MS)):
            value = series.median if ok(series) else None
            what = f"{key}: enqueue-to-start latency {name}, ms"
            out.append(target(what, value, want, at_most=True, digits=2))
    return out


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f}"
    if unit == "MiB":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def render(result: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    previous = None
    for m in result["measures"]:
        if previous is not None and m["figure"] != previous:
            rows.append([])
        title = f"{m['title']} ({m['unit']})" if m["figure"] != previous else ""
        previous = m["figure"]
        if m["failure"] or m["median"] is None:
            value, spread = "FAILED", "-"
        else:
            value = _fmt(m["median"], m["unit"])
            spread = f"{_fmt(m['min'], m['unit'])}-{_fmt(m['max'], m['unit'])}"
        adv = m.get("soniq_advantage")
        ratio = f"{adv['median']:.2f}x ({adv['min']:.2f}-{adv['max']:.2f})" if adv else ""
        rows.append([title, m["label"], f"{m['n']:,}", value, spread, ratio])
    table = render_table(
        ["figure", "system", "jobs", "median", "min-max", "soniq asyncpg vs this"],
        rows,
        right={2, 3, 4},
    )
    lines = [
        table,
        "",
        "soniq asyncpg vs this: >1 means Soniq is better (rates: soniq / this; latency and "
        "RSS: this / soniq); median of the per-repeat ratios (min-max)",
        *result["notes"],
    ]
    for m in result["measures"]:
        if m["failure"]:
            lines.append(f"FAILED {m['id']}: {m['failure']}")
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:,}"
        lines.append(
            f"target: {t['what']} = {value} (want {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


def run_worker_benchmark(urls: dict[str, str], sizes: Sizes, plan: list[System]) -> dict[str, Any]:
    """Run ``plan`` on the databases of ``urls`` (one per system key)."""
    loop = asyncio.new_event_loop()
    bench = WorkerBench(plan, urls, sizes, loop)
    try:
        bench.open()
        bench.run()
    finally:
        bench.close()
        loop.close()
    startup = {key: child.startup for key, child in bench.children.items()}
    return summarise(plan, bench.results, sizes, startup)
