"""The migration operation that ships Soniq's schema as Django migrations.

``SoniqSchema(N)`` applies Soniq's schema version N (``soniq/core/sql/migrations``)
on the database of ``SONIQ["DATABASE"]``, in the schema of ``SONIQ["SCHEMA"]``, with
the SQL of :class:`~soniq.core.sql.migrate.MigrationPlan`: the advisory lock of
``soniq migrate``, the ``soniq_migrations`` table, the version's DDL and the row that
records it. A version already recorded there (``soniq migrate`` ran first) is
skipped, so ``manage.py migrate`` and ``soniq migrate`` can run in either order.
``manage.py sqlmigrate soniq 0001`` prints the SQL.

On another database alias, or one that is not PostgreSQL, the operation does
nothing. Unapplying it changes nothing in the database (Soniq has no down
migrations): applying it again finds the version recorded.
"""

from __future__ import annotations

from typing import Any

from django.db import router
from django.db.migrations.operations import RunSQL

from soniq.contrib.django.conf import soniq_settings
from soniq.core.sql.migrate import MIGRATIONS, MigrationPlan


class SoniqSchema(RunSQL):  # type: ignore[misc]  # Django has no type information
    """Apply Soniq's schema version ``version`` unless ``soniq_migrations`` records
    it already."""

    reduces_to_sql = True
    reversible = True

    def __init__(self, version: int) -> None:
        if not 1 <= version <= len(MIGRATIONS):
            raise ValueError(f"no Soniq schema version {version} (1 to {len(MIGRATIONS)})")
        self.version = version
        super().__init__(sql=self._statements(), reverse_sql=RunSQL.noop, elidable=False)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        """How a migration file writes this operation."""
        return (f"{__name__}.{type(self).__qualname__}", [self.version], {})

    def describe(self) -> str:
        """One line for ``manage.py migrate --plan``."""
        migration = MIGRATIONS[self.version - 1]
        return f"Soniq schema version {self.version} ({migration.name})"

    def _plan(self) -> MigrationPlan:
        return MigrationPlan(soniq_settings()["SCHEMA"])

    def _statements(self) -> list[str]:
        plan = self._plan()
        return [plan.lock, plan.bootstrap, plan.apply(MIGRATIONS[self.version - 1])]

    def _applies(self, connection: Any, app_label: str) -> bool:
        return bool(
            connection.alias == soniq_settings()["DATABASE"]
            and connection.vendor == "postgresql"
            and router.allow_migrate(connection.alias, app_label, **self.hints)
        )

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        """Lock, create the version table if needed, and apply the version unless it
        is recorded; with ``sqlmigrate`` (collecting SQL), print all of it."""
        if not self._applies(schema_editor.connection, app_label):
            return
        lock, bootstrap, apply = self._statements()
        if schema_editor.collect_sql:
            for statement in (lock, bootstrap, apply):
                schema_editor.execute(statement, params=None)
            return
        schema_editor.execute(lock, params=None)
        schema_editor.execute(bootstrap, params=None)
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(self._plan().applied_versions)
            applied = {row[0] for row in cursor.fetchall()}
        if self.version not in applied:
            schema_editor.execute(apply, params=None)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        """Nothing: Soniq's tables stay (drop the schema by hand to remove them)."""
