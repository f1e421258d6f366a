"""Choosing an embedded backend (a SQLite file, or SQLite in memory) from a URL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from soniq.core.errors import ConfigurationError
from soniq.drivers._common import redact_url

if TYPE_CHECKING:
    from soniq.drivers.base import AsyncBackend, SyncBackend
    from soniq.drivers.sqlite import SqliteDatabase

EMBEDDED = ("sqlite", "memory")
DEFAULT_SQLITE_URL = "sqlite:///soniq.db"


def _sqlite_file(url: str) -> SqliteDatabase:
    from soniq.drivers.sqlite import SYNCHRONOUS_LEVELS, SqliteFile

    rest = url[len("sqlite:///") :]
    path, _, query = rest.partition("?")
    if not path:
        raise ConfigurationError(
            f"database_url {redact_url(url)!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    synchronous = SYNCHRONOUS_LEVELS[0]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key != "synchronous" or value.upper() not in SYNCHRONOUS_LEVELS:
            raise ConfigurationError(
                f"database_url {redact_url(url)!r}: the one SQLite option is ?synchronous=full "
                "(the default) or ?synchronous=normal"
            )
        synchronous = value.upper()
    return SqliteFile(os.path.abspath(path), synchronous)


def embedded_location(url: str) -> tuple[str, Any]:
    """("postgres", url), or ("sqlite" | "memory", the :class:`SqliteDatabase`)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"database_url must be a str, got {type(url).__name__}")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise ConfigurationError(
                f"database_url {redact_url(url)!r}: write sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        return "sqlite", _sqlite_file(url)
    if url.startswith("memory:"):
        if url.rstrip("/") != "memory:":
            raise ConfigurationError(
                f"database_url {redact_url(url)!r}: the memory URL is memory://"
            )
        from soniq.drivers.sqlite import SqliteMemory

        return "memory", SqliteMemory()
    return "postgres", url


def embedded_backend(database: SqliteDatabase) -> AsyncBackend:
    """The async backend of an embedded database."""
    from soniq.drivers.sqlite import SqliteBackend

    return SqliteBackend(database)


def embedded_sync_backend(database: SqliteDatabase) -> SyncBackend:
    """The blocking backend of an embedded database."""
    from soniq.drivers.sqlite import SqliteSyncBackend

    return SqliteSyncBackend(database)
