"""Small helpers shared by the PostgreSQL drivers: who owns a pool, URL handling, and
turning driver errors into Soniq's."""

from __future__ import annotations

import asyncio
import os
import re
import select
from urllib.parse import urlsplit

from soniq.core.errors import ConfigurationError, SchemaNotReadyError

_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


def async_owner() -> tuple[int, asyncio.AbstractEventLoop]:
    """What an async pool is bound to: this process (since the last fork) and the
    running loop. A pool made under another owner must be replaced, not used."""
    return _fork_generation, asyncio.get_running_loop()


def sync_owner() -> tuple[int, None]:
    """What a sync pool is bound to: this process, since the last fork."""
    return _fork_generation, None


_SCHEME = re.compile(r"^(postgres|postgresql)(\+(asyncpg|psycopg|psycopg_async|psycopg2))?$")


def split_postgres_url(url: str) -> tuple[str, str | None]:
    """``postgresql+asyncpg://...`` -> (``postgresql://...``, ``"asyncpg"``)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"database_url must look like postgresql://user@host:5432/dbname, got {url!r}"
        )
    scheme, rest = url.split("://", 1)
    match = _SCHEME.match(scheme)
    if not match:
        raise ConfigurationError(
            f"database_url has scheme {scheme!r}; use postgresql:// (optionally "
            "postgresql+asyncpg:// or postgresql+psycopg://)"
        )
    try:
        parts = urlsplit("postgresql://" + rest)
        parts.port  # noqa: B018  (parsing the port validates it)
    except ValueError as exc:
        raise ConfigurationError(f"database_url is malformed: {exc}") from None
    driver = match[3]
    if driver == "psycopg_async":
        driver = "psycopg"
    return "postgresql://" + rest, driver


def schema_missing(schema: str, exc: BaseException) -> SchemaNotReadyError:
    """The error for a statement that found no Soniq table."""
    return SchemaNotReadyError(
        f"Soniq's tables are missing in schema {schema!r} ({exc}); create them with "
        "`soniq migrate --database-url URL` or `await eq.ensure_initialized()`"
    )


def is_connection_error(exc: BaseException) -> bool:
    """True for errors after which the same statement can succeed on a new connection
    (a dropped or terminated connection, a server restarting, a pool timeout)."""
    import sqlite3

    import asyncpg
    import psycopg

    return isinstance(
        exc,
        (
            OSError,
            ConnectionError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.AdminShutdownError,
            asyncpg.CannotConnectNowError,
            # asyncpg can report a connection killed under a running query this way.
            asyncpg.exceptions._base.InternalClientError,
            psycopg.OperationalError,
            psycopg.InterfaceError,
            # SQLite: "database is locked" past the busy timeout; the next try may pass.
            sqlite3.OperationalError,
        ),
    )


def has_unread_input(fileno: int) -> bool:
    """True if an idle connection's socket has something to read: on a pooled
    connection nobody is reading, that is almost always the server's goodbye
    (terminated backend, restart), which a pool must find before handing it out."""
    readable, _, _ = select.select([fileno], [], [], 0)
    return bool(readable)
