"""Soniq in a FastAPI application.

- :func:`lifespan` (from :mod:`soniq.contrib.starlette`): ``FastAPI(lifespan=
  lifespan(eq, app_lifespan))`` opens Soniq at start and closes it at shutdown, around
  the app's own lifespan.
- :func:`transaction_dependency`: ``Tx = Annotated[asyncpg.Connection,
  transaction_dependency(eq)]`` gives a route a connection of Soniq's pool inside a
  transaction, committed when the route returns, before the response is sent, and
  rolled back when it raises (``HTTPException`` included). Rows written and jobs
  enqueued on it (``connection=conn``) exist together or not at all.
- :func:`transaction` (from :mod:`soniq.contrib.starlette`): the same transaction as
  an ``async with`` block, for code outside a route.

A route that uses SQLAlchemy's ``AsyncSession`` needs none of this beyond the
lifespan: pass the session as ``connection=`` (see docs/fastapi.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends

from soniq.app import Soniq
from soniq.contrib.starlette import Lifespan, lifespan, transaction

__all__ = ["Lifespan", "lifespan", "transaction", "transaction_dependency"]


def transaction_dependency(eq: Soniq) -> Any:
    """A FastAPI dependency (``Depends``) that yields :func:`transaction`'s connection:
    one of ``eq``'s own pool inside a transaction, committed when the route function
    returns and rolled back when it raises, the connection given back to the pool
    either way. Its scope is ``"function"``: the commit happens before the response
    is sent, so a client never sees a success that did not commit (FastAPI's default
    for ``yield`` dependencies ends them after the response).

    Use it in a type: ``Tx = Annotated[asyncpg.Connection, transaction_dependency(eq)]``
    then ``async def create_order(conn: Tx): ...``. Several parameters (or
    sub-dependencies) of one request that name the same ``Tx`` share one connection.
    """

    async def soniq_transaction() -> AsyncIterator[Any]:
        async with transaction(eq) as conn:
            yield conn

    return Depends(soniq_transaction, scope="function")
