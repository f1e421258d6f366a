"""Waiting for jobs to end (``eq.wait_for``): the waiters of one process share one
listening connection, woken by the NOTIFY a job's end sends when someone waits for it
(see ``mark_awaited``); they poll as a fallback, and on SQLite, where nothing is sent.
The blocking face waits through :class:`LoopThread`, so its waiters share one too."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from soniq.core.errors import JobNotFound
from soniq.core.jobs import Job
from soniq.core.results import is_finished
from soniq.drivers.base import AsyncBackend

T = TypeVar("T")
log = logging.getLogger("soniq")

#: How often a waiter reads its job when the listener is up: only a NOTIFY lost with
#: a connection needs it (a reconnect wakes every waiter, too).
POLL_LISTENING = 5.0
#: The first poll interval when nothing is told (SQLite, or no listener yet); it
#: doubles up to :data:`POLL_MAX`.
POLL_FIRST = 0.01
POLL_MAX = 0.5


class EndWaiters:
    """The waiters of one Soniq on one event loop (``eq.wait_for``)."""

    def __init__(self, backend: AsyncBackend) -> None:
        self._backend = backend
        self._woken: dict[int, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = False

    async def wait(self, job_id: int, timeout: float | None) -> Job:
        """The job once it has ended; ``TimeoutError`` when ``timeout`` seconds pass
        first (None: no limit), :class:`JobNotFound` when there is no such job."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._start_listener(loop)
        woken = self._register(job_id, loop)
        try:
            # Marked once the listener is up (or has had its chance): an end after the
            # mark is then heard.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready(), 1.0)
            poll = POLL_LISTENING if self._listening else POLL_FIRST
            if not await self._backend.mark_awaited(job_id):
                return await self._ended(job_id)
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} has not finished after {timeout:g} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(woken), min(poll, left or poll))
                if woken.done():
                    self._unregister(job_id, woken)
                    woken = self._register(job_id, loop)
                elif not self._listening:
                    poll = min(poll * 2, POLL_MAX)
                job = await self._backend.get_job(job_id)
                if job is None:
                    raise JobNotFound(f"job {job_id} no longer exists", job_id=job_id)
                if is_finished(job):
                    return job
        finally:
            self._unregister(job_id, woken)

    async def _ended(self, job_id: int) -> Job:
        """The job that was not active when marked: ended, or not there."""
        job = await self._backend.get_job(job_id)
        if job is None:
            raise JobNotFound(f"no job has id {job_id}", job_id=job_id)
        if not is_finished(job):  # (only if it was deleted and the id reused: never)
            raise RuntimeError(f"job {job_id} is {job.status.value}, not active nor ended")
        return job

    def _register(self, job_id: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        woken: asyncio.Future[None] = loop.create_future()
        self._woken.setdefault(job_id, set()).add(woken)
        return woken

    def _unregister(self, job_id: int, woken: asyncio.Future[None]) -> None:
        found = self._woken.get(job_id)
        if found is not None:
            found.discard(woken)
            if not found:
                del self._woken[job_id]

    def _wake(self, job_ids: Any) -> None:
        for job_id in job_ids:
            for woken in self._woken.get(job_id, ()):
                if not woken.done():
                    woken.set_result(None)

    def _on_notify(self, payload: str) -> None:
        ids = []
        for part in payload.split(","):
            with contextlib.suppress(ValueError):
                ids.append(int(part))
        self._wake(ids)

    # -- the listener

    def _start_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._listener
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._listening = False
        self._ready_event = asyncio.Event()
        self._listener = loop.create_task(self._listen_forever(), name="soniq-end-listener")

    async def _ready(self) -> None:
        await self._ready_event.wait()

    async def _listen_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._backend.listen(self._on_notify, self._on_ready, ends=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wait_for: listening for job ends failed (%s); polling", exc)
            self._listening = False
            self._ready_event.set()  # waiters need not wait for it: they poll
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _on_ready(self) -> None:
        self._listening = True
        self._ready_event.set()
        self._wake(list(self._woken))  # ends while nobody listened: read again

    async def close(self) -> None:
        """Stop listening (waiters still waiting poll)."""
        task, self._listener = self._listener, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(task, return_exceptions=True)


class LoopThread:
    """An event loop on a daemon thread, for blocking code to await on
    (:meth:`run`). Made in the process that first needs it: a forked child makes its
    own. ``make`` builds the object the coroutines use (an async twin), once per loop."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._made: Any = None

    def run(self, coro_of: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run ``coro_of(made)`` on the thread's loop and return its value; an
        interruption of the caller (Ctrl-C) cancels it."""
        loop, made = self._started()
        future = asyncio.run_coroutine_threadsafe(coro_of(made), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=1)
            raise

    def _started(self) -> tuple[asyncio.AbstractEventLoop, Any]:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="soniq-wait", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._made = self._make()
            return self._loop, self._made

    def close(self, closing: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        """Run ``closing(made)`` on the loop, then stop it and join the thread."""
        with self._lock:
            loop, thread, made = self._loop, self._thread, self._made
            self._loop = self._thread = self._made = None
            if loop is None or thread is None or self._pid != os.getpid():
                return
        try:
            asyncio.run_coroutine_threadsafe(closing(made), loop).result(timeout=10)
        except (concurrent.futures.TimeoutError, Exception) as exc:
            log.warning("closing the waiting loop: %s", exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()
