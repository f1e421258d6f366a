"""Soniq in one minute, with no server: the embedded SQLite default.

Enqueues a few thousand async and sync jobs, runs a worker with a progress bar,
retries a job that fails once, and prints a summary. Run it with ``nox -s demo``
(or ``python examples/demo.py``); it works in a fresh temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time

from soniq import Backoff, Soniq, current_job

JOBS_PER_KIND = 2500

# No database URL and no SONIQ_DATABASE_URL: Soniq uses the SQLite file soniq.db in the
# working directory. The demo works in a temporary one, so it leaves nothing behind.
os.environ.pop("SONIQ_DATABASE_URL", None)
os.chdir(tempfile.mkdtemp(prefix="soniq-demo-"))
DATABASE = os.path.abspath("soniq.db")
eq = Soniq()
# The flaky job's retry is logged at WARNING; the summary reports it instead.
logging.getLogger("soniq").setLevel(logging.ERROR)

finished = 0
retries = 0


@eq.job(name="demo.thumbnail")
def thumbnail(image: int) -> str:
    """A sync job (runs in a thread): a little CPU work."""
    global finished
    digest = hashlib.sha256(str(image).encode()).hexdigest()[:12]
    finished += 1
    return digest


@eq.job(name="demo.notify")
async def notify(user: int) -> None:
    """An async job (runs on the event loop)."""
    global finished
    await asyncio.sleep(0)
    finished += 1


@eq.job(name="demo.flaky", max_retries=3, backoff=Backoff(base=0.2, jitter=0))
async def flaky() -> str:
    """Fails on its first attempt, succeeds on the retry."""
    global finished, retries
    if current_job().attempt == 1:
        retries += 1
        raise ConnectionError("the mail server hung up (on purpose, once)")
    finished += 1
    return "delivered on attempt 2"


def progress(done: int, total: int, started: float) -> None:
    width = 40
    filled = width * done // total
    rate = done / max(time.perf_counter() - started, 1e-9)
    bar = "#" * filled + "-" * (width - filled)
    sys.stdout.write(f"\r  [{bar}] {done:>5}/{total} jobs  {rate:>7,.0f} jobs/s")
    sys.stdout.flush()


async def main() -> None:
    await eq.ensure_initialized()
    print(f"Soniq demo: SQLite database {DATABASE}")
    total = 2 * JOBS_PER_KIND + 1
    await eq.enqueue_many(thumbnail, [{"image": n} for n in range(JOBS_PER_KIND)])
    await eq.enqueue_many(notify, [{"user": n} for n in range(JOBS_PER_KIND)])
    flaky_id = await eq.enqueue(flaky)
    print(f"  enqueued {total} jobs ({JOBS_PER_KIND} sync, {JOBS_PER_KIND} async, 1 flaky)")

    started = time.perf_counter()
    worker = asyncio.create_task(eq.run_worker(concurrency=20, poll_interval=0.05))
    while finished < total and not worker.done():
        progress(finished, total, started)
        await asyncio.sleep(0.1)
    seconds = time.perf_counter() - started
    progress(finished, total, started)
    worker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await worker
    job = await eq.get_job(flaky_id)
    await eq.close()
    print()
    print(f"  flaky job: {job.status.value} after {job.attempts} attempts ({job.result})")
    print(
        f"Summary: {finished} jobs in {seconds:.2f} s = {finished / seconds:,.0f} jobs/s, "
        f"{retries} retry"
    )
    if finished != total or job.status.value != "done":
        raise SystemExit("demo: not every job finished")


if __name__ == "__main__":
    asyncio.run(main())
