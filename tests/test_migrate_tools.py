"""``soniq migrate --sql --from N`` inside the migrations of other tools: an Alembic
revision and a Django migration run its output in their own transaction, and the
schema ends where ``soniq migrate`` would leave it (version table included)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from soniq import Soniq
from soniq.cli import main
from soniq.core.sql.migrate import LATEST_VERSION, MIGRATIONS, MigrationPlan

pytestmark = pytest.mark.slow


def _printed_sql(capsys: pytest.CaptureFixture[str], schema: str, since: int) -> str:
    """What a user pastes into their migration: the command's output."""
    assert main(["migrate", "--sql", "--from", str(since), "--schema", schema]) == 0
    return capsys.readouterr().out


def _at_version(pg: psycopg.Connection, schema: str, version: int) -> None:
    """The schema as an older Soniq (at ``version``) left it."""
    plan = MigrationPlan(schema)
    with pg.transaction():
        pg.execute(plan.bootstrap)
        for migration in MIGRATIONS[:version]:
            pg.execute(plan.apply(migration))


def _version(pg: psycopg.Connection, schema: str) -> list[int]:
    rows = pg.execute(f'SELECT version FROM "{schema}".soniq_migrations ORDER BY 1')
    return [row[0] for row in rows]


def _works(database_url: str, schema: str) -> None:
    """Soniq finds its schema current (no DDL of its own) and a job goes through."""
    eq = Soniq(database_url, schema=schema)
    try:
        eq.sync.ensure_initialized(migrate=False)
        job_id = eq.sync.enqueue("tools.job", n=1)
        assert eq.sync.get_job(job_id) is not None
    finally:
        eq.sync.close()


def _alembic(tmp_path: Path, url: str, schema: str, body: str) -> subprocess.CompletedProcess[str]:
    """``alembic upgrade head`` of a project whose one revision's upgrade is ``body``."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(
        textwrap.dedent(
            """
            from alembic import context
            from sqlalchemy import create_engine

            engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
            with engine.connect() as connection:
                context.configure(
                    connection=connection,
                    transactional_ddl=True,
                    # Each test's own version table: the run's database is shared.
                    version_table_schema=context.config.get_main_option("soniq_schema"),
                )
                with context.begin_transaction():
                    context.run_migrations()
            """
        )
    )
    (tmp_path / "script.py.mako").write_text("")
    (tmp_path / "versions" / "a1_soniq.py").write_text(
        f'from alembic import op\n\nrevision = "a1"\ndown_revision = None\n\n\n'
        f"def upgrade() -> None:\n{textwrap.indent(body, '    ')}\n"
    )
    (tmp_path / "alembic.ini").write_text(
        f"[alembic]\nscript_location = {tmp_path}\nsqlalchemy.url = {url}\n"
        f"soniq_schema = {schema}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(tmp_path / "alembic.ini"), "upgrade", "head"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_alembic_revision_upgrades_an_older_schema(
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _at_version(pg, schema, 6)
    script = _printed_sql(capsys, schema, 6)
    statements = [line for line in script.splitlines() if line.endswith(";")]
    assert not {"BEGIN;", "COMMIT;"} & set(statements)
    url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    done = _alembic(tmp_path, url, schema, f"op.execute({script!r})")
    assert done.returncode == 0, done.stderr
    assert _version(pg, schema) == list(range(1, LATEST_VERSION + 1))
    _works(database_url, schema)


def test_a_failing_alembic_revision_rolls_the_soniq_sql_back(
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No COMMIT of its own: when the revision fails after it, nothing of it stays."""
    _at_version(pg, schema, 6)
    script = _printed_sql(capsys, schema, 6)
    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    done = _alembic(tmp_path, url, schema, f'op.execute({script!r})\nop.execute("SELECT 1 / 0")')
    assert done.returncode != 0 and "division by zero" in done.stderr
    assert _version(pg, schema) == list(range(1, 7))
    found = pg.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = %s AND table_name = 'soniq_job_deps'",
        (schema,),
    ).fetchone()
    assert found == (0,)  # migration 7's table is not there


def test_a_django_migration_creates_the_schema(
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = _printed_sql(capsys, schema, 0)
    app = tmp_path / "soniq_schema"
    (app / "migrations").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    (app / "migrations" / "0001_soniq.py").write_text(
        "from django.db import migrations\n\n\n"
        "class Migration(migrations.Migration):\n"
        f"    operations = [migrations.RunSQL({script!r})]\n"
    )
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    runner = textwrap.dedent(
        f"""
        import django
        from django.conf import settings
        from django.core.management import call_command

        settings.configure(
            DATABASES={{"default": {{
                "ENGINE": "django.db.backends.postgresql",
                "NAME": {info["dbname"]!r}, "USER": {info.get("user", "")!r},
                "PASSWORD": {info.get("password", "")!r}, "HOST": {info.get("host", "")!r},
                "PORT": {str(info.get("port", ""))!r},
            }}}},
            INSTALLED_APPS=["soniq_schema"],
        )
        django.setup()
        call_command("migrate", "soniq_schema", verbosity=0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", runner],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _version(pg, schema) == list(range(1, LATEST_VERSION + 1))
    _works(database_url, schema)


def test_from_the_latest_version_prints_nothing_to_apply(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["migrate", "--sql", "--from", str(LATEST_VERSION)]) == 0
    assert capsys.readouterr().out == (
        f"-- Soniq schema version {LATEST_VERSION}: nothing to apply after it\n"
    )
    assert main(["migrate", "--sql", "--from", str(LATEST_VERSION + 1)]) == 2
    assert f"--from must be a schema version from 0 (none) to {LATEST_VERSION}, got " in (
        capsys.readouterr().err
    )
    assert main(["migrate", "--from", "3"]) == 2
    assert "--from goes with --sql" in capsys.readouterr().err


def test_a_script_for_another_version_refuses_to_run(
    database_url: str,
    schema: str,
    pg: psycopg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The output of --from 6 on a schema at version 5 would skip migration 6 and
    record 7 and 8: it fails instead, naming the version to print, and nothing of
    it stays (psycopg 2 and 3 under Alembic)."""
    _at_version(pg, schema, 5)
    script = _printed_sql(capsys, schema, 6)
    for n, driver in enumerate(("psycopg2", "psycopg")):
        url = database_url.replace("postgresql://", f"postgresql+{driver}://", 1)
        project = tmp_path / driver
        project.mkdir()
        done = _alembic(project, url, schema, f"op.execute({script!r})")
        assert done.returncode != 0, (n, done.stderr)
        assert (
            f"Soniq schema '{schema}' is at version 5, this script upgrades from version 6: "
            "print the one for version 5 with `soniq migrate --sql --from 5`"
        ) in done.stderr
        assert _version(pg, schema) == [1, 2, 3, 4, 5]
