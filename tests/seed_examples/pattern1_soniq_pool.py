# ruff: noqa
"""Seed Pattern 1: raw asyncpg via Soniq's pool (the FastAPI route example)."""

import os
from contextlib import asynccontextmanager
from fastapi import FastAPI
from soniq import Soniq

eq = Soniq(database_url=os.environ["DATABASE_URL"])


async def get_order(order_id):  # left to the reader by the seed
    return order_id


async def generate_and_send_invoice(order):  # left to the reader by the seed
    return None


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    await eq.close()

app = FastAPI(lifespan=lifespan)


@eq.job(queue="invoices", max_retries=5)
async def send_invoice(order_id: int):
    order = await get_order(order_id)
    await generate_and_send_invoice(order)


@app.post("/orders")
async def create_order(product_id: int, quantity: int):
    await eq.ensure_initialized()
    async with eq.backend.acquire() as conn:
        async with conn.transaction():
            order_id = await conn.fetchval(
                "INSERT INTO orders (product_id, quantity) VALUES ($1, $2) RETURNING id",
                product_id, quantity,
            )
            await eq.enqueue(send_invoice, connection=conn, order_id=order_id)

    return {"order_id": order_id}
