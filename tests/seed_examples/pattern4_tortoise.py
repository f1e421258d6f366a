# ruff: noqa
"""Seed Pattern 4: Tortoise ORM."""

import os
from fastapi import FastAPI
from tortoise import fields
from tortoise.models import Model
from tortoise.transactions import in_transaction
from soniq import Soniq


class Order(Model):  # left to the reader by the seed
    id = fields.IntField(primary_key=True)
    product_id = fields.IntField()
    quantity = fields.IntField()

    class Meta:
        table = "orders"


app = FastAPI()
eq = Soniq(database_url=os.environ["DATABASE_URL"])


@eq.job(queue="invoices", max_retries=5)
async def send_invoice(order_id: int):
    return None

# --- the seed's code, as written ---

@app.post("/orders")
async def create_order(product_id: int, quantity: int):
    async with in_transaction() as conn:
        order = await Order.create(
            using_db=conn,
            product_id=product_id,
            quantity=quantity,
        )
        # conn._connection is the raw asyncpg connection. Private attribute,
        # works in current Tortoise releases. A first-class Tortoise integration
        # is on the roadmap.
        await eq.enqueue(send_invoice, connection=conn._connection, order_id=order.id)
