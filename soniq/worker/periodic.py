"""The scheduler of periodic jobs, which every worker runs (no leader, no extra
process): it sleeps until the next tick of any schedule, then enqueues what
:meth:`soniq.core.schedules.Schedule.decide` says. The database makes each tick's job
inserted once across workers (``enqueue_tick``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from soniq.core.enqueue import Registry, build_spec
from soniq.drivers.base import AsyncBackend

log = logging.getLogger("soniq.worker")

UTC = dt.timezone.utc
#: After a failure (the database unreachable), the scheduler tries again this soon.
RETRY_AFTER = 5.0


async def run_schedules(backend: AsyncBackend, registry: Registry) -> None:
    """Enqueue the periodic jobs of ``registry`` at their ticks, until cancelled."""
    schedules = list(registry.schedules)
    if not schedules:
        return
    specs = {s.key: build_spec(registry, s.job, [dict(s.kwargs)], {}) for s in schedules}
    keys = [s.key for s in schedules]
    log.info("periodic: scheduling %d schedule(s)", len(schedules))
    while True:
        now = dt.datetime.now(UTC)
        try:
            last = await backend.last_ticks(keys)
            for schedule in schedules:
                tick = schedule.decide(last.get(schedule.key), now)
                if tick is None:
                    continue
                spec = specs[schedule.key]
                job_id = await backend.enqueue_tick(
                    schedule.key, tick.at, spec, enqueue=tick.enqueue
                )
                if job_id is not None:
                    log.info("periodic %s: tick %s enqueued as job %s", spec.name, tick.at, job_id)
                elif not tick.enqueue and schedule.key in last:
                    log.info("periodic %s: missed ticks up to %s skipped", spec.name, tick.at)
            wake = min(s.next_after(now) for s in schedules)
        except Exception as exc:  # the database unreachable, or lost: try again soon
            log.warning("periodic: %s; trying again in %g s", exc, RETRY_AFTER)
            wake = now + dt.timedelta(seconds=RETRY_AFTER)
        await asyncio.sleep(max(0.0, (wake - dt.datetime.now(UTC)).total_seconds()))
