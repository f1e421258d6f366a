"""The protocols every driver implements, so the facade is written once per colour."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

from soniq.core.sql.postgres import PostgresQueries, Query


class AsyncDriver(Protocol):
    """An async PostgreSQL driver with a lazily opened pool of its own."""

    name: str
    queries: PostgresQueries

    def acquire(self) -> AbstractAsyncContextManager[Any]:
        """A raw connection of the driver's own pool."""

    async def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        """Run ``query`` on a pooled connection (autocommit) and return its rows."""

    async def fetch_on(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        """Run ``query`` on a caller's raw connection, inside whatever transaction it has."""

    async def migrate(self, *, apply: bool) -> int:
        """Apply pending migrations (or, with ``apply=False``, only read the version)."""

    async def listen(
        self, channel: str, on_notify: Callable[[str], None], on_ready: Callable[[], None]
    ) -> None:
        """LISTEN on a dedicated connection until it is lost (then raise)."""

    async def close(self) -> None:
        """Close the pool; a later call opens a new one."""


class SyncDriver(Protocol):
    """The blocking twin of :class:`AsyncDriver`."""

    name: str
    queries: PostgresQueries

    def acquire(self) -> AbstractContextManager[Any]:
        """A raw connection of the driver's own pool."""

    def fetch(self, query: Query) -> Sequence[Sequence[Any]]:
        """Run ``query`` on a pooled connection (autocommit) and return its rows."""

    def fetch_on(self, conn: Any, query: Query) -> Sequence[Sequence[Any]]:
        """Run ``query`` on a caller's raw connection, inside whatever transaction it has."""

    def migrate(self, *, apply: bool) -> int:
        """Apply pending migrations (or, with ``apply=False``, only read the version)."""

    def close(self) -> None:
        """Close the pool; a later call opens a new one."""
