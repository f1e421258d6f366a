"""Soniq in an ASGI application (Starlette, FastAPI, or any framework with a lifespan).

- :func:`lifespan`: ``Starlette(lifespan=lifespan(eq))`` opens Soniq when the app starts
  (``eq.ensure_initialized()``: the pool, and the migrations unless
  ``migrate=False``) and closes it when the app stops. It wraps the app's own lifespan
  if you pass one (``lifespan(eq, app_lifespan)``), entered after Soniq is open and
  exited before Soniq closes; whatever state that lifespan yields is the app's.
- :func:`transaction`: ``async with transaction(eq) as conn:`` a connection of Soniq's
  own pool (``asyncpg.Connection``, or ``psycopg.AsyncConnection`` with
  ``driver="psycopg"``) inside a transaction, committed when the block ends without
  an exception and rolled back otherwise. Enqueue on it with ``connection=conn``.

Neither imports Starlette: a lifespan is a function of the app that returns an async
context manager. :mod:`soniq.contrib.fastapi` turns :func:`transaction` into a FastAPI
dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from soniq.app import Soniq

__all__ = ["Lifespan", "lifespan", "transaction"]

AppT = TypeVar("AppT")
#: An ASGI lifespan, as Starlette takes it: the app -> an async context manager that
#: may yield the app's state.
Lifespan = Callable[[AppT], contextlib.AbstractAsyncContextManager[Any]]


def lifespan(
    eq: Soniq,
    app_lifespan: Lifespan[AppT] | None = None,
    *,
    migrate: bool = True,
) -> Lifespan[AppT]:
    """A lifespan that opens ``eq`` at start (``await eq.ensure_initialized(migrate=
    migrate)``) and closes it at shutdown (``await eq.close()``), around
    ``app_lifespan`` (the app's own, optional), whose yielded state it passes on.

    With ``migrate=False`` the start only checks that Soniq's tables are at the
    current version (for a role without DDL rights; run ``soniq migrate`` at deploy).
    """

    @contextlib.asynccontextmanager
    async def run(app: AppT) -> AsyncIterator[Any]:
        await eq.ensure_initialized(migrate=migrate)
        try:
            if app_lifespan is None:
                yield None
            else:
                async with app_lifespan(app) as state:
                    yield state
        finally:
            await eq.close()

    return run


@contextlib.asynccontextmanager
async def transaction(eq: Soniq) -> AsyncIterator[Any]:
    """A connection of ``eq``'s own pool in a transaction, committed when the block
    ends without an exception, rolled back when it raises (the exception goes on);
    the connection returns to the pool either way.

    It is an ``asyncpg.Connection`` (``$1`` placeholders), or a
    ``psycopg.AsyncConnection`` (``%s``) when ``eq`` uses ``driver="psycopg"``.
    Enqueue on it with ``await eq.enqueue(job, connection=conn, ...)``: the jobs exist
    if and only if the transaction commits. Opens ``eq`` if it is not yet open.
    """
    await eq.ensure_initialized(migrate=False)
    async with eq.backend.acquire() as conn, conn.transaction():
        yield conn
