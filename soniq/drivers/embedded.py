"""Choosing an embedded backend (SQLite, memory) from a URL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import attrs

from soniq.core.errors import ConfigurationError

if TYPE_CHECKING:
    from soniq.drivers.base import AsyncBackend, SyncBackend

EMBEDDED = ("sqlite", "memory")
DEFAULT_SQLITE_URL = "sqlite:///soniq.db"
#: The ``synchronous`` levels a SQLite URL may ask for; the first is the default.
SYNCHRONOUS_LEVELS = ("FULL", "NORMAL")


@attrs.frozen
class SqliteFile:
    """Where a SQLite database is, and its ``synchronous`` level (``FULL`` unless the
    URL says ``?synchronous=normal``; see :mod:`soniq.drivers.sqlite`)."""

    path: str
    synchronous: str = SYNCHRONOUS_LEVELS[0]

    def __str__(self) -> str:
        return self.path


def _sqlite_file(url: str) -> SqliteFile:
    rest = url[len("sqlite:///") :]
    path, _, query = rest.partition("?")
    if not path:
        raise ConfigurationError(
            f"database_url {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    synchronous = SYNCHRONOUS_LEVELS[0]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key != "synchronous" or value.upper() not in SYNCHRONOUS_LEVELS:
            raise ConfigurationError(
                f"database_url {url!r}: the one SQLite option is ?synchronous=full "
                "(the default) or ?synchronous=normal"
            )
        synchronous = value.upper()
    return SqliteFile(os.path.abspath(path), synchronous)


def embedded_location(url: str) -> tuple[str, Any]:
    """("postgres", url), ("sqlite", :class:`SqliteFile`) or ("memory", a new store)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"database_url must be a str, got {type(url).__name__}")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise ConfigurationError(
                f"database_url {url!r}: write sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        return "sqlite", _sqlite_file(url)
    if url.startswith("memory:"):
        if url.rstrip("/") != "memory:":
            raise ConfigurationError(f"database_url {url!r}: the memory URL is memory://")
        from soniq.drivers.memory import MemoryStore

        return "memory", MemoryStore()
    return "postgres", url


def embedded_backend(kind: str, location: Any) -> AsyncBackend:
    """The async backend of an embedded ``kind``."""
    if kind == "sqlite":
        from soniq.drivers.sqlite import SqliteBackend

        return SqliteBackend(location.path, synchronous=location.synchronous)
    from soniq.drivers.memory import MemoryBackend

    return MemoryBackend(location)


def embedded_sync_backend(kind: str, location: Any) -> SyncBackend:
    """The blocking backend of an embedded ``kind``."""
    if kind == "sqlite":
        from soniq.drivers.sqlite import SqliteSyncBackend

        return SqliteSyncBackend(location.path, synchronous=location.synchronous)
    from soniq.drivers.memory import MemorySyncBackend

    return MemorySyncBackend(location)
