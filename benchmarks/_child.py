"""One worker process of the worker benchmarks (started by :mod:`benchmarks.worker`).

``python -c "from benchmarks._child import main; main()" SPEC`` where SPEC is JSON:
``{"family": "soniq" | "pgqueuer" | "procrastinate" | "raw", "url": ..., ...settings}``.

The process imports its library and opens its connections once, says it is ready,
then obeys commands read one JSON line at a time from stdin, answering each with a
line ``@@bench {json}`` on stdout (anything else on stdout is ignored by the parent):

* ``{"op": "drain", "kind": "async" | "sync"}``: run the system's worker in its
  drain/burst mode over the jobs the parent queued, timed from just before the call
  to its return (startup, claims, runs, completion writes and shutdown included;
  imports and opening the pool excluded, as for a long-lived worker). Answers
  ``elapsed``, ``ran`` and the peak RSS during the drain.
* ``{"op": "latency", "n": N, "settle": S, "timeout": T}``: start the worker in its
  continuous mode, answer ``{"listening": true}`` after ``S`` seconds, wait until
  ``N`` latency jobs started, stop the worker, answer the latencies (seconds).
* ``{"op": "exit"}``.

The job functions are those of :mod:`benchmarks.jobs`, for every system.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MARK = "@@bench "

# The raw limit: the statements a queue needs, written by hand on Soniq's table.
RAW_CLAIM = """
UPDATE public.soniq_jobs
SET status = 'running', attempts = attempts + 1, claims = claims + 1, worker_id = $2,
    started_at = now()
WHERE id = ANY(ARRAY(
    SELECT id FROM public.soniq_jobs
    WHERE status = 'queued' AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED))
RETURNING id, name, args::text"""
RAW_FINISH = (
    "UPDATE public.soniq_jobs SET status = 'done', finished_at = now() WHERE id = ANY($1::bigint[])"
)
RAW_CHANNEL = "soniq:public"


def reply(data: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(data) + "\n")
    sys.stdout.flush()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match[1]) if match else 0


class PeakRss:
    """Peak resident memory over a stretch of time: the kernel's high-water mark,
    reset at the start (``/proc/self/clear_refs``), read at the end."""

    def __init__(self) -> None:
        self.resettable = True

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False  # then the peak is since the process started

    def peak_kib(self) -> int:
        try:
            return _status_kib("VmHWM")
        except OSError:
            return 0


# --- one runner per system ------------------------------------------------------------


class SoniqRunner:
    """``await eq.run_worker(concurrency=C, burst=True, retention=None)``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from benchmarks import jobs
        from soniq import Soniq

        self.eq = jobs.register_soniq(Soniq(spec["url"], driver=spec["driver"]))
        self.concurrency = spec["concurrency"]
        if spec.get("metrics"):  # the run middleware of soniq.contrib.prometheus
            from prometheus_client import CollectorRegistry

            from soniq.contrib.prometheus import instrument

            instrument(self.eq, CollectorRegistry())
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.eq.ensure_initialized()

    async def drain(self, kind: str) -> None:
        await self.eq.run_worker(concurrency=self.concurrency, burst=True, retention=None)

    async def start(self) -> None:
        self.task = asyncio.create_task(
            self.eq.run_worker(concurrency=self.concurrency, retention=None)
        )

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def close(self) -> None:
        await self.eq.close()


class PgqueuerRunner:
    """pgqueuer's QueueManager on one asyncpg connection (as its README shows),
    ``run(mode=drain, batch_size=B, max_concurrent_tasks=M)``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.url = spec["url"]
        self.batch_size = spec["batch_size"]
        self.max_tasks = spec["max_tasks"]
        self.conn: Any = None
        self.qm: Any = None
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(self.url)

    def _manager(self) -> Any:
        from pgqueuer import AsyncpgDriver, Queries, QueueManager

        from benchmarks import jobs

        qm = QueueManager(Queries(AsyncpgDriver(self.conn)))
        jobs.register_pgqueuer(qm)
        return qm

    async def drain(self, kind: str) -> None:
        from pgqueuer.domain.types import QueueExecutionMode

        qm = self._manager()
        await qm.run(
            mode=QueueExecutionMode.drain,
            batch_size=self.batch_size,
            max_concurrent_tasks=self.max_tasks,
        )

    async def start(self) -> None:
        self.qm = self._manager()
        self.task = asyncio.create_task(
            self.qm.run(batch_size=self.batch_size, max_concurrent_tasks=self.max_tasks)
        )

    async def stop(self) -> None:
        assert self.task is not None
        self.qm.shutdown.set()
        await self.task

    async def close(self) -> None:
        await self.conn.close()


class ProcrastinateRunner:
    """procrastinate's worker on its psycopg async connector (default pool),
    ``run_worker_async(concurrency=C, wait=False)``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from procrastinate import App, PsycopgConnector

        from benchmarks import jobs

        self.app = App(connector=PsycopgConnector(conninfo=spec["url"]))
        jobs.register_procrastinate(self.app)
        self.concurrency = spec["concurrency"]
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.app.open_async()

    async def drain(self, kind: str) -> None:
        await self.app.run_worker_async(
            concurrency=self.concurrency, wait=False, install_signal_handlers=False
        )

    async def start(self) -> None:
        self.task = asyncio.create_task(
            self.app.run_worker_async(
                concurrency=self.concurrency, wait=True, install_signal_handlers=False
            )
        )

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def close(self) -> None:
        await self.app.close_async()


class RawRunner:
    """The limit: ``loops`` loops, each claiming ``batch`` jobs in one statement,
    running them (async: as tasks; sync: on a thread pool of ``batch * loops``
    threads) and finishing them in one statement; no heartbeat, retry or NOTIFY.
    Claims commit with ``synchronous_commit = off`` and finishes durably, on two
    connections per loop, as Soniq's worker does."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from benchmarks import jobs

        self.url = spec["url"]
        self.loops = spec["loops"]
        self.batch = spec["batch"]
        self.funcs = {
            jobs.NOOP: jobs.noop,
            jobs.NOOP_SYNC: jobs.noop_sync,
            jobs.LATENCY: jobs.latency,
        }
        self.sync_name = jobs.NOOP_SYNC
        self.threads = ThreadPoolExecutor(max_workers=self.loops * self.batch)
        self.pool: Any = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.wake = asyncio.Event()

    async def open(self) -> None:
        import asyncpg

        size = 2 * self.loops + 2
        self.pool = await asyncpg.create_pool(self.url, min_size=size, max_size=size)

    async def _run(self, rows: list[Any]) -> None:
        funcs, loop = self.funcs, asyncio.get_running_loop()
        if rows[0][1] == self.sync_name:
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self.threads, functools.partial(funcs[r[1]], **json.loads(r[2]))
                    )
                    for r in rows
                )
            )
        else:
            await asyncio.gather(*(funcs[r[1]](**json.loads(r[2])) for r in rows))

    async def _claim_loop(self, batch: int) -> None:
        async with self.pool.acquire() as conn, self.pool.acquire() as finisher:
            await conn.execute("SET synchronous_commit = off")
            while True:
                rows = await conn.fetch(RAW_CLAIM, batch, "raw")
                if not rows:
                    return
                await self._run(rows)
                await finisher.execute(RAW_FINISH, [r[0] for r in rows])

    async def drain(self, kind: str) -> None:
        await asyncio.gather(*(self._claim_loop(self.batch) for _ in range(self.loops)))

    async def _listen_loop(self, wake: asyncio.Event) -> None:
        async with (
            self.pool.acquire() as listener,
            self.pool.acquire() as conn,
            self.pool.acquire() as finisher,
        ):
            await conn.execute("SET synchronous_commit = off")

            def on_notify(*_: object) -> None:
                wake.set()

            await listener.add_listener(RAW_CHANNEL, on_notify)
            try:
                while not self.stopping:
                    wake.clear()  # a NOTIFY during the claim still wakes the wait below
                    rows = await conn.fetch(RAW_CLAIM, self.batch, "raw")
                    if rows:
                        await self._run(rows)
                        await finisher.execute(RAW_FINISH, [r[0] for r in rows])
                        continue
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), 1.0)
            finally:
                await listener.remove_listener(RAW_CHANNEL, on_notify)

    async def start(self) -> None:
        self.stopping = False
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._listen_loop(self.wake))

    async def stop(self) -> None:
        assert self.task is not None
        self.stopping = True
        self.wake.set()
        await self.task

    async def close(self) -> None:
        await self.pool.close()
        self.threads.shutdown()


RUNNERS = {
    "soniq": SoniqRunner,
    "pgqueuer": PgqueuerRunner,
    "procrastinate": ProcrastinateRunner,
    "raw": RawRunner,
}


async def serve(spec: dict[str, Any]) -> None:
    from benchmarks import jobs

    runner = RUNNERS[spec["family"]](spec)
    await runner.open()
    peak = PeakRss()
    reply({"ready": True, "rss_kib": _status_kib("VmRSS")})
    try:
        while True:
            # Blocking read between commands: nothing of the worker runs meanwhile.
            line = sys.stdin.readline()
            if not line:
                return
            command = json.loads(line)
            op = command["op"]
            if op == "exit":
                return
            if op == "drain":
                jobs.reset()
                gc.collect()
                peak.start()
                started = time.perf_counter()
                await runner.drain(command["kind"])
                elapsed = time.perf_counter() - started
                reply(
                    {
                        "elapsed": elapsed,
                        "ran": jobs.STATE.ran(),
                        "rss_peak_kib": peak.peak_kib(),
                        "rss_peak_since_start": not peak.resettable,
                    }
                )
            elif op == "latency":
                jobs.reset(command["n"])
                await runner.start()
                await asyncio.sleep(command["settle"])
                reply({"listening": True})
                error = None
                assert jobs.STATE.all_started is not None
                try:
                    await asyncio.wait_for(jobs.STATE.all_started.wait(), command["timeout"])
                except asyncio.TimeoutError:
                    error = f"only {len(jobs.STATE.latencies)} of {command['n']} jobs started"
                await runner.stop()
                reply({"latencies": jobs.STATE.latencies, "error": error})
            else:
                raise ValueError(f"unknown command {op!r}")
    finally:
        await runner.close()


def main() -> None:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        asyncio.run(serve(spec))
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
        raise
