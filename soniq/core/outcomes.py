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

from soniq.core import limits, serialize, states
from soniq.core.errors import PermanentError
from soniq.core.retry import DEFAULT_BACKOFF, Backoff
from soniq.core.states import Event, JobStatus


# Not frozen, for the same reason as soniq.core.jobs.Claimed: one is made per run.
@attrs.define
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
    release: bool = False  # put back without counting the attempt (shutdown, snooze)
    snoozed: bool = False  # the job snoozed: counted in ``snoozes``, its run uncounted


_SUCCEEDED = states.next_status(JobStatus.RUNNING, Event.SUCCEED)


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` for ``last_error``, whatever the exception does: a failing
    or enormous ``str()`` gives a readable stand-in, never an error of its own."""
    name = _safe(lambda: type(exc).__qualname__)
    message = _safe(lambda: str(exc), limit=limits.MAX_ERROR_CHARS)
    return _cut(f"{name}: {message}" if message else name, limits.MAX_ERROR_CHARS)


def format_traceback(exc: BaseException) -> str:
    """The traceback for ``last_traceback``, cut to :data:`limits.MAX_TRACEBACK_CHARS`
    (start and end kept); a stand-in line if formatting it fails."""
    try:
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as problem:  # a hostile __str__ may raise anything
        text = f"(the traceback could not be formatted: {describe_error(problem)})"
    if len(text) <= limits.MAX_TRACEBACK_CHARS:
        return text
    head = limits.MAX_TRACEBACK_CHARS // 4
    tail = limits.MAX_TRACEBACK_CHARS - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n... {cut:,} characters cut ...\n{text[-tail:]}"


def _safe(render: Callable[[], str], limit: int = 1_000) -> str:
    try:
        text = render()
        if not isinstance(text, str):
            raise TypeError(f"it returned {type(text).__name__}")
    except BaseException as problem:  # a job's __str__ may raise anything
        try:
            kind = type(problem).__qualname__
        except BaseException:
            kind = "error"
        return f"<str() failed: {kind}>"
    return _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} characters cut)"


def succeeded(job_id: int, attempts: int, value: Any) -> Outcome:
    """The job returned ``value``; kept when it is JSON of at most
    :data:`limits.MAX_RESULT_CHARS`. Otherwise the job is still done, with no result, and
    ``error`` says why the value was not stored (the worker logs it at WARNING)."""
    if value is None:  # the common case, on every job's path
        return Outcome(job_id, attempts, _SUCCEEDED)
    try:
        serialize.check_arguments({"result": value}, job="")
        result = serialize.dumps(value)
    except Exception as exc:  # a RecursionError, a broken __repr__...: any reason
        return Outcome(job_id, attempts, _SUCCEEDED, error=_not_stored(value, exc))
    if len(result) > limits.MAX_RESULT_CHARS:
        reason = (
            f"its JSON is {len(result):,} characters, over the {limits.MAX_RESULT_CHARS:,} kept"
        )
        return Outcome(job_id, attempts, _SUCCEEDED, error=_not_stored(value, reason))
    return Outcome(job_id, attempts, _SUCCEEDED, result=result)


def _not_stored(value: Any, reason: object) -> str:
    if isinstance(reason, BaseException):
        # The argument checker's words, minus the job-name prefix it has no use for.
        reason = describe_error(reason).replace("job '': argument 'result' ", "it ")
    kind = _safe(lambda: f"{type(value).__module__}.{type(value).__qualname__}")
    return _cut(
        f"ResultNotStored: the job returned a {kind}, not stored: {reason}", limits.MAX_ERROR_CHARS
    )


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
    error = describe_error(exc)
    trace = format_traceback(exc)
    if attempts <= max_retries and not isinstance(exc, PermanentError):
        status = states.next_status(JobStatus.RUNNING, Event.RETRY)
        delay = backoff.delay(attempts, random)
        return Outcome(job_id, attempts, status, retry_in=delay, error=error, traceback=trace)
    status = states.next_status(JobStatus.RUNNING, Event.FAIL)
    return Outcome(job_id, attempts, status, error=error, traceback=trace)


def cancelled(job_id: int, attempts: int) -> Outcome:
    """The worker stopped the job because its cancellation was requested."""
    return Outcome(
        job_id,
        attempts,
        states.next_status(JobStatus.RUNNING, Event.ACK_CANCEL),
        error="Cancelled: cancellation was requested",
    )


def snoozed(job_id: int, attempts: int, seconds: float) -> Outcome:
    """The job raised :class:`soniq.Snooze`: back to the queue, due in ``seconds``,
    neither the attempt nor the run counted."""
    status = states.next_status(JobStatus.RUNNING, Event.SNOOZE)
    return Outcome(job_id, attempts, status, retry_in=seconds, release=True, snoozed=True)


def released(job_id: int, attempts: int) -> Outcome:
    """Graceful shutdown: back to the queue, the attempt not counted."""
    return Outcome(
        job_id, attempts, states.next_status(JobStatus.RUNNING, Event.RELEASE), release=True
    )
