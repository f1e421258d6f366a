"""A Django 6 Tasks backend on Soniq (``django.tasks``).

::

    TASKS = {
        "default": {
            "BACKEND": "soniq.contrib.django.tasks.SoniqBackend",
            "QUEUES": ["default", "mail"],        # [] allows any queue name
            "OPTIONS": {"MAX_RETRIES": 0},        # Soniq retries of a failed task
        }
    }

``my_task.enqueue(...)`` inserts a Soniq job on Django's own connection of
``SONIQ["DATABASE"]``: inside an ``atomic()`` block it commits or rolls back with the
block. The task's ``priority`` (-100 to 100, higher first), ``queue_name`` and
``run_after`` are the job's priority, queue and ``run_at``. ``get_result(id)`` reads
the job (through Django's connection, so a task enqueued in the open transaction is
found too). The worker (``manage.py soniq worker``) runs tasks as jobs named
:data:`RUNNER_NAME`, sync ones in threads, async ones through ``async_to_sync``, and
sends ``task_started`` and ``task_finished``. Needs Django 6.0 or later.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.db import connections
from django.tasks import TaskContext, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import Task, TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

from soniq import current_job
from soniq.contrib.django.conf import get_soniq
from soniq.core.enqueue import check_queue

#: The Soniq job that runs every Django task.
RUNNER_NAME = "django.tasks.run"

_STATUS = {
    "queued": TaskResultStatus.READY,
    "waiting": TaskResultStatus.READY,
    "running": TaskResultStatus.RUNNING,
    "done": TaskResultStatus.SUCCESSFUL,
    "failed": TaskResultStatus.FAILED,
    "cancelled": TaskResultStatus.FAILED,
}


def run_task(
    path: str,
    args: list[Any],
    kwargs: dict[str, Any],
    backend: str,
    run_after: str | None = None,
) -> Any:
    """The Soniq job of a Django task: import the task at ``path``, call it with its
    arguments (and its context if it takes one), send ``task_started`` and
    ``task_finished``, and return its JSON-normalized value (the task's
    ``return_value``). An exception fails the job, as Soniq records it."""
    from django.tasks import task_backends

    task = import_string(path)
    if not isinstance(task, Task):
        raise TypeError(f"{path} is {type(task).__name__}, not a django.tasks Task")
    owner = task_backends[backend]
    result = owner.get_result(str(current_job().id))
    task_started.send(sender=type(owner), task_result=result)
    try:
        if task.takes_context:
            value = task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        value = normalize_json(value)
    except BaseException as exc:
        _set(result, status=TaskResultStatus.FAILED, finished_at=timezone.now())
        result.errors.append(_error_of(exc))
        task_finished.send(sender=type(owner), task_result=result)
        raise
    _set(result, status=TaskResultStatus.SUCCESSFUL, finished_at=timezone.now())
    _set(result, _return_value=value)
    task_finished.send(sender=type(owner), task_result=result)
    return value


def register_runner() -> None:
    """Register :func:`run_task` on the project's Soniq (once), so that a worker takes
    tasks. The app does it at start when ``settings.TASKS`` uses this backend."""
    eq = get_soniq()
    if eq.registry.get(RUNNER_NAME) is None:
        eq.job(name=RUNNER_NAME, max_retries=0)(run_task)


class SoniqBackend(BaseTaskBackend):  # type: ignore[misc]  # Django has no type information
    """``django.tasks`` on Soniq: see the module's docstring. ``OPTIONS``:
    ``MAX_RETRIES`` (default 0: a failed task is failed, as Django's API expects) and
    ``TIMEOUT`` (seconds a run may take; default none)."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: Mapping[str, Any]) -> None:
        super().__init__(alias, params)
        self.max_retries = int(self.options.get("MAX_RETRIES", 0))
        self.timeout = self.options.get("TIMEOUT")
        register_runner()

    def validate_task(self, task: Any) -> None:
        """Django's checks, and Soniq's rules for queue names."""
        super().validate_task(task)
        try:
            check_queue(task.queue_name)
        except ValueError as exc:
            raise InvalidTask(str(exc)) from None

    def enqueue(self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Insert the task's job on Django's connection (in its transaction, if any)
        and return its ``TaskResult`` (``READY``; its id is the Soniq job's)."""
        self.validate_task(task)
        eq = get_soniq()
        args = normalize_json(list(args))
        kwargs = normalize_json(dict(kwargs))
        run_at = _aware(task.run_after)
        options: dict[str, Any] = {"max_retries": self.max_retries}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        job_id = eq.sync.enqueue(
            RUNNER_NAME,
            connection=connections[eq.alias],
            queue=task.queue_name,
            priority=task.priority,
            run_at=run_at,
            path=task.module_path,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            run_after=None if run_at is None else run_at.isoformat(),
            **options,
        )
        result = TaskResult(
            task=task,
            id=str(job_id),
            status=TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """The ``TaskResult`` of the job ``result_id``, read on Django's connection;
        ``TaskResultDoesNotExist`` when there is no such task."""
        from soniq.contrib.django.models import Job

        try:
            job_id = int(result_id)
        except (TypeError, ValueError):
            raise TaskResultDoesNotExist(result_id) from None
        eq = get_soniq()
        job = Job.objects.using(eq.alias).filter(pk=job_id, name=RUNNER_NAME).first()
        if job is None:
            raise TaskResultDoesNotExist(result_id)
        return self._result_of(job)

    def _result_of(self, job: Any) -> Any:
        stored = job.args
        task = import_string(stored["path"])
        run_after = stored.get("run_after")
        task = task.using(
            priority=job.priority,
            queue_name=job.queue,
            backend=self.alias,
            run_after=None if run_after is None else dt.datetime.fromisoformat(run_after),
        )
        errors = []
        if job.last_error and job.status in ("failed", "cancelled", "queued"):
            errors.append(
                TaskError(
                    exception_class_path=_class_path(job.last_error, job.last_traceback or ""),
                    traceback=job.last_traceback or job.last_error,
                )
            )
        result = TaskResult(
            task=task,
            id=str(job.id),
            status=_STATUS[job.status],
            enqueued_at=job.created_at,
            started_at=job.started_at,
            last_attempted_at=job.started_at,
            finished_at=job.finished_at if job.status in ("done", "failed", "cancelled") else None,
            args=stored["args"],
            kwargs=stored["kwargs"],
            backend=self.alias,
            errors=errors,
            worker_ids=[job.worker_id or "?"] * job.attempts,
        )
        if job.status == "done":
            _set(result, _return_value=job.result)
        return result


def _set(result: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(result, name, value)


def _aware(when: dt.datetime | None) -> dt.datetime | None:
    if when is None or timezone.is_aware(when):
        return when
    if settings.USE_TZ:  # validate_task refuses it; kept for safety
        raise InvalidTask("run_after must be an aware datetime.")
    aware: dt.datetime = timezone.make_aware(when)
    return aware


def _error_of(exc: BaseException) -> Any:
    import traceback

    cls = type(exc)
    return TaskError(
        exception_class_path=f"{cls.__module__}.{cls.__qualname__}",
        traceback="".join(traceback.format_exception(exc)),
    )


def _class_path(last_error: str, trace: str) -> str:
    """``module.Qualname`` of the exception Soniq recorded: the qualname starts
    ``last_error``; the traceback's last exception line adds its module (none for
    builtins)."""
    qualname = last_error.split(":", 1)[0].strip()
    pattern = re.compile(rf"^(?:([\w.]+)\.)?{re.escape(qualname)}(?::|$)", re.MULTILINE)
    matches = pattern.findall(trace)
    module = matches[-1] if matches and matches[-1] else "builtins"
    return f"{module}.{qualname}"
