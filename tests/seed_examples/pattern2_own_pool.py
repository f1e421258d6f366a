# ruff: noqa
"""Seed Pattern 2: bring your own asyncpg pool."""

import os
import asyncpg
from fastapi import FastAPI
from soniq import Soniq

app = FastAPI()
eq = Soniq(database_url=os.environ["DATABASE_URL"])
db_pool: asyncpg.Pool                                # your application's pool


@eq.job(queue="invoices", max_retries=5)
async def send_invoice(order_id: int):
    return None


@app.on_event("startup")
async def _on_startup():
    global db_pool
    db_pool = await asyncpg.create_pool(os.environ["DATABASE_URL"])

@app.post("/orders")
async def create_order(product_id: int, quantity: int):
    async with db_pool.acquire() as conn:
        async with conn.transaction():
            order_id = await conn.fetchval(
                "INSERT INTO orders (product_id, quantity) VALUES ($1, $2) RETURNING id",
                product_id, quantity,
            )
            await eq.enqueue(send_invoice, connection=conn, order_id=order_id)
    return {"order_id": order_id}
