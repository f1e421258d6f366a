"""What a finished run means for its job: pure functions from (job, how it ended,
now's randomness) to an :class:`Outcome` that the completer writes in a batch.

``max_retries=N`` allows N+1 runs. ``attempts`` counts runs started (incremented at
claim), so a job that failed with ``attempts <= max_retries`` runs again.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable
from typing import Any

import attrs

from soniq.core import serialize, states
from soniq.core.errors import PermanentError, SerializationError
from soniq.core.retry import DEFAULT_BACKOFF, Backoff
from soniq.core.states import Event, JobStatus


@attrs.frozen
class Outcome:
    """The end of one run of one job, as the completer stores it.

    ``attempts`` and ``worker_id`` fence the write: it applies only while the row is
    still this worker's run, so a rescued job's late finish changes nothing.
    """

    job_id: int
    attempts: int
    status: JobStatus
    retry_in: float | None = None  # seconds, for a retry
    error: str | None = None
    traceback: str | None = None
    result: str | None = None  # JSON text
    release: bool = False  # put back without counting the attempt (shutdown)


_SUCCEEDED = states.next_status(JobStatus.RUNNING, Event.SUCCEED)


def succeeded(job_id: int, attempts: int, value: Any) -> Outcome:
    """The job returned ``value``; kept when it is JSON, dropped (None) otherwise."""
    if value is None:  # the common case, on every job's path
        return Outcome(job_id, attempts, _SUCCEEDED)
    result = None
    try:
        serialize.check_arguments({"result": value}, job="")
        result = serialize.dumps(value)
    except (SerializationError, ValueError, TypeError):
        result = None
    return Outcome(job_id, attempts, _SUCCEEDED, result=result)


def failed(
    job_id: int,
    attempts: int,
    max_retries: int,
    exc: BaseException,
    random: Callable[[], float],
    backoff: Backoff = DEFAULT_BACKOFF,
) -> Outcome:
    """The job raised ``exc`` on run number ``attempts``: retry after a back-off, or
    fail for good when no attempt is left or the job refused retrying."""
    error = f"{type(exc).__qualname__}: {exc}"
    trace = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
    if attempts <= max_retries and not isinstance(exc, PermanentError):
        status = states.next_status(JobStatus.RUNNING, Event.RETRY)
        delay = backoff.delay(attempts, random)
        return Outcome(job_id, attempts, status, retry_in=delay, error=error, traceback=trace)
    status = states.next_status(JobStatus.RUNNING, Event.FAIL)
    return Outcome(job_id, attempts, status, error=error, traceback=trace)


def unknown_job(job_id: int, attempts: int, name: str) -> Outcome:
    """A worker met a job name nobody registered: fail at once, without retry."""
    return Outcome(
        job_id,
        attempts,
        states.next_status(JobStatus.RUNNING, Event.FAIL),
        error=(
            f"UnknownJobError: no job named {name!r} is registered in this worker; "
            "import the module that defines it (soniq worker module:eq)"
        ),
    )


def cancelled(job_id: int, attempts: int) -> Outcome:
    """The worker stopped the job because its cancellation was requested."""
    return Outcome(
        job_id,
        attempts,
        states.next_status(JobStatus.RUNNING, Event.ACK_CANCEL),
        error="Cancelled: cancellation was requested",
    )


def released(job_id: int, attempts: int) -> Outcome:
    """Graceful shutdown: back to the queue, the attempt not counted."""
    return Outcome(
        job_id, attempts, states.next_status(JobStatus.RUNNING, Event.RELEASE), release=True
    )
