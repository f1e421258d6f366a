"""Soniq schema version 6 (soniq/core/sql/migrations/0006_limits.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0005_snoozes")]
    operations = [
        SoniqSchema(6),
    ]
