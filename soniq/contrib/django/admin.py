"""The admin over Soniq's jobs: a list with filters (status, queue, name) and search,
a read-only detail with the traceback, and the actions *Retry* and *Cancel* (through
the project's Soniq: ``eq.sync.retry_job`` / ``eq.sync.cancel_job``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.utils.html import format_html

from soniq.contrib.django.conf import get_soniq
from soniq.contrib.django.models import Job

_SHORT = 80


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):  # type: ignore[misc]  # Django has no type information
    """Jobs, newest first. Rows are Soniq's: nothing is added, edited or deleted here
    (``manage.py soniq purge`` deletes old ones)."""

    list_display = (
        "id",
        "name",
        "queue",
        "status",
        "priority",
        "attempts_shown",
        "run_at",
        "finished_at",
        "error_shown",
    )
    list_filter = ("status", "queue", "name")
    search_fields = ("=id", "name", "dedupe_key", "last_error")
    list_per_page = 50
    show_full_result_count = False  # a count(*) over a big queue is slow
    actions = ("retry_jobs", "cancel_jobs")
    fields = (
        "id",
        "name",
        "queue",
        "status",
        "args",
        "priority",
        "run_at",
        "attempts",
        "max_retries",
        "claims",
        "snoozes",
        "timeout",
        "dedupe_key",
        "worker_id",
        "cancel_requested",
        "progress",
        "progress_message",
        "result",
        "headers",
        "created_at",
        "started_at",
        "finished_at",
        "last_error",
        "traceback_shown",
    )
    readonly_fields = fields

    @admin.display(description="attempts")  # type: ignore[untyped-decorator]
    def attempts_shown(self, job: Job) -> str:
        """Attempts out of the runs allowed."""
        return f"{job.attempts}/{job.max_retries + 1}"

    @admin.display(description="last error")  # type: ignore[untyped-decorator]
    def error_shown(self, job: Job) -> str:
        """The last error, shortened."""
        error = job.last_error or ""
        return error if len(error) <= _SHORT else error[: _SHORT - 3] + "..."

    @admin.display(description="traceback")  # type: ignore[untyped-decorator]
    def traceback_shown(self, job: Job) -> Any:
        """The traceback of the last error, preformatted."""
        if not job.last_traceback:
            return "-"
        return format_html("<pre>{}</pre>", job.last_traceback)

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        """Jobs are enqueued by code, not added here."""
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        """Finished jobs are purged by Soniq (``manage.py soniq purge``)."""
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        """The list's actions need the change permission; a job's page is read-only."""
        return obj is None and bool(super().has_change_permission(request, obj))

    @admin.action(  # type: ignore[untyped-decorator]
        description="Retry the selected failed or cancelled jobs", permissions=["change"]
    )
    def retry_jobs(self, request: Any, queryset: Any) -> None:
        """``eq.sync.retry_job`` each selected job; say how many went back in line."""
        self._each(
            request, queryset, get_soniq().sync.retry_job, "retried", "not failed nor cancelled"
        )

    @admin.action(  # type: ignore[untyped-decorator]
        description="Cancel the selected jobs", permissions=["change"]
    )
    def cancel_jobs(self, request: Any, queryset: Any) -> None:
        """``eq.sync.cancel_job`` each selected job (a running one is asked to stop)."""
        self._each(request, queryset, get_soniq().sync.cancel_job, "cancelled", "already finished")

    def _each(
        self, request: Any, queryset: Any, act: Callable[[int], bool], verb: str, why: str
    ) -> None:
        """``act(id)`` on each selected job, then say which it changed and which not."""
        ids = list(queryset.values_list("id", flat=True))
        self._report(request, verb, [job_id for job_id in ids if act(job_id)], ids, why)

    def _report(self, request: Any, verb: str, done: list[int], ids: list[int], why: str) -> None:
        if done:
            self.message_user(request, f"{len(done)} job(s) {verb}.", messages.SUCCESS)
        changed = set(done)
        left = [job_id for job_id in ids if job_id not in changed]
        if left:
            shown = ", ".join(f"#{job_id}" for job_id in left[:20])
            self.message_user(
                request, f"{len(left)} job(s) left as they were ({why}): {shown}", messages.WARNING
            )
