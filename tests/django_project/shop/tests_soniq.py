"""soniq.contrib.django in a Django project: the accessor on the test database,
transactional enqueue from a view, soniq.testing, the worker and the command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

import soniq.contrib.django as contrib
from soniq import JobStatus, Soniq
from soniq.contrib.django import eq, get_soniq
from soniq.contrib.django.apps import check_settings
from soniq.contrib.django.conf import soniq_settings, url_from_settings
from soniq.contrib.django.management.commands.soniq import APP, soniq_argv
from soniq.contrib.django.testing import clear_jobs
from soniq.testing import DrainResult, assert_enqueued, assert_not_enqueued, drain
from tests.django_project.shop import jobs
from tests.django_project.shop.models import Order

ROOT = Path(__file__).resolve().parents[3]


def run_soniq(*args: str) -> str:
    """``manage.py soniq ARGS`` in this process; what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        call_command("soniq", *args)
    return out.getvalue()


class AccessorTests(TestCase):
    def test_one_soniq_for_the_project(self) -> None:
        assert isinstance(eq, Soniq)
        assert get_soniq() is eq
        assert contrib.eq is eq

    def test_it_uses_the_test_database(self) -> None:
        name = connection.settings_dict["NAME"]
        assert name.startswith("test_"), name
        with eq.sync.backend.acquire() as conn:
            row = conn.execute("SELECT current_database()").fetchone()
        assert row[0] == name

    def test_jobs_and_tasks_modules_are_autodiscovered(self) -> None:
        # shop/tasks.py is imported by no test: the app's ready() imported it.
        assert eq.registry.get("shop.autodiscovered") is not None
        assert "tests.django_project.shop.tasks" in sys.modules

    def test_url_from_settings(self) -> None:
        url = url_from_settings(
            {
                "NAME": "shop db",
                "USER": "app",
                "PASSWORD": "p@ss/word",
                "HOST": "db.example.com",
                "PORT": "6432",
                "OPTIONS": {"sslmode": "require", "isolation_level": 1, "pool": True},
            }
        )
        assert url == (
            "postgresql://app:p%40ss%2Fword@db.example.com:6432/shop%20db?sslmode=require"
        )
        socket = url_from_settings({"NAME": "shop", "HOST": "/var/run/postgresql"})
        assert socket == "postgresql:///shop?host=%2Fvar%2Frun%2Fpostgresql"

    def test_manage_py_check_reports_bad_settings(self) -> None:
        assert check_settings() == []
        with self.settings(SONIQ={"DATABASE": "elsewhere"}):
            [error] = check_settings()
        assert error.id == "soniq.E001" and "'elsewhere', which is not in DATABASES" in error.msg
        with (
            self.settings(SONIQ={"SCHEMA": "public", "URL": "postgresql://"}),
            self.assertRaisesMessage(ImproperlyConfigured, "unknown key(s) URL"),
        ):
            soniq_settings()

    def test_management_command_adds_the_project_soniq(self) -> None:
        assert soniq_argv(["worker", "--burst"]) == ["worker", APP, "--burst"]
        assert soniq_argv(["jobs", "--json"]) == ["jobs", "--json", "--app", APP]
        assert soniq_argv(["check"]) == ["check", APP]
        assert soniq_argv(["migrate", "--sql"]) == ["migrate", "--sql", "--app", APP]
        assert soniq_argv(["jobs", "--database-url", "x"]) == ["jobs", "--database-url", "x"]
        assert soniq_argv(["--settings", "s", "stats"]) == ["stats", "--app", APP]
        assert soniq_argv(["--help"]) == ["--help"]


class ClearJobsTests(TestCase):
    def test_clear_jobs_empties_soniqs_tables_on_the_test_database_only(self) -> None:
        eq.sync.enqueue(jobs.explode, connection=connection, message="cleared")
        clear_jobs()
        assert_not_enqueued(eq.sync, connection=connection)
        assert eq.sync.list_jobs() is not None  # Soniq's pool is not locked out
        original = connection.settings_dict["NAME"]
        connection.settings_dict["NAME"] = "production"
        try:
            with self.assertRaisesMessage(ImproperlyConfigured, "test database only"):
                clear_jobs()
        finally:
            connection.settings_dict["NAME"] = original


class EnqueueInTestCaseTests(TestCase):
    """In a TestCase, everything happens inside the test's transaction: assert on
    the jobs through Django's connection."""

    def test_a_view_enqueues_with_its_order(self) -> None:
        response = self.client.post("/orders/", {"total": 30})
        assert response.status_code == 200, response.content
        order_id = response.json()["order"]
        job = assert_enqueued(eq.sync, jobs.send_receipt, connection=connection, order_id=order_id)
        assert job.id == response.json()["job"]

    def test_a_rolled_back_view_enqueues_nothing(self) -> None:
        response = self.client.post("/orders/", {"total": 30, "fail": "1"})
        assert response.status_code == 400
        assert not Order.objects.exists()
        assert_not_enqueued(eq.sync, jobs.send_receipt, connection=connection)


class WorkerTests(TransactionTestCase):
    """Committed jobs: drain them, or run the worker."""

    def setUp(self) -> None:
        clear_jobs()

    def test_drain_runs_the_committed_job_and_not_the_rolled_back_one(self) -> None:
        with transaction.atomic():
            kept = Order.objects.create(total=1)
            eq.sync.enqueue(jobs.send_receipt, connection=connection, order_id=kept.id)
        with contextlib.suppress(RuntimeError), transaction.atomic():
            dropped = Order.objects.create(total=2)
            eq.sync.enqueue(jobs.send_receipt, connection=connection, order_id=dropped.id)
            raise RuntimeError("roll back")
        assert drain(eq.sync, queue="default") == DrainResult(done=1)
        kept.refresh_from_db()
        assert kept.receipt_sent
        assert not Order.objects.filter(pk=dropped.id).exists()

    def test_drained_jobs_use_the_test_database(self) -> None:
        job_id = eq.sync.enqueue(jobs.database_name)
        drain(eq.sync)
        assert eq.sync.get_job(job_id).result == connection.settings_dict["NAME"]

    def test_manage_py_soniq_worker_runs_jobs(self) -> None:
        order = Order.objects.create(total=3)
        sync_id = eq.sync.enqueue(jobs.send_receipt, order_id=order.id)
        async_id = eq.sync.enqueue(jobs.async_total, order_id=order.id)
        failing_id = eq.sync.enqueue(jobs.explode, message="boom")
        run_soniq("worker", "--burst", "--burst-wait", "0", "--log-level", "WARNING")
        assert eq.sync.get_job(sync_id).status is JobStatus.DONE
        assert eq.sync.get_job(async_id).result == f"async {order.id}"
        failed = eq.sync.get_job(failing_id)
        assert failed.status is JobStatus.FAILED
        assert "ValueError: boom" in (failed.traceback or "")
        order.refresh_from_db()
        assert order.receipt_sent

    def test_operator_commands(self) -> None:
        job_id = eq.sync.enqueue(jobs.explode, message="listed")
        listed = json.loads(run_soniq("jobs", "--json"))
        assert job_id in [job["id"] for job in listed]
        shown = json.loads(run_soniq("job", str(job_id), "--json"))
        assert shown["args"] == {"message": "listed"}
        assert json.loads(run_soniq("cancel", str(job_id), "--json"))["cancelled"] is True
        assert json.loads(run_soniq("retry", str(job_id), "--json"))["retried"] is True
        assert "every job waiting to run fits the code" in run_soniq("check")
        assert "version" in run_soniq("migrate")
        assert '"public".soniq_jobs' in run_soniq("migrate", "--sql", "--from", "7")
        assert json.loads(run_soniq("workers", "--json")) == []
        assert "done" in json.loads(run_soniq("stats", "--json"))
        assert "queues" in json.loads(run_soniq("queues", "--json"))
        assert json.loads(run_soniq("purge", "--older-than", "7d", "--yes", "--json")) == {
            "deleted": 0
        }
        with self.assertRaisesMessage(Exception, "status 1"):
            run_soniq("job", "999999999")

    def test_manage_py_soniq_in_a_process_of_its_own(self) -> None:
        """``manage.py soniq``'s own entry (run_from_argv), in a new process: it finds
        the project's jobs by autodiscovery and exits with soniq's status."""
        order = Order.objects.create(total=4)
        job_id = eq.sync.enqueue(jobs.send_receipt, order_id=order.id)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
            "SONIQ_DJANGO_NAME": connection.settings_dict["NAME"],
        }
        command = [sys.executable, "-m", "django", "soniq"]
        worker = subprocess.run(
            [*command, "worker", "--burst", "--burst-wait", "0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode == 0, worker.stderr
        assert eq.sync.get_job(job_id).status is JobStatus.DONE
        missing = subprocess.run(
            [*command, "job", "999999999"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert missing.returncode == 1
        assert "no job has id 999999999" in missing.stderr
