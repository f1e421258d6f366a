"""Soniq: a PostgreSQL job queue for Python, sync and async, whose jobs are enqueued
if and only if the caller's transaction commits."""

from soniq._version import __version__
from soniq.app import Soniq, SyncSoniq
from soniq.core.errors import (
    ConfigurationError,
    ConnectionStateError,
    InvalidTransition,
    JobArgumentsError,
    JobDefinitionError,
    SchemaNotReadyError,
    SerializationError,
    SoniqError,
    UnknownJobError,
)
from soniq.core.jobs import Job, JobDefinition
from soniq.core.retry import Backoff
from soniq.core.states import JobStatus

__all__ = [
    "Backoff",
    "ConfigurationError",
    "ConnectionStateError",
    "InvalidTransition",
    "Job",
    "JobArgumentsError",
    "JobDefinition",
    "JobDefinitionError",
    "JobStatus",
    "SchemaNotReadyError",
    "SerializationError",
    "Soniq",
    "SoniqError",
    "SyncSoniq",
    "UnknownJobError",
    "__version__",
]
