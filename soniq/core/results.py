"""What a finished job gives its waiter (``wait_for``): its result, or the error that
says how it ended otherwise."""

from __future__ import annotations

from typing import Any

from soniq.core.errors import JobCancelled, JobFailed
from soniq.core.jobs import Job
from soniq.core.states import FINISHED, JobStatus

_CANCELLED_PREFIX = "Cancelled: "


def is_finished(job: Job) -> bool:
    """Whether the job has ended (its status will not change again)."""
    return job.status in FINISHED


def result_of(job: Job) -> Any:
    """The result of a finished ``job``: its return value when it is ``done``;
    :class:`JobFailed` when it failed, :class:`JobCancelled` when it was cancelled."""
    if job.status is JobStatus.DONE:
        return job.result
    if job.status is JobStatus.CANCELLED:
        reason = job.last_error
        if reason is not None and reason.startswith(_CANCELLED_PREFIX):
            reason = reason[len(_CANCELLED_PREFIX) :]
        raise JobCancelled(job.id, reason)
    if job.status is JobStatus.FAILED:
        error_type, _, message = (job.last_error or "").partition(": ")
        raise JobFailed(job.id, error_type or "Error", message, job.traceback)
    raise ValueError(f"job {job.id} has not finished: it is {job.status.value}")
