from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from shop.jobs import confirm_order
from shop.models import Order
from soniq.contrib.django import eq


class OrderRefused(Exception):
    pass


@csrf_exempt
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    """The order and its confirmation job commit together, or not at all."""
    try:
        with transaction.atomic():
            order = Order.objects.create(total=int(request.POST["total"]))
            eq.sync.enqueue(confirm_order, connection=connection, order_id=order.id)
            if order.total <= 0:
                raise OrderRefused  # rolls back the order AND its job
    except OrderRefused:
        return JsonResponse({"error": "the total must be positive"}, status=400)
    return JsonResponse({"order": order.id}, status=201)
