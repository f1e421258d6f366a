"""The shop's table."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

db = SQLAlchemy()


class Order(db.Model):
    """An order; ``confirmed`` once its confirmation was sent."""

    __tablename__ = "shop_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    quantity: Mapped[int]
    confirmed: Mapped[bool] = mapped_column(default=False)
