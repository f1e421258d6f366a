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
