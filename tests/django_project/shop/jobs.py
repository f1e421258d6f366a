"""The shop's Soniq jobs (autodiscovered: the ``jobs`` module of an installed app)."""

from __future__ import annotations

import threading

from django.db import connection

from soniq.contrib.django import eq
from tests.django_project.shop.models import Order

#: Threads that ran send_receipt, and whether Django's connection was usable there.
runs: list[int] = []


@eq.job()
def send_receipt(order_id: int) -> int:
    runs.append(threading.get_ident())
    Order.objects.filter(pk=order_id).update(receipt_sent=True)
    return order_id


@eq.job(max_retries=0)
def explode(message: str) -> None:
    raise ValueError(message)


@eq.job()
async def async_total(order_id: int) -> str:
    return f"async {order_id}"


@eq.job()
def database_name() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        return str(cursor.fetchone()[0])
