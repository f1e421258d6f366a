"""The Django 6 Tasks backend (``soniq.contrib.django.tasks.SoniqBackend``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import unittest
from pathlib import Path

import django
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

from soniq import JobStatus
from soniq.contrib.django import eq
from soniq.contrib.django.testing import clear_jobs
from soniq.testing import (
    DrainResult,
    assert_enqueued,
    assert_not_enqueued,
    drain,
    enqueued_jobs,
)
from tests.django_project.shop.models import Order

if django.VERSION >= (6, 0):
    from django.tasks import TaskResultStatus, task_backends
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started

    from soniq.contrib.django.tasks import RUNNER_NAME
    from tests.django_project.shop import django_tasks as t

ROOT = Path(__file__).resolve().parents[3]
needs_tasks = unittest.skipUnless(django.VERSION >= (6, 0), "django.tasks needs Django 6")


@needs_tasks
class TasksInTestCaseTests(TestCase):
    def test_enqueue_joins_the_atomic_block(self) -> None:
        order = Order.objects.create(total=5)
        with transaction.atomic():
            result = t.mark_sent.enqueue(order.id)
        job = assert_enqueued(eq.sync, RUNNER_NAME, connection=connection)
        assert result.id == str(job.id)
        assert job.args["args"] == [order.id]
        # get_result reads through Django's connection: the open transaction's job.
        assert t.mark_sent.get_result(result.id).status == TaskResultStatus.READY

    def test_a_rolled_back_block_drops_the_task(self) -> None:
        with contextlib.suppress(RuntimeError), transaction.atomic():
            t.mark_sent.enqueue(1)
            raise RuntimeError("roll back")
        assert_not_enqueued(eq.sync, RUNNER_NAME, connection=connection)

    def test_priority_queue_and_run_after_map_to_soniqs(self) -> None:
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        result = t.add.using(run_after=later, priority=-20).enqueue(1, b=2)
        job = assert_enqueued(eq.sync, RUNNER_NAME, connection=connection)
        assert (job.priority, job.queue) == (-20, "mail")
        assert abs((job.run_at - later).total_seconds()) < 0.001
        assert job.args["kwargs"] == {"b": 2}
        read = t.add.get_result(result.id)
        assert read.task.priority == -20 and read.task.queue_name == "mail"
        assert read.task.run_after == later
        assert (read.args, read.kwargs) == ([1], {"b": 2})

    def test_queues_outside_the_backends_are_refused(self) -> None:
        with self.assertRaises(InvalidTask):
            t.add.using(queue_name="elsewhere").enqueue(1, 2)

    def test_unknown_result_ids(self) -> None:
        for bad in ("999999999", "not-a-number"):
            with self.assertRaises(TaskResultDoesNotExist):
                t.add.get_result(bad)

    def test_enqueued_signal(self) -> None:
        seen = []

        def record(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(task_result.id)

        task_enqueued.connect(record)
        try:
            result = t.add.enqueue(1, 2)
        finally:
            task_enqueued.disconnect(record)
        assert seen == [result.id]

    def test_retries_and_timeout_from_options(self) -> None:
        options = {"MAX_RETRIES": 2, "TIMEOUT": 30}
        backend = {"BACKEND": "soniq.contrib.django.tasks.SoniqBackend", "OPTIONS": options}
        with self.settings(TASKS={"default": backend}):
            t.fail.enqueue("later")
        job = assert_enqueued(eq.sync, RUNNER_NAME, connection=connection)
        assert (job.max_retries, job.timeout) == (2, 30)
        t.add.enqueue(1, 2)  # the default backend again: no retries
        jobs = enqueued_jobs(eq.sync, RUNNER_NAME, connection=connection)
        assert [j.max_retries for j in jobs] == [2, 0]

    def test_backend_features(self) -> None:
        backend = task_backends["default"]
        assert backend.supports_defer and backend.supports_async_task
        assert backend.supports_get_result and backend.supports_priority


@needs_tasks
class TasksRunByTheWorkerTests(TransactionTestCase):
    def setUp(self) -> None:
        clear_jobs()

    def test_a_task_runs_and_its_result_is_read(self) -> None:
        order = Order.objects.create(total=6)
        events = []

        def record(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
            events.append(task_result.status)

        task_started.connect(record)
        task_finished.connect(record)
        try:
            with transaction.atomic():
                result = t.mark_sent.enqueue(order.id)
            assert drain(eq.sync) == DrainResult(done=1)
        finally:
            task_started.disconnect(record)
            task_finished.disconnect(record)
        assert events == [TaskResultStatus.RUNNING, TaskResultStatus.SUCCESSFUL]
        result.refresh()
        assert result.status == TaskResultStatus.SUCCESSFUL
        assert result.return_value == order.id
        assert result.is_finished and result.attempts == 1
        assert result.started_at is not None and result.finished_at is not None
        order.refresh_from_db()
        assert order.receipt_sent

    def test_a_failing_task(self) -> None:
        result = t.fail.enqueue("task-boom")
        assert drain(eq.sync) == DrainResult(failed=1)
        read = t.fail.get_result(result.id)
        assert read.status == TaskResultStatus.FAILED
        [error] = read.errors
        assert error.exception_class is ValueError
        assert "ValueError: task-boom" in error.traceback
        with self.assertRaises(ValueError):
            read.return_value  # noqa: B018

    def test_context_and_async_tasks(self) -> None:
        with_context = t.with_context.enqueue("ctx")
        doubled = t.async_double.enqueue(21)
        assert drain(eq.sync) == DrainResult(done=2)
        value = t.with_context.get_result(with_context.id).return_value
        assert value == {"label": "ctx", "attempt": 1, "id": with_context.id}
        assert t.async_double.get_result(doubled.id).return_value == 42

    def test_aenqueue_and_aget_result(self) -> None:
        from asgiref.sync import async_to_sync

        result = async_to_sync(t.add.aenqueue)(2, 3)
        drain(eq.sync)
        read = async_to_sync(t.add.aget_result)(result.id)
        assert read.return_value == 5

    def test_the_worker_command_runs_tasks(self) -> None:
        from django.core.management import call_command

        result = t.add.enqueue(4, 5)
        call_command("soniq", "worker", "--burst", "--burst-wait", "0", "--log-level", "ERROR")
        assert eq.sync.get_job(int(result.id)).status is JobStatus.DONE
        assert t.add.get_result(result.id).return_value == 9

    def test_a_worker_process_knows_the_task_runner(self) -> None:
        """A fresh ``manage.py soniq worker`` registers the runner at start (the app's
        ready()) and imports the task by its path."""
        result = t.add.enqueue(20, 22)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
            "SONIQ_DJANGO_NAME": connection.settings_dict["NAME"],
        }
        worker = subprocess.run(
            [sys.executable, "-m", "django", "soniq", "worker", "--burst", "--burst-wait", "0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode == 0, worker.stderr
        assert t.add.get_result(result.id).return_value == 42
