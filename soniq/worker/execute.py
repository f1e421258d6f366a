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

With run middleware (``@eq.middleware``, :mod:`soniq.middleware`) the body runs
inside them; without, the run takes the plain path (one ``if``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from soniq.core import outcomes
from soniq.core.errors import JobTimeout, Snooze
from soniq.core.jobs import Claimed, JobDefinition
from soniq.core.outcomes import Outcome
from soniq.middleware import (
    Middleware,
    RunContext,
    enter_async,
    enter_in_thread,
    exit_all_async,
    exit_all_sync,
)
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
    #: The run middleware around the body (empty: none).
    middleware: tuple[Middleware, ...] = attrs.field(default=(), kw_only=True)
    #: The headers the job was enqueued with (None: none).
    headers: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)
    #: The worker's loop, where a sync job's async middleware run.
    loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, kw_only=True)
    #: The outcome the worker recorded before the body ended (its timeout passed, or a
    #: shutdown put it back): what middleware are told when it ends.
    recorded: Outcome | None = attrs.field(default=None, init=False)
    #: The timeout's error and outcome, once it passed (see :meth:`timed_out`).
    _timeout: tuple[JobTimeout, Outcome] | None = attrs.field(default=None, init=False)

    @classmethod
    def of(
        cls,
        definition: JobDefinition,
        claimed: Claimed,
        worker_id: str,
        jitter: Callable[[], float] = _jitter,  # the back-off's (see ``random``)
        on_progress: Callable[[JobContext], None] | None = None,
        middleware: tuple[Middleware, ...] = (),
    ) -> JobRun:
        """The run of a job ``worker_id`` claimed, as ``current_job()`` describes it;
        its progress reports go to ``on_progress``; ``middleware`` wrap its body (made
        on the loop that will run it)."""
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
        if not middleware:
            return cls(definition, ctx, claimed.args, jitter)
        try:  # where a sync job's async middleware run; none for a loop-less drain
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return cls(
            definition,
            ctx,
            claimed.args,
            jitter,
            middleware=middleware,
            headers=claimed.headers,
            loop=loop,
        )

    async def run_async(self) -> Outcome:
        """Await the body (an ``async def`` job) on this loop, as ``current_job()``."""
        if self.middleware:
            return await self._run_async_within()
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
        if self.middleware:
            return self._run_sync_within()
        token = context.enter(self.context)
        try:
            value = self.definition.func(**self.args)
        except BaseException as exc:  # whatever a job raises is its outcome
            return self.raised(exc)
        finally:
            context.leave(token)
        return self.returned(value)

    async def _run_async_within(self) -> Outcome:
        """:meth:`run_async` inside the run middleware (see soniq.middleware)."""
        ctx = self._run_context()
        token = context.enter(self.context)
        entered: list[tuple[Any, bool]] = []
        value: Any = None
        error: BaseException | None = None
        try:
            try:
                for func in self.middleware:
                    manager = func(ctx)
                    entered.append((manager, await enter_async(manager)))
                value = await self.definition.func(**self.args)
            except BaseException as exc:  # whatever a job raises is its outcome
                error = exc
            outcome = self._ended(ctx, value, error)
            after = await exit_all_async(entered, error)
        finally:
            context.leave(token)
        return outcome if after is error else self._ended(ctx, None, after)

    def _run_sync_within(self) -> Outcome:
        """:meth:`run_sync` inside the run middleware: sync ones on this thread, async
        ones on the worker's loop (this thread waits)."""
        ctx = self._run_context()
        token = context.enter(self.context)
        # The async ones' enters and exits share one context, as on the loop.
        shared = contextvars.copy_context()
        entered: list[tuple[Any, bool]] = []
        value: Any = None
        error: BaseException | None = None
        try:
            try:
                for func in self.middleware:
                    manager = func(ctx)
                    entered.append((manager, enter_in_thread(manager, self.loop, shared)))
                value = self.definition.func(**self.args)
            except BaseException as exc:  # whatever a job raises is its outcome
                error = exc
            outcome = self._ended(ctx, value, error)
            after = exit_all_sync(entered, error, self.loop, shared)
        finally:
            context.leave(token)
        return outcome if after is error else self._ended(ctx, None, after)

    def _run_context(self) -> RunContext:
        return RunContext(self.context, self.args, self.headers or {}, self.definition.is_async)

    def _ended(self, ctx: RunContext, value: Any, error: BaseException | None) -> Outcome:
        """The run's outcome (the one recorded already, if the worker did), told to
        the middleware on ``ctx``."""
        if self.recorded is not None:
            outcome = self.recorded
        elif error is None:
            outcome = self.returned(value)
        else:
            outcome = self.raised(error)
        ctx.outcome = outcome_name(outcome)
        return outcome

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
        """The run's timeout passed before it ended: recorded once. Asked again (once
        the abandoned body has ended, and perhaps set an error of its own), the same
        outcome, and the timeout as the run's error again."""
        if self._timeout is None:
            error = JobTimeout(f"job ran past its timeout of {self.context.timeout}s")
            self._timeout = (error, self.failed(error))
        self.error, self.recorded = self._timeout
        return self.recorded

    def released(self) -> Outcome:
        """The worker is shutting down before the run ended: it is put back, its
        attempt not counted."""
        self.recorded = outcomes.released(self.context.id, self.context.attempt)
        return self.recorded

    def failed(self, exc: BaseException) -> Outcome:
        """A failure: retried after the job's back-off while attempts are left."""
        ctx = self.context
        return outcomes.failed(
            ctx.id, ctx.attempt, ctx.max_retries, exc, self.random, self.definition.backoff
        )


def outcome_name(outcome: Outcome) -> str:
    """How a run ended, in a word (see :attr:`soniq.RunContext.outcome`)."""
    if outcome.snoozed:
        return "snoozed"
    if outcome.release:
        return "released"
    if outcome.retry_in is not None:
        return "retried"
    return outcome.status.value
