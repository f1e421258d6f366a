"""One run of one job body, turned into an :class:`~soniq.core.outcomes.Outcome`: the
code that the worker and ``soniq.testing.drain`` share.

How a run ends, whatever the body does:

- it returns: ``done`` (the value kept as the result when it can be, see
  :func:`soniq.core.outcomes.succeeded`), or ``cancelled`` if its cancellation was
  requested meanwhile (it swallowed the request);
- it raises anything, ``BaseException`` subclasses included (``SystemExit``,
  ``KeyboardInterrupt``, its own ``CancelledError``): a failure, retried while
  attempts are left; ``cancelled`` instead when its cancellation was requested;
- its timeout passes first: :meth:`JobRun.timed_out` (the caller owns the clock).

Nothing here ends the process or escapes to the caller: the exception stays on
:attr:`JobRun.error` for a caller that wants it (``drain(raise_errors=True)``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import attrs

from soniq.core import outcomes
from soniq.core.errors import JobTimeout, Snooze
from soniq.core.jobs import Claimed, JobDefinition
from soniq.core.outcomes import Outcome
from soniq.worker import context
from soniq.worker.context import JobContext

log = logging.getLogger("soniq.worker")
_jitter = random.random


@attrs.define(eq=False)
class JobRun:
    """The run of ``definition`` with ``args``, as the job ``ctx`` describes it."""

    definition: JobDefinition
    context: JobContext
    args: dict[str, Any]
    random: Callable[[], float] = random.random
    #: What the body raised, if it raised.
    error: BaseException | None = attrs.field(default=None, init=False)

    @classmethod
    def of(
        cls,
        definition: JobDefinition,
        claimed: Claimed,
        worker_id: str,
        jitter: Callable[[], float] = _jitter,  # the back-off's (see ``random``)
        on_progress: Callable[[JobContext], None] | None = None,
    ) -> JobRun:
        """The run of a job ``worker_id`` claimed, as ``current_job()`` describes it;
        its progress reports go to ``on_progress``."""
        ctx = JobContext(
            claimed.id,
            claimed.name,
            claimed.queue,
            claimed.attempts,
            claimed.max_retries,
            claimed.timeout,
            worker_id,
            claimed.claims,
            parent_results=claimed.parent_results or {},
            on_progress=on_progress,
        )
        return cls(definition, ctx, claimed.args, jitter)

    async def run_async(self) -> Outcome:
        """Await the body (an ``async def`` job) on this loop, as ``current_job()``."""
        token = context.enter(self.context)
        try:
            value = await self.definition.func(**self.args)
        except BaseException as exc:  # whatever a job raises is its outcome
            return self.raised(exc)
        finally:
            context.leave(token)
        return self.returned(value)

    def run_sync(self) -> Outcome:
        """Call the body (a plain function) on this thread, as ``current_job()``."""
        token = context.enter(self.context)
        try:
            value = self.definition.func(**self.args)
        except BaseException as exc:  # whatever a job raises is its outcome
            return self.raised(exc)
        finally:
            context.leave(token)
        return self.returned(value)

    def returned(self, value: Any) -> Outcome:
        """The body returned ``value``."""
        ctx = self.context
        if ctx.cancelled:
            return outcomes.cancelled(ctx.id, ctx.attempt)
        return outcomes.succeeded(ctx.id, ctx.attempt, value)

    def raised(self, exc: BaseException) -> Outcome:
        """The body raised ``exc``."""
        ctx = self.context
        if ctx.cancelled:
            self.error = exc
            return outcomes.cancelled(ctx.id, ctx.attempt)
        if isinstance(exc, Snooze):  # not an error: the job asked to run later
            return outcomes.snoozed(ctx.id, ctx.attempt, exc.seconds)
        self.error = exc
        return self.failed(exc)

    def timed_out(self) -> Outcome:
        """The run's timeout passed before it ended."""
        self.error = JobTimeout(f"job ran past its timeout of {self.context.timeout}s")
        return self.failed(self.error)

    def failed(self, exc: BaseException) -> Outcome:
        """A failure: retried after the job's back-off while attempts are left."""
        ctx = self.context
        return outcomes.failed(
            ctx.id, ctx.attempt, ctx.max_retries, exc, self.random, self.definition.backoff
        )
