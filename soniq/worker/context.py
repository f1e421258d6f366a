"""What a running job can learn about itself: ``soniq.current_job()``."""

from __future__ import annotations

import contextvars

import attrs

_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("soniq_current_job")


@attrs.define(eq=False)
class JobContext:
    """The running job: its id, name, queue, attempt (1 for the first run), how many
    times it was started (:attr:`claims`) and whether its cancellation was requested.

    Async jobs are cancelled with ``CancelledError``; a sync job cannot be interrupted,
    so a long one should check :attr:`cancelled` now and then and return early.
    """

    id: int
    name: str
    queue: str
    attempt: int
    max_retries: int
    timeout: float | None
    worker_id: str
    #: How many times a worker has started this job, this run included. Above
    #: :attr:`attempt` when an earlier run was put back uncounted (a shutdown, a lost
    #: completion) and may have done part or all of its work: check before repeating
    #: a side effect.
    claims: int = 1
    # A plain flag: set once by the loop thread, read by the job's thread.
    _cancelled: bool = attrs.field(default=False, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once ``cancel_job`` was called for this job and the worker saw it."""
        return self._cancelled

    def request_cancel(self) -> None:
        """Mark the job cancelled (the worker calls this)."""
        self._cancelled = True


def current_job() -> JobContext:
    """The context of the job running in this task or thread.

    Raises ``LookupError`` outside a job.
    """
    try:
        return _current.get()
    except LookupError:
        raise LookupError("soniq.current_job() is only available inside a running job") from None


def enter(context: JobContext) -> contextvars.Token[JobContext]:
    """Make ``context`` current (the worker calls this around a job)."""
    return _current.set(context)


def leave(token: contextvars.Token[JobContext]) -> None:
    """Undo :func:`enter`."""
    _current.reset(token)
