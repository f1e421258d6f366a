"""The shop's jobs, on a Soniq made at import time (``$DATABASE_URL``).

They run in a worker (``flask --app shop soniq worker``) inside an app context, which
SoniqFlask pushes around each run: ``db.session`` is the run's own, removed after it.
"""

from __future__ import annotations

import logging
import os

from soniq import Soniq

from .models import Order, db

eq = Soniq(os.environ["DATABASE_URL"])
log = logging.getLogger(__name__)


@eq.job(queue="mail", max_retries=5)
def send_confirmation(order_id: int) -> None:
    """Send the order's confirmation (here: log it) and mark the order confirmed."""
    order = db.session.get(Order, order_id)
    if order is None or order.confirmed:  # at least once: a second run does nothing
        return
    log.info("order %s confirmed to %s", order.id, order.email)
    order.confirmed = True
    db.session.commit()
