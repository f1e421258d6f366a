# ruff: noqa
"""Seed Pattern 3: SQLAlchemy async (AsyncSession on asyncpg)."""

import os
from fastapi import Depends, FastAPI
from sqlalchemy import Integer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from soniq import Soniq


class Base(DeclarativeBase):  # left to the reader by the seed
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[int] = mapped_column(Integer)


engine = create_async_engine(
    os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_db():
    async with SessionLocal() as session:
        yield session

# --- the seed's code, as written ---

app = FastAPI()
eq = Soniq(database_url=os.environ["DATABASE_URL"])


@eq.job(queue="invoices", max_retries=5)
async def send_invoice(order_id: int):
    return None


@app.post("/orders")
async def create_order(
    product_id: int,
    quantity: int,
    db: AsyncSession = Depends(get_db),
):
    async with db.begin():
        order = Order(product_id=product_id, quantity=quantity)
        db.add(order)
        await db.flush()                                  # populate order.id without committing

        # Reach down to the raw asyncpg connection.
        raw_conn = await db.connection()
        asyncpg_conn = raw_conn.sync_connection.connection.driver_connection

        await eq.enqueue(send_invoice, connection=asyncpg_conn, order_id=order.id)
    # SQLAlchemy commits here. The job becomes visible to workers at the same moment.
