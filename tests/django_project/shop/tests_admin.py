"""The admin over Soniq's jobs: list, filters, search, detail with traceback, and the
retry and cancel actions."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.test import TransactionTestCase

from soniq import JobStatus
from soniq.contrib.django import eq
from soniq.contrib.django.testing import clear_jobs
from soniq.testing import drain
from tests.django_project.shop import jobs

CHANGELIST = "/admin/soniq/job/"


class AdminTests(TransactionTestCase):
    def setUp(self) -> None:
        clear_jobs()
        self.admin = User.objects.create_superuser("admin", "admin@example.com", "pw")
        self.client.force_login(self.admin)
        self.failed_id = eq.sync.enqueue(jobs.explode, message="admin-boom", queue="admin")
        drain(eq.sync, queue="admin")
        self.queued_id = eq.sync.enqueue(jobs.send_receipt, order_id=7, queue="admin-later")

    def test_list_filters_and_search(self) -> None:
        page = self.client.get(CHANGELIST).content.decode()
        assert f">{self.failed_id}<" in page and f">{self.queued_id}<" in page
        assert "ValueError: admin-boom" in page
        failed = self.client.get(CHANGELIST, {"status": "failed", "queue": "admin"})
        assert f">{self.queued_id}<" not in failed.content.decode()
        assert f">{self.failed_id}<" in failed.content.decode()
        found = self.client.get(CHANGELIST, {"q": "admin-boom"}).content.decode()
        assert f">{self.failed_id}<" in found and f">{self.queued_id}<" not in found
        by_name = self.client.get(
            CHANGELIST, {"name": jobs.send_receipt.__module__ + ".send_receipt"}
        )
        assert f">{self.queued_id}<" in by_name.content.decode()

    def test_detail_shows_the_traceback_read_only(self) -> None:
        page = self.client.get(f"{CHANGELIST}{self.failed_id}/change/")
        assert page.status_code == 200
        html = page.content.decode()
        assert "<pre>Traceback (most recent call last):" in html
        assert "ValueError: admin-boom" in html
        assert 'name="_save"' not in html  # nothing to save: Soniq owns the row
        assert self.client.get(f"{CHANGELIST}add/").status_code == 403

    def test_retry_and_cancel_actions(self) -> None:
        response = self.client.post(
            CHANGELIST,
            {"action": "retry_jobs", "_selected_action": [self.failed_id, self.queued_id]},
            follow=True,
        )
        html = response.content.decode()
        assert "1 job(s) retried." in html
        assert f"1 job(s) left as they were (not failed nor cancelled): #{self.queued_id}" in html
        assert eq.sync.get_job(self.failed_id).status is JobStatus.QUEUED
        self.client.post(
            CHANGELIST, {"action": "cancel_jobs", "_selected_action": [self.queued_id]}
        )
        assert eq.sync.get_job(self.queued_id).status is JobStatus.CANCELLED

    def test_staff_without_permission_cannot_act(self) -> None:
        clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
        self.client.force_login(clerk)
        assert self.client.get(CHANGELIST).status_code == 403
