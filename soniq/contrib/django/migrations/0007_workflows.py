"""Soniq schema version 7 (soniq/core/sql/migrations/0007_workflows.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0006_limits")]
    operations = [
        SoniqSchema(7),
    ]
