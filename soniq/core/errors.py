"""Exceptions that Soniq raises. All derive from :class:`SoniqError`."""

from __future__ import annotations

import datetime as dt


class SoniqError(Exception):
    """Base class of every error Soniq raises on purpose."""


class InvalidTransition(SoniqError):
    """A job was asked to move between two statuses that the transition table forbids."""


class SerializationError(SoniqError, ValueError):
    """A job argument cannot be stored as JSON; the message names the argument."""


class JobArgumentsError(SoniqError, TypeError):
    """The arguments of an enqueue do not match the job function's signature."""


class UnknownJobError(SoniqError, LookupError):
    """A job function is not registered with this Soniq instance."""


class JobDefinitionError(SoniqError, TypeError):
    """``@eq.job`` was applied to a function that cannot be a job as written."""


class ConfigurationError(SoniqError, ValueError):
    """A constructor argument (URL, driver, schema) is invalid."""


class SchemaNotReadyError(SoniqError):
    """Soniq's tables are missing or older than this version: run ``soniq migrate``."""


class ConnectionStateError(SoniqError):
    """A caller's connection cannot take an enqueue as it is (closed, or its
    transaction has already failed)."""


class PermanentError(SoniqError):
    """Raise it (or a subclass) from a job to fail it now, without retrying."""


_YEAR = 366 * 86_400.0


class Snooze(Exception):
    """Raise ``Snooze(seconds)`` (or a ``timedelta``) from a job to run it again later:
    it goes back to ``queued``, due ``seconds`` from now, the attempt not counted
    against ``max_retries``; ``Job.snoozes`` counts how often it snoozed."""

    def __init__(self, delay: float | dt.timedelta) -> None:
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else delay
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 <= seconds <= _YEAR
        ):
            raise ValueError(
                f"Snooze(delay): seconds from 0 to a year (31,622,400) or a timedelta, "
                f"got {delay!r}"
            )
        super().__init__(f"snoozed for {seconds:g} s")
        #: How long the job sleeps, in seconds.
        self.seconds = float(seconds)


class JobTimeout(SoniqError, TimeoutError):
    """A job ran past its ``timeout``; handled like any failure (retried if it may)."""


class DatabaseUnavailable(SoniqError, ConnectionError):
    """The database could not be reached, or did not answer, within the configured
    time (``Soniq(connect_timeout=..., acquire_timeout=...)``).

    The message names the host, port and database (never the password); the driver's
    own error is chained as ``__cause__``. A :class:`ConnectionError`, so code that
    retries on connection errors retries on it too.
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        port: int | None = None,
        database: str | None = None,
    ) -> None:
        super().__init__(message)
        #: Where Soniq tried to connect (None where the URL did not say).
        self.host = host
        self.port = port
        self.database = database

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class JobNotFound(SoniqError, LookupError):
    """No job has this id (never enqueued, or deleted: pruned, or finished with
    ``retention=0``). ``job_id`` is the id asked for."""

    def __init__(self, message: str, *, job_id: int) -> None:
        super().__init__(message)
        #: The id that matched no job.
        self.job_id = job_id


class JobFailed(SoniqError):
    """The job awaited with ``wait_for`` failed: its retries are spent, or it raised
    :class:`PermanentError`. Its last error: ``error_type`` (the exception's class
    name), ``message`` and ``traceback`` (as its worker formatted it)."""

    def __init__(self, job_id: int, error_type: str, message: str, traceback: str | None) -> None:
        super().__init__(f"job {job_id} failed: {error_type}: {message}".rstrip(": "))
        #: The failed job's id.
        self.job_id = job_id
        #: The class name of the exception it last raised (``"ValueError"``).
        self.error_type = error_type
        #: That exception's message.
        self.message = message
        #: The formatted traceback of that exception (None when none was stored).
        self.traceback = traceback


class JobCancelled(SoniqError):
    """The job awaited with ``wait_for`` was cancelled: by ``cancel_job``, or because
    a job it depended on failed or was cancelled (``reason`` says which)."""

    def __init__(self, job_id: int, reason: str | None) -> None:
        super().__init__(f"job {job_id} was cancelled" + (f": {reason}" if reason else ""))
        #: The cancelled job's id.
        self.job_id = job_id
        #: Why, as stored in its ``last_error`` (None when nothing was stored).
        self.reason = reason
