"""Soniq schema version 2 (soniq/core/sql/migrations/0002_claims.sql)."""

from django.db import migrations

from soniq.contrib.django.operations import SoniqSchema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no type information
    dependencies = [("soniq", "0001_initial")]
    operations = [
        SoniqSchema(2),
    ]
