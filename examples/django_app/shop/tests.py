"""The example, tested: `python manage.py test` (Soniq follows Django to the test
database)."""

from django.core.management import call_command
from django.db import connection
from django.test import TestCase, TransactionTestCase

from shop.jobs import confirm_order
from shop.models import Order
from soniq.contrib.django import eq
from soniq.contrib.django.testing import clear_jobs
from soniq.testing import DrainResult, assert_enqueued, assert_not_enqueued, drain


class OrderViewTests(TestCase):
    """A TestCase runs in a transaction: look at the jobs through its connection."""

    def test_an_order_enqueues_its_confirmation(self):
        response = self.client.post("/orders/", {"total": 42})
        self.assertEqual(response.status_code, 201)
        order_id = response.json()["order"]
        assert_enqueued(eq.sync, confirm_order, connection=connection, order_id=order_id)

    def test_a_refused_order_enqueues_nothing(self):
        response = self.client.post("/orders/", {"total": 0})
        self.assertEqual(response.status_code, 400)
        self.assertFalse(Order.objects.exists())
        assert_not_enqueued(eq.sync, confirm_order, connection=connection)


class WorkerTests(TransactionTestCase):
    """Committed for real: the worker sees the jobs."""

    def setUp(self):
        clear_jobs()  # Soniq's tables outlive TransactionTestCase's flush

    def test_drain_runs_the_confirmation(self):
        order_id = self.client.post("/orders/", {"total": 42}).json()["order"]
        self.client.post("/orders/", {"total": -1})  # rolled back: no job
        self.assertEqual(drain(eq.sync), DrainResult(done=1))
        self.assertTrue(Order.objects.get(pk=order_id).confirmed)

    def test_the_worker_command_runs_the_confirmation(self):
        order_id = self.client.post("/orders/", {"total": 7}).json()["order"]
        call_command("soniq", "worker", "--burst", "--burst-wait", "0", "--log-level", "WARNING")
        self.assertTrue(Order.objects.get(pk=order_id).confirmed)
