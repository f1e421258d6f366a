"""Soniq schema version 1 (soniq/core/sql/migrations/0001_initial.sql), and the
unmanaged Job model."""

from django.db import migrations, models

from soniq.contrib.django.models import STATUSES, job_table
from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies: list[tuple[str, str]] = []
    operations = [
        SoniqSchema(1),
        migrations.CreateModel(
            name="Job",
            fields=[
                ("id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("name", models.TextField()),
                ("queue", models.TextField()),
                ("args", models.JSONField()),
                ("status", models.TextField(choices=STATUSES)),
                ("priority", models.IntegerField()),
                ("run_at", models.DateTimeField()),
                ("attempts", models.IntegerField()),
                ("max_retries", models.IntegerField()),
                ("timeout", models.FloatField(null=True)),
                ("dedupe_key", models.TextField(null=True)),
                ("worker_id", models.TextField(null=True)),
                ("cancel_requested", models.BooleanField()),
                ("last_error", models.TextField(null=True)),
                ("last_traceback", models.TextField(null=True)),
                ("result", models.JSONField(null=True)),
                ("created_at", models.DateTimeField()),
                ("started_at", models.DateTimeField(null=True)),
                ("finished_at", models.DateTimeField(null=True)),
                ("claims", models.IntegerField()),
                ("snoozes", models.IntegerField()),
                ("progress", models.FloatField(null=True)),
                ("progress_message", models.TextField(null=True)),
                ("headers", models.JSONField(null=True)),
            ],
            options={
                "verbose_name": "job",
                "verbose_name_plural": "jobs",
                "db_table": job_table(),
                "ordering": ("-id",),
                "managed": False,
            },
        ),
    ]
