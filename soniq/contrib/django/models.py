"""An unmanaged model over Soniq's jobs table, for the admin and for queries.

``Job`` reads ``soniq_jobs`` in the schema of ``SONIQ["SCHEMA"]`` on the database of
``SONIQ["DATABASE"]`` (route it there with ``Job.objects.using(...)`` in a
multi-database project). Soniq owns the table: change jobs through ``eq``
(``retry_job``, ``cancel_job``, ``purge_jobs``), not by saving rows.
"""

from __future__ import annotations

from django.db import models

from soniq.contrib.django.conf import soniq_settings


def job_table() -> str:
    """``Job``'s ``db_table``: ``soniq_jobs``, schema-qualified unless the schema is
    ``public`` (Django quotes ``schema"."table`` as ``"schema"."table"``)."""
    schema = soniq_settings()["SCHEMA"]
    return "soniq_jobs" if schema == "public" else f'{schema}"."soniq_jobs'


STATUSES = [
    ("queued", "queued"),
    ("waiting", "waiting"),
    ("running", "running"),
    ("done", "done"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
]


class Job(models.Model):  # type: ignore[misc]  # Django has no type information
    """A row of ``soniq_jobs`` (read-only here; see the module's docstring)."""

    id = models.BigIntegerField(primary_key=True)
    name = models.TextField()
    queue = models.TextField()
    args = models.JSONField()
    status = models.TextField(choices=STATUSES)
    priority = models.IntegerField()
    run_at = models.DateTimeField()
    attempts = models.IntegerField()
    max_retries = models.IntegerField()
    timeout = models.FloatField(null=True)
    dedupe_key = models.TextField(null=True)
    worker_id = models.TextField(null=True)
    cancel_requested = models.BooleanField()
    last_error = models.TextField(null=True)
    last_traceback = models.TextField(null=True)
    result = models.JSONField(null=True)
    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)
    claims = models.IntegerField()
    snoozes = models.IntegerField()
    progress = models.FloatField(null=True)
    progress_message = models.TextField(null=True)
    headers = models.JSONField(null=True)

    class Meta:
        managed = False
        db_table = job_table()
        ordering = ("-id",)
        verbose_name = "job"
        verbose_name_plural = "jobs"

    def __str__(self) -> str:
        return f"#{self.id} {self.name} ({self.status})"
