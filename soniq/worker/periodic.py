"""The scheduler of periodic jobs, which every worker runs (no leader, no extra
process): it sleeps until the next tick of any schedule, then enqueues what
:meth:`soniq.core.schedules.Schedule.decide` says. The database makes each tick's job
inserted once across workers (``enqueue_tick``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from soniq.core.enqueue import Registry, build_spec
from soniq.core.schedules import Schedule
from soniq.drivers._common import is_connection_error
from soniq.drivers.base import AsyncBackend

log = logging.getLogger("soniq.worker")

UTC = dt.timezone.utc
#: After a failure (the database unreachable), the scheduler tries again this soon.
RETRY_AFTER = 5.0
#: The shortest sleep between two passes: never a busy loop, whatever a clock does.
MIN_SLEEP = 0.05


async def run_schedules(backend: AsyncBackend, registry: Registry, timeout: float) -> None:
    """Enqueue the periodic jobs of ``registry`` at their ticks, until cancelled; each
    database call is given up after ``timeout`` seconds (the worker's
    ``command_timeout``) and tried again at the next pass."""
    schedules = list(registry.schedules)
    if not schedules:
        return
    specs = {s.key: build_spec(registry, s.job, [dict(s.kwargs)], {}) for s in schedules}
    log.info("periodic: scheduling %d schedule(s)", len(schedules))
    while True:
        now = dt.datetime.now(UTC)
        wake = min(s.next_after(now) for s in schedules)
        retry = now + dt.timedelta(seconds=RETRY_AFTER)
        try:
            last = await asyncio.wait_for(backend.last_ticks(list(specs)), timeout)
        except Exception as exc:
            _failed("reading the last ticks", exc)
            last, wake = {}, retry
            schedules_now: list[Schedule] = []
        else:
            schedules_now = schedules
        for schedule in schedules_now:
            try:
                await _tick(backend, schedule, specs, last, now, timeout)
            except Exception as exc:  # one schedule failing does not stop the others
                _failed(f"schedule {schedule.key}", exc)
                wake = min(wake, retry)
        delay = (wake - dt.datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(MIN_SLEEP, delay))


async def _tick(
    backend: AsyncBackend,
    schedule: Schedule,
    specs: dict[str, Any],
    last: dict[str, dt.datetime],
    now: dt.datetime,
    timeout: float,
) -> None:
    tick = schedule.decide(last.get(schedule.key), now)
    if tick is None:
        return
    spec = specs[schedule.key]
    job_id = await asyncio.wait_for(
        backend.enqueue_tick(schedule.key, tick.at, spec, enqueue=tick.enqueue), timeout
    )
    if job_id is not None:
        log.info("periodic %s: tick %s enqueued as job %s", spec.name, tick.at, job_id)
    elif not tick.enqueue and schedule.key in last:
        log.info("periodic %s: missed ticks up to %s skipped", spec.name, tick.at)


def _failed(what: str, exc: Exception) -> None:
    if is_connection_error(exc) or isinstance(exc, TimeoutError):
        log.warning("periodic: %s failed (%s); trying again in %g s", what, exc, RETRY_AFTER)
    else:  # a defect, not the network: its traceback says where
        log.exception("periodic: %s failed; trying again in %g s", what, RETRY_AFTER)
