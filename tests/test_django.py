"""soniq.contrib.django, tested in Django projects of their own, each in a process of
its own (the main suite configures Django once per process for other tests):

- ``tests/django_project``: the accessor on the test database, transactional enqueue
  from a view, ``soniq.testing``, the worker and ``manage.py soniq``, the migrations,
  the admin, and (Django 6) the Tasks backend;
- ``examples/django_app``: the example project's own tests.

``nox -s django`` runs the same on Django 4.2, 5.2 and 6.x.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
pytest.importorskip("django")


def run_django(args: list[str], cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


def test_the_django_project_suite(database_url: str) -> None:
    done = run_django(
        ["-m", "django", "test", "tests.django_project", "-v", "1"],
        cwd=str(ROOT),
        env={
            "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
            "SONIQ_DJANGO_DATABASE_URL": database_url,
        },
    )
    assert "\nOK" in done.stderr


def test_soniq_closes_its_pools_before_the_test_database_is_dropped(database_url: str) -> None:
    """One test that leaves Soniq's pool open on the test database: the run would
    end in 'database is being accessed by other users' if Soniq did not close it."""
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    run_django(
        [
            "-m",
            "django",
            "test",
            "tests.django_project.shop.tests_soniq.AccessorTests.test_it_uses_the_test_database",
        ],
        cwd=str(ROOT),
        env={
            "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
            "SONIQ_DJANGO_DATABASE_URL": database_url,
        },
    )
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (f"test_{name}",)
        ).fetchone()
    assert row == (0,)


def test_the_example_project(admin_url: str) -> None:
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    done = run_django(
        ["manage.py", "test", "-v", "1"],
        cwd=str(ROOT / "examples" / "django_app"),
        env={
            "EXAMPLE_DB_NAME": f"soniq_example_{os.getpid()}",
            "PGHOST": str(info.get("host", "127.0.0.1")),
            "PGPORT": str(info.get("port", "5432")),
            "PGUSER": str(info.get("user", "postgres")),
            "PGPASSWORD": str(info.get("password", "")),
            "DJANGO_SETTINGS_MODULE": "project.settings",
        },
    )
    assert "Ran 4 tests" in done.stderr
