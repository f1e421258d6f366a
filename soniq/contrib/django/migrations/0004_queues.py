"""Soniq schema version 4 (soniq/core/sql/migrations/0004_queues.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0003_periodic")]
    operations = [
        SoniqSchema(4),
    ]
