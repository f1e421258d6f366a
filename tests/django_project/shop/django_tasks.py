"""Django 6 ``@task`` functions on the Soniq Tasks backend (imported by
tests_tasks.py on Django 6 only)."""

from __future__ import annotations

from django.tasks import task

from tests.django_project.shop.models import Order


@task()
def mark_sent(order_id: int) -> int:
    Order.objects.filter(pk=order_id).update(receipt_sent=True)
    return order_id


@task(priority=10, queue_name="mail")
def add(a: int, b: int) -> int:
    return a + b


@task()
def fail(message: str) -> None:
    raise ValueError(message)


@task(takes_context=True)
def with_context(context, label: str) -> dict:  # type: ignore[no-untyped-def]
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id}


@task()
async def async_double(x: int) -> int:
    return 2 * x
