"""The shop's jobs. soniq.contrib.django imports every installed app's `jobs`
module at start, so `manage.py soniq worker` knows them."""

from shop.models import Order
from soniq.contrib.django import eq


@eq.job(queue="orders", max_retries=5)
def confirm_order(order_id: int) -> None:
    # A sync job runs in a worker thread with Django's connections, as a request does.
    Order.objects.filter(pk=order_id).update(confirmed=True)
