"""A small FastAPI shop: an order and its confirmation job, in one transaction (see
README.md and docs/fastapi.md).

``POST /orders`` inserts the order and enqueues ``send_confirmation`` on the same
connection, a connection of Soniq's pool in a transaction that commits when the route
returns (before the response is sent) and rolls back when it raises. The worker:
``soniq worker shop_api:eq``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from soniq import Soniq
from soniq.contrib.fastapi import lifespan, transaction, transaction_dependency

eq = Soniq(os.environ["DATABASE_URL"])
log = logging.getLogger(__name__)

#: An order of more than this many items is refused (after its job was enqueued:
#: the refusal rolls the order and its job back together).
MAX_QUANTITY = 10
ORDERS_DDL = """
CREATE TABLE IF NOT EXISTS api_orders (
    id bigserial PRIMARY KEY,
    email text NOT NULL,
    quantity int NOT NULL,
    confirmed boolean NOT NULL DEFAULT false
)
"""


@eq.job(queue="mail", max_retries=5)
async def send_confirmation(order_id: int) -> None:
    """Send the order's confirmation (here: log it) and mark the order confirmed."""
    async with transaction(eq) as conn:
        email = await conn.fetchval(
            "UPDATE api_orders SET confirmed = true WHERE id = $1 AND NOT confirmed "
            "RETURNING email",
            order_id,
        )
    if email is not None:  # at least once: a second run finds it confirmed already
        log.info("order %s confirmed to %s", order_id, email)


@asynccontextmanager
async def create_tables(app: FastAPI) -> AsyncIterator[None]:
    """The app's own lifespan: its table (a real app runs its migrations instead)."""
    async with transaction(eq) as conn:
        await conn.execute(ORDERS_DDL)
    yield


# Soniq opens (and migrates) before create_tables runs, and closes after it ends.
app = FastAPI(lifespan=lifespan(eq, create_tables))
#: A connection of Soniq's pool in a transaction around the route (asyncpg here).
Tx = Annotated[asyncpg.Connection, transaction_dependency(eq)]


class OrderIn(BaseModel):
    email: str
    quantity: int


@app.post("/orders", status_code=201)
async def create_order(order: OrderIn, conn: Tx) -> dict[str, int]:
    order_id = await conn.fetchval(
        "INSERT INTO api_orders (email, quantity) VALUES ($1, $2) RETURNING id",
        order.email,
        order.quantity,
    )
    # Same connection, same transaction as the order.
    await eq.enqueue(send_confirmation, connection=conn, order_id=order_id)
    if order.quantity > MAX_QUANTITY:
        # Anything that raises from here on (a check, a payment) rolls back the
        # order and its job together.
        raise HTTPException(422, f"at most {MAX_QUANTITY} items per order")
    return {"order_id": order_id}


@app.get("/orders/{order_id}")
async def show_order(order_id: int, conn: Tx) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT id, email, confirmed FROM api_orders WHERE id = $1", order_id)
    if row is None:
        raise HTTPException(404)
    return dict(row)
