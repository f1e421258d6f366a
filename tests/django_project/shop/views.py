from __future__ import annotations

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse

from soniq.contrib.django import eq
from tests.django_project.shop.jobs import send_receipt
from tests.django_project.shop.models import Order


class Refused(Exception):
    pass


def create_order(request: HttpRequest) -> JsonResponse:
    """POST total=N: an order and its receipt job, in one transaction; fail=1 makes
    the transaction roll back after the enqueue."""
    total = int(request.POST["total"])
    try:
        with transaction.atomic():
            order = Order.objects.create(total=total)
            job_id = eq.sync.enqueue(send_receipt, connection=connection, order_id=order.id)
            if request.POST.get("fail"):
                raise Refused
    except Refused:
        return JsonResponse({"error": "refused"}, status=400)
    return JsonResponse({"order": order.id, "job": job_id})
