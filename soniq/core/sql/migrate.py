"""Schema migrations: which exist, which are pending, and the SQL to apply them.

A migration run is one transaction that first takes a transaction-scoped advisory lock
keyed on the schema, so any number of processes may start at once: the first applies
what is pending, the rest wait, then find nothing left to do.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Generator, Iterable, Sequence
from importlib import resources
from typing import Any

import attrs

from soniq.core.errors import SchemaNotReadyError
from soniq.core.sql.postgres import quote_ident

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@attrs.frozen
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    template: str

    def sql(self, schema: str) -> str:
        """The migration's DDL for ``schema``."""
        return self.template.replace("{schema}", quote_ident(schema))


def load_migrations() -> tuple[Migration, ...]:
    """Every migration shipped in the package, in version order."""
    found = []
    for entry in resources.files("soniq.core.sql.migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, got {versions}")
    return tuple(found)


MIGRATIONS = load_migrations()
LATEST_VERSION = MIGRATIONS[-1].version


@attrs.frozen
class MigrationPlan:
    """The statements of one migration run against ``schema``, in order."""

    schema: str

    @property
    def lock(self) -> str:
        """Serialise migration runs on this schema until the transaction ends."""
        key = zlib.crc32(f"soniq.migrate:{self.schema}".encode())
        return f"SELECT pg_advisory_xact_lock({key})"

    @property
    def bootstrap(self) -> str:
        """Create the schema and the table that records applied migrations."""
        s = quote_ident(self.schema)
        return (
            f"CREATE SCHEMA IF NOT EXISTS {s};\n"
            f"CREATE TABLE IF NOT EXISTS {s}.soniq_migrations (\n"
            "    version    integer PRIMARY KEY,\n"
            "    name       text NOT NULL,\n"
            "    applied_at timestamptz NOT NULL DEFAULT now()\n"
            ")"
        )

    @property
    def applied_versions(self) -> str:
        """Select the versions already applied."""
        return f"SELECT version FROM {quote_ident(self.schema)}.soniq_migrations"

    @property
    def table_exists(self) -> str:
        """Select whether the migrations table exists (then :attr:`max_version` reads
        the version); no DDL."""
        table = f"{quote_ident(self.schema)}.soniq_migrations"
        return f"SELECT to_regclass('{table.replace(chr(39), chr(39) * 2)}') IS NOT NULL"

    @property
    def max_version(self) -> str:
        """Select the highest version applied (0 when none)."""
        return f"SELECT coalesce(max(version), 0) FROM {quote_ident(self.schema)}.soniq_migrations"

    def pending(self, applied: Iterable[int]) -> list[Migration]:
        """Migrations not yet applied, in order."""
        done = set(applied)
        return [m for m in MIGRATIONS if m.version not in done]

    def apply(self, migration: Migration) -> str:
        """The DDL of ``migration`` followed by the row that records it."""
        record = (
            f"INSERT INTO {quote_ident(self.schema)}.soniq_migrations (version, name) "
            f"VALUES ({migration.version}, '{migration.name}')"
        )
        return f"{migration.sql(self.schema).rstrip().rstrip(';')};\n{record}"

    def script(self, from_version: int | None = None) -> str:
        """Everything, as one SQL script in its own transaction, for users who
        migrate with psql. With ``from_version``: only the migrations after that
        version, and no BEGIN or COMMIT, for a tool that runs it inside its own
        migration's transaction (Alembic's ``op.execute``, Django's ``RunSQL``)."""
        if from_version is None:
            parts = ["BEGIN", self.lock, self.bootstrap]
            parts += [self.apply(m) for m in MIGRATIONS]
            parts.append("COMMIT")
            return ";\n\n".join(parts) + ";\n"
        if (
            isinstance(from_version, bool)
            or not isinstance(from_version, int)
            or not 0 <= from_version <= LATEST_VERSION
        ):
            raise ValueError(
                f"from_version must be a schema version from 0 (none) to {LATEST_VERSION}, "
                f"got {from_version!r}"
            )
        wanted = [m for m in MIGRATIONS if m.version > from_version]
        if not wanted:
            return f"-- Soniq schema version {LATEST_VERSION}: nothing to apply after it\n"
        parts = [
            self.lock,
            self.bootstrap,
            self._require_version(from_version),
            *(self.apply(m) for m in wanted),
        ]
        header = (
            f"-- Soniq schema versions {wanted[0].version} to {wanted[-1].version}; "
            "run it inside a transaction\n"
        )
        return header + ";\n\n".join(parts) + ";\n"

    def _require_version(self, version: int) -> str:
        """Fail (and so roll back the tool's migration) unless the schema is at
        ``version``: a script printed for another version would skip or repeat
        migrations, and the version table would then lie."""
        table = f"{quote_ident(self.schema)}.soniq_migrations"
        name = self.schema.replace("'", "''")
        return (
            "DO $soniq$\nDECLARE found integer;\nBEGIN\n"
            f"    SELECT coalesce(max(version), 0) INTO found FROM {table};\n"
            f"    IF found <> {version} THEN\n"
            f"        RAISE EXCEPTION 'Soniq schema ''{name}'' is at version %, this script "
            f"upgrades from version {version}: print the one for version % with "
            "`soniq migrate --sql --from %`', found, found, found;\n"
            "    END IF;\nEND\n$soniq$"
        )


@attrs.frozen
class Statement:
    """One step of a migration run: SQL text, and whether the driver must return rows
    (a statement without rows may hold several commands)."""

    sql: str
    returns_rows: bool = False


#: The protocol between :func:`migration_steps` and a driver: each yielded statement
#: is executed and its rows (an empty list when it returns none) are sent back.
MigrationSteps = Generator[Statement, Sequence[Sequence[Any]], int]


def migration_steps(plan: MigrationPlan, *, apply: bool) -> MigrationSteps:
    """Bring ``plan.schema`` up to date, or with ``apply=False`` only check it.

    A driver runs the steps inside one transaction. When the schema is already current
    nothing is locked and no DDL is sent. Returns the schema version.
    """
    exists = (yield Statement(plan.table_exists, returns_rows=True))[0][0]
    version = (yield Statement(plan.max_version, returns_rows=True))[0][0] if exists else 0
    if version == LATEST_VERSION:
        return version
    if version > LATEST_VERSION:
        raise SchemaNotReadyError(
            f"schema {plan.schema!r} is at version {version}, newer than this Soniq "
            f"({LATEST_VERSION}); upgrade the soniq package"
        )
    if not apply:
        raise SchemaNotReadyError(
            f"schema {plan.schema!r} is at version {version}, this Soniq needs "
            f"{LATEST_VERSION}; run `soniq migrate --database-url URL` (or "
            "ensure_initialized() with a role that may run DDL)"
        )
    yield Statement(plan.lock)
    yield Statement(plan.bootstrap)
    applied = [row[0] for row in (yield Statement(plan.applied_versions, returns_rows=True))]
    for migration in plan.pending(applied):
        yield Statement(plan.apply(migration))
    return LATEST_VERSION
