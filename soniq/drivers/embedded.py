"""Choosing an embedded backend (SQLite, memory) from a URL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from soniq.core.errors import ConfigurationError

if TYPE_CHECKING:
    from soniq.drivers.base import AsyncBackend, SyncBackend

EMBEDDED = ("sqlite", "memory")
DEFAULT_SQLITE_URL = "sqlite:///soniq.db"


def embedded_location(url: str) -> tuple[str, Any]:
    """("postgres", url), ("sqlite", absolute path) or ("memory", a new store)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"database_url must be a str, got {type(url).__name__}")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ConfigurationError(
                f"database_url {url!r}: write sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        return "sqlite", os.path.abspath(url[len("sqlite:///") :])
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

        return SqliteBackend(location)
    from soniq.drivers.memory import MemoryBackend

    return MemoryBackend(location)


def embedded_sync_backend(kind: str, location: Any) -> SyncBackend:
    """The blocking backend of an embedded ``kind``."""
    if kind == "sqlite":
        from soniq.drivers.sqlite import SqliteSyncBackend

        return SqliteSyncBackend(location)
    from soniq.drivers.memory import MemorySyncBackend

    return MemorySyncBackend(location)
