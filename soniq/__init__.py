"""Soniq: a PostgreSQL job queue for Python, sync and async, whose jobs are enqueued
if and only if the caller's transaction commits."""

from soniq._version import __version__
from soniq.app import Soniq, SyncSoniq
from soniq.core import limits
from soniq.core.admin import (
    BacklogProblem,
    QueueStats,
    Stats,
    StatsBucket,
    WorkerInfo,
    parse_duration,
)
from soniq.core.errors import (
    ConfigurationError,
    ConnectionStateError,
    DatabaseUnavailable,
    InvalidTransition,
    JobArgumentsError,
    JobCancelled,
    JobDefinitionError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PermanentError,
    SchemaNotReadyError,
    SerializationError,
    Snooze,
    SoniqError,
    UnknownJobError,
)
from soniq.core.flow import QueueLimits, Rate
from soniq.core.jobs import Job, JobDefinition
from soniq.core.retry import Backoff
from soniq.core.states import JobStatus
from soniq.middleware import EnqueueContext, RunContext
from soniq.worker import JobContext, WorkerConfig, current_job

__all__ = [
    "BacklogProblem",
    "Backoff",
    "ConfigurationError",
    "ConnectionStateError",
    "DatabaseUnavailable",
    "EnqueueContext",
    "InvalidTransition",
    "Job",
    "JobArgumentsError",
    "JobCancelled",
    "JobContext",
    "JobDefinition",
    "JobDefinitionError",
    "JobFailed",
    "JobNotFound",
    "JobStatus",
    "JobTimeout",
    "PermanentError",
    "QueueLimits",
    "QueueStats",
    "Rate",
    "RunContext",
    "SchemaNotReadyError",
    "SerializationError",
    "Snooze",
    "Soniq",
    "SoniqError",
    "Stats",
    "StatsBucket",
    "SyncSoniq",
    "UnknownJobError",
    "WorkerConfig",
    "WorkerInfo",
    "__version__",
    "current_job",
    "limits",
    "parse_duration",
]
