"""A small Flask shop: an order and its confirmation email, enqueued in the same
transaction as the order (see README.md and docs/flask.md).

``create_app()`` is the app factory. The jobs live in :mod:`shop.jobs` on a Soniq made
at import time, before any app exists; :class:`~soniq.contrib.flask.SoniqFlask` ties
it to each app the factory makes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, abort, request

from soniq.contrib.flask import SoniqFlask

from .jobs import eq, send_confirmation
from .models import Order, db

#: An order of more than this many items is refused (after its job was enqueued:
#: the refusal rolls the order and its job back together).
MAX_QUANTITY = 10


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The app: ``SQLALCHEMY_DATABASE_URI`` defaults to ``$DATABASE_URL``, the database
    of the Soniq of :mod:`shop.jobs`."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    app.config.update(config or {})
    db.init_app(app)
    SoniqFlask(app, eq=eq)

    @app.post("/orders")
    def create_order() -> tuple[dict[str, Any], int]:
        data = request.get_json()
        order = Order(email=data["email"], quantity=data["quantity"])
        db.session.add(order)
        db.session.flush()  # order.id, in the transaction
        # Same connection, same transaction as the order.
        eq.sync.enqueue(send_confirmation, connection=db.session, order_id=order.id)
        if order.quantity > MAX_QUANTITY:
            # Anything that fails from here on (a check, a payment) aborts the
            # request: Flask-SQLAlchemy rolls the session back, and the job with it.
            abort(422, f"at most {MAX_QUANTITY} items per order")
        db.session.commit()  # the order and its job, together
        return {"order_id": order.id}, 201

    @app.get("/orders/<int:order_id>")
    def show_order(order_id: int) -> dict[str, Any]:
        order = db.get_or_404(Order, order_id)
        return {"id": order.id, "email": order.email, "confirmed": order.confirmed}

    @app.cli.command("init-db")
    def init_db() -> None:
        """Create the shop's tables (Soniq's: `flask soniq migrate`)."""
        db.create_all()

    return app
