"""What a running job can learn about itself: ``soniq.current_job()``."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from soniq.core import limits

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
    #: The results of the jobs it waited for that are done, by id (see ``depends_on``,
    #: ``enqueue_group``, ``enqueue_chain``); empty when it has no parents.
    parent_results: Mapping[int, Any] = attrs.field(factory=dict)
    #: The last progress reported with :meth:`set_progress` (None: none yet).
    progress: float | None = attrs.field(default=None, init=False)
    #: The message reported with it.
    progress_message: str | None = attrs.field(default=None, init=False)
    #: When the worker last wrote the progress (its loop's clock; None: never).
    progress_written_at: float | None = attrs.field(default=None, init=False, repr=False)
    #: Where reports go: the worker's progress writer (None: nowhere, outside a worker).
    on_progress: Callable[[JobContext], None] | None = attrs.field(default=None, repr=False)
    # A plain flag: set once by the loop thread, read by the job's thread.
    _cancelled: bool = attrs.field(default=False, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once ``cancel_job`` was called for this job and the worker saw it."""
        return self._cancelled

    def set_progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the job is, from 0 to 1 (``0.4``: 40 %), with an optional
        message. Stored on the job (``Job.progress``, ``Job.progress_message``), at most
        once a second per job: call it as often as suits the job, each call costs no
        I/O. From any thread the job runs on."""
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not math.isfinite(fraction)
            or not 0 <= fraction <= 1
        ):
            raise ValueError(f"set_progress(fraction): a number from 0 to 1, got {fraction!r}")
        if message is not None:
            if not isinstance(message, str):
                raise TypeError(f"set_progress(message): a str or None, got {message!r}")
            if len(message) > limits.MAX_ERROR_CHARS:
                message = message[: limits.MAX_ERROR_CHARS] + "..."
        self.progress, self.progress_message = float(fraction), message
        if self.on_progress is not None:
            self.on_progress(self)

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
