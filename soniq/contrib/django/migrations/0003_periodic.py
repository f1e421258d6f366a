"""Soniq schema version 3 (soniq/core/sql/migrations/0003_periodic.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0002_claims")]
    operations = [
        SoniqSchema(3),
    ]
