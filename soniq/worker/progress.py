"""Progress a running job reports (``current_job().set_progress``), written to its row
at most once per :data:`INTERVAL` per job, so that a tight loop reporting on every
step costs the database one write a second, not one per step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

from soniq.worker.context import JobContext

log = logging.getLogger("soniq.worker")

#: Seconds between two progress writes of one job. The first report is written at
#: once; later ones wait out the interval, and the value written is the latest; the
#: last report is written when the job ends (see ProgressWriter.ended).
INTERVAL = 1.0

Write = Callable[[int, int, float, "str | None"], Awaitable[None]]


class ProgressWriter:
    """Writes the progress of the jobs run on ``loop`` with ``write(job_id, claims,
    progress, message)``. :meth:`report` may be called from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write: Write) -> None:
        self._loop = loop
        self._write = write
        # Jobs with a write scheduled, and its timer.
        self._due: dict[JobContext, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, ctx: JobContext) -> None:
        """``ctx`` has new progress: have it written (soon, at most once per
        interval; the value written is the latest reported by then)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._schedule(ctx)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody writes
                self._loop.call_soon_threadsafe(self._schedule, ctx)

    def _schedule(self, ctx: JobContext) -> None:
        if ctx in self._due:
            return  # the write already scheduled takes the latest value
        last = ctx.progress_written_at
        delay = 0.0 if last is None else max(0.0, last + INTERVAL - self._loop.time())
        self._due[ctx] = self._loop.call_later(delay, self._start, ctx)

    def ended(self, ctx: JobContext) -> None:
        """The job ended: write its last report now, if one waits (on the loop)."""
        timer = self._due.get(ctx)
        if timer is not None:
            timer.cancel()
            self._start(ctx)

    def _start(self, ctx: JobContext) -> None:
        self._due.pop(ctx, None)
        ctx.progress_written_at = self._loop.time()
        task = self._loop.create_task(self._store(ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, ctx: JobContext) -> None:
        progress, message = ctx.progress, ctx.progress_message
        if progress is None or not math.isfinite(progress):
            return
        try:
            await self._write(ctx.id, ctx.claims, progress, message)
        except Exception as exc:  # progress is advisory: the job goes on
            log.warning("job %s: could not store its progress (%s)", ctx.id, exc)

    async def flush(self) -> None:
        """Write what waits now, and wait for the writes (at shutdown)."""
        for ctx in list(self._due):
            self.ended(ctx)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
