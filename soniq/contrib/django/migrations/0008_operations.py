"""Soniq schema version 8 (soniq/core/sql/migrations/0008_operations.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0007_workflows")]
    operations = [
        SoniqSchema(8),
    ]
