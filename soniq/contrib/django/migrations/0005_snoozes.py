"""Soniq schema version 5 (soniq/core/sql/migrations/0005_snoozes.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0004_queues")]
    operations = [
        SoniqSchema(5),
    ]
