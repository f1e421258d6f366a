"""Soniq's schema as Django migrations: created by ``manage.py migrate``, consistent
with ``soniq migrate`` in either order, printable with ``sqlmigrate``."""

from __future__ import annotations

import contextlib
import io
import os

import psycopg
from django.core.management import call_command
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from django.test import TransactionTestCase, override_settings

from soniq import Soniq
from soniq.cli import main as soniq_main
from soniq.contrib.django.conf import database_url
from soniq.contrib.django.operations import SoniqSchema
from soniq.core.sql.migrate import LATEST_VERSION, MIGRATIONS


def versions(schema: str) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT version FROM "{schema}".soniq_migrations ORDER BY version')
        return [row[0] for row in cursor.fetchall()]


def soniq_migrate_changes_nothing(schema: str) -> None:
    """``soniq migrate`` on a current schema: nothing to apply (the version check
    returns before any lock or DDL) and the table unchanged."""
    eq = Soniq(database_url(), schema=schema)
    try:
        eq.sync.ensure_initialized(migrate=False)  # raises unless current
    finally:
        eq.sync.close()
    before = versions(schema)
    assert soniq_main(["migrate", "--database-url", database_url(), "--schema", schema]) == 0
    assert versions(schema) == before


class MigrationTests(TransactionTestCase):
    def tearDown(self) -> None:
        with connection.cursor() as cursor:
            for schema in ("soniq_first", "django_first"):
                cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        call_command("migrate", "soniq", verbosity=0)  # as the other tests expect

    def test_one_django_migration_per_soniq_version(self) -> None:
        loader = MigrationLoader(connection)
        ours = sorted(key for key in loader.disk_migrations if key[0] == "soniq")
        found = [
            op.version
            for key in ours
            for op in loader.disk_migrations[key].operations
            if isinstance(op, SoniqSchema)
        ]
        assert found == [m.version for m in MIGRATIONS]
        assert [name for _, name in ours] == [f"{m.version:04d}_{m.name}" for m in MIGRATIONS]

    def test_manage_py_migrate_created_the_schema(self) -> None:
        assert versions("public") == list(range(1, LATEST_VERSION + 1))
        soniq_migrate_changes_nothing("public")

    def test_soniq_migrate_first_then_django(self) -> None:
        with override_settings(SONIQ={"SCHEMA": "soniq_first"}):
            assert (
                soniq_main(["migrate", "--database-url", database_url(), "--schema", "soniq_first"])
                == 0
            )
            call_command("migrate", "soniq", "zero", verbosity=0)
            call_command("migrate", "soniq", verbosity=0)  # finds every version recorded
        assert versions("soniq_first") == list(range(1, LATEST_VERSION + 1))

    def test_django_first_then_soniq_migrate(self) -> None:
        with override_settings(SONIQ={"SCHEMA": "django_first"}):
            call_command("migrate", "soniq", "zero", verbosity=0)
            call_command("migrate", "soniq", verbosity=0)
        assert versions("django_first") == list(range(1, LATEST_VERSION + 1))
        soniq_migrate_changes_nothing("django_first")

    def test_a_partly_migrated_schema_is_upgraded(self) -> None:
        """``soniq migrate`` of an older Soniq left version 3; Django applies 4 and on."""
        url = database_url()
        with psycopg.connect(url, autocommit=True) as conn:
            from soniq.core.sql.migrate import MigrationPlan

            plan = MigrationPlan("django_first")
            with conn.transaction():
                conn.execute(plan.bootstrap)
                for migration in MIGRATIONS[:3]:
                    conn.execute(plan.apply(migration))
        with override_settings(SONIQ={"SCHEMA": "django_first"}):
            call_command("migrate", "soniq", "zero", verbosity=0)
            call_command("migrate", "soniq", verbosity=0)
        assert versions("django_first") == list(range(1, LATEST_VERSION + 1))
        soniq_migrate_changes_nothing("django_first")

    def test_sqlmigrate_prints_soniqs_sql(self) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            call_command("sqlmigrate", "soniq", "0001", stdout=out)
        sql = out.getvalue()
        assert "pg_advisory_xact_lock" in sql
        assert "CREATE TABLE IF NOT EXISTS" in sql and "soniq_migrations" in sql
        assert '"public".soniq_jobs' in sql or "public.soniq_jobs" in sql

    def test_no_missing_django_migration(self) -> None:
        # The unmanaged Job model is in the migrations' state: makemigrations would
        # otherwise write a migration into the installed package.
        call_command("makemigrations", "soniq", "--check", "--dry-run", verbosity=0)

    def test_migrate_plan_describes_the_versions(self) -> None:
        out = io.StringIO()
        call_command("migrate", "soniq", "zero", verbosity=0)
        call_command("migrate", "soniq", "--plan", stdout=out)
        assert "Soniq schema version 1 (initial)" in out.getvalue()
        assert os.environ.get("DJANGO_SETTINGS_MODULE") is not None
